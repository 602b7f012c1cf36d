"""The remote inference server as the node sees it: up, or down since when and for how long
studies wait before trying it again.

Policy ``inference_server_unavailable = "wait"``: a study whose inference server is down, slow or
serving another model goes back to the queue unchanged, and every study waits with a growing
pause (from ``retry_base_delay_s`` up to :data:`MAX_BACKOFF_S`) until the server answers again.
While it is down, :meth:`InferenceServerWatch.problem` (``/healthz``) asks it again at most every
:data:`PROBE_INTERVAL_S`, so health recovers and waiting studies resume as soon as it answers
with the right model, not only when the next study tries. With ``"local"`` the worker falls back
to its own ONNX Runtime session and the watch only reports that it did.
"""

from __future__ import annotations

import logging
import time

from lungscreen.models.card import ModelCard
from lungscreen.models.remote import InferenceServerUnavailable, RemoteModelMismatch, TritonRunner

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0  # longest pause before studies try the inference server again
PROBE_INTERVAL_S = 5.0  # while degraded, /healthz asks the inference server again this often
PROBE_TIMEOUT_S = 5.0


class InferenceServerWatch:
    def __init__(self, url: str, card: ModelCard, *, retry_base_delay_s: float) -> None:
        self.url = url
        self.retry_base_delay_s = retry_base_delay_s
        self.degraded: str | None = None  # why remote inference is not working now
        self._retry_at = 0.0
        self._backoff_s = 0.0
        self._probed_at = 0.0
        self._probe = TritonRunner(url, card, timeout_s=PROBE_TIMEOUT_S)

    def check_at_start(self) -> None:
        """A server serving another model or version is refused (:class:`RemoteModelMismatch`:
        the node does not start); one that is down only degrades the node until it answers."""
        try:
            self._probe.verify()
        except InferenceServerUnavailable as exc:
            self.degraded = str(exc)
            log.warning("inference server %s not available at start-up: %s", self.url, exc)

    def waiting(self) -> bool:
        """Whether studies wait now (the server went down and its pause is not over)."""
        return time.time() < self._retry_at

    def problem(self) -> str | None:
        """Why remote inference is not working now; None when it works."""
        if self.degraded is None or time.time() - self._probed_at < PROBE_INTERVAL_S:
            return self.degraded
        self._probed_at = time.time()
        try:
            self._probe.verify()
        except (InferenceServerUnavailable, RemoteModelMismatch) as exc:
            self.degraded = str(exc)
            return self.degraded
        log.info("inference server %s answers again", self.url)
        self.degraded, self._backoff_s, self._retry_at = None, 0.0, 0.0
        return None

    def went_down(self, exc: Exception) -> float:
        """A study found the server down: every study now waits; return the pause in seconds."""
        self.degraded = str(exc)
        self._backoff_s = min(MAX_BACKOFF_S, max(self.retry_base_delay_s, 2 * self._backoff_s))
        self._retry_at = time.time() + self._backoff_s
        return self._backoff_s

    def ran(self, inference: dict) -> None:
        """A study finished: remote (the server works) or locally after a fallback (and why)."""
        if inference.get("where") == "remote":
            self.degraded, self._backoff_s = None, 0.0
        elif inference.get("fallback_reason"):
            self.degraded = f"running locally: {inference['fallback_reason']}"
