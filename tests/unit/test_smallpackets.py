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
from relay.ssh.turnshare import UserTurns, UserTurnShares
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
    t.turnShare = UserTurns(reactor, PACKETS_PER_TURN)  # the relay's, for a user's
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
    t.turnShare = UserTurns(reactor, PACKETS_PER_TURN)
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
    t.turnShare = UserTurns(reactor, PACKETS_PER_TURN)
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


def _relay_connection(core: Any, kind: str, name: str) -> Transport:
    from types import SimpleNamespace

    from relay.ssh.server import RelayConnection

    t = Transport([])
    t.transport = StringTransport()
    t.avatar = SimpleNamespace(  # type: ignore[attr-defined]
        identity=SimpleNamespace(kind=kind, name=name))
    conn = RelayConnection(core)
    conn.transport = t
    conn.serviceStarted()
    return t


def test_the_relay_budgets_a_users_connections_together_not_an_agents_link() -> None:
    from types import SimpleNamespace

    from relay.ssh.aead import NO_FLUSH, USER_NO_FLUSH
    from relay.ssh.turnshare import UserTurnShares

    class Core:
        config = SimpleNamespace(keepalive=SimpleNamespace(interval=0))
        turnShares = UserTurnShares(MemoryReactorClock(), PACKETS_PER_TURN)

        def sessionStarted(self, conn: Any) -> None:
            pass

    core = Core()
    alice1, alice2, bob = (_relay_connection(core, "user", n) for n in ("alice", "alice", "bob"))
    agent = _relay_connection(core, "agent", "lab_pc")
    assert alice1.turnShare is alice2.turnShare is not None  # one budget for her key
    assert bob.turnShare is not None and bob.turnShare is not alice1.turnShare
    assert alice1.turnShare.share.per_turn == PACKETS_PER_TURN
    assert agent.turnShare is None and agent.noFlush == NO_FLUSH
    assert alice1.noFlush == USER_NO_FLUSH
    del alice1, alice2
    import gc

    gc.collect()
    assert len(core.turnShares) == 1  # hers went with her connections


def _tcp(reactor: MemoryReactorClock, socks: list[socket.socket]) -> Connection:
    a, b = socket.socketpair()
    a.setblocking(False)
    socks += (a, b)
    tcp = Connection(a, None, reactor)  # type: ignore[arg-type]
    tcp.connected = True
    tcp.startReading()
    return tcp


def test_a_users_connections_share_one_budget_per_turn_in_turn() -> None:
    """Five connections of one user: at most ``PACKETS_PER_TURN`` packets a turn
    between them (one budget per connection gave her five), each connection's turn
    in the round comes, and every byte arrives exact and in order."""
    reactor, socks = MemoryReactorClock(), []
    share = UserTurns(reactor, PACKETS_PER_TURN)
    conns = []
    for _ in range(5):
        tcp = _tcp(reactor, socks)
        t, _conn, chans = receiver(tcp, [], channels=2)
        t.turnShare = share
        conns.append((tcp, t, chans))
    count = 3 * PACKETS_PER_TURN
    for _, t, _ in conns:  # all five reads arrive in one turn
        peer = Peer()
        for k in range(count):
            peer.data(k % 2, bytes([k % 251]))
        t.dataReceived(peer.wire())
    total = sum(t.incomingPacketSequence for _, t, _ in conns)
    assert total == PACKETS_PER_TURN  # the first read took the turn; the rest wait
    assert all(tcp not in reactor.getReaders() for tcp, t, _ in conns if t.stillWaiting())
    served: list[set[int]] = []  # the connections that went, turn by turn
    waiting: list[set[int]] = []  # those that waited at the turn's start
    while any(t.stillWaiting() for _, t, _ in conns):
        waiting.append({i for i, (_, t, _) in enumerate(conns) if t.stillWaiting()})
        before = [t.incomingPacketSequence for _, t, _ in conns]
        turn(reactor)
        after = [t.incomingPacketSequence for _, t, _ in conns]
        assert sum(after) - sum(before) <= PACKETS_PER_TURN
        served.append({i for i in range(5) if after[i] > before[i]})
    assert len(served) == 5 * 3 - 1  # 15 turns' worth in all, the first one's included
    # In turn: every connection that waits goes within the next five turns.
    for i in range(len(served)):
        went = set().union(*served[i : i + 5])
        assert waiting[i] <= went or i + 5 > len(served), (i, waiting[i], went)
    for tcp, _t, chans in conns:
        assert tcp in reactor.getReaders()
        assert b"".join(chans[0].chunks) == bytes(k % 251 for k in range(0, count, 2))
        assert b"".join(chans[1].chunks) == bytes(k % 251 for k in range(1, count, 2))
    assert reactor.getDelayedCalls() == []
    for s in socks:
        s.close()


