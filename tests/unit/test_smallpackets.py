"""A peer's small ``CHANNEL_DATA`` packets: joined per channel and read, and at most
``PACKETS_PER_TURN`` of them handled per reactor turn (docs/security.md, "a flood of
1-byte packets").

Real AES-GCM packets go into labrelay's transport (``AEADTransportMixin``), whose
``ssh-connection`` service is a ``FlowConnection``; the channels record what they are
handed.  The bytes must come out exact and in order, each channel's window counted
exactly, and nothing may overtake a non-data message.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.conch.ssh.connection import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF
from twisted.internet.tcp import Connection
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.ssh.aead import PACKETS_PER_TURN
from relay.ssh.ciphers import AES128_GCM, PacketCiphers
from relay.ssh.connection import COALESCE_BELOW, COALESCE_MAX, FlowConnection
from relay.testing import BareSSHTransport

KEY = bytes(range(16))
IV_OUT = bytes.fromhex("000102030405060708090a0b")
IV_IN = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
WINDOW = 1 << 24


class Transport(BareSSHTransport):
    """Dispatches what is not channel data to its service, and logs it in ``events``."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.events = events

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        self.events.append(("message", messageNum))
        super().dispatchMessage(messageNum, payload)


class Channel:
    """What FlowConnection needs of a channel; records each chunk it is handed."""

    def __init__(self, cid: int, events: list[tuple[Any, ...]]) -> None:
        self.id = cid
        self.localWindowLeft = WINDOW
        self.localMaxPacket = 32 * 1024
        self.localClosed = False
        self.events = events
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.events.append(("data", self.id, data))

    def closed(self) -> None:
        self.events.append(("closed", self.id))


def ciphers(out_iv: bytes, in_iv: bytes) -> PacketCiphers:
    enc = PacketCiphers(AES128_GCM, AES128_GCM, b"hmac-sha2-256", b"hmac-sha2-256")
    enc.setKeys(out_iv, KEY, in_iv, KEY, b"", b"")
    return enc


class Peer:
    """The other end: seals packets the receiver's ciphers open."""

    def __init__(self) -> None:
        self.t = BareSSHTransport()
        self.t.transport = StringTransport()
        self.t.gotVersion = True
        self.t.currentEncryptions = ciphers(IV_IN, IV_OUT)

    def data(self, cid: int, data: bytes) -> None:
        self.t.sendPacket(MSG_CHANNEL_DATA, struct.pack(">2L", cid, len(data)) + data)

    def eof(self, cid: int) -> None:
        self.t.sendPacket(MSG_CHANNEL_EOF, struct.pack(">L", cid))

    def wire(self) -> bytes:
        out: bytes = self.t.transport.value()
        self.t.transport.clear()
        return out


def receiver(tcp: Any, events: list[tuple[Any, ...]], channels: int = 3
             ) -> tuple[Transport, FlowConnection, list[Channel]]:
    t = Transport(events)
    t.transport = tcp
    t.gotVersion = True
    t.currentEncryptions = ciphers(IV_OUT, IV_IN)
    conn = FlowConnection()
    conn.transport = t
    t.service = conn
    conn.serviceStarted()
    chans = [Channel(cid, events) for cid in range(channels)]
    for ch in chans:
        conn.channels[ch.id] = ch
        conn.channelsToRemoteChannel[ch] = 100 + ch.id  # type: ignore[index]
        conn.localToRemoteChannel[ch.id] = 100 + ch.id
    return t, conn, chans


def test_a_read_of_small_packets_is_one_exact_chunk_per_channel() -> None:
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(StringTransport(), events)
    peer, rng = Peer(), random.Random(7)
    sent: dict[int, bytes] = {0: b"", 1: b"", 2: b""}
    for _ in range(600):  # round-robin-ish 1..3-byte packets on three channels
        cid, data = rng.randrange(3), rng.randbytes(rng.randint(1, 3))
        peer.data(cid, data)
        sent[cid] += data
    t.dataReceived(peer.wire())
    for ch in chans:
        assert b"".join(ch.chunks) == sent[ch.id]  # exact, in order
        assert len(ch.chunks) == 1  # joined: one chunk for the whole read
        assert ch.localWindowLeft == WINDOW - len(sent[ch.id])  # counted exactly


