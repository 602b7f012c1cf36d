"""Inference with ONNX Runtime and decoding of the network output into nodule candidates.

The ONNX Runtime session is created once per detector and reused for every study. The
execution providers are the preferred ones that this ONNX Runtime build has: TensorRT,
then CUDA, then the CPU, which is always there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from monai.apps.detection.utils.detector_utils import pad_images
from monai.inferers import sliding_window_inference

from lungscreen.models.card import ModelCard
from lungscreen.models.decoding import decode
from lungscreen.errors import LungScreenError, ModelError
from lungscreen.findings import Candidate, ModelCandidate
from lungscreen.models.lungs import distance_outside_mm, lung_mask_xyz
from lungscreen.models.second_stage import SecondStage
from lungscreen.models.preprocess import PreprocessedImage, bounding_box, build_transform, crop_to_box, hu_of, preprocess
from lungscreen.models.remote import InferenceServerUnavailable, RemoteModelMismatch, TritonRunner

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

BODY_THRESHOLD_HU = -500.0  # soft tissue, bone, the table: the body's box when no lungs are found
CROP_MARGIN_MM = 10.0
LUNG_SEARCH_MM = 30.0  # candidates farther than this from the lungs are "far outside" (inf)


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """The providers to use, in order: ``requested`` (or our preference) filtered by availability."""
    available = set(ort.get_available_providers())
    wanted = requested or list(PROVIDER_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # the fallback that always works
    return chosen


def lungs_on_model_grid(hu: np.ndarray, card: ModelCard) -> np.ndarray | None:
    """The lungs in a preprocessed image's HU values; None when its slices are not along the
    last axis or no lungs are found."""
    if card.preprocessing["orientation"][2] not in "SI":
        return None
    lungs = lung_mask_xyz(hu, fill_vessels=False)
    return lungs if lungs.any() else None


def inference_box(hu: np.ndarray, lungs: np.ndarray | None, card: ModelCard) -> tuple[slice, slice, slice] | None:
    """The part of a preprocessed image the network sees: the lungs' box (the body's when no
    lungs are found) plus ``CROP_MARGIN_MM``, starting on the network's grid. It saves the
    network the air around the patient and the abdomen. None: all of it (the card's
    ``inference.crop_to_body: false``, or nothing but air).

    Part of the model's input contract: the network's receptive field is larger than the
    margin, so scores change with the box; operating points are calibrated with it.
    """
    spec = card.inference
    if not spec.get("crop_to_body", True):
        return None
    region = lungs if lungs is not None else hu > BODY_THRESHOLD_HU
    spacing = np.asarray(card.preprocessing["spacing_mm"], dtype=np.float64)
    return bounding_box(region, CROP_MARGIN_MM, spacing, tuple(spec.get("size_divisible_by", (1, 1, 1))))


UNAVAILABLE_POLICIES = ("wait", "local")


@dataclass(frozen=True)
class InferenceSite:
    """Where a study's network ran, and what crossed the wire when it ran remotely."""

    where: str  # "local" (ONNX Runtime in this process) or "remote" (Triton)
    description: str
    fallback_reason: str | None = None  # why a remote run fell back to the local session
    requests: int = 0
    bytes_sent: int = 0
    remote_seconds: float = 0.0
    retries: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Detector:
    """One model card, one ONNX Runtime session, reused across studies (thread-safe run; with
    ``remote``, one study at a time, as each analysis worker process runs, so that its counts are per study).

    With ``remote`` (a :class:`models.remote.TritonRunner`) the network runs on Triton instead;
    when Triton is unavailable, ``unavailable="wait"`` raises :class:`InferenceServerUnavailable`
    (the study is retried later) and ``"local"`` runs the local session and says so.
    """

    def __init__(
        self,
        card: ModelCard,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        remote: TritonRunner | None = None,
        unavailable: str = "wait",
    ) -> None:
        if unavailable not in UNAVAILABLE_POLICIES:
            raise ValueError(f"unavailable must be one of {UNAVAILABLE_POLICIES}, not {unavailable!r}")
        self.card = card
        self.remote = remote
        self.unavailable = unavailable
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
        section = card.raw.get("second_stage")
        # The card's second stage (models/second_stage.py), None when it has none.
        self.second_stage = (
            SecondStage.from_card_section(card.path, section, intra_op_threads) if section else None
        )
        log.info("model %s %s loaded, providers %s", card.name, card.version, self.providers)

    def preprocess(self, voxels: np.ndarray, affine_lps: np.ndarray) -> PreprocessedImage:
        """The card's preprocessing, the lungs on the model's grid, then the box the network sees."""
        image = preprocess(voxels, affine_lps, self.transform)
        hu = hu_of(image.tensor[0].numpy(), self.card.preprocessing)
        lungs = lungs_on_model_grid(hu, self.card)
        image = PreprocessedImage(image.tensor, image.index_to_lps, lungs)
        box = inference_box(hu, lungs, self.card)
        return image if box is None else crop_to_box(image, box)

    def infer(self, image: PreprocessedImage) -> np.ndarray:
        """Run the network; whole volume in one pass when it fits the patch, else sliding window."""
        return self.infer_with_site(image)[0]

    def infer_with_site(self, image: PreprocessedImage) -> tuple[np.ndarray, InferenceSite]:
        """:meth:`infer`, and where it ran."""
        local = InferenceSite("local", f"ONNX Runtime on this node ({', '.join(self.providers)})")
        if self.remote is None:
            return self._infer(image, self._run_locally, 1), local
        self.remote.take_calls()  # count this study's requests only
        try:
            output = self._infer(image, self.remote, self.remote.windows_per_request)
        except (InferenceServerUnavailable, RemoteModelMismatch) as exc:  # down, slow, or another model now
            if self.unavailable != "local":
                raise
            log.warning("inference server unavailable, running locally instead: %s", exc)
            calls = self.remote.take_calls()
            site = InferenceSite("local", f"{local.description}, the inference server being unavailable",
                                 fallback_reason=str(exc), retries=calls.retries)
            return self._infer(image, self._run_locally, 1), site
        calls = self.remote.take_calls()
        return output, InferenceSite(
            "remote", self.remote.description, requests=calls.requests, bytes_sent=calls.bytes_sent,
            remote_seconds=round(calls.seconds, 4), retries=calls.retries,
        )

    def _run_locally(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {self.card.inference["input_name"]: batch})
        return out

    def _infer(self, image: PreprocessedImage, runner, windows_per_request: int) -> np.ndarray:
        """The network on ``image`` through ``runner`` (a batch of inputs in, outputs out)."""
        spec = self.card.inference
        patch = tuple(spec["patch_size"])
        tensor = image.tensor[None]  # (1, 1, X, Y, Z)
        divisible = spec.get("size_divisible_by")
        if divisible:
            # Zero-pad at the end (voxel indices unchanged) so that every window starts on the
            # network's grid; sliding_window_inference would otherwise pad symmetrically.
            tensor, _ = pad_images(tensor, 3, divisible)
        # No window larger than the image: sliding_window_inference would pad it with zeros,
        # edges where the image has none.
        patch = tuple(min(p, s) for p, s in zip(patch, tensor.shape[2:]))

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(runner(batch.numpy()))

        try:
            if all(s <= p for s, p in zip(tensor.shape[2:], patch)):
                return run(tensor)[0].numpy()
            with torch.no_grad():
                out = sliding_window_inference(
                    tensor, patch, windows_per_request, run, overlap=spec["overlap"], mode="gaussian"
                )
        except LungScreenError:
            raise
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
        return to_source_candidates(raw, image, affine_lps), image


def to_source_candidates(
    raw: list[ModelCandidate], image: PreprocessedImage, source_affine_lps: np.ndarray
) -> list[Candidate]:
    """Map model-grid candidates to fractional ``(k, j, i)`` indices of the source volume,
    with how far each one's surface lies outside the lungs (when they were segmented)."""
    lps_to_source = np.linalg.inv(source_affine_lps)
    spacing = np.linalg.norm(image.index_to_lps[:3, :3], axis=0)
    out = []
    for c in raw:
        lps = image.index_to_lps @ np.array([*c.index_xyz, 1.0])
        kji = lps_to_source @ lps
        outside = None
        if image.lungs is not None:
            centre = distance_outside_mm(image.lungs, c.index_xyz, spacing, LUNG_SEARCH_MM)
            outside = max(centre - c.diameter_mm / 2.0, 0.0)
        out.append(
            Candidate(
                center_kji=tuple(float(v) for v in kji[:3]), diameter_mm=c.diameter_mm, score=c.score,
                outside_lungs_mm=outside,
            )
        )
    return out