def test_messages_that_are_not_data_count_against_the_budget_and_do_not_split_the_data(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    """A peer that puts ``SSH_MSG_IGNORE``, window adjusts and keepalive global requests
    between its 1-byte packets: each one counts as a packet of the turn (the relay opens
    it), and none of them makes the relay hand on a channel's held bytes early, which
    had cost one link packet and one ``send`` per byte."""
    from twisted.conch.ssh.common import NS
    from twisted.conch.ssh.connection import MSG_CHANNEL_WINDOW_ADJUST, MSG_GLOBAL_REQUEST
    from twisted.conch.ssh.transport import MSG_IGNORE

    from relay.ssh.aead import USER_NO_FLUSH

    tcp, reactor = tcp_pair
    events: list[tuple[Any, ...]] = []
    t, _conn, chans = receiver(tcp, events, channels=2)
    t.turnShare = UserTurns(reactor, PACKETS_PER_TURN)
    t.noFlush = USER_NO_FLUSH
    peer = Peer()
    rounds = PACKETS_PER_TURN // 4  # 4 packets a round: one turn's budget
    for k in range(rounds):
        peer.data(k % 2, b"%c" % (65 + k % 26))
        peer.t.sendPacket(MSG_IGNORE, NS(b"x"))
        peer.t.sendPacket(MSG_GLOBAL_REQUEST, NS(b"keepalive@openssh.com") + b"\x00")
        peer.t.sendPacket(MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 100, 1))
    peer.data(0, b"!")  # one packet past the budget
    t.dataReceived(peer.wire())
    assert t.incomingPacketSequence == PACKETS_PER_TURN and t.stillWaiting()
    assert sum(e == ("message", MSG_GLOBAL_REQUEST) for e in events) == rounds
    turn(reactor)
    assert not t.stillWaiting()
    sent0 = bytes(65 + k % 26 for k in range(0, rounds, 2)) + b"!"
    sent1 = bytes(65 + k % 26 for k in range(1, rounds, 2))
    assert chans[0].chunks == [sent0] and chans[1].chunks == [sent1]  # one chunk each


@pytest.mark.parametrize("others", [False, True])
def test_while_others_are_active_a_user_past_her_budget_waits_as_long_as_her_turn_took(
    tcp_pair: tuple[Connection, MemoryReactorClock], others: bool,
) -> None:
    """Alone, the rest of her read is parsed in the very next turn (a lone user's rate
    is not cut); while another user is active, her next turn comes only after as long
    as her last one took, so that at most half of the relay's time is hers."""
    tcp, reactor = tcp_pair
    t, _conn, chans = receiver(tcp, [], channels=1)
    shares = UserTurnShares(reactor, PACKETS_PER_TURN)
    t.turnShare = shares.of("alice")
    bob = shares.of("bob")
    reactor.advance(10)
    if others:
        bob.budget()  # bob read something just now
    peer = Peer()
    for _ in range(3 * PACKETS_PER_TURN):
        peer.data(0, b"z")
    t.dataReceived(peer.wire())
    first = reactor.getDelayedCalls()[0]
    assert first.getTime() == reactor.seconds()  # the first wait: the next turn
    turn(reactor)  # her second turn, measured
    (second,) = reactor.getDelayedCalls()
    if others:
        assert second.getTime() > reactor.seconds()
    else:
        assert second.getTime() == reactor.seconds()
    turn(reactor)  # (whenever it is due)
    assert chans[0].chunks == [b"z" * 3 * PACKETS_PER_TURN]
    assert reactor.getDelayedCalls() == []


def test_what_a_read_makes_the_relay_send_leaves_in_one_write_per_peer() -> None:
    """A read of 1-byte packets for 20 channels, each channel bridged to the same
    other transport (the agent's link): one write to it for the whole read, the
    packets in order (each was one ``send``)."""
    from relay.ssh.aead import CorkGroup

    group = CorkGroup()
    link = Peer()  # seals with the receiver's ciphers: a transport to write to
    writes: list[bytes] = []
    link.t.transport.write = writes.append  # type: ignore[method-assign]
    link.t.transport.writeSequence = lambda seq: writes.append(b"".join(seq))  # type: ignore
    link.t.corkGroup = group

    class Bridged(Channel):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            link.t.sendChannelData(self.id, data)

    t, conn, _ = receiver(StringTransport(), [], channels=0)
    t.corkGroup = group
    chans = [Bridged(cid, []) for cid in range(20)]
    for ch in chans:
        conn.channels[ch.id] = ch
        conn.channelsToRemoteChannel[ch] = 100 + ch.id  # type: ignore[index]
        conn.localToRemoteChannel[ch.id] = 100 + ch.id
    peer = Peer()
    for k in range(200):
        peer.data(k % 20, b"%c" % (65 + k % 26))
    t.dataReceived(peer.wire())
    assert len(writes) == 1  # one write for the 20 packets
    got = receiver(StringTransport(), [], channels=20)
    got[0].dataReceived(writes[0])  # the link's peer opens them: exact, in order
    for ch in got[2]:
        assert b"".join(ch.chunks) == bytes(65 + k % 26 for k in range(ch.id, 200, 20))


