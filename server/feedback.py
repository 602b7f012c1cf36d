"""Radiologists' verdicts on LungScreen's findings, stored with the study in the job store.

A finding is known by the Tracking Unique Identifier (DCM 112040) its SR gave it, which the
job's findings rows keep (``tracking_uid``). Per finding a radiologist accepts or rejects it;
per study they may add a nodule the AI missed (position in LPS mm, size). Each record says
who, when, and where it came from: the review page (signed in) or a viewer's SR (OHIF's
report export arriving through the DICOM listener, :mod:`server.ingest`). A finding may be
judged again; the latest verdict counts, the earlier ones stay as history.

A verdict keeps a copy of what it judged (the finding's calibrated probability, Lung-RADS
category, size, the model and operating point of the run), so the site's figures
(:mod:`server.site_figures`) stay right after a re-run replaces the findings.

Verdicts carry no patient names or IDs and are never logged (only counts are). They follow
retention: :func:`server.retention.purge_feedback`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungscreen.server.db import Database

ACCEPTED, REJECTED = "accepted", "rejected"
VERDICTS = (ACCEPTED, REJECTED)
REVIEW_PAGE, VIEWER_SR = "review page", "viewer SR"
SOURCES = (REVIEW_PAGE, VIEWER_SR)


class FeedbackError(ValueError):
    """A verdict that cannot be recorded: no such finding, no result yet, a bad value."""


@dataclass(frozen=True)
class JudgedFinding:
    """A finding as the run that reported it saw it."""

    study_uid: str
    tracking_uid: str
    sr_sop_uid: str
    model: str
    operating_point: str
    score_threshold: float
    probability: float
    lung_rads: str
    diameter_mm: float


@dataclass(frozen=True)
class FindingVerdict:
    finding: JudgedFinding
    verdict: str  # ACCEPTED or REJECTED
    reviewer: str
    source: str  # REVIEW_PAGE or VIEWER_SR
    at: float  # epoch seconds
    source_sop_uid: str | None = None  # the viewer SR it came from


@dataclass(frozen=True)
class MissedNodule:
    """A nodule a radiologist found that the run did not report."""

    study_uid: str
    center_lps_mm: tuple[float, float, float] | None  # None: the viewer's image is not stored here
    diameter_mm: float | None
    reviewer: str
    source: str
    at: float
    sr_sop_uid: str  # the report it was missing from
    model: str
    operating_point: str
    score_threshold: float
    source_sop_uid: str | None = None
    source_tracking_uid: str | None = None  # the viewer's Tracking UID of its measurement


@dataclass(frozen=True)
class StudyResult:
    """What the latest run of a study reported, as the job store keeps it."""

    study_uid: str
    sr_sop_uid: str
    model: str
    operating_point: str
    score_threshold: float
    findings: tuple[Mapping[str, Any], ...]

    @classmethod
    def from_job(cls, study_uid: str, details: Mapping[str, Any]) -> StudyResult | None:
        """None while the study has no report (not analysed yet, or failed)."""
        if not details.get("sr_sop_uid") or details.get("operating_point") is None:
            return None
        return cls(
            study_uid=study_uid,
            sr_sop_uid=str(details["sr_sop_uid"]),
            model=str(details.get("model", "")),
            operating_point=str(details["operating_point"]),
            score_threshold=float(details["score_threshold"]),
            findings=tuple(details.get("findings") or ()),
        )

    @property
    def tracking_uids(self) -> tuple[str, ...]:
        return tuple(str(f["tracking_uid"]) for f in self.findings if f.get("tracking_uid"))

    def judged(self, tracking_uid: str) -> JudgedFinding:
        for row in self.findings:
            if row.get("tracking_uid") == tracking_uid:
                return JudgedFinding(
                    study_uid=self.study_uid, tracking_uid=tracking_uid, sr_sop_uid=self.sr_sop_uid, model=self.model,
                    operating_point=self.operating_point, score_threshold=self.score_threshold,
                    probability=float(row["probability"]), lung_rads=str(row["lung_rads"]),
                    diameter_mm=float(row["diameter_mm"]),
                )
        raise FeedbackError(f"study {self.study_uid} has no finding with tracking UID {tracking_uid}")


@dataclass(frozen=True)
class ViewerReportRecord:
    """A viewer's SR received through the DICOM listener, waiting for or done with processing."""

    sop_uid: str
    study_uid: str
    path: Path
    calling_ae: str
    received_at: float
    state: str  # pending, done (verdicts recorded), ignored (outcome says why)
    outcome: str | None
    processed_at: float | None


@dataclass(frozen=True)
class OperatingPointDecision:
    """An operating point an administrator applied to this site, and on what evidence."""

    model: str  # "name version", as the job details write it: it applies to that model only
    name: str
    threshold: float  # on the calibrated probability, as the model card's operating points
    applied_by: str
    applied_at: float
    evidence: str

    @property
    def provenance(self) -> str:
        """How the SR names where the operating point came from."""
        when = time.strftime("%Y-%m-%d", time.gmtime(self.applied_at))
        return (
            f"site operating point {self.name} (threshold {self.threshold:g}), applied by {self.applied_by} "
            f"on {when} from radiologists' verdicts: {self.evidence}"
        )


