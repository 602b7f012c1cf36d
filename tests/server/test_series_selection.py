"""Series selection through the analysis pipeline, on real scans from ../shared/data rewritten as
real studies arrive: a mislabelled abdomen series refused on its pixels, a CT without lungs, a
chest-abdomen-pelvis scan, and the model card's kernel preference between two real Philips
reconstructions. Variants are written to tmp folders (never into the repository)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from archive_variants import SECONDARY_CAPTURE, by_position, rewrite_series
from lungscreen.dicom_io.select import RejectionCode, SelectionRules
from lungscreen.errors import ModelError
from lungscreen.models.card import BLOB_FILTER_CARD, DEFAULT_MODEL_CARD, load_card
from lungscreen.server.config import load_settings
from lungscreen.server.pipeline import NoEligibleSeries, analyze_study
from lungscreen.server.workers import build_analyzer

# LIDC-IDRI-0001's 24 lowest slices (60 mm of upper abdomen below the lungs): 0.01 l of lung-density tissue.
ABDOMEN_SLICES = 24


@pytest.fixture(scope="module")
def lidc_paths(lidc_series_dir: Path) -> list[Path]:
    return by_position(sorted(lidc_series_dir.glob("*.dcm")))


def _series_uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def _analyzer(tmp_path_factory, card: Path = BLOB_FILTER_CARD, **rules):
    analyzer = build_analyzer(load_settings(model=card, data_dir=tmp_path_factory.mktemp("data")))
    return dataclasses.replace(analyzer, selection=SelectionRules(**rules))


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    """The fixed blob-filter model, with a site rule letting a 24-slice series through to the pixel check."""
    return _analyzer(tmp_path_factory, min_slices=20)


@pytest.fixture(scope="module")
def abdomen(lidc_paths, tmp_path_factory) -> list[Path]:
    """The real slices below LIDC-IDRI-0001's lungs as their own series, still labelled CHEST
    (as a mislabelled abdomen series would be) and ORIGINAL\\PRIMARY."""
    return rewrite_series(
        lidc_paths[:ABDOMEN_SLICES], tmp_path_factory.mktemp("abdomen"), pixels=True,
        SeriesNumber=1, SeriesDescription="Abdomen 2.5",
    )


@pytest.fixture(scope="module")
def luna16_chest(lidc_paths, tmp_path_factory) -> list[Path]:
    """LIDC-IDRI-0001 as LUNA16 / TCIA serve it: ORIGINAL\\SECONDARY\\AXIAL."""
    return rewrite_series(lidc_paths, tmp_path_factory.mktemp("chest"), pixels=True, SeriesNumber=2,
                          SeriesDescription="LUNA16", ImageType=["ORIGINAL", "SECONDARY", "AXIAL"])


@pytest.fixture(scope="module")
def chest_findings(analyzer, luna16_chest) -> list[dict]:
    """The findings of the chest series analysed alone."""
    findings = list(analyze_study(luna16_chest, analyzer).findings)
    assert findings
    return findings


def _same_findings(found: tuple[dict, ...], expected: list[dict]) -> bool:
    centres = np.array([f["center_lps_mm"] for f in found])
    return len(found) == len(expected) and all(
        np.linalg.norm(centres - f["center_lps_mm"], axis=1).min() < 2.0 for f in expected
    )


def test_a_series_without_lungs_is_refused_on_its_pixels_and_the_chest_is_analysed(
    analyzer, abdomen, luna16_chest, chest_findings, lidc_paths, tmp_path
) -> None:
    scout = rewrite_series(lidc_paths[60:61], tmp_path / "scout", SeriesNumber=3, SeriesDescription="Scout",
                           ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    dose = rewrite_series(lidc_paths[:1], tmp_path / "dose", SeriesNumber=999, SeriesDescription="Dose Report",
                          SOPClassUID=SECONDARY_CAPTURE, ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"])

    result = analyze_study([*abdomen, *luna16_chest, *scout, *dose], analyzer)

    assert result.series_uid == _series_uid(luna16_chest)
    rejected = {r.series_description: r for r in result.rejected_series}
    assert len(result.rejected_series) == len(rejected), "each series recorded once"
    assert {name: r.code for name, r in rejected.items()} == {
        "Abdomen 2.5": RejectionCode.NO_LUNGS,  # PRIMARY, so tried first; its pixels show no lungs
        "Scout": RejectionCode.LOCALIZER,
        "Dose Report": RejectionCode.DOSE_REPORT,
    }
    assert rejected["Abdomen 2.5"].reason.startswith("no lungs in the field of view: ")
    assert _same_findings(result.findings, chest_findings)


def test_a_ct_without_lungs_fails_the_study_with_a_typed_reason(analyzer, abdomen) -> None:
    with pytest.raises(NoEligibleSeries, match="no lungs in the field of view") as excinfo:
        analyze_study(abdomen, analyzer)
    (rejection,) = excinfo.value.rejected
    assert rejection.code is RejectionCode.NO_LUNGS


def test_a_chest_abdomen_pelvis_scan_is_analysed_over_its_chest(analyzer, luna16_chest, chest_findings, tmp_path) -> None:
    """LIDC-IDRI-0001 extended 120 mm feet-wards with its own real abdomen slices (mirrored):
    one long series whose chest must still be found, with the chest-only scan's findings."""
    chest = by_position(luna16_chest)
    extension = [*chest[:ABDOMEN_SLICES][::-1], *chest[:ABDOMEN_SLICES]]
    lowest_z = -340.0 - 2.5 * len(extension)

    def continue_downwards(ds, index):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], lowest_z + 2.5 * index]
        ds.SliceLocation = lowest_z + 2.5 * index

    long_scan = rewrite_series([*extension, *chest], tmp_path / "cap", pixels=True, edit=continue_downwards,
                               SeriesDescription="Chest-Abdomen-Pelvis")
    result = analyze_study(long_scan, analyzer)

    assert result.rejected_series == ()
    assert _same_findings(result.findings, chest_findings)