def test_an_open_leaves_at_once_within_a_hold_and_data_after_it_waits_for_the_end() -> None:
    """Only channel data starts a :class:`CorkGroup` hold: the relay's open to the agent,
    sealed in the turn that read a user's open, leaves at once, not after the rest of
    the read (her confirmation) is handled; data sealed after it waits for the end of
    the read, and everything leaves in the order it was sealed."""
    from twisted.conch.ssh.connection import MSG_CHANNEL_OPEN

    from relay.ssh.aead import CorkGroup

    group = CorkGroup()
    link = Peer()
    writes: list[bytes] = []
    link.t.transport.write = writes.append  # type: ignore[method-assign]
    link.t.transport.writeSequence = lambda seq: writes.append(b"".join(seq))  # type: ignore
    link.t.corkGroup = group
    with group.held():
        link.t.sendPacket(MSG_CHANNEL_OPEN, b"\x00\x00\x00\x0fforwarded-tcpip")
        assert len(writes) == 1  # the open: at once
        link.t.sendChannelData(7, b"a")
        link.t.sendPacket(MSG_CHANNEL_OPEN, b"\x00\x00\x00\x0fforwarded-tcpip")
        link.t.sendChannelData(7, b"b")
        assert len(writes) == 1  # data began a hold; what follows waits behind it
    assert len(writes) == 2  # the rest in one write at the end of the read
    assert len(writes[1]) > 2 * len(writes[0])  # data, open, data: all three


def test_a_kexinit_held_for_the_pace_mid_backlog_stops_her_turns_until_its_turn() -> None:
    """A user's read waits past her turn's budget and, in a later turn, reaches a
    KEXINIT that the re-key pace holds (relay.ssh.kex; emulated: an ``IGNORE`` whose
    dispatch holds, as ``ssh_KEXINIT`` does past the burst): her turns stop handing her
    anything, her socket stays paused, until ``kexPaceOver``; then the rest is handled
    within her budget, every byte exact and in order, and the socket read again."""
    from twisted.conch.ssh.transport import MSG_IGNORE

    class Paced(Transport):
        kexPacer = object()  # a pace is set (the relay's server sets a TokenBucket)

        def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
            if messageNum == MSG_IGNORE and payload.endswith(b"HOLD"):
                self._pacedKexInit = payload  # what ssh_KEXINIT does when paced
                return
            super().dispatchMessage(messageNum, payload)

    reactor, socks = MemoryReactorClock(), []
    share = UserTurns(reactor, PACKETS_PER_TURN)
    tcp = _tcp(reactor, socks)
    t = Paced([])
    t.transport = tcp
    t.gotVersion = True
    t.currentEncryptions = ciphers(IV_OUT, IV_IN)
    conn = FlowConnection()
    conn.transport = t
    t.service = conn
    conn.serviceStarted()
    ch = Channel(0, [])
    conn.channels[0] = ch
    conn.channelsToRemoteChannel[ch] = 100  # type: ignore[index]
    conn.localToRemoteChannel[0] = 100
    t.turnShare = share
    peer = Peer()
    count = 3 * PACKETS_PER_TURN
    at = PACKETS_PER_TURN + 50
    for k in range(count):
        if k == at:
            peer.t.sendPacket(MSG_IGNORE, struct.pack(">L", 4) + b"HOLD")
        peer.data(0, bytes([k % 251]))
    t.dataReceived(peer.wire())
    assert t.incomingPacketSequence == PACKETS_PER_TURN and t.stillWaiting()
    turn(reactor)  # her next turn reaches the held KEXINIT
    assert t.incomingPacketSequence == at + 1 and t.kexInitHeld
    assert not t.stillWaiting() and tcp not in reactor.getReaders()
    assert reactor.getDelayedCalls() == []  # no turn of hers while it is held
    assert b"".join(ch.chunks) == bytes(k % 251 for k in range(at))  # before it: on
    t._pacedKexInit = None  # its turn came (KexMixin._kexPaceDue)
    t.kexPaceOver()
    while t.stillWaiting():
        before = t.incomingPacketSequence
        turn(reactor)
        assert t.incomingPacketSequence - before <= PACKETS_PER_TURN
    assert b"".join(ch.chunks) == bytes(k % 251 for k in range(count))
    assert tcp in reactor.getReaders()
    for s in socks:
        s.close()


