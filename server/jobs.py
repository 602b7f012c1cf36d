"""The job store: one job per study, its state, and the instances and reports behind it.

States (``jobs.state``)::

    receiving --quiet period--> queued --worker--> processing --> reported --outbox--> delivered
                                                        \\--> failed (+ reason)

A new instance for a study in any state but ``receiving`` starts a new run: ``queued``,
``reported``, ``delivered`` and ``failed`` go back to ``receiving`` (the quiet period starts
again), and a ``processing`` job finishes its run and then goes back to ``receiving``.
After a restart, a job caught in ``processing`` is queued again: nothing received is lost.
A study that was being analysed at ``MAX_INTERRUPTIONS`` restarts in a row (one that takes
the server down, say) fails instead, so it cannot crash the server in a loop; a rerun
request (or a new instance) tries it again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lungscreen.dicom_io.query import InstanceIdentity
from lungscreen.server.db import Database

RECEIVING, QUEUED, PROCESSING, REPORTED, DELIVERED, FAILED = (
    "receiving", "queued", "processing", "reported", "delivered", "failed",
)
STATES = (RECEIVING, QUEUED, PROCESSING, REPORTED, DELIVERED, FAILED)
MAX_INTERRUPTIONS = 3


@dataclass(frozen=True)
class Job:
    study_uid: str
    state: str
    reason: str | None
    runs: int
    instances: int
    rejected_instances: int
    first_received_at: float | None
    last_received_at: float | None
    started_at: float | None
    finished_at: float | None
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _job(row) -> Job:
    return Job(
        study_uid=row["study_uid"], state=row["state"], reason=row["reason"], runs=row["runs"],
        instances=row["instances"], rejected_instances=row["rejected_instances"],
        first_received_at=row["first_received_at"], last_received_at=row["last_received_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], details=json.loads(row["details"]),
    )


# (sop_uid, study_uid, series_uid, sop_class_uid, path, received_at); a known SOP Instance UID is kept
_INSERT_INSTANCE = "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?)"


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- ingest -------------------------------------------------------------------------
    def record_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class_uid: str,
        path: Path,
        *,
        content_changed: bool = True,
        durable: bool = True,
        now: float | None = None,
    ) -> bool:
        """Register a stored instance and (re)start its study's quiet period.

        An identical re-send of a known instance (``content_changed=False``) changes
        nothing, so a PACS pushing a study again does not trigger a new run. Returns
        whether the study's job was touched. ``durable=False``: committed without an
        fsync, made durable by :meth:`make_durable` (at the end of the association).
        """
        now = time.time() if now is None else now
        with self.db.transaction(durable=durable) as c:
            new = c.execute(
                _INSERT_INSTANCE,
                (sop_uid, study_uid, series_uid, sop_class_uid, str(path), now),
            ).rowcount
            if not new and not content_changed:
                return False
            self._touch(c, study_uid, now, instances=new, rejected=0)
            return True

    def open_retrieved_study(self, study_uid: str, instances: Sequence[InstanceIdentity], *, now: float | None = None) -> int | None:
        """A study retrieved from the PACS as a prior, to be reported as if it had been received:
        its instances recorded and its job started (processing, run 1) in one transaction, so the
        scheduler never queues it for a second analysis. None when this node already has a job
        for the study (its own job reports it)."""
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            if c.execute("SELECT 1 FROM jobs WHERE study_uid = ?", (study_uid,)).fetchone():
                return None
            c.executemany(
                _INSERT_INSTANCE,
                [(i.sop_uid, study_uid, i.series_uid, i.sop_class_uid, str(i.path), now) for i in instances],
            )
            self._touch(c, study_uid, now, instances=len(instances), rejected=0)
            c.execute(
                "UPDATE jobs SET state = 'processing', runs = 1, started_at = ?, updated_at = ? WHERE study_uid = ?",
                (now, now, study_uid),
            )
        return 1

    def make_durable(self) -> None:
        """Everything recorded so far survives a power cut once this returns."""
        self.db.sync()

    def record_rejection(self, study_uid: str | None, calling_ae: str, reason: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO rejections (at, study_uid, calling_ae, reason) VALUES (?, ?, ?, ?)",
                (now, study_uid, calling_ae, reason),
            )
            if study_uid:
                self._touch(c, study_uid, now, instances=0, rejected=1)

    def record_ignored(self, study_uid: str, what: str, *, now: float | None = None) -> None:
        """A study seen only through non-CT instances gets a failed job that says so; a study
        that already has a job is left alone (its SRs, SEGs and the like change nothing)."""
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            c.execute(
                """INSERT INTO jobs (study_uid, state, reason, first_received_at, last_received_at, updated_at)
                   VALUES (?, 'failed', ?, ?, ?, ?) ON CONFLICT (study_uid) DO NOTHING""",
                (study_uid, f"not a CT study: received {what} instances only, nothing to analyse", now, now, now),
            )

    @staticmethod
    def _touch(c, study_uid: str, now: float, *, instances: int, rejected: int) -> None:
        c.execute(
            """INSERT INTO jobs (study_uid, state, instances, rejected_instances, first_received_at,
                                 last_received_at, updated_at)
               VALUES (?, 'receiving', ?, ?, ?, ?, ?)
               ON CONFLICT (study_uid) DO UPDATE SET
                 instances = instances + excluded.instances,
                 rejected_instances = rejected_instances + excluded.rejected_instances,
                 last_received_at = excluded.last_received_at,
                 updated_at = excluded.updated_at,
                 rerun_requested = CASE WHEN state = 'processing' THEN 1 ELSE rerun_requested END,
                 state = CASE WHEN state = 'processing' THEN state ELSE 'receiving' END,
                 reason = CASE WHEN state = 'processing' THEN reason ELSE NULL END""",
            (study_uid, instances, rejected, now, now, now),
        )

    # --- scheduling ---------------------------------------------------------------------
    def queue_quiet_studies(self, idle_s: float, *, now: float | None = None) -> list[str]:
        """Move studies silent for ``idle_s`` from receiving to queued; return them."""
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            rows = c.execute(
                "SELECT study_uid FROM jobs WHERE state = 'receiving' AND last_received_at <= ?", (now - idle_s,)
            ).fetchall()
            uids = [r["study_uid"] for r in rows]
            c.executemany("UPDATE jobs SET state = 'queued', updated_at = ? WHERE study_uid = ?", [(now, u) for u in uids])
        return uids

    def queued(self) -> list[str]:
        return [r["study_uid"] for r in self.db.query("SELECT study_uid FROM jobs WHERE state = 'queued' ORDER BY updated_at")]

    def claim(self, study_uid: str, *, now: float | None = None) -> int | None:
        """queued -> processing; return the run number, or None if the job is not queued."""
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            changed = c.execute(
                """UPDATE jobs SET state = 'processing', runs = runs + 1, rerun_requested = 0, started_at = ?,
                   finished_at = NULL, reason = NULL, updated_at = ? WHERE study_uid = ? AND state = 'queued'""",
                (now, now, study_uid),
            ).rowcount
            if not changed:
                return None
            return c.execute("SELECT runs FROM jobs WHERE study_uid = ?", (study_uid,)).fetchone()["runs"]

    def finish(self, study_uid: str, state: str, *, reason: str | None = None, details: dict | None = None) -> str:
        """End a run in ``state`` (reported or failed); a run overtaken by new instances goes back to receiving."""
        if state not in (REPORTED, FAILED):
            raise ValueError(f"a run ends reported or failed, not {state!r}")
        now = time.time()
        with self.db.transaction() as c:
            c.execute(
                """UPDATE jobs SET state = CASE WHEN rerun_requested THEN 'receiving' ELSE ? END,
                   rerun_requested = 0, interruptions = 0, reason = ?, finished_at = ?, updated_at = ?, details = ?
                   WHERE study_uid = ? AND state = 'processing'""",
                (state, reason, now, now, json.dumps(details or {}), study_uid),
            )
            return c.execute("SELECT state FROM jobs WHERE study_uid = ?", (study_uid,)).fetchone()["state"]

    def hand_back(self, study_uid: str, reason: str) -> None:
        """A claimed run that did not do its work goes back to the queue as if never claimed
        (receiving when new instances came meanwhile): the same run number and report UIDs next
        time, and not counted as an interruption. ``reason`` says why the study waits (the
        server is stopping, the inference server is unavailable)."""
        with self.db.transaction() as c:
            c.execute(
                """UPDATE jobs SET state = CASE WHEN rerun_requested THEN 'receiving' ELSE 'queued' END,
                   rerun_requested = 0, runs = runs - 1, started_at = NULL, reason = ?, updated_at = ?
                   WHERE study_uid = ? AND state = 'processing'""",
                (reason, time.time(), study_uid),
            )

    def mark_delivered(self, study_uid: str) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE jobs SET state = 'delivered', updated_at = ? WHERE study_uid = ? AND state = 'reported'",
                (time.time(), study_uid),
            )

    def mark_delivery_failed(self, study_uid: str, report_sop_uid: str, reason: str) -> None:
        """A report of the study (its SR or GSPS) never reached a destination: the job fails with
        ``reason``. Anything else sent for the study (a radiologist's assessment) does not fail it."""
        with self.db.transaction() as c:
            c.execute(
                """UPDATE jobs SET state = 'failed', reason = ?, updated_at = ? WHERE study_uid = ? AND state = 'reported'
                   AND EXISTS (SELECT 1 FROM reports WHERE sop_uid = ? AND study_uid = jobs.study_uid)""",
                (reason, time.time(), study_uid, report_sop_uid),
            )

    def request_rerun(self, study_uid: str) -> bool:
        """Queue a study at rest (reported, delivered, failed) for a new run; False otherwise."""
        with self.db.transaction() as c:
            return bool(
                c.execute(
                    """UPDATE jobs SET state = 'queued', reason = NULL, interruptions = 0, updated_at = ?
                       WHERE study_uid = ? AND state IN ('reported', 'delivered', 'failed')
                       AND EXISTS (SELECT 1 FROM instances WHERE instances.study_uid = jobs.study_uid)""",
                    (time.time(), study_uid),
                ).rowcount
            )

    def resume_after_restart(self) -> list[str]:
        """Runs cut short by a crash or stop go back to the queue; return their studies.

        A study interrupted ``MAX_INTERRUPTIONS`` times in a row fails instead, with a reason.
        """
        now = time.time()
        with self.db.transaction() as c:
            c.execute("UPDATE jobs SET interruptions = interruptions + 1 WHERE state = 'processing'")
            c.execute(
                "UPDATE jobs SET state = 'failed', reason = ?, finished_at = ?, updated_at = ? "
                "WHERE state = 'processing' AND interruptions >= ?",
                (f"analysis interrupted by {MAX_INTERRUPTIONS} server restarts in a row; not retried automatically "
                 "(POST /studies/<uid>/rerun tries again)", now, now, MAX_INTERRUPTIONS),
            )
            rows = c.execute("SELECT study_uid FROM jobs WHERE state = 'processing'").fetchall()
            c.execute("UPDATE jobs SET state = 'queued', updated_at = ? WHERE state = 'processing'", (now,))
        return [r["study_uid"] for r in rows]

    # --- reading ------------------------------------------------------------------------
    def get(self, study_uid: str) -> Job | None:
        rows = self.db.query("SELECT * FROM jobs WHERE study_uid = ?", (study_uid,))
        return _job(rows[0]) if rows else None

    def list(self, limit: int = 200) -> list[Job]:
        return [_job(r) for r in self.db.query("SELECT * FROM jobs ORDER BY updated_at DESC LIMIT ?", (limit,))]

    def count_by_state(self) -> dict[str, int]:
        return self.db.count_by_state("jobs", STATES)

    def instance_paths(self, study_uid: str) -> list[Path]:
        rows = self.db.query("SELECT path FROM instances WHERE study_uid = ? ORDER BY path", (study_uid,))
        return [Path(r["path"]) for r in rows]

    def rejections(self, study_uid: str, limit: int = 50) -> list[dict]:
        rows = self.db.query(
            "SELECT at, calling_ae, reason FROM rejections WHERE study_uid = ? ORDER BY id DESC LIMIT ?", (study_uid, limit)
        )
        return [dict(r) for r in rows]

    # --- reports (also the loop guard) ----------------------------------------------------
    def record_report(self, sop_uid: str, study_uid: str, run: int, path: Path, *, kind: str = "sr") -> None:
        """A result this server produced (an SR or a GSPS); it never triggers processing."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, ?, ?)",
                (sop_uid, study_uid, run, kind, str(path), time.time()),
            )

    def latest_report(self, study_uid: str) -> Path | None:
        """The latest SR of the study (the one a new SR supersedes)."""
        rows = self.db.query(
            "SELECT path FROM reports WHERE study_uid = ? AND kind = 'sr' ORDER BY run DESC LIMIT 1", (study_uid,)
        )
        return Path(rows[0]["path"]) if rows else None

    def instance_path(self, sop_uid: str) -> Path | None:
        rows = self.db.query("SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,))
        return Path(rows[0]["path"]) if rows else None

    def is_report(self, sop_uid: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM reports WHERE sop_uid = ?", (sop_uid,)))
