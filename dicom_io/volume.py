"""Volume assembly: one CT series (files on disk) into a 3D array in Hounsfield units.

Conventions (kept identical in every stage):

* ``Volume.voxels`` is float32 HU indexed ``[k, j, i]`` = ``[slice, row, column]``.
* ``Volume.affine`` maps the homogeneous index ``(k, j, i, 1)`` to patient LPS mm (PS3.3
  C.7.6.2.1.1), so ``affine @ (k, j, i, 1)`` is the centre of that voxel.
* ``Volume.spacing`` is ``(slice step, row spacing, column spacing)`` in mm, the slice
  step measured from ImagePositionPatient, never taken from SliceThickness.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
)

from lungscreen.errors import VolumeError


# A chest CT of 2,000 slices of 1024 x 1024 is 2.1e9 voxels (8 GB as float32); anything
# declared larger is refused before memory is allocated for it.
MAX_VOXELS = 2_200_000_000
# Beyond any CT: reconstruction fields of view reach about 80 cm (extended FOV), table travel
# about 2 m. A larger extent is a wrong PixelSpacing or position (e.g. "7" for "0.7"), and
# resampling it to the model's grid would take far more memory than the images.
MAX_FIELD_OF_VIEW_MM = 1000.0
MAX_SCAN_LENGTH_MM = 3000.0


@dataclass(frozen=True)
class SliceRef:
    """The image a slice of the volume came from (what an SR region references)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # set for frames of a multi-frame (Enhanced CT) instance


