"""The packet path of labrelay's SSH transports, over AEAD ciphers
(:mod:`relay.ssh.ciphers`) and a bounded key exchange (:mod:`relay.ssh.kex`).


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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from cryptography.exceptions import InvalidTag
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_GLOBAL_REQUEST,
)
from twisted.conch.ssh.transport import (
    DISCONNECT_CONNECTION_LOST,
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MSG_DEBUG,
    MSG_IGNORE,
    MSG_UNIMPLEMENTED,
    SSHCiphers,
)
from twisted.internet.tcp import Connection

from relay.datapath.net import TurnBudget, unsent, write_now
from relay.ssh import nativeforward, policy
from relay.ssh.ciphers import (
    _CHANNEL_DATA_HEAD,
    _FIRST,
    _HEAD,
    _LENGTH,
    CHACHA_BLOCK,
    GCM_BLOCK,
    GCM_TAG,
    MAX_PACKET_LENGTH,
    MSG_CHANNEL_DATA,
    MSG_NEWKEYS,
    PAD_POOL,
    POLY_TAG,
    AEADDirection,
    ChaChaDirection,
    GCMDirection,
)
from relay.ssh.guard import VERSION_TOO_LONG, scan_version_line
from relay.ssh.kex import KexMixin

PACKETS_PER_TURN = 128
"""Packets a user's connections may have handled in one reactor turn, all of them
together (``turnShare``), and since round 17 in one window of reads
(relay.ssh.turnshare.TURN_WINDOW): ~1 ms of Python at the ~5-8 µs a small packet costs here, so
a user who floods small packets holds the reactor for about that long at a time, not
for the ~30 ms of a whole read, however many connections she opens."""

NO_FLUSH = frozenset({MSG_IGNORE, MSG_UNIMPLEMENTED, MSG_DEBUG, MSG_CHANNEL_WINDOW_ADJUST})
"""Messages that leave the channel data held from the read before them held (``noFlush``):
a window adjust is about the other direction, the rest about no channel."""
USER_NO_FLUSH = NO_FLUSH | {MSG_GLOBAL_REQUEST}
"""The same for a user's connection at the relay, whose global requests (keepalives, or
refused) touch no channel either."""


CORK_BELOW = 8 * 1024
"""Packets from this size up start no :class:`CorkGroup` hold of their transport (bulk
is written as it is sealed, within ``TurnBudget``, as before); smaller ones do."""

CORK_STARTERS = frozenset({MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA})
"""The messages that start a :class:`CorkGroup` hold: channel data, what a flood of
small packets is made of.  Any other (an open to the agent, a user's confirmation)
leaves at once unless a hold has begun, so that a session's set-up does not wait for
the rest of the read (the agent's open used to leave after her confirmation was sealed:
set-up p50 +3-5 %, ``bench/setup_ab.py``)."""


class CorkGroup:
    """Packets that transports of the group seal while a read is handled (:meth:`held`)
    leave at its end, one write per transport, not one each.

    A read of a user's small packets for 50 channels is handed on to the agent's link
    as up to 50 packets (one per channel, relay.ssh.connection joins the rest): each
    was a ``send`` of its own at the relay and a segment to wake the agent for; and a
    read of the link, every user's replies, was a ``send`` per reply.  The group holds
    them in each transport's cork (``AEADTransportMixin.corked``) until the read is
    handled, still within the same reactor turn.  One per relay (``RelayCore``)."""

    def __init__(self) -> None:
        self._depth = 0
        self._held: list[AEADTransportMixin] = []

    @property
    def active(self) -> bool:
        return self._depth > 0

    @contextmanager
    def held(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        """A read's handling begins (:meth:`held` without the generator: the hot path's
        form, one call each side of every read)."""
        self._depth += 1

    def end(self) -> None:
        """It ended: what the transports sealed meanwhile leaves, one write each."""
        self._depth -= 1
        if not self._depth and self._held:
            held, self._held = self._held, []
            for t in held:
                t._uncork()

    def join(self, t: AEADTransportMixin) -> None:
        """``t`` seals a packet while the group is held: hold it in ``t``'s cork."""
        t._cork = []
        self._held.append(t)


