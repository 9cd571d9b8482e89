"""Why a route to the relay failed, in words that say what is wrong, where, and the fix.

Twisted's own texts ("Connection was refused by other side: 111: Connection refused.",
"User timeout caused connection failure.", "[('SSL routines', '', 'wrong version
number')]") are right but say neither *which* port (over TLS the relay's TLS port, not
its SSH port; through a proxy the proxy's tunnel) nor what to change.  Whoever reads
them is the person who can fix it: the user at ``labrelay connect``'s stderr (her
terminal, through ssh), the lab's admin in the agent's log.  So each failure becomes
one line: the cause, then what to check, naming both the ``-o`` option of the command
line and the config file's key where they differ (``-o TLSPort=``, ``tls_port``).

Pure: exceptions and a :class:`~relay.transport.dial.Route` in, text out (the tests feed
it the real failures of real sockets: tests/integration/test_user_failures.py).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as neterror

from relay.core.httpconnect import ProxyError
from relay.transport.tlsclient import TLSVerifyError

_CANCELLED = (defer.CancelledError, neterror.ConnectingCancelledError)
CANCELLED = "cancelled: the process is stopping"
"""An attempt given up by its own side: Twisted's text for it is the address's repr."""


def where(host: str, port: int, tls: bool, proxy: Any) -> str:
    """``host:port``, and how it is reached when that is not plain SSH: ``(TLS)``,
    ``(TLS through the proxy http://...)``."""
    via = f"through the proxy {proxy}" if proxy is not None else ""
    how = "TLS" if tls else ""
    label = ", ".join(x for x in (how, via) if x)
    return f"{host}:{port}" + (f" ({label})" if label else "")


def port_hint(tls: bool) -> str:
    """Which setting names the port a route dials."""
    if tls:
        return "its TLS port (-o TLSPort=, tls_port; 443 by default)"
    return "its SSH port (-p, Port, port)"


def unreachable(reason: BaseException, *, host: str, port: int, tls: bool, timeout: float,
                to_proxy: bool = False) -> str:
    """Why a TCP connection to ``host:port`` (the relay's SSH or TLS port, or with
    ``to_proxy`` the HTTP proxy on the way) was not made."""
    if isinstance(reason, ProxyError):
        return str(reason)  # the proxy's status line and its hint (relay.core.httpconnect)
    if isinstance(reason, _CANCELLED):
        return CANCELLED
    what = ("is that your proxy's address and port (-o Proxy=URL, proxy, https_proxy)?"
            if to_proxy else f"is the relay running, and is {port} {port_hint(tls)}?")
    if isinstance(reason, neterror.DNSLookupError):
        where_set = ("-o Proxy=URL, proxy, https_proxy" if to_proxy
                     else "HostName in ~/.ssh/config, or the command line")
        return (f"the name {host!r} does not resolve: check its spelling ({where_set}) "
                "and that this network's DNS works")
    if isinstance(reason, neterror.ConnectionRefusedError):
        return f"connection refused: nothing listens on port {port} there; {what}"
    if isinstance(reason, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        if to_proxy:
            return (f"no answer within {timeout:g}s: a firewall drops the connection, or "
                    f"the proxy is down; {what}")
        other = ("the relay's TLS port through your network's HTTP proxy (-o Proxy=URL "
                 "or -o Proxy=env)" if tls else "SSH inside TLS on port 443 "
                 "(-o Transport=tls or auto)")
        return (f"no answer within {timeout:g}s: a firewall drops the connection, or the "
                f"host is down; if this network lets only some ports out, try {other} "
                "(docs/networks.md)")
    return str(reason)


def short(reason: BaseException, timeout: float) -> str:
    """A few words for a connection not made, where the caller says the rest."""
    if isinstance(reason, _CANCELLED):
        return CANCELLED
    if isinstance(reason, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        return f"no answer within {timeout:g}s"
    return str(reason)


_NOT_TLS = ("wrong version number", "packet length too long", "unknown protocol",
            "http request", "record layer failure")
"""OpenSSL's words when the bytes that came back are not TLS at all (an SSH server's
version line, a web server's plain HTTP, a proxy's own page)."""


def openssl_reasons(e: BaseException) -> str:
    """The reason strings of an ``OpenSSL.SSL.Error`` (``[('SSL routines', '', 'wrong
    version number')]`` -> ``wrong version number``)."""
    found: list[str] = []
    for arg in getattr(e, "args", ()):
        if isinstance(arg, list):
            found += [str(t[-1]) for t in arg if isinstance(t, tuple) and t and t[-1]]
    return "; ".join(found) or str(e)


def tls_failure(reason: BaseException, *, certificate_seen: bool, host: str, port: int,
                server_name: str, proxy: Any) -> str | None:
    """Why the TLS handshake of a route failed, or None when ``reason`` is not a TLS
    failure (the handshake was done: the SSH layer's question).  The "refused at
    accept" hint of a plain SSH port is wrong here: the usual causes are the port (not
    TLS, or not the relay's), the name asked for, or the certificate."""
    name = (f"does the relay serve the name {server_name!r} (-o TLSServerName=, "
            "tls_server_name: a name in its certificate)")
    if isinstance(reason, TLSVerifyError):
        return str(reason)  # which check failed, and its fix (relay.transport.tlsclient)
    if isinstance(reason, SSL.Error):
        said = openssl_reasons(reason)
        if any(word in said.lower() for word in _NOT_TLS):
            if proxy is not None:
                return (f"the proxy opened its tunnel to {host}:{port}, but what answers "
                        f"there does not speak TLS (OpenSSL: {said}): is {port} "
                        f"{port_hint(True)}?")
            return (f"that port does not speak TLS (OpenSSL: {said}): is {port} "
                    f"{port_hint(True)}?")
        return f"the TLS handshake failed (OpenSSL: {said}): {name}?"
    if certificate_seen:
        return None
    if isinstance(reason, (neterror.ConnectionLost, neterror.ConnectionDone)):
        ended = "the proxy's tunnel was closed" if proxy is not None else \
            "the connection was closed"
        return (f"{ended} during the TLS handshake, before any certificate: {name}? "
                "A labrelay relay also closes at once a connection from an address it "
                "refuses for now (failed logins, its per-source caps: its log says which, "
                "tls_refused or relay_source_penalised)")
    return None
