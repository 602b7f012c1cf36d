"""Tests of :func:`dicom_io.volume.read_series_volume` on real LIDC slices and synthetic series."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from lungscreen.errors import VolumeError
from lungscreen.dicom_io.select import SelectionRules, choose_series
from lungscreen.dicom_io.study import index_study
from lungscreen.dicom_io.volume import Volume, read_series_volume

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Rows run along (cos 30°, sin 30°, 0), columns tilt out of the axial plane: a non-axial normal.
OBLIQUE = (0.866025, 0.5, 0.0, -0.353553, 0.612372, -0.707107)
PIXEL_SPACING = (0.8, 0.6)  # between rows, between columns: unequal, so a swap shows
SIZE = 32
PATIENT_NAME = "Doe^Jane"


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _image_dataset(sop_class_uid: str, uids: dict[str, str], stored: np.ndarray) -> Dataset:
    """Patient, study, series and Image Pixel attributes common to single- and multi-frame images."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "SYNTH-001"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def _ct_slice(position: np.ndarray, orientation: tuple[float, ...], stored: np.ndarray, uids: dict[str, str]) -> Dataset:
    ds = _image_dataset(CTImageStorage, uids, stored)
    ds.ImagePositionPatient = [round(float(v), 6) for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = 2.5
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    return ds


def _write_series(
    folder: Path,
    *,
    count: int = 12,
    step: float = 2.5,
    orientation: tuple[float, ...] = AXIAL,
    drift_per_slice: tuple[float, float, float] = (0.0, 0.0, 0.0),
    edit: Callable[[int, Dataset], None] | None = None,
) -> tuple[list[Path], np.ndarray]:
    """Write ``count`` 32x32 slices; return their paths and stored values, in position order."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame_of_reference": generate_uid()}
    stored = np.random.default_rng(7).integers(-200, 1800, size=(count, SIZE, SIZE), dtype=np.int16)
    origin = np.array([-20.0, 15.5, 100.25])
    paths = []
    for k in range(count):
        position = origin + k * step * _normal(orientation) + k * np.asarray(drift_per_slice)
        ds = _ct_slice(position, orientation, stored[k], uids)
        ds.InstanceNumber = k + 1
        if edit is not None:
            edit(k, ds)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, stored


def _positions(paths: list[Path]) -> dict[str, np.ndarray]:
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return {h.SOPInstanceUID: np.array([float(v) for v in h.ImagePositionPatient]) for h in headers}


def _assert_affine_matches_positions(volume: Volume, paths: list[Path]) -> None:
    positions = _positions(paths)
    for k, ref in enumerate(volume.slices):
        np.testing.assert_allclose(volume.index_to_lps((k, 0, 0)), positions[ref.sop_instance_uid], atol=1e-3)


def _reject_reason(paths: list[Path], **kwargs) -> str:
    with pytest.raises(VolumeError) as caught:
        read_series_volume(paths, **kwargs)
    reason = str(caught.value)
    assert "Doe" not in reason  # never patient data in a reason
    return reason


# --- Real data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidc_paths(lidc_series_dir: Path) -> list[Path]:
    return sorted(lidc_series_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def lidc_subset(lidc_paths: list[Path]) -> list[Path]:
    """12 neighbouring LIDC slices (by z): enough for a volume, quick to re-encode."""
    by_z = sorted(lidc_paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    return by_z[60:72]


@pytest.fixture(scope="module")
def lidc_subset_volume(lidc_subset: list[Path]) -> Volume:
    return read_series_volume(lidc_subset)


def test_lidc_series_assembles_with_affine_through_every_slice_position(lidc_paths: list[Path]) -> None:
    volume = read_series_volume(lidc_paths)

    assert volume.voxels.shape == (133, 512, 512)
    assert volume.voxels.dtype == np.float32
    assert volume.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    assert volume.series_instance_uid == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    np.testing.assert_allclose(volume.index_to_lps((0, 0, 0)), (-166.0, -171.7, -340.0), atol=1e-3)
    _assert_affine_matches_positions(volume, lidc_paths)
    # HU = stored + RescaleIntercept (-1024), slope 1, for a slice in the middle.
    ref = volume.slices[66]
    source = next(
        p for p in lidc_paths
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == ref.sop_instance_uid
    )
    np.testing.assert_array_equal(volume.voxels[66], pydicom.dcmread(source).pixel_array.astype(np.float32) - 1024)


@pytest.mark.parametrize(
    "transfer_syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "jpeg2000"]
)
def test_compressed_copies_give_identical_voxels(
    tmp_path: Path, lidc_subset: list[Path], lidc_subset_volume: Volume, transfer_syntax: str
) -> None:
    encoder = get_encoder(transfer_syntax)
    if not encoder.is_available:
        pytest.skip(f"no {transfer_syntax.name} encoder: {encoder.missing_dependencies}")
    copies = []
    for path in lidc_subset:
        ds = pydicom.dcmread(path)
        ds.compress(transfer_syntax, generate_instance_uid=False)
        copies.append(tmp_path / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    assert pydicom.dcmread(copies[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax

    volume = read_series_volume(copies)

    np.testing.assert_array_equal(volume.voxels, lidc_subset_volume.voxels)
    np.testing.assert_array_equal(volume.affine, lidc_subset_volume.affine)
    assert volume.slices == lidc_subset_volume.slices


def test_legacy_converted_enhanced_ct_matches_single_frame_series(
    tmp_path: Path, lidc_subset: list[Path], lidc_subset_volume: Volume
) -> None:
    legacy = [pydicom.dcmread(path) for path in lidc_subset]
    multi_frame = LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=legacy[0].SeriesInstanceUID, series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1,
    )
    path = tmp_path / "legacy-converted.dcm"
    multi_frame.save_as(path)

    volume = read_series_volume([path])

    np.testing.assert_array_equal(volume.voxels, lidc_subset_volume.voxels)
    np.testing.assert_allclose(volume.affine, lidc_subset_volume.affine, atol=1e-6)
    assert {ref.sop_class_uid for ref in volume.slices} == {"1.2.840.10008.5.1.4.1.1.2.2"}
    assert {ref.sop_instance_uid for ref in volume.slices} == {multi_frame.SOPInstanceUID}
    assert sorted(ref.frame_number for ref in volume.slices) == list(range(1, 13))


def test_frame_headers_and_geometry_built_by_the_selection_give_the_same_volume(
    lidc_subset: list[Path], lidc_subset_volume: Volume
) -> None:
    (series,) = index_study(lidc_subset).series
    # builds series.frames and validates series.geometry, once
    assert choose_series([series], SelectionRules(min_slices=10)).selected is series

    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames, geometry=series.geometry)

    np.testing.assert_array_equal(volume.voxels, lidc_subset_volume.voxels)
    np.testing.assert_array_equal(volume.affine, lidc_subset_volume.affine)
    assert volume.slices == lidc_subset_volume.slices
    with pytest.raises(ValueError, match="one tuple of frames per header"):
        read_series_volume(series.paths, headers=series.headers, frames=series.frames[:-1])
    with pytest.raises(ValueError, match="frames come with their headers"):
        read_series_volume(series.paths, frames=series.frames)
    with pytest.raises(ValueError, match="a validated geometry comes with the frames"):
        read_series_volume(series.paths, headers=series.headers, geometry=series.geometry)
    with pytest.raises(ValueError, match="a geometry of 12 slices given for 11 frames"):
        read_series_volume(series.paths[1:], headers=series.headers[1:], frames=series.frames[1:],
                           geometry=series.geometry)


# --- Ordering and geometry -------------------------------------------------------------------


def test_sorts_by_position_whatever_the_file_order_and_instance_numbers(tmp_path: Path) -> None:
    paths, stored = _write_series(tmp_path, edit=lambda k, ds: setattr(ds, "InstanceNumber", 100 - k))
    shuffled = paths[:]
    random.Random(3).shuffle(shuffled)

    volume = read_series_volume(shuffled)

    np.testing.assert_array_equal(volume.voxels, stored.astype(np.float32) - 1024)
    assert [ref.sop_instance_uid for ref in volume.slices] == [p.stem for p in paths]
    assert all(ref.sop_class_uid == CTImageStorage and ref.frame_number is None for ref in volume.slices)


def test_slice_step_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path, step=2.0, edit=lambda k, ds: setattr(ds, "SliceThickness", 5.0))

    volume = read_series_volume(paths)

    assert volume.spacing == pytest.approx((2.0, 0.8, 0.6))
    _assert_affine_matches_positions(volume, paths)


def test_oblique_orientation_assembles_with_matching_affine(tmp_path: Path) -> None:
    paths, stored = _write_series(tmp_path, orientation=OBLIQUE, step=1.5)
    random.Random(5).shuffle(paths)

    volume = read_series_volume(paths)

    _assert_affine_matches_positions(volume, paths)
    origin = volume.index_to_lps((0, 0, 0))
    row_cosines, column_cosines = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    # One row down moves along the column cosines by the row spacing, one column right
    # along the row cosines by the column spacing (PS3.3 C.7.6.2.1.1).
    np.testing.assert_allclose(volume.index_to_lps((0, 1, 0)) - origin, 0.8 * column_cosines, atol=1e-5)
    np.testing.assert_allclose(volume.index_to_lps((0, 0, 1)) - origin, 0.6 * row_cosines, atol=1e-5)
    np.testing.assert_allclose(volume.lps_to_index(volume.index_to_lps((3.0, 7.5, 20.0))), (3.0, 7.5, 20.0), atol=1e-9)
    np.testing.assert_array_equal(volume.voxels, stored.astype(np.float32) - 1024)


def _write_enhanced_ct(
    path: Path, singles: list[Dataset], intercepts: list[int], ct_acquisition_details: Dataset | None = None
) -> Dataset:
    """One Enhanced CT instance whose frames are the given single-frame slices, in that order.

    Orientation and pixel measures go to the shared functional groups, position and rescale
    to the per-frame groups (PS3.3 C.7.6.16); each frame is re-stored for its own intercept.
    """
    hu = [single.pixel_array.astype(np.int32) + int(single.RescaleIntercept) for single in singles]
    frames = np.stack([frame_hu - intercept for frame_hu, intercept in zip(hu, intercepts)])
    uids = {"study": singles[0].StudyInstanceUID, "series": singles[0].SeriesInstanceUID,
            "frame_of_reference": singles[0].FrameOfReferenceUID}
    ds = _image_dataset(EnhancedCTImageStorage, uids, frames)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(singles)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = singles[0].ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = singles[0].PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = singles[0].SliceThickness
    if ct_acquisition_details is not None:
        shared.CTAcquisitionDetailsSequence = [ct_acquisition_details]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for single, intercept in zip(singles, intercepts):
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = single.ImagePositionPatient
        item.PixelValueTransformationSequence = [Dataset()]
        item.PixelValueTransformationSequence[0].RescaleIntercept = intercept
        item.PixelValueTransformationSequence[0].RescaleSlope = 1
        item.PixelValueTransformationSequence[0].RescaleType = "HU"
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_enhanced_ct_frames_across_two_instances_match_single_frame_series(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path / "single", orientation=OBLIQUE)
    reference = read_series_volume(paths)
    singles = [pydicom.dcmread(path) for path in paths]

    # Even slices in one instance, odd in the other, each in reverse order; every frame with
    # its own intercept, so a rescale read from the wrong frame shows.
    expected_refs: dict[int, tuple[str, int]] = {}
    enhanced_paths = []
    for parity in (0, 1):
        ks = list(range(parity, len(paths), 2))[::-1]
        enhanced_paths.append(tmp_path / f"enhanced-{parity}.dcm")
        ds = _write_enhanced_ct(enhanced_paths[-1], [singles[k] for k in ks], [-1024 - 3 * k for k in ks])
        expected_refs.update({k: (ds.SOPInstanceUID, frame + 1) for frame, k in enumerate(ks)})

    volume = read_series_volume(enhanced_paths[::-1])

    np.testing.assert_array_equal(volume.voxels, reference.voxels)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-6)
    assert [(ref.sop_instance_uid, ref.frame_number) for ref in volume.slices] == [
        expected_refs[k] for k in range(len(paths))
    ]
    assert {ref.sop_class_uid for ref in volume.slices} == {EnhancedCTImageStorage}


def test_enhanced_ct_gantry_tilt_in_functional_groups_is_rejected(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path / "single")
    details = Dataset()
    details.GantryDetectorTilt = -15
    path = tmp_path / "enhanced.dcm"
    _write_enhanced_ct(path, [pydicom.dcmread(p) for p in paths], [-1024] * len(paths), details)

    reason = _reject_reason([path])

    assert reason.startswith("gantry tilt of -15° (GantryDetectorTilt of SOP instance ")
    assert " frame 1)" in reason


# --- Pixel values ----------------------------------------------------------------------------


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    def rescale(k: int, ds: Dataset) -> None:
        ds.RescaleSlope = 2
        ds.RescaleIntercept = -1000

    paths, stored = _write_series(tmp_path, edit=rescale)

    volume = read_series_volume(paths)

    np.testing.assert_array_equal(volume.voxels, stored.astype(np.float32) * 2 - 1000)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
@pytest.mark.parametrize("pixel_representation", [0, 1], ids=["unsigned", "signed"])
def test_unused_high_bits_are_ignored_as_pydicom_does(
    tmp_path: Path, transfer_syntax: str, pixel_representation: int
) -> None:
    # 12 bits stored in 16: the top 4 bits carry junk (an overlay, say) that must not reach HU.
    junk = np.uint16(0xA000)

    def twelve_bits_with_junk(k: int, ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, pixel_representation
        values = np.frombuffer(ds.PixelData, dtype="<u2") & np.uint16(0x0FFF)
        ds.PixelData = (values | junk).astype("<u2").tobytes()

    paths, _ = _write_series(tmp_path, edit=twelve_bits_with_junk)

    volume = read_series_volume(paths)

    by_pydicom = {path.stem: pydicom.dcmread(path).pixel_array.astype(np.float32) - 1024 for path in paths}
    for k, ref in enumerate(volume.slices):
        np.testing.assert_array_equal(volume.voxels[k], by_pydicom[ref.sop_instance_uid])
    assert volume.voxels.max() <= 4095 - 1024  # no junk bit survived


def test_elements_after_pixel_data_do_not_shift_the_pixels(tmp_path: Path) -> None:
    def trailing_padding(k: int, ds: Dataset) -> None:
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)  # Data Set Trailing Padding, after Pixel Data

    paths, stored = _write_series(tmp_path, edit=trailing_padding)

    np.testing.assert_array_equal(read_series_volume(paths).voxels, stored.astype(np.float32) - 1024)


def test_missing_rescale_means_slope_one_intercept_zero(tmp_path: Path) -> None:
    def no_rescale(k: int, ds: Dataset) -> None:
        del ds.RescaleSlope, ds.RescaleIntercept

    paths, stored = _write_series(tmp_path, edit=no_rescale)

    np.testing.assert_array_equal(read_series_volume(paths).voxels, stored.astype(np.float32))


@pytest.mark.parametrize(
    ("vr", "padding_value"),
    [("SS", -2000), ("US", 63536)],  # LIDC writes -2000 under VR US, as 63536
    ids=["signed", "signed-written-as-US"],
)
def test_pixel_padding_becomes_air(tmp_path: Path, vr: str, padding_value: int) -> None:
    def pad(k: int, ds: Dataset) -> None:
        pixels = ds.pixel_array.copy()
        pixels[:4] = -2000  # the first 4 rows are outside the field of view
        pixels[4, 0] = -1999  # one above the padding value: a real (if odd) stored value
        ds.PixelData = pixels.astype("<i2").tobytes()
        ds.add_new(0x00280120, vr, padding_value)  # PixelPaddingValue
        ds.RescaleIntercept = -1000

    paths, stored = _write_series(tmp_path, edit=pad)

    voxels = read_series_volume(paths).voxels

    assert (voxels[:, :4] == -1024).all()
    assert (voxels[:, 4, 0] == -1999 - 1000).all()
    np.testing.assert_array_equal(voxels[:, 5:], stored[:, 5:].astype(np.float32) - 1000)


def test_pixel_padding_range_limit_covers_the_whole_range(tmp_path: Path) -> None:
    def pad(k: int, ds: Dataset) -> None:
        pixels = ds.pixel_array.copy()
        pixels[0, :3] = (-3000, -2500, -2001)
        ds.PixelData = pixels.astype("<i2").tobytes()
        ds.PixelPaddingValue = -3000
        ds.PixelPaddingRangeLimit = -2500

    paths, _ = _write_series(tmp_path, edit=pad)

    voxels = read_series_volume(paths).voxels

    assert (voxels[:, 0, :2] == -1024).all()
    assert (voxels[:, 0, 2] == -2001 - 1024).all()


# --- Rejections -----------------------------------------------------------------------------


def test_missing_slice_names_the_gap(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path)
    del paths[5]

    reason = _reject_reason(paths)

    assert "1 of 10 gaps" in reason
    assert "gap of 5.00 mm between 110.25 and 115.25, about 1 slice(s) missing" in reason


def test_uneven_spacing_is_rejected(tmp_path: Path) -> None:
    def shift(k: int, ds: Dataset) -> None:
        if k == 6:
            ds.ImagePositionPatient[2] += 0.8

    paths, _ = _write_series(tmp_path, edit=shift)

    reason = _reject_reason(paths)

    assert reason.startswith("missing slices or uneven spacing: 2 of 11 gaps deviate from the median step 2.50 mm")
    assert "gap of 3.30 mm between 112.75 and 116.05" in reason


def test_gantry_tilt_seen_in_positions_is_rejected(tmp_path: Path) -> None:
    # A 10° tilt: each 2.5 mm step also moves 0.44 mm along y, within the image plane.
    paths, _ = _write_series(tmp_path, drift_per_slice=(0.0, 2.5 * np.tan(np.radians(10)), 0.0))

    reason = _reject_reason(paths)

    assert reason.startswith("gantry tilt:")
    assert "about 10.0°" in reason
    assert "resampling a tilted stack is out of scope" in reason


def test_duplicate_positions_are_rejected(tmp_path: Path) -> None:
    def duplicate(k: int, ds: Dataset) -> None:
        if k == 4:
            ds.ImagePositionPatient[2] -= 2.5

    paths, _ = _write_series(tmp_path, edit=duplicate)

    assert _reject_reason(paths).startswith("duplicate slice positions: 1 slice(s) share the location of another")


def _set_on_slice(index: int, keyword: str, value: object) -> Callable[[int, Dataset], None]:
    """An edit of one slice: set ``keyword`` to ``value``, or delete it when ``value`` is None."""

    def edit(k: int, ds: Dataset) -> None:
        if k == index:
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return edit


SOP = r"SOP instance [\d.]+"


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        pytest.param(
            "GantryDetectorTilt", 12.0,
            rf"^gantry tilt of 12° \(GantryDetectorTilt of {SOP}\); resampling a tilted stack is out of scope$",
            id="gantry-tilt-attribute",
        ),
        pytest.param(
            "ImageOrientationPatient", [1, 0, 0, 0, 0.995, 0.0998],
            r"^mixed orientations: ImageOrientationPatient differs between slices by up to 0\.0998",
            id="mixed-orientation",
        ),
        pytest.param(
            "PixelSpacing", [0.8, 0.7], r"^mixed pixel spacing \(row/column mm\): 0\.8/0\.6, 0\.8/0\.7$",
            id="mixed-pixel-spacing",
        ),
        pytest.param("ImagePositionPatient", None, rf"^{SOP} has no ImagePositionPatient$", id="no-position"),
        pytest.param("ImageOrientationPatient", None, rf"^{SOP} has no ImageOrientationPatient$", id="no-orientation"),
        pytest.param("PixelSpacing", None, rf"^{SOP} has no PixelSpacing$", id="no-pixel-spacing"),
        pytest.param(
            "ImagePositionPatient", [1.0, 2.0], rf"^{SOP}: ImagePositionPatient must hold 3 finite numbers, got 2",
            id="short-position",
        ),
        pytest.param(  # found by tests/dicom_io/test_hostile.py: finite in float64, infinite as float32 HU
            "RescaleIntercept", "3.40282357e+38",
            rf"^{SOP}: rescale slope/intercept 1\.0/3\.40282357e\+38 do not give finite single-precision values$",
            id="intercept-beyond-float32",
        ),
        pytest.param("SeriesInstanceUID", "1.2.3.4", r"^files from 2 series", id="two-series"),
        pytest.param(
            "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7",
            r"^not a CT image series \(SOP class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.7\)$",
            id="secondary-capture",
        ),
    ],
)
def test_inconsistent_headers_are_rejected(tmp_path: Path, keyword: str, value: object, expected: str) -> None:
    paths, _ = _write_series(tmp_path, edit=_set_on_slice(3, keyword, value))

    with pytest.raises(VolumeError, match=expected):
        read_series_volume(paths)


def test_a_stack_larger_than_any_ct_is_rejected(tmp_path: Path) -> None:
    """A PixelSpacing of "40" for "0.4" would make the model's grid 100 times larger than the images."""
    wide, _ = _write_series(tmp_path / "wide", edit=lambda k, ds: setattr(ds, "PixelSpacing", [40.0, 35.0]))
    long, _ = _write_series(tmp_path / "long", step=300.0)

    assert _reject_reason(wide) == (
        "field of view 1120 x 1280 mm (32 x 32 pixels, PixelSpacing 40/35 mm) is wider than any CT "
        "reconstructs (at most 1000 mm): PixelSpacing, Rows or Columns is wrong"
    )
    assert _reject_reason(long) == (
        "the slices span 3300 mm, longer than any CT scan (at most 3000 mm): ImagePositionPatient is wrong"
    )


def test_mixed_image_sizes_are_rejected(tmp_path: Path) -> None:
    def shrink(k: int, ds: Dataset) -> None:
        if k == 2:
            ds.Rows = 16
            ds.PixelData = ds.PixelData[: 16 * SIZE * 2]

    paths, _ = _write_series(tmp_path, edit=shrink)

    assert _reject_reason(paths) == "mixed image sizes (rows x columns): 16x32, 32x32"


def test_single_slice_and_too_few_slices_are_rejected(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path, count=5)

    assert _reject_reason(paths[:1]) == "a single slice is not a volume"
    assert _reject_reason(paths) == "only 5 slices, at least 10 needed"
    assert read_series_volume(paths, min_slices=5).voxels.shape == (5, SIZE, SIZE)


def test_missing_pixel_data_names_the_instance(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path, edit=_set_on_slice(7, "PixelData", None))

    assert _reject_reason(paths) == f"SOP instance {paths[7].stem} has no pixel data (PixelData is missing)"


def test_truncated_file_names_the_instance_and_not_the_patient(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path)
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) - 700])  # cut inside the pixel data

    reason = _reject_reason(paths)

    assert reason.startswith(f"SOP instance {paths[4].stem}: pixel data cannot be decoded (Explicit VR Little Endian)")


def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    paths, _ = _write_series(tmp_path)
    paths[0].write_bytes(b"not a DICOM file")

    assert _reject_reason(paths).startswith(f"cannot read the DICOM header of file {paths[0].name}")
