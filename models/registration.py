"""Rigid alignment of a prior chest CT to the current one, on the lungs.

Patients lie and breathe differently from one year to the next; to tell a nodule that
stayed from one that is new, the prior's nodule centres are carried into the current
study's patient coordinates by a rigid transform (rotation + translation, LPS mm) found here:

1. both studies are reduced to an :class:`AlignmentImage`: HU block-averaged to about 4 mm,
   small enough to keep in the job store with the prior's findings (a few hundred kB);
2. the lungs (:func:`lungscreen.models.lungs.lung_mask`) give a first translation, centre
   of mass to centre of mass;
3. a coarse search along the table (z) about that start: two scans rarely cover the same
   range, and a shorter prior moves its lungs' centre of mass;
4. the six rigid parameters are fitted by Gauss-Newton (trust-region least squares with the
   analytic Jacobian, a soft-L1 loss) on the HU difference at points sampled in and around the
   current lungs (lung surface, vessels), the prior resampled by trilinear interpolation, first
   on images smoothed by 2 voxels (capture range), then by 1 voxel (precision). Points that
   fall outside the prior's scanned range contribute nothing.

Breathing deforms the lungs non-rigidly; a rigid fit of the whole lungs leaves a few mm of
residual at the bases, well inside the matching gate of :mod:`lungscreen.models.longitudinal`.
The residual is measured: :attr:`RigidAlignment.residual_mm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from lungscreen.models.lungs import lung_mask

ALIGNMENT_SPACING_MM = 4.0
_HU_RANGE = (-1000.0, 200.0)  # lungs to soft tissue; bone and contrast clipped so they do not dominate
_MAX_SAMPLES = 8_000
_HU_SCALE = 100.0  # residual unit; the soft-L1 loss turns linear beyond it (a changed nodule, contrast)
_SMOOTHING_VOXELS = (2.0, 1.0)  # coarse then fine: a wide capture range, then the precise fit
_Z_SEARCH_MM = np.arange(-32.0, 32.1, 4.0)  # the coarse search along the table, about the lungs' centres
_MAX_ITERATIONS = 30  # per level; Gauss-Newton converges in 5-15 from a start this close
_LOWER = np.r_[[-15.0] * 3, [-40.0] * 3]  # degrees, mm about the lungs' centres
_UPPER = -_LOWER
_SAMPLING_SEED = 20221101  # fixed: the same pair always gives the same alignment


@dataclass(frozen=True)
class AlignmentImage:
    """A study reduced for alignment: HU on a coarse grid, ``affine`` from ``(k, j, i, 1)`` to LPS mm."""

    hu: np.ndarray  # float32 [k, j, i], clipped to _HU_RANGE
    affine: np.ndarray  # 4 x 4

    def to_bytes(self) -> bytes:
        """Compact storage (int16 HU + affine) for the job store."""
        import io

        buffer = io.BytesIO()
        np.savez_compressed(buffer, hu=np.round(self.hu).astype(np.int16), affine=self.affine)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "AlignmentImage":
        import io

        with np.load(io.BytesIO(data)) as stored:
            return cls(stored["hu"].astype(np.float32), stored["affine"].astype(np.float64))


@dataclass(frozen=True)
class RigidTransform:
    """``x_current = rotation @ (x_prior - centre) + centre + translation`` in LPS mm."""

    rotation: np.ndarray  # 3 x 3
    translation: np.ndarray  # 3
    centre: np.ndarray  # 3, the prior lungs' centre of mass (rotations about it are well conditioned)

    @classmethod
    def identity(cls) -> "RigidTransform":
        return cls(np.eye(3), np.zeros(3), np.zeros(3))

    def apply(self, points_lps: np.ndarray) -> np.ndarray:
        """Prior LPS points ``(..., 3)`` into the current study's LPS mm."""
        points = np.asarray(points_lps, dtype=np.float64)
        return (points - self.centre) @ self.rotation.T + self.centre + self.translation

    def inverse_apply(self, points_lps: np.ndarray) -> np.ndarray:
        """Current LPS points ``(..., 3)`` into the prior study's LPS mm."""
        points = np.asarray(points_lps, dtype=np.float64)
        return (points - self.centre - self.translation) @ self.rotation + self.centre

    @property
    def rotation_deg(self) -> float:
        return float(np.degrees(np.linalg.norm(Rotation.from_matrix(self.rotation).as_rotvec())))


@dataclass(frozen=True)
class RigidAlignment:
    transform: RigidTransform
    method: str  # "intensity" (refined) or "centre-of-mass" (the lungs' centres only)
    residual_mm: float  # RMS distance of the current lung surface to the aligned prior's
    lungs_found: bool


