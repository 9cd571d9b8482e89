"""The SSH algorithm policy of every labrelay transport, and strict key exchange.

One place decides what labrelay's SSH ends offer and accept: the relay's server
(:mod:`relay.ssh.server`), the agent's link and ``labrelay connect`` (both
:mod:`relay.ssh.client`).  Nothing here does I/O: the transports in
:mod:`relay.ssh.kex` (under :mod:`relay.ssh.aead`) ask these functions and :class:`KexGuard`.

What is offered, and why (ISSUE 10, ssh-audit's and OpenSSH's current defaults):

* key exchange: ``mlkem768x25519-sha256`` (post-quantum hybrid; the server only,
  Conch's client lacks it), ``curve25519-sha256`` and its ``@libssh.org`` alias.
  No NIST curves, no finite-field group with SHA-1, no group exchange;
* host keys: the relay offers ``ssh-ed25519`` (and RSA only as ``rsa-sha2-512``/
  ``rsa-sha2-256``).  The client accepts what a stock sshd may have: ed25519,
  ECDSA, RSA with SHA-2; never ``ssh-rsa`` (SHA-1) or ``ssh-dss``;
* ciphers: AEAD only, ``aes128-gcm@openssh.com``, ``aes256-gcm@openssh.com`` and
  ``chacha20-poly1305@openssh.com``; the last only with strict key exchange
  (Terrapin, CVE-2023-48795, truncates the start of a chacha20-poly1305 stream
  whose sequence numbers are not reset at NEWKEYS);
* MACs: only ETM names are listed.  With an AEAD cipher the MAC is implicit and
  never computed, so OpenSSH does not even negotiate it; Conch does, and fails a
  key exchange without a MAC in common, so the transports waive that check when
  both directions are AEAD (:func:`negotiate`, ``mac_waived``);
* compression: ``none``.  Conch's ``zlib`` inflates right after the first key
  exchange, before authentication, and without an output limit (a 1 MiB packet of
  zeros became 900 MiB in the relay); delayed ``zlib@openssh.com`` is not
  implemented, so nothing is compressed at all.

Strict KEX (OpenSSH PROTOCOL, "kex-strict-*-v00@openssh.com"): each side lists its
marker among its key exchange algorithms in the first KEXINIT; when both did,
the peer's first packet must be KEXINIT, nothing but key exchange messages may
arrive until the first NEWKEYS, and each direction's sequence number restarts at
0 after every NEWKEYS.  :class:`KexGuard` keeps that state.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MLKEM768X25519 = b"mlkem768x25519-sha256"
CURVE25519 = b"curve25519-sha256"
CURVE25519_LIBSSH = b"curve25519-sha256@libssh.org"
STRICT_KEX_SERVER = b"kex-strict-s-v00@openssh.com"
STRICT_KEX_CLIENT = b"kex-strict-c-v00@openssh.com"
EXT_INFO = (b"ext-info-c", b"ext-info-s")

#: The version string of the relay, which gives no version number away to whoever
#: connects; a labrelay client (the agent, ``labrelay connect``) adds ``_<version>``
#: (:func:`relay.ssh.peersoftware.client_version_string`), so a relay's operator sees
#: which agents are old.  Two labrelay ends recognise each other by it
#: (:func:`labrelay_peer`) and agree on larger channel packets between them
#: (:func:`channel_max_packet`); a stock peer is never offered anything it did not ask for.
VERSION_STRING = b"SSH-2.0-labrelay"
#: Channel maximum packet a labrelay end announces to another labrelay end (the agent's
#: link): each packet costs Python work per hop, so fewer, larger ones carry a bulk
#: stream for less CPU.  The memory bound per session is the window, not the packet.
LABRELAY_MAX_PACKET = 256 * 1024

AES128_GCM = b"aes128-gcm@openssh.com"
AES256_GCM = b"aes256-gcm@openssh.com"
CHACHA20_POLY1305 = b"chacha20-poly1305@openssh.com"
GCM_CIPHERS = (AES128_GCM, AES256_GCM)
AEAD_CIPHERS = (AES128_GCM, AES256_GCM, CHACHA20_POLY1305)

#: Key exchange methods, best first.  The server has all three; Conch's client has
#: no ML-KEM (Twisted issue 12624), see :func:`client_kex`.
KEX_ALGORITHMS = (MLKEM768X25519, CURVE25519, CURVE25519_LIBSSH)
SERVER_HOST_KEY_ALGORITHMS = (b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256")
CLIENT_HOST_KEY_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)
#: Signature algorithms accepted for user keys, sent as ``server-sig-algs`` (RFC 8308).
#: Conch sends its host key algorithms there instead, which told stock ssh that an RSA
#: user key cannot be used at all ("no mutual signature algorithm").
USER_KEY_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)
#: GCM first: one AESGCM call per packet against two ChaCha20 and a Poly1305
#: (measured ~4 µs against ~20 µs per 32 KiB packet; docs/relay.md).
CIPHERS = (AES128_GCM, AES256_GCM, CHACHA20_POLY1305)
#: Listed so that KEXINIT carries MAC names; never used (every cipher is AEAD).
MACS = (b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-512-etm@openssh.com")
COMPRESSIONS = (b"none",)

# Message numbers (RFC 4250).
MSG_DISCONNECT = 1
MSG_IGNORE = 2
MSG_UNIMPLEMENTED = 3
MSG_DEBUG = 4
MSG_KEXINIT = 20
MSG_NEWKEYS = 21
MSG_KEX_FIRST, MSG_KEX_LAST = 30, 49  # the key exchange method's own messages
#: What a peer may send before the first key exchange completes (RFC 4253 §7-10):
#: DISCONNECT, IGNORE, UNIMPLEMENTED, DEBUG, KEXINIT, NEWKEYS and the key exchange
#: method's messages.  The one statement of the rule: :meth:`KexGuard.check` applies
#: it until the peer's first NEWKEYS, ``relay.ssh.guard.PeerInputGuard`` until the
#: first exchange completed, each reporting it its own way.
BEFORE_KEYS = frozenset({
    MSG_DISCONNECT, MSG_IGNORE, MSG_UNIMPLEMENTED, MSG_DEBUG, MSG_KEXINIT, MSG_NEWKEYS,
    *range(MSG_KEX_FIRST, MSG_KEX_LAST + 1),
})


def client_kex(supported: Iterable[bytes]) -> list[bytes]:
    """The policy's key exchanges that a client transport implements, in policy order."""
    have = set(supported)
    return [k for k in KEX_ALGORITHMS if k in have]


