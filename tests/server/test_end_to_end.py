"""The whole DICOM path with real peers: dcmtk storescu -> lungscreen serve -> dcmtk storescp / Orthanc.

The model is the bundled fixed-weight test model (``models/blob-filter``); these tests prove
the path (ingest, completion, selection, volume, inference, SR, billing, delivery), not
detection quality, which the detector's own evaluation measures.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from lungscreen.benchmarks.harness import children
from lidc_reports import validate_sr
from peers import (
    LungScreen,
    Orthanc,
    free_port,
    needs_binary,
    needs_netns,
    process_running,
    storescp,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.slow, needs_binary("storescu", "storescp", "dciodvfy", "dsrdump")]

TERMINAL = ("delivered", "failed", "reported")


@pytest.fixture(scope="module")
def lidc_files(lidc_series_dir) -> list[Path]:
    return sorted(lidc_series_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def lidc_headers_by_uid(lidc_headers) -> dict[str, pydicom.Dataset]:
    return {str(h.SOPInstanceUID): h for h in lidc_headers}


def sr_findings(sr: pydicom.Dataset) -> list[dict]:
    """Per measurement group (one per outlined finding, TID 1501 with the outline in its first
    NUM): tracking UID, referenced SOP instance and polyline, read with highdicom."""
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    groups = report.content.get_image_measurement_groups()
    out = []
    for group in groups:
        area = next(item for item in group[0].ContentSequence if item.ValueType == "NUM")
        (region,) = [item for item in area.ContentSequence if item.ValueType == "SCOORD"]
        (source,) = [item for item in region.ContentSequence if item.RelationshipType == "SELECTED FROM"]
        out.append(
            {
                "tracking_uid": group.tracking_uid,
                "sop_instance_uid": source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                "points": np.asarray(region.GraphicData, dtype=float).reshape(-1, 2),
                "long_axis_mm": next(m.value for m in group.get_measurements() if m.name.meaning.lower().startswith("long")),
            }
        )
    return out


def check_sr(sr_path: Path, ct_headers: dict[str, pydicom.Dataset], job: dict) -> pydicom.Dataset:
    validate_sr(sr_path)  # dciodvfy and PixelMed's DicomSRValidator: no error
    dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
    sr = pydicom.dcmread(sr_path)
    any_ct = next(iter(ct_headers.values()))
    assert sr.StudyInstanceUID == any_ct.StudyInstanceUID, "the SR goes into the same study"
    assert sr.AccessionNumber == any_ct.get("AccessionNumber", "")
    assert sr.PerformedProcedureCodeSequence[0].CodeValue == "LUNG-AI-EXT"
    findings = [finding for finding in job["details"]["findings"] if finding["outlined"]]
    groups = sr_findings(sr)
    assert len(groups) == len(findings)
    assert len({g["tracking_uid"] for g in groups}) == len(groups)
    for group, finding in zip(groups, findings):
        ct = ct_headers[group["sop_instance_uid"]]
        assert group["sop_instance_uid"] == finding["sop_instance_uid"]
        step = 2.5
        assert abs(float(ct.ImagePositionPatient[2]) - finding["center_lps_mm"][2]) <= step / 2 + 1e-6
        points = group["points"]
        assert np.allclose(points[0], points[-1]), "closed polyline"
        spacing = float(ct.PixelSpacing[0])
        centre_x = float(ct.ImagePositionPatient[0]) + (points[:-1, 0].mean() - 0.5) * spacing
        centre_y = float(ct.ImagePositionPatient[1]) + (points[:-1, 1].mean() - 0.5) * spacing
        assert abs(centre_x - finding["center_lps_mm"][0]) < 1.5 and abs(centre_y - finding["center_lps_mm"][1]) < 1.5
        assert group["long_axis_mm"] == pytest.approx(finding["diameter_mm"], abs=0.01)
    return sr


@needs_netns
def test_pacs_push_to_storescp_with_a_valid_sr(tmp_path, lidc_files, lidc_headers_by_uid):
    dest_port = free_port()
    with storescp(tmp_path / "received", dest_port, "DEST", log_path=tmp_path / "storescp.log"):
        server = LungScreen(tmp_path, destinations=[f"DEST@127.0.0.1:{dest_port}"], idle_seconds=1.0)
        with server.running():
            storescu(lidc_files, server.port)
            study_uid = next(iter(lidc_headers_by_uid.values())).StudyInstanceUID
            job = server.wait_for_state(study_uid, ("delivered", "failed"), timeout=180)
            assert job["state"] == "delivered", job
            assert job["instances"] == 133 and job["runs"] == 1
            received = wait_until(lambda: list((tmp_path / "received").glob("SR*")), 10, what="SR at storescp")
            assert len(received) == 1
            check_sr(received[0], lidc_headers_by_uid, job)
            assert job["details"]["operating_point"] == "screening"
            assert set(job["details"]["timings_s"]) >= {"assemble", "select", "volume", "preprocess", "inference", "report"}
            # the local copy is kept
            local = Path(job["details"]["sr_path"])
            assert local.is_file() and pydicom.dcmread(local).SOPInstanceUID == pydicom.dcmread(received[0]).SOPInstanceUID
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics").read().decode()
            assert 'lungscreen_jobs{state="delivered"} 1.0' in metrics
            assert 'lungscreen_deliveries{state="sent"} 2.0' in metrics  # the SR and the presentation state
            assert 'lungscreen_deliveries{state="dead"} 0.0' in metrics
            assert 'lungscreen_stage_seconds_count{stage="inference"} 1.0' in metrics
            assert "lungscreen_instances_received_total 133.0" in metrics  # counted in the receivers
            assert "lungscreen_dicom_associations_open 0.0" in metrics
            assert re.search(r"^lungscreen_dicom_receivers [1-9]", metrics, re.M)
            # re-sending the identical study changes nothing: no second run, no second SR
            storescu(lidc_files[:5], server.port)
            time.sleep(2.5)
            job = server.study(study_uid)
            assert job["runs"] == 1 and job["state"] == "delivered"
        billing = subprocess.run(
            [".venv/bin/lungscreen", "billing", "export", "--data-dir", str(server.data_dir), "--format", "json"],
            capture_output=True, text=True, check=True,
        )
        rows = json.loads(billing.stdout)
        assert len(rows) == 1 and rows[0]["study_uid"] == study_uid
        header = next(iter(lidc_headers_by_uid.values()))
        assert header.PatientID and header.PatientID not in server.log(), "no patient IDs in the log"


# --- synthetic studies: small, fast, with known spheres ---------------------------------------


def phantom_study(out_dir: Path, *, study_uid=None, spheres=(((20, 64, 64), 10.0),), shape=(40, 128, 128), **kwargs):
    """A lung-like block with solid spheres, written by the repository's own DICOM writer."""
    from lungscreen.training.dicom_writer import write_ct_series

    spacing = (1.25, 0.8, 0.8)
    hu = np.full(shape, -850.0, np.float32)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for (ck, cj, ci), d in spheres:
        hu[((k - ck) * spacing[0]) ** 2 + ((j - cj) * spacing[1]) ** 2 + ((i - ci) * spacing[2]) ** 2 <= (d / 2) ** 2] = 40
    return write_ct_series(hu, spacing, out_dir, study_instance_uid=study_uid or generate_uid(), **kwargs)


