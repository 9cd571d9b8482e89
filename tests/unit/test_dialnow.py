"""relay.datapath.dialnow: a new session's target connected in the reactor turn that
asked for it (set-up latency, docs/benchmarks.md "Set-up after an idle gap").

Real loopback sockets and a real (not installed) epoll reactor that the tests turn by
hand; the timeout path on a MemoryReactorClock."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relay.datapath import dialnow
from relay.datapath.dialnow import connect_target, dial_now


class Recorder(Protocol):
    def __init__(self) -> None:
        self.made = False
        self.data = b""

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    r = EPollReactor()
    yield r
    for selectable in r.getReaders() + r.getWriters():
        if selectable is not getattr(r, "waker", None):
            selectable.connectionLost(Failure(error.ConnectionDone()))  # type: ignore[attr-defined]
    for call in r.getDelayedCalls():
        call.cancel()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


def _result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def _turn_until(reactor: EPollReactor, done: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "nothing happened in time"
        reactor.iterate(0.01)


def test_connected_before_it_returns_and_read_by_the_reactor(
        reactor: EPollReactor, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    d = dial_now(reactor, socket.AF_INET, "127.0.0.1", port, Recorder, 5.0)
    proto = _result(d)  # fired already: no reactor turn between asking and connect()
    assert isinstance(proto, Recorder) and proto.made
    assert proto.transport.getPeer().port == port
    assert reactor.getDelayedCalls() == []  # no callLater(0), no timeout left behind
    sock = proto.transport.getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    server, _ = listener.accept()
    server.sendall(b"hello")
    _turn_until(reactor, lambda: proto.data == b"hello")
    proto.transport.write(b"back")
    _turn_until(reactor, lambda: proto.transport.dataBuffer == b"" and not proto.transport._tempDataBuffer)  # noqa: E501
    assert server.recv(16) == b"back"
    server.close()


def test_the_transport_names_the_dialled_peer_for_either_family(
        reactor: EPollReactor) -> None:
    # _adopt builds the transport on the dialled socket with the address it dialled
    # (no getpeername): the address type must still follow the family.
    for family, host, kind in ((socket.AF_INET, "127.0.0.1", IPv4Address),
                               (socket.AF_INET6, "::1", IPv6Address)):
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen(1)
            port = server.getsockname()[1]
            proto = _result(dial_now(reactor, family, host, port, Recorder, 5.0))
            peer = proto.transport.getPeer()
            assert isinstance(peer, kind) and (peer.host, peer.port) == (host, port)
            assert proto.transport.getHost().port not in (0, port)
            assert f"to {host}:{port}" in repr(proto.transport)
            accepted, _ = server.accept()
            proto.transport.loseConnection()
            _turn_until(reactor, lambda t=proto.transport: t.disconnected)
            assert accepted.recv(1) == b""  # it was the dialled connection that closed
            accepted.close()


def test_refused_fails_at_once(reactor: EPollReactor) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    failure = _result(dial_now(reactor, socket.AF_INET, "127.0.0.1", port, Recorder, 5.0))
    assert failure.check(error.ConnectionRefusedError)
    assert reactor.getWriters() == [] and reactor.getDelayedCalls() == []


class NotYet:
    """A poll that says the connect is still in progress (a distant target)."""

    def register(self, *args: Any) -> None:
        pass

    def poll(self, timeout: int) -> list[Any]:
        return []


def test_in_progress_waits_for_writability(
        reactor: EPollReactor, listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dialnow.select, "poll", NotYet)
    port = listener.getsockname()[1]
    d = dial_now(reactor, socket.AF_INET, "127.0.0.1", port, Recorder, 5.0)
    assert not d.called and len(reactor.getWriters()) == 1
    _turn_until(reactor, lambda: d.called)
    proto = _result(d)
    assert isinstance(proto, Recorder) and proto.made
    assert proto.transport.getPeer().port == port
    assert reactor.getDelayedCalls() == []  # the timeout was cancelled
    assert proto.transport not in reactor.getWriters()
    assert all(isinstance(w, type(proto.transport)) for w in reactor.getWriters())


def test_in_progress_times_out(listener: socket.socket,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dialnow.select, "poll", NotYet)
    clock = MemoryReactorClock()
    d = dial_now(clock, socket.AF_INET, "127.0.0.1", listener.getsockname()[1], Recorder, 2.0)
    assert not d.called and len(clock.getWriters()) == 1
    clock.advance(2.0)
    assert _result(d).check(error.TimeoutError)
    assert clock.getWriters() == []


def test_a_host_name_goes_through_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only IP addresses are dialled at once; a name needs resolving (the endpoint)."""
    dialled: list[str] = []
    monkeypatch.setattr(dialnow, "dial_now", lambda r, f, host, *a: dialled.append(host))
    clock = MemoryReactorClock()
    d = connect_target(clock, "localhost", 22, Recorder, 3.0)
    d.cancel()
    d.addErrback(lambda _: None)
    connect_target(clock, "127.0.0.1", 22, Recorder, 3.0)
    connect_target(clock, "::1", 22, Recorder, 3.0)
    assert dialled == ["127.0.0.1", "::1"]


