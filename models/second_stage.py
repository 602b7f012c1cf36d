"""Second stage: a network trained on real LUNA16 CT looks again at each would-be finding.

The network is Andre Stochniol's DSB2017 "2x2x2 nodule identifier" (MIT; ported by
:mod:`training.astoc_port`, ONNX in ``models/astoc_dsb2017/``): a small 3D U-Net that maps 8
consecutive 2 mm slices to the nodule mask of the fifth. Here it runs only on the detector's
candidates that could be reported (so a study costs a few crops, not a whole-volume pass): for each,
one crop of 8 x 64 x 64 voxels at 2 mm on an LPS-aligned grid (the author's orientation: z inferior
to superior, rows anterior to posterior, columns right to left) centred on the candidate, sampled
trilinearly (the author resampled whole volumes with a cubic zoom), batched through ONNX Runtime.
The candidate's second-stage score is the largest logit on its slice within
``max(d / 2, MIN_RADIUS_MM)`` of its centre.

A veto: a candidate whose score is not above the card's ``min_logit`` is dropped, except masses
(``exempt_diameter_mm``; the network was trained on nodules up to 30 mm and does not see a 6 cm
tumour) and candidates the detector calls more likely a nodule than not (``exempt_probability``). The rule's numbers
live in the model card's ``second_stage`` section, with the licence and training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy import ndimage

from lungscreen.errors import ModelError

SLICES = 8  # network input depth; the output is the mask of slice index CENTRE_SLICE
CENTRE_SLICE = 4  # z-4 .. z+3
CROP = 64  # in-plane crop, voxels (128 mm at 2 mm)
SPACING_MM = 2.0
MIN_RADIUS_MM = 4.0
# Output slices looked at, in 2 mm steps from the candidate's: its own only. One crop per
# candidate (about 3 GMAC); a slice either side tripled the cost on the 2-core CPU.
Z_SHIFTS = (0,)
# The author's intensity scaling: (HU + 1000) / 1400 clipped to [0, 1], minus the training mean.
HU_MIN, HU_RANGE, MEAN = -1000.0, 1400.0, 0.028
INPUT_NAME = "crops"


@dataclass(frozen=True)
class VetoRule:
    """When the second stage may drop a candidate (the card's ``second_stage.rule``)."""

    min_logit: float  # kept when the score is above this
    exempt_diameter_mm: float  # masses at or above this are never vetoed
    exempt_probability: float  # nor candidates the detector calibrates at or above this

    def exempt(self, diameter_mm: float, probability: float) -> bool:
        return diameter_mm >= self.exempt_diameter_mm or probability >= self.exempt_probability

    def vetoes(self, logit: float, diameter_mm: float, probability: float) -> bool:
        return logit <= self.min_logit and not self.exempt(diameter_mm, probability)


def crops_lps(voxels: np.ndarray, affine: np.ndarray, centres_lps: np.ndarray) -> np.ndarray:
    """``(N * len(Z_SHIFTS), 1, 8, 64, 64)`` network input around each LPS centre (mm).

    Trilinear sampling of the HU volume ``[k, j, i]`` (``affine``: ``(k, j, i, 1)`` -> LPS) on a
    2 mm grid aligned with L, P and S; outside the volume the nearest edge value, as the
    author's ``scipy.ndimage.zoom(mode='nearest')``.
    """
    offsets = (np.arange(CROP) - CROP // 2) * SPACING_MM
    crops = []
    inverse = np.linalg.inv(affine[:3, :3])
    for centre in np.asarray(centres_lps, float).reshape(-1, 3):
        for shift in Z_SHIFTS:
            z = (np.arange(SLICES) - CENTRE_SLICE + shift) * SPACING_MM
            zz, yy, xx = np.meshgrid(z, offsets, offsets, indexing="ij")
            lps = np.stack([xx, yy, zz], axis=-1) + centre  # (8, 64, 64, 3): L, P, S
            kji = (lps - affine[:3, 3]) @ inverse.T
            hu = ndimage.map_coordinates(voxels, np.moveaxis(kji, -1, 0), order=1, mode="nearest")
            crops.append(np.clip((hu - HU_MIN) / HU_RANGE, 0.0, 1.0) - MEAN)
    return np.asarray(crops, np.float32).reshape(-1, 1, SLICES, CROP, CROP)


def _disc(radius_mm: float) -> np.ndarray:
    offsets = (np.arange(CROP) - CROP // 2) * SPACING_MM
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_mm**2


class SecondStage:
    """The ONNX session (created once, reused for every study) and the veto rule."""

    def __init__(self, onnx_path: Path, rule: VetoRule, intra_op_threads: int = 0, batch_size: int = 16) -> None:
        if not onnx_path.is_file():
            raise ModelError(f"second-stage model {onnx_path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.rule = rule
        self.batch_size = batch_size

    @classmethod
    def from_card_section(cls, card_path: Path, section: dict, intra_op_threads: int = 0) -> "SecondStage":
        rule = VetoRule(**section["rule"])
        return cls((card_path.parent / section["onnx_file"]).resolve(), rule, intra_op_threads)

    def scores(self, voxels: np.ndarray, affine: np.ndarray, centres_lps: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
        """Largest logit within ``max(d / 2, MIN_RADIUS_MM)`` of each centre (float64, one per centre)."""
        centres = np.asarray(centres_lps, float).reshape(-1, 3)
        if len(centres) == 0:
            return np.zeros(0)
        per = len(Z_SHIFTS)
        logits = []
        for start in range(0, len(centres), self.batch_size):
            batch = crops_lps(voxels, affine, centres[start : start + self.batch_size])
            try:
                (out,) = self.session.run(None, {INPUT_NAME: batch})
            except Exception as exc:  # ONNX Runtime raises its own exception types
                raise ModelError(f"second stage failed: {exc}") from exc
            logits.append(out[:, 0, 0])
        maps = np.concatenate(logits).reshape(len(centres), per, CROP, CROP)
        return np.array([
            float(m[:, _disc(max(d / 2, MIN_RADIUS_MM))].max()) for m, d in zip(maps, np.asarray(diameters_mm, float))
        ])  # fmt: skip
