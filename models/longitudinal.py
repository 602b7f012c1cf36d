"""Nodules across time: match the prior study's nodules to the current findings, label the change.

After :mod:`lungscreen.models.registration` has carried the prior nodule centres into the
current study's coordinates, each prior nodule is paired with at most one current finding
and vice versa (Hungarian assignment, ``scipy.optimize.linear_sum_assignment``, on the
centre distance), and a pair is only accepted within a gate that grows with nodule size (a
large nodule's detected centre moves more than a small one's). Then, per current finding:

* ``new``: no prior nodule matched, and the prior's analysis saw no unreported candidate
  within :func:`seen_gate_mm` either (else it is compared with that candidate);
* ``growing`` / ``shrinking``: the diameter changed by more than 1.5 mm up / down, the
  Lung-RADS v2022 growth threshold ("an increase in mean diameter of >1.5 mm within a
  12-month interval"). LungScreen's diameter is the sphere-equivalent diameter of the nodule
  segmented on the HU volume (:func:`lungscreen.models.measure.segmented_size`), the same
  measurement at both times; it stands in for the mean diameter;
* ``stable``: otherwise;

and each unmatched prior nodule is ``resolved`` only where aerated lung has taken its place:
where the current analysis saw an unreported candidate, a nodule can be segmented, or the
tissue is dense, it is ``still_seen`` (below the operating point or the rules this time, not
gone), and outside the current study's range ``not_scanned``. For solid nodules that grew in volume, the
volume doubling time is ``interval * ln 2 / ln(V2 / V1)`` days (Schwartz 1961; Lung-RADS and
the European position statement use it for solid nodules: under 400 days is suspicious).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from lungscreen.findings import (
    ChangeLabel, Comparison, ComparisonStatus, Finding, NoduleType, PriorMeasurement, PriorNodule, RuleSet, StillSeen,
)
from lungscreen.models.measure import NO_NODULE_CORE_HU, core_hu, segmented_size
from lungscreen.models.registration import AlignmentImage, RigidTransform, align
from lungscreen.models.rules import apply_history

GROWTH_THRESHOLD_MM = 1.5  # Lung-RADS v2022: mean diameter up by more than 1.5 mm
MIN_GATE_MM = 10.0  # a pair further apart than this (or the size-scaled gate) is two nodules
GATE_PER_DIAMETER = 1.0  # the gate grows with the larger of the two diameters
# An unreported candidate stands for a nodule only this near (or half the larger diameter):
# a lung holds ~20 candidates, so a wide gate would find one by chance.
SEEN_GATE_MIN_MM = 5.0


@dataclass(frozen=True)
class Match:
    current_index: int
    prior_index: int
    distance_mm: float


def matching_gate_mm(current_diameter_mm: float, prior_diameter_mm: float) -> float:
    return max(MIN_GATE_MM, GATE_PER_DIAMETER * max(current_diameter_mm, prior_diameter_mm))


def seen_gate_mm(current_diameter_mm: float, prior_diameter_mm: float) -> float:
    return max(SEEN_GATE_MIN_MM, 0.5 * max(current_diameter_mm, prior_diameter_mm))


def match_nodules(
    current: Sequence[Finding], prior: Sequence[PriorNodule], transform: RigidTransform, gate_mm=matching_gate_mm,
) -> tuple[Match, ...]:
    """One-to-one pairs (current, prior) minimising the summed centre distance, each within its
    gate ``gate_mm(current diameter, prior diameter)``."""
    if not current or not prior:
        return ()
    current_lps = np.array([f.center_lps_mm for f in current], dtype=np.float64)
    prior_lps = transform.apply(np.array([p.center_lps_mm for p in prior], dtype=np.float64))
    distance = np.linalg.norm(current_lps[:, None, :] - prior_lps[None, :, :], axis=2)
    gate = np.array([[gate_mm(c.diameter_mm, p.diameter_mm) for p in prior] for c in current])
    # Pairs outside the gate cost more than any allowed set of pairs, so the assignment never
    # trades an allowed pair for a forbidden one; they are dropped after.
    forbidden = distance > gate
    cost = np.where(forbidden, 1e6 + distance, distance)
    rows, cols = linear_sum_assignment(cost)
    return tuple(
        Match(int(r), int(c), float(distance[r, c])) for r, c in zip(rows, cols) if not forbidden[r, c]
    )


def change_label(current_diameter_mm: float, prior_diameter_mm: float) -> ChangeLabel:
    """Lung-RADS v2022 growth: mean diameter up by more than 1.5 mm; down by as much: shrinking."""
    delta = current_diameter_mm - prior_diameter_mm
    if delta > GROWTH_THRESHOLD_MM:
        return ChangeLabel.GROWING
    if delta < -GROWTH_THRESHOLD_MM:
        return ChangeLabel.SHRINKING
    return ChangeLabel.STABLE


def volume_doubling_time_days(prior_volume_mm3: float, current_volume_mm3: float, interval_days: float) -> float | None:
    """``interval * ln 2 / ln(V2 / V1)``; None where undefined (no growth, no interval, no volume)."""
    if interval_days <= 0 or prior_volume_mm3 <= 0 or current_volume_mm3 <= prior_volume_mm3:
        return None
    return interval_days * math.log(2) / math.log(current_volume_mm3 / prior_volume_mm3)


@dataclass(frozen=True)
class PriorStudyNodules:
    """The prior study's identity and nodules, as the comparison needs them."""

    study_uid: str
    study_date: str  # DICOM DA
    nodules: tuple[PriorNodule, ...]
    image: AlignmentImage | None = None  # None: no alignment, the scanners' coordinates are used
    unreported: tuple[PriorNodule, ...] = ()  # candidates its analysis saw but did not report


