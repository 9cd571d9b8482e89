"""AES-GCM for Conch (``aes128-gcm@openssh.com``, ``aes256-gcm@openssh.com``) and a
leaner packet path.

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

Neither chacha20-poly1305 nor any ``-etm`` MAC is offered: both are open to the
Terrapin prefix truncation (CVE-2023-48795) without strict key exchange, which
Conch lacks.  AES-GCM authenticates the clear length and binds every packet to
its sequence through the nonce, and is not affected.

:class:`AEADTransportMixin` goes in front of Conch's ``SSHClientTransport`` or
``SSHServerTransport``.  It overrides:

* ``_keySetup``: the next keys are installed into :class:`PacketCiphers`, an
  ``SSHCiphers`` that knows GCM (one ``AESGCM`` object per direction, built once
  per key) and leaves every other cipher and MAC to Conch's code;
* ``sendPacket``: in a GCM direction, one join of the plaintext, one
  ``AESGCM.encrypt``, padding sliced from a per-connection pool of random bytes
  (not an ``os.urandom`` call per packet), and the clear length and the
  ciphertext written without concatenating them.  Other ciphers: Conch's
  ``sendPacket``, unchanged;
* ``dataReceived``/``getPacket``: packets are parsed straight out of each read;
  only the tail holding part of a packet is kept (Conch rebuilds ``self.buf``
  with ``buf + data`` per read and re-slices the remainder after every packet,
  quadratic in the read size: with the link's 1 MiB reads that alone cost more
  than 2 CPU-seconds per GiB).  Other ciphers: Conch's ``getPacket`` logic
  (same checks, same ``SSHCiphers.decrypt``/``verify``) on that buffer;
* ``_newKeys``: logs the ciphers in use (event ``ssh_keys``) and counts key
  exchanges (``keyExchanges``);
* ``ssh_NEWKEYS`` (client side): Conch calls ``connectionSecure()`` after every
  NEWKEYS, which restarted user authentication at each rekey; only the first
  one is passed on.

It also adds :meth:`AEADTransportMixin.sendChannelData`, which frames a
``CHANNEL_DATA`` message straight into the packet plaintext (Conch's
``SSHConnection.sendData`` copies the data twice before ``sendPacket`` copies
it again; ``FlowConnection.sendData`` calls it), starts a key exchange itself
after ``rekeyAfterBytes`` (Conch never does), and sets GCM first in
``supportedCiphers``, then AES-CTR, and ``hmac-sha2-256`` first in
``supportedMACs``.  A negotiated GCM still needs a MAC in common (Conch checks
that in its KEXINIT code, which is not overridden); every peer offering GCM
also offers one of ours.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh import transport
from twisted.conch.ssh.transport import (
    DISCONNECT_COMPRESSION_ERROR,
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    SSHCiphers,
)

AES128_GCM = b"aes128-gcm@openssh.com"
AES256_GCM = b"aes256-gcm@openssh.com"
GCM_KEY_SIZES = {AES128_GCM: 16, AES256_GCM: 32}
GCM_CIPHERS = [AES128_GCM, AES256_GCM]

#: After GCM: the fastest of Conch's own, with the MAC that goes with it.
CTR_PREFERENCE = [b"aes128-ctr", b"aes256-ctr", b"aes192-ctr"]
MAC_PREFERENCE = [b"hmac-sha2-256", b"hmac-sha2-512"]

GCM_BLOCK = 16
GCM_TAG = 16
GCM_IV = 12
MAX_PACKET_LENGTH = 1048576  # Conch's own limit (OpenSSH: 256 KiB)
PAD_POOL = 16384  # random padding bytes drawn at once
MSG_CHANNEL_DATA = 94
_COUNTER_MASK = (1 << 64) - 1

_LENGTH = struct.Struct(">L")
_NONCE = struct.Struct(">LQ")
_CHANNEL_DATA_HEAD = struct.Struct(">BBLL")  # padding length, 94, channel, data length
_HEAD = struct.Struct(">BB")  # padding length, message number
_FIRST = struct.Struct("!LB")


def _ordered(preferred: list[bytes], supported: list[bytes]) -> list[bytes]:
    return [c for c in preferred if c in supported] + [c for c in supported if c not in preferred]


def gcm_padding(n: int) -> int:
    """Padding for ``n`` bytes of ``msg || payload``: (1 + n + padding) % 16 == 0,
    at least 4 bytes."""
    pad = GCM_BLOCK - ((n + 1) % GCM_BLOCK)
    return pad + GCM_BLOCK if pad < 4 else pad


class GCMDirection:
    """One direction of AES-GCM: the key's ``AESGCM`` object and the nonce state."""

    __slots__ = ("aead", "counter", "fixed")

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


