"""Follow-up evaluation: pairs of (prior, current) CT with a known truth, and what the comparison got.

``lungscreen evaluate-followup [--work-dir DIR] [--json PATH] [--repeat N] [--pairs NAME,...]``
builds the pairs, runs the analysis of each prior (as LungScreen's history would have it), then
the current study with it, and prints per pair: every nodule matched to the right prior nodule,
every change label right, growth error (mm) against the truth, alignment error at the nodules
(mm), and the time the comparison added (stage ``compare`` / the rest of the current study's
analysis); then a total per group (real nodules, synthetic nodules).

Each pair's truth is the map ``prior_to_current`` (a 4 x 4 LPS affine: a prior point shows the
anatomy the current study has there) and its nodules. Real scans in ``../shared/data``
(research use): LIDC-IDRI-0001 (0.70 x 0.70 x 2.5 mm), pyradiomics' ``lung1`` (0.57 x 0.57 x
5 mm, a nodule mask of about 14 mm), TotalSegmentator's contrast chest CT (1.5 mm).

* ``lidc-growing``: the prior is the scan a year earlier with the LUNA16 nodule (world
  (56.21, 86.34, -115.87), 23.35 mm) replaced by an 18 mm sphere, the patient rotated by
  (2, -3, 4) degrees and shifted by (6, -4, 9) mm;
* ``lidc-new``: the prior without that nodule, rotated by (-4, 2, -2) degrees and shifted by
  (-10, 7, -5) mm, 400 days earlier;
* ``synthetic-growth``: the same synthetic nodule inserted at two sizes (7 mm then 10 mm, a
  growth of 3 mm) and a second one at 9 mm in both (stable), the prior rotated and shifted;
* ``lidc-stable``: the LUNA16 nodule untouched at both times, the prior rotated by
  (1.5, 2.5, -3.5) degrees and shifted by (8, 5, -7) mm, 391 days (about 13 months) earlier;
* ``lung1-growing``: lung1's real nodule shrunk in the prior (:func:`shrink_real_nodule`: its own
  voxels inside its mask eroded by 2 mm, the rest of the mask and a margin lung parenchyma),
  rotated by (2, -2, 3) degrees and shifted by (5, -6, 7) mm; the truth's growth is the change
  of the sphere-equivalent diameter (see :class:`ShrunkNodule`): 13.00 to 8.53 mm, 4.47 mm (the
  long axis changes from 18.46 to 13.52 mm, 4.94 mm);
* ``lung1-new``: lung1's nodule removed in the prior (the same function, eroded to nothing),
  rotated by (-2, 1.5, -3) degrees and shifted by (-6, 8, -4) mm;
* ``lidc-breathing``: the prior at a shallower inspiration: the lungs 4.5 % shorter
  craniocaudally (z scaled about the lung apex, so the bases move up by about 13 mm and the
  LUNA16 nodule by 5 mm), rotated by (-2, -2, 3) degrees and shifted by (4, 9, 6) mm: an
  affine, not rigid, truth, so the rigid alignment keeps a residual. The nodule is deformed
  with the lungs (at most 1 mm of its 23 mm along z) and is ``stable`` (truth growth 0);
* ``lidc-thick-prior``: the prior reconstructed as 5 mm slices (pairs of 2.5 mm slices
  averaged) with 20 mm less coverage at the top, the LUNA16 nodule 18 mm as in
  ``lidc-growing``, rotated by (3, -2, -3) degrees and shifted by (-7, -6, 8) mm: growth
  measured across slice thicknesses;
* ``contrast-synthetic``: the real contrast CT with synthetic nodules deep in the lungs: one
  8 then 11 mm (growing 3 mm), one 9 mm at both (stable), one 8 mm in the current only (new),
  the prior rotated by (-3, 2, 2) degrees and shifted by (6, 5, -8) mm.

Every other detection (the same anatomy at both timepoints) must be matched and stable. A
synthetic figure never stands in for real anatomy: the pairs with synthetic nodules are
reported separately (``synthetic_nodules``) and totalled apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist
from scipy.spatial.transform import Rotation

from lungscreen.findings import ChangeLabel
from lungscreen.models.lungs import lung_mask
from lungscreen.models.registration import RigidTransform

LUNA16_NODULE_LPS = (56.21, 86.34, -115.87)
LUNA16_NODULE_MM = 23.35
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CURRENT_DATE = "20260115"


@dataclass(frozen=True)
class TruthNodule:
    current_lps: tuple[float, float, float]
    change: ChangeLabel
    growth_mm: float | None  # current minus prior diameter, as made; None for a new nodule


@dataclass(frozen=True)
class FollowUpPair:
    name: str
    current_dir: Path
    prior_dir: Path
    prior_to_current: np.ndarray  # 4 x 4 LPS affine, as made: a prior point shows the current anatomy there
    truth: tuple[TruthNodule, ...]
    synthetic_nodules: bool


# --------------------------------------------------------------------------- geometry


def rigid_matrix(transform: RigidTransform) -> np.ndarray:
    """``transform`` as a 4 x 4 affine of LPS mm."""
    matrix = np.eye(4)
    matrix[:3, :3] = transform.rotation
    matrix[:3, 3] = transform.centre + transform.translation - transform.rotation @ transform.centre
    return matrix


def apply_affine(matrix: np.ndarray, points_lps) -> np.ndarray:
    points = np.asarray(points_lps, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def breathing_matrix(apex_z: float, scale: float) -> np.ndarray:
    """A prior at a shallower inspiration, ``scale`` < 1 times as long craniocaudally about the
    lung apex (the diaphragm moves, the apices hardly): prior LPS -> current LPS stretches z by
    1 / ``scale`` about ``apex_z``."""
    matrix = np.eye(4)
    matrix[2, 2] = 1.0 / scale
    matrix[2, 3] = apex_z * (1.0 - 1.0 / scale)
    return matrix


def axial_lps(voxels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``voxels`` ``[k, j, i]`` flipped where needed so that k, j, i run along +z, +y, +x (LPS),
    the geometry :func:`write_study` writes; the affine follows. Oblique or permuted axes are refused."""
    affine = np.asarray(affine, dtype=np.float64).copy()
    directions = affine[:3, :3]
    spacing = np.linalg.norm(directions, axis=0)
    for column, axis in enumerate((2, 1, 0)):  # k along z, j along y, i along x
        along = abs(directions[axis, column]) / spacing[column]
        if along < 1 - 1e-6:
            raise ValueError(f"voxel axis {'kji'[column]} is not along LPS {'xyz'[axis]} (cosine {along:.4f})")
    for column, axis in enumerate((2, 1, 0)):
        if directions[axis, column] < 0:
            voxels = np.flip(voxels, axis=column)
            affine[:3, 3] += affine[:3, column] * (voxels.shape[column] - 1)
            affine[:3, column] *= -1
    return np.ascontiguousarray(voxels), affine


