"""The benchmark suite behind ``lungscreen bench``: ingest, end to end, reference, load, scaling.

Every figure is the median of several runs with their min and max; every comparison is a
ratio of figures measured in the same run. Peers: our server (``lungscreen serve`` as a
subprocess), dcmtk ``storescu`` as the sender and dcmtk ``storescp`` as the destination and
as the ingest baseline. storescp listens on all interfaces, so the suite runs inside a
loopback-only network namespace (``unshare --net``; root) — see :mod:`benchmarks.cli`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lungscreen.benchmarks.harness import (
    REAL_CT, Server, free_port, in_netns, storescp, storescu, wait_for_file,
)

STAGE_KEYS = ("receive", "trigger_wait", "assemble", "select", "volume", "preprocess", "inference", "postprocess",
              "report", "commit", "deliver")
Z_EXTENT_MM = 300.0  # synthetic studies cover up to 300 mm of chest


def slice_step_mm(slices: int) -> float:
    """300 slices: 1 mm, 600: 0.5 mm; never thicker than 2.5 mm (series selection allows 3 mm)."""
    return min(Z_EXTENT_MM / slices, 2.5)


@dataclass
class Config:
    quick: bool = False
    rows: int = 512  # in-plane size of synthetic studies
    ingest_slices: int = 300
    e2e_slices: int = 300
    e2e_reps: int = 5
    ingest_reps: int = 5
    ingest_senders: tuple[int, ...] = (1, 2, 4)  # concurrent associations for aggregate_ingest_mb_s
    aggregate_reps: int = 3
    reference_reps: int = 5
    scaling_slices: tuple[int, ...] = (100, 300, 600)
    scaling_reps: int = 3
    senders: int = 4
    studies_per_sender: int = 3
    load_slices: int = 300
    idle_default_s: float = 5.0
    idle_short_s: float = 0.2
    warmup_slices: int = 64
    base_slices: int = 100  # slices of the synthetic base volume (interpolated to any count)
    reference_volume: str = "synthetic"  # "synthetic" (e2e_slices, the target's 300) or "real" (LIDC-IDRI-0001)
    model: Path | None = None  # None: the server's default model card
    skip: tuple[str, ...] = ()

    @classmethod
    def quick_config(cls) -> "Config":
        return cls(quick=True, e2e_reps=3, ingest_reps=3, ingest_senders=(1, 2), aggregate_reps=1, reference_reps=1,
                   scaling_slices=(100, 300, 600), scaling_reps=1, studies_per_sender=1, load_slices=100,
                   idle_default_s=5.0)


def stats(values: list[float], digits: int = 3) -> dict:
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


# --- input data -------------------------------------------------------------------------------


class StudyFactory:
    """Synthetic chest CT studies of any slice count with fresh UIDs, from one base volume
    (``training.synthetic.make_chest_ct``) linearly interpolated along the slice axis."""

    def __init__(self, work: Path, rows: int = 512, base_slices: int = 100, seed: int = 7) -> None:
        from lungscreen.training.synthetic import make_chest_ct

        self.work = work
        self.rows = rows
        self.pixel_mm = 0.7 * 512 / rows
        ct = make_chest_ct(seed, shape=(base_slices, rows, rows),
                           spacing=(Z_EXTENT_MM / base_slices, self.pixel_mm, self.pixel_mm))
        self.base = ct.hu
        self._count = 0

    def volume(self, slices: int) -> np.ndarray:
        n0 = self.base.shape[0]
        pos = np.linspace(0, n0 - 1, slices)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n0 - 1)
        w = (pos - lo).astype(np.float32)[:, None, None]
        return self.base[lo] * (1 - w) + self.base[hi] * w

    def study(self, slices: int, name: str | None = None) -> tuple[str, list[Path]]:
        """Write a fresh study (new UIDs); return its Study Instance UID and its files."""
        from lungscreen.training.dicom_writer import write_ct_series

        self._count += 1
        folder = self.work / "studies" / (name or f"s{self._count:03d}_{slices}")
        written = write_ct_series(
            self.volume(slices), (slice_step_mm(slices), self.pixel_mm, self.pixel_mm), folder,
            accession_number=f"BENCH{self._count:05d}",
        )
        return written.study_instance_uid, list(written.paths)


def real_ct_folder(work: Path) -> Path | None:
    """LIDC-IDRI-0001's CT files (symlinked into one folder of .dcm only), or None."""
    files = sorted(REAL_CT.rglob("*.dcm")) if REAL_CT.exists() else []
    if not files:
        return None
    folder = work / "real_ct"
    if not folder.exists():
        folder.mkdir(parents=True)
        for f in files:
            (folder / f.name).symlink_to(f)
    return folder


def remove(paths: list[Path]) -> None:
    if paths:
        shutil.rmtree(paths[0].parent, ignore_errors=True)


# --- device -----------------------------------------------------------------------------------


def device_info(model: Path | None = None) -> dict:
    import onnxruntime as ort

    from lungscreen.models.card import DEFAULT_MODEL_CARD, load_card
    from lungscreen.models.detector import choose_providers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    card = load_card(model or DEFAULT_MODEL_CARD)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": choose_providers(),
        "model": {"name": card.name, "version": card.version, "card": str(model or DEFAULT_MODEL_CARD)},
        "python": platform.python_version(),
        "loadavg_at_start": [round(v, 2) for v in load] if load else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- ingest -----------------------------------------------------------------------------------


def bench_ingest(cfg: Config, factory: StudyFactory, work: Path) -> dict:
    """Our SCP vs dcmtk storescp receiving the same uncompressed study over one association."""
    ours, dcmtk, ratios = [], [], []
    server = Server(work / "ingest-server", idle_seconds=3600.0, model=cfg.model)  # no analysis during the push
    dest_dir = work / "ingest-storescp"
    port = free_port()
    nbytes = 0
    with server.running(), storescp(dest_dir, port, "DCMTK", log_path=work / "ingest-storescp.log"):
        for rep in range(cfg.ingest_reps):
            _, files = factory.study(cfg.ingest_slices)
            nbytes = sum(f.stat().st_size for f in files)
            # Alternate the order so that neither side always gets warm page caches first.
            order = ("ours", "dcmtk") if rep % 2 == 0 else ("dcmtk", "ours")
            speeds = {}
            for who in order:
                if who == "ours":
                    seconds = storescu(files, server.port)
                else:
                    seconds = storescu(files, port, called="DCMTK")
                speeds[who] = nbytes / seconds / 1e6
            ours.append(speeds["ours"])
            dcmtk.append(speeds["dcmtk"])
            ratios.append(speeds["ours"] / speeds["dcmtk"])
            remove(files)
            shutil.rmtree(dest_dir, ignore_errors=True)
            dest_dir.mkdir()
        aggregate = {str(n): [] for n in cfg.ingest_senders}
        for _ in range(cfg.aggregate_reps):  # interleaved, so a slow minute of the VM hits every count
            for n in cfg.ingest_senders:
                aggregate[str(n)].append(concurrent_ingest_mb_s(factory, server.port, n, cfg.ingest_slices))
    return {
        "ingest_mb_s": stats(ours, 1),
        "dcmtk_ingest_mb_s": stats(dcmtk, 1),
        "ingest_ratio_vs_dcmtk": stats(ratios, 3),
        "ingest_study": {"slices": cfg.ingest_slices, "rows": factory.rows, "bytes": nbytes, "associations": 1},
        "aggregate_ingest_mb_s": {n: stats(speeds, 1) for n, speeds in aggregate.items()},
    }


def push_concurrently(plans: list[list[list[Path]]], port: int) -> tuple[float, list[Exception]]:
    """Sender ``k`` pushes its studies ``plans[k]`` one after another with storescu (calling AE
    ``SENDERk``), all senders at once. Returns the wall time until the last one finished and
    the failures (a failed study does not stop its sender)."""
    errors: list[Exception] = []

    def sender(k: int, studies: list[list[Path]]) -> None:
        for files in studies:
            try:
                storescu(files, port, calling=f"SENDER{k}")
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k, studies)) for k, studies in enumerate(plans)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, errors


def concurrent_ingest_mb_s(factory: StudyFactory, port: int, senders: int, slices: int) -> float:
    """``senders`` storescu processes each pushing its own study at once: all bytes / wall time."""
    studies = [factory.study(slices)[1] for _ in range(senders)]
    nbytes = sum(f.stat().st_size for files in studies for f in files)
    seconds, errors = push_concurrently([[files] for files in studies], port)
    for files in studies:
        remove(files)
    if errors:
        raise errors[0]
    return nbytes / seconds / 1e6


# --- end to end -------------------------------------------------------------------------------


def job_stages(job: dict, push_s: float, sr_seen_at: float) -> dict:
    """Per-stage seconds of one run from the job status (timestamps are ``time.time()``)."""
    timings = job["details"].get("timings_s", {})
    out = {"receive": push_s, "trigger_wait": job["started_at"] - job["last_received_at"]}
    for key in ("assemble", "select", "volume", "preprocess", "inference", "postprocess", "report"):
        out[key] = float(timings.get(key, 0.0))
    analysed = sum(float(v) for v in timings.values())
    out["commit"] = max(0.0, job["finished_at"] - job["started_at"] - analysed)  # worker IPC + saving + DB
    out["deliver"] = sr_seen_at - job["finished_at"]
    return out


def _not_failed(server: Server, study_uid: str) -> None:
    job = server.study(study_uid)
    if job and job["state"] == "failed":
        raise RuntimeError(f"study {study_uid} failed: {job.get('reason')}")


@dataclass
class E2ERun:
    study_uid: str
    slices: int
    push_s: float
    e2e_s: float
    stages: dict
    trigger_excess_s: float


def e2e_once(server: Server, dest_dir: Path, factory: StudyFactory, slices: int) -> E2ERun:
    study_uid, files = factory.study(slices)
    known = {p.name for p in dest_dir.iterdir()}
    push_s = storescu(files, server.port)
    pushed_at = time.time()
    name, seen_at = wait_for_file(dest_dir, "SR", known, timeout=900, check=lambda: _not_failed(server, study_uid))
    job = server.wait_for_state(study_uid, ("delivered",), timeout=120)
    server.sample_memory()
    remove(files)
    stages = job_stages(job, push_s, seen_at)
    return E2ERun(study_uid, slices, push_s, seen_at - pushed_at, stages,
                  stages["trigger_wait"] - server.idle_seconds)


@dataclass
class Destination:
    dir: Path
    port: int
    ae: str = "DEST"

    @property
    def spec(self) -> str:
        return f"{self.ae}@127.0.0.1:{self.port}"


def summarize_e2e(runs: list[E2ERun]) -> dict:
    e2e = [r.e2e_s for r in runs]
    return {
        "p50_s": percentile(e2e, 50),
        "p95_s": percentile(e2e, 95),
        "e2e_s": stats(e2e),
        "trigger_excess_s": stats([r.trigger_excess_s for r in runs]),
        "stages": {k: stats([r.stages[k] for r in runs]) for k in STAGE_KEYS},
        "n": len(runs),
        "slices": runs[0].slices if runs else None,
    }


def bench_e2e_and_scaling(cfg: Config, factory: StudyFactory, work: Path, results: dict) -> None:
    """E2E at the default and the shortest quiet period; load (concurrent senders); scaling."""
    dest = Destination(work / "dest", free_port())
    with storescp(dest.dir, dest.port, dest.ae, log_path=work / "dest-storescp.log"):
        # Shortest quiet period: e2e, scaling, load, memory (one server).
        short = Server(work / "server-short", idle_seconds=cfg.idle_short_s, destinations=[dest.spec], model=cfg.model)
        with short.running():
            e2e_once(short, dest.dir, factory, cfg.warmup_slices)  # warm-up (page cache, first-run costs), not counted
            runs_short = [e2e_once(short, dest.dir, factory, cfg.e2e_slices) for _ in range(cfg.e2e_reps)]
            scaling = {}
            for slices in cfg.scaling_slices:
                if slices == cfg.e2e_slices and len(runs_short) >= cfg.scaling_reps:
                    runs = runs_short
                else:
                    runs = [e2e_once(short, dest.dir, factory, slices) for _ in range(cfg.scaling_reps)]
                scaling[str(slices)] = {
                    "e2e_s": stats([r.e2e_s for r in runs]),
                    "analysis_s": stats([sum(r.stages[k] for k in ("assemble", "select", "volume", "preprocess",
                                                                     "inference", "postprocess", "report"))
                                         for r in runs]),
                    "push_s": stats([r.push_s for r in runs]),
                }
            results["scaling"] = {"idle_s": cfg.idle_short_s, "rows": factory.rows, "by_slices": scaling}
            if "load" not in cfg.skip:
                results["load"] = bench_load(cfg, factory, short, dest)
                results["studies_per_hour"] = results["load"]["studies_per_hour"]
            hwm = short.sample_memory()
        results["peak_rss_mb"] = {
            "total": round(sum(hwm.values()), 1),
            "server": round(hwm.get(short.proc.pid, 0.0), 1),
            "children": {str(pid): round(v, 1) for pid, v in hwm.items() if pid != short.proc.pid},
            "note": "VmHWM of the server process and each child (analysis workers, DICOM receivers, "
                    "multiprocessing's resource tracker); total is their sum",
        }
        # Default quiet period.
        default = Server(work / "server-default", idle_seconds=cfg.idle_default_s, destinations=[dest.spec],
                         model=cfg.model)
        with default.running():
            e2e_once(default, dest.dir, factory, cfg.warmup_slices)
            runs_default = [e2e_once(default, dest.dir, factory, cfg.e2e_slices) for _ in range(cfg.e2e_reps)]
    s_default, s_short = summarize_e2e(runs_default), summarize_e2e(runs_short)
    results["e2e_p50_s"] = {f"idle_{cfg.idle_default_s:g}s": s_default["p50_s"], f"idle_{cfg.idle_short_s:g}s": s_short["p50_s"]}
    results["e2e_p95_s"] = {f"idle_{cfg.idle_default_s:g}s": s_default["p95_s"], f"idle_{cfg.idle_short_s:g}s": s_short["p95_s"]}
    results["e2e"] = {f"idle_{cfg.idle_default_s:g}s": s_default, f"idle_{cfg.idle_short_s:g}s": s_short}
    results["stages"] = {k: s_default["stages"][k]["median"] for k in STAGE_KEYS}
    results["trigger_excess_s"] = {f"idle_{cfg.idle_default_s:g}s": s_default["trigger_excess_s"],
                                   f"idle_{cfg.idle_short_s:g}s": s_short["trigger_excess_s"]}


def bench_load(cfg: Config, factory: StudyFactory, server: Server, dest: Destination) -> dict:
    """Several storescu senders pushing studies at once; studies/hour until the last SR arrives."""
    plans = [[factory.study(cfg.load_slices) for _ in range(cfg.studies_per_sender)] for _ in range(cfg.senders)]
    uids = [uid for plan in plans for uid, _ in plan]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            server.sample_memory()
            stop.wait(0.5)

    threading.Thread(target=sampler, daemon=True).start()
    start = time.time()
    push_s, errors = push_concurrently([[files for _, files in plan] for plan in plans], server.port)
    jobs = [server.wait_for_state(uid, ("delivered", "failed"), timeout=1800) for uid in uids]
    stop.set()
    end = max(j["finished_at"] for j in jobs)
    # finished_at is 'reported'; the SR reaches the destination within the deliver stage after it.
    delivered = sum(1 for j in jobs if j["state"] == "delivered")
    for plan in plans:
        for _, files in plan:
            remove(files)
    return {
        "senders": cfg.senders,
        "studies": len(uids),
        "slices": cfg.load_slices,
        "delivered": delivered,
        "send_errors": [str(exc)[:200] for exc in errors],  # recorded, not raised: the figure says how many failed
        "push_s": round(push_s, 2),
        "wall_s": round(end - start, 2),
        "studies_per_hour": round(delivered / (end - start) * 3600, 1),
        "workers": 1,
    }


# --- reference ------------------------------------------------------------------------------


def bench_reference(cfg: Config, factory: StudyFactory | None, work: Path) -> dict:
    from lungscreen.benchmarks.reference import (
        OURS, REFERENCE, WARM_UP_RUNS, compare_candidates, missing_torch_network, reported_min_score, run_in_process,
    )
    from lungscreen.models.card import DEFAULT_MODEL_CARD, load_card

    card = load_card(cfg.model or DEFAULT_MODEL_CARD)
    missing = missing_torch_network(card)  # the reference's own process loads the network
    if missing:
        return {"skipped": missing}
    folder = real_ct_folder(work) if cfg.reference_volume == "real" else None
    label = "LIDC-IDRI-0001 (real, 133 slices)"
    if folder is None:
        _, files = factory.study(cfg.e2e_slices, name="reference")
        folder = files[0].parent
        label = f"synthetic {cfg.e2e_slices} slices"
    ours = run_in_process(folder, cfg.model, OURS, cfg.reference_reps)
    refs = run_in_process(folder, cfg.model, REFERENCE, cfg.reference_reps)
    ratios = [r.seconds / o.seconds for o, r in zip(ours, refs)]
    o, r = ours[-1], refs[-1]
    min_score_reported = reported_min_score(card, o, r)
    return {
        "volume": label,
        "processes": f"each way in a fresh process, {WARM_UP_RUNS} warm-up runs first; ours tuned as the analysis worker",
        "ours_s": stats([x.seconds for x in ours]),
        "reference_s": stats([x.seconds for x in refs]),
        "speedup_vs_reference": stats(ratios, 2),
        "ours_stages": {k: stats([x.stages[k] for x in ours]) for k in ours[0].stages},
        "reference_stages": {k: stats([x.stages[k] for x in refs]) for k in refs[0].stages},
        "candidates_all": compare_candidates(o, r),
        "candidates_reported": compare_candidates(o, r, min_score=min_score_reported or 0.0)
        if min_score_reported is not None else {"agree": True, "ours": 0, "reference": 0, "note": "none reported"},
        "network": "PyTorch twin of " + card.name,
    }


# --- the whole suite ------------------------------------------------------------------------


def evaluate_targets(results: dict, cfg: Config) -> dict:
    out = {}

    def check(name, value, op, limit, note=""):
        if value is None:
            out[name] = {"value": None, "target": f"{op} {limit}", "met": None, "note": note or "not measured"}
            return
        met = value >= limit if op == ">=" else value <= limit
        out[name] = {"value": value, "target": f"{op} {limit}", "met": bool(met), **({"note": note} if note else {})}

    ratio = results.get("ingest_ratio_vs_dcmtk", {}).get("median")
    check("ingest_ratio_vs_dcmtk", ratio, ">=", 0.5, "one association")
    aggregate = results.get("aggregate_ingest_mb_s") or {}
    growth = None
    if "1" in aggregate and "2" in aggregate and aggregate["1"]["median"]:
        growth = round(aggregate["2"]["median"] / aggregate["1"]["median"], 3)
    check("aggregate_ingest_growth", growth, ">=", 1.1,
          "aggregate MB/s with 2 concurrent associations / with 1 (medians); 1.1: beyond the run-to-run spread")
    key = f"idle_{cfg.idle_default_s:g}s"
    check("e2e_p50_s", (results.get("e2e_p50_s") or {}).get(key), "<=", 15.0,
          f"{cfg.e2e_slices}-slice study, default quiet period {cfg.idle_default_s:g} s")
    speed = (results.get("reference") or {}).get("speedup_vs_reference", {}).get("median")
    check("speedup_vs_reference", speed, ">=", 5.0)
    excess = [v["max"] for v in (results.get("trigger_excess_s") or {}).values() if v.get("max") is not None]
    check("trigger_within_0.5s", max(excess) if excess else None, "<=", 0.5,
          "max over runs of (job 'processing' - last C-STORE) - quiet period")
    return out


def run_suite(cfg: Config, work: Path, log=print) -> dict:
    if not in_netns():
        raise RuntimeError("the suite needs the loopback-only namespace (storescp): use `lungscreen bench`")
    results: dict = {"quick": cfg.quick, "device": device_info(cfg.model)}
    t0 = time.perf_counter()
    log(f"bench: synthetic base volume ({cfg.base_slices}x{cfg.rows}x{cfg.rows})")
    factory = StudyFactory(work, rows=cfg.rows, base_slices=cfg.base_slices)
    if "ingest" not in cfg.skip:
        log("bench: ingest (ours vs dcmtk storescp)")
        results.update(bench_ingest(cfg, factory, work))
    if "e2e" not in cfg.skip:
        log("bench: end to end, scaling, load")
        bench_e2e_and_scaling(cfg, factory, work, results)
    if "reference" not in cfg.skip:
        log("bench: reference pipeline (MONAI + PyTorch)")
        ref = bench_reference(cfg, factory, work)
        results["reference"] = ref
        if "reference_s" in ref:
            results["reference_s"] = ref["reference_s"]
            results["speedup_vs_reference"] = ref["speedup_vs_reference"]
    results["targets"] = evaluate_targets(results, cfg)
    results["suite_s"] = round(time.perf_counter() - t0, 1)
    try:
        results["device"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return results


# --- output ---------------------------------------------------------------------------------


def _fmt(s) -> str:
    if isinstance(s, dict) and "median" in s:
        if s["median"] is None:
            return "–"
        return f"{s['median']:g} ({s['min']:g}–{s['max']:g}, n={s['n']})"
    if s is None:
        return "–"
    return f"{s:g}" if isinstance(s, (int, float)) else str(s)


def markdown(results: dict) -> str:
    d = results.get("device", {})
    lines = [
        f"# LungScreen benchmark ({'quick' if results.get('quick') else 'full'})",
        "",
        f"{d.get('date', '')}; {d.get('cpu_model')} x {d.get('cores')} cores; ONNX Runtime {d.get('onnxruntime')} "
        f"{d.get('onnxruntime_providers')}; model {d.get('model', {}).get('name')} {d.get('model', {}).get('version')}; "
        f"load average at start {d.get('loadavg_at_start')}",
        "",
        "| figure | median (min–max, n) |",
        "|---|---|",
    ]
    rows = [
        ("ingest MB/s (ours, 1 association)", results.get("ingest_mb_s")),
        ("ingest MB/s (dcmtk storescp)", results.get("dcmtk_ingest_mb_s")),
        ("ingest ratio ours/dcmtk", results.get("ingest_ratio_vs_dcmtk")),
    ]
    for senders, mb_s in (results.get("aggregate_ingest_mb_s") or {}).items():
        rows.append((f"aggregate ingest MB/s, {senders} concurrent association(s)", mb_s))
    for key, s in (results.get("e2e") or {}).items():
        rows.append((f"e2e s, {key} ({s['slices']} slices) p50 / p95", f"{_fmt(s['p50_s'])} / {_fmt(s['p95_s'])}"))
        rows.append((f"e2e s, {key}", s["e2e_s"]))
        rows.append((f"trigger excess s, {key}", s["trigger_excess_s"]))
    ref = results.get("reference") or {}
    if "reference_s" in ref:
        rows += [
            (f"ours files→candidates s ({ref['volume']})", ref["ours_s"]),
            ("reference (MONAI+PyTorch) s", ref["reference_s"]),
            ("speedup vs reference", ref["speedup_vs_reference"]),
            ("candidates agree (all / reported)",
             f"{ref['candidates_all'].get('agree')} / {ref['candidates_reported'].get('agree')}"),
        ]
    elif ref:
        rows.append(("reference", ref.get("skipped")))
    load = results.get("load")
    if load:
        rows.append((f"studies/hour ({load['senders']} senders x {load['studies'] // load['senders']} studies, "
                     f"{load['slices']} slices)", load["studies_per_hour"]))
    if results.get("peak_rss_mb"):
        rows.append(("peak RSS MiB (server + workers + receivers, sum of VmHWM)", results["peak_rss_mb"]["total"]))
    for slices, s in ((results.get("scaling") or {}).get("by_slices") or {}).items():
        rows.append((f"scaling: e2e s, {slices} slices (idle {results['scaling']['idle_s']:g} s)", s["e2e_s"]))
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    if results.get("stages"):
        lines += ["", "Stage medians (s), default quiet period:", "", "| " + " | ".join(results["stages"]) + " |",
                  "|" + "---|" * len(results["stages"]),
                  "| " + " | ".join(f"{v:.3f}" if v is not None else "–" for v in results["stages"].values()) + " |"]
    if results.get("targets"):
        lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
        for name, t in results["targets"].items():
            lines.append(f"| {name} | {_fmt(t['value'])} | {t['target']} | {t['met']} |")
    lines += ["", f"suite wall time {results.get('suite_s')} s"]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, json_path: Path) -> Path:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results))
    return md_path
