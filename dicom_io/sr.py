"""LungScreen findings as a DICOM Structured Report (TID 1500 Imaging Measurement Report).

The report goes back to the PACS next to the analysed CT and follows IHE AI Results (AIR):

* Document: Comprehensive SR (PS3.3 A.35.3) with root template TID 1500 (PS3.16)
  "Imaging Measurement Report" (126000, DCM), the patient, study and Accession Number of the
  CT, Procedure Reported from CID 100, an Image Library (TID 1600) and one measurement group
  per outlined nodule. Every region is a 2D POLYLINE on an image, so no SCOORD3D is needed:
  Comprehensive SR suffices and is read by more systems than Comprehensive 3D SR (OHIF draws
  both; Orthanc Stone reads Comprehensive SR).
* Per *outlined* nodule (its suggested Lung-RADS category is among the site's
  ``outline_categories``, see :mod:`lungscreen.dicom_io.outline`), one TID 1501 "Measurement
  and Qualitative Evaluation Group": Tracking Identifier :data:`OHIF_FREEHAND_TRACKING` +
  ":Nodule n" and its own Tracking Unique Identifier (TID 4108), finding type Nodule, the
  algorithm (TID 4019) with its operating point, the measurements (TID 300): Area (mm2) of the
  circle drawn on the centre slice, inferred from its closed POLYLINE, then Diameter (mm, sphere-equivalent),
  Volume (mm3), Certainty of Finding (%); the qualitative evaluations (row 11): nodule type,
  suggested Lung-RADS v2022 category, whether the clinical rules call it actionable; and a
  Comment (row 12) with the label every view shows (:func:`finding_label`). TID 1501 with the
  SCOORD in the first NUM rather than TID 1410 (SCOORD beside the NUMs) is the form OHIF v3
  loads into its measurement panel (the prefixed identifier names its freehand tool; the
  Comment is the row title); the document is UTF-8 (ISO_IR 192) for the labels' middle dot.
* Per *listed* nodule (not outlined): one TEXT item in the document's Qualitative
  Evaluations (row 14) with its label, type, volume, whether actionable, centre and image. Not
  a measurement group: TID 1501 allows a group without SCOORD and PixelMed accepts one, but
  OHIF 3.13.2's SR loader fails on it ("Cannot read properties of undefined (reading
  'ReferencedSOPSequence')" in ``_checkIfCanAddMeasurementsToDisplaySet``: it takes
  ``coords[0]`` of every group), and the whole viewer route errors.
* Document level (TID 1500 rows 12-14, "Qualitative Evaluations"): research-use notice,
  CAD processing summary (with or without findings), the suggested exam Lung-RADS category
  (that of the most concerning nodule, listed ones included; none without findings),
  operating point, score threshold, the listed nodules and the candidates each clinical rule
  suppressed.
* Billing (China NHSA): AI assistance is an extension item of the main exam, never a
  separate charge. The main exam item (:func:`main_exam_procedure`) is the requested procedure
  of ReferencedRequestSequence, the AI extension item is PerformedProcedureCodeSequence, and
  the Accession Number links both to the order. Procedure Reported stays in CID 100, which
  TID 1500 requires and which has no code of a site's own.
* IHE AIR algorithm identity: Contributing Equipment item (manufacturer, model, software
  versions, Device UID) and a device observer (TID 1004).

Codes that DICOM does not define (nodule type, Lung-RADS categories, operating point ...)
use the local coding scheme :data:`LOCAL_SCHEME`, declared in the SR's
CodingSchemeIdentificationSequence.

Validated by ``dciodvfy`` (the IOD) and PixelMed's DicomSRValidator (the templates) in the
tests. PixelMed (Debian build 20220618) reports no error; the warnings it keeps, and why:

* "Content Item not in template" for the three qualitative evaluations of each nodule
  (nodule type, Lung-RADS category, actionable) and its Comment. PS3.16 puts a group's
  qualitative evaluations in TID 1501 rows 11 (CONTAINS CODE) and 12 (CONTAINS TEXT), where
  they are; PixelMed's template tables of that build stop at row 10h (TID 1410 likewise), so
  any evaluation in a measurement group is reported. Their local codes (``99LUNGSCR``) are
  not the cause: no standard code exists for solid / part-solid / ground-glass or for
  Lung-RADS values.

Fixed rather than kept: Finding Category (276214006, SCT) and Algorithm Manufacturer
(TID 4019) are not written (both optional and unknown to that build; the manufacturer is in
the device observer context and the Contributing Equipment), and Procedure Reported is a CID
100 code instead of the site's exam code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lungscreen.errors import ReportError
from lungscreen.dicom_io.outline import (
    DEFAULT_OUTLINE_CATEGORIES,
    FindingSlice,
    check_outline_categories,
    finding_slice,
    is_outlined,
    nodule_outline,
)
from lungscreen.dicom_io.uids import is_valid_uid
from lungscreen.dicom_io.volume import Volume
from lungscreen.findings import ChangeLabel, ComparisonStatus, Finding, NoduleReport, NoduleType
from lungscreen.findings import LUNG_RADS_ORDER, exam_lung_rads

__all__ = [
    "LOCAL_SCHEME",
    "RESEARCH_USE_NOTICE",
    "OHIF_FREEHAND_TRACKING",
    "SERIES_DESCRIPTION",
    "AlgorithmIdentity",
    "BillingCodes",
    "PROCEDURE_REPORTED",
    "assign_tracking",
    "build_sr",
    "check_result_arguments",
    "finding_label",
    "main_exam_procedure",
]

LOCAL_SCHEME = "99LUNGSCR"
"""Coding Scheme Designator of LungScreen's local codes (PS3.16 8.2: private schemes start with "99")."""