def test_in_progress_refused_says_so(reactor: EPollReactor,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dialnow.select, "poll", NotYet)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = dial_now(reactor, socket.AF_INET, "127.0.0.1", port, Recorder, 5.0)
    _turn_until(reactor, lambda: d.called)
    assert _result(d).check(error.ConnectionRefusedError)
    assert reactor.getWriters() == [] and reactor.getDelayedCalls() == []


def test_a_target_spliced_at_once_is_a_bare_descriptor_the_reactor_never_saw(
        reactor: EPollReactor, listener: socket.socket) -> None:
    """connect_spliced (the agent's pooled route): a connection made inside connect()
    is an End, its fd non-blocking with TCP_NODELAY, never registered with the reactor
    (which would be undone in the same turn by the hand-off to the data path)."""
    from relay.datapath.pymover import End

    port = listener.getsockname()[1]
    readers = set(reactor.getReaders())
    end = _result(dialnow.connect_spliced(reactor, "127.0.0.1", port, Recorder, 5.0))
    assert isinstance(end, End) and end.rfd == end.wfd and not os.get_blocking(end.rfd)
    sock = socket.socket(fileno=end.rfd)
    try:
        assert sock.getpeername()[1] == port
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert set(reactor.getReaders()) == readers and reactor.getDelayedCalls() == []
        served, _ = listener.accept()
        sock.send(b"ping")
        assert served.recv(4) == b"ping"
        served.close()
    finally:
        sock.close()


def test_a_spliced_target_by_name_goes_through_the_endpoint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What connect_spliced cannot dial at once (a host name) goes through the reactor's
    endpoint, as from connect_target; an IP address is dialled now, unadopted."""
    called: list[tuple[str, Any]] = []
    monkeypatch.setattr(dialnow, "connect_endpoint",
                        lambda r, host, *a: called.append((host, None)))
    monkeypatch.setattr(dialnow, "dial_now",
                        lambda r, f, host, *a, **k: called.append((host, k.get("adopt"))))
    clock = MemoryReactorClock()
    dialnow.connect_spliced(clock, "localhost", 22, Recorder, 3.0)
    dialnow.connect_spliced(clock, "127.0.0.1", 22, Recorder, 3.0)
    assert called == [("localhost", None), ("127.0.0.1", False)]


@pytest.mark.parametrize("host", [
    "127.0.0.1", "10.0.0.5", "::1", "2001:db8::1", "::ffff:1.2.3.4", "fe80::1%eth0",
    "gpu-cluster", "localhost", "", "01.2.3.4", "1.2.3", "256.1.1.1", "0x7f.1.1.1",
    "1.2.3.4 ", "1.2.3.4%x", "[::1]",
])
def test_ip_family_reads_addresses_as_ipaddress_does(host: str) -> None:
    """The agent dials an IP address at once and resolves anything else: the family
    (one C call, not the ipaddress module's Python) must agree with ipaddress on
    what is an address."""
    import ipaddress

    from relay.datapath.net import ip_family

    try:
        version = ipaddress.ip_address(host).version
        expected = socket.AF_INET if version == 4 else socket.AF_INET6
    except ValueError:
        expected = None
    assert ip_family(host) == expected
