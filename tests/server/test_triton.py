"""Inference on a shared Triton Inference Server: the model repository, the bundled server,
LungScreen nodes that send their model input to it, and what happens when it goes away.

One real ``tritonserver`` (from nvidia-pytriton, made by scripts/install_triton.sh, CPU,
Python backend running ONNX Runtime) serves every test of this module; the fault tests at the
end kill and stop it, so they come last. The model is the fixed-weight test model: these tests
prove the path, not detection quality.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from google.protobuf import text_format

from lungscreen.models.card import BLOB_FILTER_CARD, DEFAULT_MODEL_CARD, ModelCard, load_card
from lungscreen.models.remote import (
    REQUEST_ATTEMPTS, InferenceServerUnavailable, RemoteModelMismatch, TritonRunner, triton_version,
)
from lungscreen.server.config import Settings
from lungscreen.server.pipeline import analyze_study
from lungscreen.server.triton import (
    TritonEnvironment, TritonNotInstalled, TritonPorts, TritonServer, config_pbtxt, export_repository,
)
from lungscreen.server.workers import build_analyzer
from peers import REPO, LungScreen, free_port, needs_binary, storescu, wait_until
from test_end_to_end import phantom_study

try:
    TRITON_ENV = TritonEnvironment.find()
    NO_TRITON = ""
except TritonNotInstalled as exc:
    TRITON_ENV, NO_TRITON = None, str(exc)
needs_triton = pytest.mark.skipif(TRITON_ENV is None, reason=f"bundled Triton server not installed: {NO_TRITON}")

BLOB = load_card(BLOB_FILTER_CARD)
SPHERES = (((20, 50, 50), 10.0), ((20, 90, 80), 14.0))


# --- the model repository ----------------------------------------------------------------------


def parse_config(text: str):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_onnxruntime_repository_is_a_valid_triton_model_config(tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    card = load_card(DEFAULT_MODEL_CARD)
    model_dir = export_repository(card, tmp_path, backend="onnxruntime")
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert (config.name, config.platform) == ("lungscreen-nodulenet", "onnxruntime_onnx")
    assert list(config.version_policy.specific.versions) == [triton_version(card.version)]
    assert config.max_batch_size >= 4 and config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 1)]
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP32"  # the card does not allow fp16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", pb.TYPE_FP32, [1, -1, -1, -1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [5, -1, -1, -1])]
    assert config.parameters["lungscreen_card_version"].string_value == card.version
    assert (model_dir / str(triton_version(card.version)) / "model.onnx").read_bytes() == card.onnx_path.read_bytes()
    assert json.loads((model_dir / "model_card.json").read_text()) == card.raw  # the card travels with it


def test_fp16_only_where_the_card_allows_it_and_the_python_form(tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    raw = json.loads(BLOB_FILTER_CARD.read_text())
    raw["inference"]["fp16_allowed"] = True
    card = ModelCard(path=BLOB.path, raw=raw)
    trt = parse_config(config_pbtxt(card, "onnxruntime")).optimization.execution_accelerators.gpu_execution_accelerator
    assert trt[0].parameters["precision_mode"] == "FP16"
    model_dir = export_repository(BLOB, tmp_path, backend="python")
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.backend == "python" and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert "onnxruntime" in (model_dir / "1000000" / "model.py").read_text()
    with pytest.raises(ValueError, match="backend must be one of"):
        config_pbtxt(BLOB, "tensorflow")


# --- one Triton server for the rest of the module ----------------------------------------------

_major, _minor, _patch = load_card(DEFAULT_MODEL_CARD).version.split(".")
NEWER_VERSION = f"{_major}.{_minor}.{int(_patch) + 1}"  # what the shared server serves under the default name


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """The bundled server with the test model (python backend), and the detector under a card
    whose version differs from the repository's (the default card's version served one patch later)."""
    if TRITON_ENV is None:
        pytest.skip(f"bundled Triton server not installed: {NO_TRITON}")
    root = tmp_path_factory.mktemp("triton")
    export_repository(BLOB, root / "repository", backend="python")
    newer = dict(json.loads(DEFAULT_MODEL_CARD.read_text()), version=NEWER_VERSION)
    export_repository(ModelCard(path=load_card(DEFAULT_MODEL_CARD).path, raw=newer), root / "repository",
                      backend="python")
    server = TritonServer(root / "repository", TritonPorts(free_port(), free_port(), free_port()), env=TRITON_ENV,
                          log_path=root / "tritonserver.log")
    with server:
        yield server


def triton_metric(triton: TritonServer, name: str, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.ports.metrics}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)]
    return sum(values)


def lungscreen_metric(node: LungScreen, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=5) as answer:
        match = re.search(rf"^{name} (\S+)$", answer.read().decode(), re.M)
    return float(match.group(1)) if match else 0.0


def remote_node(tmp: Path, triton: TritonServer, **config) -> LungScreen:
    return LungScreen(tmp, idle_seconds=0.5, config={"inference_server": triton.grpc_url, **config})


def sr_files(node: LungScreen, study_uid: str) -> list[Path]:
    found = [p for p in node.data_dir.joinpath("reports").rglob("*") if p.is_file()]
    srs = [p for p in found if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    assert all(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == study_uid for p in srs)
    return srs


def algorithm_description(sr: Path) -> str:
    """The SR's Contributing Equipment item of the algorithm (IHE AIR), not the scanner's."""
    (item,) = [e for e in pydicom.dcmread(sr).ContributingEquipmentSequence if "DeviceUID" in e]
    return item.ContributionDescription


def assert_same_findings(remote: list[dict], local: list[dict]) -> None:
    assert len(remote) == len(local) > 0
    for r, l in zip(sorted(remote, key=lambda f: f["center_lps_mm"]), sorted(local, key=lambda f: f["center_lps_mm"])):
        assert max(abs(a - b) for a, b in zip(r["center_lps_mm"], l["center_lps_mm"])) <= 1.0
        assert abs(r["probability"] - l["probability"]) <= 1e-3


@needs_triton
@needs_binary("storescu")
def test_study_through_triton_equals_local_inference_and_triton_counts_it(tmp_path, triton):
    study = phantom_study(tmp_path / "study", spheres=SPHERES)
    before = triton_metric(triton, "nv_inference_request_success", BLOB.name)
    node = remote_node(tmp_path / "node", triton)
    with node.running():
        storescu(list(study.paths), node.port)
        job = node.wait_for_state(study.study_instance_uid, ("reported",), timeout=120)
        requests_sent = lungscreen_metric(node, "lungscreen_remote_inference_requests_total")
        bytes_sent = lungscreen_metric(node, "lungscreen_remote_inference_bytes_sent_total")
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/review/{study.study_instance_uid}") as page:
            review = page.read().decode()
    inference = job["details"]["inference"]
    assert inference["where"] == "remote" and "Triton Inference Server" in inference["description"]
    assert inference["description"] in review
    assert requests_sent == inference["requests"] >= 1 and bytes_sent == inference["bytes_sent"] > 0
    assert triton_metric(triton, "nv_inference_request_success", BLOB.name) - before == inference["requests"]
    (sr,) = sr_files(node, study.study_instance_uid)
    description = algorithm_description(sr)
    assert "network run by Triton Inference Server" in description

    local = analyze_study(study.paths, build_analyzer(Settings(model=BLOB_FILTER_CARD, data_dir=tmp_path / "local")))
    assert local.inference["where"] == "local"
    assert_same_findings(job["details"]["findings"], list(local.findings))


@needs_triton
@needs_binary("storescu")
def test_two_nodes_share_one_triton_and_each_reports_its_own_study(tmp_path, triton):
    studies = [phantom_study(tmp_path / f"study{n}", spheres=SPHERES) for n in (1, 2)]
    nodes = [remote_node(tmp_path / f"node{n}", triton) for n in (1, 2)]
    with nodes[0].running(), nodes[1].running():
        for node, study in zip(nodes, studies):
            storescu(list(study.paths), node.port)
        jobs = [node.wait_for_state(s.study_instance_uid, ("reported",), timeout=180) for node, s in zip(nodes, studies)]
        assert nodes[0].study(studies[1].study_instance_uid) is None  # nothing crosses between the sites
        assert nodes[1].study(studies[0].study_instance_uid) is None
    for node, study, job in zip(nodes, studies, jobs):
        assert job["runs"] == 1 and job["details"]["inference"]["where"] == "remote"
        assert len(sr_files(node, study.study_instance_uid)) == 1


@needs_triton
def test_a_repository_whose_version_differs_from_the_card_is_refused(tmp_path, triton):
    """The repository serves the default card's model one patch later; the node's card is the default."""
    args = [sys.executable, "-m", "lungscreen.server.cli", "serve", "--data-dir", str(tmp_path / "data"),
            "--port", str(free_port()), "--http-port", "0", "--model", str(DEFAULT_MODEL_CARD),
            "--inference-server", triton.grpc_url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    card = load_card(DEFAULT_MODEL_CARD)
    assert f"no ready lungscreen-nodulenet version {triton_version(card.version)} (model card {card.version})" in done.stderr
    assert f"lungscreen-nodulenet {triton_version(NEWER_VERSION)} (READY)" in done.stderr


@needs_triton
def test_other_weights_under_the_same_name_and_version_are_refused(triton):
    """A card naming the served model and version, but other weights (another ONNX file)."""
    raw = json.loads(BLOB_FILTER_CARD.read_text())
    impostor = ModelCard(path=load_card(DEFAULT_MODEL_CARD).path, raw=dict(raw, onnx_file="model.onnx"))
    with pytest.raises(RemoteModelMismatch, match="lungscreen_onnx_sha256=.* differs from model card"):
        TritonRunner(triton.grpc_url, impostor).verify()


@needs_triton
def test_a_request_past_its_deadline_is_sent_again_then_reported_unavailable(triton):
    runner = TritonRunner(triton.grpc_url, BLOB, timeout_s=0.001)  # no answer comes that fast
    with pytest.raises(InferenceServerUnavailable, match=f"failed {REQUEST_ATTEMPTS} attempts"):
        runner(np.zeros((1, 1, 64, 64, 64), np.float32))
    calls = runner.take_calls()
    assert (calls.requests, calls.retries) == (0, REQUEST_ATTEMPTS)
    runner.timeout_s = 60.0
    assert runner(np.zeros((1, 1, 64, 64, 64), np.float32)).shape == (1, 6, 64, 64, 64)
    assert runner.take_calls().requests == 1


@needs_triton
def test_sliding_windows_go_four_to_a_request_and_match_local_inference(triton):
    """A patch smaller than the image: 8 windows (2 per axis) in 2 requests, blended as locally."""
    import torch

    from lungscreen.models.detector import Detector
    from lungscreen.models.preprocess import PreprocessedImage

    raw = json.loads(BLOB_FILTER_CARD.read_text())
    small = ModelCard(path=BLOB.path, raw=dict(raw, inference=dict(raw["inference"], patch_size=[32, 32, 32])))
    image = PreprocessedImage(torch.from_numpy(np.random.default_rng(0).random((1, 48, 48, 48), np.float32)), np.eye(4))
    local = Detector(small).infer(image)
    remote, site = Detector(small, remote=TritonRunner(triton.grpc_url, small)).infer_with_site(image)
    assert (site.where, site.requests, site.bytes_sent) == ("remote", 2, 8 * 32**3 * 4)
    np.testing.assert_allclose(remote, local, atol=1e-5)


# --- faults (these stop the shared server: keep them last) --------------------------------------


@needs_triton
@needs_binary("storescu")
def test_triton_killed_mid_study_with_wait_ends_in_one_sr_once_it_is_back(tmp_path, triton):
    study = phantom_study(tmp_path / "study", spheres=SPHERES)
    node = remote_node(tmp_path / "node", triton, retry_base_delay_s=0.5)
    with node.running():
        storescu(list(study.paths), node.port)
        # SIGKILL, as a crash, with the study received and in its quiet period (0.5 s): a kill
        # timed into the one short request would make the test depend on the machine's speed.
        triton.kill()

        def waiting():
            job = node.study(study.study_instance_uid)
            return job if job and job["state"] == "queued" and "inference server" in (job["reason"] or "") else None

        wait_until(waiting, 120, 0.2, what="the study to wait for the inference server")
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz").read())
        assert health["status"] == "degraded" and "inference server" in health["reason"]
        assert lungscreen_metric(node, "lungscreen_remote_inference_unavailable_total") >= 1
        triton.start()  # back on the same ports with the same repository
        job = node.wait_for_state(study.study_instance_uid, ("reported",), timeout=180)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz").read())
    assert job["runs"] == 1 and job["details"]["inference"]["where"] == "remote"
    assert health["status"] == "ok"
    assert len(sr_files(node, study.study_instance_uid)) == 1


@needs_triton
@needs_binary("storescu")
def test_triton_stopped_with_local_falls_back_and_says_so(tmp_path, triton):
    study = phantom_study(tmp_path / "study", spheres=SPHERES)
    node = remote_node(tmp_path / "node", triton, inference_server_unavailable="local")
    with node.running():
        triton.stop()
        storescu(list(study.paths), node.port)
        job = node.wait_for_state(study.study_instance_uid, ("reported",), timeout=180)
        assert lungscreen_metric(node, "lungscreen_remote_inference_fallbacks_total") == 1
    inference = job["details"]["inference"]
    assert inference["where"] == "local" and "inference server" in inference["fallback_reason"]
    (sr,) = sr_files(node, study.study_instance_uid)
    description = algorithm_description(sr)
    assert "ONNX Runtime on this node" in description and "inference server being unavailable" in description
