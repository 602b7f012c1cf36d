"""Nodule size segmented on the HU volume (models/measure.py), on real anatomy.

Follow-up growth is the difference of two sizes: the size must be right and must not follow
the detector's regressed diameter. Spheres are inserted into the real LIDC-IDRI-0001 lung (the
same insertion as the follow-up evaluation); the real nodules are LIDC-IDRI-0001's (LUNA16:
23.35 mm) and pyradiomics lung1's (its mask: 1.36 ml, 13.75 mm sphere-equivalent, 5 mm slices).
"""

import numpy as np
import pytest

from lungscreen.benchmarks.followup import LUNA16_NODULE_LPS, LUNA16_NODULE_MM, paint_nodule, remove_nodule
from lungscreen.models.measure import segmented_size


@pytest.fixture(scope="module")
def lidc(lidc_series_dir):
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    series = index_study(sorted(lidc_series_dir.glob("*.dcm"))).series[0]
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    return volume.voxels.astype(np.float32), volume.affine


def _kji(affine, lps):
    return (np.asarray(lps, float) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def _spacing(affine):
    return tuple(np.linalg.norm(affine[:3, :3], axis=0))


@pytest.mark.parametrize("diameter_mm", [8.0, 12.0, 18.0])
def test_an_inserted_nodule_measures_its_size_whatever_the_detector_said(lidc, diameter_mm):
    hu, affine = lidc
    with_nodule = hu.copy()
    remove_nodule(with_nodule, affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, np.random.default_rng(3))
    paint_nodule(with_nodule, affine, LUNA16_NODULE_LPS, diameter_mm)
    centre = _kji(affine, LUNA16_NODULE_LPS)
    sizes = [segmented_size(with_nodule, centre, diameter_mm * f, _spacing(affine)) for f in (0.8, 1.0, 1.2)]
    assert all(s is not None for s in sizes)
    assert max(abs(s.diameter_mm - diameter_mm) for s in sizes) < 0.5, [s.diameter_mm for s in sizes]
    assert sizes[1].volume_mm3 == pytest.approx(np.pi / 6 * diameter_mm**3, rel=0.1)


def test_the_real_lidc_nodule_is_separated_from_its_vessels(lidc):
    hu, affine = lidc
    size = segmented_size(hu, _kji(affine, LUNA16_NODULE_LPS), 24.0, _spacing(affine))
    assert size is not None and abs(size.diameter_mm - LUNA16_NODULE_MM) < 1.5, size


def test_the_real_lung1_nodule_agrees_with_its_mask(shared_data):
    from lungscreen.training.readers import read_nrrd_with_mask
    from lungscreen.training.real_eval import LUNG1_IMAGE, LUNG1_LABEL

    scan = read_nrrd_with_mask(LUNG1_IMAGE, LUNG1_LABEL, "lung1")
    (nodule,) = scan.nodules
    sizes = [segmented_size(scan.voxels, scan.lps_to_index(np.array(nodule.center_lps_mm)), d, scan.spacing) for d in (11.0, 14.0)]
    assert all(s is not None and abs(s.diameter_mm - nodule.diameter_mm) < 1.5 for s in sizes), sizes


def test_nothing_to_segment_in_aerated_lung_or_where_it_runs_into_the_chest_wall(lidc):
    hu, affine = lidc
    spacing = _spacing(affine)
    lung = np.argwhere(hu[60:70] < -850)[len(np.argwhere(hu[60:70] < -850)) // 2] + [60, 0, 0]
    assert segmented_size(hu, lung, 8.0, spacing) is None
    body = np.array([66, 256, 256])  # the mediastinum at mid-chest: soft tissue that never ends
    assert hu[tuple(body)] > -200 and segmented_size(hu, body, 10.0, spacing) is None
