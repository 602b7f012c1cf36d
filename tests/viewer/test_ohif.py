"""OHIF v3 in a real (headless) browser shows LungScreen's SR on the real LIDC-IDRI-0001 CT.

Set-up, all bound to 127.0.0.1 inside the loopback-only namespace of scripts/test.sh:
Orthanc 1.10 + DICOMweb (tests/peers.Orthanc) holding the CT and the SR that
``lungscreen analyze --model models/blob-filter`` wrote for it; OHIF 3.13.2's prebuilt
``dist/`` (scripts/install_viewer.sh) served by a small Python server that falls back to
index.html, serves .wasm as application/wasm, replaces app-config.js and proxies
/dicom-web to Orthanc (one origin: Orthanc 1.10 has no CORS); Debian Chromium via Playwright.

How "the outline is drawn at the right place" is checked: OHIF exposes ``window.cornerstone``
and ``window.cornerstoneTools``. For each finding of findings.json the test shows the slice
whose SOP Instance UID the finding names (the viewport's current imageId must contain it),
maps the finding's centre *from findings.json* (patient LPS mm, not the SR) to canvas pixels
with the viewport's own ``worldToCanvas``, and compares it with the SVG polyline OHIF actually
drew (its ``points`` attribute): centroid within 2 image pixels, mean radius within 25 % of
the diameter/2 mapped the same way. Finally the screenshot is sampled on the drawn polyline:
the outline's colour, not the grey CT, must be on screen there. The SVG text of the labels
must read as words (no "363698007:"-style concept codes).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import browser_missing_reason, chromium_page, serve, static_handler
from peers import IN_NETNS, REPO, Orthanc

OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ARTIFACTS = REPO / "test-artifacts"
CONCEPT_CODE_IN_LABEL = re.compile(r"\b\d{5,}\s*:|\b[A-Z]{1,4}-[A-Z0-9]{4,}\s*:")


def _skip_reason() -> str | None:
    if not IN_NETNS:
        return "Orthanc listens on all interfaces: run through scripts/test.sh (loopback-only namespace)"
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists():
        return "Orthanc with the DICOMweb plugin is not installed (scripts/bootstrap.sh)"
    if not (OHIF_DIST / "index.html").exists():
        return f"OHIF {OHIF_VERSION} is not unpacked in {OHIF_DIST} (scripts/install_viewer.sh)"
    return browser_missing_reason()


APP_CONFIG = """
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""

# Shows the slice of ``sop`` in the enabled viewport that holds it, then reports the mapping.
SHOW_FINDING_JS = """
async ([sop, center, radiusMm]) => {
  const cs = window.cornerstone;
  for (const enabled of cs.getEnabledElements()) {
    const vp = enabled.viewport;
    if (!vp.getImageIds) continue;
    const ids = vp.getImageIds();
    const index = ids.findIndex(id => id.includes(sop));
    if (index < 0) continue;
    if (vp.getCurrentImageIdIndex() !== index) {
      await vp.setImageIdIndex(index);
    }
    // OHIF zooms onto the first finding of a loadable SR: map on the whole slice.
    vp.resetCamera();
    vp.render();
    const rect = vp.canvas.getBoundingClientRect();
    const c = vp.worldToCanvas(center);
    const e = vp.worldToCanvas([center[0] + radiusMm, center[1], center[2]]);
    return {
      viewportId: vp.id,
      imageId: vp.getCurrentImageId(),
      rect: [rect.left, rect.top, rect.width, rect.height],
      center: [c[0], c[1]],
      radius: Math.hypot(e[0] - c[0], e[1] - c[1]),
    };
  }
  return null;
}
"""

