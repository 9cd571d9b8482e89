"""HTTP CONNECT (RFC 9110 §9.3.6) as bytes in, bytes out: the proxy's request and answer.

A link or ``labrelay connect`` behind a proxy that lets nothing out but HTTP(S)
asks the proxy to open a TCP tunnel to the relay's TLS port.  What is sent, how the
answer is read and what ``https_proxy``/``no_proxy`` mean are decided here, with no
socket: :mod:`relay.transport.proxy` feeds bytes in and acts on the outcome.

The answer is bounded (:data:`MAX_RESPONSE`): a proxy that sends an endless header
is an error, not a memory leak.  Bytes after the blank line belong to the tunnel
(a TLS server may speak as soon as it is connected) and are handed back.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from relay.config.errors import Bad
from relay.config.schema import ProxyURL
from relay.config.transport import proxy_url

MAX_RESPONSE = 16 * 1024
USER_AGENT = "labrelay"


class ProxyError(Exception):
    """The proxy refused or broke the tunnel; ``str()`` is what an operator reads."""


class ProxyURLError(ValueError):
    """A host that cannot go into a CONNECT request."""


def proxy_from_env(env: Mapping[str, str], target_host: str) -> ProxyURL | None:
    """The proxy ``https_proxy``/``HTTPS_PROXY`` names for ``target_host``, unless
    ``no_proxy``/``NO_PROXY`` exempts it (curl's reading: comma-separated suffixes,
    a leading dot optional, ``*`` for all, IP literals and CIDR networks)."""
    url = env.get("https_proxy") or env.get("HTTPS_PROXY")
    if not url:
        return None
    if bypasses(env.get("no_proxy") or env.get("NO_PROXY") or "", target_host):
        return None
    try:
        return proxy_url(url)
    except Bad as e:
        raise ProxyURLError(f"https_proxy: {e.problem} ({e.hint})") from None


def bypasses(no_proxy: str, host: str) -> bool:
    """Whether ``host`` is exempted by a ``no_proxy`` list."""
    host = host.lower().rstrip(".").strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".").split(":")[0]
        if host == entry or host.endswith("." + entry):
            return True
    return False


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_request(host: str, port: int, proxy: ProxyURL) -> bytes:
    """The CONNECT request for ``host:port`` (with Basic credentials if the URL has
    them).  Names are checked so nothing can inject a header."""
    if any(c in host for c in "\r\n \t/@") or not host:
        raise ProxyURLError(f"not a host name: {host!r}")
    target = _authority(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", f"User-Agent: {USER_AGENT}"]
    if proxy.user is not None:
        token = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass(frozen=True)
class Tunnel:
    """The proxy said yes: ``rest`` are tunnel bytes that arrived with its answer."""

    status: int
    rest: bytes


def parse_response(buf: bytes) -> Tunnel | None:
    """The proxy's answer to CONNECT, once complete: a :class:`Tunnel` for 2xx,
    :class:`ProxyError` (with the status line) for anything else; None while more
    bytes are needed."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_RESPONSE:
            raise ProxyError(f"the proxy's answer is longer than {MAX_RESPONSE} bytes "
                             "without ending its header")
        if not b"HTTP/".startswith(buf[:5]):
            raise ProxyError(f"the proxy did not answer in HTTP: {_show(buf)}")
        return None
    if end > MAX_RESPONSE:
        raise ProxyError(f"the proxy's answer header is longer than {MAX_RESPONSE} bytes")
    head, rest = buf[:end], buf[end + 4:]
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() \
            or len(parts[1]) != 3:
        raise ProxyError(f"the proxy did not answer in HTTP: {_show(status_line)}")
    status = int(parts[1])
    if 200 <= status < 300:
        return Tunnel(status, rest)
    hint = ""
    if status == 407:
        hint = (" (the proxy wants credentials: -o Proxy=http://user:pass@host:port, "
                "proxy = \"http://user:pass@host:port\" in a config file)")
    elif status in (403, 405):
        hint = " (the proxy does not allow CONNECT to this host and port)"
    elif status in (500, 502, 503, 504):  # tinyproxy: "500 Unable to connect"
        hint = (" (the proxy could not reach the relay at the port asked for: is the relay "
                "up, and is that its port?)")
    raise ProxyError(f"the proxy refused the tunnel: {_show(status_line)}{hint}")


def _show(data: bytes) -> str:
    """Peer bytes as printable text, truncated (they reach a message and a log)."""
    text = data[:200].decode("latin-1")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
