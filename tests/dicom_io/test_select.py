"""Tests of :func:`dicom_io.select.choose_series`: real scans from ../shared/data with their headers
rewritten into what real scanners and archives send, and synthetic headers for the edge cases."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, generate_uid

from archive_variants import ENHANCED_CT, SECONDARY_CAPTURE, VENDORS, XRAY_DOSE_SR, by_position, rewrite_series
from lungscreen.dicom_io.kernels import KernelFamily, kernel_family, series_kernel
from lungscreen.dicom_io.select import (
    RejectionCode,
    SelectionRules,
    SeriesChoice,
    SeriesRejection,
    choose_series,
)
from lungscreen.dicom_io.study import SeriesCandidate, index_study

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SOFT, SHARP = KernelFamily.SOFT, KernelFamily.SHARP


def _candidate(
    *,
    count: int = 40,
    step: float = 2.5,
    series_number: int = 2,
    description: str = "Chest",
    orientation: list[float] = AXIAL,
    image_type: list[str] | None = ["ORIGINAL", "PRIMARY", "AXIAL"],
    modality: str = "CT",
    sop_class_uid: str = CTImageStorage,
    slice_thickness: float | None = None,
    skip_positions: tuple[int, ...] = (),
    kernel: str | None = None,
    body_part: str | None = None,
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
        if image_type is not None:
            ds.ImageType = image_type
        if kernel is not None:
            ds.ConvolutionKernel = kernel
        if body_part is not None:
            ds.BodyPartExamined = body_part
        ds.ImagePositionPatient = [round(-150 + k * step * n, 4) if n else -150.0 for n in normal]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = step if slice_thickness is None else slice_thickness
        ds.Rows = ds.Columns = 512
        headers.append(ds)
    paths = tuple(Path(f"/store/{h.SOPInstanceUID}.dcm") for h in headers)
    return SeriesCandidate(series_uid, paths, tuple(headers))


def _sole_rejection(candidate: SeriesCandidate, rules: SelectionRules = SelectionRules()) -> SeriesRejection:
    choice = choose_series([candidate], rules)
    assert choice.selected is None and choice.why_selected == ""
    (rejection,) = choice.rejected
    assert rejection.series_instance_uid == candidate.series_instance_uid
    assert "Doe" not in rejection.reason
    return rejection


def _series(paths: list[Path]) -> SeriesCandidate:
    (series,) = index_study(paths).series
    return series


def _codes(choice: SeriesChoice) -> dict[str, RejectionCode]:
    return {r.series_description: r.code for r in choice.rejected}


# --- Real scans and their archive variants (header-only copies in tmp) ------------------------


@pytest.fixture(scope="module")
def lidc_paths(lidc_series_dir: Path) -> list[Path]:
    """The 133 slices of LIDC-IDRI-0001 (GE LightSpeed Plus, STANDARD, 2.5 mm), lowest first."""
    return by_position(sorted(lidc_series_dir.glob("*.dcm")))


@pytest.fixture(scope="module")
def lidc_chest(lidc_paths) -> list[Path]:
    """40 consecutive real slices through LIDC-IDRI-0001's lungs: what the variants rewrite
    where the geometry is not what is tested, so that each variant stays small."""
    return lidc_paths[40:80]


@pytest.fixture(scope="module")
def lung_dx(shared_data: Path) -> dict[str, list[Path]]:
    """Lung_Dx-A0001's two Philips series, 5 mm: series 2 with kernel L, series 3 with kernel B."""
    folder = shared_data / "lung_pet_ct_dx" / "Lung_Dx-A0001"
    if not folder.is_dir():
        pytest.skip(f"Lung-PET-CT-Dx series not found at {folder}")
    return {kernel: sorted((folder / name).glob("*.dcm")) for kernel, name in (("L", "ct_series2_5mm"),
                                                                              ("B", "ct_series3_5mm"))}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """``variants(name, sources, **attributes)``: a header-only rewritten copy, as one series."""
    root = tmp_path_factory.mktemp("variants")

    def make(name: str, sources: list[Path], **attributes) -> SeriesCandidate:
        return _series(rewrite_series(sources, root / name, **attributes))

    return make


