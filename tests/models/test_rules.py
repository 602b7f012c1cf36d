"""Clinical rules: what is suppressed, what is actionable, and that every removal is counted."""

from dataclasses import replace

import pytest

from lungscreen.findings import Finding, NoduleType, exam_lung_rads
from lungscreen.models.measure import nodule_type
from lungscreen.models.rules import (
    SUPPRESSED_BELOW_OPERATING_POINT,
    SUPPRESSED_OUTSIDE_LUNGS,
    SUPPRESSED_OVER_CAP,
    SUPPRESSED_UNDER_MIN_SIZE,
    ClinicalRules,
    apply_rules,
    lung_rads_category,
)


def finding(diameter, probability, kind=NoduleType.SOLID):
    return Finding((0, 0, 0), (0, 0, 0), diameter, 0.0, probability, kind, "", False)


@pytest.mark.parametrize(
    "diameter, kind, category",
    [
        (4.0, NoduleType.SOLID, "2"), (5.9, NoduleType.SOLID, "2"), (6.0, NoduleType.SOLID, "3"),
        (7.9, NoduleType.SOLID, "3"), (8.0, NoduleType.SOLID, "4A"), (14.9, NoduleType.SOLID, "4A"),
        (15.0, NoduleType.SOLID, "4B"), (23.4, NoduleType.SOLID, "4B"),
        (20.0, NoduleType.GROUND_GLASS, "2"), (30.0, NoduleType.GROUND_GLASS, "3"),
        (5.0, NoduleType.PART_SOLID, "2"), (9.0, NoduleType.PART_SOLID, "3"),
        (5.0, NoduleType.CALCIFIED, "1"), (18.0, NoduleType.CALCIFIED, "1"),
    ],
)
def test_lung_rads_v2022_size_categories(diameter, kind, category):
    assert lung_rads_category(diameter, kind) == category


def test_the_exam_is_suggested_the_category_of_its_most_concerning_nodule():
    def reported(*categories):
        return [replace(finding(6.0, 0.9), lung_rads=category) for category in categories]

    assert exam_lung_rads(reported("2", "4A", "3")) == "4A"
    assert exam_lung_rads(reported("4A", "4B")) == "4B"
    assert exam_lung_rads(reported("1", "2")) == "2"
    assert exam_lung_rads([]) is None  # no finding is not a negative (category 1) exam


def test_rules_suppress_and_count_each_reason():
    findings = [
        finding(3.0, 0.9),  # under 4 mm: not reported
        finding(5.0, 0.9),  # reported, category 2, not actionable
        finding(12.0, 0.3),  # below the operating point
        replace(finding(9.0, 0.95), outside_lungs_mm=25.0),  # in the heart, say: not a lung nodule
        replace(finding(11.0, 0.8), outside_lungs_mm=4.0),  # near enough (pleura, fissure)
        *[finding(7.0 + i, 0.8) for i in range(3)],  # one of these is over the cap of 4
    ]
    kept, suppressed = apply_rules(findings, 0.5, ClinicalRules(max_findings=4))
    assert suppressed == {
        SUPPRESSED_UNDER_MIN_SIZE: 1, SUPPRESSED_BELOW_OPERATING_POINT: 1, SUPPRESSED_OVER_CAP: 1,
        SUPPRESSED_OUTSIDE_LUNGS: 1,
    }
    assert all(f.outside_lungs_mm is None or f.outside_lungs_mm <= 10 for f in kept)
    assert len(kept) == 4
    assert sum(suppressed.values()) + len(kept) == len(findings)
    small = [f for f in kept if f.diameter_mm == 5.0]
    assert small and small[0].lung_rads == "2" and not small[0].actionable
    assert all(f.actionable for f in kept if f.diameter_mm >= 6)
    assert [f.diameter_mm for f in kept] == sorted((f.diameter_mm for f in kept), reverse=True)


def test_calcified_nodules_are_reported_as_benign_and_never_actionable():
    kept, suppressed = apply_rules(
        [finding(14.0, 0.9, NoduleType.CALCIFIED), finding(9.0, 0.9)], 0.5, ClinicalRules()
    )
    calcified, solid = kept
    assert (calcified.lung_rads, calcified.actionable) == ("1", False)
    assert (solid.lung_rads, solid.actionable) == ("4A", True)
    assert sum(suppressed.values()) == 0, "benign, but shown: the radiologist sees what was found"


def test_rules_are_configurable_per_site_and_validated():
    rules = ClinicalRules.from_mapping({"min_reported_diameter_mm": 6, "actionable_diameter_mm": 8})
    kept, suppressed = apply_rules([finding(5.0, 0.9), finding(7.0, 0.9)], 0.5, rules)
    assert [f.diameter_mm for f in kept] == [7.0] and not kept[0].actionable
    assert suppressed[SUPPRESSED_UNDER_MIN_SIZE] == 1
    far = replace(finding(9.0, 0.9), outside_lungs_mm=50.0)
    kept, suppressed = apply_rules([far], 0.5, ClinicalRules.from_mapping({"max_outside_lungs_mm": False}))
    assert len(kept) == 1 and suppressed[SUPPRESSED_OUTSIDE_LUNGS] == 0, "false in TOML turns the rule off"
    with pytest.raises(ValueError, match="unknown clinical rule settings"):
        ClinicalRules.from_mapping({"min_size": 3})
    with pytest.raises(ValueError, match="max_findings"):
        ClinicalRules(max_findings=0)


def test_nodule_type_from_attenuation():
    import numpy as np

    spacing = (1.0, 1.0, 1.0)
    k, j, i = np.ogrid[:40, :40, :40]
    r = np.sqrt((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2)
    lung = np.full((40, 40, 40), -850.0, np.float32)
    solid = np.where(r <= 6, 30.0, lung)
    ggo = np.where(r <= 6, -600.0, lung)
    part = np.where(r <= 2.5, 30.0, np.where(r <= 6, -650.0, lung))
    calcified = np.where(r <= 6, 400.0, lung)
    centrally_calcified = np.where(r <= 2.5, 600.0, solid)
    rim_calcified = np.where((r > 4.5) & (r <= 6), 500.0, solid)  # the rim is not the core
    assert nodule_type(solid, (20, 20, 20), 12.0, spacing) is NoduleType.SOLID
    assert nodule_type(calcified, (20, 20, 20), 12.0, spacing) is NoduleType.CALCIFIED
    assert nodule_type(centrally_calcified, (20, 20, 20), 12.0, spacing) is NoduleType.CALCIFIED
    assert nodule_type(rim_calcified, (20, 20, 20), 12.0, spacing) is NoduleType.SOLID
    assert nodule_type(ggo, (20, 20, 20), 12.0, spacing) is NoduleType.GROUND_GLASS
    assert nodule_type(part, (20, 20, 20), 12.0, spacing) is NoduleType.PART_SOLID
