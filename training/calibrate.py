"""Calibration and operating points, fitted on validation scans never used in training.

``python -m lungscreen.training.calibrate --card models/nodulenet --scans 60`` runs the card's detector
on synthetic validation scans (seed block ``validation``), labels every candidate TP (its
centre within a nodule's radius) or FP, fits isotonic regression (pool-adjacent-violators)
of the label on the raw score, and picks the operating points on the calibrated scale from
the report the product would produce (clinical rules applied):

* ``screening``: the lowest threshold with at most ``--screening-fp`` (1) false findings per scan;
* ``high-sensitivity``: the lowest threshold with at most ``--high-sensitivity-fp`` (4).

The card gets the calibration, the thresholds and the validation numbers behind them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungscreen.models.card import load_card, validate_card
from lungscreen.models.detector import Detector
from lungscreen.models.rules import ClinicalRules
from lungscreen.training.inference import ScanDetections, detect_scan
from lungscreen.training.metrics import expected_calibration_error, match
from lungscreen.training.sources import SEED_RANGES, synthetic_scan

SCREENING_FP_PER_SCAN = 1.0
HIGH_SENSITIVITY_FP_PER_SCAN = 4.0
# Knots of the isotonic map: blocks of at least this many candidates, so a handful of
# validation candidates cannot make a step of their own.
MIN_BLOCK_SIZE = 10


def labels_of(detections: ScanDetections) -> np.ndarray:
    """1 for candidates whose centre lies within a nodule's radius, else 0."""
    if not detections.candidates:
        return np.zeros(0)
    return (match(detections.centres_lps, [n.center_lps_mm for n in detections.nodules],
                  [n.diameter_mm for n in detections.nodules]) >= 0).astype(float)  # fmt: skip


def fit_isotonic(scores: np.ndarray, labels: np.ndarray, min_block: int = MIN_BLOCK_SIZE) -> dict:
    """Isotonic (non-decreasing) fit by pool-adjacent-violators, as a card ``calibration``.

    Knots sit at each block's mean score with the block's TP rate; the card interpolates
    linearly between them and holds the end values outside, so the map is monotone in [0, 1].
    """
    order = np.argsort(scores, kind="stable")
    s, y = np.asarray(scores, float)[order], np.asarray(labels, float)[order]
    # Start from blocks of min_block consecutive candidates, then merge violators.
    blocks = [[s[i : i + min_block].sum(), y[i : i + min_block].sum(), len(s[i : i + min_block])] for i in range(0, len(s), min_block)]
    merged: list[list[float]] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][1] / merged[-2][2] >= merged[-1][1] / merged[-1][2]:
            last = merged.pop()
            merged[-1] = [a + b for a, b in zip(merged[-1], last)]
    x = [b[0] / b[2] for b in merged]
    v = [b[1] / b[2] for b in merged]
    if len(x) == 1:  # a single block: a flat map still needs two knots
        x, v = [x[0] - 1e-6, x[0] + 1e-6], [v[0], v[0]]
    return {"method": "isotonic", "x": [round(a, 6) for a in x], "y": [round(b, 6) for b in v]}


def report_counts(
    detections: Sequence[ScanDetections], calibration: dict, threshold: float, rules: ClinicalRules
) -> dict[str, float]:
    """FP findings per scan and sensitivity (all, >= 6 mm) of the product's report at ``threshold``."""
    fp = found = found_6 = n = n_6 = 0
    for det in detections:
        findings = det.findings(calibration, threshold, rules)
        centres = np.array([f.center_lps_mm for f in findings]).reshape(-1, 3)
        hit = match(centres, [x.center_lps_mm for x in det.nodules], [x.diameter_mm for x in det.nodules])
        fp += int(np.sum(hit < 0))
        for i, nodule in enumerate(det.nodules):
            n += 1
            n_6 += nodule.diameter_mm >= 6
            if np.any(hit == i):
                found += 1
                found_6 += nodule.diameter_mm >= 6
    return {
        "fp_per_scan": fp / max(len(detections), 1),
        "sensitivity": found / max(n, 1),
        "sensitivity_ge6mm": found_6 / max(n_6, 1),
    }


