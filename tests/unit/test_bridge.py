"""``Bridge`` and ``TCPSide`` over in-memory transports: ordering, backpressure, half-close.

The SSH side is a scripted ``relay.testing.FakeSide`` here; the real ``BridgedChannel``
over a ``FlowConnection`` is exercised in ``test_channels.py``.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.python.failure import Failure

from relay.datapath.bridge import SINK_FULL, Bridge, TCPSide
from relay.testing import FakeSide, FakeTCPTransport


class Ended:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, a_to_b: int, b_to_a: int) -> None:
        self.calls.append((a_to_b, b_to_a))


def connected_tcp(highWater: int | None = None) -> tuple[TCPSide, FakeTCPTransport]:
    side = TCPSide()
    transport = FakeTCPTransport(highWater)
    side.makeConnection(transport)
    return side, transport


def bridged(
    highWater: int | None = None,
) -> tuple[TCPSide, FakeTCPTransport, FakeSide, Bridge, Ended]:
    tcp, transport = connected_tcp(highWater)
    other = FakeSide()
    ended = Ended()
    bridge = Bridge(tcp, other, onClosed=ended)
    return tcp, transport, other, bridge, ended


# --- TCPSide before it has a peer ------------------------------------------


def test_tcp_side_provides_producer_and_half_close() -> None:
    assert IPushProducer.providedBy(TCPSide())
    assert IHalfCloseableProtocol.providedBy(TCPSide())


def test_tcp_is_paused_until_attached_then_resumed() -> None:
    """The portforward rule: nothing is read from the socket until the peer exists."""
    seen: list[TCPSide] = []
    tcp = TCPSide()
    tcp.onConnected = seen.append
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    assert transport.producerState == "paused"
    assert transport.producer is tcp and transport.streaming is True
    assert transport.noDelay is True
    assert seen == [tcp]
    other = FakeSide()
    Bridge(tcp, other)
    assert transport.producerState == "producing"


def test_read_ahead_keeps_one_read_paused_and_hands_it_on_at_attach() -> None:
    """A public port's user side reads once while the agent opens (set-up latency):
    that read is kept, nothing more is read, and attach delivers it first."""
    tcp, transport = connected_tcp()
    assert transport.producerState == "paused"
    tcp.readAhead()
    assert transport.producerState == "producing"
    tcp.dataReceived(b"GET / HTTP/1.1\r\n")
    assert transport.producerState == "paused"  # bounded: one read, then no more
    tcp.readAhead()
    assert transport.producerState == "paused"  # not again while a read is kept
    other = FakeSide()
    Bridge(tcp, other)
    assert other.written == [b"GET / HTTP/1.1\r\n"]
    assert transport.producerState == "producing"
    tcp.dataReceived(b"Host: x\r\n")
    assert other.written == [b"GET / HTTP/1.1\r\n", b"Host: x\r\n"]


def test_a_side_reading_ahead_from_the_start_is_never_paused_when_bridged_at_once() -> None:
    tcp = TCPSide.readingAhead()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    assert transport.producerState == "producing"
    other = FakeSide()
    Bridge(tcp, other)
    tcp.dataReceived(b"SSH-2.0-x\r\n")
    assert other.written == [b"SSH-2.0-x\r\n"] and transport.producerState == "producing"


def test_a_side_reading_ahead_from_the_start_keeps_one_read() -> None:
    tcp = TCPSide.readingAhead()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    tcp.dataReceived(b"banner")
    assert transport.producerState == "paused"
    other = FakeSide()
    Bridge(tcp, other)
    assert other.written == [b"banner"] and transport.producerState == "producing"


def test_read_ahead_asked_on_connect_spares_the_pause() -> None:
    """A public port whose agent is there asks for read-ahead as the connection is
    reported: the side is never paused (no pause and resume for the reactor)."""
    tcp = TCPSide()
    tcp.onConnected = lambda side: side.readAhead()
    transport = FakeTCPTransport()
    tcp.makeConnection(transport)
    assert transport.producerState == "producing"
    tcp.dataReceived(b"first")
    assert transport.producerState == "paused"
    other = FakeSide()
    Bridge(tcp, other)
    assert other.written == [b"first"] and transport.producerState == "producing"


def test_read_ahead_with_nothing_sent_then_attach_reads_on() -> None:
    tcp, transport = connected_tcp()
    tcp.readAhead()
    other = FakeSide()
    Bridge(tcp, other)
    assert other.written == [] and transport.producerState == "producing"
    tcp.dataReceived(b"x")
    assert other.written == [b"x"]


def test_tcp_eof_and_close_before_attach_are_delivered_on_attach() -> None:
    tcp, _transport = connected_tcp()
    tcp.readConnectionLost()
    tcp.connectionLost(Failure(ConnectionDone()))
    other = FakeSide()
    ended = Ended()
    Bridge(tcp, other, onClosed=ended)
    assert other.wroteEOF
    assert other.closeCalls == 1
    other.closed()
    assert ended.calls == [(0, 0)]


# --- data ------------------------------------------------------------------


def test_data_each_way_arrives_in_order_and_is_counted() -> None:
    tcp, transport, other, bridge, _ = bridged()
    chunks = [bytes([i]) * (i + 1) for i in range(50)]
    for i, chunk in enumerate(chunks):
        tcp.dataReceived(chunk)
        other.receive(chunk[::-1] + b"%d" % i)
    assert b"".join(other.written) == b"".join(chunks)
    expected_back = b"".join(c[::-1] + b"%d" % i for i, c in enumerate(chunks))
    assert transport.value() == expected_back
    assert bridge.bytesAtoB == sum(map(len, chunks))
    assert bridge.bytesBtoA == len(expected_back)
    # what a side delivered is reported back to it as handed on
    assert other.consumedBytes == len(expected_back)


def test_bridge_holds_no_bytes_itself() -> None:
    tcp, _transport, other, _bridge, _ = bridged()
    tcp.dataReceived(b"x" * 100_000)
    assert other.written == [b"x" * 100_000]


# --- backpressure ----------------------------------------------------------


def test_other_sink_full_pauses_tcp_reading_and_drained_resumes() -> None:
    _tcp, transport, other, _bridge, _ = bridged()
    other.full()
    assert transport.producerState == "paused"
    other.full()  # repeated reports are harmless
    other.drained()
    assert transport.producerState == "producing"


def test_tcp_write_buffer_full_pauses_the_other_side() -> None:
    _tcp, transport, other, _bridge, _ = bridged(highWater=1000)
    other.receive(b"a" * 600)
    assert other.pauses == set()
    other.receive(b"b" * 600)  # 1200 unsent > high-water: the transport pauses us
    assert other.pauses == {SINK_FULL}
    other.receive(b"c" * 10)  # still full; the bridge never refuses bytes
    assert transport.drain(500) == b"a" * 500
    assert other.pauses == {SINK_FULL}  # partly drained is still full
    transport.drain()
    assert other.pauses == set()
    assert transport.value() == b"a" * 600 + b"b" * 600 + b"c" * 10


def test_drained_without_full_does_not_resume_a_transport_paused_for_no_peer() -> None:
    """A stray 'drained' must not lift a pause it did not cause."""
    tcp, transport = connected_tcp()
    assert transport.producerState == "paused"
    tcp.resumeReading(SINK_FULL)
    assert transport.producerState == "paused"


def test_pause_reasons_stack() -> None:
    tcp, transport, _other, _bridge, _ = bridged()
    tcp.pauseReading("a")
    tcp.pauseReading("b")
    tcp.resumeReading("a")
    assert transport.producerState == "paused"
    tcp.resumeReading("b")
    assert transport.producerState == "producing"


# --- half-close and close --------------------------------------------------


def test_tcp_eof_is_passed_on_while_data_flows_back() -> None:
    tcp, transport, other, _bridge, ended = bridged()
    tcp.dataReceived(b"request")
    tcp.readConnectionLost()
    assert other.wroteEOF
    assert not transport.disconnecting and not transport.writeClosed
    other.receive(b"response part 1, ")
    other.receive(b"part 2")
    assert transport.value() == b"response part 1, part 2"
    assert ended.calls == []


def test_other_eof_half_closes_tcp_while_tcp_keeps_sending() -> None:
    tcp, transport, other, _bridge, _ended = bridged()
    other.receive(b"all of it")
    other.eof()
    assert transport.writeClosed
    assert not transport.disconnecting
    # a paused registered producer would keep Twisted from ever half-closing
    assert transport.producer is None
    tcp.dataReceived(b"still talking")
    assert other.written == [b"still talking"]


def test_both_eofs_close_and_report_counts_once() -> None:
    tcp, transport, other, _bridge, ended = bridged()
    tcp.dataReceived(b"12345")
    tcp.readConnectionLost()
    other.receive(b"abc")
    other.eof()
    assert transport.writeClosed
    tcp.writeConnectionLost()  # the FIN went out
    assert transport.disconnecting
    tcp.connectionLost(Failure(ConnectionDone()))
    assert other.closeCalls == 1
    assert ended.calls == []  # the other side has not finished closing
    other.closed()
    assert ended.calls == [(5, 3)]
    other.closed()
    tcp.connectionLost(Failure(ConnectionDone()))
    assert ended.calls == [(5, 3)]


def test_eof_after_reading_side_closed_first() -> None:
    """EOF in the other order: the peer's EOF first, then ours."""
    tcp, transport, other, _bridge, ended = bridged()
    other.eof()
    assert transport.writeClosed and not transport.disconnecting
    tcp.readConnectionLost()
    assert other.wroteEOF
    assert transport.disconnecting  # both directions done: close
    tcp.connectionLost(Failure(ConnectionDone()))
    other.closed()
    assert ended.calls == [(0, 0)]


