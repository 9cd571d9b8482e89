"""The relay's public ports: a listener per registered public port, whose connections
go to the agent that registered it like any user session (docs/relay.md, "Public
ports").

A connection that arrives while the port's agent is away waits up to ``public_wait``
seconds for it; at most ``max_unauthenticated`` of them wait per port.  The ones
refused past that are logged once per burst and port (``REFUSAL_LOG_WINDOW``): anyone
on the internet can connect and close in a loop, and each was a warning line.

The public ports together hold at most half the process's descriptor limit
(:func:`public_connection_cap`; ``public_max_connections`` may lower it); one more is
closed at accept.  Every public connection is a descriptor of the relay's one process,
which its SSH port needs too: a stranger holding connections to a public port (no key
needed) ran it out of descriptors (``EMFILE``) and no user or agent could connect until
they let go (docs/security.md).

One source (an address, or its ``per_source_netblock4``/``6`` network) holds at most
``public_max_per_source`` connections to one public port; one more is closed at accept,
logged once per burst and port, and counted (``connections_refused_public_per_source``).
Without it one address could take every slot the cap above leaves and lock everyone
else out of a port the agent published for many (a shared Jupyter).  Loopback is not
exempt: a reverse proxy on the relay host that funnels everyone through 127.0.0.1 must
raise the cap (or set 0, no per-source cap), or list 127.0.0.1 in
``public_per_source_exempt``: addresses (a lab's own NAT, a monitoring host) whose
connections count in the total only, never against a source.  That list is its own,
not ``penalty_exempt``: a network is exempted from penalties when its failures are not
attacks, which says nothing of how many connections it may hold, and the docs advise
exempting from penalties a NAT shared with an attacker, who would then get back the
lockout this cap closes (docs/security.md).  All three settings are read at each
accept, so a reload applies them to the next connection.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.config.schema import IPNetwork, RelayConfig
from relay.core.admission import Admission
from relay.core.burstlog import BurstLog
from relay.core.routing import PUBLIC, Registration, Registry
from relay.core.sessions import SessionRow, SessionTable
from relay.datapath.bridge import Bridge, SideFactory, TCPSide
from relay.datapath.net import LISTEN_BACKLOG
from relay.server import audit
from relay.server.acceptwatch import name_listener
from relay.server.grants import Grants
from relay.ssh.channels import BridgedChannel
from relay.ssh.earlydata import EarlyFeed
from relay.ssh.openerrors import failure_text

REFUSAL_LOG_WINDOW = 10.0
"""Seconds of a burst of refused public connections logged as one line, then a count."""
MIN_PUBLIC_CONNECTIONS = 64
"""The cap on open public connections never goes below this (a tiny ``ulimit -n``)."""


def public_connection_cap(configured: int | None = None) -> int:
    """Open public connections allowed in all: half the descriptor limit (read at each
    accept: ``prlimit`` may change it), the other half kept for the SSH port, the data
    port, the agents' links and the admin endpoint.  ``configured``
    (``public_max_connections``) may lower it, never raise it past that half."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    cap = max(MIN_PUBLIC_CONNECTIONS, soft // 2)
    return cap if configured is None else min(cap, configured)


class _PublicSide(TCPSide):
    """A public connection: gives its place back when it ends."""

    released: Callable[[], None] | None = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        done, self.released = self.released, None
        if done is not None:
            done()
        super().connectionLost(reason)


@dataclass(frozen=True)
class PublicSlot:
    """An admitted public connection's place: ``source`` is what it counts against
    (``public_max_per_source``), None for a ``public_per_source_exempt`` address."""

    source: str | None


