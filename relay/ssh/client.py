"""The client end of a link: Conch transport and connection service.

One :class:`LinkTransport` is one TCP connection to the upstream SSH server.  Its
phases are explicit (``phase``): ``handshake`` (version and key exchange; the host
key is checked here, before any credential is offered), ``auth`` (public keys
only), ``ready`` (the ``ssh-connection`` service runs), ``closed``.
:attr:`LinkTransport.ready` fires with the :class:`LinkConnection` once ready, or
fails with :class:`LinkSetupError` saying why the attempt ended; ``ClientService``
uses that as its ``prepareConnection`` hook, so a failed handshake counts as a
failed attempt and is retried with backoff.

What the transport needs of whoever owns the connection (settings, clock, host-key
verifier, identities, and the events of a ready link) is :class:`LinkOwner`, declared
here: the agent's :class:`relay.agent.link.Link` implements it, and
:func:`open_connection` opens one connection for a
:class:`relay.ssh.single.SingleConnection` owner (``labrelay connect``), so nothing here
imports the agent.  Public-key auth (:class:`LinkUserAuth`, identities and signers) is
in :mod:`relay.ssh.clientauth`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Protocol, cast

from twisted.conch import error
from twisted.conch.ssh import common, keys, transport
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay import __version__
from relay.config.errors import OperatorText
from relay.config.schema import LinkConfig, RemoteForward
from relay.core.burstlog import BurstLog
from relay.core.keepalive import KeepaliveMonitor
from relay.core.resume import OPEN_RESUMABLE, split_sid
from relay.core.sessioncap import SessionSlot
from relay.datapath.bridge import TCPSide
from relay.datapath.dialnow import connect_target
from relay.datapath.net import quickack
from relay.ssh import policy
from relay.ssh.aead import AEADTransportMixin
from relay.ssh.channels import BridgedChannel
from relay.ssh.clientauth import Identity, LinkUserAuth
from relay.ssh.connection import (
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    OPEN_RESOURCE_SHORTAGE,
    OPEN_UNKNOWN_CHANNEL_TYPE,
    FlowConnection,
)
from relay.ssh.guard import PeerInputGuard
from relay.ssh.hostkeys import HostKeyError, HostKeyVerifier, fingerprint_sha256
from relay.ssh.hostkeyupdate import (
    HOSTKEYS,
    HOSTKEYS_AGAIN,
    HOSTKEYS_PROVE,
    MAX_TOLD_HOST_KEYS,
    ProveRefused,
    pack_blobs,
    prove_signed_data,
    unpack_blobs,
)
from relay.ssh.openerrors import RefusedWithReason
from relay.ssh.peersoftware import client_version_string
from relay.ssh.resumable import ResumableSessions
from relay.ssh.wire import (
    EARLY_DATA,
    GRANT_REVOKED,
    REQUEST_REFUSED,
    RefusalNote,
    pack_endpoints,
    unpack_endpoints,
    unpack_grant_revoked,
    unpack_request_refused,
)
from relay.transport import explain
from relay.transport.dial import Dialer, Route

TARGET_CONNECT_TIMEOUT = 10.0

UNPROVEN_WINDOW = 10.0
"""Host-key proofs that failed are logged one line at the first, then one count line
per this many seconds while more come (relay.core.burstlog)."""


class ReverseForward(Protocol):
    """A reverse forward, as the connection sees one: its name and its config."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> RemoteForward: ...


class LinkBasics(Protocol):
    """What every part of a link reads of it: its name, settings, reactor and clock.
    :class:`LinkOwner` builds on it, and so do the agent's forwards and data pool
    (``relay.agent.forwards.ForwardOwner``, ``relay.agent.datapool.PoolOwner``)."""

    @property
    def name(self) -> str | None: ...

    @property
    def config(self) -> LinkConfig: ...

    @property
    def reactor(self) -> Any: ...

    @property
    def clock(self) -> IReactorTime: ...


