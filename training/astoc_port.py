"""Port of Andre Stochniol's DSB2017 "2x2x2 nodule identifier" (MIT) to PyTorch, and its ONNX export.

The weights (``shared/data/weights/astoc_dsb2017/d8_2x2x2_best_weights.h5``, Keras 1, Theano backend,
channels first) were trained on real LUNA16 CT (subsets 0-8; subset 9 validation) at 2 mm. The network is
``unet_model_xd3_2_6l_grid(nb_filter=20, dim=8)`` of GitHub ``astoc/kaggle_dsb2017`` (commit 2421442):
a 3D U-Net of two levels whose decoder output is reduced along z by three (2, 1, 1) max-pools, so 8
consecutive 2 mm slices go in and the nodule mask of the fifth (``z``, of ``z-4 .. z+3``) comes out.

``python -m lungscreen.training.astoc_port --weights .../d8_2x2x2_best_weights.h5 --out models/astoc_dsb2017``
writes ``model.onnx`` (the logits, before the sigmoid; dynamic batch, height and width) after checking
that ONNX Runtime agrees with PyTorch on crops of two sizes; the licence and card are kept beside it.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

NB_FILTER = 20
SLICES = 8  # input depth; the output is one slice
# h5 layer names in network order (the file's ``layer_names`` attribute, convolutions only).
CONV_LAYERS = tuple(f"convolution3d_{i}" for i in range(18, 33))
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "crops", "logits"
PARITY_TOLERANCE = 1e-3  # absolute, on logits that reach several hundred (float32 through 15 layers)


def _conv(c_in: int, c_out: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, kernel, padding=tuple(k // 2 for k in kernel))  # Keras border_mode='same'


class AstocNoduleNet(nn.Module):
    """Input ``(N, 1, 8, H, W)`` (H, W divisible by 4), output logits ``(N, 1, 1, H, W)``."""

    def __init__(self, f: int = NB_FILTER) -> None:
        super().__init__()
        full, zonly = (3, 3, 3), (3, 1, 1)
        self.convs = nn.ModuleList([
            _conv(1, f, full), _conv(f, f, full),  # level 1
            _conv(f, 2 * f, full), _conv(2 * f, 2 * f, full),  # level 2
            _conv(2 * f, 4 * f, full), _conv(4 * f, 4 * f, full),  # bottom
            _conv(6 * f, 2 * f, full), _conv(2 * f, 2 * f, full),  # up to level 2: [up, skip]
            _conv(3 * f, f, full), _conv(f, f, full),  # up to level 1: [up, skip]
            _conv(f, 2 * f, zonly), _conv(2 * f, 2 * f, zonly),  # z reduction
            _conv(2 * f, 2 * f, zonly), _conv(2 * f, 2 * f, zonly),
            _conv(2 * f, 1, (1, 1, 1)),
        ])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        relu, pool, zpool = torch.relu, nn.functional.max_pool3d, lambda t: nn.functional.max_pool3d(t, (2, 1, 1))
        up = lambda t: nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        l1 = relu(c[1](relu(c[0](x))))
        l2 = relu(c[3](relu(c[2](pool(l1, 2)))))
        bottom = relu(c[5](relu(c[4](pool(l2, 2)))))
        u2 = relu(c[7](relu(c[6](torch.cat([up(bottom), l2], dim=1)))))
        u1 = relu(c[9](relu(c[8](torch.cat([up(u2), l1], dim=1)))))
        z = relu(c[11](relu(c[10](zpool(u1)))))
        z = relu(c[13](relu(c[12](zpool(z)))))
        return c[14](zpool(z))


def load_h5(path: Path | str) -> AstocNoduleNet:
    """The network with the Keras weights, in eval mode.

    Theano's conv3d is a true convolution (kernel flipped), PyTorch's a cross-correlation: every
    kernel is flipped along its three spatial axes. The file's ``layer_names`` attribute is checked
    against :data:`CONV_LAYERS`, so a different file fails loudly instead of loading shuffled.
    """
    model = AstocNoduleNet()
    with h5py.File(path, "r") as f:
        names = [n.decode() for n in f.attrs["layer_names"] if n.decode().startswith("convolution3d")]
        if tuple(names) != CONV_LAYERS:
            raise ValueError(f"{path}: unexpected layers {names}")
        for conv, name in zip(model.convs, CONV_LAYERS):
            weight = np.asarray(f[name][f"{name}_W"])[:, :, ::-1, ::-1, ::-1].copy()
            bias = np.asarray(f[name][f"{name}_b"])
            if weight.shape != tuple(conv.weight.shape):
                raise ValueError(f"{path}: {name} has shape {weight.shape}, expected {tuple(conv.weight.shape)}")
            conv.weight.data = torch.from_numpy(weight)
            conv.bias.data = torch.from_numpy(bias)
    return model.eval()


def export_onnx(model: AstocNoduleNet, path: Path) -> None:
    example = torch.zeros(2, 1, SLICES, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 3: "height", 4: "width"}, OUTPUT_NAME: {0: "batch", 3: "height", 4: "width"}},
            dynamo=False,
        )  # fmt: skip


def parity(model: AstocNoduleNet, onnx_path: Path, crops: np.ndarray) -> float:
    """Largest |ONNX Runtime - PyTorch| logit on ``crops`` ``(N, 1, 8, H, W)``."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {INPUT_NAME: crops.astype(np.float32)})
    with torch.no_grad():
        torch_out = model(torch.from_numpy(crops.astype(np.float32))).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lungscreen.training.astoc_port", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, required=True, help="d8_2x2x2_best_weights.h5")
    p.add_argument("--out", type=Path, required=True, help="folder for model.onnx")
    args = p.parse_args(argv)
    model = load_h5(args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "model.onnx"
    export_onnx(model, onnx_path)
    rng = np.random.default_rng(0)
    for shape in ((3, 1, SLICES, 64, 64), (1, 1, SLICES, 48, 80)):
        diff = parity(model, onnx_path, rng.uniform(-0.03, 0.97, shape))
        print(f"ONNX Runtime vs PyTorch, crops {shape}: max |diff| {diff:.2e}")
        if diff > PARITY_TOLERANCE:
            raise SystemExit(f"ONNX Runtime and PyTorch disagree by {diff}")
    print(f"wrote {onnx_path}")


if __name__ == "__main__":
    main()
