"""DICOM receiver processes: associations spread over the CPU cores.

pynetdicom runs each association in Python threads, so in one process every association
shares one interpreter lock and aggregate ingest stays flat however many senders push at
once (benchmarks/README.md). The server process accepts each connection on the DICOM port
and hands the connected socket itself (``SCM_RIGHTS`` over a Unix socket) to the receiver
process with the fewest open connections. The receiver runs the association with the
listener of :mod:`dicom_io.scp` and the checks of :mod:`server.ingest`, writes the files and
their rows in the shared database, and reports back what it stored, rejected and closed.

A receiver that dies is replaced: the associations it held end (their senders see the
connection drop and send again), and nothing it acknowledged is lost, because files and
rows are written before each C-STORE success. When the server process stops or dies, each
receiver sees its channel close, stops, and makes what it received durable.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lungscreen.errors import LungScreenError
from lungscreen.dicom_io.scp import Listener, ListenerSettings
from lungscreen.dicom_io.sr_reading import MEASUREMENT_REPORT_CLASSES
from lungscreen.dicom_io.store import InstanceStore
from lungscreen.server.config import Settings
from lungscreen.server.db import Database
from lungscreen.server.ingest import IngestCounts, IngestSink
from lungscreen.server.jobs import JobStore
from lungscreen.server.logs import configure_logging
from lungscreen.server.tls import listener_tls

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a receiver imports pynetdicom and opens the database: about a second
REPORT_INTERVAL_S = 0.25  # how often a receiver sends its counts; a closed connection at once
CHANNEL_TIMEOUT_S = 5.0  # a receiver that cannot take a connection this long is stuck
# After its channel closes a receiver may still be holding an A-RELEASE response for the
# fsyncs (up to the listener's release sync timeout); beyond that and a margin it is killed.
STOP_TIMEOUT_S = ListenerSettings.release_sync_timeout_s + 10.0
MESSAGE_BYTES = 4096


class ReceiverError(LungScreenError):
    """A receiver process could not be started."""


@dataclass
class _Receiver:
    index: int
    process: multiprocessing.Process
    channel: socket.socket  # SOCK_SEQPACKET: one message per send, connections travel with theirs
    open_connections: int = 0
    handed_at: int = 0  # when it last got a connection (a count of hand-overs): ties go to the longest idle


class ReceiverPool:
    """Accepts DICOM connections on ``settings.host:port`` and hands them to
    ``settings.receiver_processes`` receiver processes; ``on_counts`` hears what they stored and
    rejected."""

    def __init__(self, settings: Settings, on_counts: Callable[[IngestCounts], None], *, log_level: str) -> None:
        self.settings = settings
        self.count = settings.receiver_processes
        self.on_counts = on_counts
        self.log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._receivers: list[_Receiver | None] = []  # None: a receiver being replaced, or that could not be
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listening: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._handed = 0

    def start(self) -> None:
        """Bind the port (an address in use fails here), start the receivers and wait until each
        is ready, then accept."""
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        self._listening = socket.create_server((self.settings.host, self.settings.port), family=family, backlog=128)
        try:
            for index in range(self.count):
                self._receivers.append(self._spawn(index))
        except BaseException:
            self.stop()
            raise
        for index in range(self.count):
            self._start_thread(self._read_reports, index, name=f"receiver-{index}-reports")
        self._start_thread(self._accept, name="dicom-accept")
        log.info(
            "DICOM listener %s on %s:%d, %d receiver process(es)",
            self.settings.ae_title, self.settings.host, self.settings.port, self.count,
        )

    def stop(self) -> None:
        """Stop accepting, let every receiver make what it received durable and exit."""
        self._stopping.set()
        if self._listening is not None:
            try:
                self._listening.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
            except OSError:
                pass
            self._listening.close()
        with self._lock:
            receivers = self._present()
        for receiver in receivers:
            try:
                receiver.channel.shutdown(socket.SHUT_WR)  # the receiver reads the end of its channel
            except OSError:
                pass
        for receiver in receivers:
            receiver.process.join(STOP_TIMEOUT_S)
            if receiver.process.is_alive():
                log.error("receiver %d did not stop; killing it", receiver.index)
                receiver.process.kill()
                receiver.process.join(5)
        for thread in self._threads:
            thread.join(timeout=5)
        for receiver in receivers:
            receiver.channel.close()

    @property
    def running(self) -> int:
        """How many receivers can take a connection now."""
        with self._lock:
            return sum(r.process.is_alive() for r in self._present())

    @property
    def open_connections(self) -> list[int]:
        """Each receiver's open connections, as the server counts them (dispatched, not yet reported closed)."""
        with self._lock:
            return [r.open_connections for r in self._present()]

    @property
    def pids(self) -> list[int]:
        """The receiver processes' ids (for diagnostics and memory accounting)."""
        with self._lock:
            return [r.process.pid for r in self._present()]

    # --- inside the server process ---------------------------------------------------------
    def _present(self) -> list[_Receiver]:
        """The receivers in their slots (not those being replaced); the caller holds the lock."""
        return [r for r in self._receivers if r is not None]

    def _spawn(self, index: int) -> _Receiver:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self._context.Process(
            target=run_receiver, args=(self.settings, theirs, self.log_level), name=f"lungscreen-receiver-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        try:
            ready = json.loads(ours.recv(MESSAGE_BYTES) or b'{"error": "exited while starting"}')
        except (OSError, ValueError) as exc:
            ready = {"error": f"no answer: {exc}"}
        if "error" in ready:
            process.kill()
            process.join(5)
            ours.close()
            raise ReceiverError(f"DICOM receiver process {index} did not start: {ready['error']}")
        ours.settimeout(CHANNEL_TIMEOUT_S)
        return _Receiver(index, process, ours)

    def _start_thread(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, peer = self._listening.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accepting a DICOM connection failed")
                continue
            with connection:  # our copy: the receiver holds its own from here on
                # Each C-STORE response is one small write that Nagle's algorithm would hold
                # back; dcmtk sets the same option (TCP_NODELAY=1). +10 % on one association.
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._hand_over(connection, peer)

    def _hand_over(self, connection: socket.socket, peer: tuple) -> None:
        with self._lock:
            running = self._present()
            if not running:
                log.error("connection from %s dropped: no DICOM receiver process is running", peer[0])
                return
            receiver = min(running, key=lambda r: (r.open_connections, r.handed_at))
            receiver.open_connections += 1
            self._handed += 1
            receiver.handed_at = self._handed
        message = json.dumps({"peer": [peer[0], peer[1]]}).encode()
        try:
            socket.send_fds(receiver.channel, [message], [connection.fileno()])
        except OSError as exc:  # the sender sees its connection close and tries again
            with self._lock:
                receiver.open_connections -= 1
            log.error("connection from %s dropped: receiver %d did not take it: %s", peer[0], receiver.index, exc)

    def _read_reports(self, index: int) -> None:
        """Hear receiver ``index``'s counts; replace it when it ends while the server runs."""
        while True:
            with self._lock:
                receiver = self._receivers[index]
            self._read_until_closed(receiver)
            if self._stopping.is_set():
                return
            with self._lock:
                self._receivers[index] = None  # the others take the connections until it is replaced
            receiver.process.join(1)
            log.error(
                "DICOM receiver %d (pid %s) ended unexpectedly (exit code %s); starting a new one",
                index, receiver.process.pid, receiver.process.exitcode,
            )
            receiver.channel.close()
            try:
                replacement = self._spawn(index)
            except ReceiverError:
                log.exception("DICOM receiver %d could not be replaced", index)
                replacement = None
            with self._lock:
                self._receivers[index] = replacement
            if replacement is None:
                return

    def _read_until_closed(self, receiver: _Receiver) -> None:
        while True:
            try:
                message = receiver.channel.recv(MESSAGE_BYTES)
            except TimeoutError:
                continue
            except OSError:
                return
            if not message:
                return
            counts = IngestCounts(**json.loads(message))
            with self._lock:
                receiver.open_connections = max(0, receiver.open_connections - counts.closed)
            self.on_counts(counts)


# --- inside a receiver process ------------------------------------------------------------


def run_receiver(settings: Settings, channel: socket.socket, log_level: str) -> None:
    """A receiver process's life: take connections from ``channel`` until it closes."""
    configure_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    signal.signal(signal.SIGTERM, _exit_gracefully)  # e.g. systemd stopping the whole group
    try:
        db = Database(settings.db_path)
        sink = IngestSink(settings, JobStore(db))
        listener = Listener(
            ListenerSettings(
                ae_title=settings.ae_title,
                host=settings.host,
                port=settings.port,
                allowed_calling_aes=settings.allow_ae,
                allowed_hosts=settings.allow_host,
                ssl_context=listener_tls(settings),
                sync_each_instance=settings.ingest_sync == "instance",
                also_stored_classes=MEASUREMENT_REPORT_CLASSES,  # viewers' SRs: verdicts (server/feedback.py)
            ),
            InstanceStore(settings.images_dir),
            sink,
            bind=False,
        )
    except Exception as exc:
        channel.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        raise
    channel.send(b'{"ready": true}')
    stopped = threading.Event()
    reporter = threading.Thread(target=_report_counts, args=(sink, channel, stopped), name="counts", daemon=True)
    reporter.start()
    try:
        while True:
            message, fds, _, _ = socket.recv_fds(channel, MESSAGE_BYTES, 1)
            if not message:
                break  # the server stopped or died
            connection = socket.socket(fileno=fds[0])
            peer = tuple(json.loads(message)["peer"])
            threading.Thread(target=_serve, args=(listener, sink, connection, peer), name="handshake", daemon=True).start()
    finally:
        listener.shutdown()  # waits for pending fsyncs
        stopped.set()
        sink.connection_ended.set()
        reporter.join()
        db.close()


def _exit_gracefully(signum, frame) -> None:
    raise SystemExit(0)  # unwinds run_receiver's loop: its finally makes what was received durable


def _serve(listener: Listener, sink: IngestSink, connection: socket.socket, peer: tuple) -> None:
    try:
        listener.serve(connection, peer)
    except Exception as exc:  # a failed TLS handshake, a connection reset before the association
        log.warning("connection from %s closed before an association: %s: %s", peer[0], type(exc).__name__, exc)
        connection.close()
        sink.connection_closed()


def _report_counts(sink: IngestSink, channel: socket.socket, stopped: threading.Event) -> None:
    while True:
        sink.connection_ended.wait(REPORT_INTERVAL_S)  # the server balances on open connections
        sink.connection_ended.clear()
        last = stopped.is_set()
        counts = sink.take_counts()
        if counts:
            try:
                channel.send(json.dumps(counts.__dict__).encode())
            except OSError:
                return  # the server is gone
        if last:
            return
