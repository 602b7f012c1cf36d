"""Write a HU volume as a single-frame CT Image Storage DICOM series.

The output is one file per axial slice, suitable as input for the inference server and
as training data: every Type 1/2 attribute of the CT Image IOD modules is present, so
the files pass ``dciodvfy`` without errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UID,
    generate_uid,
)

__all__ = [
    "HU_MAX",
    "HU_MIN",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "WrittenSeries",
    "write_ct_series",
]

#: Stored value 0 maps to -1024 HU (air); this is the conventional CT rescale intercept.
RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0
#: Lowest representable HU: stored value 0 (nothing in a CT is below air).
HU_MIN = -1024.0
#: Highest HU of the classic 12-bit CT range (stored value 4095); dense bone/metal saturate here.
HU_MAX = 3071.0

#: Transfer syntaxes this writer can produce (all lossless, so HU round-trip exactly).
SUPPORTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless}
)

#: pylibjpeg-openjpeg always encodes 6 wavelet resolutions, which needs images of at least 2**5 pixels a side.
JPEG2000_MIN_SIZE = 32

#: Fixed acquisition metadata: synthetic data have no real date, and a constant keeps output reproducible.
STUDY_DATE = "20240101"
STUDY_TIME = "090000"
#: Typical chest-CT tube voltage (kVp).
KVP = "120"
MANUFACTURER = "LungScreen synthetic"
#: Lung window for display (centre/width in HU), the usual reading window for nodules.
LUNG_WINDOW_CENTER = "-600"
LUNG_WINDOW_WIDTH = "1500"


@dataclass(frozen=True)
class WrittenSeries:
    """Identifiers and file paths of a series written by :func:`write_ct_series`."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    paths: tuple[Path, ...]  # in slice order k = 0..n-1


def _format_ds(value: float) -> str:
    """Format a float as a DICOM Decimal String (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"


def _slice_dataset(
    stored: np.ndarray,
    k: int,
    n_slices: int,
    spacing: tuple[float, float, float],
    origin_lps: tuple[float, float, float],
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    patient_id: str,
    patient_name: str,
    accession_number: str,
    series_number: int,
    series_description: str,
    slice_thickness: float,
    transfer_syntax_uid: str,
    reverse_instance_numbers: bool,
) -> Dataset:
    """Build the complete dataset (with file meta) of slice ``k`` from its int16 stored values."""
    step, row_spacing, col_spacing = spacing
    rows, cols = stored.shape
    sop_instance_uid = generate_uid(entropy_srcs=[series_instance_uid, str(k)])
    z = origin_lps[2] + k * step

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    # General Image / General Acquisition
    ds.InstanceNumber = n_slices - k if reverse_instance_numbers else k + 1
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = STUDY_TIME
    ds.AcquisitionNumber = 1
    # Image Plane
    ds.PixelSpacing = [_format_ds(row_spacing), _format_ds(col_spacing)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [_format_ds(origin_lps[0]), _format_ds(origin_lps[1]), _format_ds(z)]
    ds.SliceThickness = _format_ds(slice_thickness)
    ds.SliceLocation = _format_ds(z)
    # Image Pixel / CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _format_ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = _format_ds(RESCALE_SLOPE)
    ds.RescaleType = "HU"
    ds.KVP = KVP
    # VOI LUT
    ds.WindowCenter = LUNG_WINDOW_CENTER
    ds.WindowWidth = LUNG_WINDOW_WIDTH

    if transfer_syntax_uid == ExplicitVRLittleEndian:
        ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    else:
        ds.compress(transfer_syntax_uid, stored)
    return ds


def write_ct_series(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    out_dir: Path,
    *,
    origin_lps: tuple[float, float, float] | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "SYNTH-0001",
    patient_name: str = "SYNTHETIC^PHANTOM",
    accession_number: str = "SYNACC0001",
    series_number: int = 1,
    series_description: str = "Synthetic chest CT",
    slice_thickness: float | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    reverse_instance_numbers: bool = False,
) -> WrittenSeries:
    """Write ``hu`` as one CT Image Storage file per axial slice.

    Args:
        hu: Volume in Hounsfield units, indexed ``(k, j, i)`` = (slice, row, column); any real dtype.
            Values are rounded and clipped to ``[HU_MIN, HU_MAX]``.
        spacing: ``(slice step, row spacing, column spacing)`` in mm.
        out_dir: Directory to create/fill with ``slice_0000.dcm``, ``slice_0001.dcm``, ...
        origin_lps: Patient (LPS) position of voxel (0, 0, 0) in mm. Defaults to centring the
            image plane on the z axis at z = 0. Slice ``k`` lies at ``origin + (0, 0, k * step)``.
        study_instance_uid: Study UID; a fresh UID when ``None``.
        series_instance_uid: Series UID; a fresh UID when ``None``. SOP Instance UIDs are derived
            deterministically from it.
        patient_id: Patient ID.
        patient_name: Patient name (DICOM PN form).
        accession_number: Accession number.
        series_number: Series number.
        series_description: Series description.
        slice_thickness: Nominal slice thickness in mm; defaults to the slice step.
        transfer_syntax_uid: One of :data:`SUPPORTED_TRANSFER_SYNTAXES` (JPEG 2000 needs images of
            at least :data:`JPEG2000_MIN_SIZE` pixels a side).
        reverse_instance_numbers: Number instances n..1 instead of 1..n (to exercise readers that
            must sort by position rather than instance number).

    Returns:
        The UIDs used and the written paths in slice order.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (k, j, i), got shape {hu.shape}")
    if transfer_syntax_uid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax_uid!r}")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    n_slices, rows, cols = hu.shape
    if transfer_syntax_uid == JPEG2000Lossless and min(rows, cols) < JPEG2000_MIN_SIZE:
        raise ValueError(f"JPEG 2000 encoding needs rows and columns >= {JPEG2000_MIN_SIZE}, got {rows}x{cols}")
    step, row_spacing, col_spacing = (float(s) for s in spacing)
    if origin_lps is None:
        origin_lps = (-(cols * col_spacing) / 2.0, -(rows * row_spacing) / 2.0, 0.0)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    thickness = step if slice_thickness is None else float(slice_thickness)

    stored = (np.clip(np.rint(hu), HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype(np.int16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(n_slices):
        ds = _slice_dataset(
            stored[k],
            k,
            n_slices,
            (step, row_spacing, col_spacing),
            (float(origin_lps[0]), float(origin_lps[1]), float(origin_lps[2])),
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            frame_of_reference_uid=frame_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            accession_number=accession_number,
            series_number=series_number,
            series_description=series_description,
            slice_thickness=thickness,
            transfer_syntax_uid=UID(transfer_syntax_uid),
            reverse_instance_numbers=reverse_instance_numbers,
        )
        path = out_dir / f"slice_{k:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return WrittenSeries(study_uid, series_uid, frame_uid, tuple(paths))