class LinkOwner(LinkBasics, Protocol):
    """What a client connection needs of its owner (the agent's link, or one
    :class:`SingleConnection`)."""

    @property
    def verifier(self) -> HostKeyVerifier: ...

    @property
    def identities(self) -> Sequence[Identity]: ...

    def linkLost(self, transport: LinkTransport, why: str) -> None:
        """The transport of a ready connection closed."""

    def grantRevoked(self, bind: str, port: int, why: str) -> None:
        """The relay dropped our registration ``bind:port``."""

    def remoteForwardFor(self, host: str, port: int) -> ReverseForward | None:
        """The reverse forward a ``forwarded-tcpip`` channel to ``host:port`` is for."""

    def sessionStarted(self, forward: Any, side: Any, channel: Any,
                       origin: str, slot: SessionSlot | None = None) -> Any:
        """A forwarded session's channel opened (a :class:`BridgedChannel`, or the
        :class:`ResumableSide` around one): bridge it to ``side``; ``slot`` (its place
        in :meth:`admitSession`'s cap) is released when the session ends."""

    def admitSession(self, forward: str) -> SessionSlot | str:
        """A place for one more session the relay opens, or why it is refused (the
        agent's own cap, relay.core.sessioncap)."""

    def targetUnreachable(self, forward: str, target: str, reason: str) -> None:
        """A connect to ``forward``'s target failed (``target_unreachable``, logged
        once per burst per target)."""

    def openRelayService(self, name: str, port: int,
                         origin: str) -> defer.Deferred[BridgedChannel]:
        """A channel to a service of this node's own relay (chaining)."""

    @property
    def resume(self) -> ResumableSessions | None:
        """The link's resumable sessions (None: it resumes none)."""


class LinkSetupError(Exception):
    """A connection attempt ended before the link was ready; ``str()`` says why.
    ``keys_refused``: the server refused every key we offered (a refusal that does not
    go away by itself, unlike a network failure)."""

    def __init__(self, why: str, keys_refused: bool = False) -> None:
        super().__init__(why)
        self.keys_refused = keys_refused


class LinkPhase(StrEnum):
    """Where a connection attempt is: the host key is checked in ``HANDSHAKE``, before
    any credential is offered; only ``READY`` is a link (docs/design.md)."""

    HANDSHAKE = "handshake"
    AUTH = "auth"
    READY = "ready"
    CLOSED = "closed"


