"""Inference with ONNX Runtime and decoding of the network output into nodule candidates.

The ONNX Runtime session is created once per detector and reused for every study. The
execution providers are the preferred ones that this ONNX Runtime build has: TensorRT,
then CUDA, then the CPU, which is always there.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import torch
from monai.apps.detection.utils.detector_utils import pad_images
from monai.inferers import sliding_window_inference

from models.card import ModelCard
from models.decoding import decode
from models.errors import ModelError
from models.findings import Candidate, ModelCandidate
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
        divisible = spec.get("size_divisible_by")
        if divisible:
            # Zero-pad at the end (voxel indices unchanged) so that every window starts on the
            # network's grid; sliding_window_inference would otherwise pad symmetrically.
            tensor, _ = pad_images(tensor, 3, divisible)
            patch = tuple(min(p, s) for p, s in zip(patch, tensor.shape[2:]))

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
        return decode(output, self._spacing, self.card.decoding)

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
