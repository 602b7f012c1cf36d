"""The DICOM listener (pynetdicom SCP): C-ECHO and C-STORE, nothing else.

The C-STORE handler writes the bytes as received (no decode, no re-encode), behind the File
Format header of :mod:`dicom_io.part10`, to the :class:`~dicom_io.store.InstanceStore`, tells
the :class:`InstanceSink` and returns a status; it parses only the three UIDs it needs. By
default the files are fsynced in the background, the sink records them without an fsync, and
the A-RELEASE response waits until both are durable (:mod:`dicom_io.durability`). It never
raises: whatever goes wrong becomes a failure status for that one instance, a reason for the
sink, and a log line without patient data.

The listener either binds its address itself or serves connections that another process
accepted and handed over (:class:`Listener`, ``bind=False``; :mod:`server.receivers`).

Only CT images are kept, and the classes ``ListenerSettings.also_stored_classes`` names (the
server keeps viewers' measurement-report SRs: they carry radiologists' verdicts). Every other
storage class is accepted with success and dropped, so a PACS that pushes a whole study (with
its SRs, SEGs, secondary captures, dose reports, and our own earlier results) never sees
failures; what triggers processing is the sink's business.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer

from lungscreen.dicom_io.durability import BackgroundSync
from lungscreen.dicom_io.part10 import file_header
from lungscreen.dicom_io.store import InstanceStore, InvalidUID
from lungscreen.dicom_io.uids import is_valid_uid

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_STORAGE_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})

# As acceptor, pynetdicom picks the first syntax of OUR list that the peer offers, so the
# uncompressed ones come first (cheapest to receive), then the compressed ones we decode.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4)
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_SERVICE_USER, SOURCE_PROVIDER_PRESENTATION = 0x01, 0x03
DIAG_NO_REASON, DIAG_LOCAL_LIMIT_EXCEEDED = 0x01, 0x02

# pynetdicom's network thread sleeps this long whenever it finds nothing to do (1 ms by
# default); at 1 ms it costs a study of 300 instances about a third of its transfer time.
# Shorter polls use a little more CPU while an association is open (it closes after
# network_timeout_s idle). tests/dicom_io/test_durability.py checks pynetdicom still has it.
DUL_POLL_S = 0.0001

_LAST_UID_TAG = 0x0020000E  # SeriesInstanceUID; SOPInstanceUID (0008,0018) and StudyInstanceUID come before


@dataclass(frozen=True)
class ReceivedInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    created: bool
    calling_ae: str
    durable: bool  # the file is already fsynced; False: durable once the association is released


class InstanceSink(Protocol):
    """What the listener reports to (the server's job store)."""

    def refusal_reason(self) -> str | None:
        """A reason to refuse new instances now (disk or queue full), or None."""

    def is_own_instance(self, sop_uid: str) -> bool:
        """True for instances this server produced (loop guard)."""

    def instance_stored(self, instance: ReceivedInstance) -> None:
        """Record a stored instance; durably when ``instance.durable``, else until :meth:`make_durable`."""

    def make_durable(self) -> None:
        """Make what :meth:`instance_stored` recorded survive a power cut (before the A-RELEASE response)."""

    def instance_ignored(self, study_uid: str | None, sop_class_uid: str, calling_ae: str) -> None:
        """A non-CT instance, accepted and dropped; it never triggers processing."""

    def instance_rejected(self, study_uid: str | None, reason: str, calling_ae: str) -> None: ...

    def connection_closed(self) -> None:
        """A connection ended: released, aborted, rejected or dropped."""


@dataclass(frozen=True)
class ListenerSettings:
    ae_title: str = "LUNGSCREEN"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: tuple[str, ...] = ()  # empty: any caller
    allowed_hosts: tuple[str, ...] = ()  # peer IP addresses allowed to connect; empty: any
    ssl_context: ssl.SSLContext | None = None
    network_timeout_s: float = 60.0
    dimse_timeout_s: float = 60.0
    sync_each_instance: bool = False  # fsync before each C-STORE success, not before the A-RELEASE response
    release_sync_timeout_s: float = 60.0
    also_stored_classes: frozenset[str] = frozenset()  # besides CT: stored and passed to the sink


@dataclass
class _Tally:
    """What one association sent, for the line logged when it ends."""

    started: float = field(default_factory=time.monotonic)  # at its first C-STORE request
    stored: int = 0  # CT instances written
    stored_bytes: int = 0
    ignored: int = 0  # other storage classes, and our own reports coming back
    failed: int = 0  # any status but success


class _OpenAssociations:
    """Per open association: the durability tickets of its files (first, last) and its tally."""

    def __init__(self, syncer: BackgroundSync | None) -> None:
        self.syncer = syncer
        self._tickets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._tallies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def add(self, assoc, ticket: int) -> None:
        first, _ = self._tickets.get(assoc, (ticket, ticket))
        self._tickets[assoc] = (first, ticket)

    def pop(self, assoc) -> tuple[int, int] | None:
        return self._tickets.pop(assoc, None)

    def tally(self, assoc) -> _Tally:
        return self._tallies.setdefault(assoc, _Tally())

    def pop_tally(self, assoc) -> _Tally | None:
        return self._tallies.pop(assoc, None)


def _identifying_attributes(event) -> Dataset:
    """The instance's SOP Instance, Study and Series Instance UIDs, parsed from the received
    bytes up to (0020,000E) only: the rest (pixel data above all) is written as it came and
    parsed once, when the study is analysed. ``event.dataset`` would decode all of it."""
    syntax = event.context.transfer_syntax
    if syntax.is_deflated:
        return event.dataset  # the stream has to be inflated first
    stream = event.request.DataSet
    stream.seek(0)
    return read_dataset(
        stream, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=lambda tag, vr, length: tag > _LAST_UID_TAG
    )


def _store_handler(
    event, store: InstanceStore, sink: InstanceSink, associations: _OpenAssociations, stored_classes: frozenset[str]
) -> int:
    tally = associations.tally(event.assoc)
    status = _store_instance(event, store, sink, associations, tally, stored_classes)
    if status != STATUS_SUCCESS:
        tally.failed += 1
    return status


def _store_instance(
    event, store: InstanceStore, sink: InstanceSink, associations: _OpenAssociations, tally: _Tally,
    stored_classes: frozenset[str] = CT_STORAGE_CLASSES,
) -> int:
    calling_ae = event.assoc.requestor.ae_title
    sop_class_uid = str(event.request.AffectedSOPClassUID)
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    study_uid = None
    try:
        if sink.is_own_instance(sop_uid):
            tally.ignored += 1
            return STATUS_SUCCESS  # loop guard: our own report coming back
        ds = _identifying_attributes(event)
        if sop_class_uid not in stored_classes:
            study_uid = str(ds.get("StudyInstanceUID", ""))
            sink.instance_ignored(study_uid if is_valid_uid(study_uid) else None, sop_class_uid, calling_ae)
            tally.ignored += 1
            return STATUS_SUCCESS
        refusal = sink.refusal_reason()
        if refusal:
            log.warning("refused instance from %s: %s", calling_ae, refusal)
            return STATUS_OUT_OF_RESOURCES
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if str(ds.get("SOPInstanceUID", "")) != sop_uid:
            reason = "SOPInstanceUID in the dataset differs from the C-STORE request"
            sink.instance_rejected(study_uid or None, reason, calling_ae)
            log.warning("rejected instance from %s: %s", calling_ae, reason)
            return STATUS_DATASET_DOES_NOT_MATCH
        header = file_header(sop_class_uid, sop_uid, event.context.transfer_syntax)
        with event.request.DataSet.getbuffer() as dataset:  # the received bytes, not a copy
            stored = store.save(study_uid, series_uid, sop_uid, (header, dataset), sync=associations.syncer is None)
            tally.stored_bytes += len(header) + dataset.nbytes
        if associations.syncer is not None:  # a re-send too: its row may be new
            associations.add(event.assoc, associations.syncer.submit(stored.path))
    except InvalidUID as exc:
        sink.instance_rejected(study_uid or None, str(exc), calling_ae)
        log.warning("rejected instance from %s: %s", calling_ae, exc)
        return STATUS_CANNOT_UNDERSTAND
    except Exception as exc:  # a broken dataset, a full disk: fail this instance only
        reason = f"cannot store instance: {type(exc).__name__}: {exc}"
        try:
            sink.instance_rejected(study_uid or None, reason, calling_ae)
        except Exception:
            log.exception("could not record the rejection")
        log.warning("rejected instance from %s: %s", calling_ae, reason)
        return STATUS_OUT_OF_RESOURCES if isinstance(exc, OSError) else STATUS_CANNOT_UNDERSTAND
    sink.instance_stored(
        ReceivedInstance(
            study_uid, series_uid, sop_uid, sop_class_uid, stored.path, stored.created, calling_ae,
            durable=associations.syncer is None,
        )
    )
    tally.stored += 1
    return STATUS_SUCCESS


def _on_release_request(event, associations: _OpenAssociations, sink: InstanceSink, timeout_s: float) -> None:
    """Hold the A-RELEASE response until every instance of the association is durable:
    its file, then what the sink recorded of it.

    pynetdicom fires EVT_ACSE_RECV for the peer's A-RELEASE request just before it answers.
    """
    if not isinstance(event.primitive, A_RELEASE) or event.primitive.result is not None:
        return
    tickets = associations.pop(event.assoc)
    if tickets is None:
        return
    try:
        failures = associations.syncer.wait(*tickets, timeout=timeout_s)
    except TimeoutError as exc:
        failures = [str(exc)]
    try:
        sink.make_durable()
    except Exception as exc:  # the release still goes out; the log says what is at risk
        failures.append(f"the received instances' records: {type(exc).__name__}: {exc}")
    if failures:
        log.error("association from %s released with %d instance(s) not durable: %s",
                  event.assoc.requestor.address, len(failures), failures[0])


def _on_connection_closed(event, associations: _OpenAssociations, sink: InstanceSink) -> None:
    """Say what an association that sent instances brought (the line a PACS administrator looks
    for when a study seems missing), then tell the sink."""
    tally = associations.pop_tally(event.assoc)
    if tally is not None:
        seconds = time.monotonic() - tally.started
        log.info(
            "association from %s, calling AE title %r, closed: %d CT instance(s) stored (%.1f MB in %.1f s "
            "from its first instance), %d other object(s) ignored, %d failed",
            event.assoc.requestor.address, event.assoc.requestor.ae_title, tally.stored, tally.stored_bytes / 1e6,
            seconds, tally.ignored, tally.failed,
        )
    sink.connection_closed()


def _on_association_request(event, settings: ListenerSettings, sink: InstanceSink) -> None:
    """Say who is calling, and turn away what must be turned away before any data is sent."""
    event.assoc.dul._run_loop_delay = DUL_POLL_S
    # At EVT_REQUESTED only the A-ASSOCIATE-RQ primitive is known; pynetdicom's
    # require_calling_aet then rejects an unknown caller, this handler says why in the log.
    calling_ae = event.assoc.requestor.primitive.calling_ae_title
    address = event.assoc.requestor.address
    if settings.allowed_calling_aes and calling_ae not in settings.allowed_calling_aes:
        log.warning("association from %s rejected: calling AE title %r is not in the allowlist", address, calling_ae)
        return
    if settings.allowed_hosts and address not in settings.allowed_hosts:
        log.warning("association from %s (calling AE title %r) rejected: address not in the allowlist", address, calling_ae)
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAG_NO_REASON)
        return
    refusal = sink.refusal_reason()
    if refusal:
        log.warning("association from %s (calling AE title %r) refused: %s", address, calling_ae, refusal)
        event.assoc.acse.send_reject(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, DIAG_LOCAL_LIMIT_EXCEEDED)
        return
    log.info("association from %s, calling AE title %r", address, calling_ae)


