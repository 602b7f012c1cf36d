"""The command line starts without the analysis stack: `lungscreen jobs`, `billing export`
and `--help` are what a PACS administrator types, and they should answer at once."""

import subprocess
import sys


def test_the_command_line_loads_no_deep_learning_library_until_a_command_needs_it():
    probe = "import sys, lungscreen.server.cli; print(sorted(m for m in ('torch', 'monai', 'onnxruntime') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
