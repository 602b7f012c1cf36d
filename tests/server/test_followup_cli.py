"""`lungscreen analyze CURRENT --prior PRIOR`: a follow-up report from two folders.

The pair is made from the real LIDC-IDRI-0001: the prior is the same scan without its 23 mm
LUNA16 nodule, the patient rotated by a few degrees and shifted by a few mm, 400 days earlier.
So that nodule is new, and every other finding is the same anatomy (matched, same tracking UID):
a 9 mm nodule painted into the lung of both scans makes sure there is one (the second stage
leaves no other finding on this scan at the default operating point).
"""

import json

import numpy as np
import pydicom
import pytest

from lungscreen.benchmarks.followup import (
    LUNA16_NODULE_LPS, LUNA16_NODULE_MM, _lung_spots, paint_nodule, remove_nodule, rigid_prior, rigid_transform,
    write_study,
)
from lungscreen.server.cli import main
from lidc_reports import validate_sr


@pytest.fixture(scope="module")
def pair(tmp_path_factory, lidc_series_dir):
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    root = tmp_path_factory.mktemp("followup")
    series = index_study(sorted(lidc_series_dir.glob("*.dcm"))).series[0]
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    (stable_spot,) = _lung_spots(volume.voxels, volume.affine, 1, LUNA16_NODULE_LPS)
    with_stable = volume.voxels.astype(np.float32)
    paint_nodule(with_stable, volume.affine, stable_spot, 9.0)
    current = write_study(with_stable, volume.affine, root / "current", "20260115")
    without = with_stable.copy()
    remove_nodule(without, volume.affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, np.random.default_rng(1))
    moved_hu, moved_affine = rigid_prior(without, volume.affine, rigid_transform((-4.0, 2.0, -2.0), (-10.0, 7.0, -5.0), (0, 0, -175)))
    prior = write_study(moved_hu, moved_affine, root / "prior", "20241211")
    out = root / "out"
    # Outline every category: the tracking across the two SRs is read from their measurement
    # groups, and a finding the site only lists has none.
    config = root / "lungscreen.toml"
    config.write_text('outline_categories = ["1", "2", "3", "4A", "4B", "4X"]\n')
    assert main([
        "analyze", str(current), "--prior", str(prior), "--out", str(out), "--data-dir", str(root / "data"),
        "--config", str(config),
    ]) == 0
    return out, pydicom.dcmread(next(prior.iterdir()), stop_before_pixels=True)


def test_findings_json_carries_change_prior_and_the_rule_of_each_category(pair):
    out, prior_header = pair
    summary = json.loads((out / "findings.json").read_text())
    assert summary["prior_study_uid"] == prior_header.StudyInstanceUID
    assert summary["comparison"]["status"] == "compared" and summary["comparison"]["interval_days"] == 400
    assert summary["comparison"]["alignment_residual_mm"] < 5
    # Every prior nodule is still there: none resolved, none outside the range
    assert summary["comparison"]["resolved"] == [] and summary["comparison"]["not_scanned"] == []
    findings = summary["findings"]
    luna = min(findings, key=lambda f: np.linalg.norm(np.array(f["center_lps_mm"]) - LUNA16_NODULE_LPS))
    assert np.linalg.norm(np.array(luna["center_lps_mm"]) - LUNA16_NODULE_LPS) < 5
    assert luna["change"] == "new" and luna["prior"] is None and luna["volume_doubling_time_days"] is None
    assert luna["lung_rads"] == "4B" and luna["category"] == {
        "rule_set": "lung-rads-2022", "category": "4B", "rule": "Lung-RADS v2022 4B: solid, new, >=8 mm"}
    others = [f for f in findings if f is not luna]
    assert others, "LIDC-IDRI-0001 has other detections: the same anatomy at both timepoints"
    for f in others:  # the same anatomy in both scans (the 9 mm nodule painted in both): matched and stable
        assert f["change"] == "stable" and f["prior"]["reported"] is True
        assert f["prior"]["study_uid"] == prior_header.StudyInstanceUID and f["prior"]["interval_days"] == 400
        assert f["prior"]["study_date"] == "20241211"
    assert summary["exam_category"]["category"] == "4B" and summary["exam_category"]["rule"].startswith("Lung-RADS v2022 4B")


def test_the_two_reports_track_each_nodule_under_one_uid_and_the_follow_up_sr_is_valid(pair):
    out, _ = pair
    summary = json.loads((out / "findings.json").read_text())
    current_sr = pydicom.dcmread(out / "report_sr.dcm")
    prior_sr = pydicom.dcmread(out / "prior" / "report_sr.dcm")

    def tracking(sr):
        pairs = {}
        for group in _groups(sr):
            uid = next(i.UID for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040")
            identifier = next(i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")
            pairs[uid] = identifier
        return pairs

    current, prior = tracking(current_sr), tracking(prior_sr)
    matched = {f["tracking_uid"] for f in summary["findings"] if f["change"] != "new"}
    assert matched and matched <= set(prior) and matched <= set(current)
    assert all(current[uid] == prior[uid] for uid in matched)  # same Tracking Identifier too
    new = [f for f in summary["findings"] if f["change"] == "new"]
    assert all(f["tracking_uid"] not in prior and f["tracking_id"] not in prior.values() for f in new)
    items = list(_items(current_sr))
    meanings = {i.ConceptNameCodeSequence[0].CodeMeaning for i in items if "ConceptNameCodeSequence" in i}
    assert {"Change since prior study", "Diameter on prior study", "Comparison with prior study"} <= meanings
    comparison = next(i.TextValue for i in items if i.get("ConceptNameCodeSequence") and i.ConceptNameCodeSequence[0].CodeMeaning == "Comparison with prior study")
    assert comparison.startswith(f"Compared with prior study {summary['prior_study_uid']} of 20241211 (400 days earlier)")
    validate_sr(out / "report_sr.dcm")  # dciodvfy and PixelMed: no error


def test_the_follow_up_sr_references_the_prior_images_it_compared_with_as_other_evidence(pair):
    """PS3.3 C.17.2.3: evidence outside the current study goes in the Pertinent Other Evidence Sequence."""
    out, prior_header = pair
    sr = pydicom.dcmread(out / "report_sr.dcm")
    prior_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (out.parent / "prior").iterdir()}
    (other_study,) = sr.PertinentOtherEvidenceSequence
    assert other_study.StudyInstanceUID == prior_header.StudyInstanceUID
    (series,) = other_study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == prior_header.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence} == prior_uids
    assert [s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence] == [sr.StudyInstanceUID]
    prior_sr = pydicom.dcmread(out / "prior" / "report_sr.dcm")
    assert "PertinentOtherEvidenceSequence" not in prior_sr  # a baseline references no other study
    validate_sr(out / "report_sr.dcm")  # dciodvfy and PixelMed: no error


def _groups(sr):
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "126010":  # Imaging Measurements
            return [g for g in item.ContentSequence if g.ValueType == "CONTAINER"]
    return []


def _items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)
