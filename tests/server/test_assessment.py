"""Verdicts sent back as an assessment SR (dicom_io/assessment.py): the document, its
validation, and the round trip from the review page of a running server to a DICOM destination."""

from __future__ import annotations

import datetime
from io import BytesIO

import pydicom
import pytest

from lungscreen.dicom_io.assessment import (
    ACCEPTED_CODE,
    REJECTED_CODE,
    Assessment,
    FindingAssessment,
    build_assessment,
)
from lungscreen.errors import ReportError
from lidc_reports import dciodvfy, pixelmed_sr
from peers import needs_netns
from test_feedback import analysed  # noqa: F401  (module fixture: a phantom study analysed by the real pipeline)

UTC = datetime.timezone.utc
AT = datetime.datetime(2026, 12, 2, 3, 40, 5, tzinfo=UTC)


def assessments_of(result) -> list[FindingAssessment]:
    rows = [row for row in result.findings if row["outlined"]]
    return [
        FindingAssessment(row["tracking_uid"], f"Nodule {n}", Assessment.ACCEPTED if n == 1 else Assessment.REJECTED,
                          AT + datetime.timedelta(seconds=n))
        for n, row in enumerate(rows, start=1)
    ]


def groups(sr) -> dict[str, dict]:
    """Tracking UID -> {"verdict": code value, "at": Observation DateTime} of each group."""
    out = {}
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    for group in measurements.ContentSequence:
        items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}
        verdict = items["AI-ASSESSMENT"]
        out[str(items["112040"].UID)] = {
            "verdict": verdict.ConceptCodeSequence[0].CodeValue, "at": str(verdict.ObservationDateTime),
            "identifier": str(items["112039"].TextValue),
        }
    return out


