"""The 3D RetinaNet of MONAI's ``lung_nodule_ct_detection`` bundle, built without torchvision.

The bundle (``configs/inference.json``) builds its network as::

    backbone = monai.networks.nets.resnet.resnet50(
        spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    feature_extractor = resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None)
    RetinaNet(spatial_dims=3, num_classes=1, num_anchors=3, feature_extractor=feature_extractor,
              size_divisible=[16, 16, 8])

Two names on that path come from torchvision, both through ``monai.utils.optional_import``, so
the MONAI modules import without it and fail only when these are called:

* ``_validate_trainable_layers`` in ``resnet_fpn_feature_extractor``
  (``monai/apps/detection/networks/retinanet_network.py``): it only counts the backbone layers
  that ``_resnet_fpn_extractor`` leaves trainable (all of them for the bundle's
  ``pretrained_backbone=False``); inference needs no freezing, so it is left out;
* ``IntermediateLayerGetter`` in ``BackboneWithFPN.__init__``
  (``monai/networks/blocks/backbone_fpn_utils.py``): replaced here by :class:`LayerGetter`.

Everything else is MONAI's own code: ``ResNet`` (``monai/networks/nets/resnet.py``),
``FeaturePyramidNetwork`` with ``LastLevelMaxPool``
(``monai/networks/blocks/feature_pyramid_network.py``), and ``RetinaNet`` with its
classification and regression heads. The module tree, hence every state-dict key, is MONAI's,
so a state dict of MONAI's network, the bundle's ``models/model.pt``, loads with ``strict=True``.

For ONNX, :class:`PackedRetinaNet` pads the input as MONAI's detector does and packs the per-level
head outputs into ONE map on the coarsest grid (:func:`pack_head_outputs`), so the graph has a
single output that whole-volume and sliding-window inference both handle.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets import resnet
from torch import Tensor, nn

from lungscreen.errors import ModelError

if TYPE_CHECKING:
    from lungscreen.models.monai_bundle import RetinaNetSpec

SPATIAL_DIMS = 3
BOX_CODE_SIZE = 2 * SPATIAL_DIMS  # (dx, dy, dz, dw, dh, dd) per anchor
FPN_CHANNELS = 256  # ``out_channels`` in MONAI's ``_resnet_fpn_extractor``


class LayerGetter(nn.ModuleDict):
    """The backbone's children up to the last returned layer; returns those layers' outputs by name.

    Mirrors torchvision's ``IntermediateLayerGetter`` (``torchvision/models/_utils.py``), which
    MONAI's ``BackboneWithFPN`` stores as ``body``: the children keep their names, so the state
    dict keys are ``body.conv1.weight``, ``body.layer1.0.conv1.weight``, ... and the children
    after the last returned layer (``layer3``, ``layer4``, ``avgpool``, ``fc`` here) are dropped.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        children = dict(model.named_children())
        missing = set(return_layers) - set(children)
        if missing:
            raise ModelError(f"the backbone has no layer(s) {sorted(missing)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        remaining = set(return_layers)
        for name, module in children.items():
            layers[name] = module
            remaining.discard(name)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class ResNetFPNFeatureExtractor(nn.Module):
    """ResNet body plus feature pyramid: MONAI's ``BackboneWithFPN`` as ``_resnet_fpn_extractor`` builds it.

    Same attributes (``body``, ``fpn``, ``out_channels``) and forward as
    ``monai/networks/blocks/backbone_fpn_utils.py``; the FPN inputs are the returned layers, named
    ``"0"``, ``"1"``, ... in order, and ``LastLevelMaxPool`` adds a ``"pool"`` level.
    """

    def __init__(self, backbone: resnet.ResNet, returned_layers: tuple[int, ...]) -> None:
        super().__init__()
        return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
        in_channels_stage2 = backbone.in_planes // 8
        in_channels_list = [in_channels_stage2 * 2 ** (k - 1) for k in returned_layers]
        self.body = LayerGetter(backbone, return_layers)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=SPATIAL_DIMS,
            in_channels_list=in_channels_list,
            out_channels=FPN_CHANNELS,
            extra_blocks=LastLevelMaxPool(SPATIAL_DIMS),
        )
        self.out_channels = FPN_CHANNELS

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))


def build_retinanet(spec: RetinaNetSpec) -> RetinaNet:
    """MONAI's ``RetinaNet`` as the bundle's ``network_def`` builds it, in eval mode."""
    backbone = getattr(resnet, spec.backbone)(
        spatial_dims=SPATIAL_DIMS,
        n_input_channels=1,
        conv1_t_stride=list(spec.conv1_t_stride),
        conv1_t_size=list(spec.conv1_t_size),
    )
    network = RetinaNet(
        spatial_dims=SPATIAL_DIMS,
        num_classes=spec.num_classes,
        num_anchors=spec.num_anchors,
        feature_extractor=ResNetFPNFeatureExtractor(backbone, spec.returned_layers),
        size_divisible=list(spec.size_divisible),
    )
    return network.eval()


