"""``Link``: one persistent SSH link to an upstream server and the forwards it carries.

The link is a ``ClientService`` (capped, jittered backoff; it never gives up, at
boot or later).  A connection attempt only counts as connected once the host
key was verified, a key was accepted and the ``ssh-connection`` service runs
(``prepareConnection``); then every reverse forward is requested and waiting
local connections are released.  When the link is lost — the server went away,
or keepalives found it dead — forwards go down and the service reconnects.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.conch.ssh import keys
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.agent.chaining import LocalRelay
from relay.agent.datapool import DataPool
from relay.agent.forwards import ForwardState, LocalForwardListener, RemoteForwardRunner
from relay.config.schema import LinkConfig, LocalForward, RemoteForward
from relay.core.backoff import retry_policy
from relay.core.burstlog import BurstLog, PerKeyLog
from relay.core.clock import expire
from relay.core.resume import HELLO, pack_hello, unpack_hello_reply
from relay.core.sessioncap import SessionCap, SessionSlot
from relay.datapath.bridge import Bridge, TCPSide
from relay.ssh.channels import BridgedChannel
from relay.ssh.client import LinkConnection, LinkSetupError, LinkTransport, transport_factory
from relay.ssh.earlydata import EarlyIntake
from relay.ssh.hostkeys import HostKeyVerifier
from relay.ssh.openerrors import refused_by_peer
from relay.ssh.resumable import ResumableSessions
from relay.ssh.wire import EARLY_DATA_OK, EARLY_LIMIT, pack_early_data_ok
from relay.transport.dial import Dialer, route_of

KEYS_REFUSED_RETRY = 10.0
"""Seconds at least before the next attempt after the server refused every key.  A
refused key does not start working by itself (an admin has to act), and each failed
login charges the agent's address a penalty at the relay (5 s by default, as sshd 9.8+
does) which, once past 15 s, refuses every connection from that address, the lab
mates' laptops behind the same NAT included.  Attempts twice the penalty apart never
add up to that; a key put back is used within this delay."""

CANCEL_TIMEOUT = 2.0

UNHELD_REVOKE_WINDOW = 10.0
UNHELD_REVOKE_LINES = 32
"""``grant-revoked@labrelay`` for registrations the agent does not hold (only a
confused or compromised relay sends them): this many warnings per window in full,
then one line with the count, as the relay's own refusals (relay.core.burstlog)."""


SESSION_CAP_WINDOW = 10.0
"""Sessions refused over the link's cap (relay.core.sessioncap) are logged one line at
the first, then one count line per this many seconds while they go on: only a relay
that opens more than a lab uses (confused, or taken over) reaches the cap, and it could
do so in a loop."""

UNREACHABLE_WINDOW = 10.0
"""Connects to a forward's target that failed (``target_unreachable``) are logged one
line at the first of a burst, with its reason, then one count line per this many
seconds while they go on, per forward's target: a relay taken over (or a busy lab
whose host died) opening sessions to a dead target made one warning per connect,
about 13 a second at the default ``max_connecting`` (round 19's red team)."""


class LinkState(StrEnum):
    """A link as ``status`` shows it: trying to connect (after a backoff delay or
    during a handshake), up, or down (stopped, or lost until the next attempt)."""

    DOWN = "down"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class LinkDown(Exception):
    """The link was not ready within the time a new local connection may wait."""


class _LostBeforeReady:
    """The factory ``ClientService`` gives its endpoint, with one Twisted trap closed.

    ``ClientService`` wraps each protocol in a proxy that reports its loss to the
    service's state machine, and that machine has no transition for a loss while
    ``prepareConnection`` (our SSH handshake) is still pending: a relay that closes
    the connection mid-handshake (restarting, an HTTP proxy giving up, a refused
    key) first fails the attempt through ``prepareConnection`` — the service moves
    to its retry wait, as it should — and then the proxy's loss report raises
    ``automat.NoTransition`` out of ``connectionLost``, which the reactor logs as a
    critical "Unhandled Error" with a traceback on every such attempt.  The report
    carries nothing the failed attempt has not already said, so it is dropped in
    exactly that case; a loss after the link was up still reaches the service.
    """

    def __init__(self, factory: Any, link: Link) -> None:
        self._factory = factory
        self._link = link

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        proto = self._factory.buildProtocol(addr)
        notify = getattr(proto, "_lostNotification", None)
        if proto is not None and callable(notify):
            link = self._link

            def lost(reason: Failure) -> None:
                try:
                    notify(reason)
                except NoTransition:
                    link.log.debug("link {link}: lost during the handshake (already "
                                   "counted as a failed attempt)", link=link.name)

            proto._lostNotification = lost
        return proto  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)  # doStart, doStop, ... of the real one


