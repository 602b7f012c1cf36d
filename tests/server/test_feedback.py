"""Radiologists' verdicts: the store, the review page (signed in), viewer SRs through the
DICOM listener, and the site's figures."""

from __future__ import annotations

import highdicom as hd
import pytest
from pydicom.uid import generate_uid

from lungscreen.models.card import BLOB_FILTER_CARD
from lungscreen.server.config import load_settings
from lungscreen.server.db import Database
from lungscreen.server.feedback import (
    ACCEPTED, REJECTED, REVIEW_PAGE, FeedbackError, FeedbackStore, StudyResult,
)
from lungscreen.server.pipeline import analyze_study
from lungscreen.server.retention import purge_feedback
from lungscreen.training.dicom_writer import write_ct_series
from test_pipeline import SPACING, phantom

# Three solid nodules the blob filter reports: 10 mm (4A), 7 mm (3), 5 mm (2).
SPHERES = (((20, 36, 36), 10.0), ((20, 92, 92), 7.0), ((20, 36, 92), 5.0))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A phantom study analysed by the real pipeline (blob-filter model): (study, result)."""
    from lungscreen.server.workers import build_analyzer

    analyzer = build_analyzer(load_settings(model=BLOB_FILTER_CARD, data_dir=tmp_path_factory.mktemp("data")))
    study = write_ct_series(phantom(spheres=SPHERES), SPACING, tmp_path_factory.mktemp("study"),
                            study_instance_uid=generate_uid())
    return study, analyze_study(study.paths, analyzer)


def study_result(result) -> StudyResult:
    details = {
        "sr_sop_uid": str(result.sr.SOPInstanceUID), "model": f"{result.report.model_name} {result.report.model_version}",
        "operating_point": result.report.operating_point, "score_threshold": result.report.score_threshold,
        "findings": list(result.findings),
    }
    return StudyResult.from_job(result.study_uid, details)


def test_findings_rows_carry_the_tracking_uids_of_the_sr(analysed):
    _, result = analysed
    groups = hd.sr.ComprehensiveSR.from_dataset(result.sr).content.get_planar_roi_measurement_groups()
    assert len(result.findings) == 3
    assert [row["tracking_uid"] for row in result.findings] == [str(g.tracking_uid) for g in groups]


def test_verdicts_record_who_when_and_what_was_judged_and_the_latest_counts(analysed, tmp_path):
    _, result = analysed
    store = FeedbackStore(Database(tmp_path / "db.sqlite"))
    found = study_result(result)
    first, second, _ = found.tracking_uids
    store.record_verdict(found, first, REJECTED, reviewer="Dr A", source=REVIEW_PAGE, now=100.0)
    store.record_verdict(found, first, ACCEPTED, reviewer="Dr B", source=REVIEW_PAGE, now=200.0)
    store.record_verdict(found, second, REJECTED, reviewer="Dr A", source=REVIEW_PAGE, now=150.0)
    latest = {v.finding.tracking_uid: v for v in store.verdicts(result.study_uid)}
    assert latest[first].verdict == ACCEPTED and latest[first].reviewer == "Dr B" and latest[first].at == 200.0
    assert latest[second].verdict == REJECTED
    judged = latest[first].finding
    row = result.findings[0]
    assert (judged.probability, judged.lung_rads, judged.diameter_mm) == (row["probability"], row["lung_rads"], row["diameter_mm"])
    assert judged.operating_point == "screening" and judged.sr_sop_uid == str(result.sr.SOPInstanceUID)
    assert [v.reviewer for v in store.verdict_history(result.study_uid)] == ["Dr A", "Dr A", "Dr B"]

    missed = store.record_missed(found, (10.0, -20.0, 30.0), 6.5, reviewer="Dr A", source=REVIEW_PAGE, now=300.0)
    assert store.missed(result.study_uid) == [missed] and missed.center_lps_mm == (10.0, -20.0, 30.0)

    with pytest.raises(FeedbackError, match="no finding with tracking UID"):
        store.record_verdict(found, "1.2.3", ACCEPTED, reviewer="Dr A", source=REVIEW_PAGE)
    with pytest.raises(FeedbackError, match="verdict must be one of"):
        store.record_verdict(found, first, "maybe", reviewer="Dr A", source=REVIEW_PAGE)
    with pytest.raises(FeedbackError, match="reviewer's name"):
        store.record_verdict(found, first, ACCEPTED, reviewer=" ", source=REVIEW_PAGE)
    with pytest.raises(FeedbackError, match="between 0 and 200 mm"):
        store.record_missed(found, (0.0, 0.0, 0.0), -1.0, reviewer="Dr A", source=REVIEW_PAGE)

    assert purge_feedback(store.db, 180.0, now=400.0) == 3, "the three verdicts made before 220 s go"
    assert not store.verdicts(result.study_uid) and store.missed(result.study_uid) == [missed]
    assert purge_feedback(store.db, 0.0, now=400.0) == 1 and not store.missed(result.study_uid)
