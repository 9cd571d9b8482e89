"""Reverse and local forwards carried by one link.

:class:`RemoteForwardRunner` is the state machine of one reverse forward
(``tcpip-forward``): it is requested after every (re)connect, and a refusal —
typically the server still holding the port for the previous, not yet dead
session — is retried with backoff *on the same link*, without touching the
other forwards.

:class:`LocalForwardListener` listens across reconnects; a connection accepted
while the link is down waits (unread) up to ``local_wait`` seconds for it and is
then closed cleanly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.config.schema import LocalForward, RemoteForward
from relay.datapath.bridge import SideFactory, TCPSide
from relay.datapath.join import SessionCounters
from relay.datapath.net import LISTEN_BACKLOG
from relay.ssh.channels import BridgedChannel
from relay.ssh.client import LinkBasics, LinkConnection
from relay.ssh.openerrors import refusal_reason
from relay.ssh.wire import pack_forward


class ForwardState(Enum):
    DOWN = "down"  # no link
    REQUESTING = "requesting"
    READY = "ready"
    REFUSED = "refused"  # waiting to retry
    LISTENING = "listening"  # local forwards


class ForwardOwner(LinkBasics, Protocol):
    """What a forward needs of its link (:class:`relay.agent.link.Link`)."""

    def forwardReady(self) -> None:
        """A reverse forward was granted."""

    def fatal(self, why: str) -> None:
        """The node cannot run as configured (a local forward cannot listen)."""

    def whenReady(self, timeout: float) -> defer.Deferred[LinkConnection]:
        """The ready connection, waiting up to ``timeout`` seconds for one."""

    def sessionStarted(self, forward: Any, side: Any, channel: BridgedChannel,
                       origin: str) -> Any:
        """A session's channel opened: bridge it to ``side`` and count it."""


#: What a refusal says when the server gave no reason (a stock sshd, or a relay before
#: ``request-refused@labrelay``): SSH's REQUEST_FAILURE carries none.
REFUSED_NO_REASON = "refused by the server (port in use or not permitted)"


class RemoteForwardRunner:
    """One ``-R`` forward on one link."""

    _log = Logger()
    kind = "remote"

    def __init__(self, link: ForwardOwner, config: RemoteForward,
                 policy: Callable[[int], float]) -> None:
        self.link = link
        self.config = config
        self.name = config.name
        self._policy = policy
        self.state = ForwardState.DOWN
        self.bound_port: int | None = None
        self.failures = 0
        self.last_error: str | None = None
        self.counters = SessionCounters()
        self._conn: LinkConnection | None = None
        self._timer: IDelayedCall | None = None

    def _request_data(self, port: int) -> bytes:
        return pack_forward(self.config.bind, port)

    def linkUp(self, conn: LinkConnection) -> None:
        self._conn = conn
        self._request()

    def _request(self) -> None:
        self._timer = None
        conn = self._conn
        if conn is None:
            return
        self.state = ForwardState.REQUESTING
        d = conn.sendGlobalRequest(b"tcpip-forward", self._request_data(self.config.port), 1)
        d.addCallbacks(self._granted, self._refused, callbackArgs=(conn,), errbackArgs=(conn,))

    def _granted(self, data: bytes, conn: LinkConnection) -> None:
        if conn is not self._conn:
            return
        port = self.config.port
        if port == 0 and len(data) >= 4:
            (port,) = struct.unpack(">L", data[:4])
        self.bound_port = port
        self.state = ForwardState.READY
        self.failures = 0
        self.last_error = None
        self._log.info(
            "forward {forward} ready: {host}:{port} on the server -> {target}",
            event="forward_ready", link=self.link.name, forward=self.name, kind=self.kind,
            bind=self.config.bind, port=port, host=self.config.bind or "(server default)",
            target=str(self.config.connect),
        )
        self.link.forwardReady()

    def _refused(self, f: Failure, conn: LinkConnection) -> None:
        if conn is not self._conn:
            return  # the link went away meanwhile; linkUp will request again
        self.failures += 1
        self.state = ForwardState.REFUSED
        why = refusal_reason(f, b"tcpip-forward", self.config.bind, self.config.port)
        self.last_error = REFUSED_NO_REASON if why is None else f"refused by the relay: {why}"
        delay = self._policy(self.failures)
        self._log.warn(
            "forward {forward}: server refused {bind}:{port} ({reason}); "
            "retrying in {delay:.1f}s on the same link",
            event="forward_refused", link=self.link.name, forward=self.name,
            bind=self.config.bind, port=self.config.port, reason=self.last_error,
            failures=self.failures, delay=delay,
        )
        self._log.info(
            "forward {forward}: retry {failures} in {delay:.1f}s",
            event="forward_retry", link=self.link.name, forward=self.name, delay=delay,
            failures=self.failures,
        )
        self._timer = self.link.clock.callLater(delay, self._request)

    def revoked(self, why: str) -> None:
        """The relay dropped this registration (``grant-revoked@labrelay``): its grant
        is gone.  Asked again with backoff, so it comes back if the grant does."""
        if self._conn is None or self.state is not ForwardState.READY:
            return
        self.failures += 1
        self.state = ForwardState.REFUSED
        self.last_error = f"revoked by the relay: {why}"
        delay = self._policy(self.failures)
        self._log.warn(
            "forward {forward}: the relay revoked {bind}:{port}: {reason}; asking again in "
            "{delay:.1f}s", event="forward_revoked", link=self.link.name, forward=self.name,
            bind=self.config.bind, port=self.bound_port, reason=why, delay=delay,
        )
        self._timer = self.link.clock.callLater(delay, self._request)

    def linkDown(self) -> None:
        self._conn = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.state = ForwardState.DOWN

    def matches(self, host: str, port: int) -> bool:
        """Whether a ``forwarded-tcpip`` to ``port`` is for this forward.

        Also while its request is on its way (a fixed port only): a server may open a
        session for a forward before its reply arrives here, and OpenSSH's client
        accepts it too (its permission exists from the request on).  Refusing it would
        lose a connection that waited for this agent to come back."""
        if self.state is ForwardState.READY:
            return self.bound_port == port
        return (self.state is ForwardState.REQUESTING and self.config.port != 0
                and self.config.port == port)

    def cancel(self) -> defer.Deferred[Any]:
        """Ask the server to stop listening (clean shutdown)."""
        conn, port = self._conn, self.bound_port
        ready = self.state is ForwardState.READY
        self.linkDown()
        if conn is None or not ready or port is None:
            return defer.succeed(None)
        d = conn.sendGlobalRequest(b"cancel-tcpip-forward", self._request_data(port), 1)

        def refused(f: Failure) -> None:
            why = refusal_reason(f, b"cancel-tcpip-forward", self.config.bind, port)
            if why is not None:  # else a plain refusal, or the link went: nothing to say
                self._log.info(
                    "forward {forward}: the relay refused to cancel {bind}:{port}: {reason}",
                    event="forward_cancel_refused", link=self.link.name, forward=self.name,
                    bind=self.config.bind, port=port, reason=why,
                )

        return d.addErrback(refused)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state.value,
            "listen": f"{self.config.bind}:{self.config.port}",
            "bound_port": self.bound_port,
            "connect": str(self.config.connect),
            "failures": self.failures,
            "last_error": self.last_error,
            **self.counters.as_dict(),
        }


