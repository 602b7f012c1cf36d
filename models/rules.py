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
from typing import Any, Mapping, Sequence

from lungscreen.findings import LUNG_RADS_ORDER, Assessment, ChangeLabel, Finding, NoduleType, RuleSet

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


# --- Categories with the prior study, per rule set --------------------------------------------
#
# The baseline API above (lung_rads_category, apply_rules) stays as it is: every run applies it
# first. When a prior study was compared (lungscreen.models.longitudinal set each finding's
# ``change``), apply_history() recategorises with the history under the site's rule set and
# records the clause that produced each category (Assessment.rule).

# Stepped management (Lung-RADS v2022): the follow-up must have happened. A follow-up done a
# little early still counts: 2 weeks' tolerance on the 3- and 6-month intervals.
_FOLLOW_UP_3_MONTHS_DAYS = 90 - 14
_FOLLOW_UP_6_MONTHS_DAYS = 182 - 14
FLEISCHNER_SOLID_STABLE_DAYS = 730  # solid nodules stable for 2 years: no further follow-up
FLEISCHNER_SUBSOLID_STABLE_DAYS = 5 * 365  # subsolid: 5 years

C_LUNG_RADS_ORDER = ("0", "1", "2", "3", "4")
FLEISCHNER_ORDER = (
    "benign", "no-further-follow-up", "no-routine-follow-up", "ct-6-12-months-then-2-yearly-to-5-years",
    "ct-6-12-months", "ct-3-6-months-then-annual-to-5-years", "ct-3-months-pet-or-sampling",
    "growing-sampling-or-resection",
)


def lung_rads_2022_baseline(diameter_mm: float, kind: NoduleType) -> Assessment:
    """:func:`lung_rads_category` with the clause of the Lung-RADS v2022 table that applies."""
    category = lung_rads_category(diameter_mm, kind)
    if kind is NoduleType.CALCIFIED:
        clause = "1: nodule with benign (calcified) pattern"
    elif kind is NoduleType.GROUND_GLASS:
        clause = f"{category}: non-solid {'<30 mm' if category == '2' else '>=30 mm'} at baseline"
    elif kind is NoduleType.PART_SOLID:
        clause = ("2: part-solid <6 mm total at baseline" if category == "2"
                  else "3: part-solid >=6 mm total at baseline (solid component not measured: 3 as a floor)")
    else:
        clause = {"2": "2: solid <6 mm at baseline", "3": "3: solid >=6 to <8 mm at baseline",
                  "4A": "4A: solid >=8 to <15 mm at baseline", "4B": "4B: solid >=15 mm at baseline"}[category]
    return Assessment(RuleSet.LUNG_RADS_2022, category, "Lung-RADS v2022 " + clause)