def per_source_exempt(host: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether a connection from ``host`` is left out of ``public_max_per_source``
    (``[relay] public_per_source_exempt``): its address, an IPv4-mapped IPv6 address as
    IPv4, is in one of ``networks``.  A host that is not an address is not exempt."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class _PublicFactory(SideFactory):
    """A public port's listener: past the cap a connection is closed at accept
    (``buildProtocol`` returns None), before it is bridged or read."""

    def __init__(self, ports: PublicPorts, port: int) -> None:
        super().__init__(lambda side: ports._connection(port, side))
        self.ports, self.port = ports, port

    def buildProtocol(self, addr: Any) -> TCPSide | None:  # type: ignore[override]
        slot = self.ports.admit(self.port, addr)
        if slot is None:
            return None
        side = _PublicSide()
        side.onConnected = self._on_connected
        side.factory = self
        side.released = lambda: self.ports.release(self.port, slot.source)
        return side


class PublicShell(Protocol):
    """What the public ports need of the relay (:class:`relay.server.relay.RelayCore`)."""

    config: RelayConfig
    grants: Grants
    reactor: Any
    registry: Registry
    sessions: SessionTable
    counters: dict[str, int]
    admission: Admission
    setupLog: audit.SetupLog

    def whenRegistered(
        self, name: str, port: int, timeout: float, row: SessionRow | None = None
    ) -> defer.Deferred[Registration]: ...

    def openToAgent(
        self, reg: Registration, port: int, origin: str, session: SessionRow | None = None,
        onPending: Callable[[BridgedChannel], object] | None = None,
    ) -> defer.Deferred[BridgedChannel]: ...

    def sessionEnded(
        self, session: SessionRow, to_service: int, from_service: int, why: str
    ) -> None: ...

    def bridge(self, session: SessionRow, user_side: Any, agent_side: BridgedChannel) -> Bridge: ...


class PublicPorts:
    """The listeners of the public ports, by port number (``listeners``)."""

    _log = Logger()

    def __init__(self, relay: PublicShell) -> None:
        self.relay = relay
        self.listeners: dict[int, IListeningPort] = {}
        self._waiting: dict[int, int] = {}  # connections waiting for their agent
        self._refusals: dict[int, BurstLog] = {}  # per listening port that refused some
        self.open = 0  # public connections open now, all ports (public_connection_cap)
        # open public connections per (port, source): public_max_per_source; a key is
        # dropped when its count reaches 0, so the table holds only open connections
        self.bySource: dict[tuple[int, str], int] = {}
        self.capLog = BurstLog(relay.reactor, REFUSAL_LOG_WINDOW, self._firstCapRefusal,
                               self._moreCapRefusals)
        self._sourceLogs: dict[int, BurstLog] = {}  # per port that refused a source

    def listen(self, port: int) -> bool:
        """Listen on ``port`` (if not already); False if it cannot be bound."""
        if port in self.listeners:
            return True
        config = self.relay.config
        factory = _PublicFactory(self, port)
        try:
            self.listeners[port] = self.relay.reactor.listenTCP(
                port, factory, backlog=LISTEN_BACKLOG, interface=config.public_bind
            )
        except Exception as e:
            self._log.error("cannot listen on public port {port}: {why}",
                            event="relay_public_failed", port=port, why=str(e))
            return False
        name_listener(self.listeners[port], "public")
        self._log.info("public port {port} listening on {bind}", event="relay_public_port",
                       port=port, bind=config.public_bind)
        return True

    def source_of(self, addr: Any) -> str:
        """The source a connection from ``addr`` counts against: its address's network
        (``per_source_netblock4``/``6``), as the SSH port's per-source limits count."""
        source, _ = self.relay.admission.source(str(getattr(addr, "host", "?")))
        return source

    def admit(self, port: int, addr: Any) -> PublicSlot | None:
        """The slot a new connection to public ``port`` takes (counted), or None when
        it must be closed at accept.  A connection from ``public_per_source_exempt``
        counts in the total only, not against its source (read at each accept)."""
        config = self.relay.config
        cap = public_connection_cap(config.public_max_connections)
        origin = f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', 0)}"
        if self.open >= cap:
            self.relay.counters["sessions_refused"] += 1
            self.capLog.failed(f"{port} {origin} {cap}")
            return None
        if per_source_exempt(str(getattr(addr, "host", "")), config.public_per_source_exempt):
            self.open += 1
            return PublicSlot(None)
        source = self.source_of(addr)
        held = self.bySource.get((port, source), 0)
        per_source = config.public_max_per_source
        if per_source and held >= per_source:
            self.relay.counters["sessions_refused"] += 1
            self.relay.counters["connections_refused_public_per_source"] += 1
            self._sourceLog(port).failed(f"{origin} {source} {per_source}")
            return None
        self.open += 1
        self.bySource[(port, source)] = held + 1
        return PublicSlot(source)

    def release(self, port: int, source: str | None) -> None:
        """Give back a slot :meth:`admit` gave (``source``: its :class:`PublicSlot`'s)."""
        self.open -= 1
        if source is None:
            return  # an exempt connection: counted in the total only
        left = self.bySource[(port, source)] - 1
        if left:
            self.bySource[(port, source)] = left
        else:
            del self.bySource[(port, source)]

    def _sourceLog(self, port: int) -> BurstLog:
        log = self._sourceLogs.get(port)
        if log is None:
            def first(what: str) -> None:
                origin, source, cap = what.split(" ")
                self._log.warn(
                    "public port {port}: connection from {origin} closed at accept: {cap} "
                    "connections already open from {source} (public_max_per_source)",
                    event="relay_public_per_source", port=port, origin=origin,
                    source=source, cap=int(cap),
                )

            def more(count: int, what: str) -> None:
                origin, source, cap = what.split(" ")
                self._log.warn(
                    "public port {port}: {count} more connections closed at accept in the "
                    "last {window:.0f}s, the last from {origin}: {cap} connections already "
                    "open from {source} (public_max_per_source)",
                    event="relay_public_per_source", port=port, origin=origin,
                    source=source, cap=int(cap), count=count, window=REFUSAL_LOG_WINDOW,
                )

            log = self._sourceLogs[port] = BurstLog(self.relay.reactor, REFUSAL_LOG_WINDOW,
                                                    first, more)
        return log

    def _firstCapRefusal(self, what: str) -> None:
        port, origin, cap = what.split(" ")
        self._log.warn(
            "public port {port}: connection from {origin} closed at accept: {cap} public "
            "connections open (half the relay's descriptor limit; the rest is kept for "
            "its SSH and data ports)", event="relay_public_cap", port=int(port),
            origin=origin, cap=int(cap),
        )

    def _moreCapRefusals(self, count: int, what: str) -> None:
        port, origin, cap = what.split(" ")
        self._log.warn(
            "public ports: {count} more connections closed at accept in the last "
            "{window:.0f}s, the last to {port} from {origin}: {cap} public connections open",
            event="relay_public_cap", port=int(port), origin=origin, cap=int(cap),
            count=count, window=REFUSAL_LOG_WINDOW,
        )

    def _refusalLog(self, port: int) -> BurstLog:
        log = self._refusals.get(port)
        if log is None:
            cap = self.relay.config.max_unauthenticated

            def first(what: str) -> None:
                origin, owner = what.split(" ", 1)
                self._log.warn(
                    "public port {port}: connection from {origin} refused: {cap} connections "
                    "already waiting for agent {owner} (max_unauthenticated)",
                    event="relay_public_refused", port=port, origin=origin, cap=cap,
                    owner=owner,
                )

            def more(count: int, what: str) -> None:
                origin, owner = what.split(" ", 1)
                self._log.warn(
                    "public port {port}: {count} more connections refused in the last "
                    "{window:.0f}s, the last from {origin}: {cap} connections already "
                    "waiting for agent {owner} (max_unauthenticated)",
                    event="relay_public_refused", port=port, origin=origin, cap=cap,
                    owner=owner, count=count, window=REFUSAL_LOG_WINDOW,
                )

            log = self._refusals[port] = BurstLog(self.relay.reactor, REFUSAL_LOG_WINDOW,
                                                  first, more)
        return log

    def close(self, port: int) -> None:
        """Stop listening on ``port`` (its registration went)."""
        for logs in (self._refusals, self._sourceLogs):
            log = logs.pop(port, None)
            if log is not None:
                log.stop()
        listener = self.listeners.pop(port, None)
        if listener is not None:
            listener.stopListening()

    def stop(self) -> list[defer.Deferred[Any]]:
        """Stop every listener; the Deferreds fire when they have stopped."""
        self.capLog.stop()
        for logs in (self._refusals, self._sourceLogs):
            for log in list(logs.values()):
                log.stop()
            logs.clear()
        listeners = list(self.listeners.values())
        self.listeners.clear()
        return [defer.maybeDeferred(p.stopListening) for p in listeners]  # type: ignore[call-overload]

    def _connection(self, port: int, side: TCPSide) -> None:
        relay = self.relay
        config = relay.config
        peer = side.transport.getPeer()
        origin = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', 0)}"
        reg = relay.registry.lookup(PUBLIC, port)
        owner = reg.owner if reg is not None else (
            p.name if (p := relay.grants.public_port_owner(port)) is not None else "?")
        label = f"public:{port}"
        if self._waiting.get(port, 0) >= config.max_unauthenticated:
            # Only connections still waiting for their agent are capped: they hold a
            # socket here and nothing else, and a flood of them must not pile up while
            # the agent is away.  Established sessions are the target's to limit.
            relay.counters["sessions_refused"] += 1
            self._refusalLog(port).failed(f"{origin} {owner}")
            side.abort()
            return
        session = relay.sessions.open(label, label, origin, relay.reactor.seconds())
        self._waiting[port] = self._waiting.get(port, 0) + 1

        def waited(result: Any) -> Any:
            self._waiting[port] -= 1
            return result

        d = relay.whenRegistered(PUBLIC, port, config.public_wait, session).addBoth(waited)

        # Her first read goes to an agent that takes a session's first bytes before it
        # answered (relay.ssh.earlydata): written to the target once it is connected,
        # not after the agent's answer crossed back.
        feed = EarlyFeed(relay.counters)

        def open_(reg: Any) -> defer.Deferred[Any]:
            side.earlySink = feed
            opening = relay.openToAgent(reg, port, origin, session,
                                        lambda ch: feed.pending(ch, bool(side._early)))
            side.readAhead()  # the user's first bytes, read while the agent connects
            return opening

        def answered(result: Any) -> Any:
            feed.stop()
            side.earlySink = None
            return result

        d.addCallback(open_).addBoth(answered)

        def failed(f: Failure) -> None:
            relay.sessionEnded(session, 0, 0, "agent unavailable")
            self._log.warn(
                "public port {port}: connection from {origin} closed: agent {owner} {why}",
                event="relay_public_refused", port=port, origin=origin, owner=owner,
                why=(session.closing or "did not come back in time")
                if f.check(defer.CancelledError)
                else f"could not connect it ({failure_text(f)})",
            )
            side.close()

        # Logged once the channel open is on its way to the agent (a small packet leaves
        # at once: relay.datapath.net.write_now), and a little later (audit.SetupLog):
        # the event's write is then off the new session's critical path.  Flushed before
        # anything else is logged about the session.
        relay.setupLog.later(session, lambda: audit.opened(session))
        d.addCallbacks(lambda ch: relay.bridge(session, side, ch), failed)
