"""Readers: MetaImage (LUNA16), NRRD with a mask, NIfTI, LUNA16 annotations."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lungscreen.training.readers import read_luna16, read_metaimage, read_nifti, read_nrrd, read_nrrd_with_mask

SHAPE_KJI = (4, 5, 6)


def _volume() -> np.ndarray:
    return np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI) - 1000


def _write_mhd(folder: Path, uid: str, *, local: bool = False) -> None:
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -10 -20 -30\nElementSpacing = 0.7 0.8 2.5\n"
        "DimSize = 6 5 4\nElementType = MET_SHORT\n"
    )
    data = _volume().astype("<i2").tobytes()
    if local:
        (folder / f"{uid}.mhd").write_bytes((header + "ElementDataFile = LOCAL\n").encode() + data)
    else:
        (folder / f"{uid}.mhd").write_text(header + f"ElementDataFile = {uid}.raw\n")
        (folder / f"{uid}.raw").write_bytes(data)


@pytest.mark.parametrize("local", [False, True])
def test_metaimage_voxels_and_affine(tmp_path: Path, local: bool) -> None:
    _write_mhd(tmp_path, "1.2.3", local=local)
    voxels, affine = read_metaimage(tmp_path / "1.2.3.mhd")
    np.testing.assert_array_equal(voxels, _volume())
    # LPS of voxel (k, j, i) = offset + (i * 0.7, j * 0.8, k * 2.5)
    np.testing.assert_allclose(affine @ [3, 2, 1, 1], [-10 + 0.7, -20 + 1.6, -30 + 7.5, 1])


def test_luna16_folder(tmp_path: Path) -> None:
    (tmp_path / "subset0").mkdir()
    _write_mhd(tmp_path / "subset0", "1.2.3")
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,-8,-18,-25,6.5\n")
    (scan,) = list(read_luna16(tmp_path))
    assert scan.name == "1.2.3"
    assert scan.nodules[0].center_lps_mm == (-8.0, -18.0, -25.0)
    assert scan.nodules[0].diameter_mm == 6.5


def _write_nrrd(path: Path, data: np.ndarray) -> None:
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 6 5 4\n"
        "space directions: (0.5,0,0) (0,0.5,0) (0,0,5)\nkinds: domain domain domain\nendian: little\n"
        "encoding: gzip\nspace origin: (-146,-325,-777.5)\n\n"
    )
    path.write_bytes(header.encode() + gzip.compress(data.astype("<i2").tobytes()))


def test_nrrd_and_mask_nodule(tmp_path: Path) -> None:
    _write_nrrd(tmp_path / "image.nrrd", _volume())
    mask = np.zeros(SHAPE_KJI, np.int16)
    mask[2, 1:4, 2:5] = 1  # centroid (k, j, i) = (2, 2, 3)
    _write_nrrd(tmp_path / "label.nrrd", mask)
    voxels, affine = read_nrrd(tmp_path / "image.nrrd")
    np.testing.assert_array_equal(voxels, _volume())
    scan = read_nrrd_with_mask(tmp_path / "image.nrrd", tmp_path / "label.nrrd")
    np.testing.assert_allclose(scan.nodules[0].center_lps_mm, (-146 + 1.5, -325 + 1.0, -777.5 + 10.0))
    volume = 9 * 0.5 * 0.5 * 5
    assert scan.nodules[0].diameter_mm == pytest.approx((6 * volume / np.pi) ** (1 / 3))


def test_nifti_to_lps(tmp_path: Path) -> None:
    data_ijk = _volume().transpose(2, 1, 0).astype(np.int16)
    ras = np.diag([-1.5, -1.5, 1.5, 1.0])  # LPS-stored NIfTI: i to the left, j posterior
    ras[:3, 3] = (100.0, 50.0, -20.0)
    nib.save(nib.Nifti1Image(data_ijk, ras), tmp_path / "ct.nii.gz")
    scan = read_nifti(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(scan.voxels, _volume())
    # voxel (k, j, i) = (1, 2, 3): RAS (100 - 4.5, 50 - 3, -20 + 1.5) -> LPS (-95.5, -47, -18.5)
    np.testing.assert_allclose(scan.affine @ [1, 2, 3, 1], [-95.5, -47.0, -18.5, 1.0])
