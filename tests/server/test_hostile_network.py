"""A corpus of broken and hostile DICOM sent over the network: each study gets a clear reason,
the server keeps serving, and a good study sent at the same time is reported."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from peers import LungScreen, needs_binary, storescu
from test_end_to_end import phantom_study

pytestmark = [pytest.mark.slow, needs_binary("storescu")]

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"  # no decoder is installed for it


def retag(paths, **changes) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=False)


def corrupt_bytes(path: Path, transform) -> None:
    path.write_bytes(transform(path.read_bytes()))


def overstate_pixel_data_length(blob: bytes) -> bytes:
    """The (7FE0,0010) length field claims far more bytes than follow."""
    at = blob.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    return blob[: at + 8] + struct.pack("<I", 0x7FFFFFF0) + blob[at + 12 :]


def send_raw(port: int, paths: list[Path], syntax=None) -> list[int | None]:
    """Send files as they are on disk (pynetdicom does not decode a dataset given as a path)."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, syntax) if syntax else ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSCREEN")
    if not assoc.is_established:  # no presentation context acceptable: nothing can be sent
        return [None] * len(paths)
    statuses = []
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(path)
                statuses.append(int(status.Status) if status else None)
            except (ValueError, AttributeError):  # no presentation context was accepted for it
                statuses.append(None)
    finally:
        assoc.release()
    return statuses


def test_hostile_corpus(tmp_path):
    good = phantom_study(tmp_path / "good")
    truncated = phantom_study(tmp_path / "truncated", spheres=())
    for path in truncated.paths[5:8]:
        corrupt_bytes(path, lambda b: b[: len(b) // 2])
    overlong = phantom_study(tmp_path / "overlong", spheres=())
    for path in overlong.paths[:3]:
        corrupt_bytes(path, overstate_pixel_data_length)
    huge = phantom_study(tmp_path / "huge", spheres=())
    retag(huge.paths, Rows=65535, Columns=65535)
    no_geometry = phantom_study(tmp_path / "nogeometry", spheres=())
    retag(no_geometry.paths[:10], ImagePositionPatient=None)
    wrong_vr = phantom_study(tmp_path / "wrongvr", spheres=())
    for path in wrong_vr.paths:  # PixelSpacing (DS) holding text that is not a number
        corrupt_bytes(path, lambda b: b.replace(b"DS\x08\x000.8\\0.8 ", b"DS\x08\x00abc\\def "))
    mixed_uid = generate_uid()
    mixed_a = phantom_study(tmp_path / "mixed-a", study_uid=mixed_uid, shape=(20, 64, 64), spheres=())
    mixed_b = phantom_study(tmp_path / "mixed-b", study_uid=mixed_uid, shape=(20, 64, 64), spheres=(), series_number=2)
    no_decoder = phantom_study(tmp_path / "nodecoder", spheres=())
    for path in no_decoder.paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEG_XL_LOSSLESS
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a" + b"\0" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)

    server = LungScreen(tmp_path, idle_seconds=0.5)
    with server.running():
        send_raw(server.port, list(truncated.paths))
        send_raw(server.port, list(overlong.paths))
        storescu(list(huge.paths), server.port, check=False)
        storescu(list(no_geometry.paths), server.port)
        send_raw(server.port, list(wrong_vr.paths))
        storescu([*mixed_a.paths, *mixed_b.paths], server.port)
        statuses = send_raw(server.port, list(no_decoder.paths), syntax=JPEG_XL_LOSSLESS)
        storescu(list(good.paths), server.port)

        assert statuses == [None] * len(no_decoder.paths), "no decoder: the transfer syntax is refused at negotiation"
        assert server.study(no_decoder.study_instance_uid) is None
        # A PixelData length past the end of the file: pydicom reads what is there, which here
        # is the whole image, so the study may be analysed; what matters is no internal error.
        overlong_job = server.wait_for_state(overlong.study_instance_uid, ("reported", "failed"), timeout=90)
        assert "internal error" not in (overlong_job["reason"] or "")
        for study in (truncated, huge, no_geometry, wrong_vr, mixed_a):
            job = server.wait_for_state(study.study_instance_uid, ("failed",), timeout=90)
            reason = job["reason"] + " ".join(r["reason"] for r in job.get("rejected_instances_detail", []))
            assert len(reason) > 20 and "internal error" not in reason, job
        assert "too few slices: 20 < 30" in server.study(mixed_uid)["reason"]
        assert "65535" in server.study(huge.study_instance_uid)["reason"]
        assert "ImagePositionPatient" in server.study(no_geometry.study_instance_uid)["reason"]
        assert server.wait_for_state(good.study_instance_uid, ("reported",), timeout=90)["details"]["findings"]
        assert server.proc.poll() is None
