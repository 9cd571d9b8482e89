"""A ``TCPSide`` over Twisted's ``StandardIO`` (``labrelay connect``'s channel path: its
stdin and stdout bridged to an SSH channel) ends once both halves have ended.

Twisted's ``StandardIO`` never calls ``connectionLost`` when its two halves end one at a
time: stdin's EOF was read (``readConnectionLost``) and stdout was closed after the
bridge's ``writeEOF`` (``writeConnectionLost``).  Its ``loseConnection`` then has no half
left to close and does nothing.  The side therefore never reported itself closed, the
bridge never ended, and ``labrelay connect`` waited forever with every byte delivered:
the hang of ``test_fastpath::test_falls_back_to_a_channel_when_the_service_is_not_e2e``.
It needs the channel's EOF and its CLOSE to arrive in two reads, with stdout flushed and
closed between them.  Sending each small packet at once (``write_now``) made that
likely; the reactor's batching used to send both in one write.

Real pipes under ``StandardIO``'s own reader and writer; a ``MemoryReactor`` and
:func:`turn` play the reactor, so each read and write happens in the order the hang
needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from twisted.internet import stdio
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from relay.datapath.bridge import Bridge, TCPSide
from relay.testing import FakeSide


class Pipes:
    """stdin and stdout of a ``StandardIO`` as the process's parent holds them."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        os.set_blocking(self.stdout_r, False)

    def close(self) -> None:
        for fd in (self.stdin_r, self.stdin_w, self.stdout_r, self.stdout_w):
            try:
                os.close(fd)
            except OSError:
                pass  # closed by the test or by StandardIO

    def read_stdout(self) -> bytes | None:
        """What the process wrote to stdout (None: nothing yet)."""
        try:
            return os.read(self.stdout_r, 1 << 16)
        except BlockingIOError:
            return None


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    p = Pipes()
    try:
        yield p
    finally:
        p.close()


def turn(selectable: FileDescriptor, *, read: bool) -> None:
    """One reactor event for ``selectable``: what ``PosixReactorBase`` does with
    ``doRead``/``doWrite`` and the reason it returns."""
    why = selectable.doRead() if read else selectable.doWrite()
    if why:
        selectable.connectionLost(Failure(why))


class Stdio:
    def __init__(self, pipes: Pipes) -> None:
        self.reactor = MemoryReactor()
        self.side = TCPSide()
        self.transport = stdio.StandardIO(self.side, stdin=pipes.stdin_r,
                                          stdout=pipes.stdout_w, reactor=self.reactor)
        self.channel = FakeSide()
        self.ends: list[tuple[int, int]] = []
        Bridge(self.side, self.channel, onClosed=lambda a, b: self.ends.append((a, b)))
        self.reader = self.transport._reader
        self.writer = self.transport._writer


def test_stdin_eof_then_stdout_closed_then_the_channels_close_ends_the_bridge(
        pipes: Pipes) -> None:
    s = Stdio(pipes)
    os.write(pipes.stdin_w, b"up")
    os.close(pipes.stdin_w)
    turn(s.reader, read=True)
    assert s.channel.written == [b"up"]
    turn(s.reader, read=True)  # stdin's EOF
    assert s.channel.wroteEOF

    s.channel.receive(b"down")
    s.channel.eof()  # the channel's EOF, alone in its read
    turn(s.writer, read=False)  # stdout flushed; its half ends (writeConnectionLost)
    assert pipes.read_stdout() == b"down"
    assert s.transport._writer is None

    s.channel.closed()  # the channel's CLOSE, in a later read
    assert s.ends == [(2, 4)]
    assert s.transport.disconnected


def test_stdout_closed_first_then_stdin_eof_ends_the_bridge(pipes: Pipes) -> None:
    """The other order: the service finished first, the user's input ends later."""
    s = Stdio(pipes)
    s.channel.receive(b"down")
    s.channel.eof()
    turn(s.writer, read=False)
    assert pipes.read_stdout() == b"down"
    assert s.ends == []

    os.close(pipes.stdin_w)
    turn(s.reader, read=True)  # stdin's EOF: both halves are gone now
    assert s.channel.wroteEOF
    s.channel.closed()
    assert s.ends == [(0, 4)]


def test_the_channels_eof_and_close_in_one_read_end_the_bridge_as_before(
        pipes: Pipes) -> None:
    """The order the reactor's batching gave: CLOSE processed before stdout's writer
    ran, so ``loseConnection`` still had the writer to close."""
    s = Stdio(pipes)
    os.close(pipes.stdin_w)
    turn(s.reader, read=True)
    s.channel.receive(b"down")
    s.channel.eof()
    s.channel.closed()
    assert s.ends == []  # stdout still holds b"down"
    turn(s.writer, read=False)
    assert pipes.read_stdout() == b"down"
    assert s.ends == [(0, 4)]
