"""Per-candidate measurements on the source HU volume: nodule type and volume.

Type from attenuation: the mean HU in the central third of the nodule and in the whole
sphere. Solid nodules are soft tissue (> -300 HU) throughout; ground-glass nodules stay
below it; part-solid ones have a solid core inside a ground-glass rim. A core denser than
200 HU is calcified: nodule densitometry puts benign (calcified) nodules above 164 HU
(Siegelman et al., Radiology 1986;160:307-312), soft tissue stays under about 100 HU, and a
calcified core is one of the benign patterns of Lung-RADS v2022 category 1 (diffuse or
central calcification).

Size (:func:`segmented_size`): the nodule is segmented on the HU volume at half-way between its
core and lung parenchyma, vessels and pleura peeled off by a morphological opening, and its
volume and sphere-equivalent diameter are reported. Follow-up growth is a difference of two
sizes, so the size must not depend on the detector's regressed diameter (which varies by a mm
or two with the nodule's surroundings): the segmentation only starts from it. Where the nodule
cannot be separated from its surroundings (it reaches the edge of the region looked at), the
detector's diameter and the volume of that sphere stand.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungscreen.findings import NoduleType

SOLID_HU = -300.0  # soft-tissue attenuation threshold separating solid from ground-glass
GROUND_GLASS_RIM_HU = -500.0  # a rim darker than this around a solid core: part-solid
CALCIFIED_CORE_HU = 200.0  # a core denser than this: calcified (benign)
LUNG_PARENCHYMA_HU = -850.0  # aerated lung; the segmentation threshold lies half-way to the nodule's core
NO_NODULE_CORE_HU = -700.0  # a core this dark is aerated lung, not a nodule: nothing to segment


def sphere_volume_mm3(diameter_mm: float) -> float:
    return math.pi / 6.0 * diameter_mm**3


def _ball_mean(hu: np.ndarray, center_kji, radius_mm: float, spacing) -> float:
    lo = [max(0, int(math.floor(c - radius_mm / s))) for c, s in zip(center_kji, spacing)]
    hi = [min(n, int(math.ceil(c + radius_mm / s)) + 1) for c, n, s in zip(center_kji, hu.shape, spacing)]
    if any(h <= l for l, h in zip(lo, hi)):
        return float("nan")
    grid = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center_kji, spacing))
    inside = dist2 <= radius_mm**2
    block = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return float(block[inside].mean()) if inside.any() else float(block.mean())


def nodule_type(hu: np.ndarray, center_kji, diameter_mm: float, spacing) -> NoduleType:
    """Classify by attenuation; ``spacing`` is the source volume's ``(k, j, i)`` mm."""
    radius = diameter_mm / 2
    core = _ball_mean(hu, center_kji, max(radius / 3, min(spacing)), spacing)
    whole = _ball_mean(hu, center_kji, radius, spacing)
    if core < SOLID_HU:
        return NoduleType.GROUND_GLASS
    if core > CALCIFIED_CORE_HU:
        return NoduleType.CALCIFIED
    rim_fraction = 1 - (1 / 3) ** 3
    rim = (whole - core * (1 - rim_fraction)) / rim_fraction
    return NoduleType.PART_SOLID if rim < GROUND_GLASS_RIM_HU and diameter_mm >= 6 else NoduleType.SOLID


@dataclass(frozen=True)
class NoduleSize:
    diameter_mm: float  # sphere-equivalent diameter of the segmented volume
    volume_mm3: float


def _ellipsoid(radius_mm: float, spacing) -> np.ndarray:
    """A ball of ``radius_mm`` on a grid of ``spacing`` (k, j, i) mm, at least one voxel across."""
    half = [max(1, int(round(radius_mm / s))) for s in spacing]
    grid = np.ogrid[tuple(slice(-n, n + 1) for n in half)]
    return sum((g * s / radius_mm) ** 2 for g, s in zip(grid, spacing)) <= 1.0 + 1e-9


def core_hu(hu: np.ndarray, center_kji, diameter_mm: float, spacing) -> float:
    """Median HU in a small ball (a quarter diameter, at most 3 mm) at ``center_kji``."""
    spacing = np.asarray(spacing, dtype=float)
    ball = _ellipsoid(max(min(diameter_mm / 4, 3.0), float(spacing.min())), spacing)
    at = np.clip(np.round(np.asarray(center_kji, dtype=float)).astype(int), 0, np.array(hu.shape) - 1)
    reach = np.array(ball.shape) // 2
    return float(np.median(hu[tuple(slice(max(0, a - r), a + r + 1) for a, r in zip(at, reach))]))


def segmented_size(hu: np.ndarray, center_kji, diameter_mm: float, spacing) -> NoduleSize | None:
    """Volume and sphere-equivalent diameter of the nodule at ``center_kji``, or None where it
    cannot be told from its surroundings; ``diameter_mm`` (the detector's) sets the region
    looked at (1.25 diameters + 4 mm each way) and the opening's radius (a quarter diameter)."""
    spacing = np.asarray(spacing, dtype=float)
    centre = np.asarray(center_kji, dtype=float)
    half = max(diameter_mm, 4.0) * 1.25 + 4.0
    lo = np.maximum(np.floor(centre - half / spacing), 0).astype(int)
    hi = np.minimum(np.ceil(centre + half / spacing) + 1, hu.shape).astype(int)
    if np.any(hi - lo < 3):
        return None
    crop = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    at = np.clip(np.round(centre - lo).astype(int), 0, np.array(crop.shape) - 1)
    core = core_hu(crop, at, diameter_mm, spacing)
    if core < NO_NODULE_CORE_HU:
        return None
    dense = crop > (core + LUNG_PARENCHYMA_HU) / 2
    # Erosion by a ball of a quarter diameter, through a distance map (fast for large balls):
    # the cores of the dense structures, one component each; vessels thinner than the ball go.
    radius = float(np.clip(diameter_mm / 4, 1.0, 6.0))
    labels, count = ndimage.label(ndimage.distance_transform_edt(dense, sampling=spacing) > radius)
    if count == 0:
        return None
    label = labels[tuple(at)]
    if label == 0:  # the centre fell off the opened nodule: its nearest part, if near
        index = np.argwhere(labels > 0)
        distance = np.linalg.norm((index - at) * spacing, axis=1)
        if distance.min() > max(diameter_mm / 2, 3.0) + radius:
            return None
        label = labels[tuple(index[distance.argmin()])]
    # Grown back by twice the radius within the dense tissue: the opening's own dilation, then
    # the rim of partial volume it still leaves (a nodule's edge is half-way to the lung).
    grown = ndimage.distance_transform_edt(labels != label, sampling=spacing) <= 2 * radius
    nodule = grown & dense
    if any(nodule.take(edge, axis=axis).any() for axis in range(3) for edge in (0, -1)):
        return None  # it runs on into the vessels, the pleura or the mediastinum
    volume = float(nodule.sum() * np.prod(spacing))
    return NoduleSize((6.0 * volume / math.pi) ** (1 / 3), volume)
