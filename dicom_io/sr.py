"""LungScreen findings as a DICOM Structured Report (TID 1500 Imaging Measurement Report).

The report goes back to the PACS next to the analysed CT and follows IHE AI Results (AIR):

* Document: Comprehensive SR (PS3.3 A.35.3) with root template TID 1500 (PS3.16)
  "Imaging Measurement Report" (126000, DCM), the patient, study and Accession Number of the
  CT, an Image Library (TID 1600) and one TID 1410 "Planar ROI Measurements and Qualitative
  Evaluations" group per nodule. Every region is a 2D POLYLINE on an image, so no SCOORD3D is
  needed: Comprehensive SR suffices and is read by more systems than Comprehensive 3D SR
  (OHIF draws both; Orthanc Stone reads Comprehensive SR).
* Per nodule: Tracking Identifier "Nodule n" and its own Tracking Unique Identifier
  (TID 4108), finding type Nodule, finding site (the lobe, when known), a closed circle on the centre
  slice, Long axis (mm), Volume (mm3), Certainty of Finding (%), nodule type, suggested
  Lung-RADS v2022 category, whether the clinical rules call it actionable, and the
  algorithm (TID 4019) with its operating point.
* Document level (TID 1500 rows 12-14, "Qualitative Evaluations"): research-use notice,
  CAD processing summary (with or without findings), the suggested exam Lung-RADS category
  (that of the most concerning nodule; none without findings), operating point, score
  threshold and the candidates each clinical rule suppressed.
* Billing (China NHSA): AI assistance is an extension item of the main exam, never a
  separate charge. The SR therefore reports the main exam's procedure code as "Procedure
  reported", names the AI extension item in PerformedProcedureCodeSequence, and links the
  order through ReferencedRequestSequence and the Accession Number.
* IHE AIR algorithm identity: Contributing Equipment item (manufacturer, model, software
  versions, Device UID) and a device observer (TID 1004).

Codes that DICOM does not define (nodule type, Lung-RADS categories, operating point ...)
use the local coding scheme :data:`LOCAL_SCHEME`, declared in the SR's
CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lungscreen.errors import ReportError
from lungscreen.dicom_io.uids import is_valid_uid
from lungscreen.dicom_io.volume import Volume
from lungscreen.findings import Finding, NoduleReport, NoduleType
from lungscreen.findings import LUNG_RADS_ORDER, exam_lung_rads

__all__ = [
    "LOCAL_SCHEME",
    "RESEARCH_USE_NOTICE",
    "SERIES_DESCRIPTION",
    "AlgorithmIdentity",
    "BillingCodes",
    "build_sr",
    "centre_slice",
    "check_result_arguments",
    "finding_label",
    "main_exam_procedure",
    "nodule_outline",
    "slice_header",
]

LOCAL_SCHEME = "99LUNGSCR"
"""Coding Scheme Designator of LungScreen's local codes (PS3.16 8.2: private schemes start with "99")."""

RESEARCH_USE_NOTICE = "Research use only. Not for diagnostic use."

SERIES_DESCRIPTION = "LungScreen AI nodule report (research use)"

POLYLINE_VERTICES = 32
"""Vertices of the circle drawn around a nodule; the closed polyline repeats the first one."""

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
_SUPPRESSED = _local("SUPPRESSED", "Candidates suppressed by clinical rule")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)

# "right upper lobe" -> (anatomic location, laterality); SCT codes as listed in CID 6124.
_LOBES = {
    "right upper lobe": (codes.SCT.UpperLobeOfLung, codes.SCT.Right),
    "right middle lobe": (codes.SCT.MiddleLobeOfRightLung, codes.SCT.Right),
    "right lower lobe": (codes.SCT.LowerLobeOfLung, codes.SCT.Right),
    "left upper lobe": (codes.SCT.UpperLobeOfLung, codes.SCT.Left),
    "left lower lobe": (codes.SCT.LowerLobeOfLung, codes.SCT.Left),
}

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
        Procedure Reported (121058, DCM) when the CT carries neither ProcedureCodeSequence nor
        a requested procedure code.
    """

    ai_extension_code: tuple[str, str, str]
    fallback_procedure_code: tuple[str, str, str]

    def __post_init__(self) -> None:
        _check_code("ai_extension_code", self.ai_extension_code)
        _check_code("fallback_procedure_code", self.fallback_procedure_code)


def _main_exam_code(ct_header: Dataset, billing: BillingCodes) -> hd.sr.CodedConcept:
    sequences = [ct_header.get("ProcedureCodeSequence"), ct_header.get("RequestedProcedureCodeSequence")]
    sequences += [
        request.get("RequestedProcedureCodeSequence")
        for request in ct_header.get("RequestAttributesSequence", [])
    ]
    for sequence in sequences:
        if sequence:
            try:
                return hd.sr.CodedConcept.from_dataset(sequence[0])
            except (AttributeError, TypeError, ValueError) as error:
                raise ReportError(f"the CT's procedure code cannot be read: {error}") from error
    return _coded(billing.fallback_procedure_code)


def main_exam_procedure(ct_header: Dataset, billing: BillingCodes) -> tuple[str, str, str]:
    """``(value, scheme designator, meaning)`` of the main exam item that produced the CT.

    The SR's Procedure Reported (121058, DCM). Looked up in this order: ProcedureCodeSequence
    (General Study), RequestedProcedureCodeSequence, the first RequestAttributesSequence item
    with a RequestedProcedureCodeSequence; otherwise ``billing.fallback_procedure_code``.

    Raises
    ------
    ReportError
        When the first code found is not a valid Code Sequence item.
    """
    code = _main_exam_code(ct_header, billing)
    return code.value, code.scheme_designator, code.meaning


def _referenced_requests(ct_header: Dataset) -> list[Dataset]:
    """ReferencedRequestSequence items (SR Document General Module, PS3.3 C.17.2).

    One item per RequestAttributesSequence item of the CT; without one, a single item from the
    CT's Accession Number and Study Instance UID. Type 2 attributes are always present, empty
    when unknown.
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
        item.RequestedProcedureCodeSequence = list(request.get("RequestedProcedureCodeSequence", []))
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


