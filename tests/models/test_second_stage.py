"""The second stage: crops on the LPS grid the network was trained on, its veto rule, and the
postprocess stage that runs it on the findings a report would list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungscreen.findings import Candidate
from lungscreen.models.card import DEFAULT_MODEL_CARD, load_card
from lungscreen.models.postprocess import SUPPRESSED_SECOND_STAGE, postprocess
from lungscreen.models.rules import ClinicalRules
from lungscreen.models.second_stage import CENTRE_SLICE, CROP, SecondStage, VetoRule, crops_lps

IDENTITY = {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 1.0]}  # probability = raw score


def test_veto_rule_exempts_masses_and_sure_detections() -> None:
    rule = VetoRule(min_logit=0.0, exempt_diameter_mm=30.0, exempt_probability=0.9)
    assert rule.vetoes(-5.0, 8.0, 0.2) and not rule.vetoes(5.0, 8.0, 0.2)
    assert rule.vetoes(0.0, 8.0, 0.2), "a logit of exactly min_logit is not above it"
    assert not rule.vetoes(-5.0, 30.0, 0.2), "a mass (>= 30 mm) is never vetoed"
    assert not rule.vetoes(-5.0, 8.0, 0.95), "nor a finding the detector is sure of"


@pytest.mark.parametrize("flip_rows", [False, True])
def test_crops_are_on_an_lps_grid_whatever_the_volume_orientation(flip_rows: bool) -> None:
    """A bright voxel 10 mm left, 6 mm posterior and 4 mm superior of the centre lands at column
    +5, row +3 and slice +2 of the crop (2 mm grid), also when the volume's rows run anterior."""
    voxels = np.full((40, 80, 80), -1000.0, np.float32)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = (0, 0, 1.0), (0, -1.0 if flip_rows else 1.0, 0), (1.0, 0, 0)
    affine[1, 3] = 79.0 if flip_rows else 0.0  # rows from y 79 down to 0, or 0 up to 79
    centre = np.array([40.0, 40.0, 20.0])
    bright = centre + (10.0, 6.0, 4.0)
    k, j, i = np.linalg.solve(affine[:3, :3], bright - affine[:3, 3]).round().astype(int)
    voxels[k, j, i] = 400.0
    crop = crops_lps(voxels, affine, centre[None])[0, 0]
    assert np.unravel_index(np.argmax(crop), crop.shape) == (CENTRE_SLICE + 2, CROP // 2 + 3, CROP // 2 + 5)
    assert crop.max() == pytest.approx(1.0 - 0.028) and crop.min() == pytest.approx(-0.028)


@pytest.fixture(scope="module")
def lidc(lidc_series_dir: Path):
    from lungscreen.dicom_io.volume import read_series_volume

    return read_series_volume(sorted(lidc_series_dir.glob("*.dcm")))


def candidate_at(volume, lps, diameter: float, score: float) -> Candidate:
    kji = np.linalg.solve(volume.affine[:3, :3], np.asarray(lps) - volume.affine[:3, 3])
    return Candidate(tuple(float(v) for v in kji), diameter, score, outside_lungs_mm=0.0)


def test_postprocess_vetoes_a_false_candidate_and_keeps_the_nodule_and_a_mass(lidc) -> None:
    card = load_card(DEFAULT_MODEL_CARD)
    section = dict(card.raw["second_stage"], rule={"min_logit": 0.0, "exempt_diameter_mm": 30.0, "exempt_probability": 0.99})
    stage = SecondStage.from_card_section(card.path, section, intra_op_threads=1)
    nodule = candidate_at(lidc, (56.21, 86.34, -115.87), 23.0, 0.9)  # LUNA16's nodule
    lung = candidate_at(lidc, (-80.0, 20.0, -150.0), 8.0, 0.5)  # right-lung parenchyma
    big = candidate_at(lidc, (-80.0, 20.0, -150.0), 35.0, 0.5)  # the same spot called a mass
    out = postprocess([nodule, lung], lidc.voxels, lidc.affine, IDENTITY, 0.3, ClinicalRules(), stage)
    findings, suppressed = out.findings, out.suppressed
    assert [round(f.diameter_mm) for f in findings] == [23] and suppressed[SUPPRESSED_SECOND_STAGE] == 1
    assert [round(f.diameter_mm) for f in out.unreported] == [8]  # vetoed, still there for a follow-up
    out = postprocess([nodule, big], lidc.voxels, lidc.affine, IDENTITY, 0.3, ClinicalRules(), stage)
    findings, suppressed = out.findings, out.suppressed
    assert len(findings) == 2 and suppressed[SUPPRESSED_SECOND_STAGE] == 0
    # Without a second stage the same call reports both and counts no veto.
    out = postprocess([nodule, lung], lidc.voxels, lidc.affine, IDENTITY, 0.3, ClinicalRules(), None)
    findings, suppressed = out.findings, out.suppressed
    assert len(findings) == 2 and SUPPRESSED_SECOND_STAGE not in suppressed


def test_the_default_card_ships_the_second_stage_with_its_licence() -> None:
    from lungscreen.models.detector import Detector

    card = load_card(DEFAULT_MODEL_CARD)
    section = card.raw["second_stage"]
    licence = (card.path.parent / section["licence_file"]).read_text()
    assert section["licence"].startswith("MIT") and "MIT License" in licence and "Andre Stochniol" in licence
    assert "LUNA16" in section["training_data"]
    detector = Detector(card, intra_op_threads=1)
    assert detector.second_stage is not None and detector.second_stage.rule == VetoRule(**section["rule"])


def test_a_second_stage_rule_with_an_unknown_field_is_refused() -> None:
    from lungscreen.errors import ModelError
    from lungscreen.models.card import validate_card

    raw = dict(load_card(DEFAULT_MODEL_CARD).raw)
    raw["second_stage"] = dict(raw["second_stage"], rule={"min_logit": 0.0, "exempt_diameter_mm": 30.0, "exempt_probability": 0.5, "x": 1})
    with pytest.raises(ModelError, match="second_stage/rule"):
        validate_card(raw)


def test_a_missing_second_stage_model_is_a_model_error(tmp_path: Path) -> None:
    from lungscreen.errors import ModelError

    with pytest.raises(ModelError, match="does not exist"):
        SecondStage(tmp_path / "absent.onnx", VetoRule(0.0, 30.0, 0.5))
