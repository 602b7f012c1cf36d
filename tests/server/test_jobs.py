"""Job store states, billing ledger and outbox, on a real SQLite file."""

import json

import pytest

from lungscreen.server.billing import CHARGE_RULE, BillingLedger, ExtensionEntry
from lungscreen.server.db import RELEASE_0_1_TABLES, Database
from lungscreen.server.jobs import DELIVERED, FAILED, MAX_INTERRUPTIONS, PROCESSING, QUEUED, RECEIVING, REPORTED, JobStore
from lungscreen.server.outbox import Outbox, RetryPolicy


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "db.sqlite")
    yield database
    database.close()


def receive(jobs, study="1.2.3", n=3, t=100.0, series="1.2.3.1"):
    for k in range(n):
        jobs.record_instance(study, series, f"{series}.{k}.{int(t)}", "1.2.840.10008.5.1.4.1.1.2", f"/x/{k}", now=t + k)


def test_quiet_period_is_restarted_by_each_instance(db):
    jobs = JobStore(db)
    receive(jobs, n=3, t=100.0)  # last instance at t=102
    assert jobs.queue_quiet_studies(5.0, now=106.9) == []
    assert jobs.get("1.2.3").state == RECEIVING
    assert jobs.queue_quiet_studies(5.0, now=107.0) == ["1.2.3"]
    assert jobs.get("1.2.3").state == QUEUED
    assert jobs.get("1.2.3").instances == 3


def test_identical_resend_changes_nothing_but_a_changed_instance_reruns(db):
    jobs = JobStore(db)
    receive(jobs, n=3, t=100.0)
    jobs.queue_quiet_studies(0.5, now=1e9)
    jobs.claim("1.2.3")
    jobs.finish("1.2.3", REPORTED)
    args = ("1.2.3", "1.2.3.1", "1.2.3.1.0.100", "1.2.840.10008.5.1.4.1.1.2", "/x/0")
    assert not jobs.record_instance(*args, content_changed=False)
    assert jobs.get("1.2.3").state == REPORTED and jobs.get("1.2.3").instances == 3
    assert jobs.record_instance(*args, content_changed=True)
    assert jobs.get("1.2.3").state == RECEIVING and jobs.get("1.2.3").instances == 3


def test_instance_whose_row_was_lost_is_recorded_on_resend(db):
    """A crash between the file write and the row commit: the identical re-send still counts."""
    jobs = JobStore(db)
    assert jobs.record_instance("1.2.3", "1.2.3.1", "1.2.3.1.7", "1.2.840.10008.5.1.4.1.1.2", "/x", content_changed=False)
    assert jobs.get("1.2.3").instances == 1


def test_deferred_instance_rows_commit_without_fsync_and_sync_makes_them_durable(db, tmp_path):
    full = 2  # PRAGMA synchronous=FULL
    jobs = JobStore(db)
    seen: list[str] = []
    db._conn.set_trace_callback(seen.append)
    jobs.record_instance("1.2.3", "1.2.3.1", "1.2.3.1.7", "1.2.840.10008.5.1.4.1.1.2", "/x", durable=False)
    deferred = seen[:]
    seen.clear()
    jobs.make_durable()
    db._conn.set_trace_callback(None)

    assert deferred[0] == "PRAGMA synchronous=NORMAL" and deferred[-1] == "PRAGMA synchronous=FULL"
    assert "COMMIT" in deferred
    assert db.query("PRAGMA synchronous")[0][0] == full, "other writes stay fully synchronous"
    assert not any("synchronous" in statement for statement in seen), "make_durable commits at FULL"
    assert db.query("SELECT count(*) FROM durability")[0][0] == 1
    # Committed either way: another connection sees the row.
    other = Database(tmp_path / "db.sqlite")
    try:
        assert other.query("SELECT study_uid FROM instances")[0][0] == "1.2.3"
    finally:
        other.close()


def test_run_lifecycle_and_rerun_after_late_instances(db):
    jobs = JobStore(db)
    receive(jobs)
    jobs.queue_quiet_studies(0.5, now=1e9)
    assert jobs.claim("1.2.3") == 1
    assert jobs.claim("1.2.3") is None, "a job is claimed once"
    receive(jobs, n=1, t=200.0, series="1.2.3.9")  # arrives while processing
    assert jobs.get("1.2.3").state == PROCESSING
    assert jobs.finish("1.2.3", REPORTED, details={"findings": []}) == RECEIVING
    jobs.queue_quiet_studies(0.5, now=1e9)
    assert jobs.claim("1.2.3") == 2
    assert jobs.finish("1.2.3", REPORTED) == REPORTED
    jobs.mark_delivered("1.2.3")
    assert jobs.get("1.2.3").state == DELIVERED
    receive(jobs, n=1, t=300.0, series="1.2.3.10")  # arrives after delivery: a new run
    assert jobs.get("1.2.3").state == RECEIVING


