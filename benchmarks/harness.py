"""Processes and peers for the benchmarks: our server as a subprocess, dcmtk storescu/storescp.

Every process is started here, bound to loopback (storescp, which cannot bind one address,
only inside a loopback-only network namespace: see :func:`reexec_in_netns`), and stopped
by its own process id. ``tests/peers.py`` builds its test peers on these.
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
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CT = SHARED_DATA / "lidc_idri" / "LIDC-IDRI-0001"
NETNS_ENV = "LUNGSCREEN_BENCH_NETNS"


def in_netns() -> bool:
    """Whether we run inside a loopback-only namespace (ours or the test suite's)."""
    return os.environ.get(NETNS_ENV) == "1" or os.environ.get("LUNGSCREEN_TEST_NETNS") == "1"


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def reexec_in_netns(argv: list[str]) -> int:
    """Run ``python argv`` inside a new network namespace that has only loopback; return its exit code."""
    args = [
        "unshare", "--net", "--fork", "--", "env", f"{NETNS_ENV}=1", "bash", "-c",
        'ip link set lo up && exec "$0" "$@"', sys.executable, *argv,
    ]
    return subprocess.run(args).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


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
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http_json(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 10.0):
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def dcmtk_env() -> dict:
    # Without TCP_NODELAY dcmtk stalls ~45 ms per instance (Nagle + delayed ACK).
    return {**os.environ, "TCP_NODELAY": "1"}


def children(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def status_mb(pid: int, field: str) -> float:
    """A memory figure of one process from /proc (``VmHWM``: peak resident, ``VmRSS``: resident
    now), MiB; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of one process, MiB; 0 when it is gone."""
    return status_mb(pid, "VmHWM")


class Server:
    """``lungscreen serve`` as a subprocess with its own data folder and ports."""

    def __init__(
        self, tmp: Path, *, idle_seconds: float, destinations=(), model: Path | None = None, config=None,
        port: int | None = None, http_port: int | None = None, extra_args=(), log_level: str = "INFO",
    ):
        tmp.mkdir(parents=True, exist_ok=True)
        self.data_dir = tmp / "data"
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.idle_seconds = idle_seconds
        self.log_path = tmp / "lungscreen.log"
        settings = {"min_free_mb": 16, **(config or {})}
        config_path = tmp / "lungscreen.toml"
        config_path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
        self.args = [
            sys.executable, "-m", "lungscreen.server.cli", "--log-level", log_level, "serve", "--config", str(config_path),
            "--data-dir", str(self.data_dir),
            "--port", str(self.port), "--http-port", str(self.http_port), "--idle-seconds", str(idle_seconds),
            "--ae-title", "LUNGSCREEN", *(["--model", str(model)] if model else []),
            *[a for d in destinations for a in ("--destination", d)], *extra_args,
        ]
        self.proc: subprocess.Popen | None = None
        self._hwm: dict[int, float] = {}

    @contextmanager
    def running(self) -> Iterator["Server"]:
        with process(self.args, self.log_path, env={**os.environ, "PYTHONPATH": str(REPO)}) as self.proc:
            wait_until(self.healthy, 120, 0.1, what="lungscreen /healthz")
            yield self
            self.sample_memory()

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"lungscreen exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
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

    def wait_for_state(self, study_uid: str, states: tuple[str, ...], timeout: float = 600) -> dict:
        def reached():
            job = self.study(study_uid)
            if job and job["state"] == "failed" and "failed" not in states:
                raise RuntimeError(f"study failed: {job.get('reason')}")
            return job if job and job["state"] in states else None

        return wait_until(reached, timeout, 0.05, what=f"study in {states}")

    def sample_memory(self) -> dict[int, float]:
        """Record VmHWM of the server and its children (workers); keep the highest seen per pid."""
        if self.proc is None or self.proc.poll() is not None:
            return self._hwm
        for pid in [self.proc.pid, *children(self.proc.pid)]:
            self._hwm[pid] = max(self._hwm.get(pid, 0.0), vm_hwm_mb(pid))
        return self._hwm

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def storescu(files: list[Path], port: int, *, called: str = "LUNGSCREEN", calling: str = "BENCH") -> float:
    """Push ``files`` over one association with dcmtk storescu; return its wall time (s)."""
    args = ["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dcmtk_env())
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


@contextmanager
def storescp(
    out_dir: Path, port: int, ae_title: str = "DEST", *, log_path: Path, options: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen]:
    """dcmtk storescp writing what it receives into ``out_dir`` (listens on all interfaces:
    only inside the loopback-only namespace). ``options``: more storescp options, e.g. TLS."""
    if not in_netns():
        raise RuntimeError("storescp listens on all interfaces: run inside the loopback-only namespace")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["storescp", "-aet", ae_title, "-od", str(out_dir), *options, str(port)]
    with process(args, log_path, env=dcmtk_env()) as proc:
        wait_until(lambda: port_open(port), 20, what="storescp")
        yield proc


def wait_for_file(
    folder: Path, prefix: str, known: set[str], timeout: float, interval: float = 0.005, check=None
) -> tuple[str, float]:
    """Poll ``folder`` for a new file named ``prefix*``; return its name and the time (``time.time()``) seen.
    ``check()`` is called every half second and may raise to give up early."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if check is not None and time.monotonic() >= next_check:
            check()
            next_check = time.monotonic() + 0.5
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(prefix) and entry.name not in known:
                    return entry.name, time.time()
        time.sleep(interval)
    raise TimeoutError(f"no new {prefix}* file in {folder} after {timeout:.0f} s")
