"""Follow-up evaluation: pairs of (prior, current) CT with a known truth, and what the comparison got.

``lungscreen evaluate-followup [--work-dir DIR] [--json PATH]`` builds the pairs, runs the
analysis of each prior (as LungScreen's history would have it), then the current study with it,
and prints per pair: every nodule matched to the right prior nodule, every change label right,
growth error (mm) against the truth, alignment error at the nodules (mm), and the time the
comparison added (stage ``compare`` / the rest of the current study's analysis).

Pairs (all from the real LIDC-IDRI-0001 in ``../shared/data``; research use):

* ``lidc-growing``: the prior is the scan a year earlier with the LUNA16 nodule (world
  (56.21, 86.34, -115.87), 23.35 mm) replaced by an 18 mm sphere, the patient rotated by
  (2, -3, 4) degrees and shifted by (6, -4, 9) mm;
* ``lidc-new``: the prior without that nodule, rotated by (-4, 2, -2) degrees and shifted by
  (-10, 7, -5) mm, 400 days earlier;
* ``synthetic-growth``: the same synthetic nodule inserted at two sizes (7 mm then 10 mm, a
  growth of 3 mm) and a second one at 9 mm in both (stable), the prior rotated and shifted.

Every other detection of the scan (the same anatomy at both timepoints) must be matched and
stable. A synthetic figure never stands in for real anatomy: the synthetic-nodule pair is
reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage
from scipy.spatial.transform import Rotation

from lungscreen.findings import ChangeLabel
from lungscreen.models.lungs import lung_mask
from lungscreen.models.registration import RigidTransform

LUNA16_NODULE_LPS = (56.21, 86.34, -115.87)
LUNA16_NODULE_MM = 23.35
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_STABLE_TOLERANCE_MM = 1.5  # Lung-RADS growth threshold: "stable" nodules must not exceed it


@dataclass(frozen=True)
class TruthNodule:
    current_lps: tuple[float, float, float]
    change: ChangeLabel
    growth_mm: float | None  # current minus prior diameter, as made; None for a new nodule


@dataclass(frozen=True)
class FollowUpPair:
    name: str
    current_dir: Path
    prior_dir: Path
    transform: RigidTransform  # prior LPS -> current LPS, as made
    truth: tuple[TruthNodule, ...]
    synthetic_nodules: bool


# --------------------------------------------------------------------------- making pairs


def _lps_grid_to_index(affine: np.ndarray, lps: np.ndarray) -> np.ndarray:
    return (lps - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def _distance_mm(shape, affine, centre_lps, box_mm: float):
    centre = _lps_grid_to_index(affine, np.asarray(centre_lps, float))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lo = np.maximum(np.floor(centre - box_mm / spacing), 0).astype(int)
    hi = np.minimum(np.ceil(centre + box_mm / spacing) + 1, shape).astype(int)
    grid = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), distance


def paint_nodule(hu: np.ndarray, affine: np.ndarray, centre_lps, diameter_mm: float, value_hu: float = 20.0) -> None:
    """A solid sphere of ``diameter_mm`` with a one-voxel partial-volume edge, in place."""
    region, distance = _distance_mm(hu.shape, affine, centre_lps, diameter_mm / 2 + 3)
    edge = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    fraction = np.clip((diameter_mm / 2 - distance) / edge + 0.5, 0.0, 1.0)
    block = hu[region]
    hu[region] = np.maximum(block, block * (1 - fraction) + value_hu * fraction)


def remove_nodule(hu: np.ndarray, affine: np.ndarray, centre_lps, diameter_mm: float, rng: np.random.Generator) -> None:
    """Replace soft tissue within the nodule's sphere (+2 mm) by lung parenchyma, in place."""
    region, distance = _distance_mm(hu.shape, affine, centre_lps, diameter_mm / 2 + 3)
    block = hu[region]
    inside = (distance <= diameter_mm / 2 + 2) & (block > -600)
    block[inside] = -860.0 + rng.normal(0.0, 25.0, int(inside.sum()))
    hu[region] = block


