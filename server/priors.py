"""Follow-up screening in the server and the command line: where the prior study comes from.

A prior is the most recent earlier chest CT of the same patient (Patient ID with its issuer)
within ``prior_lookback_days``. It comes from

1. LungScreen's own history: every study it analyses leaves a row in ``prior_studies`` (its
   findings with their tracking UIDs, and the coarse image the next study aligns to); or
2. the PACS named by ``prior_source`` (``AE@host:port``): C-FIND, then C-GET into a folder of
   LungScreen's, then analysed like any study but without an SR, a GSPS or a billing entry
   (unless ``report_retrieved_priors``: then that same analysis is also the prior study's report).

A prior that cannot be found or retrieved in time leaves a baseline report that says why
(:class:`lungscreen.findings.Comparison`); it never fails the current study.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pydicom.errors

from lungscreen.dicom_io.query import PriorRetrievalError, StudyIdentity, find_ct_studies, retrieve_study, study_identity
from lungscreen.dicom_io.send import Destination
from lungscreen.errors import LungScreenError
from lungscreen.findings import Comparison, ComparisonStatus, Finding, NoduleType, PriorNodule
from lungscreen.models.longitudinal import PriorStudyNodules
from lungscreen.models.registration import AlignmentImage
from lungscreen.server.config import Settings
from lungscreen.server.db import Database
from lungscreen.server.pipeline import AnalysisResult, PriorImages

log = logging.getLogger(__name__)

_GRACE_S = 5.0


def _as_prior(finding: Finding) -> PriorNodule:
    return PriorNodule(
        center_lps_mm=tuple(finding.center_lps_mm), diameter_mm=finding.diameter_mm, volume_mm3=finding.volume_mm3,
        nodule_type=NoduleType(finding.nodule_type), lung_rads=finding.lung_rads, tracking_uid=finding.tracking_uid,
        tracking_id=finding.tracking_id,
    )


def prior_from_result(result: AnalysisResult) -> PriorStudyNodules:
    """The prior as the comparison needs it, from that study's own analysis."""
    return PriorStudyNodules(
        study_uid=result.study_uid,
        study_date=result.study_date,
        nodules=tuple(_as_prior(f) for f in result.report.findings),
        image=result.alignment_image,
        unreported=tuple(_as_prior(f) for f in result.unreported),
    )


# --- LungScreen's own history -----------------------------------------------------------------


def _nodules_json(nodules: tuple[PriorNodule, ...]) -> str:
    return json.dumps([
        {"center_lps_mm": list(n.center_lps_mm), "diameter_mm": n.diameter_mm, "volume_mm3": n.volume_mm3,
         "nodule_type": n.nodule_type.value, "lung_rads": n.lung_rads, "tracking_uid": n.tracking_uid,
         "tracking_id": n.tracking_id}
        for n in nodules
    ])


def _nodules_from_json(text: str) -> tuple[PriorNodule, ...]:
    return tuple(
        PriorNodule(tuple(n["center_lps_mm"]), n["diameter_mm"], n["volume_mm3"], NoduleType(n["nodule_type"]),
                    n["lung_rads"], n["tracking_uid"], n["tracking_id"])
        for n in json.loads(text)
    )


class PriorHistory:
    """The ``prior_studies`` table: what a later study of the same patient compares with.

    Keyed by the hash of Issuer of Patient ID and Patient ID (:func:`patient_key`); holds the
    study's nodules with their tracking UIDs and its coarse alignment image (a few hundred kB),
    so a follow-up needs neither the prior's images nor its re-analysis.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, patient_key: str, prior: PriorStudyNodules, *, retrieved: bool = False) -> None:
        """Keep (or replace, on a re-run) a study's nodules; ignored without a date (it could never be ordered)."""
        if not prior.study_date:
            return
        image = None if prior.image is None else prior.image.to_bytes()
        with self.db.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO prior_studies (study_uid, patient_key, study_date, nodules, alignment_image,"
                " retrieved, created_at, unreported) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (prior.study_uid, patient_key, prior.study_date, _nodules_json(prior.nodules), image, int(retrieved),
                 time.time(), _nodules_json(prior.unreported)),
            )

    def latest(self, patient_key: str, before_date: str, earliest_date: str, exclude_study_uid: str) -> PriorStudyNodules | None:
        """The patient's most recent study dated from ``earliest_date`` to before ``before_date``."""
        rows = self.db.query(
            "SELECT * FROM prior_studies WHERE patient_key = ? AND study_date < ? AND study_date >= ? AND study_uid != ?"
            " ORDER BY study_date DESC, created_at DESC LIMIT 1",
            (patient_key, before_date, earliest_date, exclude_study_uid),
        )
        if not rows:
            return None
        row = rows[0]
        image = None if row["alignment_image"] is None else AlignmentImage.from_bytes(row["alignment_image"])
        return PriorStudyNodules(row["study_uid"], row["study_date"], _nodules_from_json(row["nodules"]), image,
                                 _nodules_from_json(row["unreported"]))

    def nodule(self, study_uid: str, tracking_uid: str) -> PriorNodule | None:
        """The nodule of study ``study_uid`` tracked under ``tracking_uid`` (its centre on that study)."""
        rows = self.db.query("SELECT nodules FROM prior_studies WHERE study_uid = ?", (study_uid,))
        if not rows:
            return None
        return next((n for n in _nodules_from_json(rows[0]["nodules"]) if n.tracking_uid == tracking_uid), None)


