"""Matching nodules across time, change labels, volume doubling time and categories with the prior."""

import math
from dataclasses import replace

import numpy as np
import pytest

from lungscreen.findings import (
    Assessment, ChangeLabel, ComparisonStatus, Finding, NoduleType, PriorMeasurement, PriorNodule, RuleSet,
)
from lungscreen.models.longitudinal import (
    PriorStudyNodules, change_label, compare_with_prior, interval_days, match_nodules, volume_doubling_time_days,
)
from lungscreen.models.measure import sphere_volume_mm3
from lungscreen.models.registration import RigidTransform
from lungscreen.models.rules import apply_history, exam_assessment


def finding(lps, diameter, kind=NoduleType.SOLID, lung_rads=""):
    return Finding((0, 0, 0), tuple(lps), diameter, sphere_volume_mm3(diameter), 0.9, kind, lung_rads, False)


def prior_nodule(lps, diameter, kind=NoduleType.SOLID, lung_rads="", uid=None):
    return PriorNodule(tuple(lps), diameter, sphere_volume_mm3(diameter), kind, lung_rads, uid)


def test_growth_is_lung_rads_v2022_more_than_1_5_mm():
    assert change_label(7.5, 6.0) is ChangeLabel.STABLE  # exactly 1.5 mm is not growth
    assert change_label(7.6, 6.0) is ChangeLabel.GROWING
    assert change_label(4.4, 6.0) is ChangeLabel.SHRINKING
    assert change_label(5.0, 6.0) is ChangeLabel.STABLE


def test_volume_doubling_time():
    # The volume doubled in a year: VDT is the interval.
    assert volume_doubling_time_days(100.0, 200.0, 365) == pytest.approx(365.0)
    assert volume_doubling_time_days(100.0, 400.0, 365) == pytest.approx(182.5)
    assert volume_doubling_time_days(100.0, 100.0, 365) is None and volume_doubling_time_days(100.0, 90.0, 365) is None
    assert interval_days("20250115", "20260115") == 365
    with pytest.raises(ValueError, match="not a DICOM date"):
        interval_days("2025-01-15", "20260115")


def test_hungarian_matching_is_one_to_one_within_a_size_scaled_gate():
    # Shifted 20 mm along x between the exams; the transform knows it.
    shift = RigidTransform(np.eye(3), np.array([20.0, 0.0, 0.0]), np.zeros(3))
    prior = [prior_nodule((0, 0, 0), 6), prior_nodule((8, 0, 0), 6), prior_nodule((-100, 50, 0), 25)]
    current = [finding((28, 1, 0), 6.5), finding((20, -1, 0), 5.5), finding((-60, 50, 0), 26), finding((100, 100, 100), 8)]
    matches = {(m.current_index, m.prior_index) for m in match_nodules(current, prior, shift)}
    # Nearest-neighbour would give both current nodules to one prior; the assignment does not.
    # The 25 mm nodule, 20 mm from where the transform puts it, is within its gate (26 mm) ...
    assert matches == {(0, 1), (1, 0), (2, 2)}
    # ... a small one as far away is not.
    assert match_nodules([finding((-60 + 20, 50, 0), 5)], [prior_nodule((-100, 50, 0), 5)], shift) == ()


