"""Rule-based choice of the one CT series of a study to analyse.

A study holds localizers, dose reports, reformats, projections and often several
reconstructions of the same acquisition; archives add their own (TCIA and LUNA16 scans are
``ORIGINAL\\SECONDARY\\AXIAL``; anonymisers, PACS and reconstructions made after the scan
write ``DERIVED\\SECONDARY``). :func:`choose_series` keeps every axial stack of CT slices
that can be assembled into a volume, whatever ImageType values 1 and 2 say, and refuses
what is not a plain axial reconstruction: localizers, MIP / MinIP / projections, volume
renderings, curved and multiplanar reformats (named by ImageType value 3 and beyond, or by
the SeriesDescription conventions of the vendors), secondary captures, dose reports and
screen captures, non-axial stacks, too few slices, slices too thick or too thin. Among the
eligible series it ranks, best first (:func:`_rank`): a series whose BodyPartExamined does not
name a region without lungs, ORIGINAL before DERIVED, PRIMARY before SECONDARY, the model's
preferred kernel family (:mod:`dicom_io.kernels`), thinner slices, more slices, the lower
SeriesNumber. Every series not chosen is listed with a typed :class:`RejectionCode` and a
reason a person can act on; reasons name series by number, description or UID, never the
patient.

Whether the chosen volume shows lungs at all is judged on its pixels after it is built
(``server/pipeline.py`` asks the analysis layer), and the series is then refused with
:attr:`RejectionCode.NO_LUNGS` and the next one tried: header anatomy (BodyPartExamined,
ProtocolName, StudyDescription) is too often wrong to refuse on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum

import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import UID

from lungscreen.dicom_io.kernels import KernelFamily, kernel_family, series_kernel
from lungscreen.dicom_io.study import SeriesCandidate
from lungscreen.dicom_io.volume import CT_SOP_CLASSES
from lungscreen.errors import VolumeError

_SAME_SPACING_MM = 1e-3
_BACKSLASH = "\\"  # separates the values of a multi-valued attribute, as in DICOM


class RejectionCode(StrEnum):
    """Why a series is not analysed; what callers branch on (the text is for people)."""

    UNREADABLE_HEADER = "unreadable_header"
    NOT_CT = "not_ct"  # another SOP class or modality
    SECONDARY_CAPTURE = "secondary_capture"  # Secondary Capture SOP classes (PS3.4 B.5)
    DOSE_REPORT = "dose_report"  # radiation dose SR, or a dose page stored as an image
    SCREEN_CAPTURE = "screen_capture"  # a screen saved as an image
    LOCALIZER = "localizer"  # localizer, scout, topogram, surview, scanogram
    PROJECTION = "projection"  # MIP, MinIP, other projections
    VOLUME_RENDERING = "volume_rendering"  # VR, VRT, SSD
    CURVED_REFORMAT = "curved_reformat"  # curved planar reformat
    REFORMAT = "reformat"  # multiplanar reformat (MPR)
    INVALID_GEOMETRY = "invalid_geometry"  # the slices do not form one regular stack
    NOT_AXIAL = "not_axial"
    TOO_FEW_SLICES = "too_few_slices"
    TOO_THICK = "too_thick"
    TOO_THIN = "too_thin"
    VOLUME_UNREADABLE = "volume_unreadable"  # the volume could not be built (pixel data)
    NO_LUNGS = "no_lungs"  # the volume shows a body without lungs (judged on the pixels)
    NOT_CHOSEN = "not_chosen"  # eligible, but another series ranks first


@dataclass(frozen=True)
class SeriesRejection:
    series_instance_uid: str
    series_description: str
    code: RejectionCode
    reason: str  # readable text; never parsed

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", RejectionCode(self.code))  # a wrong code fails where it is made


@dataclass(frozen=True)
class SeriesChoice:
    selected: SeriesCandidate | None
    rejected: tuple[SeriesRejection, ...]
    why_selected: str = ""  # what put the selected series first; "" when none is selected


@dataclass(frozen=True)
class SelectionRules:
    """Site-configurable limits of :func:`choose_series`.

    The slice thickness rules apply to the slice step measured from ImagePositionPatient
    (the spacing the volume will have), not to the nominal SliceThickness.
    """

    min_slices: int = 30
    # 5 mm: routine chest CT in many hospitals is reconstructed at 5 mm only, and a refusal gives
    # the radiologist nothing; thinner series rank first, and a screening site that keeps ACR's
    # 2.5 mm protocol limit sets it here.
    max_slice_thickness_mm: float = 5.0
    min_slice_thickness_mm: float = 0.4
    require_axial: bool = True
    axial_tolerance_deg: float = 15.0

    def __post_init__(self) -> None:
        if not isinstance(self.min_slices, int) or isinstance(self.min_slices, bool) or self.min_slices < 2:
            raise ValueError(f"min_slices must be an integer of at least 2, got {self.min_slices!r}")
        for name in ("max_slice_thickness_mm", "min_slice_thickness_mm", "axial_tolerance_deg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.min_slice_thickness_mm <= self.max_slice_thickness_mm:
            raise ValueError(
                "slice thickness limits must satisfy 0 < min <= max, got "
                f"{self.min_slice_thickness_mm} and {self.max_slice_thickness_mm}"
            )
        if not 0 <= self.axial_tolerance_deg <= 90:
            raise ValueError(f"axial_tolerance_deg must lie in [0, 90], got {self.axial_tolerance_deg}")
        if not isinstance(self.require_axial, bool):
            raise ValueError(f"require_axial must be true or false, got {self.require_axial!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> SelectionRules:
        """Rules from site configuration; keys are the field names, absent keys keep defaults.

        Raises:
            ValueError: an unknown key, or a value of the wrong type or out of range.
        """
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown series selection rule(s) {unknown}; known: {sorted(known)}")
        values = dict(mapping)
        for name in ("max_slice_thickness_mm", "min_slice_thickness_mm", "axial_tolerance_deg"):
            # A YAML/JSON "3" is as good as "3.0"; booleans are not numbers here.
            if isinstance(values.get(name), int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
        return cls(**values)  # type: ignore[arg-type]  # checked in __post_init__


def choose_series(
    candidates: Iterable[SeriesCandidate],
    rules: SelectionRules = SelectionRules(),
    *,
    preferred_kernel: KernelFamily | None = None,
) -> SeriesChoice:
    """Choose the series to analyse among a study's ``candidates``.

    A series is eligible when it is a CT image series (CT Image, Enhanced CT or Legacy
    Converted Enhanced CT Storage, Modality CT) whose ImageType (PS3.3 C.7.6.1.1.2; values 3
    and beyond) and SeriesDescription name no localizer, projection, rendering, reformat,
    dose report or screen capture, with at least ``rules.min_slices`` slices (frames, for
    multi-frame instances) forming one regular stack (:func:`dicom_io.volume.stack_geometry`),
    axial within ``rules.axial_tolerance_deg``, its slice step within the thickness limits.
    ImageType values 1 and 2 (ORIGINAL / DERIVED, PRIMARY / SECONDARY) only rank.

    Args:
        candidates: The study's series.
        rules: The site's limits.
        preferred_kernel: The kernel family the model prefers (its card's ``preferred_kernel``);
            eligible series of that family rank before those of unknown kernel, and those
            before series of the other family.

    Returns:
        The chosen series (``None`` when none is eligible), why it ranks first, and, in input
        order, every other series with the reason it was not chosen.
    """
    candidates = tuple(candidates)
    outcomes = [_assess_or_why_not(candidate, rules) for candidate in candidates]
    eligible = {index: outcome for index, outcome in enumerate(outcomes) if isinstance(outcome, _Eligible)}
    refused = {index: outcome for index, outcome in enumerate(outcomes) if isinstance(outcome, _Refusal)}
    if not eligible:
        return SeriesChoice(None, tuple(_rejection(candidates[i], refused[i]) for i in sorted(refused)))
    keys = {index: _rank(candidates[index], outcome, preferred_kernel) for index, outcome in eligible.items()}
    chosen = min(eligible, key=keys.__getitem__)
    for index, outcome in eligible.items():
        if index != chosen:
            refused[index] = _Refusal(
                RejectionCode.NOT_CHOSEN,
                _why_not_chosen(outcome, eligible[chosen], candidates[chosen], preferred_kernel),
            )
    rejected = tuple(_rejection(candidates[index], refused[index]) for index in sorted(refused))
    why = _why_selected(eligible[chosen], len(eligible), preferred_kernel)
    return SeriesChoice(candidates[chosen], rejected, why)


@dataclass(frozen=True)
class _Refusal:
    code: RejectionCode
    reason: str


@dataclass(frozen=True)
class _Eligible:
    spacing_mm: float
    slice_count: int
    original: bool  # every instance ORIGINAL (ImageType value 1)
    primary: bool  # every instance PRIMARY (ImageType value 2)
    image_type: str  # as shown in reasons, e.g. ORIGINAL\SECONDARY
    kernel: str  # ConvolutionKernel, "" when absent
    kernel_family: KernelFamily | None
    body_part_without_lungs: str  # BodyPartExamined when it names a region without lungs, else ""


def _rejection(candidate: SeriesCandidate, refusal: _Refusal) -> SeriesRejection:
    return SeriesRejection(candidate.series_instance_uid, candidate.series_description, refusal.code, refusal.reason)


def _assess_or_why_not(candidate: SeriesCandidate, rules: SelectionRules) -> _Eligible | _Refusal:
    """:func:`_assess`; a header value that pydicom cannot parse (it parses on first access: a
    corrupt VR, a truncated value) makes the series ineligible, with that as the reason."""
    try:
        return _assess(candidate, rules)
    except Exception as exc:
        return _Refusal(
            RejectionCode.UNREADABLE_HEADER, f"a DICOM header cannot be parsed: {type(exc).__name__}: {str(exc)[:120]}"
        )


# SOP classes (PS3.4 B.5) of secondary captures and of radiation dose reports.
_SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image
})
_DOSE_REPORT_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
})

# What ImageType values 3 and beyond, and the vendors' SeriesDescription conventions, call
# the images that are not a plain axial reconstruction. Matched on words (case, underscores
# and punctuation ignored): Siemens CSA MPR / CSA MIP / CSA REPORT / Topogram, GE
# REFORMATTED / SCREEN SAVE / Scout / Dose Report, Philips Surview / Dose Info, Canon
# Scanogram. The last pattern of each row applies to ImageType only: Enhanced CT's derived
# pixel contrast MAXIMUM / MINIMUM (PS3.3 C.8.16.1) is a projection, while an "Expiration
# minimum dose" description is none.
_MARKERS: tuple[tuple[RejectionCode, str, re.Pattern[str], re.Pattern[str]], ...] = tuple(
    (code, what, re.compile(rf"\b(?:{common}{'|' if image_type_only else ''}{image_type_only})\b"),
     re.compile(rf"\b(?:{common})\b"))
    for code, what, common, image_type_only in (
        (RejectionCode.LOCALIZER, "localizer images",
         r"localizer|localiser|scout|topogram|surview|scanogram|scanoscope", ""),
        (RejectionCode.DOSE_REPORT, "a dose report",
         r"dose (?:report|info|information|summary|record|page)|patient protocol", r"csa report"),
        (RejectionCode.SCREEN_CAPTURE, "a screen capture", r"screen ?(?:save|shot|capture)|screenshot", ""),
        (RejectionCode.PROJECTION, "a projection (MIP, MinIP)",
         r"mips?|minip|min ip|maxip|max ip|projection", r"maximum|minimum"),
        (RejectionCode.VOLUME_RENDERING, "a volume rendering", r"vrt|volume render(?:ing|ed)?|ssd", r"vr"),
        (RejectionCode.CURVED_REFORMAT, "a curved reformat", r"cpr|curved", ""),
        (RejectionCode.REFORMAT, "a multiplanar reformat (MPR)", r"mpr|reformat(?:ted)?|multi ?planar", ""),
    )
)


def _assess(candidate: SeriesCandidate, rules: SelectionRules) -> _Eligible | _Refusal:
    """What ranks an eligible series, or why it is not eligible."""
    headers = candidate.headers
    sop_classes = sorted({str(h.get("SOPClassUID", "")) for h in headers})
    modalities = sorted({str(h.get("Modality", "") or "missing") for h in headers})
    description = candidate.series_description
    image_types = [_image_type(header) for header in headers]
    marker = _marker(image_types, description)
    if set(sop_classes) & _DOSE_REPORT_CLASSES:
        return _Refusal(RejectionCode.DOSE_REPORT, f"a dose report (SOP class {_sop_class_names(sop_classes)})")
    if set(sop_classes) & _SECONDARY_CAPTURE_CLASSES:
        if marker is not None and marker.code in (RejectionCode.DOSE_REPORT, RejectionCode.SCREEN_CAPTURE):
            return _Refusal(marker.code, f"{marker.reason}, stored as a secondary capture")
        return _Refusal(
            RejectionCode.SECONDARY_CAPTURE, f"a secondary capture (SOP class {_sop_class_names(sop_classes)})"
        )
    not_ct = sorted(set(sop_classes) - CT_SOP_CLASSES)
    if not_ct:
        return _Refusal(
            RejectionCode.NOT_CT,
            f"not a CT image series (SOP class {_sop_class_names(not_ct)}; modality {'/'.join(modalities)})",
        )
    if modalities != ["CT"]:
        return _Refusal(RejectionCode.NOT_CT, f"modality {'/'.join(modalities)}, not CT")
    if marker is not None:
        return marker

    try:
        slice_count = candidate.frame_count
        if slice_count < rules.min_slices:
            return _Refusal(RejectionCode.TOO_FEW_SLICES, f"too few slices: {slice_count} < {rules.min_slices}")
        geometry = candidate.geometry
    except VolumeError as exc:
        return _Refusal(RejectionCode.INVALID_GEOMETRY, str(exc))

    if rules.require_axial:
        # The angle between the slice normal and the patient z (feet-head) axis.
        tilt = math.degrees(math.acos(min(1.0, abs(float(geometry.normal[2])))))
        if tilt > rules.axial_tolerance_deg:
            return _Refusal(
                RejectionCode.NOT_AXIAL,
                f"not axial: the slice normal is {tilt:.1f}° from the patient z axis "
                f"(tolerance {rules.axial_tolerance_deg:g}°)",
            )
    if geometry.step > rules.max_slice_thickness_mm:
        return _Refusal(
            RejectionCode.TOO_THICK, f"slice thickness {_mm(geometry.step)} mm > {_mm(rules.max_slice_thickness_mm)} mm"
        )
    if geometry.step < rules.min_slice_thickness_mm:
        return _Refusal(
            RejectionCode.TOO_THIN, f"slice thickness {_mm(geometry.step)} mm < {_mm(rules.min_slice_thickness_mm)} mm"
        )
    try:  # hints that only rank: a value pydicom cannot parse must not refuse the series
        kernel, group = series_kernel(headers[0])
        body_part = _body_part_without_lungs(headers[0])
    except Exception:
        kernel, group, body_part = "", "", ""
    return _Eligible(
        spacing_mm=geometry.step,
        slice_count=slice_count,
        original=all(values[:1] == ("ORIGINAL",) for values in image_types),
        primary=all(values[1:2] == ("PRIMARY",) for values in image_types),
        image_type=_BACKSLASH.join(image_types[0][:2]) or "missing",
        kernel=kernel,
        kernel_family=kernel_family(kernel, group),
        body_part_without_lungs=body_part,
    )


def _marker(image_types: list[tuple[str, ...]], description: str) -> _Refusal | None:
    """The first marker of :data:`_MARKERS` that ImageType values 3+ (of any instance) or the
    SeriesDescription carry, as a refusal naming where it was found."""
    description_words = _words(description)
    for code, what, image_type_pattern, description_pattern in _MARKERS:
        offending = [values for values in image_types if any(image_type_pattern.search(_words(v)) for v in values[2:])]
        if offending:
            share = "" if len(offending) == len(image_types) else f"{len(offending)} of {len(image_types)} instances are "
            return _Refusal(code, f"{share}{what} (ImageType {_BACKSLASH.join(offending[0])})")
        if description_pattern.search(description_words):
            return _Refusal(code, f"{what} (SeriesDescription {description!r})")
    return None


def _words(text: str) -> str:
    """Lower-case words separated by single spaces: ``CSA_MPR`` and ``csa-mpr`` read ``csa mpr``."""
    return " ".join(re.split(r"[^a-z0-9]+", text.lower())).strip()


def _image_type(header: pydicom.Dataset) -> tuple[str, ...]:
    value = header.get("ImageType")
    if value is None or value == "":
        return ()
    return tuple(str(v).strip().upper() for v in (value if isinstance(value, MultiValue) else [value]))


# BodyPartExamined defined terms (PS3.16 Annex L) of regions a CT of which shows no lungs; a
# series so labelled ranks after the others, as mislabelled series exist: the pixels decide.
_BODY_PARTS_WITHOUT_LUNGS = frozenset({
    "HEAD", "BRAIN", "SKULL", "FACE", "NECK", "CSPINE", "LSPINE", "SSPINE", "ABDOMEN", "PELVIS", "ABDOMENPELVIS",
    "HIP", "KNEE", "LEG", "ARM", "HAND", "FOOT", "ANKLE", "WRIST", "ELBOW", "EXTREMITY", "IAC", "SELLA", "ORBIT",
})


def _body_part_without_lungs(header: pydicom.Dataset) -> str:
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    return body_part if body_part in _BODY_PARTS_WITHOUT_LUNGS else ""


def _kernel_rank(outcome: _Eligible, preferred: KernelFamily | None) -> int:
    """0: the preferred family (or no preference), 1: unknown family, 2: the other family."""
    if preferred is None or outcome.kernel_family == preferred:
        return 0
    return 1 if outcome.kernel_family is None else 2


def _rank(candidate: SeriesCandidate, outcome: _Eligible, preferred: KernelFamily | None) -> tuple:
    """Sort key, best first.

    1. BodyPartExamined names no region without lungs (a head or abdomen series of a trauma
       study is tried last, not refused: labels can be wrong).
    2. ORIGINAL before DERIVED, 3. PRIMARY before SECONDARY: pixels as the scanner
       reconstructed them before those processed afterwards.
    4. The model's preferred kernel family, then unknown kernels: the noise texture the
       detector was trained on matters more than a slice step within the limits.
    5. Thinner slices, 6. more slices (coverage), 7. lower SeriesNumber, then UID.
    """
    number = candidate.series_number
    return (
        bool(outcome.body_part_without_lungs),
        not outcome.original,
        not outcome.primary,
        _kernel_rank(outcome, preferred),
        _spacing_key(outcome.spacing_mm),
        -outcome.slice_count,
        math.inf if number is None else number,
        candidate.series_instance_uid,
    )


def _why_not_chosen(
    outcome: _Eligible, best: _Eligible, chosen: SeriesCandidate, preferred: KernelFamily | None
) -> str:
    """The first criterion of :func:`_rank` on which the chosen series wins."""
    if outcome.body_part_without_lungs and not best.body_part_without_lungs:
        return f"eligible, but its BodyPartExamined {outcome.body_part_without_lungs} names no lungs; {chosen.label} ranks first"
    if outcome.original != best.original:
        return f"eligible, but {chosen.label} is ORIGINAL (this series: ImageType {outcome.image_type})"
    if outcome.primary != best.primary:
        return f"eligible, but {chosen.label} is PRIMARY (this series: ImageType {outcome.image_type})"
    if _kernel_rank(outcome, preferred) != _kernel_rank(best, preferred):
        return (
            f"eligible, but the model prefers a {preferred} kernel: {chosen.label} has {_kernel_text(best)}, "
            f"this series {_kernel_text(outcome)}"
        )
    if _spacing_key(outcome.spacing_mm) != _spacing_key(best.spacing_mm):
        return f"eligible, but {chosen.label} is thinner ({_mm(best.spacing_mm)} mm vs {_mm(outcome.spacing_mm)} mm)"
    if outcome.slice_count != best.slice_count:
        return f"eligible, but {chosen.label} has more slices ({best.slice_count} vs {outcome.slice_count})"
    return f"eligible, but {chosen.label} ranks first (same slice spacing and count; lower SeriesNumber or UID)"


def _why_selected(best: _Eligible, eligible_count: int, preferred: KernelFamily | None) -> str:
    kernel = _kernel_text(best) + (f", the model prefers {preferred}" if preferred is not None else "")
    facts = f"ImageType {best.image_type}, kernel {kernel}, {_mm(best.spacing_mm)} mm, {best.slice_count} slices"
    if eligible_count == 1:
        return f"the only eligible series ({facts})"
    return f"ranked first of {eligible_count} eligible series ({facts})"


def _kernel_text(outcome: _Eligible) -> str:
    if not outcome.kernel:
        return "not given"
    return f"{outcome.kernel} ({outcome.kernel_family or 'unknown family'})"


def _spacing_key(spacing_mm: float) -> int:
    # Spacings equal to the micrometre are a tie (DS rounding differs between series).
    return round(spacing_mm / _SAME_SPACING_MM)


def _sop_class_names(uids: Iterable[str]) -> str:
    return ", ".join(_sop_class_name(uid) for uid in uids)


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} {uid}" if name and name != uid else uid or "missing"


def _mm(value: float) -> str:
    """Millimetres with up to 3 decimals and at least one: 5.0, 2.5, 0.625."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
