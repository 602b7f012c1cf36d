"""The instance store: received bytes on disk, as they came, under validated UIDs.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Only UIDs
that pass :func:`dicom_io.uids.is_valid_uid` become path components, so a crafted UID
(``../``, slashes, NUL) can never leave ``root``. Writes are atomic (temporary file, rename),
so a half-written file is never visible under its name. With ``sync=True`` (the default)
the file and its folder are fsynced before :meth:`InstanceStore.save` returns, and the
instance survives a power cut; with ``sync=False`` the caller makes it durable later
(:class:`dicom_io.durability.BackgroundSync`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lungscreen.dicom_io.durability import fsync_path
from lungscreen.errors import LungScreenError
from lungscreen.dicom_io.uids import is_valid_uid


BytesLike = bytes | bytearray | memoryview


class InvalidUID(LungScreenError):
    """A UID that is not a valid DICOM UID; it never becomes a path."""


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    created: bool  # False when the identical instance was already stored (a re-send)


class InstanceStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid)):
            if not is_valid_uid(uid):
                raise InvalidUID(f"{name} is not a valid DICOM UID: {uid!r:.80}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def study_dir(self, study_uid: str) -> Path:
        if not is_valid_uid(study_uid):
            raise InvalidUID(f"StudyInstanceUID is not a valid DICOM UID: {study_uid!r:.80}")
        return self.root / study_uid

    def save(
        self, study_uid: str, series_uid: str, sop_uid: str, data: BytesLike | Sequence[BytesLike], *, sync: bool = True
    ) -> StoredInstance:
        """Store ``data`` (bytes, or parts written one after the other) atomically; an
        identical re-send is a no-op, a changed one replaces."""
        parts = [data] if isinstance(data, BytesLike) else list(data)
        target = self.path_for(study_uid, series_uid, sop_uid)
        if target.is_file() and _same_content(target, parts):
            return StoredInstance(target, created=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".part")
        try:
            try:
                _write_all(fd, parts)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if sync:
            fsync_path(target.parent)
        return StoredInstance(target, created=True)


def _write_all(fd: int, parts: list[BytesLike]) -> None:
    """Write ``parts`` in order with as few system calls as the kernel allows (no joined copy)."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


def _same_content(path: Path, parts: list[BytesLike]) -> bool:
    if path.stat().st_size != sum(memoryview(part).nbytes for part in parts):
        return False
    received = hashlib.sha256()
    for part in parts:
        received.update(part)
    return hashlib.sha256(path.read_bytes()).digest() == received.digest()

