"""Runs as a service: the systemd unit that `lungscreen install-service` writes passes
`systemd-analyze verify`, a configuration already there is kept, and a stop (SIGTERM, as
systemd sends) lets a running analysis finish or hands it back to the queue, never fails it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pydicom
import pytest

from lungscreen.benchmarks.harness import children
from lungscreen.server.config import load_settings
from lungscreen.server.db import Database
from lungscreen.server.jobs import JobStore
from lungscreen.server.service import install_service
from peers import LungScreen, needs_binary, storescu

CLI = [sys.executable, "-m", "lungscreen"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian package systemd)")
def test_install_service_writes_a_unit_that_systemd_accepts_and_a_config_the_server_reads(tmp_path):
    result = subprocess.run([*CLI, "install-service", "--prefix", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "etc/systemd/system/lungscreen.service"
    config = tmp_path / "etc/lungscreen/lungscreen.toml"
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m lungscreen serve --config /etc/lungscreen/lungscreen.toml" in text
    for line in ("User=lungscreen", "StateDirectory=lungscreen", "Restart=on-failure", "KillMode=mixed",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "StandardError=journal"):
        assert f"\n{line}\n" in text
    # systemd's own check: unknown keys, bad values, an ExecStart that does not exist
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "lungscreen.service" not in verify.stdout + verify.stderr, verify.stderr
    settings = load_settings(config)
    assert str(settings.data_dir) == "/var/lib/lungscreen"
    # the stop grace fits inside the time systemd waits before it kills
    timeout_stop = next(int(v) for k, _, v in (line.partition("=") for line in text.splitlines()) if k == "TimeoutStopSec")
    assert settings.stop_grace_s + 10 < timeout_stop


def test_install_service_keeps_an_edited_config_and_a_dry_run_writes_nothing(tmp_path, capsys):
    config = tmp_path / "etc/lungscreen/lungscreen.toml"
    config.parent.mkdir(parents=True)
    config.write_text('port = 104\n')
    install_service(tmp_path)
    assert config.read_text() == 'port = 104\n'
    assert "kept the existing" in capsys.readouterr().out
    dry = tmp_path / "dry"
    plan = install_service(dry, dry_run=True)
    assert not dry.exists()
    shown = capsys.readouterr().out
    assert plan.unit_text in shown and tomllib.loads(plan.config_text)["data_dir"] == "/var/lib/lungscreen"


def analysis_workers(server: LungScreen) -> list[int]:
    """The server's children that run the model (the DICOM receivers do not load ONNX Runtime)."""
    return [pid for pid in children(server.proc.pid) if "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()]


def stop(server: LungScreen) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(timeout=120)


@pytest.mark.slow
@needs_binary("storescu")
def test_a_stop_hands_a_running_analysis_back_or_lets_it_finish(tmp_path, lidc_series_dir):
    files = sorted(lidc_series_dir.glob("*.dcm"))
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    # No grace: the run is handed back to the queue, neither failed nor counted as an interruption
    impatient = LungScreen(tmp_path, idle_seconds=0.5, config={"stop_grace_s": 0})
    with impatient.running():
        storescu(files, impatient.port)
        impatient.wait_for_state(study_uid, ("processing",), timeout=60)
        for pid in analysis_workers(impatient):
            os.kill(pid, signal.SIGSTOP)  # the analysis cannot finish before the stop: no race
        assert stop(impatient) == 0
    db = Database(impatient.data_dir / "lungscreen.sqlite")
    job = JobStore(db).get(study_uid)
    interruptions = db.query("SELECT interruptions FROM jobs WHERE study_uid = ?", (study_uid,))[0][0]
    db.close()
    # Queued as if never claimed (the next start runs it as run 1), not counted as a crash; the
    # job says why it waits.
    assert (job.state, job.runs, job.reason, interruptions) == ("queued", 0, "handed back when the server stopped", 0)
    assert "handed back to the queue (server stopping)" in impatient.log()
    # With grace, a stop during the analysis waits for it: the study is reported, run 1
    patient = LungScreen(tmp_path, idle_seconds=0.5, config={"stop_grace_s": 60})
    with patient.running():
        patient.wait_for_state(study_uid, ("processing",), timeout=60)
        assert stop(patient) == 0
    db = Database(patient.data_dir / "lungscreen.sqlite")
    job = JobStore(db).get(study_uid)
    db.close()
    assert (job.state, job.runs) == ("reported", 1)
