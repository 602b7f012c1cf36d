"""Tests of server.review: HTML review pages and key images (real LIDC-IDRI-0001 slice)."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from browser import chromium_page, serve, static_handler  # tests/viewer/browser.py
from lungscreen.dicom_io.sr import RESEARCH_USE_NOTICE, finding_label
from lungscreen.server.review import (
    KEY_IMAGE_OUTLINE_RGB,
    ohif_viewer_url,
    render_key_image,
    render_study,
    render_study_list,
)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"

# LUNA16 annotations.csv, LIDC-IDRI-0001 (as in tests/dicom_io/test_sr.py)
LUNA16_NODULE_LPS = [56.21, 86.34, -115.87]
LUNA16_NODULE_DIAMETER = 23.35
STUDY = "1.2.826.0.1.3680043.8.498.1"
EVIL = '<script>alert("x")</script>&'


def _finding(**changes) -> dict:
    row = {
        "center_lps_mm": LUNA16_NODULE_LPS,
        "diameter_mm": LUNA16_NODULE_DIAMETER,
        "volume_mm3": 6666.0,
        "probability": 0.9132,
        "nodule_type": "solid",
        "lung_rads": "4B",
        "actionable": True,
        "sop_instance_uid": "1.2.3.4",
        "frame_number": None,
    }
    return row | changes


def _job(**changes) -> dict:
    job = {
        "study_uid": STUDY,
        "state": "delivered",
        "reason": None,
        "runs": 1,
        "instances": 133,
        "rejected_instances": 0,
        "first_received_at": 1_700_000_000.0,
        "last_received_at": 1_700_000_004.0,
        "started_at": 1_700_000_010.0,
        "finished_at": 1_700_000_021.5,
        "details": {
            "series_uid": "1.2.3",
            "rejected_series": [
                {"series_instance_uid": "1.2.9", "series_description": "", "code": "localizer", "reason": "localizer"},
                {"series_instance_uid": "1.2.10", "series_description": "Topogram 0.6 T20s", "code": "localizer",
                 "reason": "localizer (scout) by its SeriesDescription"},
            ],
            "operating_point": "screening",
            "score_threshold": 0.35,
            "model": "blob-filter 1.0",
            "candidates": 7,
            "suppressed": {"calcified": 1, "min_diameter_mm": 4},
            "findings": [_finding(), _finding(diameter_mm=5.04, probability=0.41, lung_rads="2", actionable=False)],
            "sr_sop_uid": "1.2.3.5",
            "sr_series_uid": "1.2.3.6",
            "sr_path": "/data/x.dcm",
            "timings_s": {"volume": 1.25, "detect": 4.5},
        },
    }
    return job | changes


class _Text(HTMLParser):
    """Visible text and tag names of an HTML page."""

    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    return parser


class TestRenderStudyList:
    def test_lists_studies_with_state_and_timings(self):
        page = render_study_list([_job(), _job(study_uid="1.2.7", state="failed", reason="not a CT study")])
        text = " ".join(_parse(page).text)
        assert RESEARCH_USE_NOTICE in text
        assert STUDY in text and "1.2.7" in text
        assert "delivered" in text and "not a CT study" in text
        assert "11.5 s" in text  # processing: finished - started
        assert "6.0 s" in text  # waited: started - last received
        assert f'href="/review/{STUDY}"' in page

    def test_escapes_every_value(self):
        page = render_study_list([_job(study_uid=EVIL, state=EVIL, reason=EVIL)])
        assert "<script>" not in page
        assert "&lt;script&gt;" in page
        assert "script" not in _parse(page).tags

    def test_empty(self):
        assert "No studies yet" in render_study_list([])


class TestRenderStudy:
    def test_findings_table_and_context(self):
        page = render_study(_job(), ohif_url="http://viewer.example/ohif/")
        text = " ".join(_parse(page).text)
        assert RESEARCH_USE_NOTICE in text
        assert finding_label(1, LUNA16_NODULE_DIAMETER, 0.9132, "4B") in text
        assert "Nodule 1 · 23.4 mm · p 0.91 · Lung-RADS 4B" in text
        for expected in ("23.4", "6666", "solid", "4B", "0.91", "screening", "0.35", "calcified", "min_diameter_mm",
                         "localizer", "detect", "4.50", "blob-filter 1.0"):
            assert expected in text, expected
        assert re.search(r"<td>min_diameter_mm</td><td class=\"num\">4</td>", page)
        # A refused series is named by its description, else its UID (the job record's keys).
        assert "<td>1.2.9</td><td>localizer</td>" in page
        assert "<td>Topogram 0.6 T20s</td><td>localizer (scout) by its SeriesDescription</td>" in page
        assert 'src="1.2.826.0.1.3680043.8.498.1/key/1.png"' in page
        assert 'src="1.2.826.0.1.3680043.8.498.1/key/2.png"' in page
        assert (
            'href="http://viewer.example/ohif/viewer?StudyInstanceUIDs=1.2.826.0.1.3680043.8.498.1'
            '&amp;initialSeriesInstanceUID=1.2.3.6"' in page
        )

    def test_listed_finding_is_in_the_table_without_a_key_image(self):
        listed = _finding(diameter_mm=5.0, lung_rads="2", actionable=False, outlined=False)
        details = _job()["details"] | {"findings": [_finding(outlined=True), listed]}
        page = render_study(_job(details=details), ohif_url=None)
        assert re.search(r'<tr id="finding-1" class="outlined">.*?<td>yes</td><td>yes</td>', page)
        assert re.search(r'<tr id="finding-2" class="listed">.*?<td>no</td><td>no \(listed only\)</td>', page)
        assert "Nodule 2 · 5.0 mm · p 0.91 · Lung-RADS 2" in page
        assert re.findall(r'alt="Key image of nodule (\d+)"', page) == ["1"]

    def test_no_ohif_link_without_url(self):
        assert "ohif-link" not in render_study(_job(), ohif_url=None)

    def test_escapes_every_value(self):
        details = _job()["details"] | {
            "operating_point": EVIL,
            "suppressed": {EVIL: 1},
            "findings": [_finding(nodule_type=EVIL, lung_rads=EVIL, sop_instance_uid=EVIL)],
            "timings_s": {EVIL: 1.0},
        }
        page = render_study(_job(study_uid=EVIL, reason=EVIL, details=details), ohif_url='http://x/"onmouseover=')
        assert "<script>" not in page
        assert '"onmouseover' not in page
        assert "script" not in _parse(page).tags
        assert page.count("&lt;script&gt;") >= 5

    def test_no_findings(self):
        page = render_study(_job(details=_job()["details"] | {"findings": []}), ohif_url=None)
        assert "No nodule reported" in page
        assert "key-images" not in page

    def test_no_patient_identifiers(self):
        # The job dicts carry none; the renderer adds none (no PatientName/ID field names either).
        page = render_study(_job(), ohif_url=None)
        assert "Patient" not in page

    def test_ohif_viewer_url(self):
        assert ohif_viewer_url("http://h/", "1.2", None) == "http://h/viewer?StudyInstanceUIDs=1.2"


@pytest.fixture(scope="module")
def nodule_slice(lidc_series_dir) -> Path:
    """The LIDC-IDRI-0001 slice nearest to the LUNA16 nodule centre."""
    paths = sorted(lidc_series_dir.glob("*.dcm"))
    return min(
        paths,
        key=lambda p: abs(
            float(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
                  .ImagePositionPatient[2]) - LUNA16_NODULE_LPS[2]
        ),
    )


@pytest.fixture(scope="module")
def key_png(nodule_slice) -> bytes:
    return render_key_image(nodule_slice, _finding(), number=1)


class TestRenderKeyImage:
    def test_outline_surrounds_the_nodule(self, key_png, nodule_slice):
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "key_image_nodule1.png").write_bytes(key_png)
        image = np.asarray(Image.open(io.BytesIO(key_png)).convert("RGB")).astype(int)
        header = pydicom.dcmread(nodule_slice, stop_before_pixels=True)
        assert image.shape == (header.Rows, header.Columns, 3)
        spacing = float(header.PixelSpacing[0])
        # image-space coordinates of the nodule centre (pixel (c, r) covers [c, c+1) x [r, r+1))
        cx = (LUNA16_NODULE_LPS[0] - float(header.ImagePositionPatient[0])) / spacing + 0.5
        cy = (LUNA16_NODULE_LPS[1] - float(header.ImagePositionPatient[1])) / spacing + 0.5
        radius = LUNA16_NODULE_DIAMETER / 2 / spacing
        outline = np.all(np.abs(image - np.array(KEY_IMAGE_OUTLINE_RGB)) <= 8, axis=-1)
        rows, columns = np.nonzero(outline)
        assert len(rows) > 2 * np.pi * radius  # a whole ring, not a few stray pixels
        distance = np.hypot(columns + 0.5 - cx, rows + 0.5 - cy)
        assert distance.min() >= radius - 1.5
        assert distance.max() <= radius + 6
        # every direction around the centre is covered (closed outline)
        angles = np.degrees(np.arctan2(rows + 0.5 - cy, columns + 0.5 - cx)) % 360
        assert len(np.unique((angles // 15).astype(int))) == 24
        # the nodule itself is inside: bright (soft tissue) in the lung window, lung around it dark
        inside = image[int(cy) - 3 : int(cy) + 4, int(cx) - 3 : int(cx) + 4, 0]
        assert inside.mean() > 150

    def test_lung_window_and_caption(self, key_png):
        image = np.asarray(Image.open(io.BytesIO(key_png)).convert("L"))
        # outside the scan circle (padding) and air are black at L -600 / W 1500 (HU -1000 -> ~34)
        assert image[40:60, 0:20].max() < 40
        # lung parenchyma (left of the mediastinum, row 230) is dark, bone/soft tissue bright
        assert image[225:235, 110:130].mean() < 90
        # the caption box (white text on black) is in the top-left corner
        top = image[4:24, 8:200]
        assert top.max() > 200 and (top < 30).mean() > 0.4

    def test_rejects_a_non_ct_file(self, tmp_path):
        from lungscreen.errors import VolumeError
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp_path / "sc.dcm"
        ds.save_as(path, enforce_file_format=True)
        with pytest.raises(VolumeError, match="not a CT image"):
            render_key_image(path, _finding())


@pytest.mark.slow
def test_review_page_in_headless_chromium(tmp_path, key_png):
    """The study page, served with its key image, as Chromium renders it."""
    site = tmp_path / "site"
    (site / STUDY / "key").mkdir(parents=True)
    (site / STUDY / "key" / "1.png").write_bytes(key_png)
    (site / STUDY / "key" / "2.png").write_bytes(key_png)
    (site / "study.html").write_text(render_study(_job(), ohif_url="http://127.0.0.1:1/"), encoding="utf-8")
    with serve(static_handler(site)) as base, chromium_page(tmp_path, width=1200, height=1000) as page:
        page.goto(f"{base}/study.html", wait_until="load")
        notice = page.locator("#research-notice")
        assert notice.inner_text().strip() == RESEARCH_USE_NOTICE
        box = notice.bounding_box()
        assert box["y"] < 5 and box["width"] > 1000  # first thing on the page, full width
        loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert loaded == [512, 512]
        assert "Nodule 1 · 23.4 mm · p 0.91 · Lung-RADS 4B" in page.locator("#findings").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        shot = page.screenshot(path=str(ARTIFACTS / "review_study.png"), full_page=True)
    image = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    # the notice banner is rendered in its red (#b00020)
    assert np.all(np.abs(image[int(box["y"] + 3), 600] - [176, 0, 32]) <= 10)
    # the key image (with its yellow outline) is on screen
    yellow = np.all(np.abs(image - np.array(KEY_IMAGE_OUTLINE_RGB)) <= 30, axis=-1)
    assert yellow.sum() > 100
