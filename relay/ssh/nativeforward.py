"""The native open-and-forward thread of a pooled ``ssh -J`` session (issue 13).

A stock ``ssh -J alice@relay svc`` to an end-to-end encrypted service rides one of the
agent's pooled data connections (relay.server.pooled): the relay only opens and seals the
user's outer SSH layer and joins the channel to the data connection.  Done in Python that
costs a reactor turn per read of either socket, the dispatch, the crypto call and the write
(about 2 CPU-s/GiB here, docs/benchmarks.md).  While the session is nothing but
``CHANNEL_DATA`` of that one channel and window adjusts, a native thread (csrc/gpump.c,
via :class:`relay.ssh.gcmrun.Pump`) takes both directions: it reads the user's socket,
opens the AES-GCM packets and writes their bytes to the data connection; it reads the
data connection and seals its bytes as ``CHANNEL_DATA`` for the user within her window and
maximum packet; it takes her ``WINDOW_ADJUST``s and grants her window by the channel's own
rule, sealing those ``WINDOW_ADJUST``s itself.  Python hears from it through an eventfd
only to meter the bytes (:meth:`NativeForward._account`) and, when it stops, to take the
stream back.

**Arming** (:func:`maybe_arm`, after a read whose packets included that channel's data)
only when it is exactly the common case: both connections are plain TCP (a user's SSH
inside the relay's TLS port keeps the Python path), AES-GCM both ways, the native module
and libcrypto are there (``LABRELAY_DATAPATH=python|portable`` keep the Python path), no
key exchange runs, the connection has that one channel, open, bridged to a pooled data
connection (``TCPSide.nativeStats``), nothing buffered for either connection or waiting in
the channel or the link's scheduler, no rate limit, nothing paused, no EOF either way.
The thread starts with the partial packet Python had buffered.

**Handback** (:meth:`NativeForward.handback`) at the first packet the thread does not
take whole (any other message, another channel, over the window, a bad tag or length: the
Python path then does exactly what it does without the thread), at EOF or an error on
either socket, when the data connection stays full (Python's buffer then absorbs up to
the window while it keeps reading the user's other messages), whenever Python writes a
packet to the user (``AEADTransportMixin._sealAndWrite``: the outgoing counter and
sequence number are the thread's while it runs), or when Python ends the channel, either
connection or the service.  Python sets both nonce counters and sequence numbers (strict
KEX depends on them) past the packets the thread opened and sealed, writes the user the
bytes it sealed and had not written, then any grant it had not sealed, writes the data
connection the bytes it opened and had not written, gives the bridge the data
connection's bytes it had not sealed, reads both sockets again and parses the user's
bytes it had not consumed (in the next reactor turn when a Python write asked for the
handback: never inside that write).

**Teardown**: the thread works on duplicates of the two descriptors and closes them
itself when it ends, so Twisted closing its own (a reset, an abort, a shutdown) never
leaves the thread using a number that could be reused; every way the session ends
reaches :meth:`handback`, which joins the thread (it only ever waits in ``poll()``).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.tcp import Connection
from twisted.logger import Logger

from relay.datapath.bridge import Bridge, TCPSide
from relay.ssh.ciphers import MAX_PACKET_LENGTH, GCMDirection
from relay.ssh.gcmrun import REASONS, RUNNING, Pump, PumpState, Seal, native_enabled

MSG_CHANNEL_WINDOW_ADJUST = 93

_log = Logger(namespace="relay.ssh.nativeforward")

#: Wire bytes the thread takes over with it at most (its buffer's size, csrc/gpump.c).
MAX_INITIAL = 512 * 1024
#: Bytes handed on (either way) between the thread's reports to Python: metering only
#: (the session's byte counts, the key's byte budget, keepalive activity), since the
#: thread grants the window itself; a pause of 20 ms reports at once.
REPORT = 8 * 1024 * 1024


def tally(side: TCPSide, counter: str, n: int) -> None:
    """Add ``n`` to ``counter`` relay-wide (``side.nativeStats``: status and metrics) and
    for this session alone (``side.nativeSession``: its ``session_close`` line)."""
    for counts in (side.nativeStats, getattr(side, "nativeSession", None)):
        if counts is not None:
            counts[counter] = counts.get(counter, 0) + n


def _data_side(channel: Any) -> TCPSide | None:
    bridge = getattr(channel, "bridge", None)
    if type(bridge) is not Bridge or bridge.onData is not None:  # a rate limit charges per chunk
        return None
    side = bridge.b if bridge.a is channel else bridge.a
    if not isinstance(side, TCPSide) or side.nativeStats is None:
        return None
    return side


def _idle_transport(tcp: Any) -> bool:
    """Twisted holds nothing unsent for ``tcp`` (so the thread's writes come next)."""
    return (not getattr(tcp, "disconnecting", True) and not getattr(tcp, "_tempDataBuffer", 1)
            and len(getattr(tcp, "dataBuffer", b"x")) == getattr(tcp, "offset", -1))


def _plain_tcp(tcp: Any) -> bool:
    """``tcp`` is Twisted's own TCP connection, its socket carrying exactly the bytes
    the protocol sees: not a wrapper (the relay's TLS port wraps a user's SSH in TLS, and
    a wrapper forwards ``fileno()`` to a socket that carries TLS records)."""
    return isinstance(tcp, Connection)


def _sends_as_python_would(conn: Any, channel: Any) -> bool:
    """The thread may seal the channel's bytes to the user: nothing of the channel's
    waits in Python (its own queue, the link's scheduler, an announcement), the link is
    not congested, and none of the per-credit hooks a thread would skip is set (a
    resumable session's window cap and credit hook; its bridge is never a plain
    ``Bridge`` anyway)."""
    return (not channel._queued and channel._announce is None and not channel._sentEOF
            and not channel.closing and getattr(channel, "windowCap", None) is None
            and getattr(channel, "onCredit", None) is None and channel.remoteMaxPacket > 0
            and channel in conn.channelsToRemoteChannel and not conn.scheduler
            and not conn.congested)


def maybe_arm(transport: Any) -> NativeForward | None:
    """Start the thread for ``transport.nativeCandidate`` (the channel whose data the
    last read carried) if this is the case it is made for (module docstring)."""
    channel, transport.nativeCandidate = transport.nativeCandidate, None
    if getattr(transport, "_cork", None) is not None:
        # Packets Python sealed in this read wait in the transport's cork (a CorkGroup
        # writes them at the read's end): the thread's packets, sealed after them, would
        # reach the user first and fail her MAC check.  A later read arms it.
        return None
    if (transport.nativeForward is not None or not _plain_tcp(transport.transport)
            or not native_enabled()):
        return None
    gcm = getattr(transport.currentEncryptions, "inAEAD", None)
    out = getattr(transport.currentEncryptions, "outAEAD", None)
    tcp = transport.transport
    rbuf = transport._rbuf
    if (not isinstance(gcm, GCMDirection) or not isinstance(out, GCMDirection)
            or transport._readDead or transport.buf or transport._backlog is not None
            or transport._keyExchangeState != transport._KEY_EXCHANGE_NONE
            or transport.sessionID is None or rbuf is None or len(rbuf) > MAX_INITIAL
            or getattr(tcp, "disconnecting", True) or not hasattr(tcp, "stopReading")):
        return None
    conn = transport.service
    if (conn is None or getattr(conn, "_stopped", True) or len(conn.channels) != 1
            or conn.channels.get(channel.id) is not channel):
        return None
    if (channel.localClosed or channel.remoteClosed or channel._gotEOF or channel._pauses
            or channel.localWindowLeft <= 0 or not _sends_as_python_would(conn, channel)):
        return None
    side = _data_side(channel)
    if (side is None or side._closed or side._wroteEOF or side._readEOF or side._pauses
            or not _plain_tcp(side.transport) or side.transport.disconnecting):
        return None
    if not _idle_transport(tcp):
        # the thread's sealed packets must follow everything Python wrote to the user
        if tcp.doWrite() is not None or not _idle_transport(tcp):
            return None
    if not _idle_transport(side.transport):
        # The bytes this read delivered wait in Twisted's buffer until the reactor's
        # next write turn: send them now (what that turn would do), so the thread's
        # writes come after them.  An error stays for the reactor to find.
        if side.transport.doWrite() is not None or not _idle_transport(side.transport):
            return None
    # The thread grants the user's window by the channel's own rule and seals the
    # WINDOW_ADJUSTs itself, so Python hears from it only to meter (every REPORT bytes,
    # or 20 ms after the last ones).
    seal = Seal(out.key, out.fixed, out.counter, conn.channelsToRemoteChannel[channel],
                channel.remoteWindowLeft, channel.remoteMaxPacket, channel.localWindowSize,
                channel._credit)
    try:
        pump = Pump(gcm.key, gcm.fixed, gcm.counter, channel.id, channel.localWindowLeft,
                    channel.localMaxPacket, MAX_PACKET_LENGTH, tcp.fileno(),
                    side.transport.fileno(), bytes(rbuf), REPORT, seal)
    except (OSError, ValueError) as e:
        _log.debug("native forwarding not started: {why}", why=str(e))
        return None
    rbuf.clear()
    tcp.stopReading()
    side.transport.stopReading()  # the thread reads the agent's bytes now
    forward = NativeForward(transport, channel, side, gcm, pump)
    transport.nativeForward = forward
    side.forwarder = forward
    tcp.reactor.addReader(forward)
    if side.nativeSession is None:
        side.nativeSession = {}
    tally(side, "native_runs", 1)
    return forward


class NativeForward:
    """One armed session: the reactor's view of its thread (an ``IReadDescriptor`` on
    the thread's eventfd)."""

    def __init__(self, transport: Any, channel: Any, side: TCPSide, gcm: GCMDirection,
                 pump: Pump) -> None:
        self.transport = transport
        self.channel = channel
        self.side = side
        self.gcm = gcm
        self.pump = pump
        #: The thread seals the reverse direction too: it owns the outgoing stream (nonce
        #: counter, sequence numbers) until :meth:`handback`, and Python's grants to the
        #: user go through it (:meth:`grantSend`).
        self.sealing = pump.sealing
        out = getattr(transport.currentEncryptions, "outAEAD", None) if self.sealing else None
        self.out: GCMDirection | None = out
        self._seen = PumpState(RUNNING, gcm.counter, 0, 0, 0, 0, 0,
                               out.counter if out is not None else 0)
        self._asked = 0  # grants Python asked the thread to seal
        #: the thread grants by the channel's rule (``Seal.window_size``): Python only
        #: counts what it granted, and takes its credit back at the handback
        self.selfGrants = self.sealing and pump.self_grants
        self._fd = pump.fileno()
        self.done = False

    # IReadDescriptor

    def fileno(self) -> int:
        return -1 if self.done else self._fd

    def logPrefix(self) -> str:
        return "NativeForward"

    def doRead(self) -> None:
        if self.done:
            return
        state = self.pump.poll()
        self._account(state)
        if state.reason != RUNNING and not self.done:
            self.handback(REASONS.get(state.reason, "?"))

    def connectionLost(self, reason: Any) -> None:
        """The reactor dropped the eventfd (it is shutting down)."""
        self.handback("reactor")

    # the relay's grants, while the thread owns the outgoing stream

    def grantSend(self, nbytes: int) -> None:
        """Python granted the user ``nbytes`` more (``FlowConnection.adjustWindow``,
        which already counted them): the thread seals the ``WINDOW_ADJUST``."""
        self._asked += nbytes
        self.pump.grant_send(nbytes)

    # the thread's progress

    def _account(self, state: PumpState) -> None:
        """Meter what the thread did since the last look: the window it used, the bytes
        it handed on either way (which re-open the window, as a bridge's delivery does),
        the user's credit, the key's byte budget and the connection's activity.  The
        byte budget comes last: it may start the relay's own key exchange, whose
        KEXINIT takes the stream back first (``AEADTransportMixin._sealAndWrite``)."""
        seen, self._seen = self._seen, state
        consumed = state.consumed - seen.consumed
        written = state.written - seen.written
        packets = state.packets - seen.packets
        sealed = state.sealed - seen.sealed
        adjusted = state.adjusted - seen.adjusted
        oplain = state.oplain - seen.oplain
        channel = self.channel
        bridge = channel.bridge
        if consumed or packets:
            channel.localWindowLeft -= consumed
            activity = getattr(self.transport.service, "activity", None)
            if activity is not None:
                activity()
        if sealed or adjusted:
            channel.remoteWindowLeft += adjusted - sealed
            if sealed:
                self._carried(bridge, False, sealed, "native_sealed")
        if written:
            self._carried(bridge, True, written, "native_bytes")
            if not self.selfGrants:
                before = channel.localWindowLeft
                channel.consumed(written)  # a sealing thread's: adjustWindow -> grantSend
                credit = channel.localWindowLeft - before
                if credit > 0 and not self.done and not self.sealing:
                    self.pump.grant(credit)
        sgranted = state.sgranted - seen.sgranted
        if sgranted:
            channel.localWindowLeft += sgranted  # the thread's grants, by the channel's rule
        if self.transport.sessionID is not None:
            # as the per-packet paths count (each payload after its message number; each
            # sealed plaintext)
            count = (consumed + 8 * packets if packets else 0) + oplain
            if count:
                self.transport._count(count)

    def _carried(self, bridge: Bridge | None, toService: bool, nbytes: int,
                 counter: str) -> None:
        """``nbytes`` the thread handed on one way (``toService``: opened from the user
        and written to the data connection; else read from it and sealed to the user):
        counted in the bridge's direction, the relay-wide ``counter`` and the session's
        own (``TCPSide.nativeSession``, its ``session_close``)."""
        if bridge is not None:
            if (bridge.a is self.channel) is toService:
                bridge.bytesAtoB += nbytes
            else:
                bridge.bytesBtoA += nbytes
        tally(self.side, counter, nbytes)

    def handback(self, why: str, lost: bool = False, dataLost: bool = False,
                 later: bool = False) -> None:
        """End the thread's ownership and give the stream back to the Python path
        (module docstring).  ``lost``: the user's connection is gone, feed nothing and
        write nothing to it; ``dataLost``: the data connection is, write nothing to it;
        ``later``: Python is about to write a packet to the user (the caller's), so the
        user's bytes the thread did not consume are parsed in a later reactor turn, not
        inside that write."""
        if self.done:
            return
        transport, side, channel = self.transport, self.side, self.channel
        tcp = transport.transport
        tcp.reactor.removeReader(self)  # by fileno(): before it says -1
        self.done = True
        state, left, pending, unsealed, unsent = self.pump.stop()
        if transport.nativeForward is self:
            transport.nativeForward = None
        if side.forwarder is self:
            side.forwarder = None
        self.gcm.counter = state.counter
        transport.incomingPacketSequence = (
            transport.incomingPacketSequence + state.packets) & 0xFFFFFFFF
        gone = lost or getattr(tcp, "disconnected", False)
        mine = getattr(side, "nativeSession", None)
        if mine is not None:  # relay-wide, the runs count them
            mine["native_handbacks"] = mine.get("native_handbacks", 0) + 1
        if later:
            tally(side, "native_yields", 1)
        if self.out is not None:
            # The outgoing stream, exactly where the thread left it: what it sealed and
            # did not write goes first, then the grants it had not sealed yet.
            self.out.counter = state.ocounter
            transport.outgoingPacketSequence = (
                transport.outgoingPacketSequence + state.opackets) & 0xFFFFFFFF
            if unsent and not gone:
                tcp.write(unsent)
        _log.debug("native forwarding handed back: {why}", why=why, event="native_handback",
                   reason=REASONS.get(state.reason, why), packets=state.packets,
                   written=state.written, reads=state.reads, dreads=state.dreads,
                   sealed=state.sealed, opackets=state.opackets, batched=state.batched,
                   err=state.err)
        if self.selfGrants:
            channel._credit = state.credit  # written and not yet granted: the channel's now
        owed = self._asked + state.sgranted - state.granted
        if owed > 0 and not gone and not channel.localClosed:
            transport.sendPacket(MSG_CHANNEL_WINDOW_ADJUST, struct.pack(
                ">2L", transport.service.channelsToRemoteChannel[channel], owed))
        if self.selfGrants and not gone and not channel.localClosed:
            channel.consumed(0)  # a credit the thread had no turn to grant: the rule now
        self._account(state)
        bridge = channel.bridge
        if pending and not dataLost and not side._closed and bridge is not None:
            bridge.dataReceived(channel, pending)
        if unsealed and not gone and bridge is not None:
            bridge.dataReceived(side, unsealed)
        if (self.out is not None and not dataLost and not side._closed and not side._pauses
                and not side.transport.disconnecting):
            side.transport.startReading()
        if gone or transport._readDead:
            return
        if not tcp.disconnecting:
            tcp.startReading()
        if left:
            if later:
                rbuf = transport._rbuf
                if rbuf is None:
                    rbuf = transport._rbuf = bytearray()
                rbuf[:0] = left
                tcp.reactor.callLater(0, self._feed)
            else:
                transport.dataReceived(left)

    def _feed(self) -> None:
        """Parse what the thread left (now in the transport's buffer, ``handback``)."""
        transport = self.transport
        if not getattr(transport.transport, "disconnected", True) and transport._rbuf:
            transport.dataReceived(b"")