RESEARCH_USE_NOTICE = "Research use only. Not for diagnostic use."

OHIF_FREEHAND_TRACKING = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
"""Tracking Identifier prefix of an outlined nodule ("...:Nodule 1"): OHIF v3 (Cornerstone3D's
SR adapters) loads a measurement group into its measurement panel only when the identifier
starts with a tool it maps; a closed POLYLINE in the first NUM is its freehand contour."""

SERIES_DESCRIPTION = "LungScreen AI nodule report (research use)"

PROCEDURE_REPORTED = hd.sr.CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region")
"""Procedure Reported (TID 1500 row 4, DCID 100 "Quantitative Diagnostic Imaging Procedures").

CID 100 has no chest CT code (checked in PS3.16 as pydicom 3.0 and PixelMed 20220618 carry it:
its only CT entries are whole-body PET/CT, CT perfusion of the head and "CT unspecified body
region"), so the one that fits every chest CT is used; the site's own exam code goes to ReferencedRequestSequence."""

_LO_MAX = 64  # Long String (LO) value length, PS3.5 6.2


def finding_label(number: int, diameter_mm: float, probability: float, lung_rads: str) -> str:
    """The one-line label a radiologist reads next to a nodule, e.g.
    ``"Nodule 1 · 23.4 mm · p 0.91 · Lung-RADS 4B"``.

    Shared by the SR, the GSPS and the review page so that every view names a nodule alike.
    The separator is U+00B7 MIDDLE DOT (in ISO-IR 100 and ISO-IR 192); at most 64 characters.
    """
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"number must be a positive int, got {number!r}")
    return f"Nodule {number} · {float(diameter_mm):.1f} mm · p {float(probability):.2f} · Lung-RADS {lung_rads}"


def _derived_tracking_uid(sop_instance_uid: str, number: int) -> str:
    return generate_uid(entropy_srcs=[sop_instance_uid, f"Nodule {number}"])


def assign_tracking(findings: Sequence[Finding], sop_instance_uid: str, prior_ids: Sequence[str] = ()) -> tuple[Finding, ...]:
    """Each finding's TID 1500 Tracking Unique Identifier and Tracking Identifier (TID 4108).

    A nodule matched to a prior study already carries the prior's pair (TID 1500 tracks one
    nodule under one UID across timepoints). Any other gets the UID derived from this SR and
    its number, as a baseline report always did, and "Nodule n" with n past the numbers the
    prior study used (``prior_ids``), so that no identifier names two different nodules.
    """
    used = set(prior_ids) | {f.tracking_id for f in findings if f.tracking_id}
    next_number = 1 + max((int(i.split()[-1]) for i in used if i.split()[-1].isdigit()), default=0)
    out = []
    for number, finding in enumerate(findings, start=1):
        uid = finding.tracking_uid or _derived_tracking_uid(sop_instance_uid, number)
        identifier = finding.tracking_id
        if identifier is None:
            identifier = f"Nodule {number}"
            if identifier in used:
                identifier, next_number = f"Nodule {next_number}", next_number + 1
            used.add(identifier)
        out.append(replace(finding, tracking_uid=uid, tracking_id=identifier))
    return tuple(out)


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


_NODULE_TYPE = _local("NODULE-TYPE", "Nodule type")
_NODULE_TYPES = {
    NoduleType.SOLID: _local("SOLID", "Solid"),
    NoduleType.PART_SOLID: _local("PART-SOLID", "Part-solid"),
    NoduleType.GROUND_GLASS: _local("GROUND-GLASS", "Ground-glass"),
    NoduleType.CALCIFIED: _local("CALCIFIED", "Calcified"),
}
_LUNG_RADS = _local("LUNG-RADS-2022", "Suggested Lung-RADS v2022 category")
_LUNG_RADS_CATEGORIES = {
    category: _local(f"LR-{category}", f"Lung-RADS {category}") for category in LUNG_RADS_ORDER
}
_ACTIONABLE = _local("ACTIONABLE", "Actionable per clinical rules")
_OPERATING_POINT = _local("OPERATING-POINT", "Operating point")
_SCORE_THRESHOLD = _local("SCORE-THRESHOLD", "Detector score threshold")
_OPERATING_POINT_SOURCE = _local("OPERATING-POINT-SOURCE", "Operating point source")
_SUPPRESSED = _local("SUPPRESSED", "Candidates suppressed by clinical rule")
_LISTED = _local("LISTED", "Nodule listed without outline")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)