def person_observer(sr) -> str:
    return next(i.PersonName.family_name for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121008")


def test_the_assessment_references_the_ai_sr_and_carries_each_verdict_the_reviewer_and_the_time(analysed, tmp_path):  # noqa: F811
    _, result = analysed
    ai_sr = result.sr
    assessments = assessments_of(result)
    assert len(assessments) >= 2
    sr = build_assessment(ai_sr, assessments, reviewer="Dr Wang", manufacturer="LungScreen project", software_version="0.1")
    path = tmp_path / "assessment.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == ai_sr.StudyInstanceUID and back.PatientID == ai_sr.PatientID
    assert back.SeriesInstanceUID != ai_sr.SeriesInstanceUID and back.Modality == "SR"
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [e.ReferencedSOPInstanceUID for e in evidence] == [ai_sr.SOPInstanceUID]
    assert person_observer(back) == "Dr Wang"
    assert groups(back) == {
        a.tracking_uid: {
            "verdict": (ACCEPTED_CODE if a.assessment is Assessment.ACCEPTED else REJECTED_CODE).value,
            "at": a.at.strftime("%Y%m%d%H%M%S+0000"), "identifier": f"{a.tracking_id} assessment",
        }
        for a in assessments
    }
    # The IOD (dciodvfy) and TID 1500 (PixelMed) are checked, with no error. PixelMed's only
    # warning is the group's qualitative evaluation (TID 1501 row 11), which its template tables
    # do not reach (as for the AI SR's, see dicom_io/sr.py): one per group.
    dciodvfy(path)
    warnings = pixelmed_sr(path)
    assert len(warnings) == len(assessments), warnings
    assert all('CODE (AI-ASSESSMENT,99LUNGSCR,"AI result assessment"): Content Item not in template' in w
               for w in warnings), warnings


def test_bad_arguments_are_refused_with_clear_errors(analysed):  # noqa: F811
    _, result = analysed
    good = assessments_of(result)[0]
    with pytest.raises(ValueError, match="tracking_uid"):
        FindingAssessment("not a uid", "Nodule 1", Assessment.ACCEPTED, AT)
    with pytest.raises(ValueError, match="timezone"):
        FindingAssessment(good.tracking_uid, "Nodule 1", Assessment.ACCEPTED, datetime.datetime(2026, 1, 1))
    with pytest.raises(TypeError, match="Assessment"):
        FindingAssessment(good.tracking_uid, "Nodule 1", "accepted", AT)
    build = dict(manufacturer="LungScreen project", software_version="0.1")
    with pytest.raises(ValueError, match="reviewer"):
        build_assessment(result.sr, [good], reviewer="Wang^Li", **build)
    with pytest.raises(ValueError, match="empty"):
        build_assessment(result.sr, [], reviewer="Dr Wang", **build)
    with pytest.raises(ValueError, match="once"):
        build_assessment(result.sr, [good, good], reviewer="Dr Wang", **build)
    with pytest.raises(ReportError, match="no finding"):
        other = FindingAssessment(pydicom.uid.generate_uid(), "Nodule 9", Assessment.REJECTED, AT)
        build_assessment(result.sr, [other], reviewer="Dr Wang", **build)
    buffer = BytesIO()
    result.sr.save_as(buffer)
    ct_like = pydicom.dcmread(BytesIO(buffer.getvalue()))
    ct_like.Modality = "CT"
    with pytest.raises(ReportError, match="not an SR"):
        build_assessment(ct_like, [good], reviewer="Dr Wang", **build)


def received_assessments(folder) -> list:
    from lungscreen.dicom_io.assessment import SERIES_DESCRIPTION

    found = [pydicom.dcmread(p) for p in sorted(folder.glob("SR*"))]
    return sorted((d for d in found if d.get("SeriesDescription") == SERIES_DESCRIPTION), key=lambda d: d.InstanceNumber)


@pytest.mark.slow
@needs_netns
def test_review_page_verdicts_reach_the_destination_as_an_assessment_and_coming_back_are_ignored(tmp_path):
    """Signed in on the review page of a running server, a reviewer's verdicts end at a real
    DICOM destination (dcmtk storescp) as an assessment SR of the study that references the AI
    SR, tracks each outlined finding and names the reviewer; sent back, it is no viewer SR."""
    from lungscreen.server.db import Database
    from lungscreen.server.feedback import FeedbackStore
    from lungscreen.server.reviewers import hash_secret
    from peers import LungScreen, free_port, storescp, storescu, wait_until
    from test_feedback import REVIEWER, SECRET, csrf_token, http, reported_study, sign_in

    dest_port = free_port()
    received = tmp_path / "received"
    config = tmp_path / "lungscreen.toml"
    config.write_text(f'min_free_mb = 16\n[reviewers]\n"{REVIEWER}" = "{hash_secret(SECRET)}"\n')
    with storescp(received, dest_port, "DEST", log_path=tmp_path / "storescp.log"):
        server = LungScreen(tmp_path / "server", destinations=[f"DEST@127.0.0.1:{dest_port}"], idle_seconds=0.5,
                            extra_args=["--config", str(config)])
        with server.running():
            uid, job = reported_study(server, tmp_path)
            job = server.wait_for_state(uid, ("delivered",), timeout=60)
            findings = job["details"]["findings"]
            outlined = [f["tracking_uid"] for f in findings if f["outlined"]]
            listed = [f["tracking_uid"] for f in findings if not f["outlined"]]
            assert len(outlined) == 2 and len(listed) == 1, findings
            cookie = sign_in(server)
            token = csrf_token(http(server, "GET", f"/review/{uid}", cookie=cookie)[2])
            votes = ((outlined[0], "accepted"), (outlined[1], "rejected"), (listed[0], "rejected"))
            for tracking_uid, verdict in votes:
                status, _, _ = http(server, "POST", f"/review/{uid}/verdict",
                                    {"tracking_uid": tracking_uid, "verdict": verdict, "csrf_token": token}, cookie=cookie)
                assert status == 303
            # One document per recorded verdict on an outlined finding, each with all of the
            # reviewer's current verdicts; the verdict on the listed finding (no measurement
            # group in the AI SR to track) is kept in the store only, so it makes none.
            try:
                documents = wait_until(lambda: d if len(d := received_assessments(received)) >= 2 else None, 30,
                                       what="two assessments at storescp")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\nlog:\n{server.log()[-4000:]}") from None
            assert len(documents) == 2, [d.SOPInstanceUID for d in documents]
            latest = documents[-1]
            assert latest.StudyInstanceUID == uid and latest.InstanceNumber == 2
            evidence = latest.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            assert [e.ReferencedSOPInstanceUID for e in evidence.ReferencedSOPSequence] == [job["details"]["sr_sop_uid"]]
            assert person_observer(latest) == REVIEWER
            verdicts = groups(latest)
            assert {u: v["verdict"] for u, v in verdicts.items()} == {
                outlined[0]: ACCEPTED_CODE.value, outlined[1]: REJECTED_CODE.value}
            assert {v["identifier"] for v in verdicts.values()} == {"Nodule 1 assessment", "Nodule 2 assessment"}
            assert all(v["at"].startswith(datetime.datetime.now(UTC).strftime("%Y%m%d")) for v in verdicts.values())
            assert list(groups(documents[0])) == [outlined[0]]
            dciodvfy(next(p for p in received.glob("SR*") if pydicom.dcmread(p).SOPInstanceUID == latest.SOPInstanceUID))

            # A PACS forwarding it back: LungScreen knows it as its own (loop guard), no verdicts.
            back = next(p for p in received.glob("SR*") if pydicom.dcmread(p).SOPInstanceUID == latest.SOPInstanceUID)
            storescu([back], server.port)
            wait_until(lambda: "1 other object(s) ignored" in server.log(), 20, what="the association's log line")
            store = FeedbackStore(Database(server.data_dir / "lungscreen.sqlite"))
            assert latest.SOPInstanceUID not in {r.sop_uid for r in store.viewer_reports()}
            assert server.study(uid)["runs"] == 1


@pytest.mark.slow
def test_with_send_assessments_off_a_verdict_queues_nothing(tmp_path):
    """``send_assessments = false``: the verdict is recorded, no assessment is queued (the
    destination is configured, so only the setting holds it back; the POST queues synchronously,
    so the outbox right after it answers says all)."""
    from lungscreen.server.db import Database
    from lungscreen.server.feedback import FeedbackStore
    from lungscreen.server.reviewers import hash_secret
    from peers import LungScreen, free_port
    from test_feedback import REVIEWER, SECRET, csrf_token, http, reported_study, sign_in

    config = tmp_path / "lungscreen.toml"
    config.write_text(f'min_free_mb = 16\nsend_assessments = false\n[reviewers]\n"{REVIEWER}" = "{hash_secret(SECRET)}"\n')
    unreachable = f"DEST@127.0.0.1:{free_port()}"  # nothing listens: deliveries wait for retries
    server = LungScreen(tmp_path / "server", destinations=[unreachable], idle_seconds=0.5, extra_args=["--config", str(config)])
    with server.running():
        uid, job = reported_study(server, tmp_path)
        outlined = [f["tracking_uid"] for f in job["details"]["findings"] if f["outlined"]]
        cookie = sign_in(server)
        token = csrf_token(http(server, "GET", f"/review/{uid}", cookie=cookie)[2])
        status, _, _ = http(server, "POST", f"/review/{uid}/verdict",
                            {"tracking_uid": outlined[0], "verdict": "accepted", "csrf_token": token}, cookie=cookie)
        assert status == 303
        db = Database(server.data_dir / "lungscreen.sqlite")
        assert [v.verdict for v in FeedbackStore(db).verdicts(uid)] == ["accepted"]
        queued = {r["report_sop_uid"] for r in db.query("SELECT report_sop_uid FROM outbox WHERE study_uid = ?", (uid,))}
        assert queued == {job["details"]["sr_sop_uid"], job["details"]["gsps_sop_uid"]}