def centre_slice(finding: Finding, volume: Volume, what: str) -> int:
    """The index of the slice through the finding's centre, where its outline is drawn."""
    k = round(finding.center_kji[0])
    if not 0 <= k < len(volume.slices):
        raise ReportError(f"{what}: centre slice {k} is outside the volume (0 to {len(volume.slices) - 1})")
    return k


def slice_header(volume: Volume, k: int, evidence: Mapping[str, Dataset], what: str) -> Dataset:
    """The evidence header of the volume's slice ``k`` (a ``ReportError`` when it is missing)."""
    uid = volume.slices[k].sop_instance_uid
    if uid not in evidence:
        raise ReportError(f"{what}: slice {k} (SOP instance {uid}) is not among the evidence")
    return evidence[uid]


def _finding_sites(finding: Finding, number: int) -> list[hd.sr.FindingSite]:
    """TID 1419 Finding Site: the lobe when known, else none.

    A bare "Lung" adds nothing to a lung nodule (finding type Nodule) and OHIF 3 prints a
    finding site as "363698007: <meaning>" (its concept code, not its name) in the label it
    draws, so the site is written only when it tells the reader something.
    """
    if finding.lobe is None:
        return []
    try:
        location, laterality = _LOBES[finding.lobe.strip().lower()]
    except KeyError:
        raise ReportError(
            f"nodule {number}: unknown lobe {finding.lobe!r}; known: {sorted(_LOBES)}"
        ) from None
    return [hd.sr.FindingSite(anatomic_location=location, laterality=laterality)]


def nodule_outline(finding: Finding, volume: Volume, header: Dataset, number: int) -> np.ndarray:
    """Closed POLYLINE ``(column, row)`` points of a circle of the nodule's diameter, clipped
    to the image (a nodule at the edge of a small field of view).

    SCOORD pixel coordinates (PS3.3 C.18.6.1.1) put (0, 0) at the top left corner of the top
    left pixel, so the centre of voxel column ``i``, row ``j`` is ``(i + 0.5, j + 0.5)``, and
    they lie within 0 to Columns and 0 to Rows (highdicom refuses a GSPS outline beyond).
    """
    _, j, i = finding.center_kji
    if not (0 <= j < header.Rows and 0 <= i < header.Columns):
        raise ReportError(f"nodule {number}: centre (row {j:.1f}, column {i:.1f}) lies outside the image")
    _, row_spacing, column_spacing = volume.spacing
    radius = finding.diameter_mm / 2
    angles = np.linspace(0.0, 2 * np.pi, POLYLINE_VERTICES, endpoint=False)
    vertices = np.column_stack(
        [
            np.clip(i + 0.5 + radius / column_spacing * np.cos(angles), 0.0, float(header.Columns)),
            np.clip(j + 0.5 + radius / row_spacing * np.sin(angles), 0.0, float(header.Rows)),
        ]
    )
    return np.vstack([vertices, vertices[:1]])


