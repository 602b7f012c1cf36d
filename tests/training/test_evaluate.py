"""The evaluation command: CLI registration and the metrics of a toy set."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lungscreen.models.card import ModelCard
from lungscreen.models.rules import ClinicalRules
from lungscreen.training.evaluate import evaluate_set
from lungscreen.training.evaluate_cli import add_cli
from lungscreen.training.export import model_card
from toy_scans import toy_scan


def test_add_cli_registers_evaluate() -> None:
    parser = argparse.ArgumentParser(prog="lungscreen")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", "--model", "models/x", "--synthetic", "3", "--real"])
    assert args.synthetic == 3 and args.real and args.model == Path("models/x")
    assert callable(args.func)


def test_evaluate_set_on_toy_scans() -> None:
    raw = model_card("toy", "0")
    raw["operating_points"] = {"screening": {"threshold": 0.75}, "high-sensitivity": {"threshold": 0.5}}
    card = ModelCard(path=Path("toy/model_card.json"), raw=raw)
    scans = [toy_scan([0.9, 0.8, 0.7, 0.6], 0), toy_scan([0.85, 0.75, 0.65, 0.55], 1)]
    result = evaluate_set(scans, card, ClinicalRules())
    # Raw-score FROC: 0.9 TP, 0.85 FP, 0.8 FP, 0.75 TP -> both nodules at 1 FP/scan; 0.5 at 0.5 FP/scan.
    assert result["froc_points"]["1"] == 1.0 and result["froc_points"]["0.5"] == 0.5
    assert result["cpm"] == pytest.approx((3 * 0.5 + 4 * 1.0) / 7)
    screening = result["operating_points"]["screening"]
    assert screening["fp_per_scan"] == 1.0 and screening["sensitivity"] == 1.0
    assert result["operating_points"]["high-sensitivity"]["fp_per_scan"] == 3.0
    assert 0.0 <= result["ece"] <= 1.0