def server_host_key_algorithms(available: Iterable[bytes]) -> list[bytes]:
    """The relay's host key signature algorithms: those its keys can make that the
    policy allows (an RSA host key loses ``ssh-rsa``; an ECDSA or DSA key is not
    offered at all), in policy order."""
    have = set(available)
    return [a for a in SERVER_HOST_KEY_ALGORITHMS if a in have]


def client_host_key_algorithms(known_types: Iterable[str] = ()) -> list[bytes]:
    """Host key algorithms a client accepts; the key types already recorded for the
    host (known_hosts) first, as OpenSSH orders them, so that a recorded ECDSA or
    RSA key is offered again rather than an unknown ed25519 one being refused."""
    order: list[bytes] = []
    for kind in known_types:
        if kind == "ssh-rsa":
            names = [b"rsa-sha2-512", b"rsa-sha2-256"]
        else:
            names = [kind.encode("ascii", "replace")]
        order += [n for n in names if n in CLIENT_HOST_KEY_ALGORITHMS and n not in order]
    return order + [a for a in CLIENT_HOST_KEY_ALGORITHMS if a not in order]


def server_ciphers_for(peer: KexInit | None) -> list[bytes]:
    """The cipher list the relay offers a client whose KEXINIT is ``peer``.

    chacha20-poly1305 costs about five times AES-GCM's CPU per packet in this
    Python transport, and the client's preference decides (RFC 4253 7.1): OpenSSH
    lists chacha first.  So a client that offers AES-GCM is not offered chacha;
    one that does not (Dropbear) is.  ``None``: the client's KEXINIT did not come
    first, offer everything."""
    if peer is None:
        return list(CIPHERS)
    offered = set(peer.ciphers_cs) & set(peer.ciphers_sc)
    if offered & set(GCM_CIPHERS):
        return [c for c in CIPHERS if c != CHACHA20_POLY1305]
    return list(CIPHERS)


