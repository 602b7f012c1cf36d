"""Read-only HTTP endpoint: ``/healthz``, ``/metrics`` (Prometheus), ``/studies`` (JSON).

Binds to localhost by default. It exposes job states, reasons and findings keyed by
Study Instance UID; no patient names or IDs.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from dicom_io.uids import is_valid_uid

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
                return self._json(200, {"status": "ok"})
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
            return self._json(404, {"error": "not found"})

    return Handler


def start_http(server_app, host: str, port: int) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer((host, port), _handler_for(server_app))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log.info("HTTP endpoint on http://%s:%d", host, httpd.server_address[1])
    return httpd
