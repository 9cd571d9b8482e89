"""The one flow-controlled pipe between two byte streams.

Every place labrelay joins two streams (a TCP connection and an SSH channel at
the agent; later channel to channel at the relay) goes through :class:`Bridge`.
The rules it enforces, whatever the sides are:

* bytes read from one side are written to the other at once; nothing is queued
  in the bridge itself;
* when a side's *sink* reports that it is full, the other side stops *reading*
  (a TCP transport stops reading its socket; an SSH channel stops re-opening its
  receive window, so the peer's window is the buffer bound) and resumes when the
  sink drains;
* a side learns that bytes it delivered were accepted downstream through
  :meth:`Side.consumed`, which is where an SSH channel re-opens its window;
* EOF travels one way while data keeps flowing the other (half-close); the
  bridge ends when both sides are closed.

A side is anything implementing :class:`Side`; :class:`TCPSide` adapts a Twisted
TCP transport.  The SSH channel side lives in :mod:`relay.ssh.channels`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.datapath.net import write_now


class Side(TypingProtocol):
    """One end of a bridge, as the bridge sees it."""

    def attach(self, bridge: Bridge) -> None:
        """Start delivering events to ``bridge`` (buffered data first)."""

    def write(self, data: bytes) -> None:
        """Send ``data`` out of this side.  Never refuses; reports congestion
        through ``bridge.sinkFull``/``bridge.sinkDrained``."""

    def consumed(self, nbytes: int) -> None:
        """``nbytes`` this side delivered were handed on downstream."""

    def pauseReading(self, reason: str) -> None:
        """Stop delivering data until every pause reason is lifted."""

    def resumeReading(self, reason: str) -> None:
        """Lift one pause reason."""

    def writeEOF(self) -> None:
        """No more data will be written (after what was written is sent)."""

    def close(self) -> None:
        """Close gracefully once pending writes are flushed."""

    def abort(self) -> None:
        """Close now, dropping anything pending."""


class EarlySink(TypingProtocol):
    """Where a side sends the bytes it holds before its bridge exists, as they arrive,
    so that they need not wait at the relay for the other side's answer.

    One interface for the two routes a user's first bytes take early: on the agent's
    link, ``early-data@labrelay`` on the agent's pending channel
    (:class:`relay.ssh.earlydata.EarlyFeed`, for a user's channel and a public port's
    :class:`TCPSide` alike), and on a pooled data connection, written right behind the
    GO (relay.server.pooled).  The side keeps every byte it offers (held: no window
    re-opened for them) until :meth:`stop`, so a sink that could not send them loses
    nothing.  Each sink keeps its own rule of what goes (only a prefix of the stream,
    within its own limit); the side just offers."""

    def offer(self, data: bytes) -> None:
        """The side's next held chunk, in the stream's order."""

    def stop(self) -> int:
        """Nothing more is offered: the bridge takes over, or the session ended.
        Returns how many of the offered bytes, from the first, are already where the
        bridge's other side writes them (counted as handed on at attach, not written
        again); 0 where that side skips them itself or they went nowhere."""


SINK_FULL = "sink-full"
NO_PEER = "no-peer"
"""A :class:`TCPSide`'s pause until it is bridged (a forward's accepted connection
before its channel opened)."""
_NONE: frozenset[str] = frozenset()


class Bridge:
    """Joins two sides; see the module docstring for the guarantees.

    ``onClosed`` is called once, when both sides have closed, with the byte
    counts ``(a_to_b, b_to_a)``: accounting and status hook in there.
    ``onData(src, nbytes)``, if set, is called after each chunk read from ``src`` was
    handed on: a rate limit charges there and pauses ``src`` with its own reason.
    """

    _log = Logger()
    #: How the session began to end, set once by the first EOF or close of either side:
    #: ``(side, how)`` with ``side`` 0 for ``a``, 1 for ``b`` and ``how`` one of
    #: ``"eof"``, ``"closed"`` (after its EOF or a clean close) or ``"reset"``; owners name
    #: it in their close events (:meth:`endedBy`).  A class default until then, so an idle
    #: bridge holds nothing for it.
    firstEnd: tuple[int, str] | None = None

    def __init__(self, a: Side, b: Side, onClosed: object = None,
                 onData: Callable[[Side, int], None] | None = None) -> None:
        self.a = a
        self.b = b
        self.bytesAtoB = 0
        self.bytesBtoA = 0
        # Which sides have not closed yet (two flags, not a set: 10 000 idle sessions
        # hold 10 000 bridges per process; docs/performance.md).
        self._aOpen = self._bOpen = True
        self._onClosed = onClosed
        self.onData = onData
        a.attach(self)
        b.attach(self)

    def peer(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    # events from the sides

    def dataReceived(self, src: Side, data: bytes) -> None:
        if src is self.a:
            self.bytesAtoB += len(data)
            self.b.write(data)
        else:
            self.bytesBtoA += len(data)
            self.a.write(data)
        src.consumed(len(data))
        if self.onData is not None:
            self.onData(src, len(data))

    def handedOn(self, src: Side, nbytes: int) -> None:
        """``nbytes`` from ``src`` reached the other side before this bridge existed,
        written there by ``src``'s :class:`EarlySink` (the pooled route's pipelining,
        :meth:`relay.ssh.channels.BridgedChannel.sendHeldTo`): counted, credited to
        ``src`` and charged to a rate limit as if this bridge had carried them, not
        written again."""
        if src is self.a:
            self.bytesAtoB += nbytes
        else:
            self.bytesBtoA += nbytes
        src.consumed(nbytes)
        if self.onData is not None:
            self.onData(src, nbytes)

    def sinkFull(self, dst: Side) -> None:
        self.peer(dst).pauseReading(SINK_FULL)

    def sinkDrained(self, dst: Side) -> None:
        self.peer(dst).resumeReading(SINK_FULL)

    def eofReceived(self, src: Side) -> None:
        if self.firstEnd is None:
            self.firstEnd = (0 if src is self.a else 1, "eof")
        self.peer(src).writeEOF()

    def endedBy(self, a: str, b: str) -> str:
        """How the session began to end, with ``a`` and ``b`` as the sides' names:
        ``"target eof"``, ``"relay closed"``, ``"user reset"`` ... (``"open"`` while
        neither side has ended)."""
        if self.firstEnd is None:
            return "open"
        side, how = self.firstEnd
        return f"{b if side else a} {how}"

    def sideClosed(self, side: Side, clean: bool = True) -> None:
        """``side`` is gone.  After a clean end (it sent EOF first) the other side is
        closed once it flushed what it has; after an abnormal one (a reset, a dead
        link) it is aborted, so its peer sees an error rather than a clean end of data
        that could pass a truncated transfer off as complete."""
        if side is self.a and self._aOpen:
            self._aOpen = False
        elif side is self.b and self._bOpen:
            self._bOpen = False
        else:
            return
        if self.firstEnd is None:
            self.firstEnd = (0 if side is self.a else 1, "closed" if clean else "reset")
        if self._aOpen or self._bOpen:
            if clean:
                self.peer(side).close()
            else:
                self.peer(side).abort()
            return
        if callable(self._onClosed):
            self._onClosed(self.bytesAtoB, self.bytesBtoA)


@implementer(IPushProducer, IHalfCloseableProtocol)
class TCPSide(Protocol):
    """A TCP connection as a bridge side.

    It is the connection's protocol (reads come in as ``dataReceived``) and the
    producer registered with its own transport (the transport tells us when its
    write buffer is above its high-water mark, which is our "sink full").
    Before :meth:`attach` it pauses the transport, so nothing is read until the
    other side exists: the ``twisted.protocols.portforward`` rule.
    """

    _log = Logger()
    transport: Any  # an ITCPTransport once connected (Twisted types it Optional)
    _writeLost = False  # our half-close completed (writeConnectionLost)
    #: This session's own counts of the native thread (relay.ssh.nativeforward), made
    #: when the thread first takes it: its ``session_close`` line reports them.  A class
    #: default, so the sessions it never carries hold nothing for it.
    nativeSession: dict[str, int] | None = None
    #: Offered the read made before the bridge exists (a public port's read-ahead): the
    #: relay sends it to an agent that takes a session's first bytes before it answered
    #: (relay.ssh.earlydata).  A class default: set only where that can happen.
    earlySink: EarlySink | None = None

    def __init__(self, readAhead: bool = False) -> None:
        self.bridge: Bridge | None = None
        # Not paused at connect: the first read is kept for attach() (see readAhead()).
        self._readAheadFirst = readAhead
        self._pauses: frozenset[str] = _NONE  # made on first pause (per-session memory)
        self._readEOF = False
        self._wroteEOF = False
        self._closed = False
        self._cleanEnd = True
        self._early = b""  # read by the connection's previous protocol: delivered first
        self.onConnected: object = None
        #: Counters of a pooled data connection (the relay's ``fast_path`` counters) when
        #: a native thread may write this side's bytes (relay.ssh.nativeforward); None
        #: for every other connection.
        self.nativeStats: dict[str, int] | None = None
        #: That thread while it owns the writes: anything else done to this side first
        #: takes the stream back from it (``handback``), so Python's writes and close
        #: come after the thread's, and it is done with the socket before it closes.
        self.forwarder: Any = None

    @classmethod
    def readingAhead(cls) -> TCPSide:
        """A side that is not paused when it connects: for a connection its owner
        bridges in the same reactor turn (a target the agent dialled with
        ``relay.datapath.dialnow``), whose pause and resume would be two ``epoll_ctl``
        calls for nothing.  Should bytes come first, one read is kept, as with
        :meth:`readAhead`."""
        return cls(readAhead=True)

    @classmethod
    def adopt(cls, transport: Any, received: bytes = b"") -> TCPSide:
        """Make a connected TCP transport, paused by the protocol that owned it until
        now, a bridge side: ``received`` are the bytes that protocol read past its own
        framing (they belong to the stream and are delivered before anything else).

        The relay does this with an agent's pooled data connection once the agent
        answered its dispatch (relay.server.dataport); the transport stays in Twisted
        and under the bridge's flow control."""
        side = cls()
        side._early = received
        transport.protocol = side
        side.makeConnection(transport)
        return side

    # Protocol

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)
        if callable(self.onConnected):
            self.onConnected(self)
        # Paused after the owner heard of it, not before: an owner that bridges it or
        # lets it read ahead in this turn (a public port whose agent is there) spares
        # the reactor a pause and a resume.  Nothing is read in between.
        if self.bridge is None and not self._readAheadFirst:
            self.pauseReading(NO_PEER)

    def dataReceived(self, data: bytes) -> None:
        bridge = self.bridge
        if bridge is not None:
            bridge.dataReceived(self, data)
        else:  # read ahead (readAhead): keep this one read for attach(), read no more
            first = not self._early
            self._early += data
            self.pauseReading(NO_PEER)
            if first and self.earlySink is not None:
                self.earlySink.offer(data)

    def readAhead(self) -> None:
        """Read once before this side is bridged: what the peer sent first (the one
        read of at most Twisted's 64 KiB) is then here when the bridge is made, and
        handed on in that reactor turn instead of a poll later.

        For the relay's public ports (relay.server.public): called as the channel open
        leaves for the agent, so the user's first bytes are read while the agent
        connects its target, off the session's set-up path (docs/benchmarks.md,
        "Set-up after an idle gap").  Bounded: after one read the side is paused again
        until :meth:`attach`."""
        if self.bridge is None and not self._closed and not self._early:
            self._readAheadFirst = True
            self.resumeReading(NO_PEER)

    def readConnectionLost(self) -> None:
        """The peer sent FIN: pass EOF on, keep writing (IHalfCloseableProtocol)."""
        self._readEOF = True
        if self.bridge is not None:
            self.bridge.eofReceived(self)
        self._maybeFinish()

    def writeConnectionLost(self) -> None:
        self._writeLost = True  # an instance attribute only once it happens
        self._maybeFinish()

    def _takeBack(self, why: str, lost: bool = False) -> None:
        forwarder = self.forwarder
        if forwarder is not None:
            forwarder.handback(why, dataLost=lost)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._takeBack("data connection lost", lost=True)
        self._closed = True
        self._cleanEnd = self._readEOF or (reason is not None
                                           and reason.check(ConnectionDone) is not None)
        if self.bridge is not None:
            self.bridge.sideClosed(self, clean=self._cleanEnd)

    # Side

    def attach(self, bridge: Bridge) -> None:
        self.bridge = bridge
        early, self._early = self._early, b""
        if early:
            bridge.dataReceived(self, early)
        self.resumeReading(NO_PEER)
        if self._readEOF:
            bridge.eofReceived(self)
        if self._closed:
            bridge.sideClosed(self, clean=self._cleanEnd)

    def write(self, data: bytes) -> None:
        if self.forwarder is not None:
            self._takeBack("written")
        if not self._closed:
            write_now(self.transport, (data,), limit=None)  # leaves at once if nothing waits

    def consumed(self, nbytes: int) -> None:
        """TCP re-opens its own window as the kernel drains; nothing to do."""

    def pauseReading(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and not self._closed:
            self.transport.pauseProducing()
        if reason not in self._pauses:
            self._pauses = self._pauses | {reason}

    def resumeReading(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses = self._pauses - {reason} or _NONE
        if not self._pauses and self.transport is not None and not self._closed:
            self.transport.resumeProducing()

    def writeEOF(self) -> None:
        self._takeBack("eof")
        if self._closed or self._wroteEOF:
            return
        self._wroteEOF = True
        # Twisted only half-closes from doWrite when no paused producer is
        # registered; we write nothing more, so stop being one.
        self.transport.unregisterProducer()
        self.transport.loseWriteConnection()

    def _maybeFinish(self) -> None:
        if self._readEOF and self._wroteEOF and not self._closed:
            self.close()

    def close(self) -> None:
        self._takeBack("closed")
        transport = self.transport
        if not self._closed and transport is not None:
            if not self._wroteEOF:
                transport.unregisterProducer()  # see writeEOF
            transport.loseConnection()
            if (self._readEOF and self._writeLost and not self._closed
                    and not ITCPTransport.providedBy(transport)):
                # Both halves ended on their own (EOF read and our half-close done, in
                # either order).  A TCP transport ends itself in loseConnection then;
                # Twisted's StandardIO (``labrelay connect``'s stdin/stdout) has no
                # half left to close and never calls connectionLost, so the bridge
                # would never end (tests/unit/test_stdio_side.py): end it as it would.
                transport.connectionLost(Failure(ConnectionDone()))

    def abort(self) -> None:
        self._takeBack("aborted")
        if not self._closed and self.transport is not None:
            self.transport.abortConnection()

    # IPushProducer, driven by our own transport's write buffer

    def pauseProducing(self) -> None:
        if self.bridge is not None:
            self.bridge.sinkFull(self)

    def resumeProducing(self) -> None:
        if self.bridge is not None:
            self.bridge.sinkDrained(self)

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost follows."""


class SideFactory(Factory):
    """Builds a :class:`TCPSide` per accepted connection and reports each one, paused
    until bridged, to ``on_connected`` (a listener's half of a forward)."""

    noisy = False

    def __init__(self, on_connected: Callable[[TCPSide], object]) -> None:
        self._on_connected = on_connected

    def buildProtocol(self, addr: Any) -> TCPSide:
        side = TCPSide()
        side.onConnected = self._on_connected
        side.factory = self
        return side