@dataclass(frozen=True)
class KexInit:
    """The name-lists of a KEXINIT payload (after the message number)."""

    kex: tuple[bytes, ...]
    host_keys: tuple[bytes, ...]
    ciphers_cs: tuple[bytes, ...]
    ciphers_sc: tuple[bytes, ...]
    macs_cs: tuple[bytes, ...]
    macs_sc: tuple[bytes, ...]
    compression_cs: tuple[bytes, ...]
    compression_sc: tuple[bytes, ...]
    first_kex_follows: bool

    @classmethod
    def parse(cls, payload: bytes) -> KexInit:
        """Parse the payload of MSG_KEXINIT; ``ValueError`` if it is malformed."""
        if len(payload) < 16:
            raise ValueError("KEXINIT shorter than its cookie")
        pos = 16
        lists: list[tuple[bytes, ...]] = []
        for _ in range(10):
            if len(payload) < pos + 4:
                raise ValueError("KEXINIT name-list cut short")
            (n,) = struct.unpack_from(">L", payload, pos)
            pos += 4
            if len(payload) < pos + n:
                raise ValueError("KEXINIT name-list longer than the packet")
            raw = payload[pos : pos + n]
            pos += n
            lists.append(tuple(raw.split(b",")) if raw else ())
        if len(payload) < pos + 5:
            raise ValueError("KEXINIT without first_kex_packet_follows and reserved field")
        kex, host_keys, ccs, csc, mcs, msc, zcs, zsc = lists[:8]
        return cls(kex, host_keys, ccs, csc, mcs, msc, zcs, zsc, payload[pos] != 0)


@dataclass(frozen=True)
class Offer:
    """What one side puts in its KEXINIT (markers included in ``kex``)."""

    kex: Sequence[bytes]
    host_keys: Sequence[bytes]
    ciphers: Sequence[bytes]
    macs: Sequence[bytes]
    compressions: Sequence[bytes]


@dataclass(frozen=True)
class Negotiated:
    """The outcome of one KEXINIT exchange (RFC 4253 7.1), or why it failed."""

    kex: bytes | None = None
    cipher_cs: bytes | None = None
    cipher_sc: bytes | None = None
    error: str | None = None
    #: Both directions are AEAD: the MAC is implicit, a MAC in common is not needed.
    mac_waived: bool = False


def _first(client: Sequence[bytes], server: Sequence[bytes]) -> bytes | None:
    for name in client:
        if name in server:
            return name
    return None


def negotiate(ours: Offer, peer: KexInit, is_client: bool, strict: bool) -> Negotiated:
    """Check a peer's KEXINIT against our offer before Conch's own negotiation runs.

    Conch picks the algorithms the same way (the client's first name the server
    also has); this says what it will pick and refuses, with a reason a peer or an
    operator can act on, what the policy does not allow: a marker or extension
    name chosen as key exchange, a non-AEAD cipher, chacha20-poly1305 without
    strict key exchange."""

    def mine_or_theirs(mine: Sequence[bytes], theirs: Sequence[bytes]) -> bytes | None:
        return _first(mine, theirs) if is_client else _first(theirs, mine)

    kex = mine_or_theirs(ours.kex, peer.kex)
    if kex is None or kex not in KEX_ALGORITHMS:
        return Negotiated(
            error="no key exchange method in common (the relay allows "
            + ", ".join(k.decode() for k in ours.kex if k in KEX_ALGORITHMS)
            + ")"
        )
    if mine_or_theirs(ours.host_keys, peer.host_keys) is None:
        return Negotiated(
            error="no host key algorithm in common (allowed: "
            + ", ".join(k.decode() for k in ours.host_keys)
            + ")"
        )
    cs = mine_or_theirs(ours.ciphers, peer.ciphers_cs)
    sc = mine_or_theirs(ours.ciphers, peer.ciphers_sc)
    if cs is None or sc is None or cs not in AEAD_CIPHERS or sc not in AEAD_CIPHERS:
        return Negotiated(
            kex=kex,
            error="no cipher in common (only AEAD ciphers are allowed: "
            + ", ".join(c.decode() for c in ours.ciphers)
            + ")",
        )
    if CHACHA20_POLY1305 in (cs, sc) and not strict:
        return Negotiated(
            kex=kex, cipher_cs=cs, cipher_sc=sc,
            error="chacha20-poly1305@openssh.com needs strict key exchange "
            "(kex-strict-*-v00@openssh.com, the fix for Terrapin, CVE-2023-48795), "
            "which the peer did not offer; update the client or choose aes128-gcm@openssh.com",
        )  # fmt: skip
    comp = (
        mine_or_theirs(ours.compressions, peer.compression_cs),
        mine_or_theirs(ours.compressions, peer.compression_sc),
    )
    if None in comp:
        return Negotiated(kex=kex, cipher_cs=cs, cipher_sc=sc,
                          error="no compression in common (only none is allowed)")
    return Negotiated(kex=kex, cipher_cs=cs, cipher_sc=sc, mac_waived=True)


