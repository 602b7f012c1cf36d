"""Per-candidate measurements on the source HU volume: nodule type and volume.

Type from attenuation: the mean HU in the central third of the nodule and in the whole
sphere. Solid nodules are soft tissue (> -300 HU) throughout; ground-glass nodules stay
below it; part-solid ones have a solid core inside a ground-glass rim. A core denser than
200 HU is calcified: nodule densitometry puts benign (calcified) nodules above 164 HU
(Siegelman et al., Radiology 1986;160:307-312), soft tissue stays under about 100 HU, and a
calcified core is one of the benign patterns of Lung-RADS v2022 category 1 (diffuse or
central calcification). Volume is the sphere-equivalent volume of the long-axis diameter
(an over-estimate for ellipsoids).
"""

from __future__ import annotations

import math

import numpy as np

from lungscreen.findings import NoduleType

SOLID_HU = -300.0  # soft-tissue attenuation threshold separating solid from ground-glass
GROUND_GLASS_RIM_HU = -500.0  # a rim darker than this around a solid core: part-solid
CALCIFIED_CORE_HU = 200.0  # a core denser than this: calcified (benign)


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
