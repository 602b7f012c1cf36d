"""The one type every data source produces: a CT volume in HU with its nodules in world mm.

Conventions are the server's (:mod:`dicom_io.volume`): ``voxels`` is float32 HU indexed
``[k, j, i]`` and ``affine`` maps ``(k, j, i, 1)`` to patient LPS mm. Nodules are in LPS mm
(LUNA16 world coordinates are LPS), so a scan can go through :class:`models.detector.Detector`
exactly like a DICOM series does in the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Nodule:
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str = ""  # synthetic nodules: type and location, e.g. "ground-glass juxtavascular"


@dataclass(frozen=True)
class Exclusion:
    """A ball of a real scan that training must never see (e.g. the nodule we evaluate on)."""

    center_lps_mm: tuple[float, float, float]
    radius_mm: float


@dataclass(frozen=True, eq=False)
class Scan:
    name: str
    voxels: np.ndarray  # float32 HU [k, j, i]
    affine: np.ndarray  # 4x4, (k, j, i, 1) -> LPS mm
    nodules: tuple[Nodule, ...] = ()
    exclusions: tuple[Exclusion, ...] = field(default=())
    # Reader marks that are not targets (LUNA16's irrelevant findings): a finding on one is
    # neither a hit nor a false positive (training.lidc).
    irrelevant: tuple[Nodule, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be 3D, got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """``(slice step, row spacing, column spacing)`` in mm, the norms of the affine's columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Fractional ``(k, j, i)`` of LPS points ``(..., 3)``."""
        return (np.asarray(lps, float) - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


def axial_affine(spacing_kji: tuple[float, float, float], origin_lps: tuple[float, float, float]) -> np.ndarray:
    """Affine of an axial stack with identity orientation: LPS = origin + (i dx, j dy, k dz)."""
    dz, dy, dx = spacing_kji
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, dz)
    affine[:3, 1] = (0.0, dy, 0.0)
    affine[:3, 2] = (dx, 0.0, 0.0)
    affine[:3, 3] = origin_lps
    return affine
