"""Whether a CT volume shows lungs: the cheap pixel check that refuses a head or abdomen CT.

Header anatomy (BodyPartExamined, ProtocolName, StudyDescription) is often wrong or absent,
so before a series is analysed the pipeline looks at its voxels: the lungs of an adult hold
4 to 6 litres at inspiration, air-like tissue of about -850 HU enclosed by the body. A head
CT encloses only sinus and mastoid air; an abdomen CT bowel gas (about -1000 HU: pure air,
excluded by the -950 HU floor of lung parenchyma) and at most the lung bases.

The check runs on a coarse grid (4 pixels averaged over about 3 x 3 mm, which also averages
the noise of a low-dose scan away from the -950 HU floor; slices about 2.5 mm apart), with
:func:`models.lungs.lung_mask` on it, and counts only the interior of what it finds: a
fraction of a second for a chest CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungscreen.models.lungs import lung_mask

# Less lung-density tissue than this is no chest CT. Measured (tests/models/test_lung_presence.py):
# the real chest CTs of ../shared/data show 2.3 to 4.6 l (LIDC-IDRI-0001 3.1 l, its top 33 slices,
# 82 mm of upper chest, 0.6 l), LIDC-IDRI-0001's 24 slices below the lungs 1 ml, a synthetic head
# 0 ml, a synthetic abdomen holding 9 l of gas 56 ml.
MIN_LUNG_ML = 300.0
# Judged only when a body is in view: a test phantom of uniform lung density has no body,
# and no lungs "inside" it, yet is no head or abdomen.
MIN_BODY_ML = 500.0
PARENCHYMA_FLOOR_HU = -950.0  # emphysema's threshold; bowel gas and outside air lie below
BODY_HU = -400.0  # the lung threshold of models.lungs: above it soft tissue, bone, table
_GRID_MM = (2.5, 3.0, 3.0)  # the coarse grid's slice step and pixel size
_IN_PLANE = np.array([np.zeros((3, 3)), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3))], dtype=bool)


@dataclass(frozen=True)
class LungPresence:
    lung_ml: float  # lung-density tissue (-950 to -400 HU) enclosed by the body
    body_ml: float  # tissue denser than -400 HU

    @property
    def judged(self) -> bool:
        """Whether the volume shows a body, so that missing lungs mean anything."""
        return self.body_ml >= MIN_BODY_ML

    @property
    def present(self) -> bool:
        """Lungs in view, or no body to judge."""
        return not self.judged or self.lung_ml >= MIN_LUNG_ML

    def describe(self) -> str:
        """The finding in words, for the rejection of a series without lungs."""
        return (
            f"no lungs in the field of view: {self.lung_ml:.0f} ml of lung-density tissue (at least "
            f"{MIN_LUNG_ML:.0f} ml needed) in a body of {self.body_ml:.0f} ml (a head or abdomen CT?)"
        )


def lung_presence(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> LungPresence:
    """Measure the lungs of a CT volume ``[slice, row, column]`` in HU, axial slices, with
    ``spacing_mm`` = (slice step, row spacing, column spacing)."""
    slice_stride = max(1, round(_GRID_MM[0] / spacing_mm[0]))
    # Pick every other pixel, then average 2 x 2 of those: a 4-pixel footprint at a quarter
    # of the cost of averaging all 16 (a low-dose scan's noise is halved either way).
    pick = max(1, round(_GRID_MM[1] / (2 * min(spacing_mm[1:]))))
    coarse = hu[::slice_stride, ::pick, ::pick]
    rows, columns = (coarse.shape[1] // 2) * 2, (coarse.shape[2] // 2) * 2
    if rows == 0 or columns == 0:
        return LungPresence(lung_ml=0.0, body_ml=0.0)
    coarse = coarse[:, :rows, :columns].reshape(coarse.shape[0], rows // 2, 2, columns // 2, 2).mean(axis=(2, 4))
    voxel_ml = slice_stride * spacing_mm[0] * (2 * pick) ** 2 * spacing_mm[1] * spacing_mm[2] / 1000.0
    # The interior only (one coarse pixel in from the edge, in plane): where gas meets tissue,
    # averaged pixels take every value between, and a large gas-filled bowel has a large edge.
    lungs = ndimage.binary_erosion(lung_mask(coarse, fill_vessels=False), structure=_IN_PLANE)
    lung_ml = float(np.count_nonzero(lungs & (coarse >= PARENCHYMA_FLOOR_HU)) * voxel_ml)
    body_ml = float(np.count_nonzero(coarse > BODY_HU) * voxel_ml)
    return LungPresence(lung_ml=lung_ml, body_ml=body_ml)
