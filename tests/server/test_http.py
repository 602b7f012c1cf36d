"""The HTTP endpoint: review pages, a token for state changes, and retention (purge)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from lungscreen.findings import LUNG_RADS_ORDER
from peers import LungScreen, http_json, needs_binary, storescu
from test_end_to_end import phantom_study

pytestmark = [pytest.mark.slow, needs_binary("storescu")]


def request(url: str, method: str = "GET", token: str | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def test_review_rerun_with_token_and_purge(tmp_path):
    study = phantom_study(tmp_path / "study")
    server = LungScreen(tmp_path, idle_seconds=0.5)
    base = f"http://127.0.0.1:{server.http_port}"
    with server.running():
        storescu(list(study.paths), server.port)
        uid = study.study_instance_uid
        job = server.wait_for_state(uid, ("reported",), timeout=60)

        status, page, kind = request(f"{base}/review")
        assert status == 200 and kind.startswith("text/html") and uid in page.decode()
        status, page, _ = request(f"{base}/review/{uid}")
        assert status == 200 and "Research use only. Not for diagnostic use." in page.decode()
        categories = [finding["lung_rads"] for finding in job["details"]["findings"]]
        assert categories and job["details"]["exam_lung_rads"] == max(categories, key=LUNG_RADS_ORDER.index)
        assert f"Suggested exam category: Lung-RADS v2022 {job['details']['exam_lung_rads']}" in page.decode()
        status, png, kind = request(f"{base}/review/{uid}/key/1.png")
        assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")
        assert request(f"{base}/review/{uid}/key/9.png")[0] == 404
        assert request(f"{base}/review/../../etc/passwd")[0] == 404

        token = (server.data_dir / "api-token").read_text().strip()
        assert request(f"{base}/studies/{uid}/rerun", "POST")[0] == 401
        assert request(f"{base}/studies/{uid}/rerun", "POST", token="wrong")[0] == 401
        assert request(f"{base}/studies/{uid}", "PUT", token=token)[0] == 405
        status, body, _ = request(f"{base}/studies/{uid}/rerun", "POST", token=token)
        assert status == 202 and json.loads(body)["state"] == "queued"
        job = server.wait_for_state(uid, ("reported",), timeout=60)
        assert job["runs"] == 2
        assert "refused unauthenticated POST" in server.log()

        purge = subprocess.run(
            [sys.executable, "-m", "lungscreen.server.cli", "purge", "--older-than", "0", "--data-dir", str(server.data_dir)],
            capture_output=True, text=True, check=True,
        )
        assert "purged the images of 1 study" in purge.stdout
        assert not (server.data_dir / "images" / uid).exists()
        job = server.study(uid)
        assert job["details"]["images_purged_at"] and job["state"] == "reported"
        assert (server.data_dir / "reports" / uid).is_dir(), "reports are kept"
        assert request(f"{base}/review/{uid}/key/1.png")[0] == 410
        assert request(f"{base}/studies/{uid}/rerun", "POST", token=token)[0] == 409, "nothing left to analyse"
        ledger = subprocess.run(
            [sys.executable, "-m", "lungscreen.server.cli", "billing", "export", "--format", "json", "--data-dir", str(server.data_dir)],
            capture_output=True, text=True, check=True,
        )
        assert len(json.loads(ledger.stdout)) == 1, "billing is kept"
        health = http_json(f"{base}/healthz")
        assert health["status"] == "ok" and health["dicom_receivers"] >= 1