class LinkTransport(PeerInputGuard, AEADTransportMixin, transport.SSHClientTransport):
    """One connection attempt to the upstream server.

    Algorithms, strict KEX and key exchange bounds: :mod:`relay.ssh.policy` and
    :mod:`relay.ssh.aead` (the same as the relay's server side)."""

    _log = Logger()
    #: ``SSH-2.0-labrelay_<version>``: the relay shows which version each agent runs
    #: (relay.ssh.peersoftware); the relay's own line stays versionless.
    ourVersionString = client_version_string(__version__)

    def __init__(self, link: LinkOwner) -> None:
        self.link = link
        self.phase = LinkPhase.HANDSHAKE
        self.ready: defer.Deferred[LinkConnection] = defer.Deferred()
        self.why: str | None = None
        self.keysRefused = False  # the server refused every key (relay.ssh.clientauth)
        self.connection: LinkConnection | None = None
        self._timer: IDelayedCall | None = None
        # How this connection reached the server (set by relay.transport.dial).
        self.transport_route: Route | None = None

    @property
    def tcp(self) -> Any:
        """The TCP transport under the SSH transport."""
        return self.transport

    def connectionMade(self) -> None:
        self.tcp.setTcpNoDelay(True)
        self.tcp.setTcpKeepAlive(True)
        self._timer = self.link.clock.callLater(self.link.config.connect_timeout, self._timeout)
        self.kexClock = self.link.clock
        super().connectionMade()

    def knownHostKeyTypes(self) -> list[str]:
        return self.link.verifier.known_key_types()

    def _timeout(self) -> None:
        self._timer = None
        wait = self.link.config.connect_timeout
        route = self.transport_route
        if route is not None and route.tls and not (self.gotVersion or self.buf
                                                     or self._preBannerLines):
            # Inside TLS nothing reaches us before the TLS handshake is done: a relay
            # that never answered it (a proxy whose tunnel leads nowhere, a middlebox
            # that swallows port 443) is not "an SSH server" question.
            path = ("do the network and the proxy" if route.proxy is not None
                    else "does the network")
            self.why = (
                f"no TLS handshake (or no SSH version after it) within {wait:g}s over "
                f"{route}: is that the relay's TLS port, and {path} let it through?"
            )
        else:
            self.why = (
                f"no SSH handshake within {wait:g}s "
                f"(phase {self.phase}); is this an SSH server, and is it responsive?"
            )
        self.tcp.abortConnection()

    quickAck = True
    """Re-arm ``TCP_QUICKACK`` after each read (:func:`relay.datapath.net.quickack` says
    why): for a server that leaves Nagle on, such as OpenSSH's sshd.  A labrelay relay
    sets ``TCP_NODELAY`` on its end, so toward one it is a ``setsockopt`` per read for
    nothing (on the agent's open turn of every new session): off once its version line
    is known (:meth:`connectionSecure`)."""

    def dataReceived(self, data: bytes) -> None:
        if self.quickAck:
            quickack(self.transport)
        super().dataReceived(data)

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        conn = self.connection
        if conn is not None and conn.keepalive is not None:
            conn.keepalive.activity()
        super().dispatchMessage(messageNum, payload)

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[Any]:
        try:
            key = keys.Key.fromString(hostKey)
            matched = self.link.verifier.verify(key)
        except HostKeyError as e:
            self.why = str(e)
            self._log.error(
                "link {link}: host key refused: {reason}",
                event="hostkey_refused", link=self.link.name,
                reason=OperatorText(e),  # whole: its fix is at the end
            )
            return defer.fail(e)
        except keys.BadKeyError as e:
            self.why = f"server sent an unreadable host key: {e}"
            return defer.fail(e)
        self._log.debug(
            "link {link}: host key ok ({matched})", link=self.link.name, matched=matched
        )
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.quickAck = not policy.labrelay_peer(getattr(self, "otherVersionString", None))
        self.phase = LinkPhase.AUTH
        self.connection = LinkConnection(self.link)
        self.requestService(LinkUserAuth(self.link, self.connection))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if self.why is None and reason != transport.DISCONNECT_BY_APPLICATION:
            # A refusal of ours (relay.ssh.policy: no AEAD cipher in common, a strict
            # KEX violation, ...) is why this attempt failed.
            self.why = f"refused the server: {desc.decode('utf-8', 'replace')}"
        # A paused producer keeps Twisted from ever closing (see TCPSide.writeEOF).
        tcp = self.transport
        if tcp is not None and getattr(tcp, "producer", None) is not None:
            tcp.unregisterProducer()  # type: ignore[attr-defined]
        super().sendDisconnect(reason, desc)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        text = description.decode("utf-8", "replace")
        self.why = f"server disconnected: {text} (code {reasonCode})"

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        phase, self.phase = self.phase, LinkPhase.CLOSED
        super().connectionLost(reason)
        why = self.why or (reason.getErrorMessage() if reason is not None else "closed")
        if not self.ready.called:
            if phase is LinkPhase.AUTH and self.why is None:
                why = "authentication failed: the server accepted none of our keys"
                self.keysRefused = True
            elif phase is LinkPhase.HANDSHAKE and self.why is None and not self.gotVersion \
                    and (tls := self._tlsFailure(reason)) is not None:
                why = tls
            elif phase is LinkPhase.HANDSHAKE and self.why is None and not self.gotVersion:
                why = (f"the server closed the connection before its SSH version line ({why}): "
                       "refused at accept? A labrelay relay does so for a while after failed "
                       "logins from this address (as sshd 9.8+ does), past its "
                       "max_unauthenticated connections not yet logged in, or when it is out "
                       "of file descriptors; the relay's log says which "
                       "(relay_source_penalised, relay_unauth_cap, relay_accept_failed)")
            if phase is LinkPhase.AUTH:
                self._log.error(
                    "link {link}: {reason}", event="auth_failed", link=self.link.name,
                    reason=why,
                )
            self.ready.errback(LinkSetupError(why, self.keysRefused))
        else:
            self.link.linkLost(self, why)

    def _tlsFailure(self, reason: Failure | None) -> str | None:
        """Why the TLS handshake under this SSH connection failed, if it did (a route
        over TLS, nothing of SSH received): the port, the name or the certificate, said
        with the TLS port and the proxy (relay.transport.explain), not the plain SSH
        port's "refused at accept?" hint."""
        route = self.transport_route
        if route is None or not route.tls or reason is None or reason.value is None \
                or self.buf or self._preBannerLines:
            return None
        try:
            seen = self.transport.getPeerCertificate() is not None  # type: ignore[union-attr]
        except Exception:  # not a TLS transport, or its connection already gone
            seen = False
        cfg = self.link.config
        return explain.tls_failure(reason.value, certificate_seen=seen, host=route.host,
                                   port=route.port, proxy=route.proxy,
                                   server_name=cfg.transport.server_name or cfg.host)

    def markReady(self, conn: LinkConnection) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.phase = LinkPhase.READY
        self.ready.callback(conn)


