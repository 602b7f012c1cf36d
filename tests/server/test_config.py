"""Settings checked when the server starts, not at the first association or delivery: TLS
files, receiver processes."""

import os
import ssl

import pytest

from lungscreen.server.config import load_settings
from lungscreen.server.tls import destination_tls, listener_tls


def test_a_destination_certificate_needs_its_key():
    with pytest.raises(ValueError, match="destination_cert and destination_key go together"):
        load_settings(destination_cert="/etc/lungscreen/node.pem")


def test_an_unreadable_certificate_names_its_settings(tmp_path):
    missing = {"cert": tmp_path / "missing.pem", "key": tmp_path / "missing.key"}
    settings = load_settings(destination_cert=missing["cert"], destination_key=missing["key"])
    with pytest.raises(ValueError, match="TLS settings destination_ca, destination_cert, destination_key"):
        destination_tls(settings)
    with pytest.raises(ValueError, match="TLS settings tls_cert, tls_key, tls_ca"):
        listener_tls(load_settings(tls_cert=missing["cert"], tls_key=missing["key"]))


def test_destinations_must_prove_who_they_are():
    context = destination_tls(load_settings())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_receivers_default_to_one_per_core_and_at_most_four():
    assert load_settings().receiver_processes == min(4, len(os.sched_getaffinity(0)))
    assert load_settings(receivers=3).receiver_processes == 3
    with pytest.raises(ValueError, match="receivers must be 0"):
        load_settings(receivers=-1)
