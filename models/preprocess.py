"""Preprocessing as the model card asks: orientation, spacing and intensity window (MONAI).

Input is a volume in the LungScreen convention (array ``[k, j, i]``, affine to LPS mm);
output is the network input plus the affine that maps its voxel indices to LPS mm, so
detections can be mapped back to the source images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing

# MONAI's affines are in RAS world coordinates; DICOM patient coordinates are LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class PreprocessedImage:
    tensor: torch.Tensor  # (1, X, Y, Z) float32, in the model's orientation and spacing
    index_to_lps: np.ndarray  # 4x4: model voxel index -> LPS mm


def build_transform(preprocessing: dict) -> Compose:
    window = preprocessing["intensity_window"]
    return Compose(
        [
            Orientation(axcodes=preprocessing["orientation"], labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=preprocessing["spacing_mm"], mode="bilinear", padding_mode="border", dtype=np.float32),
            ScaleIntensityRange(
                a_min=window["hu_min"], a_max=window["hu_max"], b_min=window["out_min"], b_max=window["out_max"], clip=True
            ),
        ]
    )


def preprocess(voxels: np.ndarray, affine_lps: np.ndarray, transform: Compose) -> PreprocessedImage:
    """Apply ``transform`` (from :func:`build_transform`) to a ``[k, j, i]`` HU volume."""
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32))[None],
        affine=torch.from_numpy(LPS_TO_RAS @ affine_lps),
    )
    out = transform(image)
    index_to_lps = LPS_TO_RAS @ out.affine.numpy().astype(np.float64)
    return PreprocessedImage(tensor=out.as_tensor().float(), index_to_lps=index_to_lps)
