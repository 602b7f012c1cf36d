"""Decoding of network outputs into nodule candidates, one function per card ``decoding.kind``.

Every decoder takes the output of one image (channels first, spatial axes in the model's
orientation), the model's voxel spacing in mm, and the card's ``decoding`` block, and
returns :class:`ModelCandidate` in model-voxel coordinates, strongest first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lungscreen.models.decoding_heatmap import decode_center_heatmap
from lungscreen.models.decoding_retinanet import decode_retinanet
from lungscreen.errors import ModelError
from lungscreen.findings import ModelCandidate


def decode(output: np.ndarray, spacing_mm: np.ndarray, decoding: dict) -> list[ModelCandidate]:
    decoder = DECODERS.get(decoding["kind"])
    if decoder is None:
        raise ModelError(f"decoding {decoding['kind']!r} is not supported by this version")
    return decoder(output, np.asarray(spacing_mm, dtype=np.float64), decoding)


def decode_multiscale_heatmap(output: np.ndarray, spacing_mm: np.ndarray, decoding: dict) -> list[ModelCandidate]:
    """Local maxima of a filter-bank output ``(S, X, Y, Z)``, one channel per nodule diameter.

    The score of a voxel is its strongest band; the diameter is that band's, refined by a
    parabola through the neighbouring bands in log-diameter. Peaks closer than the larger of
    ``nms_radius_mm`` and the stronger peak's radius are suppressed (greedy NMS).
    """
    diameters = np.asarray(decoding["scale_diameters_mm"], dtype=np.float64)
    if output.ndim != 4 or output.shape[0] != len(diameters):
        raise ModelError(f"output shape {output.shape} does not match {len(diameters)} scale channels")
    bands = torch.from_numpy(np.ascontiguousarray(output))
    score, best = bands.max(dim=0)
    radius_vox = [max(1, math.ceil(decoding["nms_radius_mm"] / s / 2)) for s in spacing_mm]
    kernel = [2 * r + 1 for r in radius_vox]
    pooled = F.max_pool3d(score[None, None], kernel, stride=1, padding=radius_vox)[0, 0]
    peaks = torch.nonzero((score == pooled) & (score >= decoding["min_score"]))
    if len(peaks) == 0:
        return []
    peak_scores = score[peaks[:, 0], peaks[:, 1], peaks[:, 2]]
    order = torch.argsort(peak_scores, descending=True)[: 20 * decoding["max_candidates"]]

    log_d = np.log(diameters)
    kept: list[ModelCandidate] = []
    kept_mm: list[np.ndarray] = []
    for idx in order.tolist():
        x, y, z = peaks[idx].tolist()
        s = int(best[x, y, z])
        diameter = _refine_diameter(bands[:, x, y, z].numpy(), s, log_d)
        centre_mm = np.array([x, y, z]) * spacing_mm
        if any(
            np.linalg.norm(centre_mm - other) < max(decoding["nms_radius_mm"], k.diameter_mm / 2)
            for k, other in zip(kept, kept_mm)
        ):
            continue
        centre = _refine_peak(score, (x, y, z))
        kept.append(ModelCandidate(index_xyz=centre, diameter_mm=diameter, score=float(score[x, y, z])))
        kept_mm.append(centre_mm)
        if len(kept) == decoding["max_candidates"]:
            break
    return kept


def _refine_diameter(responses: np.ndarray, best: int, log_d: np.ndarray) -> float:
    if best == 0 or best == len(log_d) - 1:
        return float(np.exp(log_d[best]))
    y0, y1, y2 = responses[best - 1 : best + 2]
    denom = y0 - 2 * y1 + y2
    offset = 0.0 if denom >= 0 else 0.5 * (y0 - y2) / denom  # vertex of the parabola, in steps
    step = log_d[best + 1] - log_d[best] if offset > 0 else log_d[best] - log_d[best - 1]
    return float(np.exp(log_d[best] + float(np.clip(offset, -0.5, 0.5)) * step))


def _refine_peak(score: torch.Tensor, peak: tuple[int, int, int]) -> tuple[float, float, float]:
    """Sub-voxel peak position: a parabola through the peak and its two neighbours, per axis."""
    refined = []
    for axis, position in enumerate(peak):
        if position == 0 or position == score.shape[axis] - 1:
            refined.append(float(position))
            continue
        idx = list(peak)
        values = []
        for delta in (-1, 0, 1):
            idx[axis] = position + delta
            values.append(float(score[tuple(idx)]))
        denom = values[0] - 2 * values[1] + values[2]
        offset = 0.5 * (values[0] - values[2]) / denom if denom < 0 else 0.0
        refined.append(position + float(np.clip(offset, -0.5, 0.5)))
    return tuple(refined)


DECODERS = {
    "multiscale_heatmap": decode_multiscale_heatmap,
    "center_heatmap_size": decode_center_heatmap,
    "retinanet": decode_retinanet,
}