def label_changes(
    current: Sequence[Finding], prior: PriorStudyNodules, transform: RigidTransform, interval_days: int
) -> tuple[tuple[Finding, ...], tuple[PriorNodule, ...]]:
    """The current findings with ``change``, ``prior``, ``volume_doubling_time_days`` and the
    prior's ``tracking_uid`` set, and the prior nodules now unmatched.

    A finding that matches no reported prior nodule but lies where the prior's analysis saw an
    unreported candidate is not new: it is compared with that candidate (``prior.reported``
    False, its size as segmented then, a tracking UID of its own)."""
    matches = {m.current_index: m for m in match_nodules(current, prior.nodules, transform)}
    unmatched = [i for i in range(len(current)) if i not in matches]
    seen_before = {
        unmatched[m.current_index]: m
        for m in match_nodules([current[i] for i in unmatched], prior.unreported, transform, seen_gate_mm)
    }
    labelled = []
    for index, finding in enumerate(current):
        match = matches.get(index)
        if match is None and index in seen_before:
            before = prior.unreported[seen_before[index].prior_index]
            labelled.append(_compared(finding, before, prior, interval_days, reported=False))
            continue
        if match is None:
            labelled.append(replace(finding, change=ChangeLabel.NEW))
            continue
        labelled.append(_compared(finding, prior.nodules[match.prior_index], prior, interval_days, reported=True))
    matched_prior = {m.prior_index for m in matches.values()}
    resolved = tuple(p for i, p in enumerate(prior.nodules) if i not in matched_prior)
    return tuple(labelled), resolved


def _compared(finding: Finding, before: PriorNodule, prior: PriorStudyNodules, interval_days: int, *, reported: bool) -> Finding:
    vdt = None
    if finding.nodule_type is NoduleType.SOLID:
        vdt = volume_doubling_time_days(before.volume_mm3, finding.volume_mm3, interval_days)
    return replace(
        finding,
        change=change_label(finding.diameter_mm, before.diameter_mm),
        prior=PriorMeasurement(
            study_uid=prior.study_uid, study_date=prior.study_date, diameter_mm=before.diameter_mm,
            volume_mm3=before.volume_mm3, interval_days=interval_days, lung_rads=before.lung_rads, reported=reported,
            center_lps_mm=tuple(before.center_lps_mm),
        ),
        volume_doubling_time_days=vdt,
        tracking_uid=before.tracking_uid or finding.tracking_uid,
        tracking_id=before.tracking_id or finding.tracking_id,
    )


