"""A radiologist's verdicts on LungScreen's findings as a DICOM SR, sent back next to the AI SR.

IHE AIRA ("AI Result Assessment", IHE Radiology Technical Framework Supplement, Trial
Implementation, published 2025-06-12: https://www.ihe.net/uploadedFiles/Documents/Radiology/IHE_RAD_Suppl_AIRA.pdf)
could not be read when this was written: neither the supplement nor the DICOM template it
defines was among the sources available, so its codes and template are not used here. What is
known of it from secondary sources: an Assessment Creator records whether a clinician accepted,
rejected or modified (supplemented) each AI result, who and when, as a DICOM SR of the study
that refers to the assessed AI result. This module writes the closest encoding PS3.16 has, and
says so in the document; when the AIRA template is at hand, check this against it:

* Comprehensive SR (PS3.3 A.35.3), root template TID 1500 "Imaging Measurement Report", in the
  study of the AI SR, in a series of its own ("LungScreen AI result assessment").
* Observation context (TID 1001): the reviewer as Person Observer (TID 1003, Person Observer
  Name), so one document is the assessment of one reviewer.
* The AI SR in CurrentRequestedProcedureEvidenceSequence (it is the evidence assessed).
* Per assessed finding one TID 1501 Measurement and Qualitative Evaluation Group whose
  Tracking Unique Identifier (DCM 112040) is the one the AI SR gave the finding: TID 1500
  tracks one finding across documents under one UID, so the group is about that very finding.
  Its Tracking Identifier is "<the AI's identifier> assessment" (not a Cornerstone tool name,
  so OHIF does not take it for a measurement to draw). Its one qualitative evaluation (row 11)
  is the verdict, a local code (:data:`ASSESSMENT`: :data:`ACCEPTED_CODE` or
  :data:`REJECTED_CODE`; DICOM defines no code for accepting or rejecting an AI finding), with
  Observation DateTime (0040,A032) the time of the verdict.
* Document level (TID 1500 row 12): the research-use notice, and a note naming this encoding
  as LungScreen's stand-in for the AIRA object.

dciodvfy and PixelMed's DicomSRValidator (TID 1500) check it in the tests.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lungscreen.dicom_io.sr import LOCAL_SCHEME, RESEARCH_USE_NOTICE
from lungscreen.dicom_io.uids import is_valid_uid
from lungscreen.errors import ReportError

__all__ = [
    "ACCEPTED_CODE", "ASSESSMENT", "REJECTED_CODE", "SERIES_DESCRIPTION", "Assessment", "FindingAssessment",
    "build_assessment",
]

SERIES_DESCRIPTION = "LungScreen AI result assessment (research use)"

ASSESSMENT = hd.sr.CodedConcept(value="AI-ASSESSMENT", scheme_designator=LOCAL_SCHEME, meaning="AI result assessment")
ACCEPTED_CODE = hd.sr.CodedConcept(value="AI-ACCEPTED", scheme_designator=LOCAL_SCHEME, meaning="AI result accepted")
REJECTED_CODE = hd.sr.CodedConcept(value="AI-REJECTED", scheme_designator=LOCAL_SCHEME, meaning="AI result rejected")
_ENCODING_NOTE = hd.sr.CodedConcept(value="ENCODING", scheme_designator=LOCAL_SCHEME, meaning="Encoding")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations")
_PROCEDURE_REPORTED = hd.sr.CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region")

_LO_MAX = 64  # Long String, PS3.5 6.2
_PN_COMPONENT_MAX = 64


class Assessment(enum.Enum):
    """A radiologist's verdict on one AI finding (AIRA's "modified" is not recorded here:
    a changed finding arrives as a viewer SR, which is already in the PACS)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"

    @property
    def code(self) -> hd.sr.CodedConcept:
        return ACCEPTED_CODE if self is Assessment.ACCEPTED else REJECTED_CODE


