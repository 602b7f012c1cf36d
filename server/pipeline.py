"""The analysis pipeline, stage by stage, for one study:

assemble the study -> select the series -> build the volume -> preprocess -> detect ->
calibrate and apply clinical rules -> report (SR, billing item).

Pure with respect to the server: files in, an :class:`AnalysisResult` out. The server
(``server/app.py``) and ``lungscreen analyze`` both call :func:`analyze_study`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pydicom import Dataset

from lungscreen.errors import NotEligible, VolumeError
from lungscreen.dicom_io.presentation import build_gsps
from lungscreen.dicom_io.select import SelectionRules, SeriesRejection, choose_series
from lungscreen.dicom_io.sr import AlgorithmIdentity, BillingCodes, build_sr, main_exam_procedure
from lungscreen.dicom_io.study import index_study
from lungscreen.dicom_io.volume import Volume, read_series_volume
from lungscreen.models.detector import Detector, to_source_candidates
from lungscreen.findings import Finding, NoduleReport
from lungscreen.models.postprocess import postprocess
from lungscreen.models.rules import ClinicalRules

STAGES = ("assemble", "select", "volume", "preprocess", "inference", "postprocess", "report")


class NoEligibleSeries(NotEligible):
    """No series of the study can be analysed; ``rejected`` says why for each."""

    def __init__(self, rejected: tuple[SeriesRejection, ...], extra: tuple[str, ...] = ()) -> None:
        reasons = [f"series {r.series_description or r.series_instance_uid}: {r.reason}" for r in rejected]
        reasons += list(extra)
        super().__init__("no CT series eligible for analysis" + (": " + "; ".join(reasons) if reasons else ""))
        self.rejected = rejected
        self.extra = extra

    def __reduce__(self):  # picklable, so a worker process can return it
        return (type(self), (self.rejected, self.extra))


@dataclass(frozen=True)
class Analyzer:
    """Everything a run needs besides the images; built once, shared by all runs."""

    detector: Detector
    algorithm: AlgorithmIdentity
    billing: BillingCodes
    rules: ClinicalRules = ClinicalRules()
    selection: SelectionRules = SelectionRules()
    operating_point: str | None = None  # None: the model card's default
    presentation_state: bool = True  # also a GSPS, for viewers that draw no SR


@dataclass(frozen=True)
class AnalysisResult:
    study_uid: str
    series_uid: str
    rejected_series: tuple[SeriesRejection, ...]
    report: NoduleReport
    sr: Dataset
    gsps: Dataset | None
    findings: tuple[dict, ...]  # the findings.json rows
    candidates: int
    accession_number: str
    main_exam_item: tuple[str, str, str]
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def analyze_study(
    paths: Iterable[Path],
    analyzer: Analyzer,
    *,
    sr_series_uid: str | None = None,
    sr_sop_uid: str | None = None,
    gsps_sop_uid: str | None = None,
    instance_number: int = 1,
    predecessor: Dataset | None = None,
) -> AnalysisResult:
    """Run every stage on a study's files; raise a :class:`LungScreenError` with a clear reason."""
    timings: dict[str, float] = {}
    with _timed(timings, "assemble"):
        index = index_study(paths)
    rejected: list[SeriesRejection] = []
    remaining = list(index.series)
    unreadable = tuple(u.reason for u in index.unreadable)
    volume = None
    while volume is None:
        with _timed(timings, "select"):
            choice = choose_series(remaining, analyzer.selection)
        rejected.extend(r for r in choice.rejected if not r.reason.startswith("eligible"))
        selected = choice.selected
        if selected is None:
            raise NoEligibleSeries(tuple(rejected), unreadable)
        try:
            with _timed(timings, "volume"):
                volume = read_series_volume(selected.paths, headers=selected.headers, frames=selected.frames)
        except VolumeError as exc:
            rejected.append(SeriesRejection(selected.series_instance_uid, selected.series_description, str(exc)))
            remaining = [s for s in remaining if s.series_instance_uid != selected.series_instance_uid]
    rejected.extend(r for r in choice.rejected if r.reason.startswith("eligible"))

    detector = analyzer.detector
    with _timed(timings, "preprocess"):
        image = detector.preprocess(volume.voxels, volume.affine)
    with _timed(timings, "inference"):
        output = detector.infer(image)
    with _timed(timings, "postprocess"):
        candidates = to_source_candidates(detector.decode(output), image, volume.affine)
        point = detector.card.operating_point(analyzer.operating_point)
        findings, suppressed = postprocess(
            candidates, volume.voxels, volume.affine, detector.card.calibration, point.threshold, analyzer.rules,
            detector.second_stage,
        )
        report = NoduleReport(
            findings=findings,
            operating_point=point.name,
            score_threshold=point.threshold,
            model_name=detector.card.name,
            model_version=detector.card.version,
            suppressed=suppressed,
        )
    with _timed(timings, "report"):
        header = selected.headers[0]
        evidence = _evidence_in_slice_order(selected.headers, volume)
        sr = build_sr(
            evidence,
            volume,
            report,
            algorithm=analyzer.algorithm,
            billing=analyzer.billing,
            series_instance_uid=sr_series_uid,
            sop_instance_uid=sr_sop_uid,
            instance_number=instance_number,
            predecessor=predecessor,
        )
        gsps = None
        if analyzer.presentation_state:
            gsps = build_gsps(
                evidence, volume, report, algorithm=analyzer.algorithm, sop_instance_uid=gsps_sop_uid,
                instance_number=instance_number,
            )
    return AnalysisResult(
        study_uid=volume.study_instance_uid,
        series_uid=volume.series_instance_uid,
        rejected_series=tuple(rejected),
        report=report,
        sr=sr,
        gsps=gsps,
        findings=tuple(_finding_row(f, volume) for f in findings),
        candidates=len(candidates),
        accession_number=str(header.get("AccessionNumber", "") or ""),
        main_exam_item=main_exam_procedure(header, analyzer.billing),
        timings=timings,
    )


def _evidence_in_slice_order(headers, volume: Volume) -> list[Dataset]:
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    seen: dict[str, None] = {}
    for ref in volume.slices:
        seen.setdefault(ref.sop_instance_uid)
    return [by_uid[uid] for uid in seen]


def _finding_row(finding: Finding, volume: Volume) -> dict:
    slice_ref = volume.slices[int(round(finding.center_kji[0]))]
    return {
        "center_lps_mm": [round(v, 2) for v in finding.center_lps_mm],
        "diameter_mm": round(finding.diameter_mm, 2),
        "volume_mm3": round(finding.volume_mm3, 1),
        "probability": round(finding.probability, 4),
        "nodule_type": finding.nodule_type.value,
        "lung_rads": finding.lung_rads,
        "actionable": finding.actionable,
        "sop_instance_uid": slice_ref.sop_instance_uid,
        "frame_number": slice_ref.frame_number,
    }
