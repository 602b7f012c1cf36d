"""CenterNet losses: penalty-reduced focal loss on the heatmap, L1 on diameter and offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lungscreen.training.network import HEATMAP, LOG_DIAMETER, OFFSET

# CenterNet's focal-loss exponents (Law & Deng 2018; Zhou et al. 2019).
FOCAL_ALPHA = 2.0
FOCAL_BETA = 4.0
# Relative weights: log-diameter error of 0.1 (10 %) costs as much as 0.1 cell of offset.
DIAMETER_WEIGHT = 1.0
OFFSET_WEIGHT = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum over cells of the penalty-reduced focal loss, divided by the number of centres."""
    pos = (target >= 1.0).float()
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = torch.exp(log_p)
    pos_loss = -((1 - p) ** FOCAL_ALPHA) * log_p * pos
    neg_loss = -((1 - target) ** FOCAL_BETA) * (p**FOCAL_ALPHA) * log_not_p * (1 - pos) * weight
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def detection_loss(raw: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All loss terms of a batch; ``raw`` is :meth:`NoduleNet.forward_raw`'s output."""
    heat = focal_loss(raw[:, HEATMAP : HEATMAP + 1], batch["heatmap"], batch["heatmap_weight"])
    mask = batch["regression_mask"]
    n = mask.sum().clamp(min=1.0)
    diameter = (torch.abs(raw[:, LOG_DIAMETER : LOG_DIAMETER + 1] - batch["regression"][:, :1]) * mask).sum() / n
    offset = (torch.abs(raw[:, OFFSET] - batch["regression"][:, 1:]) * mask).sum() / n
    total = heat + DIAMETER_WEIGHT * diameter + OFFSET_WEIGHT * offset
    return {"loss": total, "heatmap": heat, "diameter": diameter, "offset": offset}