class PacketCiphers(SSHCiphers):
    """Conch's ``SSHCiphers`` that also knows AES-GCM, direction by direction.

    ``outGCM``/``inGCM`` are the :class:`GCMDirection` of a GCM direction, else
    ``None`` and that direction is Conch's cipher and MAC, set up by Conch's code.
    """

    outGCM: GCMDirection | None = None
    inGCM: GCMDirection | None = None

    @classmethod
    def like(cls, other: SSHCiphers) -> PacketCiphers:
        """The same negotiated algorithms, before any key is set."""
        return cls(other.outCipType, other.inCipType, other.outMACType, other.inMACType)

    def setKeys(
        self,
        outIV: bytes,
        outKey: bytes,
        inIV: bytes,
        inKey: bytes,
        outInteg: bytes,
        inInteg: bytes,
    ) -> None:
        outSize = GCM_KEY_SIZES.get(self.outCipType)
        inSize = GCM_KEY_SIZES.get(self.inCipType)
        if outSize is None and inSize is None:
            super().setKeys(outIV, outKey, inIV, inKey, outInteg, inInteg)
            return
        if outSize is None:
            o = self._getCipher(self.outCipType, outIV, outKey)
            self.encryptor = o.encryptor()
            self.encBlockSize = o.algorithm.block_size // 8
            self.outMAC = self._getMAC(self.outMACType, outInteg)  # type: ignore[assignment]
        else:
            self.outGCM = GCMDirection(outKey[:outSize], outIV)
            self.encBlockSize = GCM_BLOCK
            self.outMAC = (None, b"", b"", 0)  # implicit
        if inSize is None:
            i = self._getCipher(self.inCipType, inIV, inKey)
            self.decryptor = i.decryptor()
            self.decBlockSize = i.algorithm.block_size // 8
            self.inMAC = self._getMAC(self.inMACType, inInteg)  # type: ignore[assignment]
            self.verifyDigestSize = self.inMAC[3]
        else:
            self.inGCM = GCMDirection(inKey[:inSize], inIV)
            self.decBlockSize = GCM_BLOCK
            self.inMAC = (None, b"", b"", 0)
            self.verifyDigestSize = 0


