"""The site's own figures from its radiologists' verdicts (:mod:`server.feedback`).

Per model, operating point and period (the month, or week, in which a study got its first
verdict, UTC): the studies reviewed (any verdict or missed nodule), false marks per scan
(rejected findings per reviewed study), acceptance overall, by suggested Lung-RADS category
and by size band, and missed nodules per scan. Every figure comes with the number of studies
behind it and a 95 % confidence interval: Wilson's score interval for proportions
(acceptance), the exact (Garwood, chi-square) Poisson interval on the count for per-scan
rates, divided by the number of studies.

The proposed operating point (:func:`propose_operating_point`) is the lowest threshold on the
calibrated probability (the model card's) at which the rejected findings would have come to at
most the site's target of false marks per scan; the sensitivity it would cost is stated as
the share of the radiologists' nodules (accepted findings plus missed nodules) still marked.
It only ever raises the threshold: findings below the threshold in use were never shown, so
the verdicts say nothing about lowering it. The figures are in-sample (the proposal is chosen
and judged on the same verdicts): the longer the site's history, the better. Research use,
not for diagnostic use.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from lungscreen.server.feedback import ACCEPTED, REJECTED, FindingVerdict, MissedNodule
from scipy.stats import chi2, norm

from lungscreen.findings import LUNG_RADS_ORDER

CONFIDENCE = 0.95
SIZE_BANDS = ((0.0, 6.0, "<6 mm"), (6.0, 8.0, "6 to <8 mm"), (8.0, 15.0, "8 to <15 mm"), (15.0, math.inf, ">=15 mm"))
"""Lung-RADS v2022 solid-nodule size bands (by diameter)."""
PERIODS = ("month", "week", "all")


@dataclass(frozen=True)
class Proportion:
    successes: int
    trials: int
    studies: int  # studies behind the trials
    value: float | None  # None without trials
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Rate:
    """Events per reviewed study."""

    events: int
    studies: int
    value: float | None
    low: float | None
    high: float | None


def wilson(successes: int, trials: int, studies: int, confidence: float = CONFIDENCE) -> Proportion:
    """Wilson score interval (Wilson 1927) for ``successes`` of ``trials``."""
    if trials == 0:
        return Proportion(successes, trials, studies, None, None, None)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return Proportion(successes, trials, studies, p, max(0.0, centre - half), min(1.0, centre + half))


def poisson_rate(events: int, studies: int, confidence: float = CONFIDENCE) -> Rate:
    """``events`` per study with the exact (Garwood 1936) Poisson interval on the count."""
    if studies == 0:
        return Rate(events, studies, None, None, None)
    alpha = 1 - confidence
    low = 0.0 if events == 0 else float(chi2.ppf(alpha / 2, 2 * events)) / 2
    high = float(chi2.ppf(1 - alpha / 2, 2 * events + 2)) / 2
    return Rate(events, studies, events / studies, low / studies, high / studies)


def size_band(diameter_mm: float) -> str:
    return next(label for low, high, label in SIZE_BANDS if low <= diameter_mm < high)


def period_of(epoch: float, period: str) -> str:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {PERIODS}: {period!r}")
    if period == "all":
        return "all"
    when = time.gmtime(epoch)
    if period == "month":
        return time.strftime("%Y-%m", when)
    year, week, _ = datetime.date(when.tm_year, when.tm_mon, when.tm_mday).isocalendar()
    return f"{year}-W{week:02d}"


@dataclass(frozen=True)
class GroupFigures:
    model: str
    operating_point: str
    score_threshold: float
    period: str
    studies: int
    false_marks_per_scan: Rate
    missed_per_scan: Rate
    acceptance: Proportion
    acceptance_by_lung_rads: dict[str, Proportion] = field(default_factory=dict)
    acceptance_by_size: dict[str, Proportion] = field(default_factory=dict)


def _proportion(verdicts: Sequence[FindingVerdict]) -> Proportion:
    accepted = sum(v.verdict == ACCEPTED for v in verdicts)
    return wilson(accepted, len(verdicts), len({v.finding.study_uid for v in verdicts}))


def site_figures(
    verdicts: Sequence[FindingVerdict], missed: Sequence[MissedNodule], *, period: str = "month"
) -> list[GroupFigures]:
    """The figures per (model, operating point, threshold, period), oldest period first.

    ``verdicts`` are the latest verdict per finding (:meth:`FeedbackStore.verdicts`). A study
    falls in the period of its first record (verdict or missed nodule) at that operating point.
    """
    first_seen: dict[tuple, float] = {}
    for key, at in [((v.finding.model, v.finding.operating_point, v.finding.score_threshold, v.finding.study_uid), v.at)
                    for v in verdicts] + [((m.model, m.operating_point, m.score_threshold, m.study_uid), m.at)
                                          for m in missed]:
        first_seen[key] = min(at, first_seen.get(key, at))
    studies: dict[tuple, set[str]] = defaultdict(set)
    for (model, point, threshold, study_uid), at in first_seen.items():
        studies[(model, point, threshold, period_of(at, period))].add(study_uid)
    group_of = {
        (model, point, threshold, study_uid): (model, point, threshold, period_of(at, period))
        for (model, point, threshold, study_uid), at in first_seen.items()
    }
    judged: dict[tuple, list[FindingVerdict]] = defaultdict(list)
    for v in verdicts:
        f = v.finding
        judged[group_of[(f.model, f.operating_point, f.score_threshold, f.study_uid)]].append(v)
    missing: dict[tuple, int] = defaultdict(int)
    for m in missed:
        missing[group_of[(m.model, m.operating_point, m.score_threshold, m.study_uid)]] += 1

    figures = []
    for key in sorted(studies, key=lambda k: (k[3], k[0], k[1], k[2])):
        model, point, threshold, when = key
        n = len(studies[key])
        these = judged.get(key, [])
        by_category = defaultdict(list)
        by_size = defaultdict(list)
        for v in these:
            by_category[v.finding.lung_rads].append(v)
            by_size[size_band(v.finding.diameter_mm)].append(v)
        figures.append(
            GroupFigures(
                model=model, operating_point=point, score_threshold=threshold, period=when, studies=n,
                false_marks_per_scan=poisson_rate(sum(v.verdict == REJECTED for v in these), n),
                missed_per_scan=poisson_rate(missing.get(key, 0), n),
                acceptance=_proportion(these),
                acceptance_by_lung_rads={
                    c: _proportion(by_category[c]) for c in sorted(by_category, key=LUNG_RADS_ORDER.index)
                },
                acceptance_by_size={label: _proportion(by_size[label]) for *_, label in SIZE_BANDS if label in by_size},
            )
        )
    return figures


@dataclass(frozen=True)
class ProposedOperatingPoint:
    model: str
    based_on: str  # the operating point the verdicts were made at
    current_threshold: float
    threshold: float  # proposed, on the calibrated probability
    target_false_marks_per_scan: float
    studies: int
    false_marks_per_scan_now: float
    false_marks_per_scan_proposed: float
    sensitivity_now: Proportion  # radiologists' nodules the AI marked: accepted / (accepted + missed)
    sensitivity_proposed: Proportion
    findings_given_up: int  # accepted findings below the proposed threshold
    note: str

    @property
    def evidence(self) -> str:
        """A one-line summary to record with the decision."""
        return (
            f"{self.studies} studies reviewed at {self.based_on} (threshold {self.current_threshold:g}): false marks per "
            f"scan {self.false_marks_per_scan_now:.2f} -> {self.false_marks_per_scan_proposed:.2f} "
            f"(target {self.target_false_marks_per_scan:g}), sensitivity to the radiologists' nodules "
            f"{_pct(self.sensitivity_now.value)} -> {_pct(self.sensitivity_proposed.value)}"
        )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def propose_operating_point(
    verdicts: Sequence[FindingVerdict], missed: Sequence[MissedNodule], *, model: str, operating_point: str,
    target_false_marks_per_scan: float,
) -> ProposedOperatingPoint | None:
    """The lowest threshold (at or above the one in use) that brings the verdicts' false marks
    per scan to at most the target, pooled over all periods of ``model`` at ``operating_point``;
    None without verdicts there. Candidate thresholds are the one in use and the midpoints
    between consecutive distinct probabilities of judged findings (above the highest: halfway
    to 1), so a threshold never sits on a judged finding's probability."""
    these = [v for v in verdicts if v.finding.model == model and v.finding.operating_point == operating_point]
    lost = [m for m in missed if m.model == model and m.operating_point == operating_point]
    if not these:
        return None
    current = max(v.finding.score_threshold for v in these)
    n = len({v.finding.study_uid for v in these} | {m.study_uid for m in lost})
    rejected = sorted(v.finding.probability for v in these if v.verdict == REJECTED)
    accepted = sorted(v.finding.probability for v in these if v.verdict == ACCEPTED)
    truth = len(accepted) + len(lost)  # the nodules the radiologists confirmed or added
    studies_with_truth = len({v.finding.study_uid for v in these if v.verdict == ACCEPTED} | {m.study_uid for m in lost})

    def false_marks(t: float) -> float:
        return sum(p >= t for p in rejected) / n

    def sensitivity(t: float) -> Proportion:
        return wilson(sum(p >= t for p in accepted), truth, studies_with_truth)

    levels = sorted({v.finding.probability for v in these})
    candidates = [current] + [
        (a + b) / 2 for a, b in zip(levels, levels[1:] + [1.0]) if (a + b) / 2 > current
    ]
    threshold = next((t for t in candidates if false_marks(t) <= target_false_marks_per_scan), candidates[-1])
    note = (
        "the threshold in use already meets the target" if threshold == current
        else "raises the threshold; in-sample (chosen and judged on the same verdicts); never applied by itself"
    )
    return ProposedOperatingPoint(
        model=model, based_on=operating_point, current_threshold=current, threshold=round(threshold, 6),
        target_false_marks_per_scan=target_false_marks_per_scan, studies=n,
        false_marks_per_scan_now=false_marks(current), false_marks_per_scan_proposed=false_marks(threshold),
        sensitivity_now=sensitivity(current), sensitivity_proposed=sensitivity(threshold),
        findings_given_up=sum(p < threshold for p in accepted), note=note,
    )


