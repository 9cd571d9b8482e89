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

from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from relay.core.certs import key_fingerprint as key_fingerprint  # re-exported
from relay.core.sessions import SessionRow

_log = Logger(namespace="labrelay.audit")




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


NATIVE_FIELDS = (("native_opened", "native_bytes"), ("native_sealed", "native_sealed"),
                 ("native_runs", "native_runs"), ("native_handbacks", "native_handbacks"),
                 ("native_yields", "native_yields"))
"""``session_close``'s fields for a session the native thread carried (relay.ssh.
nativeforward), each from the session's own counter of that name."""


def closed(row: SessionRow, native: Mapping[str, int] | None = None,
           ended: str | None = None) -> None:
    """``session_close``; ``native``: the session's own counts of the native thread
    (bytes it opened to the service and sealed to the user, its runs, its hand-backs and
    those a relay write asked for), when it carried any of the session; ``ended``: which
    side began the end and how (``service eof``, ``user closed``, ``service reset`` ...:
    ``Bridge.endedBy``), for a bridged session."""
    duration = (row.ended or row.started) - row.started
    fields: dict[str, Any] = dict(
        event="session_close", audit=True, user=row.user, key=key_fingerprint(row.key),
        service=row.service, origin=row.origin, path=path_of(row), started=row.started,
        bytes_to_service=row.to_service, bytes_from_service=row.from_service,
        duration=round(duration, 3), why=row.why or "closed",
    )
    if ended is None:
        _log.info("session close: {user} ({key}) to {service} from {origin} by {path}: "
                  "{bytes_to_service} bytes to it, {bytes_from_service} from it in "
                  "{duration:.3f}s ({why})", **fields)
    elif not native:
        _log.info("session close: {user} ({key}) to {service} from {origin} by {path}: "
                  "{bytes_to_service} bytes to it, {bytes_from_service} from it in "
                  "{duration:.3f}s ({why}; {ended} first)", ended=ended, **fields)
    else:
        _log.info("session close: {user} ({key}) to {service} from {origin} by {path}: "
                  "{bytes_to_service} bytes to it, {bytes_from_service} from it in "
                  "{duration:.3f}s ({why}; {ended} first) (native thread: {native_opened} "
                  "bytes opened, {native_sealed} sealed, {native_runs} runs, "
                  "{native_handbacks} hand-backs)", ended=ended, **fields,
                  **{field: native.get(counter, 0) for field, counter in NATIVE_FIELDS})


SETUP_LOG_DELAY = 0.02
"""Seconds a session's opening events (``session_open``, ``relay_pooled_session``) wait
before they are written (:class:`SetupLog`).  Longer than a set-up plus its first echo
on a LAN (a few ms), short enough that a reader of the log sees them at once."""


class SetupLog:
    """A session's opening events, written a little after its set-up (issue 13 item 5).

    Writing a log line is a write to the log's pipe or file that wakes its reader
    (journald, a shipper): on a small machine ~0.15-0.2 ms of the relay's turn and one
    more process competing for a core while the agent connects and the user's client
    sends her first bytes (docs/benchmarks.md, "Set-up after an idle gap").  So these
    events are written :data:`SETUP_LOG_DELAY` seconds later, off that path.

    This is safe because nothing is lost or reordered for the session: its held events
    are written first whenever something else is logged about it (:meth:`flush`: the
    relay calls it before ``relay_session_refused`` and ``session_close``), and all of
    them when the relay stops (:meth:`flushAll`).  The events carry the same fields,
    ``started`` included, as when they were written at once."""

    def __init__(self, clock: Any, delay: float = SETUP_LOG_DELAY) -> None:
        self.clock = clock
        self.delay = delay
        self._held: dict[Any, tuple[Any, list[Callable[[], None]]]] = {}

    def later(self, session: Any, write: Callable[[], None]) -> None:
        """``write`` ``session``'s event in :attr:`delay` seconds (or at its flush)."""
        held = self._held.get(session)
        if held is None:
            self._held[session] = (self.clock.callLater(self.delay, self.flush, session),
                                   [write])
        else:
            held[1].append(write)

    def flush(self, session: Any) -> None:
        """Write ``session``'s held events now, in the order they were made."""
        held = self._held.pop(session, None)
        if held is None:
            return
        call, writes = held
        if call.active():
            call.cancel()
        for write in writes:
            write()

    def flushAll(self) -> None:
        for session in list(self._held):
            self.flush(session)

    def __len__(self) -> int:
        return len(self._held)
