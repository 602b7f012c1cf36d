"""End to end on a tiny synthetic set: train a few steps, resume, export, ONNX parity, card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lungscreen.models.card import load_card, validate_card
from lungscreen.models.detector import Detector
from lungscreen.training import train as train_module
from lungscreen.training.export import export, model_card, parity_error
from lungscreen.training.network import NoduleNet
from lungscreen.training.scan import Nodule, Scan, axial_affine
from lungscreen.training.synthetic import make_chest_ct


def _tiny_scan(index: int, *_args) -> Scan:
    ct = make_chest_ct(index, shape=(24, 64, 64), spacing=(2.5, 2.5, 2.5), n_nodules=1, nodule_diameters_mm=(8.0, 12.0))
    return Scan(f"tiny-{index}", ct.hu, axial_affine(ct.spacing, ct.origin_lps), tuple(Nodule(n.center_lps_mm, n.diameter_mm) for n in ct.nodules))


@pytest.fixture()
def tiny_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "synthetic_scan", _tiny_scan)
    monkeypatch.setattr("lungscreen.training.dataset.PATCH_SIZE", (32, 32, 32))


def _args(out: Path, steps: int) -> list[str]:
    return ["--out", str(out), "--steps", str(steps), "--batch-size", "2", "--pool-size", "1", "--refresh-every", "2",
            "--real-fraction", "0", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu"]  # fmt: skip


def test_train_resume_export(tmp_path: Path, tiny_training: None) -> None:
    run = tmp_path / "run"
    checkpoint = train_module.train(train_module.parser().parse_args(_args(run, 2)))
    train_module.train(train_module.parser().parse_args(_args(run, 3)))  # resumes at step 2
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in log)

    card_path = export(checkpoint, tmp_path / "model", "test-net", "0.0.1")
    card = load_card(card_path)
    assert card.onnx_path.stat().st_size < 20e6
    scan = _tiny_scan(5)
    candidates, _ = Detector(card, intra_op_threads=1).detect(scan.voxels, scan.affine)
    assert all(c.score >= card.decoding["min_score"] for c in candidates)


def test_onnx_matches_pytorch(tmp_path: Path) -> None:
    from lungscreen.training.export import export_onnx

    model = NoduleNet().eval()
    export_onnx(model, tmp_path / "m.onnx")
    assert parity_error(model, tmp_path / "m.onnx", shape=(1, 1, 23, 30, 17)) < 1e-4


def test_card_validates() -> None:
    validate_card(model_card("lungscreen-nodulenet", "1.0.0"))