def _lps_grid_to_index(affine: np.ndarray, lps: np.ndarray) -> np.ndarray:
    return (lps - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def _distance_mm(shape, affine, centre_lps, box_mm: float):
    centre = _lps_grid_to_index(affine, np.asarray(centre_lps, float))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lo = np.maximum(np.floor(centre - box_mm / spacing), 0).astype(int)
    hi = np.minimum(np.ceil(centre + box_mm / spacing) + 1, shape).astype(int)
    grid = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), distance


# --------------------------------------------------------------------------- nodules


def paint_nodule(hu: np.ndarray, affine: np.ndarray, centre_lps, diameter_mm: float, value_hu: float = 20.0) -> None:
    """A solid sphere of ``diameter_mm`` with a one-voxel partial-volume edge, in place."""
    region, distance = _distance_mm(hu.shape, affine, centre_lps, diameter_mm / 2 + 3)
    edge = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    fraction = np.clip((diameter_mm / 2 - distance) / edge + 0.5, 0.0, 1.0)
    block = hu[region]
    hu[region] = np.maximum(block, block * (1 - fraction) + value_hu * fraction)


def remove_nodule(hu: np.ndarray, affine: np.ndarray, centre_lps, diameter_mm: float, rng: np.random.Generator) -> None:
    """Replace soft tissue within the nodule's sphere (+2 mm) by lung parenchyma, in place."""
    region, distance = _distance_mm(hu.shape, affine, centre_lps, diameter_mm / 2 + 3)
    block = hu[region]
    inside = (distance <= diameter_mm / 2 + 2) & (block > -600)
    block[inside] = -860.0 + rng.normal(0.0, 25.0, int(inside.sum()))
    hu[region] = block


def long_axis_mm(occupied: np.ndarray, spacing) -> float:
    """The largest distance between two occupied voxel centres (mm): a nodule's long axis."""
    points = np.argwhere(occupied) * np.asarray(spacing, float)
    if len(points) < 2:
        return 0.0
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # flat (one slice, one row): every point is a candidate
        pass
    return float(pdist(points).max())


def equivalent_diameter_mm(occupied: np.ndarray, spacing) -> float:
    """The diameter of the sphere of the same volume (mm)."""
    volume = float(occupied.sum()) * float(np.prod(spacing))
    return (6.0 * volume / np.pi) ** (1.0 / 3.0)


def _fine_shape(mask: np.ndarray, spacing: np.ndarray, subdivisions: int) -> np.ndarray:
    """The mask's shape with slices ``subdivisions`` times thinner, by shape-based interpolation
    (Raya and Udupa, IEEE TMI 1990;9:32-42): the in-plane signed distance of each slice,
    interpolated linearly along k. Next to the first and last slices the shape closes as a
    cap: an empty slice takes as distance the deepest point of its masked neighbour, so the
    centre reaches half a slice beyond and the rim less."""
    masked = mask.any(axis=(1, 2))
    signed = np.empty(mask.shape, dtype=np.float64)
    for k, plane in enumerate(mask):
        if masked[k]:
            signed[k] = (ndimage.distance_transform_edt(~plane, sampling=spacing[1:])
                         - ndimage.distance_transform_edt(plane, sampling=spacing[1:]))
    for k in np.flatnonzero(~masked):
        depths = [-signed[n].min() for n in (k - 1, k + 1) if 0 <= n < len(mask) and masked[n]]
        signed[k] = max(depths, default=1e3)
    # sub-slice s of slice k sits at k + (s + 0.5) / subdivisions - 0.5
    position = (np.arange(len(mask) * subdivisions) + 0.5) / subdivisions - 0.5
    below = np.clip(np.floor(position).astype(int), 0, len(mask) - 1)
    above = np.clip(below + 1, 0, len(mask) - 1)
    weight = np.clip(position - below, 0.0, 1.0)[:, None, None]
    return signed[below] * (1 - weight) + signed[above] * weight < 0


