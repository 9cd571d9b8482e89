"""``PeerInputGuard``: a malformed message from the peer is a protocol error, not a crash.

Conch's transport parses the fixed fields of its messages unchecked: a ``KEXINIT``,
``KEX_ECDH_INIT``, ``SERVICE_REQUEST`` or ``USERAUTH_REQUEST`` cut short raises
``struct.error`` (or ``IndexError``, ``ValueError`` ...) out of ``dataReceived``.
Twisted then logs an "Unhandled Error" with the peer's traceback and drops the TCP
connection, before authentication and as often as anyone cares to try.  Found by
tests/fuzz (``transport_banner``, ``transport_packets``).  With this guard such a
message ends the connection the way every other protocol error does: a logged
warning (event ``malformed_packet``) and ``DISCONNECT_PROTOCOL_ERROR``.  The
connection layer has the same guard in :class:`relay.ssh.connection.FlowConnection`.

Messages are also checked against where the connection is, where Conch does not:
nothing but the transport's own messages before the first key exchange completes
(Conch started ``ssh-userauth`` on a ``SERVICE_REQUEST`` in the clear); the key
exchange's messages only between the peer's ``KEXINIT`` and its ``NEWKEYS``, and only
those of the negotiated method (Conch dispatches 30-49 by number); no second
``KEXINIT`` within an exchange; and, on the server, the peer's ``NEWKEYS`` only once
the relay's side of the exchange has run.  Each of these raised out of Conch before
(AttributeError, RuntimeError, AssertionError; tests/fuzz/test_fuzz_regressions.py).

It also keeps Conch from reading packets before the peer's version line: Conch's
version parsing looks for ``"\\n"`` from ``buf.find(b"SSH-")``, which is -1 when there
is no ``SSH-`` at all, so any buffer that merely *ends* in a newline was parsed as
packets and dispatched (a ``KEXINIT`` before the version exchange, whose hash then
lacks the version string: an AttributeError).  The version line is now found before
Conch sees anything (:func:`scan_version_line`, used by ``relay.ssh.aead``): Conch is
handed that line alone.

Mix in first, over the transport policy (whose ``_fatal`` it disconnects with):
``class T(PeerInputGuard, AEADTransportMixin, SSHServerTransport)``.  The rule of what
may come before the first key exchange is ``relay.ssh.policy.BEFORE_KEYS``, the same
one the policy's ``KexGuard`` applies; here it holds until the first exchange has
completed and a breach is reported as a malformed message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR

from relay.ssh.policy import (
    BEFORE_KEYS,
    MSG_KEX_FIRST,
    MSG_KEX_LAST,
    MSG_KEXINIT,
    MSG_NEWKEYS,
)

# Within 30-49, by method: KEXDH/KEX_ECDH (and ML-KEM hybrid) INIT/REPLY, and RFC 4419's
# group exchange (REQUEST_OLD shares 30, GROUP shares 31).
MSG_KEX_INIT, MSG_KEX_REPLY = 30, 31
MSG_KEX_DH_GEX_GROUP, MSG_KEX_DH_GEX_INIT, MSG_KEX_DH_GEX_REPLY = 31, 32, 33
MSG_KEX_DH_GEX_REQUEST = 34
#: What Conch's unchecked parsing raises on a short or inconsistent message.
MALFORMED = (struct.error, IndexError, KeyError, TypeError, ValueError, UnicodeDecodeError)


SSH_PREFIX = b"SSH-"
#: What a first line that is not SSH usually is, by its first bytes: named in the
#: refusal (never the peer's bytes themselves), so an operator who put the SSH port
#: behind the wrong thing sees which thing.
_NOT_SSH = (
    (b"\x16\x03", "a TLS handshake (TLS goes to the relay's tls_listen port)"),
    (b"PROXY ", "a PROXY protocol header (the relay does not take one)"),
    (b"GET ", "an HTTP request"), (b"POST ", "an HTTP request"),
    (b"HEAD ", "an HTTP request"), (b"CONNECT ", "an HTTP request"),
)


def client_first_line_refusal(head: bytes) -> str | None:
    """Why the first bytes a *client* sent, ``head`` (any length), cannot begin its
    SSH version line, or None while they still may.

    RFC 4253 §4.2 lets a server send lines before its version line; a client sends
    its version line first.  Conch's server skipped any lines before it, so an HTTP
    request or a PROXY header held an unauthenticated place until ``login_grace``;
    sshd refuses such a connection at once (kex.c ``kex_exchange_identification``:
    "client sent invalid protocol identifier").  The relay refuses as soon as the
    first bytes differ from ``SSH-``, which is earlier than sshd (it waits for the
    newline) and decides the same: nothing that starts otherwise can become a
    version line."""
    if head[: len(SSH_PREFIX)] == SSH_PREFIX[: len(head)]:
        return None
    for start, what in _NOT_SSH:
        if head.startswith(start):  # known only when the read held all of ``start``
            return f"not an SSH version line: {what}"
    return "not an SSH version line"


#: The version line, its newline included, may be as long as Conch allowed (4 KiB;
#: RFC 4253 says 255, sshd takes 8192).  Only the bytes up to that newline count.
VERSION_LINE_LIMIT = 4096
VERSION_TOO_LONG = b"Peer version string longer than 4KB. Preventing a denial of service attack."
#: Lines a *server* may send before its version line (RFC 4253 §4.2): sshd's client
#: takes 1024 of them (``SSH_MAX_PRE_BANNER_LINES``), each at most 8192 bytes
#: (``SSH_MAX_BANNER_LEN``); sshd's server takes none.
PRE_BANNER_LINES = 1024
PRE_BANNER_LINE_LIMIT = 8192


@dataclass(frozen=True)
class VersionScan:
    """Where a peer's version line is in what it sent so far (:func:`scan_version_line`).

    ``skip`` bytes at the front are whole lines before the version line (``lines`` of
    them so far, counting earlier reads): drop them.  The version line is
    ``buf[skip:end]``, newline included, once ``end`` is set; what follows it is packets.
    ``refusal`` says why the peer is to be disconnected."""

    skip: int = 0
    lines: int = 0
    end: int | None = None
    refusal: bytes | None = None


def scan_version_line(buf: bytes, lines: int, *, preamble: bool) -> VersionScan:
    """Find the peer's version line in ``buf`` (the bytes since the last line dropped),
    ``lines`` lines having been dropped before it; ``preamble``: lines before it are
    allowed (the peer is a server).

    Conch's own check counted every byte of the read that held the version line, so
    a client whose first read carried its version line and a large KEXINIT (long
    post-quantum and host key lists) was cut at 4 KiB; and it took the *last* line of
    that read beginning ``SSH-`` (binary packet data may hold one).  Here only the
    bytes up to the version line's newline count, and the first ``SSH-`` line is the
    version line, as in sshd (kex.c ``kex_exchange_identification``)."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        line_end = len(buf) if nl < 0 else nl + 1
        if buf[pos : pos + len(SSH_PREFIX)] == SSH_PREFIX[: line_end - pos]:
            # The version line, or what may still become it (a prefix of "SSH-").
            if line_end - pos > VERSION_LINE_LIMIT:
                return VersionScan(pos, lines, refusal=VERSION_TOO_LONG)
            return VersionScan(pos, lines, None if nl < 0 else line_end)
        if not preamble:
            return VersionScan(pos, lines, refusal=b"not an SSH version line")
        if line_end - pos > PRE_BANNER_LINE_LIMIT:
            return VersionScan(pos, lines, refusal=b"a line before the version line is too long")
        if nl < 0:
            return VersionScan(pos, lines)
        lines += 1
        pos = line_end
        if lines >= PRE_BANNER_LINES:
            return VersionScan(pos, lines, refusal=b"no SSH version line in the first "
                               + str(PRE_BANNER_LINES).encode() + b" lines")


