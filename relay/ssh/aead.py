"""AEAD ciphers for Conch (AES-GCM and chacha20-poly1305), strict key exchange,
bounded key exchanges, and a leaner packet path.

RFC 5647 as OpenSSH implements it (PROTOCOL, "aes128-gcm@openssh.com"):

* the 4-byte ``packet_length`` is sent in clear and authenticated as the AEAD's
  associated data; ``padding_length || payload || padding`` is encrypted, and
  padded to a multiple of 16 bytes (at least 4 bytes of padding);
* the 12-byte nonce is the 4-byte fixed part of the IV followed by an 8-byte
  big-endian invocation counter that starts at the IV's last 8 bytes and is
  incremented (mod 2^64) after every packet;
* no separate MAC: the negotiated MAC is ignored ("implicit"); a 16-byte tag
  follows the ciphertext;
* the IV (12 bytes) comes from the "A"/"B" key-derivation letters and the key
  from "C"/"D", exactly as for the other ciphers: Conch's own ``_getKey``
  derives them and only the lengths taken here differ.

chacha20-poly1305@openssh.com (OpenSSH PROTOCOL.chacha20poly1305), built from
``cryptography``'s ChaCha20 and Poly1305 (:class:`ChaChaDirection`):

* 64 bytes of key from "C"/"D": the first 32 are the main key (payload and
  Poly1305 key), the last 32 the header key, which only encrypts the 4-byte
  packet length;
* the nonce is the packet's sequence number (64-bit big-endian) with a 64-bit
  block counter: 0 for the length, 1 onwards for the payload; the Poly1305 key
  is the first 32 bytes of the main key's block 0;
* the tag is Poly1305 over the encrypted length and the ciphertext, checked
  before anything is decrypted; padding aligns ``1 + payload + padding`` to 8.

Its nonce is the sequence number, so a peer that can shift sequence numbers
during the handshake (Terrapin, CVE-2023-48795) can drop the first packets
unnoticed: chacha20-poly1305 is only used with strict key exchange
(:mod:`relay.ssh.policy`), which resets sequence numbers at every NEWKEYS and
allows nothing but key exchange messages before the first one.  AES-GCM
authenticates the clear length and binds every packet to its sequence through
its own counter, and is not affected.

:class:`AEADTransportMixin` goes in front of Conch's ``SSHClientTransport`` or
``SSHServerTransport``.  It overrides:

* the offer: the algorithm lists of :mod:`relay.ssh.policy` (AEAD only, no
  compression), with the strict-KEX marker; ``ssh_KEXINIT`` checks the peer's
  KEXINIT against the policy before Conch negotiates (a refusal names what is
  allowed) and waives Conch's need for a MAC in common when both directions are
  AEAD (OpenSSH does not negotiate a MAC for an AEAD cipher at all, and Dropbear
  lists no ETM MAC);
* ``dispatchMessage``: :class:`relay.ssh.policy.KexGuard` refuses anything but
  key exchange messages before the first NEWKEYS (and, with strict KEX,
  IGNORE/DEBUG/UNIMPLEMENTED too, and a KEXINIT that is not the first packet);
  sequence numbers restart at 0 after each NEWKEYS under strict KEX;
* ``_keySetup``: the next keys are installed into :class:`PacketCiphers`, an
  ``SSHCiphers`` that knows GCM and chacha20-poly1305 (built once per key) and
  leaves the initial ``none`` cipher to Conch's code;
* ``sendPacket``: in an AEAD direction, one join of the plaintext, one seal,
  padding sliced from a per-connection pool of random bytes (not an
  ``os.urandom`` call per packet), and the parts written without concatenating
  them.  During a key exchange, messages that must wait are queued as Conch
  does, but counted: past ``connection.LINK_BUFFER`` bytes the ``ssh-connection``
  service is told (``keyExchangeBacklog``) and pauses the sources feeding its
  channels exactly as for a full TCP buffer; past ``KEX_BACKLOG_LIMIT`` the peer
  is dropped.  A key exchange that does not finish within ``kexTimeout``
  seconds drops the peer (a peer that sends KEXINIT and never finishes would
  otherwise hold the queue forever);
* ``dataReceived``/``getPacket``: packets are parsed straight out of each read;
  only the tail holding part of a packet is kept (Conch rebuilds ``self.buf``
  with ``buf + data`` per read and re-slices the remainder after every packet,
  quadratic in the read size: with the link's 1 MiB reads that alone cost more
  than 2 CPU-seconds per GiB).  The ``none`` cipher of the first key exchange:
  Conch's ``getPacket`` logic on that buffer;
* ``_newKeys``: logs the ciphers in use (event ``ssh_keys``) and counts key
  exchanges (``keyExchanges``);
* ``ssh_NEWKEYS`` (client side): Conch calls ``connectionSecure()`` after every
  NEWKEYS, which restarted user authentication at each rekey; only the first
  one is passed on.

It also adds :meth:`AEADTransportMixin.sendChannelData`, which frames a
``CHANNEL_DATA`` message straight into the packet plaintext (Conch's
``SSHConnection.sendData`` copies the data twice before ``sendPacket`` copies
it again; ``FlowConnection.sendData`` calls it), and starts a key exchange itself
after ``rekeyAfterBytes`` (Conch never does).
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh import transport
from twisted.conch.ssh.transport import (
    DISCONNECT_KEY_EXCHANGE_FAILED,
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    SSHCiphers,
)

from relay.ssh import policy
from relay.ssh.connection import LINK_BUFFER

AES128_GCM = policy.AES128_GCM
AES256_GCM = policy.AES256_GCM
CHACHA20_POLY1305 = policy.CHACHA20_POLY1305
GCM_KEY_SIZES = {AES128_GCM: 16, AES256_GCM: 32}
GCM_CIPHERS = list(policy.GCM_CIPHERS)

GCM_BLOCK = 16
GCM_TAG = 16
GCM_IV = 12
CHACHA_BLOCK = 8  # padding alignment (OpenSSH's block size for chacha20-poly1305)
CHACHA_KEY = 64
POLY_TAG = 16
MAX_PACKET_LENGTH = 1048576  # Conch's own limit (OpenSSH: 256 KiB)
PAD_POOL = 16384  # random padding bytes drawn at once
MSG_CHANNEL_DATA = 94
MSG_NEWKEYS = 21
_COUNTER_MASK = (1 << 64) - 1
#: Bytes of messages waiting for a key exchange to finish beyond which the peer is
#: dropped.  Channel sources pause at ``LINK_BUFFER``; what still arrives is bounded
#: by the channels' windows, so only a peer that keeps the exchange open while
#: pushing requests whose answers queue up gets here.  Each queued message counts
#: ``QUEUED_OVERHEAD`` bytes on top of its payload (Python's cost of holding it).
KEX_BACKLOG_LIMIT = 64 * 1024 * 1024
QUEUED_OVERHEAD = 128

_LENGTH = struct.Struct(">L")
_NONCE = struct.Struct(">LQ")
_SEQ = struct.Struct(">Q")
_CHANNEL_DATA_HEAD = struct.Struct(">BBLL")  # padding length, 94, channel, data length
_HEAD = struct.Struct(">BB")  # padding length, message number
_FIRST = struct.Struct("!LB")
_CTR0 = bytes(8)  # ChaCha20 block counter 0 (little-endian 64 bits)
_ZERO_BLOCK = bytes(64)


def _printable(names: bytes, limit: int = 300) -> str:
    """A peer's name-list for a log field: printable ASCII only, truncated."""
    text = "".join(chr(b) if 32 <= b < 127 else "?" for b in names[:limit])
    return text + ("..." if len(names) > limit else "")


