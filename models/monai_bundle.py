"""Import MONAI's ``lung_nodule_ct_detection`` bundle: its weights to ONNX, its settings to a model card.

Users download the bundle themselves (MONAI Model Zoo). The folder needs ``models/model.pt``
(a state dict); ``configs/inference.json`` and ``configs/metadata.json`` are read when present,
and every setting missing from them falls back to the bundle's documented value
(:class:`BundleSpec`).

Importing this module is cheap (PyTorch, MONAI and ONNX load only when a bundle is converted), so
the ``lungscreen`` parser can register :func:`add_cli` without slowing other commands.

The ONNX graph (``image`` in, ``head_outputs`` out) pads its input like MONAI's detector and
returns the per-level class logits and box regressions packed into one map on the coarsest
feature grid (:class:`models.retinanet.PackedRetinaNet`). One fixed-channel output map is what
:class:`models.detector.Detector` runs whole or stitches by sliding window;
:mod:`models.decoding_retinanet` turns it into boxes as MONAI's ``RetinaNetDetector`` does.

    lungscreen model import-monai-bundle PATH [--out DIR] [--opset N]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import pickle
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lungscreen.models.card import validate_card
from lungscreen.errors import ModelError

if TYPE_CHECKING:
    from monai.apps.detection.networks.retinanet_network import RetinaNet

log = logging.getLogger(__name__)

CARD_NAME = "monai-lung-nodule-ct-detection"
ONNX_FILE = "monai_lung_nodule_ct_detection.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "head_outputs"
WEIGHTS = Path("models") / "model.pt"
INFERENCE_CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
# ONNX Runtime against PyTorch on a small input, checked after every export.
EXPORT_TOLERANCE = 1e-3
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")


@dataclass(frozen=True)
class RetinaNetSpec:
    """The RetinaNet parameters that the bundle's ``inference.json`` sets (defaults: the bundle's).

    :func:`models.retinanet.build_retinanet` builds the network from it.
    """

    backbone: str = "resnet50"
    conv1_t_size: tuple[int, int, int] = (7, 7, 7)
    conv1_t_stride: tuple[int, int, int] = (2, 2, 1)
    returned_layers: tuple[int, ...] = (1, 2)
    num_classes: int = 1
    num_anchors: int = 3

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ModelError(f"backbone {self.backbone!r} is not a MONAI ResNet ({', '.join(BACKBONES)})")
        layers = list(self.returned_layers)
        if not layers or layers != sorted(set(layers)) or not set(layers) <= {1, 2, 3, 4}:
            raise ModelError(f"returned_layers must increase within 1..4, got {list(self.returned_layers)}")
        if len(self.conv1_t_size) != 3 or len(self.conv1_t_stride) != 3:
            raise ModelError("conv1_t_size and conv1_t_stride need one value per spatial axis")

    @property
    def feature_map_strides(self) -> list[tuple[int, int, int]]:
        """Input voxels per feature-map cell, per FPN level, finest first.

        The stem (``conv1`` then the stride-2 ``maxpool``) divides by ``2 * conv1_t_stride``;
        ``layer1`` keeps the size and each later layer halves it (``ResNet._make_layer``);
        ``LastLevelMaxPool`` adds one more level at half the last one.
        """
        strides = [tuple(2 * s * 2 ** (layer - 1) for s in self.conv1_t_stride) for layer in self.returned_layers]
        strides.append(tuple(2 * s for s in strides[-1]))
        return strides

    @property
    def size_divisible(self) -> tuple[int, int, int]:
        """What MONAI's ``retinanet_resnet50_fpn_detector`` computes: the coarsest stride."""
        return self.feature_map_strides[-1]