def _measurement_group(
    finding: Finding,
    number: int,
    volume: Volume,
    evidence: Mapping[str, Dataset],
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> tuple[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, Dataset]:
    """TID 1410 group of one nodule, and the header of the slice its region lies on."""
    what = f"nodule {number}"
    k = centre_slice(finding, volume, what)
    if finding.lung_rads not in _LUNG_RADS_CATEGORIES:
        raise ReportError(f"{what}: unknown Lung-RADS category {finding.lung_rads!r}")
    if not 0.0 <= finding.probability <= 1.0:
        raise ReportError(f"{what}: probability {finding.probability} is not in [0, 1]")
    header = slice_header(volume, k, evidence, what)
    slice_ref = volume.slices[k]
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=slice_ref.sop_class_uid,
        referenced_sop_instance_uid=slice_ref.sop_instance_uid,
        referenced_frame_numbers=None if slice_ref.frame_number is None else [slice_ref.frame_number],
    )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=nodule_outline(finding, volume, header, number),
        source_image=source,
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Nodule {number}"),
        referenced_region=region,
        finding_type=codes.SCT.Nodule,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=algorithm,
        finding_sites=_finding_sites(finding, number) or None,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.LongAxis, value=float(finding.diameter_mm), unit=codes.UCUM.Millimeter
            ),
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(finding.volume_mm3), unit=codes.UCUM.CubicMillimeter
            ),
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding, value=100.0 * finding.probability, unit=codes.UCUM.Percent
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_NODULE_TYPE, value=_NODULE_TYPES[NoduleType(finding.nodule_type)]
            ),
            hd.sr.QualitativeEvaluation(name=_LUNG_RADS, value=_LUNG_RADS_CATEGORIES[finding.lung_rads]),
            hd.sr.QualitativeEvaluation(
                name=_ACTIONABLE, value=codes.SCT.Yes if finding.actionable else codes.SCT.No
            ),
        ],
    )
    return group, header


def _report_evaluations(report: NoduleReport) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations" with its CODE (row 13) and TEXT (row 14) items."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    threshold = f"{report.score_threshold:g}"
    exam_category = exam_lung_rads(report.findings)
    if report.findings:
        count = len(report.findings)
        summary = (
            f"{count} nodule{'s' if count > 1 else ''} reported at operating point {report.operating_point}; "
            f"suggested exam category Lung-RADS {exam_category}"
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
        hd.sr.TextContentItem(
            name=_OPERATING_POINT, value=report.operating_point, relationship_type=contains
        ),
        hd.sr.TextContentItem(name=_SCORE_THRESHOLD, value=threshold, relationship_type=contains),
    ]
    if exam_category is not None:
        items.append(
            hd.sr.CodeContentItem(name=_LUNG_RADS, value=_LUNG_RADS_CATEGORIES[exam_category], relationship_type=contains)
        )
    items += [
        hd.sr.TextContentItem(name=_SUPPRESSED, value=f"{rule}: {count}", relationship_type=contains)
        for rule, count in sorted(report.suppressed.items())
    ]
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _measurement_report_content(
    observation_context: hd.sr.ObservationContext,
    procedure_reported: hd.sr.CodedConcept,
    library_images: Sequence[Dataset],
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
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

    Raises
    ------
    TypeError, ValueError
        For malformed arguments.
    ReportError
        When the report cannot be built from the evidence: no evidence, evidence from another
        study or series than the volume, a finding centre outside the volume, a predecessor from
        another study, a report made by another model than ``algorithm`` names, or CT headers
        that highdicom refuses as evidence (an unknown character set, for one).
    """
    if not isinstance(algorithm, AlgorithmIdentity):
        raise TypeError(f"algorithm must be an AlgorithmIdentity, got {type(algorithm).__name__}")
    if not isinstance(billing, BillingCodes):
        raise TypeError(f"billing must be a BillingCodes, got {type(billing).__name__}")
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
    sop_instance_uid = sop_instance_uid or generate_uid()
    series_instance_uid = series_instance_uid or generate_uid(
        entropy_srcs=[volume.study_instance_uid, algorithm.device_uid, "LungScreen SR series"]
    )

    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.model_name,
        version=algorithm.model_version,
        manufacturer=algorithm.manufacturer,
        parameters=[
            f"operating point: {report.operating_point}",
            f"score threshold: {report.score_threshold:g}",
        ],
    )
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    library_images: dict[str, Dataset] = {}  # SOP Instance UID -> header, in order of first use
    for number, finding in enumerate(report.findings, start=1):
        tracking_uid = generate_uid(entropy_srcs=[sop_instance_uid, f"Nodule {number}"])
        group, header = _measurement_group(finding, number, volume, headers, tracking_uid, algorithm_id)
        groups.append(group)
        library_images.setdefault(header.SOPInstanceUID, _library_view(volume, round(finding.center_kji[0]), header))
    if not library_images:
        k = len(volume.slices) // 2
        middle = slice_header(volume, k, headers, "image library")
        library_images[middle.SOPInstanceUID] = _library_view(volume, k, middle)

    first = _with_type2_study_attributes(evidence[0])
    procedure = _main_exam_code(first, billing)
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
        procedure_reported=procedure,
        library_images=list(library_images.values()),
        groups=groups,
        evaluations=_report_evaluations(report),
    )
    try:
        return hd.sr.ComprehensiveSR(
            evidence=[first, *evidence[1:]],
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
            requested_procedures=_referenced_requests(first),
            previous_versions=None if predecessor is None else [predecessor],
            contributing_equipment=[_algorithm_equipment(algorithm)],
            coding_schemes=_coding_schemes(
                [LOCAL_SCHEME, ai_extension.scheme_designator, procedure.scheme_designator],
                algorithm.manufacturer,
            ),
        )
    except ValueError as error:  # highdicom checks the evidence: a CT header it cannot use
        raise ReportError(f"the SR cannot be built from the CT's headers: {str(error)[:160]}") from error
