"""Preprocessing as the model card asks: orientation, spacing and intensity window (MONAI).

Input is a volume in the LungScreen convention (array ``[k, j, i]``, affine to LPS mm);
output is the network input plus the affine that maps its voxel indices to LPS mm, so
detections can be mapped back to the source images.

MONAI's Orientation and Spacing define the output grid (run lazily: only the affine and
shape are computed). When the source grid is axis-aligned with it, as for every untilted
CT, trilinear resampling is separable: each axis is interpolated on its own, smallest
result first, on the contiguous array, in blocks on all cores. That gives MONAI's values (to
float rounding; see tests/models/test_preprocess.py) several times faster than its general
grid_sample on a transposed volume. Oblique grids take MONAI's own resampling.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing

# MONAI's affines are in RAS world coordinates; DICOM patient coordinates are LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Below this many voxels a resampling pass is not worth splitting across threads.
PARALLEL_MIN_VOXELS = 1 << 22


@dataclass(frozen=True)
class PreprocessedImage:
    tensor: torch.Tensor  # (1, X, Y, Z) float32, in the model's orientation and spacing
    index_to_lps: np.ndarray  # 4x4: model voxel index -> LPS mm
    lungs: np.ndarray | None = None  # (X, Y, Z) bool lung mask on the same grid, when segmented


def build_transform(preprocessing: dict) -> Compose:
    window = preprocessing["intensity_window"]
    return Compose(
        [
            Orientation(axcodes=preprocessing["orientation"], labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=preprocessing["spacing_mm"], mode="bilinear", padding_mode="border", dtype=np.float32),
            ScaleIntensityRange(
                a_min=window["hu_min"], a_max=window["hu_max"], b_min=window["out_min"], b_max=window["out_max"], clip=True
            ),
        ]
    )


def preprocess(voxels: np.ndarray, affine_lps: np.ndarray, transform: Compose) -> PreprocessedImage:
    """Apply ``transform`` (from :func:`build_transform`) to a ``[k, j, i]`` HU volume."""
    voxels = np.ascontiguousarray(voxels, dtype=np.float32)
    image = MetaTensor(torch.from_numpy(voxels)[None], affine=torch.from_numpy(LPS_TO_RAS @ affine_lps))
    *spatial, intensity = transform.transforms
    planned = image
    for step in spatial:
        planned = step(planned, lazy=True)
    out_affine = planned.peek_pending_affine().numpy().astype(np.float64)
    source_index = np.linalg.inv(image.affine.numpy().astype(np.float64)) @ out_affine
    resampled = resample_axis_aligned(voxels, source_index, tuple(int(n) for n in planned.peek_pending_shape()))
    if resampled is None:  # oblique: MONAI's general resampling
        out = transform(image)
        return PreprocessedImage(out.as_tensor().float(), LPS_TO_RAS @ out.affine.numpy().astype(np.float64))
    tensor = intensity(torch.from_numpy(resampled)[None])
    return PreprocessedImage(torch.as_tensor(tensor).float(), LPS_TO_RAS @ out_affine)


def hu_of(normalized: np.ndarray, preprocessing: dict) -> np.ndarray:
    """The HU values behind a preprocessed image's voxels (clipped to the intensity window)."""
    window = preprocessing["intensity_window"]
    scale = (window["hu_max"] - window["hu_min"]) / (window["out_max"] - window["out_min"])
    return (normalized - window["out_min"]) * scale + window["hu_min"]


def bounding_box(
    mask: np.ndarray, margin_mm: float, spacing_mm, align: tuple[int, int, int] = (1, 1, 1)
) -> tuple[slice, slice, slice] | None:
    """The bounding box of ``mask`` plus a margin, its starts multiples of ``align`` (the
    network's grid, so that a crop's output grid is the uncropped one's, shifted); None when
    ``mask`` is empty."""
    present = []  # per axis, the indices where any voxel is set: cheaper than argwhere's every voxel
    for axis in range(mask.ndim):
        present.append(np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))))
    if present[0].size == 0:
        return None
    margin = np.ceil(margin_mm / np.asarray(spacing_mm, dtype=np.float64)).astype(int)
    starts = np.maximum(np.array([p[0] for p in present]) - margin, 0)
    starts -= starts % np.asarray(align)
    stops = np.minimum(np.array([p[-1] for p in present]) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(starts, stops))