def reencode(files: list[Path], out_dir: Path, transfer_syntax: str, **encode_kwargs) -> list[Path]:
    """Copies of ``files`` under new study/series/instance UIDs, compressed with pydicom's encoders."""
    out_dir.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    written = []
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.compress(transfer_syntax, **encode_kwargs)
        written.append(out_dir / f"{n:04d}.dcm")
        ds.save_as(written[-1], enforce_file_format=True)
    return written


def test_compressed_transfer_syntaxes_give_the_same_findings(tmp_path, lidc_files):
    """The real CT re-encoded as JPEG-LS, JPEG 2000 and RLE (storescu proposes each file's own syntax)."""
    variants = {
        "uncompressed": (lidc_files, ()),
        "jpeg-ls": (reencode(lidc_files, tmp_path / "jls", JPEGLSLossless), ("-xt",)),
        "jpeg2000": (reencode(lidc_files, tmp_path / "j2k", JPEG2000Lossless), ("-xv",)),
        "rle": (reencode(lidc_files, tmp_path / "rle", RLELossless), ("-xr",)),
    }
    server = LungScreen(tmp_path, idle_seconds=0.5, extra_args=["--workers", "2"])
    findings = {}
    with server.running():
        for name, (files, propose) in variants.items():
            storescu(files, server.port, propose=propose)
        for name, (files, _) in variants.items():
            study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            job = server.wait_for_state(study_uid, ("reported", "failed"), timeout=240)
            assert job["state"] == "reported", job
            findings[name] = [(f["center_lps_mm"], f["diameter_mm"], f["probability"]) for f in job["details"]["findings"]]
    for name in ("jpeg-ls", "jpeg2000", "rle"):
        assert findings[name] == findings["uncompressed"], name
    stored = list((server.data_dir / "images").rglob("*.dcm"))
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in stored}
    assert {JPEGLSLossless, JPEG2000Lossless, RLELossless} <= syntaxes, "stored as received, not transcoded"