def test_nothing_overtakes_a_message_and_bulk_goes_on_at_once() -> None:
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(StringTransport(), events)
    peer = Peer()
    peer.data(0, b"a")
    peer.data(1, b"b")
    peer.data(0, b"c")
    peer.eof(1)  # a message: what came before it is handed on first
    peer.data(0, b"d")
    bulk = bytes(range(256)) * (COALESCE_BELOW // 256)
    peer.data(2, bulk)  # large, nothing held for channel 2: as before, at once
    peer.data(0, b"e")
    t.dataReceived(peer.wire())
    assert events == [
        ("data", 0, b"ac"), ("data", 1, b"b"), ("message", MSG_CHANNEL_EOF),
        ("data", 2, bulk), ("data", 0, b"de"),
    ]
    assert [ch.localWindowLeft for ch in chans] == [WINDOW - 4, WINDOW - 1, WINDOW - len(bulk)]


def test_joined_bytes_go_on_at_a_maximum_packet() -> None:
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(StringTransport(), events, channels=1)
    peer = Peer()
    piece = b"x" * 1000
    for _ in range(40):
        peer.data(0, piece)
    t.dataReceived(peer.wire())
    sizes = [len(c) for c in chans[0].chunks]
    assert sum(sizes) == 40_000 and max(sizes) < COALESCE_MAX + len(piece)
    assert sizes[0] >= COALESCE_MAX


def test_packets_past_the_window_still_close_the_channel_after_what_came_before() -> None:
    events: list[tuple[Any, ...]] = []
    t, conn, chans = receiver(StringTransport(), events, channels=1)
    chans[0].localWindowLeft = 3
    closed: list[Any] = []
    conn.sendClose = closed.append  # type: ignore[method-assign]
    peer = Peer()
    peer.data(0, b"ab")
    peer.data(0, b"cd")  # past the window
    t.dataReceived(peer.wire())
    assert chans[0].chunks == [b"ab"] and closed == [chans[0]]


def turn(reactor: MemoryReactorClock) -> None:
    """The timed calls one turn of a real reactor runs: those due when it began (the
    Clock's ``advance`` would also run the ones they schedule)."""
    due = list(reactor.getDelayedCalls())
    assert len(due) == 1
    reactor.calls.remove(due[0])
    due[0].func(*due[0].args, **due[0].kw)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[Connection, MemoryReactorClock]]:
    """A real Twisted TCP connection object (on one end of a socketpair) whose reactor
    is a MemoryReactorClock: reading paused and resumed shows as its readers."""
    a, b = socket.socketpair()
    a.setblocking(False)
    reactor = MemoryReactorClock()
    tcp = Connection(a, None, reactor)  # type: ignore[arg-type]
    tcp.connected = True
    tcp.startReading()
    yield tcp, reactor
    a.close()
    b.close()