def _coronal(ds: pydicom.Dataset, index: int) -> None:
    """A coronal stack of the same images: rows run feet-wards, slices step posteriorly."""
    ds.ImageOrientationPatient = CORONAL
    ds.ImagePositionPatient = [-166.0, -171.7 + 2.5 * index, -10.0]


def test_the_real_scans_as_stored_are_eligible(lidc_paths, lung_dx) -> None:
    lidc = _series(lidc_paths)
    choice = choose_series([lidc])
    assert choice.selected is lidc and choice.rejected == ()
    assert choice.why_selected == (
        r"the only eligible series (ImageType ORIGINAL\PRIMARY, kernel STANDARD (soft), 2.5 mm, 133 slices)"
    )
    for paths in lung_dx.values():
        philips = _series(paths)
        assert choose_series([philips]).selected is philips  # 5 mm: within the default limit
        # A screening site that keeps ACR's 2.5 mm protocol limit refuses it, and says why.
        (rejection,) = choose_series([philips], SelectionRules(max_slice_thickness_mm=2.5)).rejected
        assert (rejection.code, rejection.reason) == (RejectionCode.TOO_THICK, "slice thickness 5.0 mm > 2.5 mm")


# What real scanners and archives send for an axial reconstruction: every one must be eligible.
ELIGIBLE_VARIANTS = {
    **{f"{vendor}-{family}": dict(Manufacturer=maker, ImageType=image_type, ConvolutionKernel=kernel)
       for vendor, (maker, image_type, soft, sharp) in VENDORS.items()
       for family, kernel in (("soft", soft), ("sharp", sharp))},
    "luna16-tcia": dict(ImageType=["ORIGINAL", "SECONDARY", "AXIAL"]),
    "pacs-derived": dict(ImageType=["DERIVED", "SECONDARY", "AXIAL"]),
    "reconstruction-derived-primary": dict(ImageType=["DERIVED", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]),
    "anonymiser-stripped": dict(ImageType=None, ConvolutionKernel=None, BodyPartExamined=None,
                                SeriesDescription=None, SeriesNumber=None),
    "siemens-description": dict(ImageType=["DERIVED", "PRIMARY", "AXIAL"], SeriesDescription="Thorax 1.0 Br40 3"),
    "low-dose-description": dict(SeriesDescription="Low dose lung screening, minimum dose"),
}


@pytest.mark.parametrize("name", ELIGIBLE_VARIANTS)
def test_every_axial_reconstruction_real_archives_send_is_eligible(name, variants, lidc_chest) -> None:
    series = variants(name, lidc_chest, **ELIGIBLE_VARIANTS[name])
    choice = choose_series([series])
    assert choice.selected is series, choice.rejected
    assert choice.why_selected.startswith("the only eligible series")


@pytest.mark.parametrize(
    ("vendor", "family"), [(vendor, family) for vendor in VENDORS for family in (SOFT, SHARP)]
)
def test_vendor_kernels_are_read_into_their_family(vendor, family, variants, lidc_chest) -> None:
    maker, _, soft, sharp = VENDORS[vendor]
    kernel = soft if family is SOFT else sharp
    series = variants(f"kernel-{vendor}-{family}", lidc_chest[:2], Manufacturer=maker, ConvolutionKernel=kernel)
    name, group = series_kernel(series.headers[0])
    assert kernel_family(name, group) is family
    assert name == (kernel[0] if isinstance(kernel, list) else kernel)


