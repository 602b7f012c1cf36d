"""Who may record verdicts on the review page: reviewers named by the administrator, each with
a secret of their own, kept only as a salted scrypt hash (RFC 7914) in the config file::

    [reviewers]
    "Dr Wang" = "scrypt$16384$8$1$<salt>$<hash>"

``lungscreen reviewer add NAME`` asks for the secret and prints that line. Signed-in
reviewers get a session: a random id in an HttpOnly, SameSite=Strict cookie and a per-session
token that every form posts back (:class:`ReviewSessions`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

_N, _R, _P = 2**14, 8, 1  # scrypt cost: 16 MiB and some 50 ms per check on this machine's cores
_PREFIX = "scrypt"
SESSION_TTL_S = 8 * 3600  # a reading-room shift


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_secret(secret: str, *, salt: bytes | None = None) -> str:
    """The stored form of ``secret``: ``scrypt$N$r$p$salt$hash`` (salt and hash base64)."""
    if len(secret) < 8:
        raise ValueError("a reviewer's secret needs at least 8 characters")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"{_PREFIX}${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        prefix, n, r, p, salt, digest = stored.split("$")
        if prefix != _PREFIX:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected),
            maxmem=256 * 1024**2,
        )
    except (ValueError, TypeError):  # a malformed entry refuses, never raises
        return False
    return hmac.compare_digest(actual, expected)


def check_reviewers(reviewers: Mapping[str, str]) -> None:
    """Refuse at start-up a reviewers table holding anything but names and scrypt hashes (a
    plain secret pasted in by mistake, above all)."""
    for name, stored in reviewers.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError("reviewers: every reviewer needs a name")
        if not isinstance(stored, str) or not stored.startswith(_PREFIX + "$") or stored.count("$") != 5:
            raise ValueError(
                f"reviewers: the entry of {name!r} is not a secret hash; make one with `lungscreen reviewer add NAME`"
            )


@dataclass(frozen=True)
class Session:
    reviewer: str
    csrf_token: str
    expires_at: float


class ReviewSessions:
    """Signed-in reviewers of this server process (a restart signs everyone out)."""

    def __init__(self, reviewers: Mapping[str, str], *, ttl_s: float = SESSION_TTL_S) -> None:
        check_reviewers(reviewers)
        self._reviewers = dict(reviewers)
        self._ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def sign_in(self, name: str, secret: str) -> tuple[str, Session] | None:
        """A new session id and session for a known reviewer with the right secret, else None."""
        stored = self._reviewers.get(name)
        if stored is None:
            verify_secret(secret, hash_secret("x" * 8))  # the same work as for a known name
            return None
        if not verify_secret(secret, stored):
            return None
        session_id = secrets.token_urlsafe(32)
        session = Session(reviewer=name, csrf_token=secrets.token_urlsafe(32), expires_at=time.time() + self._ttl_s)
        with self._lock:
            now = time.time()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}
            self._sessions[session_id] = session
        return session_id, session

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
        return session if session is not None and session.expires_at > time.time() else None

    def sign_out(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    @staticmethod
    def token_matches(session: Session, supplied: str | None) -> bool:
        return bool(supplied) and hmac.compare_digest(session.csrf_token.encode(), str(supplied).encode())
