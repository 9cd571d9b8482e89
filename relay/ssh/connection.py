"""``FlowConnection``: Conch's ``SSHConnection`` with labrelay's flow control and checks.

Conch's connection re-opens a channel's receive window as soon as a packet
arrives, whatever the downstream holds (DESIGN §11); here the window is only
re-opened by the channel itself, after its bytes were accepted downstream (see
:class:`relay.ssh.channels.BridgedChannel`).  It also:

* refuses peers that name unknown channel ids, overflow a window past 2^32-1
  or declare a maximum packet of 0 (Conch raises and drops the link instead);
* lets ``getChannel`` answer with a Deferred, so an incoming channel is
  confirmed only once its target is connected (as OpenSSH does), and refused
  with a reason when it cannot be;
* acts as the push producer of the link's TCP transport and shares the link
  fairly when it is congested: while the link's write buffer is above its
  high-water mark (or the SSH transport's queue during a key exchange is full,
  ``keyExchangeBacklog`` from :mod:`relay.ssh.aead`), what channels send waits in a
  :class:`relay.core.fairshare.FairScheduler` and leaves, as the link drains, by
  deficit round-robin per user (``channel.shareUser``, weights from
  ``scheduler.set_weight``) then per session, small packets of idle sessions first.
  A channel with more than ``CHANNEL_QUEUE`` bytes waiting is told the link is
  congested *for it* (``linkCongested``), which pauses the source feeding it, the
  same pause as before, per channel instead of all at once; it resumes below
  ``CHANNEL_RESUME``.  A channel's EOF and close wait behind its queued data.

It also joins the small ``CHANNEL_DATA`` packets one read brings for a channel into
one chunk before handing them on (:meth:`FlowConnection.channelData`, :meth:`flushData`):
what the relay and the agent spend is per packet, not per byte (a 1-byte packet cost
the relay ~9 µs and the agent ~6 µs, as much Python as a 32 KiB one), so a user who
flooded 1-byte packets made one link packet, one agent turn and one write to the
target of each, and her bytes held every other session's turn.  Joined, a read of
3 600 of her packets leaves as one packet per channel of hers, as OpenSSH's channel
buffers would (docs/security.md).  Only bytes are joined: each packet is checked and
counted against the channel's window as it arrives, the chunk is handed on in the same
reactor turn, in order, before any other message of that read, and the window is
re-opened by the channel for what it hands on, as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.conch import error
from twisted.conch.ssh import common, connection
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.core.fairshare import FairScheduler
from relay.datapath.net import TurnBudget, limit_unsent
from relay.ssh import nativeforward
from relay.ssh.earlydata import EarlyError, EarlyIntake
from relay.ssh.openerrors import open_error
from relay.ssh.wire import unpack_early_data

MAX_WINDOW = 0xFFFFFFFF
_DATA_HEAD = struct.Struct(">2L")  # CHANNEL_DATA: recipient channel, data length
OPEN_CONNECT_FAILED = connection.OPEN_CONNECT_FAILED
OPEN_ADMINISTRATIVELY_PROHIBITED = connection.OPEN_ADMINISTRATIVELY_PROHIBITED
OPEN_UNKNOWN_CHANNEL_TYPE = connection.OPEN_UNKNOWN_CHANNEL_TYPE
OPEN_RESOURCE_SHORTAGE = connection.OPEN_RESOURCE_SHORTAGE
LINK_BUFFER = 128 * 1024  # like OpenSSH: stop feeding channels past 128 KiB queued
CHANNEL_QUEUE = 128 * 1024
"""Bytes a channel may have waiting for a congested link before its source pauses:
enough that every active session always has a packet ready for its turn."""
CHANNEL_RESUME = CHANNEL_QUEUE // 2
UNSENT_LOWAT = LINK_BUFFER
"""Unsent bytes the kernel may hold for the link (TCP_NOTSENT_LOWAT) while nothing waits
in the scheduler."""
SHARED_BUFFER = 64 * 1024
"""The link's write buffer (Twisted's) while bytes wait in the scheduler: what is handed
to the transport is what the scheduler can no longer reorder, so while sessions compete
for a congested link it is kept to two maximum-size packets (plus the one that crosses
the mark), and a keystroke's echo waits behind that, not behind 128 KiB.  Not less:
Twisted's ``bufferSize`` is also the size of each read from the link, and 64 KiB is
Twisted's own default, so the other direction's reads do not shrink."""
COALESCE_BELOW = 8 * 1024
"""``CHANNEL_DATA`` smaller than this is held until the end of the read (or its channel's
next non-data message) and handed on joined with the rest of that read's data for the
channel; a larger packet for a channel holding nothing goes on at once, as before (bulk
is 32 KiB packets: joining them would only add a copy)."""
COALESCE_MAX = 32 * 1024
"""A channel's held bytes go on as soon as they reach this: one maximum-size packet on
the other side, so joining never makes a chunk the bridge must split further."""
SHARED_UNSENT = 16 * 1024
"""TCP_NOTSENT_LOWAT while bytes wait in the scheduler, for the same reason: the
kernel's unsent queue is FIFO too.  The link stays busy meanwhile on the bytes already
sent (in flight, and queued at the bottleneck), which the reactor refills long before
they drain."""


@implementer(IPushProducer)
class FlowConnection(connection.SSHConnection):
    """An ``ssh-connection`` service whose channels own their receive windows.

    It is the push producer of the link's TCP transport (:meth:`serviceStarted`
    registers it): while the TCP write buffer is full, what channels send waits in
    :attr:`scheduler` (fair share), and a channel with too much waiting has its own
    source paused (see the module docstring)."""

    _log = Logger()
    transport: Any  # the SSH transport, set by Conch before any packet arrives

    minPeerMaxPacket = 1
    """The smallest maximum packet we take from the peer for a channel (its open, or
    its confirmation of ours).  Conch's and SSH's floor is 1 (0 is refused); the relay's
    connections raise it (relay.ssh.server.MIN_PEER_MAX_PACKET): every byte it sends a
    peer that said 1 is a packet of its own, a 32 KiB agent packet 32 768 of them in
    one reactor turn (docs/security.md, "Attacks tried")."""

    takesShare = False
    shareMalformedSeen = False  # a malformed share@labrelay was logged (BridgedChannel)
    """Whether the peer may tag our channels with ``share@labrelay``: only the relay's
    word to an agent (relay.ssh.client.LinkConnection).  The relay's own connections
    refuse it: a user who said it chose her channel's share, and each fresh name she
    sent stayed in the scheduler's weights for the connection's life (memory without
    bound, docs/security.md "Attacks tried")."""

    def __init__(self) -> None:
        super().__init__()
        self._tcpFull = False  # the TCP write buffer is over its high-water mark
        self._kexFull = False  # packets queued during a key exchange are over LINK_BUFFER
        self._pendingOpens = 0
        # What channels send while the link is congested, and the channels whose
        # sources are paused because too much of theirs waits there.
        self.scheduler: FairScheduler[bytes | Callable[[], None]] = FairScheduler()
        self._held: set[Any] = set()
        self._closing: set[Any] = set()  # channels whose CLOSE waits behind their data
        # Channels closed because their peer sent past the window: a second overrun on
        # one is a protocol error (docs/security.md), not another warning and CLOSE.
        self._overran: set[Any] = set()
        self._draining = False
        self._stopped = False  # serviceStopped: nothing more is sent
        self._nativeOK = False  # the transport may arm relay.ssh.nativeforward
        self._shared = False  # the link's buffers are cut to SHARED_* (bytes wait here)
        # The peer's channels' first bytes before we confirmed them (relay.ssh.earlydata):
        # set by an agent that said early-data-ok@labrelay.
        self.early: EarlyIntake | None = None
        # The small data of the read being parsed, per channel (channelData): the
        # pieces and their size, handed on joined by flushData, in arrival order.
        self._coalesced: dict[Any, tuple[list[bytes], int]] = {}
        self._coalesceBelow = 0  # COALESCE_BELOW once the transport calls flushData

    @property
    def congested(self) -> bool:
        """Whether the link takes no more bytes now (TCP or key-exchange queue full)."""
        return self._tcpFull or self._kexFull

    # service life

    def serviceStarted(self) -> None:
        super().serviceStarted()
        tcp = getattr(self.transport, "transport", None)
        if tcp is not None and hasattr(tcp, "registerProducer"):
            # Above this many bytes waiting to be written, every channel's source is
            # paused: enough to batch packets into large writes, small enough that an
            # interactive session never queues behind much bulk (measured: 1 MiB gave
            # a 45 ms echo p99 under bulk through the relay, 128 KiB under 20 ms).
            if hasattr(tcp, "bufferSize"):
                tcp.bufferSize = LINK_BUFFER
            tcp.registerProducer(self, True)
            limit_unsent(tcp, UNSENT_LOWAT)
            if TurnBudget.usable(tcp) and hasattr(self.transport, "writeBudget"):
                self.transport.writeBudget = TurnBudget(tcp)
        if hasattr(self.transport, "channelDataHandler"):
            self.transport.channelDataHandler = self.channelData
            if hasattr(self.transport, "channelDataFlush"):
                self.transport.channelDataFlush = self.flushData
                self._coalesceBelow = COALESCE_BELOW
        self._nativeOK = bool(getattr(self.transport, "nativeArmable", False))

    def offerNative(self, channel: Any) -> None:
        """Bytes ``channel`` held before its bridge existed (relay.core.earlyopen) went
        on: the native thread may take it now, as after a read that carried them (else a
        download begun by one held request stays in Python).  Next turn: not mid-read."""
        transport, tcp = self.transport, getattr(self.transport, "transport", None)
        if not self._nativeOK or tcp is None:
            return

        def arm() -> None:  # maybe_arm checks the rest (channel still open, no thread yet)
            transport.nativeCandidate = channel
            nativeforward.maybe_arm(transport)

        tcp.reactor.callLater(0, arm)

    def activity(self) -> None:
        """A packet arrived (the relay's connection feeds its keepalive monitor)."""

    def channelData(self, packet: Any) -> None:
        """``MSG_CHANNEL_DATA`` straight from the transport (``AEADTransportMixin.
        channelDataHandler``): what ``packetReceived`` does for it, without Conch's
        dispatch by name.  ``packet`` may be a memoryview into the decrypted packet.

        Data smaller than ``COALESCE_BELOW`` is checked and counted against the window
        now and held, to go on joined with the rest of this read's data for the channel
        (:meth:`flushData`, which the transport calls at the end of the read and before
        any other message); anything irregular goes the checked way, after what is
        held."""
        self.activity()
        if len(packet) >= 8:
            localChannel, dataLength = _DATA_HEAD.unpack_from(packet)
            channel = self.channels.get(localChannel)
            if (channel is not None and dataLength <= channel.localWindowLeft
                    and dataLength <= channel.localMaxPacket
                    and len(packet) - 8 >= dataLength
                    and channel in self.channelsToRemoteChannel):
                held = self._coalesced.get(channel)
                if held is None and dataLength >= self._coalesceBelow:
                    self._deliver(channel, packet, dataLength)
                    return
                channel.localWindowLeft -= dataLength
                data = bytes(packet[8 : 8 + dataLength])
                if held is None:
                    self._coalesced[channel] = ([data], dataLength)
                    return
                pieces, size = held
                pieces.append(data)
                size += dataLength
                if size >= COALESCE_MAX:
                    del self._coalesced[channel]
                    self._handOn(channel, b"".join(pieces))
                else:
                    self._coalesced[channel] = (pieces, size)
                return
        self.flushData()
        try:
            self.ssh_CHANNEL_DATA(packet)
        except (struct.error, IndexError, TypeError, ValueError):
            self._log.failure("malformed message 94 from the peer; disconnecting",
                              level=LogLevel.warn, event="malformed_packet", num=94)
            self._protocolError("malformed message 94")

    def flushData(self) -> None:
        """Hand on the data :meth:`channelData` held, joined per channel, channels in the
        order their first piece arrived (the transport calls this after each read and
        before each other message, so nothing overtakes it)."""
        coalesced = self._coalesced
        while coalesced:
            channel = next(iter(coalesced))
            pieces, _size = coalesced.pop(channel)
            self._handOn(channel, pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _handOn(self, channel: Any, data: bytes) -> None:
        channel.dataReceived(data)
        if self._nativeOK:
            self.transport.nativeCandidate = channel  # relay.ssh.nativeforward

    def _deliver(self, channel: Any, packet: Any, dataLength: int) -> None:
        """Count ``dataLength`` against the window and hand the packet's data on."""
        channel.localWindowLeft -= dataLength
        # The one copy out of the packet (a memoryview from the transport; a slice of
        # bytes is already a copy, and bytes() of bytes is not another).
        self._handOn(channel, bytes(packet[8 : 8 + dataLength]))

    # IPushProducer for the link's TCP transport

    def pauseProducing(self) -> None:
        self._tcpFull = True

    def resumeProducing(self) -> None:
        self._tcpFull = False
        drained = getattr(self.transport, "outputDrained", None)
        if drained is not None:
            drained()  # reading the peer again, if its unread answers had stopped it
        self._drain()

    def keyExchangeBacklog(self, full: bool) -> None:
        """The transport's queue of packets waiting for a key exchange to finish is
        over (or back under) ``LINK_BUFFER``: the same as a full TCP buffer."""
        self._kexFull = full
        if not full:
            self._drain()

    def stopProducing(self) -> None:
        """The link is closing; ``serviceStopped`` follows."""

    # fair share of a congested link

    def sendData(self, channel: Any, data: bytes) -> None:
        """Send now if the link takes it and nothing of this channel waits; else queue
        it for the scheduler."""
        if self.congested or self.scheduler.queued(channel):
            self._queue(channel, bytes(data), len(data))
            if not self.congested:
                self._drain()
        else:
            self._write(channel, data)

    def _write(self, channel: Any, data: bytes) -> None:
        """Conch's, framed by the transport in one copy when it can (relay.ssh.aead)."""
        send = getattr(self.transport, "sendChannelData", None)
        if send is None or channel.localClosed:
            super().sendData(channel, data)
        else:
            send(self.channelsToRemoteChannel[channel], data)

    def _queue(self, channel: Any, item: bytes | Callable[[], None], size: int) -> None:
        scheduler = self.scheduler
        scheduler.push(channel, getattr(channel, "shareUser", ""), item, size)
        if not self._shared:
            self._share(True)
        if channel not in self._held and scheduler.queued(channel) > CHANNEL_QUEUE:
            self._held.add(channel)
            hook = getattr(channel, "linkCongested", None)
            if hook is not None:
                hook(True)

    def _drain(self) -> None:
        """Send what waits, in the scheduler's order, while the link takes it."""
        if self._draining:
            return
        self._draining = True
        try:
            scheduler = self.scheduler
            while scheduler and not self.congested and self.transport is not None:
                popped = scheduler.pop()
                if popped is None:
                    break
                channel, item = popped
                if callable(item):
                    item()
                else:
                    self._write(channel, item)
                if channel in self._held and scheduler.queued(channel) <= CHANNEL_RESUME:
                    self._held.discard(channel)
                    hook = getattr(channel, "linkCongested", None)
                    if hook is not None:
                        hook(False)
        finally:
            self._draining = False
        if self._shared and not self.scheduler:
            self._share(False)

    def _share(self, shared: bool) -> None:
        """Cut the link's write buffer and the kernel's unsent queue to about a packet
        while bytes wait in the scheduler (so that its order, sparse packets first,
        holds at the wire), and give them back their batching sizes once nothing
        waits."""
        self._shared = shared
        tcp = getattr(self.transport, "transport", None)
        if tcp is None:
            return
        if hasattr(tcp, "bufferSize"):
            tcp.bufferSize = SHARED_BUFFER if shared else LINK_BUFFER
        limit_unsent(tcp, SHARED_UNSENT if shared else UNSENT_LOWAT)

    def sendEOF(self, channel: Any) -> None:
        if self.scheduler.queued(channel):
            self._queue(channel, lambda: connection.SSHConnection.sendEOF(self, channel), 0)
        else:
            super().sendEOF(channel)

    def _takeBack(self, why: str, channel: Any = None) -> None:
        """The native thread (relay.ssh.nativeforward) stops owning the channel's
        reads before Python ends it (or, with None, the service)."""
        forward = getattr(self.transport, "nativeForward", None)
        if forward is not None and (channel is None or forward.channel is channel):
            forward.handback(why)

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        """Conch's, except while a native thread seals for the channel's user
        (relay.ssh.nativeforward): the thread sends the ``WINDOW_ADJUST`` in its stream."""
        forward = getattr(self.transport, "nativeForward", None)
        if (forward is not None and forward.sealing and forward.channel is channel
                and not channel.localClosed):
            channel.localWindowLeft += bytesToAdd
            forward.grantSend(bytesToAdd)
            return
        super().adjustWindow(channel, bytesToAdd)

    def sendClose(self, channel: Any) -> None:
        self._takeBack("channel closed", channel)
        if channel in self._closing:
            return
        if self.scheduler.queued(channel):
            self._closing.add(channel)

            def close() -> None:
                self._closing.discard(channel)
                connection.SSHConnection.sendClose(self, channel)

            self._queue(channel, close, 0)
        else:
            super().sendClose(channel)

    def discard(self, channel: Any) -> None:
        """Forget what ``channel`` has waiting (it is aborted, or its peer closed), and
        its share tag."""
        self.scheduler.drop(channel)
        self.scheduler.untag(channel)
        self._held.discard(channel)
        self._closing.discard(channel)
        self._overran.discard(channel)
        self._coalesced.pop(channel, None)
        if self._shared and not self.scheduler and self.transport is not None:
            self._share(False)

    def channelClosed(self, channel: Any) -> None:
        self.discard(channel)
        if self.early is not None:
            self.early.closed(self.channelsToRemoteChannel.get(channel))
        super().channelClosed(channel)

    def queueStatus(self) -> dict[str, int]:
        """Bytes waiting for the link per user (status)."""
        return self.scheduler.users()

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        try:
            super().packetReceived(messageNum, packet)
        except (struct.error, IndexError, TypeError, ValueError):
            # Conch parses fixed fields unchecked (a CHANNEL_OPEN cut short raises
            # struct.error): without this, an "Unhandled Error" and a dropped TCP
            # connection instead of a protocol-error disconnect.
            self._log.failure(
                "malformed message {num} from the peer; disconnecting", level=LogLevel.warn,
                event="malformed_packet", num=messageNum,
            )
            self._protocolError(f"malformed message {messageNum}")

    # checks

    def _channel(self, packet: bytes, opened: bool = True, size: int = 4) -> Any:
        """The channel a packet names, or ``None`` after disconnecting the peer.

        ``opened``: the packet is only valid on a confirmed channel (everything
        but the answers to our own CHANNEL_OPEN, which need an unconfirmed one).
        ``size``: the fixed-size head the packet must have.  Conch's stock
        handlers raise (KeyError, struct.error) on any of these instead.
        """
        if len(packet) < size:
            self._protocolError("truncated channel packet")
            return None
        (localChannel,) = struct.unpack(">L", packet[:4])
        channel = self.channels.get(localChannel)
        if channel is None:
            self._protocolError(f"unknown channel id {localChannel}")
        elif (channel in self.channelsToRemoteChannel) != opened:
            condition = "unconfirmed" if opened else "already open"
            self._protocolError(f"channel id {localChannel} is {condition}")
            return None
        return channel

    def _protocolError(self, why: str) -> None:
        self._log.warn("peer protocol error: {why}", why=why, event="protocol_error")
        self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, why.encode())

    # packets

    def openChannel(self, channel: Any, extra: bytes = b"") -> None:
        """Conch's ``openChannel`` without its info event ("opening channel N with ...",
        which no observer of ours keeps: relay.ops.logfmt shows a library's info events
        only with ``-v``, and the session's own events say more).  It is emitted before
        the open is sent, on the relay's way from her open to the agent's (and the
        agent's to a chained relay's): ~20 µs of a cold turn (docs/benchmarks.md,
        round 11)."""
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN,
            common.NS(channel.name)
            + struct.pack(">3L", self.localChannelID, channel.localWindowSize,
                          channel.localMaxPacket)
            + extra,
        )
        channel.id = self.localChannelID
        self.channels[self.localChannelID] = channel
        self.localChannelID += 1

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channelType, rest = common.getNS(packet)
        senderChannel, windowSize, maxPacket = struct.unpack(">3L", rest[:12])
        if maxPacket < max(1, self.minPeerMaxPacket):
            self._refuseOpen(senderChannel, OPEN_CONNECT_FAILED, self._tooSmall(maxPacket))
            return
        try:
            result = self.getChannel(channelType, windowSize, maxPacket, rest[12:])
        except error.ConchError as e:
            self._refuseOpen(senderChannel, *open_error(e))
            return
        except Exception:
            self._log.failure("channel open failed")
            self._refuseOpen(senderChannel, OPEN_CONNECT_FAILED, "internal error")
            return
        self._pendingOpens += 1
        if self.early is not None:
            self.early.opening(senderChannel)
        d = defer.maybeDeferred(lambda: result)
        d.addCallbacks(
            lambda channel: self._confirmOpen(senderChannel, channel, rest[12:]),
            lambda f: self._failOpen(senderChannel, f),
        )

    def _confirmOpen(self, senderChannel: int, channel: Any, data: bytes) -> None:
        self._pendingOpens -= 1
        if self.transport is None or self._stopped:
            if self.early is not None:
                self.early.refused(senderChannel)
            channel.openFailed(error.ConchError("link lost", OPEN_CONNECT_FAILED))
            return
        localChannel = self.localChannelID
        self.localChannelID += 1
        channel.id = localChannel
        channel.conn = self
        self.channels[localChannel] = channel
        self.channelsToRemoteChannel[channel] = senderChannel
        self.localToRemoteChannel[localChannel] = senderChannel
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(
                ">4L", senderChannel, localChannel, channel.localWindowSize, channel.localMaxPacket
            )
            + channel.specificData,
        )
        channel.channelOpen(data)
        if self.early is not None:
            for chunk in self.early.confirmed(senderChannel, channel):
                self._deliverEarly(channel, chunk)

    def earlyReceived(self, data: bytes) -> None:
        """``early-data@labrelay``: the first bytes of a channel the relay opened
        (relay.ssh.earlydata), delivered now to a channel we confirmed, held for an
        open being answered, dropped for one refused or closed."""
        if self.early is None:
            return
        try:
            remote, payload = unpack_early_data(data)
            channel = self.early.received(remote, payload)
        except (ValueError, EarlyError) as e:
            self._protocolError(str(e))
            return
        if channel is not None and not channel.localClosed:
            self._deliverEarly(channel, payload)

    def _deliverEarly(self, channel: Any, data: bytes) -> None:
        # As ssh_CHANNEL_DATA does: out of the window we confirmed (the intake checked
        # it fits), re-opened by the channel once the bytes are handed on.
        channel.localWindowLeft -= len(data)
        channel.dataReceived(data)

    def _failOpen(self, senderChannel: int, f: Failure) -> None:
        self._pendingOpens -= 1
        if self.early is not None:
            self.early.refused(senderChannel)
        if self.transport is None or self._stopped:
            return
        if isinstance(f.value, error.ConchError):
            self._refuseOpen(senderChannel, *open_error(f.value))
        else:
            self._refuseOpen(senderChannel, OPEN_CONNECT_FAILED, f.getErrorMessage())

    def _refuseOpen(self, senderChannel: int, code: int, text: str) -> None:
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", senderChannel, code) + common.NS(text.encode()) + common.NS(b""),
        )

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        channel = self._channel(packet, opened=False, size=16)
        if channel is None:
            return
        maxPacket = struct.unpack(">L", packet[12:16])[0]
        if maxPacket < max(1, self.minPeerMaxPacket):
            self._protocolError(self._tooSmall(maxPacket))
            return
        super().ssh_CHANNEL_OPEN_CONFIRMATION(packet)

    def _tooSmall(self, maxPacket: int) -> str:
        if maxPacket == 0:
            return "maximum packet size 0"
        return f"maximum packet size {maxPacket} is below {self.minPeerMaxPacket}"

    def ssh_CHANNEL_OPEN_FAILURE(self, packet: bytes) -> None:
        if self._channel(packet, opened=False, size=8) is not None:
            super().ssh_CHANNEL_OPEN_FAILURE(packet)

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:
        channel = self._channel(packet, size=8)
        if channel is None:
            return
        bytesToAdd = struct.unpack(">L", packet[4:8])[0]
        if channel.remoteWindowLeft + bytesToAdd > MAX_WINDOW:
            self._protocolError(f"window adjust overflows channel {channel.id}")
            return
        channel.addWindowBytes(bytesToAdd)

    def _overrun(self, channel: Any, localChannel: int) -> None:
        """The peer sent past ``channel``'s window or maximum packet.

        The first time, one warning and CLOSE (a peer off by a packet loses only that
        channel).  Our window is not re-opened after that CLOSE, so a peer that honours
        it never overruns it again: the second time is a protocol-error disconnect.
        Before, every such packet was one more ``protocol_error`` line (a 1-byte
        ``CHANNEL_DATA`` each, as fast as the user could send them, for as long as she
        kept the channel from closing): the log flood docs/security.md rules out."""
        if channel in self._overran:
            self._protocolError(f"peer kept sending past channel {localChannel}'s window")
            return
        self._overran.add(channel)
        self._log.warn(
            "peer overran channel {id} window; closing it", id=localChannel,
            event="protocol_error",
        )
        self.sendClose(channel)

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        """Deliver data without re-opening the window: the channel does that."""
        channel = self._channel(packet, size=8)
        if channel is None:
            return
        localChannel, dataLength = struct.unpack(">2L", packet[:8])
        if dataLength > channel.localWindowLeft or dataLength > channel.localMaxPacket:
            self._overrun(channel, localChannel)
            return
        if len(packet) - 8 < dataLength:
            self._protocolError("truncated channel data")
            return
        self._deliver(channel, packet, dataLength)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        """Forwarding channels carry no stderr; account for it and drop it."""
        channel = self._channel(packet, size=12)
        if channel is None:
            return
        localChannel, _typeCode, dataLength = struct.unpack(">3L", packet[:12])
        if dataLength > channel.localWindowLeft or dataLength > channel.localMaxPacket:
            self._overrun(channel, localChannel)
            return
        channel.localWindowLeft -= dataLength
        self.adjustWindow(channel, dataLength)

    def ssh_CHANNEL_EOF(self, packet: bytes) -> None:
        if self._channel(packet) is not None:
            super().ssh_CHANNEL_EOF(packet)

    def ssh_CHANNEL_CLOSE(self, packet: bytes) -> None:
        if self._channel(packet) is not None:
            super().ssh_CHANNEL_CLOSE(packet)

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> None:
        if self._channel(packet) is not None:
            super().ssh_CHANNEL_REQUEST(packet)

    def ssh_CHANNEL_SUCCESS(self, packet: bytes) -> None:
        if self._channel(packet) is not None:
            super().ssh_CHANNEL_SUCCESS(packet)

    def ssh_CHANNEL_FAILURE(self, packet: bytes) -> None:
        if self._channel(packet) is not None:
            super().ssh_CHANNEL_FAILURE(packet)

    def ssh_REQUEST_SUCCESS(self, packet: bytes) -> None:
        if not self.deferreds["global"]:
            self._protocolError("unexpected global request reply")
            return
        super().ssh_REQUEST_SUCCESS(packet)

    def ssh_REQUEST_FAILURE(self, packet: bytes) -> None:
        if not self.deferreds["global"]:
            self._protocolError("unexpected global request reply")
            return
        super().ssh_REQUEST_FAILURE(packet)

    def serviceStopped(self) -> None:
        self._takeBack("service stopped")
        self._stopped = True
        if getattr(self.transport, "channelDataHandler", None) is not None:
            self.transport.channelDataHandler = None
            self.transport.channelDataFlush = None
        self._coalesced.clear()
        budget = getattr(self.transport, "writeBudget", None)
        if budget is not None:
            budget.stop()
            self.transport.writeBudget = None
        self.scheduler = FairScheduler()
        self._held.clear()
        self._closing.clear()
        self._shared = False
        if self.early is not None:
            self.early.clear()
        super().serviceStopped()
