"""Readers of annotated CT for training and evaluation, each returning :class:`Scan`.

* LUNA16: MetaImage ``.mhd`` (+ ``.raw``) volumes and ``annotations.csv`` (world LPS mm).
  SimpleITK is not a dependency: :func:`read_metaimage` parses the small text header itself.
* DICOM series + a LUNA16-style CSV keyed by SeriesInstanceUID, read by the server's own
  :func:`dicom_io.volume.read_series_volume`.
* NRRD (e.g. pyradiomics' ``lung1``), a nodule given as a label mask, and NIfTI via nibabel.
* Lung-PET-CT-Dx: a DICOM series with tumour bounding boxes (PASCAL VOC XML per slice).
"""

from __future__ import annotations

import csv
import gzip
import zlib
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from scipy import ndimage

from lungscreen.dicom_io.volume import read_series_volume
from lungscreen.training.scan import Nodule, Scan

METAIMAGE_TYPES = {
    "MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
    "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}  # fmt: skip
NRRD_TYPES = {
    "short": np.int16, "int16": np.int16, "signed short": np.int16, "ushort": np.uint16, "unsigned short": np.uint16,
    "uchar": np.uint8, "unsigned char": np.uint8, "char": np.int8, "int": np.int32, "int32": np.int32,
    "float": np.float32, "double": np.float64,
}  # fmt: skip
# NIfTI affines are RAS; LungScreen's are LPS.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine_kji(direction: np.ndarray, spacing_ijk: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The ``(k, j, i, 1) -> LPS`` affine from an ITK-style direction (columns = i, j, k axes)."""
    affine = np.eye(4)
    for column, axis in zip(range(3), (2, 1, 0)):
        affine[:3, column] = direction[:, axis] * spacing_ijk[axis]
    affine[:3, 3] = origin
    return affine


def read_metaimage(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A MetaImage (``.mhd`` + data file, or ``.mha``) as float32 ``[k, j, i]`` and its LPS affine."""
    path = Path(path)
    raw = path.read_bytes()
    header: dict[str, str] = {}
    offset = 0
    for line in raw.split(b"\n"):
        offset += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    dims = [int(v) for v in header["DimSize"].split()]
    if len(dims) != 3:
        raise ValueError(f"{path}: only 3D MetaImages are supported, DimSize is {dims}")
    spacing = np.array([float(v) for v in header.get("ElementSpacing", "1 1 1").split()])
    origin = np.array([float(v) for v in header.get("Offset", header.get("Position", "0 0 0")).split()])
    # ITK writes the direction matrix transposed (column by column) into TransformMatrix.
    direction = np.array([float(v) for v in header.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]).reshape(3, 3).T
    dtype = np.dtype(METAIMAGE_TYPES[header["ElementType"]])
    msb = header.get("ElementByteOrderMSB", header.get("BinaryDataByteOrderMSB", "False")).lower() == "true"
    dtype = dtype.newbyteorder(">" if msb else "<")
    data_file = header["ElementDataFile"]
    data = raw[offset:] if data_file == "LOCAL" else (path.parent / data_file).read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        data = zlib.decompress(data)
    voxels = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims))).reshape(dims[::-1]).astype(np.float32)
    return voxels, _affine_kji(direction, spacing, origin)


def read_luna16_annotations(csv_path: Path | str) -> dict[str, tuple[Nodule, ...]]:
    """``seriesuid -> nodules`` from a LUNA16 ``annotations.csv`` (world LPS mm, diameter mm)."""
    nodules: dict[str, list[Nodule]] = defaultdict(list)
    with Path(csv_path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
            nodules[row["seriesuid"]].append(Nodule(centre, float(row["diameter_mm"])))
    return {uid: tuple(v) for uid, v in nodules.items()}


class Luna16Folder:
    """A LUNA16 folder: every ``*.mhd`` under it (subsets included) and ``annotations.csv``.

    Scans are read one at a time (:meth:`scan`), since the 888 LUNA16 volumes do not fit in memory.
    """

    def __init__(self, folder: Path | str, annotations: Path | str | None = None) -> None:
        folder = Path(folder)
        self.paths = sorted(folder.rglob("*.mhd"))
        self.nodules = read_luna16_annotations(annotations or folder / "annotations.csv")

    def __len__(self) -> int:
        return len(self.paths)

    def scan(self, index: int) -> Scan:
        path = self.paths[index]
        voxels, affine = read_metaimage(path)
        return Scan(path.stem, voxels, affine, self.nodules.get(path.stem, ()))


def read_luna16(folder: Path | str, annotations: Path | str | None = None) -> Iterator[Scan]:
    """Every LUNA16 scan under ``folder`` with its nodules, in name order, read lazily."""
    luna = Luna16Folder(folder, annotations)
    for index in range(len(luna)):
        yield luna.scan(index)


def read_dicom_csv(root: Path | str, csv_path: Path | str | None = None) -> Iterator[Scan]:
    """Each folder under ``root`` holding a DICOM series, with nodules from a LUNA16-style CSV.

    The CSV's ``seriesuid`` is the SeriesInstanceUID (as :func:`training.synthetic.make_dataset`
    writes it); a series without rows has no nodules.
    """
    root = Path(root)
    table = read_luna16_annotations(csv_path or root / "annotations.csv")
    folders = sorted({p.parent for p in root.rglob("*.dcm")})
    for folder in folders:
        volume = read_series_volume(sorted(folder.glob("*.dcm")))
        uid = volume.series_instance_uid
        yield Scan(folder.name, volume.voxels, volume.affine, table.get(uid, ()))


def read_nrrd(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NRRD (raw or gzip, attached data, LPS or RAS space) as ``[k, j, i]`` and LPS affine."""
    raw = Path(path).read_bytes()
    head, _, data = raw.partition(b"\n\n")
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.lstrip("=").strip()
    sizes = [int(v) for v in fields["sizes"].split()]
    directions = np.array(
        [[float(x) for x in vec.strip("()").split(",")] for vec in fields["space directions"].split()]
    ).T  # columns = i, j, k axes, scaled by spacing
    origin = np.array([float(x) for x in fields.get("space origin", "(0,0,0)").strip("()").split(",")])
    space = fields.get("space", "left-posterior-superior")
    if space in ("right-anterior-superior", "RAS"):
        directions[:2] *= -1
        origin[:2] *= -1
    elif space not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"{path}: unsupported NRRD space {space!r}")
    if fields.get("encoding", "raw") in ("gzip", "gz"):
        data = gzip.decompress(data)
    elif fields.get("encoding", "raw") != "raw":
        raise ValueError(f"{path}: unsupported NRRD encoding {fields['encoding']!r}")
    dtype = np.dtype(NRRD_TYPES[fields["type"]]).newbyteorder(">" if fields.get("endian") == "big" else "<")
    voxels = np.frombuffer(data, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes[::-1]).astype(np.float32)
    spacing = np.linalg.norm(directions, axis=0)
    return voxels, _affine_kji(directions / spacing, spacing, origin)


