"""The key exchange of labrelay's SSH transports (:class:`KexMixin`, the base of
:class:`relay.ssh.aead.AEADTransportMixin`, whose docstring has the whole list): the
offer and strict KEX, bounded key exchanges (a timeout, a counted backlog), the keys
installed into :class:`relay.ssh.ciphers.PacketCiphers`, rekeying after
``rekeyAfterBytes``, the pace of the key exchanges a peer starts (``kexPacer``), and
the one place a transport-level fault of the peer disconnects
(``_fatal``)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from twisted.conch.ssh import transport
from twisted.conch.ssh.transport import (
    DISCONNECT_KEY_EXCHANGE_FAILED,
    DISCONNECT_PROTOCOL_ERROR,
    SSHCiphers,
)

from relay.core.ratelimit import TokenBucket
from relay.ssh import policy
from relay.ssh.ciphers import PacketCiphers
from relay.ssh.connection import LINK_BUFFER

#: Bytes of messages waiting for a key exchange to finish beyond which the peer is
#: dropped.  Channel sources pause at ``LINK_BUFFER``; what still arrives is bounded
#: by the channels' windows, so only a peer that keeps the exchange open while
#: pushing requests whose answers queue up gets here.  Each queued message counts
#: ``QUEUED_OVERHEAD`` bytes on top of its payload (Python's cost of holding it).
KEX_BACKLOG_LIMIT = 64 * 1024 * 1024
QUEUED_OVERHEAD = 128
#: Key exchanges a peer may start after the first one, at once (``KEX_PACE_BURST``) and
#: then per second (``KEX_PACE_RATE``), on one connection of the relay's
#: (:func:`kex_pacer`).  Each costs the relay a curve25519 or ML-KEM exchange, a host
#: key signature and the key derivation (~0.9-1.4 ms of its one thread); a user who
#: re-keyed in a loop (paramiko, six connections) took 2 400 in 5 s, 41 % of a core,
#: without limit (docs/security.md).  OpenSSH re-keys after gigabytes by default; a
#: client set to ``RekeyLimit=1M`` moving 8 MiB asks for about 12.
KEX_PACE_BURST = 16
KEX_PACE_RATE = 1.0
#: The same for all the connections of one user together (:func:`user_kex_pacer`,
#: round 17): with ``max_connections_per_user`` (64) connections the pace per
#: connection alone let her have 64 a second and 64 bursts of 16 (~6-9 % of a core
#: and ~1 s of it at once).  A re-key of hers waits for a token of both buckets.
#: Two clients of hers set to ``RekeyLimit=1M`` moving 8 MiB at once (~24) still
#: fit in the burst; past it her re-keys take longer, never fail.
USER_KEX_PACE_BURST = 32
USER_KEX_PACE_RATE = 2.0


def kex_pacer(now: float) -> TokenBucket:
    """The bucket a relay connection's peer-started key exchanges draw on."""
    return TokenBucket(KEX_PACE_RATE, KEX_PACE_BURST, now)


def user_kex_pacer(now: float) -> TokenBucket:
    """The bucket all of one user's connections' key exchanges draw on as well (set
    once she is authenticated: before, a connection has its own pace only)."""
    return TokenBucket(USER_KEX_PACE_RATE, USER_KEX_PACE_BURST, now)


def _printable(names: bytes, limit: int = 300) -> str:
    """A peer's name-list for a log field: printable ASCII only, truncated."""
    text = "".join(chr(b) if 32 <= b < 127 else "?" for b in names[:limit])
    return text + ("..." if len(names) > limit else "")


class FirstKexInit(Enum):
    """Our first KEXINIT: not yet sent; held back (the server waits ``kexInitWait`` for
    the client's, to fit its cipher offer to it); sent."""

    PENDING = "pending"
    WAITING = "waiting"
    SENT = "sent"