def test_labels_prior_measurement_tracking_uid_and_resolved_nodules():
    prior = PriorStudyNodules("1.2.3", "20250110", (
        prior_nodule((10, 10, 10), 6.0, lung_rads="3", uid="2.25.1"),
        prior_nodule((-50, 0, 0), 9.0, lung_rads="4A", uid="2.25.2"),
        prior_nodule((60, -40, 20), 5.0, lung_rads="2", uid="2.25.3"),  # gone now
    ))
    current = [finding((11, 10, 9), 6.4), finding((-50, 1, 0), 11.0), finding((0, 80, 0), 7.0)]
    labelled, comparison = compare_with_prior(current, None, "20260112", prior)
    by_change = {f.change: f for f in labelled}
    assert [f.change for f in labelled] == [ChangeLabel.STABLE, ChangeLabel.GROWING, ChangeLabel.NEW]
    stable, growing, new = labelled
    assert stable.tracking_uid == "2.25.1" and growing.tracking_uid == "2.25.2" and new.tracking_uid is None
    assert growing.prior == PriorMeasurement("1.2.3", "20250110", 9.0, sphere_volume_mm3(9.0), 367, "4A", center_lps_mm=(-50, 0, 0))
    assert growing.volume_doubling_time_days == pytest.approx(367 * math.log(2) / math.log((11.0 / 9.0) ** 3))
    assert new.prior is None and new.volume_doubling_time_days is None
    assert comparison.status is ComparisonStatus.COMPARED and comparison.interval_days == 367
    assert [p.tracking_uid for p in comparison.resolved] == ["2.25.3"]
    # Lung-RADS v2022 with the prior: stepped management, growth and a new nodule.
    assert stable.lung_rads == "2" and "stepped management" in stable.assessment.rule and not stable.actionable
    assert growing.lung_rads == "4B" and growing.assessment.rule == "Lung-RADS v2022 4B: solid, growing, >=8 mm"
    assert new.lung_rads == "4A" and new.actionable
    assert exam_assessment(labelled).category == "4B"
    assert by_change[ChangeLabel.NEW].assessment.rule_set is RuleSet.LUNG_RADS_2022
    with pytest.raises(ValueError, match="not earlier"):
        compare_with_prior(current, None, "20250110", prior)


def test_what_either_analysis_saw_but_did_not_report_is_neither_new_nor_resolved(lidc_series_dir):
    """A nodule reported now where the prior's analysis had an unreported candidate existed then
    (compared with it, no tracking UID from it); a prior nodule unreported now, where the current
    analysis has a candidate or a nodule can be segmented, is still seen; a candidate further away
    than the tight gate, or empty lung, proves nothing."""
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    series = index_study(sorted(lidc_series_dir.glob("*.dcm"))).series[0]
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    luna16 = (56.21, 86.34, -115.87)  # LIDC-IDRI-0001's 23 mm nodule, in the current volume
    empty_lung = (-80.0, 20.0, -150.0)
    prior = PriorStudyNodules("1.2.3", "20250110", (
        prior_nodule((90, -40, -200), 6.0, lung_rads="3", uid="2.25.1"),  # a candidate is there now
        prior_nodule(luna16, 20.0, lung_rads="4B", uid="2.25.2"),  # the nodule, segmented there now
        prior_nodule(empty_lung, 6.0, lung_rads="3", uid="2.25.3"),  # nothing there now: resolved
    ), unreported=(prior_nodule((0, 80, 0), 6.0), prior_nodule((-40, -60, -100), 5.0)))
    current = [finding((1, 81, 1), 9.0), finding((-40, -60 + 9, -100), 6.0)]
    unreported_now = [finding((91, -41, -200), 5.5)]
    labelled, comparison = compare_with_prior(
        current, None, "20260112", prior, current_volume=(volume.voxels, volume.affine), current_unreported=unreported_now,
    )
    existed, new = labelled
    assert existed.change is ChangeLabel.GROWING and existed.prior.reported is False and existed.tracking_uid is None
    assert existed.prior.diameter_mm == 6.0 and existed.lung_rads == "4B"  # growing solid >=8 mm
    assert new.change is ChangeLabel.NEW and new.prior is None  # 9 mm from the candidate: beyond the gate
    assert {s.prior.tracking_uid: round(s.diameter_mm) for s in comparison.still_seen} == {"2.25.1": 6, "2.25.2": 23}
    assert [p.tracking_uid for p in comparison.resolved] == ["2.25.3"]


