"""The admin endpoint's connection caps and deadline (relay.ops.admincap), with a
clock and string transports: a connection past a cap is closed at accept, one let in
is closed at its deadline however it trickles bytes, and its place is given back."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.ops.admincap import LIFETIME, MAX_CONNECTIONS, MAX_PER_SOURCE, AdminSlots, CappedFactory


class _Sink(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _connect(factory: CappedFactory, host: str) -> tuple[object, StringTransport]:
    addr = IPv4Address("TCP", host, 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    if proto is not None:
        proto.makeConnection(transport)
    return proto, transport


def _factory() -> tuple[CappedFactory, MemoryReactorClock]:
    clock = MemoryReactorClock()
    inner = ServerFactory.forProtocol(_Sink)
    return CappedFactory(inner, clock), clock


def test_one_source_gets_its_share_and_the_next_one_is_refused_at_accept() -> None:
    factory, _ = _factory()
    held = [_connect(factory, "192.0.2.7") for _ in range(MAX_PER_SOURCE)]
    assert all(p is not None for p, _ in held)
    assert _connect(factory, "192.0.2.7")[0] is None
    assert _connect(factory, "192.0.2.8")[0] is not None  # another source is not
    assert factory.slots.refused == 1


def test_the_total_is_capped_but_the_operators_loopback_still_gets_in() -> None:
    factory, _ = _factory()
    for i in range(MAX_CONNECTIONS):
        assert _connect(factory, f"198.51.100.{i}")[0] is not None
    assert _connect(factory, "198.51.100.200")[0] is None
    assert _connect(factory, "127.0.0.1")[0] is not None
    assert _connect(factory, "127.0.0.2")[0] is None  # only the operator's address


def test_trickled_bytes_do_not_extend_the_deadline_and_the_place_comes_back() -> None:
    factory, clock = _factory()
    held = [_connect(factory, "192.0.2.7") for _ in range(MAX_PER_SOURCE)]
    proto, transport = held[0]
    for _ in range(int(LIFETIME) - 1):
        clock.advance(1)
        proto.dataReceived(b"a")  # type: ignore[attr-defined]
        assert not transport.disconnecting
    clock.advance(1)
    assert all(t.disconnecting for _, t in held)  # aborted at the deadline
    for p, _ in held:
        p.connectionLost(None)  # type: ignore[attr-defined]
    assert factory.slots.open == 0 and factory.slots.by_source == {}
    assert _connect(factory, "192.0.2.7")[0] is not None
    fresh = factory.protocols
    for p in list(fresh):
        p.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_a_closed_connection_cancels_its_deadline() -> None:
    factory, clock = _factory()
    proto, _ = _connect(factory, "192.0.2.7")
    proto.connectionLost(None)  # type: ignore[attr-defined]
    assert not clock.getDelayedCalls()
    assert factory.slots.open == 0


def test_slots_alone() -> None:
    slots = AdminSlots(total=2, per_source=1)
    assert slots.take("a") is None
    assert "from a" in (slots.take("a") or "")
    assert slots.take("b") is None
    assert "at most 2" in (slots.take("c") or "")
    slots.give_back("a")
    assert slots.take("c") is None
