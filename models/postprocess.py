"""The postprocess stage: candidates to the findings of a report.

Calibrated probability, type and volume of each candidate inside the volume (:func:`measure`),
the size of those at or above the operating point segmented on the HU volume
(:func:`lungscreen.models.measure.segmented_size`),
the second stage's veto on the ones that could be reported (:mod:`models.second_stage`, when the
model card has one), then the clinical rules (:mod:`models.rules`). ``server.pipeline`` and
``training.inference`` both call :func:`postprocess`, so evaluation numbers are the product's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lungscreen.findings import Candidate, Finding
from lungscreen.models.calibrate import calibrate
from lungscreen.models.measure import nodule_type, segmented_size, sphere_volume_mm3
from lungscreen.models.rules import ClinicalRules, apply_rules, reportable
from lungscreen.models.second_stage import SecondStage

SUPPRESSED_SECOND_STAGE = "second_stage_veto"
UNREPORTED_FLOOR = 0.01  # calibrated probability: unreported candidates a follow-up still compares with
MAX_UNREPORTED = 30
# Unreported candidates up to this size are segmented too (a few ms each): a follow-up that finds
# a nodule where one of them was measures its growth one way at both times.
MAX_SEGMENTED_UNREPORTED_MM = 20.0


@dataclass(frozen=True)
class Postprocessed:
    findings: tuple[Finding, ...]  # the report's
    suppressed: dict[str, int]  # candidates each rule removed
    # Candidates not reported (below the operating point, vetoed, under the size rule or the cap)
    # but at or above UNREPORTED_FLOOR inside the lungs, the most probable first, segmented like
    # the findings up to MAX_SEGMENTED_UNREPORTED_MM: a follow-up does not call a nodule new, or
    # gone, when they show it was or still is there.
    unreported: tuple[Finding, ...]


def measure(candidates: list[Candidate], voxels: np.ndarray, affine: np.ndarray, calibration: dict) -> list[Finding]:
    """Calibrated probability, type and volume of each candidate inside the volume.

    ``voxels`` is the source HU volume ``[k, j, i]``, ``affine`` maps ``(k, j, i, 1)`` to LPS mm.
    """
    shape = np.array(voxels.shape)
    inside = [c for c in candidates if np.all(np.array(c.center_kji) >= -0.5) and np.all(np.array(c.center_kji) <= shape - 0.5)]
    probabilities = calibrate([c.score for c in inside], calibration)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return [
        Finding(
            center_kji=c.center_kji,
            center_lps_mm=tuple(float(v) for v in affine[:3, :3] @ np.array(c.center_kji) + affine[:3, 3]),
            diameter_mm=c.diameter_mm,
            volume_mm3=sphere_volume_mm3(c.diameter_mm),
            probability=float(p),
            nodule_type=nodule_type(voxels, c.center_kji, c.diameter_mm, spacing),
            lung_rads="",
            actionable=False,
            outside_lungs_mm=c.outside_lungs_mm,
        )
        for c, p in zip(inside, probabilities)
    ]


def _with_segmented_size(finding: Finding, voxels: np.ndarray, affine: np.ndarray) -> Finding:
    """The finding with the size segmented on the HU volume, when the nodule can be segmented."""
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    size = segmented_size(voxels, finding.center_kji, finding.diameter_mm, spacing)
    if size is None:
        return finding
    return replace(finding, diameter_mm=size.diameter_mm, volume_mm3=size.volume_mm3)


def second_stage_vetoes(
    findings: list[Finding], voxels: np.ndarray, affine: np.ndarray, second_stage: SecondStage, threshold: float,
    rules: ClinicalRules,
) -> list[bool]:
    """Per finding, whether the second stage drops it. Only the findings that the operating
    point and the rules would report, and that its rule does not exempt, are looked at."""
    rule = second_stage.rule
    asked = [
        i for i, f in enumerate(findings)
        if reportable(f, threshold, rules) and not rule.exempt(f.diameter_mm, f.probability)
    ]  # fmt: skip
    logits = second_stage.scores(
        voxels, affine, np.array([findings[i].center_lps_mm for i in asked]), np.array([findings[i].diameter_mm for i in asked])
    )
    vetoed = [False] * len(findings)
    for i, logit in zip(asked, logits):
        vetoed[i] = rule.vetoes(float(logit), findings[i].diameter_mm, findings[i].probability)
    return vetoed


def postprocess(
    candidates: list[Candidate], voxels: np.ndarray, affine: np.ndarray, card_calibration: dict, threshold: float,
    rules: ClinicalRules, second_stage: SecondStage | None,
) -> Postprocessed:
    """The report's findings at ``threshold``, how many candidates each rule suppressed, and the
    unreported candidates a follow-up compares with."""
    sized = [
        _with_segmented_size(f, voxels, affine) if f.probability >= threshold else f
        for f in measure(candidates, voxels, affine, card_calibration)
    ]  # sizes of what may be reported (the rules and the second stage read them), not of every candidate
    findings = sized
    vetoed_count = 0
    if second_stage is not None:
        vetoed = second_stage_vetoes(findings, voxels, affine, second_stage, threshold, rules)
        vetoed_count = sum(vetoed)
        findings = [f for f, v in zip(findings, vetoed) if not v]
    kept, suppressed = apply_rules(findings, threshold, rules)
    if second_stage is not None:
        suppressed[SUPPRESSED_SECOND_STAGE] = vetoed_count
    reported = {f.center_kji for f in kept}
    unreported = sorted(
        (f for f in sized if f.center_kji not in reported and f.probability >= UNREPORTED_FLOOR
         and not (f.outside_lungs_mm is not None and rules.max_outside_lungs_mm is not None
                  and f.outside_lungs_mm > rules.max_outside_lungs_mm)),
        key=lambda f: f.probability, reverse=True,
    )
    unreported = [
        _with_segmented_size(f, voxels, affine)
        if f.probability < threshold and f.diameter_mm <= MAX_SEGMENTED_UNREPORTED_MM else f  # else segmented already
        for f in unreported[:MAX_UNREPORTED]
    ]
    return Postprocessed(kept, suppressed, tuple(unreported))
