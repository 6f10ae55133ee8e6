"""Per-worker identity: session credentials issued at Join, and who may join under which name.

A worker's Join returns a session credential (``secrets.token_urlsafe``) bound to its worker id;
every later call carries it in the ``dept-session`` metadata and may act only for that worker.
A new Join of the same worker issues a new credential and the old one stops working. Credentials
live in memory only: a restarted server knows none, and its workers join again.

Who may join as which name: with ``--tokens FILE`` a worker's bearer token must be the one listed
for its name; with mutual TLS its name must be its client certificate's common name (or one of its
DNS names). Error messages name workers, never a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from dept_comm.channel import SESSION_METADATA_KEY
from dept_comm.errors import PermissionDeniedError, UnauthenticatedError

SESSION_BYTES = 32  # token_urlsafe(32): 256 random bits


def _key(credential: str) -> bytes:
    """Credentials are kept and looked up by their SHA-256, never as they are."""
    return hashlib.sha256(credential.encode()).digest()


class Sessions:
    """Issued session credentials by worker id; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[bytes, str] = {}  # sha256(credential) -> worker id
        self._current: dict[str, bytes] = {}  # worker id -> sha256 of its one valid credential

    def issue(self, worker_id: str) -> str:
        """A new credential for ``worker_id``; its previous one (if any) stops working."""
        credential = secrets.token_urlsafe(SESSION_BYTES)
        key = _key(credential)
        with self._lock:
            old = self._current.pop(worker_id, None)
            if old is not None:
                self._owner.pop(old, None)
            self._owner[key] = worker_id
            self._current[worker_id] = key
        return credential

    def revoke(self, worker_id: str) -> None:
        """``worker_id``'s credential stops working (it left)."""
        with self._lock:
            old = self._current.pop(worker_id, None)
            if old is not None:
                self._owner.pop(old, None)

    def owner(self, credential: str | None) -> str:
        """The worker a credential belongs to.

        Raises:
            UnauthenticatedError: no credential, or one this server did not issue (or replaced).
        """
        if not credential:
            raise UnauthenticatedError(f"no session credential ({SESSION_METADATA_KEY} metadata); join first")
        with self._lock:
            worker_id = self._owner.get(_key(credential))
        if worker_id is None:
            raise UnauthenticatedError("unknown or replaced session credential; join again")
        return worker_id

    def authorize(self, credential: str | None, worker_id: str) -> None:
        """Allow the call only if ``credential`` is ``worker_id``'s current one.

        Raises:
            UnauthenticatedError: see :meth:`owner`.
            PermissionDeniedError: the credential is another worker's.
        """
        owner = self.owner(credential)
        if owner != worker_id:
            raise PermissionDeniedError(
                f"this session belongs to worker {owner}; it may not act for worker {worker_id!r}"
            )


def read_tokens(path: Path) -> dict[str, str]:
    """``--tokens FILE``: one ``name token`` per line (blank lines and ``#`` comments skipped).

    Raises:
        ValueError: unreadable file, a line without exactly two fields, a repeated name or token,
            or no entry at all (the message names the line, never a token).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--tokens {path}: cannot read it ({type(err).__name__})") from None
    out: dict[str, str] = {}
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) != 2:
            raise ValueError(f"--tokens {path}:{number}: expected 'name token', got {len(fields)} fields")
        name, token = fields
        if name in out:
            raise ValueError(f"--tokens {path}:{number}: worker name {name!r} is listed twice")
        if token in seen:
            raise ValueError(f"--tokens {path}:{number}: the token of {name!r} is another name's too")
        out[name] = token
        seen.add(token)
    if not out:
        raise ValueError(f"--tokens {path}: no 'name token' line")
    return out


class JoinPolicy:
    """Who may join under which name: per-name tokens (``--tokens``) and/or certificate names (mTLS)."""

    def __init__(self, tokens: Mapping[str, str] | None = None, *, require_cert_name: bool = False) -> None:
        self._tokens = dict(tokens) if tokens is not None else None
        self.require_cert_name = require_cert_name

    @property
    def bearer_tokens(self) -> list[str]:
        """Every per-name token (each is a valid bearer token for the transport check)."""
        return list(self._tokens.values()) if self._tokens is not None else []

    def check(self, name: str, bearer: str | None, cert_names: Iterable[str] | None) -> None:
        """Refuse a join under ``name`` that the caller's token or certificate does not allow.

        Raises:
            PermissionDeniedError: the token is not ``name``'s, or the client certificate does not name it.
        """
        if self._tokens is not None:
            expected = self._tokens.get(name)
            if (
                expected is None
                or bearer is None
                or not hmac.compare_digest(bearer.encode(), expected.encode())
            ):
                raise PermissionDeniedError(
                    f"this token does not allow joining as worker {name!r} (see --tokens)"
                )
        if self.require_cert_name:
            names = set(cert_names or ())
            if name not in names:
                shown = ", ".join(sorted(names)) or "none"
                raise PermissionDeniedError(
                    f"worker name {name!r} is not a name of the client certificate ({shown}); with mutual "
                    "TLS a worker joins under its certificate's common name"
                )
