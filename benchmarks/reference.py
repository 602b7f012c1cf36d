"""The reference way to run the same model on the same DICOM series, and ours, side by side.

Reference: MONAI ``LoadImage(reader="PydicomReader")`` -> ``Orientation`` -> ``Spacing`` ->
``ScaleIntensityRange`` -> ``SpatialCrop`` to the box the card's model sees (the lungs' box,
``models.detector.inference_box``) -> PyTorch ``sliding_window_inference`` (eager, gaussian
blending), then the same decoding. The network is the PyTorch equivalent of our ONNX model: for the
bundled blob filter the same difference-of-Gaussians bank as ``torch.nn.functional.conv3d``
(edge padding, as the ONNX graph); for the trained NoduleNet the ``training/`` network with
the PyTorch weights exported beside its ONNX file.

Ours: ``server.pipeline``'s stages up to the candidates (index the study, select the series,
build the volume, preprocess, ONNX Runtime inference, decode).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lungscreen.models.card import ModelCard
from lungscreen.models.decoding import decode
from lungscreen.models.detector import Detector, inference_box, lungs_on_model_grid
from lungscreen.models.preprocess import build_transform, hu_of

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
BLOB_FILTER_NAME = "lungscreen-blob-filter"


class TorchBlobFilter(torch.nn.Module):
    """``models/blob_filter.py``'s ONNX graph in PyTorch: separable Gaussian blurs (edge padded
    conv3d), differences of Gaussians scaled by 1 / (ratio - 1), one channel per diameter."""

    def __init__(self) -> None:
        super().__init__()
        from lungscreen.models import blob_filter as bf

        sigmas_mm = []
        for d in bf.SCALE_DIAMETERS_MM:
            sigma = d / 2.0 / math.sqrt(3.0)
            sigmas_mm.append((sigma / math.sqrt(bf.DOG_RATIO), sigma * math.sqrt(bf.DOG_RATIO)))
        self.levels = sorted({round(s, 6) for pair in sigmas_mm for s in pair})
        self.pairs = [(round(a, 6), round(b, 6)) for a, b in sigmas_mm]
        self.scale = 1.0 / (bf.DOG_RATIO - 1.0)
        self.kernels: list[torch.Tensor] = []
        current = 0.0
        for level in self.levels:
            step = math.sqrt(level**2 - current**2) / bf.SPACING_MM
            self.kernels.append(torch.from_numpy(bf._gaussian_kernel(step)))
            current = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = {}
        current = x
        for level, kernel in zip(self.levels, self.kernels):
            radius = len(kernel) // 2
            for axis in range(3):
                shape = [1, 1, 1, 1, 1]
                shape[2 + axis] = len(kernel)
                pad = [0] * 6  # F.pad order: last axis first
                pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
                current = F.conv3d(F.pad(current, pad, mode="replicate"), kernel.reshape(shape))
            blurred[level] = current
        return torch.cat([(blurred[a] - blurred[b]) * self.scale for a, b in self.pairs], dim=1)


def missing_torch_network(card: ModelCard) -> str | None:
    """Why the card's ONNX model has no PyTorch equivalent here, or None when it has one."""
    if card.name == BLOB_FILTER_NAME:
        return None
    from lungscreen.training.export import WEIGHTS_FILE

    weights = card.onnx_path.parent / WEIGHTS_FILE
    return None if weights.exists() else f"no PyTorch definition for {card.name}: {weights} is missing"


def torch_network(card: ModelCard) -> torch.nn.Module:
    """The PyTorch equivalent of the card's ONNX model; ``LookupError`` when there is none here."""
    missing = missing_torch_network(card)
    if missing:
        raise LookupError(missing)
    if card.name == BLOB_FILTER_NAME:
        return TorchBlobFilter().eval()
    from lungscreen.training.export import WEIGHTS_FILE, load_weights

    return load_weights(card.onnx_path.parent / WEIGHTS_FILE)


