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
from lungscreen.dicom_io.query import instance_identity
from lungscreen.dicom_io.store import InstanceStore
from lungscreen.errors import LungScreenError
from lungscreen.models.remote import InferenceServerUnavailable, RemoteModelMismatch
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
from lungscreen.server.remote_inference import InferenceServerWatch
from lungscreen.server.tls import destination_tls
from lungscreen.server.workers import AnalysisInterrupted, AnalysisPool, ReportUIDs, installation_uid

log = logging.getLogger(__name__)

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
        self.remote_inference: InferenceServerWatch | None = None
        if settings.inference_server:
            self.remote_inference = InferenceServerWatch(
                settings.inference_server, self.card, retry_base_delay_s=settings.retry_base_delay_s
            )
            self.remote_inference.check_at_start()
        self.analysis = AnalysisPool(settings)
        self.priors = PriorFinder(settings, PriorHistory(self.db), self._analyze_retrieved_prior)
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
                if self.remote_inference is not None and self.remote_inference.waiting():
                    self._stop.wait(0.1)
                    continue  # studies wait for the inference server (server/remote_inference.py)
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
        except (InferenceServerUnavailable, RemoteModelMismatch) as exc:  # policy "wait"
            self.jobs.hand_back(study_uid, reason=f"waiting for the inference server: {exc}")
            pause = self.remote_inference.went_down(exc)
            self.metrics.remote_unavailable.inc()
            log.warning("job %s run %d waits %.1f s for the inference server: %s", study_uid, run, pause, exc)
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

    def _analyze_retrieved_prior(self, paths: list[Path], timeout_s: float):
        """A prior retrieved from ``prior_source``, analysed for the comparison. With
        ``report_retrieved_priors`` the same analysis is also committed as the prior study's own
        report (SR, GSPS, billing entry, delivery), so both studies' SRs carry the same tracking UIDs."""
        if not self.settings.report_retrieved_priors:
            return self.analysis.analyze_prior(paths, timeout_s)
        instances = [instance_identity(p) for p in paths]
        study_uid = instances[0].study_uid
        run = self.jobs.open_retrieved_study(study_uid, instances)
        if run is None:  # a study this node knows already: its own job reports it
            return self.analysis.analyze_prior(paths, timeout_s)
        started = time.perf_counter()
        try:
            result = self.analysis.analyze(paths, uids=ReportUIDs.for_run(study_uid, run), run=run, predecessor=None,
                                           timeout_s=timeout_s)
        except AnalysisInterrupted:
            self.jobs.hand_back(study_uid, reason="handed back when the server stopped")
            raise
        except Exception as exc:  # the prior's own job fails; the current study is reported without it
            reason = str(exc) if isinstance(exc, LungScreenError) else f"internal error: {type(exc).__name__}: {exc}"
            self.jobs.finish(study_uid, FAILED, reason=reason)
            raise
        self._complete(study_uid, run, result, time.perf_counter() - started)
        return result

    def inference_problem(self) -> str | None:
        """Why remote inference is not working now (``/healthz``); None when it works or is not used."""
        return None if self.remote_inference is None else self.remote_inference.problem()

    def _record_inference(self, inference: dict) -> None:
        if self.remote_inference is None:
            return
        self.remote_inference.ran(inference)
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