@dataclass(frozen=True)
class BundleSpec:
    """The bundle's settings; the defaults are those documented for ``lung_nodule_ct_detection``."""

    network: RetinaNetSpec = RetinaNetSpec()
    # preprocessing: Orientationd, Spacingd, ScaleIntensityRanged
    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (0.703125, 0.703125, 1.25)
    hu_min: float = -1024.0
    hu_max: float = 300.0
    out_min: float = 0.0
    out_max: float = 1.0
    # inference: infer_patch_size and set_sliding_window_inferer(overlap=...)
    patch_size: tuple[int, int, int] = (512, 512, 192)
    overlap: float = 0.25
    # AnchorGeneratorWithAnchorShape
    feature_map_scales: tuple[float, ...] = (1.0, 2.0, 4.0)
    base_anchor_shapes: tuple[tuple[float, float, float], ...] = ((6.0, 8.0, 4.0), (8.0, 6.0, 5.0), (10.0, 10.0, 6.0))
    # RetinaNetDetector: BoxCoder weights, set_box_selector_parameters(...)
    box_coder_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    score_thresh: float = 0.02
    topk_candidates_per_level: int = 1000
    nms_thresh: float = 0.22
    detections_per_img: int = 300

    def __post_init__(self) -> None:
        if self.network.num_classes != 1:
            raise ModelError(
                f"only a one-class (nodule) RetinaNet is supported, the bundle has {self.network.num_classes}"
            )
        if self.network.num_anchors != len(self.base_anchor_shapes):
            raise ModelError(
                f"num_anchors {self.network.num_anchors} != {len(self.base_anchor_shapes)} base_anchor_shapes"
            )
        levels = len(self.network.feature_map_strides)
        if len(self.feature_map_scales) != levels:
            raise ModelError(f"{len(self.feature_map_scales)} feature_map_scales for {levels} feature map levels")
        divisible = self.network.size_divisible
        if any(p % k for p, k in zip(self.patch_size, divisible)):
            raise ModelError(f"patch size {list(self.patch_size)} is not a multiple of {list(divisible)}")
        # Sliding windows must start on the coarsest grid: MONAI steps by int(patch * (1 - overlap)).
        if any(int(p * (1 - self.overlap)) % k for p, k in zip(self.patch_size, divisible)):
            raise ModelError(
                f"overlap {self.overlap} moves {list(self.patch_size)} windows off the {list(divisible)} grid"
            )


# --- the bundle's configs/inference.json ---------------------------------------------------------

_UNKNOWN = object()  # an argument that is not a literal


def read_bundle_spec(bundle_dir: Path) -> BundleSpec:
    """The settings in ``configs/inference.json``, each falling back to :class:`BundleSpec`'s default.

    Only literal values and ``@key`` references to top-level literals are read; the ``$...``
    expressions (the backbone, the feature extractor, ``detector_ops``) are parsed with
    :mod:`ast`, never evaluated. ``Spacingd`` counts even when ``_disabled_`` (the bundle disables
    it for LUNA16 images already resampled to its spacing).
    """
    path = bundle_dir / INFERENCE_CONFIG
    if not path.is_file():
        log.info("no %s: using the documented settings of lung_nodule_ct_detection", INFERENCE_CONFIG)
        return BundleSpec()
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None

    network: dict[str, Any] = {}
    name, _, kwargs = _parse_target(config.get("backbone"), config)
    if name:
        network["backbone"] = name
    channels = kwargs.get("n_input_channels", 1)
    if isinstance(channels, int) and channels != 1:
        raise ModelError(f"the backbone takes {channels} input channels; CT needs 1")
    _take(network, "conv1_t_size", kwargs.get("conv1_t_size"), _triple)
    _take(network, "conv1_t_stride", kwargs.get("conv1_t_stride"), _triple)
    _, args, kwargs = _parse_target(config.get("feature_extractor"), config)
    _take(network, "returned_layers", kwargs.get("returned_layers", args[3] if len(args) > 3 else None), _ints)
    network_def = config.get("network_def", {})
    _take(network, "num_classes", _resolve(config, network_def.get("num_classes")), int)
    _take(network, "num_anchors", _resolve(config, network_def.get("num_anchors")), int)

    spec: dict[str, Any] = {}
    anchors = config.get("anchor_generator", {})
    _take(spec, "feature_map_scales", _resolve(config, anchors.get("feature_map_scales")), _floats)
    _take(spec, "base_anchor_shapes", _resolve(config, anchors.get("base_anchor_shapes")), _shapes)
    _take(spec, "patch_size", _resolve(config, config.get("infer_patch_size")), _ints)
    for op in config.get("detector_ops", []):
        name, args, kwargs = _parse_target(op, config)
        if name == "set_box_selector_parameters":
            _take(spec, "score_thresh", kwargs.get("score_thresh"), float)
            _take(spec, "topk_candidates_per_level", kwargs.get("topk_candidates_per_level"), int)
            _take(spec, "nms_thresh", kwargs.get("nms_thresh"), float)
            _take(spec, "detections_per_img", kwargs.get("detections_per_img"), int)
        elif name == "set_sliding_window_inferer":
            _take(spec, "patch_size", kwargs.get("roi_size", args[0] if args else None), _ints)
            _take(spec, "overlap", kwargs.get("overlap"), float)
        elif name == "set_box_coder_weights":
            _take(spec, "box_coder_weights", kwargs.get("weights", args[0] if args else None), _floats)
    for transform in config.get("preprocessing", {}).get("transforms", []):
        target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
        if target == "Orientationd":
            _take(spec, "orientation", _resolve(config, transform.get("axcodes")), str)
        elif target == "Spacingd":
            _take(spec, "spacing_mm", _resolve(config, transform.get("pixdim")), _floats)
        elif target == "ScaleIntensityRanged":
            for ours, theirs in (("hu_min", "a_min"), ("hu_max", "a_max"), ("out_min", "b_min"), ("out_max", "b_max")):
                _take(spec, ours, _resolve(config, transform.get(theirs)), float)

    size_divisible = _resolve(config, network_def.get("size_divisible"))
    result = BundleSpec(network=dataclasses.replace(RetinaNetSpec(), **network), **spec)
    if size_divisible is not None and _ints(size_divisible) != result.network.size_divisible:
        raise ModelError(
            f"inference.json says size_divisible {size_divisible}, but this backbone needs "
            f"{list(result.network.size_divisible)}"
        )
    return result


