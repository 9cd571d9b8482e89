"""The Twisted hand-off: a connection's socket taken away from Twisted for the data path.

:func:`detach_transport` takes a connected TCP transport's socket (and the bytes
Twisted had not sent yet) out of the reactor; :class:`Handoff` is the protocol of a
connection that reads a preface (a challenge, a hello, a GO, an answer: the fast
path's, :mod:`relay.core.fastwire`) and then waits, paused, to be handed over, keeping
what it read past the preface; :class:`Held` is one with no preface.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure


def _inert(*args: Any, **kwargs: Any) -> None:
    """doRead/doWrite of a transport handed to the data path."""


def detach_transport(transport: Any) -> tuple[int, bytes]:
    """Take a connected Twisted TCP transport's socket away from Twisted.

    Returns ``(fd, unsent)``: a duplicate of the socket's fd (now ours, non-blocking)
    and the bytes Twisted had accepted for writing but not yet sent (they must go out
    before anything else).  The transport stops reading and writing at once and is
    closed *without* shutting the socket down; its protocol gets ``connectionLost``
    with :class:`~twisted.internet.error.ConnectionDone`.
    """
    fileno = getattr(transport, "fileno", None)
    if not callable(fileno) or not hasattr(transport, "socket") or not hasattr(
            transport, "connectionLost"):
        raise TypeError(f"{transport!r} is not a Twisted TCP transport with a file descriptor")
    if getattr(transport, "disconnected", False) or getattr(transport, "disconnecting", False):
        raise ConnectionError(errno.ENOTCONN, "the transport is already closing")
    unsent = bytes(transport.dataBuffer[transport.offset:]) + b"".join(
        transport._tempDataBuffer)
    fd = os.dup(fileno())
    os.set_blocking(fd, False)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.stopReading()
    transport.stopWriting()
    # The reactor may still dispatch an event it polled before the detach: a read that
    # detaches its own transport, on an event that also says "writable", is followed by
    # doWrite on a transport without a socket (an Unhandled Error seen under load).
    # Twisted's own abortConnection neuters both the same way.
    transport.doRead = _inert
    transport.doWrite = _inert
    # Twisted's orderly close would shutdown(2) the socket, which our dup shares.
    transport._shouldShutdown = False
    transport.connectionLost(Failure(ConnectionDone("handed to the data path")))
    return fd, unsent


class Handoff(TwistedProtocol):
    """A connection that reads a preface, then waits, paused, to be handed to the data
    path (:func:`relay.datapath.join.join`).

    A subclass starts its preface in :meth:`prefaceStarted` (write a challenge) and
    parses ``self.buf`` in :meth:`prefaceReceived` as bytes arrive; when the preface is
    done it calls :meth:`hold` with the bytes read past it.  Reading stops there: those
    bytes, and any read that raced the pause, are ``extra``, the stream's first bytes,
    which :func:`~relay.datapath.join.join` delivers before anything else.
    :meth:`resume` reads more preface (the relay's pooled connection, held after its
    hello, then waiting for its agent's answer).  The default preface is empty: the
    connection is held as soon as it is made (a plain hop's client and target)."""

    transport: Any

    def __init__(self) -> None:
        self.buf = b""  # preface bytes read and not yet parsed
        self.extra = b""  # bytes read past the preface: they belong to the stream
        self.held = False
        self.lost = False

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.prefaceStarted()

    def prefaceStarted(self) -> None:
        """The connection is up.  Default: no preface, hold it at once."""
        self.hold()

    def dataReceived(self, data: bytes) -> None:
        if self.held:
            self.extra += data  # a read that raced the pause: it belongs to the stream
            return
        self.buf += data
        self.prefaceReceived()

    def prefaceReceived(self) -> None:
        """``self.buf`` grew.  Default: no preface, all of it is the stream's."""
        self.hold(self.buf)

    def hold(self, rest: bytes = b"") -> None:
        """The preface is over: stop reading; ``rest`` was read past it."""
        self.held = True
        self.buf = b""
        self.extra += rest
        self.transport.pauseProducing()

    def resume(self) -> None:
        """Read again, more preface (after :meth:`hold`; ``extra`` is kept)."""
        self.held = False
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True


class Held(Handoff):
    """A connection with no preface, held from the start; ``onMade`` is told when it is
    up (a plain hop's accepted client)."""

    def __init__(self) -> None:
        super().__init__()
        self.onMade: Callable[[Held], object] | None = None

    def prefaceStarted(self) -> None:
        self.hold()
        if self.onMade is not None:
            self.onMade(self)