class AEADTransportMixin(KexMixin):
    """AEAD ciphers, strict KEX, bounded key exchanges and a leaner packet path for
    Conch's SSH transports (module docstring).

    Mix in first: ``class T(AEADTransportMixin, transport.SSHClientTransport)``.
    """

    ourVersionString = policy.VERSION_STRING

    _rbuf: bytearray | None = None  # the start of a packet not yet all received
    _first: bytes | None = None  # decrypted first block of a partial non-AEAD packet
    _chachaLength: int | None = None  # decrypted length of a partial chacha packet
    #: Set by the connection service once it runs (``FlowConnection``): the handler of
    #: ``MSG_CHANNEL_DATA``, given the payload as a memoryview into the decrypted
    #: packet.  A bulk stream is nearly all channel data, and Conch's dispatch of a
    #: message (transport -> service -> handler by name) was a fifth of the relay's
    #: Python per packet; every other message still goes through ``dispatchMessage``.
    channelDataHandler: Any = None
    #: Set with ``channelDataHandler``: called at the end of each read and before any
    #: other message of it is dispatched.  The handler may hold the small data of a
    #: read back and hand it on per channel, joined, here (``FlowConnection.
    #: flushData``): a 1-byte packet costs the same Python as a 32 KiB one, so a peer
    #: that floods 1-byte packets cost the relay ~9 µs and the agent ~6 µs per byte.
    channelDataFlush: Any = None
    #: The channel whose data the read being handled carried, when the connection may
    #: hand such a channel to the native open-and-forward thread (a pooled session's,
    #: relay.ssh.nativeforward): set by ``FlowConnection``, looked at after the read.
    nativeCandidate: Any = None
    #: That thread while it owns this connection's reads (``NativeForward``).
    nativeForward: Any = None
    #: Whether this kind of connection ever arms it (the relay's, for its users).
    nativeArmable = False
    #: Set by the connection service while it is the TCP transport's producer
    #: (``FlowConnection``): packets of any size are written straight to the socket
    #: within what Twisted's buffer would have taken in the same reactor turn
    #: (:class:`relay.datapath.net.TurnBudget`); None: small packets only.
    writeBudget: TurnBudget | None = None
    _pad = b""
    _padOff = 0
    _cork: list[bytes] | None = None  # sealed packets held by corked()
    #: The relay's :class:`CorkGroup` (None: every packet is written as it is sealed).
    corkGroup: CorkGroup | None = None
    #: Stop reading the peer while more than this many bytes of ours wait unread by it
    #: in Twisted's buffer (None: never).  Channel data cannot get there (the connection
    #: service stops feeding at ``LINK_BUFFER``), but every answer to a request can: a
    #: peer that sends global requests, opens or pings and never reads the answers
    #: grew the relay's memory without bound (300 000 requests: 42 MB).  OpenSSH takes
    #: in more work only while it has "not very much data to write"
    #: (``ssh_packet_not_very_much_data_to_write``: 128 KiB); here the peer is not read
    #: past ``readHoldBytes``, and is read again once the buffer has drained
    #: (:meth:`outputDrained`).
    readHoldBytes: int | None = None
    _readHeld: Any = None  # the socket transport whose reading is held, while it is
    #: The budget of packets per reactor turn this connection shares with every other
    #: connection of the same user (:class:`relay.ssh.turnshare.UserTurns`; None: a
    #: read is handled whole, as on an agent's link).  Past it, the rest of a read
    #: waits, in order, for a later turn, the socket unread meanwhile, so that every
    #: other user's events are handled in between.  A read is up to 128 KiB
    #: (``connection.LINK_BUFFER``): 3 600 1-byte ``CHANNEL_DATA`` packets, ~30 ms of
    #: one user's Python in one turn, which every other user waited for, and per
    #: connection she multiplied it by opening more (docs/security.md).  Bulk packets
    #: are 32 KiB, four to a read: never held.  Not for an agent's link: it carries
    #: every user's replies in one FIFO stream, and holding it back would only make
    #: each of them wait longer behind the others.
    turnShare: Any = None
    #: Messages that do not hand on the channel data held from earlier in the read
    #: before they are dispatched: they touch no channel's incoming data (the relay
    #: sets ``USER_NO_FLUSH`` for a user's connection, which adds global requests).
    #: Without this a peer that put an ``SSH_MSG_IGNORE`` between its 1-byte packets
    #: undid the joining: one link packet and one ``send`` per byte at the relay.
    noFlush: frozenset[int] = NO_FLUSH
    _backlog: bytes | None = None  # the rest of a read past the turn's budget, in order
    _backlogSock: Any = None  # the TCP connection not read meanwhile
    _turnLeft: int | None = None  # packets the read being parsed may still have handled

    def _holdIfUnread(self) -> None:
        """After a read: stop reading the peer if ``readHoldBytes`` of ours wait unread."""
        sock = self.transport
        if not isinstance(sock, Connection):
            sock = getattr(sock, "transport", None)  # the TCP connection under TLS
            if not isinstance(sock, Connection):
                return
        if unsent(sock) > (self.readHoldBytes or 0) and not sock.disconnecting:
            # Held again if something else resumed reading meanwhile (a TLS layer).
            first = self._readHeld is None
            self._readHeld = sock
            sock.pauseProducing()
            if first:
                self.readHeld(unsent(sock))

    def readHeld(self, waiting: int) -> None:
        """Reading was held with ``waiting`` bytes of ours unread (for a log line)."""

    def outputDrained(self) -> None:
        """Twisted's buffer for the peer is empty again (the connection service, its
        producer, is resumed): read the peer again if :meth:`_holdIfUnread` stopped."""
        sock, self._readHeld = self._readHeld, None
        if sock is not None and not sock.disconnecting and self._backlog is None:
            sock.resumeProducing()  # else once the backlog is parsed (parseWaiting)

    # -- sending

    def _padding(self, n: int) -> bytes:
        off = self._padOff
        if off + n > len(self._pad):
            self._pad = os.urandom(PAD_POOL)
            off = 0
        self._padOff = off + n
        return self._pad[off : off + n]

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if self.nativeForward is not None:
            self._takeStreamBack()
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
        if self.nativeForward is not None:
            self._takeStreamBack()
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

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Packets sealed inside leave together at the end, in one write (one
        ``sendmsg``), not one each: a channel's deferred request and the data it goes
        with (``BridgedChannel.announce``: the relay's ``share@labrelay`` before a
        session's first bytes), one wake-up of the peer and one system call.  Nested,
        the outer one writes.  Only the AEAD path is held (the others write through
        Twisted's buffer, in order, as before)."""
        if self._cork is not None:
            yield
            return
        self._cork = []
        try:
            yield
        finally:
            chunks, self._cork = self._cork, None
            if chunks and self.transport is not None:
                self._writeSealed(chunks)

    def _uncork(self) -> None:
        """The end of a :class:`CorkGroup`'s hold: what this transport sealed meanwhile."""
        chunks, self._cork = self._cork, None
        if chunks and self.transport is not None:
            self._writeSealed(chunks)

    def _writeSealed(self, chunks: Sequence[bytes]) -> None:
        budget = self.writeBudget
        if budget is None:
            write_now(self.transport, chunks)  # small packets at once, the rest buffered
        else:
            budget.write(chunks)  # any packet at once, within the turn's budget

    def _takeStreamBack(self) -> None:
        """Python is about to send this peer a packet while a native thread may seal for
        it (relay.ssh.nativeforward), which owns the outgoing nonce counter and sequence
        number meanwhile: it hands the stream back first, and what it sealed leaves
        before this packet.

        First thing in ``sendPacket`` and ``sendChannelData``, before anything is
        decided about the packet: the handback meters the thread's last bytes, and when
        they run out the key's byte budget it sends the relay's KEXINIT there and then.
        Decided before it, the packet would follow that KEXINIT out (a connection-layer
        message inside our key exchange, which RFC 4253 7.1 forbids); decided after it,
        it waits for the new keys like every other.  (A KEXINIT that itself takes the
        stream back starts no second one: ``KexMixin._count``.)"""
        forward = self.nativeForward
        if forward is not None and forward.sealing:
            forward.handback("python write", later=True)

    def _sealAndWrite(self, aead: AEADDirection, plain: bytes) -> None:
        if self.nativeForward is not None:
            self._takeStreamBack()  # (done by both callers already: never sealed twice)
        chunks = aead.seal(self.outgoingPacketSequence, plain)
        group = self.corkGroup
        if (self._cork is None and group is not None and group.active
                and len(plain) < CORK_BELOW and plain[1] in CORK_STARTERS):
            group.join(self)  # a bulk packet starts no cork: it goes at once, as before
        if self._cork is not None:
            self._cork.extend(chunks)  # written by corked(), in order
        else:
            self._writeSealed(chunks)
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
        if self._backlog is not None:
            # Read while the rest of an earlier read waits (something resumed the
            # socket): it goes after that rest, in order.
            self._backlog += data
            return
        self._handleRead(data)

    def _handleRead(self, data: bytes) -> None:
        group = self.corkGroup
        if group is None:
            self._handleReadNow(data)
            return
        group.begin()
        try:
            self._handleReadNow(data)
        finally:
            group.end()

    def _handleReadNow(self, data: bytes) -> None:
        share = self.turnShare
        sock = self._socket() if share is not None else None
        budget = None
        if sock is not None:
            budget = share.budget()
            self._turnLeft = budget
        rest = self._received(data, budget)
        if budget is not None:
            share.spend(budget - (self._turnLeft or 0), len(data) - len(rest or b""))
        if self._pacedKexInit is not None:
            # The peer's KEXINIT waits for the pace (KexMixin.ssh_KEXINIT): so does the
            # rest of this read, and the socket is not read until kexPaceOver.
            self._holdForKex(sock if sock is not None else self._socket(), rest or b"")
            return
        if rest:
            # The data held so far waits for the rest of the read (so that a read of
            # small packets is still joined into one chunk per channel), unless
            # another message comes first.
            self._deferRest(sock, rest)
            return
        self._readDone()

    def _readDone(self) -> None:
        """After the whole of a read is handled."""
        flush = self.channelDataFlush
        if flush is not None:
            flush()  # before a native thread may take the stream (its bytes go first)
        if self.nativeCandidate is not None:
            nativeforward.maybe_arm(self)
        if self.readHoldBytes is not None:
            self._holdIfUnread()

    def _socket(self) -> Connection | None:
        """The TCP connection under this protocol (under TLS too), if it is one."""
        sock = self.transport
        if not isinstance(sock, Connection):
            sock = getattr(sock, "transport", None)
            if not isinstance(sock, Connection):
                return None
        return sock

    def _deferRest(self, sock: Any, rest: bytes) -> None:
        """Wait with ``rest`` (what a read held past the turn's budget) for a later
        turn (:meth:`parseWaiting`), and read nothing more from the socket until it is
        parsed."""
        self._backlog = rest
        if self._backlogSock is None:
            self._backlogSock = sock
            sock.pauseProducing()
        self.turnShare.wait(self)

    def stillWaiting(self) -> bool:
        """Whether part of a read waits for a later turn (``UserTurns``); not while a
        KEXINIT is held for the pace (:meth:`kexPaceOver` hands it back)."""
        return self._backlog is not None and not self.kexInitHeld

    def parseWaiting(self, budget: int) -> int:
        """Handle up to ``budget`` packets of what waits (``UserTurns``, at the start of
        a turn); the packets handled."""
        group = self.corkGroup
        if group is None:
            return self._parseWaiting(budget)
        group.begin()
        try:
            return self._parseWaiting(budget)
        finally:
            group.end()

    def _holdForKex(self, sock: Connection | None, rest: bytes) -> None:
        """The peer's KEXINIT is held for the pace: the rest of the read waits with it,
        out of the user's turns, the socket unread, until :meth:`kexPaceOver`."""
        flush = self.channelDataFlush
        if flush is not None:
            flush()  # the data before the KEXINIT goes on now
        if self.turnShare is not None:
            self.turnShare.forget(self)  # not served by the turns while it is held
        self._backlog = rest  # None before: dataReceived appends to a backlog instead
        if self._backlogSock is None and sock is not None:
            self._backlogSock = sock
            sock.pauseProducing()

    def kexPaceOver(self) -> None:
        """The held KEXINIT was handled: what waited behind it is handled as a new read
        (within the user's budget), and the socket read again unless that read waits."""
        if self._backlog is None:
            return
        rest, self._backlog = self._backlog, None
        sock, self._backlogSock = self._backlogSock, None
        self._handleRead(rest)
        if (sock is not None and self._backlog is None and self._readHeld is None
                and not sock.disconnecting and not self._readDead):
            sock.resumeProducing()

    def _parseWaiting(self, budget: int) -> int:
        rest, self._backlog = self._backlog, None
        sock = self._backlogSock
        if rest is None or sock is None or sock.disconnecting or self._readDead:
            # The rest is dropped with the connection; what its first turns already
            # parsed goes on, as it would have without the budget.
            self._backlogSock = None
            flush = self.channelDataFlush
            if flush is not None:
                flush()
            return 0
        self._turnLeft = budget
        rest = self._received(rest, budget)
        used = budget - (self._turnLeft or 0)
        if self.kexInitHeld:
            self._holdForKex(sock, rest or b"")  # the socket stays paused
            return used
        if rest:
            self._backlog = rest  # the socket stays paused
            return used
        self._readDone()
        self._backlogSock = None
        if self._readHeld is None and not sock.disconnecting:  # else outputDrained does
            sock.resumeProducing()
        return used

    def connectionLost(self, reason: Any = None) -> None:
        forward = self.nativeForward
        if forward is not None:
            forward.handback("connection lost", lost=True)
        if self.turnShare is not None:
            self.turnShare.forget(self)
        self._backlog = self._backlogSock = None
        super().connectionLost(reason)

    def _received(self, data: bytes, budget: int | None = None) -> bytes | None:
        """Parse and handle the packets in ``data``; past ``budget`` packets (at a
        packet's end), stop and return the rest of ``data``."""
        if not self.gotVersion:
            return self._versionReceived(data)
        if self._readDead:
            return None
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
                    return None  # a bad length: already disconnecting
                take = min(need - len(rbuf), end - pos)
                if take > 0:
                    rbuf += data[pos : pos + take]
                    pos += take
                got = self._nextPacket(rbuf, 0)
                if got is None:
                    if pos >= end or self._readDead:
                        return None
                    continue  # its size is known now: top up again
                del rbuf[: got[2]]
            else:
                if budget is not None and pos < end:
                    # (Not at the read's end: the budget now carries across reads,
                    # and each read was charged one packet more than it had.)
                    if (self._turnLeft or 0) <= 0:
                        return bytes(data[pos:])  # this turn's packets are done
                    self._turnLeft = (self._turnLeft or 0) - 1
                got = self._nextPacket(data, pos)
                if got is None:
                    if not self._readDead:
                        rbuf += data[pos:]
                    return None
                pos = got[2]
            handler = self.channelDataHandler
            if (got[0] == MSG_CHANNEL_DATA and handler is not None
                    and not self.transport.disconnecting):
                handler(got[1])
            else:
                flush = self.channelDataFlush
                if flush is not None and got[0] not in self.noFlush:
                    flush()  # the data before this message is handed on before it
                self.dispatchMessage(got[0], got[1])
                if self._pacedKexInit is not None:
                    return bytes(data[pos:])  # held with it (_holdForKex)
        return None

    #: Lines the peer sent before its version line, dropped (only a server may).
    _preBannerLines = 0

    def _versionReceived(self, data: bytes) -> bytes | None:
        """Bytes before the peer's version line is complete, kept in ``self.buf``
        (:func:`relay.ssh.guard.scan_version_line` says why not Conch's own check).
        Conch is handed the version line alone, to parse and answer as it does; what
        followed it in the same read goes to the packet path."""
        if self._readDead:
            return None
        buf = self.buf + data
        scan = scan_version_line(buf, self._preBannerLines, preamble=self.isClient)
        self._preBannerLines = scan.lines
        if scan.refusal is not None:
            self.buf = b""
            self._fatal(DISCONNECT_CONNECTION_LOST if scan.refusal == VERSION_TOO_LONG
                        else DISCONNECT_PROTOCOL_ERROR, scan.refusal)
            return None
        if scan.end is None:
            self.buf = buf[scan.skip :]
            return None
        self.buf = b""
        super().dataReceived(buf[scan.skip : scan.end])  # type: ignore[misc]
        rest = buf[scan.end :]
        if rest and self.gotVersion and not self.transport.disconnecting:
            return self._received(rest)
        return None

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
