"""The commit stage: a finished analysis becomes durable state in one transaction.

The SR (and GSPS) files are written first (atomically, under UIDs derived from the study and
run, so a repeated commit writes the same instances); then the report rows, the outbox rows
for every destination, the billing extension entry and the job state are committed together
or not at all. A crash in between leaves the job ``processing``; the restart runs it again and
commits the same report once.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from lungscreen.dicom_io.store import InstanceStore
from lungscreen.findings import exam_lung_rads
from lungscreen.server.billing import BillingLedger, ExtensionEntry
from lungscreen.server.db import Database
from lungscreen.server.jobs import REPORTED, JobStore
from lungscreen.server.outbox import Outbox
from lungscreen.server.pipeline import AnalysisResult, comparison_summary


class ReportCommitter:
    def __init__(
        self, db: Database, jobs: JobStore, outbox: Outbox, ledger: BillingLedger, reports: InstanceStore, *,
        destinations: list[str], ai_extension_code: tuple[str, str, str],
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.outbox = outbox
        self.ledger = ledger
        self.reports = reports
        self.destinations = destinations
        self.ai_extension_code = ai_extension_code

    def commit(self, study_uid: str, run: int, result: AnalysisResult) -> str:
        """Record the run's results; return the job's new state (``reported``, or
        ``receiving`` when new instances arrived during the run)."""
        results = [("sr", result.sr)] + ([("gsps", result.gsps)] if result.gsps is not None else [])
        stored = {kind: self._save(study_uid, ds) for kind, ds in results}
        details = job_details(result, stored["sr"])
        with self.db.transaction():
            for kind, ds in results:
                self.jobs.record_report(ds.SOPInstanceUID, study_uid, run, stored[kind], kind=kind)
                self.outbox.enqueue(study_uid, ds.SOPInstanceUID, stored[kind], self.destinations)
            if result.accession_number:
                self.ledger.record(
                    ExtensionEntry(
                        accession_number=result.accession_number,
                        main_item=result.main_exam_item,
                        extension_item=self.ai_extension_code,
                        study_uid=study_uid,
                        report_sop_uid=result.sr.SOPInstanceUID,
                    )
                )
            else:
                details["billing"] = "no accession number on the CT: no ledger entry (the RIS cannot link it)"
            return self.jobs.finish(study_uid, REPORTED, details=details)

    def _save(self, study_uid: str, dataset) -> Path:
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return self.reports.save(study_uid, dataset.SeriesInstanceUID, dataset.SOPInstanceUID, buffer.getvalue()).path


def job_details(result: AnalysisResult, sr_path: Path) -> dict:
    """What the job status shows about a finished run (no patient data)."""
    report = result.report
    return {
        "series_uid": result.series_uid,
        "rejected_series": [r.__dict__ for r in result.rejected_series],
        "operating_point": report.operating_point,
        "score_threshold": report.score_threshold,
        "model": f"{report.model_name} {report.model_version}",
        "candidates": result.candidates,
        "suppressed": report.suppressed,
        "exam_lung_rads": exam_lung_rads(report.findings),
        "findings": list(result.findings),
        "sr_sop_uid": str(result.sr.SOPInstanceUID),
        "sr_series_uid": str(result.sr.SeriesInstanceUID),
        "gsps_sop_uid": str(result.gsps.SOPInstanceUID) if result.gsps is not None else None,
        "sr_path": str(sr_path),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "inference": result.inference,
        **comparison_summary(report),
    }