@dataclass
class CandidateRun:
    seconds: float
    stages: dict[str, float]
    lps: np.ndarray  # (N, 3) candidate centres, LPS mm
    scores: np.ndarray  # (N,)
    diameters: np.ndarray  # (N,)


def _as_arrays(raw, index_to_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not raw:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    idx = np.array([[*c.index_xyz, 1.0] for c in raw])
    lps = (index_to_lps @ idx.T).T[:, :3]
    return lps, np.array([c.score for c in raw]), np.array([c.diameter_mm for c in raw])


def run_ours(paths: list[Path], detector: Detector) -> CandidateRun:
    """Our path (``server.pipeline.analyze_study``'s stages) from files to candidates."""
    from lungscreen.dicom_io.select import SelectionRules, choose_series
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    index = index_study(paths)
    choice = choose_series(list(index.series), SelectionRules())
    if choice.selected is None:
        raise RuntimeError("no eligible series")
    series = choice.selected
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    t1 = time.perf_counter()
    image = detector.preprocess(volume.voxels, volume.affine)
    t2 = time.perf_counter()
    output = detector.infer(image)
    t3 = time.perf_counter()
    raw = detector.decode(output)
    t4 = time.perf_counter()
    stages.update(load=t1 - t0, preprocess=t2 - t1, inference=t3 - t2, decode=t4 - t3)
    return CandidateRun(t4 - t0, stages, *_as_arrays(raw, image.index_to_lps))


def run_reference(folder: Path, card: ModelCard, network: torch.nn.Module) -> CandidateRun:
    """The reference way: MONAI loading and transforms, eager PyTorch sliding window."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import EnsureChannelFirst, LoadImage, SpatialCrop

    pre = card.preprocessing
    spec = card.inference
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    image = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    image = EnsureChannelFirst()(image)
    t1 = time.perf_counter()
    image = build_transform(pre)(image)  # MONAI Orientation, Spacing, ScaleIntensityRange, run eagerly
    # The card's input contract includes the box the network sees (the lungs' box); MONAI
    # crops to the same box, found the same way.
    hu = hu_of(image[0].numpy(), pre)
    box = inference_box(hu, lungs_on_model_grid(hu, card), card)
    if box is not None:
        image = SpatialCrop(roi_slices=box)(image)
    t2 = time.perf_counter()
    tensor = image.as_tensor().float()[None]
    patch = tuple(spec["patch_size"])
    if spec.get("size_divisible_by"):
        # As MONAI's detection inferers do: zero-pad at the end to the network's grid
        # (sliding_window_inference would pad symmetrically and shift a strided output grid).
        from monai.apps.detection.utils.detector_utils import pad_images

        tensor, _ = pad_images(tensor, 3, spec["size_divisible_by"])
    patch = tuple(min(p, s) for p, s in zip(patch, tensor.shape[2:]))  # no window larger than the image
    with torch.no_grad():
        output = sliding_window_inference(tensor, patch, 1, network, overlap=spec["overlap"], mode="gaussian")
    t3 = time.perf_counter()
    raw = decode(output[0].numpy(), np.asarray(pre["spacing_mm"], dtype=np.float64), card.decoding)
    t4 = time.perf_counter()
    stages.update(load=t1 - t0, preprocess=t2 - t1, inference=t3 - t2, decode=t4 - t3)
    index_to_lps = LPS_TO_RAS @ image.affine.numpy().astype(np.float64)
    return CandidateRun(t4 - t0, stages, *_as_arrays(raw, index_to_lps))


def compare_candidates(ours: CandidateRun, ref: CandidateRun, *, tolerance_mm: float = 2.0, min_score: float = 0.0) -> dict:
    """Greedy matching by distance (strongest first) of candidates scoring at least ``min_score``."""
    a = np.flatnonzero(ours.scores >= min_score)
    b = np.flatnonzero(ref.scores >= min_score)
    a = a[np.argsort(-ours.scores[a])]
    unmatched = set(b.tolist())
    distances, score_diffs = [], []
    for i in a:
        if not unmatched:
            break
        cands = np.array(sorted(unmatched))
        d = np.linalg.norm(ref.lps[cands] - ours.lps[i], axis=1)
        j = int(np.argmin(d))
        if d[j] <= tolerance_mm:
            unmatched.discard(int(cands[j]))
            distances.append(float(d[j]))
            score_diffs.append(abs(float(ours.scores[i] - ref.scores[cands[j]])))
    matched = len(distances)
    return {
        "ours": int(len(a)),
        "reference": int(len(b)),
        "matched": matched,
        "min_score": min_score,
        "tolerance_mm": tolerance_mm,
        "max_distance_mm": round(max(distances), 3) if distances else None,
        "max_score_diff": round(max(score_diffs), 4) if score_diffs else None,
        "agree": matched == len(a) == len(b),
    }


def reported_min_score(card: ModelCard, *runs: CandidateRun) -> float | None:
    """The lowest raw score among candidates the default operating point reports in any of
    ``runs`` (calibrated probability >= its threshold); None when none is reported."""
    from lungscreen.models.calibrate import calibrate

    threshold = card.operating_point(None).threshold
    reported = [run.scores[np.asarray(calibrate(list(run.scores), card.calibration)) >= threshold]
                for run in runs if len(run.scores)]
    scores = np.concatenate(reported) if reported else np.zeros(0)
    return float(scores.min()) if scores.size else None


# --- each way in a process of its own -----------------------------------------------------------

OURS, REFERENCE = "ours", "reference"
# Runs before the timed ones: libraries, page cache, and the heap of a long-lived process
# (ours reaches its steady state, every block reused, after two or three studies).
WARM_UP_RUNS = 3


def run_in_process(folder: Path, card_path: Path | None, way: str, reps: int) -> list[CandidateRun]:
    """``reps`` timed runs of one way, after ``WARM_UP_RUNS``, in a fresh Python process.

    Each way runs as it would be deployed: ours as the server's analysis worker
    (``server.process_tuning``), the reference as a plain MONAI script. Sharing one process
    would hand each the other's heap and garbage-collector state (the reference's
    ``PydicomReader`` took up to twice as long in a process holding a benchmark's objects).
    """
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        args = [sys.executable, "-m", "lungscreen.benchmarks.reference", way, str(folder), str(reps), str(out)]
        if card_path is not None:
            args.append(str(card_path))
        result = subprocess.run(args, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"{way} run failed:\n{result.stderr[-3000:]}")
        runs = json.loads(out.read_text())
    return [
        CandidateRun(r["seconds"], r["stages"], np.array(r["lps"]).reshape(-1, 3), np.array(r["scores"]), np.array(r["diameters"]))
        for r in runs
    ]


def _main(argv: list[str]) -> None:
    import json
    from functools import partial

    from lungscreen.models.card import DEFAULT_MODEL_CARD, load_card

    way, folder, reps, out = argv[0], Path(argv[1]), int(argv[2]), Path(argv[3])
    card = load_card(Path(argv[4]) if len(argv) > 4 else DEFAULT_MODEL_CARD)
    if way == OURS:
        from lungscreen.server.process_tuning import tune_analysis_process

        detector = Detector(card)
        tune_analysis_process()  # as server.workers does once the model is loaded
        run = partial(run_ours, sorted(folder.glob("*.dcm")), detector)
    elif way == REFERENCE:
        run = partial(run_reference, folder, card, torch_network(card))
    else:
        raise SystemExit(f"unknown way {way!r}: {OURS} or {REFERENCE}")
    for _ in range(WARM_UP_RUNS):
        run()
    runs = [run() for _ in range(reps)]
    out.write_text(json.dumps([
        {"seconds": r.seconds, "stages": r.stages, "lps": r.lps.tolist(), "scores": r.scores.tolist(),
         "diameters": r.diameters.tolist()}
        for r in runs
    ]))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