def choose_threshold(
    detections: Sequence[ScanDetections], calibration: dict, max_fp_per_scan: float, rules: ClinicalRules
) -> tuple[float, dict[str, float]]:
    """The lowest calibrated threshold whose report has at most ``max_fp_per_scan`` false findings."""
    probs = np.unique(np.concatenate([d.probabilities(calibration) for d in detections] + [np.ones(1)]))
    best = (1.0, report_counts(detections, calibration, 1.0, rules))
    for t in probs[::-1]:  # from strict to lenient; FP/scan grows as t falls
        counts = report_counts(detections, calibration, float(t), rules)
        if counts["fp_per_scan"] > max_fp_per_scan:
            break
        best = (float(t), counts)
    return best


def run_validation(card_path: Path, n_scans: int) -> list[ScanDetections]:
    detector = Detector(load_card(card_path))
    first = SEED_RANGES["validation"][0]
    out = []
    for i in range(n_scans):
        out.append(detect_scan(detector, synthetic_scan(first + i)))
        print(f"validation scan {i + 1}/{n_scans}: {len(out[-1].candidates)} candidates, {out[-1].seconds:.1f} s", flush=True)
    return out


def calibrate_card(card_dir: Path, n_scans: int, screening_fp: float, high_sensitivity_fp: float) -> dict:
    card_path = Path(card_dir) / "model_card.json"
    detections = run_validation(card_path, n_scans)
    scores = np.concatenate([d.scores for d in detections])
    labels = np.concatenate([labels_of(d) for d in detections])
    calibration = fit_isotonic(scores, labels)
    probs = np.concatenate([d.probabilities(calibration) for d in detections])
    rules = ClinicalRules()
    screening_t, screening = choose_threshold(detections, calibration, screening_fp, rules)
    high_t, high = choose_threshold(detections, calibration, high_sensitivity_fp, rules)
    dataset = f"synthetic validation, {n_scans} scans (seeds {SEED_RANGES['validation'][0]}+, never trained on)"
    summary = {
        "ece_validation": expected_calibration_error(probs, labels),
        "candidates": int(len(labels)),
        "true_candidates": int(labels.sum()),
        "screening": {"threshold": screening_t, **screening},
        "high-sensitivity": {"threshold": high_t, **high},
        "dataset": dataset,
    }
    raw = json.loads(card_path.read_text())
    raw["calibration"] = calibration
    raw["operating_points"] = {
        "screening": {
            "threshold": round(screening_t, 6),
            "description": f"at most {screening_fp:g} false finding per scan on validation: measured "
            f"{screening['fp_per_scan']:.2f} FP/scan, sensitivity {screening['sensitivity']:.3f} "
            f"(>= 6 mm: {screening['sensitivity_ge6mm']:.3f}); {dataset}",
        },
        "high-sensitivity": {
            "threshold": round(high_t, 6),
            "description": f"at most {high_sensitivity_fp:g} false findings per scan on validation: measured "
            f"{high['fp_per_scan']:.2f} FP/scan, sensitivity {high['sensitivity']:.3f} "
            f"(>= 6 mm: {high['sensitivity_ge6mm']:.3f}); {dataset}",
        },
    }
    raw["default_operating_point"] = "screening"
    validate_card(raw)
    card_path.write_text(json.dumps(raw, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lungscreen.training.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--card", type=Path, required=True, help="model folder holding model_card.json")
    p.add_argument("--scans", type=int, default=60)
    p.add_argument("--screening-fp", type=float, default=SCREENING_FP_PER_SCAN)
    p.add_argument("--high-sensitivity-fp", type=float, default=HIGH_SENSITIVITY_FP_PER_SCAN)
    args = p.parse_args(argv)
    summary = calibrate_card(args.card, args.scans, args.screening_fp, args.high_sensitivity_fp)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