def _resolve(config: dict, value: Any) -> Any:
    """Follow a ``"@key"`` reference to a top-level entry of the config; other values as they are."""
    if isinstance(value, str) and value.startswith("@") and value[1:] in config:
        return config[value[1:]]
    return value


def _parse_target(entry: Any, config: dict) -> tuple[str | None, list[Any], dict[str, Any]]:
    """Name, positional and keyword literals of a ``"$f(...)"`` expression or a ``{"_target_": ...}`` dict."""
    if isinstance(entry, dict):
        target = str(entry.get("_target_", "")).rsplit(".", 1)[-1] or None
        return target, [], {k: _resolve(config, v) for k, v in entry.items() if not k.startswith("_")}
    if not isinstance(entry, str) or not entry.startswith("$"):
        return None, [], {}
    source = re.sub(r"@([A-Za-z_]\w*)", r"_ref_\1", entry[1:])
    try:
        call = ast.parse(source, mode="eval").body
    except SyntaxError:
        return None, [], {}
    if not isinstance(call, ast.Call):
        return None, [], {}
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id.startswith("_ref_"):
            return _resolve(config, "@" + node.id.removeprefix("_ref_"))
        try:
            return ast.literal_eval(node)
        except ValueError:
            return _UNKNOWN

    return name, [value(a) for a in call.args], {k.arg: value(k.value) for k in call.keywords if k.arg}


def _take(into: dict[str, Any], key: str, raw: Any, convert: Any) -> None:
    """Store ``convert(raw)`` unless ``raw`` is absent or not a literal; name the key when it is malformed."""
    if raw is None or raw is _UNKNOWN or isinstance(raw, str) and raw.startswith(("@", "$")):
        return
    try:
        into[key] = convert(raw)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"inference.json: cannot read {key} from {raw!r}: {exc}") from None


def _ints(raw: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in raw)


def _floats(raw: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in raw)


def _triple(raw: Any) -> tuple[int, int, int]:
    values = (int(raw),) * 3 if isinstance(raw, (int, float)) else _ints(raw)
    if len(values) != 3:
        raise ValueError("need three values")
    return values


