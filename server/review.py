"""Review pages: what a radiologist sees of LungScreen's work, as HTML and PNG.

Pure renderers, no I/O besides reading the one CT image of a key image: the HTTP server
(``server/http.py``) decides routes and hands in job dicts as :meth:`server.jobs.Job.as_dict`
returns them, ``details`` as written by :func:`server.commit.job_details`. Every value is
HTML-escaped; job dicts carry no patient names or IDs and none are added here.
"""

from __future__ import annotations

import html
import io
import math
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lungscreen.dicom_io.presentation import LUNG_WINDOW, key_slice
from lungscreen.dicom_io.sr import RESEARCH_USE_NOTICE, finding_label
from lungscreen.server.site_figures import format_proportion, format_rate

__all__ = [
    "KEY_IMAGE_OUTLINE_RGB", "ohif_viewer_url", "render_feedback", "render_key_image", "render_sign_in",
    "render_site_figures", "render_study", "render_study_list",
]

KEY_IMAGE_OUTLINE_RGB = (255, 220, 0)
"""Colour of the nodule outline in key images (yellow: never a grey value of the CT)."""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#111;background:#fafafa}
header{background:#222;color:#fff;padding:.6em 1em}
header a{color:#fff}
.notice{background:#b00020;color:#fff;font-weight:bold;font-size:1.15em;padding:.6em 1em;margin:0}
main{padding:1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eee}
.verdict-accepted{color:#1b5e20;font-weight:bold}
.verdict-rejected{color:#b00020;font-weight:bold}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.state-failed{color:#b00020;font-weight:bold}
.state-delivered,.state-reported{color:#1b5e20}
figure{display:inline-block;margin:.5em 1em .5em 0}
figure img{width:384px;height:384px;image-rendering:auto;background:#000}
"""


def _e(value: Any) -> str:
    """Escaped text of ``value``; an em dash for nothing."""
    if value is None or value == "":
        return "—"
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)} · LungScreen</title><style>{_STYLE}</style></head><body>"
        f"<p class=\"notice\" role=\"alert\" id=\"research-notice\">{_e(RESEARCH_USE_NOTICE)}</p>"
        f"<header><strong>LungScreen</strong> · {_e(title)}</header><main>{body}</main></body></html>\n"
    )


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch)))


def _seconds(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "—"
    return f"{float(end) - float(start):.1f} s"


def _number(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _e(value)
    return f"{value:.{digits}f}"


def render_study_list(jobs: Sequence[Mapping[str, Any]], *, study_href: str = "/review/{study_uid}") -> str:
    """HTML list of studies: state, reason, instances, findings, received/processed times.

    ``study_href`` is formatted with the URL-quoted ``study_uid`` for each study's link.
    """
    rows = []
    for job in jobs:
        details = job.get("details") or {}
        uid = str(job.get("study_uid", ""))
        findings = details.get("findings")
        href = study_href.format(study_uid=quote(uid, safe=""))
        state = str(job.get("state", ""))
        rows.append(
            "<tr>"
            f"<td><a href=\"{_e(href)}\">{_e(uid)}</a></td>"
            f"<td class=\"state-{_e(state)}\">{_e(state)}</td>"
            f"<td>{_e(job.get('reason'))}</td>"
            f"<td class=\"num\">{_e(job.get('instances'))}</td>"
            f"<td class=\"num\">{_e(len(findings) if isinstance(findings, list) else None)}</td>"
            f"<td>{_when(job.get('last_received_at'))}</td>"
            f"<td class=\"num\">{_seconds(job.get('last_received_at'), job.get('started_at'))}</td>"
            f"<td class=\"num\">{_seconds(job.get('started_at'), job.get('finished_at'))}</td>"
            "</tr>"
        )
    table = (
        "<table id=\"studies\"><thead><tr><th>Study Instance UID</th><th>State</th><th>Reason</th>"
        "<th>Instances</th><th>Findings</th><th>Last received</th><th>Waited</th><th>Processing</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    if not rows:
        table = "<p>No studies yet.</p>"
    return _page("Studies", f"<h1>Studies</h1>{table}")


def ohif_viewer_url(ohif_url: str, study_uid: str, sr_series_uid: str | None = None) -> str:
    """OHIF v3 link that opens the study, and the SR view when its series is known."""
    query = {"StudyInstanceUIDs": study_uid}
    if sr_series_uid:
        query["initialSeriesInstanceUID"] = sr_series_uid
    return f"{ohif_url.rstrip('/')}/viewer?{urlencode(query)}"


def _yes_no(value: Any) -> str:
    return _e({True: "yes", False: "no"}.get(value, value))


def _outlined(finding: Mapping[str, Any]) -> bool:
    """Whether the SR and GSPS draw the finding; rows written before the flag existed were all drawn."""
    return finding.get("outlined", True) is not False


def _finding_rows(findings: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for number, finding in enumerate(findings, start=1):
        try:
            label = finding_label(
                number, float(finding["diameter_mm"]), float(finding["probability"]), str(finding["lung_rads"])
            )
        except (KeyError, TypeError, ValueError):
            label = f"Nodule {number}"
        outlined = _outlined(finding)
        rows.append(
            f"<tr id=\"finding-{number}\" class=\"{'outlined' if outlined else 'listed'}\">"
            f"<td>{_e(label)}</td>"
            f"<td class=\"num\">{_number(finding.get('diameter_mm'), 1)}</td>"
            f"<td class=\"num\">{_number(finding.get('volume_mm3'), 0)}</td>"
            f"<td>{_e(finding.get('nodule_type'))}</td>"
            f"<td>{_e(finding.get('lung_rads'))}</td>"
            f"<td class=\"num\">{_number(finding.get('probability'), 2)}</td>"
            f"<td>{_yes_no(finding.get('actionable'))}</td>"
            f"<td>{'yes' if outlined else 'no (listed only)'}</td>"
            f"<td>{_e(', '.join(_number(v, 1) for v in finding.get('center_lps_mm') or []))}</td>"
            "</tr>"
        )
    return (
        "<table id=\"findings\"><thead><tr><th>Nodule</th><th>Diameter (mm)</th><th>Volume (mm³)</th>"
        "<th>Type</th><th>Lung-RADS v2022 (suggested)</th><th>Probability</th><th>Actionable</th>"
        "<th>Outlined in SR/GSPS</th><th>Centre LPS (mm)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def render_study(
    job: Mapping[str, Any],
    *,
    ohif_url: str | None,
    key_image_href: str | None = "{study_uid}/key/{number}.png",
    prior_image_href: str = "{study_uid}/prior/{number}.png",
    priors_on_node: Collection[str] = (),
    feedback: str = "",
) -> str:
    """HTML page of one study: state, findings table, operating point, suppressed candidates,
    per-stage timings, rejected series, key images and a link to OHIF.

    Every finding is in the table with whether it is actionable and whether the SR and GSPS
    outline it; key images (which outline the nodule) are shown for outlined findings only.

    ``key_image_href`` is formatted with the URL-quoted ``study_uid`` and the 1-based finding
    ``number`` (``None``: no key images). ``ohif_url`` is the OHIF root (``None``: no link); the
    link opens the SR view when ``details["sr_series_uid"]`` is set. ``feedback`` (HTML from
    :func:`render_feedback`) goes below the findings.

    A follow-up (findings with a ``prior``) gets a "Prior and current" section: per matched
    nodule its change, prior size, interval and doubling time beside the current key image and,
    when the prior study is in ``priors_on_node`` (its images are still on this node), the
    prior's key image at the prior nodule's position (``prior_image_href``, formatted like
    ``key_image_href``); otherwise a line saying the prior's images are not on this node.
    """
    details = job.get("details") or {}
    uid = str(job.get("study_uid", ""))
    findings = details.get("findings") or []
    parts = [f"<h1>Study {_e(uid)}</h1>"]
    parts.append(
        "<table id=\"job\"><tbody>"
        f"<tr><th>State</th><td class=\"state-{_e(job.get('state'))}\">{_e(job.get('state'))}</td></tr>"
        f"<tr><th>Reason</th><td>{_e(job.get('reason'))}</td></tr>"
        f"<tr><th>Runs</th><td>{_e(job.get('runs'))}</td></tr>"
        f"<tr><th>Instances (rejected)</th><td>{_e(job.get('instances'))} ({_e(job.get('rejected_instances'))})</td></tr>"
        f"<tr><th>Received</th><td>{_when(job.get('first_received_at'))} – {_when(job.get('last_received_at'))}</td></tr>"
        f"<tr><th>Processing</th><td>{_when(job.get('started_at'))} – {_when(job.get('finished_at'))} "
        f"({_seconds(job.get('started_at'), job.get('finished_at'))})</td></tr>"
        f"<tr><th>Model</th><td>{_e(details.get('model'))}</td></tr>"
        f"<tr><th>Inference</th><td id=\"inference\">{_e((details.get('inference') or {}).get('description'))}</td></tr>"
        f"<tr><th>Operating point</th><td>{_e(details.get('operating_point'))} "
        f"(score threshold {_e(details.get('score_threshold'))})</td></tr>"
        f"<tr><th>Analysed series</th><td>{_e(details.get('series_uid'))}</td></tr>"
        f"<tr><th>Report (SR)</th><td>{_e(details.get('sr_sop_uid'))}</td></tr>"
        "</tbody></table>"
    )
    if ohif_url and uid:
        link = ohif_viewer_url(ohif_url, uid, details.get("sr_series_uid"))
        parts.append(f"<p><a id=\"ohif-link\" href=\"{_e(link)}\">Open in OHIF viewer</a></p>")

    parts.append("<h2>Findings</h2>")
    if findings:
        if details.get("exam_lung_rads"):
            parts.append(
                f"<p id=\"exam-lung-rads\">Suggested exam category: Lung-RADS v2022 {_e(details['exam_lung_rads'])}"
                " (the most concerning nodule's)</p>"
            )
        parts.append(_finding_rows(findings))
    elif job.get("state") in ("reported", "delivered"):
        parts.append("<p id=\"no-findings\">No nodule reported at this operating point.</p>")
    else:
        parts.append("<p>No results yet.</p>")
    parts.append(feedback)

    if any(_outlined(finding) for finding in findings) and key_image_href:
        figures = []
        for number, finding in enumerate(findings, start=1):
            if not _outlined(finding):  # listed only: the SR and GSPS draw no outline, nor does this page
                continue
            src = key_image_href.format(study_uid=quote(uid, safe=""), number=number)
            figures.append(
                f"<figure><img src=\"{_e(src)}\" alt=\"Key image of nodule {number}\" width=\"384\" height=\"384\">"
                f"<figcaption>Nodule {number} · image {_e(finding.get('sop_instance_uid'))}"
                + (f" frame {_e(finding.get('frame_number'))}" if finding.get("frame_number") else "")
                + "</figcaption></figure>"
            )
        parts.append("<h2>Key images</h2><div id=\"key-images\">" + "".join(figures) + "</div>")
    if key_image_href and any(finding.get("prior") for finding in findings):
        parts.append(_prior_and_current(uid, findings, key_image_href, prior_image_href, priors_on_node))
    parts.append(_prior_nodules_not_reported(details.get("comparison") or {}))

    suppressed = details.get("suppressed") or {}
    if suppressed or "candidates" in details:
        rows = "".join(
            f"<tr><td>{_e(rule)}</td><td class=\"num\">{_e(count)}</td></tr>"
            for rule, count in sorted(suppressed.items(), key=lambda item: str(item[0]))
        )
        parts.append(
            "<h2>Candidates suppressed by clinical rules</h2>"
            f"<p>Detector candidates: {_e(details.get('candidates'))}</p>"
            "<table id=\"suppressed\"><thead><tr><th>Rule</th><th>Candidates suppressed</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    timings = details.get("timings_s") or {}
    if timings:
        rows = "".join(
            f"<tr><td>{_e(stage)}</td><td class=\"num\">{_number(seconds, 2)}</td></tr>"
            for stage, seconds in timings.items()
        )
        parts.append(
            "<h2>Timings</h2><table id=\"timings\"><thead><tr><th>Stage</th><th>Seconds</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    rejected = details.get("rejected_series") or []
    if rejected:
        rows = "".join(
            f"<tr><td>{_e(_series_name(r) if isinstance(r, Mapping) else r)}</td>"
            f"<td>{_e(r.get('reason') if isinstance(r, Mapping) else '')}</td></tr>"
            for r in rejected
        )
        parts.append(
            "<h2>Series not analysed</h2><table id=\"rejected\"><thead><tr><th>Series</th><th>Reason</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>"
        )
    return _page(f"Study {uid}", "".join(parts))


def _prior_and_current(
    uid: str, findings: Sequence[Mapping[str, Any]], key_image_href: str, prior_image_href: str,
    priors_on_node: Collection[str],
) -> str:
    """Each matched nodule's prior and current key images side by side, with what changed.

    Listed nodules too: a stable nodule the SR only lists is what a follow-up is read for."""
    quoted = quote(uid, safe="")
    rows = []
    for number, finding in enumerate(findings, start=1):
        prior = finding.get("prior")
        if not isinstance(prior, Mapping):
            continue
        current = (
            f"<figure><img src=\"{_e(key_image_href.format(study_uid=quoted, number=number))}\" width=\"384\" "
            f"height=\"384\" alt=\"Current key image of nodule {number}\"><figcaption>Current</figcaption></figure>"
        )
        if prior.get("study_uid") in priors_on_node:
            before = (
                f"<figure><img class=\"prior-key-image\" src=\"{_e(prior_image_href.format(study_uid=quoted, number=number))}\""
                f" width=\"384\" height=\"384\" alt=\"Prior key image of nodule {number}\">"
                f"<figcaption>Prior {_e(prior.get('study_date'))}</figcaption></figure>"
            )
        else:
            before = (
                f"<p class=\"prior-not-here\">The prior study's images ({_e(prior.get('study_uid'))}) are not on this node"
                " (purged, or only its findings were kept).</p>"
            )
        facts = (
            f"<table class=\"change\"><tbody><tr><th>Change</th><td>{_e(finding.get('change'))}</td></tr>"
            f"<tr><th>Now (mm)</th><td class=\"num\">{_number(finding.get('diameter_mm'), 1)}</td></tr>"
            f"<tr><th>Prior (mm)</th><td class=\"num\">{_number(prior.get('diameter_mm'), 1)}</td></tr>"
            f"<tr><th>Prior volume (mm³)</th><td class=\"num\">{_number(prior.get('volume_mm3'), 0)}</td></tr>"
            f"<tr><th>Interval (days)</th><td class=\"num\">{_e(prior.get('interval_days'))}</td></tr>"
            + ("<tr><th>On the prior</th><td>seen by its analysis, not reported</td></tr>"
               if prior.get("reported") is False else "")
            + 
            f"<tr><th>Volume doubling time (days)</th><td class=\"num\">"
            f"{_number(finding.get('volume_doubling_time_days'), 0)}</td></tr></tbody></table>"
        )
        rows.append(f"<div class=\"comparison\" id=\"comparison-{number}\"><h3>Nodule {number}</h3>{before}{current}{facts}</div>")
    return "<h2>Prior and current</h2><div id=\"prior-and-current\">" + "".join(rows) + "</div>"


_NOT_REPORTED_NOW = (
    ("resolved", "resolved: aerated lung at its place now"),
    ("still_seen", "still seen at its place, not reported now"),
    ("not_scanned", "outside the range this study covers"),
)


def _prior_nodules_not_reported(comparison: Mapping[str, Any]) -> str:
    """The prior's reported nodules that no current finding continues, and what is at their place."""
    rows = "".join(
        f"<tr><td>{_e(n.get('tracking_id') or 'Nodule')}</td><td class=\"num\">{_number(n.get('prior_diameter_mm', n.get('diameter_mm')), 1)}</td>"
        f"<td>{_e(n.get('lung_rads'))}</td><td>{_e(what)}</td></tr>"
        for key, what in _NOT_REPORTED_NOW for n in comparison.get(key) or ()
    )
    if not rows:
        return ""
    return (
        "<h2>Prior nodules not reported now</h2><table id=\"prior-not-reported\"><thead><tr><th>Nodule</th>"
        f"<th>Prior size (mm)</th><th>Prior Lung-RADS</th><th>Now</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _series_name(rejection: Mapping) -> str:
    """A refused series as the job record keeps it (dicom_io.select.SeriesRejection): its
    description, else its UID."""
    return rejection.get("series_description") or rejection.get("series_instance_uid") or ""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def render_key_image(
    ct_path: Path, finding: Mapping[str, Any], *, frame_number: int | None = None, number: int | None = None
) -> bytes:
    """PNG of the CT image ``ct_path`` in the lung window (W 1500 / L -600), the nodule outlined.

    ``finding`` is a findings row (``center_lps_mm``, ``diameter_mm``; with ``number``, its
    ``probability`` and ``lung_rads`` make the caption :func:`dicom_io.sr.finding_label`). The
    outline is a circle of the nodule's diameter around its centre projected on the image; the
    research notice is written at the bottom.
    """
    ks = key_slice(Path(ct_path), finding["center_lps_mm"], frame_number=frame_number)
    centre, width = LUNG_WINDOW
    low = centre - width / 2
    grey = np.clip((ks.hu - low) / width * 255.0, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    column, row = ks.center_column_row
    radius_mm = float(finding["diameter_mm"]) / 2
    rx, ry = radius_mm / ks.pixel_spacing[1], radius_mm / ks.pixel_spacing[0]
    line = max(2, round(min(image.size) / 256))
    # Pixel (column, row) covers [column - 0.5, column + 0.5] in image space.
    draw.ellipse(
        [column + 0.5 - rx - line, row + 0.5 - ry - line, column + 0.5 + rx + line, row + 0.5 + ry + line],
        outline=KEY_IMAGE_OUTLINE_RGB,
        width=line,
    )
    font = _font(max(12, image.size[0] // 32))
    if number is not None and {"probability", "lung_rads"} <= set(finding):
        caption = finding_label(number, float(finding["diameter_mm"]), float(finding["probability"]), str(finding["lung_rads"]))
    else:
        caption = f"{float(finding['diameter_mm']):.1f} mm"
    height = draw.textbbox((0, 0), "Ag", font=font)[3]
    for text, y in ((caption, 6), (RESEARCH_USE_NOTICE, image.size[1] - height - 8)):
        box = draw.textbbox((8, y), text, font=font)
        draw.rectangle([box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3], fill=(0, 0, 0))
        draw.text((8, y), text, font=font, fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# --- radiologists' verdicts (server/feedback.py) ---------------------------------------------

def render_sign_in(next_href: str, *, error: str | None = None) -> str:
    """Sign-in form of the reviewers the administrator configured (``reviewers``)."""
    message = f"<p class=\"state-failed\" id=\"sign-in-error\">{_e(error)}</p>" if error else ""
    form = (
        "<form method=\"post\" action=\"/review/sign-in\" id=\"sign-in\">"
        f"<input type=\"hidden\" name=\"next\" value=\"{_e(next_href)}\">"
        "<p><label>Name <input name=\"name\" autocomplete=\"username\" required></label></p>"
        "<p><label>Secret <input name=\"secret\" type=\"password\" autocomplete=\"current-password\" required></label></p>"
        "<p><button type=\"submit\">Sign in</button></p></form>"
    )
    return _page("Sign in", f"<h1>Sign in to record verdicts</h1>{message}{form}")


def _verdict_cell(verdict) -> str:
    if verdict is None:
        return "<td>not judged</td><td>—</td><td>—</td><td>—</td>"
    return (
        f"<td class=\"verdict-{_e(verdict.verdict)}\">{_e(verdict.verdict)}</td><td>{_e(verdict.reviewer)}</td>"
        f"<td>{_when(verdict.at)}</td><td>{_e(verdict.source)}</td>"
    )


def render_feedback(
    study_uid: str,
    findings: Sequence[Mapping[str, Any]],
    verdicts: Sequence[Any],
    missed: Sequence[Any],
    viewer_reports: Sequence[Any],
    *,
    reviewer: str | None,
    csrf_token: str | None,
) -> str:
    """The study page's verdicts section: each finding's latest verdict (who, when, from where),
    the missed nodules, the viewer SRs received; for a signed-in reviewer, accept/reject
    buttons per finding and a form to add a missed nodule (each form posts the session's
    token). ``verdicts``, ``missed`` and ``viewer_reports`` are :mod:`server.feedback` records."""
    quoted = quote(study_uid, safe="")
    signed_in = reviewer is not None and csrf_token is not None
    token = f"<input type=\"hidden\" name=\"csrf_token\" value=\"{_e(csrf_token)}\">" if signed_in else ""
    latest = {v.finding.tracking_uid: v for v in verdicts}
    rows = []
    for number, finding in enumerate(findings, start=1):
        tracking_uid = str(finding.get("tracking_uid") or "")
        buttons = "<td>—</td>"
        if signed_in and tracking_uid:
            buttons = (
                f"<td><form method=\"post\" action=\"/review/{quoted}/verdict\" class=\"verdict-form\">{token}"
                f"<input type=\"hidden\" name=\"tracking_uid\" value=\"{_e(tracking_uid)}\">"
                "<button name=\"verdict\" value=\"accepted\">Accept</button> "
                "<button name=\"verdict\" value=\"rejected\">Reject</button></form></td>"
            )
        rows.append(
            f"<tr id=\"verdict-{number}\"><td>Nodule {number}</td><td>{_e(tracking_uid)}</td>"
            f"{_verdict_cell(latest.get(tracking_uid))}{buttons}</tr>"
        )
    parts = ["<h2>Radiologists' verdicts</h2>"]
    if signed_in:
        parts.append(
            f"<div id=\"signed-in\">Signed in as {_e(reviewer)}. "
            f"<form method=\"post\" action=\"/review/sign-out\" style=\"display:inline\">{token}"
            "<button>Sign out</button></form></div>"
        )
    else:
        parts.append(
            f"<p><a id=\"sign-in-link\" href=\"/review/sign-in?next=/review/{quoted}\">Sign in</a> to accept or reject"
            " findings and add missed nodules.</p>"
        )
    if rows:
        parts.append(
            "<table id=\"verdicts\"><thead><tr><th>Finding</th><th>Tracking UID</th><th>Verdict</th><th>By</th>"
            "<th>When</th><th>From</th><th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        )
    missed_rows = "".join(
        f"<tr><td>{_e(', '.join(_number(v, 1) for v in m.center_lps_mm) if m.center_lps_mm else None)}</td>"
        f"<td class=\"num\">{_number(m.diameter_mm, 1)}</td><td>{_e(m.reviewer)}</td><td>{_when(m.at)}</td>"
        f"<td>{_e(m.source)}</td></tr>"
        for m in missed
    )
    parts.append(
        "<h3>Nodules the AI missed</h3><table id=\"missed\"><thead><tr><th>Centre LPS (mm)</th><th>Size (mm)</th>"
        "<th>By</th><th>When</th><th>From</th></tr></thead><tbody>" + missed_rows + "</tbody></table>"
    )
    if signed_in:
        fields = "".join(
            f"<label>{label} <input name=\"{name}\" type=\"number\" step=\"any\" required></label> "
            for name, label in (("x_mm", "x (R→L, mm)"), ("y_mm", "y (A→P, mm)"), ("z_mm", "z (F→H, mm)"),
                                ("diameter_mm", "size (mm)"))
        )
        parts.append(
            f"<form method=\"post\" action=\"/review/{quoted}/missed\" id=\"missed-form\">{token}"
            f"<p>Add a missed nodule (patient coordinates, LPS): {fields}<button>Add</button></p></form>"
        )
    if viewer_reports:
        report_rows = "".join(
            f"<tr><td>{_e(r.sop_uid)}</td><td>{_when(r.received_at)}</td><td>{_e(r.state)}</td><td>{_e(r.outcome)}</td></tr>"
            for r in viewer_reports
        )
        parts.append(
            "<h3>Viewer reports received</h3><table id=\"viewer-reports\"><thead><tr><th>SR</th><th>Received</th>"
            "<th>State</th><th>Outcome</th></tr></thead><tbody>" + report_rows + "</tbody></table>"
        )
    return "<section id=\"feedback\">" + "".join(parts) + "</section>"


def render_site_figures(figures: Sequence[Any], proposals: Sequence[Any], decisions: Sequence[Any]) -> str:
    """The site's figures from the verdicts (:mod:`server.site_figures`), the proposed
    operating points and the ones applied (who, when, on what evidence)."""
    parts = [
        "<h1>Site figures from radiologists' verdicts</h1>",
        ("<p>95% intervals: Wilson score for proportions; exact Poisson (Garwood) for per-scan rates. "
         "Each figure names the studies behind it.</p>"),
    ]
    if not figures:
        parts.append("<p id=\"no-verdicts\">No verdicts yet.</p>")
    for number, g in enumerate(figures, start=1):
        rows = [
            ("False marks per scan", format_rate(g.false_marks_per_scan)),
            ("Missed nodules per scan", format_rate(g.missed_per_scan)),
            ("Acceptance", format_proportion(g.acceptance)),
        ]
        rows += [(f"Acceptance, Lung-RADS {c}", format_proportion(p)) for c, p in g.acceptance_by_lung_rads.items()]
        rows += [(f"Acceptance, {band}", format_proportion(p)) for band, p in g.acceptance_by_size.items()]
        parts.append(
            f"<h2>{_e(g.period)} · {_e(g.model)} · operating point {_e(g.operating_point)} (threshold "
            f"{_e(g.score_threshold)}) · {g.studies} studies reviewed</h2>"
            f"<table id=\"figures-{number}\"><tbody>"
            + "".join(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in rows)
            + "</tbody></table>"
        )
    for p in proposals:
        parts.append(
            f"<h2>Proposed operating point for {_e(p.model)}</h2><p class=\"proposal\">From {_e(p.based_on)} "
            f"(threshold {_e(p.current_threshold)}), target {_e(p.target_false_marks_per_scan)} false marks per scan: "
            f"threshold {_e(p.threshold)}. False marks per scan {p.false_marks_per_scan_now:.2f} → "
            f"{p.false_marks_per_scan_proposed:.2f}; sensitivity to the radiologists' nodules "
            f"{_e(format_proportion(p.sensitivity_now))} → {_e(format_proportion(p.sensitivity_proposed))}; "
            f"{p.findings_given_up} accepted finding(s) given up. {_e(p.note)}. An administrator applies it with "
            "<code>lungscreen feedback apply-operating-point</code>.</p>"
        )
    if decisions:
        rows = "".join(
            f"<tr><td>{_e(d.model)}</td><td>{_e(d.name)}</td><td class=\"num\">{_e(d.threshold)}</td>"
            f"<td>{_e(d.applied_by)}</td><td>{_when(d.applied_at)}</td><td>{_e(d.evidence)}</td></tr>"
            for d in decisions
        )
        parts.append(
            "<h2>Operating points applied</h2><table id=\"decisions\"><thead><tr><th>Model</th><th>Name</th>"
            "<th>Threshold</th><th>By</th><th>When</th><th>Evidence</th></tr></thead><tbody>" + rows + "</tbody></table>"
        )
    return _page("Site figures", "".join(parts))