def crop_to_box(image: PreprocessedImage, box: tuple[slice, slice, slice]) -> PreprocessedImage:
    """The part of ``image`` inside ``box``; ``index_to_lps`` and ``lungs`` follow the crop."""
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    return PreprocessedImage(
        image.tensor[(slice(None), *box)].contiguous(),
        image.index_to_lps @ shift,
        None if image.lungs is None else np.ascontiguousarray(image.lungs[box]),
    )


def resample_axis_aligned(source: np.ndarray, source_index: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Trilinear resampling with border padding, for grids whose axes are parallel.

    ``source_index`` (4x4) maps an output voxel index to a source voxel index; output axis
    ``o`` samples source axis ``s`` at ``m[s, o] * n + t[s]``. Returns None when the
    mapping mixes axes (an oblique grid).
    """
    matrix, offset = source_index[:3, :3], source_index[:3, 3]
    axis_of = np.argmax(np.abs(matrix), axis=1)  # output axis sampled along each source axis
    if sorted(axis_of) != [0, 1, 2] or np.any(np.abs(matrix[np.arange(3), axis_of]) < 1e-9):
        return None
    off_axis = matrix.copy()
    off_axis[np.arange(3), axis_of] = 0.0
    if np.max(np.abs(off_axis)) > 1e-6 * np.max(np.abs(matrix)):
        return None
    result = source
    # Interpolate the axes that shrink most first: every later pass works on less data.
    shrink = [shape[axis_of[s]] / source.shape[s] for s in range(3)]
    threads = len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(max_workers=threads) as pool:  # one per call: no threads left behind across a fork
        for s in sorted(range(3), key=lambda s: shrink[s]):
            o = axis_of[s]
            positions = matrix[s, o] * np.arange(shape[o], dtype=np.float64) + offset[s]
            result = _interpolate_axis(result, s, positions, pool, threads)
    return np.ascontiguousarray(np.transpose(result, np.argsort(axis_of)))


def _interpolate_axis(
    array: np.ndarray, axis: int, positions: np.ndarray, pool: ThreadPoolExecutor, blocks: int
) -> np.ndarray:
    """Linear interpolation of a float32 ``array`` along ``axis`` at ``positions`` (clamped to
    the edges), in ``blocks`` of the output's first axis run on ``pool`` (numpy's take and
    arithmetic release the GIL)."""
    n = array.shape[axis]
    positions = np.clip(positions, 0.0, n - 1)
    lower = np.minimum(np.floor(positions).astype(np.intp), max(n - 2, 0))
    weight = (positions - lower).astype(np.float32)
    upper = np.minimum(lower + 1, n - 1)
    shape = list(array.shape)
    shape[axis] = len(positions)
    # Allocated in this thread: glibc would give the pool's threads arenas of their own, where
    # arrays this large are mapped afresh (and page-faulted) on every study.
    low = np.empty(shape, dtype=np.float32)
    high = np.empty(shape, dtype=np.float32)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = -1

    def interpolate(part: slice) -> None:
        if axis == 0:  # a block of output positions
            source, at_lower, at_upper, at_weight = array, lower[part], upper[part], weight[part]
        else:  # a block of the source's first axis
            source, at_lower, at_upper, at_weight = array[part], lower, upper, weight
        np.take(source, at_lower, axis=axis, out=low[part], mode="clip")  # "clip": no buffered copy
        np.take(source, at_upper, axis=axis, out=high[part], mode="clip")
        difference = high[part]
        difference -= low[part]
        difference *= at_weight.reshape(weight_shape)
        low[part] += difference

    if blocks < 2 or array.size < PARALLEL_MIN_VOXELS:
        interpolate(slice(None))
    else:
        bounds = np.linspace(0, shape[0], blocks + 1).astype(int)
        list(pool.map(interpolate, [slice(a, b) for a, b in zip(bounds, bounds[1:])]))  # list(): re-raises errors
    return low
