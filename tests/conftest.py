"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

# Real, licensed data lives next to the repository in ../shared/data (see SOURCES.md there);
# it is never copied into the repository. Tests that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (read only)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is missing (see shared/data/SOURCES.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lidc_series_dir(shared_data: Path) -> Path:
    """The folder of the 133 CT slices of LIDC-IDRI-0001 (GE, 2.5 mm)."""
    first = next((shared_data / "lidc_idri" / "LIDC-IDRI-0001").rglob("*.dcm"), None)
    if first is None:
        pytest.skip(f"LIDC-IDRI-0001 DICOM files not found under {shared_data / 'lidc_idri'}")
    return first.parent


@pytest.fixture(scope="session")
def lidc_headers(lidc_series_dir: Path) -> tuple[pydicom.Dataset, ...]:
    """Headers of the 133 LIDC-IDRI-0001 slices (no pixels), sorted by ImagePositionPatient z."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(lidc_series_dir.glob("*.dcm"))]
    return tuple(sorted(headers, key=lambda header: float(header.ImagePositionPatient[2])))


@pytest.fixture(scope="session")
def lidc_volume(lidc_headers):
    """A :class:`dicom_io.volume.Volume` with the real geometry of LIDC-IDRI-0001 and 1x1 dummy slices.

    Only the geometry and slice references are real: stages that must not read voxels
    (the SR) can use it without loading 70 MB of pixels.
    """
    from lungscreen.dicom_io.volume import SliceRef, Volume

    first = lidc_headers[0]
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    row_cosines = np.array(
        [float(v) for v in first.ImageOrientationPatient[:3]]
    )  # direction of increasing column i
    column_cosines = np.array(
        [float(v) for v in first.ImageOrientationPatient[3:]]
    )  # direction of increasing row j
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    positions = np.array([[float(v) for v in header.ImagePositionPatient] for header in lidc_headers])
    step = float(np.median(np.diff(positions[:, 2])))
    slice_direction = (positions[-1] - positions[0]) / np.linalg.norm(positions[-1] - positions[0])
    affine = np.eye(4)
    affine[:3, 0] = slice_direction * step
    affine[:3, 1] = column_cosines * row_spacing
    affine[:3, 2] = row_cosines * column_spacing
    affine[:3, 3] = origin
    return Volume(
        voxels=np.zeros((len(lidc_headers), 1, 1), dtype=np.float32),
        affine=affine,
        spacing=(step, row_spacing, column_spacing),
        frame_of_reference_uid=first.FrameOfReferenceUID,
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        slices=tuple(SliceRef(header.SOPClassUID, header.SOPInstanceUID) for header in lidc_headers),
    )