def gcm_padding(n: int) -> int:
    """Padding for ``n`` bytes of ``msg || payload``: (1 + n + padding) % 16 == 0,
    at least 4 bytes."""
    pad = GCM_BLOCK - ((n + 1) % GCM_BLOCK)
    return pad + GCM_BLOCK if pad < 4 else pad


def chacha_padding(n: int) -> int:
    """Padding for ``n`` bytes of ``msg || payload``: (1 + n + padding) % 8 == 0,
    at least 4 bytes (the length field is not part of the alignment)."""
    pad = CHACHA_BLOCK - ((n + 1) % CHACHA_BLOCK)
    return pad + CHACHA_BLOCK if pad < 4 else pad


class GCMDirection:
    """One direction of AES-GCM: the key's ``AESGCM`` object and the nonce state."""

    __slots__ = ("aead", "counter", "fixed")
    block = GCM_BLOCK
    padding = staticmethod(gcm_padding)

    def __init__(self, key: bytes, iv: bytes) -> None:
        if len(iv) < GCM_IV:
            raise ValueError(f"AES-GCM needs a {GCM_IV}-byte IV, got {len(iv)}")
        self.aead = AESGCM(key)
        self.fixed, self.counter = _NONCE.unpack(iv[:GCM_IV])

    def nonce(self) -> bytes:
        """The nonce for the next packet; advances the invocation counter."""
        counter = self.counter
        self.counter = (counter + 1) & _COUNTER_MASK
        return _NONCE.pack(self.fixed, counter)

    def seal(self, seqnr: int, plain: bytes) -> tuple[bytes, ...]:
        """The packet on the wire for ``plain`` (``padding_length || ... ``)."""
        length = _LENGTH.pack(len(plain))
        return length, self.aead.encrypt(self.nonce(), plain, length)


