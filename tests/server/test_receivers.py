"""Receiver processes: connections spread over them, a dead one replaced, none outliving the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from lungscreen.benchmarks.harness import REPO, free_port, wait_until
from peers import needs_binary, process_running, storescu
from lungscreen.server.config import load_settings
from lungscreen.server.db import Database
from lungscreen.server.ingest import IngestCounts
from lungscreen.server.jobs import JobStore
from lungscreen.server.receivers import ReceiverPool
from test_end_to_end import phantom_study

pytestmark = needs_binary("storescu")


class Counted:
    def __init__(self) -> None:
        self.received = self.rejected = self.closed = 0
        self.lock = threading.Lock()

    def __call__(self, counts: IngestCounts) -> None:
        with self.lock:
            self.received += counts.received
            self.rejected += counts.rejected
            self.closed += counts.closed


@pytest.fixture
def pool(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", port=free_port(), receivers=2, min_free_mb=0)
    Database(settings.db_path).close()  # the server makes the schema before its receivers start
    counted = Counted()
    receivers = ReceiverPool(settings, counted, log_level="INFO")
    receivers.start()
    receivers.counted = counted
    try:
        yield receivers
    finally:
        receivers.stop()
    assert not any(process_running(pid) for pid in receivers.pids), "every receiver stopped with the pool"


def test_concurrent_associations_go_to_different_receivers_and_land_in_one_store(pool, tmp_path):
    held = []
    for _ in range(2):  # two associations kept open: one in each receiver
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", pool.settings.port, ae_title="LUNGSCREEN")
        assert assoc.is_established
        held.append(assoc)
    assert pool.open_connections == [1, 1]
    for assoc in held:
        assoc.release()
    studies = [phantom_study(tmp_path / name, shape=(12, 32, 32), spheres=()) for name in ("a", "b")]
    pushes = [threading.Thread(target=storescu, args=(list(study.paths), pool.settings.port)) for study in studies]
    for push in pushes:
        push.start()
    for push in pushes:
        push.join(60)
    jobs = JobStore(Database(pool.settings.db_path))
    for study in studies:
        assert len(jobs.instance_paths(study.study_instance_uid)) == len(study.paths)
    wait_until(lambda: pool.counted.closed == 4 and pool.open_connections == [0, 0], 10, what="close reports")
    assert pool.counted.received == sum(len(study.paths) for study in studies)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_receiver_that_dies_is_replaced(pool, tmp_path, how):
    victim = pool.pids[0]
    os.kill(victim, how)  # SIGTERM: it stops as it would with the server (what it received made durable)
    wait_until(lambda: victim not in pool.pids and len(pool.pids) == 2, 60, what="a replacement receiver")
    study = phantom_study(tmp_path / "after", shape=(12, 32, 32), spheres=())
    for _ in range(2):  # whichever receiver takes it
        storescu(list(study.paths), pool.settings.port)
    jobs = JobStore(Database(pool.settings.db_path))
    assert len(jobs.instance_paths(study.study_instance_uid)) == len(study.paths)


def test_receivers_stop_when_the_server_process_dies(tmp_path):
    port = free_port()
    script = f"""
import sys, time
from pathlib import Path
from lungscreen.server.config import load_settings
from lungscreen.server.db import Database
from lungscreen.server.receivers import ReceiverPool
settings = load_settings(data_dir=Path({str(tmp_path / 'data')!r}), port={port}, receivers=2, min_free_mb=0)
Database(settings.db_path).close()
pool = ReceiverPool(settings, lambda counts: None, log_level="WARNING")
pool.start()
print(" ".join(map(str, pool.pids)), flush=True)
time.sleep(600)
"""
    server = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in server.stdout.readline().split()]
        assert len(pids) == 2 and all(process_running(pid) for pid in pids)
    finally:
        server.kill()  # no chance to stop its receivers
        server.wait(10)
    deadline = time.monotonic() + 30
    while any(process_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_running(pid) for pid in pids), "a receiver outlived its server"
