"""The ``center_heatmap_size`` decoder: peaks, offsets, diameters, NMS, registration."""

from __future__ import annotations

import numpy as np
import pytest

from lungscreen.models.decoding import DECODERS, decode
from lungscreen.errors import ModelError

DECODING = {"kind": "center_heatmap_size", "min_score": 0.1, "nms_radius_mm": 6.0, "max_candidates": 10, "output_stride": [4, 4, 4]}
SPACING = np.array([2.0, 2.0, 2.0])


def _output(peaks: list[tuple[tuple[int, int, int], float, float, tuple[float, float, float]]]) -> np.ndarray:
    out = np.zeros((5, 12, 12, 12), np.float32)
    out[1] = np.log(5.0)
    for cell, score, diameter, offset in peaks:
        out[(0, *cell)] = score
        out[(1, *cell)] = np.log(diameter)
        out[(slice(2, 5), *cell)] = offset
    return out


def test_registered() -> None:
    assert "center_heatmap_size" in DECODERS


def test_peaks_offsets_and_diameters() -> None:
    out = _output([((3, 4, 5), 0.9, 12.0, (0.25, -0.5, 0.0)), ((9, 9, 9), 0.5, 6.0, (0.0, 0.0, 0.0))])
    out[0, 3, 4, 6] = 0.6  # a shoulder next to the first peak: not a local maximum
    first, second = decode(out, SPACING, DECODING)
    assert first.index_xyz == pytest.approx((4 * 3.25, 4 * 3.5, 4 * 5.0))
    assert first.diameter_mm == pytest.approx(12.0)
    assert first.score == pytest.approx(0.9)
    assert second.index_xyz == pytest.approx((36.0, 36.0, 36.0)) and second.score == pytest.approx(0.5)


def test_min_score_nms_and_cap() -> None:
    # Two peaks 8 model voxels (16 mm) apart; the weaker lies within the stronger's 20 mm radius.
    out = _output([((3, 3, 3), 0.9, 40.0, (0, 0, 0)), ((5, 3, 3), 0.8, 5.0, (0, 0, 0)), ((10, 10, 10), 0.05, 5.0, (0, 0, 0))])
    (only,) = decode(out, SPACING, DECODING)
    assert only.score == pytest.approx(0.9)
    assert decode(out, SPACING, dict(DECODING, min_score=0.95)) == []
    out = _output([((2, 2, 2), 0.9, 5.0, (0, 0, 0)), ((8, 8, 8), 0.8, 5.0, (0, 0, 0))])
    assert len(decode(out, SPACING, dict(DECODING, max_candidates=1))) == 1


def test_diameter_is_clipped() -> None:
    out = _output([((3, 3, 3), 0.9, 1e6, (0, 0, 0))])
    assert decode(out, SPACING, DECODING)[0].diameter_mm == 60.0


def test_wrong_channel_count() -> None:
    with pytest.raises(ModelError, match="not \\(5, X, Y, Z\\)"):
        decode(np.zeros((3, 4, 4, 4), np.float32), SPACING, DECODING)


def test_round_trip_with_training_targets() -> None:
    """Targets written by training decode back to the nodule they describe."""
    from lungscreen.training.targets import build_targets

    t = build_targets(np.array([[21.3, 30.6, 9.1]]), np.array([7.5]), (48, 48, 48), 2.0)
    (c,) = decode(np.concatenate([t.heatmap, t.regression]), SPACING, DECODING)
    assert c.index_xyz == pytest.approx((21.3, 30.6, 9.1), abs=1e-4)
    assert c.diameter_mm == pytest.approx(7.5, rel=1e-5)
