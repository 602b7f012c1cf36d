"""The pixel check that a CT shows lungs (models/lung_presence.py), on the real chest CTs of
../shared/data, a real chest series cropped to the slices below its lungs, and synthetic
non-chest volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungscreen.dicom_io.volume import read_series_volume
from lungscreen.models.lung_presence import MIN_LUNG_ML, lung_presence
from lungscreen.training.readers import read_nifti, read_nrrd


@pytest.fixture(scope="module")
def lidc(lidc_series_dir: Path):
    return read_series_volume(sorted(lidc_series_dir.glob("*.dcm")))


def _real_scans(shared_data: Path):
    """(name, HU [k, j, i], spacing) of every real chest CT in ../shared/data."""
    for name in ("ct_series2_5mm", "ct_series3_5mm"):
        volume = read_series_volume(sorted((shared_data / "lung_pet_ct_dx" / "Lung_Dx-A0001" / name).glob("*.dcm")))
        yield f"Lung_Dx-A0001 {name}", volume.voxels, volume.spacing
    voxels, affine = read_nrrd(shared_data / "pyradiomics_lung" / "lung1_image.nrrd")
    yield "pyradiomics lung1", voxels, tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    scan = read_nifti(shared_data / "totalsegmentator" / "example_ct_chest_cta_1.5mm.nii.gz")
    yield "TotalSegmentator contrast chest CT", scan.voxels, scan.spacing


def test_every_real_chest_ct_shows_lungs(lidc, shared_data: Path) -> None:
    presence = lung_presence(lidc.voxels, lidc.spacing)
    assert presence.present and presence.lung_ml > 2500, presence
    for name, voxels, spacing in _real_scans(shared_data):
        presence = lung_presence(voxels, spacing)
        assert presence.judged and presence.present and presence.lung_ml > 2000, (name, presence)


def test_the_upper_chest_alone_still_shows_lungs(lidc) -> None:
    top = lidc.voxels[-33:]  # 82 mm below the apices
    assert lung_presence(top, lidc.spacing).lung_ml > 2 * MIN_LUNG_ML


def test_the_slices_below_the_lungs_show_none(lidc) -> None:
    abdomen = lung_presence(lidc.voxels[:24], lidc.spacing)  # 60 mm of upper abdomen, with bowel gas
    assert abdomen.judged and not abdomen.present and abdomen.lung_ml < 10
    assert abdomen.describe().startswith("no lungs in the field of view: 1 ml of lung-density tissue")


def _ellipse(shape: tuple[int, int], pixel_mm: float, half_axes_mm: tuple[float, float]) -> np.ndarray:
    j, i = np.ogrid[: shape[0], : shape[1]]
    return ((j - shape[0] / 2) * pixel_mm / half_axes_mm[0]) ** 2 + ((i - shape[1] / 2) * pixel_mm / half_axes_mm[1]) ** 2


def test_a_head_and_a_gas_filled_abdomen_show_none() -> None:
    rng = np.random.default_rng(0)
    r = _ellipse((256, 256), 1.0, (95, 80))
    head = np.where(r < 0.86, 35.0, np.where(r < 1.0, 1200.0, -1000.0)).astype(np.float32)  # brain, skull, air
    head = np.repeat(head[np.newaxis], 60, axis=0)
    head[:, 75:85, 120:136] = -1000.0  # a sinus
    head += rng.normal(0, 20, head.shape).astype(np.float32)
    # CT colonography at low dose: a colon distended with gas fills most of the abdomen.
    abdomen = np.where(_ellipse((256, 256), 1.6, (150, 180)) < 1, 40.0, -1000.0).astype(np.float32)
    abdomen[_ellipse((256, 256), 1.6, (100, 120)) < 1] = -1000.0
    abdomen = np.repeat(abdomen[np.newaxis], 100, axis=0) + rng.normal(0, 40, (100, 256, 256)).astype(np.float32)

    for voxels, spacing in ((head, (2.5, 1.0, 1.0)), (abdomen, (2.5, 1.6, 1.6))):
        presence = lung_presence(voxels, spacing)
        assert presence.judged and not presence.present, presence


def test_a_volume_without_a_body_is_not_judged() -> None:
    # Uniform lung density, as the synthetic phantoms of the pipeline tests: nothing to call a head or abdomen.
    presence = lung_presence(np.full((40, 128, 128), -850.0, np.float32), (1.25, 0.8, 0.8))
    assert not presence.judged and presence.present
