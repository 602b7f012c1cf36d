"""Model card validation, calibration, and the bundled ONNX test model on planted spheres."""

import copy
import json

import numpy as np
import pytest

from lungscreen.models.blob_filter import build_model, model_card
from lungscreen.models.calibrate import calibrate
from lungscreen.models.card import BLOB_FILTER_CARD, DEFAULT_MODEL_CARD, load_card, validate_card
from lungscreen.models.detector import Detector, choose_providers
from lungscreen.errors import ModelError


@pytest.fixture(scope="module")
def detector():
    return Detector(load_card(BLOB_FILTER_CARD))


def sphere_volume(spheres, shape=(100, 200, 200), spacing=(1.25, 0.75, 0.75), seed=0):
    """Lung-like background (-850 HU, noise 20 HU) with solid spheres (40 HU)."""
    rng = np.random.default_rng(seed)
    hu = (np.full(shape, -850.0) + rng.normal(0, 20, shape)).astype(np.float32)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for (ck, cj, ci), d in spheres:
        inside = ((k - ck) * spacing[0]) ** 2 + ((j - cj) * spacing[1]) ** 2 + ((i - ci) * spacing[2]) ** 2
        hu[inside <= (d / 2) ** 2] = 40.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = (-80.0, -75.0, -70.0)
    return hu, affine


@pytest.mark.parametrize("path", [DEFAULT_MODEL_CARD, BLOB_FILTER_CARD])
def test_bundled_cards_validate_and_say_research_use(path):
    card = load_card(path)
    assert "not for diagnostic use" in card.intended_use.lower()
    assert card.operating_point().name == card.default_operating_point == "screening"
    assert card.operating_point("high-sensitivity").threshold < card.operating_point("screening").threshold


def test_card_written_by_builder_matches_the_committed_one():
    committed = json.loads(BLOB_FILTER_CARD.read_text())
    assert committed == model_card("blob_filter.onnx")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.pop("intended_use"), "intended_use"),
        (lambda c: c.__setitem__("intended_use", "clinical use"), "intended_use"),
        (lambda c: c["preprocessing"].__setitem__("orientation", "XYZ"), "preprocessing/orientation"),
        (lambda c: c["operating_points"]["screening"].__setitem__("threshold", 1.5), "threshold"),
        (lambda c: c.__setitem__("default_operating_point", "nonexistent"), "default_operating_point"),
        (lambda c: c["calibration"].pop("a"), "calibration"),
    ],
)
def test_invalid_cards_are_rejected_naming_the_field(mutate, match):
    card = copy.deepcopy(model_card("x.onnx"))
    mutate(card)
    with pytest.raises(ModelError, match=match):
        validate_card(card)


def test_unknown_operating_point_is_a_model_error():
    with pytest.raises(ModelError, match="no operating point 'fast'"):
        load_card(BLOB_FILTER_CARD).operating_point("fast")


@pytest.mark.parametrize(
    "calibration",
    [{"method": "platt", "a": 40.0, "b": -6.0}, {"method": "isotonic", "x": [0.0, 0.1, 0.2, 0.4], "y": [0.0, 0.1, 0.6, 0.95]}],
)
def test_calibration_is_monotone_and_within_unit_interval(calibration):
    scores = np.linspace(-5, 5, 2001)
    p = calibrate(scores, calibration)
    assert np.all(np.diff(p) >= 0)
    assert p.min() >= 0 and p.max() <= 1


def test_isotonic_calibration_rejects_decreasing_knots():
    with pytest.raises(ModelError, match="non-decreasing"):
        calibrate([0.1], {"method": "isotonic", "x": [0, 1], "y": [0.9, 0.1]})


def test_cpu_provider_is_always_chosen():
    assert choose_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers()[-1] == "CPUExecutionProvider"


def test_onnx_graph_is_deterministic():
    assert build_model().SerializeToString() == build_model().SerializeToString()


def test_blob_filter_finds_planted_spheres_with_their_sizes(detector):
    spheres = [((50, 60, 60), 6.0), ((30, 140, 140), 10.0), ((70, 60, 150), 20.0)]
    hu, affine = sphere_volume(spheres)
    candidates, _ = detector.detect(hu, affine)
    probabilities = calibrate([c.score for c in candidates], detector.card.calibration)
    confident = [c for c, p in zip(candidates, probabilities) if p >= detector.card.operating_point().threshold]
    assert len(confident) == len(spheres), [(c.center_kji, c.diameter_mm, c.score) for c in candidates[:6]]
    for centre, diameter in spheres:
        nearest = min(confident, key=lambda c: np.linalg.norm((np.subtract(c.center_kji, centre)) * (1.25, 0.75, 0.75)))
        error_mm = np.linalg.norm(np.subtract(nearest.center_kji, centre) * (1.25, 0.75, 0.75))
        assert error_mm < 2.0, (centre, nearest)
        assert nearest.diameter_mm == pytest.approx(diameter, rel=0.3)


def test_blob_filter_finds_nothing_in_empty_lung(detector):
    hu, affine = sphere_volume([])
    candidates, _ = detector.detect(hu, affine)
    probabilities = calibrate([c.score for c in candidates], detector.card.calibration)
    assert not np.any(probabilities >= detector.card.operating_point("high-sensitivity").threshold)


def test_sliding_window_matches_single_pass():
    """A volume larger than the patch goes through sliding windows; findings do not change."""
    spheres = [((40, 100, 100), 12.0)]
    hu, affine = sphere_volume(spheres, shape=(80, 200, 200))
    whole_card, windowed_card = load_card(BLOB_FILTER_CARD), load_card(BLOB_FILTER_CARD)
    for card in (whole_card, windowed_card):
        card.raw["inference"]["crop_to_body"] = False  # keep the volume larger than the patch
    windowed_card.raw["inference"]["patch_size"] = [64, 64, 64]
    detector, windowed_detector = Detector(whole_card), Detector(windowed_card)
    image = detector.preprocess(hu, affine)
    assert any(s > 64 for s in image.tensor.shape[1:])
    whole = detector.decode(detector.infer(image))
    windowed = windowed_detector.decode(windowed_detector.infer(image))
    assert np.allclose(whole[0].index_xyz, windowed[0].index_xyz, atol=0.5)
    assert whole[0].diameter_mm == pytest.approx(windowed[0].diameter_mm, rel=0.05)
