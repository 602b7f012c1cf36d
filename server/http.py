"""HTTP endpoint: ``/healthz``, ``/metrics`` (Prometheus), ``/studies`` (JSON) and the
review pages ``/review`` for the reading room.

Binds to localhost by default. It exposes job states, reasons and findings keyed by
Study Instance UID; no patient names or IDs.

Verdicts on the review page need a signed-in reviewer (:mod:`server.reviewers`). Against
cross-site request forgery, each form posts the session's own token, which another site
cannot read, and the session cookie is SameSite=Strict and HttpOnly. HTTP basic auth was not
chosen: browsers resend cached basic credentials with any cross-site form post, so it would
need the token anyway, and it has no way to sign out.
"""

from __future__ import annotations

import hmac
import json
import re
import logging
import threading
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlparse

from lungscreen.dicom_io.presentation import nearest_image
from lungscreen.dicom_io.uids import is_valid_uid
from lungscreen.server.assessments import queue_assessment
from lungscreen.server.feedback import REVIEW_PAGE, FeedbackError, StudyResult
from lungscreen.server.priors import prior_image_paths, prior_images
from lungscreen.server.review import (
    render_feedback, render_key_image, render_sign_in, render_site_figures, render_study, render_study_list,
)
from lungscreen.server.site_figures import propose_operating_points, site_figures
from lungscreen.server.reviewers import ReviewSessions

KEY_IMAGE = re.compile(r"^/review/([0-9.]+)/(key|prior)/([0-9]{1,3})\.png$")
RERUN = re.compile(r"^/studies/([0-9.]+)/rerun$")
VERDICT_POST = re.compile(r"^/review/([0-9.]+)/(verdict|missed)$")
SESSION_COOKIE = "lungscreen_review"
MAX_FORM_BYTES = 16 * 1024

log = logging.getLogger(__name__)


