"""Follow-up screening in the server and the command line: where the prior study comes from.

A prior is the most recent earlier chest CT of the same patient (Patient ID with its issuer)
within ``prior_lookback_days``. It comes from

1. LungScreen's own history: every study it analyses leaves a row in ``prior_studies`` (its
   findings with their tracking UIDs, and the coarse image the next study aligns to); or
2. the PACS named by ``prior_source`` (``AE@host:port``): C-FIND, then C-GET into a folder of
   LungScreen's, then analysed like any study but without an SR, a GSPS or a billing entry.

A prior that cannot be found or retrieved in time leaves a baseline report that says why
(:class:`lungscreen.findings.Comparison`); it never fails the current study.
"""

from __future__ import annotations

from lungscreen.findings import NoduleType, PriorNodule
from lungscreen.models.longitudinal import PriorStudyNodules
from lungscreen.server.pipeline import AnalysisResult


def prior_from_result(result: AnalysisResult) -> PriorStudyNodules:
    """The prior as the comparison needs it, from that study's own analysis."""
    return PriorStudyNodules(
        study_uid=result.study_uid,
        study_date=result.study_date,
        nodules=tuple(
            PriorNodule(
                center_lps_mm=tuple(f.center_lps_mm), diameter_mm=f.diameter_mm, volume_mm3=f.volume_mm3,
                nodule_type=NoduleType(f.nodule_type), lung_rads=f.lung_rads, tracking_uid=f.tracking_uid,
                tracking_id=f.tracking_id,
            )
            for f in result.report.findings
        ),
        image=result.alignment_image,
    )