def _shapes(raw: Any) -> tuple[tuple[float, float, float], ...]:
    shapes = tuple(_floats(shape) for shape in raw)
    if not shapes or any(len(s) != 3 for s in shapes):
        raise ValueError("need a list of [w, h, d] shapes")
    return shapes


# --- weights, export, card --------------------------------------------------------------------------


def load_network(weights: Path, spec: RetinaNetSpec) -> RetinaNet:
    """The bundle's RetinaNet with its weights (``torch.load(weights_only=True)``, strict key match)."""
    import torch  # here, like the other heavy imports, so that registering the CLI stays cheap

    from lungscreen.models.retinanet import build_retinanet

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelError(f"cannot load {weights}: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{weights} is not a state dict of tensors")
    network = build_retinanet(spec)
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(
            f"{weights} does not fit the RetinaNet of {spec}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes that do not match
        raise ModelError(f"{weights} does not fit the RetinaNet of {spec}: {exc}") from None
    return network


def export_onnx(network: RetinaNet, spec: RetinaNetSpec, path: Path, *, opset: int = 17) -> float:
    """Write the padded, packed network to ``path`` with dynamic batch and spatial axes.

    Uses the TorchScript exporter (``dynamo=False``): the dynamo exporter needs onnxscript. The
    export is then checked: ONNX Runtime and PyTorch must agree within :data:`EXPORT_TOLERANCE`
    on a small random input of another size than the traced one, not a multiple of the coarsest
    stride. Returns that largest difference.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from lungscreen.models.retinanet import PackedRetinaNet

    packed = PackedRetinaNet(network, spec).eval()
    example = torch.zeros(1, 1, *(2 * k for k in spec.size_divisible))
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI's heads test their outputs for NaN with Python ifs; the trace keeps the no-NaN branch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            packed,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=opset,
        )
    onnx.checker.check_model(str(path))

    check = torch.rand(1, 1, *(3 * k - 1 for k in spec.size_divisible), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = packed(check).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {INPUT_NAME: check.numpy()})
    diff = float(np.max(np.abs(got - expected)))
    if got.shape != expected.shape or not diff <= EXPORT_TOLERANCE:
        raise ModelError(f"ONNX export of the RetinaNet disagrees with PyTorch (max abs diff {diff:.3g})")
    return diff


def model_card(
    spec: BundleSpec, *, version: str, provenance: str, licence: str, bundle_intended_use: str | None
) -> dict:
    """The LungScreen model card for the imported bundle (validated by :func:`models.card.validate_card`)."""
    net = spec.network
    return {
        "schema_version": 1,
        "name": CARD_NAME,
        "version": version,
        "description": (
            f"MONAI Model Zoo bundle lung_nodule_ct_detection: 3D RetinaNet, {net.backbone} FPN "
            f"(returned layers {list(net.returned_layers)}), converted to ONNX by LungScreen ({provenance}). "
            "The ONNX output packs every FPN level's class logits and box regressions on the coarsest grid "
            "(models/retinanet.py); decoding mirrors MONAI's RetinaNetDetector. Scores are the bundle's "
            "sigmoid outputs: the calibration is the identity and NOT fitted on LungScreen data, and the "
            "operating points are not chosen on LungScreen data."
        ),
        "intended_use": (
            "Research use only. Not for diagnostic use. The weights are the user's own download of the MONAI "
            f"bundle lung_nodule_ct_detection, used under that bundle's licence ({licence})."
            + (f" The bundle's metadata says: {bundle_intended_use!r}." if bundle_intended_use else "")
        ),
        "onnx_file": ONNX_FILE,
        "training_data": "LUNA16 (from LIDC-IDRI), as documented by the bundle; no LungScreen data",
        "metrics": [],
        "preprocessing": {
            "orientation": spec.orientation,
            "spacing_mm": list(spec.spacing_mm),
            "intensity_window": {
                "hu_min": spec.hu_min,
                "hu_max": spec.hu_max,
                "out_min": spec.out_min,
                "out_max": spec.out_max,
            },
        },
        "inference": {
            "input_name": INPUT_NAME,
            "patch_size": list(spec.patch_size),
            "overlap": spec.overlap,
            "size_divisible_by": list(net.size_divisible),
        },
        "decoding": {
            "kind": "retinanet",
            "feature_map_strides": [list(s) for s in net.feature_map_strides],
            "feature_map_scales": list(spec.feature_map_scales),
            "base_anchor_shapes": [list(s) for s in spec.base_anchor_shapes],
            "box_coder_weights": list(spec.box_coder_weights),
            "score_thresh": spec.score_thresh,
            "topk_candidates_per_level": spec.topk_candidates_per_level,
            "nms_thresh": spec.nms_thresh,
            "detections_per_img": spec.detections_per_img,
        },
        "calibration": {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 1.0]},
        "operating_points": {
            "screening": {
                "threshold": 0.5,
                "description": "sigmoid score 0.5; the bundle publishes no operating point and this one is "
                "not chosen on LungScreen data",
            },
            "all-candidates": {
                "threshold": spec.score_thresh,
                "description": "the bundle's own score threshold (score_thresh): every box it reports, as in its "
                "FROC evaluation; not chosen on LungScreen data",
            },
        },
        "default_operating_point": "screening",
    }


def import_monai_bundle(bundle_dir: Path, out_dir: Path, *, opset: int = 17) -> Path:
    """Convert the bundle to ``out_dir/``:data:`ONNX_FILE` plus ``model_card.json``; return the card's path."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    weights = bundle_dir / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{bundle_dir} has no {WEIGHTS}: download the bundle's weights first")
    spec = read_bundle_spec(bundle_dir)
    metadata = _metadata(bundle_dir)
    network = load_network(weights, spec.network)

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    diff = export_onnx(network, spec.network, out_dir / ONNX_FILE, opset=opset)
    log.info(
        "exported %s in %.1f s (%.0f MB); ONNX Runtime vs PyTorch max abs diff %.2g",
        ONNX_FILE, time.perf_counter() - started, (out_dir / ONNX_FILE).stat().st_size / 1e6, diff,
    )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = model_card(
        spec,
        version=str(metadata.get("version") or "unversioned"),
        provenance=f"{WEIGHTS} sha256 {digest[:16]}, ONNX opset {opset}, max abs diff {diff:.1g} vs PyTorch",
        licence=_licence(bundle_dir),
        bundle_intended_use=metadata.get("intended_use"),
    )
    validate_card(card)
    card_path = out_dir / "model_card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def _metadata(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / METADATA
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def _licence(bundle_dir: Path) -> str:
    """What the bundle folder says about its licence (MONAI Model Zoo bundles ship a ``LICENSE`` file)."""
    path = bundle_dir / "LICENSE"
    if not path.is_file():
        return "no LICENSE file in the bundle folder; the MONAI Model Zoo publishes it under Apache-2.0"
    text = path.read_text(errors="replace")
    name = "Apache-2.0" if "Apache License" in text and "2.0" in text else "see its LICENSE file"
    third_party = (bundle_dir / "docs" / "license.txt").is_file()
    notes = " and docs/license.txt for third-party data" if third_party else ""
    return f"{name}, per its LICENSE file{notes}"


# --- command line -----------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``model import-monai-bundle PATH [--out DIR] [--opset N]`` on the ``lungscreen`` subcommands."""
    model = subparsers.add_parser("model", help="detection models")
    commands = model.add_subparsers(dest="model_command", required=True)
    bundle = commands.add_parser(
        "import-monai-bundle",
        help="convert MONAI's lung_nodule_ct_detection bundle (downloaded by you) to ONNX plus a model card",
    )
    bundle.add_argument("bundle_dir", type=Path, metavar="PATH", help="bundle folder holding models/model.pt")
    bundle.add_argument("--out", type=Path, default=Path(CARD_NAME), help=f"output folder (default ./{CARD_NAME})")
    bundle.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    bundle.set_defaults(func=cmd_import_monai_bundle)


def cmd_import_monai_bundle(args: argparse.Namespace) -> int:
    card = import_monai_bundle(args.bundle_dir, args.out, opset=args.opset)
    print(f"wrote {card} and {card.parent / ONNX_FILE}; use it with --model {card.parent}")
    return 0
