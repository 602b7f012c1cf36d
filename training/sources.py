"""Scans for training, calibration and testing: synthetic phantoms and real CT backgrounds.

Seed ranges keep the three uses apart: a synthetic scan is a pure function of its seed, and
:data:`SEED_RANGES` gives each use its own block, so no calibration or test scan is ever a
training scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungscreen.dicom_io.volume import read_series_volume
from lungscreen.models.lungs import lung_mask
from lungscreen.training.scan import Exclusion, Nodule, Scan, axial_affine
from lungscreen.training.synthetic import insert_nodules, make_chest_ct, sample_nodule_specs

# Disjoint seed blocks (first seed, size) per use.
SEED_RANGES = {"train": (0, 1_000_000), "validation": (2_000_000, 1_000_000), "test": (3_000_000, 1_000_000)}

# Acquisition geometry of the synthetic scans, drawn per seed: clinical in-plane pixel sizes
# (coarser than 0.7 mm to keep generation at ~2 s; the model sees 2 mm anyway), 1-2.5 mm slices,
# a chest-wide field of view and a lung-height z extent.
PIXEL_SPACING_RANGE_MM = (1.0, 1.6)
SLICE_STEP_RANGE_MM = (1.0, 2.5)
FOV_RANGE_MM = (300.0, 350.0)
Z_EXTENT_RANGE_MM = (90.0, 150.0)

LIDC_0001_DIR = Path("/work/shared/data/lidc_idri/LIDC-IDRI-0001")
# LIDC-IDRI-0001's LUNA16 nodule (world LPS mm, diameter) is a real-scan test case: no training
# patch may come within this radius of it (nodule radius 11.7 mm plus a wide margin).
LIDC_0001_NODULE = Nodule((56.21, 86.34, -115.87), 23.35)
LIDC_0001_EXCLUSION_RADIUS_MM = 45.0


def synthetic_scan(seed: int, n_nodules: int | tuple[int, int] = (0, 4)) -> Scan:
    """A synthetic chest CT with random clinical geometry, deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 7])
    pixel = float(rng.uniform(*PIXEL_SPACING_RANGE_MM))
    step = float(rng.uniform(*SLICE_STEP_RANGE_MM))
    n_xy = int(rng.uniform(*FOV_RANGE_MM) / pixel)
    n_z = int(rng.uniform(*Z_EXTENT_RANGE_MM) / step)
    ct = make_chest_ct(seed, shape=(n_z, n_xy, n_xy), spacing=(step, pixel, pixel), n_nodules=n_nodules)
    nodules = tuple(Nodule(n.center_lps_mm, n.diameter_mm, f"{n.nodule_type} {n.location}") for n in ct.nodules)
    return Scan(f"synthetic-{seed}", ct.hu, axial_affine(ct.spacing, ct.origin_lps), nodules)


def read_lidc_0001() -> Scan:
    """LIDC-IDRI-0001 with its LUNA16 nodule as ground truth (read through the server's reader)."""
    volume = read_series_volume(sorted(LIDC_0001_DIR.rglob("*.dcm")))
    return Scan("LIDC-IDRI-0001", volume.voxels, volume.affine, (LIDC_0001_NODULE,))


class RealBackground:
    """A real scan used as training background: synthetic nodules inserted into its lungs.

    The scan's own nodules are not labelled for training, so each is covered by an
    :class:`Exclusion` (no nodule is inserted there and the sampler never shows it).
    """

    def __init__(self, scan: Scan, exclusion_radius_mm: float = LIDC_0001_EXCLUSION_RADIUS_MM) -> None:
        exclusions = tuple(Exclusion(n.center_lps_mm, exclusion_radius_mm) for n in scan.nodules) + scan.exclusions
        self.scan = Scan(scan.name, scan.voxels, scan.affine, (), exclusions)
        self.lung_mask = lung_mask(scan.voxels)
        for ex in exclusions:
            self.lung_mask &= ~_ball_mask(self.scan, ex)

    def sample(self, seed: int, n_nodules: tuple[int, int] = (2, 6)) -> Scan:
        rng = np.random.default_rng([seed, 11])
        specs = sample_nodule_specs(rng, int(rng.integers(n_nodules[0], n_nodules[1] + 1)))
        voxels, planted = insert_nodules(self.scan.voxels, self.scan.spacing, self.lung_mask, specs, rng)
        nodules = tuple(
            Nodule(tuple(float(v) for v in self.scan.affine[:3, :3] @ p.center_kji + self.scan.affine[:3, 3]), p.diameter_mm)
            for p in planted
        )
        return Scan(f"{self.scan.name}+{seed}", voxels, self.scan.affine, nodules, self.scan.exclusions)


def _ball_mask(scan: Scan, exclusion: Exclusion) -> np.ndarray:
    k, j, i = np.indices(scan.voxels.shape, sparse=True)
    centre = scan.lps_to_index(exclusion.center_lps_mm)
    dz, dy, dx = scan.spacing
    dist2 = ((k - centre[0]) * dz) ** 2 + ((j - centre[1]) * dy) ** 2 + ((i - centre[2]) * dx) ** 2
    return dist2 <= exclusion.radius_mm**2
