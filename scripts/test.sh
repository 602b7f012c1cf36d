#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh) and run the whole test suite.
#
# dcmtk's storescp and Orthanc 1.10 cannot bind to 127.0.0.1 only, so, when we may, the
# suite runs inside a fresh network namespace that has nothing but a loopback interface:
# every peer the tests start is reachable from the tests and from nowhere else.
# The wheel test (tests/packaging) installs from PyPI, which that namespace cannot reach, so a
# full run (or one naming tests/packaging) takes it first, outside; it starts its own server in
# a loopback-only namespace.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${LUNGSCREEN_TEST_NETNS:-}" != 1 ]]; then
    scripts/bootstrap.sh --test
    if [[ $(id -u) -eq 0 ]] && unshare --net true 2>/dev/null; then
        packaging=0
        if (($# == 0)) || [[ " $* " == *" tests/packaging"* ]]; then
            .venv/bin/python -m pytest tests/packaging || packaging=$?
        fi
        suite=0
        unshare --net --fork -- env LUNGSCREEN_TEST_NETNS=1 bash -c \
            'ip link set lo up && exec "$0" "$@"' "$0" "$@" || suite=$?
        exit $((suite ? suite : packaging))
    fi
    echo "test.sh: no network namespace (needs root); tests with peers that listen on all interfaces are skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