def lung_rads_2022_with_prior(finding: Finding) -> Assessment:
    """Lung-RADS v2022 (ACR, Christensen et al., JACR 2024;21:473-488) for a follow-up exam.

    * new: solid <4 mm 2, 4 to <6 mm 3, 6 to <8 mm 4A, >=8 mm 4B; part-solid <6 mm 3 and
      >=6 mm 4A (a new solid component, size not measured here: 4A as a floor); non-solid
      <30 mm 2, >=30 mm 3;
    * growing (mean diameter up >1.5 mm): solid <8 mm 4A, >=8 mm 4B; part-solid 4A as a
      floor (growing solid component, size not measured); non-solid <30 mm 2, >=30 mm 3;
    * stable or smaller: stepped management. A category 4A nodule stable or decreased at the
      3-month follow-up becomes 3; a category 3 nodule stable or decreased at the 6-month
      follow-up becomes 2; 4B stays 4B (v2022 leaves it to clinical evaluation); 1 and 2 stay
      2 (benign behaviour). A nodule that crosses a higher size threshold is recategorised by
      size even without growth ("Size thresholds ... apply to nodules ... that enlarge,
      reaching a higher size category").

    A single prior cannot show slow growth over several exams (v2022 4B), so that clause is
    not applied; the radiologist sees both measurements in the report.
    """
    d, kind, change = finding.diameter_mm, finding.nodule_type, finding.change
    if change is None or finding.prior is None and change is not ChangeLabel.NEW:
        return lung_rads_2022_baseline(d, kind)
    if kind is NoduleType.CALCIFIED:
        return Assessment(RuleSet.LUNG_RADS_2022, "1", "Lung-RADS v2022 1: nodule with benign (calcified) pattern")

    def says(category: str, clause: str) -> Assessment:
        return Assessment(RuleSet.LUNG_RADS_2022, category, f"Lung-RADS v2022 {category}: {clause}")

    if change is ChangeLabel.NEW:
        if kind is NoduleType.GROUND_GLASS:
            return says("2", "non-solid, new, <30 mm") if d < 30 else says("3", "non-solid, new, >=30 mm")
        if kind is NoduleType.PART_SOLID:
            if d < 6:
                return says("3", "part-solid, new, <6 mm total")
            return says("4A", "part-solid, new, >=6 mm (new solid component, size not measured: 4A as a floor)")
        if d < 4:
            return says("2", "solid, new, <4 mm")
        if d < 6:
            return says("3", "solid, new, 4 to <6 mm")
        if d < 8:
            return says("4A", "solid, new, 6 to <8 mm")
        return says("4B", "solid, new, >=8 mm")
    if change is ChangeLabel.GROWING:
        if kind is NoduleType.GROUND_GLASS:
            return says("2", "non-solid, growing, <30 mm") if d < 30 else says("3", "non-solid, growing, >=30 mm")
        if kind is NoduleType.PART_SOLID:
            return says("4A", "part-solid, growing (growing solid component, size not measured: 4A as a floor)")
        return says("4A", "solid, growing, <8 mm") if d < 8 else says("4B", "solid, growing, >=8 mm")
    # Stable or shrinking: stepped management from the prior category.
    prior = finding.prior
    assert prior is not None
    before = prior.lung_rads or lung_rads_category(prior.diameter_mm, kind)
    by_size_now, by_size_then = lung_rads_category(d, kind), lung_rads_category(prior.diameter_mm, kind)
    if LUNG_RADS_ORDER.index(by_size_now) > LUNG_RADS_ORDER.index(by_size_then):
        return says(by_size_now, f"crossed a size threshold ({prior.diameter_mm:.1f} to {d:.1f} mm) without growth: by size")
    state = "stable" if change is ChangeLabel.STABLE else "decreased"
    interval = prior.interval_days
    if before == "4A" and interval >= _FOLLOW_UP_3_MONTHS_DAYS:
        return says("3", f"category 4A {state} at >=3-month follow-up (stepped management)")
    if before == "3" and interval >= _FOLLOW_UP_6_MONTHS_DAYS:
        return says("2", f"category 3 {state} at >=6-month follow-up (stepped management)")
    if before in ("1", "2"):
        return says("2", f"{state} since a category {before} exam (benign behaviour)")
    if before in ("3", "4A", "4B", "4X"):
        return says(before, f"category {before} {state} after {interval} days: no step down")
    return lung_rads_2022_baseline(d, kind)


def c_lung_rads(finding: Finding) -> Assessment:
    """C-Lung-RADS (Chinese Lung Nodules Reporting and Data System; Nat Med 2024;30:3184-3195,
    Table 1) by density and size: solid <6 mm 1, 6 to <10 mm 2, 10 to <18 mm 3, >=18 mm 4;
    part-solid <6 mm 1, >=6 mm 2 as a floor (solid component not measured); non-solid <6 mm 1,
    6 to <20 mm 2, >=20 mm 3; calcifications 0. Its later steps (model-predicted malignancy,
    follow-up data) are not implemented: the change since the prior is reported beside it."""
    d, kind = finding.diameter_mm, finding.nodule_type

    def says(category: str, clause: str) -> Assessment:
        return Assessment(RuleSet.C_LUNG_RADS, category, f"C-Lung-RADS {category}: {clause} (Table 1, size and density only)")

    if kind is NoduleType.CALCIFIED:
        return says("0", "calcification")
    if kind is NoduleType.GROUND_GLASS:
        return says("1", "non-solid <6 mm") if d < 6 else says("2", "non-solid 6 to <20 mm") if d < 20 else says("3", "non-solid >=20 mm")
    if kind is NoduleType.PART_SOLID:
        return says("1", "part-solid <6 mm") if d < 6 else says("2", "part-solid >=6 mm (solid component not measured: 2 as a floor)")
    if d < 6:
        return says("1", "solid <6 mm")
    if d < 10:
        return says("2", "solid 6 to <10 mm")
    if d < 18:
        return says("3", "solid 10 to <18 mm")
    return says("4", "solid >=18 mm")


