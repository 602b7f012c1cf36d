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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lungscreen.models.card import load_card
from lungscreen.models.detector import Detector
from lungscreen.models.rules import ClinicalRules
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


# The veto as FACTS.md measured it (a positive logit keeps a candidate) and masses exempt: Lung-RADS
# and the Fleischner Society call a lesion over 3 cm a mass, and the network never saw one.
VETO = VetoRule(min_logit=0.0, exempt_diameter_mm=30.0, exempt_probability=1.01)
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


def analyse(args: argparse.Namespace) -> dict:
    card = load_card(args.model)
    with (args.out / "detections.pkl").open("rb") as handle:
        data = pickle.load(handle)
    real, synthetic = data["real"], data["synthetic"]
    calibration, rules = card.calibration, ClinicalRules()
    synthetic_threshold = float(SYNTHETIC_SCREENING_THRESHOLD)
    chosen = {
        "veto": choose_threshold(real, calibration, rules, VETO, MAX_FALSE_PER_SCAN, MAX_ACTIONABLE_FALSE_PER_SCAN,
                                 floor=SECOND_STAGE_FLOOR),
        "none": choose_threshold(real, calibration, rules, None, MAX_FALSE_PER_SCAN, MAX_ACTIONABLE_FALSE_PER_SCAN),
    }  # fmt: skip
    configs = {
        "1.2.0 screening point (synthetic-fitted), no second stage": (synthetic_threshold, None),
        "1.2.0 screening point + second-stage veto": (synthetic_threshold, VETO),
        "threshold chosen on the real scans, no second stage": (chosen["none"], None),
        "threshold chosen on the real scans + second-stage veto": (chosen["veto"], VETO),
        "high-sensitivity point (synthetic-fitted) + second-stage veto": (float(card.operating_point("high-sensitivity").threshold), VETO),
    }  # fmt: skip
    result: dict = {"model": data["model"], "real_scans": [d.name for d in real], "synthetic_scans": len(synthetic),
                    "chosen_thresholds": chosen, "configs": {}}  # fmt: skip
    for name, (threshold, veto) in configs.items():
        if threshold is None:
            result["configs"][name] = {"threshold": None}
            continue
        per_scan = {d.name: asdict(score_report(d, calibration, threshold, rules, veto)) for d in real}
        result["configs"][name] = {
            "threshold": threshold,
            "veto": asdict(veto) if veto else None,
            "real_per_scan": per_scan,
            "real_total": totals([score_report(d, calibration, threshold, rules, veto) for d in real]),
            "synthetic": synthetic_report(synthetic, calibration, threshold, rules, veto),
            "synthetic_cpm": cpm_of(synthetic, veto, calibration),
        }
    result["leave_one_scan_out"] = {
        "veto": leave_one_scan_out(real, calibration, rules, VETO, MAX_FALSE_PER_SCAN, MAX_ACTIONABLE_FALSE_PER_SCAN,
                                   floor=SECOND_STAGE_FLOOR),
        "none": leave_one_scan_out(real, calibration, rules, None, MAX_FALSE_PER_SCAN, MAX_ACTIONABLE_FALSE_PER_SCAN),
    }  # fmt: skip
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
    result["second_stage_seconds_per_candidate"] = {
        "real": sum(d.second_stage_seconds for d in real) / max(1, sum(int(np.isfinite(d.second_stage_logits).sum()) for d in real)),
        "synthetic": sum(d.second_stage_seconds for d in synthetic) / max(1, sum(int(np.isfinite(d.second_stage_logits).sum()) for d in synthetic)),
    }  # fmt: skip
    text = json.dumps(result, indent=2, default=float)
    (args.out / "analysis.json").write_text(text + "\n")
    print(text)
    return result


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
    a.set_defaults(func=analyse)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
