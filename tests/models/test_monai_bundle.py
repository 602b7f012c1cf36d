"""MONAI ``lung_nodule_ct_detection`` import: architecture, ONNX export, decoding, model card.

No real bundle is needed: a fake one holds randomly initialised weights (fixed seed) of the
full ResNet-50 FPN RetinaNet, with the classification bias raised so that many anchors pass the
bundle's score threshold and decoding has work to do. The export runs once per module.
"""

from __future__ import annotations

import argparse
import json
import time
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.detection.networks import retinanet_network
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.detector_utils import pad_images
from monai.data import MetaTensor
from monai.networks.blocks import backbone_fpn_utils
from monai.networks.nets import resnet
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing
from torch import nn

from lungscreen.models.calibrate import calibrate
from lungscreen.models.card import load_card
from lungscreen.models.decoding import decode
from lungscreen.models.decoding_retinanet import anchors_at
from lungscreen.models.detector import Detector
from lungscreen.errors import ModelError
from lungscreen.models.monai_bundle import (
    BundleSpec,
    RetinaNetSpec,
    add_cli,
    cmd_import_monai_bundle,
    import_monai_bundle,
    read_bundle_spec,
)
from lungscreen.models.preprocess import LPS_TO_RAS, PreprocessedImage, build_transform, preprocess
from lungscreen.models.retinanet import (
    build_retinanet,
    pack_head_outputs,
    packing_factors,
    pad_to_divisible,
    unpack_head_outputs,
)

SPEC = RetinaNetSpec()
CLS_BIAS = -3.0  # sigmoid(-3) = 0.047 > score_thresh 0.02: thousands of anchors pass, NMS keeps hundreds
IMAGE_SHAPE = (64, 64, 32)


@pytest.fixture(scope="module")
def network() -> nn.Module:
    torch.manual_seed(0)
    net = build_retinanet(SPEC)
    with torch.no_grad():
        net.classification_head.cls_logits.bias.fill_(CLS_BIAS)
    return net


@pytest.fixture(scope="module")
def bundle(network, tmp_path_factory) -> Path:
    """A bundle folder as users download it, without configs/inference.json (defaults apply)."""
    root = tmp_path_factory.mktemp("lung_nodule_ct_detection")
    (root / "models").mkdir()
    (root / "configs").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    metadata = {"version": "0.0.0-test", "intended_use": "This is an example, not to be used for diagnostic purposes"}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (root / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    return root


@pytest.fixture(scope="module")
def imported(bundle, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("imported")
    started = time.perf_counter()
    card_path = import_monai_bundle(bundle, out)
    return card_path, time.perf_counter() - started


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 1, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def torch_heads(network, image) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        return network(image)


@pytest.fixture(scope="module")
def onnx_output(imported, image) -> np.ndarray:
    """The server's path: Detector (ONNX Runtime) on the whole volume."""
    detector = Detector(load_card(imported[0]), providers=["CPUExecutionProvider"])
    return detector.infer(PreprocessedImage(tensor=image[0], index_to_lps=np.eye(4)))


# --- architecture --------------------------------------------------------------------------------


class _TorchvisionIntermediateLayerGetter(nn.ModuleDict):
    """torchvision 0.12's ``models._utils.IntermediateLayerGetter``, restated for the test."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        remaining = dict(return_layers)
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)


def _validate_trainable_layers(is_trained, trainable_backbone_layers, max_value, default_value):
    """torchvision 0.12's ``models.detection.backbone_utils._validate_trainable_layers``."""
    if not is_trained:
        trainable_backbone_layers = max_value
    return default_value if trainable_backbone_layers is None else trainable_backbone_layers


def _monai_retinanet() -> nn.Module:
    """MONAI's own RetinaNet, built as the bundle's inference.json does, with torchvision stubbed.

    MONAI needs exactly two torchvision names here, looked up lazily via ``optional_import``:
    ``torchvision.models._utils.IntermediateLayerGetter`` (``BackboneWithFPN``) and
    ``_validate_trainable_layers`` (``resnet_fpn_feature_extractor``); the test swaps those
    attributes of the MONAI modules for the stand-ins above, for this call only.
    """
    fake_utils = types.SimpleNamespace(IntermediateLayerGetter=_TorchvisionIntermediateLayerGetter)
    fake_models = types.SimpleNamespace(_utils=fake_utils)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbone_fpn_utils, "torchvision_models", fake_models)
        patch.setattr(retinanet_network, "_validate_trainable_layers", _validate_trainable_layers)
        backbone = resnet.resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
        extractor = retinanet_network.resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None)
        return retinanet_network.RetinaNet(
            spatial_dims=3, num_classes=1, num_anchors=3, feature_extractor=extractor, size_divisible=[16, 16, 8]
        )


