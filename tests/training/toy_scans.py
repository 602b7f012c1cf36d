"""Hand-made detections shared by the calibration and evaluation tests."""

from __future__ import annotations

from lungscreen.findings import Candidate, Finding, NoduleType
from lungscreen.training.inference import ScanDetections
from lungscreen.training.scan import Nodule


def toy_scan(scores: list[float], true_index: int) -> ScanDetections:
    """Candidates 10 mm apart along x; the one at ``true_index`` sits on a 10 mm nodule."""
    centres = [(10.0 * i, 0.0, 0.0) for i in range(len(scores))]
    candidates = tuple(Candidate((0.0, 0.0, float(i)), 8.0, s) for i, s in enumerate(scores))
    findings = tuple(
        Finding(c.center_kji, centre, 8.0, 268.0, 0.0, NoduleType.SOLID, "", False) for c, centre in zip(candidates, centres)
    )
    return ScanDetections("toy", (Nodule(centres[true_index], 10.0),), candidates, findings, 0.0)