def _parenchyma(hu: np.ndarray, zone: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lung parenchyma to fill ``zone`` with: per slice, the Gaussian-weighted mean (3 mm) of the
    lung around it (voxels outside ``zone`` below -600 HU: no vessel or nodule spreads in), plus
    noise as fine-grained and as strong as the image's there."""
    known = (~zone & (hu < -600)).astype(np.float32)
    sigma = (0.0, 3.0 / spacing[1], 3.0 / spacing[2])
    weight = ndimage.gaussian_filter(known, sigma)
    level = ndimage.gaussian_filter(hu * known, sigma) / np.maximum(weight, 1e-3)
    level = np.where(weight > 1e-3, level, float(np.median(hu[known > 0])) if known.any() else -860.0)
    grain = (0.0, 1.0 / spacing[1], 1.0 / spacing[2])  # about 1 mm, as the reconstruction kernel leaves it
    shell = (known > 0) & (ndimage.distance_transform_edt(~zone, sampling=spacing) <= 8.0)
    spread = float(np.std((hu - level)[shell])) if shell.any() else 25.0
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, hu.shape).astype(np.float32), grain)
    return (level + noise * (min(spread, 40.0) / max(float(noise.std()), 1e-6))).astype(np.float32)


@dataclass(frozen=True)
class ShrunkNodule:
    """A real nodule shrunk by :func:`shrink_real_nodule`, and its truth.

    The truth's diameters are sphere-equivalent diameters of the nodule's shape on a grid with
    10 times thinner slices, as the report's ``diameter_mm`` is
    (:func:`lungscreen.models.measure.segmented_size`: the sphere of the segmented volume), the
    same definition at both times. The long axes of the same shapes (the largest distance
    between two voxel centres) are kept beside them.
    """

    hu: np.ndarray  # the prior's voxels on the current grid
    long_axis_mm: tuple[float, float]  # (current, prior)
    equivalent_diameter_mm: tuple[float, float]  # (current, prior)

    @property
    def growth_mm(self) -> float:
        return self.equivalent_diameter_mm[0] - self.equivalent_diameter_mm[1]


def shrink_real_nodule(
    hu: np.ndarray, affine: np.ndarray, mask: np.ndarray, shrink_mm: float, rng: np.random.Generator,
    *, margin_mm: float = 3.0, feather_mm: float = 2.0, psf_mm: float = 1.0, subdivisions: int = 10,
) -> ShrunkNodule:
    """The real nodule of ``mask`` as it was smaller: its surface moved in by ``shrink_mm``.

    On thin sub-slices (:func:`_fine_shape`) the nodule's shape is eroded by ``shrink_mm``; each
    voxel keeps the share of its own nodule content that the eroded shape still covers, the rest
    becomes lung parenchyma (a voxel's HU is a mix: ``parenchyma + (hu - parenchyma) * kept``),
    so the smaller nodule is the real one's core with its real texture and partial volume, its new
    edge blurred in-plane by ``psf_mm`` as the scanner blurs the real edge. Soft
    tissue in a ``margin_mm`` margin around the mask (and in the slices just beyond it, where the
    nodule's cap shows outside a mask drawn on thick slices) becomes parenchyma too where it is
    denser (:func:`_parenchyma`), and beyond the margin what is denser fades into it over
    ``feather_mm``. A ``shrink_mm`` larger than the nodule's radius removes it. ``hu`` is
    not changed.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not mask.any():
        raise ValueError("the nodule mask is empty")
    reach = np.ceil((12.0 + margin_mm) / spacing).astype(int) + 1
    found = np.argwhere(mask)
    lo = np.maximum(found.min(axis=0) - reach, 0)
    hi = np.minimum(found.max(axis=0) + reach + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    local_mask, local_hu = mask[box].astype(bool), hu[box].astype(np.float32)

    fine_spacing = spacing / np.array([subdivisions, 1, 1])
    shape = _fine_shape(local_mask, spacing, subdivisions)
    shrunk = ndimage.distance_transform_edt(shape, sampling=fine_spacing) > shrink_mm
    before = shape.reshape(len(local_mask), subdivisions, *local_mask.shape[1:]).mean(axis=1)
    after = shrunk.reshape(len(local_mask), subdivisions, *local_mask.shape[1:]).mean(axis=1)

    distance = ndimage.distance_transform_edt(~local_mask, sampling=spacing)
    footprint = ndimage.distance_transform_edt(~local_mask.any(axis=0), sampling=spacing[1:]) <= margin_mm
    slices = np.flatnonzero(local_mask.any(axis=(1, 2)))
    near = np.zeros_like(local_mask)
    near[max(slices[0] - 1, 0) : slices[-1] + 2] = footprint
    near |= distance <= margin_mm
    margin = near & (before == 0)
    parenchyma = _parenchyma(local_hu, (before > 0) | near, spacing, rng)

    # The smaller nodule's edge blurred in-plane as the scanner blurs the real one's (about 1 mm):
    # a Gaussian keeps the shape's half-contrast contour, hence the truth's size, in place.
    blurred = ndimage.gaussian_filter(after, (0.0, psf_mm / spacing[1], psf_mm / spacing[2]))
    kept = np.clip(np.divide(blurred, before, out=np.zeros_like(after), where=before > 0), 0.0, 1.0)
    prior = local_hu.copy()
    inside = before > 0
    prior[inside] = parenchyma[inside] + (local_hu[inside] - parenchyma[inside]) * kept[inside]
    prior[margin] = np.minimum(local_hu, parenchyma)[margin]
    # Beyond the margin the nodule's blurred halo fades into the lung over ``feather_mm``: no ring
    # of it is left around where the nodule was (only lowered towards the lung, never raised).
    zone = inside | near
    outside = ndimage.distance_transform_edt(~zone, sampling=spacing)
    fade = np.clip(1.0 - outside / feather_mm, 0.0, 1.0) * ~zone
    prior = prior + fade * (np.minimum(parenchyma, prior) - prior)
    out = hu.astype(np.float32, copy=True)
    out[box] = prior
    return ShrunkNodule(
        out,
        (long_axis_mm(shape, fine_spacing), long_axis_mm(shrunk, fine_spacing)),
        (equivalent_diameter_mm(shape, fine_spacing), equivalent_diameter_mm(shrunk, fine_spacing)),
    )


# --------------------------------------------------------------------------- scans


def resample_prior(hu: np.ndarray, affine: np.ndarray, prior_to_current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The prior scan: the current anatomy seen through ``prior_to_current`` (a 4 x 4 LPS affine),
    on the current grid less the slices that would reach beyond the scanned range. Returns
    (HU, affine)."""
    # prior index p -> prior LPS A p + o -> current LPS M (A p + o) + t -> current index A^-1 (y - o)
    a, o = affine[:3, :3], affine[:3, 3]
    m, t = prior_to_current[:3, :3], prior_to_current[:3, 3]
    a_inv = np.linalg.inv(a)
    matrix = a_inv @ m @ a
    offset = a_inv @ (m @ o + t - o)
    moved = ndimage.affine_transform(hu, matrix, offset, order=1, cval=-1024.0, output=np.float32)
    _, rows, columns = hu.shape
    corners = np.array([[0, 0], [0, columns - 1], [rows - 1, 0], [rows - 1, columns - 1]], float)
    kept = [k for k in range(hu.shape[0])
            if np.all(((matrix[0, 1:] @ corners.T) + matrix[0, 0] * k + offset[0] >= 0)
                      & ((matrix[0, 1:] @ corners.T) + matrix[0, 0] * k + offset[0] <= hu.shape[0] - 1))]
    prior_affine = affine.copy()
    prior_affine[:3, 3] = a @ [kept[0], 0, 0] + o
    return moved[kept[0] : kept[-1] + 1], prior_affine


