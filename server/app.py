"""The LungScreen server: wires the stages together and schedules them. It reads no tags.

Threads: the DICOM listener (pynetdicom), a scheduler that queues studies whose quiet period
has passed and hands them to a bounded worker pool, an outbox sender, and the HTTP endpoint.
All state lives in SQLite and on disk, so a restart resumes where the last process stopped.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from pydicom.uid import UID, generate_uid

from dicom_io.errors import DeliveryError, LungScreenError
from dicom_io.scp import ListenerSettings, ReceivedInstance, start_listener
from dicom_io.send import Destination, send_file
from dicom_io.store import InstanceStore
from models.card import load_card
from models.rules import exam_lung_rads
from server import __version__
from server.billing import BillingLedger, ExtensionEntry
from server.config import Settings, installation_value
from server.db import Database
from server.jobs import FAILED, REPORTED, JobStore
from server.metrics import Metrics
from server.outbox import Outbox, OutboxItem, RetryPolicy
from server.pipeline import AnalysisResult, NoEligibleSeries
from server.workers import AnalysisPool, ReportUIDs

log = logging.getLogger(__name__)


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the DICOM listener, or None for plain TCP."""
    if settings.tls_cert is None:
        return None
    with _tls_files("tls_cert, tls_key, tls_ca"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(settings.tls_ca)
    return context


def destination_tls(settings: Settings) -> ssl.SSLContext:
    """The TLS context for ``tls:`` destinations: their certificates must chain to
    ``destination_ca`` (default: the system's CA bundle) and name the host dialled; a client
    certificate, when configured, is shown to those that ask for one."""
    with _tls_files("destination_ca, destination_cert, destination_key"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.destination_ca)
        if settings.destination_cert is not None:
            context.load_cert_chain(settings.destination_cert, settings.destination_key)
    return context


@contextmanager
def _tls_files(settings_names: str) -> Iterator[None]:
    """Say which settings hold the certificate that cannot be read (ssl's message names none)."""
    try:
        yield
    except OSError as exc:  # ssl.SSLError too
        raise ValueError(f"TLS settings {settings_names}: {exc}") from None


def sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def api_token(data_dir: Path) -> str:
    """The HTTP bearer token of this installation, made once and readable by its owner only."""
    return installation_value(data_dir, "api-token", lambda: secrets.token_urlsafe(32), mode=0o600)


class LungScreenServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.db_path)
        self.jobs = JobStore(self.db)
        self.outbox = Outbox(
            self.db, RetryPolicy(max_attempts=settings.max_delivery_attempts, base_delay_s=settings.retry_base_delay_s)
        )
        self.ledger = BillingLedger(self.db)
        self.images = InstanceStore(settings.images_dir)
        self.reports = InstanceStore(settings.reports_dir)
        self.card = load_card(settings.model)  # fail at start-up on a bad model, not on the first study
        self.analysis = AnalysisPool(settings)
        self.metrics = Metrics(self.jobs, self.outbox)
        self.destinations = [Destination.parse(d) for d in settings.destination]
        self.destination_tls = destination_tls(settings)  # a bad certificate fails at start-up
        self.api_token = settings.api_token or api_token(settings.data_dir)
        self._stop = threading.Event()
        self._wake_outbox = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="job")
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener = None
        self._http = None
        self._storage_checked: tuple[float, str | None] = (0.0, None)

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        resumed = self.jobs.resume_after_restart()
        if resumed:
            log.info("resuming %d interrupted job(s)", len(resumed))
        self.analysis.warm_up()
        self._listener = start_listener(
            ListenerSettings(
                ae_title=self.settings.ae_title,
                host=self.settings.host,
                port=self.settings.port,
                allowed_calling_aes=self.settings.allow_ae,
                allowed_hosts=self.settings.allow_host,
                ssl_context=listener_tls(self.settings),
                sync_each_instance=self.settings.ingest_sync == "instance",
            ),
            self.images,
            self,
        )
        for target, name in ((self._schedule_loop, "scheduler"), (self._outbox_loop, "outbox")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.http_port:
            from server.http import start_http

            self._http = start_http(self, self.settings.http_host, self.settings.http_port)
        log.info(
            "LungScreen %s ready: AE %s on %s:%d, model %s %s",
            __version__, self.settings.ae_title, self.settings.host, self.settings.port, self.card.name, self.card.version,
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake_outbox.set()
        if self._listener is not None:
            self._listener.shutdown()
        if self._http is not None:
            self._http.shutdown()
        for thread in self._threads:
            thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.analysis.shutdown()
        self.db.close()

    # --- InstanceSink (called by the DICOM listener) ------------------------------------------
    def refusal_reason(self) -> str | None:
        checked_at, reason = self._storage_checked
        if time.monotonic() - checked_at > 1.0:  # cheap, but not once per instance
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
        self.metrics.instances_received.inc()

    def make_durable(self) -> None:
        self.jobs.make_durable()

    def instance_ignored(self, study_uid: str | None, sop_class_uid: str, calling_ae: str) -> None:
        if study_uid:
            self.jobs.record_ignored(study_uid, sop_class_name(sop_class_uid))

    def instance_rejected(self, study_uid: str | None, reason: str, calling_ae: str) -> None:
        self.jobs.record_rejection(study_uid, calling_ae, reason)
        self.metrics.instances_rejected.inc()

    # --- scheduling -------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.jobs.queue_quiet_studies(self.settings.idle_seconds)
                for study_uid in self.jobs.queued():
                    with self._in_flight_lock:
                        # The queue stays in SQLite; the pool only ever holds what it can run.
                        if study_uid in self._in_flight or len(self._in_flight) >= self.settings.workers:
                            continue
                        self._in_flight.add(study_uid)
                    self._pool.submit(self._run_job, study_uid)
            except Exception:
                log.exception("scheduler error")
            self._stop.wait(0.1)

    def _run_job(self, study_uid: str) -> None:
        try:
            run = self.jobs.claim(study_uid)
            if run is not None:
                self.process(study_uid, run)
        except Exception:
            log.exception("job %s: unexpected error", study_uid)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(study_uid)

    def process(self, study_uid: str, run: int) -> None:
        """One run of the pipeline for a claimed job; every outcome ends in the job store."""
        started = time.perf_counter()
        paths = self.jobs.instance_paths(study_uid)
        previous = self.jobs.latest_report(study_uid)
        uids = ReportUIDs.for_run(study_uid, run)
        try:
            if not paths:
                raise NoEligibleSeries((), ("no CT image was stored for this study",))
            result = self.analysis.analyze(
                paths, uids=uids, run=run,
                predecessor=previous if previous and previous.exists() else None,
            )
        except LungScreenError as exc:
            details = {"rejected_series": [r.__dict__ for r in getattr(exc, "rejected", ())]}
            self.jobs.finish(study_uid, FAILED, reason=str(exc), details=details)
            log.warning("job %s run %d failed: %s", study_uid, run, exc)
            return
        except Exception as exc:
            self.jobs.finish(study_uid, FAILED, reason=f"internal error: {type(exc).__name__}: {exc}")
            log.exception("job %s run %d: internal error", study_uid, run)
            return
        self._complete(study_uid, run, result, time.perf_counter() - started)

    def _complete(self, study_uid: str, run: int, result: AnalysisResult, seconds: float) -> None:
        results = [("sr", result.sr)] + ([("gsps", result.gsps)] if result.gsps is not None else [])
        stored = {kind: self._save_result(study_uid, ds) for kind, ds in results}
        details = job_details(result, stored["sr"])
        destinations = [str(d) for d in self.destinations]
        # One transaction: the report, its billing entry, its deliveries and the job state
        # are recorded together or not at all (a crash in between re-runs the whole step).
        with self.db.transaction():
            for kind, ds in results:
                self.jobs.record_report(ds.SOPInstanceUID, study_uid, run, stored[kind], kind=kind)
                self.outbox.enqueue(study_uid, ds.SOPInstanceUID, stored[kind], destinations)
            if result.accession_number:
                self.ledger.record(
                    ExtensionEntry(
                        accession_number=result.accession_number,
                        main_item=result.main_exam_item,
                        extension_item=self.settings.ai_extension_code,
                        study_uid=study_uid,
                        report_sop_uid=result.sr.SOPInstanceUID,
                    )
                )
            else:
                details["billing"] = "no accession number on the CT: no ledger entry (the RIS cannot link it)"
            state = self.jobs.finish(study_uid, REPORTED, details=details)
        for stage, value in result.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(value)
        self.metrics.stage_seconds.labels("total").observe(seconds)
        log.info(
            "job %s run %d %s: %d finding(s) from %d candidate(s) in %.2f s",
            study_uid, run, state, len(result.findings), result.candidates, seconds,
        )
        self._wake_outbox.set()

    def _save_result(self, study_uid: str, dataset) -> Path:
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return self.reports.save(study_uid, dataset.SeriesInstanceUID, dataset.SOPInstanceUID, buffer.getvalue()).path

    # --- delivery ---------------------------------------------------------------------------
    def _outbox_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for item in self.outbox.due():
                    if self._stop.is_set():
                        return
                    self._deliver(item)
            except Exception:
                log.exception("outbox error")
            next_due = self.outbox.next_due()
            wait = 1.0 if next_due is None else min(1.0, max(0.05, next_due - time.time()))
            self._wake_outbox.wait(wait)
            self._wake_outbox.clear()

    def _deliver(self, item: OutboxItem) -> None:
        destination = Destination.parse(item.destination)
        try:
            send_file(item.path, destination, calling_ae=self.settings.ae_title, timeout_s=self.settings.send_timeout_s,
                      tls_context=self.destination_tls)
        except DeliveryError as exc:
            state = self.outbox.mark_failed(item, str(exc), permanent=exc.permanent)
            log.warning("delivery of %s to %s failed (%s): %s", item.report_sop_uid, destination, state, exc)
            if state == "dead":
                self.jobs.mark_delivery_failed(
                    item.study_uid, f"delivery to {destination} dead-lettered after {item.attempts + 1} attempt(s): {exc}"
                )
            return
        self.outbox.mark_sent(item)
        log.info("delivered %s to %s", item.report_sop_uid, destination)
        if self.outbox.all_sent(item.study_uid):
            self.jobs.mark_delivered(item.study_uid)


def job_details(result: AnalysisResult, sr_path: Path) -> dict:
    """What the job status shows about a finished run (no patient data)."""
    report = result.report
    return {
        "series_uid": result.series_uid,
        "rejected_series": [r.__dict__ for r in result.rejected_series],
        "operating_point": report.operating_point,
        "score_threshold": report.score_threshold,
        "model": f"{report.model_name} {report.model_version}",
        "candidates": result.candidates,
        "suppressed": report.suppressed,
        "exam_lung_rads": exam_lung_rads(report.findings),
        "findings": list(result.findings),
        "sr_sop_uid": str(result.sr.SOPInstanceUID),
        "sr_series_uid": str(result.sr.SeriesInstanceUID),
        "gsps_sop_uid": str(result.gsps.SOPInstanceUID) if result.gsps is not None else None,
        "sr_path": str(sr_path),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
    }
