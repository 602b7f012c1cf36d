"""Analysis runs in worker processes, so a crash or a hang inside a decoder or the model
ends that study's run with a reason and never takes the server down.

Each worker process loads the model once (ONNX Runtime session reused across studies).
When a worker dies (segfault, out of memory) or a run exceeds its time limit, the pool is
replaced and the study fails with the reason; the next study gets a fresh worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, replace
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from lungscreen.errors import LungScreenError
from lungscreen.dicom_io.select import SelectionRules
from lungscreen.dicom_io.sr import AlgorithmIdentity, BillingCodes
from lungscreen.models.card import load_card
from lungscreen.models.detector import Detector
from lungscreen.models.remote import TritonRunner
from lungscreen.models.rules import ClinicalRules
from lungscreen import __version__
from lungscreen.server.config import Settings, installation_value
from lungscreen.server.db import Database
from lungscreen.server.feedback import FeedbackStore
from lungscreen.server.pipeline import AnalysisResult, Analyzer, analyze_study
from lungscreen.server.process_tuning import tune_analysis_process

log = logging.getLogger(__name__)


class AnalysisCrashed(LungScreenError):
    """The worker process died or the run exceeded its time limit."""


class AnalysisInterrupted(Exception):
    """The server stopped the run (it is shutting down); not an outcome of the study."""


class WorkerStartFailed(LungScreenError):
    """The analysis worker could not build its analyzer (model, rules, runtime); the reason says why."""


def installation_uid(data_dir: Path) -> str:
    """A stable Device UID for this installation (IHE AIR Contributing Equipment)."""
    return installation_value(data_dir, "device-uid", generate_uid)


def build_analyzer(settings: Settings) -> Analyzer:
    from lungscreen.findings import RuleSet

    card = load_card(settings.model)
    remote = None
    if settings.inference_server:
        remote = TritonRunner(settings.inference_server, card, timeout_s=settings.inference_timeout_s)
    return Analyzer(
        detector=Detector(card, providers=list(settings.providers) or None, remote=remote,
                          unavailable=settings.inference_server_unavailable),
        algorithm=AlgorithmIdentity(
            manufacturer="LungScreen project",
            model_name=card.name,
            software_version=__version__,
            model_version=card.version,
            device_uid=installation_uid(settings.data_dir),
            institution=settings.institution,
        ),
        billing=BillingCodes(
            ai_extension_code=settings.ai_extension_code, fallback_procedure_code=settings.fallback_procedure_code
        ),
        rules=ClinicalRules.from_mapping(settings.clinical_rules),
        selection=SelectionRules.from_mapping(settings.series_selection),
        operating_point=settings.operating_point,
        presentation_state=settings.presentation_state,
        outline_categories=settings.outline_categories,
        rule_set=RuleSet(settings.rule_set),
    )


_analyzer: Analyzer | None = None  # one per worker process
_settings: Settings | None = None  # what it is built from
_feedback: FeedbackStore | None = None  # where an applied site operating point is read, before each run


PARENT_CHECK_INTERVAL_S = 1.0


def _init_worker(settings: Settings, log_level: int, server_pid: int) -> None:
    from lungscreen.server.logs import configure_logging

    global _settings, _feedback
    configure_logging(logging.getLevelName(log_level))
    # The server's pid comes from the server: it may have died while this process imported.
    threading.Thread(target=_exit_with_parent, args=(server_pid,), name="parent-watch", daemon=True).start()
    _settings = settings
    _feedback = FeedbackStore(Database(settings.db_path))
    try:
        _ready_analyzer()
    except WorkerStartFailed:
        pass  # logged; each study says why until a later try succeeds
    tune_analysis_process()


def _ready_analyzer() -> Analyzer:
    """The worker's analyzer, built on the first call that can build it.

    An initialiser that raises would leave ProcessPoolExecutor with a dead process and each
    study with "the analysis process died", which hides the reason. So the worker stays up,
    each study fails with :class:`WorkerStartFailed` giving the reason, and the next study tries
    again (a passing cause, such as memory, then clears).
    """
    global _analyzer
    if _analyzer is None:
        try:
            # Every study the server analyses may be a later study's prior: keep its alignment image.
            _analyzer = replace(build_analyzer(_settings), keep_alignment_image=True)
        except Exception as exc:
            reason = f"the analysis worker could not start: {type(exc).__name__}: {exc}"
            log.error("%s", reason)
            raise WorkerStartFailed(reason) from None
    return _analyzer


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the server process is gone (killed -9, out of memory): its pool
    queues hold both ends of their pipes, so the worker would otherwise wait for work forever,
    holding the model's memory."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os._exit(0)


def _warm_up() -> list[str]:
    return _ready_analyzer().detector.providers


def _analyze(
    paths: list[Path], uids: ReportUIDs, run: int, predecessor: Path | None, prior=None, no_prior=None, prior_images=None,
) -> AnalysisResult:
    previous = dcmread(predecessor, stop_before_pixels=True) if predecessor else None
    ready = _ready_analyzer()
    card = ready.detector.card
    # An operating point applied with `lungscreen feedback apply-operating-point` holds from the next run on.
    analyzer = replace(ready, site_operating_point=_feedback.applied_operating_point(f"{card.name} {card.version}"))
    return analyze_study(
        paths, analyzer, sr_series_uid=uids.sr_series, sr_sop_uid=uids.sr, gsps_sop_uid=uids.gsps,
        instance_number=run, predecessor=previous, prior=prior, no_prior=no_prior, prior_images=prior_images,
    )


def _report_warm_up(future) -> None:
    if future.cancelled():
        return
    if future.exception() is None:  # a failure was logged by the worker, with its reason
        log.info("analysis worker ready, providers %s", future.result())


@dataclass(frozen=True)
class ReportUIDs:
    """UIDs of a run's results, derived from the study and run: a retried run writes the
    same instances again instead of second copies."""

    sr_series: str
    sr: str
    gsps: str

    @classmethod
    def for_run(cls, study_uid: str, run: int) -> "ReportUIDs":
        return cls(
            sr_series=generate_uid(entropy_srcs=["lungscreen-sr-series", study_uid]),
            sr=generate_uid(entropy_srcs=["lungscreen-sr", study_uid, str(run)]),
            gsps=generate_uid(entropy_srcs=["lungscreen-gsps", study_uid, str(run)]),
        )


class AnalysisPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._interrupted = False
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.settings.workers,
            # spawn, not fork: the server process has threads (listener, scheduler, outbox)
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.settings, logging.getLogger().level, os.getpid()),
        )

    def warm_up(self) -> None:
        """Start the workers and load the model now rather than on the first study."""
        future = self._executor.submit(_warm_up)
        future.add_done_callback(_report_warm_up)

    def analyze(
        self, paths: list[Path], *, uids: ReportUIDs, run: int, predecessor: Path | None, prior=None, no_prior=None,
        prior_images=None, timeout_s: float | None = None,
    ) -> AnalysisResult:
        with self._lock:
            executor = self._executor
        timeout_s = self.settings.analysis_timeout_s if timeout_s is None else timeout_s
        try:
            future = executor.submit(_analyze, paths, uids, run, predecessor, prior, no_prior, prior_images)
            return future.result(timeout=timeout_s)
        except BrokenProcessPool:
            if self._interrupted:
                raise AnalysisInterrupted("the server stopped this run") from None
            self._replace(executor, kill=False)
            raise AnalysisCrashed("the analysis process died (crash or out of memory) while analysing this study")
        except FutureTimeout:
            self._replace(executor, kill=True)
            raise AnalysisCrashed(f"analysis exceeded its time limit of {timeout_s:g} s")

    def analyze_prior(self, paths: list[Path], timeout_s: float) -> AnalysisResult:
        """A retrieved prior study, analysed for the comparison only: its SR and GSPS are never
        saved, sent or billed (the caller keeps only its nodules and alignment image)."""
        study = generate_uid(entropy_srcs=["lungscreen-prior", *sorted(p.name for p in paths)[:1]])
        return self.analyze(paths, uids=ReportUIDs.for_run(study, 0), run=1, predecessor=None, timeout_s=timeout_s)

    def interrupt(self) -> None:
        """Stop the running analyses now (server stopping): their callers get
        :class:`AnalysisInterrupted`, and no replacement worker is started."""
        with self._lock:
            self._interrupted = True
            _kill_workers(self._executor)

    def _replace(self, broken: ProcessPoolExecutor, *, kill: bool) -> None:
        with self._lock:
            if self._executor is not broken or self._interrupted:
                return  # another thread replaced it already, or the server is stopping
            if kill:
                _kill_workers(broken)
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
            log.warning("analysis worker pool replaced")
        self.warm_up()

    def shutdown(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    for process in list(executor._processes.values()):  # no public API to stop a running task
        process.kill()
