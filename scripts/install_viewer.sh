#!/usr/bin/env bash
# Idempotent set-up of what the viewer tests (tests/viewer/) need:
#   * Debian `chromium` (headless browser; Playwright drives it, no browser download),
#   * Playwright for Python in .venv,
#   * the prebuilt OHIF v3 viewer from the npm package @ohif/app (pinned), unpacked into
#     .cache/ohif-<version>/ (git-ignored). Only `npm pack` is used: no build, no install.
# Quick (no network) when everything is already present.
# Usage: scripts/install_viewer.sh            (env OHIF_VERSION to override the pin)
set -euo pipefail
cd "$(dirname "$0")/.."

OHIF_VERSION=${OHIF_VERSION:-3.13.2}
PLAYWRIGHT_SPEC=${PLAYWRIGHT_SPEC:-playwright>=1.45}
dest=.cache/ohif-$OHIF_VERSION

if ! command -v chromium >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    echo "install_viewer: installing Debian chromium"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c "import playwright" 2>/dev/null; then
    echo "install_viewer: installing playwright (Python) into .venv; browsers are not downloaded"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/python -m pip install -q --disable-pip-version-check \
        "$PLAYWRIGHT_SPEC"
fi

if [[ ! -f $dest/dist/index.html ]]; then
    command -v npm >/dev/null || { echo "install_viewer: npm is needed to fetch @ohif/app" >&2; exit 1; }
    echo "install_viewer: fetching @ohif/app@$OHIF_VERSION into $dest"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    mkdir -p "$tmp/unpacked"
    tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C "$tmp/unpacked"
    [[ -f $tmp/unpacked/package/dist/index.html ]] || {
        echo "install_viewer: @ohif/app@$OHIF_VERSION has no dist/index.html" >&2; exit 1; }
    mkdir -p .cache
    rm -rf "$dest"
    mv "$tmp/unpacked/package" "$dest"
fi
