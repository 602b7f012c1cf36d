"""Run a scan through the product's own path: Detector -> calibration -> clinical rules.

:func:`detect_scan` does what :func:`server.pipeline.analyze_study` does between the volume and
the report (preprocess, infer, decode, map to source voxels, drop candidates outside the
volume); :meth:`ScanDetections.findings` then calibrates and applies the clinical rules at a
threshold, like the pipeline's postprocess stage. So evaluation numbers are the product's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from lungscreen.models.calibrate import calibrate
from lungscreen.models.detector import Detector
from lungscreen.findings import Candidate, Finding
from lungscreen.models.measure import nodule_type, sphere_volume_mm3
from lungscreen.models.rules import ClinicalRules, apply_rules
from lungscreen.training.scan import Nodule, Scan


@dataclass(frozen=True, eq=False)
class ScanDetections:
    """One scan's ground truth and raw candidates (with what the rules need to judge them)."""

    name: str
    nodules: tuple[Nodule, ...]
    candidates: tuple[Candidate, ...]
    findings_template: tuple[Finding, ...]  # one per candidate; probability filled in by findings()
    seconds: float

    @property
    def scores(self) -> np.ndarray:
        return np.array([c.score for c in self.candidates], dtype=np.float64)

    @property
    def centres_lps(self) -> np.ndarray:
        return np.array([f.center_lps_mm for f in self.findings_template], dtype=np.float64).reshape(-1, 3)

    def probabilities(self, calibration: dict) -> np.ndarray:
        return calibrate(self.scores, calibration) if self.candidates else np.zeros(0)

    def findings(self, calibration: dict, threshold: float, rules: ClinicalRules) -> tuple[Finding, ...]:
        """What the report would list at ``threshold`` (calibrated), after the clinical rules."""
        probs = self.probabilities(calibration)
        findings = [replace(f, probability=float(p)) for f, p in zip(self.findings_template, probs)]
        kept, _ = apply_rules(findings, threshold, rules)
        return kept


def detect_scan(detector: Detector, scan: Scan) -> ScanDetections:
    """Candidates of ``scan`` as the server finds them, timed (preprocessing included)."""
    start = time.perf_counter()
    candidates, _ = detector.detect(scan.voxels, scan.affine)
    shape = np.array(scan.voxels.shape)
    inside = [
        c for c in candidates if np.all(np.array(c.center_kji) >= -0.5) and np.all(np.array(c.center_kji) <= shape - 0.5)
    ]
    spacing = scan.spacing
    templates = tuple(
        Finding(
            center_kji=c.center_kji,
            center_lps_mm=tuple(float(v) for v in scan.affine[:3, :3] @ np.array(c.center_kji) + scan.affine[:3, 3]),
            diameter_mm=c.diameter_mm,
            volume_mm3=sphere_volume_mm3(c.diameter_mm),
            probability=0.0,
            nodule_type=nodule_type(scan.voxels, c.center_kji, c.diameter_mm, spacing),
            lung_rads="",
            actionable=False,
            outside_lungs_mm=c.outside_lungs_mm,
        )
        for c in inside
    )
    return ScanDetections(scan.name, scan.nodules, tuple(inside), templates, time.perf_counter() - start)