def test_interrupted_run_resumes_after_restart(db, tmp_path):
    jobs = JobStore(db)
    receive(jobs)
    jobs.queue_quiet_studies(0.5, now=1e9)
    jobs.claim("1.2.3")
    db.close()
    reopened = JobStore(Database(tmp_path / "db.sqlite"))
    assert reopened.resume_after_restart() == ["1.2.3"]
    assert reopened.get("1.2.3").state == QUEUED


def test_a_study_that_keeps_interrupting_the_server_fails_instead_of_looping(db, tmp_path):
    jobs = JobStore(db)
    receive(jobs)  # study 1.2.3 crashes the server each time it is analysed
    receive(jobs, study="4.5.6", series="4.5.6.1")  # an ordinary study, interrupted once
    jobs.queue_quiet_studies(0.5, now=1e9)
    jobs.claim("4.5.6")
    jobs.finish("4.5.6", REPORTED)
    for restart in range(1, MAX_INTERRUPTIONS + 1):
        assert jobs.claim("1.2.3") is not None
        resumed = jobs.resume_after_restart()
        if restart < MAX_INTERRUPTIONS:
            assert resumed == ["1.2.3"] and jobs.get("1.2.3").state == QUEUED
    job = jobs.get("1.2.3")
    assert resumed == [] and job.state == FAILED
    assert f"interrupted by {MAX_INTERRUPTIONS} server restarts" in job.reason
    assert jobs.get("4.5.6").state == REPORTED
    assert jobs.request_rerun("1.2.3"), "a person can try again"
    jobs.claim("1.2.3")
    assert jobs.resume_after_restart() == ["1.2.3"], "with the full allowance of restarts"


def test_a_finished_run_clears_the_interruptions(db):
    jobs = JobStore(db)
    receive(jobs)
    jobs.queue_quiet_studies(0.5, now=1e9)
    for _ in range(MAX_INTERRUPTIONS - 1):
        jobs.claim("1.2.3")
        jobs.resume_after_restart()
    jobs.claim("1.2.3")
    jobs.finish("1.2.3", REPORTED)
    receive(jobs, n=1, t=500.0, series="1.2.3.2")
    jobs.queue_quiet_studies(0.5, now=1e9)
    jobs.claim("1.2.3")
    assert jobs.resume_after_restart() == ["1.2.3"]


def test_a_database_from_before_the_interruption_counter_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(RELEASE_0_1_TABLES.replace("    interruptions INTEGER NOT NULL DEFAULT 0,\n", ""))
    old.execute("INSERT INTO jobs (study_uid, state, updated_at) VALUES ('1.2.3', 'processing', 0)")
    old.commit()
    old.close()
    jobs = JobStore(Database(path))
    assert jobs.resume_after_restart() == ["1.2.3"]


def test_failure_keeps_its_reason_and_rejections_are_visible(db):
    jobs = JobStore(db)
    jobs.record_rejection("1.2.3", "MODALITY", "SOPInstanceUID is not a valid DICOM UID: '../x'")
    job = jobs.get("1.2.3")
    assert job.state == RECEIVING and job.rejected_instances == 1 and job.instances == 0
    assert "not a valid DICOM UID" in jobs.rejections("1.2.3")[0]["reason"]
    jobs.queue_quiet_studies(0.5, now=1e12)
    jobs.claim("1.2.3")
    jobs.finish("1.2.3", FAILED, reason="no CT image was stored for this study")
    assert jobs.get("1.2.3").reason == "no CT image was stored for this study"


def test_billing_has_one_extension_entry_per_accession_and_main_item(db):
    ledger = BillingLedger(db)
    entry = ExtensionEntry("ACC1", ("71250", "C4", "CT chest"), ("AI", "99X", "AI ext"), "1.2.3", "1.2.3.100")
    assert ledger.record(entry)
    assert not ledger.record(ExtensionEntry("ACC1", ("71250", "C4", "CT chest"), ("AI", "99X", "AI ext"), "1.2.3", "1.2.3.101"))
    assert ledger.record(ExtensionEntry("ACC2", ("71250", "C4", "CT chest"), ("AI", "99X", "AI ext"), "1.2.4", "1.2.4.1"))
    rows = json.loads(ledger.export("json"))
    assert [r["accession_number"] for r in rows] == ["ACC1", "ACC2"]
    assert rows[0]["report_sop_uid"] == "1.2.3.100" and rows[0]["charge"] == CHARGE_RULE
    assert "amount" not in rows[0] and "price" not in rows[0]
    csv_text = ledger.export("csv")
    assert csv_text.splitlines()[0].startswith("accession_number,main_item_code")
    assert len(csv_text.splitlines()) == 3
    with pytest.raises(ValueError, match="accession number"):
        ExtensionEntry("", ("a", "b", "c"), ("a", "b", "c"), "1.2", "1.2.3")