class PeerInputGuard:
    """Protocol-error disconnects for messages Conch cannot parse (module docstring)."""

    gotVersion: bool
    keyExchanges: int  # completed key exchanges (relay.ssh.aead)
    isClient: bool
    nextEncryptions: Any
    _log: Any
    _fatal: Any  # relay.ssh.kex.KexMixin's: disconnect, and stop parsing too
    _peerInKex = False  # the peer sent KEXINIT and not yet its NEWKEYS

    def getPacket(self) -> bytes | None:
        if not self.gotVersion:
            return None
        tcp = getattr(self, "transport", None)
        if tcp is not None and getattr(tcp, "disconnecting", False):
            # Conch's loop goes on asking for packets after its own sendDisconnect
            # closed the connection: the rest of the read is not parsed.
            return None
        return super().getPacket()  # type: ignore[misc,no-any-return]

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        tcp = getattr(self, "transport", None)
        if tcp is None or getattr(tcp, "disconnecting", False):
            # Conch's own sendDisconnect (bad KEXINIT, unknown service ...) closes the
            # connection but leaves the rest of the read to be parsed: not acted upon.
            return
        if self.keyExchanges == 0 and messageNum not in BEFORE_KEYS:
            # Conch starts ssh-userauth on a SERVICE_REQUEST sent in the clear before any
            # key exchange, and its publickey method then fails an assert (no session
            # id): an AssertionError out of dataReceived.  Nothing but the transport's
            # own messages belongs before the first NEWKEYS (RFC 4253 §7-10).
            self._malformed(messageNum, "before the first key exchange")
            return
        if messageNum == MSG_KEXINIT and self._peerInKex:
            # A second KEXINIT before the peer's NEWKEYS: Conch answers with a
            # RuntimeError ("Cannot send KEXINIT while key exchange state is ...")
            # out of dataReceived (tests/fuzz transport_banner).
            self._malformed(messageNum, "KEXINIT within a key exchange")
            return
        if messageNum == MSG_NEWKEYS or MSG_KEX_FIRST <= messageNum <= MSG_KEX_LAST:
            # Only between the peer's KEXINIT and its NEWKEYS (RFC 4253 §7): Conch's
            # handlers assume a negotiated exchange (a KEX_ECDH_INIT first reads the
            # negotiated kexAlg: AttributeError).
            if not self._peerInKex:
                self._malformed(messageNum, "outside a key exchange")
                return
            if MSG_KEX_FIRST <= messageNum <= MSG_KEX_LAST and not self._kexMessageFits(messageNum):
                # Conch dispatches 30-49 by number whatever was negotiated: a
                # KEX_DH_GEX_INIT in a curve25519 exchange reached the group-exchange
                # handler, which read a group that was never chosen (AttributeError
                # 'p'; tests/fuzz transport_packets).
                self._malformed(messageNum, "not a message of the negotiated key exchange")
                return
            if (messageNum == MSG_NEWKEYS and not self.isClient
                    and not getattr(self.nextEncryptions, "encBlockSize", 0)):
                # Conch's server takes the peer's NEWKEYS as "switch keys now" even
                # when its own side of the exchange never ran (the client skipped or
                # had ignored its KEX_ECDH_INIT): the next packet then meets a cipher
                # without keys, an AttributeError (tests/fuzz transport_packets).
                self._malformed(messageNum, "NEWKEYS before the key exchange finished")
                return
        try:
            super().dispatchMessage(messageNum, payload)  # type: ignore[misc]
        except MALFORMED as e:
            self._malformed(messageNum, repr(e)[:120])
            return
        if messageNum == MSG_KEXINIT:
            self._peerInKex = True
        elif messageNum == MSG_NEWKEYS:
            self._peerInKex = False

    def _kexMessageFits(self, messageNum: int) -> bool:
        """Whether ``messageNum`` (30-49) belongs to the negotiated key exchange, from
        the peer's side: one INIT to a server and one REPLY to a client, except in a
        Diffie-Hellman group exchange (RFC 4419), whose group must be chosen before
        its INIT."""
        kexAlg = getattr(self, "kexAlg", None) or b""
        if not kexAlg.startswith(b"diffie-hellman-group-exchange-"):
            return messageNum == (MSG_KEX_REPLY if self.isClient else MSG_KEX_INIT)
        if self.isClient:
            return messageNum in (MSG_KEX_DH_GEX_GROUP, MSG_KEX_DH_GEX_REPLY)
        if messageNum == MSG_KEX_DH_GEX_INIT:
            return getattr(self, "p", None) is not None  # after REQUEST chose a group
        return messageNum in (MSG_KEX_INIT, MSG_KEX_DH_GEX_REQUEST)

    def _malformed(self, messageNum: int, why: str) -> None:
        # A warning without a traceback: anyone can trigger this before logging in.
        self._log.warn(
            "malformed message {num} from the peer ({why}); disconnecting",
            event="malformed_packet", num=messageNum, why=why,
        )
        self._fatal(DISCONNECT_PROTOCOL_ERROR, b"malformed message %d" % messageNum)
