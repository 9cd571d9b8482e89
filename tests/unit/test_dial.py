"""The transport seam without a network: the routes of each setting, the dialer's
order and memory, the config keys and -o options, and the certificate source's reload."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from tlscerts import CA, RELAY_NAME

from relay.config.errors import ConfigError
from relay.config.loader import parse_config
from relay.config.schema import LinkConfig, NodeConfig, ProxyURL, TransportConfig
from relay.transport.dial import Dialer, Route, routes
from relay.transport.tlsserver import CertificateError, CertificateSource

PROXY = ProxyURL("proxy", 3128)
USER = ('[[relay.user]]\nname = "a"\nkeys = ["ssh-ed25519 '
        'AAAAC3NzaC1lZDI1NTE5AAAAIJw3u6oWHBBcM7TlsVPq51/sDO2tWgpjEmV9CEcpjb44 a"]\n'
        'services = ["gpu-cluster:22"]\n')


def link(**transport: object) -> LinkConfig:
    return LinkConfig(name="cloud", host="relay.example.org", port=2222,
                      transport=TransportConfig(**transport))  # type: ignore[arg-type]


def test_routes_of_each_mode() -> None:
    assert routes(link()) == [Route(False, "relay.example.org", 2222)]
    assert routes(link(mode="tls")) == [Route(True, "relay.example.org", 443)]
    assert routes(link(mode="tls", proxy=PROXY, tls_port=8443)) == [
        Route(True, "relay.example.org", 8443, PROXY)]
    assert routes(link(mode="auto", proxy=PROXY)) == [
        Route(False, "relay.example.org", 2222), Route(True, "relay.example.org", 443),
        Route(True, "relay.example.org", 443, PROXY)]
    assert len(routes(link(mode="auto"))) == 2  # no proxy, no third step
    env = {"https_proxy": "http://p:8080", "no_proxy": "example.com"}
    assert routes(link(mode="tls", proxy_from_env=True), env)[0].proxy == ProxyURL("p", 8080)
    env["no_proxy"] = "example.org"
    assert routes(link(mode="tls", proxy_from_env=True), env)[0].proxy is None
    assert str(Route(True, "h", 443, PROXY)) == "tls h:443 via proxy http://proxy:3128"
    assert Route(False, "h", 22).direct and not Route(False, "h", 22, PROXY).direct


def test_dialer_moves_on_after_a_failure_and_starts_with_the_winner() -> None:
    d = Dialer(None, link(mode="auto", proxy=PROXY))
    tcp, tls, via = d.routes
    assert d.current == tcp
    d.failed(tcp, "no SSH banner")
    assert d.current == tls
    d.failed(tls, "blocked")
    assert d.current == via
    d.worked(via)
    assert d.current == via and d.winner == via
    d.failed(via, "proxy restarted")
    assert d.current == tcp  # wraps around: a network that changed may let SSH out again
    d.worked(tls)
    assert d.current == tls
    single = Dialer(None, link(mode="tls"))
    single.failed(single.current, "x")
    assert single.index == 0


def test_config_keys_and_errors(tmp_path: Path) -> None:
    cfg = parse_config(
        '[[link]]\nhost = "relay.example.org"\nuser = "lab"\ntransport = "tls"\n'
        'tls_port = 8443\ntls_server_name = "Relay.Example.Org"\ntls_ca_file = "ca.pem"\n'
        'proxy = "env"\n', "node.toml", base_dir=tmp_path)
    t = cfg.links[0].transport
    assert (t.mode, t.tls_port, t.server_name, t.ca_file, t.proxy_from_env) == (
        "tls", 8443, "relay.example.org", tmp_path / "ca.pem", True)
    with pytest.raises(ConfigError, match=r"node.toml: link\[0\].transport: unknown transport"):
        parse_config('[[link]]\nhost = "h"\nuser = "u"\ntransport = "ssl"\n', "node.toml")
    with pytest.raises(ConfigError, match="not both"):
        parse_config('[[link]]\nhost = "h"\nuser = "u"\ntls_ca_file = "a"\n'
                     'tls_pin = "sha256//YLh1dUR9y6Kja30RrAn7JKnbQG/uEtLMkBgFF2Fuihg="\n', "n")
    with pytest.raises(ConfigError, match=r"relay\.tls_key: tls_cert is set but tls_key is not"):
        parse_config('[relay]\ntls_cert = "c"\n' + USER, "n")
    with pytest.raises(ConfigError, match="tls_listen has no effect without tls_cert"):
        parse_config('[relay]\ntls_listen = "443"\n', "n")
    relay = parse_config('[relay]\ntls_cert = "c"\ntls_key = "k"\ntls_names = ["R.test"]\n'
                         + USER, "n", base_dir=tmp_path).relay
    assert relay is not None and relay.tls is not None
    assert relay.tls.listen.port == 443 and relay.tls.names == ("r.test",)


def test_command_line_options() -> None:
    from relay.user.connect import add_connect_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_connect_arguments(parser)
    ns = parser.parse_args(["-o", "Transport=auto", "-o", "TLSPort=8443", "-o",
                            "Proxy=http://u:p@proxy:8080", "-o", "TLSPin=" + "ab" * 32,
                            "alice@relay", "gpu-cluster"])
    t = options_from_args(ns).link.transport
    assert (t.mode, t.tls_port, t.proxy, t.pin) == ("auto", 8443,
                                                     ProxyURL("proxy", 8080, "u", "p"),
                                                     "cert:" + "ab" * 32)
    bad = parser.parse_args(["-o", "Transport=quic", "relay", "x"])
    with pytest.raises(ConfigError, match="-o Transport: unknown transport 'quic'"):
        options_from_args(bad)


def test_certificate_source_reloads_when_the_files_change(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    first, second = ca.issue("one"), ca.issue("two", (RELAY_NAME, "alt.test"))
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    source = CertificateSource(cert, key)
    assert source.names == [RELAY_NAME] and source.loads == 1
    assert source.reload() is False  # nothing changed: nothing read
    # Half-way through a renewal (new cert, old key): refused, the old pair kept.
    (tmp_path / "c.new").write_bytes(second.cert.read_bytes())
    (tmp_path / "c.new").replace(cert)
    assert source.reload() is False and source.loads == 1
    (tmp_path / "k.new").write_bytes(second.key.read_bytes())
    (tmp_path / "k.new").replace(key)
    assert source.reload() is True and source.loads == 2
    assert source.names == [RELAY_NAME, "alt.test"]
    conn = source.serverConnectionForTLS(object())  # checks the files again, unchanged
    assert conn is not None and source.loads == 2
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match="no PEM certificate"):
        CertificateSource(tmp_path / "bad.pem", key)
    with pytest.raises(CertificateError, match="not the key of the certificate"):
        CertificateSource(first.cert, second.key)


def test_a_missing_certificate_file_is_logged_once_not_per_handshake(tmp_path: Path) -> None:
    """The files are checked at every handshake, and anyone may start one: while the
    certificate is gone (a renewal that deletes before it writes, a path moved), the
    error was one line per handshake, at the pace of whoever connects.  Once until the
    file is back; the pair in use is kept throughout."""
    from twisted.logger import globalLogPublisher

    ca = CA(tmp_path / "ca")
    pair = ca.issue("one")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    source = CertificateSource(cert, key)
    seen: list[dict[str, object]] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("event") == "tls_cert_error":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        cert.unlink()
        for _ in range(500):
            assert source.serverConnectionForTLS(object()) is not None
        assert len(seen) == 1 and seen[0]["path"] == str(cert), seen
        cert.write_bytes(pair.cert.read_bytes())
        assert source.serverConnectionForTLS(object()) is not None
        cert.unlink()  # gone again: a new episode, one more line
        source.reload()
        source.reload()
        assert len(seen) == 2
    finally:
        globalLogPublisher.removeObserver(observe)
    assert source.loads >= 1 and source.fingerprint


def test_dialer_tries_every_route_in_order_then_says_what_each_did() -> None:
    """A connection failure moves on at once; when every route failed the error lists
    each with its reason (a MemoryReactor: nothing really dials)."""
    from twisted.internet.error import ConnectionRefusedError as Refused
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    reactor = MemoryReactorClock()
    cfg = LinkConfig(name="cloud", host="192.0.2.1", port=2222, transport=TransportConfig(
        mode="auto", proxy=ProxyURL("192.0.2.9", 3128)))
    dialer = Dialer(reactor, cfg)
    results: list[object] = []
    dialer.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    seen = []
    for n in range(3):
        host, port, factory, _, _ = reactor.tcpClients[n]
        seen.append((host, port))
        factory.clientConnectionFailed(reactor.connectors[n], Failure(Refused()))
    assert seen == [("192.0.2.1", 2222), ("192.0.2.1", 443), ("192.0.2.9", 3128)]
    (failure,) = results
    assert isinstance(failure, Failure)
    text = failure.getErrorMessage()
    assert text.startswith("every route failed: tcp 192.0.2.1:2222: ")
    assert "; tls 192.0.2.1:443: " in text
    assert "; tls 192.0.2.1:443 via proxy http://192.0.2.9:3128: cannot reach the proxy" in text


def test_a_reload_rereads_the_certificate_and_a_changed_tls_key_needs_a_restart(
        tmp_path: Path) -> None:
    """``labrelay reload``/SIGHUP (ops.parts.RelayPart) asks the relay to re-read its
    certificate files; changing a ``tls_*`` key is reported as needing a restart."""
    from relay.config import diff
    from relay.config.schema import HostPort, RelayConfig, TLSListenConfig
    from relay.ops.parts import RelayPart

    class Relay:
        core = None
        calls = 0

        def reloadCertificates(self) -> bool:
            self.calls += 1
            return True

    class Node:
        relay = Relay()

    tls = TLSListenConfig(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    old = NodeConfig(source="n", relay=RelayConfig(tls=tls))
    moved = RelayConfig(tls=TLSListenConfig(cert=tls.cert, key=tls.key,
                                            listen=HostPort("0.0.0.0", 8443)))
    (action,) = diff.diff_relay(old.relay, moved)
    assert isinstance(action, diff.NeedsRestart) and action.keypath == "relay.tls"
    node = Node()
    changes = RelayPart(node).apply(old, old)  # type: ignore[arg-type]
    assert node.relay.calls == 1 and changes == ["relay: TLS certificate reloaded"]
