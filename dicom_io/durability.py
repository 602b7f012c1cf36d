"""Received files made durable in the background, and waited for when an association ends.

An ``fsync`` of each instance and its folder before the C-STORE success costs about as much
as pynetdicom's whole handling of the instance (measured in ``benchmarks/README.md``). With
deferred durability the listener writes each instance atomically (temporary file, rename)
before its success, so it survives a crash of the server process, and this module's thread
fsyncs the files and their folders while the next instances arrive. The A-RELEASE response
waits until every instance of the association is on stable storage, so a sender that sees
its association released normally has nothing left in volatile memory. A power cut in the
middle of an association can lose its last instances; that sender sees no release and
sends again. ``ingest_sync = "instance"`` restores the fsync before every success.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class BackgroundSync:
    """fsync files (then their folders, once per batch) in one background thread.

    :meth:`submit` returns a ticket; :meth:`wait` blocks until every ticket up to the given
    one is durable and returns the failures among a range of tickets.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[tuple[int, Path]] = []
        self._issued = 0
        self._durable = 0
        self._failures: collections.deque[tuple[int, str]] = collections.deque(maxlen=10_000)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fsync", daemon=True)
        self._thread.start()

    def submit(self, path: Path) -> int:
        with self._cond:
            if self._closed:
                raise RuntimeError("BackgroundSync is closed")
            self._issued += 1
            self._pending.append((self._issued, Path(path)))
            self._cond.notify_all()
            return self._issued

    @property
    def pending(self) -> int:
        """Files submitted and not yet durable."""
        with self._cond:
            return self._issued - self._durable

    def wait(self, first: int, last: int, timeout: float | None = None) -> list[str]:
        """Block until tickets ``<= last`` are durable; return the failures in ``[first, last]``.

        Raises :class:`TimeoutError` when the disk does not answer within ``timeout``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._durable >= last, timeout):
                raise TimeoutError(f"files not durable after {timeout} s")
            return [reason for ticket, reason in self._failures if first <= ticket <= last]

    def close(self) -> None:
        """Sync what is pending, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                batch, self._pending = self._pending, []
                if not batch and self._closed:
                    return
            failures = _sync_batch(batch)
            with self._cond:
                self._failures.extend(failures)
                self._durable = batch[-1][0]
                self._cond.notify_all()


def _sync_batch(batch: list[tuple[int, Path]]) -> list[tuple[int, str]]:
    failures = []
    folders: dict[Path, list[int]] = {}
    for ticket, path in batch:
        folders.setdefault(path.parent, []).append(ticket)
        try:
            fsync_path(path)
        except FileNotFoundError:
            pass  # purged or replaced since; a replacement carries its own ticket
        except OSError as exc:
            failures.append((ticket, f"fsync failed: {exc.strerror or exc}"))
    failed = {ticket for ticket, _ in failures}
    for folder, tickets in folders.items():
        try:
            fsync_path(folder)
        except OSError as exc:
            reason = f"fsync of the folder failed: {exc.strerror or exc}"
            failures.extend((ticket, reason) for ticket in tickets if ticket not in failed)
    for ticket, reason in failures:
        log.error("instance file not made durable (ticket %d): %s", ticket, reason)
    return failures


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (an fsync through a read-only descriptor syncs the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
