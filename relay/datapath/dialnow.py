"""Connect to an IP address in the same reactor turn (a new session's target).

Twisted's ``tcp.Client`` does not call ``connect()`` when asked: it schedules it with
``callLater(0)`` (``BaseClient._finishInit``), then registers for reading and writing
on ``EINPROGRESS`` and completes the connection a poll later, behind the endpoint's
Deferreds.  On the agent that put a reactor turn, two polls and four ``epoll_ctl``
calls between reading a session's ``CHANNEL_OPEN`` and its target's ``connect()``
(about 0.4 ms per new session after an idle gap: docs/benchmarks.md, "Set-up after an
idle gap").

:func:`dial_now` calls ``connect_ex`` at once.  A non-blocking connect to a host on
the same machine or LAN segment is usually done when the call returns (Linux answers
a loopback SYN inside it), which one ``poll`` with a zero timeout shows; the socket is
then made a Twisted TCP transport (as ``adoptStreamConnection`` would, without its
``dup`` and address look-ups: :func:`_adopt`) and the protocol is connected before
:func:`dial_now` returns, so a caller's callbacks run in the same turn.  Only a
connection still in progress waits for writability (and ``timeout``).  Host names are
not handled here: they need resolution, which the endpoints do.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.error import ConnectError, TimeoutError, getConnectError
from twisted.internet.interfaces import IDelayedCall, IWriteDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.datapath.net import client_endpoint, ip_family
from relay.datapath.pymover import End

Dial = Callable[[Any, str, int, Callable[[], Protocol], float], "defer.Deferred[Any]"]
"""The signature of :func:`connect_target` and :func:`connect_endpoint`."""


def connect_endpoint(reactor: Any, host: str, port: int, make: Callable[[], Protocol],
                     timeout: float) -> defer.Deferred[Any]:
    """A connection to ``host:port`` through Twisted's endpoint (``connect()`` a reactor
    turn later): for a reactor that has no sockets (tests' ``MemoryReactor``)."""
    factory = Factory.forProtocol(make)
    factory.noisy = False  # no "Starting/Stopping factory" events per session
    return client_endpoint(reactor, host, port, timeout).connect(factory)


def connect_target(reactor: Any, host: str, port: int, make: Callable[[], Protocol],
                   timeout: float) -> defer.Deferred[Any]:
    """A connection to ``host:port`` for a new session: :func:`dial_now` for an IP
    address, the endpoint (name resolution) for a host name."""
    family = ip_family(host)
    if family is None:
        return connect_endpoint(reactor, host, port, make, timeout)
    return dial_now(reactor, family, host, port, make, timeout)


def connect_spliced(reactor: Any, host: str, port: int, make: Callable[[], Protocol],
                    timeout: float) -> defer.Deferred[Any]:
    """:func:`connect_target` for a target the caller splices at once (the agent's
    pooled route, relay.agent.datapool): a connection made inside ``connect()`` comes as
    a bare :class:`~relay.datapath.pymover.End` (its descriptor, now the caller's), not
    adopted by the reactor.  Adopted, it cost a ``dup``, a ``getpeername``, the
    reactor's registration and the protocol's pause, all undone in the same turn by
    the hand-off to the data path (another ``dup``, ``epoll_ctl``, ``connectionLost``):
    about 0.1 ms between the agent's GO and its splice, which is on the way of the
    session's first reply.  A connection still in progress, or a host name, is the
    protocol ``make()`` made, as from :func:`connect_target`."""
    family = ip_family(host)
    if family is None:
        return connect_endpoint(reactor, host, port, make, timeout)
    return dial_now(reactor, family, host, port, make, timeout, adopt=False)


def dial_now(reactor: Any, family: int, host: str, port: int,
             make: Callable[[], Protocol], timeout: float,
             adopt: bool = True) -> defer.Deferred[Any]:
    """A TCP connection from here to the IP address ``host``: the protocol ``make()``
    made, connected.  The Deferred has fired when this returns if the connection was
    made (or refused) at once; otherwise it fires when it is, or fails after
    ``timeout`` seconds.  ``adopt=False``: a connection made at once is an
    :class:`~relay.datapath.pymover.End` instead (see :func:`connect_spliced`)."""
    try:
        # Out of descriptors (EMFILE, ENFILE) or buffers: this session's target cannot
        # be reached, said as a failed connect like any other (the channel is refused
        # with the reason, target_unreachable), not raised into the channel open.
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return defer.fail(getConnectError(e))
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
    except OSError as e:
        sock.close()
        return defer.fail(getConnectError(e))
    if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(0):
            waiting = _Connecting(reactor, sock, family, make, timeout)
            return waiting.done
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        return defer.fail(getConnectError((err, os.strerror(err))))
    if not adopt:
        fd = sock.detach()
        return defer.succeed(End(fd, fd))
    return _adopt(reactor, sock, family, make, (host, port))


def _adopt(reactor: Any, sock: socket.socket, family: int, make: Callable[[], Protocol],
           peer: tuple[str, int] | None = None) -> defer.Deferred[Any]:
    """The connected ``sock`` as a Twisted TCP transport of a new ``make()``; the
    transport owns ``sock`` from now on.

    ``reactor.adoptStreamConnection`` would do it for a descriptor it knows nothing
    about: duplicate it (``socket.fromfd``), ask the kernel for both addresses, and the
    caller would close the original.  For a socket dialled here that is a ``dup``, a
    ``getpeername``, a ``getsockname`` and a ``close`` in the agent's open turn, about
    40 µs of it after an idle gap (docs/benchmarks.md, round 11).  So the transport is
    built as ``adoptStreamConnection`` builds it (a ``tcp.Server`` with no port), on
    ``sock`` itself, its peer the address dialled (``peer``; asked of the kernel after
    a connect that was in progress, which also finds one already reset)."""
    if peer is None:
        try:
            peer = sock.getpeername()[:2]
        except OSError as e:  # the peer reset it already
            sock.close()
            return defer.fail(getConnectError(e))
    assert peer is not None
    # The transport's address type follows the tuple's length, as for an accepted one.
    client = (peer[0], peer[1], 0, 0) if family == socket.AF_INET6 else (peer[0], peer[1])
    protocol = make()
    # (no Port: as adoptStreamConnection passes None, which the stub does not allow)
    transport = tcp.Server(sock, protocol, client, None, peer[1], reactor)  # type: ignore[arg-type]
    transport.repstr = f"<{type(protocol).__name__} to {peer[0]}:{peer[1]}>"
    protocol.makeConnection(transport)
    return defer.succeed(protocol)


@implementer(IWriteDescriptor)
class _Connecting:
    """A connect still in progress: done when the socket turns writable."""

    def __init__(self, reactor: Any, sock: socket.socket, family: int,
                 make: Callable[[], Protocol], timeout: float) -> None:
        self.reactor = reactor
        self.sock = sock
        self.family = family
        self.make = make
        self.done: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self.stopped = False
        self.timer: IDelayedCall = reactor.callLater(timeout, self._timedOut)
        reactor.addWriter(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "dial_now"

    def doWrite(self) -> None:
        self._stop()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.sock.close()
            self.done.errback(getConnectError((err, os.strerror(err))))
            return
        _adopt(self.reactor, self.sock, self.family, self.make).chainDeferred(self.done)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw an error or hang-up on the socket: the connect failed
        (``SO_ERROR`` says why: refused, unreachable, ...)."""
        try:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            err = 0
        self._fail(getConnectError((err, os.strerror(err))) if err
                   else ConnectError(string=reason.getErrorMessage()))

    def _timedOut(self) -> None:
        self._fail(TimeoutError(string="connection timed out"))

    def _cancel(self, _: defer.Deferred[Any]) -> None:
        self._stop()
        self.sock.close()

    def _fail(self, why: BaseException) -> None:
        self._stop()
        self.sock.close()
        if not self.done.called:
            self.done.errback(why)

    def _stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.reactor.removeWriter(self)
        if self.timer.active():
            self.timer.cancel()