@dataclass(frozen=True)
class Volume:
    voxels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    slices: tuple[SliceRef, ...]

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be 3D, got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if len(self.slices) != self.voxels.shape[0]:
            raise ValueError(f"{len(self.slices)} slice references for {self.voxels.shape[0]} slices")

    def index_to_lps(self, kji: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Patient LPS mm of (fractional) voxel indices ``(..., 3)`` in ``k, j, i`` order."""
        kji = np.asarray(kji, dtype=np.float64)
        return kji @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, lps: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Fractional ``k, j, i`` indices of patient LPS points ``(..., 3)``."""
        lps = np.asarray(lps, dtype=np.float64)
        return (lps - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


# CT image SOP classes: one frame per instance, or many frames with functional groups.
CT_SOP_CLASSES = frozenset({CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})

_PADDING_HU = -1024.0  # written over pixel padding (PS3.3 C.7.5.1.1.2): air
_FLOAT32_MAX = float(np.finfo(np.float32).max)

_ORIENTATION_TOLERANCE = 1e-3  # on the direction cosines of ImageOrientationPatient
_PIXEL_SPACING_TOLERANCE_MM = 1e-3
_DUPLICATE_TOLERANCE_MM = 1e-2
_GAP_TOLERANCE = 0.10  # relative deviation of a gap from the median step
_MAX_LISTED_GAPS = 5


@dataclass(frozen=True)
class FrameHeader:
    """Per-frame attributes of a CT image, resolved from a single- or multi-frame header.

    For CT Image Storage the attributes come from the top level of the dataset; for
    Enhanced CT and Legacy Converted Enhanced CT from the Per-frame Functional Groups,
    falling back to the Shared Functional Groups (PS3.3 C.7.6.16). Geometry attributes
    are ``None`` when absent, so callers can say which one is missing.
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based, only for multi-frame instances
    image_position: tuple[float, ...] | None  # 3 values, LPS mm
    image_orientation: tuple[float, ...] | None  # 6 values: row cosines, column cosines
    pixel_spacing: tuple[float, ...] | None  # 2 values: between rows, between columns (mm)
    rows: int | None
    columns: int | None
    rescale_slope: float
    rescale_intercept: float
    gantry_tilt_deg: float | None

    @property
    def label(self) -> str:
        """``SOP instance <uid>`` plus the frame number where there is one (no patient data)."""
        frame = f" frame {self.frame_number}" if self.frame_number is not None else ""
        return f"SOP instance {self.sop_instance_uid}{frame}"


def frame_headers(dataset: pydicom.Dataset) -> tuple[FrameHeader, ...]:
    """One :class:`FrameHeader` per frame of ``dataset`` (a header read without pixels).

    Raises:
        VolumeError: a geometry attribute has the wrong number of values or cannot be
            parsed, or a multi-frame instance's NumberOfFrames disagrees with its
            functional groups.
    """
    try:
        return _frame_headers(dataset)
    except VolumeError:
        raise
    except Exception as exc:  # pydicom parses values on first access: a corrupt element fails here
        raise VolumeError(f"a DICOM header cannot be parsed: {type(exc).__name__}: {str(exc)[:120]}") from exc


def _attribute_text(dataset: pydicom.Dataset, keyword: str) -> str:
    """An attribute's value as text, ``""`` when absent; a value pydicom cannot parse (it
    parses on first access: a corrupt VR, a truncated value) is a :class:`VolumeError`."""
    try:
        return str(dataset.get(keyword, ""))
    except Exception as exc:
        raise VolumeError(f"{keyword} cannot be parsed: {type(exc).__name__}: {str(exc)[:120]}") from exc


def _frame_headers(dataset: pydicom.Dataset) -> tuple[FrameHeader, ...]:
    sop_instance_uid = str(dataset.get("SOPInstanceUID", ""))
    if not sop_instance_uid:
        raise VolumeError("an instance has no SOPInstanceUID: a report could not refer to its slices")
    if "PerFrameFunctionalGroupsSequence" not in dataset:
        return (_single_frame_header(dataset, sop_instance_uid),)
    per_frame = dataset.PerFrameFunctionalGroupsSequence
    number_of_frames = int(dataset.get("NumberOfFrames", len(per_frame)))
    if number_of_frames != len(per_frame):
        raise VolumeError(
            f"SOP instance {sop_instance_uid}: NumberOfFrames is {number_of_frames} but "
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items"
        )
    shared = dataset.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else pydicom.Dataset()
    return tuple(
        _multi_frame_header(dataset, shared_item, per_frame[index], index + 1, sop_instance_uid)
        for index in range(number_of_frames)
    )


@dataclass(frozen=True)
class StackGeometry:
    """The validated geometry of a regular stack of slices (PS3.3 C.7.6.2.1.1).

    ``order`` lists the frame indices sorted along ``normal``, the cross product of the
    row and column direction cosines; ``step`` is the median distance between neighbours.
    """

    order: tuple[int, ...]
    row_cosines: np.ndarray  # direction of increasing column index i
    column_cosines: np.ndarray  # direction of increasing row index j
    normal: np.ndarray
    step: float
    pixel_spacing: tuple[float, float]  # between rows (along column_cosines), between columns
    image_size: tuple[int, int]  # rows, columns
    origin: np.ndarray  # ImagePositionPatient of the first slice

    @property
    def affine(self) -> np.ndarray:
        """Homogeneous ``(k, j, i, 1)`` index to LPS mm, as in :class:`Volume`."""
        affine = np.eye(4)
        affine[:3, 0] = self.normal * self.step
        affine[:3, 1] = self.column_cosines * self.pixel_spacing[0]
        affine[:3, 2] = self.row_cosines * self.pixel_spacing[1]
        affine[:3, 3] = self.origin
        return affine


def stack_geometry(frames: Sequence[FrameHeader]) -> StackGeometry:
    """Check that ``frames`` form one regular, untilted stack and describe it.

    Every frame needs the Image Plane attributes (PS3.3 C.7.6.2) and all must share one
    orientation, pixel spacing and image size; there is no gantry tilt, neither recorded
    (GantryDetectorTilt) nor visible as slice positions drifting within the image plane;
    no two slices share a location; every gap is within 10% of the median step; the stack
    is no wider than ``MAX_FIELD_OF_VIEW_MM`` and no longer than ``MAX_SCAN_LENGTH_MM``.

    Raises:
        VolumeError: with the reason the frames do not form such a stack.
    """
    if len(frames) < 2:
        raise VolumeError("a single slice is not a volume" if frames else "no slices")
    row_cosines, column_cosines, pixel_spacing, image_size = _common_geometry(frames)
    normal = np.cross(row_cosines, column_cosines)
    normal /= np.linalg.norm(normal)
    positions = np.array([frame.image_position for frame in frames], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    step = _check_stack(positions[order], normal, min(pixel_spacing))
    _check_extent(image_size, pixel_spacing, step * (len(frames) - 1))
    return StackGeometry(
        order=tuple(int(index) for index in order),
        row_cosines=row_cosines,
        column_cosines=column_cosines,
        normal=normal,
        step=step,
        pixel_spacing=pixel_spacing,
        image_size=image_size,
        origin=positions[order[0]],
    )


def read_series_volume(
    paths: Sequence[Path],
    *,
    headers: Sequence[pydicom.Dataset] | None = None,
    frames: Sequence[Sequence[FrameHeader]] | None = None,
    geometry: StackGeometry | None = None,
    min_slices: int = 10,
) -> Volume:
    """Assemble the CT series stored in ``paths`` into a :class:`Volume` in HU.

    Slices are ordered by the projection of ImagePositionPatient onto the slice normal,
    the cross product of the row and column direction cosines of ImageOrientationPatient
    (PS3.3 C.7.6.2.1.1); the slice step is the median distance between neighbours along
    that normal. Frames of Enhanced CT and Legacy Converted Enhanced CT instances become
    slices like single-frame images (PS3.3 C.7.6.16). Stored values equal to
    PixelPaddingValue, or within the range up to PixelPaddingRangeLimit, become air
    (PS3.3 C.7.5.1.1.2); the others are rescaled to HU with RescaleSlope and
    RescaleIntercept (PS3.3 C.11.1; per frame for multi-frame instances, C.7.6.16.2.9).

    Headers are read first, so a series that cannot form a volume is rejected before any
    pixel data is decoded; each file's pixel data is then decoded exactly once, through
    pydicom's pixel data handlers (compressed transfer syntaxes included).

    Args:
        paths: The files of one series, in any order.
        headers: Their headers, when already read (``dicom_io.study.index_study``), in
            the same order; read here otherwise.
        frames: The :func:`frame_headers` of each of ``headers``, when already built
            (``dicom_io.study.SeriesCandidate.frames``); built here otherwise.
        geometry: The :func:`stack_geometry` of ``frames`` (all frames, in file order), when
            already validated (``dicom_io.study.SeriesCandidate.geometry``); validated here
            otherwise. Geometry is checked in one place, :func:`stack_geometry`, once per series.
        min_slices: The fewest slices accepted.

    Raises:
        VolumeError: the files cannot form one regular, untilted stack of slices, or their
            pixel data is missing or cannot be decoded; the message says why.
    """
    if min_slices < 2:
        raise ValueError(f"min_slices must be at least 2, got {min_slices}")
    paths = [Path(path) for path in paths]
    if not paths:
        raise VolumeError("no files given: a volume needs at least one series of CT images")
    if frames is not None and (headers is None or len(frames) != len(headers)):
        raise ValueError("frames come with their headers, one tuple of frames per header")
    if geometry is not None and frames is None:
        raise ValueError("a validated geometry comes with the frames it was validated on")
    if headers is None:
        headers = [_read_header(path) for path in paths]
    elif len(headers) != len(paths):
        raise ValueError(f"{len(headers)} headers for {len(paths)} files")
    series_uids = sorted({_attribute_text(header, "SeriesInstanceUID") for header in headers})
    if len(series_uids) > 1:
        raise VolumeError(f"files from {len(series_uids)} series ({', '.join(series_uids)}); a volume is one series")
    frame_of_reference_uids = sorted({_attribute_text(header, "FrameOfReferenceUID") for header in headers})
    if len(frame_of_reference_uids) > 1:
        raise VolumeError(
            f"{len(frame_of_reference_uids)} frames of reference in one series; "
            "slice positions in different coordinate systems cannot be stacked"
        )

    frames_per_file = [frame_headers(header) for header in headers] if frames is None else list(frames)
    frames = [frame for file_frames in frames_per_file for frame in file_frames]
    not_ct = sorted({frame.sop_class_uid for frame in frames} - CT_SOP_CLASSES)
    if not_ct:
        raise VolumeError(f"not a CT image series (SOP class {', '.join(not_ct)})")
    if 1 < len(frames) < min_slices:  # a single slice gets its own reason from stack_geometry
        raise VolumeError(f"only {len(frames)} slices, at least {min_slices} needed")
    if geometry is None:
        geometry = stack_geometry(frames)
    elif len(geometry.order) != len(frames):
        raise ValueError(f"a geometry of {len(geometry.order)} slices given for {len(frames)} frames")

    rows, columns = geometry.image_size
    if len(frames) * rows * columns > MAX_VOXELS:
        raise VolumeError(
            f"declared size {len(frames)} x {rows} x {columns} voxels exceeds the limit of {MAX_VOXELS:.2g} voxels"
        )
    for frame in frames:
        # HU are float32: the largest a 16-bit stored value can become must stay finite there.
        largest = abs(frame.rescale_slope) * 2.0**16 + abs(frame.rescale_intercept)
        if not largest <= _FLOAT32_MAX:  # also NaN
            raise VolumeError(
                f"SOP instance {frame.sop_instance_uid}: rescale slope/intercept "
                f"{frame.rescale_slope}/{frame.rescale_intercept} do not give finite single-precision values"
            )
    slice_of_frame = np.empty(len(frames), dtype=np.intp)
    slice_of_frame[list(geometry.order)] = np.arange(len(frames))
    first_frame_of_file = np.cumsum([0] + [len(file_frames) for file_frames in frames_per_file])
    voxels = np.empty((len(frames), rows, columns), dtype=np.float32)

    def fill(files: range) -> None:
        for file in files:
            file_frames = frames_per_file[file]
            stored = _decode_pixels(paths[file], headers[file], len(file_frames), rows, columns)
            padding = _padding_mask(headers[file], stored)
            for index_in_file, frame in enumerate(file_frames):
                target = voxels[slice_of_frame[first_frame_of_file[file] + index_in_file]]
                # In float32 and in place: a float64 temporary per slice costs more than the decode.
                intercept = np.float32(frame.rescale_intercept)
                if frame.rescale_slope == 1:  # the usual CT case: one pass instead of two
                    np.add(stored[index_in_file], intercept, out=target, casting="unsafe")
                else:
                    np.multiply(stored[index_in_file], np.float32(frame.rescale_slope), out=target, casting="unsafe")
                    target += intercept
                if padding is not None:
                    target[padding[index_in_file]] = _PADDING_HU

    # File reads and numpy release the GIL: one contiguous run of files per core.
    workers = min(len(os.sched_getaffinity(0)), len(paths))
    bounds = np.linspace(0, len(paths), workers + 1).astype(int)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, [range(a, b) for a, b in zip(bounds, bounds[1:])]))  # list(): re-raises errors

    first = headers[0]
    return Volume(
        voxels=voxels,
        affine=geometry.affine,
        spacing=(geometry.step, *geometry.pixel_spacing),
        frame_of_reference_uid=frame_of_reference_uids[0],
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_uids[0],
        slices=tuple(
            SliceRef(frames[index].sop_class_uid, frames[index].sop_instance_uid, frames[index].frame_number)
            for index in geometry.order
        ),
    )


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many exception types for files it cannot parse
        raise VolumeError(f"cannot read the DICOM header of file {path.name}: {type(exc).__name__}: {exc}") from exc


def _floats(item: pydicom.Dataset, keyword: str, count: int, owner: str) -> tuple[float, ...] | None:
    """The ``count`` numbers of a DS attribute, or ``None`` when it is absent or empty."""
    value = item.get(keyword)
    if value is None or value == "":
        return None
    values = tuple(_number(v, float, keyword, owner) for v in (value if isinstance(value, MultiValue) else [value]))
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise VolumeError(f"{owner}: {keyword} must hold {count} finite numbers, got {len(values)} value(s)")
    return values


def _float_or(item: pydicom.Dataset, keyword: str, default: float, owner: str) -> float:
    value = _optional_float(item, keyword, owner)
    return default if value is None else value


def _optional_float(item: pydicom.Dataset, keyword: str, owner: str) -> float | None:
    value = item.get(keyword)
    return None if value is None or value == "" else _number(value, float, keyword, owner)


def _optional_int(item: pydicom.Dataset, keyword: str, owner: str) -> int | None:
    value = item.get(keyword)
    return None if value is None or value == "" else _number(value, int, keyword, owner)


def _number(value: object, kind: type, keyword: str, owner: str):
    """``kind(value)``, or a :class:`VolumeError` naming the attribute (a DS/IS holding text)."""
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise VolumeError(f"{owner}: {keyword} is not a number: {str(value)[:32]!r}") from None


def _single_frame_header(dataset: pydicom.Dataset, sop_instance_uid: str) -> FrameHeader:
    owner = f"SOP instance {sop_instance_uid}"
    return FrameHeader(
        sop_class_uid=str(dataset.get("SOPClassUID", "")),
        sop_instance_uid=sop_instance_uid,
        frame_number=None,
        image_position=_floats(dataset, "ImagePositionPatient", 3, owner),
        image_orientation=_floats(dataset, "ImageOrientationPatient", 6, owner),
        pixel_spacing=_floats(dataset, "PixelSpacing", 2, owner),
        rows=_optional_int(dataset, "Rows", owner),
        columns=_optional_int(dataset, "Columns", owner),
        rescale_slope=_float_or(dataset, "RescaleSlope", 1.0, owner),
        rescale_intercept=_float_or(dataset, "RescaleIntercept", 0.0, owner),
        gantry_tilt_deg=_optional_float(dataset, "GantryDetectorTilt", owner),
    )


def _multi_frame_header(
    dataset: pydicom.Dataset,
    shared: pydicom.Dataset,
    per_frame: pydicom.Dataset,
    frame_number: int,
    sop_instance_uid: str,
) -> FrameHeader:
    """Attributes of one frame; a functional group macro may sit in either the per-frame
    or the shared functional groups, the per-frame item taking precedence (PS3.3 C.7.6.16)."""

    def macro(sequence_keyword: str) -> pydicom.Dataset:
        for groups in (per_frame, shared):
            sequence = groups.get(sequence_keyword)
            if sequence:
                return sequence[0]
        return pydicom.Dataset()

    owner = f"SOP instance {sop_instance_uid} frame {frame_number}"
    measures = macro("PixelMeasuresSequence")
    transformation = macro("PixelValueTransformationSequence")
    # Enhanced CT keeps the tilt in the CT Acquisition Details macro (PS3.3 C.8.15.3);
    # Legacy Converted Enhanced CT keeps it among the unassigned converted attributes.
    tilt_sources = (
        macro("CTAcquisitionDetailsSequence"),
        macro("UnassignedPerFrameConvertedAttributesSequence"),
        macro("UnassignedSharedConvertedAttributesSequence"),
        dataset,
    )
    return FrameHeader(
        sop_class_uid=str(dataset.get("SOPClassUID", "")),
        sop_instance_uid=sop_instance_uid,
        frame_number=frame_number,
        image_position=_floats(macro("PlanePositionSequence"), "ImagePositionPatient", 3, owner),
        image_orientation=_floats(macro("PlaneOrientationSequence"), "ImageOrientationPatient", 6, owner),
        pixel_spacing=_floats(measures, "PixelSpacing", 2, owner),
        rows=_optional_int(dataset, "Rows", owner),
        columns=_optional_int(dataset, "Columns", owner),
        rescale_slope=_float_or(transformation, "RescaleSlope", 1.0, owner),
        rescale_intercept=_float_or(transformation, "RescaleIntercept", 0.0, owner),
        gantry_tilt_deg=next(
            (tilt for source in tilt_sources if (tilt := _optional_float(source, "GantryDetectorTilt", owner)) is not None),
            None,
        ),
    )


def _common_geometry(
    frames: Sequence[FrameHeader],
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """Row cosines, column cosines, pixel spacing and image size shared by all frames."""
    for frame in frames:
        for keyword, value in (
            ("ImagePositionPatient", frame.image_position),
            ("ImageOrientationPatient", frame.image_orientation),
            ("PixelSpacing", frame.pixel_spacing),
            ("Rows", frame.rows),
            ("Columns", frame.columns),
        ):
            if value is None:
                raise VolumeError(f"{frame.label} has no {keyword}")
        if frame.gantry_tilt_deg is not None and abs(frame.gantry_tilt_deg) > 1e-3:
            raise VolumeError(
                f"gantry tilt of {frame.gantry_tilt_deg:g}° (GantryDetectorTilt of {frame.label}); "
                "resampling a tilted stack is out of scope"
            )

    orientations = np.array([frame.image_orientation for frame in frames], dtype=np.float64)
    orientation_spread = float(np.abs(orientations - orientations[0]).max())
    if orientation_spread > _ORIENTATION_TOLERANCE:
        raise VolumeError(
            f"mixed orientations: ImageOrientationPatient differs between slices by up to "
            f"{orientation_spread:.4f} (tolerance {_ORIENTATION_TOLERANCE:g})"
        )
    sizes = sorted({(frame.rows, frame.columns) for frame in frames})
    if len(sizes) > 1:
        listed = ", ".join(f"{rows}x{columns}" for rows, columns in sizes)
        raise VolumeError(f"mixed image sizes (rows x columns): {listed}")
    spacings = np.array([frame.pixel_spacing for frame in frames], dtype=np.float64)
    if float(np.abs(spacings - spacings[0]).max()) > _PIXEL_SPACING_TOLERANCE_MM:
        listed = ", ".join(f"{row:g}/{column:g}" for row, column in np.unique(spacings, axis=0))
        raise VolumeError(f"mixed pixel spacing (row/column mm): {listed}")
    if (spacings[0] <= 0).any():
        raise VolumeError(f"PixelSpacing must be positive, got {spacings[0].tolist()}")

    row_cosines, column_cosines = orientations[0, :3], orientations[0, 3:]
    if (
        abs(np.linalg.norm(row_cosines) - 1) > 1e-2
        or abs(np.linalg.norm(column_cosines) - 1) > 1e-2
        or abs(float(row_cosines @ column_cosines)) > 1e-2
    ):
        raise VolumeError(
            f"ImageOrientationPatient {orientations[0].tolist()} is not a pair of orthogonal unit vectors"
        )
    (rows, columns), = sizes
    return (
        row_cosines / np.linalg.norm(row_cosines),
        column_cosines / np.linalg.norm(column_cosines),
        (float(spacings[0, 0]), float(spacings[0, 1])),
        (int(rows), int(columns)),
    )


def _check_extent(image_size: tuple[int, int], pixel_spacing: tuple[float, float], length_mm: float) -> None:
    """Refuse a stack larger than any CT scanner images (``MAX_FIELD_OF_VIEW_MM``, ``MAX_SCAN_LENGTH_MM``)."""
    height, width = image_size[0] * pixel_spacing[0], image_size[1] * pixel_spacing[1]
    if max(height, width) > MAX_FIELD_OF_VIEW_MM:
        raise VolumeError(
            f"field of view {width:.0f} x {height:.0f} mm ({image_size[1]} x {image_size[0]} pixels, PixelSpacing "
            f"{pixel_spacing[0]:g}/{pixel_spacing[1]:g} mm) is wider than any CT reconstructs "
            f"(at most {MAX_FIELD_OF_VIEW_MM:.0f} mm): PixelSpacing, Rows or Columns is wrong"
        )
    if length_mm > MAX_SCAN_LENGTH_MM:
        raise VolumeError(
            f"the slices span {length_mm:.0f} mm, longer than any CT scan (at most {MAX_SCAN_LENGTH_MM:.0f} mm): "
            "ImagePositionPatient is wrong"
        )


def _check_stack(sorted_positions: np.ndarray, normal: np.ndarray, smallest_pixel_mm: float) -> float:
    """Check slice positions sorted along ``normal``; return the median slice step in mm."""
    along = sorted_positions @ normal
    gaps = np.diff(along)
    duplicates = np.flatnonzero(gaps < _DUPLICATE_TOLERANCE_MM)
    if duplicates.size:
        raise VolumeError(
            f"duplicate slice positions: {duplicates.size} slice(s) share the location of another "
            f"(first at {along[duplicates[0]]:.2f} mm along the slice normal); the series holds "
            "repeated or overlapping images"
        )

    offsets = sorted_positions - sorted_positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    worst = int(np.argmax(in_plane))
    # Half a pixel: beyond that a straight stack misplaces voxels by more than their size.
    if in_plane[worst] > smallest_pixel_mm / 2:
        distance = along[worst] - along[0]
        angle = math.degrees(math.atan2(in_plane[worst], distance))
        raise VolumeError(
            f"gantry tilt: slice positions drift {in_plane[worst]:.2f} mm within the image plane over "
            f"{distance:.2f} mm along the slice normal (about {angle:.1f}°); resampling a tilted stack "
            "is out of scope"
        )

    step = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - step) > _GAP_TOLERANCE * step)
    if uneven.size:
        listed = "; ".join(_describe_gap(along[i], along[i + 1], step) for i in uneven[:_MAX_LISTED_GAPS])
        if uneven.size > _MAX_LISTED_GAPS:
            listed += f"; and {uneven.size - _MAX_LISTED_GAPS} more"
        raise VolumeError(
            f"missing slices or uneven spacing: {uneven.size} of {gaps.size} gaps deviate from the "
            f"median step {step:.2f} mm by more than {_GAP_TOLERANCE:.0%} ({listed}; positions in mm "
            "along the slice normal)"
        )
    return step


def _describe_gap(start: float, end: float, step: float) -> str:
    ratio = (end - start) / step
    missing = round(ratio) - 1
    hint = f", about {missing} slice(s) missing" if missing >= 1 and abs(ratio - round(ratio)) <= _GAP_TOLERANCE else ""
    return f"gap of {end - start:.2f} mm between {start:.2f} and {end:.2f}{hint}"


def _decode_pixels(path: Path, header: pydicom.Dataset, frame_count: int, rows: int, columns: int) -> np.ndarray:
    """Stored values of every frame of one file, shape ``(frames, rows, columns)``."""
    native = _read_native_pixels(path, header, frame_count, rows, columns)
    if native is not None:
        return native
    owner = f"SOP instance {header.get('SOPInstanceUID', '')}"
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many exception types for files it cannot parse
        raise VolumeError(f"{owner}: cannot read the file: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in dataset:
        raise VolumeError(f"{owner} has no pixel data (PixelData is missing)")
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # decoders (GDCM, OpenJPEG, CharLS, RLE) each raise their own types
        transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
        syntax_name = transfer_syntax.name if transfer_syntax else "unknown transfer syntax"
        raise VolumeError(
            f"{owner}: pixel data cannot be decoded ({syntax_name}): {type(exc).__name__}: {exc}"
        ) from exc
    if frame_count == 1 and pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape != (frame_count, rows, columns):
        raise VolumeError(
            f"{owner}: decoded pixel data has shape {pixels.shape}, expected {(frame_count, rows, columns)} "
            "(one sample per pixel)"
        )
    return pixels


# The uncompressed little-endian syntaxes, where Pixel Data is the frames' stored values as
# they are in memory (PS3.5 8.1.1, A.1, A.2).
_NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _read_native_pixels(
    path: Path, header: pydicom.Dataset, frame_count: int, rows: int, columns: int
) -> np.ndarray | None:
    """The common case read straight from the file: uncompressed 16-bit single-sample pixels,
    Pixel Data the last element. ``None`` for anything else (pydicom's decoders take it).

    Reading the values at their offset instead of parsing the file again cuts the cost of
    building a volume to a quarter (benchmarks/README.md). Unused high bits are masked as
    pydicom does (PS3.5 8.1.1: their content cannot be assumed).
    """
    try:
        file_meta = header.file_meta
        syntax = file_meta.get("TransferSyntaxUID")
        bits_allocated, samples = header.get("BitsAllocated"), header.get("SamplesPerPixel", 1)
        bits_stored, signed = header.get("BitsStored", 16), header.get("PixelRepresentation", 0) == 1
    except Exception:  # no file meta, or an element pydicom cannot parse: its own path says why
        return None
    if syntax not in _NATIVE_SYNTAXES or bits_allocated != 16 or samples != 1:
        return None
    if not isinstance(bits_stored, int) or not 1 <= bits_stored <= 16:
        return None
    length = frame_count * rows * columns * 2
    explicit = syntax == ExplicitVRLittleEndian
    element_header = _PIXEL_DATA_TAG + (b"OW\0\0" if explicit else b"") + length.to_bytes(4, "little")
    try:
        with open(path, "rb") as f:
            offset = f.seek(0, 2) - length
            if offset < len(element_header):
                return None
            f.seek(offset - len(element_header))
            if f.read(len(element_header)) != element_header:
                return None  # Pixel Data is not the last element, or has another length or VR
            dtype = np.dtype("<i2" if signed else "<u2")
            stored = np.fromfile(f, dtype=dtype, count=frame_count * rows * columns)
    except OSError:
        return None  # pydicom's path reports it with the reason
    if stored.size != frame_count * rows * columns:
        return None
    unused = 16 - bits_stored
    if unused:  # shift left then right: sign-extends signed values, clears unsigned ones
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)
    return stored.reshape(frame_count, rows, columns)


def _padding_mask(header: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Where ``stored`` holds pixel padding (PS3.3 C.7.5.1.1.2), or ``None`` without padding.

    Padding is compared on stored values, before the rescale; with PixelPaddingRangeLimit
    every value between it and PixelPaddingValue (inclusive) is padding.
    """
    owner = f"SOP instance {header.get('SOPInstanceUID', '')}"
    value = _optional_int(header, "PixelPaddingValue", owner)
    if value is None:
        return None
    signed = header.get("PixelRepresentation", 0) == 1
    low = _as_stored_value(value, signed)
    limit = _optional_int(header, "PixelPaddingRangeLimit", owner)
    if limit is None:
        return stored == low
    low, high = sorted((low, _as_stored_value(limit, signed)))
    return (stored >= low) & (stored <= high)


def _as_stored_value(value: int, signed: bool) -> int:
    # The padding attributes are US or SS (16 bits); a file may carry a signed value under
    # VR US (LIDC writes -2000 as 63536), so reinterpret it for signed pixel data.
    return value - 0x10000 if signed and value > 0x7FFF else value
