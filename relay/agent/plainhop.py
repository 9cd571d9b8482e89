"""Plain TCP hops: ``[[forward]]`` in the node config, on the spliced data path.

A :class:`PlainForward` listens; for every connection it accepts it connects to
the target and hands both sockets to :mod:`relay.datapath.splicing`, which moves the bytes
in the kernel.  What the seed did with ``ssh -L *:PORT:localhost:PORT localhost``
(encrypting loopback traffic for nothing), without the encryption and without a
user-space copy.

The accepted socket is not read until the target is connected (the
``portforward`` rule): a client that talks first waits in its kernel buffers.  If
the target refuses or does not answer within ``connect_timeout``, the client's
connection is closed without a byte read.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.config.schema import PlainForwardConfig
from relay.datapath import splicing as datapath
from relay.datapath.handoff import Held
from relay.datapath.join import OnEnd, SessionCounters, join

LISTEN_BACKLOG = 1024


class PlainState(StrEnum):
    """A plain hop as ``status`` shows it: not listening (stopped, or before its
    listener is up), listening, or failed to listen (fatal to the node: on_fatal)."""

    DOWN = "down"
    LISTENING = "listening"
    FAILED = "failed"


class PlainForward(Service):
    """One ``[[forward]]``: listen on ``listen``, splice each connection to ``connect``."""

    _log = Logger()
    kind = "plain"

    def __init__(self, config: PlainForwardConfig, reactor: Any, *,
                 connect_timeout: float = 15.0,
                 on_fatal: Callable[[str], object] | None = None,
                 data_path: datapath.DataPath | None = None) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._on_fatal = on_fatal
        # The backend is chosen (and a bad LABRELAY_DATAPATH refused) when the
        # service tree is built, before anything listens.
        self.datapath = data_path if data_path is not None else datapath.get(reactor)
        self.state = PlainState.DOWN
        self.bound_port: int | None = None
        self.last_error: str | None = None
        self.counters = SessionCounters()
        self.failures = 0
        self._port: IListeningPort | None = None
        self._pending: set[defer.Deferred[Any]] = set()

    def startService(self) -> None:
        super().startService()
        bind = self.config.bind
        if bind in ("*", ""):
            bind = "0.0.0.0"
        endpoint_class = TCP6ServerEndpoint if ":" in bind else TCP4ServerEndpoint
        # A hop takes bursts of connections (200 ssh sessions at once): Twisted's
        # default backlog of 50 would drop SYNs and cost clients a 1 s retransmit.
        endpoint = endpoint_class(self.reactor, self.config.port, backlog=LISTEN_BACKLOG,
                                  interface=bind)
        factory = Factory.forProtocol(Held)
        factory.noisy = False
        build = factory.buildProtocol

        def buildProtocol(addr: Any) -> Held:
            proto = build(addr)
            assert isinstance(proto, Held)
            proto.onMade = self._accepted
            return proto

        factory.buildProtocol = buildProtocol  # type: ignore[method-assign]
        endpoint.listen(factory).addCallbacks(self._listening, self._listenFailed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self.bound_port = port.getHost().port  # type: ignore[attr-defined]
        self.state = PlainState.LISTENING
        self._log.info(
            "forward {forward} ready: listening on {bind}:{port} -> {target} (plain TCP, "
            "{backend} data path)",
            event="plain_forward_ready", forward=self.name, kind=self.kind,
            bind=self.config.bind, port=self.bound_port, target=str(self.config.connect),
            backend=self.datapath.backend.name,
        )

    def _listenFailed(self, f: Failure) -> None:
        self.state = PlainState.FAILED
        self.last_error = f.getErrorMessage()
        self._log.error(
            "forward {forward}: cannot listen on {bind}:{port}: {reason}",
            event="forward_failed", forward=self.name, kind=self.kind,
            bind=self.config.bind, port=self.config.port, reason=self.last_error,
        )
        if self._on_fatal is not None:
            self._on_fatal(f"forward {self.name}: cannot listen on "
                           f"{self.config.bind}:{self.config.port}: {self.last_error}")

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self.state = PlainState.DOWN
        for d in list(self._pending):
            d.cancel()
        for pair in list(self.counters.pairs):
            pair.abort()
        port, self._port = self._port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return None

    def _accepted(self, client: Held) -> None:
        peer = client.transport.getPeer()
        origin = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', 0)}"
        target = self.config.connect
        endpoint = HostnameEndpoint(self.reactor, target.host, target.port,
                                    timeout=self.connect_timeout)
        factory = Factory.forProtocol(Held)
        factory.noisy = False
        d = endpoint.connect(factory)
        self._pending.add(d)

        def connected(server: Held) -> None:
            self._pending.discard(d)
            if client.lost:  # cannot happen while unread, but do not splice a dead socket
                server.transport.loseConnection()
                return
            self._splice(client, server, origin)

        def failed(f: Failure) -> None:
            self._pending.discard(d)
            self.failures += 1
            self.last_error = f.getErrorMessage()
            self._log.warn(
                "forward {forward}: cannot connect to {target} for {origin}: {reason}",
                event="plain_connect_failed", forward=self.name, target=str(target),
                origin=origin, reason=self.last_error,
            )
            if not client.lost:
                client.transport.loseConnection()

        d.addCallbacks(connected, failed)

    def _splice(self, client: Held, server: Held, origin: str) -> None:
        def ended(pair: datapath.SplicedPair, result: datapath.PairResult | Failure) -> None:
            counts = pair.bytes()
            error = None
            if isinstance(result, Failure):
                exc = result.value
                error = errno.errorcode.get(getattr(exc, "errno", 0) or 0, str(exc))
                side = getattr(exc, "side", None)
                if side is not None:
                    error += f" ({'client' if side == 'a' else 'target'} side)"
            self._log.debug(
                "forward {forward}: session from {origin} ended: {to_target} bytes to the "
                "target, {from_target} back{error_text}",
                event="plain_session_ended", forward=self.name, origin=origin,
                to_target=counts.a_to_b, from_target=counts.b_to_a, error=error,
                error_text="" if error is None else f" ({error})",
            )

        try:
            join(self.datapath, client, server, (self.counters, OnEnd(ended)))
        except (OSError, TypeError) as e:
            self.last_error = str(e)
            self._log.error("forward {forward}: cannot splice {origin}: {reason}",
                            event="plain_splice_failed", forward=self.name, origin=origin,
                            reason=str(e))
            client.transport.abortConnection()
            server.transport.abortConnection()
            return
        self._log.debug("forward {forward}: session from {origin} spliced",
                        event="plain_session_started", forward=self.name, origin=origin)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "listen": f"{self.config.bind}:{self.config.port}",
            "bound_port": self.bound_port,
            "connect": str(self.config.connect),
            "path": "spliced",
            "datapath": self.datapath.backend.name,
            "connect_failures": self.failures,
            "last_error": self.last_error,
            **self.counters.as_dict(),
        }
