"""The relay's SSH server: Conch transport, public-key auth and connection service.

Identity comes only from a key whose signature verified (Conch's userauth checks
the signature; :class:`relay.ssh.serverauth.GrantChecker` maps the key to a principal).  Everything
else a session may do is decided by the relay above it from the principal's grants:
this module only parses SSH requests and answers them.  What it needs of that relay is
:class:`RelayHandler` (declared here, implemented by :class:`relay.server.relay.RelayCore`),
so nothing here imports the relay.

Hardening over Conch's defaults (DESIGN §11): a login grace time and a cap on
authentication attempts, per-source limits and penalties and a global cap on
unauthenticated connections (:mod:`relay.core.admission`; OpenSSH's PerSourcePenalties,
PerSourceMaxStartups and MaxStartups), a cap on channels per connection,
keepalives to every peer, and every channel type but ``direct-tcpip`` refused.  Conch's own
``UnixConchUser`` (an open proxy) is never used.

The algorithms, strict key exchange and the key exchange bounds (``kex_timeout``,
the queue during a key exchange counted as link congestion) are
:mod:`relay.ssh.policy` and :mod:`relay.ssh.kex`.  The relay waits up to
``KEXINIT_WAIT`` for the client's KEXINIT before sending its own, so that a client
offering AES-GCM is not offered chacha20-poly1305 (which costs about five times
the CPU per packet here; ``policy.server_ciphers_for``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.conch import error
from twisted.conch.ssh import common, factory, keys, transport
from twisted.cred import portal
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.core.admission import Offence, Stage, Ticket, worst
from relay.core.certs import is_certificate
from relay.core.grants import AGENT, USER
from relay.core.keepalive import KeepaliveMonitor
from relay.core.resume import (
    OPEN_RESUMABLE,
    RESUME_CHANNEL,
    ResumeOwner,
    ResumeRefused,
    pack_sid,
)
from relay.core.routing import PUBLIC_BINDS
from relay.ssh import policy
from relay.ssh.aead import USER_NO_FLUSH, AEADTransportMixin, CorkGroup
from relay.ssh.channels import BridgedChannel
from relay.ssh.connection import (
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    FlowConnection,
)
from relay.ssh.guard import PeerInputGuard, client_first_line_refusal
from relay.ssh.hostkeyupdate import HOSTKEYS, HOSTKEYS_AGAIN, HostKeyProver
from relay.ssh.kex import (
    KEX_PACE_BURST,
    KEX_PACE_RATE,
    USER_KEX_PACE_BURST,
    USER_KEX_PACE_RATE,
    kex_pacer,
)
from relay.ssh.openerrors import refused_by_peer
from relay.ssh.peersoftware import read_version_line
from relay.ssh.resumable import ResumableSessions
from relay.ssh.serverauth import (
    NAME_LIMIT,
    AuthHandler,
    GrantChecker,
    Identity,
    RelayAvatar,
    RelayUserAuth,
)
from relay.ssh.turnshare import UserTurnShares
from relay.ssh.wire import (
    GRANT_REVOKED,
    REQUEST_REFUSED,
    pack_endpoints,
    pack_grant_revoked,
    pack_request_refused,
    unpack_endpoints,
    unpack_forward,
)

OPEN_RESOURCE_SHORTAGE = 4
ORIGIN_LIMIT = 255
"""Characters of a ``direct-tcpip`` originator address kept for a session."""
#: Seconds the relay waits for a client's first KEXINIT before sending its own.
#: OpenSSH, PuTTY, Dropbear, paramiko and asyncssh send theirs at once.
KEXINIT_WAIT = 1.0
#: The refused global requests whose reason a labrelay agent is told
#: (``request-refused@labrelay``): their payload names a bind address and port.
EXPLAINED_REQUESTS = (b"tcpip-forward", b"cancel-tcpip-forward")


@dataclass(frozen=True)
class RefusedRequest:
    """A global request's answer: no, and why (:meth:`RelayHandler.globalRequest`).

    The peer gets a plain ``REQUEST_FAILURE`` as for ``False``; a labrelay agent is told
    ``why`` in a ``request-refused@labrelay`` just before it.  False in a boolean test,
    like the answer it stands for."""

    why: str

    def __bool__(self) -> bool:
        return False


@dataclass
class _PendingReply:
    """One global request that wants a reply; replies go out in request order."""

    request: bytes
    data: bytes
    replied: list[defer.Deferred[None]]
    done: bool = False
    ok: bool = False
    reply: bytes = b""
    why: str | None = None  # refused with a reason (RefusedRequest)


class RelayHandler(AuthHandler, Protocol):
    """What the SSH server needs of the relay above it.

    Settings and the clock (``config``, ``reactor``), the grants (``grants``), and the
    events of a connection's life; every decision (admission, registrations, sessions)
    is the handler's.  ``turnShares``: each user's budget of packets per reactor turn,
    shared by all her connections (relay.ssh.turnshare)."""

    turnShares: UserTurnShares
    writeCork: CorkGroup

    def admitConnection(self, addr: Any) -> Ticket | None:
        """A ticket for a new TCP connection, or None to close it at once."""

    def authenticated(self, transport: RelayTransport) -> None:
        """The transport's peer authenticated."""

    def progressed(self, transport: RelayTransport, stage: Stage) -> None:
        """The unauthenticated transport got to ``stage`` (its version line; its first
        key exchange done): it keeps its place longer at the full cap."""

    def disconnected(self, transport: RelayTransport) -> None:
        """The transport closed (authenticated or not)."""

    def sessionStarted(self, conn: RelayConnection) -> None:
        """An authenticated connection's ``ssh-connection`` service started."""

    def sessionStopped(self, conn: RelayConnection) -> None:
        """That service stopped."""

    def globalRequest(self, conn: RelayConnection, requestType: bytes, data: bytes) -> Any:
        """Answer a global request: False, True, bytes, a :class:`RefusedRequest`, or a
        Deferred of one."""

    def channelRefused(self, conn: RelayConnection, what: str) -> bool:
        """``conn`` asked for a channel type the relay does not offer (``what``, its
        escaped name): whether to log it in full (else the handler only counts it, and
        says how many later: a refusal in a loop must not flood the log)."""

    def resumeRefused(self, conn: RelayConnection, why: str) -> bool:
        """An agent's resume offer refused (``why``): whether to log it in full, as
        :meth:`channelRefused`."""

    def openUserSession(self, conn: RelayConnection, host: str, port: int, origin: str,
                        channel: BridgedChannel) -> defer.Deferred[BridgedChannel] | BridgedChannel:
        """Bridge a user's ``direct-tcpip`` channel to ``host:port``: ``channel`` itself
        when it is confirmed at once (early confirmation, relay.core.earlyopen)."""

    @property
    def resume(self) -> ResumableSessions:
        """The sessions agents may resume over a new link (relay.ssh.resumable)."""


