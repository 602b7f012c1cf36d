"""The prior study of a follow-up: LungScreen's history, then a PACS (Orthanc) by C-FIND and C-GET.

Orthanc runs in the test's loopback-only network namespace (scripts/test.sh) holding a prior
made from the real LIDC-IDRI-0001: the same patient 400 days earlier, without its 23 mm
nodule, rotated and shifted. The bundled blob-filter test model is used in the server: these
tests prove the path (query, retrieval, comparison, no SR or billing of the prior, bounded wait).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungscreen.benchmarks.followup import (
    LUNA16_NODULE_LPS, LUNA16_NODULE_MM, remove_nodule, rigid_prior, rigid_transform, write_study,
)
from lungscreen.dicom_io.presentation import nearest_image
from lungscreen.dicom_io.query import StudyIdentity, patient_key, study_identity
from lungscreen.findings import ComparisonStatus, NoduleType, PriorNodule
from lungscreen.models.longitudinal import PriorStudyNodules
from lungscreen.models.registration import AlignmentImage
from lungscreen.server.config import Settings
from lungscreen.server.db import Database
from lungscreen.server.priors import PriorFinder, PriorHistory
from tests.peers import LungScreen, Orthanc, needs_binary, needs_netns, storescu

PATIENT = "FOLLOWUP-EVAL-1"  # what benchmarks.followup.write_study writes


def nodules(*diameters):
    return tuple(PriorNodule((10.0 * i, 0.0, 0.0), d, 100.0, NoduleType.SOLID, "3", f"2.25.{i}", f"Nodule {i}")
                 for i, d in enumerate(diameters, start=1))


def test_the_history_gives_the_latest_earlier_study_of_the_same_patient_within_the_look_back(tmp_path):
    history = PriorHistory(Database(tmp_path / "db.sqlite"))
    me, other = patient_key("P1", "HOSP"), patient_key("P1", "OTHER-HOSPITAL")
    image = AlignmentImage(np.full((8, 8, 8), -500.0, np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    history.record(me, PriorStudyNodules("1.2.1", "20220110", nodules(6.0)))
    history.record(me, PriorStudyNodules("1.2.2", "20250110", nodules(6.0, 8.0), image, unreported=nodules(4.5)))
    history.record(me, PriorStudyNodules("1.2.3", "20260301", nodules(9.0)))  # later than the current study
    history.record(other, PriorStudyNodules("1.2.4", "20251201", nodules(5.0)))  # same ID, another issuer
    latest = history.latest(me, "20260115", "20230115", exclude_study_uid="1.2.9")
    assert latest.study_uid == "1.2.2" and latest.nodules == nodules(6.0, 8.0) and latest.unreported == nodules(4.5)
    assert np.array_equal(latest.image.hu, image.hu) and np.array_equal(latest.image.affine, image.affine)
    assert history.latest(me, "20250110", "20220101", exclude_study_uid="1.2.9").study_uid == "1.2.1"
    assert history.latest(me, "20220110", "20190101", exclude_study_uid="1.2.9") is None
    assert history.latest(me, "20260115", "20250111", exclude_study_uid="1.2.9") is None  # outside the look-back
    assert history.latest(me, "20260115", "20220101", exclude_study_uid="1.2.2").study_uid == "1.2.1"  # a re-run never compares with itself


def test_without_a_pacs_and_without_history_the_report_says_no_prior(tmp_path):
    settings = Settings(data_dir=tmp_path)
    finder = PriorFinder(settings, PriorHistory(Database(settings.db_path)), analyze_prior=_never)
    search = finder.find(StudyIdentity("1.2.5", "20260115", "P1", ""))
    assert search.prior is None and search.no_prior.status is ComparisonStatus.NO_PRIOR
    undated = finder.find(StudyIdentity("1.2.5", "", "P1", ""))
    assert undated.no_prior.status is ComparisonStatus.PRIOR_UNAVAILABLE and "StudyDate" in undated.no_prior.reason


def test_a_failing_history_leaves_a_baseline_report_instead_of_failing_the_study(tmp_path, lidc_series_dir):
    settings = Settings(data_dir=tmp_path)
    db = Database(settings.db_path)
    finder = PriorFinder(settings, PriorHistory(db), analyze_prior=_never)
    db.close()  # every query now raises sqlite3.ProgrammingError
    identity, search = finder.search(sorted(lidc_series_dir.glob("*.dcm"))[:1])
    assert identity is not None and search.prior is None
    assert search.no_prior.status is ComparisonStatus.PRIOR_UNAVAILABLE and "ProgrammingError" in search.no_prior.reason


def test_the_prior_key_image_is_the_stored_slice_through_the_prior_nodule(lidc_series_dir):
    import pydicom

    paths = sorted(lidc_series_dir.glob("*.dcm"))
    header = pydicom.dcmread(paths[40], stop_before_pixels=True)
    position = np.asarray(header.ImagePositionPatient, dtype=float)
    inside = position + np.array([200.0, 150.0, 0.4])  # in the slice's pixels, 0.4 mm off its plane
    found = nearest_image(paths, tuple(inside))
    assert found.path == paths[40] and found.frame_number is None and found.distance_mm == pytest.approx(0.4, abs=0.01)
    assert nearest_image(paths, tuple(position + np.array([-50.0, 0.0, 0.0]))) is None  # beside every image
    assert nearest_image(paths, tuple(inside), series_uid="2.25.1").path == paths[40]  # another series only ranks later


def test_purge_removes_retrieved_priors_past_retention_and_keeps_their_findings(tmp_path, lidc_series_dir):
    import os
    import shutil
    import time

    settings = Settings(data_dir=tmp_path)
    db = Database(settings.db_path)
    history = PriorHistory(db)
    day = 86400.0
    folders = {}
    for uid in ("1.2.10", "1.2.11", "1.2.12", "1.2.13"):  # two analysed (old, recent), two never analysed (old, recent)
        folders[uid] = tmp_path / "priors" / uid
        folders[uid].mkdir(parents=True)
        for path in sorted(lidc_series_dir.glob("*.dcm"))[:2]:
            shutil.copy(path, folders[uid])
    key = patient_key("P1", "HOSP")
    history.record(key, PriorStudyNodules("1.2.10", "20240110", nodules(6.0)), retrieved=True)
    history.record(key, PriorStudyNodules("1.2.11", "20250110", nodules(6.0)), retrieved=True)
    with db.transaction() as c:
        c.execute("UPDATE prior_studies SET created_at = ? WHERE study_uid = '1.2.10'", (time.time() - 40 * day,))
    old = time.time() - 40 * day
    for path in [folders["1.2.12"], *folders["1.2.12"].iterdir()]:
        os.utime(path, (old, old))
    db.close()
    purge = subprocess.run([sys.executable, "-m", "lungscreen.server.cli", "purge", "--older-than", "30", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True, check=True)
    assert "purged the images of 2 retrieved prior studies" in purge.stdout
    assert {p.name for p in (tmp_path / "priors").iterdir()} == {"1.2.11", "1.2.13"}
    kept = PriorHistory(Database(settings.db_path)).latest(key, "20260101", "20230101", exclude_study_uid="1.2.99")
    assert kept.study_uid == "1.2.11" and PriorHistory(Database(settings.db_path)).nodule("1.2.10", "2.25.1") is not None


def test_the_study_page_shows_each_matched_nodule_beside_its_prior_or_says_the_prior_images_are_gone():
    from lungscreen.server.review import render_study

    prior = {"study_uid": "1.2.3", "study_date": "20250110", "diameter_mm": 6.0, "volume_mm3": 110.0, "interval_days": 370}
    findings = [
        {"center_lps_mm": [1.0, 2.0, 3.0], "diameter_mm": 9.0, "probability": 0.9, "lung_rads": "4A", "change": "growing",
         "prior": prior, "volume_doubling_time_days": 123.4, "outlined": False},
        {"center_lps_mm": [9.0, 2.0, 3.0], "diameter_mm": 7.0, "probability": 0.8, "lung_rads": "3", "change": "new", "prior": None},
    ]
    job = {"study_uid": "1.2.9", "state": "reported", "details": {"findings": findings}}
    here = render_study(job, ohif_url=None, priors_on_node={"1.2.3"})
    section = here[here.index('id="prior-and-current"'):]
    assert 'src="1.2.9/prior/1.png"' in section and 'src="1.2.9/key/1.png"' in section  # listed ones too
    assert "1.2.9/prior/2.png" not in here and 'id="comparison-2"' not in here  # a new nodule has no prior
    assert all(text in section for text in (">growing<", ">6.0<", ">9.0<", ">370<", ">123<"))
    gone = render_study(job, ohif_url=None, priors_on_node=())
    assert "/prior/1.png" not in gone and "The prior study's images (1.2.3) are not on this node" in gone
    baseline = render_study({**job, "details": {"findings": [findings[1]]}}, ohif_url=None)
    assert "prior-and-current" not in baseline and "prior-not-reported" not in baseline
    # A nodule compared with a candidate the prior's analysis did not report, and the prior's
    # nodules no current finding continues, each with what is at its place now.
    unreported_then = {**findings[0], "prior": {**prior, "reported": False}}
    comparison = {
        "resolved": [{"tracking_id": "Nodule 3", "diameter_mm": 5.0, "lung_rads": "2"}],
        "still_seen": [{"tracking_id": "Nodule 4", "diameter_mm": 4.1, "prior_diameter_mm": 6.5, "lung_rads": "3"}],
        "not_scanned": [],
    }
    page = render_study({**job, "details": {"findings": [unreported_then], "comparison": comparison}}, ohif_url=None,
                        priors_on_node={"1.2.3"})
    assert "seen by its analysis, not reported" in page
    table = page[page.index('id="prior-not-reported"'):]
    assert "Nodule 3" in table and "resolved: aerated lung at its place now" in table and ">5.0<" in table
    assert "Nodule 4" in table and "still seen at its place, not reported now" in table and ">6.5<" in table


def request(url: str) -> tuple[int, bytes, str]:
    """GET ``url``: status, body, content type (an HTTP error's too)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _never(paths, timeout_s):
    raise AssertionError("no prior should be analysed here")


# --- with a PACS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory, lidc_series_dir):
    """The current study (20260115), its prior (20241211: nodule removed, patient moved) and a
    second follow-up (20270115), all of patient FOLLOWUP-EVAL-1, as DICOM folders."""
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    root = tmp_path_factory.mktemp("prior-studies")
    series = index_study(sorted(lidc_series_dir.glob("*.dcm"))).series[0]
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    without = volume.voxels.copy()
    remove_nodule(without, volume.affine, LUNA16_NODULE_LPS, LUNA16_NODULE_MM, np.random.default_rng(1))
    moved, moved_affine = rigid_prior(without, volume.affine, rigid_transform((-4.0, 2.0, -2.0), (-10.0, 7.0, -5.0), (0, 0, -175)))
    return {
        "prior": write_study(moved, moved_affine, root / "prior", "20241211"),
        "current": write_study(volume.voxels, volume.affine, root / "current", "20260115"),
        "next": write_study(volume.voxels, volume.affine, root / "next", "20270115"),
    }


def _orthanc(tmp: Path, *, allow_get: bool, lungscreen_port: int = 104) -> Orthanc:
    modality = {"AET": "LUNGSCREEN", "Host": "127.0.0.1", "Port": lungscreen_port, "AllowEcho": True,
                "AllowFind": True, "AllowGet": allow_get, "AllowMove": False, "AllowStore": True}
    return Orthanc(tmp, modalities={"lungscreen": modality})


def _upload(orthanc: Orthanc, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        orthanc.post("/instances", path.read_bytes())


@needs_netns
@needs_binary("Orthanc")
def test_a_prior_that_the_pacs_refuses_to_send_leaves_a_baseline_report_that_says_so(tmp_path, studies):
    orthanc = _orthanc(tmp_path, allow_get=False)
    with orthanc.running():
        _upload(orthanc, studies["prior"])
        settings = Settings(data_dir=tmp_path / "ls", prior_source=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", prior_timeout_s=60)
        finder = PriorFinder(settings, PriorHistory(Database(settings.db_path)), analyze_prior=_never)
        search = finder.find(study_identity(next(studies["current"].iterdir())))
    assert search.prior is None and search.no_prior.status is ComparisonStatus.PRIOR_UNAVAILABLE
    assert "C-GET" in search.no_prior.reason or "refused" in search.no_prior.reason, search.no_prior.reason


@needs_netns
@needs_binary("Orthanc")
def test_a_pacs_without_an_earlier_ct_of_the_patient_means_no_prior(tmp_path, studies):
    orthanc = _orthanc(tmp_path, allow_get=True)
    with orthanc.running():
        _upload(orthanc, studies["next"])  # a later study of the patient is no prior
        settings = Settings(data_dir=tmp_path / "ls", prior_source=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
        finder = PriorFinder(settings, PriorHistory(Database(settings.db_path)), analyze_prior=_never)
        search = finder.find(study_identity(next(studies["current"].iterdir())))
    assert search.prior is None and search.no_prior.status is ComparisonStatus.NO_PRIOR


@needs_netns
@needs_binary("Orthanc")
def test_a_pacs_that_does_not_answer_in_time_never_holds_the_report_longer_than_the_bound(tmp_path, studies):
    import socket
    import time

    silent = socket.socket()  # accepts the TCP connection, never answers the A-ASSOCIATE
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    settings = Settings(data_dir=tmp_path / "ls", prior_source=f"PACS@127.0.0.1:{silent.getsockname()[1]}", prior_timeout_s=2.0)
    finder = PriorFinder(settings, PriorHistory(Database(settings.db_path)), analyze_prior=_never)
    started = time.monotonic()
    search = finder.find(study_identity(next(studies["current"].iterdir())))
    waited = time.monotonic() - started
    silent.close()
    assert search.no_prior.status is ComparisonStatus.PRIOR_UNAVAILABLE
    assert waited < 2.0 + 5.0 + 5.0  # the bound and its grace, plus slack on a loaded machine (no timing target)


@needs_netns
@needs_binary("Orthanc", "storescu")
def test_follow_up_end_to_end_prior_from_the_pacs_then_from_the_history(tmp_path, studies):
    server = LungScreen(tmp_path / "server", idle_seconds=0.5)
    orthanc = _orthanc(tmp_path, allow_get=True, lungscreen_port=server.port)
    prior_uid = study_identity(next(studies["prior"].iterdir())).study_uid
    current_uid = study_identity(next(studies["current"].iterdir())).study_uid
    next_uid = study_identity(next(studies["next"].iterdir())).study_uid
    server_config = tmp_path / "server" / "lungscreen.toml"
    with orthanc.running():
        _upload(orthanc, studies["prior"])
        with open(server_config, "a") as config:
            config.write(f'prior_source = "ORTHANC@127.0.0.1:{orthanc.dicom_port}"\nprior_timeout_s = 300\n')
        with server.running():
            storescu(sorted(studies["current"].iterdir()), server.port)
            job = server.wait_for_state(current_uid, ("reported", "delivered"), timeout=600)["details"]
    assert job["prior_study_uid"] == prior_uid, job.get("comparison")
    assert job["comparison"]["status"] == "compared" and job["comparison"]["interval_days"] == 400
    assert job["findings"], "the test model reports blobs on LIDC-IDRI-0001"
    assert all(f["change"] in ("new", "stable", "growing", "shrinking") for f in job["findings"])
    assert all(f["category"]["rule"] for f in job["findings"])
    # The retrieved prior is in the store for analysis, but never became a job, an SR or a billing entry.
    assert any((server.data_dir / "priors" / prior_uid).iterdir())
    with server.running():
        assert server.study(prior_uid) is None
        billing = subprocess.run([sys.executable, "-m", "lungscreen.server.cli", "billing", "export", "--format", "json",
                                  "--data-dir", str(server.data_dir)], capture_output=True, text=True, check=True)
        assert [e["study_uid"] for e in json.loads(billing.stdout)] == [current_uid]
        # A year later, with the PACS gone: the prior is the study LungScreen analysed itself.
        storescu(sorted(studies["next"].iterdir()), server.port)
        follow_up = server.wait_for_state(next_uid, ("reported", "delivered"), timeout=600)["details"]
    assert follow_up["prior_study_uid"] == current_uid and follow_up["comparison"]["interval_days"] == 365
    before = {f["tracking_uid"]: f for f in job["findings"]}
    for finding in follow_up["findings"]:  # the same scan again: every nodule matched, under its tracking UID
        assert finding["change"] != "new" and finding["tracking_uid"] in before
        assert finding["tracking_id"] == before[finding["tracking_uid"]]["tracking_id"]
    assert len(follow_up["findings"]) == len(job["findings"])
    # Each SR references the prior's images it was compared with, from the PACS's copy or the node's own.
    for study_uid, details, prior_study, prior_folder in (
            (current_uid, job, prior_uid, studies["prior"]), (next_uid, follow_up, current_uid, studies["current"])):
        sr = next(pydicom.dcmread(p) for p in (server.data_dir / "reports" / study_uid).rglob("*")
                  if p.is_file() and pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == details["sr_sop_uid"])
        (other_study,) = sr.PertinentOtherEvidenceSequence
        assert other_study.StudyInstanceUID == prior_study and len(other_study.ReferencedSeriesSequence) == 1
        assert len(other_study.ReferencedSeriesSequence[0].ReferencedSOPSequence) == len(list(prior_folder.iterdir()))
    with server.running():  # the review page: each matched nodule's prior and current key images side by side
        base = f"http://127.0.0.1:{server.http_port}"
        status, page, _ = request(f"{base}/review/{next_uid}")
        assert status == 200 and 'id="prior-and-current"' in page.decode()
        for number, finding in enumerate(follow_up["findings"], start=1):
            assert f'src="{next_uid}/prior/{number}.png"' in page.decode()
            assert f'src="{next_uid}/key/{number}.png"' in page.decode()
            status, png, kind = request(f"{base}/review/{next_uid}/prior/{number}.png")
            assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")
        # The current study compared with the retrieved prior, whose images are under data/priors.
        status, page, _ = request(f"{base}/review/{current_uid}")
        matched = [n for n, f in enumerate(job["findings"], start=1) if f["prior"]]
        assert status == 200 and all(f'src="{current_uid}/prior/{n}.png"' in page.decode() for n in matched)
        for number in matched:
            assert request(f"{base}/review/{current_uid}/prior/{number}.png")[1].startswith(b"\x89PNG")
        # Without the prior's images on the node, the page says so and the image route answers 410.
        import shutil
        shutil.rmtree(server.data_dir / "priors" / prior_uid)
        page = request(f"{base}/review/{current_uid}")[1].decode()
        assert all(f'src="{current_uid}/prior/{n}.png"' not in page for n in matched)
        assert (not matched) or "are not on this node" in page
        assert all(request(f"{base}/review/{current_uid}/prior/{n}.png")[0] == 410 for n in matched)


@needs_netns
@needs_binary("Orthanc", "storescu")
def test_a_retrieved_prior_can_be_reported_in_its_own_study_under_the_same_tracking_uids(tmp_path, studies):
    """``report_retrieved_priors``: the analysis made for the comparison is also the prior's own
    report (SR delivered into the prior's study in the PACS, billing entry), so the prior's SR and
    the follow-up's SR give a matched nodule the same Tracking UID and Identifier."""
    from lungscreen.benchmarks.harness import free_port
    from lungscreen.dicom_io.sr_reading import read_measurement_report

    port = free_port()
    orthanc = _orthanc(tmp_path, allow_get=True, lungscreen_port=port)
    server = LungScreen(tmp_path / "server", idle_seconds=0.5, port=port,
                        destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"])
    prior_uid = study_identity(next(studies["prior"].iterdir())).study_uid
    current_uid = study_identity(next(studies["current"].iterdir())).study_uid
    with open(tmp_path / "server" / "lungscreen.toml", "a") as config:
        config.write(f'prior_source = "ORTHANC@127.0.0.1:{orthanc.dicom_port}"\nprior_timeout_s = 300\n'
                     'report_retrieved_priors = true\noutline_categories = ["1", "2", "3", "4A", "4B", "4X"]\n')
    with orthanc.running():
        _upload(orthanc, studies["prior"])
        with server.running():
            storescu(sorted(studies["current"].iterdir()), server.port)
            current = server.wait_for_state(current_uid, ("delivered",), timeout=600)["details"]
            prior = server.wait_for_state(prior_uid, ("delivered",), timeout=120)["details"]
            billing = subprocess.run(
                [sys.executable, "-m", "lungscreen.server.cli", "billing", "export", "--format", "json",
                 "--data-dir", str(server.data_dir)], capture_output=True, text=True, check=True)
        srs = {}
        for study_uid in (prior_uid, current_uid):
            (found,) = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
            with urllib.request.urlopen(f"{orthanc.url}/instances/{found}/file", timeout=30) as response:
                (tmp_path / f"{study_uid}.dcm").write_bytes(response.read())
            srs[study_uid] = read_measurement_report(tmp_path / f"{study_uid}.dcm", lambda sop_uid: None)
    assert current["prior_study_uid"] == prior_uid and current["comparison"]["status"] == "compared"
    assert sorted(e["study_uid"] for e in json.loads(billing.stdout)) == sorted([current_uid, prior_uid])
    assert srs[prior_uid].sop_uid == prior["sr_sop_uid"] and srs[current_uid].sop_uid == current["sr_sop_uid"]
    # (a finding compared with a candidate the prior's analysis did not report has no tracking then)
    matched = [f for f in current["findings"] if f["change"] != "new" and f["prior"]["reported"]]
    assert matched, "the test model's blobs on the unchanged anatomy are matched"
    # The SR's Tracking Identifier is OHIF's tool prefix + the finding's (dicom_io/sr.py).
    tracked = {uid: {(m.tracking_uid, m.tracking_identifier.rsplit(":", 1)[-1]) for m in report.measurements}
               for uid, report in srs.items()}
    for finding in matched:
        assert (finding["tracking_uid"], finding["tracking_id"]) in tracked[prior_uid] & tracked[current_uid]
