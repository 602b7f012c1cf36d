"""LUNA16 metrics against numbers computed by hand on a toy case."""

from __future__ import annotations

import numpy as np
import pytest

from lungscreen.training.metrics import ScanMatches, at_threshold, bootstrap_ci, cpm, expected_calibration_error, froc, match

# Scan A: nodules 0 (10 mm) and 1 (5 mm). Candidates 0.9 hits 0, 0.8 FP, 0.7 hits 0 again
# (ignored), 0.3 FP. Scan B: nodule 0 (7 mm). Candidates 0.6 FP, 0.5 hits 0.
SCAN_A = ScanMatches(np.array([0.9, 0.8, 0.7, 0.3]), np.array([0, -1, 0, -1]), np.array([10.0, 5.0]))
SCAN_B = ScanMatches(np.array([0.6, 0.5]), np.array([-1, 0]), np.array([7.0]))


def test_froc_by_hand() -> None:
    thresholds, fps, sens = froc([SCAN_A, SCAN_B])
    # 3 nodules, 2 scans. >=0.9: 1 TP; >=0.8: +1 FP; >=0.6: +1 FP; >=0.5: +1 TP; >=0.3: +1 FP.
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.6, 0.5, 0.3])
    np.testing.assert_allclose(fps, [0.0, 0.5, 1.0, 1.0, 1.5])
    np.testing.assert_allclose(sens, [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_cpm_by_hand() -> None:
    score, points = cpm([SCAN_A, SCAN_B])
    # 1/3 at 1/8, 1/4, 1/2 FP/scan; 2/3 from 1 FP/scan on: (3 * 1/3 + 4 * 2/3) / 7 = 11/21.
    assert points[0.5] == pytest.approx(1 / 3)
    assert points[1.0] == pytest.approx(2 / 3)
    assert score == pytest.approx(11 / 21)


def test_at_threshold_size_bands() -> None:
    stats = at_threshold([SCAN_A, SCAN_B], 0.55)
    # Kept: 0.9 (TP, 10 mm), 0.8 FP, 0.6 FP -> 1 FP per scan, 1 of 3 nodules.
    assert stats["fp_per_scan"] == pytest.approx(1.0)
    assert stats["sensitivity"] == pytest.approx(1 / 3)
    assert stats["sensitivity_8to15mm"] == 1.0
    assert stats["sensitivity_6to8mm"] == 0.0
    assert stats["nodules_lt6mm"] == 1
    assert np.isnan(stats["sensitivity_ge15mm"])


def test_match_within_radius_only() -> None:
    nodules = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    centres = np.array([[4.9, 0.0, 0.0], [5.1, 0.0, 0.0], [18.0, 0.0, 0.0]])
    np.testing.assert_array_equal(match(centres, nodules, [10.0, 6.0]), [0, -1, 1])
    assert match(np.zeros((0, 3)), nodules, [10.0, 6.0]).shape == (0,)


def test_ece_by_hand() -> None:
    # Bin 0.1-0.2: p 0.15, 0.15, labels 0, 1 -> |0.5 - 0.15| = 0.35 on half the samples;
    # bin 0.9-1.0: p 0.95, 0.95, labels 1, 1 -> |1 - 0.95| = 0.05 on the other half.
    ece = expected_calibration_error(np.array([0.15, 0.15, 0.95, 0.95]), np.array([0, 1, 1, 1]))
    assert ece == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)


def test_bootstrap_interval_contains_the_estimate() -> None:
    values = np.array([0.0, 1.0, 1.0, 1.0])
    lo, hi = bootstrap_ci(lambda idx: float(values[idx].mean()), 4, np.random.default_rng(0), resamples=200)
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
