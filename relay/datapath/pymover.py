"""The ``python`` backend's mover: one direction's bytes, in Python.

:class:`PyDirection` is the twin of ``lr_move`` (csrc/mover.c): ``os.splice``
through a pipe from :class:`PyPipePool` (the twin of csrc/pool.c), ``os.read`` /
``os.write`` through a buffer where splice is refused, with the same results
(``MOVED``/``WAIT_IN``/``WAIT_OUT``/``DONE``) and the same care for EAGAIN, EINTR,
partial writes and bytes held in a pipe.  :class:`relay.datapath.pumps.ReactorPump`
drives it from the reactor.  Also here: the fd helpers the pumps and the facade share.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
from typing import NamedTuple, Protocol

from relay.datapath import _splice
from relay.datapath._splice import DONE, MOVED, WAIT_IN, WAIT_OUT, MoveError

COPY_BUF_SIZE = 65536
DEFAULT_PIPE_SIZE = 1024 * 1024  # docs/datapath.md: a third of the syscalls of 256 KiB
DEFAULT_BUDGET = 1 << 20


# --- endpoints ------------------------------------------------------------------


class End(NamedTuple):
    """One end of a pair as file descriptors: read ``rfd``, write ``wfd`` (the same
    fd for a socket; stdin/stdout for ``labrelay connect``)."""

    rfd: int
    wfd: int


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)




class Mover(Protocol):
    """One direction, as the reactor pump drives it: ``_splice.Direction`` or
    :class:`PyDirection` (the same contract as ``lr_move``)."""

    def prefix(self, data: bytes) -> None: ...
    def move(self, budget: int = ...) -> tuple[int, int]: ...
    @property
    def held(self) -> int: ...
    @property
    def moved(self) -> int: ...
    @property
    def flags(self) -> int: ...
    def release(self) -> None: ...


class PyPipePool:
    """A capped pool of empty pipes (the Python twin of ``struct lr_pool``)."""

    def __init__(self, max_total: int = 1024, max_idle: int = 64,
                 pipe_size: int = DEFAULT_PIPE_SIZE) -> None:
        self.max_total = max_total
        self.max_idle = min(max_idle, max_total)
        self.requested = pipe_size
        self.pipe_size = 0
        self.total = 0
        self._idle: list[tuple[int, int]] = []

    @property
    def idle(self) -> int:
        return len(self._idle)

    def get(self) -> tuple[int, int] | None:
        if self._idle:
            return self._idle.pop()
        if self.total >= self.max_total:
            return None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.requested:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.requested)
            except OSError:
                pass  # over pipe-max-size or the user's quota: keep the default
        self.pipe_size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        self.total += 1
        return r, w

    def put(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._idle) < self.max_idle:
            self._idle.append(pipe)
            return
        os.close(pipe[0])
        os.close(pipe[1])
        self.total -= 1

    def close(self) -> None:
        for r, w in self._idle:
            os.close(r)
            os.close(w)
        self.total -= len(self._idle)
        self._idle.clear()


_REFUSED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)


class LoopDirection:
    """The loop of ``lr_move`` (csrc/mover.c), written once for the Python movers.

    Deliver what is held, then read until would-block, EOF or the budget; EOF after
    everything was delivered shuts the output down.  A subclass says how bytes are held
    and moved: :meth:`_deliver` writes some of what is held, :meth:`_fill` reads into an
    empty holder, :meth:`_refused_out` may switch to a fallback when a write is refused,
    and :meth:`_after_move` gives back what a move borrowed.  :class:`PyDirection` (pipe
    or buffer, the ``python`` backend) and
    :class:`~relay.datapath.copyloop.CopyDirection` (one fixed buffer, the ``portable``
    backend) are the two, so both backends end, wait and count alike.
    """

    def __init__(self, in_fd: int, out_fd: int, flags: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._flags = flags
        self._moved = 0
        self.syscalls = 0

    @property
    def flags(self) -> int:
        return self._flags

    @property
    def held(self) -> int:
        raise NotImplementedError

    @property
    def moved(self) -> int:
        return self._moved

    def _deliver(self) -> int:
        """Write some of what is held; the bytes written."""
        raise NotImplementedError

    def _fill(self, want: int) -> tuple[int, int]:
        """Read into the empty holder: ``(bytes read, most it could have read)``."""
        raise NotImplementedError

    def _refused_out(self, error: OSError) -> bool:
        """A write failed with ``error``: True if a fallback was taken and it may be retried."""
        return False

    def _after_move(self) -> None:
        """Give back what this move borrowed (a pipe, for :class:`PyDirection`)."""

    def _shut_out(self) -> None:
        if self._flags & _splice.DIR_OUT_SOCKET:
            try:
                _shutdown_write(self.out_fd)
            except OSError:
                pass
        elif self._flags & _splice.DIR_OUT_CLOSE and self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1

    def _send_file(self, want: int) -> int | None:
        """One ``sendfile`` from a regular file: the bytes sent (0 at EOF), None if it
        must wait for the output, -1 if it was refused (reading takes over next turn)."""
        try:
            self.syscalls += 1
            return os.sendfile(self.out_fd, self.in_fd, None, want)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in _REFUSED:
                self._flags = (self._flags & ~_splice.DIR_IN_FILE) | _splice.DIR_FELL_BACK
                return -1
            raise MoveError(e.errno or errno.EIO,
                            "in" if e.errno == errno.EIO else "out") from None

    def move(self, budget: int = 1 << 62) -> tuple[int, int]:
        """Write what is held, then read and write until would-block, EOF or
        ``budget`` bytes: ``(result, bytes moved by this call)``."""
        moved = 0
        short = False
        try:
            if self._flags & _splice.DIR_DONE:
                return DONE, 0
            while True:
                while self.held:
                    try:
                        n = self._deliver()
                    except BlockingIOError:
                        return WAIT_OUT, moved
                    except OSError as e:
                        if self._refused_out(e):
                            continue
                        raise MoveError(e.errno or errno.EIO, "out") from None
                    if n <= 0:
                        raise MoveError(errno.EIO, "out")
                    moved += n
                    self._moved += n
                if self._flags & _splice.DIR_EOF:
                    self._shut_out()
                    self._flags |= _splice.DIR_DONE
                    return DONE, moved
                if moved >= budget:
                    return MOVED, moved
                if short:
                    # The last read was short: the input is drained; wait rather than
                    # pay a read that would only say EAGAIN.
                    return WAIT_IN, moved
                want = min(budget - moved, 1 << 30)
                if self._flags & _splice.DIR_IN_FILE:
                    sent = self._send_file(want)
                    if sent is None:
                        return WAIT_OUT, moved
                    if sent == 0:
                        self._flags |= _splice.DIR_EOF
                    if sent > 0:
                        moved += sent
                        self._moved += sent
                    continue
                try:
                    n, cap = self._fill(want)
                except BlockingIOError:
                    return WAIT_IN, moved
                except OSError as e:
                    raise MoveError(e.errno or errno.EIO, "in") from None
                if n == 0:
                    self._flags |= _splice.DIR_EOF
                elif self._flags & _splice.DIR_SHORT_WAITS and n < cap:
                    short = True
        finally:
            self._after_move()


class PyDirection(LoopDirection):
    """``lr_move`` in Python: deliver what is held, then read into the empty pipe
    (``os.splice``) or buffer (``os.read``), until would-block, EOF or the budget."""

    def __init__(self, pool: PyPipePool, in_fd: int, out_fd: int, *, out_socket: bool = True,
                 close_out: bool = False, in_file: bool = False, copy: bool = False,
                 short_waits: bool = False) -> None:
        super().__init__(in_fd, out_fd, (
            (_splice.DIR_OUT_SOCKET if out_socket else 0)
            | (_splice.DIR_OUT_CLOSE if close_out else 0)
            | (_splice.DIR_IN_FILE if in_file else 0)
            | (_splice.DIR_COPY if copy or not hasattr(os, "splice") else 0)
            | (_splice.DIR_SHORT_WAITS if short_waits else 0)
        ))
        self.pool = pool
        self._pipe: tuple[int, int] | None = None
        self._pipe_held = 0
        self._buf = b""

    @property
    def held(self) -> int:
        return self._pipe_held + len(self._buf)

    @property
    def holds_pipe(self) -> bool:
        return self._pipe is not None

    def prefix(self, data: bytes) -> None:
        if self._pipe_held:
            raise OSError(errno.EBUSY, "the prefix must come before anything spliced")
        self._buf += data

    def _write(self, data: bytes) -> int:
        self.syscalls += 1
        return os.write(self.out_fd, data)  # EPIPE, not SIGPIPE: Python ignores the signal

    def _deliver(self) -> int:
        if self._buf:
            n = self._write(self._buf)
            self._buf = self._buf[n:]
            return n
        assert self._pipe is not None
        if self._flags & _splice.DIR_COPY:
            self.syscalls += 1
            data = os.read(self._pipe[0], min(self._pipe_held, COPY_BUF_SIZE))
            if not data:
                raise OSError(errno.EIO, "the pipe lost its bytes")
            self._pipe_held -= len(data)
            self._buf = data
            return self._deliver()
        self.syscalls += 1
        n = os.splice(self._pipe[0], self.out_fd, self._pipe_held, flags=_SPLICE_FLAGS)
        self._pipe_held -= n
        return n

    def _fill(self, want: int) -> tuple[int, int]:
        """Read into the empty pipe/buffer: ``(bytes read, most it could have read)``."""
        if not self._flags & _splice.DIR_COPY:
            pipe = self._pipe if self._pipe is not None else self.pool.get()
            if pipe is not None:
                self._pipe = pipe
                self.syscalls += 1
                try:
                    n = os.splice(self.in_fd, pipe[1], want, flags=_SPLICE_FLAGS)
                except OSError as e:
                    if e.errno not in _REFUSED:
                        raise
                    self._flags |= _splice.DIR_COPY | _splice.DIR_FELL_BACK
                    self.pool.put(pipe, empty=True)
                    self._pipe = None
                else:
                    self._pipe_held += n
                    cap = self.pool.pipe_size
                    return n, (min(cap, want) if cap else want)
        want = min(want, COPY_BUF_SIZE)
        self.syscalls += 1
        data = os.read(self.in_fd, want)
        self._buf = data
        return len(data), want

    def _refused_out(self, error: OSError) -> bool:
        # splice refused by this pair of fds: copy through the buffer from now on.
        if error.errno in _REFUSED and not self._flags & _splice.DIR_COPY:
            self._flags |= _splice.DIR_COPY | _splice.DIR_FELL_BACK
            return True
        return False

    def _after_move(self) -> None:
        if not self.held and self._pipe is not None:
            self.pool.put(self._pipe, empty=True)
            self._pipe = None

    def release(self) -> None:
        if self._pipe is not None:
            self.pool.put(self._pipe, empty=self._pipe_held == 0)
            self._pipe = None
            self._pipe_held = 0
        self._buf = b""


def _shutdown_write(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()


def _reset_and_close(fd: int, reset: bool) -> None:
    if reset:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            sock = None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            finally:
                sock.detach()
    os.close(fd)


