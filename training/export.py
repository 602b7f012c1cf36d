"""Export a trained checkpoint to ONNX and write its model card.

``python -m lungscreen.training.export --checkpoint runs/default/checkpoint.pt --out models/nodulenet``
writes ``model.onnx`` (opset 17, dynamic batch and spatial axes) and ``model_card.json``, after
checking that ONNX Runtime and PyTorch agree on a random volume of an odd shape. The card's
calibration and operating points are placeholders until :mod:`training.calibrate` fits them
on validation scans, and its metrics are filled in by :mod:`training.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lungscreen.models.card import validate_card
from lungscreen.training.network import OUTPUT_STRIDE, NoduleNet
from lungscreen.training.spec import PREPROCESSING

ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "pytorch_weights.pt"  # state_dict of training.network.NoduleNet
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "output"
# Largest ONNX Runtime vs PyTorch difference accepted (float32 rounding through ~15 layers).
PARITY_TOLERANCE = 1e-4
# One pass over the whole volume up to 448 mm per axis (a chest CT at 2 mm is ~180^3); larger
# volumes go through MONAI's sliding window.
PATCH_SIZE = (224, 224, 224)
DECODING = {
    "kind": "center_heatmap_size",
    "min_score": 0.02,  # low: the FROC needs candidates down to 8 FP/scan; thresholds act later
    "nms_radius_mm": 6.0,
    "max_candidates": 50,
    "output_stride": [OUTPUT_STRIDE] * 3,
}
TRAINING_DATA = (
    "On-the-fly synthetic chest CT (training/synthetic.py: chest wall, ribs, spine, mediastinum, "
    "branching vessel trees, airways; LUNA16-like nodule sizes 3-30 mm, solid/part-solid/ground-glass, "
    "isolated/juxtavascular/juxtapleural; seeds 0-999999) and, for 20 % of the volumes, the real "
    "LIDC-IDRI-0001 series with synthetic nodules inserted into its lungs; no patch from LIDC-IDRI-0001 came "
    "within 45 mm of its LUNA16 nodule, and that region received no inserted nodules."
)


def load_model(checkpoint: Path) -> tuple[NoduleNet, dict]:
    """The network in eval mode and the checkpoint's bookkeeping (step, pool index)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = NoduleNet()
    model.load_state_dict(state["model"])
    return model.eval(), {k: state[k] for k in ("step", "pool_first_index")}


def load_weights(path: Path) -> NoduleNet:
    """The network from the weights file an export leaves beside the ONNX file (eval mode)."""
    model = NoduleNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def export_onnx(model: NoduleNet, path: Path) -> None:
    example = torch.zeros(1, 1, 64, 64, 64)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "x", 3: "y", 4: "z"}, OUTPUT_NAME: {0: "batch", 2: "gx", 3: "gy", 4: "gz"}},
        )


def parity_error(model: NoduleNet, path: Path, shape: tuple[int, ...] = (1, 1, 45, 38, 51), seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch on a random input."""
    x = torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        torch_out = model(x).numpy()
    if onnx_out.shape != torch_out.shape:
        raise AssertionError(f"ONNX output {onnx_out.shape} != PyTorch output {torch_out.shape}")
    return float(np.abs(onnx_out - torch_out).max())


def model_card(name: str, version: str, training_note: str = "") -> dict:
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "description": (
            "CenterNet-style 3D lung-nodule detector (training/network.py): a stride-4 dilated residual "
            "CNN predicting a nodule-centre heatmap, the log diameter and a sub-cell centre offset."
        ),
        "intended_use": (
            "Research use only. Not for diagnostic use. Detects candidate lung nodules (3-30 mm) in chest CT "
            "for research on screening workflows; trained on synthetic data, not validated clinically."
        ),
        "onnx_file": ONNX_FILE,
        "training_data": TRAINING_DATA + training_note,
        # training/synthetic.py renders the PSF of soft-tissue to standard kernels; LIDC-IDRI-0001 is GE STANDARD.
        "preferred_kernel": "soft",
        "metrics": [],
        "preprocessing": PREPROCESSING,
        # Padding to the output stride keeps sliding windows on the output grid (cell g = voxel 4 g).
        "inference": {
            "input_name": INPUT_NAME,
            "patch_size": list(PATCH_SIZE),
            "overlap": 0.25,
            "size_divisible_by": [OUTPUT_STRIDE] * 3,
        },
        "decoding": DECODING,
        # Placeholders until training.calibrate fits them on validation data.
        "calibration": {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 1.0]},
        "operating_points": {"screening": {"threshold": 0.5, "description": "uncalibrated placeholder"}},
        "default_operating_point": "screening",
    }


def export(checkpoint: Path, out_dir: Path, name: str, version: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model, info = load_model(checkpoint)
    onnx_path = out_dir / ONNX_FILE
    export_onnx(model, onnx_path)
    error = parity_error(model, onnx_path)
    if error > PARITY_TOLERANCE:
        raise AssertionError(f"ONNX Runtime and PyTorch differ by {error:.2e} > {PARITY_TOLERANCE:g}")
    # The PyTorch weights too (no optimiser state): the benchmark's reference runs them, and
    # fine-tuning starts from them. The ONNX graph has batch norms folded into convolutions.
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    note = f" Checkpoint after {info['step']} optimiser steps; its volume pool started at volume {info['pool_first_index']}."
    card = model_card(name, version, note)
    validate_card(card)
    card_path = out_dir / "model_card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB, parity error {error:.1e}), "
          f"{out_dir / WEIGHTS_FILE} and {card_path}")
    return card_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lungscreen.training.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/nodulenet")
    p.add_argument("--name", default="lungscreen-nodulenet")
    p.add_argument("--version", default="1.2.0")
    args = p.parse_args(argv)
    export(args.checkpoint, args.out, args.name, args.version)


if __name__ == "__main__":
    main()