class LocalForwardListener(Service):
    """One ``-L`` forward: listen here, carry each connection over the link."""

    _log = Logger()
    kind = "local"

    def __init__(self, link: ForwardOwner, config: LocalForward) -> None:
        self.link = link
        self.config = config
        self.name = config.name
        self.state = ForwardState.DOWN
        self.bound_port: int | None = None
        self.last_error: str | None = None
        self.counters = SessionCounters()
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        bind, reactor = self.config.bind, self.link.reactor
        if bind in ("*", ""):
            bind = "0.0.0.0"  # ssh(1): empty or "*" means every interface
        endpoint_class = TCP6ServerEndpoint if ":" in bind else TCP4ServerEndpoint
        endpoint = endpoint_class(reactor, self.config.port, backlog=LISTEN_BACKLOG,
                                  interface=bind)
        factory = SideFactory(self._accepted)
        # Listening is synchronous for TCP endpoints; a failure (port in use)
        # surfaces here, at start-up, where the operator sees it.
        d = endpoint.listen(factory)
        d.addCallbacks(self._listening, self._listenFailed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self.bound_port = port.getHost().port  # type: ignore[attr-defined]
        self.state = ForwardState.LISTENING
        self._log.info(
            "forward {forward} ready: listening on {bind}:{port} -> {target} via the server",
            event="forward_ready", link=self.link.name, forward=self.name, kind=self.kind,
            bind=self.config.bind, port=self.bound_port, target=str(self.config.connect),
        )

    def _listenFailed(self, f: Failure) -> None:
        self.last_error = f.getErrorMessage()
        self._log.error(
            "forward {forward}: cannot listen on {bind}:{port}: {reason}",
            event="forward_failed", link=self.link.name, forward=self.name,
            bind=self.config.bind, port=self.config.port, reason=self.last_error,
        )
        self.link.fatal(f"local forward {self.name}: cannot listen on "
                        f"{self.config.bind}:{self.config.port}: {self.last_error}")

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        self.state = ForwardState.DOWN
        if port is not None:
            return defer.maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return None

    def _accepted(self, side: TCPSide) -> None:
        peer = side.transport.getPeer()  # type: ignore[union-attr]
        origin_host, origin_port = getattr(peer, "host", ""), getattr(peer, "port", 0)
        d = self.link.whenReady(self.link.config.local_wait)

        def open_channel(conn: LinkConnection) -> defer.Deferred[Any]:
            target = self.config.connect
            opened = conn.openDirect(target.host, target.port, origin_host, origin_port)
            side.readAhead()  # the first bytes, read while the channel opens
            return opened.addCallback(
                lambda ch: self.link.sessionStarted(self, side, ch, f"{origin_host}:{origin_port}")
            )

        def failed(f: Failure) -> None:
            self._log.warn(
                "forward {forward}: connection from {origin} refused: {reason}",
                event="local_refused", link=self.link.name, forward=self.name,
                origin=f"{origin_host}:{origin_port}", reason=f.getErrorMessage(),
            )
            side.close()

        d.addCallback(open_channel).addErrback(failed)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state.value,
            "listen": f"{self.config.bind}:{self.config.port}",
            "bound_port": self.bound_port,
            "connect": str(self.config.connect),
            "last_error": self.last_error,
            **self.counters.as_dict(),
        }