class LinkConnection(FlowConnection):
    """The ``ssh-connection`` service of a ready link."""

    _log = Logger()

    takesShare = True  # the relay tags our channels with share@labrelay (whose bytes)

    def __init__(self, link: LinkOwner) -> None:
        super().__init__()
        self.link = link
        self.keepalive: KeepaliveMonitor | None = None
        self.resumable = False  # the relay answered our resume@labrelay hello
        # The relay's request-refused@labrelay, for the very next global reply only.
        self._refusal: RefusalNote | None = None
        self._hostKeysSeen = False  # the relay's hostkeys-00@openssh.com was handled
        self._proving = False  # a hostkeys-prove-00 of ours awaits the relay's answer
        # Proofs the relay refused or failed, logged once per burst: hostkeys-again is
        # taken as often as it comes, so a relay that announces keys it will not prove
        # in a loop made one warning each (300 lines for 300, at its pace).
        self._unproven: BurstLog | None = None

    @property
    def link_transport(self) -> LinkTransport:
        return cast(LinkTransport, self.transport)

    def serviceStarted(self) -> None:
        super().serviceStarted()
        ka = self.link.config.keepalive
        if ka.interval > 0:
            self.keepalive = KeepaliveMonitor(
                self.link.clock, ka.interval, ka.count_max, self._sendKeepalive, self._dead
            )
            self.keepalive.start()
        self.link_transport.markReady(self)

    def serviceStopped(self) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        if self._unproven is not None:
            self._unproven.stop()
        super().serviceStopped()

    def _hostKeysUnproven(self, why: str) -> None:
        """One ``link_hostkey_unproven`` warning per burst (:data:`UNPROVEN_WINDOW`)."""
        if self._unproven is None:
            name = self.link.name

            def first(why: str) -> None:
                self._log.warn("link {link}: {reason}", event="link_hostkey_unproven",
                               link=name, reason=why)

            def more(count: int, last: str) -> None:
                self._log.warn(
                    "link {link}: {count} more announcements of host keys not proven in "
                    "the last {window:.0f}s (the last: {reason})",
                    event="link_hostkey_unproven", link=name, count=count, reason=last,
                    window=UNPROVEN_WINDOW)

            self._unproven = BurstLog(self.link.clock, UNPROVEN_WINDOW, first, more)
        self._unproven.failed(why)

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        """``grant-revoked@labrelay``: the relay dropped one of our registrations
        (its grant was revoked); ``early-data@labrelay``: a channel's first bytes
        (relay.ssh.earlydata); ``request-refused@labrelay``: why the relay refuses the
        request it answers next (:meth:`ssh_REQUEST_FAILURE`); anything else as Conch
        does (refused)."""
        if requestType == EARLY_DATA and self.early is not None:
            self.earlyReceived(data)
            return 1
        if requestType == REQUEST_REFUSED:
            try:
                self._refusal = unpack_request_refused(data)
            except ValueError:
                self._refusal = None
                return 0
            return 1
        if requestType == GRANT_REVOKED:
            try:
                bind, port, why = unpack_grant_revoked(data)
            except ValueError:
                return 0
            self.link.grantRevoked(bind, port, why)
            return 1
        if requestType == HOSTKEYS:
            self._hostKeysAnnounced(data)
            return 1
        if requestType == HOSTKEYS_AGAIN:
            self._hostKeysAnnounced(data, again=True)
            return 1
        return super().gotGlobalRequest(requestType, data)

    def _hostKeysAnnounced(self, data: bytes, again: bool = False) -> None:
        """``hostkeys-00@openssh.com``: the relay's keys, its next one among them when a
        rotation is under way (relay.ssh.hostkeyupdate).  As ssh's ``UpdateHostKeys``:
        the keys the agent's known_hosts lacks are asked to be proven and, once their
        signatures verify over this session, appended beside the current line — only
        when the current key was accepted from the first user known_hosts file
        (:meth:`HostKeyVerifier.learnable`), and for the agent's link only
        (``learnHostKeys``; not ``labrelay connect``).  Nothing is removed.  A key the agent will
        not learn (a pin, a global file) is logged with the line to add, so that an
        operator gives it before the relay switches (docs/operations.md, rotating the
        host key); each key once in the link's life.

        ``again``: the relay's ``hostkeys-again@labrelay``, sent to its connected agents
        after a reload changed its keys; handled as the first announcement, as often as
        it comes, but not while a proof is awaited: at most one proof request of the
        agent's is out at a time, each for the keys still missing."""
        if again and self._proving:
            return
        if not again:
            if self._hostKeysSeen:
                return  # one per connection, as sshd sends it (ssh ends one told twice)
            self._hostKeysSeen = True
        try:
            blobs = unpack_blobs(data)
        except ProveRefused:
            return
        verifier = self.link.verifier
        learn = ([b for b in verifier.learnable(blobs) if _usable_host_key(b) is not None]
                 if getattr(self.link, "learnHostKeys", False) else [])
        if learn and self.transport is not None:
            self._proving = True
            d = self.sendGlobalRequest(HOSTKEYS_PROVE, pack_blobs(learn), wantReply=1)
            d.addBoth(self._proofAnswered)
            sid = bytes(getattr(self.transport, "sessionID", b"") or b"")
            d.addCallbacks(self._hostKeysProved, self._hostKeysNotProved,
                           callbackArgs=(learn, sid))
        for blob in verifier.unlisted(blobs):
            key = _usable_host_key(blob)
            if (blob in learn or blob in verifier.told or key is None
                    or len(verifier.told) >= MAX_TOLD_HOST_KEYS):
                continue  # a type Conch does not know: OpenSSH's client skips it too
            verifier.told.add(blob)  # once per link, not at every reconnect
            line = f"{verifier.hostname} {key.public().toString('OPENSSH').decode()}"
            self._log.info(
                "link {link}: the relay announces a host key {fingerprint} that this agent "
                "would refuse; before the relay switches to it, add to its known_hosts: "
                "{line}", event="link_hostkey_announced", link=self.link.name,
                fingerprint=fingerprint_sha256(key), line=line,
            )

    def _proofAnswered(self, result: Any) -> Any:
        self._proving = False
        return result

    def _hostKeysProved(self, packet: bytes, blobs: list[bytes], sid: bytes) -> None:
        """The relay's proof: one signature per key asked, in order, each over this
        session's identifier; every one must verify (an RSA one with SHA-2) or nothing
        is recorded."""
        try:
            sigs = unpack_blobs(packet, limit=len(blobs))
        except ProveRefused:
            sigs = []
        proven = []
        for blob, sig in zip(blobs, sigs, strict=False):
            key = _usable_host_key(blob)
            try:
                sig_type = common.getNS(sig)[0]
                good = (key is not None and sid != b""
                        and (key.sshType() != b"ssh-rsa"
                             or sig_type in (b"rsa-sha2-256", b"rsa-sha2-512"))
                        and key.verify(sig, prove_signed_data(sid, blob)))
            except Exception:  # a malformed signature is a failed proof
                good = False
            if key is not None and good:
                proven.append(key)
        if len(sigs) != len(blobs) or len(proven) != len(blobs):
            self._hostKeysUnproven("the relay did not prove the host keys it announced; "
                                   "none recorded")
            return
        for key in proven:
            try:
                where = self.link.verifier.learn(key)
            except HostKeyError as e:
                self._log.warn("link {link}: {reason}", event="link_hostkey_unproven",
                               link=self.link.name, reason=OperatorText(e))
                return
            self._log.info(
                "link {link}: learned the relay's host key {fingerprint} ({where})",
                event="link_hostkey_learned", link=self.link.name,
                fingerprint=fingerprint_sha256(key), where=where,
            )

    def _hostKeysNotProved(self, reason: Failure) -> None:
        if self.transport is not None and not reason.check(error.ConchError):
            self._log.failure("host key proof", reason)
            return
        self._hostKeysUnproven("the relay refused to prove the host keys it announced")

    def ssh_REQUEST_SUCCESS(self, packet: bytes) -> None:
        self._refusal = None  # it preceded a success: about nothing
        super().ssh_REQUEST_SUCCESS(packet)

    def ssh_REQUEST_FAILURE(self, packet: bytes) -> None:
        """A refused request: with the relay's reason when a ``request-refused@labrelay``
        came just before (:class:`RefusedWithReason`; whoever asked checks that the note
        names its request, :func:`relay.ssh.openerrors.refusal_reason`)."""
        note, self._refusal = self._refusal, None
        if note is None or not self.deferreds["global"]:
            super().ssh_REQUEST_FAILURE(packet)
            return
        self.deferreds["global"].pop(0).errback(RefusedWithReason(packet, note))

    def _sendKeepalive(self) -> None:
        d = self.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        d.addErrback(lambda _: None)  # a refusal is an answer too

    def _dead(self, silence: float) -> None:
        self._log.warn(
            "link {link}: no answer for {silence:.1f}s ({unanswered} keepalives); "
            "declaring it dead",
            event="link_dead", link=self.link.name, silence=silence,
            unanswered=self.keepalive.sent if self.keepalive else 0,
        )
        self.link_transport.why = f"dead: nothing received for {silence:.1f}s"
        self.link_transport.tcp.abortConnection()

    def _maxPacket(self) -> int:
        """The channel maximum packet to announce: larger to a labrelay relay."""
        cfg = self.link.config
        return policy.channel_max_packet(cfg.max_packet, cfg.window,
                                         getattr(self.transport, "otherVersionString", None))

    # reverse forwards: the server opens a channel per accepted connection

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int,
                   data: bytes) -> Any:
        """The two channel types a relay opens to an agent; any other is refused as
        Conch refuses it (``OPEN_UNKNOWN_CHANNEL_TYPE``).  Conch's own lookup builds a
        method name from the type and emits a debug event per open, in the agent's
        open turn of every new session (docs/benchmarks.md, round 11)."""
        if channelType == b"forwarded-tcpip":
            return self.channel_forwarded_tcpip(windowSize, maxPacket, data)
        if channelType == OPEN_RESUMABLE:
            return self.channel_forwarded_resumable_labrelay(windowSize, maxPacket, data)
        raise error.ConchError("unknown channel", OPEN_UNKNOWN_CHANNEL_TYPE)

    def channel_forwarded_tcpip(
        self, windowSize: int, maxPacket: int, data: bytes
    ) -> defer.Deferred[BridgedChannel]:
        return self._forwarded(windowSize, maxPacket, data, None)

    def channel_forwarded_resumable_labrelay(
        self, windowSize: int, maxPacket: int, data: bytes
    ) -> defer.Deferred[BridgedChannel]:
        """A ``forwarded-tcpip`` with a session id: the relay holds it across a broken
        link and so does this end (relay.ssh.resumable), if we said hello."""
        resume = self.link.resume
        if resume is None or not self.resumable:
            raise error.ConchError("resumable sessions were not negotiated",
                                   OPEN_ADMINISTRATIVELY_PROHIBITED)
        try:
            head, sid = split_sid(data)
        except ValueError as e:
            raise error.ConchError("malformed resumable open", OPEN_CONNECT_FAILED) from e
        if sid in resume.table:
            raise error.ConchError("session id in use", OPEN_CONNECT_FAILED)
        return self._forwarded(windowSize, maxPacket, head, sid)

    def _forwarded(self, windowSize: int, maxPacket: int, data: bytes,
                   sid: bytes | None) -> defer.Deferred[BridgedChannel]:
        try:
            connHost, connPort, origHost, origPort = unpack_endpoints(data)
        except ValueError as e:
            raise error.ConchError("malformed forwarded-tcpip", OPEN_CONNECT_FAILED) from e
        forward = self.link.remoteForwardFor(connHost, connPort)
        if forward is None:
            raise error.ConchError(
                "no such forward", OPEN_ADMINISTRATIVELY_PROHIBITED
            )
        # The agent's own cap (a relay taken over could open sessions without end):
        # refused before anything is connected.
        slot = self.link.admitSession(forward.name)
        if isinstance(slot, str):
            raise error.ConchError(slot, OPEN_RESOURCE_SHORTAGE)
        cfg = self.link.config
        channel = BridgedChannel(
            b"forwarded-tcpip", window=cfg.window, maxPacket=self._maxPacket(),
            remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=self,
        )
        target = forward.config.connect
        origin = f"{origHost}:{origPort}"

        def started(ch: BridgedChannel, side: Any) -> Any:
            resume = self.link.resume
            if sid is None or resume is None:
                return self.link.sessionStarted(forward, side, ch, origin, slot)
            held = resume.open(sid, None, ch, f"{forward.name} from {origin}")
            return self.link.sessionStarted(forward, side, held, origin, slot)

        def connected(side: Any) -> BridgedChannel:
            slot.connected()

            def notOpened(_: Failure) -> None:
                slot.release()
                side.abort()

            channel.opened.addCallbacks(lambda ch: started(ch, side), notOpened)
            return channel

        def failed(f: Failure) -> Failure:
            slot.release()
            self.link.targetUnreachable(forward.name, str(target), f.getErrorMessage())
            return Failure(error.ConchError(f"connect failed: {f.getErrorMessage()}",
                                            OPEN_CONNECT_FAILED))

        d: defer.Deferred[Any]
        if getattr(forward.config, "via_relay", False):
            # Chaining: the target is a service registered at this node's own relay.
            d = self.link.openRelayService(target.host, target.port, origin)
        else:
            # connect() in this turn, and for a target on this host the channel is
            # confirmed in it too (relay.datapath.dialnow): no reactor turn between
            # reading the open and connecting.
            d = connect_target(self.link.reactor, target.host, target.port,
                               TCPSide.readingAhead, TARGET_CONNECT_TIMEOUT)
        return d.addCallbacks(connected, failed)

    # local forwards: we open a channel per accepted connection

    def openDirect(
        self, host: str, port: int, origHost: str, origPort: int
    ) -> defer.Deferred[BridgedChannel]:
        cfg = self.link.config
        channel = BridgedChannel(
            b"direct-tcpip", window=cfg.window, maxPacket=self._maxPacket(), conn=self
        )
        self.openChannel(channel, pack_endpoints(host, port, origHost, origPort))
        return channel.opened