def test_state_dict_keys_and_shapes_are_monais(network):
    ours = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in _monai_retinanet().state_dict().items()}
    assert list(ours) == list(theirs)
    assert ours == theirs
    # Independently of any layer getter: the body is the ResNet-50 up to layer2, names unchanged.
    backbone = resnet.resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    kept = ("conv1.", "bn1.", "layer1.", "layer2.")
    body = [f"feature_extractor.body.{k}" for k in backbone.state_dict() if k.startswith(kept)]
    assert [k for k in ours if k.startswith("feature_extractor.body.")] == body
    assert sum(p.numel() for p in network.parameters()) == 20_902_741  # the "20.9 M parameters" of the bundle


def test_bundle_weights_load_strictly_into_monais_network(bundle):
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    _monai_retinanet().load_state_dict(state, strict=True)


def test_padding_is_monais_detector_padding():
    x = torch.rand(1, 1, 17, 30, 9)
    theirs, _ = pad_images(x, 3, SPEC.size_divisible)
    assert torch.equal(pad_to_divisible(x, SPEC.size_divisible), theirs)


def test_pack_and_unpack_are_inverse():
    strides = SPEC.feature_map_strides
    assert strides == [(4, 4, 2), (8, 8, 4), (16, 16, 8)]
    coarse = (2, 3, 2)
    sizes = [[c * f for c, f in zip(coarse, factor)] for factor in packing_factors(strides)]
    cls = [torch.randn(1, 3, *s) for s in sizes]
    box = [torch.randn(1, 18, *s) for s in sizes]
    packed = pack_head_outputs(cls, box, packing_factors(strides))
    assert packed.shape == (1, 21 * (64 + 8 + 1), *coarse)
    for (c, b), c0, b0 in zip(unpack_head_outputs(packed, packing_factors(strides), 3, 1), cls, box):
        assert torch.equal(c, c0) and torch.equal(b, b0)


# --- export and decoding -----------------------------------------------------------------------------


