"""``BridgedChannel``: an SSH channel that is one side of a :class:`relay.datapath.bridge.Bridge`.

Window discipline (DESIGN §4): the receive window shrinks as data arrives (in
:class:`relay.ssh.connection.FlowConnection`) and is re-opened here only for
bytes the bridge reported as accepted downstream while the downstream was not
full.  Bytes accepted into a full downstream are *owed* and credited when it
drains.  So the bytes of one session held anywhere in this process are bounded
by the window we advertise plus the downstream's own high-water mark.

The send side pauses the bridge's other side when the peer's window is spent or
the link itself is congested.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import defer
from twisted.logger import Logger

from relay.config.schema import DEFAULT_MAX_PACKET, DEFAULT_WINDOW
from relay.ssh.earlydata import EarlySend
from relay.ssh.wire import EARLY_DATA, SHARE, pack_early_data, unpack_share

if TYPE_CHECKING:
    from relay.datapath.bridge import Bridge, EarlySink

WINDOW_EXHAUSTED = "window"
LINK_CONGESTED = "link"
_NONE: frozenset[str] = frozenset()
"""No pause or congestion reason: the shared empty set every idle channel points at."""
READ_AHEAD_FULL = "read-ahead"
"""Congested because the window left could not take one more read of the source (a
resumable session's channel, :meth:`BridgedChannel.capWindow`)."""


class BridgedChannel(SSHChannel):
    """A forwarding channel (``direct-tcpip`` or ``forwarded-tcpip``).

    Per-session memory (docs/performance.md): the attributes it adds to Conch's are
    slots, so the instance dict keeps only Conch's and stays a small split-table dict
    (past 30 keys CPython gives each instance a full dict: 1.6 KiB instead of about
    0.3), and what an idle channel never uses is made on first use (the queue beyond the
    peer's window, early data, the pause and congestion reasons): 10 000 idle
    sessions hold 10 000 channels at the relay and 10 000 at the agent."""

    __slots__ = (
        "_announce",
        "_congestion",
        "_credit",
        "_early",
        "_earlySend",
        "_eofPending",
        "_gotEOF",
        "_isClosed",
        "_owed",
        "_pauses",
        "_queued",
        "_sentEOF",
        "_sink",
        "bridge",
        "onClosedUnbridged",
        "onCredit",
        "openData",
        "opened",
        "peerClosed",
        "readAhead",
        "shareUser",
        "shareWeight",
        "windowCap",
    )

    _log = Logger()
    conn: Any  # always set once the channel is in use (Conch types it Optional)

    def __init__(
        self,
        name: bytes,
        *,
        window: int = DEFAULT_WINDOW,
        maxPacket: int = DEFAULT_MAX_PACKET,
        remoteWindow: int = 0,
        remoteMaxPacket: int = 0,
        conn: Any = None,
    ) -> None:
        super().__init__(
            localWindow=window,
            localMaxPacket=maxPacket,
            remoteWindow=remoteWindow,
            remoteMaxPacket=remoteMaxPacket,
            conn=conn,
        )
        self.name = name
        # Whose bytes these are, for the link's fair share (relay.ssh.connection): set
        # by the relay, and at the agent by the relay's ``share@labrelay`` request.
        self.shareUser = ""
        self.shareWeight = 1.0
        self.bridge: Bridge | None = None
        self.opened: defer.Deferred[BridgedChannel] = defer.Deferred()
        self._early: list[bytes] | None = None  # data before attach(), rare
        # While set (sendHeldTo): where that data is also sent on as it arrives (an
        # early-confirmed user channel, before the agent answered: relay.server.opening).
        self._sink: EarlySink | None = None
        # A channel we opened whose first bytes may go before its confirmation
        # (relay.ssh.earlydata): what went early, skipped when the bridge writes it.
        self._earlySend: EarlySend | None = None
        self._credit = 0
        self._owed = 0
        self._pauses = _NONE  # why the bridge asked us not to re-open the window
        self._congestion = _NONE  # why the bridge's other side is paused (sink full)
        self._eofPending = False
        self._sentEOF = False
        self._gotEOF = False
        self._isClosed = False
        # Called (with whether the peer sent EOF first) if the channel closes before a
        # bridge took it: an early-confirmed user channel (relay.server.opening) whose
        # agent has not answered yet, so that its session ends at once.
        self.onClosedUnbridged: Callable[[bool], object] | None = None
        # Bytes beyond the peer's window, in arrival order.  Conch's own ``buf``
        # grows by ``bytes +=``, copying the whole backlog on every packet (measured:
        # a quarter of the relay's CPU when one channel feeds another).  None until
        # the window is first spent (an empty deque is 760 bytes).
        self._queued: deque[bytes] | None = None
        # The peer re-opened our send window by n: the bytes it handed on downstream
        # (a resumable session trims its replay buffer by them; relay.ssh.resumable).
        self.onCredit: Callable[[int], object] | None = None
        # At most this many bytes sent and not yet credited, whatever window the peer
        # offers (sending less than a peer allows is always allowed): a resumable
        # session keeps those bytes for a replay, so the peer must not choose how many.
        self.windowCap: int | None = None
        # With a cap: the source is paused while less than this is left of the window,
        # so the read that would overflow it is never made (see ``capWindow``).
        self.readAhead = 0
        self.openData = b""  # the confirmation's channel-specific data, once open
        # The peer sent CHANNEL_CLOSE (Conch marks remoteClosed on a dropped connection too).
        self.peerClosed = False
        # A channel request (type, data) that goes out with this channel's next packet
        # rather than in a packet of its own (see announce()).
        self._announce: tuple[bytes, bytes] | None = None

    # Conch events

    def channelOpen(self, specificData: bytes) -> None:
        self.openData = specificData
        if self._earlySend is not None:
            self._earlySend.close()  # answered: the rest goes as CHANNEL_DATA
        if not self.opened.called:
            self.opened.callback(self)

    def openFailed(self, reason: Any) -> None:
        if self._earlySend is not None:
            self._earlySend.close()
        if not self.opened.called:
            self.opened.errback(reason)

    def dataReceived(self, data: bytes) -> None:
        bridge = self.bridge
        if bridge is None:
            if self._early is None:
                self._early = []
            self._early.append(data)  # bounded: no window is re-opened for it
            if self._sink is not None:
                self._sink.offer(data)
        else:
            bridge.dataReceived(self, data)

    @property
    def holding(self) -> bool:
        """Whether bytes arrived before a bridge took the channel."""
        return bool(self._early)

    # early data (relay.ssh.earlydata): this end opened the channel

    def allowEarly(self, limit: int) -> None:
        """The peer takes up to ``limit`` of this channel's first bytes before it
        answers the open (it said ``early-data-ok@labrelay``)."""
        self._earlySend = EarlySend(limit)

    def sendEarly(self, data: bytes) -> bool:
        """Send ``data``, the next bytes of this channel's stream, before the peer
        answered the open: True if sent (the bridge's write of them later is skipped),
        False if they wait for the answer (and so does everything after them)."""
        early = self._earlySend
        if early is None or self.conn is None or self.id is None:
            return False
        if getattr(self.conn, "congested", False) or getattr(self.conn, "scheduler", None):
            # Bytes wait for the link's fair share: these must not pass them (nor
            # anything after them: only a prefix goes early).
            early.close()
            return False
        if not early.take(len(data)):
            return False
        self.conn.sendGlobalRequest(EARLY_DATA, pack_early_data(self.id, data), wantReply=0)
        return True

    def eofReceived(self) -> None:
        self._gotEOF = True
        if self.bridge is not None:
            self.bridge.eofReceived(self)
        self._maybeFinish()

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        """``share@labrelay`` (the relay says whose session this is), taken only on a
        connection whose peer may say it (``FlowConnection.takesShare``: an agent's
        link to its relay); anything else is refused, as Conch does."""
        if requestType != SHARE or not getattr(self.conn, "takesShare", False):
            return 0
        try:
            user, weight = unpack_share(data)
        except ValueError:
            # Once per connection: the relay's requests are the relay's to send, and a
            # compromised one sent 2 000 in a loop for 2 000 warnings.
            if not getattr(self.conn, "shareMalformedSeen", False):
                self.conn.shareMalformedSeen = True
                self._log.warn("malformed {request} request; ignored (further ones on this "
                               "connection are not logged)", request=SHARE.decode(),
                               event="share_malformed")
            return 0
        self.tagShare(user, weight)
        return 1

    def tagShare(self, user: str, weight: float) -> None:
        """This channel carries ``user``'s bytes, whose share of a congested link is
        ``weight`` (its connection's scheduler, relay.ssh.connection)."""
        self.shareUser, self.shareWeight = user, weight
        scheduler = getattr(self.conn, "scheduler", None)
        if scheduler is not None:
            # Bytes it queued before the tag (a download whose request went early) were
            # no one's; they and the rest are the user's now (FairScheduler.move).  The
            # weight lives as long as a channel tagged so (FairScheduler.tag/untag).
            scheduler.tag(self, user, weight)

    def announce(self, requestType: bytes, data: bytes) -> None:
        """Send the channel request ``requestType`` (no reply wanted) just before this
        channel's next data, window adjust or EOF, not now: the relay's
        ``share@labrelay`` (whose session this is) only matters to the peer once it has
        bytes to schedule for the channel, and sent on its own at open it cost a packet,
        a write and a wake-up of the agent per session before the first byte (set-up
        latency, docs/performance.md).  Sent in the same reactor turn as that next
        packet, both leave in one TCP write."""
        self._announce = (requestType, data)

    def _announced(self) -> None:
        pending, self._announce = self._announce, None
        if pending is not None and self.conn is not None:
            self.conn.sendRequest(self, pending[0], pending[1])

    def closeReceived(self) -> None:
        """The peer closed: what is still queued for it can never be sent."""
        self.peerClosed = True
        self._discard()
        self.conn.sendClose(self)

    def _discard(self) -> None:
        """Drop what waits for the peer, here and in the link's scheduler."""
        if self._queued is not None:
            self._queued.clear()
        discard = getattr(self.conn, "discard", None)
        if discard is not None:
            discard(self)

    def closed(self) -> None:
        self._isClosed = True
        if self.bridge is not None:
            self.bridge.sideClosed(self, clean=self._gotEOF)
        elif self.onClosedUnbridged is not None:
            report, self.onClosedUnbridged = self.onClosedUnbridged, None
            report(self._gotEOF)

    # sending, within the peer's window

    def write(self, data: bytes) -> None:
        early = self._earlySend
        if early is not None and early.skip:
            # The first bytes of the stream went before the answer (sendEarly): the
            # peer has them, and counted them in the window it confirmed.
            n = early.skipped(len(data))
            self.remoteWindowLeft = max(0, self.remoteWindowLeft - n)
            data = data[n:]
            if not data:
                # What would have gone with them goes now: the relay's share@labrelay
                # (whose session this is), which the agent needs before it schedules
                # the reply (the fair share, docs/sharing.md).
                if self._announce is not None and self.conn is not None:
                    self._announced()
                return
        if self._queued:
            self._queued.append(data)
        else:
            self._sendWithinWindow(data)

    def _sendWithinWindow(self, data: bytes) -> None:
        window = self.remoteWindowLeft
        if len(data) > window:
            if self._queued is None:
                self._queued = deque()
            self._queued.append(data[window:])
            data = data[:window]
            if self.areWriting:
                self.areWriting = 0
                self.stopWriting()
        if data:
            self._sendNow(data)
        self._checkReadAhead()

    def _sendNow(self, data: bytes) -> None:
        if self._announce is not None:
            corked = getattr(getattr(self.conn, "transport", None), "corked", None)
            if corked is not None:
                with corked():  # the request and these bytes: one write
                    self._announced()
                    self._sendChunks(data)
                return
            self._announced()
        self._sendChunks(data)

    def _sendChunks(self, data: bytes) -> None:
        step, send = self.remoteMaxPacket, self.conn.sendData
        if len(data) <= step:
            send(self, data)
        else:
            view = memoryview(data)
            for offset in range(0, len(data), step):
                send(self, view[offset:offset + step])  # copied once, into the packet
        self.remoteWindowLeft -= len(data)

    def capWindow(self, cap: int, readAhead: int = 0) -> None:
        """Send at most ``cap`` bytes beyond what the peer credited (see ``windowCap``).

        With ``readAhead`` (the most a source delivers in one read), the bridge's
        other side is told the sink is full as soon as less than that is left of the
        window, so it stops reading *before* the read that would not fit: the bytes
        written and not yet credited (a resumable session's replay buffer) then stay
        within the window, and what the source has not been asked for waits in the
        kernel's socket buffer, not in this process.  The margin is at most a quarter
        of the window (a fresh channel's, so the peer's whole window): the peer
        credits once it holds half a window uncredited, which must still be reachable
        with the source paused, or the session would stall."""
        self.windowCap = cap
        self.remoteWindowLeft = min(self.remoteWindowLeft, cap)
        self.readAhead = min(readAhead, self.remoteWindowLeft // 4)
        self._checkReadAhead()

    def _checkReadAhead(self) -> None:
        if not self.readAhead:
            return
        if self.remoteWindowLeft < self.readAhead:
            self._congest(READ_AHEAD_FULL)
        else:
            self._decongest(READ_AHEAD_FULL)

    def addWindowBytes(self, data: int) -> None:
        self.remoteWindowLeft += data
        if self.windowCap is not None and self.remoteWindowLeft > self.windowCap:
            self.remoteWindowLeft = self.windowCap
        if self.onCredit is not None:
            self.onCredit(data)
        queued = self._queued
        while queued and self.remoteWindowLeft > 0:
            chunk = queued[0]
            if len(chunk) > self.remoteWindowLeft:
                queued[0] = chunk[self.remoteWindowLeft:]
                chunk = chunk[:self.remoteWindowLeft]
            else:
                queued.popleft()
            self._sendNow(chunk)
        self._checkReadAhead()
        if queued:
            return
        if not self.areWriting and not self.closing:
            self.areWriting = 1
            self.startWriting()
        if self._eofPending:
            self._eofPending = False
            self._sendEOF()
        if self.closing:
            self.loseConnection()

    def sendHeldTo(self, sink: EarlySink) -> None:
        """Offer the data this channel holds before its bridge exists to ``sink`` now,
        and what arrives later as it arrives, so that her first bytes need not wait
        here for the agent's answer: on the link, ``early-data@labrelay`` on the agent's
        pending channel (relay.ssh.earlydata.EarlyFeed); on the pooled route, written
        right behind the GO (relay.server.pooled).

        The bytes are still *held*: kept here and no window re-opened for them, so what
        she can send before the answer stays bounded by her window, exactly as without
        a sink.  The owner then either bridges this channel (:meth:`attach` stops the
        sink and counts what it says the other side has already as handed on: credited,
        not written again; the rest goes on as usual), or calls :meth:`stopSending`
        first (the answer failed: the bytes are dropped with the channel, or all handed
        on to another side at attach).  One sink at a time."""
        assert self._sink is None, "a sink already takes this channel's held bytes"
        self._sink = sink
        for data in self._early or ():
            sink.offer(data)

    def stopSending(self) -> None:
        """Stop :meth:`sendHeldTo`: what is held goes to whichever side attaches next
        (the link, when the pooled connection turned out dead), all of it."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.stop()

    def endUnbridged(self) -> None:
        """End a channel confirmed before its bridge existed (an early-confirmed user
        channel whose agent side never opened, relay.core.earlyopen): what it held is
        dropped, and the peer sees EOF then close, as from the seed's chain."""
        self._early = None
        self.stopSending()
        self.writeEOF()
        self.loseConnection()

    def loseConnection(self) -> None:
        self.closing = 1
        if not self._queued:
            self.conn.sendClose(self)

    def stopWriting(self) -> None:
        self._congest(WINDOW_EXHAUSTED)

    def startWriting(self) -> None:
        self._decongest(WINDOW_EXHAUSTED)

    def linkCongested(self, congested: bool) -> None:
        if congested:
            self._congest(LINK_CONGESTED)
        else:
            self._decongest(LINK_CONGESTED)

    def _congest(self, reason: str) -> None:
        first = not self._congestion
        if reason not in self._congestion:
            self._congestion = self._congestion | {reason}
        if first and self.bridge is not None:
            self.bridge.sinkFull(self)

    def _decongest(self, reason: str) -> None:
        if reason not in self._congestion:
            return
        self._congestion = self._congestion - {reason} or _NONE
        if not self._congestion and self.bridge is not None:
            self.bridge.sinkDrained(self)

    # Side

    def attach(self, bridge: Bridge) -> None:
        self.bridge = bridge
        if self._congestion:
            bridge.sinkFull(self)
        early: Sequence[bytes] = self._early or ()
        self._early = None
        sink, self._sink = self._sink, None
        there = 0 if sink is None else sink.stop()
        if there:  # written to the other side already (sendHeldTo)
            bridge.handedOn(self, there)
        for data in early:
            if there >= len(data):
                there -= len(data)
            else:
                bridge.dataReceived(self, data[there:] if there else data)
                there = 0
        if early:
            offer = getattr(self.conn, "offerNative", None)
            if offer is not None:
                offer(self)  # relay.ssh.nativeforward: as after a read that carried them
        if self._gotEOF:
            bridge.eofReceived(self)
        if self._isClosed:
            bridge.sideClosed(self, clean=self._gotEOF)

    def consumed(self, nbytes: int) -> None:
        if self._pauses:
            self._owed += nbytes
        else:
            self._grant(nbytes)

    def _grant(self, nbytes: int) -> None:
        self._credit += nbytes
        # Like OpenSSH: top the window up once less than half of it is left,
        # so a bulk sender gets one WINDOW_ADJUST per half window, not per packet.
        if self.localWindowLeft < self.localWindowSize // 2 and not self.localClosed:
            credit, self._credit = self._credit, 0
            if self._announce is not None:
                self._announced()
            self.conn.adjustWindow(self, credit)

    def pauseReading(self, reason: str) -> None:
        if reason not in self._pauses:
            self._pauses = self._pauses | {reason}

    def resumeReading(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses = self._pauses - {reason} or _NONE
        if not self._pauses and self._owed:
            owed, self._owed = self._owed, 0
            self._grant(owed)

    def writeEOF(self) -> None:
        if self._sentEOF or self.localClosed:
            return
        if self._queued:
            self._eofPending = True
        else:
            self._sendEOF()

    def _sendEOF(self) -> None:
        self._sentEOF = True
        if self._announce is not None:
            self._announced()
        self.conn.sendEOF(self)
        self._maybeFinish()

    def _maybeFinish(self) -> None:
        if self._sentEOF and self._gotEOF:
            self.loseConnection()

    def close(self) -> None:
        if not self.localClosed:
            self.loseConnection()

    def abort(self) -> None:
        self._discard()
        self.conn.sendClose(self)