def rigid_prior(hu: np.ndarray, affine: np.ndarray, transform: RigidTransform) -> tuple[np.ndarray, np.ndarray]:
    """The prior scan: where the patient lay ``transform``-inverse away (:func:`resample_prior`)."""
    return resample_prior(hu, affine, rigid_matrix(transform))


def thick_slices(hu: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``factor`` times thicker, each the mean of ``factor`` consecutive ones (a trailing
    remainder dropped), as a scanner reconstructs a thick series from the same acquisition; the
    new slice lies at the mean position of those it averages."""
    count = hu.shape[0] // factor
    thick = hu[: count * factor].reshape(count, factor, *hu.shape[1:]).mean(axis=1, dtype=np.float32)
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + affine[:3, 0] * (factor - 1) / 2
    out[:3, 0] = affine[:3, 0] * factor
    return thick, out


def crop_top(hu: np.ndarray, affine: np.ndarray, mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Less coverage: the slices within ``mm`` of the top (highest z, towards the head) dropped."""
    dropped = int(np.floor(mm / abs(affine[2, 0]) + 1e-6))
    if dropped == 0:
        return hu, affine
    if affine[2, 0] > 0:  # z grows with k: the top is at the end
        return hu[:-dropped], affine
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + affine[:3, 0] * dropped
    return hu[dropped:], out


def write_study(hu, affine, out_dir: Path, study_date: str, study_uid: str | None = None) -> Path:
    from lungscreen.training.dicom_writer import write_ct_series

    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    written = write_ct_series(hu, spacing, out_dir, origin_lps=tuple(affine[:3, 3]), study_instance_uid=study_uid,
                              patient_id="FOLLOWUP-EVAL-1", accession_number=f"ACC{study_date}")
    for path in written.paths:  # the writer's date is fixed; the pair needs two
        ds = pydicom.dcmread(path)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
        ds.save_as(path, enforce_file_format=True)
    return out_dir


def rigid_transform(degrees, shift_mm, centre) -> RigidTransform:
    return RigidTransform(Rotation.from_euler("xyz", degrees, degrees=True).as_matrix(), np.array(shift_mm, float), np.array(centre, float))


def _volume_centre(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ ((np.array(hu.shape) - 1) / 2) + affine[:3, 3]


def _lung_spots(hu: np.ndarray, affine: np.ndarray, count: int, avoid_lps, min_depth_mm: float = 15.0) -> list[tuple]:
    """``count`` deterministic points deep inside the lungs, far from each other and from ``avoid_lps``."""
    from lungscreen.models.registration import alignment_image

    coarse = alignment_image(hu, affine)  # the lungs at ~4 mm are enough to choose a spot
    spacing = np.linalg.norm(coarse.affine[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(lung_mask(coarse.hu), sampling=spacing)
    candidates = np.argwhere(depth >= min_depth_mm)
    candidates = candidates[np.argsort(-depth[tuple(candidates.T)], kind="stable")]
    chosen: list[np.ndarray] = []
    for index in candidates:
        lps = coarse.affine[:3, :3] @ index + coarse.affine[:3, 3]
        if np.linalg.norm(lps - np.asarray(avoid_lps)) < 60 or any(np.linalg.norm(lps - c) < 60 for c in chosen):
            continue
        chosen.append(lps)
        if len(chosen) == count:
            break
    return [tuple(float(v) for v in c) for c in chosen]


# --------------------------------------------------------------------------- making pairs


class _Scans:
    """The real scans, read once and only when a pair needs them; the pairs' folders under ``work_dir``."""

    def __init__(self, work_dir: Path, data: Path):
        self.work_dir, self.data = work_dir, data

    @cached_property
    def lidc(self) -> tuple[np.ndarray, np.ndarray]:
        from lungscreen.dicom_io.study import index_study
        from lungscreen.dicom_io.volume import read_series_volume

        series_dir = self.data / "lidc_idri" / "LIDC-IDRI-0001"
        series = index_study(sorted(series_dir.rglob("*.dcm"))).series[0]
        volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
        return volume.voxels.astype(np.float32), volume.affine

    @cached_property
    def lidc_current(self) -> Path:
        return write_study(*self.lidc, self.work_dir / "lidc-current", CURRENT_DATE)

    @cached_property
    def lung1(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """lung1's HU, affine and nodule mask."""
        from lungscreen.training.readers import read_nrrd

        folder = self.data / "pyradiomics_lung"
        voxels, affine = read_nrrd(folder / "lung1_image.nrrd")
        label, label_affine = read_nrrd(folder / "lung1_label.nrrd")
        if label.shape != voxels.shape or not np.allclose(label_affine, affine, atol=1e-3):
            raise ValueError("lung1's mask is not on its image's grid")
        voxels, affine = axial_lps(voxels, affine)
        label, _ = axial_lps(label, label_affine)
        return voxels, affine, label > 0

    @cached_property
    def lung1_current(self) -> Path:
        hu, affine, _ = self.lung1
        return write_study(hu, affine, self.work_dir / "lung1-current", CURRENT_DATE)

    @cached_property
    def contrast(self) -> tuple[np.ndarray, np.ndarray]:
        from lungscreen.training.readers import read_nifti

        scan = read_nifti(self.data / "totalsegmentator" / "example_ct_chest_cta_1.5mm.nii.gz")
        return axial_lps(scan.voxels, scan.affine)

    def prior(self, name: str, hu: np.ndarray, affine: np.ndarray, date: str) -> Path:
        return write_study(hu, affine, self.work_dir / f"{name}-prior", date)


_LIDC_CENTRE = (0.0, 0.0, -175.0)  # about the middle of LIDC-IDRI-0001's chest: rotations about it


def _lidc_growing(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.lidc
    rng = np.random.default_rng(17)
    shrunk = hu.copy()
    remove_nodule(shrunk, affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, rng)
    paint_nodule(shrunk, affine, LUNA16_NODULE_LPS, 18.0)
    t1 = rigid_matrix(rigid_transform((2.0, -3.0, 4.0), (6.0, -4.0, 9.0), _LIDC_CENTRE))
    prior = scans.prior("lidc-growing", *resample_prior(shrunk, affine, t1), "20250115")
    return FollowUpPair("lidc-growing", scans.lidc_current, prior, t1,
                        (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.GROWING, LUNA16_NODULE_MM - 18.0),), False)


def _lidc_new(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.lidc
    removed = hu.copy()
    remove_nodule(removed, affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, np.random.default_rng(18))
    t2 = rigid_matrix(rigid_transform((-4.0, 2.0, -2.0), (-10.0, 7.0, -5.0), _LIDC_CENTRE))
    prior = scans.prior("lidc-new", *resample_prior(removed, affine, t2), "20241211")
    return FollowUpPair("lidc-new", scans.lidc_current, prior, t2, (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.NEW, None),), False)


def _synthetic_growth(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.lidc
    spot_a, spot_b = _lung_spots(hu, affine, 2, LUNA16_NODULE_LPS)
    current_synthetic, prior_synthetic = hu.copy(), hu.copy()
    paint_nodule(current_synthetic, affine, spot_a, 10.0)
    paint_nodule(prior_synthetic, affine, spot_a, 7.0)
    paint_nodule(current_synthetic, affine, spot_b, 9.0)
    paint_nodule(prior_synthetic, affine, spot_b, 9.0)
    t3 = rigid_matrix(rigid_transform((3.0, 3.0, -3.0), (-5.0, -8.0, 6.0), _LIDC_CENTRE))
    prior = scans.prior("synthetic", *resample_prior(prior_synthetic, affine, t3), "20250110")
    return FollowUpPair(
        "synthetic-growth", write_study(current_synthetic, affine, scans.work_dir / "synthetic-current", CURRENT_DATE),
        prior, t3, (TruthNodule(spot_a, ChangeLabel.GROWING, 3.0), TruthNodule(spot_b, ChangeLabel.STABLE, 0.0)), True,
    )


def _lidc_stable(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.lidc
    move = rigid_matrix(rigid_transform((1.5, 2.5, -3.5), (8.0, 5.0, -7.0), _LIDC_CENTRE))
    prior = scans.prior("lidc-stable", *resample_prior(hu, affine, move), "20241220")
    return FollowUpPair("lidc-stable", scans.lidc_current, prior, move,
                        (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.STABLE, 0.0),), False)


def _lung1(scans: _Scans, name: str, shrink_mm: float, degrees, shift_mm, date: str, seed: int) -> FollowUpPair:
    hu, affine, mask = scans.lung1
    shrunk = shrink_real_nodule(hu, affine, mask, shrink_mm, np.random.default_rng(seed))
    move = rigid_matrix(rigid_transform(degrees, shift_mm, _volume_centre(hu, affine)))
    prior = scans.prior(name, *resample_prior(shrunk.hu, affine, move), date)
    centre = tuple(float(v) for v in affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3])
    if shrunk.long_axis_mm[1] == 0.0:
        truth = TruthNodule(centre, ChangeLabel.NEW, None)
    else:
        truth = TruthNodule(centre, ChangeLabel.GROWING, shrunk.growth_mm)
    print(f"{name}: long axis {shrunk.long_axis_mm[0]:.2f} -> prior {shrunk.long_axis_mm[1]:.2f} mm, "
          f"sphere-equivalent {shrunk.equivalent_diameter_mm[0]:.2f} -> {shrunk.equivalent_diameter_mm[1]:.2f} mm",
          file=sys.stderr)
    return FollowUpPair(name, scans.lung1_current, prior, move, (truth,), False)


def _lung1_growing(scans: _Scans) -> FollowUpPair:
    return _lung1(scans, "lung1-growing", 2.0, (2.0, -2.0, 3.0), (5.0, -6.0, 7.0), "20250108", 21)


def _lung1_new(scans: _Scans) -> FollowUpPair:
    return _lung1(scans, "lung1-new", 50.0, (-2.0, 1.5, -3.0), (-6.0, 8.0, -4.0), "20241230", 22)


def _lidc_breathing(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.lidc
    lungs = np.flatnonzero(lung_mask(hu).any(axis=(1, 2)))
    apex_z = float(affine[2, 0] * lungs.max() + affine[2, 3]) if affine[2, 0] > 0 else float(affine[2, 0] * lungs.min() + affine[2, 3])
    move = rigid_matrix(rigid_transform((-2.0, -2.0, 3.0), (4.0, 9.0, 6.0), _LIDC_CENTRE)) @ breathing_matrix(apex_z, 0.955)
    prior = scans.prior("lidc-breathing", *resample_prior(hu, affine, move), "20250203")
    return FollowUpPair("lidc-breathing", scans.lidc_current, prior, move,
                        (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.STABLE, 0.0),), False)


def _lidc_thick_prior(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.lidc
    shrunk = hu.copy()
    remove_nodule(shrunk, affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, np.random.default_rng(19))
    paint_nodule(shrunk, affine, LUNA16_NODULE_LPS, 18.0)
    move = rigid_matrix(rigid_transform((3.0, -2.0, -3.0), (-7.0, -6.0, 8.0), _LIDC_CENTRE))
    thick = crop_top(*thick_slices(*resample_prior(shrunk, affine, move), 2), 20.0)
    return FollowUpPair("lidc-thick-prior", scans.lidc_current, scans.prior("lidc-thick-prior", *thick, "20250120"), move,
                        (TruthNodule(LUNA16_NODULE_LPS, ChangeLabel.GROWING, LUNA16_NODULE_MM - 18.0),), False)


def _contrast_synthetic(scans: _Scans) -> FollowUpPair:
    hu, affine = scans.contrast
    growing, stable, new = _lung_spots(hu, affine, 3, (np.inf, np.inf, np.inf))
    current, before = hu.copy(), hu.copy()
    paint_nodule(current, affine, growing, 11.0)
    paint_nodule(before, affine, growing, 8.0)
    paint_nodule(current, affine, stable, 9.0)
    paint_nodule(before, affine, stable, 9.0)
    paint_nodule(current, affine, new, 8.0)
    move = rigid_matrix(rigid_transform((-3.0, 2.0, 2.0), (6.0, 5.0, -8.0), _volume_centre(hu, affine)))
    prior = scans.prior("contrast", *resample_prior(before, affine, move), "20250112")
    truth = (TruthNodule(growing, ChangeLabel.GROWING, 3.0), TruthNodule(stable, ChangeLabel.STABLE, 0.0),
             TruthNodule(new, ChangeLabel.NEW, None))
    return FollowUpPair("contrast-synthetic", write_study(current, affine, scans.work_dir / "contrast-current", CURRENT_DATE),
                        prior, move, truth, True)


PAIRS = {
    "lidc-growing": _lidc_growing,
    "lidc-new": _lidc_new,
    "synthetic-growth": _synthetic_growth,
    "lidc-stable": _lidc_stable,
    "lung1-growing": _lung1_growing,
    "lung1-new": _lung1_new,
    "lidc-breathing": _lidc_breathing,
    "lidc-thick-prior": _lidc_thick_prior,
    "contrast-synthetic": _contrast_synthetic,
}


def make_pairs(work_dir: Path, data: Path = SHARED_DATA, names=tuple(PAIRS)) -> list[FollowUpPair]:
    unknown = sorted(set(names) - set(PAIRS))
    if unknown:
        raise ValueError(f"unknown pair(s) {unknown}; known: {list(PAIRS)}")
    scans = _Scans(work_dir, data)
    return [PAIRS[name](scans) for name in PAIRS if name in names]


# --------------------------------------------------------------------------- evaluating


@dataclass
class PairResult:
    name: str
    synthetic_nodules: bool
    truth: tuple[TruthNodule, ...] = ()
    findings: int = 0
    matched_right: int = 0  # current findings paired to the prior finding the truth says (or rightly new)
    matched_wrong: list[str] = field(default_factory=list)
    truth_found: int = 0
    truth_total: int = 0
    labels_right: int = 0
    label_errors: list[str] = field(default_factory=list)
    growth_errors_mm: list[float] = field(default_factory=list)
    alignment_error_mm: float = float("nan")  # at the current findings: estimated vs true transform
    resolved: int = 0  # prior findings left unmatched; every prior nodule of these pairs is still there
    resolved_details: list[str] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)  # per truth nodule found: its diameters now and before
    compare_s: list[float] = field(default_factory=list)  # per repetition
    analysis_s: list[float] = field(default_factory=list)  # the current study's analysis without the comparison


def evaluate_pair(pair: FollowUpPair, analyzer, repeat: int = 1) -> PairResult:
    from lungscreen.server.pipeline import PriorImages, analyze_study
    from lungscreen.server.priors import prior_from_result

    prior_result = analyze_study(sorted(pair.prior_dir.iterdir()), replace(analyzer, keep_alignment_image=True))
    prior = prior_from_result(prior_result)
    out = PairResult(pair.name, pair.synthetic_nodules, pair.truth)
    # As the server runs every study: the prior already analysed, the current one keeping its own
    # alignment image for its later follow-ups (a stage of every study, not of the comparison).
    current_analyzer = replace(analyzer, keep_alignment_image=True)
    prior_images = PriorImages(tuple(sorted(pair.prior_dir.iterdir())), prior_result.series_uid)  # the SR's evidence
    for _ in range(repeat):
        result = analyze_study(sorted(pair.current_dir.iterdir()), current_analyzer, prior=prior, prior_images=prior_images)
        out.compare_s.append(result.timings.get("compare", float("nan")))
        out.analysis_s.append(sum(v for k, v in result.timings.items() if k != "compare"))
    out.findings, out.truth_total = len(result.report.findings), len(pair.truth)
    out.resolved = len(result.report.comparison.resolved)
    for gone in result.report.comparison.resolved:
        where = np.round(apply_affine(pair.prior_to_current, gone.center_lps_mm), 1).tolist()
        out.resolved_details.append(f"{gone.tracking_id} ({gone.diameter_mm:.1f} mm {gone.nodule_type.value}, truly at {where} now)")
    prior_by_uid = {n.tracking_uid: n for n in prior.nodules}
    prior_true_lps = [apply_affine(pair.prior_to_current, n.center_lps_mm) for n in prior.nodules]
    truth_at = {t: np.array(t.current_lps) for t in pair.truth}
    for finding in result.report.findings:
        here = np.array(finding.center_lps_mm)
        truth = next((t for t, p in truth_at.items() if np.linalg.norm(p - here) <= max(5.0, finding.diameter_mm / 2)), None)
        # The prior finding that is truly this nodule: one whose true position lies within reach.
        true_partner = None
        if truth is None or truth.change is not ChangeLabel.NEW:
            near = [(np.linalg.norm(p - here), n) for p, n in zip(prior_true_lps, prior.nodules)
                    if np.linalg.norm(p - here) <= max(5.0, 0.5 * max(finding.diameter_mm, n.diameter_mm))]
            true_partner = min(near, key=lambda x: x[0])[1] if near else None
        got = prior_by_uid.get(finding.tracking_uid) if finding.change is not ChangeLabel.NEW else None
        label = f"{finding.tracking_id} ({finding.diameter_mm:.1f} mm at {np.round(here, 1).tolist()})"
        if got is true_partner:
            out.matched_right += 1
        else:
            out.matched_wrong.append(f"{label}: matched {getattr(got, 'tracking_id', None)}, truth {getattr(true_partner, 'tracking_id', None)}")
        expected = truth.change if truth is not None else (ChangeLabel.NEW if true_partner is None else None)
        if truth is not None:
            out.truth_found += 1
            before = f"{finding.prior.diameter_mm:.2f} mm" if finding.prior is not None else "none"
            growth = "none" if truth.growth_mm is None else f"{truth.growth_mm:.2f} mm"
            out.measured.append(f"{finding.diameter_mm:.2f} mm now, {before} before; truth: {truth.change.value}, growth {growth}")
            if truth.growth_mm is not None and finding.prior is not None:
                out.growth_errors_mm.append(abs(finding.diameter_mm - finding.prior.diameter_mm - truth.growth_mm))
        if expected is None:  # the same anatomy at both timepoints: stable, or within the measurement noise
            if finding.change is ChangeLabel.STABLE:
                out.labels_right += 1
            else:
                out.label_errors.append(f"{label}: {finding.change.value}, the same anatomy at both times")
        elif finding.change is expected:
            out.labels_right += 1
        else:
            out.label_errors.append(f"{label}: {finding.change.value}, truth {expected.value}")
    if prior.image is not None and result.alignment_image is not None and result.report.findings:
        from lungscreen.models.registration import align

        estimated = align(prior.image, result.alignment_image).transform
        points = np.array([f.center_lps_mm for f in result.report.findings])
        in_prior = apply_affine(np.linalg.inv(pair.prior_to_current), points)
        out.alignment_error_mm = float(np.linalg.norm(estimated.apply(in_prior) - points, axis=1).max())
    return out


def _compare_shares(r: PairResult) -> np.ndarray:
    # per repetition: both timings come from the same run
    return np.array(r.compare_s) / np.array(r.analysis_s)


def _row(r: PairResult) -> dict:
    return {
        "synthetic_nodules": r.synthetic_nodules,
        "truth": [{"change": t.change.value, "growth_mm": None if t.growth_mm is None else round(t.growth_mm, 2)}
                  for t in r.truth],
        "findings": r.findings,
        "matched_right": f"{r.matched_right}/{r.findings}",
        "matched_wrong": r.matched_wrong,
        "truth_found": f"{r.truth_found}/{r.truth_total}",
        "labels_right": f"{r.labels_right}/{r.findings}",
        # a prior detection with no current one: the detector found it in one scan only
        "resolved_wrongly": r.resolved,
        "resolved_details": r.resolved_details,
        "label_errors": r.label_errors,
        "measured": r.measured,
        "growth_error_mm_max": max(r.growth_errors_mm) if r.growth_errors_mm else None,
        "alignment_error_mm_max": round(r.alignment_error_mm, 2),
        "compare_s": {"min": round(min(r.compare_s), 3), "median": round(float(np.median(r.compare_s)), 3)},
        "analysis_s": {"min": round(min(r.analysis_s), 3), "median": round(float(np.median(r.analysis_s)), 3)},
        "compare_share_median": round(float(np.median(_compare_shares(r))), 3),
    }


def _total(results: list[PairResult]) -> dict:
    growth = [e for r in results for e in r.growth_errors_mm]
    alignment = [r.alignment_error_mm for r in results if np.isfinite(r.alignment_error_mm)]
    return {
        "pairs": len(results),
        "matched_right": f"{sum(r.matched_right for r in results)}/{sum(r.findings for r in results)}",
        "labels_right": f"{sum(r.labels_right for r in results)}/{sum(r.findings for r in results)}",
        "truth_found": f"{sum(r.truth_found for r in results)}/{sum(r.truth_total for r in results)}",
        "resolved_wrongly": sum(r.resolved for r in results),
        "growth_error_mm_max": round(max(growth), 2) if growth else None,
        "alignment_error_mm_max": round(max(alignment), 2) if alignment else None,
        "compare_share_median": round(float(np.median(np.concatenate([_compare_shares(r) for r in results]))), 3),
    }


def summarize(results: list[PairResult]) -> dict:
    """Per pair, then the totals of the pairs with real nodules and of those with synthetic ones."""
    groups = {"real_nodules": [r for r in results if not r.synthetic_nodules],
              "synthetic_nodules": [r for r in results if r.synthetic_nodules]}
    return {"pairs": {r.name: _row(r) for r in results},
            "totals": {name: _total(group) for name, group in groups.items() if group}}


def _total_lines(totals: dict) -> str:
    lines = ["group              pairs  matched  labels  truth found  resolved  growth err max  align err max  compare share"]
    for name, t in totals.items():
        lines.append(f"{name:<18} {t['pairs']:>5}  {t['matched_right']:>7}  {t['labels_right']:>6}  {t['truth_found']:>11}"
                     f"  {t['resolved_wrongly']:>8}  {t['growth_error_mm_max']!s:>11} mm  {t['alignment_error_mm_max']!s:>10} mm"
                     f"  {t['compare_share_median']:>13}")
    return "\n".join(lines)


def cmd_evaluate_followup(args: argparse.Namespace) -> int:
    from lungscreen.server.config import load_settings
    from lungscreen.server.workers import build_analyzer

    names = tuple(PAIRS) if not args.pairs else tuple(n.strip() for n in args.pairs.split(",") if n.strip())
    unknown = sorted(set(names) - set(PAIRS))
    if unknown:
        print(f"unknown pair(s) {', '.join(unknown)}; known: {', '.join(PAIRS)}", file=sys.stderr)
        return 2
    analyzer = build_analyzer(load_settings(args.config))
    with tempfile.TemporaryDirectory(prefix="lungscreen-followup-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pairs = make_pairs(work, Path(args.data) if args.data else SHARED_DATA, names)
        print(f"pairs made in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        from lungscreen.server.pipeline import analyze_study

        analyze_study(sorted(pairs[0].current_dir.iterdir()), analyzer)  # ONNX Runtime's start-up: not counted
        summary = summarize([evaluate_pair(p, analyzer, args.repeat) for p in pairs])
    text = json.dumps(summary, indent=2)
    print(text)
    print(_total_lines(summary["totals"]))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate-followup", help="follow-up comparison on pairs with a known truth (real scans of ../shared/data)")
    p.add_argument("--config", type=Path)
    p.add_argument("--data", type=Path, help="the shared data folder (default ../shared/data)")
    p.add_argument("--work-dir", type=Path, help="keep the pairs' DICOM files here")
    p.add_argument("--json", type=Path)
    p.add_argument("--repeat", type=int, default=3, help="analyses of each current study, for the timings (default 3)")
    p.add_argument("--pairs", help=f"comma-separated subset of: {', '.join(PAIRS)} (default all)")
    p.set_defaults(func=cmd_evaluate_followup)
