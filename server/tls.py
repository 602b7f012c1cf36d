"""TLS contexts from the server's settings: the DICOM listener's, and the one for ``tls:``
destinations (DICOM TLS, PS3.15 Annex B.1). A certificate that cannot be read names the
settings that point to it; ssl's own message names none.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from lungscreen.server.config import Settings


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the DICOM listener, or None for plain TCP."""
    if settings.tls_cert is None:
        return None
    with _tls_files("tls_cert, tls_key, tls_ca"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(settings.tls_ca)
    return context


def destination_tls(settings: Settings) -> ssl.SSLContext:
    """The TLS context for ``tls:`` destinations: their certificates must chain to
    ``destination_ca`` (default: the system's CA bundle) and name the host dialled; a client
    certificate, when configured, is shown to those that ask for one."""
    with _tls_files("destination_ca, destination_cert, destination_key"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.destination_ca)
        if settings.destination_cert is not None:
            context.load_cert_chain(settings.destination_cert, settings.destination_key)
    return context


@contextmanager
def _tls_files(settings_names: str) -> Iterator[None]:
    """Say which settings hold the certificate that cannot be read (ssl's message names none)."""
    try:
        yield
    except OSError as exc:  # ssl.SSLError too
        raise ValueError(f"TLS settings {settings_names}: {exc}") from None
