"""The lungs of a chest CT by thresholding: where nodules can be, and where they cannot.

Used at run time on the model's grid (2 mm), twice: the network sees only the lungs' box,
and a candidate whose surface lies far outside the lungs (in the heart, the liver, a
contrast-filled vessel of the mediastinum) is suppressed by a clinical rule, and counted.
Used in training (``training/``) to insert synthetic nodules into real lungs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LUNG_THRESHOLD_HU = -400.0  # lung parenchyma is about -850 HU, soft tissue above -100


def lung_mask(hu: np.ndarray, *, fill_vessels: bool = True) -> np.ndarray:
    """Segment the lungs of a chest CT, array ``[slice, row, column]``.

    Air-like voxels (< ``LUNG_THRESHOLD_HU``) that are not connected to the in-plane border
    of the image (outside air, couch, padding) are kept if they belong to one of the two
    largest components (lungs, possibly joined through the airways) and that component has at
    least 10 % of the largest one's volume (drops bowel gas). With ``fill_vessels`` the
    vessels and nodules are filled in slice by slice. Trachea and main bronchi connected to
    the lungs stay in the mask. Returns an all-False mask when there are no lungs.
    """
    air = np.ascontiguousarray(hu < LUNG_THRESHOLD_HU)  # ndimage.label is slower on a transposed view
    labels, n_labels = ndimage.label(air)
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
    sizes[0] = 0
    sizes[border] = 0
    order = np.argsort(sizes)[::-1][:2]
    mask = np.zeros(labels.shape, dtype=bool)
    for label in order:  # two labels at most: comparisons are cheaper than np.isin
        if sizes[label] > 0 and sizes[label] >= 0.1 * sizes[order[0]]:
            mask |= labels == label
    if not fill_vessels:
        return mask
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure=in_plane)


def lung_mask_xyz(hu_xyz: np.ndarray, *, fill_vessels: bool = True) -> np.ndarray:
    """:func:`lung_mask` of a volume on the model's grid, axes ``(x, y, z)`` with axial slices along z."""
    return lung_mask(hu_xyz.transpose(2, 1, 0), fill_vessels=fill_vessels).transpose(2, 1, 0)


def distance_outside_mm(
    mask: np.ndarray, index: tuple[float, float, float], spacing_mm: tuple[float, float, float], limit_mm: float
) -> float:
    """How far ``index`` (fractional voxel index of ``mask``) lies outside ``mask``, in mm.

    0 inside; ``inf`` when no mask voxel is within ``limit_mm`` (only a cube of that
    half-width around the point is searched, so this is cheap per candidate).
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    point = np.asarray(index, dtype=np.float64)
    nearest = np.round(point).astype(int)
    if np.all(nearest >= 0) and np.all(nearest < mask.shape) and mask[tuple(nearest)]:
        return 0.0
    reach = np.ceil(limit_mm / spacing).astype(int)
    low = np.maximum(nearest - reach, 0)
    high = np.minimum(nearest + reach + 1, mask.shape)
    if np.any(high <= low):
        return float("inf")
    inside = np.argwhere(mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
    if inside.size == 0:
        return float("inf")
    distances = np.linalg.norm((inside + low - point) * spacing, axis=1)
    nearest_mm = float(distances.min())
    return nearest_mm if nearest_mm <= limit_mm else float("inf")