class ChaChaDirection:
    """One direction of chacha20-poly1305@openssh.com (module docstring).

    Stateless between packets: the sequence number is the nonce."""

    __slots__ = ("header", "main")
    block = CHACHA_BLOCK
    padding = staticmethod(chacha_padding)

    def __init__(self, key: bytes) -> None:
        if len(key) < CHACHA_KEY:
            raise ValueError(f"chacha20-poly1305 needs {CHACHA_KEY} bytes of key, got {len(key)}")
        self.main = key[:32]
        self.header = key[32:CHACHA_KEY]

    def _stream(self, key: bytes, seqnr: int) -> Any:
        return Cipher(algorithms.ChaCha20(key, _CTR0 + _SEQ.pack(seqnr)), None).encryptor()

    def seal(self, seqnr: int, plain: bytes) -> tuple[bytes, ...]:
        length = self._stream(self.header, seqnr).update(_LENGTH.pack(len(plain)))
        stream = self._stream(self.main, seqnr)
        mac = Poly1305(stream.update(_ZERO_BLOCK)[:32])  # block 0; the payload starts at 1
        sealed = stream.update(plain)
        mac.update(length)
        mac.update(sealed)
        return length, sealed, mac.finalize()

    def length(self, seqnr: int, sealed: bytes | bytearray | memoryview) -> int:
        """The packet length from its first 4 bytes on the wire."""
        (n,) = _LENGTH.unpack(self._stream(self.header, seqnr).update(bytes(sealed)))
        return int(n)

    def open(self, seqnr: int, packet: memoryview, tag: memoryview) -> bytes | None:
        """``padding_length || payload || padding`` of ``packet`` (the encrypted
        length and the ciphertext), or None if the tag does not verify."""
        stream = self._stream(self.main, seqnr)
        mac = Poly1305(stream.update(_ZERO_BLOCK)[:32])
        mac.update(packet)
        try:
            mac.verify(bytes(tag))
        except InvalidSignature:
            return None
        return bytes(stream.update(packet[4:]))


AEADDirection = GCMDirection | ChaChaDirection