def _check(verdict: str, source: str, reviewer: str) -> None:
    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict must be one of {VERDICTS}: {verdict!r}")
    if source not in SOURCES:
        raise FeedbackError(f"source must be one of {SOURCES}: {source!r}")
    if not reviewer.strip():
        raise FeedbackError("a verdict needs the reviewer's name")


def _verdict(row) -> FindingVerdict:
    return FindingVerdict(
        finding=JudgedFinding(
            study_uid=row["study_uid"], tracking_uid=row["tracking_uid"], sr_sop_uid=row["sr_sop_uid"],
            model=row["model"], operating_point=row["operating_point"], score_threshold=row["score_threshold"],
            probability=row["probability"], lung_rads=row["lung_rads"], diameter_mm=row["diameter_mm"],
        ),
        verdict=row["verdict"], reviewer=row["reviewer"], source=row["source"], at=row["at"],
        source_sop_uid=row["source_sop_uid"],
    )


def _missed(row) -> MissedNodule:
    centre = None if row["x_mm"] is None else (row["x_mm"], row["y_mm"], row["z_mm"])
    return MissedNodule(
        study_uid=row["study_uid"], center_lps_mm=centre, diameter_mm=row["diameter_mm"], reviewer=row["reviewer"],
        source=row["source"], at=row["at"], sr_sop_uid=row["sr_sop_uid"], model=row["model"],
        operating_point=row["operating_point"], score_threshold=row["score_threshold"],
        source_sop_uid=row["source_sop_uid"], source_tracking_uid=row["source_tracking_uid"],
    )


class FeedbackStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- verdicts ---------------------------------------------------------------------------
    def record_verdict(
        self, result: StudyResult, tracking_uid: str, verdict: str, *, reviewer: str, source: str,
        source_sop_uid: str | None = None, now: float | None = None,
    ) -> FindingVerdict:
        _check(verdict, source, reviewer)
        record = FindingVerdict(
            finding=result.judged(tracking_uid), verdict=verdict, reviewer=reviewer.strip(), source=source,
            at=time.time() if now is None else now, source_sop_uid=source_sop_uid,
        )
        f = record.finding
        with self.db.transaction() as c:
            c.execute(
                """INSERT INTO finding_verdicts (study_uid, tracking_uid, verdict, reviewer, source, source_sop_uid, at,
                       sr_sop_uid, model, operating_point, score_threshold, probability, lung_rads, diameter_mm)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (f.study_uid, f.tracking_uid, verdict, record.reviewer, source, source_sop_uid, record.at,
                 f.sr_sop_uid, f.model, f.operating_point, f.score_threshold, f.probability, f.lung_rads,
                 f.diameter_mm),
            )
        return record

    def record_missed(
        self, result: StudyResult, center_lps_mm: tuple[float, float, float] | None, diameter_mm: float | None, *,
        reviewer: str, source: str, source_sop_uid: str | None = None, source_tracking_uid: str | None = None,
        now: float | None = None,
    ) -> MissedNodule:
        """Record a missed nodule; one the same viewer measurement (tracking UID) already
        recorded is replaced, so a viewer SR sent again or amended adds nothing twice."""
        _check(ACCEPTED, source, reviewer)
        if diameter_mm is not None and not 0 < diameter_mm < 200:
            raise FeedbackError(f"nodule size must be between 0 and 200 mm: {diameter_mm}")
        if center_lps_mm is not None and len(center_lps_mm) != 3:
            raise FeedbackError("a position is three LPS coordinates in mm")
        record = MissedNodule(
            study_uid=result.study_uid,
            center_lps_mm=None if center_lps_mm is None else tuple(float(v) for v in center_lps_mm),
            diameter_mm=None if diameter_mm is None else float(diameter_mm), reviewer=reviewer.strip(),
            source=source, at=time.time() if now is None else now, sr_sop_uid=result.sr_sop_uid, model=result.model,
            operating_point=result.operating_point, score_threshold=result.score_threshold,
            source_sop_uid=source_sop_uid, source_tracking_uid=source_tracking_uid,
        )
        x, y, z = record.center_lps_mm or (None, None, None)
        with self.db.transaction() as c:
            c.execute(
                """INSERT OR REPLACE INTO missed_nodules (study_uid, x_mm, y_mm, z_mm, diameter_mm, reviewer, source,
                       source_sop_uid, source_tracking_uid, at, sr_sop_uid, model, operating_point, score_threshold)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (record.study_uid, x, y, z, record.diameter_mm, record.reviewer, source, source_sop_uid,
                 source_tracking_uid, record.at, record.sr_sop_uid, record.model, record.operating_point,
                 record.score_threshold),
            )
        return record

    def verdicts(self, study_uid: str | None = None) -> list[FindingVerdict]:
        """The latest verdict on each judged finding (of one study, or of all)."""
        where, params = ("WHERE v.study_uid = ?", (study_uid,)) if study_uid else ("", ())
        rows = self.db.query(
            f"""SELECT v.* FROM finding_verdicts v
                JOIN (SELECT study_uid, tracking_uid, MAX(id) AS id FROM finding_verdicts GROUP BY study_uid, tracking_uid)
                  latest ON latest.id = v.id {where} ORDER BY v.at, v.id""",
            params,
        )
        return [_verdict(r) for r in rows]

    def verdict_history(self, study_uid: str) -> list[FindingVerdict]:
        rows = self.db.query("SELECT * FROM finding_verdicts WHERE study_uid = ? ORDER BY at, id", (study_uid,))
        return [_verdict(r) for r in rows]

    def missed(self, study_uid: str | None = None) -> list[MissedNodule]:
        where, params = ("WHERE study_uid = ?", (study_uid,)) if study_uid else ("", ())
        return [_missed(r) for r in self.db.query(f"SELECT * FROM missed_nodules {where} ORDER BY at, id", params)]

    # --- viewer SRs received ------------------------------------------------------------------
    def record_viewer_report(
        self, sop_uid: str, study_uid: str, path: Path, calling_ae: str, *, durable: bool = True,
        now: float | None = None,
    ) -> bool:
        """Queue a received viewer SR for processing; False when it was received before."""
        with self.db.transaction(durable=durable) as c:
            return bool(
                c.execute(
                    """INSERT OR IGNORE INTO viewer_reports (sop_uid, study_uid, path, calling_ae, received_at, state)
                       VALUES (?, ?, ?, ?, ?, 'pending')""",
                    (sop_uid, study_uid, str(path), calling_ae, time.time() if now is None else now),
                ).rowcount
            )

    def viewer_reports(self, *, state: str | None = None, study_uid: str | None = None) -> list[ViewerReportRecord]:
        clauses, params = [], []
        if state:
            clauses.append("state = ?")
            params.append(state)
        if study_uid:
            clauses.append("study_uid = ?")
            params.append(study_uid)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self.db.query(f"SELECT * FROM viewer_reports {where} ORDER BY received_at", tuple(params))
        return [
            ViewerReportRecord(
                sop_uid=r["sop_uid"], study_uid=r["study_uid"], path=Path(r["path"]), calling_ae=r["calling_ae"],
                received_at=r["received_at"], state=r["state"], outcome=r["outcome"], processed_at=r["processed_at"],
            )
            for r in rows
        ]

    def finish_viewer_report(self, sop_uid: str, state: str, outcome: str, *, now: float | None = None) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE viewer_reports SET state = ?, outcome = ?, processed_at = ? WHERE sop_uid = ?",
                (state, outcome, time.time() if now is None else now, sop_uid),
            )

    # --- operating points applied ---------------------------------------------------------
    def apply_operating_point(
        self, model: str, name: str, threshold: float, *, applied_by: str, evidence: str, now: float | None = None
    ) -> OperatingPointDecision:
        if not 0.0 <= threshold <= 1.0:
            raise FeedbackError(f"the threshold is a calibrated probability, between 0 and 1: {threshold}")
        if not applied_by.strip():
            raise FeedbackError("say who applies the operating point (--by)")
        if not evidence.strip():
            raise FeedbackError("say on what evidence the operating point is applied (--evidence)")
        decision = OperatingPointDecision(
            model=model, name=name, threshold=float(threshold), applied_by=applied_by.strip(),
            applied_at=time.time() if now is None else now, evidence=evidence.strip(),
        )
        with self.db.transaction() as c:
            c.execute(
                """INSERT INTO operating_point_decisions (model, name, threshold, applied_by, applied_at, evidence)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (decision.model, decision.name, decision.threshold, decision.applied_by, decision.applied_at,
                 decision.evidence),
            )
        return decision

    def applied_operating_point(self, model: str) -> OperatingPointDecision | None:
        """The latest operating point applied for ``model`` ("name version"), or None."""
        rows = self.db.query(
            "SELECT * FROM operating_point_decisions WHERE model = ? ORDER BY applied_at DESC, id DESC LIMIT 1", (model,)
        )
        if not rows:
            return None
        r = rows[0]
        return OperatingPointDecision(
            model=r["model"], name=r["name"], threshold=r["threshold"], applied_by=r["applied_by"],
            applied_at=r["applied_at"], evidence=r["evidence"],
        )

    def decisions(self) -> list[OperatingPointDecision]:
        rows = self.db.query("SELECT * FROM operating_point_decisions ORDER BY applied_at, id")
        return [
            OperatingPointDecision(r["model"], r["name"], r["threshold"], r["applied_by"], r["applied_at"], r["evidence"])
            for r in rows
        ]