def test_a_user_read_is_handled_at_most_packets_per_turn_at_a_time(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    tcp, reactor = tcp_pair
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(tcp, events, channels=2)
    t.packetsPerTurn = PACKETS_PER_TURN  # the relay's, for a user's connection
    peer = Peer()
    count = 5 * PACKETS_PER_TURN + 7
    sent = {0: bytearray(), 1: bytearray()}
    for k in range(count):
        peer.data(k % 2, bytes([k % 251]))
        sent[k % 2].append(k % 251)
        if k == 3 * PACKETS_PER_TURN:
            peer.eof(1)  # a message in the middle of the read
    t.dataReceived(peer.wire())
    # One turn's packets, no more; the socket is not read while the rest waits.
    assert t.incomingPacketSequence == PACKETS_PER_TURN
    assert tcp not in reactor.getReaders()
    assert not any(e[0] == "data" for e in events)  # still joining the read
    # What arrives meanwhile (something resumed the socket) goes after the rest.
    peer.data(0, b"late")
    t.dataReceived(peer.wire())
    turns = 0
    while t.incomingPacketSequence < count + 2:
        before = t.incomingPacketSequence
        turn(reactor)
        turns += 1
        assert t.incomingPacketSequence - before <= PACKETS_PER_TURN
    assert turns == 5
    assert tcp in reactor.getReaders()  # read again once the backlog is parsed
    assert b"".join(chans[0].chunks) == bytes(sent[0]) + b"late"
    assert b"".join(chans[1].chunks) == bytes(sent[1])
    # Channel 1's data up to its EOF was handed on before the EOF message.
    eof = events.index(("message", MSG_CHANNEL_EOF))
    assert b"".join(e[2] for e in events[:eof] if e[:2] == ("data", 1)) == bytes(
        sent[1][: 3 * PACKETS_PER_TURN // 2])  # the odd k up to 3 * PACKETS_PER_TURN
    assert reactor.getDelayedCalls() == []


def test_a_connection_lost_mid_backlog_drops_the_rest(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    tcp, reactor = tcp_pair
    events: list[tuple[Any, ...]] = []
    t, _conn, _chans = receiver(tcp, events, channels=1)
    t.packetsPerTurn = PACKETS_PER_TURN
    peer = Peer()
    for _ in range(3 * PACKETS_PER_TURN):
        peer.data(0, b"z")
    t.dataReceived(peer.wire())
    assert reactor.getDelayedCalls()
    t.connectionLost(None)
    assert reactor.getDelayedCalls() == []
    reactor.advance(0)
    assert not any(e[0] == "data" for e in events)  # nothing handled after the loss


def test_a_connection_closing_mid_backlog_hands_on_what_was_parsed(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    tcp, reactor = tcp_pair
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(tcp, events, channels=1)
    t.packetsPerTurn = PACKETS_PER_TURN
    peer = Peer()
    for _ in range(3 * PACKETS_PER_TURN):
        peer.data(0, b"z")
    t.dataReceived(peer.wire())
    tcp.disconnecting = True  # e.g. the relay disconnected her meanwhile
    turn(reactor)
    assert chans[0].chunks == [b"z" * PACKETS_PER_TURN]  # as without the budget
    assert reactor.getDelayedCalls() == []


def test_without_a_budget_a_read_is_handled_whole(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    """An agent's link (no ``packetsPerTurn``): every packet of the read at once."""
    tcp, reactor = tcp_pair
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(tcp, events, channels=1)
    peer = Peer()
    for _ in range(3 * PACKETS_PER_TURN):
        peer.data(0, b"z")
    t.dataReceived(peer.wire())
    assert chans[0].chunks == [b"z" * 3 * PACKETS_PER_TURN]
    assert reactor.getDelayedCalls() == [] and tcp in reactor.getReaders()


@pytest.mark.parametrize(("kind", "budget"), [("user", PACKETS_PER_TURN), ("agent", None)])
def test_the_relay_holds_a_users_reads_to_the_budget_not_an_agents_link(
    kind: str, budget: int | None,
) -> None:
    from types import SimpleNamespace

    from relay.ssh.server import RelayConnection

    class Core:
        config = SimpleNamespace(keepalive=SimpleNamespace(interval=0))

        def sessionStarted(self, conn: Any) -> None:
            pass

    t = Transport([])
    t.transport = StringTransport()
    t.avatar = SimpleNamespace(identity=SimpleNamespace(kind=kind))  # type: ignore[attr-defined]
    conn = RelayConnection(Core())  # type: ignore[arg-type]
    conn.transport = t
    conn.serviceStarted()
    assert t.packetsPerTurn == budget
