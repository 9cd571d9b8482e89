"""Small socket-level helpers shared by every place labrelay dials out."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

# Twisted listens with a backlog of 50: a burst of new sessions (64 at once, measured)
# lost connection attempts to SYN retries a second later.  sshd uses 128; the kernel
# caps this at net.core.somaxconn.
LISTEN_BACKLOG = 511


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """An endpoint for ``host:port``; IP literals skip name resolution.

    ``HostnameEndpoint`` resolves even ``127.0.0.1`` through ``getaddrinfo`` on a
    thread, which costs a thread hop on every new forwarded session.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


def peer_ip(conn: Any) -> str | None:
    """The IP address an SSH connection's (``LinkConnection``) TCP transport is
    connected to, or None if it is not one.  The fast path dials the data port there:
    the address whose host key was checked, not a fresh resolution of the name.
    None too when the connection went through TLS or a proxy (its
    ``transport_route`` is not direct): the data port is not reachable that way."""
    route = getattr(getattr(conn, "link_transport", None), "transport_route", None)
    if route is not None and not getattr(route, "direct", True):
        return None
    try:
        host = str(conn.link_transport.tcp.getPeer().host)
        ipaddress.ip_address(host)
    except (AttributeError, ValueError):
        return None
    return host


def quickack(transport: Any) -> None:
    """Ask Linux to acknowledge at once rather than delay the ACK (up to 40 ms).

    A peer with Nagle on — OpenSSH's sshd never sets TCP_NODELAY on a non-interactive
    connection — holds its next small packet until our ACK arrives, so every new
    session through the link would otherwise pay a delayed-ACK timeout.  The flag is
    not sticky: it is re-armed after each read.
    """
    sock = getattr(transport, "socket", None)
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass


def probe_idle(transport: Any, idle: int = 30, interval: int = 10, count: int = 3) -> None:
    """TCP keepalives after ``idle`` seconds of silence, every ``interval``, ``count``
    unanswered: dead after idle + interval x count.

    For the fast path's idle data connections, which carry nothing until a user needs
    them: the probes keep NAT and firewall mappings alive (many drop idle TCP after a
    few minutes, silently) and find a dead one before a user is paired with it.
    """
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                            ("TCP_KEEPCNT", count)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass
