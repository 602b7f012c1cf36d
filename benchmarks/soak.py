"""Soak test (not part of CI): push studies at a LungScreen server for N minutes and report
throughput, errors and memory growth.

    python -m lungscreen.benchmarks.soak --minutes 30 [--senders 2] [--slices 64] [--json soak.json]

It starts its own ``lungscreen serve`` (``benchmarks.harness.Server``) on 127.0.0.1 with a temporary data folder, sends
synthetic studies (fresh UIDs each time) from several pynetdicom senders, and samples the
server's memory (the server and its children: analysis workers, DICOM receivers) once a
second. The run is bounded by ``--minutes``; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from lungscreen.benchmarks.harness import Server, children, http_json, status_mb
from lungscreen.training.dicom_writer import write_ct_series


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (MiB)."""
    return sum(status_mb(process, "VmRSS") for process in (pid, *children(pid)))


def _template(slices: int, folder: Path) -> list[pydicom.Dataset]:
    rng = np.random.default_rng(0)
    hu = (np.full((slices, 256, 256), -850.0) + rng.normal(0, 20, (slices, 256, 256))).astype(np.float32)
    k, j, i = np.ogrid[:slices, :256, :256]
    hu[((k - slices // 2) * 1.25) ** 2 + ((j - 128) * 0.8) ** 2 + ((i - 100) * 0.8) ** 2 <= 25] = 40
    return [pydicom.dcmread(p) for p in write_ct_series(hu, (1.25, 0.8, 0.8), folder).paths]


def _send_study(port: int, template: list[pydicom.Dataset], sender: str) -> tuple[str, bool]:
    study_uid, series_uid = generate_uid(), generate_uid()
    ae = AE(ae_title=sender)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSCREEN")
    if not assoc.is_established:
        return study_uid, False
    ok = True
    try:
        for ds in template:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            status = assoc.send_c_store(ds)
            ok = ok and bool(status) and status.Status == 0
    finally:
        assoc.release()
    return study_uid, ok


def run(minutes: float, senders: int, slices: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lungscreen-soak-") as tmp:
        tmp_path = Path(tmp)
        template = _template(slices, tmp_path / "template")
        server = Server(tmp_path / "server", idle_seconds=1.0, config={"min_free_mb": 64}, log_level="WARNING")
        with server.running():
            port, base = server.port, f"http://127.0.0.1:{server.http_port}"
            sent: dict[str, float] = {}
            send_errors = 0
            lock = threading.Lock()
            stop_at = time.monotonic() + minutes * 60
            memory: list[tuple[float, float]] = []

            def sender(n: int) -> None:
                nonlocal send_errors
                study_template = copy.deepcopy(template)  # Dataset.copy() shares its elements
                while time.monotonic() < stop_at:
                    uid, ok = _send_study(port, study_template, f"SOAK{n}")
                    with lock:
                        sent[uid] = time.time()
                        send_errors += not ok

            threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(senders)]
            for t in threads:
                t.start()
            start = time.monotonic()
            while time.monotonic() < stop_at:
                memory.append((time.monotonic() - start, _rss_mb(server.proc.pid)))
                time.sleep(1.0)
            for t in threads:
                t.join()
            drain_until = time.monotonic() + 300
            jobs: dict[str, dict] = {}
            while time.monotonic() < drain_until:
                jobs = {j["study_uid"]: j for j in http_json(f"{base}/studies")}
                if all(jobs.get(uid, {}).get("state") in ("reported", "failed") for uid in sent):
                    break
                time.sleep(1.0)
            memory.append((time.monotonic() - start, _rss_mb(server.proc.pid)))
        states = [jobs.get(uid, {}).get("state", "missing") for uid in sent]
        latencies = [
            jobs[uid]["finished_at"] - sent[uid] for uid in sent if jobs.get(uid, {}).get("finished_at")
        ]
        first_minute = [m for t, m in memory if t <= 60] or [memory[0][1]]
        reasons: dict[str, int] = {}
        for uid in sent:
            if jobs.get(uid, {}).get("state") == "failed":
                reason = jobs[uid]["reason"][:120]
                reasons[reason] = reasons.get(reason, 0) + 1
        return {
            "minutes": minutes,
            "senders": senders,
            "slices_per_study": slices,
            "studies_sent": len(sent),
            "send_errors": send_errors,
            "reported": states.count("reported"),
            "failed": states.count("failed"),
            "lost": states.count("missing"),
            "failure_reasons": reasons,
            "studies_per_hour": round(states.count("reported") / (minutes / 60), 1),
            "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "rss_mb_first_minute_max": round(max(first_minute), 1),
            "rss_mb_end": round(memory[-1][1], 1),
            "rss_mb_max": round(max(m for _, m in memory), 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.minutes, args.senders, args.slices)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["lost"] == 0 and result["send_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
