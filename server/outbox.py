"""The durable outbox: each report to each destination, retried with exponential backoff and jitter.

A row is ``pending`` until sent, then ``sent``; after ``max_attempts`` transient failures,
or at once on a permanent rejection, it is ``dead`` with the reason (a dead letter): never
an endless retry loop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lungscreen.server.db import Database


DELIVERY_STATES = ("pending", "sent", "dead")


@dataclass(frozen=True)
class OutboxItem:
    id: int
    study_uid: str
    report_sop_uid: str
    path: Path
    destination: str
    attempts: int


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    # Each wait is shortened by up to this fraction at random, so that the reports of one study,
    # failing together, do not retry in lockstep and meet the same busy destination again.
    jitter: float = 0.5

    def delay(self, attempts: int) -> float:
        """The longest wait after ``attempts`` failed tries."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempts - 1))

    def wait(self, attempts: int, uniform: Callable[[], float] = random.random) -> float:
        """The wait before the next try: :meth:`delay` less a random part of up to ``jitter``."""
        return self.delay(attempts) * (1.0 - self.jitter * uniform())


class Outbox:
    def __init__(self, db: Database, policy: RetryPolicy = RetryPolicy()) -> None:
        self.db = db
        self.policy = policy

    def enqueue(self, study_uid: str, report_sop_uid: str, path: Path, destinations: list[str]) -> None:
        now = time.time()
        with self.db.transaction() as c:
            c.executemany(
                """INSERT OR IGNORE INTO outbox (study_uid, report_sop_uid, path, destination, state,
                   next_attempt_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)""",
                [(study_uid, report_sop_uid, str(path), d, now, now) for d in destinations],
            )

    def due(self, *, now: float | None = None, limit: int = 20) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self.db.query(
            "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(r["id"], r["study_uid"], r["report_sop_uid"], Path(r["path"]), r["destination"], r["attempts"])
            for r in rows
        ]

    def next_due(self) -> float | None:
        rows = self.db.query("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state = 'pending'")
        return rows[0]["t"]

    def mark_sent(self, item: OutboxItem) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, last_error = NULL, updated_at = ? WHERE id = ?",
                (time.time(), item.id),
            )

    def mark_failed(self, item: OutboxItem, error: str, *, permanent: bool) -> str:
        """Record a failed try; return the new state (``pending`` to retry, or ``dead``)."""
        attempts = item.attempts + 1
        now = time.time()
        dead = permanent or attempts >= self.policy.max_attempts
        state = "dead" if dead else "pending"
        with self.db.transaction() as c:
            c.execute(
                "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (state, attempts, error, now + self.policy.wait(attempts), now, item.id),
            )
        return state

    def count_by_state(self) -> dict[str, int]:
        """Deliveries (one report to one destination) by state: pending, sent, dead."""
        return self.db.count_by_state("outbox", DELIVERY_STATES)

    def all_sent(self, study_uid: str) -> bool:
        """True when every result of the study went to every destination."""
        rows = self.db.query("SELECT 1 FROM outbox WHERE study_uid = ? AND state != 'sent' LIMIT 1", (study_uid,))
        return not rows

    def for_study(self, study_uid: str) -> list[dict]:
        rows = self.db.query(
            "SELECT report_sop_uid, destination, state, attempts, last_error, updated_at FROM outbox WHERE study_uid = ? ORDER BY id",
            (study_uid,),
        )
        return [dict(r) for r in rows]
