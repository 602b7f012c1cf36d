"""Realistic synthetic chest CT with planted lung nodules (training/evaluation data).

The phantom is built analytically in millimetres and rendered on the voxel grid with
partial-volume (soft) edges, then an acquisition is simulated (in-plane PSF, slice
profile, correlated noise). It contains the structures that make nodule detection hard:
a chest wall with ribs, spine, mediastinum and heart, diaphragm domes, trachea and
bronchi with walls, and above all space-filling branching pulmonary vessel trees whose
cross-sections look like small blobs.

Coordinates: volumes are indexed ``(k, j, i)`` = (slice, row, column). Patient (LPS)
coordinates of voxel ``(k, j, i)`` are ``origin + (i * dx, j * dy, k * dz)`` with
``spacing = (dz, dy, dx)``, as written by :func:`training.dicom_writer.write_ct_series`
(axial slices, identity orientation). Internally the anatomy is described in mm relative
to the volume centre, ordered ``(z, y, x)`` like the array axes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from lungscreen.training.dicom_writer import HU_MIN, write_ct_series

__all__ = [
    "LOCATIONS",
    "NODULE_TYPES",
    "DatasetCase",
    "NoduleSpec",
    "PlantedNodule",
    "SyntheticCT",
    "insert_nodules",
    "make_chest_ct",
    "make_dataset",
    "sample_nodule_specs",
    "write_luna16_annotations",
]

# --------------------------------------------------------------------------- HU values
#: Air (outside the body, airway lumen).
HU_AIR = -1000.0
#: Aerated lung parenchyma (mean of a case is drawn around this); ~10 % tissue+blood in air.
HU_LUNG_RANGE = (-875.0, -825.0)
#: Posterior (dependent) lung is denser than anterior lung in a supine patient.
HU_LUNG_GRAVITY_GRADIENT_RANGE = (20.0, 60.0)
#: Amplitude (std) of the low-frequency parenchymal texture.
HU_LUNG_TEXTURE_STD = 12.0
#: Subcutaneous and epicardial fat.
HU_FAT = -100.0
#: Muscle, mediastinal soft tissue, heart and unenhanced blood (vessels) are all ~40 HU.
HU_SOFT_TISSUE = 40.0
#: Liver/spleen below the diaphragm domes (unenhanced).
HU_LIVER = 55.0
#: Cerebrospinal fluid in the spinal canal.
HU_CSF = 15.0
#: Cortical bone (vertebral rim, neural arch) and the average over a thin rib section.
HU_CORTICAL_BONE = 800.0
HU_RIB = 550.0
#: Cancellous (marrow) bone of the vertebral body; sternum is mostly cancellous.
HU_CANCELLOUS_BONE = 250.0
HU_STERNUM = 350.0
#: Carbon-fibre patient couch below the patient.
HU_COUCH = -250.0
#: Bronchial wall (soft tissue, slightly less dense than muscle).
HU_AIRWAY_WALL = 0.0
#: Solid nodule attenuation (soft tissue).
HU_SOLID_NODULE_RANGE = (0.0, 60.0)
#: Ground-glass opacity: partially filled alveoli, vessels remain visible through it.
HU_GROUND_GLASS_RANGE = (-700.0, -600.0)
#: Lung voxels above this are treated as vessel (or other solid tissue) for nodule placement.
HU_VESSEL_THRESHOLD = -400.0
#: Vessel voxels above this are cores of vessels of at least ~1 mm radius (juxtavascular anchors).
HU_LARGE_VESSEL_THRESHOLD = -100.0

# --------------------------------------------------------------------------- nodule statistics
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
#: Rough LIDC/LUNA16 mix: most nodules are solid, a quarter sub-solid.
NODULE_TYPE_PROBABILITIES = (0.75, 0.10, 0.15)
LOCATIONS = ("isolated", "juxtavascular", "juxtapleural")
#: Rough mix of nodule locations in screening CT.
LOCATION_PROBABILITIES = (0.45, 0.30, 0.25)
#: Deciles (0 %, 10 %, ..., 100 %) of the 1186 LUNA16 annotation diameters (mm), end points
#: widened to the 3-30 mm screening range; sampled by log-linear interpolation of the inverse CDF.
LUNA16_DIAMETER_DECILES_MM = (3.0, 4.4, 4.9, 5.31, 5.9, 6.43, 7.3, 8.72, 11.07, 15.48, 30.0)
#: Part-solid nodules: solid core diameter as a fraction of the whole nodule.
PART_SOLID_CORE_FRACTION_RANGE = (0.3, 0.6)
#: Surface lobulation amplitude (relative radius) of solid vs sub-solid nodules.
SOLID_LOBULATION_RANGE = (0.0, 0.15)
SUBSOLID_LOBULATION_RANGE = (0.0, 0.08)
#: Relative half-range of the ellipsoid semi-axes (nodules are not perfect spheres).
NODULE_ELONGATION = 0.15
#: Mean of max(u . d, 0)^4 over unit vectors u (u . d is uniform in [-1, 1]): 1/2 * 1/5.
LOBE_MEAN_FACTOR = 0.1
#: Ground-glass margins are hazy: extra edge width (mm) over the sharp partial-volume ramp.
GROUND_GLASS_HAZE_MM = 1.5
#: Isolated nodules keep this distance (mm) from the pleura beyond their radius.
ISOLATED_PLEURA_CLEARANCE_MM = 5.0
#: ...and at most this fraction of vessel voxels within 1.5 mm of their surface.
ISOLATED_MAX_VESSEL_FRACTION = 0.01
#: Juxtavascular nodules stay this far (mm) from the pleura beyond their radius.
JUXTAVASCULAR_PLEURA_CLEARANCE_MM = 3.0
#: Juxtapleural nodules keep at least this fraction of their ball inside the lung (pleura-based, not buried).
JUXTAPLEURAL_MIN_LUNG_FRACTION = 0.6
#: Minimum surface-to-surface gap between two planted nodules (mm).
NODULE_SEPARATION_MM = 5.0
#: Placement candidates tried per nodule before it is dropped.
PLACEMENT_CANDIDATES = 96

# --------------------------------------------------------------------------- acquisition
#: In-plane PSF (Gaussian sigma, mm) of soft-tissue to standard reconstruction kernels.
PSF_SIGMA_RANGE_MM = (0.5, 1.0)
#: Clinical slice thickness range (mm); the slice profile is a Gaussian with FWHM = thickness.
SLICE_THICKNESS_RANGE_MM = (0.6, 3.0)
#: Image noise (std, HU) from low-dose screening to standard dose.
NOISE_STD_RANGE_HU = (10.0, 40.0)
#: Correlation (Gaussian sigma, voxels) of reconstructed CT noise (kernel-shaped, not white).
NOISE_CORRELATION_SIGMA_VOX = (0.4, 0.6, 0.6)
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

# --------------------------------------------------------------------------- vessel trees
#: Radius (mm) of the lobar pulmonary artery / vein where the tree leaves the hilum.
ARTERY_ROOT_RADIUS_RANGE_MM = (5.0, 6.5)
VEIN_ROOT_RADIUS_RANGE_MM = (4.5, 6.0)
#: Territory sample points per tree and per leaf: radius follows Murray's law r^3 ~ territory,
#: so leaves have r0 * (leaf / points)^(1/3), i.e. ~0.7 mm.
TREE_POINTS = 1200
TREE_LEAF_POINTS = 2
#: A branch runs this fraction of the way from its start to the centroid of its territory.
BRANCH_FRACTION_RANGE = (0.35, 0.6)
#: Bronchi accompany arteries down to this radius (smaller airways are invisible at CT resolution).
AIRWAY_MIN_ARTERY_RADIUS_MM = 1.5
#: Outer radius (mm) of the trachea and of the right/left main bronchus.
TRACHEA_RADIUS_MM = 10.0
MAIN_BRONCHUS_RADIUS_MM = (6.5, 6.0)
#: Bronchial wall thickness relative to the outer radius, and its minimum (mm).
AIRWAY_WALL_FRACTION = 0.2
AIRWAY_MIN_WALL_MM = 0.6

#: Tubes are rendered at least this wide (in voxels; thinner ones with proportionally less contrast).
MIN_TUBE_RADIUS_VOX = 0.3
#: Work-array size of the vectorised tube renderer (memory vs. Python overhead).
TUBE_RENDER_CHUNK_ELEMENTS = 1_000_000

DEFAULT_SHAPE = (96, 192, 192)
DEFAULT_SPACING = (1.25, 1.6, 1.6)


# =========================================================================== public types
@dataclass(frozen=True)
class PlantedNodule:
    """A nodule planted in a volume (ground truth)."""

    center_kji: tuple[float, float, float]  # voxel index in the generated volume
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    nodule_type: str  # "solid" | "part-solid" | "ground-glass"
    location: str  # "isolated" | "juxtavascular" | "juxtapleural"


@dataclass(frozen=True)
class NoduleSpec:
    """What to plant: size, type and location class (the position is chosen at random)."""

    diameter_mm: float
    nodule_type: str = "solid"
    location: str = "isolated"


@dataclass(frozen=True, eq=False)
class SyntheticCT:
    """A synthetic chest CT volume with its ground truth."""

    hu: np.ndarray  # float32 (k, j, i)
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    nodules: tuple[PlantedNodule, ...]
    lung_mask: np.ndarray  # bool, same shape
    slice_thickness_mm: float


@dataclass(frozen=True)
class DatasetCase:
    """One case written by :func:`make_dataset`."""

    seriesuid: str
    series_dir: Path
    nodules: tuple[PlantedNodule, ...]


# =========================================================================== small helpers
def _ramp(signed_distance: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is ``signed_distance`` mm outside an edge."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0).astype(np.float32, copy=False)


def _ellipse_sdf(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """First-order signed distance (mm, negative inside) to the ellipse with semi-axes ``ax``, ``ay``."""
    u = (x - cx) / ax
    v = (y - cy) / ay
    rho = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    return (rho - 1.0) * rho / np.maximum(grad, 1e-6)


def _paint(hu: np.ndarray, fraction: np.ndarray, value: float | np.ndarray) -> None:
    """Blend ``value`` into ``hu`` (in place) with the given partial-volume fraction."""
    hu += fraction * (value - hu)


def _centred_axes(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Broadcastable z, y, x coordinates (mm) relative to the volume centre."""
    axes = []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        view = [1, 1, 1]
        view[axis] = n
        axes.append(((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).reshape(view))
    return tuple(axes)


def _mm_to_index(points_zyx: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray) -> np.ndarray:
    """Convert centred (z, y, x) mm to fractional voxel indices (k, j, i)."""
    return points_zyx / spacing + (np.asarray(shape) - 1) / 2.0


def _random_unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` isotropically distributed unit vectors, shape (n, 3)."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ball_offsets(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Integer (k, j, i) offsets of the voxels whose centres lie within ``radius_mm`` of the origin."""
    half = np.floor(radius_mm / spacing).astype(int)
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    inside = (((offsets * spacing) ** 2).sum(axis=1)) <= radius_mm**2
    return offsets[inside]


def _ball_values(volume: np.ndarray, center: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, bool]:
    """Values of ``volume`` in a ball around voxel ``center``; also whether the ball is fully inside."""
    idx = offsets + center
    inside = np.all((idx >= 0) & (idx < volume.shape), axis=1)
    idx = idx[inside]
    return volume[idx[:, 0], idx[:, 1], idx[:, 2]], bool(inside.all())


# =========================================================================== tube rendering
def _render_tubes(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    start_zyx: np.ndarray,
    end_zyx: np.ndarray,
    radius: np.ndarray,
) -> np.ndarray:
    """Partial-volume fraction of a union of capsules (cylinders with round caps).

    Tubes thinner than a voxel are widened to ``MIN_TUBE_RADIUS_VOX`` with their contrast reduced
    by the area ratio, so that thin vessels keep the right integrated attenuation instead of
    looking too bright and too thick. Rendering is vectorised over short segment pieces grouped
    by the size of their bounding boxes.
    """
    s = np.asarray(spacing, dtype=np.float64)
    out = np.zeros(shape, dtype=np.float32)
    if len(radius) == 0:
        return out
    width = float(s.mean())  # edge ramp width: one voxel
    r_eff = np.maximum(radius, MIN_TUBE_RADIUS_VOX * width)
    gain = (radius / r_eff) ** 2
    # Split into pieces no longer than ~2 radii (at least 2 voxels) so that boxes stay tight.
    a = _mm_to_index(start_zyx, shape, s) * s
    b = _mm_to_index(end_zyx, shape, s) * s
    n_pieces = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1) / np.maximum(2.0 * r_eff, 2.0 * s.max())))
    n_pieces = n_pieces.astype(int)
    seg = np.repeat(np.arange(len(radius)), n_pieces)
    first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    t0 = ((np.arange(seg.size) - first) / n_pieces[seg])[:, None]
    pa = a[seg] + t0 * (b[seg] - a[seg])
    pd = (b[seg] - a[seg]) / n_pieces[seg][:, None]
    pr, pg = r_eff[seg].astype(np.float32), gain[seg].astype(np.float32)
    reach = pr + 0.5 * width  # the fraction is zero beyond this distance from the axis
    inv_len2 = 1.0 / np.maximum((pd * pd).sum(axis=1), 1e-12)
    centre = np.rint((pa + pd / 2.0) / s).astype(int)
    half = np.ceil((np.abs(pd) / 2.0 + reach[:, None]) / s + 0.5).astype(int)
    flat_out = out.ravel()
    groups: dict[tuple[int, int, int], list[int]] = {}
    for index, h in enumerate(map(tuple, half)):
        groups.setdefault(h, []).append(index)
    for h, members in groups.items():
        box = np.stack([g.ravel() for g in np.meshgrid(*(np.arange(-n, n + 1) for n in h), indexing="ij")])
        chunk = max(1, TUBE_RENDER_CHUNK_ELEMENTS // box.shape[1])
        members_arr = np.asarray(members)
        for start in range(0, len(members_arr), chunk):
            m = members_arr[start : start + chunk]
            idx = [centre[m, axis][:, None] + box[axis][None, :] for axis in range(3)]
            valid = np.ones(idx[0].shape, dtype=bool)
            for axis in range(3):
                valid &= (idx[axis] >= 0) & (idx[axis] < shape[axis])
            rel = [(idx[axis] * s[axis] - pa[m, axis][:, None]).astype(np.float32) for axis in range(3)]
            d = [pd[m, axis][:, None].astype(np.float32) for axis in range(3)]
            t = (rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) * inv_len2[m][:, None].astype(np.float32)
            np.clip(t, 0.0, 1.0, out=t)
            dist2 = sum((rel[axis] - t * d[axis]) ** 2 for axis in range(3))
            frac = np.sqrt(dist2)
            frac -= pr[m][:, None]
            frac *= -1.0 / width
            frac += 0.5
            np.clip(frac, 0.0, 1.0, out=frac)
            frac *= pg[m][:, None]
            keep = valid & (frac > 0)
            lin = np.ravel_multi_index((idx[0][keep], idx[1][keep], idx[2][keep]), shape)
            np.maximum.at(flat_out, lin, frac[keep])
    return out


# =========================================================================== vessel trees
def _grow_tree(
    root_zyx: np.ndarray, territory: np.ndarray, root_radius: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow a space-filling vessel tree from ``root_zyx`` into the ``territory`` sample points.

    Each branch heads towards the centroid of its territory, stops part of the way and splits
    the territory in two along its principal axis (a partition-based constructive tree). The
    radius follows Murray's law with flow proportional to territory size, so radii taper from
    ``root_radius`` at the hilum to below 1 mm at the leaves. Returns segment starts, ends, radii.
    """
    starts, ends, radii = [], [], []
    n_total = len(territory)
    stack = [(root_zyx, territory)]
    while stack:
        start, points = stack.pop()
        radius = root_radius * (len(points) / n_total) ** (1.0 / 3.0)
        centroid = points.mean(axis=0)
        if len(points) <= TREE_LEAF_POINTS:
            starts.append(start)
            ends.append(centroid)
            radii.append(radius)
            continue
        branch_point = start + rng.uniform(*BRANCH_FRACTION_RANGE) * (centroid - start)
        starts.append(start)
        ends.append(branch_point)
        radii.append(radius)
        centred = points - centroid
        _, vectors = np.linalg.eigh(centred.T @ centred)
        side = centred @ vectors[:, -1] < 0.0
        stack.append((branch_point, points[side]))
        stack.append((branch_point, points[~side]))
    return np.array(starts), np.array(ends), np.array(radii)


def _airways_along(
    starts: np.ndarray, ends: np.ndarray, radii: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bronchi running beside the larger artery segments (bronchovascular bundles).

    Returns starts, ends and outer radii of the airway segments.
    """
    keep = radii >= AIRWAY_MIN_ARTERY_RADIUS_MM
    a, b, r = starts[keep], ends[keep], radii[keep]
    if len(r) == 0:
        return a, b, r
    direction = b - a
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
    side = np.cross(direction, _random_unit_vectors(rng, 1))
    side /= np.maximum(np.linalg.norm(side, axis=1, keepdims=True), 1e-6)
    outer = 0.9 * r
    offset = side * (r + outer + 0.5)[:, None]
    return a + offset, b + offset, outer


# =========================================================================== nodules
@dataclass(frozen=True)
class _NoduleShape:
    """Random geometry of one nodule: ellipsoid orientation/elongation and surface lobulation."""

    rotation: np.ndarray  # (3, 3) orthonormal
    axis_scale: np.ndarray  # (3,), geometric mean 1
    lobe_directions: np.ndarray  # (m, 3) unit vectors
    lobe_amplitudes: np.ndarray  # (m,)


def _random_nodule_shape(rng: np.random.Generator, lobulation_range: tuple[float, float]) -> _NoduleShape:
    """Draw a slightly elongated, slightly lobulated nodule shape."""
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    scale = 1.0 + rng.uniform(-NODULE_ELONGATION, NODULE_ELONGATION, 3)
    scale /= np.prod(scale) ** (1.0 / 3.0)
    n_lobes = int(rng.integers(3, 7))
    return _NoduleShape(
        rotation=rotation,
        axis_scale=scale,
        lobe_directions=_random_unit_vectors(rng, n_lobes),
        lobe_amplitudes=rng.uniform(*lobulation_range, n_lobes),
    )


def _nodule_fraction(
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    center_kji: np.ndarray,
    radius_mm: float,
    geometry: _NoduleShape,
    haze_mm: float,
    pad_vox: np.ndarray,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Partial-volume fraction of a lobulated ellipsoid in a local box (box slices, fraction).

    Lobes are bumps ``amplitude * max(u . d, 0)^4`` on the surface; their mean over the sphere is
    subtracted so that the volume-equivalent diameter stays the nominal one.
    """
    r_eff = max(radius_mm, 0.5 * float(spacing.mean()))
    gain = (radius_mm / r_eff) ** 3
    extent = r_eff * (1.0 + NODULE_ELONGATION) * (1.0 + geometry.lobe_amplitudes.sum()) + haze_mm
    half = np.ceil(extent / spacing).astype(int) + 1 + pad_vox
    lo = np.maximum(np.floor(center_kji).astype(int) - half, 0)
    hi = np.minimum(np.floor(center_kji).astype(int) + half + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    rel = np.stack([(g - c) * s for g, c, s in zip(grids, center_kji, spacing)], axis=-1)
    local = (rel @ geometry.rotation) / geometry.axis_scale
    rho = np.linalg.norm(local, axis=-1)
    unit = local / np.maximum(rho, 1e-6)[..., None]
    lobes = np.clip(unit @ geometry.lobe_directions.T, 0.0, None) ** 4 @ geometry.lobe_amplitudes
    surface = r_eff * (1.0 + lobes - LOBE_MEAN_FACTOR * geometry.lobe_amplitudes.sum())
    radial = rel / np.maximum(np.linalg.norm(rel, axis=-1), 1e-6)[..., None]
    width = np.clip(np.sqrt(((radial * spacing) ** 2).sum(axis=-1)), spacing.min(), spacing.max())
    return box, gain * _ramp(rho - surface, width + haze_mm)


def _paint_nodule(
    hu: np.ndarray,
    lung_fraction: np.ndarray,
    spacing: np.ndarray,
    center_kji: np.ndarray,
    spec: NoduleSpec,
    rng: np.random.Generator,
    blur_sigma_vox: np.ndarray | None,
    noise_std_hu: float,
) -> None:
    """Paint one nodule into ``hu`` (in place), confined to the lung.

    The nodule only displaces lung parenchyma (a juxtapleural nodule flattens against the
    pleura), and a brighter structure already there (a vessel through a ground-glass nodule)
    is kept. When ``blur_sigma_vox`` is given (insertion into an already reconstructed image),
    the nodule is blurred with that PSF and noise of ``noise_std_hu`` is added in proportion to
    its fraction, so that it matches the surrounding image.
    """
    radius = spec.diameter_mm / 2.0
    pad = np.zeros(3, dtype=int) if blur_sigma_vox is None else np.ceil(3.0 * blur_sigma_vox).astype(int)
    solid_hu = rng.uniform(*HU_SOLID_NODULE_RANGE)
    layers: list[tuple[float, float, float]] = []  # (radius mm, HU, haze mm)
    if spec.nodule_type == "solid":
        layers.append((radius, solid_hu, 0.0))
        lobulation = SOLID_LOBULATION_RANGE
    elif spec.nodule_type == "ground-glass":
        layers.append((radius, rng.uniform(*HU_GROUND_GLASS_RANGE), GROUND_GLASS_HAZE_MM))
        lobulation = SUBSOLID_LOBULATION_RANGE
    elif spec.nodule_type == "part-solid":
        layers.append((radius, rng.uniform(*HU_GROUND_GLASS_RANGE), GROUND_GLASS_HAZE_MM))
        layers.append((radius * rng.uniform(*PART_SOLID_CORE_FRACTION_RANGE), solid_hu, 0.0))
        lobulation = SUBSOLID_LOBULATION_RANGE
    else:
        raise ValueError(f"unknown nodule type {spec.nodule_type!r}")
    geometry = _random_nodule_shape(rng, lobulation)
    for layer_radius, value, haze in layers:
        box, frac = _nodule_fraction(hu.shape, spacing, center_kji, layer_radius, geometry, haze, pad)
        frac *= lung_fraction[box]
        if blur_sigma_vox is not None:
            frac = ndimage.gaussian_filter(frac, blur_sigma_vox, mode="constant")
        region = hu[box]
        painted = region + frac * (value - region)
        if noise_std_hu > 0:
            painted += frac * rng.normal(0.0, noise_std_hu, frac.shape).astype(np.float32)
        hu[box] = np.maximum(region, painted)


@dataclass(frozen=True)
class _Placement:
    """What nodule placement looks up: lung mask, vessel voxels and flat indices of anchor voxels."""

    lung_mask: np.ndarray
    vessel: np.ndarray  # lung voxels above HU_VESSEL_THRESHOLD in the nodule-free image
    lung_voxels: np.ndarray  # flat indices
    large_vessel_voxels: np.ndarray  # flat indices of vessel cores above HU_LARGE_VESSEL_THRESHOLD
    boundary_voxels: np.ndarray  # flat indices of lung voxels next to non-lung (pleura)
    spacing: np.ndarray


def _placement(reference_hu: np.ndarray, lung_mask: np.ndarray, spacing: np.ndarray) -> _Placement:
    """Precompute the look-ups used to place nodules in ``reference_hu``."""
    return _Placement(
        lung_mask=lung_mask,
        vessel=lung_mask & (reference_hu > HU_VESSEL_THRESHOLD),
        lung_voxels=np.flatnonzero(lung_mask),
        large_vessel_voxels=np.flatnonzero(lung_mask & (reference_hu > HU_LARGE_VESSEL_THRESHOLD)),
        boundary_voxels=np.flatnonzero(lung_mask & ~ndimage.binary_erosion(lung_mask)),
        spacing=spacing,
    )


def _choose_center(
    spec: NoduleSpec,
    place: _Placement,
    taken: Sequence[tuple[np.ndarray, float]],
    rng: np.random.Generator,
) -> np.ndarray | None:
    """Pick a nodule centre (fractional voxel index) matching ``spec.location``, or ``None``.

    Candidates are tested with local ball look-ups in the lung mask and the vessel mask:

    * isolated: the ball ``radius + ISOLATED_PLEURA_CLEARANCE_MM`` lies in the lung, and almost no
      vessel voxels lie within 1.5 mm of the surface (the least vascular candidate otherwise);
    * juxtavascular: centred ~one radius from a vessel core, touching it but not centred on it,
      away from the pleura;
    * juxtapleural: centred less than one radius from a pleural boundary voxel, mostly in the lung
      and touching non-lung.
    """
    radius = spec.diameter_mm / 2.0
    spacing = place.spacing
    shape = np.asarray(place.lung_mask.shape)
    margin = np.ceil(radius / spacing).astype(int) + 1
    touch_ball = _ball_offsets(radius + 0.5 * float(spacing.max()), spacing)
    no_offset = np.zeros(PLACEMENT_CANDIDATES)
    if spec.location == "isolated":
        anchors, distances = place.lung_voxels, no_offset
        clear_ball = _ball_offsets(radius + ISOLATED_PLEURA_CLEARANCE_MM, spacing)
        vessel_ball = _ball_offsets(radius + 1.5, spacing)
    elif spec.location == "juxtavascular":
        anchors, distances = place.large_vessel_voxels, radius * rng.uniform(0.8, 1.1, PLACEMENT_CANDIDATES)
        clear_ball = _ball_offsets(radius + JUXTAVASCULAR_PLEURA_CLEARANCE_MM, spacing)
        core_ball = _ball_offsets(0.5 * radius, spacing)
    elif spec.location == "juxtapleural":
        anchors, distances = place.boundary_voxels, radius * rng.uniform(0.3, 0.9, PLACEMENT_CANDIDATES)
        lung_ball = _ball_offsets(radius, spacing)
    else:
        raise ValueError(f"unknown nodule location {spec.location!r}")
    if len(anchors) == 0:
        return None
    picks = np.stack(np.unravel_index(anchors[rng.integers(0, len(anchors), PLACEMENT_CANDIDATES)], tuple(shape)), 1)
    directions = _random_unit_vectors(rng, PLACEMENT_CANDIDATES)
    jitter = rng.uniform(-0.5, 0.5, (PLACEMENT_CANDIDATES, 3))
    candidates = picks + jitter + directions * distances[:, None] / spacing
    best: tuple[float, np.ndarray] | None = None
    for candidate in candidates:
        voxel = np.rint(candidate).astype(int)
        if np.any(voxel < margin) or np.any(voxel >= shape - margin) or not place.lung_mask[tuple(voxel)]:
            continue
        if any(np.linalg.norm((candidate - c) * spacing) < radius + r + NODULE_SEPARATION_MM for c, r in taken):
            continue
        if spec.location == "juxtapleural":
            inside_lung = _ball_values(place.lung_mask, voxel, lung_ball)[0].mean()
            if (
                inside_lung >= JUXTAPLEURAL_MIN_LUNG_FRACTION
                and not _ball_values(place.lung_mask, voxel, touch_ball)[0].all()
            ):
                return candidate
            continue
        clear, fully_inside = _ball_values(place.lung_mask, voxel, clear_ball)
        if not (fully_inside and clear.all()):
            continue
        if spec.location == "juxtavascular":
            if (
                _ball_values(place.vessel, voxel, core_ball)[0].mean() < 0.2
                and _ball_values(place.vessel, voxel, touch_ball)[0].any()
            ):
                return candidate
            continue
        score = float(_ball_values(place.vessel, voxel, vessel_ball)[0].mean())
        if score <= ISOLATED_MAX_VESSEL_FRACTION:
            return candidate
        if best is None or score < best[0]:
            best = (score, candidate)
    return None if best is None else best[1]


def _plant(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    lung_fraction: np.ndarray,
    spacing: tuple[float, float, float],
    origin_lps: tuple[float, float, float],
    specs: Sequence[NoduleSpec],
    rng: np.random.Generator,
    blur_sigma_vox: np.ndarray | None,
    noise_std_hu: float,
) -> tuple[PlantedNodule, ...]:
    """Place and paint ``specs`` into ``hu`` in place; nodules that find no valid spot are skipped."""
    s = np.asarray(spacing, dtype=np.float64)
    place = _placement(hu, lung_mask, s)
    taken: list[tuple[np.ndarray, float]] = []
    planted: list[PlantedNodule] = []
    for spec in specs:
        center = _choose_center(spec, place, taken, rng)
        if center is None:
            continue
        _paint_nodule(hu, lung_fraction, s, center, spec, rng, blur_sigma_vox, noise_std_hu)
        taken.append((center, spec.diameter_mm / 2.0))
        k, j, i = (float(c) for c in center)
        planted.append(
            PlantedNodule(
                center_kji=(k, j, i),
                center_lps_mm=(
                    origin_lps[0] + i * spacing[2],
                    origin_lps[1] + j * spacing[1],
                    origin_lps[2] + k * spacing[0],
                ),
                diameter_mm=spec.diameter_mm,
                nodule_type=spec.nodule_type,
                location=spec.location,
            )
        )
    return tuple(planted)


def sample_nodule_specs(
    rng: np.random.Generator, n: int, diameter_range_mm: tuple[float, float] = (3.0, 30.0)
) -> tuple[NoduleSpec, ...]:
    """Draw ``n`` nodules with a LUNA16-like size distribution and a realistic type/location mix.

    Diameters follow the LUNA16 annotation deciles (log-linear inverse CDF) truncated to
    ``diameter_range_mm``; a range outside the table is sampled log-uniformly.
    """
    lo, hi = diameter_range_mm
    if not 0 < lo <= hi:
        raise ValueError(f"invalid diameter range {diameter_range_mm}")
    log_table = np.log(LUNA16_DIAMETER_DECILES_MM)
    probs = np.linspace(0.0, 1.0, len(log_table))
    p_lo, p_hi = np.interp(np.log([lo, hi]), log_table, probs)
    if p_hi > p_lo:
        diameters = np.exp(np.interp(rng.uniform(p_lo, p_hi, n), probs, log_table))
    else:
        diameters = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    types = rng.choice(len(NODULE_TYPES), n, p=NODULE_TYPE_PROBABILITIES)
    locations = rng.choice(len(LOCATIONS), n, p=LOCATION_PROBABILITIES)
    return tuple(
        NoduleSpec(float(d), NODULE_TYPES[t], LOCATIONS[loc]) for d, t, loc in zip(diameters, types, locations)
    )


# =========================================================================== the phantom
@dataclass(frozen=True)
class _Anatomy:
    """Random per-case anatomy (mm, relative to the volume centre; x to patient left, y posterior)."""

    body_axes: tuple[float, float]
    fat_mm: float
    muscle_mm: float
    rib_mm: float
    mediastinum_half_width: float
    heart_center: tuple[float, float, float]  # (z, y, x)
    heart_axes: tuple[float, float, float]
    spine_radius: float
    aorta_radius: float
    carina_z: float
    dome_top_z: tuple[float, float]  # right, left
    rib_phase_mm: float
    rib_pitch_mm: float
    rib_slope_mm: float
    lung_hu: float
    gravity_gradient_hu: float

    @property
    def cavity_axes(self) -> tuple[float, float]:
        """Semi-axes of the pleural cavity (inside ribs)."""
        wall = self.fat_mm + self.muscle_mm + self.rib_mm
        return self.body_axes[0] - wall, self.body_axes[1] - wall

    @property
    def spine_y(self) -> float:
        """AP position of the vertebral body centre."""
        return self.cavity_axes[1] - self.spine_radius * 0.6


def _random_anatomy(rng: np.random.Generator, fov_yx: tuple[float, float]) -> _Anatomy:
    """Draw a plausible adult chest that fits the field of view."""
    ax = min(rng.uniform(135.0, 160.0), 0.47 * fov_yx[1])
    ay = min(ax * rng.uniform(0.66, 0.8), 0.42 * fov_yx[0])
    scale = ax / 150.0
    cax = ax - scale * 30.0
    cay = ay - scale * 30.0
    return _Anatomy(
        body_axes=(ax, ay),
        fat_mm=scale * rng.uniform(8.0, 20.0),
        muscle_mm=scale * rng.uniform(8.0, 12.0),
        rib_mm=scale * rng.uniform(7.0, 10.0),
        mediastinum_half_width=cax * rng.uniform(0.14, 0.18),
        heart_center=(rng.uniform(-55.0, -35.0), -0.4 * cay, 0.15 * cax),
        heart_axes=(55.0, 0.5 * cay, 0.45 * cax),
        spine_radius=scale * rng.uniform(15.0, 19.0),
        aorta_radius=scale * rng.uniform(11.0, 14.0),
        carina_z=rng.uniform(10.0, 30.0),
        dome_top_z=(rng.uniform(-60.0, -40.0), rng.uniform(-75.0, -55.0)),
        rib_phase_mm=rng.uniform(0.0, 30.0),
        rib_pitch_mm=rng.uniform(26.0, 32.0),
        rib_slope_mm=rng.uniform(40.0, 55.0),
        lung_hu=rng.uniform(*HU_LUNG_RANGE),
        gravity_gradient_hu=rng.uniform(*HU_LUNG_GRAVITY_GRADIENT_RANGE),
    )


def _low_frequency_texture(shape: tuple[int, int, int], rng: np.random.Generator, factor: int = 4) -> np.ndarray:
    """Smooth unit-std random field (parenchymal texture), made on a coarse grid and upsampled."""
    coarse_shape = tuple(max(2, n // factor) for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 0.8)
    coarse /= max(float(coarse.std()), 1e-6)
    return ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse_shape)], order=1, grid_mode=True, mode="nearest")


def _render_anatomy(
    anatomy: _Anatomy,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free, unblurred phantom without nodules: (HU, lung fraction)."""
    z, y, x = _centred_axes(shape, spacing)
    w = float(np.mean(spacing[1:]))
    ax, ay = anatomy.body_axes
    cax, cay = anatomy.cavity_axes
    hu = np.full(shape, HU_AIR, dtype=np.float32)

    # Couch below the patient, then body: subcutaneous fat, muscle, ribs.
    couch = _ramp(np.abs(y - (ay + 12.0)) - 4.0, w) * _ramp(np.abs(x) - 0.9 * ax, w)
    _paint(hu, couch, HU_COUCH)
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, 0.0, ax, ay), w), HU_FAT)
    muscle_axes = (ax - anatomy.fat_mm, ay - anatomy.fat_mm)
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, 0.0, *muscle_axes), w), HU_SOFT_TISSUE)
    rib_outer = _ellipse_sdf(x, y, 0.0, 0.0, cax + anatomy.rib_mm, cay + anatomy.rib_mm)
    rib_inner = _ellipse_sdf(x, y, 0.0, 0.0, cax, cay)
    angle_from_back = np.arccos(np.clip(y / np.maximum(np.hypot(x, y), 1e-6), -1.0, 1.0))
    rib_phase = (z + anatomy.rib_slope_mm * angle_from_back - anatomy.rib_phase_mm) / anatomy.rib_pitch_mm
    rib_z_distance = np.abs(rib_phase - np.rint(rib_phase)) * anatomy.rib_pitch_mm
    rib_sdf = np.maximum(np.maximum(rib_outer, -rib_inner), rib_z_distance - 0.5 * anatomy.rib_mm)
    ribs = _ramp(rib_sdf, w) * (angle_from_back < 0.85 * np.pi)
    _paint(hu, ribs, HU_RIB)
    sternum = _ramp(_ellipse_sdf(x, y, 0.0, -cay - anatomy.rib_mm / 2.0, 15.0, anatomy.rib_mm / 2.0 + 2.0), w)
    _paint(hu, sternum, HU_STERNUM)

    # Pleural cavity filled with lung, then the structures that displace lung.
    cavity = _ramp(rib_inner, w)
    texture = HU_LUNG_TEXTURE_STD * _low_frequency_texture(shape, rng)
    lung_value = anatomy.lung_hu + anatomy.gravity_gradient_hu * (y / cay) + texture
    _paint(hu, cavity, lung_value)
    lung = np.broadcast_to(cavity, shape).copy()

    def displace(fraction: np.ndarray, value: float) -> None:
        _paint(hu, fraction, value)
        lung[...] *= 1.0 - fraction

    displace(_ramp(_ellipse_sdf(x, y, 0.0, 0.0, anatomy.mediastinum_half_width, 1.3 * cay), w), HU_SOFT_TISSUE)
    hz, hy, hx = anatomy.heart_center
    haz, hay, hax = anatomy.heart_axes
    heart_r = np.sqrt(((z - hz) / haz) ** 2 + ((y - hy) / hay) ** 2 + ((x - hx) / hax) ** 2)
    heart_scale = min(hay, hax)
    displace(_ramp((heart_r - 1.0) * heart_scale - 4.0, w), HU_FAT)  # epicardial fat
    _paint(hu, _ramp((heart_r - 1.0) * heart_scale, w), HU_SOFT_TISSUE)
    spine_y = anatomy.spine_y
    sr = anatomy.spine_radius
    aorta = _ellipse_sdf(
        x, y, 0.9 * sr + anatomy.aorta_radius, spine_y - sr, anatomy.aorta_radius, anatomy.aorta_radius
    )
    displace(_ramp(aorta, w), HU_SOFT_TISSUE)
    displace(_ramp(_ellipse_sdf(x, y, 0.0, spine_y, sr + 10.0, sr + 10.0), w), HU_SOFT_TISSUE)
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, spine_y, sr, sr), w), HU_CORTICAL_BONE)
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, spine_y, sr - 2.5, sr - 2.5), w), HU_CANCELLOUS_BONE)
    canal_y = spine_y + sr + 8.0
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, canal_y, 12.0, 12.0), w), HU_CORTICAL_BONE)
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, canal_y + 20.0, 5.0, 12.0), w), HU_CORTICAL_BONE)
    _paint(hu, _ramp(_ellipse_sdf(x, y, 0.0, canal_y, 8.0, 8.0), w), HU_CSF)

    # Diaphragm domes (paraboloids, the right one higher) with liver/spleen below.
    curvature = 1.0 / (2.0 * 110.0)
    right_dome = anatomy.dome_top_z[0] - curvature * ((x + 0.45 * cax) ** 2 + y**2)
    left_dome = anatomy.dome_top_z[1] - curvature * ((x - 0.45 * cax) ** 2 + y**2)
    dome = np.maximum(right_dome, left_dome)
    displace(_ramp(z - dome, float(spacing[0])) * cavity, HU_LIVER)
    return hu, lung


def _render_airways_and_vessels(
    hu: np.ndarray,
    lung: np.ndarray,
    anatomy: _Anatomy,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
) -> None:
    """Paint pulmonary vessel trees, bronchi, trachea and main bronchi into ``hu`` (in place)."""
    shape = hu.shape
    s = np.asarray(spacing)
    _, y, x = _centred_axes(shape, spacing)
    lung_mask = lung > 0.5
    cax, cay = anatomy.cavity_axes
    hilum_x = anatomy.mediastinum_half_width + 8.0
    hilum_z = anatomy.carina_z - 20.0
    trachea_y = anatomy.spine_y - anatomy.spine_radius - 22.0
    vessel_parts, airway_parts = [], []
    lung_points = np.argwhere(lung_mask)
    carina = np.array([anatomy.carina_z, trachea_y, 0.0])
    for side in (-1.0, 1.0):  # patient right (-x), left (+x)
        own = lung_points[(lung_points[:, 2] - (shape[2] - 1) / 2.0) * side > 0]
        if len(own) < TREE_POINTS:
            continue
        # The artery enters at the hilum beside the main bronchus; the vein a little lower and behind.
        for is_artery, (dz, dy), radius_range in (
            (True, (0.0, 0.0), ARTERY_ROOT_RADIUS_RANGE_MM),
            (False, (-10.0, 8.0), VEIN_ROOT_RADIUS_RANGE_MM),
        ):
            picks = own[rng.integers(0, len(own), TREE_POINTS)] + rng.uniform(-0.5, 0.5, (TREE_POINTS, 3))
            territory = (picks - (np.asarray(shape) - 1) / 2.0) * s
            root = np.array([hilum_z + dz, dy, side * hilum_x])
            tree = _grow_tree(root, territory, rng.uniform(*radius_range), rng)
            vessel_parts.append(tree)
            if is_artery:
                airway_parts.append(_airways_along(*tree, rng))
                main_bronchus_radius = MAIN_BRONCHUS_RADIUS_MM[0 if side < 0 else 1]
                airway_parts.append((carina[None], root[None], np.array([main_bronchus_radius])))
    top = np.array([[(shape[0] / 2.0) * s[0] + 20.0, trachea_y, 0.0]])
    airway_parts.append((carina[None], top, np.array([TRACHEA_RADIUS_MM])))

    cavity = _ramp(_ellipse_sdf(x, y, 0.0, 0.0, cax, cay), float(s[1:].mean()))
    if vessel_parts:
        a, b, r = (np.concatenate(parts) for parts in zip(*vessel_parts))
        _paint(hu, _render_tubes(shape, spacing, a, b, r) * cavity, HU_SOFT_TISSUE)
    a, b, outer = (np.concatenate(parts) for parts in zip(*airway_parts))
    wall = np.maximum(AIRWAY_WALL_FRACTION * outer, AIRWAY_MIN_WALL_MM)
    _paint(hu, _render_tubes(shape, spacing, a, b, outer) * cavity, HU_AIRWAY_WALL)
    _paint(hu, _render_tubes(shape, spacing, a, b, outer - wall) * cavity, HU_AIR)


def _acquire(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    psf_sigma_mm: float,
    slice_thickness_mm: float,
    noise_std_hu: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Simulate reconstruction: PSF + slice-profile blur, correlated noise, clipping at -1024 HU.

    The rendering already integrates over a voxel (box of one slice step, variance step^2/12), so
    the slice-profile Gaussian (FWHM = slice thickness) only adds the remaining variance.
    """
    step = spacing[0]
    sigma_z_mm = np.sqrt(max((slice_thickness_mm / FWHM_PER_SIGMA) ** 2 - step**2 / 12.0, 0.0))
    sigma = (sigma_z_mm / step, psf_sigma_mm / spacing[1], psf_sigma_mm / spacing[2])
    blurred = ndimage.gaussian_filter(hu, sigma, truncate=3.0, mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), NOISE_CORRELATION_SIGMA_VOX)
    noise *= noise_std_hu / max(float(noise.std()), 1e-6)
    blurred += noise
    return np.maximum(blurred, HU_MIN, out=blurred)


def make_chest_ct(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    origin_lps: tuple[float, float, float] | None = None,
    n_nodules: int | tuple[int, int] = (0, 4),
    nodule_diameters_mm: tuple[float, float] = (3.0, 30.0),
    nodules: Sequence[NoduleSpec] | None = None,
    slice_thickness_mm: float | None = None,
    psf_sigma_mm: float | None = None,
    noise_std_hu: float | None = None,
) -> SyntheticCT:
    """Generate one synthetic chest CT with planted nodules, deterministically from ``seed``.

    Args:
        seed: Seed of the numpy Generator driving every random choice.
        shape: Volume shape ``(k, j, i)``.
        spacing: ``(slice step, row spacing, column spacing)`` in mm.
        origin_lps: LPS position (mm) of voxel (0, 0, 0); by default the image plane is centred on
            the z axis and the first slice is at z = 0 (same as ``write_ct_series``).
        n_nodules: Number of nodules, or an inclusive ``(min, max)`` range to draw from.
        nodule_diameters_mm: Diameter range for the LUNA16-like size distribution.
        nodules: Explicit nodule specifications; overrides ``n_nodules``/``nodule_diameters_mm``.
        slice_thickness_mm: Reconstructed slice thickness; random in the clinical range
            (at least the slice step) when ``None``.
        psf_sigma_mm: In-plane PSF sigma; random in ``PSF_SIGMA_RANGE_MM`` when ``None``.
        noise_std_hu: Noise std; random in ``NOISE_STD_RANGE_HU`` when ``None``.

    Returns:
        The volume (float32 HU), geometry, lung mask and the nodules actually planted (a nodule
        that finds no valid position for its location class is dropped).
    """
    rng = np.random.default_rng(seed)
    _, nj, ni = shape
    if origin_lps is None:
        origin_lps = (-(ni * spacing[2]) / 2.0, -(nj * spacing[1]) / 2.0, 0.0)
    if nodules is None:
        count = n_nodules if isinstance(n_nodules, int) else int(rng.integers(n_nodules[0], n_nodules[1] + 1))
        nodules = sample_nodule_specs(rng, count, nodule_diameters_mm)
    if slice_thickness_mm is None:
        lo, hi = SLICE_THICKNESS_RANGE_MM
        slice_thickness_mm = float(rng.uniform(max(lo, spacing[0]), max(hi, spacing[0])))
    psf = float(rng.uniform(*PSF_SIGMA_RANGE_MM)) if psf_sigma_mm is None else psf_sigma_mm
    noise = float(rng.uniform(*NOISE_STD_RANGE_HU)) if noise_std_hu is None else noise_std_hu

    anatomy = _random_anatomy(rng, (nj * spacing[1], ni * spacing[2]))
    hu, lung = _render_anatomy(anatomy, shape, spacing, rng)
    _render_airways_and_vessels(hu, lung, anatomy, spacing, rng)
    lung_mask = lung > 0.5
    planted = _plant(hu, lung_mask, lung, spacing, origin_lps, nodules, rng, None, 0.0)
    image = _acquire(hu, spacing, psf, slice_thickness_mm, noise, rng)
    return SyntheticCT(
        hu=image,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin_lps=(float(origin_lps[0]), float(origin_lps[1]), float(origin_lps[2])),
        nodules=planted,
        lung_mask=lung_mask,
        slice_thickness_mm=float(slice_thickness_mm),
    )


# =========================================================================== real CT
def _estimate_noise_std(hu: np.ndarray, lung_mask: np.ndarray) -> float:
    """Robust noise estimate (HU) from differences of horizontally adjacent lung voxels."""
    stride = max(1, hu.shape[0] // 16)
    sub, mask = hu[::stride], lung_mask[::stride]
    both = mask[:, :, 1:] & mask[:, :, :-1]
    diff = (sub[:, :, 1:] - sub[:, :, :-1])[both]
    if diff.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def insert_nodules(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    lung_mask: np.ndarray,
    nodules_spec: Sequence[NoduleSpec],
    rng: np.random.Generator,
    *,
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0),
    psf_sigma_mm: float = 0.6,
    slice_thickness_mm: float | None = None,
    noise_std_hu: float | None = None,
) -> tuple[np.ndarray, tuple[PlantedNodule, ...]]:
    """Insert synthetic nodules into a real (reconstructed) CT inside its lungs.

    Positions are chosen at random per location class (isolated: far from pleura and vessels;
    juxtavascular: touching a vessel of >~1 mm radius; juxtapleural: touching the pleura). Each
    nodule is rendered with partial volume, blurred with the scanner's PSF/slice profile and given
    noise matching the image, then blended only into lung parenchyma.

    Args:
        hu: Reconstructed volume (k, j, i) in HU; not modified.
        spacing: ``(slice step, row spacing, column spacing)`` in mm.
        lung_mask: Boolean lung mask (e.g. from :func:`models.lungs.lung_mask`).
        nodules_spec: What to insert.
        rng: Random generator (positions, shapes, attenuation, noise).
        origin_lps: LPS position of voxel (0, 0, 0), for ``PlantedNodule.center_lps_mm``.
        psf_sigma_mm: In-plane PSF sigma of the scan.
        slice_thickness_mm: Slice thickness (FWHM of the slice profile); the slice step when ``None``.
        noise_std_hu: Image noise std; estimated from the lung when ``None``.

    Returns:
        The new float32 volume and the nodules inserted (nodules without a valid spot are skipped).
    """
    if hu.shape != lung_mask.shape:
        raise ValueError(f"hu {hu.shape} and lung_mask {lung_mask.shape} differ in shape")
    thickness = spacing[0] if slice_thickness_mm is None else slice_thickness_mm
    sigma = np.array([thickness / FWHM_PER_SIGMA / spacing[0], psf_sigma_mm / spacing[1], psf_sigma_mm / spacing[2]])
    noise = _estimate_noise_std(hu, lung_mask) if noise_std_hu is None else noise_std_hu
    out = hu.astype(np.float32, copy=True)
    lung_fraction = lung_mask.astype(np.float32)
    planted = _plant(out, lung_mask, lung_fraction, spacing, origin_lps, nodules_spec, rng, sigma, noise)
    return out, planted


# =========================================================================== datasets
LUNA16_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def write_luna16_annotations(cases: Iterable[tuple[str, SyntheticCT]], csv_path: Path) -> None:
    """Write the planted nodules of ``(seriesuid, case)`` pairs as a LUNA16 ``annotations.csv``.

    Coordinates are world (DICOM patient LPS) mm, as in LUNA16.
    """
    with Path(csv_path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LUNA16_HEADER)
        for seriesuid, case in cases:
            for nodule in case.nodules:
                x, y, z = nodule.center_lps_mm
                writer.writerow([seriesuid, f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", f"{nodule.diameter_mm:.4f}"])


def make_dataset(
    out_dir: Path,
    n_cases: int,
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    n_nodules: int | tuple[int, int] = (0, 4),
    nodule_diameters_mm: tuple[float, float] = (3.0, 30.0),
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> tuple[DatasetCase, ...]:
    """Write ``n_cases`` synthetic cases as DICOM series plus one LUNA16 ``annotations.csv``.

    Layout: ``out_dir/case_0000/slice_0000.dcm ...`` and ``out_dir/annotations.csv``. Case seeds
    and all UIDs derive from ``seed``, so a dataset is reproducible.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    case_seeds = np.random.SeedSequence(seed).generate_state(n_cases)
    written_cases: list[DatasetCase] = []

    def generate() -> Iterator[tuple[str, SyntheticCT]]:
        for index, case_seed in enumerate(case_seeds):
            ct = make_chest_ct(
                int(case_seed),
                shape=shape,
                spacing=spacing,
                n_nodules=n_nodules,
                nodule_diameters_mm=nodule_diameters_mm,
            )
            entropy = ["lungscreen-synthetic", str(seed), str(index)]
            series_dir = out_dir / f"case_{index:04d}"
            written = write_ct_series(
                ct.hu,
                ct.spacing,
                series_dir,
                origin_lps=ct.origin_lps,
                study_instance_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
                series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
                patient_id=f"SYNTH-{index:04d}",
                accession_number=f"SYNACC{index:04d}",
                slice_thickness=ct.slice_thickness_mm,
                transfer_syntax_uid=transfer_syntax_uid,
            )
            written_cases.append(DatasetCase(written.series_instance_uid, series_dir, ct.nodules))
            yield written.series_instance_uid, ct

    write_luna16_annotations(generate(), out_dir / "annotations.csv")
    return tuple(written_cases)