# Type 2 attributes highdicom reads from the first evidence header (Patient and General Study).
_TYPE2_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _check_long_string(argument: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {type(value).__name__}")
    if not value.strip() or len(value) > _LO_MAX or "\\" in value:
        raise ValueError(f"{argument} must be 1 to {_LO_MAX} characters without a backslash, got {value!r}")


def _check_code(argument: str, code: object) -> None:
    if not (isinstance(code, tuple) and len(code) == 3 and all(isinstance(part, str) for part in code)):
        raise TypeError(
            f"{argument} must be a (value, scheme designator, meaning) tuple of str, got {code!r}"
        )
    value, scheme, meaning = code
    if not value.strip() or not scheme.strip() or not meaning.strip():
        raise ValueError(f"{argument} must not have an empty part, got {code!r}")
    if len(scheme) > 16:
        raise ValueError(f"{argument}: scheme designator {scheme!r} is longer than 16 characters")


def _coded(code: tuple[str, str, str]) -> hd.sr.CodedConcept:
    value, scheme, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Who made the report: IHE AIR Contributing Equipment and TID 4019 Algorithm Identification.

    Attributes
    ----------
    manufacturer:
        Manufacturer of the SR (General Equipment) and of the algorithm, e.g. "LungScreen project".
    model_name:
        The detector model's name from its model card; must equal ``NoduleReport.model_name``.
    software_version:
        LungScreen's version (the software that wrote the SR).
    model_version:
        The detector model's version; must equal ``NoduleReport.model_version``.
    device_uid:
        Stable UID of this installation and algorithm: Device UID (0018,1002) and Device
        Observer UID (121012, DCM). Change it whenever the model changes (IHE AIR).
    institution:
        Institution Name of the SR, when known.
    inference_site:
        Where the network ran for this report (this node's ONNX Runtime, or a named Triton
        Inference Server), added to the Contribution Description.
    """

    manufacturer: str
    model_name: str
    software_version: str
    model_version: str
    device_uid: str
    institution: str | None = None
    inference_site: str | None = None

    def __post_init__(self) -> None:
        _check_long_string("manufacturer", self.manufacturer)
        _check_long_string("model_name", self.model_name)
        _check_long_string("software_version", self.software_version)
        _check_long_string("model_version", self.model_version)
        _check_long_string("institution", self.institution, optional=True)
        if not isinstance(self.device_uid, str):
            raise TypeError(f"device_uid must be a str, got {type(self.device_uid).__name__}")
        if not is_valid_uid(self.device_uid):
            raise ValueError(f"device_uid is not a valid DICOM UID: {self.device_uid!r}")


@dataclass(frozen=True)
class BillingCodes:
    """Codes that tie the SR to the main exam item it extends (China NHSA pricing guideline).

    AI-assisted diagnosis is an extension item of the main radiology exam item, at the same
    price level and never charged again. The RIS posts charges keyed by Accession Number.

    Attributes
    ----------
    ai_extension_code:
        ``(value, scheme designator, meaning)`` of the AI extension item, written to
        PerformedProcedureCodeSequence, e.g.
        ``("AI-LUNG-EXT", "99LUNGSCREEN", "AI-assisted diagnosis extension item")``.
    fallback_procedure_code:
        The main exam item when the CT carries no procedure code: the requested procedure code
        written to ReferencedRequestSequence and the main item of the billing ledger.
    """

    ai_extension_code: tuple[str, str, str]
    fallback_procedure_code: tuple[str, str, str]

    def __post_init__(self) -> None:
        _check_code("ai_extension_code", self.ai_extension_code)
        _check_code("fallback_procedure_code", self.fallback_procedure_code)


def _main_exam_code(ct_header: Dataset, billing: BillingCodes) -> hd.sr.CodedConcept:
    sequences = [
        request.get("RequestedProcedureCodeSequence") for request in ct_header.get("RequestAttributesSequence", [])
    ]
    sequences += [ct_header.get("RequestedProcedureCodeSequence"), ct_header.get("ProcedureCodeSequence")]
    for sequence in sequences:
        if sequence:
            try:
                return hd.sr.CodedConcept.from_dataset(sequence[0])
            except (AttributeError, TypeError, ValueError) as error:
                raise ReportError(f"the CT's procedure code cannot be read: {error}") from error
    return _coded(billing.fallback_procedure_code)


def main_exam_procedure(ct_header: Dataset, billing: BillingCodes) -> tuple[str, str, str]:
    """``(value, scheme designator, meaning)`` of the main exam item that produced the CT.

    The item the AI extension is billed under: the SR names it as the requested procedure
    (ReferencedRequestSequence > RequestedProcedureCodeSequence) and the billing ledger as the
    main item, so the RIS finds the same code in both. Looked up in this order: the first
    RequestAttributesSequence item with a RequestedProcedureCodeSequence (the order the CT
    was made for), RequestedProcedureCodeSequence, ProcedureCodeSequence (General Study);
    otherwise ``billing.fallback_procedure_code``.

    Raises
    ------
    ReportError
        When the first code found is not a valid Code Sequence item.
    """
    code = _main_exam_code(ct_header, billing)
    return code.value, code.scheme_designator, code.meaning


def _code_item(code: hd.sr.CodedConcept) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def _referenced_requests(ct_header: Dataset, main_exam: hd.sr.CodedConcept) -> list[Dataset]:
    """ReferencedRequestSequence items (SR Document General Module, PS3.3 C.17.2).

    One item per RequestAttributesSequence item of the CT; without one, a single item from the
    CT's Accession Number and Study Instance UID. A request without a procedure code gets the
    main exam item's, so that the SR always names the item its AI extension is billed under.
    Type 2 attributes are always present, empty when unknown.
    """
    requests = list(ct_header.get("RequestAttributesSequence", [])) or [Dataset()]
    items = []
    for request in requests:
        item = Dataset()
        item.StudyInstanceUID = request.get("StudyInstanceUID") or ct_header.StudyInstanceUID
        item.ReferencedStudySequence = list(request.get("ReferencedStudySequence", []))
        item.AccessionNumber = request.get("AccessionNumber") or ct_header.get("AccessionNumber")
        item.PlacerOrderNumberImagingServiceRequest = request.get("PlacerOrderNumberImagingServiceRequest")
        item.FillerOrderNumberImagingServiceRequest = request.get("FillerOrderNumberImagingServiceRequest")
        item.RequestedProcedureID = request.get("RequestedProcedureID")
        item.RequestedProcedureDescription = request.get("RequestedProcedureDescription")
        item.RequestedProcedureCodeSequence = list(request.get("RequestedProcedureCodeSequence", [])) or [
            _code_item(main_exam)
        ]
        items.append(item)
    return items


def check_result_arguments(
    evidence: Sequence[Dataset],
    volume: Volume,
    report: NoduleReport,
    algorithm: AlgorithmIdentity,
    *,
    series_instance_uid: str | None,
    sop_instance_uid: str | None,
    instance_number: int,
    series_number: int,
) -> dict[str, Dataset]:
    """Validate what every result object (SR, GSPS) is built from; return the evidence by SOP
    Instance UID. ``ValueError`` for malformed arguments, ``ReportError`` for evidence that
    does not belong to the volume or findings of another model."""
    for argument, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if uid is not None and not is_valid_uid(uid):
            raise ValueError(f"{argument} is not a valid DICOM UID: {uid!r}")
    for argument, number in (("instance_number", instance_number), ("series_number", series_number)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise ValueError(f"{argument} must be a positive int, got {number!r}")
    if (report.model_name, report.model_version) != (algorithm.model_name, algorithm.model_version):
        raise ReportError(
            f"the findings come from {report.model_name} {report.model_version}, "
            f"but the algorithm identity names {algorithm.model_name} {algorithm.model_version}"
        )
    if len(evidence) == 0:
        raise ReportError("no evidence: the headers of the analysed CT series are needed")
    by_uid = {}
    for header in evidence:
        if header.get("StudyInstanceUID") != volume.study_instance_uid:
            raise ReportError(
                f"evidence {header.get('SOPInstanceUID')} belongs to study "
                f"{header.get('StudyInstanceUID')}, the volume to study {volume.study_instance_uid}"
            )
        if header.get("SeriesInstanceUID") != volume.series_instance_uid:
            raise ReportError(
                f"evidence {header.get('SOPInstanceUID')} belongs to series "
                f"{header.get('SeriesInstanceUID')}, the volume to series {volume.series_instance_uid}"
            )
        by_uid[header.SOPInstanceUID] = header
    return by_uid


def _library_view(volume: Volume, k: int, header: Dataset) -> Dataset:
    """What highdicom's Image Library entry (TID 1601/1604) reads, for slice ``k``.

    highdicom takes PixelSpacing, ImageOrientationPatient, ImagePositionPatient and
    SliceThickness from the top level of the dataset, where a multi-frame (Enhanced) CT has
    none: they sit in its functional groups (PS3.3 C.7.6.16). For a frame, the view carries
    them as measured by the volume (the geometry of frame ``k``).
    """
    if volume.slices[k].frame_number is None:
        return header
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "Modality", "StudyInstanceUID",
                    "SeriesInstanceUID", "FrameOfReferenceUID"):
        if keyword in header:
            setattr(view, keyword, header[keyword].value)
    column_axis = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    row_axis = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
    view.ImageOrientationPatient = [round(float(v), 6) for v in (*column_axis, *row_axis)]
    view.ImagePositionPatient = [round(float(v), 4) for v in volume.index_to_lps((k, 0, 0))]
    view.PixelSpacing = [round(volume.spacing[1], 6), round(volume.spacing[2], 6)]
    view.SliceThickness = round(volume.spacing[0], 4)
    return view


def _with_type2_study_attributes(header: Dataset) -> Dataset:
    """A copy of ``header`` in which missing Type 2 patient/study attributes are empty."""
    missing = [keyword for keyword in _TYPE2_STUDY_KEYWORDS if keyword not in header]
    if not missing:
        return header
    completed = copy.deepcopy(header)
    for keyword in missing:
        setattr(completed, keyword, None)
    return completed


def _outline_area_mm2(outline: np.ndarray, volume: Volume) -> float:
    """Area enclosed by a closed ``(column, row)`` polyline (shoelace formula), in mm2."""
    columns, rows = outline[:, 0], outline[:, 1]
    pixels = 0.5 * abs(float(np.dot(columns[:-1], rows[1:]) - np.dot(columns[1:], rows[:-1])))
    return pixels * volume.spacing[1] * volume.spacing[2]


def _check_encodable(finding: Finding, what: str) -> None:
    if finding.lung_rads not in _LUNG_RADS_CATEGORIES:
        raise ReportError(f"{what}: unknown Lung-RADS category {finding.lung_rads!r}")
    if not 0.0 <= finding.probability <= 1.0:
        raise ReportError(f"{what}: probability {finding.probability} is not in [0, 1]")
    NoduleType(finding.nodule_type)


def _measurement_group(
    finding: Finding,
    number: int,
    volume: Volume,
    at: FindingSlice,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one outlined nodule, whose slice ``at`` is the one through its centre.

    The first measurement is the Area (mm2) of the circle drawn on that slice, inferred from
    the closed POLYLINE (rows 10, 10c-10d): the form viewers that keep measurements read (OHIF
    takes the first NUM's SCOORD as a freehand contour). The diameter (sphere-equivalent:
    :func:`lungscreen.models.measure.segmented_size`), volume and certainty
    follow, then the qualitative evaluations (row 11) and the label as a Comment (row 12).
    """
    frames = None if at.ref.frame_number is None else [at.ref.frame_number]
    outline = nodule_outline(finding, volume, at.header)
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=at.ref.sop_class_uid,
            referenced_sop_instance_uid=at.ref.sop_instance_uid,
            referenced_frame_numbers=frames,
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{OHIF_FREEHAND_TRACKING}:{finding.tracking_id or f'Nodule {number}'}"
        ),
        finding_type=codes.SCT.Nodule,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=_outline_area_mm2(outline, volume),
                unit=codes.UCUM.SquareMillimeter,
                referenced_coordinates=[coordinates],
            ),
            hd.sr.Measurement(name=codes.SCT.Diameter, value=float(finding.diameter_mm), unit=codes.UCUM.Millimeter),
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(finding.volume_mm3), unit=codes.UCUM.CubicMillimeter
            ),
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding, value=100.0 * finding.probability, unit=codes.UCUM.Percent
            ),
            *follow_up_measurements(finding),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_NODULE_TYPE, value=_NODULE_TYPES[NoduleType(finding.nodule_type)]),
            hd.sr.QualitativeEvaluation(name=_LUNG_RADS, value=_LUNG_RADS_CATEGORIES[finding.lung_rads]),
            hd.sr.QualitativeEvaluation(name=_ACTIONABLE, value=codes.SCT.Yes if finding.actionable else codes.SCT.No),
            *follow_up_evaluations(finding),
        ],
    )
    # TID 1501 row 12 (CONTAINS TEXT): the one-line label, which OHIF shows as the panel's title.
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=finding_label(number, finding.diameter_mm, finding.probability, finding.lung_rads),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _operating_point_items(report: NoduleReport) -> list[hd.sr.TextContentItem]:
    """The operating point's name and, for one a site applied from its radiologists' verdicts
    (``lungscreen feedback apply-operating-point``), who applied it, when and on what evidence."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items = [hd.sr.TextContentItem(name=_OPERATING_POINT, value=report.operating_point, relationship_type=contains)]
    if report.operating_point_source:
        items.append(
            hd.sr.TextContentItem(
                name=_OPERATING_POINT_SOURCE, value=report.operating_point_source, relationship_type=contains
            )
        )
    return items


def _listed_finding(finding: Finding, number: int, at: FindingSlice) -> str:
    """The TEXT (TID 1500 row 14) that lists a finding the site does not outline."""
    nodule_type = NoduleType(finding.nodule_type).value
    x, y, z = (f"{v:.1f}" for v in finding.center_lps_mm)
    frame = "" if at.ref.frame_number is None else f" frame {at.ref.frame_number}"
    return (
        f"{finding_label(number, finding.diameter_mm, finding.probability, finding.lung_rads)} · {nodule_type} · "
        f"volume {finding.volume_mm3:.0f} mm3 · {'actionable' if finding.actionable else 'not actionable'} · "
        f"centre ({x}, {y}, {z}) mm LPS on image {at.ref.sop_instance_uid}{frame}"
    )


def _report_evaluations(report: NoduleReport, listed: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations" with its CODE (row 13) and TEXT (row 14) items,
    ``listed`` the texts of the findings that are not outlined."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    threshold = f"{report.score_threshold:g}"
    exam_category = exam_lung_rads(report.findings)
    if report.findings:
        count = len(report.findings)
        summary = (
            f"{count} nodule{'s' if count > 1 else ''} reported ({count - len(listed)} outlined) at operating point "
            f"{report.operating_point}; suggested exam category Lung-RADS {exam_category}"
        )
    else:
        summary = f"No nodule detected at operating point {report.operating_point}"
    items = [
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=RESEARCH_USE_NOTICE, relationship_type=contains),
        hd.sr.CodeContentItem(
            name=codes.DCM.CADProcessingAndFindingsSummary,
            value=(
                codes.DCM.AllAlgorithmsSucceededWithFindings
                if report.findings
                else codes.DCM.AllAlgorithmsSucceededWithoutFindings
            ),
            relationship_type=contains,
        ),
        hd.sr.TextContentItem(
            name=codes.DCM.Finding,
            value=f"{summary} (score threshold {threshold}).",
            relationship_type=contains,
        ),
        *_operating_point_items(report),
        hd.sr.TextContentItem(name=_SCORE_THRESHOLD, value=threshold, relationship_type=contains),
    ]
    if exam_category is not None:
        items.append(
            hd.sr.CodeContentItem(name=_LUNG_RADS, value=_LUNG_RADS_CATEGORIES[exam_category], relationship_type=contains)
        )
    items += [hd.sr.TextContentItem(name=_LISTED, value=text, relationship_type=contains) for text in listed]
    items += [
        hd.sr.TextContentItem(name=_SUPPRESSED, value=f"{rule}: {count}", relationship_type=contains)
        for rule, count in sorted(report.suppressed.items())
    ]
    items += comparison_items(report)
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


# --- Follow-up (comparison with a prior study, issue 17) ---------------------------------------

_CHANGE = _local("CHANGE", "Change since prior study")
_CHANGES = {label: _local(f"CHANGE-{label.value.upper()}", label.value.capitalize()) for label in ChangeLabel}
_PRIOR_DIAMETER = _local("PRIOR-DIAMETER", "Diameter on prior study")
_DIAMETER_CHANGE = _local("DIAMETER-CHANGE", "Diameter change since prior study")
_VOLUME_DOUBLING_TIME = _local("VDT", "Volume doubling time")
_COMPARISON = _local("COMPARISON", "Comparison with prior study")
_RESOLVED = _local("RESOLVED", "Nodule of the prior study resolved")
_DAY = hd.sr.CodedConcept(value="d", scheme_designator="UCUM", meaning="day")


def follow_up_measurements(finding: Finding) -> list[hd.sr.Measurement]:
    """TID 1410 measurements of a nodule matched to a prior study: its diameter then, the change,
    and the volume doubling time (solid nodules that grew). None for a baseline finding."""
    if finding.prior is None:
        return []
    items = [
        hd.sr.Measurement(name=_PRIOR_DIAMETER, value=float(finding.prior.diameter_mm), unit=codes.UCUM.Millimeter),
        hd.sr.Measurement(
            name=_DIAMETER_CHANGE, value=float(finding.diameter_mm - finding.prior.diameter_mm), unit=codes.UCUM.Millimeter
        ),
    ]
    if finding.volume_doubling_time_days is not None:
        items.append(hd.sr.Measurement(name=_VOLUME_DOUBLING_TIME, value=float(finding.volume_doubling_time_days), unit=_DAY))
    return items


def follow_up_evaluations(finding: Finding) -> list[hd.sr.QualitativeEvaluation]:
    """The change label (new, stable, growing, shrinking) of a follow-up finding."""
    if finding.change is None:
        return []
    return [hd.sr.QualitativeEvaluation(name=_CHANGE, value=_CHANGES[finding.change])]


def comparison_items(report: NoduleReport) -> list[hd.sr.TextContentItem]:
    """TID 1500 row 14 TEXT items: the prior study compared with (or why none was), and each
    prior nodule that has resolved, by its Tracking Identifier and UID of the prior report."""
    comparison = report.comparison
    if comparison is None:
        return []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    if comparison.status is ComparisonStatus.COMPARED:
        text = (f"Compared with prior study {comparison.prior_study_uid} of {comparison.prior_study_date} "
                f"({comparison.interval_days} days earlier)")
    else:
        text = f"Baseline report: {comparison.status.value}" + (f" ({comparison.reason})" if comparison.reason else "")
    items = [hd.sr.TextContentItem(name=_COMPARISON, value=text[:1024], relationship_type=contains)]
    def prior_nodule(name: hd.sr.CodedConcept, nodule, now: str) -> hd.sr.TextContentItem:
        return hd.sr.TextContentItem(
            name=name,
            value=(f"{nodule.tracking_id or 'Nodule'} (tracking UID {nodule.tracking_uid}), "
                   f"{nodule.diameter_mm:.1f} mm on the prior study, {now}"),
            relationship_type=contains,
        )

    items += [prior_nodule(_RESOLVED, nodule, "not seen now") for nodule in comparison.resolved]
    items += [
        prior_nodule(_COMPARISON, seen.prior, "still seen "
                     + ("(joined to dense tissue, not measured) " if seen.diameter_mm is None else f"({seen.diameter_mm:.1f} mm) ")
                     + "but not reported now: below the operating point or the reporting rules")
        for seen in comparison.still_seen
    ]
    items += [prior_nodule(_COMPARISON, nodule, "outside the range this study covers") for nodule in comparison.not_scanned]
    return items


def _measurement_report_content(
    observation_context: hd.sr.ObservationContext,
    procedure_reported: hd.sr.CodedConcept,
    library_images: Sequence[Dataset],
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    evaluations: hd.sr.ContainerContentItem,
) -> hd.sr.ContainerContentItem:
    """Root of TID 1500, rows 1-6 and 12, as :class:`highdicom.sr.MeasurementReport` builds them.

    Assembled here because ``MeasurementReport`` demands at least one measurement group and has
    no row 12. Without a nodule the "Imaging Measurements" container (row 6) is left out: TID 1500
    asks for row 6 or row 12, and a CONTAINER without children cannot be read back by highdicom.
    """
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(
        hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
        )
    )
    content.extend(observation_context)
    content.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=procedure_reported,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.extend(hd.sr.ImageLibrary(library_images))
    if groups:
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence([item for group in groups for item in group])
        content.append(measurements)
    content.append(evaluations)
    root.ContentSequence = content
    return root


def _coding_schemes(designators: Sequence[str], manufacturer: str) -> list[CodingSchemeIdentificationItem]:
    """CodingSchemeIdentificationSequence items for the local ("99...") schemes in use."""
    items = []
    for designator in dict.fromkeys(designators):
        if designator == LOCAL_SCHEME:
            items.append(
                CodingSchemeIdentificationItem(
                    designator=designator,
                    name="LungScreen local codes",
                    responsible_organization=manufacturer,
                )
            )
        elif designator.startswith("99"):
            items.append(CodingSchemeIdentificationItem(designator=designator))
    return items


def _request_code_schemes(ct_header: Dataset, main_exam: hd.sr.CodedConcept) -> list[str]:
    """Coding schemes of the requested procedure codes the SR carries (to declare local ones)."""
    return [
        item.CodingSchemeDesignator
        for request in _referenced_requests(ct_header, main_exam)
        for item in request.RequestedProcedureCodeSequence
        if "CodingSchemeDesignator" in item
    ]


def _algorithm_equipment(algorithm: AlgorithmIdentity) -> hd.ContributingEquipment:
    """IHE AIR Contributing Equipment item describing the algorithm.

    IHE AIR Rev 1.1 (6.5.3.1) asks for Purpose of Reference (Newcode1, 99IHE, "Processing
    Algorithm"), a placeholder DICOM never assigned; this uses (109102, DCM, "Processing
    Equipment") from CID 7005, the defined context group for this attribute.
    """
    equipment = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.model_name,
        software_versions=[algorithm.software_version, algorithm.model_version],
        institution_name=algorithm.institution,
        contribution_description=(
            f"Lung nodule detection by {algorithm.model_name} {algorithm.model_version} "
            f"(LungScreen {algorithm.software_version})"
            + (f", network run by {algorithm.inference_site}" if algorithm.inference_site else "")
            + f". {RESEARCH_USE_NOTICE}"
        ),
    )
    equipment.DeviceUID = algorithm.device_uid
    return equipment


def _check_prior_evidence(prior_evidence: Sequence[Dataset], report: NoduleReport) -> None:
    """Prior evidence only of the study the findings were compared with."""
    if not prior_evidence:
        return
    comparison = report.comparison
    if comparison is None or comparison.status is not ComparisonStatus.COMPARED:
        raise ReportError("prior evidence given for a report that was not compared with a prior")
    studies = {str(h.get("StudyInstanceUID", "")) for h in prior_evidence}
    if studies != {comparison.prior_study_uid}:
        raise ReportError(f"prior evidence from study {sorted(studies)}, not the prior compared with ({comparison.prior_study_uid})")


def build_sr(
    evidence: Sequence[Dataset],
    volume: Volume,
    report: NoduleReport,
    *,
    algorithm: AlgorithmIdentity,
    billing: BillingCodes,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 9001,
    predecessor: Dataset | None = None,
    outline_categories: Sequence[str] = DEFAULT_OUTLINE_CATEGORIES,
    prior_evidence: Sequence[Dataset] = (),
) -> hd.sr.ComprehensiveSR:
    """The TID 1500 Imaging Measurement Report of ``report`` on the CT series of ``volume``.

    Parameters
    ----------
    evidence:
        Headers of the analysed CT series (``stop_before_pixels`` reads suffice), in any order:
        slices are matched by SOP Instance UID. Patient, study and Accession Number come from
        the first one.
    volume:
        The volume the findings' voxel coordinates refer to. Its voxels are not read.
    report:
        Findings (numbered "Nodule 1", "Nodule 2" ... in the given order) and how they were chosen.
    algorithm:
        Identity of the algorithm (IHE AIR); its model must be the one named in ``report``.
    billing:
        The AI extension item and the fallback procedure code of the main exam.
    series_instance_uid:
        SR series; by default derived from the study and the device UID, so that re-runs on a
        study go to the same series.
    sop_instance_uid:
        UID of this SR; a new one by default. Tracking UIDs derive from it.
    instance_number, series_number:
        Positive integers.
    predecessor:
        An earlier SR of the same study that this one supersedes (PredecessorDocumentsSequence).
    outline_categories:
        Suggested Lung-RADS categories whose findings get an image region (outlined); the
        others are listed without one (see :mod:`lungscreen.dicom_io.outline`).
    prior_evidence:
        Headers of the prior study's images the comparison used (``report.comparison`` must be
        a comparison with that study). Being of another study, highdicom lists them in the
        Pertinent Other Evidence Sequence (PS3.3 C.17.2.3), beside the report's TEXT row
        naming the prior.

    Raises
    ------
    TypeError, ValueError
        For malformed arguments.
    ReportError
        When the report cannot be built from the evidence: no evidence, evidence from another
        study or series than the volume, a finding centre outside the volume, a predecessor from
        another study, a report made by another model than ``algorithm`` names, prior evidence
        of another study than the one compared with, or CT headers that highdicom refuses as
        evidence (an unknown character set, for one).
    """
    if not isinstance(algorithm, AlgorithmIdentity):
        raise TypeError(f"algorithm must be an AlgorithmIdentity, got {type(algorithm).__name__}")
    if not isinstance(billing, BillingCodes):
        raise TypeError(f"billing must be a BillingCodes, got {type(billing).__name__}")
    outline_categories = check_outline_categories(outline_categories)
    headers = check_result_arguments(
        evidence, volume, report, algorithm,
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        instance_number=instance_number, series_number=series_number,
    )
    if predecessor is not None and predecessor.get("StudyInstanceUID") != volume.study_instance_uid:
        raise ReportError(
            f"predecessor SR {predecessor.get('SOPInstanceUID')} belongs to study "
            f"{predecessor.get('StudyInstanceUID')}, not to {volume.study_instance_uid}"
        )
    _check_prior_evidence(prior_evidence, report)
    sop_instance_uid = sop_instance_uid or generate_uid()
    series_instance_uid = series_instance_uid or generate_uid(
        entropy_srcs=[volume.study_instance_uid, algorithm.device_uid, "LungScreen SR series"]
    )

    # TID 4019 without Algorithm Manufacturer: the device observer context (TID 1004) and the
    # Contributing Equipment name the manufacturer (see the module docstring).
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.model_name,
        version=algorithm.model_version,
        parameters=[
            f"operating point: {report.operating_point}",
            f"score threshold: {report.score_threshold:g}",
        ],
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    listed: list[str] = []
    library_images: dict[str, Dataset] = {}  # SOP Instance UID -> header, in order of first use
    for number, finding in enumerate(report.findings, start=1):
        what = f"nodule {number}"
        at = finding_slice(finding, volume, headers, what)
        _check_encodable(finding, what)
        if is_outlined(finding, outline_categories):
            tracking_uid = finding.tracking_uid or _derived_tracking_uid(sop_instance_uid, number)
            groups.append(_measurement_group(finding, number, volume, at, tracking_uid, algorithm_id))
        else:
            listed.append(_listed_finding(finding, number, at))
        library_images.setdefault(at.header.SOPInstanceUID, _library_view(volume, at.index, at.header))
    if not library_images:
        k = len(volume.slices) // 2
        middle = headers.get(volume.slices[k].sop_instance_uid)
        if middle is None:
            raise ReportError(f"image library: slice {k} ({volume.slices[k].sop_instance_uid}) is not among the evidence")
        library_images[middle.SOPInstanceUID] = _library_view(volume, k, middle)

    first = _with_type2_study_attributes(evidence[0])
    main_exam = _main_exam_code(first, billing)
    ai_extension = _coded(billing.ai_extension_code)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model_name,
        ),
    )
    content = _measurement_report_content(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        library_images=list(library_images.values()),
        groups=groups,
        evaluations=_report_evaluations(report, listed),
    )
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=[first, *evidence[1:], *prior_evidence],
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            software_versions=algorithm.software_version,
            institution_name=algorithm.institution,
            series_description=SERIES_DESCRIPTION,
            # Complete, but PRELIMINARY and UNVERIFIED: research output, never the definitive report.
            is_complete=True,
            is_final=False,
            is_verified=False,
            performed_procedure_codes=[ai_extension],
            requested_procedures=_referenced_requests(first, main_exam),
            previous_versions=None if predecessor is None else [predecessor],
            contributing_equipment=[_algorithm_equipment(algorithm)],
            coding_schemes=_coding_schemes(
                [LOCAL_SCHEME, ai_extension.scheme_designator, *_request_code_schemes(first, main_exam)],
                algorithm.manufacturer,
            ),
        )
    except ValueError as error:  # highdicom checks the evidence: a CT header it cannot use
        raise ReportError(f"the SR cannot be built from the CT's headers: {str(error)[:160]}") from error
    # The labels use U+00B7; UTF-8 whatever the CT's character set (names are re-encoded on write).
    sr.SpecificCharacterSet = "ISO_IR 192"
    return sr
