"""LungScreen findings as a Grayscale Softcopy Presentation State (GSPS, PS3.3 A.33.1).

A GSPS is what nearly every PACS viewer shows without SR support: graphics and text drawn
over the referenced images, plus a display window. One GSPS per analysed CT series, in the
CT's study:

* every outlined finding (its suggested Lung-RADS category among ``outline_categories``, see
  :mod:`lungscreen.dicom_io.outline`) drawn on its centre slice: a closed POLYLINE (PIXEL
  units, the same circle as the SR's region) and a short text label
  (:func:`dicom_io.sr.finding_label`) above it, both in the graphic layer
  :data:`GRAPHIC_LAYER`. Findings only listed in the SR are not drawn;
* lung window (W 1500 / L -600) for all referenced images, the CT's Modality LUT (rescale);
* references every image of the series (Presentation State Relationship), so that opening
  the series with the GSPS applies the window to all slices;
* research use stated in ContentLabel (``AI_RESEARCH_ONLY``), ContentDescription and
  SeriesDescription.

A report without outlined findings gives a GSPS without Graphic Annotation Sequence (the
module is optional): the window is still applied and its ContentDescription says that nothing
is outlined. Whether to send it is the caller's choice.

Loop guard: the GSPS SOP class (1.2.840.10008.5.1.4.1.1.11.1) is not a CT image class, so
LungScreen's own SCP ignores a GSPS it receives back (see :data:`GSPS_SOP_CLASS_UID`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.errors
from pydicom import Dataset
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, generate_uid

from lungscreen.errors import LungScreenError, ReportError, VolumeError
from lungscreen.dicom_io.outline import (
    DEFAULT_OUTLINE_CATEGORIES,
    check_outline_categories,
    finding_slice,
    is_outlined,
    nodule_outline,
)
from lungscreen.dicom_io.sr import RESEARCH_USE_NOTICE, AlgorithmIdentity, check_result_arguments, finding_label
from lungscreen.dicom_io.volume import CT_SOP_CLASSES, FrameHeader, Volume, frame_headers
from lungscreen.findings import NoduleReport

__all__ = [
    "CONTENT_LABEL",
    "GRAPHIC_LAYER",
    "GSPS_SOP_CLASS_UID",
    "LUNG_WINDOW",
    "SERIES_DESCRIPTION",
    "KeySlice",
    "build_gsps",
    "key_slice",
]

GSPS_SOP_CLASS_UID = str(GrayscaleSoftcopyPresentationStateStorage)
assert GSPS_SOP_CLASS_UID not in CT_SOP_CLASSES  # the SCP must ignore what we send back

CONTENT_LABEL = "AI_RESEARCH_ONLY"
"""ContentLabel (CS, 16 characters at most): what a viewer lists the GSPS under."""

GRAPHIC_LAYER = "AI_NODULES"

SERIES_DESCRIPTION = "LungScreen AI nodule outlines (research use)"

LUNG_WINDOW = (-600.0, 1500.0)
"""(window centre, window width) in HU."""

_LABEL_HEIGHT_PX = 14.0  # text box height on a 512 x 512 slice
_LABEL_CHAR_WIDTH_PX = 6.5


def _content_description(report: NoduleReport, outlined: int) -> str:
    # LO, 64 characters: RESEARCH_USE_NOTICE is 43.
    if outlined:
        prefix = "AI nodule outlines."
    elif report.findings:
        prefix = "AI: none outlined."
    else:
        prefix = "AI: no nodule."
    return f"{prefix} {RESEARCH_USE_NOTICE}"


def _label_box(outline: np.ndarray, text: str, rows: int, columns: int) -> tuple[float, float, float, float]:
    """[left, top, right, bottom] of the text above the outline, kept inside the image."""
    width = min(float(columns), _LABEL_CHAR_WIDTH_PX * len(text))
    centre_x = float(outline[:, 0].mean())
    top_of_outline = float(outline[:, 1].min())
    left = min(max(centre_x - width / 2, 0.0), columns - width)
    if top_of_outline - 2 - _LABEL_HEIGHT_PX >= 0:  # room above: there
        top = top_of_outline - 2 - _LABEL_HEIGHT_PX
    else:  # else below the outline
        top = min(float(outline[:, 1].max()) + 2, rows - _LABEL_HEIGHT_PX)
    return (left, top, left + width, top + _LABEL_HEIGHT_PX)


def build_gsps(
    evidence: Sequence[Dataset],
    volume: Volume,
    report: NoduleReport,
    *,
    algorithm: AlgorithmIdentity,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 9002,
    outline_categories: Sequence[str] = DEFAULT_OUTLINE_CATEGORIES,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS that outlines the findings of ``report`` on the CT series of ``volume``.

    Parameters
    ----------
    evidence:
        Headers of the analysed CT series (``stop_before_pixels`` reads suffice; the image
        pixel description attributes are needed), in any order.
    volume:
        The volume the findings' voxel coordinates refer to. Its voxels are not read.
    report:
        Findings, numbered "Nodule 1", "Nodule 2" ... in the given order (as in the SR).
    algorithm:
        Identity of the algorithm; its model must be the one named in ``report``.
    series_instance_uid:
        By default derived from the study and the device UID, so that re-runs go to the same
        series (distinct from the SR's series).
    sop_instance_uid:
        A new UID by default.
    instance_number, series_number:
        Positive integers.
    outline_categories:
        Suggested Lung-RADS categories whose findings are drawn; the others are not (the SR
        lists them). Numbering counts every finding, so "Nodule 3" is the SR's "Nodule 3".

    Raises
    ------
    TypeError, ValueError
        For malformed arguments.
    ReportError
        No evidence, evidence from another study or series, a finding whose centre slice is
        outside the volume or missing from the evidence, or a report of another model.
    """
    if not isinstance(algorithm, AlgorithmIdentity):
        raise TypeError(f"algorithm must be an AlgorithmIdentity, got {type(algorithm).__name__}")
    outline_categories = check_outline_categories(outline_categories)
    headers = check_result_arguments(
        evidence, volume, report, algorithm,
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        instance_number=instance_number, series_number=series_number,
    )

    sop_instance_uid = sop_instance_uid or generate_uid()
    layer = hd.pr.GraphicLayer(
        layer_name=GRAPHIC_LAYER,
        order=1,
        description="LungScreen AI nodule outlines",
        display_color=hd.color.CIELabColor(97.0, -21.0, 94.0),  # yellow
    )
    annotations = []
    for number, finding in enumerate(report.findings, start=1):
        at = finding_slice(finding, volume, headers, f"nodule {number}")  # checked even when not drawn, as in the SR
        if not is_outlined(finding, outline_categories):
            continue
        header = at.header
        outline = nodule_outline(finding, volume, header)
        text = finding_label(number, finding.diameter_mm, finding.probability, finding.lung_rads)
        tracking_id = f"Nodule {number}"
        tracking_uid = generate_uid(entropy_srcs=[sop_instance_uid, tracking_id])
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[header],
                graphic_layer=layer,
                referenced_frame_number=at.ref.frame_number,
                graphic_objects=[
                    hd.pr.GraphicObject(
                        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                        graphic_data=outline,
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        tracking_id=tracking_id,
                        tracking_uid=tracking_uid,
                    )
                ],
                text_objects=[
                    hd.pr.TextObject(
                        text_value=text,
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        bounding_box=_label_box(outline, text, int(header.Rows), int(header.Columns)),
                        anchor_point=(float(outline[:, 0].mean()), float(outline[:, 1].min())),
                        anchor_point_visible=True,
                        tracking_id=tracking_id,
                        tracking_uid=tracking_uid,
                    )
                ],
            )
        )

    in_volume = [s.sop_instance_uid for s in volume.slices]
    ordered = [headers[uid] for uid in dict.fromkeys([*in_volume, *headers]) if uid in headers]
    centre, width = LUNG_WINDOW
    try:
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=ordered,
            series_instance_uid=series_instance_uid
            or generate_uid(entropy_srcs=[volume.study_instance_uid, algorithm.device_uid, "LungScreen GSPS series"]),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.model_name,
            software_versions=[algorithm.software_version, algorithm.model_version],
            device_serial_number=algorithm.device_uid,
            content_label=CONTENT_LABEL,
            content_description=_content_description(report, len(annotations)),
            graphic_annotations=annotations or None,
            graphic_layers=[layer] if annotations else None,
            institution_name=algorithm.institution,
            voi_lut_transformations=[
                hd.pr.SoftcopyVOILUTTransformation(
                    window_center=centre, window_width=width, window_explanation="LUNG"
                )
            ],
            # The labels use U+00B7; UTF-8 whatever the CT's character set.
            specific_character_set="ISO_IR 192",
            series_description=SERIES_DESCRIPTION,
        )
    except ValueError as error:  # highdicom checks the referenced images: a CT header it cannot use
        raise ReportError(f"the GSPS cannot be built from the CT's headers: {str(error)[:160]}") from error
    # General Series Laterality is Type 2C (paired body parts, e.g. lungs): present, empty.
    gsps.Laterality = None
    return gsps


