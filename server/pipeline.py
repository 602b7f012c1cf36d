"""The analysis pipeline, stage by stage, for one study:

assemble the study -> select the series (and check the volume shows lungs) -> build the volume
-> preprocess -> detect -> calibrate, second stage and clinical rules -> compare with the prior
-> report (SR, GSPS, billing item).

Pure with respect to the server: files in, an :class:`AnalysisResult` out. The server
(``server/app.py``) and ``lungscreen analyze`` both call :func:`analyze_study`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

from pydicom import Dataset
from pydicom.uid import generate_uid

from lungscreen.errors import NotEligible, VolumeError
from lungscreen.dicom_io.kernels import KernelFamily
from lungscreen.dicom_io.outline import DEFAULT_OUTLINE_CATEGORIES, is_outlined
from lungscreen.dicom_io.presentation import build_gsps
from lungscreen.dicom_io.select import RejectionCode, SelectionRules, SeriesRejection, choose_series
from lungscreen.dicom_io.sr import AlgorithmIdentity, BillingCodes, assign_tracking, build_sr, main_exam_procedure
from lungscreen.dicom_io.study import index_study, series_references
from lungscreen.dicom_io.volume import Volume, read_series_volume
from lungscreen.findings import Comparison, ComparisonStatus, Finding, NoduleReport, RuleSet
from lungscreen.models.card import OperatingPoint
from lungscreen.models.detector import Detector, to_source_candidates
from lungscreen.models.longitudinal import PriorStudyNodules, compare_with_prior
from lungscreen.models.lung_presence import lung_presence
from lungscreen.models.postprocess import postprocess
from lungscreen.models.registration import AlignmentImage, alignment_image
from lungscreen.models.rules import ClinicalRules, apply_history
from lungscreen.server.feedback import OperatingPointDecision


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
    site_operating_point: OperatingPointDecision | None = None  # applied by an administrator; wins over the card's
    outline_categories: tuple[str, ...] = DEFAULT_OUTLINE_CATEGORIES  # Lung-RADS categories drawn; others listed
    rule_set: RuleSet = RuleSet.LUNG_RADS_2022  # categories with the prior; see models/rules.py
    keep_alignment_image: bool = False  # return the coarse image a later follow-up aligns to


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
    study_date: str = ""  # DICOM DA of the analysed study ("" when the CT has none)
    alignment_image: AlignmentImage | None = None  # with Analyzer.keep_alignment_image or a prior
    unreported: tuple[Finding, ...] = ()  # candidates seen but not reported (models.postprocess), for later follow-ups
    inference: dict = field(default_factory=dict)  # where the network ran (models.detector.InferenceSite)


@dataclass(frozen=True)
class PriorImages:
    """The prior study's files still on this node, for the SR's evidence: the files, and the
    series its analysis used when known (``None``: the same series selection picks it again)."""

    paths: tuple[Path, ...]
    series_uid: str | None = None


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
    prior: PriorStudyNodules | None = None,
    no_prior: Comparison | None = None,
    prior_images: PriorImages | None = None,
) -> AnalysisResult:
    """Run every stage on a study's files; raise a :class:`LungScreenError` with a clear reason.

    With ``prior`` the findings are compared with the prior study's (follow-up); ``no_prior``
    says why there is none when one was looked for (the report then says so); ``prior_images``,
    the prior's files on this node, are referenced as the SR's evidence of the comparison.
    """
    timings: dict[str, float] = {}
    with _timed(timings, "assemble"):
        index = index_study(paths)
    rejected: list[SeriesRejection] = []
    remaining = list(index.series)
    unreadable = tuple(u.reason for u in index.unreadable)
    card_kernel = analyzer.detector.card.preferred_kernel
    preferred_kernel = None if card_kernel is None else KernelFamily(card_kernel)
    volume = None
    while volume is None:  # the best eligible series whose volume can be built and shows lungs
        with _timed(timings, "select"):
            choice = choose_series(remaining, analyzer.selection, preferred_kernel=preferred_kernel)
        rejected.extend(r for r in choice.rejected if r.code is not RejectionCode.NOT_CHOSEN)
        selected = choice.selected
        if selected is None:
            raise NoEligibleSeries(tuple(rejected), unreadable)
        refusal = None
        try:
            with _timed(timings, "volume"):
                volume = read_series_volume(
                    selected.paths, headers=selected.headers, frames=selected.frames, geometry=selected.geometry
                )
        except VolumeError as exc:
            refusal = (RejectionCode.VOLUME_UNREADABLE, str(exc))
        else:
            with _timed(timings, "select"):
                lungs = lung_presence(volume.voxels, volume.spacing)
            if not lungs.present:
                refusal, volume = (RejectionCode.NO_LUNGS, lungs.describe()), None
        if refusal is not None:  # try the next eligible series; the refused ones are recorded already
            rejected.append(SeriesRejection(selected.series_instance_uid, selected.series_description, *refusal))
            runners_up = {r.series_instance_uid for r in choice.rejected if r.code is RejectionCode.NOT_CHOSEN}
            remaining = [s for s in remaining if s.series_instance_uid in runners_up]
    rejected.extend(r for r in choice.rejected if r.code is RejectionCode.NOT_CHOSEN)

    detector = analyzer.detector
    with _timed(timings, "preprocess"):
        image = detector.preprocess(volume.voxels, volume.affine)
    with _timed(timings, "inference"):
        output, site = detector.infer_with_site(image)
    with _timed(timings, "postprocess"):
        candidates = to_source_candidates(detector.decode(output), image, volume.affine)
        point, point_source = _operating_point(analyzer)
        processed = postprocess(
            candidates, volume.voxels, volume.affine, detector.card.calibration, point.threshold, analyzer.rules,
            detector.second_stage,
        )
        findings, suppressed = processed.findings, processed.suppressed
        findings = apply_history(findings, analyzer.rule_set)  # baseline categories, each with its rule
    header = selected.headers[0]
    study_date = str(header.get("StudyDate", "") or "")
    alignment, comparison = None, no_prior
    if analyzer.keep_alignment_image or (prior is not None and prior.image is not None):
        # The server keeps it with every study, for that study's own later follow-ups.
        with _timed(timings, "alignment_image"):
            alignment = alignment_image(volume.voxels, volume.affine)
    prior_evidence = []
    if prior is not None:
        with _timed(timings, "compare"):  # follow-up only: a baseline run keeps its stages
            try:
                findings, comparison = compare_with_prior(
                    findings, alignment, study_date, prior, analyzer.rule_set,
                    current_volume=(volume.voxels, volume.affine), current_unreported=processed.unreported,
                )
            except ValueError as exc:  # no or inconsistent study dates: a baseline report that says why
                comparison = Comparison(ComparisonStatus.PRIOR_UNAVAILABLE, prior_study_uid=prior.study_uid, reason=str(exc))
            if comparison.status is ComparisonStatus.COMPARED and prior_images is not None:
                prior_evidence = _prior_evidence(prior_images, comparison.prior_study_uid, analyzer, preferred_kernel)
    with _timed(timings, "report"):
        sr_sop_uid = sr_sop_uid or generate_uid()
        prior_ids = () if prior is None else tuple(n.tracking_id for n in prior.nodules if n.tracking_id)
        findings = assign_tracking(findings, sr_sop_uid, prior_ids)
        report = NoduleReport(
            findings=findings,
            operating_point=point.name,
            score_threshold=point.threshold,
            model_name=detector.card.name,
            model_version=detector.card.version,
            suppressed=suppressed,
            operating_point_source=point_source,
            comparison=comparison,
        )
        algorithm = replace(analyzer.algorithm, inference_site=site.description)
        evidence = _evidence_in_slice_order(selected.headers, volume)
        sr = build_sr(
            evidence,
            volume,
            report,
            algorithm=algorithm,
            billing=analyzer.billing,
            series_instance_uid=sr_series_uid,
            sop_instance_uid=sr_sop_uid,
            instance_number=instance_number,
            predecessor=predecessor,
            outline_categories=analyzer.outline_categories,
            prior_evidence=prior_evidence,
        )
        gsps = None
        if analyzer.presentation_state:
            gsps = build_gsps(
                evidence, volume, report, algorithm=algorithm, sop_instance_uid=gsps_sop_uid,
                instance_number=instance_number, outline_categories=analyzer.outline_categories,
            )
    return AnalysisResult(
        study_uid=volume.study_instance_uid,
        series_uid=volume.series_instance_uid,
        rejected_series=tuple(rejected),
        report=report,
        sr=sr,
        gsps=gsps,
        findings=tuple(_finding_row(f, volume, analyzer.outline_categories) for f in findings),
        candidates=len(candidates),
        accession_number=str(header.get("AccessionNumber", "") or ""),
        main_exam_item=main_exam_procedure(header, analyzer.billing),
        timings=timings,
        study_date=study_date,
        alignment_image=alignment,
        unreported=processed.unreported,
        inference=site.as_dict(),
    )


def _operating_point(analyzer: Analyzer) -> tuple[OperatingPoint, str]:
    """The site's applied operating point when it was made for this model, else the card's
    named one; and where it came from (empty for the card's)."""
    card = analyzer.detector.card
    site = analyzer.site_operating_point
    if site is not None and site.model == f"{card.name} {card.version}":
        return OperatingPoint(name=site.name, threshold=site.threshold, description=site.evidence), site.provenance
    return card.operating_point(analyzer.operating_point), ""


def _prior_evidence(
    images: PriorImages, prior_study_uid: str | None, analyzer: Analyzer, preferred_kernel: KernelFamily | None,
) -> list[Dataset]:
    """Headers of the prior series the comparison used: the series its analysis recorded, else
    the one the same series selection chooses (the prior was analysed with it); none when the
    prior's files are unreadable or of another study."""
    if images.series_uid and prior_study_uid:
        references = series_references(images.paths, prior_study_uid, images.series_uid)
        if references:
            return references
    index = index_study(images.paths)
    series = next((s for s in index.series if s.series_instance_uid == images.series_uid), None)
    if series is None:
        series = choose_series(index.series, analyzer.selection, preferred_kernel=preferred_kernel).selected
    if series is None:
        return []
    return [h for h in series.headers if str(h.get("StudyInstanceUID", "")) == prior_study_uid]


def _evidence_in_slice_order(headers, volume: Volume) -> list[Dataset]:
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    seen: dict[str, None] = {}
    for ref in volume.slices:
        seen.setdefault(ref.sop_instance_uid)
    return [by_uid[uid] for uid in seen]


def _finding_row(finding: Finding, volume: Volume, outline_categories: tuple[str, ...]) -> dict:
    """A findings.json row. ``outlined``: the SR and GSPS draw it (else they only list it);
    ``tracking_uid`` (in :func:`follow_up_row`): the finding's Tracking Unique Identifier, which
    verdicts (``server/feedback.py``) refer to and an outlined finding's SR measurement group carries."""
    slice_ref = volume.slices[int(round(finding.center_kji[0]))]
    return {
        "center_lps_mm": [round(v, 2) for v in finding.center_lps_mm],
        "diameter_mm": round(finding.diameter_mm, 2),
        "volume_mm3": round(finding.volume_mm3, 1),
        "probability": round(finding.probability, 4),
        "nodule_type": finding.nodule_type.value,
        "lung_rads": finding.lung_rads,
        "actionable": finding.actionable,
        "outlined": is_outlined(finding, outline_categories),
        "sop_instance_uid": slice_ref.sop_instance_uid,
        "frame_number": slice_ref.frame_number,
        **follow_up_row(finding),
    }


def follow_up_row(finding: Finding) -> dict:
    """The findings.json keys of issue 17: tracking, change since the prior, the rule applied."""
    prior = finding.prior
    return {
        "tracking_uid": finding.tracking_uid,
        "tracking_id": finding.tracking_id,
        "change": None if finding.change is None else finding.change.value,
        "prior": None if prior is None else {
            "study_uid": prior.study_uid, "study_date": prior.study_date, "diameter_mm": round(prior.diameter_mm, 2),
            "volume_mm3": round(prior.volume_mm3, 1), "interval_days": prior.interval_days, "lung_rads": prior.lung_rads,
            "reported": prior.reported,  # False: seen by the prior's analysis below what it reported
            "center_lps_mm": None if prior.center_lps_mm is None else [round(v, 2) for v in prior.center_lps_mm],
        },
        "volume_doubling_time_days": (
            None if finding.volume_doubling_time_days is None else round(finding.volume_doubling_time_days, 1)
        ),
        "category": None if finding.assessment is None else {
            "rule_set": finding.assessment.rule_set.value, "category": finding.assessment.category,
            "rule": finding.assessment.rule,
        },
    }


def comparison_summary(report: NoduleReport, rule_set: RuleSet | None = None) -> dict:
    """The report-level findings.json keys of a follow-up: the prior, what resolved, the exam category
    (under ``rule_set``; by default the one the findings were assessed with)."""
    from lungscreen.models.rules import exam_assessment

    if rule_set is None:
        assessed = [f.assessment.rule_set for f in report.findings if f.assessment is not None]
        rule_set = assessed[0] if assessed else RuleSet.LUNG_RADS_2022
    comparison = report.comparison
    exam = exam_assessment(report.findings, rule_set)
    return {
        "prior_study_uid": None if comparison is None else comparison.prior_study_uid,
        "comparison": None if comparison is None else {
            "status": comparison.status.value,
            "prior_study_date": comparison.prior_study_date,
            "interval_days": comparison.interval_days,
            "alignment_residual_mm": (
                None if comparison.alignment_residual_mm is None else round(comparison.alignment_residual_mm, 2)
            ),
            "reason": comparison.reason or None,
            "resolved": [
                {"tracking_uid": n.tracking_uid, "tracking_id": n.tracking_id, "change": "resolved",
                 "diameter_mm": round(n.diameter_mm, 2), "volume_mm3": round(n.volume_mm3, 1),
                 "center_lps_mm": [round(v, 2) for v in n.center_lps_mm], "lung_rads": n.lung_rads}
                for n in comparison.resolved
            ],
            # not reported now, but still there: neither a current finding nor resolved
            "still_seen": [
                {"tracking_uid": s.prior.tracking_uid, "tracking_id": s.prior.tracking_id, "change": "still seen",
                 "diameter_mm": None if s.diameter_mm is None else round(s.diameter_mm, 2),
                 "prior_diameter_mm": round(s.prior.diameter_mm, 2),
                 "center_lps_mm": [round(v, 2) for v in s.prior.center_lps_mm], "lung_rads": s.prior.lung_rads}
                for s in comparison.still_seen
            ],
            "not_scanned": [  # outside what this study covers: neither seen nor resolved
                {"tracking_uid": n.tracking_uid, "tracking_id": n.tracking_id, "diameter_mm": round(n.diameter_mm, 2),
                 "center_lps_mm": [round(v, 2) for v in n.center_lps_mm], "lung_rads": n.lung_rads}
                for n in comparison.not_scanned
            ],
        },
        "exam_category": None if exam is None else {
            "rule_set": exam.rule_set.value, "category": exam.category, "rule": exam.rule,
        },
    }