def nodule_from_mask(mask: np.ndarray, affine: np.ndarray) -> Nodule:
    """Centroid (LPS) and equivalent-sphere diameter of the largest component of a label mask."""
    labels, n = ndimage.label(mask > 0)
    if n == 0:
        raise ValueError("the nodule mask is empty")
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    kji = np.argwhere(labels == largest).mean(axis=0)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    volume = float((labels == largest).sum()) * voxel_mm3
    diameter = (6.0 * volume / np.pi) ** (1.0 / 3.0)
    return Nodule(tuple(float(v) for v in affine[:3, :3] @ kji + affine[:3, 3]), diameter)


def read_nrrd_with_mask(image: Path | str, mask: Path | str, name: str | None = None) -> Scan:
    voxels, affine = read_nrrd(image)
    label, _ = read_nrrd(mask)
    return Scan(name or Path(image).stem, voxels, affine, (nodule_from_mask(label, affine),))


def read_lung_dx(series_dirs: Sequence[Path], annotations_dir: Path, name: str) -> Scan:
    """A Lung-PET-CT-Dx CT (the first of ``series_dirs``) with its tumour boxes as one lesion.

    The boxes (PASCAL VOC, one XML per annotated slice, named by SOPInstanceUID) may sit on the
    slices of any of the study's series of the same geometry; a slice is found by its z position.
    The lesion is the sphere around the boxes' centre whose diameter is the boxes' largest extent,
    so that a finding anywhere on the tumour counts as on it.
    """
    volume = read_series_volume(sorted(series_dirs[0].rglob("*.dcm")))
    z_of_sop: dict[str, float] = {}
    for folder in series_dirs:
        for path in folder.rglob("*.dcm"):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            z_of_sop[str(header.SOPInstanceUID)] = float(header.ImagePositionPatient[2])
    slice_z = volume.affine[2, 0] * np.arange(volume.voxels.shape[0]) + volume.affine[2, 3]
    corners = []
    for xml in sorted(annotations_dir.glob("*.xml")):
        k = int(np.argmin(np.abs(slice_z - z_of_sop[xml.stem])))
        for box in ET.parse(xml).getroot().iter("bndbox"):
            cols = (float(box.findtext("xmin")), float(box.findtext("xmax")))
            rows = (float(box.findtext("ymin")), float(box.findtext("ymax")))
            corners += [volume.affine[:3, :3] @ (k, r, c) + volume.affine[:3, 3] for r in rows for c in cols]
    if not corners:
        raise ValueError(f"{annotations_dir}: no tumour boxes")
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    lesion = Nodule(tuple(float(v) for v in (lo + hi) / 2), float(np.max(hi - lo)))
    return Scan(name, volume.voxels, volume.affine, (lesion,))


def read_nifti(path: Path | str, name: str | None = None) -> Scan:
    """A NIfTI CT (HU) without nodules, e.g. a negative control."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)  # [i, j, k]
    ijk_to_lps = RAS_TO_LPS @ img.affine
    affine = np.eye(4)
    affine[:3, :3] = ijk_to_lps[:3, [2, 1, 0]]
    affine[:3, 3] = ijk_to_lps[:3, 3]
    return Scan(name or Path(path).name.split(".")[0], np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