# Polylines and text that cornerstone drew in the SVG layer of that viewport.
DRAWN_JS = """
(viewportId) => {
  const enabled = window.cornerstone.getEnabledElements().find(e => e.viewport.id === viewportId);
  const svg = enabled.viewport.element.querySelector('svg.svg-layer') || enabled.viewport.element.querySelector('svg');
  const svgRect = svg.getBoundingClientRect();
  const canvasRect = enabled.viewport.canvas.getBoundingClientRect();
  const polylines = Array.from(svg.querySelectorAll('polyline')).map(p =>
    (p.getAttribute('points').match(/-?[0-9.]+(e-?[0-9]+)?/gi) || []).map(Number)
  );
  const texts = Array.from(svg.querySelectorAll('text')).map(t =>
    Array.from(t.querySelectorAll('tspan')).map(s => s.textContent).join('\\n') || t.textContent
  );
  const stroke = Array.from(svg.querySelectorAll('polyline')).map(p => p.getAttribute('stroke'));
  return { polylines, texts, stroke, svgOffset: [svgRect.left - canvasRect.left, svgRect.top - canvasRect.top] };
}
"""


def _analyze(series_dir: Path, out: Path, outline_categories=("1", "2", "3", "4A", "4B", "4X")) -> dict:
    # The blob filter's findings on this scan are all under 6 mm (Lung-RADS 1 and 2), which the
    # default outline categories list without drawing: by default this site outlines every category.
    out.mkdir(parents=True, exist_ok=True)
    config = out / "outline.toml"
    config.write_text(f"outline_categories = {json.dumps(list(outline_categories))}\n")
    result = subprocess.run(
        [sys.executable, "-m", "lungscreen.server.cli", "analyze", str(series_dir), "--out", str(out),
         "--model", str(REPO / "models" / "blob-filter"), "--config", str(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "findings.json").read_text())


def _upload(orthanc: Orthanc, paths: list[Path]) -> None:
    for path in paths:
        orthanc.post("/instances", path.read_bytes())


def _skip_tour(page) -> None:
    """OHIF's onboarding tour ("Skip all") appears on first load; click it when it does."""
    for _ in range(20):
        button = page.get_by_role("button", name=re.compile("skip all", re.I))
        if button.count():
            button.first.click()
            return
        page.wait_for_timeout(250)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ohif_draws_each_finding_on_its_slice_with_a_readable_label(tmp_path, lidc_series_dir):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    report = _analyze(lidc_series_dir, tmp_path / "analysis")
    findings = report["findings"]
    assert findings, "the blob filter finds candidates in LIDC-IDRI-0001"
    assert all(finding["outlined"] for finding in findings)
    sr_path = tmp_path / "analysis" / "report_sr.dcm"
    import pydicom

    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    timings = {"analyze_s": time.monotonic() - started}

    with Orthanc(tmp_path).running() as orthanc:
        _upload(orthanc, sorted(lidc_series_dir.glob("*.dcm")) + [sr_path])
        timings["upload_s"] = time.monotonic() - started - timings["analyze_s"]
        overrides = {"/app-config.js": APP_CONFIG.encode()}
        handler = static_handler(OHIF_DIST, spa_fallback=True, proxy={"/dicom-web": orthanc.url}, overrides=overrides)
        with serve(handler) as base, chromium_page(tmp_path, width=1400, height=900) as page:
            console: list[str] = []
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            url = f"{base}/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}&initialSeriesInstanceUID={sr.SeriesInstanceUID}"
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            _skip_tour(page)
            try:
                page.wait_for_function(
                    "() => window.cornerstoneTools && cornerstoneTools.annotation.state.getAllAnnotations()"
                    ".filter(a => a.metadata.toolName.startsWith('DICOMSRDisplay')).length > 0"
                    " && document.querySelectorAll('svg polyline').length > 0",
                    timeout=120_000,
                )
            except Exception:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "ohif_sr_failed.png"))
                raise AssertionError("OHIF drew no SR outline:\n" + "\n".join(console[-40:])) from None
            timings["ohif_first_outline_s"] = time.monotonic() - started - timings["analyze_s"] - timings["upload_s"]

            annotations = page.evaluate(
                "() => cornerstoneTools.annotation.state.getAllAnnotations()"
                ".filter(a => a.metadata.toolName.startsWith('DICOMSRDisplay'))"
                ".map(a => ({image: a.metadata.referencedImageId, labels: a.data.labels,"
                " tracking: a.data.TrackingIdentifier || (a.data.cachedStats || {}).TrackingIdentifier}))"
            )
            # OHIF may hold one copy per viewport/tool instance: count distinct (image, labels).
            distinct = {(a["image"], json.dumps(a["labels"], sort_keys=True)) for a in annotations}
            assert len(distinct) == len(findings), distinct
            for finding in findings:
                assert any(finding["sop_instance_uid"] in image for image, _ in distinct), finding

            ARTIFACTS.mkdir(exist_ok=True)
            checked = []
            for number, finding in enumerate(findings, start=1):
                mapping = page.evaluate(
                    SHOW_FINDING_JS, [finding["sop_instance_uid"], finding["center_lps_mm"], finding["diameter_mm"] / 2]
                )
                assert mapping, f"nodule {number}: no viewport shows image {finding['sop_instance_uid']}"
                assert finding["sop_instance_uid"] in mapping["imageId"]
                page.wait_for_timeout(300)  # annotation rendering follows the IMAGE_RENDERED event
                drawn = page.evaluate(DRAWN_JS, mapping["viewportId"])
                expected = np.array(mapping["center"])
                offset = np.array(drawn["svgOffset"])
                polylines = [np.asarray(p, float).reshape(-1, 2) + offset for p in drawn["polylines"] if len(p) > 6]
                centroids = [p[:-1].mean(axis=0) for p in polylines]
                assert centroids, f"nodule {number}: no polyline drawn on its slice"
                nearest = min(range(len(centroids)), key=lambda i: np.linalg.norm(centroids[i] - expected))
                points = polylines[nearest]
                pixel = mapping["radius"] / (finding["diameter_mm"] / 2) * 0.703125  # canvas px per image px
                assert np.linalg.norm(centroids[nearest] - expected) <= 2 * pixel, (number, centroids[nearest], expected)
                radius = np.linalg.norm(points[:-1] - centroids[nearest], axis=1).mean()
                assert abs(radius - mapping["radius"]) <= 0.25 * mapping["radius"] + pixel, (number, radius, mapping)
                np.testing.assert_allclose(points[0], points[-1], atol=1e-6)  # closed

                for text in drawn["texts"]:
                    assert not CONCEPT_CODE_IN_LABEL.search(text), f"concept code in OHIF label: {text!r}"
                label_text = "\n".join(drawn["texts"])
                assert "Diameter" in label_text and "Certainty of Finding" in label_text, drawn["texts"]

                shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
                left, top = mapping["rect"][:2]
                on_screen = [shot[int(round(top + y)), int(round(left + x))] for x, y in points[:-1]]
                coloured = [abs(r - g) + abs(g - b) + abs(r - b) > 60 for r, g, b in on_screen]
                # the outline is dashed: a good share of its vertices show its colour, not grey CT
                assert sum(coloured) >= 0.3 * len(coloured), (number, on_screen[:8])
                checked.append({"number": number, "centre_error_px": float(np.linalg.norm(centroids[nearest] - expected)),
                                "labels": drawn["texts"]})
            page.evaluate(SHOW_FINDING_JS, [findings[0]["sop_instance_uid"], findings[0]["center_lps_mm"], 1.0])
            page.wait_for_timeout(300)
            page.screenshot(path=str(ARTIFACTS / "ohif_sr_nodule1.png"))
    timings["total_s"] = time.monotonic() - started
    (ARTIFACTS / "ohif_sr_check.json").write_text(json.dumps({"timings": timings, "checked": checked}, indent=2))


# The Basic Viewer asks whether to track measurements before it loads an SR's findings into
# its measurement panel; a site can skip the question (OHIF's disableConfirmationPrompts).
PANEL_APP_CONFIG = APP_CONFIG.replace("  investigationalUseDialog", "  disableConfirmationPrompts: true,\n  investigationalUseDialog")

def _open_measurement_panel(page, rows, expected: int, timeout_s: float = 120.0) -> None:
    """Open the right-hand Measurements panel (collapsed at start) until it lists ``expected`` rows."""
    deadline = time.monotonic() + timeout_s
    while rows.count() < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rows.count()} of {expected} measurement rows")
        panel = page.locator('[data-cy="trackedMeasurements-panel"]')
        button = page.locator('[data-cy="trackedMeasurements-btn"]')
        if not (panel.count() and panel.first.is_visible()) and button.count() and button.first.is_visible():
            button.first.click()
        page.wait_for_timeout(500)


# The slice each viewport shows.
SHOWN_JS = """
() => window.cornerstone.getEnabledElements()
  .filter(e => e.viewport.getCurrentImageId)
  .map(e => e.viewport.getCurrentImageId() || '')
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ohif_lists_each_outlined_finding_in_its_measurement_panel(tmp_path, lidc_series_dir):
    """OHIF loads the SR's outlined findings into its measurement panel (TID 1501 groups whose
    first NUM holds the outline, a Cornerstone3D freehand tracking identifier, the Comment as
    title); listed-only findings stay out of it; a click on an entry shows that finding's slice."""
    from lungscreen.dicom_io.sr import finding_label

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # This site outlines Lung-RADS 2 and above: the blob filter's Lung-RADS 1 findings are listed only.
    report = _analyze(lidc_series_dir, tmp_path / "analysis", outline_categories=["2", "3", "4A", "4B", "4X"])
    labels = {
        finding_label(number, f["diameter_mm"], f["probability"], f["lung_rads"]): f
        for number, f in enumerate(report["findings"], start=1)
        if f["outlined"]
    }
    assert labels and len(labels) < len(report["findings"]), "outlined and listed findings both present"
    sr_path = tmp_path / "analysis" / "report_sr.dcm"
    import pydicom

    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    with Orthanc(tmp_path).running() as orthanc:
        _upload(orthanc, sorted(lidc_series_dir.glob("*.dcm")) + [sr_path])
        overrides = {"/app-config.js": PANEL_APP_CONFIG.encode()}
        handler = static_handler(OHIF_DIST, spa_fallback=True, proxy={"/dicom-web": orthanc.url}, overrides=overrides)
        with serve(handler) as base, chromium_page(tmp_path, width=1400, height=900) as page:
            console: list[str] = []
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            url = f"{base}/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}&initialSeriesInstanceUID={sr.SeriesInstanceUID}"
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            _skip_tour(page)
            rows = page.locator('[data-cy="data-row"]')
            try:
                _open_measurement_panel(page, rows, len(labels))
            except Exception:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "ohif_panel_failed.png"))
                raise AssertionError("OHIF's measurement panel did not fill:\n" + "\n".join(console[-40:])) from None
            page.wait_for_timeout(1000)  # let a late entry arrive: the count must not grow past the outlined ones
            titles = [text.strip() for text in page.locator('[data-cy="data-row-title"]').all_inner_texts()]
            assert rows.count() == len(labels), titles
            assert sorted(titles) == sorted(labels), titles

            # A click shows the finding's slice: two entries on different slices, one after the other.
            by_slice = {finding["sop_instance_uid"]: title for title, finding in labels.items()}
            assert len(by_slice) >= 2, by_slice
            for sop, title in list(by_slice.items())[:2]:
                rows.nth(titles.index(title)).click()
                page.wait_for_function(
                    f"() => ({SHOWN_JS})().some(id => id.includes({json.dumps(sop)}))", timeout=30_000
                )
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ohif_measurement_panel.png"))
