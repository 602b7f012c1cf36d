"""Isotonic calibration: monotone, within [0, 1], a valid card block; operating points."""

from __future__ import annotations

import numpy as np

from lungscreen.models.calibrate import calibrate
from lungscreen.models.card import validate_card
from lungscreen.models.rules import ClinicalRules
from lungscreen.training.calibrate import choose_threshold, fit_isotonic
from lungscreen.training.export import model_card
from toy_scans import toy_scan


def test_isotonic_is_monotone_and_bounded() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(500)
    labels = (rng.random(500) < scores**2).astype(float)
    calibration = fit_isotonic(scores, labels)
    grid = np.linspace(-0.5, 1.5, 401)
    probs = calibrate(grid, calibration)
    assert np.all(np.diff(probs) >= 0)
    assert probs.min() >= 0 and probs.max() <= 1
    # Roughly the truth p = s^2 in the middle of the range.
    assert abs(float(calibrate([0.7], calibration)[0]) - 0.49) < 0.15
    card = model_card("t", "0")
    card["calibration"] = calibration
    validate_card(card)


def test_isotonic_of_a_constant_label_is_flat() -> None:
    calibration = fit_isotonic(np.array([0.1, 0.2, 0.3]), np.zeros(3))
    assert np.all(calibrate([0.0, 0.5, 1.0], calibration) == 0.0)


def test_screening_threshold_keeps_at_most_one_false_finding_pertoy_scan() -> None:
    scans = [toy_scan([0.9, 0.8, 0.7, 0.6], 0), toy_scan([0.85, 0.75, 0.65, 0.55], 1)]
    identity = {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 1.0]}
    threshold, counts = choose_threshold(scans, identity, 1.0, ClinicalRules())
    # At 0.75 each scan reports 1 FP (0.8 / 0.85) and its nodule; at 0.7 scan A has 2 FPs.
    assert threshold == 0.75
    assert counts == {"fp_per_scan": 1.0, "sensitivity": 1.0, "sensitivity_ge6mm": 1.0}
