"""labrelay's relay: named services, per-key grants, public ports, takeover, sharing.

:class:`RelayCore` decides; :mod:`relay.ssh.server` parses SSH and asks it.  How
it opens, bridges and ends sessions is its base :class:`relay.server.opening.SessionOpening`.  The
relay never opens a connection to a host:port on the network: every user session
goes to a *registered service*, i.e. over a channel to the agent that registered
it.  Public ports are listeners on the relay whose connections go the same way.

Sessions that arrive while their service's agent is away (reconnecting) wait up
to ``public_wait`` seconds for it, then are refused cleanly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from relay.config.schema import HostPort, RelayConfig
from relay.core import fastwire
from relay.core.admission import Admission, Offence, Refusal, Stage, Ticket, eviction_reason
from relay.core.burstlog import BurstLog, PerKeyLog
from relay.core.certs import describe as describe_cert
from relay.core.certs import is_certificate
from relay.core.resume import HELLO as RESUME_HELLO
from relay.core.router import SUPERSEDED, Decision, Probe, Router, Verdict, label_of
from relay.core.routing import PUBLIC, Registration, Registry
from relay.core.sessions import SessionRow, SessionTable
from relay.server import audit
from relay.server.dataport import CAP_LOG_WINDOW, DataPort
from relay.server.expiry import KeyExpiry
from relay.server.grantdiff import GrantsChange
from relay.server.grants import Grants, Principal
from relay.server.grantwatch import GrantsWatcher
from relay.server.idle import IdleSweeper
from relay.server.opening import SessionOpening
from relay.server.pooled import close_pooled
from relay.server.public import PublicPorts
from relay.server.resumes import RelayResumes
from relay.server.sharing import Sharing
from relay.server.status import relay_status
from relay.server.waiting import Waiting
from relay.ssh.aead import PACKETS_PER_TURN, CorkGroup
from relay.ssh.hostkeyupdate import HOSTKEYS_PROVE, ProveRefused
from relay.ssh.server import RefusedRequest, RelayConnection, RelayTransport
from relay.ssh.serverauth import Identity
from relay.ssh.turnshare import UserTurnShares
from relay.ssh.wire import EARLY_DATA_OK, unpack_early_data_ok, unpack_forward

TAKEOVER_PROBE = 0.5
REFUSAL_LOG_WINDOW = 10.0
"""Seconds per window of a user's ``relay_session_refused`` lines."""
REFUSAL_LOG_ALLOWANCE = 32
"""A user's refused sessions logged one by one per window and key; past it, one count
line (for that key).  The same for refused requests, and for an agent's registrations
and cancels (``REFUSED_REQUEST``, ``REGISTERED``: the categories RelayCore._logRequest
counts apart)."""
REFUSED_REQUEST = "refused"
REGISTERED = "registered"
REFUSED_CHANNEL = "channel"
"""A channel type the relay does not offer (``relay_channel_refused``), counted apart."""
REFUSED_RESUME = "resume"
"""An agent's resume offer refused (``relay_resume_refused``), counted apart."""


