"""``lungscreen``: the command line.

    lungscreen serve [--config FILE] [--ae-title ...] [--port ...] ...
    lungscreen analyze DICOM_DIR --out OUT_DIR
    lungscreen jobs [--data-dir DIR] [--json]
    lungscreen billing export [--data-dir DIR] [--format csv|json] [--out FILE]
    lungscreen model import-monai-bundle PATH [--out DIR] [--opset N]
    lungscreen evaluate --model CARD [--synthetic N] [--real] ...
    lungscreen bench [--quick] [--json PATH]
    lungscreen purge --older-than DAYS [--data-dir DIR]
    lungscreen triton export OUT_DIR [--model-card PATH] [--backend onnxruntime|python]
    lungscreen triton serve --repository DIR [--grpc-port N] [--http-port N] [--metrics-port N]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from lungscreen.benchmarks.cli import add_cli as add_bench_cli
from lungscreen.models.monai_bundle import add_cli as add_model_cli
from lungscreen.training.evaluate_cli import add_cli as add_evaluate_cli
from lungscreen.server.config import Settings, load_settings
from lungscreen.server.logs import configure_logging
from lungscreen.server.triton import add_cli as add_triton_cli

log = logging.getLogger("lungscreen")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None)
        for key in ("ae_title", "host", "port", "data_dir", "allow_ae", "destination", "idle_seconds", "http_port",
                    "model", "operating_point", "workers", "receivers", "inference_server")
    }
    return load_settings(args.config, **overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from lungscreen.server.app import LungScreenServer

    settings = _settings(args)
    server = LungScreenServer(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    log.info("stopping")
    server.stop()
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from lungscreen.findings import exam_lung_rads
    from lungscreen.server.workers import build_analyzer
    from lungscreen.server.pipeline import analyze_study

    settings = _settings(args)
    paths = [p for p in Path(args.dicom_dir).rglob("*") if p.is_file()]
    analyzer = build_analyzer(settings)
    result = analyze_study(paths, analyzer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.sr.save_as(out / "report_sr.dcm", enforce_file_format=True)
    if result.gsps is not None:
        result.gsps.save_as(out / "report_gsps.dcm", enforce_file_format=True)
    summary = {
        "study_instance_uid": result.study_uid,
        "series_instance_uid": result.series_uid,
        "sr_sop_instance_uid": str(result.sr.SOPInstanceUID),
        "model": f"{result.report.model_name} {result.report.model_version}",
        "operating_point": result.report.operating_point,
        "score_threshold": result.report.score_threshold,
        "candidates": result.candidates,
        "suppressed": result.report.suppressed,
        "exam_lung_rads": exam_lung_rads(result.report.findings),
        "rejected_series": [r.__dict__ for r in result.rejected_series],
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "inference": result.inference,
        "intended_use": analyzer.detector.card.intended_use,
        "findings": list(result.findings),
    }
    (out / "findings.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(result.findings)} finding(s); wrote {out / 'report_sr.dcm'} and {out / 'findings.json'}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from lungscreen.server.db import Database
    from lungscreen.server.jobs import JobStore

    settings = _settings(args)
    jobs = JobStore(Database(settings.db_path)).list()
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return 0
    print(f"{'study':64}  {'state':10}  {'runs':>4}  {'inst':>5}  reason")
    for j in jobs:
        print(f"{j.study_uid:64}  {j.state:10}  {j.runs:>4}  {j.instances:>5}  {j.reason or ''}")
    return 0


def cmd_billing_export(args: argparse.Namespace) -> int:
    from lungscreen.server.billing import BillingLedger
    from lungscreen.server.db import Database

    settings = _settings(args)
    text = BillingLedger(Database(settings.db_path)).export(args.format)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from lungscreen.dicom_io.store import InstanceStore
    from lungscreen.server.db import Database
    from lungscreen.server.retention import purge_images

    settings = _settings(args)
    purged = purge_images(Database(settings.db_path), InstanceStore(settings.images_dir), args.older_than * 86400)
    print(f"purged the images of {len(purged)} stud{'y' if len(purged) == 1 else 'ies'}; reports and billing kept")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungscreen", description="Lung-nodule screening DICOM server (research use, not for diagnostic use)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML file; its keys are these flags with _")
        p.add_argument("--data-dir", type=Path)
        p.add_argument("--model", type=Path, help="model card (JSON) or its folder")

    def inference_server(p: argparse.ArgumentParser) -> None:
        p.add_argument("--inference-server", metavar="grpc://HOST:PORT",
                       help="run the network on this Triton Inference Server instead of locally")

    serve = sub.add_parser("serve", help="run the DICOM listener, the analysis workers and the HTTP endpoint")
    common(serve)
    serve.add_argument("--ae-title")
    serve.add_argument("--host", help="DICOM listener address (default 127.0.0.1)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--allow-ae", action="append", help="calling AE title allowed to send (repeatable)")
    serve.add_argument("--destination", action="append", help="AE@host:port to send reports to (repeatable)")
    serve.add_argument("--idle-seconds", type=float, help="quiet period after a study's last instance")
    serve.add_argument("--http-port", type=int, help="HTTP endpoint port (0: off)")
    serve.add_argument("--operating-point")
    serve.add_argument("--workers", type=int)
    serve.add_argument("--receivers", type=int, help="DICOM receiver processes (default: one per CPU core, at most 4)")
    inference_server(serve)
    serve.set_defaults(func=cmd_serve)

    analyze = sub.add_parser("analyze", help="run the pipeline on a folder of DICOM files, offline")
    common(analyze)
    analyze.add_argument("dicom_dir", type=Path)
    analyze.add_argument("--out", type=Path, required=True)
    analyze.add_argument("--operating-point")
    inference_server(analyze)
    analyze.set_defaults(func=cmd_analyze)

    jobs = sub.add_parser("jobs", help="list jobs and their states")
    common(jobs)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=cmd_jobs)

    billing = sub.add_parser("billing", help="billing ledger")
    billing_sub = billing.add_subparsers(dest="billing_command", required=True)
    export = billing_sub.add_parser("export", help="write the ledger for the RIS")
    common(export)
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--out", type=Path)
    export.set_defaults(func=cmd_billing_export)

    purge = sub.add_parser("purge", help="remove received images past retention (reports and billing are kept)")
    common(purge)
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.set_defaults(func=cmd_purge)

    add_model_cli(sub)
    add_evaluate_cli(sub)
    add_bench_cli(sub)
    add_triton_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from lungscreen.errors import LungScreenError

    try:
        return args.func(args)
    except (LungScreenError, ValueError, OSError) as exc:
        log.error("%s", exc)
        print(f"lungscreen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
