"""Decoding of a MONAI RetinaNet's packed head outputs (card ``decoding.kind = "retinanet"``).

The ONNX graph written by :mod:`models.monai_bundle` returns one map on the coarsest feature
grid (:func:`models.retinanet.pack_head_outputs`). This module unpacks it and then does what
MONAI's ``RetinaNetDetector`` does after the network (``monai/apps/detection/networks/
retinanet_detector.py``: ``generate_anchors``, ``_reshape_maps``, ``postprocess_detections``),
with MONAI's own ``AnchorGeneratorWithAnchorShape``, ``BoxCoder``, ``BoxSelector``,
``clip_boxes_to_image`` and ``batched_nms`` (none of them needs torchvision):

#. per level, sigmoid scores above ``score_thresh``, the ``topk_candidates_per_level`` best;
#. their anchors decoded with the box coder (``weights``), clipped to the image, empty ones dropped;
#. NMS over all levels at IoU ``nms_thresh``, at most ``detections_per_img`` boxes, best first.

Two deliberate differences, neither changing a kept box: only the selected anchors are decoded
(MONAI decodes all, then selects; decoding is row by row, so the result is the same), and the
image extent used for clipping is the padded one (the ONNX graph pads to a multiple of the
coarsest stride and the output does not carry the original size; MONAI clips to the original).

A box ``(x1, y1, z1, x2, y2, z2)`` is in model voxel indices (MONAI's ``StandardMode``). The
candidate's centre is the box centre. Its diameter is the mean of the box's three sides in mm:
the bundle was trained on LUNA16 boxes that are cubes with the nodule diameter as side
(the MONAI detection tutorial's data split), so each side estimates the same diameter, and the
mean is less noisy than the longest side, which would be biased upwards.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.data.box_utils import batched_nms, clip_boxes_to_image
from torch import Tensor

from models.decoding import ModelCandidate
from models.errors import ModelError
from models.retinanet import BOX_CODE_SIZE, SPATIAL_DIMS, packing_factors, unpack_head_outputs

NUM_CLASSES = 1  # nodule; the packed layout and the candidates assume a single class


def decode_retinanet(output: np.ndarray, spacing_mm: np.ndarray, decoding: dict) -> list[ModelCandidate]:
    """Packed head outputs ``(channels, X_c, Y_c, Z_c)`` of one image to scored candidates, best first."""
    if output.ndim != 4:
        raise ModelError(f"RetinaNet output must be (channels, X, Y, Z), got shape {output.shape}")
    strides = [tuple(int(v) for v in s) for s in decoding["feature_map_strides"]]
    num_anchors = len(decoding["base_anchor_shapes"])
    packed = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))[None]
    levels = unpack_head_outputs(packed, packing_factors(strides), num_anchors, NUM_CLASSES)
    image_size = [c * s for c, s in zip(output.shape[1:], strides[-1])]
    anchors = level_anchors(decoding, image_size, [list(cls.shape[2:]) for cls, _ in levels])

    selector = BoxSelector(
        apply_sigmoid=True,
        score_thresh=decoding["score_thresh"],
        topk_candidates_per_level=decoding["topk_candidates_per_level"],
        nms_thresh=decoding["nms_thresh"],
        detections_per_img=decoding["detections_per_img"],
    )
    coder = BoxCoder(weights=tuple(decoding["box_coder_weights"]))
    boxes, scores, labels = [], [], []
    for (cls_map, box_map), level_anchor in zip(levels, anchors):
        logits = reshape_map(cls_map[0], num_anchors)  # (HWD*A, C)
        regression = reshape_map(box_map[0], num_anchors)  # (HWD*A, 6)
        idx, level_scores, level_labels = selector.select_top_score_idx_per_level(logits)
        level_boxes = coder.decode_single(regression[idx].to(torch.float32), level_anchor[idx])
        level_boxes, keep = clip_boxes_to_image(level_boxes, image_size, remove_empty=True)
        boxes.append(level_boxes)
        scores.append(level_scores[keep])
        labels.append(level_labels[keep])
    all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)
    keep = batched_nms(
        all_boxes, all_scores, torch.cat(labels), selector.nms_thresh, max_proposals=selector.detections_per_img
    )
    return [_candidate(all_boxes[i], float(all_scores[i]), spacing_mm) for i in keep.tolist()]


def level_anchors(decoding: dict, image_size: list[int], grid_sizes: list[list[int]]) -> list[Tensor]:
    """Anchors per level, ``(HWD*A, 6)``, as ``AnchorGenerator.forward`` makes them (not concatenated).

    Strides are ``image_size // grid_size`` per axis, as in MONAI
    (``monai/apps/detection/utils/anchor_utils.py``).
    """
    generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=decoding["feature_map_scales"], base_anchor_shapes=decoding["base_anchor_shapes"]
    )
    if len(generator.cell_anchors) != len(grid_sizes):
        raise ModelError(
            f"{len(decoding['feature_map_scales'])} feature_map_scales for {len(grid_sizes)} feature map levels"
        )
    strides = [
        [torch.tensor(image_size[axis] // g[axis], dtype=torch.int64) for axis in range(SPATIAL_DIMS)]
        for g in grid_sizes
    ]
    generator.set_cell_anchors(torch.float32, torch.device("cpu"))
    return generator.grid_anchors(grid_sizes, strides)


def reshape_map(result_map: Tensor, num_anchors: int) -> Tensor:
    """``(A*K, X, Y, Z)`` to ``(X*Y*Z*A, K)``: ``RetinaNetDetector._reshape_maps`` for one image."""
    channels = result_map.shape[0] // num_anchors
    return result_map.reshape(num_anchors, channels, *result_map.shape[1:]).permute(2, 3, 4, 0, 1).reshape(-1, channels)


def _candidate(box: Tensor, score: float, spacing_mm: np.ndarray) -> ModelCandidate:
    lo, hi = box[:SPATIAL_DIMS].double().numpy(), box[SPATIAL_DIMS:BOX_CODE_SIZE].double().numpy()
    centre = (lo + hi) / 2
    return ModelCandidate(
        index_xyz=tuple(float(v) for v in centre),
        diameter_mm=float(np.mean((hi - lo) * spacing_mm)),
        score=score,
    )
