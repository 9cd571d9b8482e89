"""The relay's end of the fast path: tokens over SSH, a data port, pairing, splicing.

DESIGN §2.3: for a service declared end-to-end encrypted (``e2e_services``), a
user granted it asks over SSH for a one-time ticket (``data-token-v2@labrelay``);
its data connection proves it holds the ticket at the data port (an HMAC over the
relay's fresh nonce: the secret never crosses the data port); an idle connection
the service's agent dialled beforehand (``data-pool-v2@labrelay`` tickets, proved
the same way) is dispatched to the service with a GO MAC'd with that connection's
own ticket secret; once the agent says its target is connected, the relay splices
the two sockets (:mod:`relay.datapath.splicing`) and never sees a byte again.

Every check happens before a byte reaches the agent: the proof (see
:mod:`relay.core.tokens`), the user's grant (again: grants may have been reloaded), the
user's session cap, and that the agent which pooled the connection still holds the
service and offered it as end-to-end encrypted.  A data connection that does not
send its hello within ``data_hello_timeout`` is closed.  Who may connect at all is
:mod:`relay.core.admission`'s data-port gate: per-source and global caps on connections
still owing their hello, and penalties (shared with the SSH port) for a refused
proof, a bad hello, a hello timeout or a close before the hello.

The wire format is in :mod:`relay.core.fastwire`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from enum import Enum
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from relay.config.schema import RelayConfig
from relay.core import fastwire as fw
from relay.core.admission import Admission, Offence, Refusal, Stage, eviction_reason
from relay.core.admission import Ticket as AdmissionTicket
from relay.core.burstlog import BurstLog
from relay.core.clock import expire
from relay.core.routing import Registration, Registry
from relay.core.tokens import Refusal as TokenRefusal
from relay.core.tokens import TokenBook, TokenRefused, TooManyTokens
from relay.datapath import splicing as datapath
from relay.datapath.join import PairCounters, join
from relay.datapath.net import LISTEN_BACKLOG, probe_idle
from relay.server.acceptwatch import name_listener
from relay.server.dataconn import (
    AgentConnectionGone,
    AgentPool,
    DataConnection,
    DataState,
    PairingError,
)
from relay.server.grants import Grants
from relay.ssh.server import RelayConnection

POOL_TOKEN_LIFETIME = 30.0
MAX_POOL_PER_AGENT = 64
MAX_TOKENS_PER_REQUEST = 16
AGENT_REPLY_TIMEOUT = 15.0  # the agent's own target connect timeout is 10 s
CAP_LOG_WINDOW = 10.0
"""Seconds per burst of connections dropped at the global cap (``relay_unauth_cap``,
``relay_data_cap``): the first is logged in full, the rest as one count line."""
MAX_DISPATCH_TRIES = 3  # pooled connections found dead at dispatch before giving up
# Token refusals that penalise the source (authfail): those a guesser or forger gets.
# The others (expired, session gone, wrong role or service) need a real token's secret:
# an honest client that was late, not an attack.
GUESSED = frozenset({TokenRefusal.MALFORMED, TokenRefusal.UNKNOWN, TokenRefusal.WRONG})


class Wait(Enum):
    """What a dispatch waits for, in order: its agent registered, one of the agent's
    pooled connections free, that connection's answer to the GO."""

    REGISTRATION = "registration"
    POOL = "pool"
    AGENT = "agent"