def test_outbox_backoff_then_dead_letter(db):
    outbox = Outbox(db, RetryPolicy(max_attempts=3, base_delay_s=1.0))
    outbox.enqueue("1.2.3", "1.2.3.100", "/r.dcm", ["A@127.0.0.1:1", "B@127.0.0.1:2"])
    outbox.enqueue("1.2.3", "1.2.3.100", "/r.dcm", ["A@127.0.0.1:1"])  # idempotent
    items = outbox.due()
    assert len(items) == 2
    assert outbox.count_by_state() == {"pending": 2, "sent": 0, "dead": 0}
    a = items[0]
    assert outbox.mark_failed(a, "refused", permanent=False) == "pending"
    assert [i.destination for i in outbox.due()] == ["B@127.0.0.1:2"], "A waits for its backoff"
    def due_for(prefix):
        return [i for i in outbox.due(now=1e12) if i.destination.startswith(prefix)][0]

    assert outbox.mark_failed(due_for("A"), "refused", permanent=False) == "pending"
    assert outbox.mark_failed(due_for("A"), "refused", permanent=False) == "dead"
    assert outbox.mark_failed(due_for("B"), "status 0xA900", permanent=True) == "dead"
    assert outbox.due(now=1e13) == []
    assert not outbox.all_sent("1.2.3")
    assert outbox.count_by_state() == {"pending": 0, "sent": 0, "dead": 2}
    assert RetryPolicy(base_delay_s=2, max_delay_s=10).delay(1) == 2
    assert RetryPolicy(base_delay_s=2, max_delay_s=10).delay(3) == 8
    assert RetryPolicy(base_delay_s=2, max_delay_s=10).delay(9) == 10
    jittered = RetryPolicy(base_delay_s=2, max_delay_s=10, jitter=0.5)
    assert jittered.wait(3, uniform=lambda: 0.0) == 8 and jittered.wait(3, uniform=lambda: 1.0) == 4
    waits = {RetryPolicy().wait(3) for _ in range(20)}
    assert len(waits) > 1 and all(4 <= w <= 8 for w in waits), "two reports failing together retry apart"


def test_nested_transactions_commit_together_or_not_at_all(db):
    jobs = JobStore(db)
    ledger = BillingLedger(db)
    with pytest.raises(RuntimeError):
        with db.transaction():
            receive(jobs)
            ledger.record(ExtensionEntry("ACC1", ("a", "b", "c"), ("d", "e", "f"), "1.2.3", "1.2.3.1"))
            raise RuntimeError("crash in the middle")
    assert jobs.get("1.2.3") is None and ledger.rows() == []


def test_non_ct_study_gets_a_failed_job_but_never_overrides_a_ct_job(db):
    jobs = JobStore(db)
    jobs.record_ignored("1.2.9", "MR Image Storage")
    assert jobs.get("1.2.9").state == FAILED and "not a CT study" in jobs.get("1.2.9").reason
    receive(jobs, study="1.2.3")
    jobs.record_ignored("1.2.3", "Comprehensive SR Storage")
    assert jobs.get("1.2.3").state == RECEIVING and jobs.get("1.2.3").reason is None
    receive(jobs, study="1.2.9", series="1.2.9.1")
    assert jobs.get("1.2.9").state == RECEIVING, "CT images arriving later start a normal job"


def test_pipeline_errors_survive_the_trip_from_a_worker_process():
    import pickle

    from lungscreen.errors import VolumeError
    from lungscreen.dicom_io.select import RejectionCode, SeriesRejection
    from lungscreen.server.pipeline import NoEligibleSeries

    rejection = SeriesRejection("1.2.3", "scout", RejectionCode.LOCALIZER, "localizer images")
    error = NoEligibleSeries((rejection,), ("unreadable file x.dcm",))
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.rejected == error.rejected
    assert str(pickle.loads(pickle.dumps(VolumeError("gap")))) == "gap"


def test_a_dead_report_fails_its_job_but_a_dead_assessment_does_not(db, tmp_path):
    jobs = JobStore(db)
    receive(jobs)
    jobs.queue_quiet_studies(0.5, now=1e9)
    run = jobs.claim("1.2.3")
    jobs.record_report("1.2.3.900", "1.2.3", run, tmp_path / "sr.dcm")
    jobs.finish("1.2.3", REPORTED)
    # A radiologist's assessment sent for the study (not one of its reports) never got through.
    jobs.mark_delivery_failed("1.2.3", "1.2.3.901", "delivery to PACS@host:104 dead-lettered")
    assert jobs.get("1.2.3").state == REPORTED
    jobs.mark_delivery_failed("1.2.3", "1.2.3.900", "delivery to PACS@host:104 dead-lettered")
    assert (jobs.get("1.2.3").state, jobs.get("1.2.3").reason) == (FAILED, "delivery to PACS@host:104 dead-lettered")
