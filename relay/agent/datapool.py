"""The agent's end of the fast path: data connections dialled before they are needed.

When its link is up, the agent asks the relay (``data-pool-v2@labrelay``) for a
few one-time tickets and dials the relay's data port with each, so that a user's
fast-path session finds a connection already open: set-up costs the relay one
write and the agent one connect to the target, not a TCP handshake across the
internet.

The data connections are not encrypted and someone on the path may own the
address they go to, so the agent trusts nothing on them that the SSH link did not
vouch for (docs/fastpath.md "Protocol"):

- it dials the data port at the address its SSH link is connected to (the link's
  peer), not at a fresh resolution of the relay's name;
- it answers the relay's challenge with a proof of the ticket's secret, never the
  secret;
- it acts on a GO only if its MAC, keyed with that connection's ticket secret and
  bound to its ticket id and nonce, is right, and only for the exact name and port
  of a forward it offered and the relay listed as end-to-end encrypted;
- a connection that ends without a valid dispatch (closed, garbage, a bad MAC) is
  replaced at a bounded rate (:class:`RefillBudget`) and logged once per burst
  (:class:`BurstLog`); one used by a valid dispatch is replaced freely
  (``REFILL_AFTER_USE``).

An idle connection that gets a valid GO connects that service's target like a
``forwarded-tcpip`` channel would, answers ``K`` (or ``E`` and why) and hands both
sockets to :mod:`relay.datapath.splicing`.

Against a stock sshd the request is refused (``REQUEST_FAILURE``) and the pool
stays off for that link; ``fast_path_pool = 0`` turns it off.  Chained services
(``via_relay``) are channels on this node, not sockets, so they are not offered.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.agent.chaining import LocalRelay
from relay.agent.forwards import RemoteForwardRunner
from relay.agent.refill import REFILL_WINDOW, BurstLog, RefillBudget
from relay.core import fastwire as fw
from relay.core.routing import PUBLIC_BINDS
from relay.core.sessioncap import SessionSlot
from relay.datapath import splicing as datapath
from relay.datapath.dialnow import Dial, connect_spliced
from relay.datapath.handoff import Handoff, Held
from relay.datapath.join import Handed, OnEnd, SessionCounters, join
from relay.datapath.net import client_endpoint, peer_ip, probe_idle, write_now
from relay.datapath.pymover import End, _reset_and_close
from relay.ssh.client import LinkBasics, LinkConnection
from relay.ssh.openerrors import refused_by_peer

TARGET_CONNECT_TIMEOUT = 10.0
RETRY_DELAY = 2.0
# A used connection's replacement, while half the pool is idle: after the session's
# set-up, not during it (DataPool._refillAfterUse; docs/benchmarks.md, round 6).
REFILL_AFTER_USE = 0.010


class PoolConnState(StrEnum):
    """A pre-dialled data connection (:class:`PoolConnection`)."""

    DIALING = "dialing"
    CHALLENGE = "challenge"  # connected, waiting for the relay's nonce
    IDLE = "idle"  # hello sent, waiting for a GO
    CONNECTING = "connecting"  # a valid GO: connecting the target
    SPLICED = "spliced"
    CLOSED = "closed"


class PoolState(StrEnum):
    """The pool as ``status`` shows it (``fast_path.state``): ``OFF``,
    ``UNSUPPORTED`` and ``UNAVAILABLE`` say why there is none (``reason``)."""

    OFF = "off"  # not configured, or nothing it could splice
    DOWN = "down"  # the link is down
    STARTING = "starting"  # asked the relay for tickets
    READY = "ready"
    UNSUPPORTED = "unsupported"  # the server has no data port (a stock sshd, an old relay)
    UNAVAILABLE = "unavailable"  # the relay refused or answered nonsense


class PoolConnection(Handoff):
    """One pre-dialled data connection: ``dialing`` -> ``challenge`` (waiting for the
    relay's nonce) -> ``idle`` (hello sent, waiting for a GO) -> ``connecting`` (held
    for the data path) -> ``spliced``; any -> ``closed``."""

    def __init__(self, pool: DataPool, token: bytes) -> None:
        super().__init__()
        self.pool = pool
        self.token = token
        self.token_id, self.secret = fw.split_ticket(token)
        self.nonce = b""
        self.state = PoolConnState.DIALING

    def prefaceStarted(self) -> None:
        probe_idle(self.transport)
        self.state = PoolConnState.CHALLENGE
        self.pool.connected(self)

    def prefaceReceived(self) -> None:
        if self.state is PoolConnState.CHALLENGE:
            try:
                parsed = fw.parse_challenge(self.buf)
            except fw.WireError as e:
                self.pool.protocolError(self, str(e))
                return
            if parsed is None:
                return
            self.nonce, self.buf = parsed
            if self.buf:
                self.pool.protocolError(self, "bytes after the challenge, before our hello")
                return
            write_now(self.transport, (fw.agent_hello(self.token, self.nonce),))
            self.state = PoolConnState.IDLE
            return
        if self.state is not PoolConnState.IDLE:
            return
        try:
            go = fw.parse_go(self.buf)
        except fw.WireError as e:
            self.pool.protocolError(self, str(e))
            return
        if go is None:
            return
        (name, port), mac, rest = go
        if not fw.go_valid(self.secret, self.token_id, self.nonce, name, port, mac):
            self.pool.protocolError(self, "a dispatch with a wrong MAC (forged, altered or "
                                    "replayed from another connection)")
            return
        self.state = PoolConnState.CONNECTING
        self.hold(rest)
        self.pool.dispatched(self, name, port)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        was, self.state = self.state, PoolConnState.CLOSED
        self.pool.lost(self, was)


def _abort(server: Handed | End) -> None:
    """Reset a dialled target that will not be spliced (an ``End``'s descriptor is
    ours to close: relay.datapath.dialnow.connect_spliced)."""
    if isinstance(server, End):
        _reset_and_close(server.rfd, True)
    else:
        server.transport.abortConnection()


class PoolOwner(LinkBasics, TypingProtocol):
    """What the data pool needs of its link (:class:`relay.agent.link.Link`)."""

    @property
    def remote(self) -> Sequence[RemoteForwardRunner]: ...

    @property
    def local_relay(self) -> LocalRelay | None: ...

    def admitSession(self, forward: str) -> SessionSlot | str:
        """A place for one more session in the link's cap, or why not."""

    def targetUnreachable(self, forward: str, target: str, reason: str) -> None:
        """A connect to ``forward``'s target failed: logged once per burst."""


