"""Retention: image data older than the site's retention period is removed.

Only the CT images go: those received, and priors retrieved from the PACS for a follow-up
comparison (``data/priors/<study>``, :mod:`server.priors`). The reports (SR, GSPS) this server produced, the job
history and the billing ledger stay, since they are the record of what was reported and
billed. Only studies at rest (reported, delivered or failed) are purged. Viewer SRs received
for a study (``server/feedback.py``) are stored with its images and go with them.

Radiologists' verdicts, missed nodules and the viewer SRs' records have their own period
(:func:`purge_feedback`): they are the site's evidence for its operating point, kept as long
as the site decides, then deleted with whatever file is left of them.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from lungscreen.dicom_io.store import InstanceStore
from lungscreen.server.db import Database

log = logging.getLogger(__name__)


def purge_images(db: Database, images: InstanceStore, older_than_s: float, *, now: float | None = None) -> list[str]:
    """Delete the images of studies last touched more than ``older_than_s`` ago; return them."""
    now = time.time() if now is None else now
    rows = db.query(
        """SELECT study_uid FROM jobs WHERE state IN ('reported', 'delivered', 'failed')
           AND last_received_at < ? AND study_uid IN (SELECT DISTINCT study_uid FROM instances)""",
        (now - older_than_s,),
    )
    purged = []
    for row in rows:
        study_uid = row["study_uid"]
        with db.transaction() as c:
            c.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            c.execute(
                "UPDATE jobs SET details = json_set(details, '$.images_purged_at', ?) WHERE study_uid = ?",
                (now, study_uid),
            )
        shutil.rmtree(images.study_dir(study_uid), ignore_errors=True)
        purged.append(study_uid)
        log.info("purged the images of study %s", study_uid)
    return purged


def purge_retrieved_priors(priors_dir: Path, db: Database, older_than_s: float, *, now: float | None = None) -> list[str]:
    """Delete the images of priors retrieved more than ``older_than_s`` ago; return their studies.

    A prior's age is when it was analysed (its ``prior_studies`` row), else, for one whose
    analysis never finished, when its newest file was written. Its ``prior_studies`` row (the
    nodules and the coarse alignment image, no pixels of the CT) stays: later follow-ups still
    compare with it; the review page then says the prior's images are not on this node.
    """
    cutoff = (time.time() if now is None else now) - older_than_s
    if not priors_dir.is_dir():
        return []
    analysed = {r["study_uid"]: r["created_at"] for r in db.query("SELECT study_uid, created_at FROM prior_studies")}
    purged = []
    for folder in sorted(p for p in priors_dir.iterdir() if p.is_dir()):
        files = [p for p in folder.iterdir() if p.is_file()]
        written = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
        if analysed.get(folder.name, written) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            purged.append(folder.name)
            log.info("purged the retrieved prior images of study %s", folder.name)
    return purged


def purge_feedback(db: Database, older_than_s: float, *, now: float | None = None) -> int:
    """Delete verdicts, missed nodules and viewer-SR records (and the SR files still stored)
    made more than ``older_than_s`` ago; return how many records went."""
    cutoff = (time.time() if now is None else now) - older_than_s
    files = [Path(r["path"]) for r in db.query("SELECT path FROM viewer_reports WHERE received_at < ?", (cutoff,))]
    with db.transaction() as c:
        removed = c.execute("DELETE FROM finding_verdicts WHERE at < ?", (cutoff,)).rowcount
        removed += c.execute("DELETE FROM missed_nodules WHERE at < ?", (cutoff,)).rowcount
        removed += c.execute("DELETE FROM viewer_reports WHERE received_at < ?", (cutoff,)).rowcount
    for path in files:
        path.unlink(missing_ok=True)
    log.info("purged %d feedback record(s) and %d viewer SR file(s)", removed, len(files))
    return removed
