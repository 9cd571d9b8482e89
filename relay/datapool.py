"""The agent's end of the fast path: data connections dialled before they are needed.

When its link is up, the agent asks the relay (``data-pool@labrelay``) for a few
one-time tokens and dials the relay's data port with each, so that a user's
fast-path session finds a connection already open: set-up costs the relay one
write and the agent one connect to the target, not a TCP handshake across the
internet.  An idle connection waits for the relay's GO (which service); the
agent connects that service's target like a ``forwarded-tcpip`` channel would,
answers ``K`` (or ``E`` and why) and hands both sockets to :mod:`relay.datapath`.
Every connection used or lost is replaced.

Against a stock sshd the request is refused (``REQUEST_FAILURE``) and the pool
stays off for that link; ``fast_path_pool = 0`` turns it off.  Chained services
(``via_relay``) are channels on this node, not sockets, so they are not offered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import datapath
from . import fastwire as fw
from .datapath import Held
from .net import client_endpoint, probe_idle
from .ssh.connection import refused_by_peer

if TYPE_CHECKING:
    from .link import Link
    from .ssh.client import LinkConnection

TARGET_CONNECT_TIMEOUT = 10.0
RETRY_DELAY = 2.0


class PoolConnection(Protocol):
    """One pre-dialled data connection: ``idle`` -> ``connecting`` -> ``spliced``."""

    transport: Any

    def __init__(self, pool: DataPool, token: bytes) -> None:
        self.pool = pool
        self.token = token
        self.state = "dialing"
        self.buf = b""

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        probe_idle(self.transport)
        self.transport.write(fw.agent_hello(self.token))
        self.state = "idle"
        self.pool.connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state != "idle":
            self.buf += data  # one read that raced the pause: it belongs to the stream
            return
        self.buf += data
        try:
            parsed = fw.parse_go(self.buf)
        except fw.WireError as e:
            self.pool.protocolError(self, str(e))
            return
        if parsed is None:
            return
        (name, port), self.buf = parsed
        self.state = "connecting"
        self.transport.pauseProducing()
        self.pool.dispatched(self, name, port)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        was, self.state = self.state, "closed"
        self.pool.lost(self, was)


class DataPool:
    """A link's pool of idle data connections to its relay's data port."""

    _log = Logger()

    def __init__(self, link: Link, size: int) -> None:
        self.link = link
        self.size = size
        self.state = "off" if size <= 0 else "down"
        self.reason = "fast_path_pool = 0" if size <= 0 else ""
        self.data_port = 0
        self.idle: set[PoolConnection] = set()
        self.dialing = 0
        self.stash: list[tuple[bytes, float]] = []  # tokens not dialled yet, with expiry
        self._conn: LinkConnection | None = None
        self._asking = False
        self._retry: IDelayedCall | None = None
        self._pairs: set[datapath.SplicedPair] = set()
        self._ready: list[defer.Deferred[None]] = []
        self.sessions_total = 0
        self.dial_failures = 0
        self.bytes_to_target = 0
        self.bytes_from_target = 0

    # link life

    def linkUp(self, conn: LinkConnection) -> None:
        if self.size <= 0:
            return
        if not self._services():  # a user's link, or public ports only: nothing to splice
            self.state, self.reason = "off", "no named remote forwards to splice"
            return
        self._conn = conn
        self.state = "starting"
        self.stash = []
        self.refill()

    def linkDown(self) -> None:
        self._conn = None
        if self.size > 0:
            self.state = "down"
        self._cancelRetry()
        for pc in list(self.idle):
            pc.transport.loseConnection()
        self.idle.clear()

    def stop(self) -> None:
        self.linkDown()
        for pair in list(self._pairs):
            pair.abort()

    def _cancelRetry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _services(self) -> list[tuple[str, int]]:
        from .relayserver import PUBLIC_BINDS

        local = self.link.local_relay
        return [(f.config.bind.lower(), f.bound_port or f.config.port) for f in self.link.remote
                if f.config.bind not in PUBLIC_BINDS and (
                    not f.config.via_relay  # a socket this agent connects itself
                    # chaining: a service of this node's relay, spliced on to its agent
                    or (local is not None and local.dataport.spliceable(
                        f.config.connect.host, f.config.connect.port)))]

    # keeping it full

    def refill(self) -> None:
        conn = self._conn
        if conn is None or self.state in ("off", "unsupported", "unavailable"):
            return
        want = self.size - len(self.idle) - self.dialing
        now = self.link.clock.seconds()
        self.stash = [(t, exp) for t, exp in self.stash if exp > now + 1.0]
        while want > 0 and self.stash:
            self._dial(self.stash.pop()[0])
            want -= 1
        if want <= 0 or self._asking or self._retry is not None:
            return
        self._asking = True
        d = conn.sendGlobalRequest(fw.POOL_REQUEST,
                                   fw.pack_pool_request(self.size, self._services()), wantReply=1)
        d.addCallbacks(self._granted, self._refused, callbackArgs=(conn,), errbackArgs=(conn,))

    def _granted(self, data: bytes, conn: LinkConnection) -> None:
        self._asking = False
        if conn is not self._conn:
            return
        try:
            status, message, data_port, tokens, lifetime = fw.unpack_pool_reply(data)
        except fw.WireError as e:
            self._off("unavailable", f"the relay answered nonsense: {e}")
            return
        if status is not fw.Status.OK:
            self._off("unavailable", message)
            return
        if self.state != "ready":
            self._log.info("link {link}: fast path on: {n} data connections to port {port}",
                           event="fast_path_ready", link=self.link.name, n=self.size,
                           port=data_port)
        self.state = "ready"
        self.reason = ""
        self.data_port = data_port
        waiters, self._ready = self._ready, []
        for d in waiters:
            d.callback(None)
        expires = self.link.clock.seconds() + lifetime
        self.stash.extend((t, expires) for t in tokens)
        self.refill()

    def _refused(self, f: Failure, conn: LinkConnection) -> None:
        self._asking = False
        if conn is not self._conn:
            return
        if refused_by_peer(f):
            self._off("unsupported", "the server does not offer labrelay's fast path "
                      "(a stock sshd, or an older relay)")
        # else: the link stopped meanwhile; linkUp starts again

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once the relay granted the pool (the demo waits for it)."""
        if self.state == "ready":
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ready.append(d)
        return d

    def _off(self, state: str, why: str) -> None:
        if self.state != state or self.reason != why:
            self._log.info("link {link}: no fast path: {reason}", event="fast_path_off",
                           link=self.link.name, reason=why)
        self.state = state
        self.reason = why

    def _dial(self, token: bytes) -> None:
        self.dialing += 1
        endpoint = client_endpoint(self.link.reactor, self.link.config.host, self.data_port,
                                   self.link.config.connect_timeout)
        factory = Factory.forProtocol(lambda: PoolConnection(self, token))
        factory.noisy = False

        def failed(f: Failure) -> None:
            self.dialing -= 1
            self.dial_failures += 1
            self._log.warn("link {link}: cannot dial the data port {port}: {reason}",
                           event="fast_path_dial_failed", link=self.link.name,
                           port=self.data_port, reason=f.getErrorMessage())
            self._later()

        endpoint.connect(factory).addErrback(failed)

    def _later(self) -> None:
        if self._retry is None and self._conn is not None:
            def again() -> None:
                self._retry = None
                self.refill()

            self._retry = self.link.clock.callLater(RETRY_DELAY, again)

    def connected(self, pc: PoolConnection) -> None:
        self.dialing -= 1
        if self._conn is None:
            pc.transport.loseConnection()
            return
        self.idle.add(pc)

    def lost(self, pc: PoolConnection, was: str) -> None:
        if was == "idle" and pc in self.idle:
            self.idle.discard(pc)
            # The relay closed an idle connection: its session ended (the link will
            # say so), or it refused our token; do not dial again at once.
            self._later()

    def protocolError(self, pc: PoolConnection, why: str) -> None:
        self._log.warn("link {link}: data connection: {why}", event="fast_path_protocol",
                       link=self.link.name, why=why)
        self.idle.discard(pc)
        pc.transport.abortConnection()
        self._later()  # replaced, but not at once: the relay is misbehaving

    # a session

    def dispatched(self, pc: PoolConnection, name: str, port: int) -> None:
        self.idle.discard(pc)
        self.refill()
        forward = self.link.remoteForwardFor(name, port)
        local = self.link.local_relay
        if forward is None or (forward.config.via_relay and (
                local is None or not local.dataport.spliceable(forward.config.connect.host,
                                                               forward.config.connect.port))):
            self._fail(pc, name, port, "no such forward on this agent")
            return
        target = forward.config.connect
        d: defer.Deferred[tuple[Any, bytes]]
        if forward.config.via_relay:
            # Chaining: one of the service's own agent's data connections at this
            # node's relay, answered K; this session is then spliced through to it.
            d = local.dataport.pairLocal(target.host, target.port).addCallback(
                lambda dc: (dc.transport, dc.extra))
        else:
            endpoint = client_endpoint(self.link.reactor, target.host, target.port,
                                       TARGET_CONNECT_TIMEOUT)
            factory = Factory.forProtocol(Held)
            factory.noisy = False
            connecting: defer.Deferred[Any] = endpoint.connect(factory)
            d = connecting.addCallback(lambda held: (held.transport, held.received))

        def connected(server: tuple[Any, bytes]) -> None:
            transport, received = server
            if pc.state != "connecting":
                transport.abortConnection()
                return
            pc.transport.write(fw.AGENT_OK)
            try:
                pair = datapath.get(self.link.reactor).splice_transports(
                    pc.transport, transport, from_a=pc.buf, from_b=received)
            except (OSError, TypeError) as e:
                self._log.error("forward {forward}: cannot splice: {reason}",
                                event="fast_path_splice_failed", forward=forward.name,
                                reason=str(e))
                pc.transport.abortConnection()
                transport.abortConnection()
                return
            pc.state = "spliced"
            self._sessionStarted(forward, pair)

        def failed(f: Failure) -> None:
            self._log.warn("forward {forward}: cannot reach {target}: {reason}",
                           event="target_unreachable", link=self.link.name,
                           forward=forward.name, target=str(target),
                           reason=f.getErrorMessage())
            self._fail(pc, name, port, f"connect to {target} failed: {f.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    def _fail(self, pc: PoolConnection, name: str, port: int, why: str) -> None:
        if pc.state == "closed":
            return
        pc.transport.write(fw.pack_error(fw.AGENT_ERROR, why))
        pc.transport.loseConnection()

    def _sessionStarted(self, forward: Any, pair: datapath.SplicedPair) -> None:
        self._pairs.add(pair)
        self.sessions_total += 1
        counters = forward.counters
        counters.active += 1
        counters.total += 1

        def ended(result: Any) -> None:
            self._pairs.discard(pair)
            moved = pair.bytes()
            counters.active -= 1
            counters.bytes_in += moved.a_to_b
            counters.bytes_out += moved.b_to_a
            self.bytes_to_target += moved.a_to_b
            self.bytes_from_target += moved.b_to_a
            if isinstance(result, Failure) and not result.check(datapath.PairAborted):
                self._log.debug("forward {forward}: spliced session ended: {reason}",
                                event="fast_path_session_error", forward=forward.name,
                                reason=result.getErrorMessage())

        pair.done.addBoth(ended)

    def status(self) -> dict[str, Any]:
        live = [p.bytes() for p in list(self._pairs)]
        return {
            "state": self.state,
            "reason": self.reason,
            "size": self.size,
            "data_port": self.data_port or None,
            "idle": len(self.idle),
            "dialing": self.dialing,
            "sessions_active": len(self._pairs),
            "sessions_total": self.sessions_total,
            "bytes_to_target": self.bytes_to_target + sum(b.a_to_b for b in live),
            "bytes_from_target": self.bytes_from_target + sum(b.b_to_a for b in live),
            "dial_failures": self.dial_failures,
        }