def transport_factory(owner: LinkOwner) -> Factory:
    """The factory of client transports for ``owner`` (one per connection attempt)."""
    return Factory.forProtocol(lambda: LinkTransport(owner))


async def open_connection(owner: LinkOwner, dialer: Dialer | None = None) -> LinkConnection:
    """One authenticated SSH connection for ``owner``: the connection (``dialer``'s
    routes: TCP, TLS, through a proxy; ``connect_timeout`` each), the handshake with
    its host-key check, public-key auth; fails with :class:`LinkSetupError` (or the
    connection's error) saying why.  With several routes (``transport = "auto"``) each
    is tried in turn until one gives a ready connection; the error then lists them all."""
    if dialer is None:
        dialer = Dialer(owner.reactor, owner.config)
    n = len(dialer.routes)
    if n == 1:
        proto = cast(LinkTransport, await dialer.connect(transport_factory(owner)))
        conn = await proto.ready
        dialer.worked(proto.transport_route or dialer.current)
        return conn
    # The dialer moves on by itself past a route that does not connect; this loop past
    # one that connected and did not become a link.  One round in all: each route is
    # tried once (the dialer tried every route of each attempt afresh: a round of three
    # routes was nine attempts, and the error said each failure three times, nested).
    errors: list[str] = []
    left = n
    while left > 0:
        before = dialer.index
        try:
            proto = cast(LinkTransport, await dialer.connect(transport_factory(owner),
                                                             tries=left, errors=errors))
        except Exception as e:  # every route left failed to connect; each is in errors
            if not errors:
                errors.append(str(e))
            break
        left -= (dialer.index - before) % n + 1
        route = proto.transport_route or dialer.current
        try:
            conn = await proto.ready
        except Exception as e:
            dialer.failed(route, str(e))
            errors.append(f"{route}: {e}")
            continue
        dialer.worked(route)
        return conn
    raise LinkSetupError("every route failed: " + "; ".join(errors))


MAX_HOST_KEY_BLOB = 4096
"""Bytes of an announced host key blob the agent parses at all.  The largest key it
accepts is RSA of 16 384 bits, OpenSSH's maximum (a 2 071-byte blob); a relay taken
over announced 1 MiB "RSA keys" (a random modulus), each parsed twice and echoed back
whole in a proof request, ~20 ms of the agent's CPU per MiB."""


def _usable_host_key(blob: bytes) -> keys.Key | None:
    """The public key in an announced blob, if it is one of the host key types the
    agent accepts (relay.ssh.policy) and of a size a host key has, else None."""
    if len(blob) > MAX_HOST_KEY_BLOB:
        return None
    try:
        key = keys.Key.fromString(blob)
    except Exception:  # BadKeyError, or a blob Conch's parser trips on
        return None
    if key.sshType() not in (b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp384",
                             b"ecdsa-sha2-nistp521", b"ssh-rsa"):
        return None
    return key
