"""The LungScreen server: wires the stages together and schedules them. It reads no tags.

Processes and threads: DICOM receiver processes that take the associations the server process
accepts (:mod:`server.receivers`), a scheduler that queues studies whose quiet period has passed
and hands them to a bounded pool of analysis processes, an outbox sender, and the HTTP endpoint.
All state lives in SQLite and on disk, so a restart resumes where the last process stopped.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from pydicom.uid import generate_uid

from lungscreen.errors import DeliveryError, LungScreenError
from lungscreen.dicom_io.send import Destination, send_file
from lungscreen.dicom_io.store import InstanceStore
from lungscreen.models.card import load_card
from lungscreen.models.remote import InferenceServerUnavailable, RemoteModelMismatch, TritonRunner
from lungscreen.findings import exam_lung_rads
from lungscreen import __version__
from lungscreen.server.billing import BillingLedger, ExtensionEntry
from lungscreen.server.config import Settings, installation_value
from lungscreen.server.db import Database
from lungscreen.server.ingest import IngestCounts
from lungscreen.server.jobs import FAILED, REPORTED, JobStore
from lungscreen.server.metrics import Metrics
from lungscreen.server.outbox import Outbox, OutboxItem, RetryPolicy
from lungscreen.server.pipeline import AnalysisResult, NoEligibleSeries
from lungscreen.server.receivers import ReceiverPool
from lungscreen.server.tls import destination_tls, listener_tls
from lungscreen.server.workers import AnalysisPool, ReportUIDs

log = logging.getLogger(__name__)

MAX_INFERENCE_BACKOFF_S = 60.0  # longest pause before studies try the inference server again
INFERENCE_PROBE_INTERVAL_S = 5.0  # while degraded, /healthz asks the inference server again this often
INFERENCE_PROBE_TIMEOUT_S = 5.0


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
        self.reports = InstanceStore(settings.reports_dir)
        self.card = load_card(settings.model)  # fail at start-up on a bad model, not on the first study
        self.inference_degraded: str | None = None  # why remote inference is not working now
        self._inference_retry_at = 0.0
        self._inference_backoff_s = 0.0
        self._inference_probed_at = 0.0
        self._inference_probe: TritonRunner | None = None
        if settings.inference_server:
            self._check_inference_server()
        self.analysis = AnalysisPool(settings)
        self.receivers = ReceiverPool(
            settings, self._count_ingest, log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel())
        )
        self.metrics = Metrics(self.jobs, self.outbox, self.receivers)
        self.destinations = [Destination.parse(d) for d in settings.destination]
        self.destination_tls = destination_tls(settings)  # a bad certificate fails at start-up
        listener_tls(settings)  # so does the listener's, before the receiver processes build theirs
        self.api_token = settings.api_token or api_token(settings.data_dir)
        self._stop = threading.Event()
        self._wake_outbox = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="job")
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._http = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        resumed = self.jobs.resume_after_restart()
        if resumed:
            log.info("resuming %d interrupted job(s)", len(resumed))
        self.analysis.warm_up()
        self.receivers.start()
        for target, name in ((self._schedule_loop, "scheduler"), (self._outbox_loop, "outbox")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.http_port:
            from lungscreen.server.http import start_http

            self._http = start_http(self, self.settings.http_host, self.settings.http_port)
        log.info(
            "LungScreen %s ready: AE %s on %s:%d, model %s %s",
            __version__, self.settings.ae_title, self.settings.host, self.settings.port, self.card.name, self.card.version,
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake_outbox.set()
        self.receivers.stop()
        if self._http is not None:
            self._http.shutdown()
        for thread in self._threads:
            thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.analysis.shutdown()
        self.db.close()

    def _count_ingest(self, counts: IngestCounts) -> None:
        self.metrics.instances_received.inc(counts.received)
        self.metrics.instances_rejected.inc(counts.rejected)

    # --- scheduling -------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.jobs.queue_quiet_studies(self.settings.idle_seconds)
                if time.time() < self._inference_retry_at:
                    self._stop.wait(0.1)
                    continue  # studies wait for the inference server; see process()
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
        except (InferenceServerUnavailable, RemoteModelMismatch) as exc:
            self._inference_server_down(study_uid, run, exc)
            return
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

    # --- remote inference (Triton) ---------------------------------------------------------
    def _check_inference_server(self) -> None:
        """At start-up: a server serving another model or version is refused (the node does not
        start); one that is down only degrades the node until it answers."""
        self._inference_probe = TritonRunner(self.settings.inference_server, self.card,
                                             timeout_s=INFERENCE_PROBE_TIMEOUT_S)
        try:
            self._inference_probe.verify()
        except InferenceServerUnavailable as exc:
            self.inference_degraded = str(exc)
            log.warning("inference server not available at start-up (%s): %s",
                        self.settings.inference_server_unavailable, exc)

    def inference_problem(self) -> str | None:
        """Why remote inference is not working now; None when it works or is not configured.
        While degraded, the inference server is asked again (at most every
        ``INFERENCE_PROBE_INTERVAL_S``), so health recovers, and waiting studies resume, as soon
        as it answers with the right model, not only when the next study tries."""
        if self.inference_degraded is None or time.time() - self._inference_probed_at < INFERENCE_PROBE_INTERVAL_S:
            return self.inference_degraded
        self._inference_probed_at = time.time()
        try:
            self._inference_probe.verify()
        except (InferenceServerUnavailable, RemoteModelMismatch) as exc:
            self.inference_degraded = str(exc)
            return self.inference_degraded
        log.info("inference server %s answers again", self.settings.inference_server)
        self.inference_degraded = None
        self._inference_backoff_s = 0.0
        self._inference_retry_at = 0.0
        return None

    def _inference_server_down(self, study_uid: str, run: int, exc: LungScreenError) -> None:
        """Policy "wait": the study goes back to the queue unchanged and every study waits,
        with a growing pause, until the inference server answers again."""
        self.jobs.release(study_uid, reason=f"waiting for the inference server: {exc}")
        self.inference_degraded = str(exc)
        base = self.settings.retry_base_delay_s
        self._inference_backoff_s = min(MAX_INFERENCE_BACKOFF_S, max(base, 2 * self._inference_backoff_s))
        self._inference_retry_at = time.time() + self._inference_backoff_s
        self.metrics.remote_unavailable.inc()
        log.warning("job %s run %d waits %.1f s for the inference server: %s",
                    study_uid, run, self._inference_backoff_s, exc)

    def _record_inference(self, inference: dict) -> None:
        if not self.settings.inference_server:
            return
        if inference.get("where") == "remote":
            self.inference_degraded = None
            self._inference_backoff_s = 0.0
        elif inference.get("fallback_reason"):
            self.inference_degraded = f"running locally: {inference['fallback_reason']}"
        self.metrics.record_inference(inference)

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
        self._record_inference(result.inference)
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
        "inference": result.inference,
    }
