"""Imports run one way: lungscreen (errors, findings) <- dicom_io <- models <- server.

DICOM I/O knows no model, the analysis never sees the server, and training and benchmarks sit
on top. Read from the source with ``ast``, so a wrong-way import fails here even when no test
happens to execute it. The old top-level names (``server``, ``models``...) must not come back:
installed, they would collide with other distributions.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("lungscreen", "dicom_io", "models", "server", "training", "benchmarks")
OLD_TOP_LEVEL = {"server", "models", "dicom_io", "training", "benchmarks"}

# What each layer may import from LungScreen itself (besides its own modules).
ALLOWED = {
    "lungscreen": {"lungscreen"},
    "dicom_io": {"lungscreen"},
    "models": {"lungscreen"},
    "server": {"lungscreen", "dicom_io", "models"},
    "training": {"lungscreen", "dicom_io", "models"},
    "benchmarks": {"lungscreen", "dicom_io", "models", "server", "training"},
}
# The command line is the composition root: it offers the training and benchmark commands
# (imported lazily, when such a command runs).
ENTRY_POINTS = {"server/cli.py": {"training", "benchmarks"}, "lungscreen/__main__.py": {"server"}}


def _lungscreen_imports(path: Path) -> list[tuple[int, str]]:
    """(line, layer) of every import of a LungScreen module in ``path``; layer "lungscreen" for
    lungscreen.errors / lungscreen.findings, else the subpackage's folder name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] in OLD_TOP_LEVEL:
                found.append((node.lineno, f"old top-level name {parts[0]}"))
            elif parts[0] == "lungscreen":
                found.append((node.lineno, parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "lungscreen"))
    return found


def _modules():
    for folder in FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_run_one_way(path):
    folder = path.relative_to(REPO).parts[0]
    allowed = ALLOWED[folder] | {folder} | ENTRY_POINTS.get(str(path.relative_to(REPO)), set())
    wrong = [f"line {line}: imports {layer}" for line, layer in _lungscreen_imports(path) if layer not in allowed]
    assert not wrong, f"{path.relative_to(REPO)} may import only {sorted(allowed)}: " + "; ".join(wrong)


def test_tests_use_the_one_import_package():
    wrong = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for line, layer in _lungscreen_imports(path)
        if layer.startswith("old top-level")
    ]
    assert not wrong, "imports of the old top-level names: " + ", ".join(wrong)
