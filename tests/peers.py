"""Real DICOM peers for the tests: our own server as a subprocess, dcmtk, dicom3tools, Orthanc.

Every process is started by the test, bound to loopback (or, for storescp and Orthanc,
which cannot bind one address, run inside the loopback-only namespace of scripts/test.sh),
and stopped by its own process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from models.card import BLOB_FILTER_CARD

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN_NETNS = os.environ.get("LUNGSCREEN_TEST_NETNS") == "1"

needs_netns = pytest.mark.skipif(
    not IN_NETNS,
    reason="storescp and Orthanc listen on all interfaces: run through scripts/test.sh (loopback-only namespace)",
)


def needs_binary(*names: str):
    missing = [n for n in names if shutil.which(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"missing {', '.join(missing)} (scripts/bootstrap.sh installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def process(args: list[str], log_path: Path, *, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Run ``args``; on exit stop exactly that process (SIGTERM, then SIGKILL)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http_json(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 10.0):
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


class LungScreen:
    """``lungscreen serve`` as a subprocess with its own data folder and ports."""

    def __init__(
        self, tmp: Path, *, destinations=(), idle_seconds=1.0, extra_args=(), port=None, http_port=None, config=None
    ):
        self.data_dir = tmp / "lungscreen-data"
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.log_path = tmp / "lungscreen.log"
        # Test machines may have little free disk; the studies here are small.
        settings = {"min_free_mb": 16, **(config or {})}
        config_path = tmp / "lungscreen.toml"
        config_path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
        self.args = [
            sys.executable, "-m", "server.cli", "serve", "--config", str(config_path), "--data-dir", str(self.data_dir),
            "--port", str(self.port), "--http-port", str(self.http_port), "--idle-seconds", str(idle_seconds), "--ae-title", "LUNGSCREEN",
            "--model", str(BLOB_FILTER_CARD),  # the deterministic test model: these tests prove the path
            *[a for d in destinations for a in ("--destination", d)], *extra_args,
        ]

    @contextmanager
    def running(self) -> Iterator["LungScreen"]:
        with process(self.args, self.log_path) as self.proc:
            wait_until(self.healthy, 60, what="lungscreen /healthz")
            yield self

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"lungscreen exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return http_json(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1)["status"] == "ok"
        except OSError:
            return False

    def study(self, study_uid: str) -> dict | None:
        try:
            return http_json(f"http://127.0.0.1:{self.http_port}/studies/{study_uid}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_for_state(self, study_uid: str, states: tuple[str, ...], timeout: float = 120) -> dict:
        def reached():
            job = self.study(study_uid)
            return job if job and job["state"] in states else None

        try:
            return wait_until(reached, timeout, 0.2, what=f"study in {states}")
        except TimeoutError:
            raise AssertionError(f"job: {self.study(study_uid)}\nlog:\n{self.log()[-4000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def storescu(files: list[Path], port: int, *, called="LUNGSCREEN", calling="PACS", propose=(), check=True):
    """dcmtk storescu; ``propose`` e.g. ("-xs",) for JPEG Lossless files."""
    args = ["storescu", "-aet", calling, "-aec", called, *propose, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def storescp(out_dir: Path, port: int, ae_title: str = "DEST", *, log_path: Path) -> Iterator[subprocess.Popen]:
    """dcmtk storescp writing what it receives into ``out_dir`` (needs the test namespace)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["storescp", "-aet", ae_title, "-od", str(out_dir), str(port)]
    with process(args, log_path, env={**os.environ, "TCP_NODELAY": "1"}) as proc:
        wait_until(lambda: port_open(port), 20, what="storescp")
        yield proc


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


class Orthanc:
    """Orthanc 1.10 as the PACS, with DICOMweb, configured through its JSON file."""

    def __init__(self, tmp: Path, *, modalities: dict[str, list] | None = None, aet: str = "ORTHANC"):
        self.root = tmp / "orthanc"
        self.root.mkdir(parents=True, exist_ok=True)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = aet
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "lungscreen-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": modalities or {},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "StableAge": 2,
            "Plugins": ["/usr/share/orthanc/plugins"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config_path = self.root / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    @contextmanager
    def running(self) -> Iterator["Orthanc"]:
        with process(["Orthanc", str(self.config_path)], self.root / "orthanc.log") as self.proc:
            wait_until(self._up, 60, 0.2, what="Orthanc REST")
            yield self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited:\n{(self.root / 'orthanc.log').read_text()[-3000:]}")
        try:
            http_json(f"{self.url}/system", timeout=1)
            return True
        except OSError:
            return False

    def get(self, path: str):
        return http_json(self.url + path)

    def post(self, path: str, data: bytes | dict):
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        return http_json(self.url + path, data=body, method="POST", timeout=120)
