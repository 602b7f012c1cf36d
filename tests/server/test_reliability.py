"""Faults: crashes (kill -9) mid-analysis and mid-delivery, a dying or hung analysis worker, a hung destination.

Promise under test: an acknowledged instance is never lost, every complete study is reported
and delivered exactly once (one SR instance at the destination, one billing row), and one
bad study never takes the server down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest

from lungscreen.benchmarks.harness import children
from peers import LungScreen, free_port, needs_binary, needs_netns, process, storescp, storescu, wait_until
from test_end_to_end import phantom_study

pytestmark = [pytest.mark.slow, needs_binary("storescu", "storescp")]


def kill_group(server: LungScreen) -> None:
    """kill -9 of the server and its analysis workers, as a power cut would."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()


def analysis_workers(server: LungScreen) -> list[int]:
    """The server's children that run the model (the DICOM receivers do not load ONNX Runtime)."""
    return [pid for pid in children(server.proc.pid) if "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()]


def billing_rows(server: LungScreen) -> list[dict]:
    out = subprocess.run(
        [".venv/bin/lungscreen", "billing", "export", "--data-dir", str(server.data_dir), "--format", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)


def sr_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("SR*"))


@needs_netns
def test_kill_during_analysis_then_restart_delivers_exactly_once(tmp_path, lidc_series_dir):
    files = sorted(lidc_series_dir.glob("*.dcm"))
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    dest_port, port, http_port = free_port(), free_port(), free_port()
    destination = [f"DEST@127.0.0.1:{dest_port}"]
    with storescp(tmp_path / "received", dest_port, "DEST", log_path=tmp_path / "storescp.log"):
        first = LungScreen(tmp_path, destinations=destination, idle_seconds=0.5, port=port, http_port=http_port)
        with first.running():
            storescu(files, first.port)
            first.wait_for_state(study_uid, ("processing",), timeout=60)
            kill_group(first)
        second = LungScreen(tmp_path, destinations=destination, idle_seconds=0.5, port=port, http_port=http_port)
        with second.running():
            job = second.wait_for_state(study_uid, ("delivered",), timeout=180)
            assert job["instances"] == 133, "every acknowledged instance survived the crash"
    assert len(sr_files(tmp_path / "received")) == 1
    assert len(billing_rows(second)) == 1


@needs_netns
def test_kill_during_delivery_then_restart_sends_the_same_sr_once(tmp_path):
    study = phantom_study(tmp_path / "study")
    dest_port, port, http_port = free_port(), free_port(), free_port()
    destination = [f"DEST@127.0.0.1:{dest_port}"]
    slow_receiver = ["storescp", "-v", "-aet", "DEST", "--sleep-during", "30", "-od", str(tmp_path / "slow"), str(dest_port)]
    (tmp_path / "slow").mkdir()
    first = LungScreen(tmp_path, destinations=destination, idle_seconds=0.5, port=port, http_port=http_port)
    with process(slow_receiver, tmp_path / "slow-storescp.log") as receiver, first.running():
        storescu(list(study.paths), first.port)
        first.wait_for_state(study.study_instance_uid, ("reported",), timeout=60)
        wait_until(lambda: "Association Received" in (tmp_path / "slow-storescp.log").read_text(), 30,
                   what="delivery under way")
        kill_group(first)
        receiver.kill()
        receiver.wait()
    with storescp(tmp_path / "received", dest_port, "DEST", log_path=tmp_path / "storescp.log"):
        second = LungScreen(tmp_path, destinations=destination, idle_seconds=0.5, port=port, http_port=http_port)
        with second.running():
            job = second.wait_for_state(study.study_instance_uid, ("delivered",), timeout=60)
    (received,) = sr_files(tmp_path / "received")
    assert pydicom.dcmread(received).SOPInstanceUID == job["details"]["sr_sop_uid"]
    assert job["runs"] == 1 and len(billing_rows(second)) == 1


def test_dead_worker_fails_one_study_and_the_server_keeps_serving(tmp_path, lidc_series_dir):
    files = sorted(lidc_series_dir.glob("*.dcm"))
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    good = phantom_study(tmp_path / "good")
    server = LungScreen(tmp_path, idle_seconds=0.5)
    with server.running():
        storescu(files, server.port)
        server.wait_for_state(study_uid, ("processing",), timeout=60)
        workers = analysis_workers(server)
        assert workers, "analysis runs in a worker process"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # as a segfault in a decoder would
        job = server.wait_for_state(study_uid, ("failed",), timeout=60)
        assert "analysis process died" in job["reason"]
        storescu(list(good.paths), server.port)
        assert server.wait_for_state(good.study_instance_uid, ("reported",), timeout=120)["details"]["findings"]
        assert server.proc.poll() is None


def test_hung_analysis_is_stopped_at_its_time_limit(tmp_path, lidc_series_dir):
    files = sorted(lidc_series_dir.glob("*.dcm"))
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    server = LungScreen(tmp_path, idle_seconds=0.5, config={"analysis_timeout_s": 1.0})
    with server.running():
        wait_until(lambda: "analysis worker ready" in server.log(), 60, what="worker ready")
        storescu(files, server.port)
        job = server.wait_for_state(study_uid, ("failed",), timeout=60)
        assert "exceeded its time limit of 1 s" in job["reason"]
        wait_until(lambda: server.log().count("analysis worker ready") == 2, 60, what="a fresh worker")
        assert server.proc.poll() is None


@needs_netns
def test_hung_destination_is_bounded_by_the_send_timeout(tmp_path):
    study = phantom_study(tmp_path / "study")
    dest_port = free_port()
    server = LungScreen(tmp_path, destinations=[f"DEST@127.0.0.1:{dest_port}"], idle_seconds=0.5,
                        config={"send_timeout_s": 1.0, "retry_base_delay_s": 60})
    (tmp_path / "slow").mkdir()
    hung = ["storescp", "-aet", "DEST", "--sleep-during", "60", "-od", str(tmp_path / "slow"), str(dest_port)]
    with process(hung, tmp_path / "storescp.log"), server.running():
        storescu(list(study.paths), server.port)
        server.wait_for_state(study.study_instance_uid, ("reported",), timeout=60)
        job = wait_until(lambda: (j := server.study(study.study_instance_uid))["deliveries"][0]["attempts"] == 1 and j,
                         20, what="first attempt to time out")
    delivery = job["deliveries"][0]
    assert delivery["state"] == "pending" and delivery["last_error"], delivery
