"""Training patches: scans resampled as the card says, a refreshed pool, sampling, augmentation.

Each scan goes through the server's own preprocessing (:func:`models.preprocess.preprocess`
with the card's transform), so the network is trained on exactly what it sees at inference.
Patches are cut from a pool of prepared volumes that is refreshed as training goes on (a new
synthetic scan or a real background with newly inserted nodules replaces the oldest one).

Sampling: half of the patches hold a nodule somewhere inside; the others are centred on lung
(vessels and pleura: the hard negatives) or anywhere in the body (mediastinum, bone, wall).
Geometric augmentation (flips, in-plane 90 degree turns) moves the nodule centres with the
image, so it is done here exactly; intensity augmentation uses MONAI transforms.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Compose, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity

from lungscreen.models.lungs import lung_mask_xyz
from lungscreen.models.preprocess import build_transform, preprocess
from lungscreen.training.scan import Scan
from lungscreen.training.spec import HU_MAX, HU_MIN, PREPROCESSING, SPACING_MM
from lungscreen.training.targets import build_targets

PATCH_SIZE = (64, 64, 64)
POSITIVE_FRACTION = 0.5
LUNG_FRACTION_OF_NEGATIVES = 0.8
# Keep a sampled nodule at least this far (voxels) inside the patch border.
POSITIVE_BORDER_VOX = 6
MAX_SAMPLING_TRIES = 50


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    name: str
    image: np.ndarray  # float32 (X, Y, Z) in the model's orientation/spacing, windowed
    nodules: np.ndarray  # (n, 4): x, y, z (model voxels), diameter mm
    lung: np.ndarray  # bool (X, Y, Z)
    exclusions: np.ndarray  # (m, 4): x, y, z (model voxels), radius (voxels)


def prepare(scan: Scan) -> PreparedVolume:
    """Resample ``scan`` as the card does and map its nodules and exclusions to model voxels."""
    pre = preprocess(scan.voxels, scan.affine, build_transform(PREPROCESSING))
    lps_to_model = np.linalg.inv(pre.index_to_lps)

    def to_model(points: list[tuple[float, float, float]]) -> np.ndarray:
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        return pts @ lps_to_model[:3, :3].T + lps_to_model[:3, 3]

    image = pre.tensor[0].numpy()
    nodules = np.concatenate(
        [to_model([n.center_lps_mm for n in scan.nodules]), np.array([[n.diameter_mm] for n in scan.nodules]).reshape(-1, 1)],
        axis=1,
    )
    exclusions = np.concatenate(
        [
            to_model([e.center_lps_mm for e in scan.exclusions]),
            np.array([[e.radius_mm / SPACING_MM] for e in scan.exclusions]).reshape(-1, 1),
        ],
        axis=1,
    )
    hu = image * (HU_MAX - HU_MIN) + HU_MIN
    lung = lung_mask_xyz(hu)
    return PreparedVolume(scan.name, np.ascontiguousarray(image), nodules.astype(np.float32), lung, exclusions)


def crop(image: np.ndarray, start: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """``image[start:start+size]`` padded with 0 (air after windowing), like sliding-window padding."""
    out = np.zeros(size, np.float32)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, image.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    out[dst] = image[src]
    return out


def _touches_exclusion(start: np.ndarray, size: tuple[int, int, int], exclusions: np.ndarray) -> bool:
    for x, y, z, r in exclusions:
        nearest = np.clip([x, y, z], start, start + np.array(size) - 1)
        if np.linalg.norm(nearest - [x, y, z]) <= r:
            return True
    return False


def sample_patch(
    volume: PreparedVolume, rng: np.random.Generator, size: tuple[int, int, int] = PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One patch and the nodules in it (patch voxel coordinates + diameter), before augmentation."""
    half = np.array(size) / 2
    for _ in range(MAX_SAMPLING_TRIES):
        if len(volume.nodules) and rng.random() < POSITIVE_FRACTION:
            nodule = volume.nodules[rng.integers(len(volume.nodules))]
            centre = nodule[:3] + rng.uniform(-(half - POSITIVE_BORDER_VOX), half - POSITIVE_BORDER_VOX)
        elif rng.random() < LUNG_FRACTION_OF_NEGATIVES and volume.lung.any():
            candidates = np.flatnonzero(volume.lung)
            centre = np.array(np.unravel_index(candidates[rng.integers(len(candidates))], volume.lung.shape), float)
        else:
            centre = rng.uniform(0, volume.image.shape)
        start = np.round(centre - half).astype(int)
        if not _touches_exclusion(start, size, volume.exclusions):
            break
    else:
        raise RuntimeError(f"no patch of {volume.name} avoids its exclusions")
    nodules = volume.nodules.copy()
    nodules[:, :3] -= start
    return crop(volume.image, start, size), nodules


def augment_geometry(
    patch: np.ndarray, nodules: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips of each axis and an in-plane (x, y) quarter turn, applied to image and centres."""
    nodules = nodules.copy()
    for axis in range(3):
        if rng.random() < 0.5:
            patch = np.flip(patch, axis)
            nodules[:, axis] = patch.shape[axis] - 1 - nodules[:, axis]
    for _ in range(int(rng.integers(4))):
        # np.rot90 on axes (0, 1): new[a, b] = old[b, n1 - 1 - a], so (x, y) -> (n1 - 1 - y, x)
        n1 = patch.shape[1]
        patch = np.rot90(patch, 1, axes=(0, 1))
        x, y = nodules[:, 0].copy(), nodules[:, 1].copy()
        nodules[:, 0], nodules[:, 1] = n1 - 1 - y, x
    return np.ascontiguousarray(patch), nodules


def intensity_augmentation() -> Compose:
    """Scanner-to-scanner variation in the windowed image: gain, offset and extra noise."""
    return Compose(
        [
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.03, prob=0.5),
            RandGaussianNoise(prob=0.3, std=0.015),
        ]
    )


class VolumePool:
    """A fixed number of prepared volumes; :meth:`refresh` replaces the oldest with a new one.

    ``make(index)`` builds volume number ``index`` deterministically, so a resumed run rebuilds
    the same pool from the index it had reached.
    """

    def __init__(self, make: Callable[[int], PreparedVolume], size: int, first_index: int = 0) -> None:
        self._make = make
        self.next_index = first_index
        self.volumes: deque[PreparedVolume] = deque(maxlen=size)
        for _ in range(size):
            self.refresh()

    def refresh(self) -> None:
        self.volumes.append(self._make(self.next_index))
        self.next_index += 1


def make_batch(
    pool: VolumePool, batch_size: int, rng: np.random.Generator, intensity: Compose
) -> dict[str, torch.Tensor]:
    images, fields = [], {"heatmap": [], "heatmap_weight": [], "regression": [], "regression_mask": []}
    for _ in range(batch_size):
        volume = pool.volumes[int(rng.integers(len(pool.volumes)))]
        patch, nodules = augment_geometry(*sample_patch(volume, rng), rng)
        images.append(intensity(torch.from_numpy(patch)[None]))
        t = build_targets(nodules[:, :3], nodules[:, 3], patch.shape, SPACING_MM)
        for key in fields:
            fields[key].append(torch.from_numpy(getattr(t, key)))
    batch = {key: torch.stack(v) for key, v in fields.items()}
    batch["image"] = torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in images])
    return batch
