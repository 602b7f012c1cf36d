"""What the DICOM listener reports to in the server: the job store, and the checks that refuse
instances while the data folder cannot take them.

It runs in each receiver process (:mod:`server.receivers`), with that process's own
connection to the database; it counts what it stored and rejected for the server's metrics.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass

from pydicom.uid import UID

from lungscreen.dicom_io.scp import ReceivedInstance
from lungscreen.server.config import Settings
from lungscreen.server.jobs import JobStore

STORAGE_CHECK_INTERVAL_S = 1.0  # a disk check is cheap, but not once per instance


def sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


@dataclass
class IngestCounts:
    """Instances stored and rejected, and connections closed, since the last :meth:`IngestSink.take_counts`."""

    received: int = 0
    rejected: int = 0
    closed: int = 0

    def __bool__(self) -> bool:
        return bool(self.received or self.rejected or self.closed)


class IngestSink:
    """The server's :class:`dicom_io.scp.InstanceSink`."""

    def __init__(self, settings: Settings, jobs: JobStore) -> None:
        self.settings = settings
        self.jobs = jobs
        self._storage_checked: tuple[float, str | None] = (-STORAGE_CHECK_INTERVAL_S, None)
        self._counts = IngestCounts()
        self._lock = threading.Lock()
        self.connection_ended = threading.Event()  # set by each closed connection

    def take_counts(self) -> IngestCounts:
        """The counts since the last call, reset to zero."""
        with self._lock:
            counts, self._counts = self._counts, IngestCounts()
        return counts

    def refusal_reason(self) -> str | None:
        checked_at, reason = self._storage_checked
        if time.monotonic() - checked_at > STORAGE_CHECK_INTERVAL_S:
            reason = self._storage_problem()
            self._storage_checked = (time.monotonic(), reason)
        return reason

    def _storage_problem(self) -> str | None:
        if not os.access(self.settings.images_dir, os.W_OK):  # a read-only mount says so even to root
            return "the data folder is not writable"
        if shutil.disk_usage(self.settings.data_dir).free < self.settings.min_free_mb * 1024**2:
            return f"less than {self.settings.min_free_mb} MiB free in the data folder"
        return None

    def is_own_instance(self, sop_uid: str) -> bool:
        return self.jobs.is_report(sop_uid)

    def instance_stored(self, instance: ReceivedInstance) -> None:
        self.jobs.record_instance(
            instance.study_uid, instance.series_uid, instance.sop_uid, instance.sop_class_uid, instance.path,
            content_changed=instance.created, durable=instance.durable,
        )
        with self._lock:
            self._counts.received += 1

    def make_durable(self) -> None:
        self.jobs.make_durable()

    def instance_ignored(self, study_uid: str | None, sop_class_uid: str, calling_ae: str) -> None:
        if study_uid:
            self.jobs.record_ignored(study_uid, sop_class_name(sop_class_uid))

    def instance_rejected(self, study_uid: str | None, reason: str, calling_ae: str) -> None:
        self.jobs.record_rejection(study_uid, calling_ae, reason)
        with self._lock:
            self._counts.rejected += 1

    def connection_closed(self) -> None:
        with self._lock:
            self._counts.closed += 1
        self.connection_ended.set()