def alignment_image(voxels: np.ndarray, affine: np.ndarray, spacing_mm: float = ALIGNMENT_SPACING_MM) -> AlignmentImage:
    """Block-average ``voxels`` ([k, j, i] HU) to about ``spacing_mm``; the affine follows."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    factors = np.maximum(1, np.round(spacing_mm / spacing)).astype(int)
    # Every `stride`-th voxel, averaged in blocks of `block`: a 6 x 6 in-plane block is read as
    # 2 x 2 voxels 3 apart, a ninth of the memory traffic of a full block mean (this runs on
    # every study, on the full-resolution volume) at nearly the same noise reduction.
    stride = np.maximum(1, factors // 2)
    block = factors // stride
    shape = np.array(voxels.shape) // (stride * block)
    if np.any(shape < 4):
        raise ValueError(f"volume {voxels.shape} too small to align at {spacing_mm} mm")
    end = shape * stride * block
    picked = np.ascontiguousarray(voxels[: end[0] : stride[0], : end[1] : stride[1], : end[2] : stride[2]])
    blocks = np.clip(picked, *_HU_RANGE).reshape(shape[0], block[0], shape[1], block[1], shape[2], block[2])
    hu = blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    coarse = affine.copy()
    coarse[:3, :3] = affine[:3, :3] * (stride * block)  # column c scales with its axis' step
    coarse[:3, 3] = affine[:3, :3] @ (stride * (block - 1) / 2.0) + affine[:3, 3]  # block centre
    return AlignmentImage(hu, coarse)


def _lungs(image: AlignmentImage) -> np.ndarray:
    return lung_mask(image.hu, fill_vessels=True)


def _centre_of_mass_lps(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    kji = np.array(ndimage.center_of_mass(mask))
    return affine[:3, :3] @ kji + affine[:3, 3]


def _surface_lps(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    surface = mask & ~ndimage.binary_erosion(mask)
    return np.argwhere(surface) @ affine[:3, :3].T + affine[:3, 3]


def _to_index(image: AlignmentImage, points_lps: np.ndarray) -> np.ndarray:
    return (points_lps - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T


def _inside(image: AlignmentImage, index: np.ndarray) -> np.ndarray:
    return np.all((index >= 0) & (index <= np.array(image.hu.shape) - 1), axis=1)


def _residual_mm(prior: AlignmentImage, prior_mask, current: AlignmentImage, current_mask, transform: RigidTransform) -> float:
    """RMS distance (mm) from the current lung surface to the aligned prior's, over the part of
    the current surface the prior scanned (a prior with a shorter range has no surface there)."""
    points = _surface_lps(current_mask, current.affine)
    points = points[_inside(prior, _to_index(prior, transform.inverse_apply(points)))]
    prior_surface = transform.apply(_surface_lps(prior_mask, prior.affine))
    if len(points) == 0 or len(prior_surface) == 0:
        return float("nan")
    distances, _ = cKDTree(prior_surface).query(points)
    return float(np.sqrt(np.mean(distances**2)))


def _transform(params: np.ndarray, centre: np.ndarray, base_translation: np.ndarray) -> RigidTransform:
    rotation = Rotation.from_rotvec(np.radians(params[:3])).as_matrix()
    return RigidTransform(rotation, base_translation + params[3:], centre)


class _IntensityFit:
    """Mean squared HU difference between the current study's sampled points and the prior,
    smoothed by ``sigma`` voxels, as least-squares residuals of the six rigid parameters
    (degrees of rotation vector, mm of translation) with their analytic Jacobian.

    Points the transform carries outside the prior's scanned range contribute nothing (a prior
    with a shorter range or a smaller field of view is common); residuals are in units of
    _HU_SCALE so that a robust loss can cap what a changed nodule or a contrast difference weighs.
    """

    def __init__(self, prior: AlignmentImage, fixed_values: np.ndarray, points_lps: np.ndarray,
                 centre: np.ndarray, base_translation: np.ndarray, sigma: float) -> None:
        self.prior, self.points, self.centre, self.base = prior, points_lps, centre, base_translation
        self.fixed = fixed_values
        self.moving = ndimage.gaussian_filter(prior.hu, sigma)
        self.gradient = np.gradient(self.moving)  # HU per index step, along k, j, i
        self.to_index = np.linalg.inv(prior.affine[:3, :3])

    def _sample(self, params: np.ndarray):
        transform = _transform(params, self.centre, self.base)
        offset = self.points - self.centre - transform.translation  # x_prior = R^T offset + centre
        index = (offset @ transform.rotation + self.centre - self.prior.affine[:3, 3]) @ self.to_index.T
        return transform, offset, index, _inside(self.prior, index)

    def residuals(self, params: np.ndarray) -> np.ndarray:
        _, _, index, inside = self._sample(params)
        values = ndimage.map_coordinates(self.moving, index.T, order=1, mode="nearest")
        return np.where(inside, values - self.fixed, 0.0) / _HU_SCALE

    def jacobian(self, params: np.ndarray) -> np.ndarray:
        transform, offset, index, inside = self._sample(params)
        gradient = np.stack([ndimage.map_coordinates(g, index.T, order=1, mode="nearest") for g in self.gradient], axis=1)
        gradient_lps = gradient @ self.to_index  # d value / d x_prior, per mm
        jac = np.empty((len(offset), 6))
        jac[:, 3:] = -gradient_lps @ transform.rotation.T  # d x_prior / d t = -R^T
        step = 1e-3  # degrees: d R^T / d omega by a central difference of the rotation alone
        for axis in range(3):
            delta = np.zeros(3)
            delta[axis] = step
            plus = Rotation.from_rotvec(np.radians(params[:3] + delta)).as_matrix()
            minus = Rotation.from_rotvec(np.radians(params[:3] - delta)).as_matrix()
            jac[:, axis] = np.einsum("nd,nd->n", gradient_lps, offset @ (plus - minus)) / (2 * step)
        return np.where(inside[:, None], jac, 0.0) / _HU_SCALE

    def cost(self, params: np.ndarray) -> float:
        """The robust loss per point the prior covers (what the search along z compares)."""
        _, _, index, inside = self._sample(params)
        if not inside.any():
            return float("inf")
        values = ndimage.map_coordinates(self.moving, index[inside].T, order=1, mode="nearest")
        r2 = ((values - self.fixed[inside]) / _HU_SCALE) ** 2
        return float(np.mean(2 * (np.sqrt(1 + r2) - 1)))  # soft-L1, as least_squares uses it


def _sample_points(current: AlignmentImage, current_mask: np.ndarray) -> np.ndarray:
    """Index points in and around the current lungs: the lung surface carries most of the signal."""
    band = ndimage.binary_dilation(current_mask, iterations=2)
    index = np.argwhere(band)
    if len(index) > _MAX_SAMPLES:
        rng = np.random.default_rng(_SAMPLING_SEED)
        index = index[np.sort(rng.choice(len(index), _MAX_SAMPLES, replace=False))]
    return index


def align(prior: AlignmentImage, current: AlignmentImage, *, refine: bool = True) -> RigidAlignment:
    """The rigid transform carrying the prior study's LPS mm into the current study's."""
    prior_mask, current_mask = _lungs(prior), _lungs(current)
    if not prior_mask.any() or not current_mask.any():
        # No lungs to align: the scanners' patient coordinates are the best estimate there is.
        return RigidAlignment(RigidTransform.identity(), "none", float("nan"), False)
    centre = _centre_of_mass_lps(prior_mask, prior.affine)
    translation = _centre_of_mass_lps(current_mask, current.affine) - centre
    params = np.zeros(6)
    method = "centre-of-mass"
    if refine:
        index = _sample_points(current, current_mask)
        points = index @ current.affine[:3, :3].T + current.affine[:3, 3]
        start = params
        for level, sigma in enumerate(_SMOOTHING_VOXELS):
            fixed = ndimage.gaussian_filter(current.hu, sigma)[tuple(index.T)]
            fit = _IntensityFit(prior, fixed, points, centre, translation, sigma)
            if level == 0:
                # The lungs' centres are off along z when the two scans cover different ranges
                # (a shorter prior, another breath): a coarse search along the table first.
                shifts = [np.r_[0.0, 0.0, 0.0, 0.0, 0.0, dz] for dz in _Z_SEARCH_MM]
                start = min(shifts, key=fit.cost)
            result = optimize.least_squares(
                fit.residuals, start, jac=fit.jacobian, method="trf", loss="soft_l1", f_scale=1.0,
                bounds=(_LOWER, _UPPER), x_scale=1.0, max_nfev=_MAX_ITERATIONS,
            )
            start = result.x
        if fit.cost(start) <= fit.cost(params):  # never worse than the lungs' centres alone
            params = start
            method = "intensity"
    transform = _transform(params, centre, translation)
    return RigidAlignment(transform, method, _residual_mm(prior, prior_mask, current, current_mask, transform), True)
