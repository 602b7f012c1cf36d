"""Remote inference on Triton against local ONNX Runtime, side by side in one run.

``python -m lungscreen.benchmarks.triton [--json PATH] [--reps N] [--studies-per-node N]``

1. ``remote_vs_local``: the same 300-slice synthetic study (``suite.StudyFactory``) analysed in
   this process by ``server.pipeline.analyze_study``, alternately with the local ONNX Runtime
   session and with the network on the bundled Triton server over loopback (gRPC, binary
   tensors), after one warm-up run each: total and per-stage seconds, requests and bytes sent,
   and whether the findings are the same (count, centres within 1 mm, probabilities within 1e-3).
2. ``nodes``: ``lungscreen serve`` nodes sharing that Triton server; one node, then two nodes,
   each sent ``--studies-per-node`` 300-slice studies by storescu at once: studies per hour
   (studies / (last ``finished_at`` - first push)) and the CPU seconds spent by the nodes' and by
   Triton's processes (the profile that says where the 2 cores go).

Needs scripts/install_triton.sh. Every server is started here, bound to 127.0.0.1, and stopped by
its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from lungscreen.benchmarks.harness import Server, children, free_port, storescu
from lungscreen.benchmarks.suite import StudyFactory, device_info, stats
from lungscreen.models.card import DEFAULT_MODEL_CARD, load_card
from lungscreen.server.config import Settings
from lungscreen.server.pipeline import analyze_study
from lungscreen.server.triton import TritonPorts, TritonServer, export_repository
from lungscreen.server.workers import build_analyzer

SLICES = 300


def same_findings(a: list[dict], b: list[dict]) -> dict:
    """Same count, centres within 1 mm, probabilities within 1e-3 (rows sorted by centre)."""
    a, b = (sorted(x, key=lambda f: f["center_lps_mm"]) for x in (a, b))
    centre = max((max(abs(p - q) for p, q in zip(x["center_lps_mm"], y["center_lps_mm"])) for x, y in zip(a, b)),
                 default=0.0)
    probability = max((abs(x["probability"] - y["probability"]) for x, y in zip(a, b)), default=0.0)
    return {"count": [len(a), len(b)], "max_centre_mm": round(centre, 3), "max_probability": round(probability, 5),
            "equal": len(a) == len(b) and centre <= 1.0 and probability <= 1e-3}


def remote_vs_local(paths: list[Path], triton: TritonServer, model: Path, work: Path, reps: int) -> dict:
    local = build_analyzer(Settings(model=model, data_dir=work / "local"))
    remote = build_analyzer(Settings(model=model, data_dir=work / "remote", inference_server=triton.grpc_url))
    runs: dict[str, list] = {"local": [], "remote": []}
    for rep in range(reps + 1):  # the first of each is a warm-up, not counted
        for name, analyzer in (("local", local), ("remote", remote)):
            start = time.perf_counter()
            result = analyze_study(paths, analyzer)
            if rep:
                runs[name].append((time.perf_counter() - start, result))
    totals = {k: [s for s, _ in v] for k, v in runs.items()}
    added = [r / l - 1.0 for l, r in zip(totals["local"], totals["remote"])]
    last_remote = runs["remote"][-1][1]
    return {
        "study": f"synthetic chest CT, {SLICES} slices 512x512 ({len(paths)} files)",
        "local_s": stats(totals["local"]),
        "remote_s": stats(totals["remote"]),
        "added_fraction": stats(added, 3),
        "stages_local_s": {k: stats([r.timings[k] for _, r in runs["local"]]) for k in runs["local"][0][1].timings},
        "stages_remote_s": {k: stats([r.timings[k] for _, r in runs["remote"]]) for k in runs["remote"][0][1].timings},
        "requests_per_study": last_remote.inference["requests"],
        "bytes_sent_per_study": last_remote.inference["bytes_sent"],
        "findings": same_findings(list(last_remote.findings), list(runs["local"][-1][1].findings)),
    }


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` and their children, now."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in {p for root in pids for p in (root, *children(root))}:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def nodes_run(count: int, factory: StudyFactory, triton: TritonServer, model: Path, work: Path, per_node: int) -> dict:
    nodes = [Server(work / f"nodes{count}" / f"node{n}", idle_seconds=0.2, model=model,
                    config={"inference_server": triton.grpc_url}) for n in range(count)]
    plans = [[factory.study(SLICES) for _ in range(per_node)] for _ in nodes]
    started = [node.running() for node in nodes]
    for context in started:
        context.__enter__()
    try:
        pids = [node.proc.pid for node in nodes]
        node_cpu, triton_cpu = cpu_seconds(pids), cpu_seconds([triton.process.pid])
        first_push = time.time()

        def push(node: Server, plan) -> None:
            for _, files in plan:
                storescu(files, node.port)

        threads = [threading.Thread(target=push, args=(n, p)) for n, p in zip(nodes, plans)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        jobs = [node.wait_for_state(uid, ("reported",), timeout=1800) for node, plan in zip(nodes, plans)
                for uid, _ in plan]
        node_cpu, triton_cpu = cpu_seconds(pids) - node_cpu, cpu_seconds([triton.process.pid]) - triton_cpu
    finally:
        for context in reversed(started):
            context.__exit__(None, None, None)
        for plan in plans:
            for _, files in plan:
                for f in files:
                    f.unlink(missing_ok=True)
    wall = max(j["finished_at"] for j in jobs) - first_push
    studies = len(jobs)
    return {
        "nodes": count, "studies": studies, "wall_s": round(wall, 1),
        "studies_per_hour": round(studies * 3600 / wall, 1),
        "cpu_s_per_study": {"lungscreen_nodes": round(node_cpu / studies, 2), "triton": round(triton_cpu / studies, 2)},
        "all_remote": all(j["details"]["inference"]["where"] == "remote" for j in jobs),
        "inference_s_median": round(statistics.median(j["details"]["timings_s"]["inference"] for j in jobs), 2),
    }


def run(work: Path, reps: int, per_node: int, model: Path) -> dict:
    card = load_card(model)
    export_repository(card, work / "repository", backend="python")
    triton = TritonServer(work / "repository", TritonPorts(free_port(), free_port(), free_port()),
                          log_path=work / "tritonserver.log")
    factory = StudyFactory(work)
    results = {"device": device_info(model), "triton": "tritonserver 2.51 from nvidia-pytriton 0.7.0, Python backend "
               "running ONNX Runtime on CPU, 127.0.0.1, one instance"}
    with triton:
        _, files = factory.study(SLICES, name="side-by-side")
        results["remote_vs_local"] = remote_vs_local(files, triton, model, work, reps)
        if per_node:
            one = nodes_run(1, factory, triton, model, work, per_node)
            two = nodes_run(2, factory, triton, model, work, per_node)
            results["nodes"] = {"one": one, "two": two,
                                "ratio": round(two["studies_per_hour"] / one["studies_per_hour"], 2)}
    results["device"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lungscreen.benchmarks.triton", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench-triton.json"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--studies-per-node", type=int, default=3, help="0: no multi-node run")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_CARD)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        results = run(Path(tmp), args.reps, args.studies_per_node, args.model)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