def test_kernel_conventions_by_name() -> None:
    assert [kernel_family(k) for k in ("B30f", "B31f", "Br36d", "Hr38h", "I31f", "Qr40", "D30f")] == [SOFT] * 7
    assert [kernel_family(k) for k in ("B45f", "B70f", "Bl64d", "Br64d", "I70f", "U90u")] == [SHARP] * 6
    assert [kernel_family(k) for k in ("STANDARD", "SOFT", "LUNG", "BONE", "BONEPLUS", "DETAIL", "EDGE")] == [
        SOFT, SOFT, SHARP, SHARP, SHARP, SHARP, SHARP]
    assert [kernel_family(k) for k in ("A", "B", "C", "D", "L", "YA", "YB", "YC")] == [SOFT, SOFT] + [SHARP] * 6
    assert [kernel_family(k) for k in ("FC01", "FC03", "FC13", "FC18", "FC30", "FC51", "FC52", "FC86")] == [
        SOFT] * 4 + [SHARP] * 4
    assert [kernel_family(k) for k in ("BODY", "BODY SHARP", "B_SOFT_B", "L_LUNG", "SharpPlus", "SoftTissue")] == [
        SOFT, SHARP, SOFT, SHARP, SHARP, SOFT]
    assert kernel_family("XYZ") is None and kernel_family("") is None and kernel_family("CHST") is None
    assert kernel_family("FC13", "LUNG") is SHARP  # Enhanced CT's ConvolutionKernelGroup speaks first
    assert kernel_family("", "SOFT_TISSUE") is SOFT


