"""Tests of the DICOM series writer and the synthetic chest-CT generator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from training.dicom_writer import HU_MAX, HU_MIN, write_ct_series

SPACING = (2.5, 0.7, 0.8)
ORIGIN = (-12.5, -30.0, -100.0)


def _random_hu(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """HU values spanning (and exceeding) the representable range, to exercise clipping."""
    return np.random.default_rng(seed).uniform(-1500.0, 3500.0, shape).astype(np.float32)


def _read_series(paths: list[Path]) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Read a series, sort by IPP z and return the datasets and the rescaled HU volume."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    return datasets, hu


def test_write_ct_series_round_trip(tmp_path: Path) -> None:
    hu = _random_hu((4, 24, 20))
    written = write_ct_series(hu, SPACING, tmp_path, origin_lps=ORIGIN, reverse_instance_numbers=True)

    assert [p.name for p in written.paths] == [f"slice_{k:04d}.dcm" for k in range(4)]
    datasets, read_hu = _read_series(list(tmp_path.glob("*.dcm")))
    np.testing.assert_allclose(read_hu, np.clip(hu, HU_MIN, HU_MAX), atol=1.0)
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], np.add(ORIGIN, (0.0, 0.0, k * SPACING[0])), atol=1e-4
        )
        assert ds.InstanceNumber == 4 - k
        assert ds.SeriesInstanceUID == written.series_instance_uid
        assert ds.StudyInstanceUID == written.study_instance_uid
        assert ds.FrameOfReferenceUID == written.frame_of_reference_uid
        assert ds.Modality == "CT"
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]
        assert float(ds.SliceThickness) == 2.5
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_written_file_passes_dciodvfy(tmp_path: Path) -> None:
    written = write_ct_series(_random_hu((2, 16, 16)), SPACING, tmp_path)
    result = subprocess.run(["dciodvfy", str(written.paths[0])], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_are_lossless(tmp_path: Path, transfer_syntax: str) -> None:
    hu = _random_hu((2, 32, 40), seed=1)
    write_ct_series(hu, SPACING, tmp_path, origin_lps=ORIGIN, transfer_syntax_uid=transfer_syntax)

    datasets, read_hu = _read_series(list(tmp_path.glob("*.dcm")))
    assert all(ds.file_meta.TransferSyntaxUID == transfer_syntax for ds in datasets)
    np.testing.assert_array_equal(read_hu, np.clip(np.rint(hu), HU_MIN, HU_MAX))
