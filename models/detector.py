"""Inference with ONNX Runtime and decoding of the network output into nodule candidates.

The ONNX Runtime session is created once per detector and reused for every study. The
execution providers are the preferred ones that this ONNX Runtime build has: TensorRT,
then CUDA, then the CPU, which is always there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from models.card import ModelCard
from models.errors import ModelError
from models.findings import Candidate
from models.preprocess import PreprocessedImage, build_transform, preprocess

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """The providers to use, in order: ``requested`` (or our preference) filtered by availability."""
    available = set(ort.get_available_providers())
    wanted = requested or list(PROVIDER_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # the fallback that always works
    return chosen


@dataclass(frozen=True)
class ModelCandidate:
    """A detection in the model's voxel grid, before mapping back to the source volume."""

    index_xyz: tuple[float, float, float]
    diameter_mm: float
    score: float


class Detector:
    """One model card, one ONNX Runtime session, reused across studies (thread-safe run)."""

    def __init__(self, card: ModelCard, *, providers: list[str] | None = None, intra_op_threads: int = 0) -> None:
        self.card = card
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # 0 = ONNX Runtime's default (all cores)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(card.onnx_path), sess_options=options, providers=choose_providers(providers)
            )
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise ModelError(f"cannot load {card.onnx_path.name}: {exc}") from exc
        self.providers = self.session.get_providers()
        self.transform = build_transform(card.preprocessing)
        self._spacing = np.asarray(card.preprocessing["spacing_mm"], dtype=np.float64)
        log.info("model %s %s loaded, providers %s", card.name, card.version, self.providers)

    def preprocess(self, voxels: np.ndarray, affine_lps: np.ndarray) -> PreprocessedImage:
        return preprocess(voxels, affine_lps, self.transform)

    def infer(self, image: PreprocessedImage) -> np.ndarray:
        """Run the network; whole volume in one pass when it fits the patch, else sliding window."""
        spec = self.card.inference
        patch = tuple(spec["patch_size"])
        tensor = image.tensor[None]  # (1, 1, X, Y, Z)
        input_name = spec["input_name"]

        def run(batch: torch.Tensor) -> torch.Tensor:
            (out,) = self.session.run(None, {input_name: batch.numpy()})
            return torch.from_numpy(out)

        try:
            if all(s <= p for s, p in zip(tensor.shape[2:], patch)):
                return run(tensor)[0].numpy()
            with torch.no_grad():
                out = sliding_window_inference(tensor, patch, 1, run, overlap=spec["overlap"], mode="gaussian")
        except Exception as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        return out[0].numpy()

    def decode(self, output: np.ndarray) -> list[ModelCandidate]:
        """Turn the network output into scored candidates, as the card's ``decoding`` says."""
        decoding = self.card.decoding
        if decoding["kind"] != "multiscale_heatmap":
            raise ModelError(f"decoding {decoding['kind']!r} is not supported by this version")
        return decode_multiscale_heatmap(output, self._spacing, decoding)

    def detect(self, voxels: np.ndarray, affine_lps: np.ndarray) -> tuple[list[Candidate], PreprocessedImage]:
        """Source volume in, candidates in source-voxel coordinates ``(k, j, i)`` out."""
        image = self.preprocess(voxels, affine_lps)
        raw = self.decode(self.infer(image))
        return to_source_candidates(raw, image.index_to_lps, affine_lps), image


def to_source_candidates(
    raw: list[ModelCandidate], model_index_to_lps: np.ndarray, source_affine_lps: np.ndarray
) -> list[Candidate]:
    """Map model-grid candidates to fractional ``(k, j, i)`` indices of the source volume."""
    lps_to_source = np.linalg.inv(source_affine_lps)
    out = []
    for c in raw:
        lps = model_index_to_lps @ np.array([*c.index_xyz, 1.0])
        kji = lps_to_source @ lps
        out.append(Candidate(center_kji=tuple(float(v) for v in kji[:3]), diameter_mm=c.diameter_mm, score=c.score))
    return out


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
