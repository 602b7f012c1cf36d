"""The site's ``outline_categories`` setting, from the configuration file to the SR, the GSPS,
findings.json / ``GET /studies/<uid>`` rows and the review page (synthetic study of
tests/server/test_pipeline.py: a 10 mm Lung-RADS 4A nodule and a 5 mm Lung-RADS 2 one)."""

from __future__ import annotations

import re

import pytest
from pydicom.uid import generate_uid

from lidc_reports import validate_sr
from lungscreen.dicom_io.outline import DEFAULT_OUTLINE_CATEGORIES
from lungscreen.dicom_io.sr import OHIF_FREEHAND_TRACKING
from lungscreen.models.card import BLOB_FILTER_CARD
from lungscreen.server.commit import job_details
from lungscreen.server.config import load_settings
from lungscreen.server.pipeline import analyze_study
from lungscreen.server.review import render_study
from lungscreen.server.workers import build_analyzer
from lungscreen.training.dicom_writer import write_ct_series
from test_pipeline import SPACING, phantom


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_ct_series(phantom(), SPACING, tmp_path_factory.mktemp("study"), study_instance_uid=generate_uid())


def _run(study, tmp_path, config: str = ""):
    config_file = tmp_path / "lungscreen.toml"
    config_file.write_text(config)
    settings = load_settings(config_file, model=BLOB_FILTER_CARD, data_dir=tmp_path / "data")
    result = analyze_study(study.paths, build_analyzer(settings))
    sr_path = tmp_path / "sr.dcm"
    result.sr.save_as(sr_path, enforce_file_format=True)
    page = render_study(
        {"study_uid": result.study_uid, "state": "reported", "details": job_details(result, sr_path)}, ohif_url=None
    )
    return settings, result, sr_path, page


def _document_evaluations(sr) -> list:
    (container,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return list(container.ContentSequence)


def _drawn_in_sr(sr) -> list[str]:
    """Tracking identifiers of the SR's measurement groups that carry a SCOORD."""
    (measurements,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    drawn = []
    for group in measurements.ContentSequence:
        children = list(group.ContentSequence)
        name = next(item.TextValue for item in children if item.ConceptNameCodeSequence[0].CodeValue == "112039")
        name = name.removeprefix(f"{OHIF_FREEHAND_TRACKING}:")
        nested = [grandchild for item in children for grandchild in item.get("ContentSequence", [])]
        if any(item.ValueType == "SCOORD" for item in children + nested):
            drawn.append(name)
    return drawn


def test_default_outlines_lung_rads_3_and_above_and_lists_the_lung_rads_2_finding(study, tmp_path):
    settings, result, sr_path, page = _run(study, tmp_path)
    assert settings.outline_categories == DEFAULT_OUTLINE_CATEGORIES == ("3", "4A", "4B", "4X")
    big, small = result.findings
    assert (big["lung_rads"], big["actionable"], big["outlined"]) == ("4A", True, True)
    assert (small["lung_rads"], small["actionable"], small["outlined"]) == ("2", False, False)
    assert job_details(result, sr_path)["findings"][1]["outlined"] is False  # GET /studies/<uid>
    # the SR lists both, draws one; the GSPS draws that one only
    assert _drawn_in_sr(result.sr) == ["Nodule 1"]
    listed = [item.TextValue for item in _document_evaluations(result.sr) if item.ConceptNameCodeSequence[0].CodeValue == "LISTED"]
    assert len(listed) == 1 and listed[0].startswith("Nodule 2 · ")
    (annotation,) = result.gsps.GraphicAnnotationSequence
    assert annotation.TextObjectSequence[0].UnformattedTextValue.startswith("Nodule 1 ")
    # the review page lists both, says which is outlined, and shows the outlined one's key image only
    assert re.search(r'<tr id="finding-2" class="listed">.*?<td>no \(listed only\)</td>', page)
    assert re.search(r'<tr id="finding-1" class="outlined">.*?<td>yes</td><td>yes</td>', page)
    assert re.findall(r'alt="Key image of nodule (\d+)"', page) == ["1"]
    validate_sr(sr_path)  # the pipeline's SR, with a listed finding: dciodvfy and PixelMed report no error


def test_a_site_that_outlines_lung_rads_2_too(study, tmp_path):
    settings, result, _, page = _run(study, tmp_path, 'outline_categories = ["2", "3", "4A", "4B", "4X"]\n')
    assert settings.outline_categories == ("2", "3", "4A", "4B", "4X")
    assert [row["outlined"] for row in result.findings] == [True, True]
    assert _drawn_in_sr(result.sr) == ["Nodule 1", "Nodule 2"]
    assert len(result.gsps.GraphicAnnotationSequence) == 2
    assert re.findall(r'alt="Key image of nodule (\d+)"', page) == ["1", "2"]
    assert "listed only" not in page


@pytest.mark.parametrize(("value", "error"), [(["5"], ValueError), ("4A", ValueError)])  # "4A" becomes ("4", "A")
def test_an_unknown_category_is_refused_at_start(tmp_path, value, error):
    with pytest.raises(error, match="outline_categories"):
        load_settings(None, outline_categories=value)