class KexMixin:
    """The offer, strict KEX and bounded key exchanges for Conch's SSH transports
    (module docstring); the base of :class:`relay.ssh.aead.AEADTransportMixin`."""

    supportedCiphers = list(policy.CIPHERS)
    supportedMACs = list(policy.MACS)
    supportedCompressions = list(policy.COMPRESSIONS)

    # Provided by SSHTransportBase (declared for the type checker).
    transport: Any
    currentEncryptions: SSHCiphers
    nextEncryptions: SSHCiphers
    gotVersion: bool
    isClient: bool
    _gotNewKeys: int
    sessionID: bytes | None
    buf: bytes
    outgoingPacketSequence: int
    incomingPacketSequence: int
    outgoingCompression: Any
    incomingCompression: Any
    _keyExchangeState: str
    _KEY_EXCHANGE_NONE: str
    _blockedByKeyExchange: Any
    _log: Any
    service: Any
    supportedKeyExchanges: list[bytes]
    supportedPublicKeys: list[bytes]

    _readDead = False  # a fatal framing error: nothing more is parsed
    keyExchanges = 0  # completed key exchanges (the first one included)
    #: Start a key exchange after this many payload bytes either way under one key
    #: (OpenSSH's default for AES is 4 GiB or more; Conch itself never rekeys, so two
    #: labrelay ends would otherwise keep their first keys for the link's lifetime).
    rekeyAfterBytes = 1 << 30
    _bytesSinceKex = 0
    #: Our KEXINIT is being sent: the bytes metered meanwhile start no other.  Sending it
    #: can take the stream back from the native thread (relay.ssh.nativeforward), whose
    #: handback meters the thread's last bytes; had they run the budget out again, a
    #: second KEXINIT went out inside the first one's send (two in a row: the peer's
    #: key exchange fails), and Conch, finishing the outer one, would empty the queue of
    #: what waits for the new keys that the inner one began.  A budget smaller than a
    #: KEXINIT recursed without end the same way (its own bytes are metered as it is
    #: sent).
    _kexInitSending = False

    #: Seconds a key exchange may take before the peer is dropped; needs ``kexClock``.
    kexTimeout = 30.0
    #: ``IReactorTime`` for the key exchange timers (set by the transport; None: no timers).
    kexClock: Any = None
    #: Server: wait this long for the client's first KEXINIT before sending ours, so
    #: that the cipher offer can depend on the client's (policy.server_ciphers_for).
    kexInitWait = 0.0
    _kexTimer: Any = None
    _kexInitWaitCall: Any = None
    _firstKexInit: FirstKexInit = FirstKexInit.PENDING
    _kexBacklog = 0
    _kexBacklogFull = False
    _guard: policy.KexGuard | None = None
    #: The pace of key exchanges the peer starts after the first (None: no pace; the
    #: relay's server sets one, :func:`kex_pacer`).  A KEXINIT that comes before the
    #: bucket has a token for it is held, and nothing more of the peer is read, until
    #: it has (the peer may send nothing but key exchange messages after its KEXINIT
    #: anyway, RFC 4253 §7.1): slower re-keys, never a refusal.  Needs ``kexClock``.
    kexPacer: TokenBucket | None = None
    #: The pace shared by all the connections of the peer's user (None: none, as
    #: before authentication; the relay sets :func:`user_kex_pacer`'s, one per user).
    #: Charged with ``kexPacer``: the KEXINIT waits for the later of the two.
    kexUserPacer: TokenBucket | None = None
    kexesPaced = 0  # peer KEXINITs held for the pace (status, tests)
    _pacedKexInit: bytes | None = None  # the peer's KEXINIT while it is held
    _kexPaceCall: Any = None

    # -- the offer and the key exchange

    @property
    def kexGuard(self) -> policy.KexGuard:
        if self._guard is None:
            self._guard = policy.KexGuard(self.isClient)
        return self._guard

    def knownHostKeyTypes(self) -> list[str]:
        """Client: host key types recorded for the server, preferred in the offer."""
        return []

    def connectionMade(self) -> None:
        if self.isClient:
            kex = policy.client_kex(transport.SSHClientTransport.supportedKeyExchanges)
            self.supportedPublicKeys = policy.client_host_key_algorithms(
                self.knownHostKeyTypes()
            )
        else:
            kex = list(policy.KEX_ALGORITHMS)
            self.supportedPublicKeys = policy.server_host_key_algorithms(
                self.supportedPublicKeys
            )
        self.supportedKeyExchanges = [*kex, self.kexGuard.our_marker]
        super().connectionMade()  # type: ignore[misc]

    def sendKexInit(self) -> None:
        if self._firstKexInit is FirstKexInit.PENDING:
            if not self.isClient and self.kexInitWait > 0 and self.kexClock is not None:
                self._firstKexInit = FirstKexInit.WAITING
                self._kexInitWaitCall = self.kexClock.callLater(
                    self.kexInitWait, self._kexInitWaitOver
                )
                self._armKexTimer()
                return
            self._firstKexInit = FirstKexInit.SENT
        elif self._firstKexInit is FirstKexInit.WAITING:
            self._firstKexInit = FirstKexInit.SENT
            call, self._kexInitWaitCall = self._kexInitWaitCall, None
            if call is not None and call.active():
                call.cancel()
        self._armKexTimer()
        self._kexInitSending = True
        try:
            super().sendKexInit()  # type: ignore[misc]
        finally:
            self._kexInitSending = False

    def _kexInitWaitOver(self) -> None:
        """The client has not sent its KEXINIT: send ours (everything offered)."""
        self._kexInitWaitCall = None
        if self._firstKexInit is FirstKexInit.WAITING:
            self.sendKexInit()

    def ssh_KEXINIT(self, packet: bytes) -> None:
        pacer, clock = self.kexPacer, self.kexClock
        if (pacer is not None and clock is not None and self.keyExchanges >= 1
                and self._keyExchangeState == self._KEY_EXCHANGE_NONE):
            # The peer starts a re-key (not an answer to ours): one token each.
            now = clock.seconds()
            wait = pacer.charge(1, now)
            shared = self.kexUserPacer
            if shared is not None:
                # Charged even when this connection's own bucket already holds the
                # KEXINIT: each held one takes its place in her queue, so her held
                # re-keys are spread at her rate, whatever the number of connections.
                wait = max(wait, shared.charge(1, now))
            if wait > 0:
                self.kexesPaced += 1
                self._pacedKexInit = packet
                self._kexPaceCall = clock.callLater(wait, self._kexPaceDue)
                self.kexPaced(wait)
                return
        self._kexInitReceived(packet)

    def kexPaced(self, wait: float) -> None:
        """The peer's KEXINIT is held ``wait`` seconds (a hook: the relay logs it)."""

    @property
    def kexInitHeld(self) -> bool:
        """Whether a peer KEXINIT is held for the pace: read nothing more meanwhile."""
        return self._pacedKexInit is not None

    def _kexPaceDue(self) -> None:
        self._kexPaceCall = None
        packet, self._pacedKexInit = self._pacedKexInit, None
        if packet is None or self._readDead or self.transport is None:
            return
        self._kexInitReceived(packet)
        self.kexPaceOver()

    def kexPaceOver(self) -> None:
        """The held KEXINIT was handled: read the peer again (the packet path's)."""

    def _kexInitReceived(self, packet: bytes) -> None:
        guard = self.kexGuard
        try:
            peer = policy.KexInit.parse(packet)
        except ValueError as e:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, str(e).encode())
            return
        why = guard.kexinit_received(peer.kex, (self.incomingPacketSequence - 1) & 0xFFFFFFFF)
        if why is not None:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, why.encode())
            return
        if self._firstKexInit is FirstKexInit.WAITING:
            self.supportedCiphers = policy.server_ciphers_for(peer)
        if self._keyExchangeState == self._KEY_EXCHANGE_NONE:
            # Ours first (Conch would send it from inside its negotiation): the
            # MAC waiver below must not leak into our own KEXINIT.
            self.sendKexInit()
        ours = policy.Offer(
            self.supportedKeyExchanges, self.supportedPublicKeys, self.supportedCiphers,
            self.supportedMACs, self.supportedCompressions,
        )  # fmt: skip
        result = policy.negotiate(ours, peer, self.isClient, guard.strict)
        if result.error is not None:
            self._log.info(
                "key exchange refused: {why}", event="ssh_kex_refused", why=result.error,
                peer_ciphers=_printable(b",".join(peer.ciphers_cs)),
                peer_kex=_printable(b",".join(peer.kex)),
            )
            self._fatal(DISCONNECT_KEY_EXCHANGE_FAILED, result.error.encode())
            return
        self._armKexTimer()
        if not result.mac_waived:
            super().ssh_KEXINIT(packet)  # type: ignore[misc]
            return
        # Both directions AEAD: the MAC is implicit.  Conch still wants a name in
        # common; give it the peer's, which nothing ever uses.
        saved = self.__dict__.get("supportedMACs")
        self.supportedMACs = [*self.supportedMACs, *peer.macs_cs, *peer.macs_sc]
        try:
            super().ssh_KEXINIT(packet)  # type: ignore[misc]
        finally:
            if saved is None:
                del self.supportedMACs
            else:
                self.supportedMACs = saved

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        why = self.kexGuard.check(messageNum)
        if why is not None:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, why.encode())
            return
        super().dispatchMessage(messageNum, payload)  # type: ignore[misc]

    # -- key exchange timers and backlog

    def _armKexTimer(self) -> None:
        if self._kexTimer is None and self.kexClock is not None and self.kexTimeout > 0:
            self._kexTimer = self.kexClock.callLater(self.kexTimeout, self._kexTimedOut)

    def _disarmKexTimers(self) -> None:
        for name in ("_kexTimer", "_kexInitWaitCall", "_kexPaceCall"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    def peerName(self) -> str:
        """The peer as ``host:port``, the form every labrelay event gives an address in
        (an admin greps one form; Twisted's ``str(IPv4Address)`` is another)."""
        tcp = self.transport
        peer = tcp.getPeer() if tcp is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def _kexTimedOut(self) -> None:
        self._kexTimer = None
        tcp = self.transport
        self._log.warn(
            "key exchange #{count} with {peer} not finished after {timeout:g}s "
            "(kex_timeout); dropping the peer",
            event="ssh_kex_timeout", count=self.keyExchanges + 1, peer=self.peerName(),
            timeout=self.kexTimeout, queued=self._kexBacklog,
        )  # fmt: skip
        self._fatal(DISCONNECT_KEY_EXCHANGE_FAILED, b"key exchange timed out")
        if tcp is not None:
            # Whatever is queued for a peer that does not read must not hold us.
            tcp.abortConnection()

    def _queueDuringKex(self, messageType: int, payload: bytes) -> None:
        """Conch's queue for messages that wait for the key exchange, with a bound."""
        self._blockedByKeyExchange.append((messageType, payload))
        self._kexBacklog += len(payload) + QUEUED_OVERHEAD
        if self._kexBacklog > KEX_BACKLOG_LIMIT:
            self._log.warn(
                "{queued} bytes wait for a key exchange {peer} does not finish; "
                "dropping the peer", event="ssh_kex_backlog", queued=self._kexBacklog,
                peer=self.peerName(),
            )  # fmt: skip
            self._blockedByKeyExchange.clear()
            self._fatal(DISCONNECT_KEY_EXCHANGE_FAILED, b"key exchange backlog over limit")
            if self.transport is not None:
                self.transport.abortConnection()
            return
        if not self._kexBacklogFull and self._kexBacklog > LINK_BUFFER:
            self._kexBacklogFull = True
            self._tellBacklog(True)

    def _tellBacklog(self, full: bool) -> None:
        hook = getattr(self.service, "keyExchangeBacklog", None)
        if hook is not None:
            hook(full)

    # -- keys

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        if not isinstance(self.nextEncryptions, PacketCiphers):
            self.nextEncryptions = PacketCiphers.like(self.nextEncryptions)
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]

    def _newKeys(self) -> None:
        self._bytesSinceKex = 0
        timer, self._kexTimer = self._kexTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._kexBacklog = 0
        super()._newKeys()  # type: ignore[misc]  # sends what was queued
        if self.outgoingCompression is not None or self.incomingCompression is not None:
            # The policy offers only "none"; Conch's zlib inflates without a bound.
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"compression is not supported")
            return
        if self._kexBacklogFull:
            self._kexBacklogFull = False
            self._tellBacklog(False)
        self.keyExchanges += 1
        enc = self.currentEncryptions
        outMAC = "<implicit>" if getattr(enc, "outAEAD", None) else enc.outMACType.decode()
        inMAC = "<implicit>" if getattr(enc, "inAEAD", None) else enc.inMACType.decode()
        self._log.info(
            "SSH keys #{count}: out {cipher_out} MAC {mac_out}, in {cipher_in} MAC {mac_in}",
            event="ssh_keys",
            count=self.keyExchanges,
            cipher_out=enc.outCipType.decode(),
            mac_out=outMAC,
            cipher_in=enc.inCipType.decode(),
            mac_in=inMAC,
            kex=getattr(self, "kexAlg", b"?").decode(),
            host_key=getattr(self, "keyAlg", b"?").decode(),
            strict_kex=self.kexGuard.strict,
        )

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        """Conch's client calls ``connectionSecure()`` after *every* NEWKEYS, so each
        rekey would request ``ssh-userauth`` again (OpenSSH answers UNIMPLEMENTED,
        "kex_protocol_error: type 5") and restart the client's services: only the
        first key exchange is "the connection is secure"."""
        if not self.isClient or self.keyExchanges == 0:
            super().ssh_NEWKEYS(packet)  # type: ignore[misc]
            return
        if packet != b"":
            self.sendDisconnect(  # type: ignore[attr-defined]
                DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS takes no data"
            )
            return
        if not self.nextEncryptions.encBlockSize:
            self._gotNewKeys = 1  # our keys are not set up yet; _keySetup calls us again
            return
        self._gotNewKeys = 0
        self._newKeys()

    def connectionLost(self, reason: Any = None) -> None:
        self._disarmKexTimers()
        super().connectionLost(reason)  # type: ignore[misc]

    def _count(self, nbytes: int) -> None:
        """Payload bytes moved under the current keys; rekey past ``rekeyAfterBytes``."""
        self._bytesSinceKex += nbytes
        if (
            self._bytesSinceKex > self.rekeyAfterBytes
            and self._keyExchangeState == self._KEY_EXCHANGE_NONE
            and self.sessionID is not None
            and not self._kexInitSending
        ):
            self._log.debug("rekeying after {n} bytes", n=self._bytesSinceKex)
            self._bytesSinceKex = 0
            self.sendKexInit()

    def _fatal(self, reason: int, why: bytes) -> None:
        """Disconnect for a transport-level fault of the peer (logged: event
        ``ssh_transport_error``); nothing more it sent is parsed."""
        if self._readDead:
            return
        self._readDead = True
        if getattr(self.transport, "disconnecting", False):  # type: ignore[attr-defined]
            # Conch already sent its own DISCONNECT (a bad KEXINIT, an unknown
            # service ...) earlier in this read: nothing more to send or parse.
            return
        self._log.info(
            "disconnecting {peer}: {why}", event="ssh_transport_error", code=reason,
            why=why.decode("ascii", "replace"), peer=self.peerName(),
        )  # fmt: skip
        self.sendDisconnect(reason, why)  # type: ignore[attr-defined]
