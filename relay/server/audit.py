"""The audit log: one event when a user session opens, one when it closes.

Who used what is answered from these two events alone (docs/operations.md, "Audit
log"): ``session_open`` and ``session_close`` carry the user, the SHA256 fingerprint
of the key that authenticated (``-`` for a public port's connection, which has none),
the service, the origin address, the path (``channel`` for an SSH channel, ``spliced``
for the fast path, ``public`` for a public port) and, on close, the bytes each way,
the duration and why it ended.  They go through the same observers as every other
event (text and JSON lines), so peer-supplied strings (the origin a client claims)
are escaped there.  The rows themselves are :mod:`relay.core.sessions`'s.
"""

from __future__ import annotations

import base64
import hashlib

from twisted.logger import Logger

from relay.core.sessions import SessionRow

_log = Logger(namespace="labrelay.audit")


def key_fingerprint(blob: bytes | None) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it; ``-`` when there is no key."""
    if blob is None:
        return "-"
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def path_of(row: SessionRow) -> str:
    """``channel``, ``spliced``, or ``public`` (a public port's connection)."""
    if row.key is None and row.user.startswith("public:"):
        return "public"
    return row.path


def opened(row: SessionRow, early: bool = False) -> None:
    """``early``: the user's channel was confirmed before the agent answered
    (``[relay] early_confirm``, relay.core.earlyopen)."""
    _log.info(
        "session open: {user} ({key}) to {service} from {origin} by {path}",
        event="session_open", audit=True, user=row.user, key=key_fingerprint(row.key),
        service=row.service, origin=row.origin, path=path_of(row), started=row.started,
        early=early,
    )


def closed(row: SessionRow) -> None:
    duration = (row.ended or row.started) - row.started
    _log.info(
        "session close: {user} ({key}) to {service} from {origin} by {path}: "
        "{bytes_to_service} bytes to it, {bytes_from_service} from it in {duration:.3f}s "
        "({why})",
        event="session_close", audit=True, user=row.user, key=key_fingerprint(row.key),
        service=row.service, origin=row.origin, path=path_of(row), started=row.started,
        bytes_to_service=row.to_service, bytes_from_service=row.from_service,
        duration=round(duration, 3), why=row.why or "closed",
    )
