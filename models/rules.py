"""Clinical rules on top of the operating point: what is shown, and what is actionable.

Lung-RADS v2022 (ACR) and the Fleischner Society 2017 guidelines both say that solid
nodules under 6 mm need no routine follow-up in a screening population. So, by default:

* candidates below the operating point's probability threshold are not reported;
* candidates whose surface lies more than 10 mm outside the lungs (heart, liver, mediastinal
  vessels; lung nodules touch lung parenchyma) are not reported;
* candidates under 4 mm are not reported;
* 4 to <6 mm are reported as Lung-RADS 2 (benign appearance or behaviour, not actionable);
* 6 mm and above are actionable (Lung-RADS 3, 4A, 4B by size), except calcified nodules:
  a benign calcification pattern is Lung-RADS 1 at any size (reported, not actionable);
* at most ``max_findings`` per study, the most probable first.

Every removal is counted per rule, so a report shows what the rules suppressed. Each site can
change the numbers (``ClinicalRules.from_mapping``); the rules are data, not code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from lungscreen.findings import Finding, NoduleType

SUPPRESSED_BELOW_OPERATING_POINT = "below_operating_point"
SUPPRESSED_UNDER_MIN_SIZE = "under_min_size"
SUPPRESSED_OUTSIDE_LUNGS = "outside_lungs"
SUPPRESSED_OVER_CAP = "over_findings_cap"


@dataclass(frozen=True)
class ClinicalRules:
    min_reported_diameter_mm: float = 4.0
    actionable_diameter_mm: float = 6.0
    max_findings: int = 10
    max_outside_lungs_mm: float | None = 10.0  # None: no lung-proximity rule

    def __post_init__(self) -> None:
        if self.min_reported_diameter_mm < 0:
            raise ValueError("min_reported_diameter_mm must be >= 0")
        if self.actionable_diameter_mm < self.min_reported_diameter_mm:
            raise ValueError("actionable_diameter_mm must be >= min_reported_diameter_mm")
        if self.max_findings < 1:
            raise ValueError("max_findings must be >= 1")
        if self.max_outside_lungs_mm is not None and self.max_outside_lungs_mm < 0:
            raise ValueError("max_outside_lungs_mm must be >= 0 (or None to turn the rule off)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ClinicalRules":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown clinical rule settings: {sorted(unknown)}")
        values = dict(values)
        if values.get("max_outside_lungs_mm") is False:  # TOML has no null: false turns the rule off
            values["max_outside_lungs_mm"] = None
        return cls(**values)


def lung_rads_category(diameter_mm: float, nodule_type: NoduleType) -> str:
    """Suggested Lung-RADS v2022 category of a baseline screening nodule, by size and type.

    Solid: <6 mm 2, 6 to <8 mm 3, 8 to <15 mm 4A, >=15 mm 4B. Ground-glass: <30 mm 2,
    >=30 mm 3. Part-solid needs the solid component, which the detector does not measure:
    <6 mm total is 2; larger ones are given 3 as a floor, and the report says "suggested".
    Calcified (benign calcification): 1.
    """
    if nodule_type is NoduleType.CALCIFIED:
        return "1"
    if nodule_type is NoduleType.GROUND_GLASS:
        return "2" if diameter_mm < 30 else "3"
    if nodule_type is NoduleType.PART_SOLID:
        return "2" if diameter_mm < 6 else "3"
    if diameter_mm < 6:
        return "2"
    if diameter_mm < 8:
        return "3"
    if diameter_mm < 15:
        return "4A"
    return "4B"


def apply_rules(
    findings: list[Finding], threshold: float, rules: ClinicalRules
) -> tuple[tuple[Finding, ...], dict[str, int]]:
    """Keep what the operating point and the rules allow; count what each rule removed.

    ``findings`` carry calibrated probabilities; ``actionable`` and ``lung_rads`` are set here.
    """
    suppressed = {
        SUPPRESSED_BELOW_OPERATING_POINT: 0, SUPPRESSED_OUTSIDE_LUNGS: 0, SUPPRESSED_UNDER_MIN_SIZE: 0,
        SUPPRESSED_OVER_CAP: 0,
    }
    kept = []
    for f in sorted(findings, key=lambda f: f.probability, reverse=True):
        if f.probability < threshold:
            suppressed[SUPPRESSED_BELOW_OPERATING_POINT] += 1
        elif _outside_lungs(f, rules):
            suppressed[SUPPRESSED_OUTSIDE_LUNGS] += 1
        elif f.diameter_mm < rules.min_reported_diameter_mm:
            suppressed[SUPPRESSED_UNDER_MIN_SIZE] += 1
        elif len(kept) >= rules.max_findings:
            suppressed[SUPPRESSED_OVER_CAP] += 1
        else:
            category = lung_rads_category(f.diameter_mm, f.nodule_type)
            actionable = f.diameter_mm >= rules.actionable_diameter_mm and category not in ("1", "2")
            kept.append(replace(f, lung_rads=category, actionable=actionable))
    # Report order: largest first, which is how radiologists list nodules.
    kept.sort(key=lambda f: f.diameter_mm, reverse=True)
    return tuple(kept), suppressed


def reportable(finding: Finding, threshold: float, rules: ClinicalRules) -> bool:
    """Whether ``finding`` passes the operating point, the lung-proximity and the size rules
    (everything but the findings cap): the findings a second stage has to look at."""
    return (
        finding.probability >= threshold
        and not _outside_lungs(finding, rules)
        and finding.diameter_mm >= rules.min_reported_diameter_mm
    )


def _outside_lungs(finding: Finding, rules: ClinicalRules) -> bool:
    limit, outside = rules.max_outside_lungs_mm, finding.outside_lungs_mm
    return limit is not None and outside is not None and outside > limit