class DataPool:
    """A link's pool of idle data connections to its relay's data port."""

    _log = Logger()

    def __init__(self, link: PoolOwner, size: int, dial: Dial = connect_spliced) -> None:
        self.link = link
        self._connectTarget = dial  # how a dispatched session's target is connected
        self.size = size
        self.state = PoolState.OFF if size <= 0 else PoolState.DOWN
        self.reason = "fast_path_pool = 0" if size <= 0 else ""
        self.data_port = 0
        self.data_host = ""  # the address the link is connected to
        self.dispatchable: frozenset[tuple[str, int]] = frozenset()
        self.budget = RefillBudget(link.clock, size)
        self._credits = 0  # dials owed for validly dispatched connections (free)
        self.burst = BurstLog(link.clock, REFILL_WINDOW, self._logFirst, self._logMore)
        self.idle: set[PoolConnection] = set()
        self.dialing = 0
        self.stash: list[tuple[bytes, float]] = []  # tokens not dialled yet, with expiry
        self._conn: LinkConnection | None = None
        self._asking = False
        self._retry: IDelayedCall | None = None
        self._soon: IDelayedCall | None = None  # REFILL_AFTER_USE's timer
        self.counters = SessionCounters()  # every spliced session of the pool
        self._ready: list[defer.Deferred[None]] = []
        self.dial_failures = 0
        self.failures = 0  # connections that ended without a valid dispatch

    # link life

    def linkUp(self, conn: LinkConnection) -> None:
        if self.size <= 0:
            return
        if not self._services():  # a user's link, or public ports only: nothing to splice
            self.state, self.reason = PoolState.OFF, "no named remote forwards to splice"
            return
        host = peer_ip(conn)
        if host is None:
            self.state = PoolState.OFF
            self.reason = ("the link is not a plain TCP connection to an IP address (TLS or "
                           "a proxy: the data port is not reachable that way)")
            return
        self._conn = conn
        self.data_host = host
        self.state = PoolState.STARTING
        self.stash = []
        # The first fill is free; the budget is for replacing connections lost
        # without a valid dispatch.
        self._credits = self.size
        self.refill()

    def linkDown(self) -> None:
        self._conn = None
        if self.size > 0:
            self.state = PoolState.DOWN
        self._cancelRetry()
        self.burst.stop()
        for pc in list(self.idle):
            pc.transport.loseConnection()
        self.idle.clear()

    def stop(self) -> None:
        self.linkDown()
        for pair in list(self.counters.pairs):
            pair.abort()

    def _cancelRetry(self) -> None:
        for call in (self._retry, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._soon = None

    def _services(self) -> list[tuple[str, int]]:
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
        if conn is None or self.state in (PoolState.OFF, PoolState.UNSUPPORTED,
                                          PoolState.UNAVAILABLE):
            return
        want = self.size - len(self.idle) - self.dialing
        now = self.link.clock.seconds()
        self.stash = [(t, exp) for t, exp in self.stash if exp > now + 1.0]
        while want > 0 and self.stash:
            if self._credits > 0:
                self._credits -= 1
            elif not self.budget.take():
                self._later(self.budget.wait())  # failures spent the budget: later
                return
            self._dial(self.stash.pop()[0])
            want -= 1
        if want <= 0 or self._asking or self._retry is not None:
            return
        self._asking = True
        offered = self._services()
        d = conn.sendGlobalRequest(fw.POOL_REQUEST,
                                   fw.pack_pool_request(self.size, offered), wantReply=1)
        d.addCallbacks(self._granted, self._refused, callbackArgs=(conn, offered),
                       errbackArgs=(conn,))

    def _granted(self, data: bytes, conn: LinkConnection,
                 offered: list[tuple[str, int]]) -> None:
        self._asking = False
        if conn is not self._conn:
            return
        try:
            reply = fw.unpack_pool_reply(data)
            tokens = [t for t in reply.tokens if len(t) == fw.TOKEN_LEN]
        except fw.WireError as e:
            self._off(PoolState.UNAVAILABLE, f"the relay answered nonsense: {e}")
            return
        if reply.status is not fw.Status.OK:
            self._off(PoolState.UNAVAILABLE, reply.message)
            return
        # A dispatch is accepted only for what this agent offered AND the relay says it
        # will dispatch (granted, end-to-end encrypted): both crossed the SSH link.
        self.dispatchable = frozenset(offered) & reply.services
        if self.state is not PoolState.READY:
            self._log.info("link {link}: fast path on: {n} data connections to {host} port "
                           "{port} for {services}", event="fast_path_ready",
                           link=self.link.name, n=self.size, host=self.data_host,
                           port=reply.data_port,
                           services=" ".join(sorted(f"{n}:{p}" for n, p in self.dispatchable)))
        self.state = PoolState.READY
        self.reason = ""
        self.data_port = reply.data_port
        waiters, self._ready = self._ready, []
        for d in waiters:
            d.callback(None)
        expires = self.link.clock.seconds() + reply.lifetime
        self.stash.extend((t, expires) for t in tokens)
        self.refill()

    def _refused(self, f: Failure, conn: LinkConnection) -> None:
        self._asking = False
        if conn is not self._conn:
            return
        if refused_by_peer(f):
            self._off(PoolState.UNSUPPORTED, "the server does not offer labrelay's fast path "
                      "(a stock sshd, or an older relay)")
        # else: the link stopped meanwhile; linkUp starts again

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once the relay granted the pool (the demo waits for it)."""
        if self.state is PoolState.READY:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ready.append(d)
        return d

    def _off(self, state: PoolState, why: str) -> None:
        if self.state != state or self.reason != why:
            self._log.info("link {link}: no fast path: {reason}", event="fast_path_off",
                           link=self.link.name, reason=why)
        self.state = state
        self.reason = why

    def _dial(self, token: bytes) -> None:
        self.dialing += 1
        # The address the SSH link is connected to, whose host key was checked: not
        # the relay's name resolved again (a second answer may be someone else's).
        endpoint = client_endpoint(self.link.reactor, self.data_host, self.data_port,
                                   self.link.config.connect_timeout)
        factory = Factory.forProtocol(lambda: PoolConnection(self, token))
        factory.noisy = False

        def failed(f: Failure) -> None:
            self.dialing -= 1
            self.dial_failures += 1
            self._log.warn("link {link}: cannot dial the data port {host}:{port}: {reason}",
                           event="fast_path_dial_failed", link=self.link.name,
                           host=self.data_host, port=self.data_port,
                           reason=f.getErrorMessage())
            self._later()

        endpoint.connect(factory).addErrback(failed)

    def _later(self, delay: float = RETRY_DELAY) -> None:
        if self._retry is None and self._conn is not None:
            def again() -> None:
                self._retry = None
                self.refill()

            self._retry = self.link.clock.callLater(max(delay, 0.01), again)

    def connected(self, pc: PoolConnection) -> None:
        self.dialing -= 1
        if self._conn is None:
            pc.transport.loseConnection()
            return
        self.idle.add(pc)

    def lost(self, pc: PoolConnection, was: PoolConnState) -> None:
        if was in (PoolConnState.CHALLENGE, PoolConnState.IDLE) and pc in self.idle:
            self.idle.discard(pc)
            # Closed without a valid dispatch: the relay refused our ticket, or
            # someone on the path closed it.  Replaced within the refill budget.
            self._failed("closed before a valid dispatch" if was is PoolConnState.IDLE
                         else "closed before the relay's challenge")

    def protocolError(self, pc: PoolConnection, why: str) -> None:
        self.idle.discard(pc)
        pc.state = PoolConnState.CLOSED
        pc.transport.abortConnection()
        self._failed(why)

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.burst.failed(why)
        self._later(self.budget.wait() if self.budget.wait() > 0 else RETRY_DELAY)

    def _logFirst(self, why: str) -> None:
        self._log.warn("link {link}: a data connection to {host}:{port} ended without a valid "
                       "dispatch: {why}; replacing at most {n} per {window:g}s",
                       event="fast_path_protocol", link=self.link.name, host=self.data_host,
                       port=self.data_port, why=why, n=self.size, window=REFILL_WINDOW)

    def _logMore(self, count: int, why: str) -> None:
        self._log.warn("link {link}: {count} more data connections ended without a valid "
                       "dispatch in {window:g}s (last: {why})", event="fast_path_protocol_burst",
                       link=self.link.name, count=count, why=why, window=REFILL_WINDOW)

    # a session

    def _refillAfterUse(self) -> None:
        """Replace a connection the relay just used REFILL_AFTER_USE later (one timer for
        a burst), so that its dial and the relay's accept, challenge and hello check do
        not run during this session's set-up on the same cores; at once, as before, when
        less than half the pool is idle (a session finding none takes the link)."""
        if len(self.idle) * 2 < self.size:
            self.refill()
        elif self._soon is None or not self._soon.active():
            self._soon = self.link.clock.callLater(REFILL_AFTER_USE, self._refillDue)

    def _refillDue(self) -> None:
        self._soon = None
        self.refill()

    def _forwardFor(self, name: str, port: int) -> Any:
        """The forward for exactly ``name:port`` (name case-insensitive, port exact), if
        this agent offered it and the relay listed it as one it dispatches; never a
        public-port forward, never one matched by port alone."""
        name = name.lower()
        if (name, port) not in self.dispatchable:
            return None
        for f in self.link.remote:
            if (f.config.bind.lower() == name and f.config.bind not in PUBLIC_BINDS
                    and f.matches(name, port)):
                return f
        return None

    def dispatched(self, pc: PoolConnection, name: str, port: int) -> None:
        """A GO whose MAC was right: the relay asked for ``name:port``."""
        self.idle.discard(pc)
        self._credits = min(self._credits + 1, self.size)  # the relay used it: replace it
        self._refillAfterUse()
        forward = self._forwardFor(name, port)
        local = self.link.local_relay
        if forward is None or (forward.config.via_relay and (
                local is None or not local.dataport.spliceable(forward.config.connect.host,
                                                               forward.config.connect.port))):
            self._log.warn("link {link}: the relay dispatched {service}, which this agent did "
                           "not offer as end-to-end encrypted: refused",
                           event="fast_path_dispatch_refused", link=self.link.name,
                           service=f"{name[:64]}:{port}")
            self._fail(pc, name, port, "no such end-to-end encrypted forward on this agent")
            return
        # The link's cap counts dispatched sessions as it counts channels: the relay
        # replaces each data connection it uses, so they have no bound of their own.
        slot = self.link.admitSession(forward.name)
        if isinstance(slot, str):
            self._fail(pc, name, port, slot)
            return
        target = forward.config.connect
        d: defer.Deferred[Handed | End]
        if forward.config.via_relay and local is not None:  # (checked above)
            # Chaining: one of the service's own agent's data connections at this
            # node's relay, answered K; this session is then spliced through to it.
            d = local.dataport.pairLocal(target.host, target.port)
        else:
            connecting: defer.Deferred[Any] = self._connectTarget(  # of a Held, in this turn
                self.link.reactor, target.host, target.port, Held, TARGET_CONNECT_TIMEOUT)
            d = connecting

        def connected(server: Handed | End) -> None:
            slot.connected()
            if pc.state is not PoolConnState.CONNECTING:
                slot.release()
                _abort(server)
                return
            write_now(pc.transport, (fw.AGENT_OK,))  # now, not a reactor turn later

            def ended(pair: datapath.SplicedPair, result: Any) -> None:
                slot.release()
                if isinstance(result, Failure) and not result.check(datapath.PairAborted):
                    self._log.debug("forward {forward}: spliced session ended: {reason}",
                                    event="fast_path_session_error", forward=forward.name,
                                    reason=result.getErrorMessage())

            try:
                join(datapath.get(self.link.reactor), pc, server,
                     (forward.counters, self.counters, OnEnd(ended)))
            except (OSError, TypeError) as e:
                self._log.error("forward {forward}: cannot splice: {reason}",
                                event="fast_path_splice_failed", forward=forward.name,
                                reason=str(e))
                slot.release()
                pc.transport.abortConnection()
                _abort(server)
                return
            pc.state = PoolConnState.SPLICED

        def failed(f: Failure) -> None:
            slot.release()
            self.link.targetUnreachable(forward.name, str(target), f.getErrorMessage())
            self._fail(pc, name, port, f"connect to {target} failed: {f.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    def _fail(self, pc: PoolConnection, name: str, port: int, why: str) -> None:
        if pc.state is PoolConnState.CLOSED:
            return
        pc.transport.write(fw.pack_error(fw.AGENT_ERROR, why))
        pc.transport.loseConnection()

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "size": self.size,
            "data_port": self.data_port or None,
            "idle": len(self.idle),
            "dialing": self.dialing,
            **self.counters.as_dict(),
            "dial_failures": self.dial_failures,
            "failures": self.failures,
            "data_host": self.data_host or None,
            "dispatchable": sorted(f"{n}:{p}" for n, p in self.dispatchable),
        }