def rigid_prior(hu: np.ndarray, affine: np.ndarray, transform: RigidTransform) -> tuple[np.ndarray, np.ndarray]:
    """The prior scan: where the patient lay ``transform``-inverse away, on the current grid less
    the slices that would reach beyond the scanned range. Returns (HU, affine)."""
    # prior index p -> prior LPS A p + o -> current LPS (transform) -> current index A^-1 (y - o)
    a, o = affine[:3, :3], affine[:3, 3]
    a_inv = np.linalg.inv(a)
    matrix = a_inv @ transform.rotation @ a
    offset = a_inv @ (transform.rotation @ (o - transform.centre) + transform.centre + transform.translation - o)
    moved = ndimage.affine_transform(hu, matrix, offset, order=1, cval=-1024.0, output=np.float32)
    _, rows, columns = hu.shape
    corners = np.array([[0, 0], [0, columns - 1], [rows - 1, 0], [rows - 1, columns - 1]], float)
    kept = [k for k in range(hu.shape[0])
            if np.all(((matrix[0, 1:] @ corners.T) + matrix[0, 0] * k + offset[0] >= 0)
                      & ((matrix[0, 1:] @ corners.T) + matrix[0, 0] * k + offset[0] <= hu.shape[0] - 1))]
    prior_affine = affine.copy()
    prior_affine[:3, 3] = a @ [kept[0], 0, 0] + o
    return moved[kept[0] : kept[-1] + 1], prior_affine


def write_study(hu, affine, out_dir: Path, study_date: str, study_uid: str | None = None) -> Path:
    from lungscreen.training.dicom_writer import write_ct_series

    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    written = write_ct_series(hu, spacing, out_dir, origin_lps=tuple(affine[:3, 3]), study_instance_uid=study_uid,
                              patient_id="FOLLOWUP-EVAL-1", accession_number=f"ACC{study_date}")
    for path in written.paths:  # the writer's date is fixed; the pair needs two
        ds = pydicom.dcmread(path)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
        ds.save_as(path, enforce_file_format=True)
    return out_dir


def rigid_transform(degrees, shift_mm, centre) -> RigidTransform:
    return RigidTransform(Rotation.from_euler("xyz", degrees, degrees=True).as_matrix(), np.array(shift_mm, float), np.array(centre, float))


def _lung_spots(hu: np.ndarray, affine: np.ndarray, count: int, avoid_lps, min_depth_mm: float = 15.0) -> list[tuple]:
    """``count`` deterministic points deep inside the lungs, far from each other and from ``avoid_lps``."""
    from lungscreen.models.registration import alignment_image

    coarse = alignment_image(hu, affine)  # the lungs at ~4 mm are enough to choose a spot
    spacing = np.linalg.norm(coarse.affine[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(lung_mask(coarse.hu), sampling=spacing)
    candidates = np.argwhere(depth >= min_depth_mm)
    candidates = candidates[np.argsort(-depth[tuple(candidates.T)], kind="stable")]
    chosen: list[np.ndarray] = []
    for index in candidates:
        lps = coarse.affine[:3, :3] @ index + coarse.affine[:3, 3]
        if np.linalg.norm(lps - np.asarray(avoid_lps)) < 60 or any(np.linalg.norm(lps - c) < 60 for c in chosen):
            continue
        chosen.append(lps)
        if len(chosen) == count:
            break
    return [tuple(float(v) for v in c) for c in chosen]


def make_pairs(work_dir: Path, data: Path = SHARED_DATA) -> list[FollowUpPair]:
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    series_dir = data / "lidc_idri" / "LIDC-IDRI-0001"
    series = index_study(sorted(series_dir.rglob("*.dcm"))).series[0]
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    hu, affine = volume.voxels.astype(np.float32), volume.affine
    rng = np.random.default_rng(17)
    centre = (0.0, 0.0, -175.0)  # about the middle of the chest: rotations about it
    pairs = []

    current_dir = write_study(hu, affine, work_dir / "lidc-current", "20260115")

    shrunk = hu.copy()
    remove_nodule(shrunk, affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, rng)
    paint_nodule(shrunk, affine, LUNA16_NODULE_LPS, 18.0)
    t1 = rigid_transform((2.0, -3.0, 4.0), (6.0, -4.0, 9.0), centre)
    prior_hu, prior_affine = rigid_prior(shrunk, affine, t1)
    pairs.append(FollowUpPair(
        "lidc-growing", current_dir, write_study(prior_hu, prior_affine, work_dir / "lidc-growing-prior", "20250115"), t1,
        (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.GROWING, LUNA16_NODULE_MM - 18.0),), False,
    ))

    removed = hu.copy()
    remove_nodule(removed, affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, rng)
    t2 = rigid_transform((-4.0, 2.0, -2.0), (-10.0, 7.0, -5.0), centre)
    prior_hu, prior_affine = rigid_prior(removed, affine, t2)
    pairs.append(FollowUpPair(
        "lidc-new", current_dir, write_study(prior_hu, prior_affine, work_dir / "lidc-new-prior", "20241211"), t2,
        (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.NEW, None),), False,
    ))

    spot_a, spot_b = _lung_spots(hu, affine, 2, LUNA16_NODULE_LPS)
    current_synthetic, prior_synthetic = hu.copy(), hu.copy()
    paint_nodule(current_synthetic, affine, spot_a, 10.0)
    paint_nodule(prior_synthetic, affine, spot_a, 7.0)
    paint_nodule(current_synthetic, affine, spot_b, 9.0)
    paint_nodule(prior_synthetic, affine, spot_b, 9.0)
    t3 = rigid_transform((3.0, 3.0, -3.0), (-5.0, -8.0, 6.0), centre)
    prior_hu, prior_affine = rigid_prior(prior_synthetic, affine, t3)
    pairs.append(FollowUpPair(
        "synthetic-growth", write_study(current_synthetic, affine, work_dir / "synthetic-current", "20260115"),
        write_study(prior_hu, prior_affine, work_dir / "synthetic-prior", "20250110"), t3,
        (TruthNodule(spot_a, ChangeLabel.GROWING, 3.0), TruthNodule(spot_b, ChangeLabel.STABLE, 0.0)), True,
    ))
    return pairs


