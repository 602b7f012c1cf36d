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

Two deliberate differences. Anchors are built and decoded only for the selected rows (MONAI
builds and decodes all, then selects: several hundred MB for a whole chest CT; both are row by
row, so the kept boxes are the same). The image extent used for clipping is the padded one (the
ONNX graph pads to a multiple of the coarsest stride and its output does not carry the original
size; MONAI clips to the original), which can only differ for boxes reaching into the padding.

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

from lungscreen.errors import ModelError
from lungscreen.findings import ModelCandidate
from lungscreen.models.retinanet import BOX_CODE_SIZE, SPATIAL_DIMS, packing_factors, unpack_head_outputs

NUM_CLASSES = 1  # nodule; the packed layout and the candidates assume a single class


def decode_retinanet(output: np.ndarray, spacing_mm: np.ndarray, decoding: dict) -> list[ModelCandidate]:
    """Packed head outputs ``(channels, X_c, Y_c, Z_c)`` of one image to scored candidates, best first."""
    if output.ndim != 4:
        raise ModelError(f"RetinaNet output must be (channels, X, Y, Z), got shape {output.shape}")
    strides = [tuple(int(v) for v in s) for s in decoding["feature_map_strides"]]
    generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=decoding["feature_map_scales"], base_anchor_shapes=decoding["base_anchor_shapes"]
    )
    if len(generator.cell_anchors) != len(strides):
        raise ModelError(f"{len(generator.cell_anchors)} feature_map_scales for {len(strides)} feature_map_strides")
    generator.set_cell_anchors(torch.float32, torch.device("cpu"))
    num_anchors = generator.num_anchors_per_location()[0]
    packed = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))[None]
    levels = unpack_head_outputs(packed, packing_factors(strides), num_anchors, NUM_CLASSES)
    image_size = [c * s for c, s in zip(output.shape[1:], strides[-1])]

    selector = BoxSelector(
        apply_sigmoid=True,
        score_thresh=decoding["score_thresh"],
        topk_candidates_per_level=decoding["topk_candidates_per_level"],
        nms_thresh=decoding["nms_thresh"],
        detections_per_img=decoding["detections_per_img"],
    )
    coder = BoxCoder(weights=tuple(decoding["box_coder_weights"]))
    boxes, scores, labels = [], [], []
    for (cls_map, box_map), cell_anchors in zip(levels, generator.cell_anchors):
        grid_size = list(cls_map.shape[2:])
        idx, level_scores, level_labels = selector.select_top_score_idx_per_level(reshape_map(cls_map[0], num_anchors))
        location, anchor = idx // num_anchors, idx % num_anchors
        regression = box_map[0].reshape(num_anchors, BOX_CODE_SIZE, -1)[anchor, :, location]
        stride = [image_size[axis] // grid_size[axis] for axis in range(SPATIAL_DIMS)]
        level_anchors = anchors_at(cell_anchors, grid_size, stride, location, anchor)
        level_boxes = coder.decode_single(regression.to(torch.float32), level_anchors)
        level_boxes, keep = clip_boxes_to_image(level_boxes, image_size, remove_empty=True)
        boxes.append(level_boxes)
        scores.append(level_scores[keep])
        labels.append(level_labels[keep])
    all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)
    keep = batched_nms(
        all_boxes, all_scores, torch.cat(labels), selector.nms_thresh, max_proposals=selector.detections_per_img
    )
    candidates = []
    for i in keep.tolist():
        lo, hi = all_boxes[i, :SPATIAL_DIMS].double().numpy(), all_boxes[i, SPATIAL_DIMS:].double().numpy()
        candidates.append(
            ModelCandidate(
                index_xyz=tuple(float(v) for v in (lo + hi) / 2),
                diameter_mm=float(np.mean((hi - lo) * spacing_mm)),
                score=float(all_scores[i]),
            )
        )
    return candidates


def reshape_map(result_map: Tensor, num_anchors: int) -> Tensor:
    """``(A*K, X, Y, Z)`` to ``(X*Y*Z*A, K)``: ``RetinaNetDetector._reshape_maps`` for one image."""
    channels = result_map.shape[0] // num_anchors
    return result_map.reshape(num_anchors, channels, *result_map.shape[1:]).permute(2, 3, 4, 0, 1).reshape(-1, channels)


def anchors_at(
    cell_anchors: Tensor, grid_size: list[int], stride: list[int], location: Tensor, anchor: Tensor
) -> Tensor:
    """The rows ``location * A + anchor`` of ``AnchorGenerator.grid_anchors`` for one level, alone.

    Same arithmetic as ``monai/apps/detection/utils/anchor_utils.py``: the centre of grid cell
    ``i`` is ``i * stride + stride // 2`` (int32) on each axis, plus the (rounded) cell anchor;
    cells in C order over ``(X, Y, Z)`` (``meshgrid(indexing="ij")``), anchors fastest.
    """
    cells = torch.unravel_index(location, tuple(grid_size))
    centres = [cells[axis].to(torch.int32) * stride[axis] + stride[axis] // 2 for axis in range(SPATIAL_DIMS)]
    return torch.stack(centres * 2, dim=1) + cell_anchors[anchor]
