"""Where a finding is drawn: the slice through its centre and the circle around it.

Shared by the result objects that draw findings (the SR's image regions in
:mod:`lungscreen.dicom_io.sr`, the GSPS graphics in :mod:`lungscreen.dicom_io.presentation`)
so that both draw the same outline on the same image, and by the server, which reports
which findings are drawn (:func:`is_outlined`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from lungscreen.dicom_io.volume import SliceRef, Volume
from lungscreen.errors import ReportError
from lungscreen.findings import LUNG_RADS_ORDER, Finding

__all__ = [
    "DEFAULT_OUTLINE_CATEGORIES",
    "POLYLINE_VERTICES",
    "FindingSlice",
    "check_outline_categories",
    "finding_slice",
    "is_outlined",
    "nodule_outline",
]

POLYLINE_VERTICES = 32
"""Vertices of the circle drawn around a nodule; the closed polyline repeats the first one."""

DEFAULT_OUTLINE_CATEGORIES = ("3", "4A", "4B", "4X")
"""Suggested Lung-RADS v2022 categories whose findings are outlined by default: those that change
management (3: 6-month LDCT; 4A/4B/4X: suspicious). Category 1 and 2 findings (benign, or below
the size that changes follow-up) are listed in the report without an outline; see the README."""


def check_outline_categories(categories: object) -> tuple[str, ...]:
    """``categories`` as a tuple of Lung-RADS v2022 category names; ``ValueError`` naming an
    unknown one, ``TypeError`` for anything but a sequence of str."""
    if isinstance(categories, str) or not isinstance(categories, Collection):
        raise TypeError(f"outline_categories must be a list of Lung-RADS categories, got {categories!r}")
    unknown = [c for c in categories if c not in LUNG_RADS_ORDER]
    if unknown:
        raise ValueError(f"outline_categories: unknown Lung-RADS categories {unknown}; known: {list(LUNG_RADS_ORDER)}")
    return tuple(categories)


def is_outlined(finding: Finding, outline_categories: Collection[str]) -> bool:
    """Whether the SR and GSPS draw ``finding`` (else it is only listed)."""
    return finding.lung_rads in outline_categories


@dataclass(frozen=True)
class FindingSlice:
    """The image through a finding's centre.

    Attributes
    ----------
    index:
        Slice index ``k`` in the volume.
    ref:
        The volume's reference to that image (SOP class and instance, frame number).
    header:
        Its evidence header (Rows, Columns, the image's attributes for references).
    """

    index: int
    ref: SliceRef
    header: Dataset


def finding_slice(finding: Finding, volume: Volume, evidence: Mapping[str, Dataset], what: str) -> FindingSlice:
    """The slice through the centre of ``finding`` (``what`` names it in errors).

    Raises
    ------
    ReportError
        When the centre slice is outside the volume, its header is not among ``evidence``
        (headers by SOP Instance UID), or the centre lies outside that image.
    """
    k = round(finding.center_kji[0])
    if not 0 <= k < len(volume.slices):
        raise ReportError(f"{what}: centre slice {k} is outside the volume (0 to {len(volume.slices) - 1})")
    ref = volume.slices[k]
    if ref.sop_instance_uid not in evidence:
        raise ReportError(f"{what}: slice {k} (SOP instance {ref.sop_instance_uid}) is not among the evidence")
    header = evidence[ref.sop_instance_uid]
    _, j, i = finding.center_kji
    if not (0 <= j < header.Rows and 0 <= i < header.Columns):
        raise ReportError(f"{what}: centre (row {j:.1f}, column {i:.1f}) lies outside the image")
    return FindingSlice(k, ref, header)


def nodule_outline(finding: Finding, volume: Volume, header: Dataset) -> np.ndarray:
    """Closed POLYLINE ``(column, row)`` points of a circle of the nodule's diameter around its
    centre (inside the image: see :func:`finding_slice`), clipped to the image of ``header`` (a
    nodule at the edge of a small field of view).

    SCOORD pixel coordinates (PS3.3 C.18.6.1.1) put (0, 0) at the top left corner of the top
    left pixel, so the centre of voxel column ``i``, row ``j`` is ``(i + 0.5, j + 0.5)``, and
    they lie within 0 to Columns and 0 to Rows (highdicom refuses a GSPS outline beyond).
    """
    _, j, i = finding.center_kji
    _, row_spacing, column_spacing = volume.spacing
    radius = finding.diameter_mm / 2
    angles = np.linspace(0.0, 2 * np.pi, POLYLINE_VERTICES, endpoint=False)
    vertices = np.column_stack(
        [
            np.clip(i + 0.5 + radius / column_spacing * np.cos(angles), 0.0, float(header.Columns)),
            np.clip(j + 0.5 + radius / row_spacing * np.sin(angles), 0.0, float(header.Rows)),
        ]
    )
    return np.vstack([vertices, vertices[:1]])