def still_seen(
    unmatched: Sequence[PriorNodule], transform: RigidTransform, voxels: np.ndarray, affine: np.ndarray,
    current_unreported: Sequence[Finding] = (),
) -> tuple[tuple[PriorNodule, ...], tuple[StillSeen, ...], tuple[PriorNodule, ...]]:
    """Split the unmatched prior nodules into those gone and those still seen at their place:
    where the current analysis saw an unreported candidate, or a nodule can be segmented in the
    current volume ``voxels`` [k, j, i] HU (``affine`` to LPS mm), or the place is not aerated
    lung (a nodule is only called resolved where lung parenchyma has taken its place). Third:
    those outside what the current study scanned, of which nothing can be said."""
    gone, seen, not_scanned = [], [], []
    by_candidate = {m.prior_index: m for m in match_nodules(current_unreported, unmatched, transform, seen_gate_mm)}
    to_index = np.linalg.inv(affine[:3, :3])
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    for index, nodule in enumerate(unmatched):
        if index in by_candidate:
            seen.append(StillSeen(nodule, current_unreported[by_candidate[index].current_index].diameter_mm))
            continue
        kji = (transform.apply(np.array(nodule.center_lps_mm)) - affine[:3, 3]) @ to_index.T
        inside = np.all(kji >= 0) and np.all(kji <= np.array(voxels.shape) - 1)
        if not inside:
            not_scanned.append(nodule)
            continue
        size = segmented_size(voxels, kji, nodule.diameter_mm, spacing)
        if size is not None:
            seen.append(StillSeen(nodule, size.diameter_mm))
        elif core_hu(voxels, kji, nodule.diameter_mm, spacing) >= NO_NODULE_CORE_HU:
            seen.append(StillSeen(nodule, None))
        else:
            gone.append(nodule)
    return tuple(gone), tuple(seen), tuple(not_scanned)


def interval_days(prior_date: str, current_date: str) -> int:
    """Days between two DICOM DA dates (YYYYMMDD)."""
    from datetime import date

    def parse(value: str) -> date:
        value = value.strip()
        if len(value) != 8 or not value.isdigit():
            raise ValueError(f"not a DICOM date (YYYYMMDD): {value!r}")
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))

    return (parse(current_date) - parse(prior_date)).days


def compare_with_prior(
    findings: Sequence[Finding],
    current_image: AlignmentImage | None,
    current_date: str,
    prior: PriorStudyNodules,
    rule_set: RuleSet | str = RuleSet.LUNG_RADS_2022,
    current_volume: tuple[np.ndarray, np.ndarray] | None = None,
    current_unreported: Sequence[Finding] = (),
) -> tuple[tuple[Finding, ...], Comparison]:
    """Align, match, label and recategorise: the follow-up report's findings and its comparison.
    ``current_volume`` (HU [k, j, i], affine) and ``current_unreported`` (the candidates the
    current analysis did not report): where an unmatched prior nodule is looked for before it is
    called resolved."""
    days = interval_days(prior.study_date, current_date)
    if days <= 0:
        raise ValueError(f"the prior study ({prior.study_date}) is not earlier than the current one ({current_date})")
    residual = None
    transform = RigidTransform.identity()
    if prior.image is not None and current_image is not None:
        alignment = align(prior.image, current_image)
        transform = alignment.transform
        residual = alignment.residual_mm if alignment.lungs_found else None
    labelled, resolved = label_changes(findings, prior, transform, days)
    seen: tuple[StillSeen, ...] = ()
    not_scanned: tuple[PriorNodule, ...] = ()
    if current_volume is not None:
        resolved, seen, not_scanned = still_seen(resolved, transform, *current_volume, current_unreported)
    comparison = Comparison(
        status=ComparisonStatus.COMPARED, prior_study_uid=prior.study_uid, prior_study_date=prior.study_date,
        interval_days=days, resolved=resolved, still_seen=seen, not_scanned=not_scanned, alignment_residual_mm=residual,
    )
    return apply_history(labelled, rule_set), comparison