def build_ae(settings: ListenerSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: the sender chooses the PDU size
    ae.network_timeout = settings.network_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    return ae


class _HandedOverConnections(AssociationServer):
    """A pynetdicom association server that listens on nothing: each connection, accepted by
    another process and handed over, is given to :meth:`serve` and becomes an association."""

    def server_bind(self) -> None:
        pass  # no socket of its own: the address is the one the connections came in on

    def server_activate(self) -> None:
        pass

    def serve(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        """Run an association on an accepted ``connection`` (the TLS handshake, when configured,
        happens here, in the caller's thread, and may take up to the network timeout)."""
        if self.ssl_context is not None:
            connection.settimeout(self.ae.network_timeout)  # a silent client cannot hold the thread
            connection = self.ssl_context.wrap_socket(connection, server_side=True)
            connection.settimeout(None)  # as pynetdicom's own accepted connections
        self.process_request(connection, peer)

    def shutdown(self) -> None:
        self.server_close()  # serve_forever never ran, so there is no loop to stop


class Listener:
    """The running SCP; :meth:`shutdown` stops it and makes what it received durable.

    With ``bind`` it listens on ``settings.host:port`` itself. Without, it listens on nothing
    and :meth:`serve` runs associations on connections accepted elsewhere (the server's
    receiver processes, :mod:`server.receivers`).
    """

    def __init__(self, settings: ListenerSettings, store: InstanceStore, sink: InstanceSink, *, bind: bool = True) -> None:
        self.associations = _OpenAssociations(None if settings.sync_each_instance else BackgroundSync())
        handlers = [
            (evt.EVT_C_STORE, _store_handler,
             [store, sink, self.associations, CT_STORAGE_CLASSES | settings.also_stored_classes]),
            (evt.EVT_REQUESTED, _on_association_request, [settings, sink]),
            (evt.EVT_CONN_CLOSE, _on_connection_closed, [self.associations, sink]),
        ]
        if self.associations.syncer is not None:
            handlers.append(
                (evt.EVT_ACSE_RECV, _on_release_request, [self.associations, sink, settings.release_sync_timeout_s])
            )
        ae = build_ae(settings)
        address = (settings.host, settings.port)
        if bind:
            self.server = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=settings.ssl_context)
            log.info("DICOM listener %s on %s:%d", settings.ae_title, settings.host, settings.port)
        else:
            self.server = ae.make_server(
                address, evt_handlers=handlers, ssl_context=settings.ssl_context, server_class=_HandedOverConnections
            )

    def serve(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        """Run an association on a connection accepted elsewhere (a listener made with ``bind=False``)."""
        if not isinstance(self.server, _HandedOverConnections):
            raise TypeError("this listener accepts its own connections")
        self.server.serve(connection, peer)

    def shutdown(self) -> None:
        self.server.shutdown()
        if self.associations.syncer is not None:
            self.associations.syncer.close()


def start_listener(settings: ListenerSettings, store: InstanceStore, sink: InstanceSink) -> Listener:
    """Start the SCP on ``settings.host:port`` in background threads (call ``.shutdown()`` on the result)."""
    return Listener(settings, store, sink)