# --- The prior's images on this node (review page, SR evidence) ------------------------------------


def retrieved_priors_dir(settings: Settings) -> Path:
    """Where priors retrieved from ``prior_source`` are kept, one folder per study (``data/priors/<study>``)."""
    return settings.data_dir / "priors"


def retrieved_prior_dir(settings: Settings, study_uid: str) -> Path:
    return retrieved_priors_dir(settings) / study_uid


def prior_image_paths(settings: Settings, db: Database, study_uid: str) -> list[Path]:
    """The files of study ``study_uid`` still on this node: the images LungScreen received and
    analysed itself (until purged), else those retrieved as a prior; empty when neither is left."""
    rows = db.query("SELECT path FROM instances WHERE study_uid = ? ORDER BY path", (study_uid,))
    received = [Path(r["path"]) for r in rows if Path(r["path"]).exists()]
    if received:
        return received
    folder = retrieved_prior_dir(settings, study_uid)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def prior_images(settings: Settings, db: Database, study_uid: str) -> PriorImages | None:
    """Study ``study_uid``'s files on this node with the series its analysis used (when it was a
    job of this node); ``None`` when none are left."""
    paths = prior_image_paths(settings, db, study_uid)
    if not paths:
        return None
    rows = db.query("SELECT json_extract(details, '$.series_uid') AS series_uid FROM jobs WHERE study_uid = ?", (study_uid,))
    return PriorImages(tuple(paths), rows[0]["series_uid"] if rows else None)


# --- Finding the prior: history first, then the PACS ----------------------------------------------


def _days_before(date: str, days: int) -> str:
    parsed = datetime.strptime(date, "%Y%m%d")
    return (parsed - timedelta(days=days)).strftime("%Y%m%d")


@dataclass(frozen=True)
class PriorSearch:
    """What was found for a study: the prior to compare with, or the reason there is none."""

    prior: PriorStudyNodules | None
    no_prior: Comparison | None  # set when prior is None
    images: PriorImages | None = None  # the prior's files on this node (for the SR's evidence), if any