@dataclass(frozen=True)
class FindingAssessment:
    """The verdict on one finding of the AI SR.

    Attributes
    ----------
    tracking_uid:
        The finding's Tracking Unique Identifier in the AI SR (DCM 112040).
    tracking_id:
        Its Tracking Identifier there, e.g. "Nodule 1" (at most 52 characters, so that
        " assessment" fits a Long String).
    assessment:
        Accepted or rejected.
    at:
        When the verdict was given; timezone-aware.
    """

    tracking_uid: str
    tracking_id: str
    assessment: Assessment
    at: datetime.datetime

    def __post_init__(self) -> None:
        if not isinstance(self.tracking_uid, str) or not is_valid_uid(self.tracking_uid):
            raise ValueError(f"tracking_uid must be a valid DICOM UID, got {self.tracking_uid!r}")
        if not isinstance(self.tracking_id, str):
            raise TypeError(f"tracking_id must be a str, got {type(self.tracking_id).__name__}")
        if not self.tracking_id.strip() or len(self.tracking_id) > _LO_MAX - len(" assessment") or "\\" in self.tracking_id:
            raise ValueError(f"tracking_id must be 1 to 52 characters without a backslash, got {self.tracking_id!r}")
        if not isinstance(self.assessment, Assessment):
            raise TypeError(f"assessment must be an Assessment, got {type(self.assessment).__name__}")
        if not isinstance(self.at, datetime.datetime):
            raise TypeError(f"at must be a datetime, got {type(self.at).__name__}")
        if self.at.tzinfo is None:
            raise ValueError("at must be timezone-aware")


def _check_reviewer(reviewer: object) -> str:
    if not isinstance(reviewer, str):
        raise TypeError(f"reviewer must be a str, got {type(reviewer).__name__}")
    name = reviewer.strip()
    if not name or len(name) > _PN_COMPONENT_MAX or any(c in name for c in "\\^=") or not name.isprintable():
        raise ValueError(f"reviewer must be 1 to {_PN_COMPONENT_MAX} printable characters without \\ ^ =, got {reviewer!r}")
    return name


def _check_ai_sr(ai_sr: object, assessments: Sequence[FindingAssessment]) -> Dataset:
    if not isinstance(ai_sr, Dataset):
        raise TypeError(f"ai_sr must be a pydicom Dataset, got {type(ai_sr).__name__}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not is_valid_uid(str(ai_sr.get(keyword, ""))):
            raise ReportError(f"the AI SR has no valid {keyword}")
    if ai_sr.get("Modality") != "SR":
        raise ReportError(f"the assessed object is not an SR (Modality {ai_sr.get('Modality')!r})")
    reported = {
        str(item.UID)
        for item in _walk(ai_sr)
        if item.get("ValueType") == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "112040"
    }
    unknown = [a.tracking_uid for a in assessments if a.tracking_uid not in reported]
    if unknown:
        raise ReportError(f"the AI SR has no finding with tracking UID {unknown[0]}")
    return ai_sr


def _walk(dataset: Dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _group(assessment: FindingAssessment) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluation = hd.sr.QualitativeEvaluation(name=ASSESSMENT, value=assessment.assessment.code)
    evaluation[0].ObservationDateTime = assessment.at.astimezone(datetime.timezone.utc).strftime("%Y%m%d%H%M%S+0000")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=assessment.tracking_uid, identifier=f"{assessment.tracking_id} assessment"
        ),
        finding_type=codes.SCT.Nodule,
        qualitative_evaluations=[evaluation],
    )


