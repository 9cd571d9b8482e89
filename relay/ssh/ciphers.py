"""The AEAD ciphers of labrelay's SSH transports, one direction at a time:
AES-GCM (:class:`GCMDirection`), chacha20-poly1305 (:class:`ChaChaDirection`), and
:class:`PacketCiphers`, Conch's ``SSHCiphers`` that installs them.

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

The transports use them through :class:`relay.ssh.aead.AEADTransportMixin`.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh.transport import SSHCiphers

from relay.ssh import policy

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

_LENGTH = struct.Struct(">L")
_NONCE = struct.Struct(">LQ")
_SEQ = struct.Struct(">Q")
_CHANNEL_DATA_HEAD = struct.Struct(">BBLL")  # padding length, 94, channel, data length
_HEAD = struct.Struct(">BB")  # padding length, message number
_FIRST = struct.Struct("!LB")
_CTR0 = bytes(8)  # ChaCha20 block counter 0 (little-endian 64 bits)
_ZERO_BLOCK = bytes(64)


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

    __slots__ = ("aead", "counter", "fixed", "key")
    block = GCM_BLOCK
    padding = staticmethod(gcm_padding)

    def __init__(self, key: bytes, iv: bytes) -> None:
        if len(iv) < GCM_IV:
            raise ValueError(f"AES-GCM needs a {GCM_IV}-byte IV, got {len(iv)}")
        self.aead = AESGCM(key)
        # kept for the native open-and-forward thread (relay.ssh.nativeforward), which
        # opens this direction's packets with its own EVP context while it runs
        self.key = key
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