class PriorFinder:
    """Looks for a study's prior: LungScreen's history, then ``prior_source`` (C-FIND, C-GET).

    ``analyze_prior(paths, deadline_s)`` analyses a retrieved prior and returns its
    :class:`AnalysisResult` (the server decides whether that also reports the prior's study).
    Everything after the history look-up shares one bound, ``prior_timeout_s``: when it runs out
    the current study is reported as a baseline that says so.
    """

    def __init__(self, settings: Settings, history: PriorHistory, analyze_prior: Callable[[list[Path], float], AnalysisResult]):
        self.settings = settings
        self.history = history
        self.analyze_prior = analyze_prior
        self.source = None if settings.prior_source is None else Destination.parse(settings.prior_source)

    def search(self, paths: list[Path]) -> tuple[StudyIdentity | None, PriorSearch]:
        """The study's identity (from its first readable CT header) and its prior, or why there is none."""
        for path in paths:
            try:
                identity = study_identity(path)
            except (OSError, ValueError, pydicom.errors.InvalidDicomError):
                continue
            if not identity.study_uid:
                continue
            try:
                return identity, self.find(identity)
            except Exception as exc:  # a broken history or PACS answer never costs the current report
                log.exception("study %s: looking for its prior failed", identity.study_uid)
                return identity, PriorSearch(None, Comparison(
                    ComparisonStatus.PRIOR_UNAVAILABLE, reason=f"looking for the prior failed: {type(exc).__name__}"))
        return None, PriorSearch(None, Comparison(ComparisonStatus.PRIOR_UNAVAILABLE, reason="no readable CT header"))

    def remember(self, identity: StudyIdentity | None, result: AnalysisResult) -> None:
        """Keep an analysed study for the patient's next follow-up."""
        if identity is None or result.alignment_image is None:
            return
        try:
            self.history.record(identity.patient_key, prior_from_result(result))
        except Exception:  # the report is out; a later follow-up would only miss this prior
            log.exception("study %s: could not be kept as a prior", result.study_uid)

    def find(self, identity: StudyIdentity) -> PriorSearch:
        if not identity.study_date:
            return PriorSearch(None, Comparison(ComparisonStatus.PRIOR_UNAVAILABLE, reason="the study has no StudyDate"))
        earliest = _days_before(identity.study_date, self.settings.prior_lookback_days)
        known = self.history.latest(identity.patient_key, identity.study_date, earliest, identity.study_uid)
        if known is not None:
            return PriorSearch(known, None, prior_images(self.settings, self.history.db, known.study_uid))
        if self.source is None:
            return PriorSearch(None, Comparison(ComparisonStatus.NO_PRIOR, reason=(
                f"no earlier study of this patient analysed within {self.settings.prior_lookback_days} days; no prior_source")))
        deadline = time.monotonic() + self.settings.prior_timeout_s
        cancel = threading.Event()
        outcome: list[PriorSearch | BaseException] = []

        def search() -> None:
            try:
                outcome.append(self._from_pacs(identity, earliest, deadline, cancel))
            except BaseException as exc:  # handed to the waiting thread, which reports it
                outcome.append(exc)

        # A daemon thread: a PACS that hangs past every network timeout can never hold the report
        # (nor the server's exit) longer than prior_timeout_s.
        worker = threading.Thread(target=search, name="prior-search", daemon=True)
        worker.start()
        # Every step inside has its own timeout ending at the deadline (network, the prior's analysis);
        # the grace lets the search end by itself, so that a timed-out prior analysis has freed the
        # analysis worker before the current study is submitted to it.
        worker.join(timeout=max(0.0, deadline - time.monotonic()) + _GRACE_S)
        if not outcome:
            cancel.set()  # the retrieval stops at its next instance
            reason = f"the prior was not retrieved and analysed within prior_timeout_s = {self.settings.prior_timeout_s:g} s"
        elif isinstance(outcome[0], PriorSearch):
            return outcome[0]
        elif isinstance(outcome[0], (LungScreenError, OSError, ValueError)):
            reason = str(outcome[0])
        else:
            raise outcome[0]
        log.warning("study %s: prior unavailable: %s", identity.study_uid, reason)
        return PriorSearch(None, Comparison(ComparisonStatus.PRIOR_UNAVAILABLE, reason=reason))

    def _from_pacs(self, identity: StudyIdentity, earliest: str, deadline: float, cancel: threading.Event) -> PriorSearch:
        calling = self.settings.ae_title
        remaining = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731
        found = find_ct_studies(self.source, identity, earliest_date=earliest, before_date=identity.study_date,
                                calling_ae=calling, timeout_s=min(30.0, remaining()))
        if not found:
            return PriorSearch(None, Comparison(ComparisonStatus.NO_PRIOR, reason=(
                f"no earlier CT of this patient within {self.settings.prior_lookback_days} days in {self.source}")))
        latest = found[0]
        folder = retrieved_prior_dir(self.settings, latest.study_uid)
        paths = retrieve_study(self.source, latest.study_uid, folder, calling_ae=calling, timeout_s=min(60.0, remaining()),
                               cancel=cancel)
        log.info("study %s: prior %s retrieved from %s (%d instances)", identity.study_uid, latest.study_uid, self.source, len(paths))
        if cancel.is_set():
            raise PriorRetrievalError("retrieval stopped: the report does not wait longer")
        result = self.analyze_prior(paths, remaining())
        prior = prior_from_result(result)
        self.history.record(identity.patient_key, prior, retrieved=True)
        return PriorSearch(prior, None, PriorImages(tuple(paths), result.series_uid))
