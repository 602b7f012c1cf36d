"""What the detector and the clinical rules hand to the report stage.

Plain arrays and numbers only: the models package never sees a DICOM dataset.
Coordinates are in the source volume's voxel grid, ``(k, j, i)`` = (slice, row, column),
as defined in :mod:`dicom_io.volume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


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
    lobe: str | None = None  # e.g. "right upper lobe"; None when unknown
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
