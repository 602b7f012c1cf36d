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
