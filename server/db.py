"""The embedded SQLite database (WAL): jobs, instances, reports, outbox, billing ledger.

One connection shared by the server's threads behind a lock; every write is a short
transaction, committed with ``synchronous=FULL`` (the WAL fsynced) so that what the server
promised survives a power cut. Rows of received instances are the exception when the
listener defers durability to the association's end (``dicom_io.durability``): they are
committed without the fsync, and :meth:`Database.sync` before the A-RELEASE response makes
them durable all at once. Either way a commit is atomic and the database stays consistent.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN
        ('receiving', 'queued', 'processing', 'reported', 'delivered', 'failed')),
    reason TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0,
    rejected_instances INTEGER NOT NULL DEFAULT 0,
    rerun_requested INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    last_received_at REAL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, last_received_at);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    study_uid TEXT,
    calling_ae TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    run INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('sr', 'gsps')),
    path TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_study ON reports (study_uid, run);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    report_sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (report_sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS billing (
    id INTEGER PRIMARY KEY,
    accession_number TEXT NOT NULL,
    main_item_code TEXT NOT NULL,
    main_item_scheme TEXT NOT NULL,
    main_item_meaning TEXT NOT NULL,
    extension_item_code TEXT NOT NULL,
    extension_item_scheme TEXT NOT NULL,
    extension_item_meaning TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    report_sop_uid TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (accession_number, main_item_code)
);
CREATE TABLE IF NOT EXISTS durability (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    synced_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS prior_studies (
    study_uid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    study_date TEXT NOT NULL,
    nodules TEXT NOT NULL,
    alignment_image BLOB,
    retrieved INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS prior_studies_patient ON prior_studies (patient_key, study_date);
"""


class Database:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._depth = threading.local()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to SCHEMA (columns added since)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "interruptions" not in columns:
            self._conn.execute("ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0")

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error.

        Nested calls in the same thread join the outer transaction, so several stores can
        commit one step (report, billing entry, outbox rows, job state) atomically.
        ``durable=False`` commits without fsyncing the WAL; the commit becomes durable with
        the next durable one, or :meth:`sync`.
        """
        with self._lock:
            depth = getattr(self._depth, "n", 0)
            if depth:
                self._depth.n = depth + 1
                try:
                    yield self._conn
                finally:
                    self._depth.n = depth
                return
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._depth.n = 1
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                finally:
                    self._depth.n = 0
                self._conn.execute("COMMIT")
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def sync(self) -> None:
        """Make every earlier commit durable.

        A ``synchronous=FULL`` commit fsyncs the WAL, and the WAL holds every commit since
        the last checkpoint; an empty transaction writes nothing, so this one writes a row.
        """
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO durability (id, synced_at) VALUES (1, ?)", (time.time(),))

    def count_by_state(self, table: str, states: tuple[str, ...]) -> dict[str, int]:
        """Rows of ``table`` (one of this schema's, never user input) per value of its ``state``
        column; each of ``states`` is listed, 0 when no row has it."""
        counts = dict.fromkeys(states, 0)
        for row in self.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
