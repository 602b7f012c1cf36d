"""Detection metrics, LUNA16 protocol: hits, FROC, CPM, sensitivity by size, ECE, bootstrap.

A candidate hits a nodule when its centre lies within the nodule's radius (LUNA16). A
nodule hit by several candidates counts once, by its best-scored candidate; the other
candidates hitting it are neither true nor false positives (LUNA16's evaluation script
does the same). Every other candidate is a false positive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# LUNA16's FROC points: false positives per scan at which sensitivity is averaged into CPM.
CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Size bands (mm) of the report: below the actionable size, Lung-RADS 3, 4A and 4B.
SIZE_BANDS_MM = ((0.0, 6.0), (6.0, 8.0), (8.0, 15.0), (15.0, float("inf")))


@dataclass(frozen=True)
class ScanMatches:
    """One scan's candidates, scored, each matched to the nodule it hits (-1: none)."""

    scores: np.ndarray  # (n,)
    hit: np.ndarray  # (n,) int: index of the nodule hit, -1 if none
    diameters_mm: np.ndarray  # (m,) of the scan's nodules


def match(centres_mm: np.ndarray, nodule_centres_mm: np.ndarray, nodule_diameters_mm: np.ndarray) -> np.ndarray:
    """For each candidate centre, the nodule whose radius contains it (the nearest of several), or -1."""
    centres = np.asarray(centres_mm, float).reshape(-1, 3)
    nodules = np.asarray(nodule_centres_mm, float).reshape(-1, 3)
    if len(centres) == 0 or len(nodules) == 0:
        return np.full(len(centres), -1, dtype=int)
    dist = np.linalg.norm(centres[:, None, :] - nodules[None, :, :], axis=-1)
    inside = dist <= np.asarray(nodule_diameters_mm, float)[None, :] / 2
    nearest = np.argmin(np.where(inside, dist, np.inf), axis=1)
    return np.where(inside.any(axis=1), nearest, -1)


def _pooled(scans: Sequence[ScanMatches]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All candidates that count: (score, is_tp, nodule size) with duplicate hits dropped."""
    scores, tps, sizes = [], [], []
    for scan in scans:
        order = np.argsort(-scan.scores, kind="stable")
        seen: set[int] = set()
        for i in order:
            h = int(scan.hit[i])
            if h >= 0 and h in seen:
                continue  # a second hit on the same nodule: ignored
            if h >= 0:
                seen.add(h)
            scores.append(scan.scores[i])
            tps.append(h >= 0)
            sizes.append(scan.diameters_mm[h] if h >= 0 else np.nan)
    return np.array(scores, float), np.array(tps, bool), np.array(sizes, float)


def froc(scans: Sequence[ScanMatches], size_band: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FROC operating points ``(thresholds, fp_per_scan, sensitivity)`` at every distinct score.

    With ``size_band``, sensitivity counts only nodules of that size (false positives are all).
    Point ``t`` means "every candidate with score >= thresholds[t] is reported".
    """
    scores, tp, sizes = _pooled(scans)
    all_sizes = np.concatenate([s.diameters_mm for s in scans]) if scans else np.zeros(0)
    if size_band is None:
        in_band, n_nodules = np.ones_like(tp), len(all_sizes)
    else:
        in_band = (sizes >= size_band[0]) & (sizes < size_band[1])
        n_nodules = int(((all_sizes >= size_band[0]) & (all_sizes < size_band[1])).sum())
    order = np.argsort(-scores, kind="stable")
    scores, tp, in_band = scores[order], tp[order], in_band[order]
    last_of_each = np.flatnonzero(np.append(np.diff(scores) != 0, True))  # the last of each distinct score
    fps = np.cumsum(~tp)[last_of_each] / max(len(scans), 1)
    sens = np.cumsum(tp & in_band)[last_of_each] / max(n_nodules, 1)
    return scores[last_of_each], fps.astype(float), sens.astype(float)


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """Best sensitivity among FROC points with at most ``rate`` false positives per scan (0 if none)."""
    ok = fps <= rate
    return float(sens[ok].max()) if ok.any() else 0.0


def cpm(scans: Sequence[ScanMatches]) -> tuple[float, dict[float, float]]:
    """Competition performance metric: mean sensitivity at :data:`CPM_FP_RATES`, and each point."""
    _, fps, sens = froc(scans)
    points = {rate: sensitivity_at(fps, sens, rate) for rate in CPM_FP_RATES}
    return float(np.mean(list(points.values()))), points


def at_threshold(scans: Sequence[ScanMatches], threshold: float) -> dict[str, float]:
    """Sensitivity (all, and per size band) and FP per scan when reporting scores >= ``threshold``."""
    scores, tp, sizes = _pooled(scans)
    kept = scores >= threshold
    all_sizes = np.concatenate([s.diameters_mm for s in scans]) if scans else np.zeros(0)
    out = {"fp_per_scan": float(np.sum(kept & ~tp)) / max(len(scans), 1)}
    out["sensitivity"] = float(np.sum(kept & tp)) / max(len(all_sizes), 1)
    for lo, hi in SIZE_BANDS_MM:
        n = int(((all_sizes >= lo) & (all_sizes < hi)).sum())
        found = int(np.sum(kept & tp & (sizes >= lo) & (sizes < hi)))
        out[f"sensitivity_{_band_name(lo, hi)}"] = found / n if n else float("nan")
        out[f"nodules_{_band_name(lo, hi)}"] = n
    return out


def _band_name(lo: float, hi: float) -> str:
    return f"ge{lo:g}mm" if hi == float("inf") else f"{lo:g}to{hi:g}mm" if lo > 0 else f"lt{hi:g}mm"


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of (share of samples) * |accuracy - confidence|."""
    p = np.asarray(probabilities, float)
    y = np.asarray(labels, float)
    if len(p) == 0:
        return 0.0
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(total)


def bootstrap_ci(
    statistic: Callable[[list[int]], float], n_scans: int, rng: np.random.Generator, resamples: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``statistic(scan indices)`` over resamplings of the scans."""
    values = [statistic(list(rng.integers(0, n_scans, n_scans))) for _ in range(resamples)]
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)