def with_history(diameter, change, prior_lung_rads, days, kind=NoduleType.SOLID, prior_diameter=None):
    f = finding((0, 0, 0), diameter, kind)
    prior = None
    if change is not ChangeLabel.NEW:
        prior = PriorMeasurement("1.2", "20250101", prior_diameter or diameter, 1.0, days, prior_lung_rads)
    return apply_history([replace(f, change=change, prior=prior)])[0].assessment


@pytest.mark.parametrize(
    "diameter, change, prior_category, days, kind, expected",
    [
        (3.5, ChangeLabel.NEW, "", 365, NoduleType.SOLID, "2"),  # new <4 mm
        (5.0, ChangeLabel.NEW, "", 365, NoduleType.SOLID, "3"),  # new 4 to <6 mm
        (7.0, ChangeLabel.NEW, "", 365, NoduleType.SOLID, "4A"),  # new 6 to <8 mm
        (9.0, ChangeLabel.NEW, "", 365, NoduleType.SOLID, "4B"),  # new >=8 mm
        (12.0, ChangeLabel.NEW, "", 365, NoduleType.GROUND_GLASS, "2"),
        (7.5, ChangeLabel.GROWING, "3", 365, NoduleType.SOLID, "4A"),  # growing <8 mm
        (9.0, ChangeLabel.GROWING, "4A", 365, NoduleType.SOLID, "4B"),  # growing >=8 mm
        (9.0, ChangeLabel.STABLE, "2", 365 * 3, NoduleType.SOLID, "2"),  # stable for years: benign behaviour
        (9.0, ChangeLabel.STABLE, "4A", 90, NoduleType.SOLID, "3"),  # 4A stable at 3 months: 3
        (9.0, ChangeLabel.STABLE, "4A", 30, NoduleType.SOLID, "4A"),  # too early to step down
        (7.0, ChangeLabel.STABLE, "3", 180, NoduleType.SOLID, "2"),  # 3 stable at 6 months: 2
        (7.0, ChangeLabel.SHRINKING, "3", 180, NoduleType.SOLID, "2"),
        (16.0, ChangeLabel.STABLE, "4B", 365, NoduleType.SOLID, "4B"),  # 4B: clinical evaluation
        (10.0, ChangeLabel.GROWING, "1", 365, NoduleType.CALCIFIED, "1"),
    ],
)
def test_lung_rads_v2022_with_the_prior(diameter, change, prior_category, days, kind, expected):
    assessment = with_history(diameter, change, prior_category, days, kind)
    assert assessment.category == expected and assessment.rule.startswith(f"Lung-RADS v2022 {expected}")


def test_crossing_a_size_threshold_without_growth_recategorises_by_size():
    # 5.5 -> 6.5 mm is not growth (+1.0 mm) but crosses 6 mm: category 3 by size.
    assessment = with_history(6.5, ChangeLabel.STABLE, "2", 365, prior_diameter=5.5)
    assert assessment.category == "3" and "size threshold" in assessment.rule


def test_other_rule_sets_cite_their_rules():
    stable_two_years = replace(finding((0, 0, 0), 9.0), change=ChangeLabel.STABLE,
                               prior=PriorMeasurement("1.2", "20230101", 9.0, 1.0, 740, "4A"))
    fleischner = apply_history([stable_two_years], "fleischner-2017")[0]
    assert fleischner.assessment == Assessment(RuleSet.FLEISCHNER_2017, "no-further-follow-up", "Fleischner 2017: solid nodule stable for >= 2 years")
    assert fleischner.lung_rads == "3"  # the Lung-RADS suggestion is kept beside the site's rule set
    baseline = apply_history([finding((0, 0, 0), 12.0)], RuleSet.C_LUNG_RADS)[0]
    assert baseline.assessment.category == "3" and baseline.assessment.rule.startswith("C-Lung-RADS 3: solid 10 to <18 mm")
    assert exam_assessment([baseline, finding((0, 0, 0), 19.0)], "c-lung-rads").category == "4"
    assert exam_assessment([], "c-lung-rads") is None
    with pytest.raises(ValueError):
        apply_history([baseline], "lung-rads-1.1")
