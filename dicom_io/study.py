"""Assemble the study: read the headers of a study's stored instances and group them by series.

Headers only (``stop_before_pixels``): pixels are decoded once, later, for the one series
that is selected. Files that cannot be read are reported, not fatal. Which series is
analysed is decided elsewhere (:mod:`dicom_io.select`); a series' geometry is validated
once, here, by :func:`dicom_io.volume.stack_geometry`, and reused by both the selection and
:func:`dicom_io.volume.read_series_volume`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pydicom
from pydicom import dcmread

from lungscreen.dicom_io.volume import FrameHeader, StackGeometry, frame_headers, stack_geometry


@dataclass(frozen=True)
class SeriesCandidate:
    """The instances of one series: paths and their headers (read without pixel data)."""

    series_instance_uid: str
    paths: tuple[Path, ...]
    headers: tuple[pydicom.Dataset, ...]

    def __post_init__(self) -> None:
        if not self.headers:
            raise ValueError(f"series {self.series_instance_uid} has no instances")
        if len(self.paths) != len(self.headers):
            raise ValueError(f"{len(self.paths)} paths for {len(self.headers)} headers")
        foreign = {str(h.get("SeriesInstanceUID", "")) for h in self.headers} - {self.series_instance_uid}
        if foreign:
            raise ValueError(f"headers of series {sorted(foreign)} given as series {self.series_instance_uid}")

    @cached_property
    def frames(self) -> tuple[tuple[FrameHeader, ...], ...]:
        """The frame headers of each instance (built once: the selection checks them and
        ``read_series_volume`` stacks them).

        Raises:
            VolumeError: as :func:`dicom_io.volume.frame_headers`.
        """
        return tuple(frame_headers(header) for header in self.headers)

    @cached_property
    def geometry(self) -> StackGeometry:
        """The validated geometry of all frames, in instance order (built once: the selection
        judges it and ``read_series_volume`` stacks the slices by it).

        Raises:
            VolumeError: as :func:`dicom_io.volume.frame_headers` and
                :func:`dicom_io.volume.stack_geometry`.
        """
        return stack_geometry([frame for file_frames in self.frames for frame in file_frames])

    @property
    def frame_count(self) -> int:
        """Slices in the series: one per single-frame instance, NumberOfFrames per multi-frame one.

        Raises:
            VolumeError: as :attr:`frames`.
        """
        return sum(len(file_frames) for file_frames in self.frames)

    @property
    def series_description(self) -> str:
        """SeriesDescription, ``""`` when absent or unreadable (it only names the series)."""
        try:
            return str(self.headers[0].get("SeriesDescription", "") or "")
        except Exception:  # pydicom parses values on first access: a corrupt element fails here
            return ""

    @property
    def series_number(self) -> int | None:
        """SeriesNumber, None when absent or unreadable (it only names the series)."""
        try:
            value = self.headers[0].get("SeriesNumber")
            return None if value is None or value == "" else int(value)
        except Exception:
            return None

    @property
    def label(self) -> str:
        """How a reason names the series: ``series 3`` or, without SeriesNumber, by UID."""
        number = self.series_number
        return f"series {number}" if number is not None else f"series {self.series_instance_uid}"


@dataclass(frozen=True)
class UnreadableFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class StudyIndex:
    study_instance_uid: str | None  # None when no header could be read
    series: tuple[SeriesCandidate, ...]
    unreadable: tuple[UnreadableFile, ...]


def reference_header(path: Path) -> pydicom.Dataset:
    """The four UIDs an instance is referenced by (an SR's evidence, PS3.3 C.17.2.3) and recorded
    by (the job store), read without the rest of its header."""
    return dcmread(path, stop_before_pixels=True,
                   specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"])


def series_references(paths: Iterable[Path], study_uid: str, series_uid: str) -> list[pydicom.Dataset]:
    """The instances of series ``series_uid`` of study ``study_uid`` among ``paths``, each as its
    :func:`reference_header`, in path order (a follow-up references the prior's series without
    indexing the prior again)."""
    found = []
    for path in sorted(Path(p) for p in paths):
        try:
            header = reference_header(path)
        except Exception:  # pydicom raises many exception types; an unreadable file is no evidence
            continue
        if str(header.get("StudyInstanceUID", "")) == study_uid and str(header.get("SeriesInstanceUID", "")) == series_uid:
            found.append(header)
    return found


def index_study(paths: Iterable[Path]) -> StudyIndex:
    """Group the readable instances by SeriesInstanceUID (ordered by path, i.e. deterministic)."""
    grouped: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    unreadable = []
    study_uids = set()
    for path in sorted(Path(p) for p in paths):
        try:
            header = dcmread(path, stop_before_pixels=True)
            series_uid = str(header.SeriesInstanceUID)
            study_uids.add(str(header.StudyInstanceUID))
        except Exception as exc:  # pydicom raises many exception types for files it cannot parse
            unreadable.append(UnreadableFile(path, f"unreadable DICOM file {path.name}: {type(exc).__name__}: {exc}"))
            continue
        grouped[series_uid].append((path, header))
    series = tuple(
        SeriesCandidate(series_instance_uid=uid, paths=tuple(p for p, _ in items), headers=tuple(h for _, h in items))
        for uid, items in sorted(grouped.items())
    )
    study_uid = sorted(study_uids)[0] if study_uids else None
    return StudyIndex(study_instance_uid=study_uid, series=series, unreadable=tuple(unreadable))