def pad_to_divisible(image: Tensor, size_divisible: tuple[int, int, int]) -> Tensor:
    """Zero-pad ``(N, C, X, Y, Z)`` at the end of each axis to a multiple of ``size_divisible``.

    What ``RetinaNetDetector.forward`` does first (``preprocess_images`` → ``pad_images`` in
    ``monai/apps/detection/utils/detector_utils.py``: constant 0, at the end), so voxel indices
    are unchanged. Written with shape arithmetic so the ONNX graph pads any input size.
    """
    pads: list[int] = []
    for axis in range(image.dim() - 1, 1, -1):  # F.pad lists the last axis first
        k = size_divisible[axis - 2]
        pads += [0, (k - image.shape[axis] % k) % k]
    return F.pad(image, pads)


def packing_factors(strides: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Cells of each level per cell of the coarsest level, per axis."""
    coarsest = strides[-1]
    return [tuple(c // s for c, s in zip(coarsest, stride)) for stride in strides]


def pack_head_outputs(
    cls_maps: list[Tensor], box_maps: list[Tensor], factors: list[tuple[int, int, int]]
) -> Tensor:
    """One map on the coarsest grid holding every level's head outputs (space-to-depth).

    Level ``l`` contributes ``c_l = A * (C + 6)`` channels (MONAI's class logits ``(A*C)`` then box
    regression ``(A*6)``, in the heads' own channel order) times ``fx * fy * fz`` sub-cells; its
    channel ``(c * fx * fy * fz) + (i * fy * fz) + (j * fz) + k`` at coarse cell ``(X, Y, Z)`` is
    head channel ``c`` at level cell ``(X * fx + i, Y * fy + j, Z * fz + k)``. Levels follow in
    order, finest first. Needs level sizes that are ``factors`` times the coarsest size, which
    :func:`pad_to_divisible` guarantees. :func:`unpack_head_outputs` is the inverse.
    """
    packed = []
    for cls, box, (fx, fy, fz) in zip(cls_maps, box_maps, factors):
        level = torch.cat([cls, box], dim=1)
        n, c, x, y, z = level.shape
        level = level.reshape(n, c, x // fx, fx, y // fy, fy, z // fz, fz).permute(0, 1, 3, 5, 7, 2, 4, 6)
        packed.append(level.reshape(n, c * fx * fy * fz, x // fx, y // fy, z // fz))
    return torch.cat(packed, dim=1)


def unpack_head_outputs(
    packed: Tensor, factors: list[tuple[int, int, int]], num_anchors: int, num_classes: int
) -> list[tuple[Tensor, Tensor]]:
    """Inverse of :func:`pack_head_outputs`: per level, ``(class logits, box regression)`` maps.

    Each is ``(N, A*C, X_l, Y_l, Z_l)`` and ``(N, A*6, X_l, Y_l, Z_l)``, as MONAI's heads return them.
    """
    n, channels, x, y, z = packed.shape
    per_cell = num_anchors * (num_classes + BOX_CODE_SIZE)
    expected = sum(per_cell * fx * fy * fz for fx, fy, fz in factors)
    if channels != expected:
        raise ModelError(f"packed RetinaNet output has {channels} channels; these settings need {expected}")
    levels = []
    start = 0
    for fx, fy, fz in factors:
        stop = start + per_cell * fx * fy * fz
        level = packed[:, start:stop].reshape(n, per_cell, fx, fy, fz, x, y, z).permute(0, 1, 5, 2, 6, 3, 7, 4)
        level = level.reshape(n, per_cell, x * fx, y * fy, z * fz)
        levels.append((level[:, : num_anchors * num_classes], level[:, num_anchors * num_classes :]))
        start = stop
    return levels


class PackedRetinaNet(nn.Module):
    """What goes into the ONNX graph: pad, run the RetinaNet, pack its head outputs.

    ``(N, 1, X, Y, Z)`` in [0, 1], any size, to ``(N, channels, ceil(X/sx), ceil(Y/sy), ceil(Z/sz))``
    with ``(sx, sy, sz)`` the coarsest stride ([16, 16, 8] for the bundle).
    """

    def __init__(self, network: RetinaNet, spec: RetinaNetSpec) -> None:
        super().__init__()
        self.network = network
        self.size_divisible = spec.size_divisible
        self.factors = packing_factors(spec.feature_map_strides)

    def forward(self, image: Tensor) -> Tensor:
        head = self.network(pad_to_divisible(image, self.size_divisible))
        return pack_head_outputs(head[self.network.cls_key], head[self.network.box_reg_key], self.factors)
