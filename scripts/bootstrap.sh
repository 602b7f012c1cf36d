#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with Python 3.11: Debian DICOM peers used by
# the tests, a project virtual environment, the CPU build of torch, and LungScreen itself.
# Usage: scripts/bootstrap.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

need_apt=()
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
# PixelMed's DicomSRValidator checks the SRs against their templates (tests/lidc_reports.py).
[[ -f /usr/share/java/pixelmed.jar ]] || need_apt+=(libpixelmed-java)
command -v java >/dev/null || need_apt+=(default-jre-headless)
command -v Orthanc >/dev/null || need_apt+=(orthanc)
[[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need_apt+=(orthanc-dicomweb)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v openssl >/dev/null || need_apt+=(openssl)  # test certificates
command -v systemd-analyze >/dev/null || need_apt+=(systemd)  # the service unit is verified with it
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    echo "bootstrap: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv"
    "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# CPU torch first so that MONAI's `torch>=` requirement is already satisfied and pip never
# pulls the multi-GB CUDA build. With a GPU, install the `gpu` extra (see README).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "bootstrap: installing torch (CPU build)"
    "${pip[@]}" "torch==${LUNGSCREEN_TORCH_VERSION:-2.13.0}"
fi
stamp=.venv/.lungscreen-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "bootstrap: installing lungscreen"
    # setuptools' editable-install warnings are noise; the log is shown when pip fails.
    "${pip[@]}" -e ".[test]" >.venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
    touch "$stamp"
fi
# The browser tests (tests/viewer) need Chromium, Playwright and the prebuilt OHIF viewer.
if ((want_test)); then
    scripts/install_viewer.sh
    scripts/install_triton.sh  # the bundled tritonserver for tests/server/test_triton.py
    scripts/fetch_lidc_annotations.sh
fi
