"""relay.core.httpconnect (sans-IO): the CONNECT request, the proxy's answer, no_proxy;
and relay.config.transport's proxy URLs and pins."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config.errors import Bad
from relay.config.schema import ProxyURL
from relay.config.transport import pin, proxy_url
from relay.core.httpconnect import (
    MAX_RESPONSE,
    ProxyError,
    ProxyURLError,
    bypasses,
    connect_request,
    parse_response,
    proxy_from_env,
)


def test_request_has_host_and_basic_credentials() -> None:
    req = connect_request("relay.example.org", 443, ProxyURL("p", 3128, "lab", "pa:ss"))
    lines = req.decode().split("\r\n")
    assert lines[0] == "CONNECT relay.example.org:443 HTTP/1.1"
    assert "Host: relay.example.org:443" in lines
    token = base64.b64encode(b"lab:pa:ss").decode()
    assert f"Proxy-Authorization: Basic {token}" in lines
    assert req.endswith(b"\r\n\r\n")
    assert connect_request("::1", 443, ProxyURL("p", 1)).startswith(b"CONNECT [::1]:443 ")


@pytest.mark.parametrize("host", ["evil\r\nX-Injected: 1", "a b", "", "x/y", "u@h"])
def test_request_refuses_header_injection(host: str) -> None:
    with pytest.raises(ProxyURLError):
        connect_request(host, 443, ProxyURL("p", 1))


def test_response_2xx_keeps_the_tunnel_bytes() -> None:
    assert parse_response(b"HTTP/1.1 200 Conn") is None
    tunnel = parse_response(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n\x16\x03")
    assert tunnel is not None and tunnel.status == 200 and tunnel.rest == b"\x16\x03"
    assert parse_response(b"HTTP/1.0 200 OK\r\n\r\n") is not None


@pytest.mark.parametrize("answer,shown", [
    (b"HTTP/1.1 403 Access violation\r\n\r\n", "HTTP/1.1 403 Access violation"),
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
     "407 Proxy Authentication Required"),
    (b"HTTP/1.0 502 Bad Gateway\r\n\r\nbody", "HTTP/1.0 502 Bad Gateway"),
])
def test_refusals_show_the_status_line(answer: bytes, shown: str) -> None:
    with pytest.raises(ProxyError) as e:
        parse_response(answer)
    assert shown in str(e.value) and "refused the tunnel" in str(e.value)


def test_407_hints_at_credentials() -> None:
    with pytest.raises(ProxyError, match="user:pass"):
        parse_response(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH\r\n", b"\x16\x03\x01",
                                    b"HTTP/1.1 2x0 what\r\n\r\n", b"HTTP/9.9 200 OK\r\n\r\n"])
def test_not_http_is_an_error(answer: bytes) -> None:
    with pytest.raises(ProxyError, match="did not answer in HTTP"):
        parse_response(answer)


def test_an_endless_header_is_bounded() -> None:
    with pytest.raises(ProxyError, match="longer than"):
        parse_response(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_RESPONSE // 4))


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_proxyerror(data: bytes) -> None:
    try:
        parse_response(data)
    except ProxyError:
        pass


def test_no_proxy() -> None:
    assert bypasses("example.org,.lab.internal", "relay.example.org")
    assert bypasses("example.org", "example.org")
    assert not bypasses("example.org", "badexample.org")
    assert bypasses("lab.internal", "x.lab.internal")
    assert bypasses("10.0.0.0/8", "10.1.2.3")
    assert not bypasses("10.0.0.0/8", "192.0.2.1")
    assert bypasses("*", "anything")
    assert not bypasses("", "anything")
    env = {"https_proxy": "proxy.lab:8080", "no_proxy": "localhost"}
    assert proxy_from_env(env, "relay.example.org") == ProxyURL("proxy.lab", 8080)
    assert proxy_from_env(env, "localhost") is None
    assert proxy_from_env({}, "relay.example.org") is None
    assert proxy_from_env({"HTTPS_PROXY": "http://u:p@h:1"}, "r") == ProxyURL("h", 1, "u", "p")


def test_proxy_urls() -> None:
    assert proxy_url("http://u%40x:p%3Aw@proxy:8080") == ProxyURL("proxy", 8080, "u@x", "p:w")
    assert proxy_url("proxy") == ProxyURL("proxy", 3128)
    assert str(proxy_url("http://u:secret@h:1")) == "http://u:***@h:1"
    for bad in ("https://proxy:443", "socks5://h:1", "http://h:1/path", "http://:1",
                "http://h:99999"):
        with pytest.raises(Bad):
            proxy_url(bad)


@pytest.mark.parametrize("url", [
    "http://alice:hunter2@", "http://alice:hunter2/x@proxy:3128", "http://alice:hunter2#x@p:1",
    "http://alice:hunter2?x@p:1", "http://alice:hunter2@proxy:99999",
    "http://alice:hunter2@proxy:1/path", "http://alice:hun@ter2@ :1", "alice:hunter2@:1",
])
def test_a_refused_proxy_url_never_shows_its_credentials(url: str) -> None:
    """Round 19: the URL was quoted whole, or urllib's message quoted the piece of a
    password it took for the port."""
    with pytest.raises(Bad) as e:
        proxy_url(url)
    assert "hunter2" not in e.value.problem and "ter2" not in e.value.problem
    assert "***@" in e.value.problem
    with pytest.raises(ProxyURLError) as env:
        proxy_from_env({"https_proxy": url}, "relay.example.org")
    assert "ter2" not in str(env.value)


def test_pins() -> None:
    digest = bytes(range(32))
    b64 = base64.b64encode(digest).decode()
    assert pin(f"sha256//{b64}") == f"spki:{b64}"
    hexed = digest.hex()
    colons = ":".join(hexed[i:i + 2] for i in range(0, 64, 2)).upper()
    assert pin(colons) == f"cert:{hexed}"
    assert pin(f"sha256 Fingerprint={colons}") == f"cert:{hexed}"
    for bad in ("sha256//abc", "SHA256:" + b64, "00:11", "md5//x"):
        with pytest.raises(Bad):
            pin(bad)