# --------------------------------------------------------------------------- evaluating


@dataclass
class PairResult:
    name: str
    synthetic_nodules: bool
    findings: int = 0
    matched_right: int = 0  # current findings paired to the prior finding the truth says (or rightly new)
    matched_wrong: list[str] = field(default_factory=list)
    truth_found: int = 0
    truth_total: int = 0
    labels_right: int = 0
    label_errors: list[str] = field(default_factory=list)
    growth_errors_mm: list[float] = field(default_factory=list)
    alignment_error_mm: float = float("nan")  # at the current findings: estimated vs true transform
    resolved: int = 0  # prior findings left unmatched; every prior nodule of these pairs is still there
    compare_s: list[float] = field(default_factory=list)  # per repetition
    analysis_s: list[float] = field(default_factory=list)  # the current study's analysis without the comparison


def evaluate_pair(pair: FollowUpPair, analyzer, repeat: int = 1) -> PairResult:
    from lungscreen.server.pipeline import PriorImages, analyze_study
    from lungscreen.server.priors import prior_from_result

    prior_result = analyze_study(sorted(pair.prior_dir.iterdir()), replace(analyzer, keep_alignment_image=True))
    prior = prior_from_result(prior_result)
    out = PairResult(pair.name, pair.synthetic_nodules)
    # As the server runs every study: the prior already analysed, the current one keeping its own
    # alignment image for its later follow-ups (a stage of every study, not of the comparison).
    current_analyzer = replace(analyzer, keep_alignment_image=True)
    prior_images = PriorImages(tuple(sorted(pair.prior_dir.iterdir())), prior_result.series_uid)  # the SR's evidence
    for _ in range(repeat):
        result = analyze_study(sorted(pair.current_dir.iterdir()), current_analyzer, prior=prior, prior_images=prior_images)
        out.compare_s.append(result.timings.get("compare", float("nan")))
        out.analysis_s.append(sum(v for k, v in result.timings.items() if k != "compare"))
    out.findings, out.truth_total = len(result.report.findings), len(pair.truth)
    out.resolved = len(result.report.comparison.resolved)
    prior_by_uid = {n.tracking_uid: n for n in prior.nodules}
    prior_true_lps = [pair.transform.apply(np.array(n.center_lps_mm)) for n in prior.nodules]
    truth_at = {t: np.array(t.current_lps) for t in pair.truth}
    for finding in result.report.findings:
        here = np.array(finding.center_lps_mm)
        truth = next((t for t, p in truth_at.items() if np.linalg.norm(p - here) <= max(5.0, finding.diameter_mm / 2)), None)
        # The prior finding that is truly this nodule: one whose true position lies within reach.
        true_partner = None
        if truth is None or truth.change is not ChangeLabel.NEW:
            near = [(np.linalg.norm(p - here), n) for p, n in zip(prior_true_lps, prior.nodules)
                    if np.linalg.norm(p - here) <= max(5.0, 0.5 * max(finding.diameter_mm, n.diameter_mm))]
            true_partner = min(near, key=lambda x: x[0])[1] if near else None
        got = prior_by_uid.get(finding.tracking_uid) if finding.change is not ChangeLabel.NEW else None
        label = f"{finding.tracking_id} ({finding.diameter_mm:.1f} mm at {np.round(here, 1).tolist()})"
        if got is true_partner:
            out.matched_right += 1
        else:
            out.matched_wrong.append(f"{label}: matched {getattr(got, 'tracking_id', None)}, truth {getattr(true_partner, 'tracking_id', None)}")
        expected = truth.change if truth is not None else (ChangeLabel.NEW if true_partner is None else None)
        if truth is not None:
            out.truth_found += 1
            if truth.growth_mm is not None and finding.prior is not None:
                out.growth_errors_mm.append(abs(finding.diameter_mm - finding.prior.diameter_mm - truth.growth_mm))
        if expected is None:  # the same anatomy at both timepoints: stable, or within the measurement noise
            if finding.change is ChangeLabel.STABLE:
                out.labels_right += 1
            else:
                out.label_errors.append(f"{label}: {finding.change.value}, the same anatomy at both times")
        elif finding.change is expected:
            out.labels_right += 1
        else:
            out.label_errors.append(f"{label}: {finding.change.value}, truth {expected.value}")
    if prior.image is not None and result.alignment_image is not None and result.report.findings:
        from lungscreen.models.registration import align

        estimated = align(prior.image, result.alignment_image).transform
        points = np.array([f.center_lps_mm for f in result.report.findings])
        in_prior = pair.transform.inverse_apply(points)
        out.alignment_error_mm = float(np.linalg.norm(estimated.apply(in_prior) - points, axis=1).max())
    return out