def _root(reviewer: str, groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations], ai_sr_uid: str):
    """TID 1500 rows 1-4, 6 and 12; no Image Library (row 5): the document references no image."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")))
    content.extend(hd.sr.ObservationContext(observer_person_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        # The configured reviewer name, whole, as the family name component (PS3.5 6.2.1.2).
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=f"{reviewer}^"),
    )))
    content.append(hd.sr.CodeContentItem(
        name=codes.DCM.ProcedureReported, value=_PROCEDURE_REPORTED,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    ))
    measurements = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurements, relationship_type=contains)
    measurements.ContentSequence = hd.sr.ContentSequence([item for group in groups for item in group])
    content.append(measurements)
    evaluations = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=contains)
    evaluations.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=RESEARCH_USE_NOTICE, relationship_type=contains),
        hd.sr.TextContentItem(
            name=_ENCODING_NOTE, relationship_type=contains,
            value=(f"Radiologist's assessment of the findings of AI SR {ai_sr_uid}, each group tracking the "
                   "finding by its Tracking Unique Identifier: LungScreen's TID 1500 encoding in place of "
                   "the IHE AIRA assessment object."),
        ),
    ])
    content.append(evaluations)
    root.ContentSequence = content
    return root


def build_assessment(
    ai_sr: Dataset,
    assessments: Sequence[FindingAssessment],
    *,
    reviewer: str,
    manufacturer: str,
    software_version: str,
    institution: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 9003,
) -> hd.sr.ComprehensiveSR:
    """The assessment by ``reviewer`` of findings of ``ai_sr`` (see the module docstring).

    Parameters
    ----------
    ai_sr:
        The AI SR assessed (LungScreen's TID 1500 report); patient and study come from it.
    assessments:
        One per assessed finding, each tracking UID once and present in ``ai_sr``.
    reviewer:
        The radiologist (Person Observer Name), 1 to 64 characters.
    manufacturer, software_version:
        Of the system that writes the document (General Equipment).
    institution:
        Institution Name, optional.
    series_instance_uid:
        By default derived from the study, so every assessment of a study is in one series.
    sop_instance_uid:
        A new one by default.
    instance_number, series_number:
        Positive integers.

    Raises
    ------
    TypeError, ValueError
        For malformed arguments.
    ReportError
        When ``ai_sr`` is not an SR with the assessed findings.
    """
    reviewer = _check_reviewer(reviewer)
    if isinstance(assessments, (str, bytes)) or not isinstance(assessments, Sequence):
        raise TypeError("assessments must be a sequence of FindingAssessment")
    if not assessments:
        raise ValueError("assessments must not be empty")
    for assessment in assessments:
        if not isinstance(assessment, FindingAssessment):
            raise TypeError(f"assessments must hold FindingAssessment items, got {type(assessment).__name__}")
    uids = [a.tracking_uid for a in assessments]
    if len(set(uids)) != len(uids):
        raise ValueError("each finding may be assessed once per document")
    for argument, value in (("manufacturer", manufacturer), ("software_version", software_version)):
        if not isinstance(value, str) or not value.strip() or len(value) > _LO_MAX:
            raise ValueError(f"{argument} must be 1 to {_LO_MAX} characters, got {value!r}")
    if institution is not None and (not isinstance(institution, str) or not institution.strip()):
        raise ValueError(f"institution must be a non-empty str or None, got {institution!r}")
    for argument, value in (("instance_number", instance_number), ("series_number", series_number)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{argument} must be a positive int, got {value!r}")
    for argument, value in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if value is not None and not is_valid_uid(value):
            raise ValueError(f"{argument} must be a valid DICOM UID, got {value!r}")
    ai_sr = _check_ai_sr(ai_sr, assessments)
    study_uid = str(ai_sr.StudyInstanceUID)
    series_instance_uid = series_instance_uid or generate_uid(entropy_srcs=[study_uid, "LungScreen AI result assessment"])
    content = _root(reviewer, [_group(a) for a in assessments], str(ai_sr.SOPInstanceUID))
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=[ai_sr],
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=instance_number,
            manufacturer=manufacturer,
            software_versions=software_version,
            institution_name=institution,
            series_description=SERIES_DESCRIPTION,
            # The reviewer's verdicts are complete as given; verification is the reading report's.
            is_complete=True,
            is_final=False,
            is_verified=False,
            coding_schemes=[CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME, name="LungScreen local codes", responsible_organization=manufacturer
            )],
        )
    except ValueError as error:
        raise ReportError(f"the assessment cannot be built from the AI SR: {str(error)[:160]}") from error
    sr.SpecificCharacterSet = "ISO_IR 192"
    return sr
