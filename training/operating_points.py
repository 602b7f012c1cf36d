"""Operating points that hold on real anatomy, and what the second stage buys.

Two steps, so the slow one runs once:

``python -m lungscreen.training.operating_points collect --model models/nodulenet --synthetic 50 --out runs/realct``
    runs the detector and the second stage (``models/astoc_dsb2017``) on the real scans of
    :data:`training.real_eval.REAL_SCANS` and on the synthetic test scans (seeds 3000000+), and
    keeps every candidate with its calibrated probability and second-stage score
    (``detections.pkl``);
``python -m lungscreen.training.operating_points analyse --model models/nodulenet --out runs/realct [--write-card]``
    compares, on those candidates, the card's synthetic-fitted point with and without the veto
    and a threshold chosen on the real scans (leave-one-scan-out), writes ``analysis.json``, and
    with ``--write-card`` stores the chosen point, the second stage and the figures in the card.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from lungscreen.models.card import load_card, validate_card
from lungscreen.models.detector import Detector
from lungscreen.models.rules import ClinicalRules, reportable
from lungscreen.models.second_stage import SecondStage, VetoRule
from lungscreen.training.inference import SECOND_STAGE_FLOOR, ScanDetections, detect_scan
from lungscreen.training.metrics import SIZE_BANDS_MM, ScanMatches, cpm, match
from lungscreen.training.real_eval import (
    REAL_SCANS,
    choose_threshold,
    classify,
    leave_one_scan_out,
    reliability_table,
    score_report,
    totals,
)
from lungscreen.training.scan import Nodule
from lungscreen.training.sources import SEED_RANGES, synthetic_scan

SECOND_STAGE_DIR = Path(__file__).resolve().parent.parent / "models" / "astoc_dsb2017"
# Scoring only (collect): the rule does not act while collecting.
# nodulenet 1.2.0's screening threshold, fitted on 60 synthetic validation scans (training.calibrate).
SYNTHETIC_SCREENING_THRESHOLD = 0.056611
_NO_RULE = VetoRule(min_logit=0.0, exempt_diameter_mm=float("inf"), exempt_probability=float("inf"))


def collect(args: argparse.Namespace) -> None:
    card = load_card(args.model)
    detector = Detector(card, intra_op_threads=args.threads)
    stage = SecondStage(SECOND_STAGE_DIR / "model.onnx", _NO_RULE, intra_op_threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    real: list[ScanDetections] = []
    for name, load in REAL_SCANS.items():
        det = detect_scan(detector, load(), stage)
        real.append(det)
        asked = int(np.isfinite(det.second_stage_logits).sum())
        print(f"real {name}: {len(det.candidates)} candidates, {det.seconds:.1f} s; second stage {asked} crops-sets {det.second_stage_seconds:.1f} s", flush=True)
    synthetic: list[ScanDetections] = []
    first = SEED_RANGES["test"][0]
    for i in range(args.synthetic):
        start = time.perf_counter()
        det = detect_scan(detector, synthetic_scan(first + i), stage)
        synthetic.append(det)
        print(f"synthetic {first + i}: {len(det.candidates)} candidates, {time.perf_counter() - start:.1f} s", flush=True)
    with (args.out / "detections.pkl").open("wb") as handle:
        pickle.dump({"model": f"{card.name} {card.version}", "real": real, "synthetic": synthetic}, handle)
    print(f"wrote {args.out / 'detections.pkl'}")


# The veto as FACTS.md measured it: a positive logit (the network's own 0.5) keeps a candidate.
VETO_ALWAYS = VetoRule(min_logit=0.0, exempt_diameter_mm=30.0, exempt_probability=1.01)
# The shipped rule, every number fixed a priori: masses exempt (Lung-RADS and the Fleischner Society
# call a lesion over 3 cm a mass, and the network was trained on nodules), and so is a candidate the
# detector calls more likely a nodule than not (calibrated probability >= 0.5): the second stage
# decides only where the detector is unsure, which is where the real false marks lie.
VETO = VetoRule(min_logit=0.0, exempt_diameter_mm=30.0, exempt_probability=0.5)
MAX_FALSE_PER_SCAN = 1.0
MAX_ACTIONABLE_FALSE_PER_SCAN = 0.25


def synthetic_report(dets: list[ScanDetections], calibration: dict, threshold: float, rules: ClinicalRules,
                     veto: VetoRule | None) -> dict:  # fmt: skip
    """Sensitivity (overall, >= 6 mm, by size band and by type) and FP/scan of the reports."""
    found: list[tuple[Nodule, bool]] = []
    false = 0
    for det in dets:
        findings = det.findings(calibration, threshold, rules, veto)
        hit = match(np.array([f.center_lps_mm for f in findings]).reshape(-1, 3),
                    [n.center_lps_mm for n in det.nodules], [n.diameter_mm for n in det.nodules])  # fmt: skip
        false += int((hit < 0).sum())
        found += [(n, bool(np.any(hit == i))) for i, n in enumerate(det.nodules)]

    def sensitivity(pred) -> dict:
        sel = [ok for n, ok in found if pred(n)]
        return {"found": int(sum(sel)), "nodules": len(sel), "sensitivity": (sum(sel) / len(sel)) if sel else None}

    bands = {f"{lo:g}-{hi:g} mm": sensitivity(lambda n, lo=lo, hi=hi: lo <= n.diameter_mm < hi) for lo, hi in SIZE_BANDS_MM}
    kinds = sorted({n.kind for n, _ in found})
    return {
        "fp_per_scan": false / len(dets),
        "all": sensitivity(lambda n: True),
        "ge6mm": sensitivity(lambda n: n.diameter_mm >= 6.0),
        "by_size": bands,
        "by_type_ge6mm": {k: sensitivity(lambda n, k=k: n.kind == k and n.diameter_mm >= 6.0) for k in kinds},
    }


def cpm_of(dets: list[ScanDetections], veto: VetoRule | None, calibration: dict) -> float:
    """LUNA16 CPM on the candidates, those the veto drops removed."""
    scans = []
    for det in dets:
        keep = np.ones(len(det.candidates), bool)
        if veto is not None:
            probs = det.probabilities(calibration)
            keep = np.array([
                not veto.vetoes(float(l), f.diameter_mm, float(p))
                for l, f, p in zip(det.second_stage_logits, det.findings_template, probs)
            ], bool)  # fmt: skip
        hit = match(det.centres_lps[keep], [n.center_lps_mm for n in det.nodules], [n.diameter_mm for n in det.nodules])
        scans.append(ScanMatches(det.scores[keep], hit, np.array([n.diameter_mm for n in det.nodules])))
    return cpm(scans)[0]


def lost_to_veto(dets: list[ScanDetections], calibration: dict, threshold: float, rules: ClinicalRules,
                 veto: VetoRule) -> list[dict]:  # fmt: skip
    """The synthetic nodules reported without the veto and not with it: size, type, probability, logit."""
    out = []
    for det in dets:
        truth = ([n.center_lps_mm for n in det.nodules], [n.diameter_mm for n in det.nodules])
        before = det.findings(calibration, threshold, rules)
        after = det.findings(calibration, threshold, rules, veto)
        hit_before = set(match(np.array([f.center_lps_mm for f in before]).reshape(-1, 3), *truth).tolist())
        hit_after = set(match(np.array([f.center_lps_mm for f in after]).reshape(-1, 3), *truth).tolist())
        cand_hit = match(det.centres_lps, *truth)
        probs = det.probabilities(calibration)
        for i in sorted((hit_before - hit_after) - {-1}):
            best = int(np.argmax(np.where(cand_hit == i, probs, -1.0)))
            n = det.nodules[i]
            out.append({"scan": det.name, "diameter_mm": round(n.diameter_mm, 1), "kind": n.kind,
                        "probability": round(float(probs[best]), 3), "logit": round(float(det.second_stage_logits[best]), 1)})  # fmt: skip
    return out


def analyse(args: argparse.Namespace) -> dict:
    card = load_card(args.model)
    with (args.out / "detections.pkl").open("rb") as handle:
        data = pickle.load(handle)
    real, synthetic = data["real"], data["synthetic"]
    calibration, rules = card.calibration, ClinicalRules()
    targets = (MAX_FALSE_PER_SCAN, MAX_ACTIONABLE_FALSE_PER_SCAN)
    chosen_none = choose_threshold(real, calibration, rules, None, *targets)
    chosen_veto = choose_threshold(real, calibration, rules, VETO, *targets, floor=SECOND_STAGE_FLOOR)
    high = float(card.operating_point("high-sensitivity").threshold)
    configs = {
        "A. 1.2.0 screening point (synthetic-fitted), no second stage": (SYNTHETIC_SCREENING_THRESHOLD, None),
        "B. threshold chosen on the real scans, no second stage": (chosen_none, None),
        "C. screening point + veto on every candidate (FACTS.md rule)": (SYNTHETIC_SCREENING_THRESHOLD, VETO_ALWAYS),
        "D. screening point + veto where the detector is unsure (default)": (SYNTHETIC_SCREENING_THRESHOLD, VETO),
        "E. threshold chosen on the real scans + veto (D's rule)": (chosen_veto, VETO),
        "F. high-sensitivity point (synthetic-fitted) + veto (D's rule)": (high, VETO),
    }  # fmt: skip
    result: dict = {"model": data["model"], "real_scans": [d.name for d in real], "synthetic_scans": len(synthetic),
                    "configs": {}}  # fmt: skip
    for name, (threshold, veto) in configs.items():
        if threshold is None:
            result["configs"][name] = {"threshold": None}
            continue
        scores = [score_report(d, calibration, threshold, rules, veto) for d in real]
        result["configs"][name] = {
            "threshold": threshold,
            "veto": asdict(veto) if veto else None,
            "real_per_scan": {d.name: asdict(sc) for d, sc in zip(real, scores)},
            "real_total": totals(scores),
            "synthetic": synthetic_report(synthetic, calibration, threshold, rules, veto),
            "synthetic_cpm": cpm_of(synthetic, veto, calibration),
        }
        if veto is not None:
            result["configs"][name]["synthetic_lost_to_veto"] = lost_to_veto(synthetic, calibration, threshold, rules, veto)
    result["leave_one_scan_out"] = {
        "B (no second stage)": leave_one_scan_out(real, calibration, rules, None, *targets),
        "E (veto, D's rule)": leave_one_scan_out(real, calibration, rules, VETO, *targets, floor=SECOND_STAGE_FLOOR),
    }
    result["reliability_real"] = reliability_table(real, calibration)
    result["second_stage_logits_real"] = {
        d.name: [
            {"probability": round(float(p), 4), "diameter_mm": round(f.diameter_mm, 1), "logit": round(float(l), 1),
             "label": kind}
            for p, f, l, (kind, _) in zip(d.probabilities(calibration), d.findings_template, d.second_stage_logits,
                                          classify(d.centres_lps, d.nodules, d.irrelevant))
            if np.isfinite(l)
        ]
        for d in real
    }  # fmt: skip
    asked = sum(int(np.isfinite(d.second_stage_logits).sum()) for d in real)
    per_candidate = sum(d.second_stage_seconds for d in real) / max(1, asked)
    at_default = {
        d.name: sum(
            1 for f, p in zip(d.findings_template, d.probabilities(calibration))
            if reportable(replace(f, probability=float(p)), SYNTHETIC_SCREENING_THRESHOLD, rules)
            and not VETO.exempt(f.diameter_mm, float(p))
        )
        for d in real
    }  # fmt: skip
    result["second_stage_cost"] = {
        "seconds_per_candidate_measured": per_candidate,
        "candidates_measured": asked,
        "machine": "2-vCPU AMD EPYC VM shared with other work, ONNX Runtime CPU, 2 threads",
        "candidates_asked_per_study_at_default": at_default,
        "seconds_per_study_at_default": {k: v * per_candidate for k, v in at_default.items()},
    }
    text = json.dumps(result, indent=2, default=float)
    (args.out / "analysis.json").write_text(text + "\n")
    print(text)
    if args.write_card:
        write_card(card, result, DEFAULT_CONFIG)
    return result


# 1.2.0's network and calibration with the second stage (1.3.0 named an 8000-step experiment never shipped).
CARD_VERSION = "1.4.0"
DEFAULT_CONFIG = "D. screening point + veto where the detector is unsure (default)"
HIGH_SENSITIVITY_CONFIG = "F. high-sensitivity point (synthetic-fitted) + veto (D's rule)"
SYNTHETIC_TEST = "synthetic test, 50 scans, seeds 3000000-3000049 (never trained or calibrated on)"
LUNA16_NOTE = "second stage trained on LUNA16, which may include this LIDC scan"
REAL_READS = {
    "LIDC-IDRI-0001": f"LUNA16 reads: 1 target (23.35 mm), 25 irrelevant reader marks; {LUNA16_NOTE}",
    "pyradiomics-lung1": "its labelled nodule (13.8 mm); findings elsewhere false",
    "Lung_Dx-A0001": "its tumour boxes (a 6-9 cm mass, outside the 3-30 mm range, counted apart); findings elsewhere false",
    "totalsegmentator-contrast-chest": "no nodules: every finding false",
}
SECOND_STAGE_SECTION = {
    "name": "astoc_dsb2017 2x2x2 nodule identifier (Andre Stochniol, DSB2017 8th place), ported to ONNX",
    "onnx_file": "../astoc_dsb2017/model.onnx",
    "licence": "MIT, Copyright (c) 2017 Andre Stochniol",
    "licence_file": "../astoc_dsb2017/LICENSE",
    "source": "GitHub astoc/kaggle_dsb2017 commit 2421442, code/Andre/nodule_identifiers/d8_2x2x2_best_weights.h5 "
              "(sha256 e43d6e59...e262e); port: training/astoc_port.py",
    "training_data": "real LUNA16 CT (subsets 0-8, subset 9 validation, by the author's description) at 2 mm, nodule "
                     "masks from the LUNA16 annotations; LUNA16 is drawn from LIDC-IDRI, so any LIDC-IDRI scan "
                     "(LIDC-IDRI-0001 included) may have been in its training or validation data",
    "description": "Looks again at every finding a report would list (models/second_stage.py): one 8 x 64 x 64 crop "
                   "at 2 mm per finding, ONNX Runtime; the finding is dropped when the largest logit within "
                   "max(d/2, 4 mm) of its centre is not above min_logit, unless it is a mass (>= exempt_diameter_mm) "
                   "or the detector calls it more likely a nodule than not (probability >= exempt_probability). "
                   "Every number fixed a priori, none fitted on the real scans.",
}  # fmt: skip


def write_card(card, result: dict, config: str) -> None:
    """The default point's second stage, the real-scan figures and the synthetic ones at both points."""
    default, high = result["configs"][config], result["configs"][HIGH_SENSITIVITY_CONFIG]
    raw = dict(card.raw, version=CARD_VERSION)
    raw["second_stage"] = dict(SECOND_STAGE_SECTION, rule=default["veto"])
    raw["calibration_data"] = (
        "isotonic calibration and both thresholds: synthetic validation, 60 scans (seeds 2000000+, never trained on); "
        "the second stage's rule: fixed a priori, checked on the real scans below (no number fitted on them)"
    )
    real_line = "; ".join(
        f"{name} {v['targets_found']}/{v['targets']} targets, {v['false_outlines']} false"
        for name, v in default["real_per_scan"].items()
    )  # fmt: skip
    syn = default["synthetic"]
    raw["operating_points"] = {
        "screening": {"threshold": default["threshold"], "description": (
            f"threshold fitted on synthetic validation (1.00 FP/scan there) plus the second-stage veto. Real scans in "
            f"shared/data: {real_line}; {default['real_total']['false_outlines_per_scan']:.2f} false outlines and "
            f"{default['real_total']['actionable_false_per_scan']:.2f} actionable false findings per scan. Synthetic "
            f"test: {syn['fp_per_scan']:.2f} FP/scan, sensitivity >= 6 mm {syn['ge6mm']['sensitivity']:.3f}")},
        "high-sensitivity": {"threshold": high["threshold"], "description": (
            f"threshold fitted on synthetic validation (4.00 FP/scan there) plus the second-stage veto. Real scans: "
            f"{high['real_total']['false_outlines_per_scan']:.2f} false outlines per scan. Synthetic test: "
            f"{high['synthetic']['fp_per_scan']:.2f} FP/scan, sensitivity >= 6 mm {high['synthetic']['ge6mm']['sensitivity']:.3f}")},
    }  # fmt: skip
    metrics = [
        m for m in raw.get("metrics", [])
        if not m["dataset"].startswith("real CT") and not m["name"].startswith(("screening", "high-sensitivity", "CPM (LUNA16 protocol), second"))
    ]  # fmt: skip
    metrics.append({"name": "CPM (LUNA16 protocol), second-stage veto applied", "value": round(default["synthetic_cpm"], 4), "dataset": SYNTHETIC_TEST})
    for point, conf in (("screening", default), ("high-sensitivity", high)):
        sy = conf["synthetic"]
        for key, value in (("fp_per_scan", sy["fp_per_scan"]), ("sensitivity", sy["all"]["sensitivity"]),
                           ("sensitivity_ge6mm", sy["ge6mm"]["sensitivity"])):  # fmt: skip
            metrics.append({"name": f"{point}: {key}", "value": round(value, 4), "dataset": SYNTHETIC_TEST})
        for band, v in sy["by_size"].items():
            metrics.append({"name": f"{point}: sensitivity {band}", "value": round(v["sensitivity"], 4), "dataset": SYNTHETIC_TEST})
        for name, v in conf["real_per_scan"].items():
            for key in ("targets", "targets_found", "outlines", "false_outlines", "actionable_false"):
                metrics.append({"name": f"{point}: {key}", "value": v[key], "dataset": f"real CT {name}, {REAL_READS[name]}"})
        total = conf["real_total"]
        for key in ("false_outlines_per_scan", "actionable_false_per_scan"):
            metrics.append({"name": f"{point}: {key}", "value": round(total[key], 4),
                            "dataset": f"real CT, the 4 scans in shared/data ({LUNA16_NOTE.replace('this', 'the')})"})  # fmt: skip
    raw["metrics"] = metrics
    raw["reliability"] = [
        dict(row, dataset=f"real CT, all candidates of the 4 scans in shared/data (irrelevant ones left out; {LUNA16_NOTE.replace('this', 'the')})")
        for row in result["reliability_real"]
    ]  # fmt: skip
    validate_card(raw)
    card.path.write_text(json.dumps(raw, indent=2) + "\n")
    print(f"wrote {card.path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lungscreen.training.operating_points", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="detector + second stage on the real and synthetic test scans")
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--synthetic", type=int, default=50)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", type=Path, default=Path("runs/realct"))
    c.set_defaults(func=collect)
    a = sub.add_parser("analyse", help="operating points, second stage and leave-one-scan-out on the collected candidates")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--out", type=Path, default=Path("runs/realct"))
    a.add_argument("--write-card", action="store_true", help="store the default point's second stage and the figures in the card")
    a.set_defaults(func=analyse)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
