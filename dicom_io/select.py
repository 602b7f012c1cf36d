"""Rule-based choice of the one CT series of a study to analyse.

A study holds localizers, dose reports, derived reformats and often several
reconstructions of the same acquisition. :func:`choose_series` keeps the original axial CT
series that can be assembled into a volume (:mod:`dicom_io.volume`) and whose slices are
thin enough for nodule detection, then prefers the thinnest, the most complete, and the
lowest SeriesNumber. Every series not chosen is listed with a reason a person can act
on; reasons name series by number, description or UID, never the patient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import UID

from lungscreen.errors import VolumeError
from lungscreen.dicom_io.volume import CT_SOP_CLASSES, FrameHeader, frame_headers, stack_geometry

_SAME_SPACING_MM = 1e-3
_BACKSLASH = "\\"  # separates the values of a multi-valued attribute, as in DICOM


@dataclass(frozen=True)
class SeriesCandidate:
    """The instances of one series: paths and their headers (read without pixel data)."""

    series_instance_uid: str
    paths: tuple[Path, ...]
    headers: tuple[pydicom.Dataset, ...]

    def __post_init__(self) -> None:
        if not self.headers:
            raise ValueError(f"series {self.series_instance_uid} has no instances")
        if len(self.paths) != len(self.headers):
            raise ValueError(f"{len(self.paths)} paths for {len(self.headers)} headers")
        foreign = {str(h.get("SeriesInstanceUID", "")) for h in self.headers} - {self.series_instance_uid}
        if foreign:
            raise ValueError(f"headers of series {sorted(foreign)} given as series {self.series_instance_uid}")

    @cached_property
    def frames(self) -> tuple[tuple[FrameHeader, ...], ...]:
        """The frame headers of each instance (built once: the selection checks them and
        ``read_series_volume`` stacks them).

        Raises:
            VolumeError: as :func:`dicom_io.volume.frame_headers`.
        """
        return tuple(frame_headers(header) for header in self.headers)

    @property
    def series_description(self) -> str:
        """SeriesDescription, ``""`` when absent or unreadable (it only names the series)."""
        try:
            return str(self.headers[0].get("SeriesDescription", "") or "")
        except Exception:  # pydicom parses values on first access: a corrupt element fails here
            return ""

    @property
    def series_number(self) -> int | None:
        """SeriesNumber, None when absent or unreadable (it only names the series)."""
        try:
            value = self.headers[0].get("SeriesNumber")
            return None if value is None or value == "" else int(value)
        except Exception:
            return None

    @property
    def label(self) -> str:
        """How a reason names the series: ``series 3`` or, without SeriesNumber, by UID."""
        number = self.series_number
        return f"series {number}" if number is not None else f"series {self.series_instance_uid}"


@dataclass(frozen=True)
class SeriesRejection:
    series_instance_uid: str
    series_description: str
    reason: str


@dataclass(frozen=True)
class SeriesChoice:
    selected: SeriesCandidate | None
    rejected: tuple[SeriesRejection, ...]


@dataclass(frozen=True)
class SelectionRules:
    """Site-configurable limits of :func:`choose_series`.

    The slice thickness rules apply to the slice step measured from ImagePositionPatient
    (the spacing the volume will have), not to the nominal SliceThickness.
    """

    min_slices: int = 30
    max_slice_thickness_mm: float = 3.0
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


def choose_series(candidates: Iterable[SeriesCandidate], rules: SelectionRules = SelectionRules()) -> SeriesChoice:
    """Choose the series to analyse among a study's ``candidates``.

    A series is eligible when it is a CT image series (CT Image, Enhanced CT or Legacy
    Converted Enhanced CT Storage, Modality CT), holds only ORIGINAL PRIMARY images that
    are not localizers (ImageType, PS3.3 C.7.6.1.1.2), has at least ``rules.min_slices``
    slices (frames, for multi-frame instances) forming one regular stack
    (:func:`dicom_io.volume.stack_geometry`), is axial within ``rules.axial_tolerance_deg``,
    and its slice step lies within the thickness limits. Among eligible series the
    thinnest wins, then the one with more slices, then the lower SeriesNumber.

    Returns:
        The chosen series (``None`` when none is eligible) and, in input order, every
        other series with the reason it was not chosen.
    """
    candidates = tuple(candidates)
    outcomes = [_assess_or_why_not(candidate, rules) for candidate in candidates]
    reasons = {index: outcome for index, outcome in enumerate(outcomes) if isinstance(outcome, str)}
    eligible = {index: outcome for index, outcome in enumerate(outcomes) if isinstance(outcome, _Eligible)}
    chosen = None
    if eligible:
        chosen = min(eligible, key=lambda index: _rank(candidates[index], eligible[index]))
        for index, outcome in eligible.items():
            if index != chosen:
                reasons[index] = _why_not_chosen(outcome, candidates[chosen], eligible[chosen])
    rejected = tuple(
        SeriesRejection(candidates[index].series_instance_uid, candidates[index].series_description, reasons[index])
        for index in sorted(reasons)
    )
    return SeriesChoice(None if chosen is None else candidates[chosen], rejected)


@dataclass(frozen=True)
class _Eligible:
    spacing_mm: float
    slice_count: int


def _assess_or_why_not(candidate: SeriesCandidate, rules: SelectionRules) -> _Eligible | str:
    """:func:`_assess`; a header value that pydicom cannot parse (it parses on first access: a
    corrupt VR, a truncated value) makes the series ineligible, with that as the reason."""
    try:
        return _assess(candidate, rules)
    except Exception as exc:
        return f"a DICOM header cannot be parsed: {type(exc).__name__}: {str(exc)[:120]}"


def _assess(candidate: SeriesCandidate, rules: SelectionRules) -> _Eligible | str:
    """What ranks an eligible series, or the reason it is not eligible."""
    headers = candidate.headers
    modalities = sorted({str(h.get("Modality", "") or "missing") for h in headers})
    not_ct = sorted({str(h.get("SOPClassUID", "")) for h in headers} - CT_SOP_CLASSES)
    if not_ct:
        sop_classes = ", ".join(_sop_class_name(uid) for uid in not_ct)
        return f"not a CT image series (SOP class {sop_classes}; modality {'/'.join(modalities)})"
    if modalities != ["CT"]:
        return f"modality {'/'.join(modalities)}, not CT"
    image_type_reason = _image_type_reason(headers)
    if image_type_reason:
        return image_type_reason

    try:
        frames = [frame for file_frames in candidate.frames for frame in file_frames]
    except VolumeError as exc:
        return str(exc)
    if len(frames) < rules.min_slices:
        return f"too few slices: {len(frames)} < {rules.min_slices}"
    try:
        geometry = stack_geometry(frames)
    except VolumeError as exc:
        return str(exc)

    if rules.require_axial:
        # The angle between the slice normal and the patient z (feet-head) axis.
        tilt = math.degrees(math.acos(min(1.0, abs(float(geometry.normal[2])))))
        if tilt > rules.axial_tolerance_deg:
            return (
                f"not axial: the slice normal is {tilt:.1f}° from the patient z axis "
                f"(tolerance {rules.axial_tolerance_deg:g}°)"
            )
    if geometry.step > rules.max_slice_thickness_mm:
        return f"slice thickness {_mm(geometry.step)} mm > {_mm(rules.max_slice_thickness_mm)} mm"
    if geometry.step < rules.min_slice_thickness_mm:
        return f"slice thickness {_mm(geometry.step)} mm < {_mm(rules.min_slice_thickness_mm)} mm"
    return _Eligible(spacing_mm=geometry.step, slice_count=len(frames))


def _image_type_reason(headers: tuple[pydicom.Dataset, ...]) -> str | None:
    """Why the ImageType values (PS3.3 C.7.6.1.1.2) rule the series out, if they do."""
    for problem, is_problem in (
        ("ImageType missing", lambda values: not values),
        ("localizer images", lambda values: "LOCALIZER" in values or "SCOUT" in values),
        ("derived or secondary images", lambda values: "ORIGINAL" not in values or "PRIMARY" not in values),
    ):
        offending = [values for values in map(_image_type, headers) if is_problem(values)]
        if offending:
            share = "" if len(offending) == len(headers) else f"{len(offending)} of {len(headers)} instances are "
            shown = f" (ImageType {_BACKSLASH.join(offending[0])})" if offending[0] else ""
            return f"{share}{problem}{shown}"
    return None


def _image_type(header: pydicom.Dataset) -> tuple[str, ...]:
    value = header.get("ImageType")
    if value is None or value == "":
        return ()
    return tuple(str(v).strip().upper() for v in (value if isinstance(value, MultiValue) else [value]))


def _rank(candidate: SeriesCandidate, outcome: _Eligible) -> tuple[int, int, float, str]:
    """Sort key, best first: thinnest, most slices, lowest SeriesNumber, then UID."""
    number = candidate.series_number
    return (
        _spacing_key(outcome.spacing_mm),
        -outcome.slice_count,
        math.inf if number is None else number,
        candidate.series_instance_uid,
    )


def _why_not_chosen(outcome: _Eligible, chosen: SeriesCandidate, best: _Eligible) -> str:
    if _spacing_key(outcome.spacing_mm) != _spacing_key(best.spacing_mm):
        return f"eligible, but {chosen.label} is thinner ({_mm(best.spacing_mm)} mm vs {_mm(outcome.spacing_mm)} mm)"
    if outcome.slice_count != best.slice_count:
        return f"eligible, but {chosen.label} has more slices ({best.slice_count} vs {outcome.slice_count})"
    return f"eligible, but {chosen.label} ranks first (same slice spacing and count; lower SeriesNumber or UID)"


def _spacing_key(spacing_mm: float) -> int:
    # Spacings equal to the micrometre are a tie (DS rounding differs between series).
    return round(spacing_mm / _SAME_SPACING_MM)


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} {uid}" if name and name != uid else uid or "missing"


def _mm(value: float) -> str:
    """Millimetres with up to 3 decimals and at least one: 5.0, 2.5, 0.625."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
