"""C-STORE SCU: send a result file (SR, presentation state) to a DICOM destination.

Failures are classified for the outbox: :class:`~dicom_io.errors.DeliveryError` with
``permanent=True`` when retrying cannot help (the destination rejected the association
permanently, or refused the instance with a failure status other than "out of
resources"), ``permanent=False`` for what may pass (refused connection, time-out,
transient rejection, out of resources).

A destination written ``tls:AE@host:port`` is reached over DICOM TLS (PS3.15 B.1): its
certificate must chain to the context's CA bundle and name ``host``.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from lungscreen.errors import DeliveryError

log = logging.getLogger(__name__)


TLS_PREFIX = "tls:"


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title) <= 16:
            raise ValueError(f"AE title must be 1 to 16 characters: {self.ae_title!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AE@host:port``, e.g. ``PACS@10.0.0.5:104``; ``tls:AE@host:port`` over DICOM TLS."""
        tls = text.startswith(TLS_PREFIX)
        try:
            ae_title, address = text.removeprefix(TLS_PREFIX).split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(ae_title, host, int(port), tls)
        except ValueError as exc:
            raise ValueError(f"destination must be [tls:]AE@host:port, got {text!r} ({exc})") from None

    def __str__(self) -> str:
        return f"{TLS_PREFIX if self.tls else ''}{self.ae_title}@{self.host}:{self.port}"


def send_file(
    path: Path,
    destination: Destination,
    *,
    calling_ae: str = "LUNGSCREEN",
    timeout_s: float = 30.0,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Send one DICOM file; return on success, raise :class:`DeliveryError` otherwise.

    ``tls_context`` is used for a TLS destination (default: the system's CA bundle, no
    client certificate); a plain destination ignores it.
    """
    ds = dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls = (tls_context or ssl.create_default_context(), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    if not assoc.is_established:
        if assoc.is_rejected and assoc.acceptor.primitive and assoc.acceptor.primitive.result == 0x01:
            raise DeliveryError(f"{destination} rejected the association permanently", permanent=True)
        if assoc.is_rejected:
            what = "rejected the association"
        else:  # pynetdicom logs the cause (refused connection, TLS handshake error)
            what = "could not be reached over TLS" if destination.tls else "could not be reached"
        raise DeliveryError(f"{destination} {what}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status:
        raise DeliveryError(f"{destination}: no C-STORE response (timeout or aborted association)")
    code = int(status.Status)
    if code == 0x0000 or code & 0xF000 == 0xB000:  # success, or a warning
        return
    if code & 0xFF00 == 0xA700:
        raise DeliveryError(f"{destination} is out of resources (status 0x{code:04X})")
    raise DeliveryError(f"{destination} refused the instance (status 0x{code:04X})", permanent=True)
