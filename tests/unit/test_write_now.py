"""``relay.datapath.net.write_now``: small writes leave at once, nothing is reordered.

A real socket pair under Twisted's own ``tcp.Connection`` (the class every plain TCP
transport of the relay and the agent is), driven by a ``MemoryReactor`` so the test
sees exactly when the reactor would have been asked to write later.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport

from relay.datapath.net import WRITE_NOW_MAX, TurnBudget, write_now

Pair = tuple[tcp.Connection, socket.socket, MemoryReactor]


@contextlib.contextmanager
def connected_on(reactor: Any) -> Iterator[tuple[tcp.Connection, socket.socket]]:
    """A Twisted TCP connection of ``reactor`` on one end of a real socket pair, and
    the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = 1
    try:
        yield conn, theirs
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    reactor = MemoryReactor()
    with connected_on(reactor) as (conn, theirs):
        yield conn, theirs, reactor


def received(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_a_small_write_reaches_the_peer_before_the_reactor_turns(pair: Pair) -> None:
    conn, theirs, reactor = pair
    write_now(conn, (b"\x00\x00\x00\x10", b"sealed packet"))
    assert received(theirs) == b"\x00\x00\x00\x10sealed packet"
    assert conn not in reactor.getWriters()  # no epoll round for it
    assert not conn._tempDataBuffer and not conn.dataBuffer


def test_a_write_behind_buffered_bytes_waits_its_turn(pair: Pair) -> None:
    conn, theirs, reactor = pair
    conn.write(b"first ")  # Twisted holds it until the socket is writable
    write_now(conn, (b"second",))
    assert received(theirs) == b""
    assert conn in reactor.getWriters()
    conn.doWrite()
    assert received(theirs) == b"first second"


def test_bulk_keeps_the_reactors_batching(pair: Pair) -> None:
    conn, theirs, reactor = pair
    write_now(conn, (b"x" * (WRITE_NOW_MAX + 1),))
    assert received(theirs) == b""
    assert conn in reactor.getWriters()
    conn.doWrite()
    assert len(received(theirs)) == WRITE_NOW_MAX + 1


def test_what_the_kernel_does_not_take_is_buffered_in_order(pair: Pair) -> None:
    conn, theirs, _reactor = pair
    conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = b""
    for i in range(200):  # fill the socket until it refuses
        chunk = bytes([i % 251]) * 1000
        write_now(conn, (chunk,))
        sent += chunk
        if conn._tempDataBuffer:
            break
    assert conn._tempDataBuffer, "the socket never filled"
    write_now(conn, (b"tail",))  # behind what waits: buffered too
    sent += b"tail"
    got = b""
    while len(got) < len(sent):
        got += received(theirs)
        conn.doWrite()
    assert got == sent


def test_other_transports_get_an_ordinary_write() -> None:
    transport = StringTransport()
    write_now(transport, (b"one",))
    write_now(transport, (b"two ", b"three"))
    assert transport.value() == b"onetwo three"


def test_without_a_limit_bulk_leaves_at_once(pair: Pair) -> None:
    """``TCPSide``'s writes (limit=None): a large write goes straight to the socket too."""
    conn, theirs, reactor = pair
    data = bytes(range(256)) * 64  # 16 KiB, over WRITE_NOW_MAX
    write_now(conn, (data,), limit=None)
    got = b""
    while len(got) < len(data):
        chunk = received(theirs)
        assert chunk, "not sent at once"
        got += chunk
    assert got == data
    assert conn not in reactor.getWriters()


def test_without_a_limit_the_rest_is_buffered_and_pauses_the_producer(pair: Pair) -> None:
    """What the kernel does not take of an unlimited write waits in Twisted's buffer,
    in order, and counts toward the registered producer's pause like any write."""
    conn, theirs, reactor = pair
    conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    class Producer:
        paused = 0
        resumed = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            self.resumed += 1

        def stopProducing(self) -> None:
            pass

    producer = Producer()
    conn.registerProducer(producer, True)
    conn.bufferSize = 64 * 1024
    data = bytes(i % 251 for i in range(1 << 20))  # far more than the socket takes
    write_now(conn, (data,), limit=None)
    assert conn._tempDataBuffer and conn in reactor.getWriters()
    assert producer.paused == 1
    write_now(conn, (b"tail",), limit=None)  # behind the rest: buffered too
    got = b""
    while len(got) < len(data) + 4:
        got += received(theirs)
        conn.doWrite()
    assert got == data + b"tail"
    assert producer.resumed == 1


def test_an_aborted_connection_sends_nothing_directly(pair: Pair) -> None:
    conn, theirs, _reactor = pair
    conn._aborting = True  # what abortConnection sets before connectionLost runs
    write_now(conn, (b"late",))
    assert received(theirs) == b""


class Producer:
    """A streaming producer that counts what the transport asks of it."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class TurnCountingClock(MemoryReactorClock):
    """A clock that also counts its turns, as labrelay's reactor does
    (relay.ops.leanepoll.LeanEPollReactor.turns): ``advance`` is a new turn."""

    turns = 0

    def advance(self, amount: float) -> None:
        self.turns += 1
        super().advance(amount)


@pytest.fixture(params=["callLater", "turns"])
def clocked(request: pytest.FixtureRequest,
            ) -> Iterator[tuple[tcp.Connection, socket.socket, MemoryReactorClock]]:
    """A real socket pair whose reactor has a clock: ``advance(0)`` is a new turn.
    Twice: a reactor TurnBudget must mark turns on with ``callLater(0)``, and one that
    counts them."""
    reactor = MemoryReactorClock() if request.param == "callLater" else TurnCountingClock()
    with connected_on(reactor) as (conn, theirs):
        yield conn, theirs, reactor


def drain(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = received(sock)
        if not chunk:
            break
        got += chunk
    return got


def test_a_turn_budget_sends_bulk_at_once_up_to_the_buffer_size(
        clocked: tuple[tcp.Connection, socket.socket, MemoryReactorClock]) -> None:
    """TurnBudget (the SSH transport's writes under FlowConnection): packets of any size
    leave in the turn that wrote them while the turn's direct bytes stay within
    ``bufferSize``; the next one is buffered and pauses the producer exactly where
    Twisted's buffer would have (direct + buffered over ``bufferSize``); the reactor's
    write event resumes it; a new turn starts the count again."""
    conn, theirs, reactor = clocked
    producer = Producer()
    conn.registerProducer(producer, True)
    conn.bufferSize = 128 * 1024
    budget = TurnBudget(conn)
    packet = b"p" * (32 * 1024)
    for _ in range(4):  # 128 KiB: all at once, no reactor round
        budget.write((packet[:16], packet[16:]))
    assert conn not in reactor.getWriters() and producer.paused == 0
    assert len(drain(theirs, 4 * len(packet))) == 4 * len(packet)
    budget.write((packet,))  # the fifth crosses the mark: buffered, and paused
    assert conn in reactor.getWriters() and producer.paused == 1
    assert drain(theirs, len(packet)) == b""
    conn.doWrite()
    assert producer.resumed == 1
    assert drain(theirs, len(packet)) == packet
    reactor.advance(0)  # the next turn: the budget is whole again
    budget.write((packet,))
    assert drain(theirs, len(packet)) == packet
    assert conn not in reactor.getWriters()


def test_a_turn_budget_that_the_kernel_took_whole_resumes_at_the_next_turn(
        clocked: tuple[tcp.Connection, socket.socket, MemoryReactorClock]) -> None:
    """The write that crosses ``bufferSize`` still leaves at once (Twisted's buffer takes
    it too), and the producer is paused after it; nothing waits in Twisted's buffer, so
    no write event will come: the next reactor turn resumes the producer instead."""
    conn, theirs, reactor = clocked
    producer = Producer()
    conn.registerProducer(producer, True)
    conn.bufferSize = 128 * 1024
    budget = TurnBudget(conn)
    packet = b"q" * (48 * 1024)
    for _ in range(3):  # 0, 48 and 96 KiB sent before each: all three at once
        budget.write((packet,))
    assert len(drain(theirs, 3 * len(packet))) == 3 * len(packet)
    assert conn not in reactor.getWriters()
    assert (producer.paused, producer.resumed) == (1, 0)
    reactor.advance(0)
    assert (producer.paused, producer.resumed) == (1, 1)
    assert budget.used == 0


def test_on_a_reactor_that_counts_turns_a_budget_schedules_nothing_until_it_pauses(
) -> None:
    """labrelay's reactor counts its turns: direct writes leave no timer behind (each
    was a timer and an extra pass of the loop per writing turn), a new turn is seen at
    the next write, and only a pause with nothing buffered asks for the next turn."""
    reactor = TurnCountingClock()
    with connected_on(reactor) as (conn, theirs):
        producer = Producer()
        conn.registerProducer(producer, True)
        conn.bufferSize = 128 * 1024
        budget = TurnBudget(conn)
        packet = b"t" * (48 * 1024)
        budget.write((packet,))
        budget.write((packet,))
        assert reactor.getDelayedCalls() == [] and budget.used == 2 * len(packet)
        assert len(drain(theirs, 2 * len(packet))) == 2 * len(packet)
        reactor.turns += 1  # a new turn: the budget is whole at its first write
        budget.write((packet,))
        assert budget.used == len(packet) and reactor.getDelayedCalls() == []
        budget.write((packet,))
        budget.write((packet,))  # over bufferSize, and the kernel took it: paused
        assert (producer.paused, producer.resumed) == (1, 0)
        assert len(reactor.getDelayedCalls()) == 1
        assert len(drain(theirs, 3 * len(packet))) == 3 * len(packet)
        reactor.advance(0)
        assert (producer.paused, producer.resumed) == (1, 1)
        assert reactor.getDelayedCalls() == []


def test_a_turn_budget_never_writes_past_buffered_bytes(
        clocked: tuple[tcp.Connection, socket.socket, MemoryReactorClock]) -> None:
    conn, theirs, _reactor = clocked
    conn.bufferSize = 128 * 1024
    budget = TurnBudget(conn)
    conn.write(b"first ")  # waits for the reactor
    budget.write((b"second",))
    assert received(theirs) == b""
    conn.doWrite()
    assert received(theirs) == b"first second"


def test_a_turn_budget_needs_a_plain_tcp_connection_and_a_clock(
        clocked: tuple[tcp.Connection, socket.socket, MemoryReactorClock]) -> None:
    conn, _theirs, _reactor = clocked
    assert TurnBudget.usable(conn)
    assert not TurnBudget.usable(StringTransport())
    conn.reactor = MemoryReactor()
    assert not TurnBudget.usable(conn)