def summarize(results: list[PairResult]) -> dict:
    rows = {}
    for r in results:
        rows[r.name] = {
            "synthetic_nodules": r.synthetic_nodules,
            "findings": r.findings,
            "matched_right": f"{r.matched_right}/{r.findings}",
            "matched_wrong": r.matched_wrong,
            "truth_found": f"{r.truth_found}/{r.truth_total}",
            "labels_right": f"{r.labels_right}/{r.findings}",
            # a prior detection with no current one: the detector found it in one scan only
            "resolved_wrongly": r.resolved,
            "label_errors": r.label_errors,
            "growth_error_mm_max": max(r.growth_errors_mm) if r.growth_errors_mm else None,
            "alignment_error_mm_max": round(r.alignment_error_mm, 2),
            "compare_s": {"min": round(min(r.compare_s), 3), "median": round(float(np.median(r.compare_s)), 3)},
            "analysis_s": {"min": round(min(r.analysis_s), 3), "median": round(float(np.median(r.analysis_s)), 3)},
            # per repetition, then the median: both timings come from the same run
            "compare_share_median": round(float(np.median(np.array(r.compare_s) / np.array(r.analysis_s))), 3),
        }
    return rows


def cmd_evaluate_followup(args: argparse.Namespace) -> int:
    from lungscreen.server.config import load_settings
    from lungscreen.server.workers import build_analyzer

    analyzer = build_analyzer(load_settings(args.config))
    with tempfile.TemporaryDirectory(prefix="lungscreen-followup-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pairs = make_pairs(work, Path(args.data) if args.data else SHARED_DATA)
        print(f"pairs made in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        from lungscreen.server.pipeline import analyze_study

        analyze_study(sorted(pairs[0].current_dir.iterdir()), analyzer)  # ONNX Runtime's start-up: not counted
        summary = summarize([evaluate_pair(p, analyzer, args.repeat) for p in pairs])
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate-followup", help="follow-up comparison on pairs with a known truth (LIDC-IDRI-0001)")
    p.add_argument("--config", type=Path)
    p.add_argument("--data", type=Path, help="the shared data folder (default ../shared/data)")
    p.add_argument("--work-dir", type=Path, help="keep the pairs' DICOM files here")
    p.add_argument("--json", type=Path)
    p.add_argument("--repeat", type=int, default=3, help="analyses of each current study, for the timings (default 3)")
    p.set_defaults(func=cmd_evaluate_followup)
