"""Destinations as written in the settings: ``AE@host:port``, or ``tls:AE@host:port`` over DICOM TLS.
Sending itself is proven against real peers (tests/server: storescp plain and over TLS, Orthanc)."""

import pytest

from lungscreen.dicom_io.send import Destination


@pytest.mark.parametrize(
    "text, expected",
    [
        ("PACS@10.0.0.5:104", Destination("PACS", "10.0.0.5", 104)),
        ("tls:PACS@pacs.example:2762", Destination("PACS", "pacs.example", 2762, tls=True)),
        ("ARCHIVE@[::1]:11112", Destination("ARCHIVE", "[::1]", 11112)),
    ],
)
def test_destination_is_read_and_written_back_the_same(text, expected):
    assert Destination.parse(text) == expected
    assert str(expected) == text  # the outbox keeps destinations as text, TLS included


@pytest.mark.parametrize("text", ["PACS@host", "host:104", "tls:host:104", "PACS@host:port", "@host:104",
                                  "A_TITLE_LONGER_THAN_16@host:104", "PACS@host:70000"])
def test_a_malformed_destination_is_refused_with_its_text(text):
    with pytest.raises(ValueError):
        Destination.parse(text)