def propose_operating_points(
    verdicts: Sequence[FindingVerdict], missed: Sequence[MissedNodule], *, target_false_marks_per_scan: float
) -> list[ProposedOperatingPoint]:
    """:func:`propose_operating_point` for each (model, operating point) with verdicts."""
    found = (
        propose_operating_point(verdicts, missed, model=model, operating_point=point,
                                target_false_marks_per_scan=target_false_marks_per_scan)
        for model, point in sorted({(v.finding.model, v.finding.operating_point) for v in verdicts})
    )
    return [p for p in found if p is not None]


def as_json(figures: Sequence[GroupFigures], proposals: Sequence[ProposedOperatingPoint]) -> dict:
    return {
        "confidence": CONFIDENCE,
        "intervals": {"proportions": "Wilson score", "per-scan rates": "exact Poisson (Garwood) on the count / studies"},
        "groups": [asdict(g) for g in figures],
        "proposed_operating_points": [{**asdict(p), "evidence": p.evidence} for p in proposals],
        "notice": "Research use only. Not for diagnostic use.",
    }


def _interval(low: float | None, high: float | None, digits: int) -> str:
    return "" if low is None else f" (95% CI {low:.{digits}f}-{high:.{digits}f})"


def format_rate(rate: Rate) -> str:
    if rate.value is None:
        return "n/a"
    return f"{rate.value:.2f}{_interval(rate.low, rate.high, 2)}, {rate.events} in {rate.studies} studies"


