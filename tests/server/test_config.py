"""TLS settings for destinations: checked when the server starts, not at the first delivery."""

import ssl

import pytest

from server.app import destination_tls
from server.config import load_settings


def test_a_destination_certificate_needs_its_key():
    with pytest.raises(ValueError, match="destination_cert and destination_key go together"):
        load_settings(destination_cert="/etc/lungscreen/node.pem")


def test_an_unreadable_destination_certificate_names_its_settings(tmp_path):
    settings = load_settings(destination_cert=tmp_path / "missing.pem", destination_key=tmp_path / "missing.key")
    with pytest.raises(ValueError, match="TLS settings destination_ca, destination_cert, destination_key"):
        destination_tls(settings)


def test_destinations_must_prove_who_they_are():
    context = destination_tls(load_settings())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