# What real scanners and archives send that is no axial reconstruction: each refused with its code.
REFUSED_VARIANTS = {
    "siemens-topogram": (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"],
                              SeriesDescription="Topogram  0.6  T20f"), 1, RejectionCode.LOCALIZER,
                         r"localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER\CT_SOM5 TOP)"),
    "ge-scout": (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="Scout"), 2,
                 RejectionCode.LOCALIZER, r"localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER)"),
    "philips-surview": (dict(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], SeriesDescription="Surview"), 1,
                        RejectionCode.LOCALIZER, "localizer images (SeriesDescription 'Surview')"),
    "canon-scanogram": (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="Scanogram"), 2,
                        RejectionCode.LOCALIZER, r"localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER)"),
    "ge-reformat": (dict(ImageType=["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"],
                         SeriesDescription="Ax 2.5 reformat"), None, RejectionCode.REFORMAT,
                    r"a multiplanar reformat (MPR) (ImageType DERIVED\SECONDARY\REFORMATTED\AVERAGE)"),
    "siemens-mpr": (dict(ImageType=["DERIVED", "SECONDARY", "MPR", "CSA MPR"], SeriesDescription="Thorax MPR ax"),
                    None, RejectionCode.REFORMAT, r"a multiplanar reformat (MPR) (ImageType DERIVED\SECONDARY\MPR\CSA MPR)"),
    "canon-mpr-description": (dict(ImageType=["DERIVED", "SECONDARY", "AXIAL"], SeriesDescription="Lung MPR Ax 2.5"),
                              None, RejectionCode.REFORMAT, "a multiplanar reformat (MPR) (SeriesDescription 'Lung MPR Ax 2.5')"),
    "philips-mip": (dict(ImageType=["DERIVED", "SECONDARY", "MIP"], SeriesDescription="MIP 10mm"), None,
                    RejectionCode.PROJECTION, r"a projection (MIP, MinIP) (ImageType DERIVED\SECONDARY\MIP)"),
    "siemens-mip-description": (dict(ImageType=["DERIVED", "PRIMARY", "AXIAL"], SeriesDescription="Thorax MIP 10 B70f"),
                                None, RejectionCode.PROJECTION, "a projection (MIP, MinIP) (SeriesDescription 'Thorax MIP 10 B70f')"),
    "minip-description": (dict(ImageType=["DERIVED", "SECONDARY", "AXIAL"], SeriesDescription="MinIP 5 mm"), None,
                          RejectionCode.PROJECTION, "a projection (MIP, MinIP) (SeriesDescription 'MinIP 5 mm')"),
    "volume-rendering": (dict(ImageType=["DERIVED", "SECONDARY", "VOLUME_RENDER"], SeriesDescription="VRT"), None,
                         RejectionCode.VOLUME_RENDERING, r"a volume rendering (ImageType DERIVED\SECONDARY\VOLUME_RENDER)"),
    "curved": (dict(ImageType=["DERIVED", "SECONDARY", "CURVED"], SeriesDescription="Airway CPR"), None,
               RejectionCode.CURVED_REFORMAT, r"a curved reformat (ImageType DERIVED\SECONDARY\CURVED)"),
    "secondary-capture": (dict(SOPClassUID=SECONDARY_CAPTURE, SeriesDescription="Key images"), 3,
                          RejectionCode.SECONDARY_CAPTURE,
                          "a secondary capture (SOP class Secondary Capture Image Storage 1.2.840.10008.5.1.4.1.1.7)"),
    "ge-dose-report": (dict(SOPClassUID=SECONDARY_CAPTURE, ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"],
                            SeriesDescription="Dose Report"), 1, RejectionCode.DOSE_REPORT,
                       "a dose report (SeriesDescription 'Dose Report'), stored as a secondary capture"),
    "siemens-patient-protocol": (dict(SOPClassUID=SECONDARY_CAPTURE, ImageType=["ORIGINAL", "PRIMARY", "OTHER", "CSA REPORT"],
                                      SeriesDescription="Patient Protocol"), 1, RejectionCode.DOSE_REPORT,
                                 r"a dose report (ImageType ORIGINAL\PRIMARY\OTHER\CSA REPORT), stored as a secondary capture"),
    "screen-save-as-ct": (dict(ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"], SeriesDescription="Screen Save"),
                          1, RejectionCode.SCREEN_CAPTURE, r"a screen capture (ImageType DERIVED\SECONDARY\SCREEN SAVE)"),
    "dose-sr": (dict(SOPClassUID=XRAY_DOSE_SR, Modality="SR", SeriesDescription="Radiation Dose Information"), 1,
                RejectionCode.DOSE_REPORT,
                "a dose report (SOP class X-Ray Radiation Dose SR Storage 1.2.840.10008.5.1.4.1.1.88.67)"),
    "mr": (dict(SOPClassUID=MR_IMAGE_STORAGE, Modality="MR"), 3, RejectionCode.NOT_CT,
           "not a CT image series (SOP class MR Image Storage 1.2.840.10008.5.1.4.1.1.4; modality MR)"),
    "pet-ct-attenuation": (dict(Modality="PT"), None, RejectionCode.NOT_CT, "modality PT, not CT"),
    "too-few": (dict(), 20, RejectionCode.TOO_FEW_SLICES, "too few slices: 20 < 30"),
    "coronal": (dict(ImageType=["DERIVED", "SECONDARY", "OTHER"], SeriesDescription="Cor 2.5", edit=_coronal), None,
                RejectionCode.NOT_AXIAL, "not axial: the slice normal is 90.0° from the patient z axis (tolerance 15°)"),
    "missing-slice": (dict(), -10, RejectionCode.INVALID_GEOMETRY, "missing slices or uneven spacing"),
}


@pytest.mark.parametrize("name", REFUSED_VARIANTS)
def test_what_is_no_axial_reconstruction_is_refused_with_its_code(name, variants, lidc_chest) -> None:
    attributes, count, code, reason = REFUSED_VARIANTS[name]
    if count is None:
        sources = lidc_chest
    elif count > 0:
        sources = lidc_chest[:count]
    else:  # one slice missing, ``-count`` from the end
        sources = lidc_chest[:count] + lidc_chest[count + 1:]
    rejection = _sole_rejection(variants(name, sources, **attributes))
    assert rejection.code is code
    assert rejection.reason.startswith(reason), rejection.reason