def test_anchors_of_selected_rows_are_monais():
    generator = AnchorGeneratorWithAnchorShape((1, 2, 4), ((6, 8, 4), (8, 6, 5), (10, 10, 6)))
    grids = [[10, 12, 14], [5, 6, 7], [3, 3, 4]]
    strides = SPEC.feature_map_strides
    everything = generator.grid_anchors(grids, [[torch.tensor(s) for s in stride] for stride in strides])
    for level, (grid, stride) in enumerate(zip(grids, strides)):
        rows = torch.randperm(len(everything[level]), generator=torch.Generator().manual_seed(level))[:50]
        got = anchors_at(generator.cell_anchors[level], grid, list(stride), rows // 3, rows % 3)
        assert torch.equal(got, everything[level][rows])


def _packed(heads: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    factors = packing_factors(SPEC.feature_map_strides)
    return pack_head_outputs(heads["classification"], heads["box_regression"], factors)


def test_onnx_output_matches_pytorch(imported, torch_heads, onnx_output):
    expected = _packed(torch_heads)
    assert onnx_output.shape == expected.shape[1:] == (1533, 4, 4, 4)
    diff = float(np.abs(onnx_output - expected[0].numpy()).max())
    print(f"ONNX vs PyTorch max abs diff {diff:.2e}; import {imported[1]:.1f} s; "
          f"ONNX {load_card(imported[0]).onnx_path.stat().st_size / 1e6:.1f} MB")
    assert diff < 1e-3


class _Replay(nn.Module):
    """The network's attributes with head outputs computed once, for MONAI's RetinaNetDetector."""

    def __init__(self, network: nn.Module, outputs: dict[str, list[torch.Tensor]]) -> None:
        super().__init__()
        for name in ("spatial_dims", "num_classes", "size_divisible", "cls_key", "box_reg_key", "num_anchors"):
            setattr(self, name, getattr(network, name))
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {k: list(v) for k, v in self.outputs.items()}


def _as_arrays(candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([c.index_xyz for c in candidates]),
        np.array([c.diameter_mm for c in candidates]),
        np.array([c.score for c in candidates]),
    )


def test_decoding_matches_monai_detector(imported, network, image, torch_heads, onnx_output):
    card = load_card(imported[0])
    params, spacing = card.decoding, np.asarray(card.preprocessing["spacing_mm"])
    detector = RetinaNetDetector(
        _Replay(network, torch_heads),
        AnchorGeneratorWithAnchorShape(params["feature_map_scales"], params["base_anchor_shapes"]),
    )
    detector.set_box_coder_weights(tuple(params["box_coder_weights"]))
    detector.set_box_selector_parameters(
        score_thresh=params["score_thresh"],
        topk_candidates_per_level=params["topk_candidates_per_level"],
        nms_thresh=params["nms_thresh"],
        detections_per_img=params["detections_per_img"],
    )
    detector.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = detector(image)[0]
    boxes = reference["boxes"].double().numpy()
    assert len(boxes) > 100  # the raised bias: thousands pass score_thresh, top-k per level and NMS leave these

    packed = _packed(torch_heads)
    torch_side = _as_arrays(decode(packed[0].numpy(), spacing, params))
    np.testing.assert_allclose(torch_side[0], (boxes[:, :3] + boxes[:, 3:]) / 2, atol=1e-4)
    np.testing.assert_allclose(torch_side[1], ((boxes[:, 3:] - boxes[:, :3]) * spacing).mean(axis=1), atol=1e-4)
    np.testing.assert_allclose(torch_side[2], reference["labels_scores"].numpy(), atol=1e-6)

    onnx_side = _as_arrays(decode(onnx_output, spacing, params))
    assert len(onnx_side[0]) == len(torch_side[0])
    np.testing.assert_allclose(onnx_side[0], torch_side[0], atol=1e-3)
    np.testing.assert_allclose(onnx_side[1], torch_side[1], atol=1e-3)
    np.testing.assert_allclose(onnx_side[2], torch_side[2], atol=1e-4)


def test_decoding_finds_nothing_below_the_score_threshold(imported):
    assert decode(np.full((1533, 4, 4, 4), -10.0, np.float32), np.ones(3), load_card(imported[0]).decoding) == []


def test_decoding_rejects_a_foreign_output(imported):
    with pytest.raises(ModelError, match="1533"):
        decode(np.zeros((5, 4, 4, 2), np.float32), np.ones(3), load_card(imported[0]).decoding)


# --- model card, config, command line ------------------------------------------------------------


def test_model_card(imported):
    card = load_card(imported[0])
    assert card.name == "monai-lung-nodule-ct-detection" and card.version == "0.0.0-test"
    assert "not for diagnostic use" in card.intended_use.lower() and "Apache-2.0" in card.intended_use
    assert "NOT fitted on LungScreen data" in card.raw["description"]
    assert card.preprocessing == {
        "orientation": "RAS",
        "spacing_mm": [0.703125, 0.703125, 1.25],
        "intensity_window": {"hu_min": -1024.0, "hu_max": 300.0, "out_min": 0.0, "out_max": 1.0},
    }
    assert card.inference == {
        "input_name": "image", "patch_size": [512, 512, 192], "overlap": 0.25, "size_divisible_by": [16, 16, 8]
    }
    assert card.decoding == {
        "kind": "retinanet",
        "feature_map_strides": [[4, 4, 2], [8, 8, 4], [16, 16, 8]],
        "feature_map_scales": [1.0, 2.0, 4.0],
        "base_anchor_shapes": [[6.0, 8.0, 4.0], [8.0, 6.0, 5.0], [10.0, 10.0, 6.0]],
        "box_coder_weights": [1.0] * 6,
        "score_thresh": 0.02,
        "topk_candidates_per_level": 1000,
        "nms_thresh": 0.22,
        "detections_per_img": 300,
    }
    np.testing.assert_allclose(calibrate([0.0, 0.3, 1.0], card.calibration), [0.0, 0.3, 1.0])
    assert card.operating_point().threshold == 0.5
    assert card.operating_point("all-candidates").threshold == 0.02


@pytest.mark.filterwarnings("ignore:.*Orientation.__init__.labels:FutureWarning")  # the bundle passes no labels
def test_card_preprocessing_is_the_bundles(imported):
    """Our preprocessing from the card equals the bundle's transforms on the volume its LoadImaged would give.

    The bundle reads images with ``affine_lps_to_ras=True`` (a RAS affine), then ``Orientationd(axcodes="RAS")``,
    ``Spacingd(pixdim=[0.703125, 0.703125, 1.25])``, ``ScaleIntensityRanged(-1024, 300, 0, 1, clip=True)``.
    """
    card = load_card(imported[0])
    hu = np.random.default_rng(0).uniform(-1100, 400, (12, 16, 16)).astype(np.float32)  # [k, j, i]
    affine_lps = np.array([[0, 0, 0.8, -150.0], [0, 0.8, 0, -120.0], [2.5, 0, 0, -300.0], [0, 0, 0, 1]])
    ours = preprocess(hu, affine_lps, build_transform(card.preprocessing))
    bundle_transforms = Compose([
        Orientation(axcodes="RAS"),
        Spacing(pixdim=[0.703125, 0.703125, 1.25]),
        ScaleIntensityRange(a_min=-1024.0, a_max=300.0, b_min=0.0, b_max=1.0, clip=True),
    ])
    theirs = bundle_transforms(MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(LPS_TO_RAS @ affine_lps)))
    np.testing.assert_allclose(ours.index_to_lps, LPS_TO_RAS @ theirs.affine.numpy(), atol=1e-9)
    np.testing.assert_allclose(ours.tensor.numpy(), theirs.as_tensor().numpy(), atol=1e-5)
    # Model axes run to patient right, anterior, superior: -x, -y, +z in LPS.
    np.testing.assert_allclose(np.sign(np.diag(ours.index_to_lps[:3, :3])), [-1, -1, 1])


INFERENCE_JSON = {  # the shape of the bundle's configs/inference.json, abridged
    "infer_patch_size": [512, 512, 192],
    "anchor_generator": {
        "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
        "feature_map_scales": [1, 2, 4],
        "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    },
    "backbone": "$monai.networks.nets.resnet.resnet50(spatial_dims=3,n_input_channels=1,conv1_t_stride=[2,2,1],conv1_t_size=[7,7,7])",
    "feature_extractor": "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor(@backbone,3,False,[1,2],None)",
    "network_def": {"_target_": "RetinaNet", "spatial_dims": 3, "num_classes": 1, "num_anchors": 3,
                    "feature_extractor": "@feature_extractor", "size_divisible": [16, 16, 8]},
    "detector_ops": [
        "$@detector.set_target_keys(box_key='box', label_key='label')",
        "$@detector.set_box_selector_parameters(score_thresh=0.02,topk_candidates_per_level=1000,nms_thresh=0.22,detections_per_img=300)",
        "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size,overlap=0.25,sw_batch_size=1,mode='constant',device='cpu')",
    ],
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [0.703125, 0.703125, 1.25],
         "_disabled_": "@whether_resampled_luna16"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1024.0, "a_max": 300.0, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]},
}


