"""The Twisted hand-off: a connection's socket taken away from Twisted for the data path.

:func:`detach_transport` takes a connected TCP transport's socket (and the bytes
Twisted had not sent yet) out of the reactor; :class:`Held` is the protocol of a
connection that waits, paused, to be handed over.
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


class Held(TwistedProtocol):
    """A connection waiting for the data path: nothing is read, nothing written."""

    transport: Any

    def __init__(self) -> None:
        self.received = b""
        self.lost = False
        self.onMade: Callable[[Held], object] | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        if self.onMade is not None:
            self.onMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data  # only before the pause took effect; bounded by one read

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True

