"""Training targets of :class:`training.network.NoduleNet` for one patch.

Heatmap: a Gaussian per nodule around its centre (max over nodules), exactly 1 at the cell
nearest the centre, which the focal loss counts as the positive. Diameter and offset are
regressed only in the cells next to a centre (its 3x3x3 neighbourhood, within the nodule
radius or one cell), so the decoder can read them wherever the peak lands. Nodules whose
centre lies outside the patch are half visible at its border: the heatmap loss ignores their
surroundings instead of teaching the net that they are background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungscreen.training.network import OUTPUT_STRIDE

# Gaussian width (mm): a third of the diameter, at least half an output cell at 2 mm spacing,
# so small nodules still get a peak a few cells wide and big ones a proportionally wider one.
SIGMA_FRACTION_OF_DIAMETER = 1.0 / 3.0
MIN_SIGMA_MM = 4.0
# Extra margin (mm) beyond the radius of an out-of-patch nodule in which the loss is ignored.
IGNORE_MARGIN_MM = 4.0


@dataclass(frozen=True)
class Targets:
    heatmap: np.ndarray  # (1, gx, gy, gz) in [0, 1]
    heatmap_weight: np.ndarray  # (1, gx, gy, gz) 0 = ignored
    regression: np.ndarray  # (4, gx, gy, gz): log diameter, offset x, y, z (cells)
    regression_mask: np.ndarray  # (1, gx, gy, gz) 1 where regression is supervised


def grid_shape(patch_shape: tuple[int, int, int], stride: int = OUTPUT_STRIDE) -> tuple[int, int, int]:
    return tuple(-(-p // stride) for p in patch_shape)


def build_targets(
    centres_vox: np.ndarray, diameters_mm: np.ndarray, patch_shape: tuple[int, int, int], spacing_mm: float
) -> Targets:
    """Targets for nodules at ``centres_vox`` (patch voxel coordinates, ``(n, 3)``)."""
    grid = grid_shape(patch_shape)
    heat = np.zeros(grid, np.float32)
    weight = np.ones(grid, np.float32)
    regression = np.zeros((4, *grid), np.float32)
    mask = np.zeros(grid, np.float32)
    cells = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), axis=-1).astype(np.float32)
    cell_mm = OUTPUT_STRIDE * spacing_mm
    for centre, diameter in zip(np.asarray(centres_vox, np.float32).reshape(-1, 3), np.asarray(diameters_mm).ravel()):
        c = centre / OUTPUT_STRIDE  # in cells
        dist_mm = np.linalg.norm(cells - c, axis=-1) * cell_mm
        peak = np.round(c).astype(int)
        if np.any(peak < 0) or np.any(peak >= grid):
            weight[dist_mm <= diameter / 2 + IGNORE_MARGIN_MM] = 0.0
            continue
        sigma = max(MIN_SIGMA_MM, diameter * SIGMA_FRACTION_OF_DIAMETER)
        heat = np.maximum(heat, np.exp(-0.5 * (dist_mm / sigma) ** 2))
        heat[tuple(peak)] = 1.0
        lo, hi = np.maximum(peak - 1, 0), np.minimum(peak + 2, grid)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        near = dist_mm[box] <= max(diameter / 2, cell_mm)
        for axis in range(3):
            regression[1 + axis][box] = np.where(near, c[axis] - cells[box][..., axis], regression[1 + axis][box])
        regression[0][box] = np.where(near, np.log(diameter), regression[0][box])
        mask[box] = np.maximum(mask[box], near)
    return Targets(heat[None], weight[None], regression, mask[None])