class _LoggingEndpoint:
    """Logs each connection attempt, so an operator sees the link trying; the dialer
    picks the route (plain SSH, TLS, a proxy: relay.transport.dial) and logs it."""

    def __init__(self, link: Link, dialer: Dialer) -> None:
        self._link = link
        self._dialer = dialer

    def connect(self, factory: Factory) -> defer.Deferred[IProtocol]:
        self._link.state = LinkState.CONNECTING
        route = self._dialer.current
        self._link.log.info(
            "link {link}: connecting to {host}:{port}",
            event="link_connecting", link=self._link.name,
            host=route.host, port=route.port, route=str(route),
        )
        d = self._dialer.connect(_LostBeforeReady(factory, self._link))  # type: ignore[arg-type]
        return d.addErrback(self._failed)

    def _failed(self, f: Failure) -> Failure:
        """No connection at all (refused, unreachable, a proxy's refusal or silence):
        the attempt failed as much as one whose handshake did, and ``status`` must say
        why rather than show the link "connecting" with no error for as long as the
        network keeps it out."""
        if not f.check(defer.CancelledError):  # not the service stopping mid-attempt
            self._link.attemptFailed(f.getErrorMessage())
        return f


class Link(MultiService):
    """One upstream SSH server, its reverse forwards and its local forwards."""

    log = Logger()
    #: Host keys the server announces are learned into known_hosts once proven, as
    #: ssh's UpdateHostKeys (relay.ssh.client.LinkConnection._hostKeysAnnounced).
    learnHostKeys = True

    def __init__(
        self,
        config: LinkConfig,
        reactor: Any,
        identities: list[keys.Key],
        on_fatal: Callable[[str], object] | None = None,
        local_relay: LocalRelay | None = None,
        session_debug: bool = True,
    ) -> None:
        super().__init__()
        self.local_relay = local_relay
        # Whether a session's opening and healthy close are logged at debug level.
        # Off only when the process's observers drop debug events (labrelay without
        # -v): the event was measured at ~25 us of the agent's turn that opens a
        # session after an idle gap, spent on an event nobody prints.
        self.session_debug = session_debug
        self.setName(f"link:{config.name}")
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.identities = identities
        self.verifier = HostKeyVerifier(config.host_key, config.host, config.port)
        self.state = LinkState.DOWN
        self.since = reactor.seconds()
        self.last_error: str | None = None
        self.connects = 0  # times the link came up (reconnects: all but the first)
        self.last_up: float | None = None
        self.connection: LinkConnection | None = None
        self._on_fatal = on_fatal
        self._waiters: list[tuple[defer.Deferred[LinkConnection], IDelayedCall]] = []
        self._allReady: list[defer.Deferred[None]] = []
        self._keysRefused = False  # the last attempt failed on a refusal of our keys
        policy = self._policy = retry_policy(config.backoff)
        self.remote = [RemoteForwardRunner(self, fwd, policy) for fwd in config.remote]
        # A relay names what it revokes: a compromised one could name registrations we
        # never held in a loop, one warning each (2 000 lines for 2 000 requests).
        self._unheldRevokes = PerKeyLog(reactor, UNHELD_REVOKE_WINDOW, UNHELD_REVOKE_LINES,
                                        self._moreUnheldRevokes)
        self.local = [LocalForwardListener(self, fwd) for fwd in config.local]
        # The agent's own cap on the sessions the relay opens, channels and fast-path
        # dispatches together (docs/security.md, "The agent against a relay it trusted").
        self.sessions = SessionCap(config.max_sessions, config.max_connecting,
                                   config.max_sessions_per_target)
        self._capRefusals = BurstLog(reactor, SESSION_CAP_WINDOW, self._capRefused,
                                     self._moreCapRefused)
        # Failed connects, one burst log per (forward, target): keys are the link's
        # own forward names and targets, never a peer's string.
        self._unreachable: dict[tuple[str, str], BurstLog] = {}
        self.pool = DataPool(self, config.fast_path_pool)
        # Sessions held across a broken link to a labrelay relay (docs/resilience.md).
        self.resume: ResumableSessions | None = ResumableSessions(
            reactor, config.resume_grace, f"link {config.name}")
        self.instance = secrets.token_bytes(16)  # this agent process, told to the relay
        self._relayInstance: bytes | None = None  # the relay process we last resumed with
        for listener in self.local:
            listener.setServiceParent(self)

        def logged_policy(failures: int) -> float:
            delay = policy(failures)
            # (read once: an attempt that fails before its SSH handshake, a network
            # failure, does not pass through _prepare to set it again)
            refused, self._keysRefused = self._keysRefused, False
            if refused and delay < KEYS_REFUSED_RETRY:
                delay = KEYS_REFUSED_RETRY
                self.log.info(
                    "link {link}: reconnecting in {delay:.2f}s (attempt {failures}; the "
                    "server refused our keys, so not sooner: each failed login costs this "
                    "address a penalty at the relay)", event="link_retry", link=self.name,
                    delay=delay, failures=failures, keys_refused=True,
                )
                return delay
            self.log.info(
                "link {link}: reconnecting in {delay:.2f}s (attempt {failures})",
                event="link_retry", link=self.name, delay=delay, failures=failures,
            )
            return delay

        self.dialer = Dialer(reactor, config)
        factory = transport_factory(self)
        self.client = ClientService(
            _LoggingEndpoint(self, self.dialer),  # type: ignore[arg-type]
            factory,
            retryPolicy=logged_policy,
            clock=reactor,
            prepareConnection=self._prepare,
        )
        self.client.setServiceParent(self)

    # connection life

    def _prepare(self, proto: Any) -> defer.Deferred[None]:
        route = route_of(proto)

        def up(conn: LinkConnection) -> None:
            if route is not None:
                self.dialer.worked(route)
            self._linkUp(conn)

        def failed(f: Failure) -> Failure:
            self.dialer.failed(route, f.getErrorMessage())
            self._keysRefused = isinstance(f.value, LinkSetupError) and f.value.keys_refused
            self.attemptFailed(f.getErrorMessage())
            return f

        return proto.ready.addCallbacks(up, failed)

    def attemptFailed(self, why: str) -> None:
        """A connection attempt ended before the link was ready (``why``): the link is
        down, ``status`` shows why, and ``link_failed`` says it."""
        self.last_error = why
        self.state = LinkState.DOWN
        self.log.warn(
            "link {link}: attempt failed: {reason}",
            event="link_failed", link=self.name, reason=why,
        )

    def _linkUp(self, conn: LinkConnection) -> None:
        self._keysRefused = False
        self.connection = conn
        self.state = LinkState.CONNECTED
        self.since = self.last_up = self.reactor.seconds()
        self.connects += 1
        self.last_error = None
        peer = conn.link_transport.tcp.getPeer()
        route = conn.link_transport.transport_route
        self.log.info(
            "link {link}: connected to {host}:{port} as {user} ({route})",
            event="link_connected", link=self.name, host=self.config.host,
            port=route.port if route is not None else self.config.port,
            user=self.config.user, route=str(route),
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
        )
        self._takeEarly(conn)  # first: the relay must know before it opens our sessions
        self._hello(conn)
        for forward in self.remote:
            forward.linkUp(conn)
        self.pool.linkUp(conn)
        self.forwardReady()
        waiters, self._waiters = self._waiters, []
        for d, timer in waiters:
            timer.cancel()
            d.callback(conn)

    def _takeEarly(self, conn: LinkConnection) -> None:
        """Say ``early-data-ok@labrelay``: a labrelay relay then sends a session's first
        bytes with its open, before our confirmation (relay.ssh.earlydata); a stock
        server ignores it (no reply wanted)."""
        conn.early = EarlyIntake(EARLY_LIMIT)
        conn.sendGlobalRequest(EARLY_DATA_OK, pack_early_data_ok(EARLY_LIMIT), wantReply=0)

    def _hello(self, conn: LinkConnection) -> None:
        """Say ``resume@labrelay``; a labrelay relay answers with its instance and the
        held sessions are offered to it; a stock server refuses, and nothing held can
        be resumed there.  A relay with another instance id restarted: what it held is
        gone, so are our held sessions (reset)."""
        resume = self.resume
        if resume is None or not resume.enabled:
            return
        d = conn.sendGlobalRequest(HELLO, pack_hello(self.instance), wantReply=1)

        def answered(data: bytes) -> None:
            if self.connection is not conn:
                return
            try:
                instance, _grace = unpack_hello_reply(data)
            except ValueError:
                self._cannotResume("the relay's resume hello reply is malformed")
                return
            conn.resumable = True
            if self._relayInstance is not None and instance != self._relayInstance:
                self._cannotResume("the relay restarted (a relay restart is not resumable)")
            self._relayInstance = instance
            resume.resumeOver(conn, self.config.window, self.config.max_packet)

        def refused(f: Failure) -> None:
            if self.connection is conn and refused_by_peer(f):
                self._cannotResume("the server does not resume sessions (not a labrelay "
                                   "relay, or resume_grace = 0 there)")

        d.addCallbacks(answered, refused)

    def _cannotResume(self, why: str) -> None:
        if self.resume is None:
            return
        n = self.resume.end_all(why)
        if n:
            self.log.warn("link {link}: {n} held session(s) reset: {why}",
                          event="link_resume_impossible", link=self.name, n=n, why=why)

    def linkLost(self, transport: LinkTransport, why: str) -> None:
        """Called by the transport of a ready link when it closes."""
        if self.connection is None or self.connection.link_transport is not transport:
            return
        self.connection = None
        self.state = LinkState.DOWN
        self.since = self.reactor.seconds()
        self.last_error = why
        for forward in self.remote:
            forward.linkDown()
        self.pool.linkDown()
        held = len(self.resume.held_sides()) if self.resume is not None else 0
        if self.running:
            self.log.warn("link {link}: lost: {reason}", event="link_lost", link=self.name,
                          reason=why, held=held)
        else:  # stopped (the process, or a reload that removed or restarts the link):
            # this link will not come back to resume them, so their targets end now.
            self._cannotResume("the link was stopped")

    def whenReady(self, timeout: float) -> defer.Deferred[LinkConnection]:
        """The ready connection, waiting up to ``timeout`` seconds for one."""
        if self.connection is not None:
            return defer.succeed(self.connection)
        d: defer.Deferred[LinkConnection] = defer.Deferred()

        def expire() -> None:
            self._waiters = [(w, t) for (w, t) in self._waiters if w is not d]
            d.errback(LinkDown(f"link {self.name} is down and did not come back within "
                               f"{timeout:g}s (last error: {self.last_error or 'none'})"))

        self._waiters.append((d, self.clock.callLater(timeout, expire)))
        return d

    def whenAllReady(self) -> defer.Deferred[None]:
        """Fires once every reverse forward is granted on a connected link."""
        d: defer.Deferred[None] = defer.Deferred()
        self._allReady.append(d)
        self.forwardReady()
        return d

    def forwardReady(self) -> None:
        if self.connection is None or any(f.state is not ForwardState.READY
                                          for f in self.remote):
            return
        waiters, self._allReady = self._allReady, []
        for d in waiters:
            d.callback(None)

    def grantRevoked(self, bind: str, port: int, why: str) -> None:
        """The relay dropped registration ``bind:port``: its grant was revoked."""
        runners = [f for f in self.remote if f.matches(bind, port)
                   and f.config.bind.lower() == bind.lower()]
        if not runners and self._unheldRevokes.allow(str(self.name), f"{bind}:{port}: {why}"):
            self.log.warn(
                "link {link}: the relay revoked {bind}:{port}, which we do not hold: {reason}",
                event="forward_revoked", link=self.name, forward=None, bind=bind, port=port,
                reason=why,
            )
        for runner in runners:
            runner.revoked(why)

    def _moreUnheldRevokes(self, _key: str, count: int, last: str) -> None:
        self.log.warn(
            "link {link}: the relay revoked {count} more registrations we do not hold in "
            "the last {window:.0f}s (not logged one by one; the last: {last})",
            event="forward_revoked", link=self.name, forward=None, count=count,
            window=UNHELD_REVOKE_WINDOW, last=last,
        )

    def admitSession(self, forward: str) -> SessionSlot | str:
        """A place for one more session the relay opens to ``forward`` (a channel or a
        fast-path dispatch), or why not: over the link's cap it is refused, and logged
        once per burst (:data:`SESSION_CAP_WINDOW`)."""
        admitted = self.sessions.admit(forward)
        if isinstance(admitted, str):
            self._capRefusals.failed(f"{forward}: {admitted}")
        return admitted

    def _capRefused(self, why: str) -> None:
        self.log.warn(
            "link {link}: a session the relay opened was refused: {reason}; more are "
            "counted, not logged one by one, for {window:.0f}s",
            event="session_cap", link=self.name, reason=why, count=1,
            window=SESSION_CAP_WINDOW,
        )

    def _moreCapRefused(self, count: int, last: str) -> None:
        self.log.warn(
            "link {link}: {count} more sessions the relay opened were refused over the "
            "cap in the last {window:.0f}s (the last: {reason})",
            event="session_cap", link=self.name, reason=last, count=count,
            window=SESSION_CAP_WINDOW,
        )

    def targetUnreachable(self, forward: str, target: str, reason: str) -> None:
        """A connect to ``forward``'s ``target`` failed (for a channel or a fast-path
        dispatch): logged once per burst per target (:data:`UNREACHABLE_WINDOW`), the
        first with its reason, then how many more and the last reason."""
        key = (forward, target)
        burst = self._unreachable.get(key)
        if burst is None:
            def first(why: str) -> None:
                self.log.warn(
                    "forward {forward}: cannot reach {target}: {reason} (more failures "
                    "to it are counted, not logged one by one, for {window:.0f}s)",
                    event="target_unreachable", link=self.name, forward=forward,
                    target=target, reason=why, count=1, window=UNREACHABLE_WINDOW)

            def more(count: int, last: str) -> None:
                self.log.warn(
                    "forward {forward}: {count} more connects to {target} failed in the "
                    "last {window:.0f}s (the last: {reason})",
                    event="target_unreachable", link=self.name, forward=forward,
                    target=target, reason=last, count=count, window=UNREACHABLE_WINDOW)

            burst = self._unreachable[key] = BurstLog(self.clock, UNREACHABLE_WINDOW,
                                                      first, more)
        burst.failed(reason)

    def reconfigure(self, config: LinkConfig) -> None:
        """A reload changed only live settings (relay.config.diff.LINK_LIVE)."""
        self.config = config
        self.sessions.reconfigure(config.max_sessions, config.max_connecting,
                                  config.max_sessions_per_target)
        self.log.info(
            "link {link}: max_sessions = {max_sessions}, max_sessions_per_target = "
            "{max_sessions_per_target}, max_connecting = {max_connecting} (sessions open "
            "now: {open})", event="link_reconfigured", link=self.name,
            max_sessions=config.max_sessions, max_connecting=config.max_connecting,
            max_sessions_per_target=config.max_sessions_per_target,
            open=self.sessions.open,
        )

    def remoteForwardFor(self, host: str, port: int) -> RemoteForwardRunner | None:
        candidates = [f for f in self.remote if f.matches(host, port)]
        if len(candidates) > 1:
            candidates = [f for f in candidates if f.config.bind == host] or candidates[:1]
        return candidates[0] if candidates else None

    def sessionStarted(
        self,
        forward: RemoteForwardRunner | LocalForwardListener,
        side: TCPSide | BridgedChannel,
        channel: Any,
        origin: str,
        slot: SessionSlot | None = None,
    ) -> Bridge:
        """Bridge a session's two sides; ``slot``, the session's place in the link's
        cap, is given back when the bridge closes."""
        counters = forward.counters
        counters.opened()
        bridge: Bridge | None = None  # None only while it is made (both sides may have ended)

        def ended(a_to_b: int, b_to_a: int) -> None:
            if slot is not None:
                slot.release()
            local = isinstance(forward, LocalForwardListener)  # here: one cell less a session
            to_target, from_target = (a_to_b, b_to_a) if local else (b_to_a, a_to_b)
            counters.closed(to_target, from_target)
            # A target that was sent bytes and answered none is worth a line without -v:
            # it is what a session that "got EOF and nothing back" looks like from here,
            # and ``ended`` says whose end it was (the target's EOF or reset, the relay's
            # EOF or close).
            if to_target and not from_target and not local:
                log = self.log.info
            elif self.session_debug:
                log = self.log.debug
            else:
                return
            how = ("before it was bridged" if bridge is None
                   else bridge.endedBy("client" if local else "target", "relay"))
            log("forward {forward}: session from {origin} closed "
                "({to_target} bytes in, {from_target} out; {ended} first)",
                event="session_closed", link=self.name, forward=forward.name, origin=origin,
                to_target=to_target, from_target=from_target, ended=how)

        if self.session_debug:
            self.log.debug(
                "forward {forward}: session from {origin}", event="session_open",
                link=self.name, forward=forward.name, origin=origin,
            )
        bridge = made = Bridge(side, channel, onClosed=ended)
        return made

    def openRelayService(self, name: str, port: int,
                         origin: str) -> defer.Deferred[BridgedChannel]:
        """A channel to ``name:port`` registered at this node's relay (chaining)."""
        if self.local_relay is None:
            return defer.fail(LinkDown(f"{name}:{port} is a relay service, but this node "
                                       "runs no [relay]"))
        d: defer.Deferred[BridgedChannel] = self.local_relay.openLocal(name, port, origin)
        return d

    # a reload (relay.ops.reload): forwards added and removed on a running link

    def addForward(self, config: LinkConfig, forward: RemoteForward | LocalForward) -> None:
        """Carry ``forward`` from now on (requested at once if the link is up);
        ``config`` is the link's reloaded config, which lists it."""
        self.config = config
        if isinstance(forward, RemoteForward):
            runner = RemoteForwardRunner(self, forward, self._policy)
            self.remote.append(runner)
            if self.connection is not None:
                runner.linkUp(self.connection)
            return
        listener = LocalForwardListener(self, forward)
        self.local.append(listener)
        listener.setServiceParent(self)

    def removeForward(self, config: LinkConfig,
                      forward: RemoteForward | LocalForward) -> defer.Deferred[Any]:
        """Stop carrying ``forward``: a remote one is cancelled on the server, a local
        one stops listening.  Its sessions already open run until they end."""
        self.config = config
        if isinstance(forward, RemoteForward):
            for runner in [f for f in self.remote if f.config == forward]:
                self.remote.remove(runner)
                return runner.cancel()
            return defer.succeed(None)
        for listener in [f for f in self.local if f.config == forward]:
            self.local.remove(listener)
            return defer.maybeDeferred(listener.disownServiceParent)  # type: ignore[arg-type]
        return defer.succeed(None)

    def fatal(self, why: str) -> None:
        if self._on_fatal is not None:
            self._on_fatal(why)

    # shutdown

    def stopService(self) -> defer.Deferred[None]:
        """Cancel forwards on the server, say goodbye, then stop reconnecting."""
        conn = self.connection
        self.pool.stop()
        self._unheldRevokes.stop()
        self._capRefusals.stop()
        for burst in self._unreachable.values():
            burst.stop()
        cancels = [f.cancel() for f in self.remote]
        for d, timer in self._waiters:
            timer.cancel()
            d.errback(LinkDown(f"link {self.name} is stopping"))
        self._waiters = []

        def disconnect(_: object) -> defer.Deferred[None]:
            if conn is not None and self.connection is conn:
                conn.link_transport.sendDisconnect(DISCONNECT_BY_APPLICATION,
                                                   b"labrelay stopping")
            return defer.maybeDeferred(super(Link, self).stopService)  # type: ignore[arg-type]

        done: defer.Deferred[Any] = defer.DeferredList(cancels)
        return expire(done, CANCEL_TIMEOUT, self.clock).addBoth(disconnect)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "server": f"{self.config.host}:{self.config.port}",
            "route": str(self.dialer.winner or self.dialer.current),
            "user": self.config.user,
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "connects": self.connects,
            "reconnects": max(0, self.connects - 1),
            "last_up": self.last_up,
            "forwards": [f.status() for f in self.remote] + [f.status() for f in self.local],
            "fast_path": self.pool.status(),
            **self.sessions.status(),
            "held_sessions": self.resume.status() if self.resume is not None else [],
        }
