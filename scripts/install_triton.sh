#!/usr/bin/env bash
# Idempotent: a virtual environment for the Triton Inference Server that ships inside the PyPI
# package nvidia-pytriton (Triton 2.51, Python backend only, runs on CPU), laid out so that
# `lungscreen triton serve` can start its `tritonserver` without pytriton's own launcher.
# Used for development, the tests and CPU-only sites; production runs NGC's Triton container
# on the same model repository (see README, "Inference on a shared Triton server").
#
#   .venv-triton/                       numpy<2 + nvidia-pytriton + onnxruntime (for model.py)
#   .venv-triton/triton-backends/       copy of the bundled backends with the Python stub for
#                                       this interpreter in python/ (Triton looks for it there)
#   .venv-triton/triton-env.json        the binary, the backends, LD_LIBRARY_PATH, the python3 to use
# Usage: scripts/install_triton.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv-triton}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
pins=("numpy<2" "nvidia-pytriton==0.7.0" "onnxruntime>=1.20,<1.24")

stamp=$venv/.installed
if [[ -f $stamp && $stamp -nt "$0" ]]; then
    exit 0
fi
echo "install_triton: creating $venv (numpy<2, nvidia-pytriton 0.7.0, onnxruntime)"
[[ -x $venv/bin/python ]] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"

site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
bundle=$site/pytriton/tritonserver
pyver=$("$venv/bin/python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
stub=$bundle/python_backend_stubs/$pyver/triton_python_backend_stub
[[ -x $bundle/bin/tritonserver ]] || { echo "install_triton: no tritonserver in $bundle" >&2; exit 1; }
[[ -f $stub ]] || { echo "install_triton: no Python backend stub for Python $pyver in $bundle" >&2; exit 1; }

backends=$venv/triton-backends
rm -rf "$backends"
cp -r "$bundle/backends" "$backends"
cp "$stub" "$backends/python/"

# What `lungscreen triton serve` reads (server/triton.py): the binary, the backends, and the
# environment its Python-backend stub needs.
"$venv/bin/python" - "$venv" "$bundle" "$site" <<'PY'
import json, pathlib, sys, sysconfig
venv, bundle, site = (pathlib.Path(p).resolve() for p in sys.argv[1:4])
env = {
    "tritonserver": str(bundle / "bin" / "tritonserver"),
    "backend_directory": str(venv / "triton-backends"),
    # libpython for the stub; the stub links a bundled libcudart even on CPU; Triton's own libraries.
    "LD_LIBRARY_PATH": ":".join([sysconfig.get_config_var("LIBDIR"), str(site / "nvidia_pytriton.libs"),
                                 str(bundle / "lib"), str(bundle / "external_libs")]),
    # First on PATH: the stub's embedded interpreter finds its prefix from the `python3` on PATH, so
    # it takes this environment's site-packages (numpy<2, onnxruntime). It ignores PYTHONPATH.
    "python_bin": str(venv / "bin"),
}
(venv / "triton-env.json").write_text(json.dumps(env, indent=2) + "\n")
PY
touch "$stamp"
echo "install_triton: ready ($bundle/bin/tritonserver)"
