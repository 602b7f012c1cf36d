"""The model's input contract, shared by training, export (the card) and evaluation."""

from __future__ import annotations

# 2 mm isotropic: a 3 mm nodule is still 1.5 voxels across, and a 300-slice chest CT is
# about 180^3 voxels, which the network runs in ~1-2 s on 2 CPU cores.
SPACING_MM = 2.0
# Lung window wide enough for bone and contrast vessels, mapped to [0, 1].
HU_MIN, HU_MAX = -1000.0, 400.0

PREPROCESSING = {
    "orientation": "RAS",
    "spacing_mm": [SPACING_MM] * 3,
    "intensity_window": {"hu_min": HU_MIN, "hu_max": HU_MAX, "out_min": 0.0, "out_max": 1.0},
}