def test_lossy_jpeg2000_is_received_and_analysed(tmp_path, lidc_files):
    by_position = sorted(lidc_files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    files = reencode(by_position[40:100], tmp_path / "j2k-lossy", JPEG2000, j2k_cr=[20])
    server = LungScreen(tmp_path, idle_seconds=0.5)
    with server.running():
        storescu(files, server.port, propose=("-xw",))
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        job = server.wait_for_state(study_uid, ("reported", "failed"), timeout=120)
    assert job["state"] == "reported", job


def _modify(files: list[Path], fn) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        fn(ds)
        ds.save_as(path, enforce_file_format=False)


def test_bad_input_gets_clear_reasons_and_good_studies_still_work(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    good = phantom_study(tmp_path / "good")
    single = phantom_study(tmp_path / "single", shape=(1, 64, 64), spheres=())
    gap = phantom_study(tmp_path / "gap", spheres=())
    gap_files = list(gap.paths)
    gap_files.pop(20)  # a missing slice in the middle
    corrupt = phantom_study(tmp_path / "corrupt", spheres=())
    _modify(list(corrupt.paths[10:11]), lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 3]))
    no_pixels = phantom_study(tmp_path / "nopixels", spheres=())
    _modify(list(no_pixels.paths), lambda ds: delattr(ds, "PixelData"))

    server = LungScreen(tmp_path, idle_seconds=0.5)
    with server.running():
        storescu(list(single.paths), server.port)
        storescu(gap_files, server.port)
        storescu(list(corrupt.paths), server.port)
        storescu(list(no_pixels.paths), server.port)

        # A non-CT study and instances with crafted UIDs, sent with a pynetdicom SCU
        # (dcmtk's storescu refuses to send some of them).
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LUNGSCREEN")
        assert assoc.is_established
        mr = pydicom.dcmread(good.paths[0])
        mr.SOPClassUID = MRImageStorage
        mr.StudyInstanceUID, mr.SOPInstanceUID, mr.Modality = generate_uid(), generate_uid(), "MR"
        assert assoc.send_c_store(mr).Status == 0x0000, "other storage classes are accepted and ignored"
        evil = pydicom.dcmread(good.paths[0])
        evil_study = generate_uid()
        evil.StudyInstanceUID, evil.SOPInstanceUID = evil_study, "1.2.3/../../../../tmp/evil"
        assert assoc.send_c_store(evil).Status != 0x0000
        evil_study_uid = pydicom.dcmread(good.paths[1])
        evil_study_uid.StudyInstanceUID, evil_study_uid.SOPInstanceUID = "../../escape", generate_uid()
        assert assoc.send_c_store(evil_study_uid).Status != 0x0000
        assoc.release()

        storescu(list(good.paths), server.port)
        expected = {
            single.study_instance_uid: "too few slices: 1 <",
            gap.study_instance_uid: "gap",
            corrupt.study_instance_uid: "",
            no_pixels.study_instance_uid: "pixel data",
            evil_study: "not a valid DICOM UID",
        }
        for study_uid, words in expected.items():
            job = server.wait_for_state(study_uid, ("failed",), timeout=60)
            assert words.lower() in job["reason"].lower() + json.dumps(job["rejected_instances_detail"]).lower(), job
        corrupt_job = server.study(corrupt.study_instance_uid)
        assert corrupt_job["reason"], corrupt_job
        mr_job = server.study(mr.StudyInstanceUID)
        assert mr_job["state"] == "failed" and mr_job["runs"] == 0
        assert "not a CT study: received MR Image Storage instances only" in mr_job["reason"]
        job = server.wait_for_state(good.study_instance_uid, ("reported",), timeout=60)
        assert len(job["details"]["findings"]) == 1
        assert server.proc.poll() is None, "the server stays up"
    assert not Path("/tmp/evil.dcm").exists() and not list(server.data_dir.parent.glob("escape*"))
    assert "not a valid DICOM UID" in server.log()


