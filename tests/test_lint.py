"""ruff (pyflakes' rules, see pyproject.toml) on every module and test: an unused import, an
undefined name or a redefinition fails the suite instead of waiting for a reader to notice."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("lungscreen", "dicom_io", "models", "server", "training", "benchmarks", "tests", "scripts")


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is in the test extra (scripts/bootstrap.sh installs it)")
    result = subprocess.run(
        [ruff, "check", "--no-cache", *FOLDERS], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
