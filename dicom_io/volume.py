"""Volume assembly: one CT series (files on disk) into a 3D array in Hounsfield units.

Conventions (kept identical in every stage):

* ``Volume.voxels`` is float32 HU indexed ``[k, j, i]`` = ``[slice, row, column]``.
* ``Volume.affine`` maps the homogeneous index ``(k, j, i, 1)`` to patient LPS mm (PS3.3
  C.7.6.2.1.1), so ``affine @ (k, j, i, 1)`` is the centre of that voxel.
* ``Volume.spacing`` is ``(slice step, row spacing, column spacing)`` in mm, the slice
  step measured from ImagePositionPatient, never taken from SliceThickness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from dicom_io.errors import VolumeError


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


# Supported SOP classes: one frame per instance, or many frames with functional groups.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"

# Value written over padding voxels (PS3.3 C.7.5.1.1.2): air.
PADDING_HU = -1024.0

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
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
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
        VolumeError: a geometry attribute has the wrong number of values, or a
            multi-frame instance's NumberOfFrames disagrees with its functional groups.
    """
    sop_instance_uid = str(dataset.get("SOPInstanceUID", ""))
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


def read_series_volume(paths: Sequence[Path], *, min_slices: int = 10) -> Volume:
    """Assemble the CT series stored in ``paths`` into a :class:`Volume` in HU.

    Slices are ordered by the projection of ImagePositionPatient onto the slice normal,
    the cross product of the row and column direction cosines of ImageOrientationPatient
    (PS3.3 C.7.6.2.1.1); the slice step is the median distance between neighbours along
    that normal. Frames of Enhanced CT and Legacy Converted Enhanced CT instances become
    slices like single-frame images (PS3.3 C.7.6.16). Stored values equal to
    PixelPaddingValue, or within the range up to PixelPaddingRangeLimit, become air
    (PS3.3 C.7.5.1.1.2); the others are rescaled to HU with RescaleSlope and
    RescaleIntercept (PS3.3 C.11.1.1.2).

    Headers are read first, so a series that cannot form a volume is rejected before any
    pixel data is decoded; each file's pixel data is then decoded exactly once, through
    pydicom's pixel data handlers (compressed transfer syntaxes included).

    Args:
        paths: The files of one series, in any order.
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
    headers = [_read_header(path) for path in paths]
    series_uids = sorted({str(header.get("SeriesInstanceUID", "")) for header in headers})
    if len(series_uids) > 1:
        raise VolumeError(f"files from {len(series_uids)} series ({', '.join(series_uids)}); a volume is one series")
    frame_of_reference_uids = sorted({str(header.get("FrameOfReferenceUID", "")) for header in headers})
    if len(frame_of_reference_uids) > 1:
        raise VolumeError(
            f"{len(frame_of_reference_uids)} frames of reference in one series; "
            "slice positions in different coordinate systems cannot be stacked"
        )

    frames_per_file = [frame_headers(header) for header in headers]
    frames = [frame for file_frames in frames_per_file for frame in file_frames]
    if len(frames) == 1:
        raise VolumeError("a single slice is not a volume")
    if len(frames) < min_slices:
        raise VolumeError(f"only {len(frames)} slices, at least {min_slices} needed")

    row_cosines, column_cosines, (row_spacing, column_spacing), (rows, columns) = _common_geometry(frames)
    normal = np.cross(row_cosines, column_cosines)
    positions = np.array([frame.image_position for frame in frames], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    step = _check_stack(positions[order], normal, min(row_spacing, column_spacing))

    slice_of_frame = np.empty(len(frames), dtype=np.intp)
    slice_of_frame[order] = np.arange(len(frames))
    voxels = np.empty((len(frames), rows, columns), dtype=np.float32)
    first_frame = 0
    for path, header, file_frames in zip(paths, headers, frames_per_file):
        stored = _decode_pixels(path, header, len(file_frames), rows, columns)
        padding = _padding_mask(header, stored)
        for index_in_file, frame in enumerate(file_frames):
            target = voxels[slice_of_frame[first_frame + index_in_file]]
            target[...] = stored[index_in_file] * frame.rescale_slope + frame.rescale_intercept
            if padding is not None:
                target[padding[index_in_file]] = PADDING_HU
        first_frame += len(file_frames)

    affine = np.eye(4)
    affine[:3, 0] = normal * step
    affine[:3, 1] = column_cosines * row_spacing
    affine[:3, 2] = row_cosines * column_spacing
    affine[:3, 3] = positions[order[0]]
    first = headers[0]
    return Volume(
        voxels=voxels,
        affine=affine,
        spacing=(step, row_spacing, column_spacing),
        frame_of_reference_uid=frame_of_reference_uids[0],
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_uids[0],
        slices=tuple(
            SliceRef(frames[index].sop_class_uid, frames[index].sop_instance_uid, frames[index].frame_number)
            for index in order
        ),
    )
