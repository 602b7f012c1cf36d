"""Targets, patch sampling and geometric augmentation keep image and centres together."""

from __future__ import annotations

import numpy as np
import torch

from lungscreen.training.dataset import PreparedVolume, augment_geometry, crop, sample_patch
from lungscreen.training.losses import detection_loss, focal_loss
from lungscreen.training.targets import build_targets


def test_targets_peak_offset_and_size() -> None:
    t = build_targets(np.array([[21.0, 30.0, 9.0]]), np.array([8.0]), (64, 64, 64), 2.0)
    assert t.heatmap.shape == (1, 16, 16, 16)
    peak = np.unravel_index(np.argmax(t.heatmap[0]), (16, 16, 16))
    assert peak == (5, 8, 2) and t.heatmap[0][peak] == 1.0  # round((21, 30, 9) / 4)
    np.testing.assert_allclose(t.regression[1:, 5, 8, 2], [0.25, -0.5, 0.25])
    assert t.regression[0, 5, 8, 2] == np.float32(np.log(8.0))
    assert t.regression_mask.sum() >= 1


def test_nodule_outside_patch_is_ignored_not_negative() -> None:
    t = build_targets(np.array([[-3.0, 30.0, 30.0]]), np.array([10.0]), (64, 64, 64), 2.0)
    assert t.heatmap.max() == 0.0
    assert t.heatmap_weight[0, 0, 7, 7] == 0.0 and t.heatmap_weight[0, 10, 7, 7] == 1.0


def test_crop_pads_with_air() -> None:
    image = np.ones((10, 10, 10), np.float32)
    patch = crop(image, np.array([-2, 5, 0]), (4, 4, 4))
    assert patch[:2].max() == 0.0
    assert patch[2:, :, :].min() == 1.0


def test_augmentation_moves_centres_with_the_image() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        patch = np.zeros((16, 16, 16), np.float32)
        nodules = np.array([[3.0, 5.0, 11.0, 6.0]], np.float32)
        patch[3, 5, 11] = 1.0
        new_patch, new_nodules = augment_geometry(patch, nodules, rng)
        assert new_patch[tuple(new_nodules[0, :3].astype(int))] == 1.0


def test_sampling_avoids_exclusions_and_finds_nodules() -> None:
    image = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    lung = np.zeros_like(image, bool)
    lung[5:15] = True
    volume = PreparedVolume(
        "toy", image, np.array([[10.0, 20.0, 20.0, 8.0]], np.float32), lung, np.array([[35.0, 35.0, 35.0, 3.0]])
    )
    rng = np.random.default_rng(1)
    for _ in range(30):
        patch, nodules = sample_patch(volume, rng, (16, 16, 16))
        assert patch.shape == (16, 16, 16)


def test_losses_fall_when_prediction_matches() -> None:
    t = build_targets(np.array([[20.0, 20.0, 20.0]]), np.array([8.0]), (32, 32, 32), 2.0)
    batch = {k: torch.from_numpy(getattr(t, k))[None] for k in ("heatmap", "heatmap_weight", "regression", "regression_mask")}
    logit = torch.logit(torch.from_numpy(t.heatmap).clamp(1e-4, 1 - 1e-4))[None]
    good = torch.cat([logit, torch.from_numpy(t.regression)[None]], dim=1)
    bad = torch.cat([torch.zeros_like(logit), torch.zeros_like(good[:, 1:])], dim=1)
    assert detection_loss(good, batch)["loss"] < detection_loss(bad, batch)["loss"]
    assert focal_loss(logit, batch["heatmap"], batch["heatmap_weight"]) < 0.1
