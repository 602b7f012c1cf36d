"""Assemble the study: read the headers of a study's stored instances and group them by series.

Headers only (``stop_before_pixels``): pixels are decoded once, later, for the one series
that is selected. Files that cannot be read are reported, not fatal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydicom import dcmread

from lungscreen.dicom_io.select import SeriesCandidate


@dataclass(frozen=True)
class UnreadableFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class StudyIndex:
    study_instance_uid: str | None  # None when no header could be read
    series: tuple[SeriesCandidate, ...]
    unreadable: tuple[UnreadableFile, ...]


def index_study(paths: Iterable[Path]) -> StudyIndex:
    """Group the readable instances by SeriesInstanceUID (ordered by path, i.e. deterministic)."""
    grouped: dict[str, list[tuple[Path, object]]] = defaultdict(list)
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