def test_other_side_closing_closes_tcp() -> None:
    _tcp, transport, other, _bridge, ended = bridged()
    other.full()  # closing must work even with reading paused
    other.closed()
    assert transport.disconnecting
    assert transport.producer is None
    assert ended.calls == []
    _tcp.connectionLost(Failure(ConnectionDone()))
    assert ended.calls == [(0, 0)]


def test_tcp_reset_resets_the_other_side() -> None:
    tcp, _transport, other, _bridge, ended = bridged()
    tcp.dataReceived(b"partial")
    tcp.connectionLost(Failure(ConnectionLost()))
    assert (other.abortCalls, other.closeCalls) == (1, 0)
    other.receive(b"late bytes")  # dropped, not written to a dead transport
    other.closed()
    assert ended.calls == [(7, 10)]


def test_abort_drops_the_connection() -> None:
    tcp, transport, _other, _bridge, _ = bridged()
    tcp.abort()
    assert transport.disconnected


def test_on_closed_is_optional() -> None:
    tcp, _transport = connected_tcp()
    other = FakeSide()
    Bridge(tcp, other)
    tcp.connectionLost(Failure(ConnectionDone()))
    other.closed()
    assert other.closeCalls == 1


# --- which side began the end (the close events' ``ended``) ----------------------------


def test_ended_by_names_the_side_whose_eof_came_first() -> None:
    tcp, _transport, other, bridge, ended = bridged()
    assert bridge.endedBy("target", "relay") == "open"
    tcp.dataReceived(b"ping")
    tcp.readConnectionLost()  # the target's EOF, then the relay's
    other.eof()
    tcp.connectionLost(Failure(ConnectionDone()))
    other.closed()
    assert ended.calls == [(4, 0)]
    assert bridge.endedBy("target", "relay") == "target eof"

    tcp, _transport, other, bridge, _ended = bridged()
    other.eof()  # the relay's first
    tcp.readConnectionLost()
    assert bridge.endedBy("target", "relay") == "relay eof"


def test_ended_by_tells_a_close_from_a_reset() -> None:
    tcp, _transport, other, bridge, _ended = bridged()
    other.closed()  # the channel closed without an EOF: the TCP side is closed after it
    tcp.connectionLost(Failure(ConnectionDone()))
    assert bridge.endedBy("target", "relay") == "relay closed"

    tcp, _transport, other, bridge, ended = bridged()
    tcp.connectionLost(Failure(ConnectionLost()))
    other.closed()
    assert ended.calls == [(0, 0)]
    assert bridge.endedBy("target", "relay") == "target reset"