class KexGuard:
    """Sans-IO state of the initial key exchange and of strict KEX for one transport.

    The transport calls :meth:`kexinit_received` for each KEXINIT, :meth:`check`
    for each incoming message number before it is dispatched, and asks
    :meth:`reset_after_newkeys` whether a sequence number restarts at 0.

    Before the first NEWKEYS from the peer, only transport messages (DISCONNECT,
    IGNORE, UNIMPLEMENTED, DEBUG) and key exchange messages (20-49) are accepted
    from any peer (RFC 4253 7.1: nothing else is meaningful without keys; Conch
    would start ``ssh-userauth`` in clear text).  With strict KEX, IGNORE,
    UNIMPLEMENTED and DEBUG are refused too, and KEXINIT must be the first packet.
    """

    def __init__(self, is_client: bool) -> None:
        self.is_client = is_client
        self.strict = False
        self.initial = True  # no NEWKEYS received yet
        self.kexinits = 0

    @property
    def our_marker(self) -> bytes:
        return STRICT_KEX_CLIENT if self.is_client else STRICT_KEX_SERVER

    @property
    def peer_marker(self) -> bytes:
        return STRICT_KEX_SERVER if self.is_client else STRICT_KEX_CLIENT

    def kexinit_received(self, peer_kex: Sequence[bytes], seqnr: int) -> str | None:
        """A KEXINIT arrived as packet number ``seqnr`` (0-based); an error or None.

        Strict mode is decided by the first KEXINIT only (markers in later ones
        mean nothing, as in OpenSSH)."""
        self.kexinits += 1
        if self.kexinits > 1:
            return None
        self.strict = self.peer_marker in peer_kex
        if self.strict and seqnr != 0:
            return (
                f"strict KEX violation: KEXINIT was packet {seqnr}, not the first "
                "(CVE-2023-48795)"
            )
        return None

    def check(self, message: int) -> str | None:
        """Whether an incoming message may be dispatched now; the error if not."""
        if not self.initial:
            return None
        if message not in BEFORE_KEYS:
            return f"message {message} before the first key exchange completed"
        if self.strict and message in (MSG_IGNORE, MSG_UNIMPLEMENTED, MSG_DEBUG):
            return (
                f"strict KEX violation: message {message} during the initial key "
                "exchange (CVE-2023-48795)"
            )
        return None

    def newkeys_received(self) -> None:
        self.initial = False

    def reset_after_newkeys(self) -> bool:
        """Whether a sequence number restarts at 0 after a NEWKEYS (strict KEX)."""
        return self.strict


def labrelay_peer(version: bytes | None) -> bool:
    """Whether the peer's version string (``SSH-2.0-software comments``) is labrelay's."""
    if not version:
        return False
    software = version.split(b" ", 1)[0]
    return software == VERSION_STRING or software.startswith(VERSION_STRING + b"_")


def channel_max_packet(configured: int, window: int, peer_version: bytes | None) -> int:
    """The maximum packet to announce on a channel: larger between two labrelay ends
    (never smaller than what the config says, never more than the channel's window)."""
    if labrelay_peer(peer_version):
        return min(max(configured, LABRELAY_MAX_PACKET), max(configured, window))
    return configured
