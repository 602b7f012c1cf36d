"""The wheel as a hospital installs it: built from the checkout, installed into a fresh virtual
environment outside it (the CPU torch pin, every other dependency from PyPI), then used from
there: `lungscreen analyze` on the real LIDC-IDRI-0001 series with the bundled model, and
`lungscreen serve` answering a C-ECHO. Nothing of the checkout is on that environment's path.

pip needs PyPI, which the suite's loopback-only namespace cannot reach: scripts/test.sh runs
this file before it enters that namespace, and this test starts the server in a loopback-only
namespace of its own (when it may make one; else on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from lungscreen.benchmarks.harness import REPO, can_unshare, free_port, in_netns

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        in_netns(),
        reason="installs from PyPI, which the loopback-only namespace cannot reach: scripts/test.sh runs "
               "tests/packaging outside it first (a full run, or one naming tests/packaging)",
    ),
    pytest.mark.skipif(shutil.which("echoscu") is None, reason="needs dcmtk's echoscu (scripts/bootstrap.sh)"),
    # a fresh install takes 1-2 minutes here (2 shared cores, pip's cache warm), more on a cold cache
    pytest.mark.timeout(1800),
]

TORCH_PIN = "torch==2.13.0"  # the CPU build (scripts/bootstrap.sh); unpinned, pip takes the CUDA one
PACKAGE_FOLDERS = {"lungscreen": "lungscreen", "server": "lungscreen/server", "models": "lungscreen/models",
                   "dicom_io": "lungscreen/dicom_io", "training": "lungscreen/training",
                   "benchmarks": "lungscreen/benchmarks"}


def run(args: list, *, cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args[:3]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's files (tracked and new, not ignored), so that no
    build/ or egg-info left in the checkout by an earlier build can slip into it."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, timeout=60).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source], cwd=dist, timeout=600)
    (built,) = dist.glob("lungscreen-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file_under_one_import_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"lungscreen"}
    (top_level_txt,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level_txt).decode().split() == ["lungscreen"]
    # every file git tracks in the package folders: modules, model folders, the card schema,
    # the service unit and its configuration, documents the commands print
    tracked = run(["git", "ls-files", *PACKAGE_FOLDERS], cwd=REPO, timeout=60).stdout.split()
    expected = {PACKAGE_FOLDERS[path.split("/")[0]] + path[len(path.split("/")[0]):] for path in tracked}
    assert expected - names == set()
    for must in ("lungscreen/models/nodulenet/model.onnx", "lungscreen/models/nodulenet/model_card.json",
                 "lungscreen/models/blob-filter/blob_filter.onnx", "lungscreen/models/schema/model_card.schema.json",
                 "lungscreen/server/service/lungscreen.service"):
        assert must in names


def test_installed_outside_the_checkout_it_analyses_a_real_scan_and_answers_a_c_echo(
    wheel, tmp_path, lidc_series_dir
):
    venv = tmp_path / "venv"
    work = tmp_path / "work"  # the working folder of every command: not the checkout
    work.mkdir()
    run([sys.executable, "-m", "venv", venv], cwd=work, timeout=300)
    python, lungscreen = venv / "bin" / "python", venv / "bin" / "lungscreen"
    run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TORCH_PIN, wheel],
        cwd=work, timeout=1800)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = run([python, "-c", "import lungscreen.models.card as c; print(c.DEFAULT_MODEL_CARD)"], cwd=work, env=env,
                timeout=60).stdout.strip()
    assert where.startswith(str(venv)), f"the bundled model must come from the installed wheel, not {where}"

    out = work / "out"
    run([lungscreen, "--log-level", "WARNING", "analyze", lidc_series_dir, "--out", out, "--data-dir", work / "data"],
        cwd=work, env=env, timeout=600)
    summary = json.loads((out / "findings.json").read_text())
    assert summary["model"].startswith("lungscreen-nodulenet ")  # the default model, from the wheel
    assert summary["study_instance_uid"] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
    # LUNA16's nodule of LIDC-IDRI-0001 (23.35 mm) is found at the screening operating point
    assert any(f["diameter_mm"] > 15 and f["actionable"] for f in summary["findings"]), summary["findings"]
    assert (out / "report_sr.dcm").stat().st_size > 0

    port = free_port()
    config = work / "lungscreen.toml"
    config.write_text(f'data_dir = "{work / "serve-data"}"\nhost = "127.0.0.1"\nhttp_port = 0\nmin_free_mb = 16\n')
    script = work / "serve_and_echo.sh"
    script.write_text(textwrap.dedent(f"""\
        set -u
        ip link set lo up 2>/dev/null || true
        "{lungscreen}" serve --config "{config}" --port {port} > "{work / 'serve.log'}" 2>&1 &
        server=$!
        echoed=1
        for _ in $(seq 1 600); do
            kill -0 $server 2>/dev/null || break
            if echoscu -aet WHEELTEST -aec LUNGSCREEN 127.0.0.1 {port} >>"{work / 'echo.log'}" 2>&1; then echoed=0; break; fi
            sleep 0.2
        done
        kill -TERM $server 2>/dev/null
        wait $server
        echo "serve exited $?"
        exit $echoed
        """))
    command = ["unshare", "--net", "--fork", "--", "bash", script] if can_unshare() else ["bash", script]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    log = (work / "serve.log").read_text(errors="replace")
    assert result.returncode == 0, f"no C-ECHO answer:\n{result.stdout}\n{(work / 'echo.log').read_text()}\n{log[-3000:]}"
    assert "serve exited 0" in result.stdout, log[-3000:]  # a clean stop on SIGTERM
    assert "ready: AE LUNGSCREEN on 127.0.0.1" in log
