"""The words of a failed route (relay.transport.explain) and ``Transport=auto``'s one
round, with Twisted's doubles; the real failures, through stock ssh, are in
tests/integration/test_user_failures.py."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from relay.config.schema import LinkConfig, ProxyURL, TransportConfig
from relay.core.httpconnect import ProxyError, parse_response
from relay.ssh.client import LinkSetupError, open_connection
from relay.ssh.single import SingleConnection
from relay.transport import explain
from relay.transport.dial import Dialer
from relay.transport.tlsclient import TLSVerifyError
from relay.user.connect import ConnectOptions, Connector


def test_auto_tries_each_route_once_and_says_each_failure_once() -> None:
    """Three routes refused: three connection attempts, and the error names each route
    once.  It was nine (the dialer went round every route for each of the three turns
    of open_connection's loop) and the error nested "every route failed" three deep."""
    reactor = MemoryReactorClock()
    cfg = LinkConfig(name="cloud", host="192.0.2.1", port=2222, transport=TransportConfig(
        mode="auto", proxy=ProxyURL("192.0.2.9", 3128)))
    d = defer.Deferred.fromCoroutine(open_connection(SingleConnection(cfg, reactor, [])))
    results: list[object] = []
    d.addBoth(results.append)
    failed = 0
    while not results and failed < 20:
        assert len(reactor.tcpClients) > failed, "open_connection stopped dialling"
        _, _, factory, _, _ = reactor.tcpClients[failed]
        factory.clientConnectionFailed(reactor.connectors[failed],
                                       Failure(neterror.ConnectionRefusedError()))
        failed += 1
    assert failed == 3, f"{failed} connection attempts for 3 routes"
    (result,) = results
    assert isinstance(result, Failure) and isinstance(result.value, LinkSetupError)
    text = str(result.value)
    assert text.count("every route failed") == 1, text
    assert text.startswith("every route failed: tcp 192.0.2.1:2222: connection refused: "
                           "nothing listens on port 2222 there; "), text
    assert "; tls 192.0.2.1:443: connection refused: nothing listens on port 443 there; " \
           "is the relay running, and is 443 its TLS port (-o TLSPort=" in text, text
    assert text.endswith("; tls 192.0.2.1:443 via proxy http://192.0.2.9:3128: cannot reach "
                         "the proxy http://192.0.2.9:3128: connection refused: nothing "
                         "listens on port 3128 there; is that your proxy's address and "
                         "port (-o Proxy=URL, proxy, https_proxy)?"), text


def _tls(reason: BaseException, seen: bool = False, proxy: object = None) -> str | None:
    return explain.tls_failure(reason, certificate_seen=seen, host="relay.example.org",
                               port=443, server_name="relay.example.org", proxy=proxy)


def test_a_tls_failure_is_said_as_one_with_the_option_to_fix() -> None:
    not_tls = SSL.Error([("SSL routines", "", "wrong version number")])
    assert _tls(not_tls) == ("that port does not speak TLS (OpenSSL: wrong version "
                             "number): is 443 its TLS port (-o TLSPort=, tls_port; 443 by "
                             "default)?")
    said = _tls(not_tls, proxy=ProxyURL("proxy.example", 3128))
    assert said is not None and said.startswith(
        "the proxy opened its tunnel to relay.example.org:443, but what answers there "
        "does not speak TLS"), said
    said = _tls(SSL.Error([("SSL routines", "", "tlsv1 unrecognized name")]))
    assert said == ("the TLS handshake failed (OpenSSL: tlsv1 unrecognized name): does the "
                    "relay serve the name 'relay.example.org' (-o TLSServerName=, "
                    "tls_server_name: a name in its certificate)?")
    lost = neterror.ConnectionLost()
    said = _tls(lost)
    assert said is not None and said.startswith(
        "the connection was closed during the TLS handshake, before any certificate"), said
    assert "refused at accept" not in said
    assert _tls(lost, seen=True) is None  # the handshake got through: SSH's question
    verify = TLSVerifyError("the relay's certificate has expired (...)")
    assert _tls(verify) == str(verify)
    assert _tls(ValueError("x")) is None


def test_a_connection_not_made_says_what_to_check() -> None:
    def said(e: BaseException, **kw: object) -> str:
        return explain.unreachable(e, host="relay.example.org", port=2222,  # type: ignore[arg-type]
                                   timeout=5, **{"tls": False, **kw})

    assert said(neterror.DNSLookupError("x")).startswith(
        "the name 'relay.example.org' does not resolve: check its spelling (HostName")
    assert said(neterror.TimeoutError()).startswith("no answer within 5s: a firewall")
    assert "-o Transport=tls" in said(neterror.TimeoutError())
    assert "-o Proxy=" in said(neterror.TimeoutError(), tls=True)
    assert said(neterror.ConnectionRefusedError(), to_proxy=True).endswith(
        "is that your proxy's address and port (-o Proxy=URL, proxy, https_proxy)?")
    assert said(ProxyError("the proxy refused the tunnel: HTTP/1.1 403 x")) == \
        "the proxy refused the tunnel: HTTP/1.1 403 x"
    assert explain.where("h", 443, True, ProxyURL("p", 3128)) == \
        "h:443 (TLS, through the proxy http://p:3128)"
    assert explain.where("h", 22, False, None) == "h:22"


# The troubleshooting table of docs/quickstart.md §8 against the words made here, fast;
# tests/integration/test_user_failures.py checks every row against real failures.
DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
_HOLES = {
    "{RELAY}": r"\S+:\d+(?: \(TLS(?:, through the proxy \S+)?\))?",
    "{PORT}": r"\d+", "{N}": r"\d+(?:\.\d+)?", "{NAME}": r"[^' ]+", "{HOST}": r"\S+",
    "{USER}": r"[^' ]+", "{SERVICE}": r"[\w.-]+:\d+", "{URL}": r"\S+", "{…}": r".+?",
    "…": r".*",
}


def _rows() -> list[re.Pattern[str]]:
    text = DOC.read_text()
    lines = text[text.index("<!-- user-failures:"):].splitlines()[3:]
    rows = []
    for line in itertools.takewhile(lambda x: x.startswith("| `"), lines):
        parts = re.split("(" + "|".join(map(re.escape, _HOLES)) + ")", line.split("`", 2)[1])
        rows.append(re.compile("".join(_HOLES.get(p, re.escape(p)) for p in parts)))
    return rows


def test_the_troubleshooting_table_has_a_row_for_each_line_of_a_route_not_reached() -> None:
    rows = _rows()
    assert len(rows) >= 25
    reactor = MemoryReactorClock()

    def said(e: BaseException, **transport: object) -> str:
        link = LinkConfig(name="cloud", host="relay.example.org", port=2222,
                          transport=TransportConfig(**transport))  # type: ignore[arg-type]
        connector = Connector(ConnectOptions(link, "gpu-cluster", 22), reactor, [])
        connector.dialer = Dialer(reactor, link)
        if isinstance(e, (SSL.Error, neterror.ConnectionLost)):  # as LinkTransport says
            e = LinkSetupError(_tls(e) or "")
        return connector._notReached(e)  # type: ignore[arg-type]

    proxy = ProxyURL("proxy.example", 3128)
    lines = [
        said(neterror.ConnectionRefusedError()),
        said(neterror.ConnectionRefusedError(), mode="tls"),
        said(neterror.TimeoutError()),
        said(neterror.DNSLookupError("x")),
        said(SSL.Error([("SSL routines", "", "wrong version number")]), mode="tls"),
        said(neterror.ConnectionLost(), mode="tls"),
    ]
    for e in (ProxyError("cannot reach the proxy http://proxy.example:3128: connection "
                         "refused: nothing listens on port 3128 there; is that your proxy's "
                         "address and port (-o Proxy=URL, proxy, https_proxy)?"),):
        lines.append(said(e, mode="tls", proxy=proxy))
    for status in (b"407 Proxy Authentication Required", b"403 Forbidden", b"502 Bad Gateway"):
        try:
            parse_response(b"HTTP/1.1 " + status + b"\r\n\r\n")
        except ProxyError as e:
            lines.append(said(ProxyError(f"{proxy}: {e}"), mode="tls", proxy=proxy))
    for line in lines:
        assert len([r for r in rows if r.fullmatch(line)]) == 1, line


def test_an_attempt_cancelled_as_the_agent_stops_is_not_a_routes_failure() -> None:
    """Stopping during the first attempt (a fatal local forward, Ctrl-C): ClientService
    cancels the connect, and the agent logged ``tcp 127.0.0.1:PORT failed:
    IPv4Address(type='TCP', …)`` after its ``stopping`` line (Twisted's text for a
    cancelled connect is the address's repr; round 20's audit).  Now nothing is logged
    for it, and where words are asked for they say what happened."""
    reactor = MemoryReactorClock()
    cfg = LinkConfig(name="cloud", host="192.0.2.1", port=2222)
    with capturedLogs() as events:
        d = Dialer(reactor, cfg).connect(Factory())
        d.addErrback(lambda f: f.trap(defer.CancelledError,
                                      neterror.ConnectingCancelledError))
        d.cancel()
    assert reactor.tcpClients, "no attempt was made"
    assert not [e for e in events if e.get("log_namespace", "").endswith("Dialer")
                and e.get("event") == "link_route_failed"], events
    address = neterror.ConnectingCancelledError(("192.0.2.1", 2222))
    assert explain.unreachable(address, host="192.0.2.1", port=2222, tls=False,
                               timeout=10) == explain.CANCELLED
    assert explain.short(defer.CancelledError(), 10) == explain.CANCELLED