class AEADTransportMixin:
    """AES-GCM and a leaner packet path for Conch's SSH transports (module docstring).

    Mix in first: ``class T(AEADTransportMixin, transport.SSHClientTransport)``.
    """

    supportedCiphers = [
        *GCM_CIPHERS,
        *_ordered(CTR_PREFERENCE, transport.SSHTransportBase.supportedCiphers),
    ]
    supportedMACs = _ordered(MAC_PREFERENCE, transport.SSHTransportBase.supportedMACs)

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

    _rbuf: bytearray | None = None  # the start of a packet not yet all received
    _first: bytes | None = None  # decrypted first block of a partial non-GCM packet
    _readDead = False  # a fatal framing error: nothing more is parsed
    _pad = b""
    _padOff = 0
    keyExchanges = 0  # completed key exchanges (the first one included)
    #: Start a key exchange after this many payload bytes either way under one key
    #: (OpenSSH's default for AES is 4 GiB or more; Conch itself never rekeys, so two
    #: labrelay ends would otherwise keep their first keys for the link's lifetime).
    rekeyAfterBytes = 1 << 30
    _bytesSinceKex = 0

    # -- keys

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        if not isinstance(self.nextEncryptions, PacketCiphers):
            self.nextEncryptions = PacketCiphers.like(self.nextEncryptions)
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]

    def _newKeys(self) -> None:
        self._bytesSinceKex = 0
        super()._newKeys()  # type: ignore[misc]
        self.keyExchanges += 1
        enc = self.currentEncryptions
        outMAC = "<implicit>" if getattr(enc, "outGCM", None) else enc.outMACType.decode()
        inMAC = "<implicit>" if getattr(enc, "inGCM", None) else enc.inMACType.decode()
        self._log.info(
            "SSH keys #{count}: out {cipher_out} MAC {mac_out}, in {cipher_in} MAC {mac_in}",
            event="ssh_keys",
            count=self.keyExchanges,
            cipher_out=enc.outCipType.decode(),
            mac_out=outMAC,
            cipher_in=enc.inCipType.decode(),
            mac_in=inMAC,
            kex=getattr(self, "kexAlg", b"?").decode(),
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
            self.sendKexInit()  # type: ignore[attr-defined]

    # -- sending

    def _padding(self, n: int) -> bytes:
        off = self._padOff
        if off + n > len(self._pad):
            self._pad = os.urandom(PAD_POOL)
            off = 0
        self._padOff = off + n
        return self._pad[off : off + n]

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        gcm = getattr(self.currentEncryptions, "outGCM", None)
        if gcm is None:
            super().sendPacket(messageType, payload)  # type: ignore[misc]
            if self.sessionID is not None:
                self._count(len(payload))
            return
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE and not (
            self._allowedKeyExchangeMessageType(messageType)  # type: ignore[attr-defined]
        ):
            self._blockedByKeyExchange.append((messageType, payload))  # as Conch does
            return
        if self.outgoingCompression:
            body = self.outgoingCompression.compress(
                bytes((messageType,)) + payload
            ) + self.outgoingCompression.flush(2)
            pad = gcm_padding(len(body))
            plain = b"".join((bytes((pad,)), body, self._padding(pad)))
        else:
            pad = gcm_padding(1 + len(payload))
            plain = b"".join((_HEAD.pack(pad, messageType), payload, self._padding(pad)))
        self._sealAndWrite(gcm, plain)

    def sendChannelData(self, remoteChannel: int, data: bytes | memoryview) -> None:
        """``CHANNEL_DATA`` to ``remoteChannel``; the same bytes on the wire as
        ``sendPacket(94, pack(">L", remoteChannel) + NS(data))``.  ``data`` may be a
        memoryview (a slice of a larger read): it is copied once, into the packet."""
        gcm = getattr(self.currentEncryptions, "outGCM", None)
        if (
            gcm is None
            or self.outgoingCompression
            or self._keyExchangeState != self._KEY_EXCHANGE_NONE
        ):
            self.sendPacket(MSG_CHANNEL_DATA, struct.pack(">2L", remoteChannel, len(data)) + data)
            return
        pad = gcm_padding(9 + len(data))
        plain = b"".join(
            (
                _CHANNEL_DATA_HEAD.pack(pad, MSG_CHANNEL_DATA, remoteChannel, len(data)),
                data,
                self._padding(pad),
            )
        )
        self._sealAndWrite(gcm, plain)

    def _sealAndWrite(self, gcm: GCMDirection, plain: bytes) -> None:
        length = _LENGTH.pack(len(plain))
        sealed = gcm.aead.encrypt(gcm.nonce(), plain, length)
        self.transport.writeSequence((length, sealed))
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
                take = min(self._pendingSize(rbuf) - len(rbuf), end - pos)
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
            self.dispatchMessage(got[0], got[1])  # type: ignore[attr-defined]

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

    def _pendingSize(self, rbuf: bytearray) -> int:
        """Bytes the packet at the start of ``rbuf`` takes on the wire, as far as
        known (at least what is needed to learn more)."""
        enc = self.currentEncryptions
        if getattr(enc, "inGCM", None) is not None:
            if len(rbuf) < 4:
                return 4
            return 4 + _LENGTH.unpack_from(rbuf)[0] + GCM_TAG
        first = self._first
        if first is None:
            return enc.decBlockSize
        return 4 + _LENGTH.unpack_from(first)[0] + enc.verifyDigestSize

    def _fatal(self, reason: int, why: bytes) -> None:
        self._readDead = True
        self.sendDisconnect(reason, why)  # type: ignore[attr-defined]

    def _nextPacket(self, buf: bytes | bytearray, off: int) -> tuple[int, bytes, int] | None:
        """(message number, payload, offset after it) of the packet at ``buf[off:]``,
        or None if it is not all there (or was bad: then ``_readDead`` is set)."""
        if self._readDead:
            return None
        enc = self.currentEncryptions
        gcm = getattr(enc, "inGCM", None)
        if gcm is not None:
            got = self._readGCM(gcm, buf, off)
        else:
            got = self._readClassic(enc, buf, off)
        if got is None:
            return None
        if self.incomingCompression:
            try:
                full = self.incomingCompression.decompress(bytes((got[0],)) + got[1])
            except Exception:
                self._log.failure("Error decompressing payload")
                self._fatal(DISCONNECT_COMPRESSION_ERROR, b"compression error")
                return None
            if not full:
                self._fatal(DISCONNECT_PROTOCOL_ERROR, b"empty payload")
                return None
            got = (full[0], full[1:], got[2])
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
        pad = plain[0]
        stop = packetLen - pad
        if pad < 4 or stop < 2:
            self._fatal(DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % pad)
            return None
        return plain[1], plain[2:stop], end

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
