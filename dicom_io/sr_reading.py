"""Reading TID 1500 Imaging Measurement Reports back: the tracking UIDs of ours, and the
measurements of a report a viewer saved (OHIF's export, a radiologist's own SR).

Both walk the content tree by concept codes (PS3.16), so they read the measurement groups
whatever their inner shape: TID 1410 (SCOORD beside the NUMs, as LungScreen writes them) or
TID 1501 (SCOORD inside the first NUM, "inferred from", as Cornerstone3D's adapters export).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from lungscreen.errors import ReportError

# SR storage classes a viewer may save a measurement report as (PS3.4 B.5).
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
EXTENSIBLE_SR = "1.2.840.10008.5.1.4.1.1.88.35"
MEASUREMENT_REPORT_CLASSES = frozenset({ENHANCED_SR, COMPREHENSIVE_SR, COMPREHENSIVE_3D_SR, EXTENSIBLE_SR})

_IMAGING_MEASUREMENT_REPORT = ("DCM", "126000")
_MEASUREMENT_GROUP = ("DCM", "125007")
_TRACKING_IDENTIFIER = ("DCM", "112039")
_TRACKING_UID = ("DCM", "112040")
_PERSON_OBSERVER_NAME = ("DCM", "121008")
_DEVICE_OBSERVER_UID = ("DCM", "121012")

CORNERSTONE_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:"
"""How OHIF v3 / Cornerstone3D's adapters name a measurement group's tool (Tracking Identifier)."""


@dataclass(frozen=True)
class Measurement:
    """One measurement group of a report, its region in patient coordinates when known."""

    tracking_uid: str | None
    tracking_identifier: str | None
    graphic_type: str | None  # POINT, POLYLINE, CIRCLE, ELLIPSE, MULTIPOINT; None without a region
    center_lps_mm: tuple[float, float, float] | None  # None: its image is not known here
    size_mm: float | None  # longest extent of the region (diameter, long axis); None for a point
    referenced_sop_uid: str | None


@dataclass(frozen=True)
class MeasurementReport:
    sop_uid: str
    study_uid: str
    manufacturer: str
    observer: str | None  # Person Observer Name (TID 1003), when the report names one
    device_observer_uid: str | None  # Device Observer UID (TID 1004): the device that made it, if one did
    measurements: tuple[Measurement, ...]

    @property
    def from_a_viewer(self) -> bool:
        """Its groups carry Cornerstone3D tool identifiers (OHIF's export)."""
        return any((m.tracking_identifier or "").startswith(CORNERSTONE_TRACKING_PREFIX) for m in self.measurements)


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    return str(names[0].CodingSchemeDesignator), str(names[0].CodeValue)


def _walk(items) -> Iterator[Dataset]:
    for item in items or ():
        yield item
        yield from _walk(item.get("ContentSequence"))


def _groups(sr: Dataset) -> Iterator[Dataset]:
    for item in _walk(sr.get("ContentSequence")):
        if item.get("ValueType") == "CONTAINER" and _concept(item) == _MEASUREMENT_GROUP:
            yield item


def _child_value(group: Dataset, concept: tuple[str, str], attribute: str) -> str | None:
    for item in group.get("ContentSequence") or ():
        if _concept(item) == concept and attribute in item:
            return str(item.get(attribute))
    return None


def finding_tracking_uids(sr: Dataset) -> list[str]:
    """The Tracking Unique Identifier of each measurement group, in document order (for a
    LungScreen SR: one per finding, in the order of the findings)."""
    return [uid for uid in (_child_value(g, _TRACKING_UID, "UID") for g in _groups(sr)) if uid]


def _image_to_lps(points: np.ndarray, header: Dataset) -> np.ndarray:
    """SCOORD ``(column, row)`` points (PS3.3 C.18.6.1.1: (0, 0) is the top left corner of the
    top left pixel) to LPS mm on the image plane of ``header`` (PS3.3 C.7.6.2.1.1)."""
    origin = np.array([float(v) for v in header.ImagePositionPatient])
    orientation = [float(v) for v in header.ImageOrientationPatient]
    along_row, along_column = np.array(orientation[:3]), np.array(orientation[3:])
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    columns, rows = points[:, 0] - 0.5, points[:, 1] - 0.5
    return origin + np.outer(columns * column_spacing, along_row) + np.outer(rows * row_spacing, along_column)


def _region_geometry(graphic_type: str, lps: np.ndarray) -> tuple[tuple[float, float, float], float | None]:
    """Centre and longest extent (mm) of a region given by its points in LPS mm."""
    if graphic_type == "CIRCLE":  # centre, then a point on the circumference
        return tuple(float(v) for v in lps[0]), 2.0 * float(np.linalg.norm(lps[1] - lps[0]))
    if graphic_type == "POINT":
        return tuple(float(v) for v in lps[0]), None
    if graphic_type == "POLYLINE" and len(lps) > 2 and np.allclose(lps[0], lps[-1]):
        lps = lps[:-1]  # a closed outline repeats its first point
    if graphic_type == "ELLIPSE":  # major axis end points, then minor axis end points
        return tuple(float(v) for v in lps.mean(axis=0)), float(np.linalg.norm(lps[1] - lps[0]))
    extent = float(np.max(np.linalg.norm(lps[:, None, :] - lps[None, :, :], axis=-1))) if len(lps) > 1 else None
    return tuple(float(v) for v in lps.mean(axis=0)), extent  # a ruler's midpoint, an outline's centroid


def _measurement(group: Dataset, image_header) -> Measurement:
    tracking_uid = _child_value(group, _TRACKING_UID, "UID")
    identifier = _child_value(group, _TRACKING_IDENTIFIER, "TextValue")
    region = next((i for i in _walk(group.get("ContentSequence")) if i.get("ValueType") in ("SCOORD", "SCOORD3D")), None)
    if region is None:
        return Measurement(tracking_uid, identifier, None, None, None, None)
    graphic_type = str(region.get("GraphicType", ""))
    points = np.asarray([float(v) for v in region.get("GraphicData", [])], dtype=float)
    if region.ValueType == "SCOORD3D":
        lps = points.reshape(-1, 3)
        referenced = None
    else:
        image = next((i for i in _walk(region.get("ContentSequence")) if i.get("ValueType") == "IMAGE"), None)
        references = image.get("ReferencedSOPSequence") if image is not None else None
        referenced = str(references[0].ReferencedSOPInstanceUID) if references else None
        header = image_header(referenced) if referenced else None
        if header is None or not len(points) or len(points) % 2:
            return Measurement(tracking_uid, identifier, graphic_type, None, None, referenced)
        lps = _image_to_lps(points.reshape(-1, 2), header)
    if not len(lps):
        return Measurement(tracking_uid, identifier, graphic_type, None, None, referenced)
    centre, size = _region_geometry(graphic_type, lps)
    return Measurement(tracking_uid, identifier, graphic_type, centre, size, referenced)


def read_measurement_report(path: Path, image_header) -> MeasurementReport:
    """The measurements of the TID 1500 report in ``path``.

    ``image_header(sop_instance_uid)`` returns the header of a referenced image (its
    position, orientation and pixel spacing place a 2D region in the patient), or None when
    the image is not known here; such a measurement has no position.

    Raises :class:`ReportError` when the file is not a TID 1500 Imaging Measurement Report.
    """
    try:
        sr = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise ReportError(f"cannot read the SR: {type(exc).__name__}: {exc}") from exc
    if str(sr.get("SOPClassUID", "")) not in MEASUREMENT_REPORT_CLASSES:
        raise ReportError(f"not a measurement report SR class: {sr.get('SOPClassUID')}")
    if _concept(sr) != _IMAGING_MEASUREMENT_REPORT:
        raise ReportError("not a TID 1500 Imaging Measurement Report (document title is not 126000)")
    observer = _child_value(sr, _PERSON_OBSERVER_NAME, "PersonName")
    device = _child_value(sr, _DEVICE_OBSERVER_UID, "UID")
    try:
        measurements = tuple(_measurement(group, image_header) for group in _groups(sr))
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ReportError(f"a measurement group cannot be read: {type(exc).__name__}: {exc}") from exc
    return MeasurementReport(
        sop_uid=str(sr.SOPInstanceUID),
        study_uid=str(sr.StudyInstanceUID),
        manufacturer=str(sr.get("Manufacturer", "") or ""),
        observer=observer or None,
        device_observer_uid=device,
        measurements=measurements,
    )


def read_image_header(path: Path) -> Dataset:
    """The geometry-bearing header of a stored image (no pixels)."""
    return pydicom.dcmread(
        path, stop_before_pixels=True,
        specific_tags=["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SOPInstanceUID"],
    )
