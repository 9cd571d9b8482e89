"""relay.datapath.handoff.Handoff and relay.datapath.join.join: the one hand-off of a
connection to the data path (a preface, then held, keeping what was read past it) and
the one splice of a session's two ends, with its counters."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from test_splice import tcp_pair
from test_splice_pump import Peer, backend, reactor, sockets, wait  # noqa: F401  (fixtures)
from twisted.internet import defer, protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relay.datapath.handoff import Handoff, Held
from relay.datapath.join import OnEnd, SessionCounters, join
from relay.datapath.splicing import Backend, DataPath, End, PairAborted, PairResult


class Preface(Handoff):
    """A preface of one line; ``greeting`` is written when the connection is made."""

    def __init__(self, greeting: bytes = b"", made: defer.Deferred[Any] | None = None) -> None:
        super().__init__()
        self.greeting = greeting
        self.made = made
        self.prefaces: list[bytes] = []

    def prefaceStarted(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def prefaceReceived(self) -> None:
        line, nl, rest = self.buf.partition(b"\n")
        if not nl:
            return
        self.prefaces.append(line)
        self.hold(rest)
        if self.made is not None and not self.made.called:
            self.made.callback(self)


def test_held_is_paused_from_the_start_and_keeps_a_read_that_raced_the_pause() -> None:
    made: list[Held] = []
    held = Held()
    held.onMade = made.append
    t = StringTransport()
    held.makeConnection(t)
    assert made == [held] and held.held and t.producerState == "paused"
    held.dataReceived(b"SSH-2.0-")
    held.dataReceived(b"client\r\n")
    assert held.extra == b"SSH-2.0-client\r\n" and held.buf == b""
    held.connectionLost(Failure(Exception("gone")))
    assert held.lost


def test_a_preface_is_read_then_what_follows_it_is_kept_for_the_stream() -> None:
    p = Preface(b"challenge\n")
    t = StringTransport()
    p.makeConnection(t)
    assert t.value() == b"challenge\n" and t.producerState == "producing"
    p.dataReceived(b"hel")
    assert p.prefaces == [] and not p.held
    p.dataReceived(b"lo\nfirst ")
    assert p.prefaces == [b"hello"] and p.held and t.producerState == "paused"
    p.dataReceived(b"bytes")  # raced the pause
    assert p.extra == b"first bytes" and p.buf == b""


def test_resume_reads_more_preface_and_keeps_what_was_already_read() -> None:
    p = Preface()
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"one\nx")
    p.resume()
    assert not p.held and t.producerState == "producing"
    p.dataReceived(b"two\ny")
    assert p.prefaces == [b"one", b"two"] and p.extra == b"xy" and p.held


class RecordingPath:
    """Just what join() asks of a DataPath for two transports."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, bytes, bytes]] = []
        self.pairs: list[FakePair] = []

    def splice_transports(self, a: Any, b: Any, *, from_a: bytes = b"",
                          from_b: bytes = b"") -> FakePair:
        self.calls.append((a, b, from_a, from_b))
        self.pairs.append(FakePair())
        return self.pairs[-1]


class FakePair:
    def __init__(self) -> None:
        self.done: defer.Deferred[PairResult] = defer.Deferred()
        self.moved = PairResult(0, 0)

    def bytes(self) -> PairResult:
        return self.moved

    def abort(self) -> None:
        pass


def _held(extra: bytes) -> Held:
    h = Held()
    h.makeConnection(StringTransport())
    h.dataReceived(extra)
    return h


def test_join_sends_what_each_end_read_past_its_preface_to_the_other_first() -> None:
    path = RecordingPath()
    a, b = _held(b"from-a"), _held(b"from-b")
    join(path, a, b, to_a=b"OK;")  # type: ignore[arg-type]
    assert path.calls == [(a.transport, b.transport, b"from-a", b"OK;from-b")]


def test_join_tells_every_counter_and_counts_live_and_final_bytes() -> None:
    path = RecordingPath()
    forward, pool = SessionCounters(), SessionCounters()
    ended: list[Any] = []
    pair: Any = join(path, _held(b""), _held(b""),  # type: ignore[arg-type]
                     (forward, pool, OnEnd(lambda p, r: ended.append(r))))
    assert (forward.active, forward.total) == (pool.active, pool.total) == (1, 1)
    pair.moved = PairResult(10, 200)
    assert forward.as_dict() == {"sessions_active": 1, "sessions_total": 1,
                                 "bytes_to_target": 10, "bytes_from_target": 200}
    pair.moved = PairResult(15, 300)
    pair.done.errback(Failure(PairAborted(104, "a", 15, 300)))
    assert [r.check(PairAborted) for r in ended] == [PairAborted]
    for c in (forward, pool):
        assert c.as_dict() == {"sessions_active": 0, "sessions_total": 1,
                               "bytes_to_target": 15, "bytes_from_target": 300}
    assert pair.done.called and pair.done.result is None  # the counters consumed it


def test_join_without_counters_leaves_the_outcome_to_the_caller() -> None:
    path = RecordingPath()
    pair: Any = join(path, _held(b""), _held(b""))  # type: ignore[arg-type]
    got: list[Any] = []
    pair.done.addBoth(got.append)
    pair.done.callback(PairResult(1, 2))
    assert got == [PairResult(1, 2)]


def test_join_of_an_fd_end_and_a_handoff_keeps_every_byte_in_order(
        reactor: Any, backend: str, sockets: list[socket.socket]) -> None:  # noqa: F811
    """``labrelay connect``'s shape: its stdin/stdout (here a TCP pair's fd) and a data
    connection that read a preface.  What the connection read past its preface goes to
    the fd end first; what it had not sent yet goes to its peer first."""
    made: defer.Deferred[Any] = defer.Deferred()
    listener = reactor.listenTCP(0, protocol.Factory.forProtocol(
        lambda: Preface(b"challenge;", made)), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", listener.getHost().port))
    sockets.append(client)
    client.sendall(b"hello\nread-past-the-preface;")
    proto = wait(reactor, made)
    listener.stopListening()
    proto.transport.write(b"unsent;")  # still in Twisted's buffer: it must go first
    peer, ours = tcp_pair()
    sockets.append(peer)
    fd = ours.detach()
    dp = DataPath(reactor, Backend(backend, "test"))
    try:
        pair = join(dp, End(fd, fd), proto)
        user, remote = Peer(peer, b"to-the-client"), Peer(client, b"more")
        result = wait(reactor, pair.done)
        user.join()
        remote.join()
    finally:
        dp.close()
    assert bytes(user.received) == b"read-past-the-preface;more"
    # the challenge was sent by Twisted or was still unsent with "unsent;": first either way
    assert bytes(remote.received) == b"challenge;unsent;to-the-client"
    assert isinstance(result, PairResult)


@pytest.mark.parametrize("bad", [OSError(9, "bad file descriptor"), TypeError("no fd")])
def test_join_that_cannot_take_the_ends_raises_and_counts_nothing(bad: Exception) -> None:
    class Refusing(RecordingPath):
        def splice_transports(self, a: Any, b: Any, **kw: Any) -> FakePair:
            raise bad

    counters = SessionCounters()
    with pytest.raises(type(bad)):
        join(Refusing(), _held(b""), _held(b""), (counters,))  # type: ignore[arg-type]
    assert counters.as_dict()["sessions_total"] == 0
