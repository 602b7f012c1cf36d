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


# --- the review page, signed in ------------------------------------------------------------

REVIEWER, SECRET = "Dr Wang", "correct horse battery"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server (blob-filter model) with a configured reviewer, for the HTTP and DICOM tests."""
    from peers import LungScreen
    from lungscreen.server.reviewers import hash_secret

    tmp = tmp_path_factory.mktemp("server")
    config = tmp / "reviewers.toml"
    config.write_text(f'min_free_mb = 16\n[reviewers]\n"{REVIEWER}" = "{hash_secret(SECRET)}"\n"Dr Li" = "{hash_secret("another secret")}"\n')
    server = LungScreen(tmp, idle_seconds=0.5, extra_args=["--config", str(config)])
    with server.running():
        yield server


def reported_study(server, tmp_path, spheres=SPHERES) -> tuple[str, dict]:
    from peers import storescu
    from test_end_to_end import phantom_study

    study = phantom_study(tmp_path / "study", spheres=spheres)
    storescu(list(study.paths), server.port)
    job = server.wait_for_state(study.study_instance_uid, ("reported", "delivered"), timeout=90)
    return study.study_instance_uid, job


def http(server, method: str, path: str, form: dict | None = None, cookie: str | None = None):
    """One request, redirects not followed: (status, headers, body text)."""
    import http.client
    from urllib.parse import urlencode

    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    if cookie:
        headers["Cookie"] = cookie
    connection.request(method, path, body=urlencode(form) if form is not None else None, headers=headers)
    response = connection.getresponse()
    body = response.read().decode("utf-8", "replace")
    connection.close()
    return response.status, response.headers, body


def csrf_token(page: str) -> str:
    import re

    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def sign_in(server, name=REVIEWER, secret=SECRET) -> str:
    status, headers, _ = http(server, "POST", "/review/sign-in", {"name": name, "secret": secret, "next": "/review"})
    assert status == 303, status
    return headers["Set-Cookie"].split(";")[0]


@pytest.mark.slow
def test_review_page_verdicts_need_a_signed_in_reviewer_and_the_session_token(server, tmp_path):
    uid, job = reported_study(server, tmp_path)
    findings = job["details"]["findings"]
    assert len(findings) == 3 and all(f["tracking_uid"] for f in findings)
    first, second, third = (f["tracking_uid"] for f in findings)

    status, _, page = http(server, "GET", f"/review/{uid}")
    assert status == 200 and 'id="verdicts"' in page and "not judged" in page and "csrf_token" not in page
    assert http(server, "POST", f"/review/{uid}/verdict", {"tracking_uid": first, "verdict": "accepted"})[0] == 403
    status, _, page = http(server, "POST", "/review/sign-in", {"name": REVIEWER, "secret": "wrong secret", "next": "/review"})
    assert status == 401 and "wrong secret" in page
    assert http(server, "POST", "/review/sign-in", {"name": "Dr Nobody", "secret": SECRET})[0] == 401
    assert http(server, "POST", "/review/sign-in", {"name": "Dr Li", "secret": SECRET})[0] == 401, "another's secret"

    cookie = sign_in(server)
    assert "HttpOnly" in http(server, "POST", "/review/sign-in", {"name": REVIEWER, "secret": SECRET})[1]["Set-Cookie"]
    status, _, page = http(server, "GET", f"/review/{uid}", cookie=cookie)
    token = csrf_token(page)
    assert f"Signed in as {REVIEWER}" in page
    vote = {"tracking_uid": first, "verdict": "accepted"}
    assert http(server, "POST", f"/review/{uid}/verdict", vote, cookie=cookie)[0] == 403, "no token: forged form"
    assert http(server, "POST", f"/review/{uid}/verdict", {**vote, "csrf_token": "x" * 43}, cookie=cookie)[0] == 403
    other = sign_in(server, "Dr Li", "another secret")
    assert http(server, "POST", f"/review/{uid}/verdict", {**vote, "csrf_token": token}, cookie=other)[0] == 403, \
        "a token is good for its own session only"

    for tracking_uid, verdict in ((first, "accepted"), (second, "rejected"), (third, "accepted"), (third, "rejected")):
        status, headers, _ = http(server, "POST", f"/review/{uid}/verdict",
                                  {"tracking_uid": tracking_uid, "verdict": verdict, "csrf_token": token}, cookie=cookie)
        assert status == 303 and headers["Location"].startswith(f"/review/{uid}")
    missed = {"x_mm": "-12.5", "y_mm": "8", "z_mm": "25", "diameter_mm": "6.5", "csrf_token": token}
    assert http(server, "POST", f"/review/{uid}/missed", missed, cookie=cookie)[0] == 303
    assert http(server, "POST", f"/review/{uid}/verdict", {"tracking_uid": "1.2.3", "verdict": "accepted",
                                                            "csrf_token": token}, cookie=cookie)[0] == 400
    assert http(server, "POST", f"/review/{uid}/missed", {**missed, "diameter_mm": "big"}, cookie=cookie)[0] == 400

    status, _, page = http(server, "GET", f"/review/{uid}")
    import re
    shown = {n: (verdict, by) for n, verdict, by in re.findall(
        r'<tr id="verdict-(\d)">.*?class="verdict-(\w+)">\w+</td><td>([^<]+)</td>', page)}
    assert shown == {"1": ("accepted", REVIEWER), "2": ("rejected", REVIEWER), "3": ("rejected", REVIEWER)}
    assert page.count(f"<td>{REVIEWER}</td>") == 4 and "review page" in page  # 3 verdicts and the missed nodule
    assert "-12.5, 8.0, 25.0" in page and "6.5" in page

    status, headers, _ = http(server, "POST", "/review/sign-out", {"csrf_token": token}, cookie=cookie)
    assert status == 303
    assert http(server, "POST", f"/review/{uid}/verdict", {**vote, "csrf_token": token}, cookie=cookie)[0] == 403
    assert REVIEWER not in server.log() and "rejected" not in server.log(), "verdicts never reach the log"