class RelayForDataPort(TypingProtocol):
    """What the data port needs of the relay (:class:`relay.server.relay.RelayCore`):
    settings, clock, grants, registrations, live connections and the session table."""

    @property
    def config(self) -> RelayConfig: ...

    @property
    def reactor(self) -> Any: ...

    @property
    def grants(self) -> Grants: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def connections(self) -> Collection[RelayConnection]: ...

    def fastSessionOpening(self, principal: Any, service: str, origin: str,
                           key: bytes | None = None, login: str = "") -> Any:
        """Count a fast-path session against the user's cap, or raise PairingError."""

    def fastSessionCounters(self, session: Any, agent: Any = None) -> PairCounters:
        """What counts the session's spliced pair until it ends."""

    def fastSessionFailed(self, session: Any) -> None:
        """The session counted by fastSessionOpening never started."""

    def fastSessionWaiting(self, session: Any, cancel: Callable[[], None]) -> None:
        """Until the session moves bytes or ends, ``cancel`` stops its pairing: a grants
        change that takes the service away ends the wait at once."""

    def whenRegistered(self, name: str, port: int, timeout: float,
                       row: Any = None) -> defer.Deferred[Registration]:
        """The registration of ``name:port``, waiting up to ``timeout`` for one (a wait
        of ``row``: a grants change ends it)."""


def _why_no_pool(session: Any) -> str:
    """Why an agent session offered no data connections, as far as the relay can tell:
    an agent keeps them only over a plain TCP link (it dials the data port at the
    address of its link), so a link that came in on the TLS port says so; otherwise
    the agent turned the fast path off (``fast_path_pool = 0``) or is older."""
    ssh_transport = getattr(session, "transport", None)
    if isinstance(getattr(ssh_transport, "transport", None), TLSMemoryBIOProtocol):
        return ("its link to the relay comes over TLS, and an agent keeps data "
                "connections only on a plain TCP link: docs/networks.md, the fast path")
    return "fast path off there, or an older agent"


