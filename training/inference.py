"""Run a scan through the product's own path: Detector -> postprocess (calibration, second stage, rules).

:func:`detect_scan` does what :func:`server.pipeline.analyze_study` does between the volume and
the report (preprocess, infer, decode, map to source voxels, measure the candidates inside the
volume with :func:`models.postprocess.measure`) and asks the second stage, when the card has one,
about every candidate that some threshold down to ``floor`` could report. :meth:`ScanDetections.findings`
then applies a threshold, the second stage's rule and the clinical rules as
:func:`models.postprocess.postprocess` does, so evaluation numbers are the product's, and one
detector pass serves every threshold and rule an evaluation compares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from lungscreen.findings import Candidate, Finding
from lungscreen.models.calibrate import calibrate
from lungscreen.models.detector import Detector
from lungscreen.models.postprocess import measure
from lungscreen.models.rules import ClinicalRules, apply_rules, reportable
from lungscreen.models.second_stage import SecondStage, VetoRule
from lungscreen.training.scan import Nodule, Scan

# Candidates calibrated below this are never asked about (no operating point goes that low).
SECOND_STAGE_FLOOR = 0.01


@dataclass(frozen=True, eq=False)
class ScanDetections:
    """One scan's ground truth and raw candidates (with what the rules need to judge them)."""

    name: str
    nodules: tuple[Nodule, ...]
    candidates: tuple[Candidate, ...]
    findings_template: tuple[Finding, ...]  # one per candidate; probability filled in by findings()
    seconds: float
    irrelevant: tuple[Nodule, ...] = ()
    # The second stage's score per candidate; NaN where it was not asked (or there is none).
    second_stage_logits: np.ndarray | None = None
    second_stage_seconds: float = 0.0

    @property
    def scores(self) -> np.ndarray:
        return np.array([c.score for c in self.candidates], dtype=np.float64)

    @property
    def centres_lps(self) -> np.ndarray:
        return np.array([f.center_lps_mm for f in self.findings_template], dtype=np.float64).reshape(-1, 3)

    def probabilities(self, calibration: dict) -> np.ndarray:
        return calibrate(self.scores, calibration) if self.candidates else np.zeros(0)

    def findings(
        self, calibration: dict, threshold: float, rules: ClinicalRules, veto: VetoRule | None = None
    ) -> tuple[Finding, ...]:
        """What the report would list at ``threshold`` (calibrated), after ``veto`` and the clinical rules."""
        probs = self.probabilities(calibration)
        findings = [replace(f, probability=float(p)) for f, p in zip(self.findings_template, probs)]
        if veto is not None:
            logits = self.second_stage_logits
            if logits is None:
                raise ValueError(f"{self.name}: no second-stage scores to apply a veto with")
            findings = [
                f for f, logit in zip(findings, logits)
                if not (reportable(f, threshold, rules) and veto.vetoes(float(logit), f.diameter_mm, f.probability))
            ]  # fmt: skip
        kept, _ = apply_rules(findings, threshold, rules)
        return kept


def detect_scan(
    detector: Detector, scan: Scan, second_stage: SecondStage | None = None, rules: ClinicalRules = ClinicalRules()
) -> ScanDetections:
    """Candidates of ``scan`` as the server finds them, timed (preprocessing included), and the
    second stage's score of each that a threshold down to :data:`SECOND_STAGE_FLOOR` could report."""
    start = time.perf_counter()
    candidates, _ = detector.detect(scan.voxels, scan.affine)
    shape = np.array(scan.voxels.shape)
    inside = [
        c for c in candidates if np.all(np.array(c.center_kji) >= -0.5) and np.all(np.array(c.center_kji) <= shape - 0.5)
    ]
    measured = measure(inside, scan.voxels, scan.affine, detector.card.calibration)
    templates = tuple(replace(f, probability=0.0) for f in measured)
    seconds = time.perf_counter() - start
    logits, stage_seconds = None, 0.0
    if second_stage is not None:
        start = time.perf_counter()
        asked = [i for i, f in enumerate(measured) if reportable(f, SECOND_STAGE_FLOOR, rules)]
        logits = np.full(len(measured), np.nan)
        logits[asked] = second_stage.scores(
            scan.voxels, scan.affine, np.array([measured[i].center_lps_mm for i in asked]),
            np.array([measured[i].diameter_mm for i in asked]),
        )  # fmt: skip
        stage_seconds = time.perf_counter() - start
    return ScanDetections(
        scan.name, scan.nodules, tuple(inside), templates, seconds, scan.irrelevant, logits, stage_seconds
    )
