"""Review-page verdicts sent back to the PACS as an assessment SR (:mod:`dicom_io.assessment`).

When a signed-in reviewer records a verdict on the review page, the study's latest review-page
verdicts of that reviewer become one assessment document (the reviewer is its Person Observer),
written next to the study's reports and queued to the same durable outbox and destinations as
the AI SR. Each new verdict makes a new document holding all of that reviewer's current
verdicts on the study. The loop guard (:meth:`server.ingest.IngestSink.is_own_instance`) knows
it by its outbox rows and ignores it when a PACS forwards it back. Verdicts that came from a viewer's SR are not sent: that SR is in the PACS already.

Only findings that have a measurement group in the AI SR are assessed in the document (an
outlined finding); verdicts on listed findings stay in the store and the exports. The setting
``send_assessments = false`` turns this off.
"""

from __future__ import annotations

import datetime
import logging
from io import BytesIO

import pydicom

from lungscreen import __version__
from lungscreen.dicom_io.assessment import Assessment, FindingAssessment, build_assessment
from lungscreen.dicom_io.sr_reading import finding_tracking_uids
from lungscreen.dicom_io.store import InstanceStore
from lungscreen.server.feedback import ACCEPTED, REVIEW_PAGE, FeedbackStore
from lungscreen.server.jobs import JobStore
from lungscreen.server.outbox import Outbox

log = logging.getLogger(__name__)

MANUFACTURER = "LungScreen project"  # as the AI SR's (server/workers.py)


def queue_assessment(
    study_uid: str, reviewer: str, *, feedback: FeedbackStore, jobs: JobStore, outbox: Outbox,
    reports: InstanceStore, destinations: list[str], institution: str | None = None,
) -> str | None:
    """Build, store and queue the assessment of ``reviewer`` on ``study_uid``; return its SOP
    Instance UID, or None when none is due (no destination, no verdict on an outlined finding)."""
    if not destinations:
        return None
    job = jobs.get(study_uid)
    if job is None or not job.details.get("sr_path"):
        return None
    ai_sr = pydicom.dcmread(job.details["sr_path"])
    in_groups = set(finding_tracking_uids(ai_sr))
    identifiers = {row["tracking_uid"]: row.get("tracking_id") for row in job.details.get("findings") or ()}
    verdicts = [
        v for v in feedback.verdicts(study_uid)
        if v.source == REVIEW_PAGE and v.reviewer == reviewer and v.finding.tracking_uid in in_groups
        and v.finding.sr_sop_uid == ai_sr.SOPInstanceUID
    ]
    if not verdicts:
        return None
    assessments = [
        FindingAssessment(
            tracking_uid=v.finding.tracking_uid,
            tracking_id=identifiers.get(v.finding.tracking_uid) or "Nodule",
            assessment=Assessment.ACCEPTED if v.verdict == ACCEPTED else Assessment.REJECTED,
            at=datetime.datetime.fromtimestamp(v.at, datetime.timezone.utc),
        )
        for v in verdicts
    ]
    earlier = jobs.db.query(  # assessments sent before: what the outbox holds that is no report of the study
        """SELECT COUNT(DISTINCT report_sop_uid) AS n FROM outbox
           WHERE study_uid = ? AND report_sop_uid NOT IN (SELECT sop_uid FROM reports WHERE study_uid = ?)""",
        (study_uid, study_uid),
    )[0]["n"]
    sr = build_assessment(
        ai_sr, assessments, reviewer=reviewer, manufacturer=MANUFACTURER, software_version=__version__,
        institution=institution, instance_number=earlier + 1,
    )
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    path = reports.save(study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID, buffer.getvalue()).path
    # Its outbox rows are also what the loop guard knows it by (IngestSink.is_own_instance): the
    # job store's reports table takes SRs and GSPS of an analysis run only.
    outbox.enqueue(study_uid, sr.SOPInstanceUID, path, destinations)
    log.info("assessment of %d finding(s) queued for study %s", len(assessments), study_uid)
    return str(sr.SOPInstanceUID)