@needs_netns
def test_destination_down_then_up_is_delivered(tmp_path):
    study = phantom_study(tmp_path / "study")
    dest_port = free_port()
    server = LungScreen(
        tmp_path, destinations=[f"DEST@127.0.0.1:{dest_port}"], idle_seconds=0.5,
        config={"retry_base_delay_s": 0.5, "max_delivery_attempts": 20},
    )
    with server.running():
        storescu(list(study.paths), server.port)
        server.wait_for_state(study.study_instance_uid, ("reported",), timeout=60)
        wait_until(lambda: (server.study(study.study_instance_uid)["deliveries"][0]["attempts"] >= 2), 20, what="retries")
        job = server.study(study.study_instance_uid)
        assert job["state"] == "reported" and job["deliveries"][0]["state"] == "pending"
        with storescp(tmp_path / "received", dest_port, "DEST", log_path=tmp_path / "storescp.log"):
            job = server.wait_for_state(study.study_instance_uid, ("delivered",), timeout=60)
            assert len(list((tmp_path / "received").glob("SR*"))) == 1
    assert job["deliveries"][0]["state"] == "sent"


@needs_netns
def test_destination_that_rejects_ends_in_dead_letter(tmp_path):
    study = phantom_study(tmp_path / "study")
    dest_port = free_port()
    # storescp --refuse aborts an association that arrives just after a refusal (pynetdicom then
    # reports the peer unreachable: a transient failure, retried); quick retries keep the test
    # within its wait however many of those a delivery meets.
    server = LungScreen(
        tmp_path, destinations=[f"DEST@127.0.0.1:{dest_port}"], idle_seconds=0.5, config={"retry_base_delay_s": 0.25}
    )
    args = ["storescp", "--refuse", str(dest_port)]
    from peers import process

    def refused_echo() -> bool:  # a whole DICOM exchange: a bare TCP probe would hold storescp up
        echo = subprocess.run(["echoscu", "127.0.0.1", str(dest_port)], capture_output=True, text=True)
        return "Rejected" in echo.stdout + echo.stderr

    with process(args, tmp_path / "storescp.log"), server.running():
        wait_until(refused_echo, 10, what="storescp")
        storescu(list(study.paths), server.port)
        server.wait_for_state(study.study_instance_uid, ("failed",), timeout=60)
        job = wait_until(
            lambda: (j := server.study(study.study_instance_uid)) and {d["state"] for d in j["deliveries"]} == {"dead"}
            and j, 60, what="every delivery dead-lettered",  # 8 tries 0.25 s, 0.5 s, ... apart: 32 s at most
        )
        time.sleep(3)  # a dead letter is final: no more attempts
        later = server.study(study.study_instance_uid)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics").read().decode()
    assert f'lungscreen_deliveries{{state="dead"}} {float(len(job["deliveries"]))}' in metrics
    assert "dead-lettered after" in job["reason"], job
    assert {d["state"] for d in job["deliveries"]} == {"dead"}, job["deliveries"]
    assert [d["attempts"] for d in later["deliveries"]] == [d["attempts"] for d in job["deliveries"]]
    # A delivery ends at the permanent rejection, before its last allowed try, or (when every
    # try met a dropped connection) after its eighth try: never an endless retry loop.
    for delivery in job["deliveries"]:
        if "rejected the association permanently" in delivery["last_error"]:
            assert delivery["attempts"] < 8, delivery
        else:
            assert delivery["attempts"] == 8 and "could not be reached" in delivery["last_error"], delivery
    assert any("rejected the association permanently" in d["last_error"] for d in job["deliveries"]), job