class RelayCore(SessionOpening):
    """The relay's decisions and state; one per relay listener."""

    _log = Logger()

    def __init__(self, config: RelayConfig, grants: Grants, reactor: Any) -> None:
        self.config = config
        self.grants = grants
        self.reactor = reactor
        self.registry = Registry()
        self.router = Router(self.registry, self._principalOf, lambda s: s in self.connections)
        self.connections: set[RelayConnection] = set()
        # Authenticated connections per principal (kind, name): max_connections_per_user.
        self._connectionsOf: Counter[tuple[str, str]] = Counter()
        self.sessions = SessionTable()
        self._aborts: dict[SessionRow, Callable[[], None]] = {}  # stops a moving row's bytes
        self.setupLog = audit.SetupLog(reactor)  # opening events, written after set-up
        # relay_session_refused: REFUSAL_LOG_ALLOWANCE lines per user's key per window in
        # full, then a count (a user refused in a loop must not flood the log, nor use up
        # the allowance of another key logged in under the same name)
        self.refusalLog = PerKeyLog(reactor, REFUSAL_LOG_WINDOW, REFUSAL_LOG_ALLOWANCE,
                                    self._moreRefused)
        # relay_request_refused, relay_service_registered/cancelled: the same allowance
        # per key and window, then a count: a tcpip-forward refused (or granted and
        # cancelled) in a loop was one line per request, thousands a second.
        self.requestLog = PerKeyLog(reactor, REFUSAL_LOG_WINDOW, REFUSAL_LOG_ALLOWANCE,
                                    self._moreRequests)
        # relay_unauth_cap: the first drop at the global cap of each burst, then a count
        self.capLog = BurstLog(reactor, CAP_LOG_WINDOW, self._firstCapDrop, self._moreCapDrops)
        # relay_unauth_evicted: connections closed at the full cap to admit a source
        # holding fewer places (relay.core.admission), the same way
        self.evictLog = BurstLog(reactor, CAP_LOG_WINDOW, self._firstEviction,
                                 self._moreEvictions)
        self.publicPorts = PublicPorts(self)
        self.counters = {"auth_refused": 0, "requests_refused": 0, "sessions_refused": 0,
                         "connections_dropped_unauthenticated_cap": 0,
                         "connections_evicted_unauthenticated_cap": 0,
                         "connections_refused_per_user_cap": 0,
                         # public connections past public_max_per_source (relay.server.public)
                         "connections_refused_public_per_source": 0,
                         # connections a listener lost at accept (EMFILE …;
                         # relay.server.acceptwatch)
                         "accept_failed": 0,
                         # users' first bytes sent to the agent before it answered
                         # their open (relay.ssh.earlydata)
                         "early_data_sessions": 0, "early_data_bytes": 0}
        # Per-source limits and penalties, shared by the SSH port and the data port.
        self.admission = Admission(config, reactor)
        self.ssh_gate = self.admission.gate("ssh", config.max_unauthenticated)
        self.idle = IdleSweeper(self)
        self.bound: HostPort | None = None  # where the SSH listener is (its port 0 resolved)
        self._started = False
        self.extra_status: dict[str, Callable[[], dict[str, Any]]] = {}  # e.g. the TLS port
        self.waiting = Waiting(self.registry, self.router, reactor)
        self.dataport = DataPort(self, self.admission)
        # Sessions a labrelay agent may resume over a new link (docs/resilience.md); the
        # instance id tells its agents when this relay restarted (nothing to resume).
        self.sharing = Sharing(grants, reactor)
        # Each user's budget of packets per reactor turn, over all her connections
        # (relay.ssh.turnshare; docs/security.md, "one user's flood of small packets").
        self.turnShares = UserTurnShares(reactor, PACKETS_PER_TURN)
        self.writeCork = CorkGroup()  # what one read makes the relay send, one write a peer
        self.resumes = RelayResumes(reactor, config.resume_grace,
                                    retag=self.sharing.tagAgentChannel,
                                    principal_for=grants.principal_for)
        self.resume = self.resumes.sessions
        self.grantsWatcher = GrantsWatcher(grants, reactor, config.grants_poll_interval)
        self.expiry = KeyExpiry(self)
        grants.trust.inUse = self.expiry.holders_in_use  # records in use stay known
        grants.subscribe(lambda _change: self.sharing.refresh())
        grants.subscribe(self.grantsChanged)

    # connection admission

    def admitConnection(self, addr: Any) -> Ticket | None:
        """A ticket for a new SSH connection, or None: close it at once.

        OpenSSH's PerSourcePenalties, MaxStartups and PerSourceMaxStartups, in that
        order (relay.core.admission): a flood of handshakes from one host cannot starve
        real users from others; the global cap is the last line."""
        host = str(getattr(addr, "host", "?"))
        verdict = self.ssh_gate.admit(host)
        if isinstance(verdict, Ticket):
            victim = verdict.take_displaced()
            if victim is not None:
                self._evict(victim, f"{host}:{getattr(addr, 'port', '?')}")
            return verdict
        if verdict is Refusal.GLOBAL:
            # Counted each; logged once per burst.  A drop costs its sender one TCP
            # handshake and earns no penalty (it never held a place), so one line per
            # drop let anyone write a warning per connection while others held the
            # places (3 000 connects: 3 000 lines).
            self.counters["connections_dropped_unauthenticated_cap"] += 1
            self.capLog.failed(f"{host}:{getattr(addr, 'port', '?')}")
        return None

    def _evict(self, victim: Ticket, peer: str) -> None:
        """The global cap was full and ``peer``'s source held fewer places than
        ``victim``'s, which held the most: the gate released ``victim`` (the oldest of
        that source's); close its connection.  Counted each, logged once per burst
        (an attacker's reconnects would otherwise write a line each)."""
        self.counters["connections_evicted_unauthenticated_cap"] += 1
        self.evictLog.failed(f"{victim.source} {peer} {eviction_reason(victim)}")
        if victim.owner is not None:
            victim.owner.evict()

    def _firstEviction(self, what: str) -> None:
        source, peer, why = what.split(" ", 2)
        self._log.warn(
            "closed an unauthenticated connection of {source}, {why}, to admit {peer}: "
            "{n} connections are still authenticating (max_unauthenticated)",
            event="relay_unauth_evicted", source=source, peer=peer, why=why,
            n=self.ssh_gate.total, count=1,
        )

    def _moreEvictions(self, count: int, what: str) -> None:
        source, peer, why = what.split(" ", 2)
        self._log.warn(
            "closed {count} more unauthenticated connections in the last {window:.0f}s "
            "to admit others, the last of {source}, {why}, for {peer} "
            "(max_unauthenticated)", event="relay_unauth_evicted", source=source, peer=peer,
            why=why, n=self.ssh_gate.total, count=count, window=self.evictLog.window,
        )

    def _firstCapDrop(self, peer: str) -> None:
        self._log.warn(
            "dropping connection from {peer}: {n} connections are still authenticating "
            "(max_unauthenticated)", event="relay_unauth_cap", peer=peer,
            n=self.ssh_gate.total, count=1,
        )

    def _moreCapDrops(self, count: int, peer: str) -> None:
        self._log.warn(
            "dropped {count} more connections in the last {window:.0f}s, the last from "
            "{peer}: {n} connections are still authenticating (max_unauthenticated)",
            event="relay_unauth_cap", peer=peer, n=self.ssh_gate.total, count=count,
            window=self.capLog.window,
        )

    def authenticated(self, transport: RelayTransport) -> None:
        if transport.admission is not None:
            self.ssh_gate.passed(transport.admission)

    def progressed(self, transport: RelayTransport, stage: Stage) -> None:
        if transport.admission is not None:
            self.ssh_gate.advance(transport.admission, stage)

    def disconnected(self, transport: RelayTransport) -> None:
        """The connection ended: an unauthenticated one earns its source a penalty
        (``grace-exceeded``, ``authfail``, ``protocol`` or else ``noauth``)."""
        ticket = transport.admission
        if ticket is None:
            return
        offence = None if transport.authenticated else (transport.offence or Offence.NOAUTH)
        self.ssh_gate.closed(ticket, offence)

    # sessions of agents and users

    def connectionRefusal(self, identity: Identity) -> str | None:
        """A valid key may not take every descriptor and the memory of the relay's
        connections from the other users: past ``max_connections_per_user`` a new
        connection of the same principal is refused (the user's own, not her
        source's, limit; a reload applies a change to new connections)."""
        cap = self.config.max_connections_per_user
        held = self._connectionsOf[(identity.kind, identity.name)]
        if held < cap:
            return None
        self.counters["connections_refused_per_user_cap"] += 1
        self._log.warn(
            "{kind} {name}: connection refused: {held} already open "
            "(max_connections_per_user = {cap})", event="relay_connection_cap",
            kind=identity.kind, name=identity.name, held=held, cap=cap,
        )
        return (f"{identity.kind} {identity.name} already has {held} connections open on "
                f"this relay (max_connections_per_user = {cap}): close some, or share one "
                f"with ssh's ControlMaster")

    def sessionStarted(self, conn: RelayConnection) -> None:
        self.connections.add(conn)
        ident = conn.identity
        self._connectionsOf[(ident.kind, ident.name)] += 1
        self.expiry.watch(ident.key_blob, ident.login)
        # A certificate's CA and key id say which CA let this login in (trusted_user_ca
        # or a cert-authority line); both empty for a plain key.
        ca, key_id = describe_cert(ident.key_blob)
        # Which version an agent runs (relay.ssh.peersoftware): an operator looks for
        # the labs whose agents are old; a user's software is a field only.
        self._log.info(
            "{kind} {name} connected from {peer} with key {key}{running}",
            event="relay_connected", kind=ident.kind, name=ident.name, peer=conn.peer,
            cert_ca=ca, cert_id=key_id, key=audit.key_fingerprint(ident.key_blob),
            software=conn.software.software, version=conn.software.shown,
            running=f", version {conn.software.shown}" if ident.kind == "agent" else "",
        )

    def sessionStopped(self, conn: RelayConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            principal = (conn.identity.kind, conn.identity.name)
            self._connectionsOf[principal] -= 1
            if self._connectionsOf[principal] <= 0:
                del self._connectionsOf[principal]
        gone = self.router.drop_session(conn)
        self.dataport.sessionStopped(conn)
        close_pooled(self, conn)
        ident = conn.identity
        if ident.kind == "agent" and conn.leftOnPurpose:
            # A stopping agent says goodbye; its next process is another instance,
            # which could never resume these (docs/resilience.md).
            self.resumes.agent_left(conn)
        held = self.resumes.held_for(conn)
        self._log.info(
            "{kind} {name} at {peer} disconnected; {n} service(s) now waiting for it, "
            "{held} session(s) held for it", event="relay_disconnected", kind=ident.kind,
            name=ident.name, peer=conn.peer, n=len(gone),
            services=",".join(_label(r) for r in gone), held=held,
        )

    # global requests

    def globalRequest(self, conn: RelayConnection, requestType: bytes,
                      data: bytes) -> Any:
        if requestType == b"tcpip-forward":
            return self._forward(conn, data)
        if requestType == b"cancel-tcpip-forward":
            return self._cancel(conn, data)
        if requestType == fastwire.TOKEN_REQUEST:
            return self.dataport.tokenRequest(conn, data)
        if requestType == fastwire.POOL_REQUEST:
            return self.dataport.poolRequest(conn, data)
        if requestType == RESUME_HELLO:
            return self.resumes.hello(conn, data)
        if requestType == EARLY_DATA_OK:
            return self._takesEarly(conn, data)
        if requestType == HOSTKEYS_PROVE:
            try:
                return conn.proveHostKeys(data)
            except ProveRefused as e:
                return self._refuse(conn, "hostkeys-prove", str(e))
        return False  # keepalives and anything unknown: a standard failure reply

    def _takesEarly(self, conn: RelayConnection, data: bytes) -> bool:
        """``early-data-ok@labrelay`` from an agent: its sessions' first bytes may go
        before it answered their open (relay.ssh.earlydata), when the relay confirmed
        them early (``[relay] early_confirm``: only then do they arrive before it)."""
        if conn.identity.kind != "agent":
            return False
        try:
            conn.earlyLimit = unpack_early_data_ok(data)
        except ValueError:
            return False
        return True

    def _refuse(self, conn: RelayConnection, what: str, why: str) -> RefusedRequest:
        """Refuse ``what`` and log why; the answer carries ``why`` too, which a labrelay
        agent is told (``request-refused@labrelay``, relay.ssh.server)."""
        self.counters["requests_refused"] += 1
        if self._logRequest(REFUSED_REQUEST, conn, f"{what}: {why}"):
            self._log.warn(
                "{kind} {name}: refused {what}: {why}", event="relay_request_refused",
                kind=conn.identity.kind, name=conn.principal_name, what=what, why=why,
            )
        return RefusedRequest(why)

    def _logRequest(self, category: str, conn: RelayConnection, what: str) -> bool:
        """Whether to log one of ``conn``'s requests in full (per key and window, as
        refused sessions: relay.core.burstlog.PerKeyLog); else it is only counted."""
        ident = conn.identity
        key = audit.key_fingerprint(getattr(ident, "key_blob", None))
        return self.requestLog.allow(f"{category} {ident.kind} {conn.principal_name} {key}",
                                     what)

    def channelRefused(self, conn: RelayConnection, what: str) -> bool:
        """A channel type refused (RelayConnection.getChannel): logged in full within
        the key's allowance, as refused requests are, then counted in one line."""
        return self._logRequest(REFUSED_CHANNEL, conn, what)

    def resumeRefused(self, conn: RelayConnection, why: str) -> bool:
        """An agent's resume offer refused: logged in full within the key's allowance,
        then counted in one line (a forged offer in a loop is one line per window)."""
        return self._logRequest(REFUSED_RESUME, conn, why)

    def _moreRequests(self, who: str, count: int, last: str) -> None:
        """The requests :meth:`_logRequest` did not log in the window that just ended."""
        category, kind, rest = who.split(" ", 2)
        name, _, key = rest.rpartition(" ")
        if category == REFUSED_RESUME:
            self._log.warn(
                "agent {name}: {count} more resumes refused in the last {window:.0f}s with "
                "key {key} (not logged one by one; the last: {why})",
                event="relay_resume_refused", name=name, count=count,
                window=self.requestLog.window, key=key, why=last,
            )
        elif category == REFUSED_CHANNEL:
            self._log.info(
                "{name}: {count} more channels of types the relay does not offer refused "
                "in the last {window:.0f}s with key {key} (not logged one by one; the last: "
                "{last})", event="relay_channel_refused", name=name, count=count,
                window=self.requestLog.window, key=key, last=last, type=last, what="",
            )
        elif category == REFUSED_REQUEST:
            self._log.warn(
                "{kind} {name}: {count} more requests refused in the last {window:.0f}s "
                "with key {key} (not logged one by one; the last: {last})",
                event="relay_request_refused", kind=kind, name=name, count=count,
                window=self.requestLog.window, key=key, last=last, what="", why="",
            )
        else:
            self._log.info(
                "agent {agent}: {count} more services registered or cancelled in the last "
                "{window:.0f}s with key {key} (not logged one by one; the last: {last})",
                event="relay_service_registered", agent=name, count=count,
                window=self.requestLog.window, key=key, last=last, service="",
            )

    def _principalOf(self, session: Any) -> Principal | None:
        """The principal ``session``'s key is granted as now (None: no longer granted)."""
        return self.grants.principal_for(session.identity.key_blob, session.identity.login)

    def _forward(self, conn: RelayConnection, data: bytes) -> Any:
        try:
            bind, port = unpack_forward(data)
        except ValueError:
            return self._refuse(conn, "tcpip-forward", "malformed request")
        what = f"tcpip-forward {bind}:{port}"
        name, refused = self.router.claim(self._principalOf(conn), bind, port)
        if refused is not None:
            return self._refuse(conn, what, refused)
        holder = self.router.ungranted_holder(name, port, conn)
        if holder is not None:
            self._dropRegistration(holder, f"{_label(holder)} is no longer granted to this "
                                   "key", tell=True)
        if name == PUBLIC and not self.publicPorts.listen(port):
            return self._refuse(conn, what, f"cannot listen on public port {port}")
        replied = conn.whenReplied()
        decision = self.router.offer(name, port, conn, bind, self.reactor.seconds())
        if decision.probe is not None:
            return self._probeThenTakeover(decision.probe, conn, what, replied)
        return self._apply(decision, conn, what, replied)

    def _apply(self, decision: Decision, conn: RelayConnection, what: str,
               replied: defer.Deferred[None]) -> bool | RefusedRequest:
        """Do what the router decided about ``conn``'s ``what``; the request's answer.

        Sessions waiting for the name are handed the registration only once the reply
        was sent (``replied``): before, the agent does not hold its forward as
        registered and refuses a ``forwarded-tcpip`` for it."""
        if decision.verdict in (Verdict.GONE, Verdict.REFUSED):
            # Nothing waits for this reply: a connection that stops before it is sent
            # fails ``replied``, which would be an unhandled error (a critical log line).
            replied.addErrback(lambda _: None)
            if decision.verdict is Verdict.GONE:
                return False
            return self._refuse(conn, what, decision.why)
        reg = decision.registration
        assert reg is not None
        takeover = decision.verdict is Verdict.TAKEOVER
        if self._logRequest(REGISTERED, conn, f"registered {_label(reg)}"):
            self._logRegistered(conn, reg, takeover)
        self.waiting.registered(reg, decision.woken, replied)
        if decision.superseded is not None:
            decision.superseded.disconnect(SUPERSEDED)
        return True

    def _logRegistered(self, conn: RelayConnection, reg: Registration, takeover: bool) -> None:
        self._log.info(
            "agent {agent} registered {service}{how} (agent version {version})",
            event="relay_service_registered", agent=conn.principal_name, service=_label(reg),
            peer=conn.peer, takeover=takeover, version=conn.software.shown,
            how=" (took it over from its stale session)" if takeover else "",
        )

    def _probeThenTakeover(self, probe: Probe, conn: RelayConnection, what: str,
                           replied: defer.Deferred[None],
                           ) -> defer.Deferred[bool | RefusedRequest]:
        """Probe the holder for ``TAKEOVER_PROBE`` seconds; the router decides from the
        first of: its answer, its connection stopping (no answer will come), silence."""
        result: defer.Deferred[bool | RefusedRequest] = defer.Deferred()

        def settle(decision: Decision | None) -> None:
            if decision is None:  # settled already
                return
            if timer.active():
                timer.cancel()
            result.callback(self._apply(decision, conn, what, replied))

        def silent() -> None:
            settle(self.router.probe_silent(probe, self.reactor.seconds()))

        def answered(alive: bool) -> None:
            if alive:
                settle(self.router.probe_answered(probe, self.reactor.seconds()))
            else:
                silent()

        timer = self.reactor.callLater(TAKEOVER_PROBE, silent)
        old: Any = probe.holder.session
        old.probe().addCallback(answered)
        return result

    def _cancel(self, conn: RelayConnection, data: bytes) -> bool | RefusedRequest:
        """Refused quietly (a cancel changes nothing the relay holds): the agent is
        told why all the same."""
        try:
            bind, port = unpack_forward(data)
        except ValueError:
            return RefusedRequest("malformed request")
        name = self.router.cancel(bind, port, conn)
        if name is None:
            return RefusedRequest(f"{bind}:{port} is not registered by this connection")
        service = label_of(name, port)
        if self._logRequest(REGISTERED, conn, f"cancelled {service}"):
            self._log.info("agent {agent} cancelled {service}", event="relay_service_cancelled",
                           agent=conn.principal_name, service=service)
        if name == PUBLIC:
            self.publicPorts.close(port)
        return True

    # a reload (relay.ops.reload): live settings and grants

    def reconfigure(self, config: RelayConfig) -> None:
        """Run with a reloaded ``[relay]`` from now on (the restart-only keys already
        hold their running values, :func:`relay.config.diff.diff_relay`).  Limits and
        timeouts are read where they are used, so new connections and sessions get the
        new values and open ones keep running (a lowered cap refuses new sessions
        only); ``resume_grace`` holds what is held from now on; the idle sweep is
        restarted; the grants are rebuilt from the new tables,
        files and default cap, and what a key lost goes at once through
        :meth:`grantsChanged`."""
        old, self.config = self.config, config
        self.dataport.config = config
        # resume_grace: the hello answer and the sessions held from now on (those held
        # already keep the deadline they were given).
        self.resumes.grace = self.resumes.sessions.grace = config.resume_grace
        if old.idle_timeout != config.idle_timeout and self._started:
            self.idle.restart()
        self.grants.reconfigure(config)
        if self._started:
            # A relay that started with nothing to watch (grants in [[relay.*]] tables
            # only, no revoked_keys) and is now told of a KRL or a grant file: watch it
            # from now on, or a later `ssh-keygen -k -u` would never be seen.
            self.grantsWatcher.start()

    # grants reloaded: what a key lost goes at once (DESIGN §7)

    def grantsChanged(self, change: GrantsChange) -> None:
        """Apply a grants reload to what is running.

        A key that lost everything loses its registrations, its sessions (spliced
        ones too, which outlive its SSH connection) and its connections, each told
        why.  A narrowed agent loses the registrations it may no longer hold (and
        their sessions; a ``grant-revoked@labrelay`` tells it which); a narrowed user
        loses its sessions to services it may no longer reach.  Decisions use the
        grants now in force; ``change`` only says whose things to look at.  Keys that
        are no longer usable for a reason a diff cannot show (expired, revoked by the
        KRL, a certificate whose CA went) go too (:meth:`KeyExpiry.recheck`), and every
        certificate in use is looked at as narrowed (its CA line may have lost grants)."""
        self.expiry.recheck(skip=change.losses.keys())
        # What each key lost: the diff's, by key.  A certificate is granted by its CA
        # line, which the diff by key cannot see: every certificate in use is looked at
        # as if narrowed (its lines may have lost a service or a public port), each
        # connection, session and held session as its own login, against the grants now
        # in force; one that lost nothing keeps everything.  One no longer usable at all
        # was ended by the recheck above.
        looked = {key: loss.everything for key, loss in change.losses.items()}
        for blob in self.expiry.keys_in_use():
            if is_certificate(blob):
                looked.setdefault(blob, False)
        if not looked:
            return
        memo: dict[tuple[bytes, str | None], Principal | None] = {}

        def principal_for(key: bytes, login: str | None) -> Principal | None:
            """The grants' look-up, once per (key, login): a certificate's re-runs its
            checks (a signature), and a lab's users may have many sessions each."""
            if (key, login) not in memo:
                memo[(key, login)] = self.grants.principal_for(key, login)
            return memo[(key, login)]

        for session in self.sessions.rows():
            key = session.key
            everything = looked.get(key) if key is not None else None
            if key is None or everything is None or session.closing is not None:
                continue
            principal = None if everything else principal_for(key, session.login or None)
            name, _, port = session.service.rpartition(":")
            if principal is None or not principal.may_reach(name, int(port)):
                why = ("the user's key is no longer granted" if principal is None
                       else f"{session.service} is no longer granted to user {session.user}")
                self._closeSession(session, why)
        for session, why in self.resumes.no_longer_granted(looked, principal_for):
            self._closeSession(session, f"held for resumption: {why}")
        self._endHopelessWaits()
        for conn in sorted(self.connections, key=lambda c: (c.identity.kind, c.principal_name)):
            loss = change.losses.get(conn.identity.key_blob)
            if loss is not None and loss.everything:
                self._revokeConnection(conn, loss.where)
            elif conn.identity.kind == "agent" and conn.identity.key_blob in looked:
                for reg in self.router.no_longer_held(conn):
                    self._dropRegistration(reg, f"{_label(reg)} is no longer granted to "
                                           f"agent {conn.principal_name}", tell=True)

    def _endHopelessWaits(self) -> None:
        """Sessions waiting for a service no agent may register any more end now, and a
        public port no agent holds or may hold stops listening: the revoked agent's
        door must not stay open for ``public_wait`` (or, for the listener, forever)."""
        for session, name, port in self.waiting.waits():
            if not (self.grants.public_port_owner(port) is not None if name == PUBLIC
                    else self.router.may_appear(self.grants.owner_of(name), name, port)):
                self._closeSession(session, f"{session.service} is no longer granted to "
                                   "any agent")
        for port in sorted(self.publicPorts.listeners):
            if (self.registry.lookup(PUBLIC, port) is None
                    and self.grants.public_port_owner(port) is None):
                self.publicPorts.close(port)

    def endKey(self, key_blob: bytes, why: str, login: str | None = None) -> None:
        """Close every session and connection of ``key_blob`` (it expired or was revoked),
        the sessions held for it while its agent's link is down included.  For a
        certificate with ``login``, only those of that login: the connections that logged
        in under that name, their sessions, and the sessions held for the agent that did
        (a certificate no longer usable as one login may still be as another).  A plain
        key's grants do not depend on the login: all of its."""
        if login is not None and not is_certificate(key_blob):
            login = None
        for session in [s for s in self.sessions.rows()
                        if s.key == key_blob and (login is None or s.login == login)]:
            self._closeSession(session, why)
        for session in self.resumes.held_rows_of(key_blob, login):  # held for that agent
            self._closeSession(session, f"held for resumption: {why}")
        for conn in [c for c in self.connections if c.identity.key_blob == key_blob
                     and (login is None or c.identity.login == login)]:
            for reg in self.registry.held_by(conn):
                self._dropRegistration(reg, why, tell=False)
            ca, key_id = describe_cert(key_blob)
            self._log.warn("{kind} {name} at {peer}: {why}; disconnecting",
                           event="relay_key_ended", kind=conn.identity.kind,
                           name=conn.principal_name, peer=conn.peer, why=why,
                           cert_ca=ca, cert_id=key_id, key=audit.key_fingerprint(key_blob))
            conn.disconnect(why)

    def _revokeConnection(self, conn: RelayConnection, where: str) -> None:
        for reg in self.registry.held_by(conn):
            self._dropRegistration(reg, "its agent's key is no longer granted", tell=False)
        self._log.warn(
            "{kind} {name} at {peer}: key no longer granted (was in {where}); disconnecting",
            event="relay_key_revoked", kind=conn.identity.kind, name=conn.principal_name,
            peer=conn.peer, where=where, key=audit.key_fingerprint(conn.identity.key_blob),
        )
        conn.disconnect("this key is no longer granted on this relay")

    def _dropRegistration(self, reg: Registration, why: str, tell: bool) -> None:
        """Forget ``reg``, close its public listener and its sessions; with ``tell``,
        send its agent ``grant-revoked@labrelay`` (the agent stays connected)."""
        if not self.router.drop(reg):
            return
        label = _label(reg)
        if reg.name == PUBLIC:
            self.publicPorts.close(reg.port)
        closing = self.sessions.of_agent_service(reg.session, label)
        for session in closing:
            self._closeSession(session, f"{label} was revoked: {why}")
        self._log.warn(
            "agent {agent}: registration {service} dropped: {why} ({n} session(s) closed)",
            event="relay_registration_revoked", agent=reg.owner, service=label, why=why,
            n=len(closing),
        )
        if tell:
            agent: Any = reg.session
            agent.grantRevoked(reg.bind, reg.port, why)

    def _closeSession(self, session: SessionRow, why: str) -> None:
        self._log.warn(
            "closing {user}'s {path} session to {service}: {why}",
            event="relay_session_revoked", user=session.user, service=session.service,
            path=session.path, origin=session.origin, why=why,
        )
        self.abortSession(session, why)

    def abortSession(self, session: SessionRow, why: str) -> None:
        """Close ``session`` now if it moves bytes, else as soon as it would start."""
        self.sessions.request_close(session, why)
        abort = self._aborts.get(session)
        if abort is not None:
            abort()
        else:
            self.waiting.cancel(session)  # waiting for its agent: ends now

    # start, stop

    def start(self) -> None:
        self._started = True
        self.dataport.start()
        self.grantsWatcher.start()
        self.idle.start()

    def stop(self) -> defer.Deferred[Any]:
        self.grantsWatcher.stop()
        self.refusalLog.stop()
        self.requestLog.stop()
        self.capLog.stop()
        self.evictLog.stop()
        self.expiry.stop()
        self.idle.stop()
        self.setupLog.flushAll()
        stopping = self.publicPorts.stop()
        data = self.dataport.stop()
        if data is not None:
            stopping.append(data)
        return defer.DeferredList(stopping)

    # status

    def status(self) -> dict[str, Any]:
        return relay_status(
            self.reactor.seconds(), self.config, self.connections, self.registry,
            self.sessions, sorted(self.publicPorts.listeners),
            {"held_sessions": self.resumes.status(),
             "fast_path": self.dataport.status(), "admission": self.admission.status(),
             "sharing": self.sharing.status(self.connections),
             "counters": dict(self.counters),
             "bound": str(self.bound) if self.bound is not None else None,
             "grant_problems": list(self.grants.problems),
             "grant_problem_count": self.grants.problem_count,
             "service_grants": [
                 {"service": str(g), "owner": p.name}
                 for p in self.grants.principals() if p.kind == "agent" for g in p.services
             ],
             **{name: get() for name, get in self.extra_status.items()}},
        )


def _label(reg: Registration) -> str:
    return label_of(reg.name, reg.port)
