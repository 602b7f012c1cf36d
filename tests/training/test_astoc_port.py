"""The second stage's port: Keras (Theano) weights -> PyTorch -> the committed ONNX file, which
ONNX Runtime must run as PyTorch does, on real CT crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py")

from lungscreen.models.second_stage import crops_lps  # noqa: E402
from lungscreen.training.astoc_port import AstocNoduleNet, load_h5, parity  # noqa: E402

ONNX = Path(__file__).resolve().parents[2] / "models" / "astoc_dsb2017" / "model.onnx"
LIDC_NODULE_LPS = (56.21, 86.34, -115.87)  # LUNA16's nodule of LIDC-IDRI-0001 (23 mm)
LIDC_LUNG_LPS = (-80.0, 20.0, -150.0)  # right lung parenchyma, far from any reader mark


@pytest.fixture(scope="module")
def torch_model(shared_data: Path) -> AstocNoduleNet:
    return load_h5(shared_data / "weights" / "astoc_dsb2017" / "d8_2x2x2_best_weights.h5")


def test_onnx_runtime_agrees_with_pytorch_on_real_crops(torch_model, lidc_series_dir: Path) -> None:
    from lungscreen.dicom_io.volume import read_series_volume

    volume = read_series_volume(sorted(lidc_series_dir.glob("*.dcm")))
    crops = crops_lps(volume.voxels, volume.affine, np.array([LIDC_NODULE_LPS, LIDC_LUNG_LPS]))
    assert crops.shape == (2, 1, 8, 64, 64)
    assert parity(torch_model, ONNX, crops) < 1e-3
    # And the port does what FACTS.md measured: the nodule is seen, the lung around it is not.
    import torch

    with torch.no_grad():
        logits = torch_model(torch.from_numpy(crops)).numpy()[:, 0, 0]
    assert logits[0, 28:37, 28:37].max() > 0 > logits[1, 28:37, 28:37].max()


def test_onnx_runtime_agrees_with_pytorch_at_another_crop_size(torch_model) -> None:
    crops = np.random.default_rng(1).uniform(-0.03, 0.97, (1, 1, 8, 48, 80)).astype(np.float32)
    assert parity(torch_model, ONNX, crops) < 1e-3


def test_a_different_weights_file_is_refused(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"convolution3d_1"])
    with pytest.raises(ValueError, match="unexpected layers"):
        load_h5(path)
