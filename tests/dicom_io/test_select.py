"""Tests of :func:`dicom_io.select.choose_series` on real headers and synthetic series."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, generate_uid

from lungscreen.dicom_io.select import SelectionRules, SeriesCandidate, SeriesChoice, choose_series

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
XRAY_DOSE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.67"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _candidate(
    *,
    count: int = 40,
    step: float = 2.5,
    series_number: int = 2,
    description: str = "Chest",
    orientation: list[float] = AXIAL,
    image_type: list[str] = ["ORIGINAL", "PRIMARY", "AXIAL"],
    modality: str = "CT",
    sop_class_uid: str = CTImageStorage,
    slice_thickness: float | None = None,
    skip_positions: tuple[int, ...] = (),
) -> SeriesCandidate:
    """Headers of a synthetic single-frame series, as read with ``stop_before_pixels``."""
    series_uid = generate_uid()
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    normal = [
        row_cosines[1] * column_cosines[2] - row_cosines[2] * column_cosines[1],
        row_cosines[2] * column_cosines[0] - row_cosines[0] * column_cosines[2],
        row_cosines[0] * column_cosines[1] - row_cosines[1] * column_cosines[0],
    ]
    headers = []
    for k in (k for k in range(count + len(skip_positions)) if k not in skip_positions):
        ds = Dataset()
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.PatientName = "Doe^Jane"
        ds.Modality = modality
        ds.ImageType = image_type
        ds.ImagePositionPatient = [round(-150 + k * step * n, 4) if n else -150.0 for n in normal]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = step if slice_thickness is None else slice_thickness
        ds.Rows = ds.Columns = 512
        headers.append(ds)
    paths = tuple(Path(f"/store/{h.SOPInstanceUID}.dcm") for h in headers)
    return SeriesCandidate(series_uid, paths, tuple(headers))


def _sole_rejection(candidate: SeriesCandidate, rules: SelectionRules = SelectionRules()) -> str:
    choice = choose_series([candidate], rules)
    assert choice.selected is None
    (rejection,) = choice.rejected
    assert rejection.series_instance_uid == candidate.series_instance_uid
    assert "Doe" not in rejection.reason
    return rejection.reason


def _read_candidate(folder: Path) -> SeriesCandidate:
    paths = tuple(sorted(folder.glob("*.dcm")))
    headers = tuple(pydicom.dcmread(path, stop_before_pixels=True) for path in paths)
    return SeriesCandidate(headers[0].SeriesInstanceUID, paths, headers)


# --- Real data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidc(lidc_series_dir: Path) -> SeriesCandidate:
    return _read_candidate(lidc_series_dir)


@pytest.fixture(scope="module")
def philips_5mm(shared_data: Path) -> SeriesCandidate:
    folder = shared_data / "lung_pet_ct_dx" / "Lung_Dx-A0001" / "ct_series2_5mm"
    if not folder.is_dir():
        pytest.skip(f"Lung-PET-CT-Dx series not found at {folder}")
    return _read_candidate(folder)


def test_lidc_series_is_chosen_and_the_5mm_series_is_too_thick(
    lidc: SeriesCandidate, philips_5mm: SeriesCandidate
) -> None:
    choice = choose_series([philips_5mm, lidc])

    assert choice.selected is lidc
    (rejection,) = choice.rejected
    assert rejection.series_instance_uid == philips_5mm.series_instance_uid
    assert rejection.series_description == "5mm"
    assert rejection.reason == "slice thickness 5.0 mm > 3.0 mm"


def test_with_a_higher_limit_both_real_series_are_eligible_and_the_thinner_wins(
    lidc: SeriesCandidate, philips_5mm: SeriesCandidate
) -> None:
    choice = choose_series([philips_5mm, lidc], SelectionRules(max_slice_thickness_mm=6.0))

    assert choice.selected is lidc
    assert [r.reason for r in choice.rejected] == ["eligible, but series 3000566 is thinner (2.5 mm vs 5.0 mm)"]


# --- Rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate_args", "expected"),
    [
        ({"image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "count": 2},
         r"localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER)"),
        ({"image_type": ["DERIVED", "SECONDARY", "AXIAL"]},
         r"derived or secondary images (ImageType DERIVED\SECONDARY\AXIAL)"),
        ({"image_type": ["ORIGINAL", "SECONDARY"]}, r"derived or secondary images (ImageType ORIGINAL\SECONDARY)"),
        ({"sop_class_uid": MR_IMAGE_STORAGE, "modality": "MR"},
         "not a CT image series (SOP class MR Image Storage 1.2.840.10008.5.1.4.1.1.4; modality MR)"),
        ({"modality": "PT"}, "modality PT, not CT"),
        ({"sop_class_uid": XRAY_DOSE_SR_STORAGE, "modality": "SR", "count": 1},
         "not a CT image series (SOP class X-Ray Radiation Dose SR Storage 1.2.840.10008.5.1.4.1.1.88.67; modality SR)"),
        ({"sop_class_uid": SECONDARY_CAPTURE_STORAGE, "count": 1},
         "not a CT image series (SOP class Secondary Capture Image Storage 1.2.840.10008.5.1.4.1.1.7; modality CT)"),
        ({"count": 29}, "too few slices: 29 < 30"),
        ({"step": 5.0}, "slice thickness 5.0 mm > 3.0 mm"),
        ({"step": 0.3}, "slice thickness 0.3 mm < 0.4 mm"),
        ({"orientation": CORONAL}, "not axial: the slice normal is 90.0° from the patient z axis (tolerance 15°)"),
        ({"skip_positions": (20,)},
         "missing slices or uneven spacing: 1 of 39 gaps deviate from the median step 2.50 mm by more than 10% "
         "(gap of 5.00 mm between -102.50 and -97.50, about 1 slice(s) missing; positions in mm along the slice normal)"),
    ],
    ids=["localizer", "derived", "secondary", "mr", "modality-pt", "dose-sr", "secondary-capture", "too-few",
         "too-thick", "too-thin", "coronal", "missing-slice"],
)
def test_ineligible_series_is_rejected_with_its_reason(candidate_args: dict, expected: str) -> None:
    assert _sole_rejection(_candidate(**candidate_args)) == expected


def test_a_localizer_hidden_among_axial_images_rejects_the_series() -> None:
    candidate = _candidate()
    candidate.headers[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    assert _sole_rejection(candidate) == r"1 of 40 instances are localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER)"


def test_inconsistent_geometry_is_rejected() -> None:
    mixed_orientation = _candidate()
    mixed_orientation.headers[5].ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.2]
    mixed_size = _candidate()
    mixed_size.headers[5].Rows = 256

    assert _sole_rejection(mixed_orientation).startswith("mixed orientations: ImageOrientationPatient differs")
    assert _sole_rejection(mixed_size) == "mixed image sizes (rows x columns): 256x512, 512x512"


def test_slightly_oblique_series_is_axial_within_tolerance() -> None:
    # 10° about the x axis: within the default 15°, rejected with a 5° tolerance.
    oblique = [1, 0, 0, 0, 0.984808, -0.173648]

    assert choose_series([_candidate(orientation=oblique)]).selected is not None
    assert _sole_rejection(_candidate(orientation=oblique), SelectionRules(axial_tolerance_deg=5)) == (
        "not axial: the slice normal is 10.0° from the patient z axis (tolerance 5°)"
    )
    assert choose_series([_candidate(orientation=CORONAL)], SelectionRules(require_axial=False)).selected is not None


def test_thickness_is_measured_from_positions_not_slice_thickness() -> None:
    nominally_thick = _candidate(step=1.25, slice_thickness=5.0)
    nominally_thin = _candidate(step=5.0, slice_thickness=1.0)

    assert choose_series([nominally_thick]).selected is nominally_thick
    assert _sole_rejection(nominally_thin) == "slice thickness 5.0 mm > 3.0 mm"


def test_enhanced_ct_counts_frames_as_slices() -> None:
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = 40
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = AXIAL
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.7, 0.7]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for k in range(40):
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [-150, -150, k * 1.0]
        ds.PerFrameFunctionalGroupsSequence.append(item)
    enhanced = SeriesCandidate(ds.SeriesInstanceUID, (Path("/store/enhanced.dcm"),), (ds,))

    choice = choose_series([enhanced, _candidate(step=2.0)])

    assert choice.selected is enhanced
    # Without SeriesNumber the chosen series is named by its UID.
    assert choice.rejected[0].reason == f"eligible, but series {ds.SeriesInstanceUID} is thinner (1.0 mm vs 2.0 mm)"


# --- Ranking ---------------------------------------------------------------------------------


def test_thinnest_then_most_slices_then_lowest_series_number() -> None:
    standard = _candidate(step=2.5, series_number=2, description="Standard")
    thin = _candidate(step=1.0, series_number=5, description="Thin")
    thin_short = _candidate(step=1.0, count=35, series_number=3, description="Thin, partial")
    thin_copy = _candidate(step=1.0, series_number=6, description="Thin copy")
    localizer = _candidate(image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], count=2, series_number=1, description="Scout")

    choice = choose_series([localizer, standard, thin_copy, thin_short, thin])

    assert choice.selected is thin
    assert [(r.series_description, r.reason) for r in choice.rejected] == [
        ("Scout", r"localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER)"),
        ("Standard", "eligible, but series 5 is thinner (1.0 mm vs 2.5 mm)"),
        ("Thin copy", "eligible, but series 5 ranks first (same slice spacing and count; lower SeriesNumber or UID)"),
        ("Thin, partial", "eligible, but series 5 has more slices (40 vs 35)"),
    ]


def test_no_eligible_series_selects_nothing() -> None:
    assert choose_series([]) == SeriesChoice(None, ())
    choice = choose_series([_candidate(step=5.0), _candidate(modality="PT")])
    assert choice.selected is None
    assert [r.reason for r in choice.rejected] == ["slice thickness 5.0 mm > 3.0 mm", "modality PT, not CT"]


# --- Configuration ---------------------------------------------------------------------------


def test_rules_from_site_configuration() -> None:
    rules = SelectionRules.from_mapping({"max_slice_thickness_mm": 6, "min_slices": 20, "require_axial": False})

    assert rules == SelectionRules(min_slices=20, max_slice_thickness_mm=6.0, require_axial=False)
    assert isinstance(rules.max_slice_thickness_mm, float)
    assert SelectionRules.from_mapping({}) == SelectionRules()


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"max_thickness": 6}, r"unknown series selection rule\(s\) \['max_thickness'\]"),
        ({"min_slice_thickness_mm": 4.0}, r"0 < min <= max"),
        ({"min_slices": "30"}, r"min_slices must be an integer"),
        ({"max_slice_thickness_mm": True}, r"max_slice_thickness_mm must be a finite number"),
        ({"require_axial": "yes"}, r"require_axial must be true or false"),
        ({"axial_tolerance_deg": 120}, r"axial_tolerance_deg must lie in \[0, 90\]"),
    ],
)
def test_invalid_site_configuration_is_refused(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectionRules.from_mapping(mapping)


def test_candidate_refuses_headers_of_another_series() -> None:
    candidate = _candidate(count=3)
    with pytest.raises(ValueError, match="paths for"):
        SeriesCandidate(candidate.series_instance_uid, candidate.paths[:2], candidate.headers)
    with pytest.raises(ValueError, match="given as series"):
        SeriesCandidate(generate_uid(), candidate.paths, candidate.headers)
