"""Deferred durability: files fsynced in the background, the A-RELEASE response waits for them."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest
from pynetdicom.dul import DULServiceProvider

from lungscreen.benchmarks.harness import free_port
from lungscreen.dicom_io.durability import BackgroundSync
from lungscreen.dicom_io.scp import ListenerSettings, ReceivedInstance, start_listener
from lungscreen.dicom_io.store import InstanceStore
from peers import needs_binary, storescu


class RecordingSink:
    """The listener's InstanceSink, recording what it is told."""

    def __init__(self) -> None:
        self.stored: list[ReceivedInstance] = []
        self.made_durable_with = -1  # how many instances were stored at the last make_durable
        self.connections_closed = 0
        self.lock = threading.Lock()

    def refusal_reason(self):
        return None

    def is_own_instance(self, sop_uid):
        return False

    def instance_stored(self, instance):
        with self.lock:
            self.stored.append(instance)

    def make_durable(self):
        with self.lock:
            self.made_durable_with = len(self.stored)

    def instance_ignored(self, study_uid, sop_class_uid, calling_ae):
        pass

    def instance_rejected(self, study_uid, reason, calling_ae):
        raise AssertionError(f"unexpected rejection: {reason}")

    def connection_closed(self):
        with self.lock:
            self.connections_closed += 1


def test_background_sync_reports_durable_tickets_and_failures(tmp_path):
    syncer = BackgroundSync()
    try:
        files = []
        for n in range(20):
            path = tmp_path / f"f{n}.dcm"
            path.write_bytes(b"x" * 1000)
            files.append(path)
        tickets = [syncer.submit(path) for path in files]
        assert syncer.wait(tickets[0], tickets[-1], timeout=30) == []
        assert syncer.pending == 0
        gone = tmp_path / "purged.dcm"
        gone.write_bytes(b"x")
        first = syncer.submit(gone)
        gone.unlink()  # purged before its fsync: nothing to make durable, no failure
        last = syncer.submit(Path("/proc/self/status"))  # fsync is refused there (EINVAL)
        failures = syncer.wait(first, last, timeout=30)
        assert len(failures) == 1 and "fsync failed" in failures[0]
    finally:
        syncer.close()
    with pytest.raises(RuntimeError, match="closed"):
        syncer.submit(files[0])


def test_pynetdicom_still_has_the_poll_delay_we_shorten():
    # dicom_io.scp sets DULServiceProvider._run_loop_delay per association; if pynetdicom
    # renames it, ingest silently slows down by a third, so fail here instead.
    assert "self._run_loop_delay" in inspect.getsource(DULServiceProvider.__init__)
    assert "self._run_loop_delay" in inspect.getsource(DULServiceProvider.run_reactor)


@needs_binary("storescu")
@pytest.mark.parametrize("sync_each_instance", [False, True])
def test_every_instance_is_durable_when_the_association_is_released(tmp_path, lidc_series_dir, sync_each_instance):
    files = sorted(lidc_series_dir.glob("*.dcm"))[:40]
    sink = RecordingSink()
    settings = ListenerSettings(port=free_port(), sync_each_instance=sync_each_instance)
    listener = start_listener(settings, InstanceStore(tmp_path / "images"), sink)
    try:
        storescu(files, settings.port)  # returns once the A-RELEASE response came
        syncer = listener.associations.syncer
        assert (syncer is None) == sync_each_instance
        if syncer is not None:
            assert syncer.pending == 0, "the release was answered before every file was fsynced"
            assert sink.made_durable_with == len(files), "the release was answered before the records were durable"
        assert len(sink.stored) == len(files)
        for instance in sink.stored:
            assert instance.path.is_file() and instance.created
            assert instance.durable == sync_each_instance
        assert not list((tmp_path / "images").rglob("*.part"))
    finally:
        listener.shutdown()
