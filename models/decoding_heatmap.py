"""Decoding of a CenterNet-style output (card ``decoding.kind`` = ``center_heatmap_size``).

The network output of one image is ``(5, GX, GY, GZ)`` on a grid ``output_stride`` times
coarser than the model input: channel 0 the centre heatmap in [0, 1], channel 1 the log
nodule diameter (mm), channels 2-4 the centre's offset from the cell, in cells. Output cell
``g`` is centred on model voxel ``stride * g``, so a centre lies at ``stride * (g + offset)``.

Peaks are the cells that equal the maximum of their 3x3x3 neighbourhood (max-pool NMS) and
reach ``min_score``; the regressed offset refines each to sub-cell precision; a greedy pass
then drops a peak closer to a stronger one than ``nms_radius_mm`` or the stronger one's radius.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lungscreen.errors import ModelError
from lungscreen.findings import ModelCandidate

CHANNELS = 5
HEATMAP, LOG_DIAMETER = 0, 1
OFFSET = slice(2, 5)
# Regressed diameters are clipped to a plausible nodule range (mm): an untrained or confused
# net must not report a 0.01 mm or 2 m "nodule".
DIAMETER_RANGE_MM = (1.0, 60.0)
# Peaks considered before the greedy NMS, per candidate finally kept.
PEAKS_PER_CANDIDATE = 20


def decode_center_heatmap(output: np.ndarray, spacing_mm: np.ndarray, decoding: dict) -> list[ModelCandidate]:
    """Candidates (model-voxel centres, mm diameters, heatmap scores), strongest first."""
    if output.ndim != 4 or output.shape[0] != CHANNELS:
        raise ModelError(f"output shape {output.shape} is not ({CHANNELS}, X, Y, Z)")
    stride = np.asarray(decoding.get("output_stride", (1, 1, 1)), dtype=np.float64)
    out = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))
    heat = out[HEATMAP]
    pooled = F.max_pool3d(heat[None, None], 3, stride=1, padding=1)[0, 0]
    peaks = torch.nonzero((heat == pooled) & (heat >= decoding["min_score"]))
    if len(peaks) == 0:
        return []
    scores = heat[peaks[:, 0], peaks[:, 1], peaks[:, 2]]
    order = torch.argsort(scores, descending=True)[: PEAKS_PER_CANDIDATE * decoding["max_candidates"]]

    kept: list[ModelCandidate] = []
    kept_mm: list[np.ndarray] = []
    for idx in order.tolist():
        cell = peaks[idx].numpy()
        x, y, z = cell.tolist()
        offset = out[OFFSET, x, y, z].numpy().astype(np.float64)
        centre = stride * (cell + offset)
        diameter = float(np.clip(np.exp(float(out[LOG_DIAMETER, x, y, z])), *DIAMETER_RANGE_MM))
        centre_mm = centre * spacing_mm
        if any(
            np.linalg.norm(centre_mm - other) < max(decoding["nms_radius_mm"], k.diameter_mm / 2)
            for k, other in zip(kept, kept_mm)
        ):
            continue
        kept.append(ModelCandidate(index_xyz=tuple(float(v) for v in centre), diameter_mm=diameter, score=float(scores[idx])))
        kept_mm.append(centre_mm)
        if len(kept) == decoding["max_candidates"]:
            break
    return kept
