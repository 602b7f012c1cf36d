"""``lungscreen``: the command line.

    lungscreen serve [--config FILE] [--ae-title ...] [--port ...] ...
    lungscreen analyze DICOM_DIR --out OUT_DIR [--prior PRIOR_DIR]
    lungscreen jobs [--data-dir DIR] [--json]
    lungscreen billing export [--data-dir DIR] [--format csv|json] [--out FILE]
    lungscreen model import-monai-bundle PATH [--out DIR] [--opset N]
    lungscreen evaluate --model CARD [--synthetic N] [--real] ...
    lungscreen bench [--quick] [--json PATH]
    lungscreen evaluate-followup [--repeat N] [--pairs NAME,...] [--work-dir DIR] [--json PATH]
    lungscreen purge --older-than DAYS [--data-dir DIR]
    lungscreen config check FILE
    lungscreen config show [--config FILE]
    lungscreen install-service [--prefix DIR] [--dry-run]
    lungscreen purge --older-than DAYS [--feedback-older-than DAYS] [--data-dir DIR]
    lungscreen reviewer add NAME
    lungscreen feedback export [--format csv|json] [--out FILE]
    lungscreen feedback report [--period month|week|all] [--target FM_PER_SCAN] [--json]
    lungscreen feedback apply-operating-point (--threshold P | --proposed) --by NAME --evidence TEXT
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
from lungscreen.benchmarks.followup import add_cli as add_followup_cli
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
    from dataclasses import replace

    from lungscreen.findings import exam_lung_rads
    from lungscreen.server.workers import build_analyzer
    from lungscreen.server.pipeline import PriorImages, analyze_study, comparison_summary
    from lungscreen.server.preflight import check_settings
    from lungscreen.server.priors import prior_from_result

    settings = check_settings(_settings(args)).settings  # a bad setting is named before the model loads
    paths = [p for p in Path(args.dicom_dir).rglob("*") if p.is_file()]
    analyzer = build_analyzer(settings)
    out = Path(args.out)
    prior, prior_images = None, None
    if args.prior is not None:
        # The prior is analysed like the current study; its SR goes to OUT_DIR/prior so that
        # both timepoints can be read with the same tracking UIDs.
        prior_paths = [p for p in Path(args.prior).rglob("*") if p.is_file()]
        prior_result = analyze_study(prior_paths, replace(analyzer, keep_alignment_image=True))
        prior = prior_from_result(prior_result)
        prior_images = PriorImages(tuple(prior_paths), prior_result.series_uid)  # referenced by the SR
        (out / "prior").mkdir(parents=True, exist_ok=True)
        prior_result.sr.save_as(out / "prior" / "report_sr.dcm", enforce_file_format=True)
    result = analyze_study(paths, analyzer, prior=prior, prior_images=prior_images)
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
        **comparison_summary(result.report, analyzer.rule_set),
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


def _write_export(text: str, out: Path | None) -> None:
    """An export to the file ``out``, or to standard output."""
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)


def cmd_billing_export(args: argparse.Namespace) -> int:
    from lungscreen.server.billing import BillingLedger
    from lungscreen.server.db import Database

    settings = _settings(args)
    text = BillingLedger(Database(settings.db_path)).export(args.format)
    _write_export(text, args.out)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from lungscreen.dicom_io.store import InstanceStore
    from lungscreen.server.db import Database
    from lungscreen.server.priors import retrieved_priors_dir
    from lungscreen.server.retention import purge_feedback, purge_images, purge_retrieved_priors

    settings = _settings(args)
    db = Database(settings.db_path)
    purged = purge_images(db, InstanceStore(settings.images_dir), args.older_than * 86400)
    print(f"purged the images of {len(purged)} stud{'y' if len(purged) == 1 else 'ies'}; reports and billing kept")
    priors = purge_retrieved_priors(retrieved_priors_dir(settings), db, args.older_than * 86400)
    print(f"purged the images of {len(priors)} retrieved prior stud{'y' if len(priors) == 1 else 'ies'}; their findings kept")
    if args.feedback_older_than is not None:
        removed = purge_feedback(db, args.feedback_older_than * 86400)
        print(f"purged {removed} verdict record(s) older than {args.feedback_older_than:g} days")
    return 0


def cmd_reviewer_add(args: argparse.Namespace) -> int:
    """Print the config line of a reviewer: the name and a salted hash of the secret, never the secret."""
    import getpass
    import tomllib

    from lungscreen.server.reviewers import hash_secret

    if args.secret_stdin:
        secret = sys.stdin.readline().rstrip("\n")
    else:
        secret = getpass.getpass(f"secret for {args.name}: ")
        if getpass.getpass("again: ") != secret:
            raise ValueError("the two secrets differ")
    line = f"{json.dumps(args.name)} = {json.dumps(hash_secret(secret))}"
    tomllib.loads(f"[reviewers]\n{line}\n")  # the line is valid TOML as printed
    print("# add under [reviewers] in the config file, then restart the server:")
    print(line)
    return 0


def _feedback_store(settings: Settings):
    from lungscreen.server.db import Database
    from lungscreen.server.feedback import FeedbackStore

    return FeedbackStore(Database(settings.db_path))


def _model_name(settings: Settings) -> str:
    """The configured model as the job details name it ("name version")."""
    from lungscreen.models.card import load_card

    card = load_card(settings.model)
    return f"{card.name} {card.version}"


def _proposals(store, target: float):
    from lungscreen.server.site_figures import propose_operating_points

    return propose_operating_points(store.verdicts(), store.missed(), target_false_marks_per_scan=target)


def cmd_feedback_export(args: argparse.Namespace) -> int:
    """Every verdict (with its history) and missed nodule, one row each."""
    import csv
    import io
    import time

    store = _feedback_store(_settings(args))
    iso = lambda epoch: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))  # noqa: E731
    rows = []
    for study_uid in sorted({v.finding.study_uid for v in store.verdicts()}):
        for v in store.verdict_history(study_uid):
            f = v.finding
            rows.append({
                "record": "verdict", "study_uid": f.study_uid, "tracking_uid": f.tracking_uid, "verdict": v.verdict,
                "reviewer": v.reviewer, "source": v.source, "source_sop_uid": v.source_sop_uid or "", "at": iso(v.at),
                "model": f.model, "operating_point": f.operating_point, "score_threshold": f.score_threshold,
                "probability": f.probability, "lung_rads": f.lung_rads, "diameter_mm": f.diameter_mm,
                "x_mm": "", "y_mm": "", "z_mm": "",
            })
    for m in store.missed():
        x, y, z = m.center_lps_mm or ("", "", "")
        rows.append({
            "record": "missed", "study_uid": m.study_uid, "tracking_uid": m.source_tracking_uid or "", "verdict": "",
            "reviewer": m.reviewer, "source": m.source, "source_sop_uid": m.source_sop_uid or "", "at": iso(m.at),
            "model": m.model, "operating_point": m.operating_point, "score_threshold": m.score_threshold,
            "probability": "", "lung_rads": "", "diameter_mm": "" if m.diameter_mm is None else m.diameter_mm,
            "x_mm": x, "y_mm": y, "z_mm": z,
        })
    if args.format == "json":
        text = json.dumps(rows, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["record"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    _write_export(text, args.out)
    return 0


def cmd_feedback_report(args: argparse.Namespace) -> int:
    from lungscreen.server.site_figures import as_json, render_text, site_figures

    settings = _settings(args)
    store = _feedback_store(settings)
    target = settings.target_false_marks_per_scan if args.target is None else args.target
    figures = site_figures(store.verdicts(), store.missed(), period=args.period)
    proposals = _proposals(store, target)
    print(json.dumps(as_json(figures, proposals), indent=2) if args.json else render_text(figures, proposals))
    return 0


def cmd_feedback_apply(args: argparse.Namespace) -> int:
    """Record an operating point for the configured model: who, when, on what evidence. The
    analysis uses it from the next study on; the SR names it and where it came from."""
    import time

    settings = _settings(args)
    store = _feedback_store(settings)
    model = _model_name(settings)
    evidence = args.evidence
    threshold = args.threshold
    if args.proposed:
        proposal = next((p for p in _proposals(store, settings.target_false_marks_per_scan)
                         if p.model == model), None)
        if proposal is None:
            raise ValueError(f"no verdicts on {model}: nothing to propose")
        threshold = proposal.threshold
        evidence = f"{evidence}; {proposal.evidence}"
    name = args.name or f"site-{time.strftime('%Y-%m-%d', time.gmtime())}"
    decision = store.apply_operating_point(model, name, threshold, applied_by=args.by, evidence=evidence[:400])
    print(f"applied {decision.name} (threshold {decision.threshold:g}) to {model}: {decision.provenance}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """What ``serve`` checks before it accepts an association, without starting anything."""
    from lungscreen.server.db import check_store_version
    from lungscreen.server.preflight import check_settings

    settings = check_settings(load_settings(args.file)).settings
    store = check_store_version(settings.db_path)
    print(f"{args.file}: configuration valid ({store})")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from lungscreen.server.config import settings_toml

    sys.stdout.write(settings_toml(_settings(args)))
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from lungscreen.server.service import install_service

    install_service(args.prefix, dry_run=args.dry_run)
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
    analyze.add_argument("--prior", type=Path, help="folder of the same patient's earlier CT: a follow-up report")
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
    purge.add_argument("--feedback-older-than", type=float, metavar="DAYS",
                       help="also delete radiologists' verdicts, missed nodules and viewer SRs older than this")
    purge.set_defaults(func=cmd_purge)

    config = sub.add_parser("config", help="check or show the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file as serve does, without starting")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="print the effective configuration with its defaults (TOML)")
    show.add_argument("--config", type=Path, help="TOML file; its keys are the serve flags with _")
    show.set_defaults(func=cmd_config_show)

    service = sub.add_parser("install-service", help="install the systemd unit, a default configuration and the user")
    service.add_argument("--prefix", type=Path, default=Path("/"), help="root to install under (default /)")
    service.add_argument("--dry-run", action="store_true", help="print what would be written and done; change nothing")
    service.set_defaults(func=cmd_install_service)

    reviewer = sub.add_parser("reviewer", help="reviewers who may record verdicts on the review page")
    reviewer_sub = reviewer.add_subparsers(dest="reviewer_command", required=True)
    reviewer_add = reviewer_sub.add_parser("add", help="print the config line of a new reviewer (salted secret hash)")
    reviewer_add.add_argument("name")
    reviewer_add.add_argument("--secret-stdin", action="store_true", help="read the secret from standard input")
    reviewer_add.set_defaults(func=cmd_reviewer_add)

    feedback = sub.add_parser("feedback", help="radiologists' verdicts: export, the site's figures, operating point")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    feedback_export = feedback_sub.add_parser("export", help="every verdict and missed nodule")
    common(feedback_export)
    feedback_export.add_argument("--format", choices=("csv", "json"), default="csv")
    feedback_export.add_argument("--out", type=Path)
    feedback_export.set_defaults(func=cmd_feedback_export)
    feedback_report = feedback_sub.add_parser("report", help="false marks, acceptance and missed nodules per scan")
    common(feedback_report)
    feedback_report.add_argument("--period", choices=("month", "week", "all"), default="month")
    feedback_report.add_argument("--target", type=float, help="false marks per scan (default: target_false_marks_per_scan)")
    feedback_report.add_argument("--json", action="store_true")
    feedback_report.set_defaults(func=cmd_feedback_report)
    feedback_apply = feedback_sub.add_parser("apply-operating-point", help="record and apply a site operating point")
    common(feedback_apply)
    which = feedback_apply.add_mutually_exclusive_group(required=True)
    which.add_argument("--threshold", type=float, help="on the calibrated probability")
    which.add_argument("--proposed", action="store_true", help="the one `feedback report` proposes")
    feedback_apply.add_argument("--name", help="default: site-YYYY-MM-DD")
    feedback_apply.add_argument("--by", required=True, help="who applies it")
    feedback_apply.add_argument("--evidence", required=True, help="on what evidence (report, meeting, ...)")
    feedback_apply.set_defaults(func=cmd_feedback_apply)

    add_model_cli(sub)
    add_evaluate_cli(sub)
    add_bench_cli(sub)
    add_followup_cli(sub)
    add_triton_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from lungscreen.errors import LungScreenError

    try:
        return args.func(args)
    except (LungScreenError, ValueError, OSError) as exc:
        # One line on stderr (the journal under systemd), naming the setting when one is at fault.
        print(f"lungscreen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
