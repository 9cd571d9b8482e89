"""relay.transport.proxy.ConnectProxyEndpoint with Twisted's doubles: the request, the
tunnel handed to the caller's protocol with the bytes that came with the answer, a
refusal, and a proxy that says nothing within the timeout."""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.config.schema import ProxyURL
from relay.core.httpconnect import ProxyError
from relay.transport.proxy import ConnectProxyEndpoint


class TCPString(StringTransport):
    """A StringTransport that takes TCP options, as a TCP transport does."""

    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class Inner(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _dial() -> tuple[MemoryReactorClock, object, TCPString, list[object]]:
    reactor = MemoryReactorClock()
    endpoint = ConnectProxyEndpoint(reactor, ProxyURL("192.0.2.8", 3128, "u", "p"),
                                    "relay.example.org", 443, timeout=5)
    results: list[object] = []
    d = endpoint.connect(Factory.forProtocol(Inner))
    d.addBoth(results.append)
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("192.0.2.8", 3128)
    tunnel = factory.buildProtocol(None)
    wire = TCPString()
    tunnel.makeConnection(wire)
    return reactor, tunnel, wire, results


def test_the_tunnel_is_handed_over_with_its_first_bytes() -> None:
    reactor, tunnel, wire, results = _dial()
    assert wire.nodelay
    assert wire.value().startswith(b"CONNECT relay.example.org:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in wire.value()
    tunnel.dataReceived(b"HTTP/1.1 200 Connection established\r\n")
    assert results == []
    tunnel.dataReceived(b"\r\n\x16\x03\x03")
    (inner,) = results
    assert isinstance(inner, Inner) and inner.received == b"\x16\x03\x03"
    assert inner.transport is wire
    tunnel.dataReceived(b"more")
    assert inner.received == b"\x16\x03\x03more"
    reactor.advance(10)  # the timeout was cancelled with the answer
    assert not reactor.getDelayedCalls()


def test_a_refusal_fails_the_connect_with_the_status_line() -> None:
    _, tunnel, wire, results = _dial()
    tunnel.dataReceived(b"HTTP/1.1 403 Access violation\r\n\r\n")
    (failure,) = results
    with pytest.raises(ProxyError, match=r"HTTP/1\.1 403 Access violation"):
        failure.raiseException()  # type: ignore[attr-defined]
    assert wire.disconnected


def test_a_silent_proxy_times_out() -> None:
    reactor, _, wire, results = _dial()
    reactor.advance(5)
    (failure,) = results
    with pytest.raises(ProxyError, match=r"did not open the tunnel .* within 5s"):
        failure.raiseException()  # type: ignore[attr-defined]
    assert wire.disconnected
