"""Real CT series with their headers rewritten the way real scanners and archives send them.

The pixels and geometry stay those of the real scans in ../shared/data; only identifying UIDs
and the attributes named are rewritten, into a test's tmp folder (never into the repository).
Header-only copies (``pixels=False``) are enough wherever the selection reads headers only.

The vendor conventions are those of the scanners' DICOM conformance statements and of
series as they arrive at a PACS: ImageType values 3+ and the kernel names that the selection
(``dicom_io/select.py``, ``dicom_io/kernels.py``) has to read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

# name: (Manufacturer, ImageType of an axial reconstruction, soft kernel, sharp kernel)
VENDORS = {
    "siemens": ("SIEMENS", ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"], ["Br40d", "3"], ["Bl57d", "3"]),
    "siemens-classic": ("SIEMENS", ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"], "B30f", "B70f"),
    "ge": ("GE MEDICAL SYSTEMS", ["ORIGINAL", "PRIMARY", "AXIAL"], "STANDARD", "LUNG"),
    "ge-bone": ("GE MEDICAL SYSTEMS", ["ORIGINAL", "PRIMARY", "AXIAL"], "SOFT", "BONEPLUS"),
    "philips": ("Philips", ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"], "B", "L"),
    "philips-y": ("Philips", ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"], "A", "YA"),
    "canon": ("CANON_MEC", ["ORIGINAL", "PRIMARY", "AXIAL"], "FC13", "FC52"),
    "toshiba": ("TOSHIBA", ["ORIGINAL", "PRIMARY", "AXIAL"], "FC03", "FC51"),
}


def rewrite_series(
    sources: Sequence[Path],
    folder: Path,
    *,
    pixels: bool = False,
    edit: Callable[[pydicom.Dataset, int], None] | None = None,
    **attributes: object,
) -> list[Path]:
    """Copy ``sources`` (one series, in the order given) into ``folder`` as a new series.

    Every copy gets a new SeriesInstanceUID and SOPInstanceUIDs; each keyword in
    ``attributes`` is set (``None`` deletes it; SOPClassUID also rewrites the file meta);
    ``edit(dataset, index)`` may change anything else, e.g. the geometry.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source, stop_before_pixels=not pixels)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if "SOPClassUID" in attributes:
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if edit is not None:
            edit(ds, index)
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return paths


def by_position(paths: Sequence[Path]) -> list[Path]:
    """``paths`` sorted from the lowest slice (most inferior) to the highest."""
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
