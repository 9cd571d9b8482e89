"""The relay's sessions: reaching a service, the fast path's rows, bridging, closing.

Part of :class:`relay.server.relay.RelayCore` (it inherits :class:`SessionOpening`):
a user's ``direct-tcpip`` checked against the router and the user's cap, waiting for
its service's agent (``public_wait``), opened on the agent's link or a pooled data
connection, then bridged and metered in the session table; the fast path's spliced
pairs counted the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.conch import error
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.config.schema import RelayConfig
from relay.core.burstlog import PerKeyLog
from relay.core.earlyopen import EarlyPhase, EarlySession, after_open, confirms_early
from relay.core.peertext import shown
from relay.core.router import Refused, Router
from relay.core.routing import Registration, Registry
from relay.core.sessions import POOLED, SPLICED, Meter, SessionRow, SessionTable
from relay.datapath.bridge import Bridge, Side
from relay.datapath.join import PairCounters
from relay.datapath.splicing import SplicedPair
from relay.server import audit
from relay.server.dataconn import PairingError
from relay.server.dataport import DataPort
from relay.server.grants import Grants
from relay.server.pooled import log_pooled, open_user_side
from relay.server.sharing import Sharing
from relay.server.waiting import Waiting
from relay.ssh.channels import BridgedChannel
from relay.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED
from relay.ssh.earlydata import EarlyFeed
from relay.ssh.openerrors import failure_text
from relay.ssh.resumable import ResumableSessions, ResumableSide
from relay.ssh.server import OPEN_RESOURCE_SHORTAGE, RelayConnection

_OPEN_FAILURE = {
    Refused.PROHIBITED: OPEN_ADMINISTRATIVELY_PROHIBITED,
    Refused.CAP: OPEN_RESOURCE_SHORTAGE,
    Refused.NO_SERVICE: OPEN_CONNECT_FAILED,
}
"""The SSH open-failure code for each reason the router refuses a user session."""


class SessionOpening:
    """How :class:`~relay.server.relay.RelayCore` opens, bridges and ends sessions
    (a mixin: its methods use the core's registry, router, sessions and sharing)."""

    # What RelayCore.__init__ sets, for the type checker (class-body annotations only).
    _log: Logger
    refusalLog: PerKeyLog
    config: RelayConfig
    grants: Grants
    reactor: Any
    registry: Registry
    router: Router
    connections: set[RelayConnection]
    sessions: SessionTable
    _aborts: dict[SessionRow, Callable[[], None]]
    counters: dict[str, int]
    waiting: Waiting
    dataport: DataPort
    resume: ResumableSessions
    sharing: Sharing
    setupLog: audit.SetupLog
    abortSession: Callable[[SessionRow, str], None]

    # reaching a service

    def whenRegistered(self, name: str, port: int, timeout: float,
                       row: SessionRow | None = None) -> defer.Deferred[Registration]:
        """``name:port``'s registration once its agent knows it holds it, waiting up to
        ``timeout`` seconds for its agent (relay.server.waiting); ``row``'s wait ends at
        once if the relay closes it meanwhile (a grants reload)."""
        return self.waiting.whenRegistered(name, port, timeout, row)

    def openUserSession(self, conn: RelayConnection, host: str, port: int, origin: str,
                        channel: BridgedChannel) -> defer.Deferred[BridgedChannel] | BridgedChannel:
        """A user's ``direct-tcpip`` to ``host:port``: ``channel`` once the agent's side
        is open (the user's confirmation waits for it), or ``channel`` itself at once
        (confirmed now, :meth:`_openEarly`) for a healthy service whose agent is here."""
        ident = conn.identity
        principal = self.grants.principal_for(ident.key_blob, ident.login)
        host = host.lower()
        service = f"{host}:{port}"

        def refuse(code: int, why: str) -> defer.Deferred[BridgedChannel]:
            return defer.fail(error.ConchError(self._refused(ident, service, why), code))

        active = 0 if principal is None else self.sessions.active_for_user(principal.name)
        owner = self.grants.owner_of(host)
        refused = self.router.admit_session(principal, host, port, active,
                                            self.config.max_sessions_per_user, owner)
        if refused is not None:
            return refuse(_OPEN_FAILURE[refused[0]], refused[1])
        assert principal is not None
        session = self.sessions.open(principal.name, service, origin, self.reactor.seconds(),
                                     key=ident.key_blob, login=ident.login,
                                     totals_as=self.router.totals_name(owner, host, port))
        reg = self.waiting.ready(host, port)
        if reg is not None and confirms_early(self.config.early_confirm, reg.open_health,
                                              _live(reg.session)):
            return self._openEarly(ident, reg, port, origin, channel, session)
        d = self.whenRegistered(host, port, self.config.public_wait, session)
        d.addCallback(lambda reg: self._agentSide(reg, port, origin, session))
        # After the open left for the agent, and written a little later (audit.SetupLog
        # says why and why that is safe).
        self.setupLog.later(session, lambda: audit.opened(session))

        def connected(agent_channel: Side) -> BridgedChannel:
            self.sharing.tag(channel, principal.name)

            def not_opened(_: object) -> None:
                agent_channel.abort()
                self.sessionEnded(session, 0, 0, "user channel did not open")

            def opened(ch: BridgedChannel) -> Bridge:
                # The user's confirmation has left (FlowConnection._confirmOpen sends it
                # before channelOpen): what is only logged waits until now.
                bridge = self.bridge(session, ch, agent_channel)
                if session.path == POOLED:
                    self.setupLog.later(session, lambda: log_pooled(session))
                return bridge

            channel.opened.addCallbacks(opened, not_opened)
            return channel

        def failed(f: Failure) -> defer.Deferred[BridgedChannel]:
            self.sessionEnded(session, 0, 0, "agent unavailable")
            # The agent's own words go to the user's client, which may print them to
            # her terminal: shown as printable text, bounded (relay.core.peertext).
            why = session.closing or ("its agent did not come back within "
                   f"{self.config.public_wait:g}s") if f.check(defer.CancelledError) else (
                f"its agent could not connect it: {shown(failure_text(f))}")
            return refuse(OPEN_CONNECT_FAILED, f"service {service} unavailable: {why}")

        return d.addCallbacks(connected, failed)

    def _openEarly(self, ident: Any, reg: Registration, port: int, origin: str,
                   channel: BridgedChannel, session: SessionRow) -> BridgedChannel:
        """Confirm the user's channel now and open the agent's side in the same turn
        (its open leaves first: it is the critical path); the user's first bytes wait in
        the channel (``BridgedChannel._early``, bounded by the window it advertises: no
        window is re-opened until the bridge hands them on) and go to the agent's side
        when it opens, or, on the pooled route, follow the GO on the data connection as
        they arrive (relay.server.pooled: the agent holds them until its target is
        connected), still held here until its ``K``.  If that fails, or the relay ends
        the session first (a grants reload), the user's channel is closed: EOF, then
        close (docs/relay.md)."""
        # On the link, the agent's channel, before it answered, to an agent that takes
        # early bytes (relay.ssh.earlydata): her bytes go on as they arrive, so the agent
        # writes them to the target once connected, not after its answer crossed back
        # and the relay's next turn.  Only as the stream's prefix: none if some of hers
        # are held already (the pooled route fell back to the link).  On the pooled
        # route her bytes follow the GO (``early=channel``).  Either way the channel's
        # early sink (BridgedChannel.sendHeldTo) until its bridge takes over.
        feed = EarlyFeed(self.counters)

        def pending(agent_channel: BridgedChannel) -> None:
            feed.pending(agent_channel, channel.holding)
            channel.sendHeldTo(feed)

        d = self._agentSide(reg, port, origin, session, pending,
                            early=channel)  # first: the critical path
        early = EarlySession()
        self.sharing.tag(channel, session.user)

        def end(why: str, confirmed: bool = True) -> None:
            feed.stop()
            if early.end(why):
                if confirmed:
                    channel.endUnbridged()
                self.sessionEnded(session, 0, 0, why)

        def audited(result: Any) -> Any:
            # After the user's confirmation left (FlowConnection._confirmOpen, in this
            # turn), and written a little later (audit.SetupLog): off the path of the
            # agent's open, its answer and the user's first bytes; flushed before
            # anything else is logged about the session.
            self.setupLog.later(session, lambda: audit.opened(session, early=True))
            if isinstance(result, Failure):
                end("user channel did not open", confirmed=False)
                result = None
            else:
                channel.onClosedUnbridged = user_left
            d.addCallbacks(connected, failed)  # so the agent's answer acts after this
            return result

        def user_left(clean: bool) -> None:
            # Her channel closed (or her connection went) before the agent answered:
            # the row ends now, not when (or if) the agent answers, which then finds
            # the session closed and aborts its side.
            feed.stop()
            if early.user_closed():
                self._aborts.pop(session, None)
                self.sessionEnded(session, 0, 0, "user left before the agent answered",
                                  ended="user closed" if clean else "user reset")

        # Until the bridge takes over (abortSession): a grants reload ends it now.
        self._aborts[session] = lambda: end(session.closing or "closed by the relay")

        def connected(agent_side: Side) -> None:
            if not early.agent_opened():
                agent_side.abort()  # ended meanwhile: nothing to carry
                return
            self._aborts.pop(session, None)
            channel.onClosedUnbridged = None  # the bridge hears of her close now
            feed.stop()  # (the bridge stops the channel's sink, whichever it is)
            self.bridge(session, channel, agent_side)
            if session.path == POOLED:
                self.setupLog.later(session, lambda: log_pooled(session))

        def failed(f: Failure) -> None:
            if early.phase is not EarlyPhase.HOLDING:
                return
            self.setupLog.flush(session)  # its session_open first
            why = self._refused(ident, session.service, f"service {session.service} "
                                f"unavailable: its agent could not connect it: "
                                f"{failure_text(f)}", early=True)
            end(why)

        channel.opened.addBoth(audited)
        return channel

    def _agentSide(self, reg: Registration, port: int, origin: str, session: SessionRow,
                   onPending: Callable[[BridgedChannel], object] | None = None,
                   early: BridgedChannel | None = None) -> defer.Deferred[Side]:
        """The agent's side of ``session`` (relay.server.pooled; ``early``: the user's
        channel, confirmed now), the answer noted in the registration's open health
        (relay.core.earlyopen); ``onPending`` as in :meth:`RelayConnection.openForwarded`."""
        def noted(result: Any) -> Any:
            reg.open_health = after_open(reg.open_health, not isinstance(result, Failure))
            return result

        return open_user_side(self, reg, port, origin, session, onPending,
                              early).addBoth(noted)

    def _refused(self, ident: Any, service: str, why: str, early: bool = False) -> str:
        """Count and log a user session refused (or, confirmed early, closed): ``why``."""
        self.counters["sessions_refused"] += 1
        # Per key, not per name: the holders of a shared account (a lab login several
        # students' keys or certificates log in as, or one cert-authority line's many
        # certificates) are one name, and one of them refused in a loop used up the
        # allowance of all: the others' refusals were only counted, under her last reason.
        key = audit.key_fingerprint(getattr(ident, "key_blob", None))
        if self.refusalLog.allow(f"{ident.kind} {ident.name} {key}", why):
            self._log.warn(
                "{kind} {name}: refused session to {service}: {why}",
                event="relay_session_refused", kind=ident.kind, name=ident.name,
                service=service, why=why, early=early, key=key,
            )
        return why

    def _moreRefused(self, who: str, count: int, why: str) -> None:
        """The refusals :meth:`_refused` did not log in the window that just ended."""
        kind, _, rest = who.partition(" ")
        name, _, key = rest.rpartition(" ")
        self._log.warn(
            "{kind} {name}: {count} more sessions refused in the last {window:.0f}s "
            "with key {key} (not logged one by one; the last: {why})",
            event="relay_session_refused", kind=kind, name=name, count=count,
            window=self.refusalLog.window, why=why, service="", early=False, key=key,
        )

    def openLocal(self, name: str, port: int, origin: str) -> defer.Deferred[BridgedChannel]:
        """A channel to registered service ``name:port`` for this node's own use.

        Chaining: this node's link re-exports a service registered here to an
        upstream relay.  The node's config authorizes it, so no user grant applies;
        the service must be granted to an agent here, and its agent gets the usual
        ``public_wait`` to come back.
        """
        name = name.lower()
        if (self.registry.lookup(name, port) is None
                and not self.router.may_appear(self.grants.owner_of(name), name, port)):
            return defer.fail(error.ConchError(f"no service {name}:{port} on this relay",
                                               OPEN_CONNECT_FAILED))
        d = self.whenRegistered(name, port, self.config.public_wait)
        return d.addCallback(lambda reg: self.openToAgent(reg, port, origin))

    def openToAgent(self, reg: Registration, port: int, origin: str,
                    session: SessionRow | None = None,
                    onPending: Callable[[BridgedChannel], object] | None = None,
                    ) -> defer.Deferred[BridgedChannel]:
        host, _, oport = origin.rpartition(":")
        agent: Any = reg.session
        if session is not None:
            session.agent = agent
        d: defer.Deferred[BridgedChannel] = agent.openForwarded(reg.bind, port, host,
                                                                int(oport or 0), onPending)
        if session is not None:
            d.addCallback(self.sharing.tagAgentChannel, session.user)
        return d

    # the fast path's sessions (relay.server.dataport pairs them)

    def fastSessionOpening(self, principal: Any, service: str, origin: str,
                           key: bytes | None = None, login: str = "") -> SessionRow:
        """Count a fast-path session against the user's cap, or raise PairingError."""
        refused = self.router.over_cap(principal, self.sessions.active_for_user(principal.name),
                                       self.config.max_sessions_per_user)
        if refused is not None:
            self.counters["sessions_refused"] += 1
            raise PairingError(refused[1])
        name, _, port = service.rpartition(":")
        totals_as = self.router.totals_name(self.grants.owner_of(name), name, int(port))
        row = self.sessions.open(principal.name, service, origin, self.reactor.seconds(),
                                 path=SPLICED, key=key, totals_as=totals_as, login=login)
        audit.opened(row)
        return row

    def fastSessionWaiting(self, session: SessionRow, cancel: Callable[[], None]) -> None:
        """``cancel`` stops ``session``'s pairing (its wait for the agent, a free data
        connection or the agent's answer) until it moves bytes: :meth:`abortSession`
        (a grants change) calls it, as it aborts a moving session's bridge."""
        if session in self.sessions:
            self._aborts[session] = cancel

    def fastSessionCounters(self, session: SessionRow, agent: Any = None) -> PairCounters:
        """What counts ``session``'s spliced pair: its row (the pair's counts are its
        meter, aborting the pair closes it) and, when the pair ends, its closing."""
        return _SplicedRow(self, session, agent)

    def fastSessionFailed(self, session: SessionRow) -> None:
        self.sessionEnded(session, 0, 0, "fast path pairing failed")

    def bridge(self, session: SessionRow, user_side: Any, agent_side: Side) -> Bridge:
        limiter = self.sharing.limiter(session.user, user_side)
        # One cell for every closure here (per-session memory): None only while the
        # Bridge is being made, when both sides may already have ended.
        bridge: Bridge | None = None

        def ended(to_service: int, from_service: int) -> None:
            if limiter is not None:
                limiter.release()  # type: ignore[attr-defined]
            if bridge is None:
                self.sessionEnded(session, to_service, from_service, "bridge closed")
            else:  # its agent side (b) may have been carried by the native thread
                self.sessionEnded(session, to_service, from_service, "bridge closed",
                                  native=getattr(bridge.b, "nativeSession", None),
                                  ended=bridge.endedBy("user", "service"))

        def abort() -> None:
            if bridge is not None:
                bridge.a.abort()
                bridge.b.abort()

        def meter() -> tuple[int, int]:
            return (0, 0) if bridge is None else (bridge.bytesAtoB, bridge.bytesBtoA)

        bridge = made = Bridge(user_side, agent_side, onClosed=ended, onData=limiter)
        if isinstance(agent_side, ResumableSide):
            agent_side.row = session
        self._moving(session, meter, abort)
        return made

    def _moving(self, session: SessionRow, meter: Meter, abort: Callable[[], None],
                agent: Any = None) -> None:
        """``session``'s bytes move now: the table reads them through ``meter``, and
        ``abort`` stops them."""
        if session not in self.sessions:
            return
        self._aborts[session] = abort
        if not self.sessions.moving(session, meter, agent):
            abort()  # its grant went while it was opening or being paired

    def sessionEnded(self, session: SessionRow, to_service: int, from_service: int,
                      why: str, native: Mapping[str, int] | None = None,
                      ended: str | None = None) -> None:
        """``session`` is over: its row closed, its ``session_close`` logged (with what
        the native thread carried of it, ``native``, on a pooled route, and which side
        began the end, ``ended``, for a bridged session)."""
        self._aborts.pop(session, None)
        self.setupLog.flush(session)  # its session_open (if still held) comes first
        if self.sessions.close(session, self.reactor.seconds(), to_service, from_service, why):
            audit.closed(session, native, ended)


def _live(agent: Any) -> bool:
    """``agent``'s link can carry an open now (connected, its service not stopped)."""
    return getattr(agent, "transport", None) is not None and not getattr(agent, "_stopped", False)


class _SplicedRow:
    """A fast-path session's row, counting its spliced pair (:class:`PairCounters`)."""

    def __init__(self, core: SessionOpening, session: SessionRow, agent: Any) -> None:
        self.core, self.session, self.agent = core, session, agent
        self._unlimit: Callable[[], None] | None = None

    def pairStarted(self, pair: SplicedPair) -> None:
        def meter() -> tuple[int, int]:
            moved = pair.bytes()
            return moved.a_to_b, moved.b_to_a

        # The user's rate limit, if any: the pump pauses the direction in debt.
        self._unlimit = self.core.sharing.limitSpliced(
            self.session.user, meter, lambda up, down: pair.pause(up, down))
        self.core._moving(self.session, meter, pair.abort, self.agent)

    def pairEnded(self, pair: SplicedPair, result: Any) -> None:
        if self._unlimit is not None:
            self._unlimit()
            self._unlimit = None
        moved = pair.bytes()
        self.core.sessionEnded(self.session, moved.a_to_b, moved.b_to_a, "spliced pair done")