class PacketCiphers(SSHCiphers):
    """Conch's ``SSHCiphers`` that also knows the AEAD ciphers, direction by direction.

    ``outAEAD``/``inAEAD`` are the :class:`GCMDirection` or :class:`ChaChaDirection`
    of an AEAD direction, else ``None`` and that direction is Conch's cipher and
    MAC, set up by Conch's code (only ``none``, before the first key exchange, in
    labrelay's transports).  ``outGCM``/``inGCM`` name the same objects when they
    are GCM.
    """

    outAEAD: AEADDirection | None = None
    inAEAD: AEADDirection | None = None

    @property
    def outGCM(self) -> GCMDirection | None:
        return self.outAEAD if isinstance(self.outAEAD, GCMDirection) else None

    @property
    def inGCM(self) -> GCMDirection | None:
        return self.inAEAD if isinstance(self.inAEAD, GCMDirection) else None

    @classmethod
    def like(cls, other: SSHCiphers) -> PacketCiphers:
        """The same negotiated algorithms, before any key is set."""
        return cls(other.outCipType, other.inCipType, other.outMACType, other.inMACType)

    @staticmethod
    def _aead(cipher: bytes, iv: bytes, key: bytes) -> AEADDirection | None:
        size = GCM_KEY_SIZES.get(cipher)
        if size is not None:
            return GCMDirection(key[:size], iv)
        if cipher == CHACHA20_POLY1305:
            return ChaChaDirection(key)
        return None

    def setKeys(
        self,
        outIV: bytes,
        outKey: bytes,
        inIV: bytes,
        inKey: bytes,
        outInteg: bytes,
        inInteg: bytes,
    ) -> None:
        out = self._aead(self.outCipType, outIV, outKey)
        into = self._aead(self.inCipType, inIV, inKey)
        if out is None and into is None:
            super().setKeys(outIV, outKey, inIV, inKey, outInteg, inInteg)
            return
        if out is None:
            o = self._getCipher(self.outCipType, outIV, outKey)
            self.encryptor = o.encryptor()
            self.encBlockSize = o.algorithm.block_size // 8
            self.outMAC = self._getMAC(self.outMACType, outInteg)  # type: ignore[assignment]
        else:
            self.outAEAD = out
            self.encBlockSize = out.block
            self.outMAC = (None, b"", b"", 0)  # implicit
        if into is None:
            i = self._getCipher(self.inCipType, inIV, inKey)
            self.decryptor = i.decryptor()
            self.decBlockSize = i.algorithm.block_size // 8
            self.inMAC = self._getMAC(self.inMACType, inInteg)  # type: ignore[assignment]
            self.verifyDigestSize = self.inMAC[3]
        else:
            self.inAEAD = into
            self.decBlockSize = into.block
            self.inMAC = (None, b"", b"", 0)
            self.verifyDigestSize = 0


