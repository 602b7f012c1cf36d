"""Raw detector scores to calibrated probabilities, as the model card's ``calibration`` says.

Platt scaling (a logistic on the score) or isotonic regression (a monotone step function,
interpolated linearly between its knots). Both are monotone and stay within [0, 1].
"""

from __future__ import annotations

import numpy as np

from lungscreen.errors import ModelError


def calibrate(scores: np.ndarray | list[float], calibration: dict) -> np.ndarray:
    """Map raw ``scores`` to probabilities in [0, 1]."""
    s = np.asarray(scores, dtype=np.float64)
    method = calibration["method"]
    if method == "platt":
        z = calibration["a"] * s + calibration["b"]
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic, without overflow for large |z|
    if method == "isotonic":
        x, y = np.asarray(calibration["x"], float), np.asarray(calibration["y"], float)
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
            raise ModelError("isotonic calibration needs increasing x and non-decreasing y")
        return np.interp(s, x, y)
    raise ModelError(f"unknown calibration method {method!r}")
