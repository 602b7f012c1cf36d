"""The listener serves connections accepted elsewhere, and stores what it receives as it came."""

from __future__ import annotations

import logging
import socket
import threading

import pydicom
import pytest

from lungscreen.benchmarks.harness import free_port, wait_until
from lungscreen.dicom_io.scp import Listener, ListenerSettings
from lungscreen.dicom_io.store import InstanceStore
from peers import needs_binary, storescu
from test_durability import RecordingSink


@needs_binary("storescu")
def test_a_connection_accepted_elsewhere_becomes_an_association(tmp_path, lidc_series_dir, caplog):
    caplog.set_level(logging.INFO, logger="lungscreen.dicom_io.scp")
    files = sorted(lidc_series_dir.glob("*.dcm"))[:5]
    settings = ListenerSettings(port=free_port())
    sink = RecordingSink()
    listener = Listener(settings, InstanceStore(tmp_path / "images"), sink, bind=False)
    with socket.create_server(("127.0.0.1", settings.port)) as listening:

        def accept_one():
            connection, peer = listening.accept()
            listener.serve(connection, peer)

        acceptor = threading.Thread(target=accept_one)
        acceptor.start()
        try:
            storescu(files, settings.port)
        finally:
            acceptor.join(10)
            listener.shutdown()
    assert len(sink.stored) == len(files)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    for instance in sink.stored:
        stored, original = pydicom.dcmread(instance.path), originals[instance.sop_uid]
        assert stored.file_meta.MediaStorageSOPInstanceUID == instance.sop_uid
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData and stored.PatientID == original.PatientID
    wait_until(lambda: sink.connections_closed == 1, 10, what="the connection's close")  # after storescu exits
    megabytes = sum(instance.path.stat().st_size for instance in sink.stored) / 1e6
    closed = [r.getMessage() for r in caplog.records if "closed:" in r.getMessage()]
    assert len(closed) == 1 and "calling AE title 'PACS'" in closed[0]
    assert f"5 CT instance(s) stored ({megabytes:.1f} MB in " in closed[0] and "0 failed" in closed[0]


def test_a_listener_that_binds_refuses_handed_over_connections(tmp_path):
    listener = Listener(ListenerSettings(port=free_port()), InstanceStore(tmp_path / "images"), RecordingSink())
    try:
        with socket.socket() as unused, pytest.raises(TypeError, match="accepts its own connections"):
            listener.serve(unused, ("127.0.0.1", 1))
    finally:
        listener.shutdown()