@pytest.fixture(scope="module")
def enhanced_ct(lidc_chest, tmp_path_factory):
    """``enhanced_ct(sop_class, image_type)``: 40 LIDC slices converted by highdicom into one
    Legacy Converted Enhanced CT instance, optionally relabelled, stored without pixel data."""
    legacy = [pydicom.dcmread(p) for p in lidc_chest]
    converted = LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=7, sop_instance_uid=generate_uid(), instance_number=1
    )
    del converted.PixelData
    folder = tmp_path_factory.mktemp("enhanced")

    def make(name: str, **attributes) -> SeriesCandidate:
        (path,) = rewrite_series([_saved(converted, folder / "source.dcm")], folder / name, **attributes)
        return _series([path])

    return make


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    if not path.exists():
        ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_ct_real_frames_are_eligible_and_its_projections_refused(enhanced_ct) -> None:
    legacy = enhanced_ct("legacy-converted")
    enhanced = enhanced_ct("enhanced", SOPClassUID=ENHANCED_CT, ImageType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
    mip = enhanced_ct("enhanced-mip", SOPClassUID=ENHANCED_CT, ImageType=["DERIVED", "PRIMARY", "VOLUME", "MAXIMUM"])

    for series in (legacy, enhanced):
        choice = choose_series([series])
        assert choice.selected is series, choice.rejected
        assert "2.5 mm, 40 slices" in choice.why_selected
        assert "kernel STANDARD (soft)" in choice.why_selected  # read from the converted attributes
    rejection = _sole_rejection(mip)
    assert rejection.code is RejectionCode.PROJECTION
    assert rejection.reason == r"a projection (MIP, MinIP) (ImageType DERIVED\PRIMARY\VOLUME\MAXIMUM)"


# --- Choosing among eligible series: deterministic, and explained ------------------------------


@pytest.fixture(scope="module")
def siemens_study(variants, lidc_chest) -> dict[str, SeriesCandidate]:
    """A Siemens chest study as it reaches the PACS: topogram, two reconstructions with a soft
    and a sharp kernel, a coronal MPR, a MIP and the patient protocol."""
    maker, image_type, soft, sharp = VENDORS["siemens-classic"]
    common = dict(Manufacturer=maker)
    return {
        "topogram": variants("s-topogram", lidc_chest[:1], **common, SeriesNumber=1, SeriesDescription="Topogram",
                             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"]),
        "soft": variants("s-soft", lidc_chest, **common, SeriesNumber=3, SeriesDescription="Thorax 2.5 B30f",
                         ImageType=image_type, ConvolutionKernel=soft),
        "sharp": variants("s-sharp", lidc_chest, **common, SeriesNumber=2, SeriesDescription="Thorax 2.5 B70f",
                          ImageType=image_type, ConvolutionKernel=sharp),
        "mpr": variants("s-mpr", lidc_chest, **common, SeriesNumber=4, SeriesDescription="Cor MPR",
                        ImageType=["DERIVED", "SECONDARY", "MPR", "CSA MPR"], edit=_coronal),
        "mip": variants("s-mip", lidc_chest, **common, SeriesNumber=5, SeriesDescription="Thorax MIP 10",
                        ImageType=["DERIVED", "SECONDARY", "AXIAL", "CSA MIP"]),
        "protocol": variants("s-protocol", lidc_chest[:1], **common, SeriesNumber=501,
                             SeriesDescription="Patient Protocol", SOPClassUID=SECONDARY_CAPTURE,
                             ImageType=["ORIGINAL", "PRIMARY", "OTHER", "CSA REPORT"]),
    }


@pytest.mark.parametrize(
    ("preferred", "chosen", "why_not"),
    [
        (SOFT, "soft", "eligible, but the model prefers a soft kernel: series 3 has B30f (soft), this series B70f (sharp)"),
        (SHARP, "sharp", "eligible, but the model prefers a sharp kernel: series 2 has B70f (sharp), this series B30f (soft)"),
        (None, "sharp", "eligible, but series 2 ranks first (same slice spacing and count; lower SeriesNumber or UID)"),
    ],
)
def test_the_model_cards_kernel_picks_between_reconstructions(siemens_study, preferred, chosen, why_not) -> None:
    order = ["protocol", "mip", "soft", "topogram", "sharp", "mpr"]
    choice = choose_series([siemens_study[name] for name in order], preferred_kernel=preferred)

    assert choice.selected is siemens_study[chosen]
    other = "sharp" if chosen == "soft" else "soft"
    assert _codes(choice) == {
        "Patient Protocol": RejectionCode.DOSE_REPORT,
        "Thorax MIP 10": RejectionCode.PROJECTION,
        siemens_study[other].series_description: RejectionCode.NOT_CHOSEN,
        "Topogram": RejectionCode.LOCALIZER,
        "Cor MPR": RejectionCode.REFORMAT,
    }
    assert [r.series_instance_uid for r in choice.rejected] == [
        siemens_study[name].series_instance_uid for name in order if name != chosen
    ]  # in input order
    (not_chosen,) = [r for r in choice.rejected if r.code is RejectionCode.NOT_CHOSEN]
    assert not_chosen.reason == why_not
    assert choice.why_selected.startswith("ranked first of 2 eligible series (ImageType ORIGINAL\\PRIMARY, kernel")
    # Deterministic: the same choice whatever the order the series arrive in.
    assert choose_series([siemens_study[name] for name in reversed(order)], preferred_kernel=preferred).selected is (
        siemens_study[chosen]
    )


@pytest.mark.parametrize(("preferred", "kernel"), [(SOFT, "B"), (SHARP, "L"), (None, "L")])
def test_lung_dx_philips_kernels_b_and_l(lung_dx, preferred, kernel) -> None:
    series = {name: _series(paths) for name, paths in lung_dx.items()}
    choice = choose_series([series["L"], series["B"]], preferred_kernel=preferred)
    assert choice.selected is series[kernel]
    assert [r.code for r in choice.rejected] == [RejectionCode.NOT_CHOSEN]
    assert f"kernel {kernel} ({'soft' if kernel == 'B' else 'sharp'}" in choice.why_selected


def test_original_before_derived_primary_before_secondary(variants, lidc_chest) -> None:
    archive = variants("a-orig-secondary", lidc_chest, SeriesNumber=5, SeriesDescription="TCIA",
                       ImageType=["ORIGINAL", "SECONDARY", "AXIAL"])
    pacs = variants("a-derived", lidc_chest, SeriesNumber=4, SeriesDescription="PACS copy",
                    ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    scanner = variants("a-primary", lidc_chest[1:], SeriesNumber=6, SeriesDescription="scanner",
                       ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])

    choice = choose_series([archive, pacs])
    assert choice.selected is archive
    assert choice.rejected[0].reason == r"eligible, but series 5 is ORIGINAL (this series: ImageType DERIVED\SECONDARY)"
    choice = choose_series([archive, pacs, scanner])  # fewer slices, but PRIMARY
    assert choice.selected is scanner
    assert [r.reason for r in choice.rejected] == [
        r"eligible, but series 6 is PRIMARY (this series: ImageType ORIGINAL\SECONDARY)",
        r"eligible, but series 6 is ORIGINAL (this series: ImageType DERIVED\SECONDARY)",
    ]


def test_a_series_labelled_as_another_body_part_is_tried_last_not_refused() -> None:
    head = _candidate(step=1.0, series_number=2, description="Head 1.0", body_part="HEAD")
    chest = _candidate(step=2.5, series_number=3, description="Chest 2.5", body_part="CHEST")

    choice = choose_series([head, chest])
    assert choice.selected is chest
    assert choice.rejected[0].reason == "eligible, but its BodyPartExamined HEAD names no lungs; series 3 ranks first"
    assert choose_series([head]).selected is head  # labels can be wrong: the pixels decide (server/pipeline.py)


# --- Rejections on synthetic headers ---------------------------------------------------------


def test_a_localizer_hidden_among_axial_images_rejects_the_series() -> None:
    candidate = _candidate()
    candidate.headers[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    rejection = _sole_rejection(candidate)
    assert rejection.code is RejectionCode.LOCALIZER
    assert rejection.reason == r"1 of 40 instances are localizer images (ImageType ORIGINAL\PRIMARY\LOCALIZER)"


@pytest.mark.parametrize(
    ("candidate_args", "code", "reason"),
    [
        ({"step": 0.3}, RejectionCode.TOO_THIN, "slice thickness 0.3 mm < 0.4 mm"),
        ({"step": 7.5}, RejectionCode.TOO_THICK, "slice thickness 7.5 mm > 5.0 mm"),
        ({"count": 1, "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"]}, RejectionCode.TOO_FEW_SLICES,
         "too few slices: 1 < 30"),
    ],
)
def test_thickness_and_count_limits(candidate_args, code, reason) -> None:
    rejection = _sole_rejection(_candidate(**candidate_args))
    assert (rejection.code, rejection.reason) == (code, reason)


def test_inconsistent_geometry_is_rejected() -> None:
    mixed_orientation = _candidate()
    mixed_orientation.headers[5].ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.2]
    mixed_size = _candidate()
    mixed_size.headers[5].Rows = 256

    assert _sole_rejection(mixed_orientation).reason.startswith("mixed orientations: ImageOrientationPatient differs")
    rejection = _sole_rejection(mixed_size)
    assert (rejection.code, rejection.reason) == (
        RejectionCode.INVALID_GEOMETRY, "mixed image sizes (rows x columns): 256x512, 512x512")


def test_slightly_oblique_series_is_axial_within_tolerance() -> None:
    # 10° about the x axis: within the default 15°, rejected with a 5° tolerance.
    oblique = [1, 0, 0, 0, 0.984808, -0.173648]

    assert choose_series([_candidate(orientation=oblique)]).selected is not None
    assert _sole_rejection(_candidate(orientation=oblique), SelectionRules(axial_tolerance_deg=5)).reason == (
        "not axial: the slice normal is 10.0° from the patient z axis (tolerance 5°)"
    )
    assert choose_series([_candidate(orientation=CORONAL)], SelectionRules(require_axial=False)).selected is not None


def test_thickness_is_measured_from_positions_not_slice_thickness() -> None:
    nominally_thick = _candidate(step=1.25, slice_thickness=5.0)
    nominally_thin = _candidate(step=7.5, slice_thickness=1.0)

    assert choose_series([nominally_thick]).selected is nominally_thick
    assert _sole_rejection(nominally_thin).reason == "slice thickness 7.5 mm > 5.0 mm"


def test_the_geometry_is_validated_once_per_series() -> None:
    candidate = _candidate()
    choose_series([candidate])
    geometry = candidate.geometry
    choose_series([candidate])
    assert candidate.geometry is geometry  # cached: the selection and read_series_volume share it


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
    shared.CTReconstructionSequence = [Dataset()]
    shared.CTReconstructionSequence[0].ConvolutionKernel = "FC52"
    shared.CTReconstructionSequence[0].ConvolutionKernelGroup = "LUNG"
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
    assert "kernel FC52 (sharp)" in choice.why_selected
    # Without SeriesNumber the chosen series is named by its UID.
    assert choice.rejected[0].reason == f"eligible, but series {ds.SeriesInstanceUID} is thinner (1.0 mm vs 2.0 mm)"


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
    choice = choose_series([_candidate(step=7.5), _candidate(modality="PT")])
    assert choice.selected is None
    assert [(r.code, r.reason) for r in choice.rejected] == [
        (RejectionCode.TOO_THICK, "slice thickness 7.5 mm > 5.0 mm"), (RejectionCode.NOT_CT, "modality PT, not CT")]


def test_a_rejection_code_is_typed() -> None:
    assert SeriesRejection("1.2.3", "", "localizer", "text").code is RejectionCode.LOCALIZER
    with pytest.raises(ValueError):
        SeriesRejection("1.2.3", "", "eligible, but", "text")


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
        ({"min_slice_thickness_mm": 6.0}, r"0 < min <= max"),
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
