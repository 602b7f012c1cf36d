"""The typed outcomes the stages hand to each other: candidates, findings, the nodule report.

Plain numbers only, no DICOM dataset and no model: the analysis (``lungscreen.models``)
produces them and the report stage (``lungscreen.dicom_io.sr``) writes them, so both import
them from here. Coordinates are in the source volume's voxel grid, ``(k, j, i)`` = (slice,
row, column), as defined in :mod:`lungscreen.dicom_io.volume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence


class NoduleType(str, Enum):
    SOLID = "solid"
    PART_SOLID = "part-solid"
    GROUND_GLASS = "ground-glass"
    CALCIFIED = "calcified"  # dense throughout: a benign calcification pattern (Lung-RADS 1)


@dataclass(frozen=True)
class ModelCandidate:
    """A decoded detection in the model's voxel grid, before mapping back to the source volume."""

    index_xyz: tuple[float, float, float]
    diameter_mm: float
    score: float


@dataclass(frozen=True)
class Candidate:
    """A raw detection in source-voxel coordinates, before calibration and clinical rules."""

    center_kji: tuple[float, float, float]
    diameter_mm: float
    score: float  # the detector's raw output, not a probability
    outside_lungs_mm: float | None = None  # nodule surface to the lungs (0: touching or inside; inf: far); None: unknown


@dataclass(frozen=True)
class Finding:
    """A nodule that survived the operating point and the clinical rules."""

    center_kji: tuple[float, float, float]
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float  # long-axis diameter
    volume_mm3: float
    probability: float  # calibrated probability that this is a true nodule
    nodule_type: NoduleType
    lung_rads: str  # suggested Lung-RADS v2022 category, e.g. "2", "3", "4A", "4B"
    actionable: bool  # whether the clinical rules ask for follow-up
    outside_lungs_mm: float | None = None  # as Candidate.outside_lungs_mm


@dataclass(frozen=True)
class NoduleReport:
    """Everything the report stage needs besides the images: findings and how they were chosen."""

    findings: tuple[Finding, ...]
    operating_point: str  # named operating point of the model card, e.g. "screening"
    score_threshold: float
    model_name: str
    model_version: str
    suppressed: dict[str, int] = field(default_factory=dict)  # rule name -> candidates removed
    operating_point_source: str = ""  # where a site's operating point came from; empty: the model card's


# Lung-RADS v2022 categories from least to most concerning (0: incomplete, 4X: 3/4 with extra features).
LUNG_RADS_ORDER = ("0", "1", "2", "3", "4A", "4B", "4X")


def exam_lung_rads(findings: Sequence[Finding]) -> str | None:
    """The suggested exam category: that of the most concerning reported nodule, as Lung-RADS
    v2022 categorises an exam by its single most concerning finding.

    None without findings: that the detector reported nothing is not a category 1 (negative)
    exam; the radiologist decides that.
    """
    if not findings:
        return None
    return max((f.lung_rads for f in findings), key=LUNG_RADS_ORDER.index)
