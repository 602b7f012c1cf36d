"""HTTP endpoint: ``/healthz``, ``/metrics`` (Prometheus), ``/studies`` (JSON) and the
read-only review pages ``/review`` for the reading room.

Binds to localhost by default. It exposes job states, reasons and findings keyed by
Study Instance UID; no patient names or IDs.
"""

from __future__ import annotations

import hmac
import json
import re
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from lungscreen.dicom_io.uids import is_valid_uid
from lungscreen.server.review import render_key_image, render_study, render_study_list

KEY_IMAGE = re.compile(r"^/review/([0-9.]+)/key/([0-9]{1,3})\.png$")
RERUN = re.compile(r"^/studies/([0-9.]+)/rerun$")

log = logging.getLogger(__name__)


def _handler_for(server_app):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # route through logging, not stderr
            log.debug("http %s", fmt % args)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, payload) -> None:
            self._send(code, json.dumps(payload, indent=2).encode(), "application/json")

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = urlparse(self.path).path.rstrip("/")
            if path == "/healthz":
                server_app.jobs.count_by_state()  # proves the database answers
                receivers = server_app.receivers.running
                if not receivers:
                    return self._json(503, {"status": "no DICOM receiver process is running", "dicom_receivers": 0})
                problem = server_app.inference_problem()
                if problem:
                    # Studies are still received and kept; their analysis waits (or runs locally).
                    return self._json(200, {"status": "degraded", "reason": problem,
                                            "dicom_receivers": receivers})
                return self._json(200, {"status": "ok", "dicom_receivers": receivers})
            if path == "/metrics":
                return self._send(200, server_app.metrics.render(), "text/plain; version=0.0.4")
            if path == "/studies":
                return self._json(200, [job.as_dict() for job in server_app.jobs.list()])
            if path.startswith("/studies/"):
                study_uid = path.removeprefix("/studies/")
                job = server_app.jobs.get(study_uid) if is_valid_uid(study_uid) else None
                if job is None:
                    return self._json(404, {"error": "no such study"})
                body = job.as_dict()
                body["rejected_instances_detail"] = server_app.jobs.rejections(study_uid)
                body["deliveries"] = server_app.outbox.for_study(study_uid)
                return self._json(200, body)
            if path == "/review" or path == "":
                jobs = [job.as_dict() for job in server_app.jobs.list()]
                return self._send(200, render_study_list(jobs).encode(), "text/html; charset=utf-8")
            if path.startswith("/review/"):
                return self._review(path)
            return self._json(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            """State changes need ``Authorization: Bearer <token>``."""
            supplied = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(supplied.encode(), server_app.api_token.encode()):
                log.warning("refused unauthenticated POST %s from %s", self.path, self.client_address[0])
                return self._json(401, {"error": "a valid bearer token is needed"})
            rerun = RERUN.match(urlparse(self.path).path)
            if rerun is None:
                return self._json(404, {"error": "not found"})
            study_uid = rerun.group(1)
            if not is_valid_uid(study_uid) or server_app.jobs.get(study_uid) is None:
                return self._json(404, {"error": "no such study"})
            if not server_app.jobs.request_rerun(study_uid):
                return self._json(409, {"error": "the study is busy or has no stored images"})
            log.info("re-run of %s requested over HTTP", study_uid)
            return self._json(202, {"study_uid": study_uid, "state": "queued"})

        def do_PUT(self):  # noqa: N802
            self._json(405, {"error": "method not allowed"})

        do_DELETE = do_PATCH = do_PUT

        def _review(self, path: str):
            key = KEY_IMAGE.match(path)
            study_uid = key.group(1) if key else path.removeprefix("/review/")
            job = server_app.jobs.get(study_uid) if is_valid_uid(study_uid) else None
            if job is None:
                return self._json(404, {"error": "no such study"})
            if not key:
                page = render_study(job.as_dict(), ohif_url=server_app.settings.ohif_url)
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            findings = job.details.get("findings", [])
            number = int(key.group(2))
            if not 1 <= number <= len(findings):
                return self._json(404, {"error": "no such finding"})
            finding = findings[number - 1]
            ct_path = server_app.jobs.instance_path(finding["sop_instance_uid"])
            if ct_path is None or not ct_path.exists():
                return self._json(410, {"error": "the image is no longer stored (purged)"})
            png = render_key_image(ct_path, finding, frame_number=finding.get("frame_number"), number=number)
            return self._send(200, png, "image/png")

    return Handler


def start_http(server_app, host: str, port: int) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer((host, port), _handler_for(server_app))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log.info("HTTP endpoint on http://%s:%d", host, httpd.server_address[1])
    return httpd
