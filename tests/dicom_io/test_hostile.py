"""Hostile and broken input: parsing and volume assembly never fail with anything but a clear error.

Property-based (hypothesis): whatever is done to the headers or bytes of a small valid CT
series, assembling it either gives a finite volume or raises :class:`VolumeError` with a
message; indexing a study never raises at all.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corruption import DAMAGED_SLICE, damaged
from lungscreen.errors import VolumeError
from lungscreen.dicom_io.select import choose_series
from lungscreen.dicom_io.study import index_study
from lungscreen.dicom_io.volume import read_series_volume
from lungscreen.training.dicom_writer import write_ct_series

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def series_bytes() -> tuple[bytes, ...]:
    """A small valid CT series, as file bytes (not a fixture: hypothesis would print it)."""
    hu = np.random.default_rng(0).normal(-800, 50, (12, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        written = write_ct_series(hu, (2.0, 0.8, 0.8), Path(folder))
        return tuple(p.read_bytes() for p in written.paths)


def write_all(folder: Path, blobs: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, blob in enumerate(blobs):
        paths.append(folder / f"{n:03d}.dcm")
        paths[-1].write_bytes(blob)
    return paths


def assemble_or_clear_error(paths: list[Path]) -> None:
    try:
        volume = read_series_volume(paths)
    except VolumeError as exc:
        assert str(exc), "an error says what is wrong"
        return
    assert np.isfinite(volume.voxels).all() and np.isfinite(volume.affine).all()


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**31), 2**31), st.just(0), st.just(-1e-12)
)
MUTATIONS = {
    "ImagePositionPatient": st.lists(numbers, min_size=0, max_size=4),
    "ImageOrientationPatient": st.lists(numbers, min_size=0, max_size=7),
    "PixelSpacing": st.lists(numbers, min_size=0, max_size=3),
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 64),
    "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.integers(-1, 10_000),
    "RescaleSlope": numbers,
    "RescaleIntercept": numbers,
    "PixelPaddingValue": st.integers(-(2**15), 2**16 - 1),
    "GantryDetectorTilt": numbers,
    "PixelData": st.binary(max_size=64),
}


def _set(ds: pydicom.Dataset, keyword: str, value) -> None:
    if isinstance(value, list):
        value = [v if not isinstance(v, float) or math.isfinite(v) else str(v) for v in value]
    try:
        setattr(ds, keyword, value)
    except (ValueError, TypeError, OverflowError):
        ds.pop(keyword, None)


@FUZZ
@given(
    slice_index=st.integers(0, 11),
    keyword=st.sampled_from(sorted(MUTATIONS)),
    data=st.data(),
    everywhere=st.booleans(),
)
def test_mutated_headers_give_a_volume_or_a_clear_error(tmp_path, slice_index, keyword, data, everywhere):
    value = data.draw(MUTATIONS[keyword])
    paths = write_all(tmp_path / f"case-{keyword}-{slice_index}-{abs(hash(str(value))) % 10**8}", list(series_bytes()))
    for n in range(len(paths)) if everywhere else [slice_index]:
        ds = pydicom.dcmread(paths[n])
        _set(ds, keyword, value)
        try:
            ds.save_as(paths[n], enforce_file_format=False)
        except Exception:
            paths[n].write_bytes(b"unwritable mutation")
    assemble_or_clear_error(paths)


@FUZZ
@given(**DAMAGED_SLICE)
@example(slice_index=0, cut=0, flips=[951])  # a corrupt VR in ImagePositionPatient, parsed on first access
def test_truncated_or_corrupted_bytes_give_a_clear_error(tmp_path, slice_index, cut, flips):
    blobs = list(series_bytes())
    blobs[slice_index] = damaged(blobs[slice_index], cut, flips)
    paths = write_all(tmp_path / f"case-{slice_index}-{cut}-{abs(hash(tuple(flips))) % 10**8}", blobs)
    assemble_or_clear_error(paths)
    index = index_study(paths)  # never raises; unreadable files are listed
    assert len(index.unreadable) + sum(len(s.paths) for s in index.series) == len(paths)
    choice = choose_series(index.series)  # never raises: a series it cannot use is rejected with a reason
    assert all(rejection.reason for rejection in choice.rejected)


@FUZZ
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=5))
def test_random_bytes_are_unreadable_files_not_crashes(tmp_path, blobs):
    folder = tmp_path / f"junk-{abs(hash(tuple(blobs))) % 10**10}"
    index = index_study(write_all(folder, [b"\0" * 128 + b"DICM" + b for b in blobs]))
    assert all(u.reason for u in index.unreadable)


def test_huge_declared_dimensions_do_not_allocate(tmp_path):
    paths = write_all(tmp_path / "huge", list(series_bytes()))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 65535
        ds.save_as(path, enforce_file_format=False)
    try:
        read_series_volume(paths)
    except VolumeError as exc:
        assert "65535" in str(exc) or "pixel data" in str(exc).lower()
    else:
        raise AssertionError("a 65535 x 65535 image with 2 KiB of pixel data was accepted")


def test_a_corrupt_series_uid_is_a_clear_error(tmp_path):
    """Found by the fuzzing above: the series UIDs are compared before any frame header is built."""
    blobs = list(series_bytes())
    at = blobs[0].find(b"\x20\x00\x0e\x00UI")  # (0020,000E) SeriesInstanceUID, explicit VR
    assert at > 0
    blobs[0] = blobs[0][: at + 5] + bytes([ord("I") ^ 0xFF]) + blobs[0][at + 6 :]  # VR "U\xb6"
    with pytest.raises(VolumeError, match="SeriesInstanceUID cannot be parsed"):
        read_series_volume(write_all(tmp_path / "series", blobs))


def test_a_slice_without_sop_instance_uid_is_a_clear_error(tmp_path):
    """Found by fuzzing the pipeline: the report stage was the first to need the UID."""
    paths = write_all(tmp_path / "series", list(series_bytes()))
    ds = pydicom.dcmread(paths[3])
    del ds.SOPInstanceUID
    ds.save_as(paths[3], enforce_file_format=False)
    with pytest.raises(VolumeError, match="no SOPInstanceUID"):
        read_series_volume(paths)
