"""Rigid alignment of a prior chest CT to the current one, on the lungs.

Patients lie and breathe differently from one year to the next; to tell a nodule that
stayed from one that is new, the prior's nodule centres are carried into the current
study's patient coordinates by a rigid transform (rotation + translation, LPS mm) found here:

1. both studies are reduced to an :class:`AlignmentImage`: HU block-averaged to about 4 mm,
   small enough to keep in the job store with the prior's findings (a few hundred kB);
2. the lungs (:func:`lungscreen.models.lungs.lung_mask`) give a first translation, centre
   of mass to centre of mass;
3. the six rigid parameters are refined by Powell's method on the mean squared HU difference
   over points sampled in and around the current lungs (lung surface, vessels), the prior
   resampled by trilinear interpolation.

Breathing deforms the lungs non-rigidly; a rigid fit of the whole lungs leaves a few mm of
residual at the bases, well inside the matching gate of :mod:`lungscreen.models.longitudinal`.
The residual is measured: :attr:`RigidAlignment.residual_mm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from lungscreen.models.lungs import lung_mask

ALIGNMENT_SPACING_MM = 4.0
_HU_RANGE = (-1000.0, 200.0)  # lungs to soft tissue; bone and contrast clipped so they do not dominate
_MAX_SAMPLES = 6_000
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


def _residual_mm(prior_mask, prior_affine, current_mask, current_affine, transform: RigidTransform) -> float:
    """RMS distance from the current lung surface to the aligned prior lung surface (mm)."""
    prior_surface = np.zeros_like(prior_mask)
    prior_surface[tuple(np.argwhere(prior_mask & ~ndimage.binary_erosion(prior_mask)).T)] = True
    spacing = np.linalg.norm(prior_affine[:3, :3], axis=0)
    distance = ndimage.distance_transform_edt(~prior_surface, sampling=spacing)
    points = _surface_lps(current_mask, current_affine)
    in_prior = transform.inverse_apply(points)
    index = (in_prior - prior_affine[:3, 3]) @ np.linalg.inv(prior_affine[:3, :3]).T
    values = ndimage.map_coordinates(distance, index.T, order=1, mode="nearest")
    return float(np.sqrt(np.mean(values**2)))


def _transform(params: np.ndarray, centre: np.ndarray, base_translation: np.ndarray) -> RigidTransform:
    rotation = Rotation.from_rotvec(np.radians(params[:3])).as_matrix()
    return RigidTransform(rotation, base_translation + params[3:], centre)


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
        # Points in and around the current lungs: the lung surface carries most of the signal.
        band = ndimage.binary_dilation(current_mask, iterations=2)
        index = np.argwhere(band)
        rng = np.random.default_rng(_SAMPLING_SEED)
        if len(index) > _MAX_SAMPLES:
            index = index[rng.choice(len(index), _MAX_SAMPLES, replace=False)]
        fixed = ndimage.gaussian_filter(current.hu, 1.0)[tuple(index.T)]
        points = index @ current.affine[:3, :3].T + current.affine[:3, 3]
        moving = ndimage.gaussian_filter(prior.hu, 1.0)
        to_prior_index = np.linalg.inv(prior.affine[:3, :3])

        def cost(p: np.ndarray) -> float:
            in_prior = _transform(p, centre, translation).inverse_apply(points)
            idx = (in_prior - prior.affine[:3, 3]) @ to_prior_index.T
            sampled = ndimage.map_coordinates(moving, idx.T, order=1, mode="constant", cval=_HU_RANGE[0])
            return float(np.mean((sampled - fixed) ** 2))

        # Scales: 1 unit = 1 degree or 1 mm; start small steps, the centre-of-mass start is close.
        result = optimize.minimize(
            cost, params, method="Powell",
            options={"xtol": 0.05, "ftol": 1e-4, "maxfev": 400},
            bounds=[(-15, 15)] * 3 + [(-40, 40)] * 3,
        )
        if result.fun <= cost(params):
            params = result.x
            method = "intensity"
    transform = _transform(params, centre, translation)
    return RigidAlignment(transform, method, _residual_mm(prior_mask, prior.affine, current_mask, current.affine, transform), True)