def fleischner_2017(finding: Finding) -> Assessment:
    """Fleischner Society 2017 (MacMahon et al., Radiology 2017;284:228-243), single incidental
    nodule, low-risk patient, in adults outside screening. The category names the recommendation.

    Solid: <6 mm no routine follow-up; 6-8 mm CT at 6-12 months; >8 mm CT at 3 months, PET/CT
    or tissue sampling. Non-solid: <6 mm no routine follow-up; >=6 mm CT at 6-12 months, then
    every 2 years to 5 years. Part-solid: <6 mm no routine follow-up; >=6 mm CT at 3-6 months,
    then annually to 5 years. With the prior: growth calls for tissue sampling or resection;
    a solid nodule stable for 2 years, a subsolid one for 5 years, needs no further follow-up.
    """
    d, kind, change = finding.diameter_mm, finding.nodule_type, finding.change

    def says(category: str, clause: str) -> Assessment:
        return Assessment(RuleSet.FLEISCHNER_2017, category, f"Fleischner 2017: {clause}")

    if kind is NoduleType.CALCIFIED:
        return says("benign", "benign calcification: no follow-up")
    if change is ChangeLabel.GROWING:
        return says("growing-sampling-or-resection", "growing nodule: tissue sampling or resection to be considered")
    if change in (ChangeLabel.STABLE, ChangeLabel.SHRINKING) and finding.prior is not None:
        needed = FLEISCHNER_SOLID_STABLE_DAYS if kind is NoduleType.SOLID else FLEISCHNER_SUBSOLID_STABLE_DAYS
        if finding.prior.interval_days >= needed:
            return says("no-further-follow-up", f"{kind.value} nodule stable for >= {needed // 365} years")
    if kind is NoduleType.SOLID:
        if d < 6:
            return says("no-routine-follow-up", "solid <6 mm: no routine follow-up")
        if d <= 8:
            return says("ct-6-12-months", "solid 6-8 mm: CT at 6-12 months")
        return says("ct-3-months-pet-or-sampling", "solid >8 mm: CT at 3 months, PET/CT or tissue sampling")
    if d < 6:
        return says("no-routine-follow-up", f"{kind.value} <6 mm: no routine follow-up")
    if kind is NoduleType.GROUND_GLASS:
        return says("ct-6-12-months-then-2-yearly-to-5-years", "non-solid >=6 mm: CT at 6-12 months, then every 2 years to 5 years")
    return says("ct-3-6-months-then-annual-to-5-years", "part-solid >=6 mm: CT at 3-6 months, then annually to 5 years")


_ASSESSORS = {RuleSet.LUNG_RADS_2022: lung_rads_2022_with_prior, RuleSet.C_LUNG_RADS: c_lung_rads,
              RuleSet.FLEISCHNER_2017: fleischner_2017}
_ORDERS = {RuleSet.LUNG_RADS_2022: LUNG_RADS_ORDER, RuleSet.C_LUNG_RADS: C_LUNG_RADS_ORDER,
           RuleSet.FLEISCHNER_2017: FLEISCHNER_ORDER}


def apply_history(findings: Sequence[Finding], rule_set: RuleSet | str = RuleSet.LUNG_RADS_2022) -> tuple[Finding, ...]:
    """Each finding's suggested Lung-RADS v2022 category with its history (``lung_rads``),
    whether it is actionable (category 3 or above), and its ``assessment`` under ``rule_set``.

    Works on baseline findings too (``change`` None): then the categories are the baseline ones.
    """
    rule_set = RuleSet(rule_set)
    out = []
    for f in findings:
        lung_rads = lung_rads_2022_with_prior(f)
        assessment = lung_rads if rule_set is RuleSet.LUNG_RADS_2022 else _ASSESSORS[rule_set](f)
        actionable = f.actionable if f.change is None else lung_rads.category not in ("1", "2")
        out.append(replace(f, lung_rads=lung_rads.category, actionable=actionable, assessment=assessment))
    return tuple(out)


def exam_assessment(findings: Sequence[Finding], rule_set: RuleSet | str = RuleSet.LUNG_RADS_2022) -> Assessment | None:
    """The exam's category: that of its most concerning nodule under ``rule_set`` (Lung-RADS
    categorises an exam by its most concerning finding; the others are read the same way), with
    that nodule's rule. None without findings (no AI finding is not a negative exam)."""
    rule_set = RuleSet(rule_set)
    assessed = [f.assessment if f.assessment is not None and f.assessment.rule_set is rule_set
                else _ASSESSORS[rule_set](f) for f in findings]
    if not assessed:
        return None
    return max(assessed, key=lambda a: _ORDERS[rule_set].index(a.category))
