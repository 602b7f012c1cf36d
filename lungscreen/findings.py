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
    diameter_mm: float  # sphere-equivalent diameter of the segmented nodule (else the detector's; models/measure.py)
    volume_mm3: float
    probability: float  # calibrated probability that this is a true nodule
    nodule_type: NoduleType
    lung_rads: str  # suggested Lung-RADS v2022 category, e.g. "2", "3", "4A", "4B"
    actionable: bool  # whether the clinical rules ask for follow-up
    outside_lungs_mm: float | None = None  # as Candidate.outside_lungs_mm
    # With a prior study (see ChangeLabel); all None on a baseline report.
    change: ChangeLabel | None = None
    prior: PriorMeasurement | None = None
    volume_doubling_time_days: float | None = None  # solid nodules that grew in volume only
    tracking_uid: str | None = None  # TID 1500 Tracking UID; a matched nodule keeps its prior's
    tracking_id: str | None = None  # TID 1500 Tracking Identifier, e.g. "Nodule 2"; kept across timepoints too
    assessment: Assessment | None = None  # the site's rule set's category and the rule that gave it


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
    comparison: Comparison | None = None  # the prior study and what became of its nodules; None: not sought


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


# --- Follow-up screening: comparison with a prior study -------------------------------------


class ChangeLabel(str, Enum):
    """How a nodule changed since the prior study.

    Growth follows Lung-RADS v2022 ("Nodule growth": an increase in mean diameter of more
    than 1.5 mm within a 12-month interval); a decrease of more than 1.5 mm is shrinking. A
    prior nodule with no match in the current study is resolved.
    """

    NEW = "new"
    STABLE = "stable"
    GROWING = "growing"
    SHRINKING = "shrinking"
    RESOLVED = "resolved"


class RuleSet(str, Enum):
    """The categorisation a site uses (``rule_set`` in the settings)."""

    LUNG_RADS_2022 = "lung-rads-2022"  # ACR Lung-RADS v2022 (screening; default)
    C_LUNG_RADS = "c-lung-rads"  # Chinese Lung Nodules Reporting and Data System (Nat Med 2024;30:3184)
    FLEISCHNER_2017 = "fleischner-2017"  # Fleischner Society 2017 (incidental nodules, not screening)


@dataclass(frozen=True)
class Assessment:
    """A nodule's or an exam's category under one rule set, and the rule that produced it."""

    rule_set: RuleSet
    category: str  # e.g. "4A" (Lung-RADS), "2" (C-Lung-RADS), "ct-6-12-months" (Fleischner)
    rule: str  # the clause applied, e.g. "Lung-RADS v2022 4A: solid, growing, <8 mm"


@dataclass(frozen=True)
class PriorNodule:
    """A nodule of the prior study as its analysis reported it (prior patient LPS mm)."""

    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    nodule_type: NoduleType
    lung_rads: str  # its category then
    tracking_uid: str | None = None
    tracking_id: str | None = None


@dataclass(frozen=True)
class PriorMeasurement:
    """What a matched nodule measured on the prior study."""

    study_uid: str
    study_date: str  # DICOM DA, YYYYMMDD
    diameter_mm: float
    volume_mm3: float
    interval_days: int
    lung_rads: str = ""
    reported: bool = True  # False: the prior's analysis saw it below what it reports (not new, not tracked)
    center_lps_mm: tuple[float, float, float] | None = None  # where it was, in the prior's patient coordinates


class ComparisonStatus(str, Enum):
    COMPARED = "compared"
    NO_PRIOR = "no prior found"  # none in the history nor in the PACS within the look-back
    PRIOR_UNAVAILABLE = "prior unavailable"  # found, but it could not be retrieved or analysed in time


@dataclass(frozen=True)
class StillSeen:
    """A prior nodule with no reported finding now, but still seen at its place: the detector or
    the rules left it out this time (a nodule not reported is not a nodule that has gone)."""

    prior: PriorNodule
    diameter_mm: float | None  # measured now, at its place; None: dense tissue there, not separable to measure


@dataclass(frozen=True)
class Comparison:
    """The outcome of looking for and comparing with a prior study."""

    status: ComparisonStatus
    prior_study_uid: str | None = None
    prior_study_date: str | None = None
    interval_days: int | None = None
    resolved: tuple[PriorNodule, ...] = ()  # prior nodules with no match now, nothing left at their place
    still_seen: tuple[StillSeen, ...] = ()  # prior nodules with no reported match now, still there
    not_scanned: tuple[PriorNodule, ...] = ()  # prior nodules outside what the current study covers
    alignment_residual_mm: float | None = None  # RMS lung-surface distance after alignment, when measured
    reason: str = ""  # why there is no comparison, in words (status says it as a value)
