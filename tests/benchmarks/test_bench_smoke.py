"""Smoke tests of the benchmark harness on tiny inputs (no timing assertions)."""

from __future__ import annotations

import json
import shutil

import pytest

from lungscreen.benchmarks.harness import in_netns
from lungscreen.benchmarks.reference import (
    TorchBlobFilter, compare_candidates, run_ours, run_reference, torch_network,
)
from lungscreen.benchmarks.suite import Config, StudyFactory, device_info, markdown, run_suite, write_outputs
from lungscreen.models.card import BLOB_FILTER_CARD, DEFAULT_MODEL_CARD, load_card
from lungscreen.models.detector import Detector

TINY = dict(rows=64, ingest_slices=40, e2e_slices=40, e2e_reps=2, ingest_reps=1, ingest_senders=(1, 2), aggregate_reps=1,
            reference_reps=1, scaling_slices=(32, 40), scaling_reps=1, senders=2, studies_per_sender=1, load_slices=32,
            idle_default_s=0.5, warmup_slices=32, base_slices=20, reference_volume="synthetic")


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    return StudyFactory(tmp_path_factory.mktemp("bench"), rows=64, base_slices=20)


@pytest.mark.parametrize("card_path", [BLOB_FILTER_CARD, DEFAULT_MODEL_CARD], ids=["blob-filter", "default"])
def test_reference_path_finds_the_same_candidates(factory, card_path):
    card = load_card(card_path)
    try:
        network = torch_network(card)
    except LookupError as exc:
        pytest.skip(str(exc))
    _, files = factory.study(40)
    # The reference crops to the box the card's model sees, as ours does: the same arithmetic,
    # so every candidate agrees, with the crop and without it.
    for crop in (True, False):
        card.raw["inference"]["crop_to_body"] = crop
        ref = run_reference(files[0].parent, card, network)
        ours = run_ours(files, Detector(card))
        same = compare_candidates(ours, ref)
        assert same["agree"] and same["max_score_diff"] < 1e-3, (crop, same)
    assert set(ours.stages) == set(ref.stages) == {"load", "preprocess", "inference", "decode"}


def test_torch_blob_filter_matches_onnx():
    import numpy as np
    import onnxruntime as ort
    import torch

    card = load_card(BLOB_FILTER_CARD)
    x = np.random.default_rng(0).random((1, 1, 30, 28, 26), dtype=np.float32)
    (expected,) = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.no_grad():
        got = TorchBlobFilter()(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_device_info_names_cpu_providers_and_model():
    info = device_info()
    assert info["cores"] >= 1 and info["cpu_model"]
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["model"]["name"]


@pytest.mark.skipif(not in_netns(), reason="storescp listens on all interfaces: run through scripts/test.sh")
@pytest.mark.skipif(shutil.which("storescu") is None or shutil.which("storescp") is None, reason="dcmtk missing")
def test_tiny_suite_writes_every_key(tmp_path):
    # The blob filter's PyTorch twin is a filter bank; the trained model's is the training
    # network with the weights exported beside its ONNX file.
    results = run_suite(Config(**TINY, model=BLOB_FILTER_CARD), tmp_path, log=lambda m: None)
    md = write_outputs(results, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("ingest_mb_s", "dcmtk_ingest_mb_s", "ingest_ratio_vs_dcmtk", "e2e_p50_s", "e2e_p95_s", "stages",
                "reference_s", "speedup_vs_reference", "studies_per_hour", "peak_rss_mb", "scaling", "device",
                "targets"):
        assert key in data, key
    for stat in (data["ingest_mb_s"], data["reference_s"]):
        assert {"median", "min", "max", "n"} <= set(stat)
    assert set(data["e2e_p50_s"]) == {"idle_0.5s", "idle_0.2s"}
    assert set(data["aggregate_ingest_mb_s"]) == {"1", "2"}
    assert all(v["median"] > 0 for v in data["aggregate_ingest_mb_s"].values())
    assert data["targets"]["aggregate_ingest_growth"]["value"] > 0
    assert {"receive", "assemble", "preprocess", "inference", "postprocess", "report", "deliver"} <= set(data["stages"])
    assert set(data["scaling"]["by_slices"]) == {"32", "40"}
    assert data["load"]["delivered"] == 2
    assert {"agree", "matched", "ours", "reference"} <= set(data["reference"]["candidates_all"])
    assert md.read_text() == markdown(data)