@dataclass(frozen=True)
class KeySlice:
    """One CT image in HU with where a patient point lies on it (for key images).

    Attributes
    ----------
    hu:
        float32 ``(rows, columns)`` array in Hounsfield units (Modality LUT applied).
    center_column_row:
        ``(column, row)`` voxel index (fractional, voxel centres at integers) of the point.
    pixel_spacing:
        ``(between rows, between columns)`` in mm.
    distance_mm:
        Distance of the point from the image plane.
    """

    hu: np.ndarray
    center_column_row: tuple[float, float]
    pixel_spacing: tuple[float, float]
    distance_mm: float


def key_slice(path: Path, center_lps_mm: Sequence[float], *, frame_number: int | None = None) -> KeySlice:
    """Read one CT image (frame ``frame_number`` of a multi-frame instance) and locate a point.

    Raises
    ------
    VolumeError
        When the file is not a CT image with plane geometry, or the frame does not exist.
    """
    try:
        dataset = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise VolumeError(f"{path.name}: cannot be read: {error}") from error
    if dataset.get("SOPClassUID") not in CT_SOP_CLASSES:
        raise VolumeError(f"{path.name}: not a CT image (SOP class {dataset.get('SOPClassUID')})")
    frames = frame_headers(dataset)
    index = 0 if frame_number is None else frame_number - 1
    if not 0 <= index < len(frames):
        raise VolumeError(f"{path.name}: no frame {frame_number} (the image has {len(frames)})")
    frame = frames[index]
    if frame.image_position is None or frame.image_orientation is None or frame.pixel_spacing is None:
        raise VolumeError(f"{frame.label}: no plane geometry")
    pixels = dataset.pixel_array
    stored = pixels[index] if len(frames) > 1 or pixels.ndim == 3 else pixels
    hu = stored.astype(np.float32) * frame.rescale_slope + frame.rescale_intercept
    column, row, distance = _on_plane(frame, center_lps_mm)
    row_spacing, column_spacing = frame.pixel_spacing
    return KeySlice(hu, (column, row), (float(row_spacing), float(column_spacing)), distance)