class AEADTransportMixin:
    """AEAD ciphers, strict KEX, bounded key exchanges and a leaner packet path for
    Conch's SSH transports (module docstring).

    Mix in first: ``class T(AEADTransportMixin, transport.SSHClientTransport)``.
    """

    ourVersionString = policy.VERSION_STRING

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

    _rbuf: bytearray | None = None  # the start of a packet not yet all received
    _first: bytes | None = None  # decrypted first block of a partial non-AEAD packet
    _chachaLength: int | None = None  # decrypted length of a partial chacha packet
    _readDead = False  # a fatal framing error: nothing more is parsed
    #: Set by the connection service once it runs (``FlowConnection``): the handler of
    #: ``MSG_CHANNEL_DATA``, given the payload as a memoryview into the decrypted
    #: packet.  A bulk stream is nearly all channel data, and Conch's dispatch of a
    #: message (transport -> service -> handler by name) was a fifth of the relay's
    #: Python per packet; every other message still goes through ``dispatchMessage``.
    channelDataHandler: Any = None
    _pad = b""
    _padOff = 0
    keyExchanges = 0  # completed key exchanges (the first one included)
    #: Start a key exchange after this many payload bytes either way under one key
    #: (OpenSSH's default for AES is 4 GiB or more; Conch itself never rekeys, so two
    #: labrelay ends would otherwise keep their first keys for the link's lifetime).
    rekeyAfterBytes = 1 << 30
    _bytesSinceKex = 0

    #: Seconds a key exchange may take before the peer is dropped; needs ``kexClock``.
    kexTimeout = 30.0
    #: ``IReactorTime`` for the key exchange timers (set by the transport; None: no timers).
    kexClock: Any = None
    #: Server: wait this long for the client's first KEXINIT before sending ours, so
    #: that the cipher offer can depend on the client's (policy.server_ciphers_for).
    kexInitWait = 0.0
    _kexTimer: Any = None
    _kexInitWaitCall: Any = None
    _firstKexInit = "pending"  # "pending", "waiting" (for the peer's), "sent"
    _kexBacklog = 0
    _kexBacklogFull = False
    _guard: policy.KexGuard | None = None

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
        if self._firstKexInit == "pending":
            if not self.isClient and self.kexInitWait > 0 and self.kexClock is not None:
                self._firstKexInit = "waiting"
                self._kexInitWaitCall = self.kexClock.callLater(
                    self.kexInitWait, self._kexInitWaitOver
                )
                self._armKexTimer()
                return
            self._firstKexInit = "sent"
        elif self._firstKexInit == "waiting":
            self._firstKexInit = "sent"
            call, self._kexInitWaitCall = self._kexInitWaitCall, None
            if call is not None and call.active():
                call.cancel()
        self._armKexTimer()
        super().sendKexInit()  # type: ignore[misc]

    def _kexInitWaitOver(self) -> None:
        """The client has not sent its KEXINIT: send ours (everything offered)."""
        self._kexInitWaitCall = None
        if self._firstKexInit == "waiting":
            self.sendKexInit()

    def ssh_KEXINIT(self, packet: bytes) -> None:
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
        if self._firstKexInit == "waiting":
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
        for name in ("_kexTimer", "_kexInitWaitCall"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    def _peerName(self) -> str:
        tcp = self.transport
        peer = tcp.getPeer() if tcp is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def _kexTimedOut(self) -> None:
        self._kexTimer = None
        tcp = self.transport
        self._log.warn(
            "key exchange #{count} with {peer} not finished after {timeout:g}s "
            "(kex_timeout); dropping the peer",
            event="ssh_kex_timeout", count=self.keyExchanges + 1, peer=self._peerName(),
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
                peer=self._peerName(),
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
        ):
            self._log.debug("rekeying after {n} bytes", n=self._bytesSinceKex)
            self._bytesSinceKex = 0
            self.sendKexInit()

    # -- sending

    def _padding(self, n: int) -> bytes:
        off = self._padOff
        if off + n > len(self._pad):
            self._pad = os.urandom(PAD_POOL)
            off = 0
        self._padOff = off + n
        return self._pad[off : off + n]

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE and not (
            self._allowedKeyExchangeMessageType(messageType)  # type: ignore[attr-defined]
        ):
            self._queueDuringKex(messageType, payload)
            return
        aead = getattr(self.currentEncryptions, "outAEAD", None)
        if aead is None:
            super().sendPacket(messageType, payload)  # type: ignore[misc]
            if self.sessionID is not None:
                self._count(len(payload))
        else:
            pad = aead.padding(1 + len(payload))
            plain = b"".join((_HEAD.pack(pad, messageType), payload, self._padding(pad)))
            self._sealAndWrite(aead, plain)
        if messageType == MSG_NEWKEYS and self.kexGuard.reset_after_newkeys():
            self.outgoingPacketSequence = 0

    def sendChannelData(self, remoteChannel: int, data: bytes | memoryview) -> None:
        """``CHANNEL_DATA`` to ``remoteChannel``; the same bytes on the wire as
        ``sendPacket(94, pack(">L", remoteChannel) + NS(data))``.  ``data`` may be a
        memoryview (a slice of a larger read): it is copied once, into the packet."""
        aead = getattr(self.currentEncryptions, "outAEAD", None)
        if aead is None or self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            self.sendPacket(MSG_CHANNEL_DATA, struct.pack(">2L", remoteChannel, len(data)) + data)
            return
        pad = aead.padding(9 + len(data))
        plain = b"".join(
            (
                _CHANNEL_DATA_HEAD.pack(pad, MSG_CHANNEL_DATA, remoteChannel, len(data)),
                data,
                self._padding(pad),
            )
        )
        self._sealAndWrite(aead, plain)

    def _sealAndWrite(self, aead: AEADDirection, plain: bytes) -> None:
        self.transport.writeSequence(aead.seal(self.outgoingPacketSequence, plain))
        self.outgoingPacketSequence = (self.outgoingPacketSequence + 1) & 0xFFFFFFFF
        self._count(len(plain))

    # -- receiving
    #
    # Packets are parsed straight out of each read (``bytes``, via memoryview
    # slices); only the tail of a read that holds part of a packet is kept, in
    # ``_rbuf``, and the next read tops it up to that one packet before parsing
    # goes back to the read itself.  So a received byte is copied into the
    # buffer at most once and a 1 MiB read is not copied at all (Conch appends
    # every read to ``self.buf`` and re-slices the remainder after each packet).

    def dataReceived(self, data: bytes) -> None:
        if not self.gotVersion:
            # Conch reads the version line, then calls self.getPacket() (ours)
            # for whatever followed it.
            super().dataReceived(data)  # type: ignore[misc]
            return
        if self._readDead:
            return
        rbuf = self._rbuf
        if rbuf is None:
            rbuf = self._rbuf = bytearray()
        if self.buf:  # left by Conch's version-line parsing
            rbuf += self.buf
            self.buf = b""
        pos = 0
        end = len(data)
        while not self._readDead:
            if rbuf:
                # Finish the partial packet: add only the bytes it still needs.
                need = self._pendingSize(rbuf)
                if need is None:
                    return  # a bad length: already disconnecting
                take = min(need - len(rbuf), end - pos)
                if take > 0:
                    rbuf += data[pos : pos + take]
                    pos += take
                got = self._nextPacket(rbuf, 0)
                if got is None:
                    if pos >= end or self._readDead:
                        return
                    continue  # its size is known now: top up again
                del rbuf[: got[2]]
            else:
                got = self._nextPacket(data, pos)
                if got is None:
                    if not self._readDead:
                        rbuf += data[pos:]
                    return
                pos = got[2]
            handler = self.channelDataHandler
            if (got[0] == MSG_CHANNEL_DATA and handler is not None
                    and not self.transport.disconnecting):
                handler(got[1])
            else:
                self.dispatchMessage(got[0], got[1])

    def getPacket(self) -> bytes | None:
        """One decoded payload (message number first), or ``None``: Conch's API
        (used by Conch's ``dataReceived`` for what followed the version line)."""
        rbuf = self._rbuf
        if rbuf is None:
            rbuf = self._rbuf = bytearray()
        if self.buf:
            rbuf += self.buf
            self.buf = b""
        got = self._nextPacket(rbuf, 0)
        if got is None:
            return None
        del rbuf[: got[2]]
        return bytes((got[0],)) + got[1]

    def _pendingSize(self, rbuf: bytearray) -> int | None:
        """Bytes the packet at the start of ``rbuf`` takes on the wire, as far as
        known (at least what is needed to learn more); None if its length is bad."""
        enc = self.currentEncryptions
        aead = getattr(enc, "inAEAD", None)
        if aead is not None:
            if len(rbuf) < 4:
                return 4
            if isinstance(aead, ChaChaDirection):
                n = self._chachaLength
                if n is None:
                    n = self._checkedChachaLength(aead, rbuf, 0)
                    if n is None:
                        return None
                return 4 + n + POLY_TAG
            return 4 + _LENGTH.unpack_from(rbuf)[0] + GCM_TAG
        first = self._first
        if first is None:
            return enc.decBlockSize
        return 4 + _LENGTH.unpack_from(first)[0] + enc.verifyDigestSize

    def _fatal(self, reason: int, why: bytes) -> None:
        """Disconnect for a transport-level fault of the peer (logged: event
        ``ssh_transport_error``); nothing more it sent is parsed."""
        if self._readDead:
            return
        self._readDead = True
        self._log.info(
            "disconnecting {peer}: {why}", event="ssh_transport_error", code=reason,
            why=why.decode("ascii", "replace"), peer=self._peerName(),
        )  # fmt: skip
        self.sendDisconnect(reason, why)  # type: ignore[attr-defined]

    def _nextPacket(self, buf: bytes | bytearray, off: int) -> tuple[int, bytes, int] | None:
        """(message number, payload, offset after it) of the packet at ``buf[off:]``,
        or None if it is not all there (or was bad: then ``_readDead`` is set)."""
        if self._readDead:
            return None
        enc = self.currentEncryptions
        aead = getattr(enc, "inAEAD", None)
        if aead is None:
            got = self._readClassic(enc, buf, off)
        elif isinstance(aead, GCMDirection):
            got = self._readGCM(aead, buf, off)
        else:
            got = self._readChacha(aead, buf, off)
        if got is None:
            return None
        if got[0] == MSG_NEWKEYS:
            self.kexGuard.newkeys_received()
            if self.kexGuard.reset_after_newkeys():
                self.incomingPacketSequence = 0
            else:
                self.incomingPacketSequence = (self.incomingPacketSequence + 1) & 0xFFFFFFFF
        else:
            self.incomingPacketSequence = (self.incomingPacketSequence + 1) & 0xFFFFFFFF
        if self.sessionID is not None:
            self._count(len(got[1]))
        return got

    def _readGCM(
        self, gcm: GCMDirection, buf: bytes | bytearray, off: int
    ) -> tuple[int, bytes, int] | None:
        avail = len(buf) - off
        if avail < 4:
            return None
        (packetLen,) = _LENGTH.unpack_from(buf, off)
        if packetLen > MAX_PACKET_LENGTH or packetLen < GCM_BLOCK:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % packetLen)
            return None
        if packetLen % GCM_BLOCK:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad packet mod (%d%%16)" % packetLen)
            return None
        end = off + 4 + packetLen + GCM_TAG
        if avail < end - off:
            return None
        with memoryview(buf) as view:
            try:
                plain = gcm.aead.decrypt(gcm.nonce(), view[off + 4 : end], view[off : off + 4])
            except InvalidTag:
                plain = None
        if plain is None:
            self._fatal(DISCONNECT_MAC_ERROR, b"bad MAC")
            return None
        return self._unpadded(plain, packetLen, end)

    def _unpadded(
        self, plain: bytes, packetLen: int, end: int
    ) -> tuple[int, bytes, int] | None:
        """``(message number, payload, end)`` of an AEAD packet's authenticated
        plaintext ``padding_length || payload || padding``; None (and disconnecting)
        when the padding length is impossible."""
        pad = plain[0]
        stop = packetLen - pad
        if pad < 4 or stop < 2:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % pad)
            return None
        if plain[1] == MSG_CHANNEL_DATA and self.channelDataHandler is not None:
            # Not copied here: the handler copies the data once, out of the packet.
            return MSG_CHANNEL_DATA, memoryview(plain)[2:stop], end  # type: ignore[return-value]
        return plain[1], plain[2:stop], end

    def _checkedChachaLength(
        self, ch: ChaChaDirection, buf: bytes | bytearray, off: int
    ) -> int | None:
        """The decrypted length of the chacha packet at ``buf[off:]`` (4 bytes there),
        kept until the packet is complete; None (and disconnecting) if it is bad."""
        with memoryview(buf) as view:
            packetLen = ch.length(self.incomingPacketSequence, view[off : off + 4])
        # Like OpenSSH: a length is only checked for range and alignment before the
        # tag is; a wrong one makes the tag fail once that many bytes arrived.
        if packetLen > MAX_PACKET_LENGTH or packetLen < CHACHA_BLOCK:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % packetLen)
            return None
        if packetLen % CHACHA_BLOCK:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad packet mod (%d%%8)" % packetLen)
            return None
        self._chachaLength = packetLen
        return packetLen

    def _readChacha(
        self, ch: ChaChaDirection, buf: bytes | bytearray, off: int
    ) -> tuple[int, bytes, int] | None:
        avail = len(buf) - off
        if avail < 4:
            return None
        packetLen = self._chachaLength
        if packetLen is None:
            packetLen = self._checkedChachaLength(ch, buf, off)
            if packetLen is None:
                return None
        end = off + 4 + packetLen + POLY_TAG
        if avail < end - off:
            return None
        self._chachaLength = None
        with memoryview(buf) as view:
            plain = ch.open(
                self.incomingPacketSequence, view[off : end - POLY_TAG], view[end - POLY_TAG : end]
            )
        if plain is None:
            self._fatal(DISCONNECT_MAC_ERROR, b"bad MAC")
            return None
        return self._unpadded(plain, packetLen, end)

    def _readClassic(
        self, enc: SSHCiphers, buf: bytes | bytearray, off: int
    ) -> tuple[int, bytes, int] | None:
        """Conch's ``getPacket`` on ``buf[off:]``: Conch's cipher, MAC and checks."""
        bs = enc.decBlockSize
        ms = enc.verifyDigestSize
        avail = len(buf) - off
        if avail < bs:
            return None
        first = self._first
        if first is None:
            first = enc.decrypt(bytes(buf[off : off + bs]))
        packetLen, paddingLen = _FIRST.unpack(first[:5])
        if packetLen > MAX_PACKET_LENGTH:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % packetLen)
            return None
        if avail < packetLen + 4 + ms:
            self._first = first
            return None
        self._first = None
        if (packetLen + 4) % bs != 0:
            self._fatal(
                DISCONNECT_PROTOCOL_ERROR,
                b"bad packet mod (%i%%%i == %i)" % (packetLen + 4, bs, (packetLen + 4) % bs),
            )
            return None
        end = off + 4 + packetLen
        packet = first + enc.decrypt(bytes(buf[off + bs : end]))
        if len(packet) != 4 + packetLen:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad decryption")
            return None
        if ms:
            mac = bytes(buf[end : end + ms])
            if not enc.verify(self.incomingPacketSequence, packet, mac):
                self._fatal(DISCONNECT_MAC_ERROR, b"bad MAC")
                return None
        stop = len(packet) - paddingLen
        if stop < 6:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % paddingLen)
            return None
        return packet[5], packet[6:stop], end + ms