def _handler_for(server_app, sessions: ReviewSessions):
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
            if path == "/review/site":
                return self._html(200, self._site_figures())
            if path == "/review/sign-in":
                next_href = parse_qs(urlparse(self.path).query).get("next", ["/review"])[0]
                return self._html(200, render_sign_in(_local_review_href(next_href)))
            if path.startswith("/review/"):
                return self._review(path)
            return self._json(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            """State changes need ``Authorization: Bearer <token>``; review-page forms, a
            signed-in reviewer and the session's token."""
            if urlparse(self.path).path.startswith("/review/"):
                return self._review_post(urlparse(self.path).path)
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
            findings = job.details.get("findings", [])
            if not key:
                page = render_study(
                    job.as_dict(), ohif_url=server_app.settings.ohif_url, feedback=self._feedback_section(job),
                    priors_on_node=self._priors_on_node(findings),
                )
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            number = int(key.group(3))
            if not 1 <= number <= len(findings):
                return self._json(404, {"error": "no such finding"})
            finding = findings[number - 1]
            if key.group(2) == "prior":
                return self._prior_key_image(finding)
            ct_path = server_app.jobs.instance_path(finding["sop_instance_uid"])
            if ct_path is None or not ct_path.exists():
                return self._json(410, {"error": "the image is no longer stored (purged)"})
            png = render_key_image(ct_path, finding, frame_number=finding.get("frame_number"), number=number)
            return self._send(200, png, "image/png")

        def _priors_on_node(self, findings) -> set[str]:
            studies = {f["prior"]["study_uid"] for f in findings if isinstance(f.get("prior"), dict)}
            return {uid for uid in studies if prior_image_paths(server_app.settings, server_app.db, uid)}

        def _prior_key_image(self, finding):
            """The prior study's image at the matched prior nodule's centre, outlined at its prior size."""
            prior = finding.get("prior")
            if not isinstance(prior, dict):
                return self._json(404, {"error": "this finding has no prior"})
            centre = prior.get("center_lps_mm")
            if centre is None:  # a report written before the prior's centre was kept in it
                nodule = server_app.priors.history.nodule(prior["study_uid"], finding.get("tracking_uid") or "")
                centre = None if nodule is None else nodule.center_lps_mm
            images = prior_images(server_app.settings, server_app.db, prior["study_uid"])
            if centre is None or images is None:
                return self._json(410, {"error": "the prior study's images are not on this node"})
            image = nearest_image(list(images.paths), tuple(centre), images.series_uid)
            if image is None:
                return self._json(410, {"error": "no stored image of the prior covers the nodule"})
            png = render_key_image(image.path, {"center_lps_mm": tuple(centre), "diameter_mm": prior["diameter_mm"]},
                                   frame_number=image.frame_number)
            return self._send(200, png, "image/png")

        # --- verdicts (server/feedback.py, server/reviewers.py) -------------------------------
        def _html(self, code: int, page: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            body = page.encode()
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(303)
            self.send_header("Location", location)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _session_id(self) -> str | None:
            try:
                morsel = SimpleCookie(self.headers.get("Cookie", "")).get(SESSION_COOKIE)
            except CookieError:
                return None
            return morsel.value if morsel else None

        def _form(self) -> dict[str, str] | None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return None
            if not 0 <= length <= MAX_FORM_BYTES:
                return None
            fields = parse_qs(self.rfile.read(length).decode("utf-8", "replace"), keep_blank_values=True)
            return {name: values[0] for name, values in fields.items()}

        def _send_assessment(self, study_uid: str, reviewer: str) -> None:
            """Queue the reviewer's assessment SR; the verdict stays recorded if that fails."""
            try:
                queue_assessment(
                    study_uid, reviewer, feedback=server_app.feedback, jobs=server_app.jobs, outbox=server_app.outbox,
                    reports=server_app.committer.reports, destinations=server_app.committer.destinations,
                    institution=server_app.settings.institution,
                )
            except Exception as exc:  # one study's unreadable AI SR never breaks the review page
                log.warning("the assessment of study %s was not queued: %s: %s", study_uid, type(exc).__name__, exc)

        def _feedback_section(self, job) -> str:
            session = sessions.session(self._session_id())
            feedback = server_app.feedback
            return render_feedback(
                job.study_uid, job.details.get("findings") or [], feedback.verdicts(job.study_uid),
                feedback.missed(job.study_uid), feedback.viewer_reports(study_uid=job.study_uid),
                reviewer=session.reviewer if session else None, csrf_token=session.csrf_token if session else None,
            )

        def _site_figures(self) -> str:
            feedback = server_app.feedback
            verdicts, missed = feedback.verdicts(), feedback.missed()
            target = server_app.settings.target_false_marks_per_scan
            proposals = propose_operating_points(verdicts, missed, target_false_marks_per_scan=target)
            return render_site_figures(site_figures(verdicts, missed), proposals, feedback.decisions())

        def _review_post(self, path: str):
            form = self._form()
            if form is None:
                return self._json(413, {"error": "form too large or malformed"})
            if path == "/review/site":
                return self._html(200, self._site_figures())
            if path == "/review/sign-in":
                next_href = _local_review_href(form.get("next", "/review"))
                signed_in = sessions.sign_in(form.get("name", ""), form.get("secret", ""))
                if signed_in is None:
                    log.warning("review sign-in refused from %s", self.client_address[0])  # never the name tried
                    return self._html(401, render_sign_in(next_href, error="Unknown reviewer or wrong secret."))
                session_id, _ = signed_in
                cookie = f"{SESSION_COOKIE}={session_id}; Path=/review; HttpOnly; SameSite=Strict"
                return self._redirect(next_href, {"Set-Cookie": cookie})
            session_id = self._session_id()
            session = sessions.session(session_id)
            if session is None:
                return self._json(403, {"error": "sign in first (/review/sign-in)"})
            if not sessions.token_matches(session, form.get("csrf_token")):
                log.warning("review form without its session token refused from %s", self.client_address[0])
                return self._json(403, {"error": "the form's session token is missing or wrong"})
            if path == "/review/sign-out":
                sessions.sign_out(session_id)
                return self._redirect("/review", {"Set-Cookie": f"{SESSION_COOKIE}=; Path=/review; Max-Age=0"})
            match = VERDICT_POST.match(path)
            job = server_app.jobs.get(match.group(1)) if match and is_valid_uid(match.group(1)) else None
            if job is None:
                return self._json(404, {"error": "no such study"})
            result = StudyResult.from_job(job.study_uid, job.details)
            if result is None:
                return self._json(409, {"error": "the study has no report to judge yet"})
            try:
                if match.group(2) == "verdict":
                    server_app.feedback.record_verdict(
                        result, form.get("tracking_uid", ""), form.get("verdict", ""), reviewer=session.reviewer,
                        source=REVIEW_PAGE,
                    )
                else:
                    centre = tuple(float(form[name]) for name in ("x_mm", "y_mm", "z_mm"))
                    server_app.feedback.record_missed(
                        result, centre, float(form["diameter_mm"]), reviewer=session.reviewer, source=REVIEW_PAGE
                    )
            except (FeedbackError, KeyError, ValueError) as exc:
                return self._json(400, {"error": str(exc) if isinstance(exc, FeedbackError) else "a field is missing or not a number"})
            log.info("a %s was recorded on the review page for study %s", match.group(2), job.study_uid)
            if match.group(2) == "verdict" and server_app.settings.send_assessments:
                self._send_assessment(job.study_uid, session.reviewer)
            return self._redirect(f"/review/{quote(job.study_uid, safe='')}#feedback")

    return Handler


def _local_review_href(href: str) -> str:
    """``href`` when it is a review page of this server, else the study list (no open redirect)."""
    path = urlparse(href)
    if path.scheme or path.netloc or not href.startswith("/review") or "\\" in href:
        return "/review"
    return href


def start_http(server_app, host: str, port: int) -> ThreadingHTTPServer:
    sessions = ReviewSessions(server_app.settings.reviewers)
    httpd = ThreadingHTTPServer((host, port), _handler_for(server_app, sessions))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log.info("HTTP endpoint on http://%s:%d", host, httpd.server_address[1])
    return httpd
