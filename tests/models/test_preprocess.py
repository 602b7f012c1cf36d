"""Preprocessing: the separable fast path gives MONAI's values; crops keep world coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from lungscreen.dicom_io.volume import read_series_volume
from lungscreen.models.card import DEFAULT_MODEL_CARD, load_card
from lungscreen.models.detector import Detector
from lungscreen.models.lungs import distance_outside_mm
from lungscreen.models import preprocess as preprocess_module
from lungscreen.models.preprocess import LPS_TO_RAS, bounding_box, build_transform, crop_to_box, preprocess

CARD = load_card(DEFAULT_MODEL_CARD)
LUNA16_NODULE_LPS = (56.21, 86.34, -115.87)  # LIDC-IDRI-0001's LUNA16 nodule, world LPS mm


def monai_reference(voxels: np.ndarray, affine_lps: np.ndarray):
    image = MetaTensor(torch.from_numpy(voxels)[None], affine=torch.from_numpy(LPS_TO_RAS @ affine_lps))
    out = build_transform(CARD.preprocessing)(image)
    return out.as_tensor(), LPS_TO_RAS @ out.affine.numpy()


def axis_aligned_affine(spacing, flips=(1, 1, 1)) -> np.ndarray:
    """Array axis ``a`` along LPS axis ``a``, ``spacing[a]`` mm apart (``flips``: reversed)."""
    affine = np.diag([*(f * s for f, s in zip(flips, spacing)), 1.0])
    affine[:3, 3] = (-120.0, -90.0, -300.0)
    return affine


@pytest.mark.parametrize("in_blocks", [False, True], ids=["one-block", "blocks-on-threads"])
@pytest.mark.parametrize(
    "spacing, flips",
    [((1.25, 0.7, 0.7), (1, 1, 1)), ((2.5, 0.62, 0.62), (1, 1, -1)), ((0.6, 0.9, 0.8), (-1, 1, 1)), ((2.0, 2.0, 2.0), (1, -1, 1))],
)
def test_separable_resampling_gives_monais_values(spacing, flips, in_blocks, monkeypatch):
    if in_blocks:  # large CTs are interpolated in blocks on a thread pool; any size, here
        monkeypatch.setattr(preprocess_module, "PARALLEL_MIN_VOXELS", 0)
        monkeypatch.setattr(preprocess_module.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    rng = np.random.default_rng(7)
    voxels = rng.uniform(-1100, 500, size=(37, 61, 53)).astype(np.float32)
    affine = axis_aligned_affine(spacing, flips)
    ours = preprocess(voxels, affine, build_transform(CARD.preprocessing))
    reference, reference_affine = monai_reference(voxels, affine)
    assert ours.tensor.shape == reference.shape
    np.testing.assert_allclose(ours.index_to_lps, reference_affine, atol=1e-9)
    assert float((ours.tensor - reference).abs().max()) < 1e-4


def test_oblique_grid_falls_back_to_monai():
    rng = np.random.default_rng(8)
    voxels = rng.uniform(-1100, 500, size=(20, 40, 40)).astype(np.float32)
    affine = axis_aligned_affine((2.0, 0.8, 0.8))
    angle = np.radians(15)  # a gantry-tilt-like rotation about x
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine[:3, :3] = rotation @ affine[:3, :3]
    ours = preprocess(voxels, affine, build_transform(CARD.preprocessing))
    reference, reference_affine = monai_reference(voxels, affine)
    np.testing.assert_allclose(ours.index_to_lps, reference_affine, atol=1e-9)
    assert float((ours.tensor - reference).abs().max()) < 1e-5


def test_bounding_box_spans_every_set_voxel_plus_the_margin():
    rng = np.random.default_rng(10)
    mask = rng.random((30, 40, 20)) > 0.999
    present = np.argwhere(mask)
    box = bounding_box(mask, margin_mm=2.0, spacing_mm=(1.0, 2.0, 4.0))
    assert [b.start for b in box] == list(np.maximum(present.min(axis=0) - [2, 1, 1], 0))
    assert [b.stop for b in box] == list(np.minimum(present.max(axis=0) + 1 + [2, 1, 1], mask.shape))
    assert bounding_box(np.zeros((4, 4, 4), dtype=bool), margin_mm=2.0, spacing_mm=(1.0, 1.0, 1.0)) is None


def test_crop_keeps_world_coordinates():
    rng = np.random.default_rng(9)
    voxels = rng.uniform(-1000, 400, size=(50, 50, 30)).astype(np.float32)
    image = preprocess(voxels, axis_aligned_affine((2.0, 2.0, 2.0)), build_transform(CARD.preprocessing))
    mask = np.zeros(image.tensor.shape[1:], dtype=bool)
    mask[20:30, 12:18, 9:20] = True
    cropped = crop_to_box(image, bounding_box(mask, margin_mm=4.0, spacing_mm=(2.0, 2.0, 2.0), align=(4, 4, 4)))
    start = np.round(np.linalg.inv(image.index_to_lps) @ cropped.index_to_lps[:, 3])[:3].astype(int)
    assert list(start) == [16, 8, 4], "starts: mask start minus 2 voxels, down to a multiple of 4"
    x, y, z = cropped.tensor.shape[1:]
    assert (x, y, z) == (32 - 16, 20 - 8, 22 - 4)
    assert torch.equal(cropped.tensor[0], image.tensor[0, 16:32, 8:20, 4:22])
    np.testing.assert_allclose(cropped.index_to_lps @ [1, 2, 3, 1], image.index_to_lps @ [17, 10, 7, 1])


def test_real_ct_is_cropped_to_its_lungs_and_the_nodule_is_inside(lidc_series_dir):
    volume = read_series_volume(sorted(lidc_series_dir.glob("*.dcm")))
    detector = Detector(CARD)
    image = detector.preprocess(volume.voxels, volume.affine)
    full = preprocess(volume.voxels, volume.affine, detector.transform)
    assert image.lungs is not None and image.lungs.shape == image.tensor.shape[1:]
    assert image.tensor.numel() < 0.6 * full.tensor.numel(), "the lungs' box is well under the field of view"
    litres = image.lungs.sum() * 8.0 / 1e6  # 2 mm voxels
    assert 2.0 < litres < 8.0
    nodule_index = (np.linalg.inv(image.index_to_lps) @ [*LUNA16_NODULE_LPS, 1.0])[:3]
    assert np.all(nodule_index >= 0) and np.all(nodule_index < image.tensor.shape[1:])
    # The 23 mm nodule itself is not air, but its surface touches the lungs.
    assert distance_outside_mm(image.lungs, tuple(nodule_index), (2.0, 2.0, 2.0), 30.0) <= 23.4 / 2
    candidates, _ = detector.detect(volume.voxels, volume.affine)
    near = [c for c in candidates if np.linalg.norm(volume.index_to_lps(c.center_kji) - LUNA16_NODULE_LPS) < 10]
    assert near and all(c.outside_lungs_mm is not None and c.outside_lungs_mm <= 10 for c in near)


def test_distance_outside_the_lungs():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[5:10, 5:10, 5:10] = True
    assert distance_outside_mm(mask, (7, 7, 7), (2, 2, 2), 30) == 0.0
    assert distance_outside_mm(mask, (12, 7, 7), (2, 2, 2), 30) == pytest.approx(6.0)
    assert distance_outside_mm(mask, (19, 19, 19), (1, 1, 1), 5) == float("inf")
