"""Real DICOM peers for the tests: our own server as a subprocess, dcmtk, dicom3tools, Orthanc.

Every process is started by the test, bound to loopback (or, for storescp and Orthanc,
which cannot bind one address, run inside the loopback-only namespace of scripts/test.sh),
and stopped by its own process id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from lungscreen.benchmarks.harness import (  # noqa: F401  (storescp is re-exported for the tests)
    REPO, Server, dcmtk_env, free_port, http_json, in_netns, process, storescp, wait_until,
)
from lungscreen.models.card import BLOB_FILTER_CARD

IN_NETNS = in_netns()

needs_netns = pytest.mark.skipif(
    not IN_NETNS,
    reason="storescp and Orthanc listen on all interfaces: run through scripts/test.sh (loopback-only namespace)",
)


def needs_binary(*names: str):
    missing = [n for n in names if shutil.which(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"missing {', '.join(missing)} (scripts/bootstrap.sh installs them)")


class LungScreen(Server):
    """``lungscreen serve`` with the deterministic test model: these tests prove the path,
    not the detector. A study that does not reach the expected state fails the test with the
    job and the server log."""

    def __init__(
        self, tmp: Path, *, destinations=(), idle_seconds=1.0, extra_args=(), port=None, http_port=None, config=None
    ):
        super().__init__(
            tmp, idle_seconds=idle_seconds, destinations=destinations, model=BLOB_FILTER_CARD, config=config,
            port=port, http_port=http_port, extra_args=extra_args,
        )

    def wait_for_state(self, study_uid: str, states: tuple[str, ...], timeout: float = 120) -> dict:
        try:
            return super().wait_for_state(study_uid, states, timeout)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\njob: {self.study(study_uid)}\nlog:\n{self.log()[-4000:]}") from None


def process_running(pid: int) -> bool:
    """Running: not gone and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return "State:\tZ" not in status.read()
    except FileNotFoundError:
        return False


def storescu(files: list[Path], port: int, *, called="LUNGSCREEN", calling="PACS", propose=(), check=True):
    """dcmtk storescu; ``propose`` e.g. ("-xs",) for JPEG Lossless files."""
    args = ["storescu", "-aet", calling, "-aec", called, *propose, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dcmtk_env())
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


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