REFUSED_CHANNEL_TYPES = {
    b"session": "shell, exec and subsystem sessions",
    b"x11": "X11 forwarding",
    b"auth-agent@openssh.com": "agent forwarding",
    b"direct-streamlocal@openssh.com": "unix socket forwarding",
}


@implementer(portal.IRealm)
class RelayRealm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        from twisted.conch.interfaces import IConchUser

        return IConchUser, RelayAvatar(avatarId), lambda: None


READ_HOLD = 1024 * 1024
"""Bytes of the relay's output a peer may leave unread before the relay stops reading
it: eight times the most channel data ever waits there (``LINK_BUFFER``), so only
answers to requests the peer does not read can reach it."""


class RelayTransport(PeerInputGuard, AEADTransportMixin, transport.SSHServerTransport):
    """One client connection to the relay (an agent or a user)."""

    _log = Logger()
    factory: RelayFactory
    admission: Ticket | None = None  # set by RelayFactory.buildProtocol
    offence: Offence | None = None  # how it misbehaved before authenticating, if it did
    authenticated = False
    # The peer said SSH_MSG_DISCONNECT "by application": it is leaving on purpose (a
    # labrelay agent sends it when it stops), so nothing of it will come back to resume.
    leftOnPurpose = False
    _graceTimer: IDelayedCall | None = None  # login_grace: from connectionMade to auth
    # a user's pooled channel may be forwarded by the native thread (relay.ssh.nativeforward)
    nativeArmable = True
    # Not read while this much of the relay's output waits unread by it (AEADTransportMixin)
    readHoldBytes = READ_HOLD
    _heldOnce = False
    _kexPacedOnce = False

    # Disconnects the relay sends for bytes that are not SSH: a ``protocol`` offence.
    PROTOCOL_DISCONNECTS = frozenset({
        transport.DISCONNECT_PROTOCOL_ERROR, transport.DISCONNECT_MAC_ERROR,
        transport.DISCONNECT_PROTOCOL_VERSION_NOT_SUPPORTED,
    })

    def connectionMade(self) -> None:
        tcp: Any = self.transport
        tcp.setTcpNoDelay(True)
        tcp.setTcpKeepAlive(True)
        self.authenticated = False
        # The grace time runs from the TCP connection, not from ssh-userauth as in
        # Conch: a peer that never finishes its version line or key exchange (a
        # slowloris) must not hold one of the max_unauthenticated places forever.
        core = self.factory.core
        self._graceTimer = core.reactor.callLater(core.config.login_grace, self._graceExpired)
        self.kexClock = core.reactor
        self.kexTimeout = core.config.kex_timeout
        self.kexInitWait = KEXINIT_WAIT
        self.corkGroup = core.writeCork  # a read's packets to each peer in one write
        self.kexPacer = kex_pacer(core.reactor.seconds())
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        """Refuses a client whose first bytes cannot begin its version line, at once
        (:func:`relay.ssh.guard.client_first_line_refusal`): Conch's server would skip
        such lines and hold the connection until ``login_grace``.  A disconnect before
        the peer's version line is a ``protocol`` offence (:meth:`sendDisconnect`).

        This runs only until the version line is in: then the instance's
        ``dataReceived`` becomes the packet path's own (``AEADTransportMixin``), so
        the reads of the whole connection, bulk data included, pay no frame and no
        check for it."""
        if self.gotVersion:  # fed by something that kept the old bound method
            super().dataReceived(data)
            return
        if self._readDead:  # refused: the rest of what it sent is not read
            return
        why = client_first_line_refusal(self.buf[:8] + data[:8])
        if why is not None:
            self.buf = b""
            self._fatal(transport.DISCONNECT_PROTOCOL_ERROR, why.encode())
            return
        direct = super().dataReceived
        direct(data)
        if self.gotVersion:
            self.dataReceived = direct  # type: ignore[method-assign]
            if not self._readDead:
                self.factory.core.progressed(self, Stage.HANDSHAKE)

    def _newKeys(self) -> None:
        """The first key exchange done, the peer is authenticating: a connection that
        got this far paid a key agreement of its own and keeps its place longer at the
        full cap ([relay.crowding] ``auth``)."""
        super()._newKeys()
        if self.keyExchanges == 1 and not self.authenticated and self.transport is not None:
            self.factory.core.progressed(self, Stage.AUTH)

    def readHeld(self, waiting: int) -> None:
        """Logged once per connection: a peer that keeps the relay's answers unread
        (a client that sends requests and never reads) is not read until it does."""
        if self._heldOnce:
            return
        self._heldOnce = True
        self._log.info(
            "not reading {peer} while {waiting} bytes of the relay's answers wait unread "
            "by it (more than {hold}); reading resumes once it reads them",
            event="relay_read_held", peer=self.peerName(), waiting=waiting,
            hold=self.readHoldBytes,
        )

    def kexPaced(self, wait: float) -> None:
        """Logged once per connection: a peer that starts key exchanges faster than
        the pace (relay.ssh.kex.KEX_PACE_RATE) has each held until its turn."""
        if self._kexPacedOnce:
            return
        self._kexPacedOnce = True
        self._log.info(
            "{peer} starts key exchanges faster than {rate:g} a second (after {burst}), "
            "or its user's connections faster than {user_rate:g} (after {user_burst}); "
            "each is held until its turn ({wait:.2f}s now)", event="ssh_kex_paced",
            peer=self.peerName(), rate=KEX_PACE_RATE, burst=KEX_PACE_BURST, wait=wait,
            user_rate=USER_KEX_PACE_RATE, user_burst=USER_KEX_PACE_BURST,
        )

    def offended(self, offence: Offence) -> None:
        """Record what this unauthenticated connection did wrong; the worst one counts
        when it ends (:meth:`RelayHandler.disconnected`)."""
        if not self.authenticated:
            self.offence = worst(self.offence, offence)

    def _graceExpired(self) -> None:
        self._graceTimer = None
        if not self.authenticated:
            self.offended(Offence.GRACE)
            self._log.info(
                "closing {peer}: not authenticated within {grace:g}s (login_grace)",
                event="relay_login_timeout", peer=self.peerName(),
                grace=self.factory.core.config.login_grace,
            )
            self.transport.abortConnection()  # type: ignore[union-attr]

    def evict(self) -> None:
        """The admission gate dropped this unauthenticated connection to make room for
        a source holding fewer places (relay.core.admission; counted and logged by the
        relay, no penalty): closed at once, as at ``login_grace``."""
        if self.authenticated or self.transport is None:
            return
        self.transport.abortConnection()  # type: ignore[union-attr]

    def setService(self, service: Any) -> None:
        if isinstance(service, RelayConnection) and not self.authenticated:
            self._authenticated()
        super().setService(service)

    def _authenticated(self) -> None:
        self.authenticated = True
        if self._graceTimer is not None and self._graceTimer.active():
            self._graceTimer.cancel()
        self._graceTimer = None
        self.factory.core.authenticated(self)

    def refuseAuthenticated(self, why: str) -> None:
        """The peer proved a granted key, but the relay will not serve this connection
        (a cap): it leaves the unauthenticated count unpenalised, and the client is
        told why."""
        self._authenticated()
        self.sendDisconnect(transport.DISCONNECT_TOO_MANY_CONNECTIONS,
                            why.encode("utf-8", "replace"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._graceTimer is not None and self._graceTimer.active():
            self._graceTimer.cancel()
        self._graceTimer = None
        vars(self).pop("dataReceived", None)  # the bound method set above: a cycle
        super().connectionLost(reason)
        self.factory.core.disconnected(self)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        """A client saying goodbye is routine, not an error.  One that says it leaves
        by application (not a protocol fault) is remembered: a labrelay agent says so
        only when it stops, and its held sessions must then end at once rather than
        wait out ``resume_grace`` for a process that will not come back."""
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            self.leftOnPurpose = True

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        """Conch's, except that an unknown service's name is not echoed back and
        logged at full length (it may be as long as a packet, before any login), and
        that a running service is never replaced.

        Conch started a new ``ssh-userauth`` on every request, and its count of failed
        attempts with it: paramiko asks before every attempt, so a client that did so
        had ``max_auth_tries`` reset each time and could try keys without limit until
        ``login_grace``.  As in sshd, a request for ``ssh-userauth`` while it runs is
        accepted and the same attempt count goes on.  After login, Conch replaced the
        connection service (every channel dropped) and a second login raised out of
        the new one's start ("Cannot register producer", logged critical, on demand
        by any user): a service request after authentication is a protocol error."""
        service, _ = common.getNS(packet)
        if self.authenticated:
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR,
                                b"service request after authentication")
            return
        if service == b"ssh-userauth" and isinstance(self.service, RelayUserAuth):
            self.sendPacket(transport.MSG_SERVICE_ACCEPT, common.NS(service))
            return
        try:
            known = self.factory.getService(self, service) is not None
        except KeyError:  # Conch's lookup after login
            known = False
        if not known:
            self.sendDisconnect(transport.DISCONNECT_SERVICE_NOT_AVAILABLE,
                                b"don't have service " + service[:NAME_LIMIT])
            return
        super().ssh_SERVICE_REQUEST(packet)

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        """``server-sig-algs`` names the user key algorithms the relay accepts, not
        (as Conch has it) its own host key algorithms."""
        super().sendExtInfo([
            (name, b",".join(policy.USER_KEY_ALGORITHMS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ])  # fmt: skip

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # Before the peer's version line every disconnect is for its bytes: Conch's
        # "version string longer than 4KB" (garbage, an HTTP request ...) says
        # CONNECTION_LOST, which cost the source only the 1 s of ``noauth``.
        if reason in self.PROTOCOL_DISCONNECTS or not self.gotVersion:
            self.offended(Offence.PROTOCOL)
        tcp: Any = self.transport
        if tcp is not None and getattr(tcp, "producer", None) is not None:
            tcp.unregisterProducer()
        super().sendDisconnect(reason, desc)


class RelayFactory(factory.SSHFactory):
    """Builds a transport per accepted connection, within the unauthenticated cap."""

    protocol = RelayTransport
    noisy = False

    def __init__(self, core: RelayHandler, hostKeys: dict[bytes, keys.Key],
                 nextHostKeys: Sequence[keys.Key] = ()) -> None:
        """``hostKeys`` do the key exchange; ``nextHostKeys`` are only announced to
        clients after they log in, and proven on request (relay.ssh.hostkeyupdate), so
        that they learn the key the relay will switch to."""
        self.core = core
        self.publicKeys = {name: key.public() for name, key in hostKeys.items()}
        self.privateKeys = dict(hostKeys)
        self.hostKeyProver = HostKeyProver([*hostKeys.values(), *nextHostKeys])
        self.portal = portal.Portal(RelayRealm(), [GrantChecker(core)])
        self.services: dict[bytes, Any] = {
            b"ssh-userauth": RelayUserAuth,
            b"ssh-connection": lambda: RelayConnection(core),
        }

    def getPrimes(self) -> None:
        return None  # no group exchange (relay.ssh.policy)

    def buildProtocol(self, addr: Any) -> Any:
        ticket = self.core.admitConnection(addr)
        if ticket is None:
            return None  # closes the TCP connection at once
        # Conch's SSHFactory.buildProtocol, less its "disabling non-fixed-group key
        # exchange algorithms because we cannot find moduli file" info line: logged on
        # every connection (the relay has no primes on purpose, getPrimes), and shown
        # by twistd's log, which has no level filter.  Its filtering of the key
        # exchanges is moot: the transport offers relay.ssh.policy's (kex.py).
        proto: Any = Factory.buildProtocol(self, addr)
        proto.supportedPublicKeys = [
            algorithm for key in self.privateKeys.values()
            for algorithm in key.supportedSignatureAlgorithms()
        ]
        proto.admission = ticket
        ticket.owner = proto  # closed by evict() if the gate evicts it
        return proto


MIN_PEER_MAX_PACKET = 1024
"""The smallest channel maximum packet the relay takes from a user's open or an agent's
confirmation (the floor of labrelay's own ``max_packet``; OpenSSH, PuTTY, Dropbear,
paramiko, asyncssh and Go all say 16-32 KiB).  Below it the relay would write what
the service sends as that many tiny packets: asyncssh asking for 1 made bob's echo
through the same relay wait up to 0.77 s (docs/security.md, "Attacks tried")."""


class RelayConnection(FlowConnection):
    """The ``ssh-connection`` service of an authenticated agent or user."""

    _log = Logger()

    minPeerMaxPacket = MIN_PEER_MAX_PACKET

    def __init__(self, core: RelayHandler) -> None:
        super().__init__()
        self.core = core
        self.keepalive: KeepaliveMonitor | None = None
        self._replies: list[_PendingReply] = []  # in request order
        self._handling: list[defer.Deferred[None]] | None = None  # the request being handled
        self.resumable = False  # a labrelay agent said resume@labrelay hello
        self.agent_instance = b""  # which agent process (from its hello)
        # The agent takes this many of a channel's first bytes before it answers the
        # open (its early-data-ok@labrelay; relay.ssh.earlydata); 0: it does not.
        self.earlyLimit = 0
        # Its software and labrelay version, from its version line (serviceStarted).
        self.software = read_version_line(None)

    @property
    def identity(self) -> Identity:
        avatar: RelayAvatar = self.transport.avatar
        return avatar.identity

    @property
    def principal_name(self) -> str:
        return self.identity.name

    @property
    def resumeOwner(self) -> ResumeOwner:
        """Who may resume a session opened to this agent (:func:`resume_owner`)."""
        return resume_owner(self.identity, self.agent_instance)

    @property
    def peer(self) -> str:
        peer = self.transport.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.announceHostKeys()
        self.software = read_version_line(getattr(self.transport, "otherVersionString", None))
        if self.identity.kind == USER:
            # One user's reads of small packets must not make every other user's turn
            # wait, however many connections she opens: her connections share one
            # budget of packets per turn (AEADTransportMixin.turnShare; docs/security.md).
            share = self.core.turnShares.of(self.identity.name)
            self.transport.turnShare = share
            # Her re-keys draw on one pace for all her connections, too (relay.ssh.kex).
            self.transport.kexUserPacer = share.kexPacer
            self.transport.noFlush = USER_NO_FLUSH
        ka = self.core.config.keepalive
        if ka.interval > 0:
            self.keepalive = KeepaliveMonitor(
                self.core.reactor, ka.interval, ka.count_max, self.probe, self._dead
            )
            self.keepalive.start()
        self.core.sessionStarted(self)

    def announceHostKeys(self) -> None:
        """``hostkeys-00@openssh.com`` with every host key, as sshd sends it after
        login (``notify_hostkeys``): an OpenSSH client with ``UpdateHostKeys`` learns
        the next key from it and forgets keys no longer announced.

        Sent as the service starts, in the same turn (and, corked, the same write) as
        the login's success: no round trip is added to a session's set-up, and the
        client's proof request, if any, comes while its first channel opens.  No reply
        is wanted, so Conch's client (the labrelay agent) and other clients that do
        not know it drop it."""
        factory = getattr(self.transport, "factory", None)
        prover: HostKeyProver | None = getattr(factory, "hostKeyProver", None)
        if prover is not None:
            self.sendGlobalRequest(HOSTKEYS, prover.announcement(), wantReply=0)

    def reannounceHostKeys(self) -> bool:
        """Tell a connected labrelay agent the relay's keys again
        (``hostkeys-again@labrelay``), after a reload changed them: so that a rotation
        does not need agents to reconnect before the swap.  Only to an agent whose
        version line is labrelay's (a stock ``ssh -R`` agent, or any user, hears nothing
        new; OpenSSH ends a connection told ``hostkeys-00`` twice).  True if sent."""
        factory = getattr(self.transport, "factory", None)
        prover: HostKeyProver | None = getattr(factory, "hostKeyProver", None)
        if (prover is None or self._stopped or self.identity.kind != AGENT
                or not policy.labrelay_peer(getattr(self.transport, "otherVersionString", None))):
            return False
        self.sendGlobalRequest(HOSTKEYS_AGAIN, prover.announcement(), wantReply=0)
        return True

    def proveHostKeys(self, data: bytes) -> tuple[bool, bytes]:
        """The answer to ``hostkeys-prove-00@openssh.com``: success with a signature
        per key; :class:`relay.ssh.hostkeyupdate.ProveRefused` for a request that
        names a key the relay does not hold or is malformed (a failure reply)."""
        transport: Any = self.transport
        prover: HostKeyProver = transport.factory.hostKeyProver
        try:
            client_algs = policy.KexInit.parse(transport.otherKexInitPayload[1:]).host_keys
        except (AttributeError, ValueError):
            client_algs = ()
        return True, prover.prove(data, transport.sessionID,
                                  getattr(transport, "keyAlg", None), client_algs)

    def activity(self) -> None:
        if self.keepalive is not None:
            self.keepalive.activity()

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.activity()
        super().packetReceived(messageNum, packet)

    def probe(self) -> defer.Deferred[bool]:
        """One keepalive: fires True when the peer answers (a refusal is an answer
        too), False when the connection stops before it does."""
        d = self.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)

        return d.addCallbacks(lambda _: True, refused_by_peer)

    def _dead(self, silence: float) -> None:
        self._log.warn(
            "{kind} {name} at {peer}: no answer for {silence:.1f}s; closing",
            event="relay_peer_dead", kind=self.identity.kind, name=self.principal_name,
            peer=self.peer, silence=silence,
        )
        self.transport.transport.abortConnection()

    def disconnect(self, why: str) -> None:
        self.transport.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, why.encode())

    def grantRevoked(self, bind: str, port: int, why: str) -> None:
        """Tell the agent its registration ``bind:port`` was dropped (its grant was
        revoked): ``grant-revoked@labrelay``, no reply wanted, so a stock ssh ignores it."""
        self.sendGlobalRequest(GRANT_REVOKED, pack_grant_revoked(bind, port, why), wantReply=0)

    # global requests, answered in order even when some take time

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        requestType, rest = common.getNS(packet)
        wantReply, data = rest[0:1] != b"\x00", rest[1:]
        replied: list[defer.Deferred[None]] = []
        self._handling = replied
        try:
            result = defer.maybeDeferred(self.core.globalRequest, self, requestType, data)
        finally:
            self._handling = None
        if not wantReply:
            result.addErrback(lambda f: self._log.failure("global request", f))
            result.addBoth(lambda _: _fire(replied))
            return
        # The payload is kept only where a refusal may name it (a forward's bind, port).
        slot = _PendingReply(requestType, data if requestType in EXPLAINED_REQUESTS else b"",
                             replied)
        self._replies.append(slot)

        def answered(outcome: Any) -> None:
            if isinstance(outcome, RefusedRequest):
                slot.why = outcome.why
            elif isinstance(outcome, tuple):
                ok, slot.reply = outcome
                slot.ok = bool(ok)
            else:
                slot.ok = bool(outcome)
            slot.done = True
            self._flushReplies()

        def failed(f: Failure) -> None:
            self._log.failure("global request {type}", f, type=requestType)
            slot.done = True
            self._flushReplies()

        result.addCallbacks(answered, failed)

    def whenReplied(self) -> defer.Deferred[None]:
        """Fires once the reply to the global request being handled now was sent.

        What a request granted may be used only after the peer heard so: a
        ``forwarded-tcpip`` sent ahead of its ``tcpip-forward``'s reply is refused by an
        agent that does not hold the forward as registered yet.  Replies go out in
        request order, so one request can wait behind another's (a takeover probe).
        Fails if the connection stops before the reply was sent; fires at once for a
        request that wants no reply, or outside any request."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._handling is None:
            d.callback(None)
        else:
            self._handling.append(d)
        return d

    def _flushReplies(self) -> None:
        from twisted.conch.ssh.connection import MSG_REQUEST_FAILURE, MSG_REQUEST_SUCCESS

        while self._replies and self._replies[0].done:
            slot = self._replies.pop(0)
            if self.transport is not None and not self._stopped:
                if not slot.ok and slot.why is not None:
                    self._explainRefusal(slot.request, slot.data, slot.why)
                self.transport.sendPacket(MSG_REQUEST_SUCCESS if slot.ok else MSG_REQUEST_FAILURE,
                                          slot.reply if slot.ok else b"")
                _fire(slot.replied)
            else:
                _fire(slot.replied, error.ConchError("connection stopped before the reply"))

    def _explainRefusal(self, request: bytes, data: bytes, why: str) -> None:
        """Tell a labrelay agent why its ``tcpip-forward``/``cancel-tcpip-forward`` is
        refused (``request-refused@labrelay``), just before the failure itself: SSH's
        ``REQUEST_FAILURE`` has no room for a reason.  Only a peer whose version string
        is labrelay's hears it, so a stock ``ssh -R`` sees exactly the failure it always
        did; a request the relay could not read names no bind and port, so nothing."""
        if request not in EXPLAINED_REQUESTS or not policy.labrelay_peer(
                getattr(self.transport, "otherVersionString", None)):
            return
        try:
            bind, port = unpack_forward(data)
        except ValueError:
            return
        self.sendGlobalRequest(REQUEST_REFUSED, pack_request_refused(request, bind, port, why),
                               wantReply=0)

    @property
    def leftOnPurpose(self) -> bool:
        """Whether the peer said goodbye by application before it went (a labrelay
        agent that stops): :attr:`RelayTransport.leftOnPurpose`."""
        return bool(getattr(self.transport, "leftOnPurpose", False))

    def serviceStopped(self) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        super().serviceStopped()
        replies, self._replies = self._replies, []
        for slot in replies:
            _fire(slot.replied, error.ConchError("connection stopped before the reply"))
        self.core.sessionStopped(self)

    # channels

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int,
                   data: bytes) -> Any:
        if len(self.channels) + self._pendingOpens >= self.core.config.max_channels:
            raise error.ConchError("too many channels on this connection",
                                   OPEN_RESOURCE_SHORTAGE)
        if channelType == RESUME_CHANNEL and self.resumable:
            return self._resumeSession(windowSize, maxPacket, data)
        if channelType != b"direct-tcpip":
            what = REFUSED_CHANNEL_TYPES.get(channelType, "this channel type")
            kind = channelType.decode("ascii", "replace")
            # One line per refusal was a log flood at the user's pace (600 `session`
            # opens, 600 lines): per key, the handler's allowance, then a count.
            if self.core.channelRefused(self, kind):
                self._log.info(
                    "{name}: refused {type} channel ({what} are not offered by the relay)",
                    event="relay_channel_refused", name=self.principal_name,
                    type=kind, what=what,
                )
            raise error.ConchError(f"{what} are not offered by this relay",
                                   OPEN_ADMINISTRATIVELY_PROHIBITED)
        try:
            host, port, origHost, origPort = unpack_endpoints(data)
        except ValueError as e:
            raise error.ConchError("malformed direct-tcpip", OPEN_CONNECT_FAILED) from e
        channel = BridgedChannel(
            b"direct-tcpip", window=self.core.config.window,
            maxPacket=self.core.config.max_packet, remoteWindow=windowSize,
            remoteMaxPacket=maxPacket, conn=self,
        )
        # The originator is the client's claim (an address); it is kept per session, shown
        # by `labrelay status` and passed to the agent, so only its first bytes are kept.
        origin = f"{origHost[:ORIGIN_LIMIT]}:{origPort}"
        return self.core.openUserSession(self, host, port, origin, channel)

    def openForwarded(self, bind: str, port: int, origHost: str, origPort: int,
                      onPending: Callable[[BridgedChannel], object] | None = None,
                      ) -> defer.Deferred[Any]:
        """Open a ``forwarded-tcpip`` channel to this agent for one session: its bridge
        side.  To an agent that said hello, a ``forwarded-resumable@labrelay`` whose
        side holds across a broken link (relay.ssh.resumable).  ``onPending`` is given
        the channel at once, before the agent answered, if the agent takes early bytes
        (``BridgedChannel.sendEarly``)."""
        resume, cfg = self.core.resume, self.core.config
        key = self.identity.key_blob
        # Capped: each resumable session keeps up to a window of replay here, and a
        # public port's connections are the internet's to open (docs/security.md);
        # per agent key too, or one agent's port could take every agent's share.
        resumable = (self.resumable and resume.enabled
                     and resume.count < cfg.resume_max_sessions
                     and resume.count_of(key) < cfg.resume_max_sessions_per_agent)
        channel = BridgedChannel(
            OPEN_RESUMABLE if resumable else b"forwarded-tcpip", window=self.core.config.window,
            maxPacket=policy.channel_max_packet(
                self.core.config.max_packet, self.core.config.window,
                getattr(self.transport, "otherVersionString", None)),
            conn=self,
        )
        data = pack_endpoints(bind, port, origHost, origPort)
        if self.earlyLimit and onPending is not None:
            channel.allowEarly(self.earlyLimit)
        if not resumable:
            self.openChannel(channel, data)
            if self.earlyLimit and onPending is not None:
                onPending(channel)
            return channel.opened
        sid = resume.new_sid()
        self.openChannel(channel, data + pack_sid(sid))
        if self.earlyLimit and onPending is not None:
            onPending(channel)
        service = f"public:{port}" if bind in PUBLIC_BINDS else f"{bind}:{port}"
        label = f"{service} from {origHost}:{origPort}"
        owner = self.resumeOwner
        resume.reserve(key)

        def opened(result: Any) -> Any:
            resume.unreserve(key)
            return result

        return channel.opened.addBoth(opened).addCallback(
            lambda ch: resume.open(sid, owner, ch, label))

    def _resumeSession(self, windowSize: int, maxPacket: int, data: bytes) -> BridgedChannel:
        """The agent resumes a held session on this new connection."""
        owner = self.resumeOwner
        try:
            return self.core.resume.accept(
                self, owner, self.core.config.window, self.core.config.max_packet,
                windowSize, maxPacket, data)
        except ResumeRefused as e:
            # Per key within the handler's allowance, then a count: one warning per
            # forged offer was a log flood at the agent's pace.
            if self.core.resumeRefused(self, str(e)):
                self._log.warn("agent {name}: refused to resume a session: {why}",
                               event="relay_resume_refused", name=self.principal_name,
                               why=str(e))
            raise error.ConchError(str(e), OPEN_CONNECT_FAILED) from e


def resume_owner(identity: Any, instance: bytes) -> ResumeOwner:
    """Who may resume a session opened to an agent: its key, its process (the hello's
    instance id) and, for a certificate, the login name it gave.  One certificate may be
    logged in under two names at once, each another agent with grants of its own
    (relay.server.keytrust): a session held for one is checked as that login while its
    link is down, and only that login resumes it.  A plain key's grants do not depend
    on the login: "" (as relay.server.expiry.holder).  The same process and login
    with a renewed certificate of the same key may resume it too
    (relay.core.resume.may_resume)."""
    login = identity.login if is_certificate(identity.key_blob) else ""
    return ResumeOwner(identity.key_blob, instance, login)


def _fire(waiting: list[defer.Deferred[None]], why: Exception | None = None) -> None:
    """Fire (or fail, with ``why``) the Deferreds waiting for a reply to be sent."""
    pending, waiting[:] = list(waiting), []
    for d in pending:
        if why is None:
            d.callback(None)
        else:
            d.errback(why)