def _on_plane(frame: FrameHeader, point_lps_mm: Sequence[float]) -> tuple[float, float, float]:
    """(column, row) of ``point_lps_mm`` projected on the frame's image plane, in pixels from the
    centre of the top left pixel, and its distance from that plane in mm (PS3.3 C.7.6.2.1.1)."""
    row_cosines = np.asarray(frame.image_orientation[:3])  # increasing column index
    column_cosines = np.asarray(frame.image_orientation[3:])  # increasing row index
    offset = np.asarray(point_lps_mm, dtype=float) - np.asarray(frame.image_position)
    row_spacing, column_spacing = frame.pixel_spacing
    column = float(offset @ row_cosines) / column_spacing
    row = float(offset @ column_cosines) / row_spacing
    return column, row, float(abs(offset @ np.cross(row_cosines, column_cosines)))


@dataclass(frozen=True)
class NearestImage:
    """The CT image (frame of a multi-frame instance) whose plane lies nearest a point."""

    path: Path
    frame_number: int | None
    distance_mm: float


def nearest_image(paths: list[Path], center_lps_mm: tuple[float, ...], series_uid: str | None = None) -> NearestImage | None:
    """The CT image among ``paths`` whose plane is nearest ``center_lps_mm`` and whose pixels
    cover it, preferring series ``series_uid`` (the series the prior's analysis used) when given;
    ``None`` when no image covers the point. Headers only are read."""
    best: tuple[tuple[bool, float], NearestImage] | None = None
    for path in paths:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            if dataset.get("SOPClassUID") not in CT_SOP_CLASSES:
                continue
            frames = frame_headers(dataset)
        except (OSError, LungScreenError, pydicom.errors.InvalidDicomError):
            continue  # a file that is no CT image is no key image
        other_series = series_uid is not None and str(dataset.get("SeriesInstanceUID", "")) != series_uid
        for frame in frames:
            if None in (frame.image_position, frame.image_orientation, frame.pixel_spacing, frame.rows, frame.columns):
                continue
            column, row, distance = _on_plane(frame, center_lps_mm)
            if not (-0.5 <= column < frame.columns - 0.5 and -0.5 <= row < frame.rows - 0.5):
                continue
            rank = (other_series, distance)
            if best is None or rank < best[0]:
                best = (rank, NearestImage(path, frame.frame_number, distance))
    return None if best is None else best[1]
