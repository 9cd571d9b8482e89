"""The TLS port's gate evicts as the SSH port's does (relay.core.admission): at the full
global cap a source holding fewer handshakes takes the place of the oldest handshake
of the source holding the most, which the port closes, counts and logs once per burst."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs

from relay.config.schema import RelayConfig, TLSListenConfig
from relay.core.admission import Admission
from relay.server.dataport import CAP_LOG_WINDOW
from relay.server.tlsport import TLSPort, _AdmittingTLSFactory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tlscerts import CA


def test_the_tls_gate_evicts_the_oldest_handshake_of_the_busiest_source(
        tmp_path: Path) -> None:
    cert = CA(tmp_path / "ca").issue("relay")
    reactor = MemoryReactorClock()
    admission = Admission(dataclasses.replace(RelayConfig(), per_source_max_unauthenticated=3),
                          reactor)
    port = TLSPort(TLSListenConfig(cert.cert, cert.key), ssh_factory=None, admission=admission,
                   max_unauthenticated=4, reactor=reactor)
    factory = _AdmittingTLSFactory(port)

    def dial(host: str) -> tuple[object, StringTransport]:
        addr = IPv4Address("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        assert proto is not None, host
        tcp = StringTransport(peerAddress=addr)
        proto.makeConnection(tcp)
        return proto, tcp

    held = [dial(h) for h in ("192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2")]
    with capturedLogs() as logs:
        _proto, tcp = dial("198.51.100.7")  # holds none; 192.0.2.1 holds the most (3)
        assert not tcp.disconnected
        assert held[0][1].disconnected and not held[1][1].disconnected  # its oldest
        dial("198.51.100.8")  # 1 < .1's 2: .1's next oldest
        assert held[1][1].disconnected and not held[2][1].disconnected
        # one each now: nobody evicts (with it, .2 would hold 2)
        assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 2)) is None
        reactor.advance(CAP_LOG_WINDOW)
    assert port.counters["evicted"] == 2 and port.gate.evicted == 2
    assert port.counters["refused_at_accept"] == 1
    lines = [e for e in logs if e.get("event") == "tls_evicted"]
    assert [e["count"] for e in lines] == [1, 1], lines
    assert lines[0]["source"] == "192.0.2.1/32" and lines[0]["peer"] == "198.51.100.7"
    assert lines[1]["source"] == "192.0.2.1/32" and lines[1]["peer"] == "198.51.100.8"


def test_one_handshake_per_source_the_silent_one_gives_way_not_the_begun_one(
        tmp_path: Path) -> None:
    """Four sources, one TCP connection each, fill the cap: nobody holds more, so the
    one stalled longest at the lowest stage gives way ([relay.crowding]).  The oldest
    has sent the first bytes of a ClientHello (a handshake begun): the next oldest,
    silent past ``silent``, goes, charged ``grace-exceeded``."""
    import ssl

    from relay.config.schema import CrowdingConfig

    cert = CA(tmp_path / "ca").issue("relay")
    reactor = MemoryReactorClock()
    admission = Admission(dataclasses.replace(
        RelayConfig(), crowding=CrowdingConfig(silent=1, handshake=5, auth=5)), reactor)
    port = TLSPort(TLSListenConfig(cert.cert, cert.key), ssh_factory=None, admission=admission,
                   max_unauthenticated=4, reactor=reactor)
    factory = _AdmittingTLSFactory(port)

    def dial(host: str) -> tuple[object, StringTransport]:
        addr = IPv4Address("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        assert proto is not None, host
        tcp = StringTransport(peerAddress=addr)
        proto.makeConnection(tcp)
        return proto, tcp

    held = [dial(f"192.0.2.{i}") for i in (1, 2, 3, 4)]
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="x")
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    held[0][0].dataReceived(outgoing.read()[:20])  # type: ignore[attr-defined]
    reactor.advance(1.5)
    with capturedLogs() as logs:
        _proto, tcp = dial("198.51.100.7")
    assert not tcp.disconnected
    assert held[1][1].disconnected and not held[0][1].disconnected
    assert port.gate.stalled["silent"] == 1
    assert admission.penalties.penalised["grace-exceeded"] == 1
    (line,) = [e for e in logs if e.get("event") == "tls_evicted"]
    assert line["source"] == "192.0.2.2/32" and "stalled at silent" in line["why"]