def _with_config(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(config))
    return tmp_path


def test_bundle_config_gives_the_documented_settings(tmp_path):
    assert read_bundle_spec(_with_config(tmp_path, INFERENCE_JSON)) == BundleSpec()
    assert read_bundle_spec(tmp_path / "no-configs") == BundleSpec()


def test_bundle_config_values_are_taken(tmp_path):
    config = json.loads(json.dumps(INFERENCE_JSON))
    config["detector_ops"][1] = "$@detector.set_box_selector_parameters(score_thresh=0.05,nms_thresh=0.1)"
    config["infer_patch_size"] = [256, 256, 128]
    config["anchor_generator"]["base_anchor_shapes"] = [[6, 6, 4], [8, 8, 5], [10, 10, 6]]
    spec = read_bundle_spec(_with_config(tmp_path, config))
    assert (spec.score_thresh, spec.nms_thresh, spec.topk_candidates_per_level) == (0.05, 0.1, 1000)
    assert spec.patch_size == (256, 256, 128)
    assert spec.base_anchor_shapes[0] == (6.0, 6.0, 4.0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c["network_def"].__setitem__("num_classes", 2), "one-class"),
        (lambda c: c["network_def"].__setitem__("size_divisible", [32, 32, 16]), "size_divisible"),
        (lambda c: c.__setitem__("infer_patch_size", [500, 512, 192]), "patch size"),
        (lambda c: c["detector_ops"].__setitem__(2, "$@detector.set_sliding_window_inferer(overlap=0.3)"), "overlap"),
        (lambda c: c["anchor_generator"].__setitem__("feature_map_scales", [1, 2]), "feature_map_scales"),
        (lambda c: c["anchor_generator"].__setitem__("base_anchor_shapes", [[6, 8]]), "base_anchor_shapes"),
    ],
)
def test_inconsistent_bundle_config_is_rejected(tmp_path, change, match):
    config = json.loads(json.dumps(INFERENCE_JSON))
    change(config)
    with pytest.raises(ModelError, match=match):
        read_bundle_spec(_with_config(tmp_path, config))


def test_bundle_without_weights_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="models/model.pt"):
        import_monai_bundle(tmp_path, tmp_path / "out")


def test_weights_of_another_network_are_rejected(network, tmp_path):
    state = network.state_dict()
    state["classification_head.logits.bias"] = state.pop("classification_head.cls_logits.bias")
    (tmp_path / "models").mkdir()
    torch.save(state, tmp_path / "models" / "model.pt")
    with pytest.raises(ModelError, match=r"1 missing key\(s\) \['classification_head.cls_logits.bias'\], 1 unexpected"):
        import_monai_bundle(tmp_path, tmp_path / "out")


def test_cli_registers_model_import_monai_bundle(tmp_path):
    parser = argparse.ArgumentParser(prog="lungscreen")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "import-monai-bundle", str(tmp_path), "--out", str(tmp_path / "out")])
    assert args.func is cmd_import_monai_bundle
    assert (args.bundle_dir, args.out, args.opset) == (tmp_path, tmp_path / "out", 17)
    with pytest.raises(ModelError, match="model.pt"):
        args.func(args)