@pytest.fixture(scope="module")
def lung_dx(shared_data: Path) -> list[Path]:
    folder = shared_data / "lung_pet_ct_dx" / "Lung_Dx-A0001"
    if not folder.is_dir():
        pytest.skip(f"Lung-PET-CT-Dx series not found at {folder}")
    return sorted(folder.glob("ct_series*_5mm/*.dcm"))


@pytest.mark.parametrize(("preferred", "series_number"), [("soft", 3), ("sharp", 2)])
def test_the_model_cards_kernel_preference_picks_the_reconstruction(
    lung_dx, tmp_path_factory, preferred, series_number
) -> None:
    """Lung_Dx-A0001: one Philips acquisition reconstructed with kernel L (series 2) and B (series 3)."""
    folder = tmp_path_factory.mktemp(f"card-{preferred}")
    card = json.loads(BLOB_FILTER_CARD.read_text())
    card["preferred_kernel"] = preferred
    (folder / "model_card.json").write_text(json.dumps(card))
    shutil.copy(BLOB_FILTER_CARD.parent / card["onnx_file"], folder / card["onnx_file"])
    analyzer = _analyzer(tmp_path_factory, folder / "model_card.json", max_slice_thickness_mm=6.0)

    result = analyze_study(lung_dx, analyzer)

    assert result.series_uid == _series_uid([p for p in lung_dx if p.parent.name == f"ct_series{series_number}_5mm"])
    (not_chosen,) = result.rejected_series
    assert not_chosen.code is RejectionCode.NOT_CHOSEN
    assert not_chosen.reason.startswith(f"eligible, but the model prefers a {preferred} kernel: series {series_number}")


def test_the_default_model_prefers_a_soft_kernel_and_cards_are_checked(tmp_path) -> None:
    # nodulenet was trained on synthetic scans rendered with soft-to-standard kernel PSFs and on
    # LIDC-IDRI-0001 (GE STANDARD).
    assert load_card(DEFAULT_MODEL_CARD).preferred_kernel == "soft"
    assert load_card(BLOB_FILTER_CARD).preferred_kernel is None
    card = json.loads(BLOB_FILTER_CARD.read_text())
    card["preferred_kernel"] = "medium"
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="preferred_kernel"):
        load_card(tmp_path)
