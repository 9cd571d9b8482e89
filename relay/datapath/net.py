"""Small socket-level helpers shared by every place labrelay dials out."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

# Twisted listens with a backlog of 50: a burst of new sessions (64 at once, measured)
# lost connection attempts to SYN retries a second later.  sshd uses 128; the kernel
# caps this at net.core.somaxconn.
LISTEN_BACKLOG = 511


def ip_family(host: str) -> int | None:
    """``AF_INET`` or ``AF_INET6`` if ``host`` is an IP address (as
    :func:`ipaddress.ip_address` reads one), None for a host name.

    Asked on every new session the agent dials: ``inet_pton`` is one C call where
    ``ipaddress`` runs a dozen Python functions, on the agent's set-up turn after an
    idle gap (docs/benchmarks.md, round 12).  A scoped IPv6 address (``fe80::1%eth0``)
    is left to :mod:`ipaddress`, which ``inet_pton`` does not read."""
    if "%" in host:
        try:
            return socket.AF_INET if ipaddress.ip_address(host).version == 4 else socket.AF_INET6
        except ValueError:
            return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """An endpoint for ``host:port``; IP literals skip name resolution.

    ``HostnameEndpoint`` resolves even ``127.0.0.1`` through ``getaddrinfo`` on a
    thread, which costs a thread hop on every new forwarded session.
    """
    family = ip_family(host)
    if family is None:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if family == socket.AF_INET:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


WRITE_NOW_MAX = 8 * 1024
"""By default, writes up to this size go to the socket at once (:func:`write_now`);
larger ones are batched by the reactor as before.  ``TCPSide`` passes no limit."""


def write_now(transport: Any, chunks: Sequence[bytes], limit: int | None = WRITE_NOW_MAX,
              ) -> int:
    """Write ``chunks`` (in order) to ``transport``: straight to its socket when it is
    a plain TCP connection with nothing waiting in its buffer (and the bytes are at
    most ``limit``, if given), else through ``transport.writeSequence`` as usual.

    Twisted buffers every write until the next turn of the reactor, when ``epoll``
    says the socket is writable: two ``epoll_ctl`` calls, an ``epoll_wait`` and a
    reactor turn before the bytes leave, after whatever else this turn still does.  A
    new session's set-up crosses relay and agent about ten times that way (measured:
    docs/benchmarks.md, "Set-up after an idle gap"); a small packet (a channel open,
    its confirmation, a keystroke, its echo) sent at once saves that on each crossing.
    Nothing is reordered: the socket is written directly only when Twisted holds
    nothing for it, and what the kernel does not take now is buffered by Twisted
    behind it (and counts toward its producer's pause as any write does).

    The SSH transport keeps the default limit: its link has ``TCP_NOTSENT_LOWAT``
    (relay.ssh.connection), which the reactor's writable event honours and a direct
    send does not, so only small packets skip it.  A bridge's TCP side (no such limit)
    passes ``limit=None``: Twisted's own ``doWrite`` also hands the kernel all it
    takes, so a direct write of any size only saves the reactor turn (on the pooled
    ``-J`` route, one per read; docs/benchmarks.md).

    This reads private state of ``twisted.internet.tcp.Connection`` (``dataBuffer``,
    ``offset``, ``_tempDataBuffer``, ``_writeDisconnected``, ``_aborting``): Twisted
    is pinned to a range in pyproject.toml, and tests/unit/test_write_now.py runs it
    on real connections of the installed Twisted, so a release that changes them
    fails there, not in a user's session.

    Returns the bytes the kernel took at once (0 when all went to Twisted's buffer).
    """
    size = sum(len(c) for c in chunks)
    sent = 0
    if ((limit is None or size <= limit) and isinstance(transport, tcp.Connection)
            and not getattr(transport, "TLS", True) and transport.connected
            and not transport.disconnecting and not getattr(transport, "_aborting", False)
            and not transport._writeDisconnected and not transport._tempDataBuffer
            and len(transport.dataBuffer) <= transport.offset):
        try:
            sock = transport.socket
            sent = sock.send(chunks[0]) if len(chunks) == 1 else (
                sock.sendmsg(chunks) if hasattr(sock, "sendmsg") else sock.send(b"".join(chunks)))
        except OSError:
            sent = 0  # EAGAIN, or an error the reactor's own write will find
        if sent >= size:
            return sent
    if sent:
        transport.write((chunks[0] if len(chunks) == 1 else b"".join(chunks))[sent:])
    elif len(chunks) == 1:
        transport.write(chunks[0])
    else:
        transport.writeSequence(chunks)
    return sent


def unsent(transport: Any) -> int:
    """Bytes Twisted holds for ``transport`` that the kernel has not taken yet (0 for a
    transport that is not a plain TCP connection: nothing known to wait)."""
    if not isinstance(transport, tcp.Connection):
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class TurnBudget:
    """Direct writes for a producer's TCP connection that let no more bytes past the
    producer in a reactor turn than Twisted's own buffer would.

    The link's fair share (relay.ssh.connection.FlowConnection) rests on Twisted's
    pause: within one reactor turn, what its channels write goes to the buffer until
    the buffer holds more than ``bufferSize``; then the producer is paused, and what
    the channels write next waits in the scheduler, which orders it.  A direct write
    the kernel takes never reaches that buffer, so direct writes alone never pause the
    producer: while the kernel has room (the link's queue drained, a fresh link) every
    channel's bytes would leave in the order the sources produced them, and the user
    with the most streams would get ahead (round 5's ae04867 did that; reverted in
    649ab53; tests/unit/test_fairshare_wire.py).

    So a write goes straight to the socket (:func:`write_now`, no size limit) while the
    bytes sent that way in this reactor turn are under the connection's
    ``bufferSize``, as Twisted's buffer takes writes until it holds more than that; and
    once the direct bytes plus the buffered ones are over ``bufferSize`` the producer
    is paused, where Twisted would have paused it had they all been buffered.  If
    bytes wait in Twisted's buffer, the reactor's write event resumes the producer once
    they are sent, as always; if the kernel took everything, the next reactor turn does
    (the turn in which Twisted's ``doWrite`` would have emptied the buffer).  The count
    starts again at each turn.  On labrelay's reactor (relay.ops.leanepoll), which counts
    its turns, the first write of a new turn sees the count changed; on another, one
    ``callLater(0)`` per turn that wrote directly starts it again, which costs a timer
    and an extra pass of the reactor's loop after every such turn, on each new
    session's set-up turns too (docs/benchmarks.md, round 12).  The
    kernel itself keeps the link's ``TCP_NOTSENT_LOWAT`` on a direct write: Linux's
    ``send`` takes no new segment once the unsent bytes reach the mark (it returns what
    it took, or EAGAIN), the same ``send`` that ``doWrite`` makes when ``epoll`` says
    writable.

    What that saves: a bulk stream that the peer reads as fast as it comes (a user's
    ``ssh -L`` pull through the relay) is written in the turn that read it, without the
    two ``epoll_ctl`` calls, the ``epoll_wait`` and the reactor turn of a buffered write
    (docs/performance.md)."""

    def __init__(self, transport: tcp.Connection) -> None:
        self.transport = transport
        self.used = 0  # bytes written directly in this reactor turn
        self._turn: Any = None  # the pending callLater(0) that starts the next turn
        self._paused = False  # we paused the producer with nothing buffered
        # The reactor counts its turns (relay.ops.leanepoll.LeanEPollReactor.turns):
        # the turn ``used`` counts for.
        self._counted = isinstance(getattr(transport.reactor, "turns", None), int)
        self._seen = -1

    @staticmethod
    def usable(transport: Any) -> bool:
        """Whether ``transport`` is a plain TCP connection whose reactor can tell turns
        apart (anything else keeps :func:`write_now`'s default)."""
        return (isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", True)
                and hasattr(getattr(transport, "reactor", None), "callLater"))

    def write(self, chunks: Sequence[bytes]) -> None:
        t: Any = self.transport  # reads Twisted's buffer state, as write_now does
        if self._counted and t.reactor.turns != self._seen:
            self._seen = t.reactor.turns
            self.used = 0
        if self.used < t.bufferSize:
            sent = write_now(t, chunks, limit=None)
            if sent:
                self.used += sent
                if self._turn is None and not self._counted:
                    self._turn = t.reactor.callLater(0, self._nextTurn)
        elif len(chunks) == 1:
            t.write(chunks[0])
        else:
            t.writeSequence(chunks)
        if not self.used or t.producer is None or not t.streamingProducer or t.producerPaused:
            return
        buffered = len(t.dataBuffer) - t.offset + t._tempDataLen
        if self._paused or self.used + buffered <= t.bufferSize:
            return
        if buffered:
            t.producerPaused = True  # doWrite resumes it once the buffer is sent
        else:
            self._paused = True  # nothing for doWrite to send: the next turn resumes it
            if self._turn is None:
                self._turn = t.reactor.callLater(0, self._nextTurn)
        t.producer.pauseProducing()

    def _nextTurn(self) -> None:
        self._turn = None
        self.used = 0
        t: Any = self.transport
        if self._paused:
            self._paused = False
            if not t.producerPaused and t.producer is not None and t.connected:
                t.producer.resumeProducing()

    def stop(self) -> None:
        """The connection service stopped: no turn is pending any more."""
        if self._turn is not None and self._turn.active():
            self._turn.cancel()
        self._turn = None
        self._paused = False


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


TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def limit_unsent(tcp: Any, lowat: int) -> None:
    """Keep at most about ``lowat`` unsent bytes in the kernel's socket buffer too
    (``TCP_NOTSENT_LOWAT``): on a link slower than the machine, the kernel would
    otherwise queue megabytes in front of every scheduled packet (at 20 MB/s, 4 MB is
    200 ms before a keystroke's echo), and the order the scheduler chose would only
    apply behind them."""
    sock = getattr(tcp, "socket", None)
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, lowat)
    except OSError:
        pass  # not Linux/BSD: the kernel's buffer stays as it is