@needs_netns
@needs_binary("Orthanc")
def test_orthanc_as_pacs_gets_the_sr_in_the_same_study(tmp_path, lidc_files):
    lung_port = free_port()
    orthanc = Orthanc(tmp_path, modalities={"lungscreen": ["LUNGSCREEN", "127.0.0.1", lung_port]})
    server = LungScreen(
        tmp_path, destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], idle_seconds=1.0, port=lung_port,
        extra_args=["--allow-ae", "ORTHANC"],
    )
    with orthanc.running(), server.running():
        for path in lidc_files:
            orthanc.post("/instances", path.read_bytes())
        (orthanc_study,) = orthanc.get("/studies")
        orthanc.post("/modalities/lungscreen/store", {"Resources": [orthanc_study], "Synchronous": True})
        study_uid = orthanc.get(f"/studies/{orthanc_study}")["MainDicomTags"]["StudyInstanceUID"]
        job = server.wait_for_state(study_uid, ("delivered", "failed"), timeout=180)
        assert job["state"] == "delivered", job
        series = orthanc.get(f"/studies/{orthanc_study}/series")
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
        assert modalities == ["CT", "PR", "SR"], "the SR and the presentation state are in the same study as the CT"
        assert orthanc.get("/studies") == [orthanc_study]
        # The PACS sends the whole study back, our SR included: nothing is re-run.
        orthanc.post("/modalities/lungscreen/store", {"Resources": [orthanc_study], "Synchronous": True})
        time.sleep(3)
        job = server.study(study_uid)
        assert job["runs"] == 1 and job["state"] == "delivered", job


def test_unknown_calling_ae_is_rejected_with_a_clear_log_line(tmp_path):
    study = phantom_study(tmp_path / "study")
    server = LungScreen(tmp_path, extra_args=["--allow-ae", "TRUSTED"])
    with server.running():
        refused = storescu(list(study.paths[:2]), server.port, calling="INTRUDER", check=False)
        assert refused.returncode != 0
        echo = subprocess.run(["echoscu", "-aet", "TRUSTED", "-aec", "LUNGSCREEN", "127.0.0.1", str(server.port)])
        assert echo.returncode == 0, "C-ECHO from an allowed caller"
        assert server.study(study.study_instance_uid) is None, "nothing from the rejected caller was stored"
    assert "calling AE title 'INTRUDER' is not in the allowlist" in server.log()


@needs_netns
def test_late_instances_rerun_and_the_new_sr_supersedes_the_first(tmp_path):
    study_uid = generate_uid()
    first = phantom_study(tmp_path / "first", study_uid=study_uid, series_number=1)
    late = phantom_study(tmp_path / "late", study_uid=study_uid, series_number=2, spheres=(((20, 40, 90), 12.0),),
                         slice_thickness=1.25)
    dest_port = free_port()
    with storescp(tmp_path / "received", dest_port, "DEST", log_path=tmp_path / "storescp.log"):
        server = LungScreen(tmp_path, destinations=[f"DEST@127.0.0.1:{dest_port}"], idle_seconds=0.5)
        with server.running():
            storescu(list(first.paths), server.port)
            server.wait_for_state(study_uid, ("delivered",), timeout=60)
            storescu(list(late.paths), server.port)  # a second series, after the first SR went out
            job = wait_until(lambda: (j := server.study(study_uid))["runs"] == 2 and j["state"] == "delivered" and j, 60,
                             what="second run delivered")
            assert job["instances"] == 80
        received = sorted((tmp_path / "received").glob("SR*"), key=lambda p: pydicom.dcmread(p).InstanceNumber)
        assert len(received) == 2
        old, new = (pydicom.dcmread(p) for p in received)
        assert old.SeriesInstanceUID == new.SeriesInstanceUID, "re-runs go into the same SR series"
        predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
        rows = json.loads(subprocess.run(
            [".venv/bin/lungscreen", "billing", "export", "--data-dir", str(server.data_dir), "--format", "json"],
            capture_output=True, text=True, check=True,
        ).stdout)
        assert len(rows) == 1, "re-processing never adds a second billing entry"


def test_restart_resumes_unfinished_jobs(tmp_path):
    study = phantom_study(tmp_path / "study")
    port, http_port = free_port(), free_port()
    slow = LungScreen(tmp_path, idle_seconds=60, port=port, http_port=http_port)
    with slow.running():
        storescu(list(study.paths), slow.port)
        assert slow.study(study.study_instance_uid)["state"] == "receiving"
        orphans = children(slow.proc.pid)  # analysis worker, DICOM receivers, resource tracker
        assert orphans
        slow.proc.kill()  # kill -9: no clean shutdown
        slow.proc.wait()
    # None of its processes outlives it (each notices within about a second)
    wait_until(lambda: not any(map(process_running, orphans)), 30, what="the killed server's processes to end")
    restarted = LungScreen(tmp_path, idle_seconds=0.5, port=port, http_port=http_port)
    with restarted.running():
        job = restarted.wait_for_state(study.study_instance_uid, ("reported",), timeout=60)
    assert job["instances"] == 40 and job["runs"] == 1
