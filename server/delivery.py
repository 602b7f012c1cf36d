"""Delivery: an outbox item taken to its destination, and what its outcome means for the job.

The retry and dead-letter policy is the outbox's (:class:`server.outbox.RetryPolicy`): a
transient failure is tried again after a backoff, a permanent rejection or the last allowed
try makes the item dead. Here: a dead report (SR, GSPS) fails its job with the reason (the report
never reached that destination), and the job is ``delivered`` once every item of the study is sent.
"""

from __future__ import annotations

import logging
import ssl

from lungscreen.dicom_io.send import Destination, send_file
from lungscreen.errors import DeliveryError
from lungscreen.server.jobs import JobStore
from lungscreen.server.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)


class Courier:
    def __init__(
        self, outbox: Outbox, jobs: JobStore, *, calling_ae: str, timeout_s: float, tls_context: ssl.SSLContext
    ) -> None:
        self.outbox = outbox
        self.jobs = jobs
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.tls_context = tls_context

    def deliver(self, item: OutboxItem) -> str:
        """One try at sending ``item``; return its new state (``sent``, ``pending`` or ``dead``)."""
        destination = Destination.parse(item.destination)
        try:
            send_file(item.path, destination, calling_ae=self.calling_ae, timeout_s=self.timeout_s,
                      tls_context=self.tls_context)
        except DeliveryError as exc:
            state = self.outbox.mark_failed(item, str(exc), permanent=exc.permanent)
            log.warning("delivery of %s to %s failed (%s): %s", item.report_sop_uid, destination, state, exc)
            if state == "dead":
                self.jobs.mark_delivery_failed(
                    item.study_uid, item.report_sop_uid,
                    f"delivery to {destination} dead-lettered after {item.attempts + 1} attempt(s): {exc}",
                )
            return state
        self.outbox.mark_sent(item)
        log.info("delivered %s to %s", item.report_sop_uid, destination)
        if self.outbox.all_sent(item.study_uid):
            self.jobs.mark_delivered(item.study_uid)
        return "sent"
