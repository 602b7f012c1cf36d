"""A small CenterNet-style 3D detector: one fully convolutional net, stride-4 output.

Input ``(N, 1, X, Y, Z)`` (windowed CT in [0, 1] at the card's spacing), any spatial size.
Output ``(N, 5, ceil(X/4), ceil(Y/4), ceil(Z/4))``, channel by channel:

* ``HEATMAP`` — probability (sigmoid) that a nodule centre lies in this output cell;
* ``LOG_DIAMETER`` — log of the nodule diameter in mm;
* ``OFFSET`` (3 channels) — centre position relative to the cell, in cells.

Output cell ``g`` is centred on input voxel ``OUTPUT_STRIDE * g`` (3x3x3 convolutions of stride 2
with padding 1 keep that alignment for any input size), so no upsampling is needed and the
network runs on whole volumes of any shape. Context comes from dilated residual blocks at
stride 4 (receptive field about 110 voxels) instead of a deeper encoder-decoder: cheaper on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_STRIDE = 4
OUTPUT_CHANNELS = 5
HEATMAP, LOG_DIAMETER = 0, 1
OFFSET = slice(2, 5)
# Width of the stride-2 stage and of the stride-4 stage: the smallest that learned the
# synthetic task well while keeping a 300-slice CT under a few seconds on 2 CPU cores.
STEM_CHANNELS = 16
BODY_CHANNELS = 48
DILATIONS = (1, 2, 3, 1)
# Heatmap bias at initialisation: sigmoid(-4.6) = 0.01, CenterNet's prior for rare centres,
# so the focal loss does not start with every cell a confident false positive.
HEATMAP_PRIOR_BIAS = -4.6


def _conv(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, dilation=dilation),
            nn.Conv3d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm3d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class NoduleNet(nn.Module):
    """Heatmap + diameter + offset head over a stride-4 dilated residual trunk."""

    def __init__(self, stem: int = STEM_CHANNELS, body: int = BODY_CHANNELS, dilations=DILATIONS) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            _conv(1, stem, stride=2),
            _conv(stem, stem),
            _conv(stem, body, stride=2),
            *[_ResidualBlock(body, d) for d in dilations],
        )
        self.head = nn.Sequential(_conv(body, body), nn.Conv3d(body, OUTPUT_CHANNELS, 1))
        with torch.no_grad():
            self.head[-1].bias.zero_()
            self.head[-1].bias[HEATMAP] = HEATMAP_PRIOR_BIAS
            self.head[-1].bias[LOG_DIAMETER] = 2.0  # exp(2) = 7.4 mm, a typical nodule

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmap as a logit (what the loss wants); the other channels as in :meth:`forward`."""
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.forward_raw(x)
        return torch.cat([torch.sigmoid(raw[:, HEATMAP : HEATMAP + 1]), raw[:, 1:]], dim=1)
