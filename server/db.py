"""The embedded SQLite database (WAL): jobs, instances, reports, outbox, billing ledger,
radiologists' verdicts.

One connection shared by the server's threads behind a lock; every write is a short
transaction, committed with ``synchronous=FULL`` (the WAL fsynced) so that what the server
promised survives a power cut. Rows of received instances are the exception when the
listener defers durability to the association's end (``dicom_io.durability``): they are
committed without the fsync, and :meth:`Database.sync` before the A-RELEASE response makes
them durable all at once. Either way a commit is atomic and the database stays consistent.

Upgrades: the store records its schema version in SQLite's ``PRAGMA user_version``. Opening
an older store copies it next to itself (``lungscreen.sqlite.v<old>.bak``) and then runs the
missing steps of :data:`MIGRATIONS` in one transaction; a store from a newer LungScreen is
refused. A schema change is one new step at the end of :data:`MIGRATIONS`, never an edit of an
existing one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from lungscreen.errors import ConfigurationError

# The tables of release 0.1.0 (commit 8ba2173), the first store that can be upgraded; stores
# older than the interruption counter lack one column of it.
RELEASE_0_1_TABLES = """
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
"""


def _v1_release_0_1_tables(c: sqlite3.Connection) -> None:
    """The tables of release 0.1.0 (which recorded no version), made or completed."""
    _run_script(c, RELEASE_0_1_TABLES)
    columns = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
    if "interruptions" not in columns:
        c.execute("ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0")


def _v2_outbox_by_study(c: sqlite3.Connection) -> None:
    """Deliveries are looked up by study (is every report of it sent? what does the status
    page show?): an index instead of a scan of the whole outbox."""
    c.execute("CREATE INDEX outbox_study ON outbox (study_uid)")


FEEDBACK_TABLES = """
CREATE TABLE finding_verdicts (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    tracking_uid TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('accepted', 'rejected')),
    reviewer TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('review page', 'viewer SR')),
    source_sop_uid TEXT,
    at REAL NOT NULL,
    sr_sop_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    operating_point TEXT NOT NULL,
    score_threshold REAL NOT NULL,
    probability REAL NOT NULL,
    lung_rads TEXT NOT NULL,
    diameter_mm REAL NOT NULL
);
CREATE INDEX finding_verdicts_study ON finding_verdicts (study_uid, tracking_uid, at);
CREATE TABLE missed_nodules (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    x_mm REAL,
    y_mm REAL,
    z_mm REAL,
    diameter_mm REAL,
    reviewer TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('review page', 'viewer SR')),
    source_sop_uid TEXT,
    source_tracking_uid TEXT,
    at REAL NOT NULL,
    sr_sop_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    operating_point TEXT NOT NULL,
    score_threshold REAL NOT NULL,
    UNIQUE (study_uid, source_tracking_uid)
);
CREATE INDEX missed_nodules_study ON missed_nodules (study_uid);
CREATE TABLE viewer_reports (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'ignored')),
    outcome TEXT,
    processed_at REAL
);
CREATE INDEX viewer_reports_state ON viewer_reports (state, received_at);
CREATE TABLE operating_point_decisions (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    name TEXT NOT NULL,
    threshold REAL NOT NULL,
    applied_by TEXT NOT NULL,
    applied_at REAL NOT NULL,
    evidence TEXT NOT NULL
);
"""


def _v3_feedback(c: sqlite3.Connection) -> None:
    """Radiologists' verdicts on findings, nodules they added, the viewer SRs they came from, and
    the operating points applied from them (server/feedback.py). A verdict keeps what it judged
    (the finding's probability, category, size, operating point) so the site's figures need no
    other table; the latest verdict on a finding is the one that counts."""
    _run_script(c, FEEDBACK_TABLES)


PRIOR_STUDY_TABLES = """
CREATE TABLE prior_studies (
    study_uid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    study_date TEXT NOT NULL,
    nodules TEXT NOT NULL,
    alignment_image BLOB,
    retrieved INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX prior_studies_patient ON prior_studies (patient_key, study_date);
"""


def _v4_prior_studies(c: sqlite3.Connection) -> None:
    """What follow-up screening needs of each analysed study (server/priors.py): the nodules and
    the coarse alignment image, found by a hash of Patient ID and its issuer (never the ID itself)."""
    _run_script(c, PRIOR_STUDY_TABLES)


def _v5_unreported_prior_candidates(c: sqlite3.Connection) -> None:
    """The candidates each analysed study saw but did not report (JSON like ``nodules``): a later
    follow-up calls a nodule there neither new nor, when it goes unreported again, resolved."""
    c.execute("ALTER TABLE prior_studies ADD COLUMN unreported TEXT NOT NULL DEFAULT '[]'")


# Step n brings a store from version n-1 to n. Append new steps; never change an old one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_release_0_1_tables,
    _v2_outbox_by_study,
    _v3_feedback,
    _v4_prior_studies,
    _v5_unreported_prior_candidates,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreTooNew(ConfigurationError):
    """The store was written by a newer LungScreen, whose schema this one cannot read."""


def _run_script(c: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the surrounding transaction first; one statement at a time keeps it.
    for statement in script.split(";"):
        if statement.strip():
            c.execute(statement)


def _refuse_newer(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreTooNew(
            f"{path} has schema version {version}, written by a newer LungScreen; this one reads versions up to "
            f"{SCHEMA_VERSION}. Run the newer release, or restore the backup its upgrade left next to the file "
            f"({path.name}.v{SCHEMA_VERSION}.bak)"
        )


def check_store_version(path: Path) -> str:
    """What opening the store at ``path`` will do, read only; :class:`StoreTooNew` if it cannot."""
    if not path.exists():
        return f"a new store will be made at {path}"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    _refuse_newer(path, version)
    if version < SCHEMA_VERSION:
        return f"store {path} at schema version {version}: upgraded to {SCHEMA_VERSION} at start, after a backup"
    return f"store {path} at schema version {version}"


def backup_path(path: Path, version: int) -> Path:
    """Where the copy of a store at ``version`` goes before it is upgraded."""
    return path.with_name(f"{path.name}.v{version}.bak")


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
            self._upgrade()

    @property
    def schema_version(self) -> int:
        return self.query("PRAGMA user_version")[0][0]

    def _upgrade(self) -> None:
        """Bring the store to :data:`SCHEMA_VERSION`: refuse a newer one; copy an older one
        that holds data, then run the missing steps and record the version, in one transaction."""
        version = self.schema_version
        _refuse_newer(self.path, version)
        if version == SCHEMA_VERSION:
            return
        if self.query("SELECT 1 FROM sqlite_master LIMIT 1"):
            self._backup(backup_path(self.path, version))
        with self.transaction() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]  # another process may have upgraded it
            _refuse_newer(self.path, version)
            for step in MIGRATIONS[version:]:
                step(c)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _backup(self, target: Path) -> None:
        """A consistent copy in one file (SQLite's online backup, WAL included); an earlier copy is kept."""
        if target.exists():
            target = target.with_name(f"{target.name}.{int(time.time())}")
        with closing(sqlite3.connect(target)) as copy:
            self._conn.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")

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
