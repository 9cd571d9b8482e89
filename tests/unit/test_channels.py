"""``BridgedChannel`` and ``FlowConnection`` driven by packets, over in-memory transports.

The peer is scripted: packets go in through ``FlowConnection.packetReceived`` as
Conch's transport would deliver them, and what the connection sends is recorded
by ``relay.testing.FakeSSHTransport``.  The TCP end of each session is a ``TCPSide``
on ``relay.testing.FakeTCPTransport``, whose write buffer pushes back like Twisted's.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.conch import error
from twisted.conch.ssh import common
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_REQUEST_FAILURE,
    MSG_REQUEST_SUCCESS,
)
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relay.datapath.bridge import Bridge, TCPSide
from relay.datapath.net import TCP_NOTSENT_LOWAT
from relay.ssh.channels import BridgedChannel
from relay.ssh.connection import (
    CHANNEL_QUEUE,
    LINK_BUFFER,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    SHARED_BUFFER,
    SHARED_UNSENT,
    UNSENT_LOWAT,
    FlowConnection,
)
from relay.ssh.wire import SHARE, pack_share, unpack_share
from relay.testing import FakeSSHTransport, FakeTCPTransport

WINDOW = 64 * 1024  # our receive window (small, so tests move few bytes)
MAX_PACKET = 8 * 1024  # our maximum packet
PEER_ID = 100  # the peer's id for the channel
MAX_WINDOW = 0xFFFFFFFF


# --- doubles ---------------------------------------------------------------


ChannelFactory = Callable[[bytes, int, int, bytes], Any]


class Conn(FlowConnection):
    """A FlowConnection whose incoming channels come from ``channelFactory``."""

    def __init__(self) -> None:
        super().__init__()
        self.channelFactory: ChannelFactory | None = None
        self.getChannelCalls = 0

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
        self.getChannelCalls += 1
        assert self.channelFactory is not None
        return self.channelFactory(channelType, windowSize, maxPacket, data)


class Harness:
    """One connection with a scripted peer."""

    def __init__(self, linkTCP: Any = None) -> None:
        self.ssh = FakeSSHTransport(linkTCP)
        self.conn = Conn()
        self.conn.transport = self.ssh  # type: ignore[assignment]
        self.conn.serviceStarted()
        self.ended: list[tuple[int, int]] = []

    def receive(self, kind: int, payload: bytes) -> None:
        self.conn.packetReceived(kind, payload)

    def bridgedChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> BridgedChannel:
        return BridgedChannel(
            channelType,
            window=WINDOW,
            maxPacket=MAX_PACKET,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            conn=self.conn,
        )

    def openFromPeer(
        self, peerWindow: int = 1 << 20, peerMaxPacket: int = 32 * 1024, peerId: int = PEER_ID
    ) -> BridgedChannel:
        made: list[BridgedChannel] = []

        def factory(channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
            made.append(self.bridgedChannel(channelType, windowSize, maxPacket, data))
            return made[-1]

        self.conn.channelFactory = factory
        self.receive(MSG_CHANNEL_OPEN, openPacket(peerId, peerWindow, peerMaxPacket))
        (channel,) = made
        return channel

    def session(
        self, highWater: int | None = None, **peer: int
    ) -> tuple[BridgedChannel, TCPSide, FakeTCPTransport, Bridge]:
        channel = self.openFromPeer(**peer)
        tcp = TCPSide()
        transport = FakeTCPTransport(highWater)
        tcp.makeConnection(transport)
        bridge = Bridge(tcp, channel, onClosed=lambda a, b: self.ended.append((a, b)))
        return channel, tcp, transport, bridge

    # the peer's packets for one of our channels

    def data(self, channel: BridgedChannel, data: bytes) -> None:
        self.receive(MSG_CHANNEL_DATA, struct.pack(">L", channel.id) + common.NS(data))

    def adjust(self, channel: BridgedChannel, nbytes: int) -> None:
        self.receive(MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", channel.id, nbytes))

    def eof(self, channel: BridgedChannel) -> None:
        self.receive(MSG_CHANNEL_EOF, struct.pack(">L", channel.id))

    def close(self, channel: BridgedChannel) -> None:
        self.receive(MSG_CHANNEL_CLOSE, struct.pack(">L", channel.id))


def openPacket(peerId: int, window: int, maxPacket: int, kind: bytes = b"forwarded-tcpip") -> bytes:
    target = common.NS(b"127.0.0.1") + struct.pack(">L", 8080)
    origin = common.NS(b"10.0.0.9") + struct.pack(">L", 50000)
    return common.NS(kind) + struct.pack(">3L", peerId, window, maxPacket) + target + origin


class GreedyPeer:
    """A sender that pushes as much as the window it was granted allows."""

    def __init__(self, h: Harness, channel: BridgedChannel) -> None:
        self.h = h
        self.channel = channel
        self.window = WINDOW  # what our OPEN_CONFIRMATION advertised
        self.seenAdjusts = 0
        self.sent = bytearray()
        self._counter = 0

    def _refresh(self) -> None:
        adjusts = self.h.ssh.adjusts()
        self.window += sum(adjusts[self.seenAdjusts :])
        self.seenAdjusts = len(adjusts)

    def pump(self, limit: int) -> int:
        """Send up to ``limit`` bytes, in packets, within the window; bytes sent."""
        sent = 0
        self._refresh()
        while sent < limit and self.window > 0:
            n = min(MAX_PACKET, self.window, limit - sent)
            chunk = bytes((self._counter + i) % 251 for i in range(n))
            self._counter += n
            self.h.data(self.channel, chunk)
            self.window -= n
            self.sent += chunk
            sent += n
            assert self.channel.localWindowLeft >= 0
            self._refresh()
        return sent


# --- the receive window (peer -> channel -> TCP) -----------------------------


def test_confirmation_advertises_our_window_and_packet_size() -> None:
    h = Harness()
    channel = h.openFromPeer(peerWindow=5000, peerMaxPacket=1000)
    (confirm,) = h.ssh.of(MSG_CHANNEL_OPEN_CONFIRMATION)
    assert struct.unpack(">4L", confirm[:16]) == (PEER_ID, channel.id, WINDOW, MAX_PACKET)
    assert channel.remoteWindowLeft == 5000
    assert channel.remoteMaxPacket == 1000
    assert channel.opened.called


def test_data_shrinks_the_window_and_reaches_tcp_without_an_adjust() -> None:
    h = Harness()
    channel, _tcp, transport, bridge = h.session()
    h.data(channel, b"x" * 1000)
    h.data(channel, b"y" * 2000)
    assert channel.localWindowLeft == WINDOW - 3000
    assert transport.value() == b"x" * 1000 + b"y" * 2000
    assert bridge.bytesBtoA == 3000
    assert h.ssh.adjusts() == []  # more than half the window is left


def test_adjusts_are_batched_per_half_window_and_add_up_to_bytes_accepted() -> None:
    h = Harness()
    channel, _tcp, transport, _bridge = h.session()
    peer = GreedyPeer(h, channel)
    total = 10 * WINDOW
    while len(peer.sent) < total:
        assert peer.pump(1024) == 1024  # a fast downstream never starves the peer
    assert transport.value() == bytes(peer.sent)
    adjusts = h.ssh.adjusts()
    assert all(a > WINDOW // 2 for a in adjusts)  # no adjust per packet
    assert len(adjusts) in (19, 20)
    owedToPeer = WINDOW - channel.localWindowLeft  # received but not yet re-granted
    assert sum(adjusts) + owedToPeer == total
    assert owedToPeer < WINDOW // 2


def test_no_adjust_while_tcp_is_full_then_one_when_it_drains() -> None:
    highWater = 4 * 1024
    h = Harness()
    channel, _tcp, transport, _bridge = h.session(highWater=highWater)
    peer = GreedyPeer(h, channel)
    assert peer.pump(10 * WINDOW) == WINDOW  # then the window is spent
    assert channel.localWindowLeft == 0
    assert h.ssh.adjusts() == []
    assert len(transport.unsent) == WINDOW <= WINDOW + highWater
    assert peer.pump(MAX_PACKET) == 0  # stalled, no memory grows
    transport.drain(WINDOW - 1)
    assert h.ssh.adjusts() == []  # Twisted resumes its producer only once empty
    transport.drain()
    assert h.ssh.adjusts() == [WINDOW]
    assert peer.pump(WINDOW) == WINDOW
    assert transport.value() == bytes(peer.sent)


def test_memory_stays_bounded_with_a_slow_reader() -> None:
    """A greedy peer into a slow TCP reader: the bytes held for the session never
    exceed the window plus the TCP high-water mark, and nothing is lost."""
    highWater = 16 * 1024
    h = Harness()
    channel, _tcp, transport, _bridge = h.session(highWater=highWater)
    peer = GreedyPeer(h, channel)
    peak = 0
    drains = [100, 3000, 0, 17_000, 5, 40_000, 9000]
    for step in range(400):
        peer.pump(3 * MAX_PACKET)
        peak = max(peak, len(transport.unsent))
        assert len(transport.unsent) <= WINDOW + highWater
        assert 0 <= channel.localWindowLeft <= WINDOW
        transport.drain(min(drains[step % len(drains)], len(transport.unsent)))
    transport.drain()
    peer.pump(0)
    assert transport.value() == bytes(peer.sent)
    assert len(peer.sent) > 20 * WINDOW  # it did move, not just stall
    assert peak > highWater  # and the bound was exercised
    granted = sum(h.ssh.adjusts())
    assert granted <= len(peer.sent)
    assert WINDOW - channel.localWindowLeft == len(peer.sent) - granted


def test_data_before_the_bridge_waits_without_reopening_the_window() -> None:
    h = Harness()
    channel = h.openFromPeer()
    for i in range(5):
        h.data(channel, bytes([65 + i]) * MAX_PACKET)
    assert channel.localWindowLeft == WINDOW - 5 * MAX_PACKET
    assert h.ssh.adjusts() == []
    tcp = TCPSide()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    Bridge(tcp, channel)
    assert transport.value() == b"".join(bytes([65 + i]) * MAX_PACKET for i in range(5))
    # now accepted: credited, topping the window up to at least half (batched)
    assert channel.localWindowLeft >= WINDOW // 2
    assert 0 < sum(h.ssh.adjusts()) <= 5 * MAX_PACKET


class _Sink:
    """An early sink (relay.datapath.bridge.EarlySink) that records what it is offered
    and says, at stop, that the other side has ``there`` bytes already."""

    def __init__(self, there: int = 0) -> None:
        self.offered: list[bytes] = []
        self.there = there
        self.stops = 0

    def offer(self, data: bytes) -> None:
        self.offered.append(data)

    def stop(self) -> int:
        self.stops += 1
        return self.there


@pytest.mark.parametrize("there", [0, 3, 5 * MAX_PACKET // 2, 5 * MAX_PACKET])
def test_held_data_goes_to_the_early_sink_and_what_it_placed_is_not_written_again(
        there: int) -> None:
    """The one interface both early routes use (the link's EarlyFeed, the pooled
    route's WriteAhead): every held chunk is offered in order, those held before
    ``sendHeldTo`` first; the window is still not re-opened for them; at the bridge the
    sink is stopped once and the bytes it says are there already (from the first, even
    part of a chunk) are credited, not written; the rest is written as usual."""
    h = Harness()
    channel = h.openFromPeer()
    chunks = [bytes([65 + i]) * MAX_PACKET for i in range(5)]
    h.data(channel, chunks[0])
    sink = _Sink(there)
    channel.sendHeldTo(sink)
    for chunk in chunks[1:]:
        h.data(channel, chunk)
    assert sink.offered == chunks and h.ssh.adjusts() == []
    tcp = TCPSide()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    bridge = Bridge(tcp, channel)
    assert sink.stops == 1
    assert transport.value() == b"".join(chunks)[there:], "only what is not there yet"
    assert bridge.bytesBtoA == 5 * MAX_PACKET, "all of it counted"
    assert 0 < sum(h.ssh.adjusts()) <= 5 * MAX_PACKET, "and credited"
    h.data(channel, b"later")
    assert sink.offered == chunks and transport.value().endswith(b"later")


def test_a_stopped_sink_leaves_every_held_byte_to_the_bridge() -> None:
    """``stopSending`` (the pooled connection turned out dead): the sink is stopped,
    offered nothing more, and the side attached next gets every byte held."""
    h = Harness()
    channel = h.openFromPeer()
    sink = _Sink(there=4)
    channel.sendHeldTo(sink)
    h.data(channel, b"one ")
    channel.stopSending()
    h.data(channel, b"two")
    assert sink.offered == [b"one "] and sink.stops == 1
    tcp = TCPSide()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    Bridge(tcp, channel)
    assert transport.value() == b"one two" and sink.stops == 1


def test_extended_data_is_dropped_and_credited() -> None:
    h = Harness()
    channel, _tcp, transport, _bridge = h.session()
    h.receive(MSG_CHANNEL_EXTENDED_DATA, struct.pack(">2L", channel.id, 1) + common.NS(b"e" * 500))
    assert transport.value() == b""
    assert channel.localWindowLeft == WINDOW
    assert h.ssh.adjusts() == [500]


# --- the send window (TCP -> channel -> peer) --------------------------------


def test_tcp_data_is_split_into_peer_sized_packets() -> None:
    h = Harness()
    channel, tcp, _transport, bridge = h.session(peerWindow=100_000, peerMaxPacket=1000)
    tcp.dataReceived(b"a" * 2500)
    assert h.ssh.dataPackets() == [b"a" * 1000, b"a" * 1000, b"a" * 500]
    assert channel.remoteWindowLeft == 100_000 - 2500
    assert bridge.bytesAtoB == 2500


def test_window_exhausted_buffers_pauses_tcp_and_flushes_on_adjust() -> None:
    h = Harness()
    channel, tcp, transport, _bridge = h.session(peerWindow=10, peerMaxPacket=4)
    assert transport.producerState == "producing"
    tcp.dataReceived(b"0123456789abcdef")
    assert h.ssh.dataPackets() == [b"0123", b"4567", b"89"]
    assert b"".join(channel._queued) == b"abcdef"
    assert transport.producerState == "paused"  # the TCP source stops reading
    h.adjust(channel, 3)
    assert h.ssh.data() == b"0123456789abc"
    assert transport.producerState == "paused"  # still not all flushed
    h.adjust(channel, 100)
    assert h.ssh.data() == b"0123456789abcdef"
    assert b"".join(channel._queued) == b""
    assert transport.producerState == "producing"
    assert channel.remoteWindowLeft == 97


def test_window_spent_exactly_pauses_on_the_next_write() -> None:
    h = Harness()
    channel, tcp, transport, _bridge = h.session(peerWindow=8, peerMaxPacket=8)
    tcp.dataReceived(b"12345678")
    assert channel.remoteWindowLeft == 0
    assert transport.producerState == "producing"
    tcp.dataReceived(b"9")
    assert transport.producerState == "paused"
    assert b"".join(channel._queued) == b"9"


def test_eof_requested_while_buffered_is_sent_after_the_flush() -> None:
    h = Harness()
    channel, tcp, _transport, _bridge = h.session(peerWindow=4, peerMaxPacket=4)
    tcp.dataReceived(b"abcdefgh")
    tcp.readConnectionLost()
    assert MSG_CHANNEL_EOF not in h.ssh.kinds()
    h.adjust(channel, 2)
    assert MSG_CHANNEL_EOF not in h.ssh.kinds()
    h.adjust(channel, 2)
    kinds = h.ssh.kinds()
    assert kinds.count(MSG_CHANNEL_EOF) == 1
    assert kinds.index(MSG_CHANNEL_EOF) > max(
        i for i, k in enumerate(kinds) if k == MSG_CHANNEL_DATA
    )
    assert h.ssh.data() == b"abcdefgh"


def test_channel_congested_before_the_bridge_pauses_tcp_at_once() -> None:
    """A channel that is already congested when bridged pauses its TCP at once."""
    h = Harness()
    channel = h.openFromPeer(peerWindow=0, peerMaxPacket=1024)
    tcp = TCPSide()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    Bridge(tcp, channel)
    tcp.dataReceived(b"hello")
    assert transport.producerState == "paused"
    h.adjust(channel, 1024)
    assert transport.producerState == "producing"
    assert h.ssh.data() == b"hello"


# --- link congestion -------------------------------------------------------


def test_a_congested_link_pauses_a_source_only_past_its_own_queue() -> None:
    link = StringTransport()
    link.bufferSize = 65536  # type: ignore[attr-defined]
    h = Harness(linkTCP=link)
    assert link.producer is h.conn and link.streaming
    assert link.bufferSize == LINK_BUFFER  # type: ignore[attr-defined]
    (_bulk, bulkTCP, bulkT, _), (_chat, chatTCP, chatT, _) = (
        h.session(peerId=PEER_ID), h.session(peerId=PEER_ID + 1))
    h.conn.pauseProducing()
    assert h.conn.congested
    chatTCP.dataReceived(b"ls\n")
    for _ in range(CHANNEL_QUEUE // 16384 + 1):
        bulkTCP.dataReceived(bytes(16384))
    assert h.ssh.data() == b""  # everything waits for the link
    assert bulkT.producerState == "paused"  # past its own queue
    assert chatT.producerState == "producing"  # a few bytes: keeps reading
    h.conn.resumeProducing()
    assert bulkT.producerState == "producing"
    assert h.ssh.dataPackets()[0] == b"ls\n"  # the idle session's small packet first
    assert len(h.ssh.data()) == 3 + (CHANNEL_QUEUE // 16384 + 1) * 16384
    assert not h.conn.scheduler


def test_while_bytes_wait_the_link_hands_the_transport_about_a_packet() -> None:
    """What is in Twisted's buffer and the kernel's unsent queue is past reordering: while
    the scheduler holds bytes, both are cut to about a packet (``SHARED_BUFFER``,
    TCP_NOTSENT_LOWAT ``SHARED_UNSENT``) so a keystroke's echo waits behind that, not
    behind 256 KiB and more; once nothing waits, both get their batching sizes back."""
    link = StringTransport()
    link.bufferSize = 65536  # type: ignore[attr-defined]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        link.socket = sock  # type: ignore[attr-defined]

        def lowat() -> int:
            return sock.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT)

        h = Harness(linkTCP=link)
        assert (link.bufferSize, lowat()) == (LINK_BUFFER, UNSENT_LOWAT)  # type: ignore[attr-defined]
        _bulk, bulkTCP, _t, _b = h.session()
        bulkTCP.dataReceived(bytes(16384))  # an uncongested link: sent, nothing waits
        assert (link.bufferSize, lowat()) == (LINK_BUFFER, UNSENT_LOWAT)  # type: ignore[attr-defined]
        h.conn.pauseProducing()
        bulkTCP.dataReceived(bytes(16384))
        assert h.conn.scheduler
        assert (link.bufferSize, lowat()) == (SHARED_BUFFER, SHARED_UNSENT)  # type: ignore[attr-defined]
        assert SHARED_BUFFER <= 64 * 1024 and SHARED_UNSENT <= 32 * 1024
        h.conn.resumeProducing()
        assert not h.conn.scheduler
        assert (link.bufferSize, lowat()) == (LINK_BUFFER, UNSENT_LOWAT)  # type: ignore[attr-defined]


def test_a_congested_link_is_shared_per_user_then_per_session() -> None:
    """One session of alice and three of bob, all with data waiting: alice's and bob's
    packets alternate as the link drains, and bob's three take turns among themselves."""
    h = Harness(linkTCP=StringTransport())
    sessions = [h.session(peerId=PEER_ID + i) for i in range(4)]
    owners = ["alice", "bob", "bob", "bob"]
    for (channel, _tcp, _t, _b), user in zip(sessions, owners, strict=True):
        channel.shareUser = user
    h.conn.pauseProducing()
    for _ in range(6):
        for _channel, tcp, _t, _b in sessions:
            tcp.dataReceived(bytes(32 * 1024))
    h.conn.resumeProducing()
    by_peer = {PEER_ID + i: owners[i] for i in range(4)}
    order = [struct.unpack(">L", p[:4])[0] for p in h.ssh.of(MSG_CHANNEL_DATA)]
    users = [by_peer[peer] for peer in order]
    # while both have data waiting, they alternate
    assert users[:12] == ["alice", "bob"] * 6
    assert order[1:12:2] == [PEER_ID + 1, PEER_ID + 2, PEER_ID + 3] * 2


def test_weights_give_a_user_more_turns() -> None:
    h = Harness(linkTCP=StringTransport())
    (a, aTCP, _, _), (b, bTCP, _, _) = h.session(peerId=PEER_ID), h.session(peerId=PEER_ID + 1)
    a.shareUser, b.shareUser = "alice", "bob"
    h.conn.scheduler.set_weight("alice", 2)
    h.conn.pauseProducing()
    for _ in range(6):
        aTCP.dataReceived(bytes(32 * 1024))
        bTCP.dataReceived(bytes(32 * 1024))
    h.conn.resumeProducing()
    order = [struct.unpack(">L", p[:4])[0] for p in h.ssh.of(MSG_CHANNEL_DATA)]
    assert order[:6] == [PEER_ID, PEER_ID, PEER_ID + 1] * 2


def test_eof_and_close_wait_behind_queued_data() -> None:
    h = Harness(linkTCP=StringTransport())
    channel, tcp, _t, _b = h.session()
    h.conn.pauseProducing()
    tcp.dataReceived(bytes(5000))
    tcp.readConnectionLost()  # EOF from the TCP side
    channel.loseConnection()
    assert h.ssh.of(MSG_CHANNEL_EOF) == [] and h.ssh.of(MSG_CHANNEL_CLOSE) == []
    h.conn.resumeProducing()
    kinds = [k for k in h.ssh.kinds() if k in (MSG_CHANNEL_DATA, MSG_CHANNEL_EOF,
                                               MSG_CHANNEL_CLOSE)]
    assert kinds == [MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_CLOSE]


def test_an_aborted_channel_drops_what_it_had_waiting() -> None:
    h = Harness(linkTCP=StringTransport())
    channel, tcp, _t, _b = h.session()
    h.conn.pauseProducing()
    tcp.dataReceived(bytes(5000))
    channel.abort()
    assert len(h.conn.scheduler) == 0
    assert h.ssh.of(MSG_CHANNEL_CLOSE)  # the close goes at once
    h.conn.resumeProducing()
    assert h.ssh.data() == b""


def test_share_request_names_the_user_and_its_weight() -> None:
    h = Harness(linkTCP=StringTransport())
    h.conn.takesShare = True  # an agent's link: the relay's word
    channel = h.openFromPeer()
    payload = struct.pack(">L", channel.id) + common.NS(SHARE) + b"\x00" + pack_share("bob", 3)
    h.receive(MSG_CHANNEL_REQUEST, payload)
    assert channel.shareUser == "bob" and h.conn.scheduler.weight("bob") == 3
    with pytest.raises(ValueError):
        unpack_share(b"\x00\x00")


def test_share_names_a_relay_sends_are_kept_only_while_their_channel_lives() -> None:
    """The agent takes ``share@labrelay`` from its relay, but the relay chooses the
    names: a compromised one sending a fresh name per request grew the agent's
    scheduler weights without end (tests/security/test_hostile_relay.py measures it
    through a real agent).  A name's weight lives while a channel tagged so does."""
    h = Harness(linkTCP=StringTransport())
    h.conn.takesShare = True
    keep, gone = h.openFromPeer(), h.openFromPeer()
    for channel, name in ((keep, "alice"), (gone, "bob")):
        h.receive(MSG_CHANNEL_REQUEST, struct.pack(">L", channel.id) + common.NS(SHARE)
                  + b"\x00" + pack_share(name, 2))
    for i in range(1000):  # re-tagged, each time a new name
        h.receive(MSG_CHANNEL_REQUEST, struct.pack(">L", gone.id) + common.NS(SHARE)
                  + b"\x00" + pack_share(f"u{i}", 3))
    sched = h.conn.scheduler
    assert gone.shareUser == "u999" and sched.weight("u999") == 3
    assert sched.weight("bob") == 1.0 and sched.weight("u0") == 1.0  # released when re-tagged
    h.conn.discard(gone)  # what its close does (FlowConnection.channelClosed)
    assert sched._weights == {"alice": 2}
    h.conn.discard(keep)
    assert sched._weights == {}


def test_a_share_request_from_a_peer_that_may_not_say_it_is_refused_and_kept_nowhere(
) -> None:
    """The relay's own connections (a user's, an agent's) refuse ``share@labrelay``:
    a user who sent it chose her channel's share, and every fresh name she sent stayed
    in the scheduler's weights (docs/security.md, "Attacks tried")."""
    h = Harness(linkTCP=StringTransport())
    assert not h.conn.takesShare
    channel = h.openFromPeer()
    for i in range(100):
        payload = (struct.pack(">L", channel.id) + common.NS(SHARE) + b"\x01"
                   + pack_share(f"user{i}", 100))
        h.receive(MSG_CHANNEL_REQUEST, payload)
    assert len(h.ssh.of(MSG_CHANNEL_FAILURE)) == 100
    assert channel.shareUser == "" and h.conn.scheduler._weights == {}


def test_bytes_queued_before_the_share_request_become_the_users() -> None:
    """A download whose request went to the agent as early data: the target answers and
    the channel's bytes queue on the congested link before the relay's share@labrelay
    arrives (it rides the relay's next packet on the channel).  Once it does, those
    bytes and the rest are the user's in the scheduler, not no one's (user "")."""
    link = StringTransport()
    link.bufferSize = 65536  # type: ignore[attr-defined]
    h = Harness(linkTCP=link)
    h.conn.takesShare = True  # an agent's link: the relay's word
    (channel, tcp, _, _) = h.session(peerId=PEER_ID)
    h.conn.pauseProducing()  # congested: what the channel sends waits in the scheduler
    tcp.dataReceived(bytes(16384))
    tcp.dataReceived(bytes(16384))
    assert h.conn.scheduler.users() == {"": 32768}
    payload = struct.pack(">L", channel.id) + common.NS(SHARE) + b"\x00" + pack_share("alice", 2)
    h.receive(MSG_CHANNEL_REQUEST, payload)
    assert h.conn.scheduler.users() == {"alice": 32768}
    tcp.dataReceived(bytes(16384))
    assert h.conn.scheduler.users() == {"alice": 49152}
    h.conn.resumeProducing()
    assert len(h.ssh.data()) == 49152 and not h.conn.scheduler


def test_link_and_window_congestion_both_must_clear() -> None:
    h = Harness(linkTCP=StringTransport())
    channel, tcp, transport, _bridge = h.session(peerWindow=0, peerMaxPacket=1024)
    tcp.dataReceived(b"x")  # window exhausted
    assert transport.producerState == "paused"
    h.adjust(channel, 1 << 20)
    h.conn.pauseProducing()  # the link congested: past the queue, the source pauses
    tcp.dataReceived(bytes(CHANNEL_QUEUE + 1))
    assert transport.producerState == "paused"
    tcp.dataReceived(bytes(2000))  # still arriving: Twisted reads what it already had
    h.conn.resumeProducing()
    assert transport.producerState == "producing"


# --- half-close and close through a real channel ----------------------------


def test_half_close_both_ways_then_closed_once_with_counts() -> None:
    h = Harness()
    channel, tcp, transport, _bridge = h.session()
    tcp.dataReceived(b"GET /")
    tcp.readConnectionLost()  # client done sending
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_EOF
    assert not transport.writeClosed
    h.data(channel, b"200 OK")  # the answer still flows
    h.data(channel, b" body")
    assert transport.value() == b"200 OK body"
    h.eof(channel)
    assert transport.writeClosed  # FIN to the client
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_CLOSE  # both EOFs: the channel closes
    tcp.writeConnectionLost()
    assert transport.disconnecting
    tcp.connectionLost(Failure(ConnectionDone()))
    assert h.ended == []
    h.close(channel)  # the peer's CLOSE completes the channel
    assert h.ended == [(5, 11)]
    assert h.ssh.kinds().count(MSG_CHANNEL_CLOSE) == 1
    assert channel.id not in h.conn.channels


def test_peer_close_without_eof_drops_unsendable_bytes_and_resets_tcp() -> None:
    """A channel closed with no EOF first (a dead link, an aborted peer) ended
    abnormally: the TCP side is reset, so its peer cannot mistake a cut-off
    transfer for a complete one."""
    h = Harness()
    channel, tcp, transport, _bridge = h.session(peerWindow=2, peerMaxPacket=2)
    tcp.dataReceived(b"never sent")
    assert b"".join(channel._queued) == b"ver sent"
    h.close(channel)
    assert b"".join(channel._queued) == b""
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_CLOSE
    assert transport.disconnected  # set by StringTransport.abortConnection only
    tcp.connectionLost(Failure(ConnectionDone()))
    assert h.ended == [(10, 0)]


def test_tcp_lost_closes_the_channel_after_its_buffer_is_flushed() -> None:
    h = Harness()
    channel, tcp, _transport, _bridge = h.session(peerWindow=2, peerMaxPacket=2)
    tcp.dataReceived(b"tail")
    tcp.connectionLost(Failure(ConnectionDone()))
    assert MSG_CHANNEL_CLOSE not in h.ssh.kinds()
    h.adjust(channel, 2)
    assert h.ssh.data() == b"tail"
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_CLOSE
    h.close(channel)
    assert h.ended == [(4, 0)]


def test_link_lost_closes_every_session() -> None:
    h = Harness()
    sessions = [h.session(peerId=PEER_ID + i) for i in range(2)]
    h.conn.serviceStopped()
    for _channel, _tcp, transport, _bridge in sessions:
        assert transport.disconnecting


# --- FlowConnection hardening -------------------------------------------------


def assertProtocolError(h: Harness) -> None:
    assert len(h.ssh.disconnects) == 1
    assert h.ssh.disconnects[0][0] == DISCONNECT_PROTOCOL_ERROR


@pytest.mark.parametrize(
    "kind, payload",
    [
        (MSG_CHANNEL_DATA, struct.pack(">L", 42) + common.NS(b"hi")),
        (MSG_CHANNEL_EXTENDED_DATA, struct.pack(">2L", 42, 1) + common.NS(b"hi")),
        (MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 42, 10)),
        (MSG_CHANNEL_EOF, struct.pack(">L", 42)),
        (MSG_CHANNEL_CLOSE, struct.pack(">L", 42)),
        (MSG_CHANNEL_REQUEST, struct.pack(">L", 42) + common.NS(b"x") + b"\x01"),
        (MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", 42, 1, 100, 100)),
        (MSG_CHANNEL_OPEN_FAILURE, struct.pack(">2L", 42, 1) + common.NS(b"no") + common.NS(b"")),
    ],
)
def test_unknown_channel_id_disconnects_without_raising(kind: int, payload: bytes) -> None:
    h = Harness()
    h.openFromPeer()  # channel 0 exists; 42 does not
    h.receive(kind, payload)
    assertProtocolError(h)
    assert b"42" in h.ssh.disconnects[0][1]


@pytest.mark.parametrize(
    "kind", [MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST, MSG_CHANNEL_OPEN_CONFIRMATION]
)
def test_truncated_channel_packet_disconnects(kind: int) -> None:
    h = Harness()
    h.openFromPeer()
    h.receive(kind, b"\x00\x00")
    assertProtocolError(h)


def test_data_shorter_than_declared_disconnects() -> None:
    h = Harness()
    channel, _tcp, transport, _bridge = h.session()
    h.receive(MSG_CHANNEL_DATA, struct.pack(">2L", channel.id, 100) + b"short")
    assertProtocolError(h)
    assert transport.value() == b""
    assert channel.localWindowLeft == WINDOW


def test_window_adjust_up_to_the_limit_is_fine_and_beyond_disconnects() -> None:
    h = Harness()
    channel = h.openFromPeer(peerWindow=1000)
    h.adjust(channel, MAX_WINDOW - 1000)
    assert channel.remoteWindowLeft == MAX_WINDOW
    assert h.ssh.disconnects == []
    h.adjust(channel, 1)
    assertProtocolError(h)
    assert channel.remoteWindowLeft == MAX_WINDOW


def test_open_with_max_packet_zero_is_refused() -> None:
    h = Harness()
    h.conn.channelFactory = h.bridgedChannel
    h.receive(MSG_CHANNEL_OPEN, openPacket(7, 1000, 0))
    assert h.conn.getChannelCalls == 0
    assert h.ssh.openFailures() == [(7, OPEN_CONNECT_FAILED, b"maximum packet size 0")]
    assert MSG_CHANNEL_OPEN_CONFIRMATION not in h.ssh.kinds()
    assert h.ssh.disconnects == []


def test_data_beyond_the_window_closes_the_channel() -> None:
    h = Harness()
    channel, _tcp, transport, _bridge = h.session(highWater=0)  # full: nothing re-granted
    peer = GreedyPeer(h, channel)
    peer.pump(WINDOW)
    assert channel.localWindowLeft == 0
    before = transport.value()
    h.data(channel, b"one byte too many"[:1])
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_CLOSE
    assert channel.localClosed
    assert transport.value() == before  # not delivered
    assert h.ssh.disconnects == []


@pytest.mark.parametrize("kind", [MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA])
def test_data_past_the_window_again_after_our_close_disconnects(kind: int) -> None:
    """A greedy user keeps a channel we closed for an overrun (she never answers the
    CLOSE) and sends 1-byte packets past its window as fast as she can: before, each one
    was another ``protocol_error`` warning and CLOSE, a log line per ~40 bytes on the
    wire for as long as she liked.  Our window is never re-opened after the CLOSE, so
    a second overrun can only be deliberate: one warning, then a protocol error."""
    h = Harness()
    channel, _tcp, transport, _bridge = h.session(highWater=0)
    GreedyPeer(h, channel).pump(WINDOW)
    delivered = transport.value()

    def overrun() -> None:
        if kind == MSG_CHANNEL_DATA:
            h.data(channel, b"x")
        else:
            h.receive(kind, struct.pack(">2L", channel.id, 1) + common.NS(b"x"))

    overrun()
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_CLOSE
    assert h.ssh.disconnects == []
    closes = h.ssh.kinds().count(MSG_CHANNEL_CLOSE)
    overrun()
    assertProtocolError(h)
    assert b"past channel" in h.ssh.disconnects[0][1]
    assert h.ssh.kinds().count(MSG_CHANNEL_CLOSE) == closes  # no second CLOSE
    assert transport.value() == delivered  # neither overrun reached the target


def test_data_beyond_max_packet_closes_the_channel() -> None:
    h = Harness()
    channel, _tcp, transport, _bridge = h.session()
    h.data(channel, b"z" * (MAX_PACKET + 1))
    assert h.ssh.kinds()[-1] == MSG_CHANNEL_CLOSE
    assert transport.value() == b""
    assert channel.localWindowLeft == WINDOW


def test_deferred_channel_is_confirmed_only_when_it_fires() -> None:
    h = Harness()
    pending: defer.Deferred[BridgedChannel] = defer.Deferred()
    args: list[tuple[int, int]] = []

    def factory(channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
        args.append((windowSize, maxPacket))
        return pending

    h.conn.channelFactory = factory
    h.receive(MSG_CHANNEL_OPEN, openPacket(7, 5000, 1000))
    assert h.ssh.packets == []  # nothing until the target is connected
    channel = h.bridgedChannel(b"forwarded-tcpip", *args[0], b"")
    pending.callback(channel)
    (confirm,) = h.ssh.of(MSG_CHANNEL_OPEN_CONFIRMATION)
    assert struct.unpack(">4L", confirm[:16]) == (7, channel.id, WINDOW, MAX_PACKET)
    assert h.conn.channels[channel.id] is channel
    assert channel.opened.called


@pytest.mark.parametrize(
    "failure, code, text",
    [
        (error.ConchError("no such forward", OPEN_ADMINISTRATIVELY_PROHIBITED),
         OPEN_ADMINISTRATIVELY_PROHIBITED, b"no such forward"),
        (error.ConchError(OPEN_ADMINISTRATIVELY_PROHIBITED, "swapped"),  # Twisted #3657
         OPEN_ADMINISTRATIVELY_PROHIBITED, b"swapped"),
        (error.ConchError("no code given"), OPEN_CONNECT_FAILED, b"no code given"),
        (error.ConchError(b"bytes text", OPEN_CONNECT_FAILED), OPEN_CONNECT_FAILED, b"bytes text"),
        (ConnectionRefusedError("connection refused"), OPEN_CONNECT_FAILED,
         b"connection refused"),
    ],
)  # fmt: skip
def test_deferred_channel_failure_is_refused_with_its_reason(
    failure: Exception, code: int, text: bytes
) -> None:
    h = Harness()
    pending: defer.Deferred[BridgedChannel] = defer.Deferred()
    h.conn.channelFactory = lambda *a: pending
    h.receive(MSG_CHANNEL_OPEN, openPacket(7, 5000, 1000))
    assert h.ssh.packets == []
    pending.errback(failure)
    assert h.ssh.openFailures() == [(7, code, text)]
    assert h.conn.channels == {}


@pytest.mark.parametrize(
    "raised, code, text",
    [
        (error.ConchError("unknown channel", 3), 3, b"unknown channel"),
        (error.ConchError("no code given"), OPEN_CONNECT_FAILED, b"no code given"),
        (RuntimeError("bug"), OPEN_CONNECT_FAILED, b"internal error"),
    ],
)
def test_get_channel_raising_is_refused(raised: Exception, code: int, text: bytes) -> None:
    h = Harness()

    def factory(*_: Any) -> Any:
        raise raised

    h.conn.channelFactory = factory
    h.receive(MSG_CHANNEL_OPEN, openPacket(7, 5000, 1000))
    assert h.ssh.openFailures() == [(7, code, text)]
    assert h.ssh.disconnects == []


def test_channel_ready_after_the_link_stopped_is_failed_not_confirmed() -> None:
    h = Harness()
    pending: defer.Deferred[BridgedChannel] = defer.Deferred()
    h.conn.channelFactory = lambda *a: pending
    h.receive(MSG_CHANNEL_OPEN, openPacket(7, 5000, 1000))
    h.conn.serviceStopped()
    channel = h.bridgedChannel(b"forwarded-tcpip", 5000, 1000, b"")
    failures: list[Failure] = []
    channel.opened.addErrback(failures.append)
    pending.callback(channel)
    assert h.ssh.packets == []
    assert len(failures) == 1


def test_unexpected_global_replies_disconnect() -> None:
    for kind in (MSG_REQUEST_SUCCESS, MSG_REQUEST_FAILURE):
        h = Harness()
        h.receive(kind, b"")
        assertProtocolError(h)


def test_expected_global_replies_fire_the_request() -> None:
    h = Harness()
    ok = h.conn.sendGlobalRequest(b"tcpip-forward", b"", wantReply=1)
    refused = h.conn.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
    results: list[Any] = []
    ok.addCallback(results.append)
    refused.addErrback(lambda f: results.append(f.type))
    h.receive(MSG_REQUEST_SUCCESS, b"\x00\x00\x1f\x90")
    h.receive(MSG_REQUEST_FAILURE, b"")
    assert results == [b"\x00\x00\x1f\x90", error.ConchError]
    assert h.ssh.disconnects == []


def ourChannel(h: Harness) -> BridgedChannel:
    """A channel we asked the peer to open (direct-tcpip), not yet confirmed."""
    channel = BridgedChannel(b"direct-tcpip", window=WINDOW, maxPacket=MAX_PACKET, conn=h.conn)
    h.conn.openChannel(channel, b"")
    return channel


def test_our_open_is_conchs_packet_and_logs_nothing() -> None:
    """FlowConnection.openChannel: the packet and the bookkeeping Conch's makes, without
    its per-open info event (on the relay's path from her open to the agent's)."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness()
        first = BridgedChannel(b"direct-tcpip", window=WINDOW, maxPacket=MAX_PACKET,
                               conn=h.conn)
        second = BridgedChannel(b"forwarded-tcpip", window=WINDOW, maxPacket=MAX_PACKET,
                                conn=h.conn)
        h.conn.openChannel(first, b"extra")
        h.conn.openChannel(second)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert h.ssh.packets == [
        (MSG_CHANNEL_OPEN, common.NS(b"direct-tcpip")
         + struct.pack(">3L", 0, WINDOW, MAX_PACKET) + b"extra"),
        (MSG_CHANNEL_OPEN, common.NS(b"forwarded-tcpip")
         + struct.pack(">3L", 1, WINDOW, MAX_PACKET)),
    ]
    assert (first.id, second.id) == (0, 1)
    assert h.conn.channels == {0: first, 1: second}
    assert events == []


def test_an_agent_takes_only_the_relays_two_channel_types() -> None:
    """LinkConnection.getChannel: ``forwarded-tcpip`` and ``forwarded-resumable@labrelay``
    reach their handlers; any other type is refused as unknown, including names Conch's
    lookup would have mapped onto a handler (it turned every non-alphanumeric into _)."""
    from relay.core.resume import OPEN_RESUMABLE
    from relay.ssh.client import LinkConnection
    from relay.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_UNKNOWN_CHANNEL_TYPE
    from relay.ssh.wire import pack_endpoints

    class Link:  # what the two handlers reach before they refuse
        resume = None

        def remoteForwardFor(self, host: str, port: int) -> None:
            return None

    conn = LinkConnection(Link())  # type: ignore[arg-type]
    data = pack_endpoints("127.0.0.1", 8080, "192.0.2.7", 5000)
    cases = [(b"forwarded-tcpip", OPEN_ADMINISTRATIVELY_PROHIBITED, "no such forward"),
             (OPEN_RESUMABLE, OPEN_ADMINISTRATIVELY_PROHIBITED, "not negotiated")]
    cases += [(kind, OPEN_UNKNOWN_CHANNEL_TYPE, "unknown channel")
              for kind in (b"session", b"direct-tcpip", b"x11", b"forwarded_tcpip",
                           b"forwarded.tcpip", b"forwarded-resumable_labrelay", b"")]
    for kind, code, why in cases:
        with pytest.raises(error.ConchError) as refused:
            conn.getChannel(kind, 1 << 20, 32768, data)
        assert refused.value.data == code and why in str(refused.value.value), kind


def confirm(h: Harness, channel: BridgedChannel, maxPacket: int = 1024) -> None:
    h.receive(
        MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", channel.id, PEER_ID, 4096, maxPacket)
    )


def test_our_open_confirmed_then_usable() -> None:
    h = Harness()
    channel = ourChannel(h)
    assert not channel.opened.called
    confirm(h, channel)
    assert channel.opened.called
    assert (channel.remoteWindowLeft, channel.remoteMaxPacket) == (4096, 1024)
    assert h.ssh.disconnects == []


def test_confirmation_twice_disconnects() -> None:
    h = Harness()
    channel = ourChannel(h)
    confirm(h, channel)
    confirm(h, channel)
    assertProtocolError(h)


def test_a_relay_connection_refuses_a_max_packet_below_its_floor() -> None:
    """The relay's connections (``minPeerMaxPacket``, relay.ssh.server): an open or a
    confirmation saying less is refused, at the floor it is taken."""
    from relay.ssh.server import MIN_PEER_MAX_PACKET, RelayConnection

    assert RelayConnection.minPeerMaxPacket == MIN_PEER_MAX_PACKET == 1024
    h = Harness()
    h.conn.minPeerMaxPacket = MIN_PEER_MAX_PACKET
    h.conn.channelFactory = h.bridgedChannel
    h.receive(MSG_CHANNEL_OPEN, openPacket(7, 1 << 20, 1))
    h.receive(MSG_CHANNEL_OPEN, openPacket(8, 1 << 20, 1023))
    assert h.conn.getChannelCalls == 0
    assert h.ssh.openFailures() == [
        (7, OPEN_CONNECT_FAILED, b"maximum packet size 1 is below 1024"),
        (8, OPEN_CONNECT_FAILED, b"maximum packet size 1023 is below 1024")]
    h.receive(MSG_CHANNEL_OPEN, openPacket(9, 1 << 20, 1024))
    assert h.conn.getChannelCalls == 1 and MSG_CHANNEL_OPEN_CONFIRMATION in h.ssh.kinds()
    channel = ourChannel(h)
    confirm(h, channel, maxPacket=1023)
    assertProtocolError(h)
    assert not channel.opened.called


def test_confirmation_with_max_packet_zero_disconnects() -> None:
    h = Harness()
    channel = ourChannel(h)
    confirm(h, channel, maxPacket=0)
    assertProtocolError(h)
    assert not channel.opened.called


def test_open_failure_fails_the_open() -> None:
    h = Harness()
    channel = ourChannel(h)
    failures: list[Failure] = []
    channel.opened.addErrback(failures.append)
    h.receive(
        MSG_CHANNEL_OPEN_FAILURE,
        struct.pack(">2L", channel.id, OPEN_CONNECT_FAILED)
        + common.NS(b"refused")
        + common.NS(b""),
    )
    assert len(failures) == 1
    assert failures[0].value.args == (b"refused", OPEN_CONNECT_FAILED)
    assert h.conn.channels == {}


def test_open_failure_for_an_open_channel_disconnects_and_stops_cleanly() -> None:
    h = Harness()
    channel = ourChannel(h)
    confirm(h, channel)
    h.receive(
        MSG_CHANNEL_OPEN_FAILURE,
        struct.pack(">2L", channel.id, 2) + common.NS(b"late") + common.NS(b""),
    )
    assertProtocolError(h)
    h.conn.serviceStopped()  # Conch's bookkeeping is still consistent


@pytest.mark.parametrize(
    "kind, payload",
    [
        (MSG_CHANNEL_DATA, common.NS(b"early")),
        (MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">L", 10)),
        (MSG_CHANNEL_EOF, b""),
        (MSG_CHANNEL_CLOSE, b""),
    ],
)
def test_traffic_on_an_unconfirmed_channel_disconnects(kind: int, payload: bytes) -> None:
    h = Harness()
    channel = ourChannel(h)
    h.receive(kind, struct.pack(">L", channel.id) + payload)
    assertProtocolError(h)
    h.conn.serviceStopped()


# --- a resumable session's channel: the read that would not fit is never made ----


def test_a_capped_channel_pauses_its_source_before_a_read_could_overflow_the_window() -> None:
    """``capWindow(cap, readAhead)``: the TCP source is paused as soon as less than one
    read is left of the window, so the bytes written and not yet credited never exceed
    the window (a resumable session's replay buffer), and it reads again once the peer
    credits enough."""
    h = Harness()
    channel, tcp, transport, _bridge = h.session(peerWindow=100_000, peerMaxPacket=50_000)
    channel.capWindow(1 << 24, readAhead=10_000)
    assert channel.readAhead == 10_000
    tcp.dataReceived(b"a" * 85_000)
    assert transport.producerState == "producing"  # 15 000 left: one more read fits
    tcp.dataReceived(b"b" * 6_000)
    assert channel.remoteWindowLeft == 9_000
    assert transport.producerState == "paused"  # the next read might not fit
    assert not channel._queued  # nothing beyond the window was ever taken
    h.adjust(channel, 500)
    assert transport.producerState == "paused"
    h.adjust(channel, 500)
    assert transport.producerState == "producing"
    assert h.ssh.data() == b"a" * 85_000 + b"b" * 6_000


def test_the_read_ahead_margin_is_at_most_a_quarter_of_the_peers_window() -> None:
    """With a small window the margin shrinks: the peer credits at half its window, which
    the sender must still be able to reach with its source paused."""
    h = Harness()
    channel, tcp, transport, _bridge = h.session(peerWindow=40_000, peerMaxPacket=50_000)
    channel.capWindow(1 << 24, readAhead=65_536)
    assert channel.readAhead == 10_000
    tcp.dataReceived(b"c" * 25_000)
    assert transport.producerState == "producing"
    tcp.dataReceived(b"d" * 6_000)
    assert transport.producerState == "paused"
    assert channel.remoteWindowLeft == 9_000


class CorkingSSHTransport(FakeSSHTransport):
    """A FakeSSHTransport with ``corked()`` (relay.ssh.aead): records which packets
    were sent inside one cork (one write on a real transport)."""

    def __init__(self, tcp: Any = None) -> None:
        super().__init__(tcp)
        self.corks: list[list[int]] = []
        self._open: list[int] | None = None

    @contextmanager
    def corked(self) -> Iterator[None]:
        self._open = []
        try:
            yield
        finally:
            self.corks.append(self._open)
            self._open = None

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        super().sendPacket(messageType, payload)
        if self._open is not None:
            self._open.append(messageType)


def test_announced_request_leaves_with_the_first_data_in_one_write() -> None:
    """``announce``: the deferred channel request (the relay's ``share@labrelay``) and
    the session's first bytes are sealed inside one cork, so they leave in one write
    (one send, one wake-up of the agent), the request first; later data is not
    corked."""
    h = Harness(linkTCP=StringTransport())
    h.ssh = CorkingSSHTransport(h.ssh.transport)
    h.conn.transport = h.ssh  # type: ignore[assignment]
    channel, tcp, _transport, _bridge = h.session()
    channel.announce(SHARE, pack_share("bob", 2))
    tcp.dataReceived(b"first")
    assert h.ssh.corks == [[MSG_CHANNEL_REQUEST, MSG_CHANNEL_DATA]]
    assert h.ssh.data() == b"first"
    tcp.dataReceived(b"second")
    assert h.ssh.corks == [[MSG_CHANNEL_REQUEST, MSG_CHANNEL_DATA]]
    assert h.ssh.data() == b"firstsecond"
