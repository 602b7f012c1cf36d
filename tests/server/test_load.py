"""Load: several senders pushing many studies at once; all processed, none lost, memory bounded."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from lungscreen.benchmarks.harness import children, vm_hwm_mb
from peers import LungScreen, needs_binary, storescu, wait_until
from test_end_to_end import phantom_study

pytestmark = [pytest.mark.slow, needs_binary("storescu")]

SENDERS, STUDIES_PER_SENDER = 4, 10
MEMORY_BOUND_MB = 3000  # server + its children (analysis worker, receivers); bounded pools keep this flat


def test_four_senders_ten_studies_each(tmp_path):
    studies = [
        phantom_study(tmp_path / f"s{n:02d}", shape=(32, 96, 96), spheres=(((16, 48, 48), 8.0),))
        for n in range(SENDERS * STUDIES_PER_SENDER)
    ]
    server = LungScreen(tmp_path, idle_seconds=0.5)
    with server.running():

        def send(sender: int) -> list[int]:
            mine = studies[sender::SENDERS]
            return [
                storescu(list(s.paths), server.port, calling=f"SENDER{sender}").returncode for s in mine
            ]

        with ThreadPoolExecutor(SENDERS) as pool:
            codes = [code for codes in pool.map(send, range(SENDERS)) for code in codes]
        assert codes == [0] * len(studies), "every instance acknowledged"

        def all_reported() -> bool:
            jobs = {s.study_instance_uid: server.study(s.study_instance_uid) for s in studies}
            return all(j and j["state"] == "reported" for j in jobs.values())

        wait_until(all_reported, 300, 1.0, what="all studies reported")
        for study in studies:
            job = server.study(study.study_instance_uid)
            assert job["instances"] == 32 and job["runs"] == 1 and len(job["details"]["findings"]) == 1
        peaks = [vm_hwm_mb(pid) for pid in (server.proc.pid, *children(server.proc.pid))]
        assert sum(peaks) < MEMORY_BOUND_MB, peaks
        metrics = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{server.http_port}/metrics"], capture_output=True, text=True
        ).stdout
        assert f'lungscreen_jobs{{state="reported"}} {float(len(studies))}' in metrics