def test_small_reads_within_a_window_add_up_to_one_budget(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    """Round 16 gave the budget whole again at each reactor turn, so a user whose
    reads each stayed under it (small writes, each flushed) never waited and never
    yielded.  Now her reads within ``TURN_WINDOW`` share one budget: the third read of
    50 packets in one window has 28 handled, the rest waits, her socket unread, for
    the next turn; a read in a later window has a whole budget again."""
    from relay.ssh.turnshare import TURN_WINDOW

    tcp, reactor = tcp_pair
    t, _conn, chans = receiver(tcp, [], channels=1)
    # labrelay's reactor counts its turns (relay.ops.leanepoll): each read its own.
    reactor.turns = 0  # type: ignore[attr-defined]
    t.turnShare = UserTurns(reactor, PACKETS_PER_TURN)
    reactor.advance(100)
    peer = Peer()
    for _ in range(2):  # two reads of 50 in the same window: handled whole
        for _ in range(50):
            peer.data(0, b"a")
        reactor.turns += 1  # type: ignore[attr-defined]
        t.dataReceived(peer.wire())
    assert t.incomingPacketSequence == 100 and not reactor.getDelayedCalls()
    for _ in range(50):
        peer.data(0, b"b")
    reactor.turns += 1  # type: ignore[attr-defined]
    t.dataReceived(peer.wire())
    assert t.incomingPacketSequence == PACKETS_PER_TURN  # 28 of the third read
    assert tcp not in reactor.getReaders()  # the rest waits, the socket unread
    turn(reactor)
    assert t.incomingPacketSequence == 150 and tcp in reactor.getReaders()
    assert b"".join(chans[0].chunks) == b"a" * 100 + b"b" * 50
    # A later window: a whole budget again (an interactive user never waits).
    reactor.advance(TURN_WINDOW)
    for _ in range(PACKETS_PER_TURN):
        peer.data(0, b"c")
    t.dataReceived(peer.wire())
    assert t.incomingPacketSequence == 150 + PACKETS_PER_TURN
    assert not reactor.getDelayedCalls()


def test_her_yield_counts_the_time_of_her_reads_before_the_wait(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    """While another user is active, what she yields once past her budget is the time
    all her packets of the window took, not only those of the turn that served the rest
    of her last read: many small reads add up to her time as to her packets."""
    import time as _time

    tcp, reactor = tcp_pair
    t, _conn, _chans = receiver(tcp, [], channels=1)
    shares = UserTurnShares(reactor, PACKETS_PER_TURN)
    t.turnShare = shares.of("alice")
    reactor.advance(100)
    bob = shares.of("bob")
    bob.budget()  # bob read something just now
    handler = t.channelDataHandler

    def slow(payload: bytes) -> None:
        until = _time.perf_counter() + 0.0002  # a packet that costs 0.2 ms of CPU
        while _time.perf_counter() < until:
            pass
        handler(payload)

    t.channelDataHandler = slow
    peer = Peer()
    for _ in range(4):  # four reads of 40 packets: 120 handled at once, ~24 ms
        for _ in range(40):
            peer.data(0, b"z")
        t.dataReceived(peer.wire())
    assert t.incomingPacketSequence == PACKETS_PER_TURN
    turn(reactor)  # the rest of the fourth read, past a second budget of none
    assert t.incomingPacketSequence == 160
    assert not reactor.getDelayedCalls()  # nothing waits: no yield to schedule
    # Past the budget again in the same window: her yield is her window's time.
    for _ in range(3 * PACKETS_PER_TURN):
        peer.data(0, b"y")
    start = _time.perf_counter()
    t.dataReceived(peer.wire())  # 96 handled (~19 ms), the rest waits
    spent = _time.perf_counter() - start
    turn(reactor)
    (call,) = reactor.getDelayedCalls()
    # (0.9: her read's own time is measured inside what the test measures of it)
    assert call.getTime() - reactor.seconds() >= 0.9 * spent + PACKETS_PER_TURN * 0.0002


def test_reads_of_bulk_in_one_window_never_wait(
    tcp_pair: tuple[Connection, MemoryReactorClock],
) -> None:
    """A transfer's reads (OpenSSH's 16 KiB packets, eight to a read) are not charged to
    the window: 40 of them in one window, 320 packets, none waits, as in round 16; a
    window charged with them would make a transfer at the relay's channel rate wait, and
    yield half its time whenever anyone else is active."""
    tcp, reactor = tcp_pair
    t, _conn, chans = receiver(tcp, [], channels=1)
    t.turnShare = UserTurns(reactor, PACKETS_PER_TURN)
    reactor.advance(100)
    peer = Peer()
    for _ in range(40):
        for _ in range(8):
            peer.data(0, b"x" * 16384)
        t.dataReceived(peer.wire())
        assert not reactor.getDelayedCalls() and tcp in reactor.getReaders()
    assert t.incomingPacketSequence == 320
    assert sum(map(len, chans[0].chunks)) == 320 * 16384
