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
from pathlib import Path

from lungscreen import __version__
from lungscreen.dicom_io.store import InstanceStore
from lungscreen.errors import LungScreenError
from lungscreen.models.remote import InferenceServerUnavailable, RemoteModelMismatch, TritonRunner
from lungscreen.server.billing import BillingLedger
from lungscreen.server.commit import ReportCommitter
from lungscreen.server.config import Settings, installation_value
from lungscreen.server.db import Database
from lungscreen.server.delivery import Courier
from lungscreen.server.feedback import FeedbackStore
from lungscreen.server.ingest import IngestCounts, process_viewer_reports
from lungscreen.server.jobs import FAILED, JobStore
from lungscreen.server.metrics import Metrics
from lungscreen.server.outbox import Outbox, RetryPolicy
from lungscreen.server.pipeline import NoEligibleSeries
from lungscreen.server.preflight import check_settings
from lungscreen.server.priors import PriorFinder, PriorHistory
from lungscreen.server.receivers import ReceiverPool
from lungscreen.server.tls import destination_tls
from lungscreen.server.workers import AnalysisInterrupted, AnalysisPool, ReportUIDs, installation_uid

log = logging.getLogger(__name__)

MAX_INFERENCE_BACKOFF_S = 60.0  # longest pause before studies try the inference server again
INFERENCE_PROBE_INTERVAL_S = 5.0  # while degraded, /healthz asks the inference server again this often
INFERENCE_PROBE_TIMEOUT_S = 5.0


def api_token(data_dir: Path) -> str:
    """The HTTP bearer token of this installation, made once and readable by its owner only."""
    return installation_value(data_dir, "api-token", lambda: secrets.token_urlsafe(32), mode=0o600)


class LungScreenServer:
    def __init__(self, settings: Settings) -> None:
        # Every setting and what it names (rules, model, destinations, TLS files) is checked
        # before anything starts: a bad configuration is one ConfigurationError, not a failure
        # of every study later.
        checked = check_settings(settings)
        self.settings = settings
        self.card = checked.card
        self.db = Database(settings.db_path)
        self.jobs = JobStore(self.db)
        self.outbox = Outbox(
            self.db, RetryPolicy(max_attempts=settings.max_delivery_attempts, base_delay_s=settings.retry_base_delay_s)
        )
        self.ledger = BillingLedger(self.db)
        self.committer = ReportCommitter(
            self.db, self.jobs, self.outbox, self.ledger, InstanceStore(settings.reports_dir),
            destinations=[str(d) for d in checked.destinations], ai_extension_code=settings.ai_extension_code,
        )
        self.courier = Courier(
            self.outbox, self.jobs, calling_ae=settings.ae_title, timeout_s=settings.send_timeout_s,
            tls_context=destination_tls(settings),
        )
        self.feedback = FeedbackStore(self.db)
        self.device_uid = installation_uid(settings.data_dir)  # viewer SRs this installation made are no verdicts
        self.inference_degraded: str | None = None  # why remote inference is not working now
        self._inference_retry_at = 0.0
        self._inference_backoff_s = 0.0
        self._inference_probed_at = 0.0
        self._inference_probe: TritonRunner | None = None
        if settings.inference_server:
            self._check_inference_server()
        self.analysis = AnalysisPool(settings)
        self.priors = PriorFinder(settings, PriorHistory(self.db), self.analysis.analyze_prior)
        self.receivers = ReceiverPool(
            settings, self._count_ingest, log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel())
        )
        self.metrics = Metrics(self.jobs, self.outbox, self.receivers)
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
        """Stop taking studies; give running analyses ``stop_grace_s`` to finish and commit,
        then hand the unfinished ones back to the queue (the next start runs them; they do not
        count as interrupted by a crash). Called on SIGTERM, e.g. by ``systemctl stop``."""
        self._stop.set()
        self._wake_outbox.set()
        self.receivers.stop()
        if self._http is not None:
            self._http.shutdown()
        for thread in self._threads:
            thread.join(timeout=10)
        deadline = time.monotonic() + self.settings.stop_grace_s
        while self._running_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._running_jobs():
            log.info("handing %d running analysis(es) back to the queue", self._running_jobs())
            self.analysis.interrupt()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.analysis.shutdown()
        self.db.close()

    def _running_jobs(self) -> int:
        with self._in_flight_lock:
            return len(self._in_flight)

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
                process_viewer_reports(self.feedback, self.jobs, device_uid=self.device_uid)
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
            identity, search = self.priors.search(paths)
            result = self.analysis.analyze(
                paths, uids=uids, run=run,
                predecessor=previous if previous and previous.exists() else None,
                prior=search.prior, no_prior=search.no_prior, prior_images=search.images,
            )
        except AnalysisInterrupted:
            self.jobs.hand_back(study_uid, reason="handed back when the server stopped")
            log.info("job %s run %d handed back to the queue (server stopping)", study_uid, run)
            return
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
        self.priors.remember(identity, result)

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
        self.jobs.hand_back(study_uid, reason=f"waiting for the inference server: {exc}")
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

    def _complete(self, study_uid: str, run: int, result, seconds: float) -> None:
        state = self.committer.commit(study_uid, run, result)
        for stage, value in result.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(value)
        self.metrics.stage_seconds.labels("total").observe(seconds)
        self._record_inference(result.inference)
        log.info(
            "job %s run %d %s: %d finding(s) from %d candidate(s) in %.2f s",
            study_uid, run, state, len(result.findings), result.candidates, seconds,
        )
        self._wake_outbox.set()

    # --- delivery ---------------------------------------------------------------------------
    def _outbox_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for item in self.outbox.due():
                    if self._stop.is_set():
                        return
                    self.courier.deliver(item)
            except Exception:
                log.exception("outbox error")
            next_due = self.outbox.next_due()
            wait = 1.0 if next_due is None else min(1.0, max(0.05, next_due - time.time()))
            self._wake_outbox.wait(wait)
            self._wake_outbox.clear()
