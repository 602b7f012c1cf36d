"""A FROC curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lungscreen.training.metrics import CPM_FP_RATES

SIZE = (640, 480)
MARGIN = (70, 30, 30, 60)  # left, top, right, bottom (pixels)
FP_RANGE = (1 / 16, 16.0)  # log2 x axis around LUNA16's 1/8..8 points


def draw_froc(fps: np.ndarray, sens: np.ndarray, cpm_points: dict[float, float], title: str, path: Path) -> None:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    lx0, lx1 = math.log2(FP_RANGE[0]), math.log2(FP_RANGE[1])

    def xy(fp: float, s: float) -> tuple[float, float]:
        fx = (math.log2(min(max(fp, FP_RANGE[0]), FP_RANGE[1])) - lx0) / (lx1 - lx0)
        return left + fx * (right - left), bottom - s * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for rate in CPM_FP_RATES:
        x, _ = xy(rate, 0)
        draw.line([x, top, x, bottom], fill=(220, 220, 220))
        draw.text((x - 10, bottom + 5), f"{rate:g}", fill="black")
    for s in np.linspace(0, 1, 6):
        _, y = xy(1, s)
        draw.line([left, y, right, y], fill=(220, 220, 220))
        draw.text((left - 35, y - 6), f"{s:.1f}", fill="black")
    # Step curve: sensitivity holds until the next FROC point.
    current = 0.0
    points = [xy(FP_RANGE[0], current)]
    for fp, s in zip(fps, sens):
        if fp > FP_RANGE[1]:
            break
        points += [xy(fp, current), xy(fp, s)]
        current = s
    points.append(xy(FP_RANGE[1], current))
    draw.line(points, fill=(0, 70, 160), width=2)
    for rate, s in cpm_points.items():
        x, y = xy(rate, s)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(200, 0, 0), width=2)
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) / 2 - 60, SIZE[1] - 25), "false positives per scan", fill="black")
    draw.text((5, top - 20), "sensitivity", fill="black")
    image.save(path)
