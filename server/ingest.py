"""What the DICOM listener reports to in the server: the job store, and the checks that refuse
instances while the data folder cannot take them.

It runs in each receiver process (:mod:`server.receivers`), with that process's own
connection to the database; it counts what it stored and rejected for the server's metrics.

A measurement-report SR a viewer saved for a study (OHIF's report export, stored to the PACS
and forwarded, or sent to LungScreen) is stored and queued in the job store, never touching
the study's job, so it never triggers an analysis; our own SRs and GSPS coming back are
recognised by their SOP Instance UIDs before that (loop guard). The server process then turns
each into verdicts (:func:`process_viewer_reports`), away from the C-STORE handler.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import UID

from lungscreen.dicom_io.scp import ReceivedInstance
from lungscreen.dicom_io.sr_reading import (
    MEASUREMENT_REPORT_CLASSES, Measurement, read_image_header, read_measurement_report,
)
from lungscreen.errors import ReportError
from lungscreen.server.config import Settings
from lungscreen.server.feedback import (
    ACCEPTED, REJECTED, VIEWER_SR, FeedbackError, FeedbackStore, StudyResult, ViewerReportRecord,
)
from lungscreen.server.jobs import PROCESSING, QUEUED, RECEIVING, JobStore

log = logging.getLogger(__name__)

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
        self.feedback = FeedbackStore(jobs.db)
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
        """Our SRs and GSPS are reports of their study; an assessment SR (server/assessments.py)
        is known by its outbox rows: everything we send has one."""
        return self.jobs.is_report(sop_uid) or bool(
            self.jobs.db.query("SELECT 1 FROM outbox WHERE report_sop_uid = ? LIMIT 1", (sop_uid,))
        )

    def instance_stored(self, instance: ReceivedInstance) -> None:
        if instance.sop_class_uid in MEASUREMENT_REPORT_CLASSES:  # a viewer's SR: verdicts, never an analysis
            self.feedback.record_viewer_report(
                instance.sop_uid, instance.study_uid, instance.path, instance.calling_ae, durable=instance.durable
            )
            with self._lock:
                self._counts.received += 1
            return
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


# --- viewer SRs into verdicts (in the server process) ------------------------------------------

MATCH_DISTANCE_MIN_MM = 5.0
"""A viewer's new measurement whose centre lies within a finding's diameter (at least this
much) of the finding's centre measures that finding (an acceptance), not a missed nodule."""


def process_viewer_reports(feedback: FeedbackStore, jobs: JobStore, *, device_uid: str | None = None) -> int:
    """Turn each pending viewer SR whose study has a report into verdicts; return how many
    were settled. One that cannot be read is set aside with the reason; none raises."""
    settled = 0
    for record in feedback.viewer_reports(state="pending"):
        job = jobs.get(record.study_uid)
        if job is not None and job.state in (RECEIVING, QUEUED, PROCESSING):
            continue  # a run is under way: judge its report, once it exists
        result = None if job is None else StudyResult.from_job(job.study_uid, job.details)
        try:
            if result is None:
                outcome = ("ignored", "LungScreen has no report for this study")
            elif job.finished_at is not None and record.received_at < job.finished_at:
                outcome = ("ignored", "received before the study's current report: it judged an earlier run")
            else:
                outcome = _apply_viewer_report(feedback, jobs, record, result, device_uid)
        except (ReportError, FeedbackError) as exc:
            outcome = ("ignored", str(exc))
        except Exception as exc:  # one bad SR never stops the others
            log.exception("viewer SR %s of study %s could not be processed", record.sop_uid, record.study_uid)
            outcome = ("ignored", f"internal error: {type(exc).__name__}")
        if outcome[0] == "ignored":
            feedback.finish_viewer_report(record.sop_uid, *outcome)
        log.info("viewer SR %s of study %s: %s", record.sop_uid, record.study_uid,
                 "verdicts recorded" if outcome[0] == "done" else f"ignored ({outcome[1]})")
        settled += 1
    return settled


def _image_header(jobs: JobStore, sop_uid: str) -> Dataset | None:
    """The stored CT image's geometry, or None (not stored here, purged, or multi-frame)."""
    path = jobs.instance_path(sop_uid)
    if path is None or not Path(path).exists():
        return None
    header = read_image_header(Path(path))
    return header if "ImagePositionPatient" in header and "PixelSpacing" in header else None


def _measures_a_finding(measurement: Measurement, result: StudyResult) -> str | None:
    """The tracking UID of the finding a new measurement measures again, or None."""
    if measurement.center_lps_mm is None:
        return None
    for row in result.findings:
        reach = max(float(row["diameter_mm"]), MATCH_DISTANCE_MIN_MM)
        if row.get("tracking_uid") and math.dist(measurement.center_lps_mm, row["center_lps_mm"]) <= reach:
            return str(row["tracking_uid"])
    return None


def _apply_viewer_report(
    feedback: FeedbackStore, jobs: JobStore, record: ViewerReportRecord, result: StudyResult, device_uid: str | None
) -> tuple[str, str]:
    """Findings whose tracking UID the SR keeps (or that one of its new measurements measures
    again) are accepted, the others rejected; new measurements matching no finding are missed
    nodules. All recorded in one transaction with the SR's state."""
    report = read_measurement_report(record.path, lambda sop_uid: _image_header(jobs, sop_uid))
    if report.study_uid != record.study_uid:
        raise ReportError("its Study Instance UID differs from the one it was received under")
    if device_uid is not None and report.device_observer_uid == device_uid:
        return ("ignored", "made by this LungScreen installation (loop guard)")
    ours = set(result.tracking_uids)
    kept = {m.tracking_uid for m in report.measurements if m.tracking_uid in ours}
    if not kept and not report.from_a_viewer:
        return ("ignored", "keeps no LungScreen finding and has no viewer (Cornerstone3D) measurement: not read as verdicts")
    new = [m for m in report.measurements if m.tracking_uid not in ours]
    missed = []
    for measurement in new:
        measured = _measures_a_finding(measurement, result)
        if measured is not None:
            kept.add(measured)
        else:
            missed.append(measurement)
    reviewer = report.observer or f"viewer SR from {record.calling_ae}"
    with feedback.db.transaction():
        for tracking_uid in result.tracking_uids:
            feedback.record_verdict(
                result, tracking_uid, ACCEPTED if tracking_uid in kept else REJECTED, reviewer=reviewer,
                source=VIEWER_SR, source_sop_uid=report.sop_uid, now=record.received_at,
            )
        for measurement in missed:
            feedback.record_missed(
                result, measurement.center_lps_mm, measurement.size_mm, reviewer=reviewer, source=VIEWER_SR,
                source_sop_uid=report.sop_uid, source_tracking_uid=measurement.tracking_uid, now=record.received_at,
            )
        outcome = (
            f"{len(kept)} finding(s) accepted, {len(ours) - len(kept)} rejected, {len(missed)} missed nodule(s) added"
            + (f" ({sum(m.center_lps_mm is None for m in missed)} without a position: image not stored here)"
               if any(m.center_lps_mm is None for m in missed) else "")
        )
        feedback.finish_viewer_report(record.sop_uid, "done", outcome)
    return ("done", outcome)
