"""The instance store: UID-validated paths, atomic and idempotent writes."""

import pytest

from lungscreen.dicom_io.store import InstanceStore, InvalidUID
from lungscreen.dicom_io.uids import is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "0.1", "2.25.12345678901234567890"])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "1", "../1.2", "1.2/3", "1.2.03", "1..2", "1.2.", ".1.2", "1.2.3\x00", "a.b", "1." + "2" * 64, None, 1.2]
)
def test_invalid_uids(uid):
    assert not is_valid_uid(uid)


def test_save_is_atomic_and_idempotent(tmp_path):
    store = InstanceStore(tmp_path)
    first = store.save("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM-bytes")
    again = store.save("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM-bytes")
    assert first.created and not again.created
    assert first.path == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert first.path.read_bytes() == b"DICM-bytes"
    changed = store.save("1.2.3", "1.2.3.4", "1.2.3.4.5", b"corrected")
    assert changed.created and changed.path.read_bytes() == b"corrected"
    assert not list(tmp_path.rglob("*.part")), "no temporary file is left behind"


@pytest.mark.parametrize("which", [0, 1, 2])
def test_crafted_uid_never_becomes_a_path(tmp_path, which):
    uids = ["1.2.3", "1.2.3.4", "1.2.3.4.5"]
    uids[which] = "../../etc/passwd"
    store = InstanceStore(tmp_path / "images")
    with pytest.raises(InvalidUID, match="not a valid DICOM UID"):
        store.save(*uids, b"x")
    assert not any(tmp_path.parent.glob("etc")) and not list((tmp_path / "images").rglob("*"))


def test_save_writes_parts_in_order_and_a_resend_in_parts_is_recognised(tmp_path):
    store = InstanceStore(tmp_path)
    header, body = b"HEADER", bytearray(b"pixels" * 100_000)
    with memoryview(body) as view:
        first = store.save("1.2.3", "1.2.3.4", "1.2.3.4.5", (header, view))
    assert first.path.read_bytes() == header + bytes(body)
    again = store.save("1.2.3", "1.2.3.4", "1.2.3.4.5", (header[:3], header[3:] + bytes(body)))
    assert first.created and not again.created
