"""Tests of the DICOM series writer and the synthetic chest-CT generator."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from scipy import ndimage

from lungscreen.models.lungs import lung_mask
from lungscreen.training.dicom_writer import HU_MAX, HU_MIN, write_ct_series
from lungscreen.training.synthetic import (
    LOCATIONS,
    NODULE_TYPES,
    NoduleSpec,
    SyntheticCT,
    insert_nodules,
    make_chest_ct,
    make_dataset,
    sample_nodule_specs,
    write_luna16_annotations,
)

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


# ============================================================================ synthetic chest CT
LIDC_CASE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lidc_idri" / "LIDC-IDRI-0001"
PLANTED = (
    NoduleSpec(10.0, "solid", "isolated"),
    NoduleSpec(10.0, "ground-glass", "isolated"),
    NoduleSpec(8.0, "solid", "juxtavascular"),
    NoduleSpec(9.0, "part-solid", "juxtapleural"),
    NoduleSpec(12.0, "solid", "juxtapleural"),
)


@pytest.fixture(scope="module")
def chest_ct() -> SyntheticCT:
    return make_chest_ct(11, nodules=PLANTED, noise_std_hu=25.0)


def _ball_mean(volume: np.ndarray, center_kji: tuple[float, float, float], spacing, radius_mm: float) -> float:
    """Mean of ``volume`` over voxels within ``radius_mm`` of ``center_kji``."""
    grids = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij", sparse=True)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center_kji, spacing))
    return float(volume[dist2 <= radius_mm**2].mean())


def test_same_seed_same_volume_different_seed_different() -> None:
    a = make_chest_ct(3)
    b = make_chest_ct(3)
    c = make_chest_ct(4)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.nodules == b.nodules
    assert a.hu.dtype == np.float32 and a.hu.shape == a.lung_mask.shape
    assert not np.array_equal(a.hu, c.hu)


def test_planted_nodules_have_expected_attenuation(chest_ct: SyntheticCT) -> None:
    assert [(n.nodule_type, n.location) for n in chest_ct.nodules] == [(s.nodule_type, s.location) for s in PLANTED]
    for nodule in chest_ct.nodules:
        mean = _ball_mean(chest_ct.hu, nodule.center_kji, chest_ct.spacing, 2.0)
        if nodule.nodule_type == "solid":
            assert mean > -100.0, nodule
        elif nodule.nodule_type == "ground-glass":
            assert -800.0 < mean < -450.0, nodule


def test_nodule_locations_match_their_class(chest_ct: SyntheticCT) -> None:
    pleura_distance = ndimage.distance_transform_edt(chest_ct.lung_mask, sampling=chest_ct.spacing)
    for nodule in chest_ct.nodules:
        k, j, i = np.rint(nodule.center_kji).astype(int)
        assert chest_ct.lung_mask[k, j, i]
        radius = nodule.diameter_mm / 2.0
        if nodule.location == "isolated":
            assert pleura_distance[k, j, i] >= radius + 4.0
        elif nodule.location == "juxtapleural":
            assert pleura_distance[k, j, i] <= radius + max(chest_ct.spacing)


def test_parenchyma_and_vessels(chest_ct: SyntheticCT) -> None:
    lung = chest_ct.hu[chest_ct.lung_mask]
    assert abs(float(np.median(lung)) + 850.0) < 60.0
    vessel_fraction = float((lung > -300.0).mean())
    assert 0.01 < vessel_fraction < 0.10
    litres = chest_ct.lung_mask.sum() * np.prod(chest_ct.spacing) / 1e6
    assert 1.0 < litres < 4.0  # a 12 cm slab of both lungs


def test_lung_mask_matches_phantom(chest_ct: SyntheticCT) -> None:
    mask = lung_mask(chest_ct.hu)
    dice = 2.0 * (mask & chest_ct.lung_mask).sum() / (mask.sum() + chest_ct.lung_mask.sum())
    assert dice > 0.9


def test_sampled_nodule_sizes_follow_luna16() -> None:
    specs = sample_nodule_specs(np.random.default_rng(0), 2000)
    diameters = np.array([s.diameter_mm for s in specs])
    assert diameters.min() >= 3.0 and diameters.max() <= 30.0
    assert 5.5 < np.median(diameters) < 7.5
    assert 0.6 < (diameters <= 10.0).mean() < 0.9
    assert {s.nodule_type for s in specs} == set(NODULE_TYPES)
    assert {s.location for s in specs} == set(LOCATIONS)
    narrow = sample_nodule_specs(np.random.default_rng(1), 200, (8.0, 12.0))
    assert all(8.0 <= s.diameter_mm <= 12.0 for s in narrow)


def test_luna16_annotations(tmp_path: Path, chest_ct: SyntheticCT) -> None:
    csv_path = tmp_path / "annotations.csv"
    write_luna16_annotations([("1.2.3", chest_ct), ("1.2.4", chest_ct)], csv_path)

    lines = csv_path.read_text().splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 2 * len(chest_ct.nodules)
    for row, nodule in zip(rows, chest_ct.nodules):
        assert row[0] == "1.2.3"
        np.testing.assert_allclose([float(v) for v in row[1:4]], nodule.center_lps_mm, atol=1e-3)
        assert float(row[4]) == pytest.approx(nodule.diameter_mm, abs=1e-3)


def test_make_dataset_geometry_round_trip(tmp_path: Path) -> None:
    cases = make_dataset(tmp_path, 1, seed=5, shape=(40, 128, 128), n_nodules=(2, 2))

    with (tmp_path / "annotations.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    (case,) = cases
    assert len(rows) == len(case.nodules) > 0
    datasets, _ = _read_series(sorted(case.series_dir.glob("*.dcm")))
    first = datasets[0]
    assert first.SeriesInstanceUID == case.seriesuid
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    step = float(datasets[1].ImagePositionPatient[2]) - origin[2]
    for row, nodule in zip(rows, case.nodules):
        assert row["seriesuid"] == case.seriesuid
        x, y, z = (float(row[key]) for key in ("coordX", "coordY", "coordZ"))
        kji = ((z - origin[2]) / step, (y - origin[1]) / row_spacing, (x - origin[0]) / col_spacing)
        np.testing.assert_allclose(kji, nodule.center_kji, atol=1e-3)


def test_insert_nodules_into_nodule_free_volume(chest_ct: SyntheticCT) -> None:
    background = make_chest_ct(21, n_nodules=0, noise_std_hu=20.0)
    assert background.nodules == ()
    specs = (NoduleSpec(9.0, "solid", "isolated"), NoduleSpec(7.0, "solid", "juxtapleural"))
    hu, planted = insert_nodules(
        background.hu,
        background.spacing,
        background.lung_mask,
        specs,
        np.random.default_rng(0),
        origin_lps=background.origin_lps,
    )
    assert len(planted) == 2 and hu.dtype == np.float32
    for nodule in planted:
        assert background.lung_mask[tuple(np.rint(nodule.center_kji).astype(int))]
        assert _ball_mean(hu, nodule.center_kji, background.spacing, 2.0) > -100.0
        assert _ball_mean(background.hu, nodule.center_kji, background.spacing, 2.0) < -500.0
    changed = np.abs(hu - background.hu) > 1e-3
    near_lung = ndimage.binary_dilation(background.lung_mask, iterations=3)  # the PSF spills over the pleura
    assert changed.any() and not changed[~near_lung].any()


@pytest.mark.skipif(not LIDC_CASE.is_dir(), reason="LIDC-IDRI-0001 not available")
def test_lung_mask_on_lidc_case() -> None:
    datasets, hu = _read_series(list(LIDC_CASE.rglob("*.dcm")))
    assert len(datasets) == 133
    spacing = (
        float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2]),
        *(float(v) for v in datasets[0].PixelSpacing),
    )
    mask = lung_mask(hu)
    litres = mask.sum() * np.prod(spacing) / 1e6
    assert 2.0 < litres < 8.0
