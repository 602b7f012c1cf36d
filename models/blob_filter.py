"""A fixed-weight, untrained blob detector exported to ONNX: the bundled test model.

It is a scale-normalised difference-of-Gaussians filter bank (Lindeberg 1998): for a bright
sphere of radius ``r`` the response ``-sigma^2 * laplacian(G_sigma * image)`` peaks at its
centre when ``sigma = r / sqrt(3)``. Each output channel is one scale, i.e. one nodule
diameter, and the card's ``multiscale_heatmap`` decoding turns the peaks into candidates.

It really finds spheres in a CT, which is what the end-to-end path needs to be tested with
real ONNX Runtime, but it knows nothing of vessels: it is not a clinical detector. The
trained detector of ``training/`` replaces it as the default model.

Build with ``python -m lungscreen.models.blob_filter OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Ratio between the inner and outer Gaussian of one difference-of-Gaussians band; 1.6
# is the classic value at which DoG approximates the Laplacian of Gaussian well.
DOG_RATIO = 1.6
SPACING_MM = 2.0
SCALE_DIAMETERS_MM = (3.1, 5.0, 8.0, 12.8, 20.5, 32.8)  # a geometric ladder, ratio DOG_RATIO


def _gaussian_kernel(sigma_vox: float) -> np.ndarray:
    radius = max(1, math.ceil(3.0 * sigma_vox))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma_vox) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _separable_blur(graph_nodes: list, initializers: list, source: str, sigma_vox: float, tag: str) -> str:
    """Append three 1D convolutions (one per axis) blurring ``source``; return the output name."""
    kernel = _gaussian_kernel(sigma_vox)
    radius = len(kernel) // 2
    current = source
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        weight_name = f"{tag}_w{axis}"
        initializers.append(numpy_helper.from_array(kernel.reshape(shape), weight_name))
        # Edge padding, not Conv's zero padding: zeros (air) next to a body cut by the
        # first or last slice would look like a bright blob.
        pads = [0] * 10
        pads[2 + axis] = pads[7 + axis] = radius
        pads_name = f"{tag}_p{axis}"
        initializers.append(numpy_helper.from_array(np.array(pads, np.int64), pads_name))
        padded = f"{tag}_padded{axis}"
        graph_nodes.append(helper.make_node("Pad", [current, pads_name], [padded], mode="edge"))
        out = f"{tag}_a{axis}"
        graph_nodes.append(helper.make_node("Conv", [padded, weight_name], [out]))
        current = out
    return current


def build_model(scale_diameters_mm=SCALE_DIAMETERS_MM, spacing_mm: float = SPACING_MM) -> onnx.ModelProto:
    """The DoG filter bank as an ONNX graph: input (1, 1, X, Y, Z) -> output (1, S, X, Y, Z)."""
    # Outer sigma of band n equals inner sigma of band n+1 only for a geometric ladder, but
    # blurring incrementally from the previous level works for any increasing sequence.
    sigmas_mm = []
    for d in scale_diameters_mm:
        sigma = d / 2.0 / math.sqrt(3.0)
        sigmas_mm.append((sigma / math.sqrt(DOG_RATIO), sigma * math.sqrt(DOG_RATIO), sigma))
    levels_mm = sorted({round(s, 6) for inner, outer, _ in sigmas_mm for s in (inner, outer)})

    nodes: list = []
    inits: list = []
    blurred: dict[float, str] = {}
    current, current_sigma = "image", 0.0
    for i, level in enumerate(levels_mm):
        step_sigma_vox = math.sqrt(level**2 - current_sigma**2) / spacing_mm
        current = _separable_blur(nodes, inits, current, step_sigma_vox, f"g{i}")
        current_sigma = level
        blurred[level] = current

    bands = []
    for n, (inner, outer, sigma) in enumerate(sigmas_mm):
        # (G(inner) - G(outer)) ~ (ratio - 1) * sigma^2 * -laplacian(G): already scale-normalised
        # up to the constant 1 / (ratio - 1).
        diff = f"dog{n}"
        nodes.append(helper.make_node("Sub", [blurred[round(inner, 6)], blurred[round(outer, 6)]], [diff]))
        scale_name = f"dog{n}_scale"
        inits.append(numpy_helper.from_array(np.array(1.0 / (DOG_RATIO - 1.0), np.float32), scale_name))
        band = f"band{n}"
        nodes.append(helper.make_node("Mul", [diff, scale_name], [band]))
        bands.append(band)
    nodes.append(helper.make_node("Concat", bands, ["scores"], axis=1))

    dims = ["batch", 1, "x", "y", "z"]
    graph = helper.make_graph(
        nodes,
        "lungscreen_blob_filter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", len(bands), "x", "y", "z"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lungscreen")
    model.ir_version = 8  # readable by every ONNX Runtime still supported
    onnx.checker.check_model(model)
    return model


def model_card(onnx_file: str) -> dict:
    """The card of the blob filter; its calibration is a fixed logistic, not fitted on data."""
    return {
        "schema_version": 1,
        "name": "lungscreen-blob-filter",
        "version": "1.0.0",
        "description": (
            "Fixed-weight scale-normalised difference-of-Gaussians filter bank. Untrained: it finds "
            "bright spheres and is used to test the DICOM path end to end. Not a clinical detector."
        ),
        "intended_use": "Research use only. Not for diagnostic use. A pipeline test model, not a trained detector.",
        "onnx_file": onnx_file,
        "training_data": "none (fixed weights)",
        "metrics": [],
        "preprocessing": {
            "orientation": "RAS",
            "spacing_mm": [SPACING_MM] * 3,
            "intensity_window": {"hu_min": -1000.0, "hu_max": 400.0, "out_min": 0.0, "out_max": 1.0},
        },
        "inference": {"input_name": "image", "patch_size": [160, 160, 160], "overlap": 0.25},
        "decoding": {
            "kind": "multiscale_heatmap",
            "scale_diameters_mm": list(SCALE_DIAMETERS_MM),
            "min_score": 0.05,
            "nms_radius_mm": 6.0,
            "max_candidates": 50,
        },
        # A solid nodule (about 0 HU in lung at -850 HU) gives a band response of about 0.25-0.35
        # in this window; the logistic puts p = 0.5 at a response of 0.15.
        "calibration": {"method": "platt", "a": 40.0, "b": -6.0},
        "operating_points": {
            "screening": {"threshold": 0.5, "description": "fixed threshold of the test model (not chosen on data)"},
            "high-sensitivity": {"threshold": 0.2, "description": "fixed threshold of the test model (not chosen on data)"},
        },
        "default_operating_point": "screening",
    }


def write_model(out_dir: Path) -> Path:
    """Write ``blob_filter.onnx`` and ``model_card.json`` into ``out_dir``; return the card path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(), out_dir / "blob_filter.onnx")
    card_path = out_dir / "model_card.json"
    card_path.write_text(json.dumps(model_card("blob_filter.onnx"), indent=2) + "\n")
    return card_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    print(write_model(parser.parse_args().out_dir))
