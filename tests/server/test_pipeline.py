"""The analysis pipeline on synthetic studies: selection, rules, SR, Enhanced CT, and `lungscreen analyze`."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from hypothesis import HealthCheck, example, given, settings
from pydicom.uid import generate_uid

from corruption import DAMAGED_SLICE, damaged
from lungscreen.errors import LungScreenError, ReportError
from lungscreen.dicom_io.select import SelectionRules
from lungscreen.models.card import BLOB_FILTER_CARD
from lungscreen.findings import LUNG_RADS_ORDER
from lungscreen.models.rules import ClinicalRules
from lidc_reports import validate_sr
from peers import needs_binary
from lungscreen.server.config import load_settings
from lungscreen.server.pipeline import NoEligibleSeries, analyze_study
from lungscreen.training.dicom_writer import write_ct_series

SPACING = (1.25, 0.8, 0.8)
# (k, j, i) centre and diameter (mm): an actionable 10 mm nodule and a 5 mm (Lung-RADS 2) one.
SPHERES = (((20, 40, 40), 10.0), ((20, 90, 90), 5.0))


def phantom(shape=(40, 128, 128), spacing=SPACING, spheres=SPHERES) -> np.ndarray:
    hu = np.full(shape, -850.0, np.float32)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for (ck, cj, ci), d in spheres:
        dist2 = ((k - ck) * spacing[0]) ** 2 + ((j - cj) * spacing[1]) ** 2 + ((i - ci) * spacing[2]) ** 2
        hu[dist2 <= (d / 2) ** 2] = 40.0
    return hu


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    from lungscreen.server.workers import build_analyzer

    return build_analyzer(load_settings(model=BLOB_FILTER_CARD, data_dir=tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_ct_series(phantom(), SPACING, tmp_path_factory.mktemp("study"), study_instance_uid=generate_uid())


def test_findings_rules_and_report(analyzer, study, tmp_path):
    result = analyze_study(study.paths, analyzer)
    big, small = result.findings
    assert big["diameter_mm"] == pytest.approx(10, rel=0.15) and small["diameter_mm"] == pytest.approx(5, rel=0.15)
    assert big["actionable"] and big["lung_rads"] == "4A" and big["nodule_type"] == "solid"
    assert not small["actionable"] and small["lung_rads"] == "2"
    assert sum(result.report.suppressed.values()) == result.candidates - 2
    expected_centre = np.array([-(128 * 0.8) / 2 + 40 * 0.8, -(128 * 0.8) / 2 + 40 * 0.8, 20 * 1.25])
    assert np.linalg.norm(np.array(big["center_lps_mm"]) - expected_centre) < 1.5
    centre_slice = pydicom.dcmread(study.paths[20], stop_before_pixels=True)
    assert big["sop_instance_uid"] == centre_slice.SOPInstanceUID
    assert result.report.operating_point == "screening"
    assert set(result.timings) == {"assemble", "select", "volume", "preprocess", "inference", "postprocess", "report"}
    assert result.sr.StudyInstanceUID == study.study_instance_uid
    assert result.accession_number == "SYNACC0001"


def test_site_rules_suppress_small_nodules_and_count_them(analyzer, study):
    site = dataclasses.replace(analyzer, rules=ClinicalRules(min_reported_diameter_mm=6.0))
    result = analyze_study(study.paths, site)
    assert [round(r["diameter_mm"]) for r in result.findings] == [10]  # the 10 mm nodule, as segmented
    assert result.report.suppressed["under_min_size"] == 1


@needs_binary("dciodvfy")
def test_enhanced_ct_gives_the_same_findings_and_a_valid_sr(analyzer, study, tmp_path):
    legacy = [pydicom.dcmread(p) for p in study.paths]
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    single = analyze_study(study.paths, analyzer)
    multi = analyze_study([path], analyzer)
    assert [(r["center_lps_mm"], r["diameter_mm"]) for r in multi.findings] == [
        (r["center_lps_mm"], r["diameter_mm"]) for r in single.findings
    ]
    assert multi.findings[0]["sop_instance_uid"] == enhanced.SOPInstanceUID
    frame = enhanced.PerFrameFunctionalGroupsSequence[multi.findings[0]["frame_number"] - 1]
    frame_z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
    assert abs(frame_z - multi.findings[0]["center_lps_mm"][2]) <= SPACING[0] / 2
    sr_path = tmp_path / "sr.dcm"
    multi.sr.save_as(sr_path, enforce_file_format=True)
    validate_sr(sr_path)  # dciodvfy and PixelMed: no error (frame references in the SCOORD)


def test_thinnest_complete_series_wins_and_broken_ones_are_recorded(analyzer, tmp_path):
    study_uid = generate_uid()
    thick = write_ct_series(phantom((32, 128, 128), (2.5, 0.8, 0.8), ()), (2.5, 0.8, 0.8), tmp_path / "thick",
                            study_instance_uid=study_uid, series_number=2, series_description="thick")
    thin = write_ct_series(phantom(), SPACING, tmp_path / "thin", study_instance_uid=study_uid, series_number=3,
                           series_description="thin with a gap")
    thinnest = write_ct_series(phantom((50, 128, 128), (1.0, 0.8, 0.8), ()), (1.0, 0.8, 0.8), tmp_path / "thinnest",
                               study_instance_uid=study_uid, series_number=4, series_description="thinnest, too short")
    thin_paths = list(thin.paths)
    del thin_paths[10]  # a missing slice: the thin series cannot be used
    paths = [*thick.paths, *thin_paths, *thinnest.paths[:20]]
    result = analyze_study(paths, analyzer)
    assert result.series_uid == thick.series_instance_uid
    reasons = {r.series_description: r.reason for r in result.rejected_series}
    assert "missing slices" in reasons["thin with a gap"]
    assert "too few slices: 20 < 30" in reasons["thinnest, too short"]


def test_no_eligible_series_names_every_reason(analyzer, tmp_path):
    series = write_ct_series(phantom((10, 64, 64), SPACING, ()), SPACING, tmp_path / "short")
    with pytest.raises(NoEligibleSeries, match="too few slices: 10 < 30") as excinfo:
        analyze_study(series.paths, analyzer)
    assert excinfo.value.rejected[0].series_instance_uid == series.series_instance_uid


def test_analyze_command_writes_sr_and_findings_json(study, tmp_path):
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "lungscreen.server.cli", "--log-level", "WARNING", "analyze", str(study.paths[0].parent),
         "--out", str(out), "--model", str(BLOB_FILTER_CARD), "--data-dir", str(tmp_path / "data")],
        check=True, capture_output=True,
    )
    summary = json.loads((out / "findings.json").read_text())
    assert "not for diagnostic use" in summary["intended_use"].lower()
    finding = summary["findings"][0]
    assert summary["exam_lung_rads"] == max((f["lung_rads"] for f in summary["findings"]), key=LUNG_RADS_ORDER.index)
    assert set(finding) >= {"center_lps_mm", "diameter_mm", "volume_mm3", "probability", "lung_rads", "sop_instance_uid"}
    assert finding["volume_mm3"] == pytest.approx(np.pi / 6 * finding["diameter_mm"] ** 3, rel=1e-2)
    sr = pydicom.dcmread(out / "report_sr.dcm")
    assert sr.SOPInstanceUID == summary["sr_sop_instance_uid"] and sr.Modality == "SR"


def test_ct_headers_the_report_cannot_use_fail_the_study_with_the_reason(analyzer, study, tmp_path):
    """Found by fuzzing the whole pipeline: a corrupt SpecificCharacterSet reached highdicom's
    checks of the evidence and came out as a bare ValueError (an "internal error")."""
    paths = []
    for path in study.paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 999"  # no such character set
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
        paths.append(tmp_path / path.name)
    with pytest.raises(ReportError, match="the SR cannot be built from the CT's headers"):
        analyze_study(paths, analyzer)


@functools.cache
def _small_series_bytes() -> tuple[bytes, ...]:
    """12 slices of 32 x 32 with one 8 mm sphere, as file bytes (not a fixture: hypothesis would print it)."""
    hu = phantom(shape=(12, 32, 32), spheres=(((6, 16, 16), 8.0),))
    with tempfile.TemporaryDirectory() as folder:
        return tuple(p.read_bytes() for p in write_ct_series(hu, SPACING, Path(folder)).paths)


# derandomize: the same 100 cases in every CI run (a probe of 1200 random cases found the three
# defects this guards: an unknown character set, an outline past the image edge, no SOPInstanceUID).
# The example: a flipped byte that removes one slice's RescaleSlope, which highdicom refuses in the GSPS.
@example(slice_index=0, cut=0, flips=[1195])
@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DAMAGED_SLICE)
def test_corrupted_bytes_fail_the_study_with_a_reason_never_an_internal_error(analyzer, slice_index, cut, flips):
    blobs = list(_small_series_bytes())
    blobs[slice_index] = damaged(blobs[slice_index], cut, flips)
    small = dataclasses.replace(analyzer, selection=SelectionRules(min_slices=4))
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{n:03d}.dcm" for n in range(len(blobs))]
        for path, data in zip(paths, blobs):
            path.write_bytes(data)
        try:
            analyze_study(paths, small)
        except LungScreenError as exc:
            assert str(exc), "a failed study says why"
