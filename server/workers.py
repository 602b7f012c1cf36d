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
from dataclasses import dataclass
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
from lungscreen.server.pipeline import AnalysisResult, Analyzer, analyze_study
from lungscreen.server.process_tuning import tune_analysis_process

log = logging.getLogger(__name__)


class AnalysisCrashed(LungScreenError):
    """The worker process died or the run exceeded its time limit."""


def installation_uid(data_dir: Path) -> str:
    """A stable Device UID for this installation (IHE AIR Contributing Equipment)."""
    return installation_value(data_dir, "device-uid", generate_uid)


def build_analyzer(settings: Settings) -> Analyzer:
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
    )


_analyzer: Analyzer | None = None  # one per worker process


PARENT_CHECK_INTERVAL_S = 1.0


def _init_worker(settings: Settings, log_level: int, server_pid: int) -> None:
    from lungscreen.server.logs import configure_logging

    global _analyzer
    configure_logging(logging.getLevelName(log_level))
    # The server's pid comes from the server: it may have died while this process imported.
    threading.Thread(target=_exit_with_parent, args=(server_pid,), name="parent-watch", daemon=True).start()
    _analyzer = build_analyzer(settings)
    tune_analysis_process()


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the server process is gone (killed -9, out of memory): its pool
    queues hold both ends of their pipes, so the worker would otherwise wait for work forever,
    holding the model's memory."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os._exit(0)


def _warm_up() -> list[str]:
    return _analyzer.detector.providers


def _analyze(paths: list[Path], uids: ReportUIDs, run: int, predecessor: Path | None) -> AnalysisResult:
    previous = dcmread(predecessor, stop_before_pixels=True) if predecessor else None
    return analyze_study(
        paths, _analyzer, sr_series_uid=uids.sr_series, sr_sop_uid=uids.sr, gsps_sop_uid=uids.gsps,
        instance_number=run, predecessor=previous,
    )


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
        future.add_done_callback(
            lambda f: log.info("analysis worker ready, providers %s", f.result()) if not f.exception() else None
        )

    def analyze(self, paths: list[Path], *, uids: ReportUIDs, run: int, predecessor: Path | None) -> AnalysisResult:
        with self._lock:
            executor = self._executor
        try:
            future = executor.submit(_analyze, paths, uids, run, predecessor)
            return future.result(timeout=self.settings.analysis_timeout_s)
        except BrokenProcessPool:
            self._replace(executor, kill=False)
            raise AnalysisCrashed("the analysis process died (crash or out of memory) while analysing this study")
        except FutureTimeout:
            self._replace(executor, kill=True)
            raise AnalysisCrashed(f"analysis exceeded its time limit of {self.settings.analysis_timeout_s:g} s")

    def _replace(self, broken: ProcessPoolExecutor, *, kill: bool) -> None:
        with self._lock:
            if self._executor is not broken:
                return  # another thread replaced it already
            if kill:
                for process in list(broken._processes.values()):  # no public API to stop a hung task
                    process.kill()
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
            log.warning("analysis worker pool replaced")
        self.warm_up()

    def shutdown(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)