def format_proportion(p: Proportion) -> str:
    if p.value is None:
        return "n/a"
    return f"{_pct(p.value)} ({p.successes}/{p.trials}; 95% CI {_pct(p.low)}-{_pct(p.high)}; {p.studies} studies)"


def render_text(figures: Sequence[GroupFigures], proposals: Sequence[ProposedOperatingPoint]) -> str:
    """The report ``lungscreen feedback report`` prints."""
    lines = ["LungScreen site figures from radiologists' verdicts (research use only, not for diagnostic use)",
             "95% intervals: Wilson score for proportions; exact Poisson (Garwood) for per-scan rates.", ""]
    if not figures:
        lines.append("No verdicts yet.")
    for g in figures:
        lines += [
            (f"{g.period} · {g.model} · operating point {g.operating_point} (threshold {g.score_threshold:g}) · "
             f"{g.studies} studies reviewed"),
            f"  false marks per scan: {format_rate(g.false_marks_per_scan)}",
            f"  missed nodules per scan: {format_rate(g.missed_per_scan)}",
            f"  acceptance: {format_proportion(g.acceptance)}",
        ]
        lines += [f"  acceptance, Lung-RADS {c}: {format_proportion(p)}" for c, p in g.acceptance_by_lung_rads.items()]
        lines += [f"  acceptance, {band}: {format_proportion(p)}" for band, p in g.acceptance_by_size.items()]
        lines.append("")
    for p in proposals:
        lines += [
            (f"Proposed operating point for {p.model} (from {p.based_on}, target {p.target_false_marks_per_scan:g} "
             f"false marks per scan): threshold {p.threshold:g} (in use: {p.current_threshold:g})"),
            (f"  false marks per scan {p.false_marks_per_scan_now:.2f} -> {p.false_marks_per_scan_proposed:.2f}; "
             f"sensitivity to the radiologists' nodules {format_proportion(p.sensitivity_now)} -> "
             f"{format_proportion(p.sensitivity_proposed)}; {p.findings_given_up} accepted finding(s) given up"),
            (f"  {p.note}. Apply with: lungscreen feedback apply-operating-point --threshold {p.threshold:g} "
             "--by NAME --evidence TEXT"),
            "",
        ]
    return "\n".join(lines)
