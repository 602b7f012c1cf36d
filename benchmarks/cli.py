"""``lungscreen bench [--quick] [--json PATH]``: run the benchmark suite, write JSON + Markdown.

dcmtk's storescp (the destination and the ingest baseline) cannot bind 127.0.0.1 only, so
the suite re-runs itself inside a new network namespace that has only a loopback interface
(``unshare --net --fork``, as root). Also runnable as ``python -m lungscreen.benchmarks.cli bench``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lungscreen.benchmarks.harness import REPO, can_unshare, in_netns, reexec_in_netns


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmark suite (JSON + Markdown table)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller load (< 3 min on 2 cores)")
    p.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the JSON (default bench.json);"
                   " the Markdown table goes next to it (.md)")
    p.add_argument("--model", type=Path, default=None, help="model card (default: the server's default model)")
    p.add_argument("--skip", action="append", default=[], choices=("ingest", "e2e", "load", "reference"),
                   help="leave a part out (repeatable)")
    p.add_argument("--work-dir", type=Path, default=None, help="temporary folder (default: a fresh one, removed)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if not in_netns():
        if not can_unshare():
            print("bench: needs root and `unshare --net` (storescp listens on all interfaces; the suite runs in a "
                  "loopback-only network namespace)", file=sys.stderr)
            return 2
        argv = ["-m", "lungscreen.benchmarks.cli", "bench", "--json", str(args.json.resolve())]
        argv += ["--quick"] if args.quick else []
        argv += ["--model", str(args.model.resolve())] if args.model else []
        argv += [a for s in args.skip for a in ("--skip", s)]
        argv += ["--work-dir", str(args.work_dir.resolve())] if args.work_dir else []
        return reexec_in_netns(argv)

    from lungscreen.benchmarks.suite import Config, markdown, run_suite, write_outputs

    cfg = Config.quick_config() if args.quick else Config()
    cfg.model = args.model
    cfg.skip = tuple(args.skip)
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        results = run_suite(cfg, args.work_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        with tempfile.TemporaryDirectory(prefix="lungscreen-bench-") as tmp:
            results = run_suite(cfg, Path(tmp), log=lambda m: print(m, file=sys.stderr, flush=True))
    md_path = write_outputs(results, args.json)
    print(markdown(results))
    print(f"wrote {args.json} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(prog="python -m lungscreen.benchmarks.cli")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
