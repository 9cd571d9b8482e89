"""The relay's idle sweep: sessions that moved no byte for ``idle_timeout`` are closed.

The decision (which rows are idle, given ``now``) is the session table's
(:meth:`relay.core.sessions.SessionTable.idle`); this is its timer.  Sweeping at half
the timeout closes an idle session between 1 and 1.5 timeouts after its last byte,
with no per-byte bookkeeping on the data path.  A reload that changes
``idle_timeout`` restarts it (:meth:`IdleSweeper.restart`).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from relay.config.schema import RelayConfig
from relay.core.sessions import SessionRow, SessionTable


class SweptRelay(Protocol):
    """What the sweep needs of the relay (``RelayCore``)."""

    config: RelayConfig
    reactor: Any
    sessions: SessionTable

    def abortSession(self, session: SessionRow, why: str) -> None: ...


class IdleSweeper:
    _log = Logger(namespace="relay.server.relay.RelayCore")

    def __init__(self, relay: SweptRelay) -> None:
        self.relay = relay
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        if self.relay.config.idle_timeout > 0:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _schedule(self) -> None:
        self._timer = self.relay.reactor.callLater(self.relay.config.idle_timeout / 2,
                                                   self.sweep)

    def sweep(self) -> None:
        """Close sessions that moved no byte either way for ``idle_timeout`` seconds."""
        relay = self.relay
        now = relay.reactor.seconds()
        for session in relay.sessions.idle(now, relay.config.idle_timeout):
            self._log.info(
                "closing {user}'s idle session to {service} (nothing for {idle:.0f}s)",
                event="relay_session_idle", user=session.user, service=session.service,
                idle=now - session.active_at,
            )
            relay.abortSession(session, "idle")
        self._schedule()