class DataPort:
    """The data port of one relay, with its tokens and the agents' pools."""

    _log = Logger()

    def __init__(self, core: RelayForDataPort, admission: Admission | None = None) -> None:
        self.core = core
        self.config = core.config
        self.clock = core.reactor
        self.hello_timeout = core.config.data_hello_timeout
        self.tokens = TokenBook(self.clock, core.config.token_lifetime,
                                max_per_session=core.config.max_tokens_per_session,
                                max_per_principal=core.config.max_tokens_per_user)
        # The relay passes the admission it shares with its SSH port.
        self.admission = admission or Admission(core.config, self.clock)
        self.gate = self.admission.gate("data", core.config.max_unauthenticated)
        # relay_data_cap: the first drop at the global cap of each burst, then a count
        self.capLog = BurstLog(self.clock, CAP_LOG_WINDOW, self._firstCapDrop,
                               self._moreCapDrops)
        # relay_data_evicted: connections closed at the full cap to admit a source
        # holding fewer places (relay.core.admission), the same way
        self.evictLog = BurstLog(self.clock, CAP_LOG_WINDOW, self._firstEviction,
                                 self._moreEvictions)
        self.pools: dict[Any, AgentPool] = {}
        self.pending: set[DataConnection] = set()
        self.listener: IListeningPort | None = None
        self.counters = {"data_connections": 0, "data_refused": 0, "data_throttled": 0,
                         "data_evicted": 0,
                         "paired": 0, "pair_failed": 0, "paired_local": 0,
                         "pooled": 0, "native_runs": 0, "native_bytes": 0,
                         "native_sealed": 0, "native_yields": 0}

    @property
    def enabled(self) -> bool:
        return self.config.data_port is not None

    @property
    def bound_port(self) -> int:
        if self.listener is None:
            return 0
        return int(self.listener.getHost().port)  # type: ignore[attr-defined]

    def start(self) -> None:
        if self.config.data_port is None:
            return
        factory = Factory.forProtocol(lambda: DataConnection(self))
        factory.noisy = False
        bind = self.config.data_bind or self.config.public_bind
        self.listener = self.clock.listenTCP(self.config.data_port, factory,
                                             backlog=LISTEN_BACKLOG, interface=bind)
        name_listener(self.listener, "data")
        self.tokens.start()
        self._log.info("fast path: data port {port} on {bind}", event="relay_data_port",
                       port=self.bound_port, bind=bind)

    def stop(self) -> defer.Deferred[Any] | None:
        self.tokens.stop()
        self.capLog.stop()
        self.evictLog.stop()
        for pool in list(self.pools.values()):
            pool.close()
        self.pools.clear()
        listener, self.listener = self.listener, None
        if listener is not None:
            return defer.maybeDeferred(listener.stopListening)  # type: ignore[call-overload]
        return None

    # --- SSH side: tokens ------------------------------------------------------

    def e2e(self, name: str, port: int) -> bool:
        return any(g.matches(name, port) for g in self.config.e2e_services)

    def tokenRequest(self, conn: RelayConnection, data: bytes) -> tuple[bool, bytes]:
        """``data-token-v2@labrelay`` from a user: a ticket, or why not."""
        try:
            name, port = fw.unpack_token_request(data)
        except fw.WireError:
            return False, b""
        name = name.lower()
        service = f"{name}:{port}"

        def answer(status: fw.Status, why: str, token: bytes = b"") -> tuple[bool, bytes]:
            if status is not fw.Status.OK:
                self._log.info("{name}: no fast path to {service}: {why}",
                               event="relay_token_refused", name=conn.principal_name,
                               service=service, why=why, status=status.name)
            return True, fw.pack_token_reply(status, why, self.bound_port, token,
                                             self.tokens.lifetime if token else 0.0)

        principal = self.core.grants.principal_for(conn.identity.key_blob,
                                                   conn.identity.login)
        if principal is None:
            return answer(fw.Status.REFUSED, "this key is no longer granted")
        if principal.kind != "user" or not principal.may_reach(name, port):
            return answer(fw.Status.REFUSED,
                          f"{service} is not granted to {principal.kind} {principal.name}")
        if not self.enabled or self.listener is None:
            return answer(fw.Status.UNAVAILABLE, "this relay has no data port (fast path off)")
        if not self.e2e(name, port):
            return answer(fw.Status.UNAVAILABLE,
                          f"{service} is not declared end-to-end encrypted on the relay "
                          "(e2e_services)")
        reg = self.core.registry.lookup(name, port)
        if reg is None:
            return answer(fw.Status.UNAVAILABLE, f"{service} is not registered right now")
        pool = self.pools.get(reg.session)
        if pool is None:
            return answer(fw.Status.UNAVAILABLE,
                          f"agent {reg.owner} keeps no data connections "
                          f"({_why_no_pool(reg.session)})")
        if (reg.bind.lower(), port) not in pool.spliceable:
            return answer(fw.Status.UNAVAILABLE,
                          f"agent {reg.owner} cannot splice {service} (a chained service)")
        try:
            token = self.tokens.issue(fw.ROLE_USER, principal.name, conn, (name, port))
        except TooManyTokens as e:
            return answer(fw.Status.UNAVAILABLE, str(e))
        return answer(fw.Status.OK, "", token)

    def poolRequest(self, conn: RelayConnection, data: bytes) -> tuple[bool, bytes]:
        """``data-pool-v2@labrelay`` from an agent: tickets for its idle data connections,
        and which of the services it offered will be dispatched to it."""
        try:
            count, services = fw.unpack_pool_request(data)
        except fw.WireError:
            return False, b""
        principal = self.core.grants.principal_for(conn.identity.key_blob,
                                                   conn.identity.login)
        if principal is None or principal.kind != "agent":
            return True, fw.pack_pool_reply(fw.Status.REFUSED, "only agents keep data pools")
        if not self.enabled or self.listener is None:
            return True, fw.pack_pool_reply(fw.Status.UNAVAILABLE,
                                            "this relay has no data port (fast path off)")
        pool = self.pools.get(conn)
        if pool is None:
            pool = self.pools[conn] = AgentPool(conn, set())
        # Only what the agent offered, may register, and is declared end-to-end
        # encrypted here is ever dispatched to it; the reply says which, and the agent
        # accepts a dispatch for nothing else.
        pool.spliceable = {(n, p) for n, p in services
                           if principal.may_register(n, p) and self.e2e(n, p)}
        room = MAX_POOL_PER_AGENT - len(pool.idle)
        n = max(0, min(count, MAX_TOKENS_PER_REQUEST, room,
                       self.tokens.room(principal.name, conn)))
        tokens = [self.tokens.issue(fw.ROLE_AGENT, principal.name, conn,
                                    lifetime=POOL_TOKEN_LIFETIME) for _ in range(n)]
        return True, fw.pack_pool_reply(fw.Status.OK, "", self.bound_port, tokens,
                                        POOL_TOKEN_LIFETIME, sorted(pool.spliceable))

    def sessionStopped(self, conn: Any) -> None:
        self.tokens.drop_session(conn)
        pool = self.pools.pop(conn, None)
        if pool is not None:
            pool.close()

    # --- the data port -----------------------------------------------------------

    def admit(self, dc: DataConnection) -> bool:
        self.counters["data_connections"] += 1
        verdict = self.gate.admit(dc.source, owner=dc)
        if verdict is Refusal.GLOBAL:
            self.counters["data_refused"] += 1
            self.capLog.failed(dc.source)  # counted each, logged once per burst
            return False
        if not isinstance(verdict, AdmissionTicket):  # penalised, or its source's cap is full
            self.counters["data_throttled"] += 1
            return False
        dc.admission = verdict
        self.pending.add(dc)
        victim = verdict.take_displaced()
        if victim is not None:  # the cap was full: a source holding more gives way
            self.counters["data_evicted"] += 1
            self.evictLog.failed(f"{victim.source} {dc.source} {eviction_reason(victim)}")
            if isinstance(victim.owner, DataConnection):
                self.pending.discard(victim.owner)
                victim.owner.evict()
        return True

    def _firstEviction(self, what: str) -> None:
        source, peer, why = what.split(" ", 2)
        self._log.warn("data port: closed a connection owing its hello of {source}, {why}, "
                       "to admit {peer}: {n} still owe their hello (max_unauthenticated)",
                       event="relay_data_evicted", source=source, peer=peer, why=why,
                       n=self.gate.total, count=1)

    def _moreEvictions(self, count: int, what: str) -> None:
        source, peer, why = what.split(" ", 2)
        self._log.warn("data port: closed {count} more connections owing their hello in the "
                       "last {window:.0f}s to admit others, the last of {source}, {why}, "
                       "for {peer} (max_unauthenticated)",
                       event="relay_data_evicted", source=source, peer=peer, why=why,
                       n=self.gate.total, count=count, window=self.evictLog.window)

    def _firstCapDrop(self, source: str) -> None:
        self._log.warn("data port: dropping a connection from {source}: {n} still owe "
                       "their hello (max_unauthenticated)", event="relay_data_cap",
                       source=source, n=self.gate.total, count=1)

    def _moreCapDrops(self, count: int, source: str) -> None:
        self._log.warn("data port: dropped {count} more connections in the last "
                       "{window:.0f}s, the last from {source}: {n} still owe their hello "
                       "(max_unauthenticated)", event="relay_data_cap", source=source,
                       n=self.gate.total, count=count, window=self.capLog.window)

    def helloStarted(self, dc: DataConnection) -> None:
        """``dc`` sent the first bytes of its hello: at the full cap it keeps its place
        for ``[relay.crowding] handshake`` seconds, not ``silent``."""
        if dc.admission is not None:
            self.gate.advance(dc.admission, Stage.HANDSHAKE)

    def _release(self, dc: DataConnection, offence: Offence | None = None) -> None:
        """``dc`` no longer owes its hello; ``offence`` penalises its source."""
        self.pending.discard(dc)
        if dc.admission is not None:
            self.gate.closed(dc.admission, offence)

    def refuse(self, dc: DataConnection, what: str, why: str, *,
               failure: bool | Offence = False, tell: str | None = None) -> None:
        """Close ``dc``; ``failure`` penalises its source (``True``: a refused token,
        ``authfail``; or the :class:`Offence`)."""
        self._release(dc, Offence.AUTHFAIL if failure is True else failure or None)
        self.counters["data_refused"] += 1
        self._log.warn("data port: refused a connection from {source}: {why}",
                       event="relay_data_refused", source=dc.source, what=what, why=why)
        if dc.state is not DataState.CLOSED:
            dc.state = DataState.CLOSED
            if tell is not None:
                dc.transport.write(fw.pack_error(fw.USER_ERROR, tell))
                dc.transport.loseConnection()
            else:
                dc.transport.abortConnection()

    def helloReceived(self, dc: DataConnection, hello: fw.Hello) -> None:
        self._release(dc)
        alive: Callable[[Any], bool] = lambda s: s in self.core.connections  # noqa: E731
        role = hello.role
        try:
            ticket = self.tokens.redeem(role, hello.token_id, dc.nonce, hello.proof, alive,
                                        hello.service)
        except TokenRefused as e:
            self.refuse(dc, "token", f"{'user' if role == fw.ROLE_USER else 'agent'} token "
                        f"refused: {e.why.value}", failure=e.why in GUESSED,
                        tell=f"token refused: {e.why.value}" if role == fw.ROLE_USER else None)
            return
        if role == fw.ROLE_AGENT:
            pool = self.pools.get(ticket.session)
            if pool is None or len(pool.idle) >= MAX_POOL_PER_AGENT:
                self.refuse(dc, "pool", f"agent {ticket.principal}: pool full or gone")
                return
            why = self._addressRefusal(ticket.session, dc.source)
            if why is not None:
                self.refuse(dc, "address", f"agent {ticket.principal}: {why}")
                return
            dc.state = DataState.IDLE
            dc.pool = pool
            dc.ticket = ticket
            probe_idle(dc.transport)
            if dc.extra:
                self.refuse(dc, "protocol", "an agent data connection sent bytes after hello")
                return
            dc.resume()  # only to notice when it closes
            pool.put(dc)
            return
        dc.state = DataState.USER
        # The user's side gets the same probes as the pool's: once spliced, no SSH
        # keepalive watches this hop, and a user who vanished without FIN or RST (a
        # laptop closed or off the network) left an idle session spliced at the relay,
        # the agent and the target for good; the probes find it in about a minute and
        # the pump ends it with a reset.
        probe_idle(dc.transport)
        assert ticket.service is not None
        why = self._addressRefusal(ticket.session, dc.source)
        if why is not None:
            self.refuse(dc, "address", f"user {ticket.principal}: {why}",
                        tell=f"this key may not be used from {dc.source}")
            return
        self._pairUser(dc, ticket.principal, ticket.service, ticket.session)

    def _addressRefusal(self, owner: RelayConnection, source: str) -> str | None:
        """Why a data connection from ``source`` may not use a ticket ``owner``'s SSH
        login obtained, or None.  The login's address limits (``from=`` on its grant or
        CA line, a certificate's ``source-address``) hold for its data connections too:
        a ticket is a bearer secret, and one that leaked (or a login made from an
        allowed network handing its tickets elsewhere) must not reach the data port
        from an address the key may not log in from.  From the login's own address
        nothing is re-checked (it passed at login); from another, the login's checks run
        again with that address, as sshd would at a login from there."""
        ident = owner.identity
        if source == ident.address:
            return None
        verdict = self.core.grants.authenticate(ident.key_blob, ident.login, source)
        return None if verdict.principal is not None else verdict.reason

    def lost(self, dc: DataConnection, was: DataState) -> None:
        # closed before its hello: a NOAUTH offence
        self._release(dc, Offence.NOAUTH if was is DataState.HELLO else None)
        if dc.pool is not None:  # an idle one, or one refused (state already "closed")
            try:
                dc.pool.idle.remove(dc)
            except ValueError:
                pass

    # --- pairing -------------------------------------------------------------------

    def _pairUser(self, user: DataConnection, principal_name: str,
                  service: tuple[str, int], asked_by: RelayConnection) -> None:
        name, port = service
        label = f"{name}:{port}"
        # Grants are looked up again: a key revoked since the token was issued is refused.
        principal = self.core.grants.principal_for(asked_by.identity.key_blob,
                                                   asked_by.identity.login)
        if principal is None or not principal.may_reach(name, port):
            self.refuse(user, "grant", f"{principal_name} is no longer granted {label}",
                        tell=f"{label} is not granted to you")
            return
        try:
            session = self.core.fastSessionOpening(principal, label, f"{user.source}",
                                                   key=asked_by.identity.key_blob,
                                                   login=asked_by.identity.login)
        except PairingError as e:
            self.refuse(user, "cap", str(e), tell=str(e))
            return
        def wanted() -> bool:  # the user is still there, and the relay did not close it
            return user.state is DataState.USER and session.closing is None

        def paired(agent: DataConnection) -> None:
            counters = self.core.fastSessionCounters(
                session, agent.pool.session if agent.pool else None)
            try:
                join(datapath.get(self.clock), user, agent, (counters,), to_a=fw.USER_OK)
            except (OSError, TypeError) as e:
                agent.transport.abortConnection()
                raise PairingError(f"cannot splice: {e}") from e
            user.state = agent.state = DataState.SPLICED
            self.counters["paired"] += 1
            self._log.info("{user}: fast path to {service} spliced",
                           event="relay_fast_session", user=principal_name, service=label,
                           origin=user.source)

        def failed(f: Failure) -> None:
            self.counters["pair_failed"] += 1
            why = session.closing or f.getErrorMessage()  # a grants change, or the wait
            self.core.fastSessionFailed(session)
            self.refuse(user, "pairing", f"{principal_name} to {label}: {why}",
                        tell=f"{label} unavailable: {why}")

        d = self._dispatch(name, port, wanted, session)
        # Before the callbacks: if it paired at once, _moving's abort replaces this.
        self.core.fastSessionWaiting(session, d.cancel)
        d.addCallbacks(paired, failed).addErrback(failed)

    def pairLocal(self, name: str, port: int) -> defer.Deferred[DataConnection]:
        """An agent data connection to ``name:port`` registered here, dispatched and
        answered ``K``, for this node's own use: chaining, where this node's agent
        splices a fast-path session from an upstream relay to it (the node's config
        authorizes it, as for :meth:`RelayCore.openLocal`).  The caller splices it.

        No shortcut: the service must be declared end-to-end encrypted here, the
        downstream agent must have offered it in its pool request, and the GO to its
        pooled connection is MAC'd like a user's.  This node's agent calls it only for
        a dispatch it verified (relay.agent.datapool)."""
        name = name.lower()
        if not self.enabled or self.listener is None:
            return defer.fail(PairingError(f"this node's relay has no data port for {name}:{port}"))
        if not self.e2e(name, port):
            # The same rule as for a user: only end-to-end encrypted services are
            # spliced, and only to an agent that offered the service as such.
            return defer.fail(PairingError(f"{name}:{port} is not declared end-to-end "
                                           "encrypted on this node's relay"))

        def paired(agent: DataConnection) -> DataConnection:
            self.counters["paired_local"] += 1
            self._log.info("fast path to {service} spliced on for this node's link (chaining)",
                           event="relay_fast_chained", service=f"{name}:{port}")
            return agent

        return self._dispatch(name, port, lambda: True).addCallback(paired)

    def spliceable(self, name: str, port: int) -> bool:
        """Whether :meth:`pairLocal` can serve ``name:port`` (for the chaining agent's
        pool request)."""
        return self.enabled and self.e2e(name.lower(), port)

    def _dispatch(self, name: str, port: int, wanted: Callable[[], bool],
                  row: Any = None) -> defer.Deferred[DataConnection]:
        """One of ``name:port``'s agent's idle connections, sent GO and answered ``K``
        (paused; bytes read past ``K`` in its ``extra``), or PairingError saying which
        wait expired.  One deadline (``public_wait``) covers the agent being registered
        and having a free connection; a pooled connection found closed is replaced, up
        to MAX_DISPATCH_TRIES.  ``wanted()`` false: the requester left; stop.  ``row``:
        the user's session, whose wait for the registration a grants change ends."""
        label = f"{name}:{port}"
        deadline = self.clock.seconds() + self.config.public_wait
        chosen: list[DataConnection] = []
        stage = Wait.REGISTRATION  # what a timeout (CancelledError) ran out waiting for

        def with_registration(reg: Registration) -> defer.Deferred[str]:
            pool = self.pools.get(reg.session)
            if pool is None or (reg.bind.lower(), port) not in pool.spliceable:
                raise PairingError(f"agent {reg.owner} keeps no data connections for {label}")
            return dispatch_next(pool, reg.bind, MAX_DISPATCH_TRIES)

        def dispatch_next(pool: AgentPool, bind: str, tries: int) -> defer.Deferred[str]:
            nonlocal stage
            stage = Wait.POOL
            d = pool.take(self.clock, max(0.0, deadline - self.clock.seconds()))
            d.addCallback(with_agent_conn, bind)

            def stale(f: Failure) -> Any:
                # A pooled connection that died idle (its probes found it, or the
                # relay learns it only now): another one, while tries and time remain.
                if f.check(AgentConnectionGone) and tries > 1 and wanted():
                    return dispatch_next(pool, bind, tries - 1)
                return f

            return d.addErrback(stale)

        def with_agent_conn(agent: DataConnection, bind: str) -> defer.Deferred[str]:
            nonlocal stage
            stage = Wait.AGENT
            chosen.append(agent)
            if not wanted():
                raise PairingError("the user's data connection closed")
            return expire(agent.dispatch(bind, port), AGENT_REPLY_TIMEOUT, self.clock)

        def failed(f: Failure) -> Failure:
            timeouts = {
                Wait.REGISTRATION: f"its agent did not come back within "
                                   f"{self.config.public_wait:g}s",
                Wait.POOL: "no agent data connection became free in time",
                Wait.AGENT: f"the agent did not answer within {AGENT_REPLY_TIMEOUT:g}s",
            }
            for agent in chosen:
                if agent.state is not DataState.CLOSED:
                    agent.transport.abortConnection()
            if f.check(defer.CancelledError):
                return Failure(PairingError(timeouts[stage]))
            return f

        d: defer.Deferred[Any] = self.core.whenRegistered(name, port, self.config.public_wait,
                                                          row)
        d.addCallback(with_registration)
        d.addCallbacks(lambda _: chosen[-1], failed)
        return d

    def status(self) -> dict[str, Any]:
        return {
            "data_port": self.bound_port if self.listener is not None else None,
            "e2e_services": [str(g) for g in self.config.e2e_services],
            "tokens_outstanding": len(self.tokens),
            "tokens_outstanding_by_role": self.tokens.outstanding(),
            "tokens_swept": self.tokens.swept,
            "tokens_issued": dict(self.tokens.issued),
            "tokens_redeemed": dict(self.tokens.redeemed),
            "tokens_refused": {k: v for k, v in self.tokens.refused.items() if v},
            "tokens_capped": self.tokens.capped,
            "pools": {getattr(p.session, "principal_name", "?"): len(p.idle)
                      for p in self.pools.values()},
            "admission": self.gate.status(),
            **self.counters,
        }
