"""Upgrades that keep data: a store written by release 0.1.0 (tests/server/fixtures, made by that
release's own code) is copied and upgraded in one transaction at start-up, keeping every job,
billing entry and undelivered report; a store from a newer release is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from lungscreen.server.billing import BillingLedger
from lungscreen.server.db import MIGRATIONS, SCHEMA_VERSION, Database, StoreTooNew, backup_path
from lungscreen.server.jobs import JobStore
from lungscreen.server.outbox import Outbox
from peers import LungScreen, needs_binary, needs_netns, storescp

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0-store.sql"
STATES = {
    "2.25.10001": "receiving", "2.25.10002": "queued", "2.25.10003": "processing", "2.25.10004": "reported",
    "2.25.10005": "delivered", "2.25.10006": "failed", "2.25.10007": "failed",
}
PENDING_SR = ("2.25.10004", "2.25.10004.9", "2.25.10004.9.1")  # study, series, SOP instance
DESTINATION_PORT = 11190  # the destination the fixture's outbox rows name


def release_0_1_store(folder: Path) -> Path:
    path = folder / "data" / "lungscreen.sqlite"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(FIXTURE.read_text())
    return path


def rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table of release 0.1.0, in a stable order."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = ("jobs", "instances", "rejections", "reports", "outbox", "billing", "durability")
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def schema(path: Path) -> set[tuple]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return set(conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))


def user_version(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def test_a_release_0_1_store_is_upgraded_and_keeps_every_job_billing_entry_and_pending_report(tmp_path):
    path = release_0_1_store(tmp_path)
    before = rows(path)
    assert user_version(path) == 0  # release 0.1.0 recorded no version
    db = Database(path)
    try:
        assert db.schema_version == SCHEMA_VERSION
        jobs = JobStore(db)
        assert {job.study_uid: job.state for job in jobs.list()} == STATES
        assert "dead-lettered" in jobs.get("2.25.10007").reason
        assert [r["accession_number"] for r in BillingLedger(db).rows()] == ["ACC4", "ACC5", "ACC7"]
        outbox = Outbox(db)
        assert outbox.count_by_state() == {"pending": 1, "sent": 1, "dead": 1}
        (pending,) = outbox.due(now=4e9)
        assert (pending.study_uid, pending.report_sop_uid) == (PENDING_SR[0], PENDING_SR[2])
        assert jobs.rejections("2.25.10001")[0]["calling_ae"] == "MODALITY"
    finally:
        db.close()
    assert rows(path) == before  # every row as it was
    backup = backup_path(path, 0)
    assert backup.name == "lungscreen.sqlite.v0.bak"
    assert user_version(backup) == 0 and rows(backup) == before
    Database(path).close()  # opening an up-to-date store changes nothing and copies nothing
    assert sorted(p.name for p in path.parent.iterdir() if ".bak" in p.name) == [backup.name]


def test_an_upgraded_store_has_the_schema_of_a_new_one(tmp_path):
    Database(tmp_path / "new.sqlite").close()
    upgraded = release_0_1_store(tmp_path)
    Database(upgraded).close()
    assert schema(upgraded) == schema(tmp_path / "new.sqlite")


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_each_version_upgrades_to_the_current_one(tmp_path, version):
    """A store left at any earlier version by a release in between (the steps up to it run
    and recorded) is brought to the current schema: a new step only has to follow the last."""
    path = tmp_path / "store.sqlite"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        for step in MIGRATIONS[:version]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    Database(path).close()
    Database(tmp_path / "new.sqlite").close()
    assert user_version(path) == SCHEMA_VERSION and schema(path) == schema(tmp_path / "new.sqlite")
    assert backup_path(path, version).exists()


def test_a_store_from_a_newer_release_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "data" / "lungscreen.sqlite"
    Database(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreTooNew, match=rf"has schema version {SCHEMA_VERSION + 1}, written by a newer LungScreen"):
        Database(path)
    assert user_version(path) == SCHEMA_VERSION + 1
    assert not [p for p in path.parent.iterdir() if ".bak" in p.name]
    result = subprocess.run([sys.executable, "-m", "lungscreen", "jobs", "--data-dir", str(path.parent)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "written by a newer LungScreen" in result.stderr


def stand_in_sr(path: Path) -> None:
    """The report file the fixture's outbox row points to. The dump holds the rows, not the
    files; a minimal Comprehensive SR with the row's UIDs stands in for release 0.1.0's SR."""
    study, series, sop = PENDING_SR
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, study, series
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.slow
@needs_netns
@needs_binary("storescp")
def test_the_upgraded_server_delivers_the_report_release_0_1_left_pending(tmp_path, monkeypatch):
    store = release_0_1_store(tmp_path)
    stand_in_sr(tmp_path / "data" / "reports" / PENDING_SR[0] / PENDING_SR[1] / f"{PENDING_SR[2]}.dcm")
    monkeypatch.chdir(tmp_path)  # the fixture's paths are relative to the server's working folder
    received = tmp_path / "received"
    with storescp(received, DESTINATION_PORT, log_path=tmp_path / "storescp.log"):
        server = LungScreen(tmp_path, idle_seconds=60)
        with server.running():
            job = server.wait_for_state(PENDING_SR[0], ("delivered",), timeout=60)
    assert job["deliveries"][0]["state"] == "sent"
    (sr,) = received.glob("SR*")
    assert dcmread(sr).SOPInstanceUID == PENDING_SR[2]
    assert backup_path(store, 0).exists()
