"""The data path: joins two file descriptors (usually two TCP sockets) and moves
their bytes in the kernel, away from the Twisted loop.

Twisted accepts and connects; :func:`splice_pair` then takes the two sockets out
of Twisted and gives them to a *pump*, which copies both directions until both
have ended (half-close travels: EOF one way, data still flowing the other), or
one end fails (the other end is then reset).  Back-pressure is the kernel's: a
full socket stops its direction until it drains; nothing is buffered beyond one
pipe (or one 64 KiB buffer) per direction.  No byte is lost to EAGAIN, EINTR,
partial moves, or EOF with bytes still in the pipe.

Two backends, chosen once per process by ``LABRELAY_DATAPATH``:

``c``
    :mod:`relay.datapath._splice`'s pump thread (csrc/relay_splice.c): a native thread with
    its own epoll set owns the pairs; the reactor hears from it only when a pair
    ends.  Per wakeup no Python runs at all.  docs/datapath.md has the figures.
``python``
    the same state machine in Python, driven by the reactor (``os.splice``, or
    ``os.read``/``os.write`` where splice is refused).
``auto`` (default)
    ``c`` when the extension is built, else ``python``.

Either way, a direction whose fds cannot be spliced (``EINVAL``/``ENOSYS``: a file
opened for append, a tty …) falls back to read/write for that direction alone.
The choice is logged once (``event="datapath_backend"``) and shown by
:meth:`DataPath.status`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor, ITCPTransport, IWriteDescriptor
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.datapath import _splice
from relay.datapath._splice import DONE, MOVED, WAIT_IN, WAIT_OUT, MoveError

ENV = "LABRELAY_DATAPATH"
CHOICES = ("auto", "c", "python")
COPY_BUF_SIZE = 65536
DEFAULT_PIPE_SIZE = 1024 * 1024  # docs/datapath.md: a third of the syscalls of 256 KiB
DEFAULT_BUDGET = 1 << 20

_log = Logger(namespace="labrelay.datapath")


class DatapathError(Exception):
    """The requested backend cannot be used (bad ``LABRELAY_DATAPATH``, C module missing)."""


class PairResult(NamedTuple):
    """Bytes a pair moved, each way, by the time both directions ended."""

    a_to_b: int
    b_to_a: int


class PairError(ConnectionError):
    """A pair ended on an error: ``side`` (``"a"``/``"b"``) is the end it came from,
    and the other end was reset.  The byte counts say how far it got."""

    def __init__(self, code: int, side: str | None, a_to_b: int, b_to_a: int) -> None:
        where = f" on side {side}" if side else ""
        super().__init__(code, f"{os.strerror(code)}{where}")
        self.side = side
        self.a_to_b = a_to_b
        self.b_to_a = b_to_a


class PairAborted(PairError):
    """The pair was reset on request (:meth:`SplicedPair.abort`, or shutdown)."""


# --- backend choice -----------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str  # "c" or "python"
    reason: str


def choose_backend(value: str | None = None) -> Backend:
    """The backend ``value`` (default: ``$LABRELAY_DATAPATH``) asks for, or
    :class:`DatapathError` when it is invalid or cannot be had."""
    raw = os.environ.get(ENV, "") if value is None else value
    wanted = raw.strip().lower() or "auto"
    if wanted not in CHOICES:
        raise DatapathError(
            f"{ENV}={raw!r} is not one of {', '.join(CHOICES)}"
        )
    if wanted == "python":
        return Backend("python", f"{ENV}=python")
    if _splice.AVAILABLE:
        return Backend("c", f"{ENV}={wanted}")
    if wanted == "c":
        raise DatapathError(
            f"{ENV}=c but the native module is not available ({_splice.IMPORT_ERROR}); "
            "rebuild with `pip install -e .` (needs a C compiler and Python headers), "
            f"or set {ENV}=python"
        )
    return Backend("python", f"native module not available ({_splice.IMPORT_ERROR})")


# --- endpoints ------------------------------------------------------------------


class End(NamedTuple):
    """One end of a pair as file descriptors: read ``rfd``, write ``wfd`` (the same
    fd for a socket; stdin/stdout for ``labrelay connect``)."""

    rfd: int
    wfd: int


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


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


# --- the Python backend ----------------------------------------------------------


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


class PyDirection:
    """``lr_move`` in Python: deliver what is held, then read into the empty pipe
    (``os.splice``) or buffer (``os.read``), until would-block, EOF or the budget."""

    def __init__(self, pool: PyPipePool, in_fd: int, out_fd: int, *, out_socket: bool = True,
                 close_out: bool = False, in_file: bool = False, copy: bool = False,
                 short_waits: bool = False) -> None:
        self.pool = pool
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._flags = (
            (_splice.DIR_OUT_SOCKET if out_socket else 0)
            | (_splice.DIR_OUT_CLOSE if close_out else 0)
            | (_splice.DIR_IN_FILE if in_file else 0)
            | (_splice.DIR_COPY if copy or not hasattr(os, "splice") else 0)
            | (_splice.DIR_SHORT_WAITS if short_waits else 0)
        )
        self._pipe: tuple[int, int] | None = None
        self._pipe_held = 0
        self._buf = b""
        self._moved = 0
        self.syscalls = 0

    @property
    def flags(self) -> int:
        return self._flags

    @property
    def held(self) -> int:
        return self._pipe_held + len(self._buf)

    @property
    def moved(self) -> int:
        return self._moved

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

    def _shut_out(self) -> None:
        if self._flags & _splice.DIR_OUT_SOCKET:
            try:
                _shutdown_write(self.out_fd)
            except OSError:
                pass
        elif self._flags & _splice.DIR_OUT_CLOSE and self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1

    def move(self, budget: int = 1 << 62) -> tuple[int, int]:
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
                        if e.errno in _REFUSED and not self._flags & _splice.DIR_COPY:
                            self._flags |= _splice.DIR_COPY | _splice.DIR_FELL_BACK
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
                    return WAIT_IN, moved
                want = min(budget - moved, 1 << 30)
                if self._flags & _splice.DIR_IN_FILE:
                    try:
                        self.syscalls += 1
                        n = os.sendfile(self.out_fd, self.in_fd, None, want)
                    except BlockingIOError:
                        return WAIT_OUT, moved
                    except OSError as e:
                        if e.errno in _REFUSED:
                            self._flags = (self._flags & ~_splice.DIR_IN_FILE) \
                                | _splice.DIR_FELL_BACK
                            continue
                        raise MoveError(e.errno or errno.EIO,
                                        "in" if e.errno == errno.EIO else "out") from None
                    if n == 0:
                        self._flags |= _splice.DIR_EOF
                    moved += n
                    self._moved += n
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


# --- pumps --------------------------------------------------------------------


PairDone = Callable[[_splice.PairEnd], None]


@implementer(IReadDescriptor, IWriteDescriptor)
class _Watcher:
    """The reactor's view of one fd of a :class:`_ReactorPair`."""

    def __init__(self, pair: _ReactorPair, fd: int, is_socket: bool, pollable: bool) -> None:
        self.pair = pair
        self.fd = fd
        self.is_socket = is_socket
        self.pollable = pollable
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "datapath"

    def doRead(self) -> None:
        self.pair.ready(self.fd, readable=True)

    def doWrite(self) -> None:
        self.pair.ready(self.fd, readable=False)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw EPOLLERR/EPOLLHUP without input and dropped us.
        self.reading = self.writing = False
        self.pair.fdFailed(self)


class _ReactorPair:
    """A pair driven by reactor readiness, level-triggered: each direction waits
    for its input fd to be readable (nothing held) or its output fd writable."""

    def __init__(self, pump: ReactorPump, pair_id: int, a: End, b: End,
                 movers: tuple[Mover, Mover], done: PairDone) -> None:
        self.pump = pump
        self.id = pair_id
        self.reactor = pump.reactor
        self.ends = (a, b)
        self.dirs = movers
        self.ins = [a.rfd, b.rfd]
        self.outs = [b.wfd, a.wfd]
        self.wait = [WAIT_IN, WAIT_IN]
        self.ended = False
        self._done = done
        self._again: Any = None
        self.watchers: dict[int, _Watcher] = {}
        for fd in dict.fromkeys((a.rfd, a.wfd, b.rfd, b.wfd)):
            mode = os.fstat(fd).st_mode
            self.watchers[fd] = _Watcher(self, fd, stat.S_ISSOCK(mode), not stat.S_ISREG(mode))

    def start(self) -> None:
        self.serve(3)

    def ready(self, fd: int, readable: bool) -> None:
        if self.ended:
            return
        fds = self.ins if readable else self.outs
        self.serve(sum(1 << i for i in (0, 1) if fds[i] == fd))

    def fdFailed(self, watcher: _Watcher) -> None:
        if self.ended:
            return
        err = 0
        if watcher.is_socket:
            sock = socket.socket(fileno=watcher.fd)
            try:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            finally:
                sock.detach()
        if err:
            a = self.ends[0]
            self.end(err, "a" if watcher.fd in (a.rfd, a.wfd) else "b")
            return
        self.serve(sum(1 << i for i in (0, 1)
                       if watcher.fd in (self.ins[i], self.outs[i])) or 3)

    def serve(self, which: int) -> None:
        try:
            self._serve(which)
        except Exception:
            _log.failure("data path pair {pair} failed", pair=self.id)
            self.end(errno.EIO, None)

    def _serve(self, which: int) -> None:
        self._again = None
        budget = self.pump.budget
        for i in (0, 1):
            d = self.dirs[i]
            if not which & (1 << i) or d.flags & _splice.DIR_DONE:
                continue
            try:
                rc, _ = d.move(budget)
            except MoveError as e:
                self.end(e.errno or errno.EIO, "ab"[i] if e.side == "in" else "ba"[i])
                return
            self.wait[i] = rc
        if all(d.flags & _splice.DIR_DONE for d in self.dirs):
            self.end(0, None)
            return
        self._update_interest()

    def _update_interest(self) -> None:
        again = 0
        for i in (0, 1):
            if self.wait[i] == MOVED:
                self.wait[i] = WAIT_OUT if self.dirs[i].held else WAIT_IN
        for fd, w in self.watchers.items():
            if fd < 0:
                continue
            want_in = want_out = False
            for i in (0, 1):
                if self.dirs[i].flags & _splice.DIR_DONE:
                    continue
                want_in |= self.wait[i] == WAIT_IN and self.ins[i] == fd
                want_out |= self.wait[i] == WAIT_OUT and self.outs[i] == fd
            if not w.pollable:
                if want_in or want_out:
                    again = 3
                continue
            if want_in != w.reading:
                (self.reactor.addReader if want_in else self.reactor.removeReader)(w)
                w.reading = want_in
            if want_out != w.writing:
                (self.reactor.addWriter if want_out else self.reactor.removeWriter)(w)
                w.writing = want_out
        self._close_finished_outs()
        if again and self._again is None:
            self._again = self.reactor.callLater(0, self.serve, again)

    def _close_finished_outs(self) -> None:
        """A finished direction whose out fd is not a socket signals EOF by closing it."""
        for j in (0, 1):
            fd = self.outs[j]
            w = self.watchers.get(fd)
            if fd < 0 or w is None or w.is_socket or not self.dirs[j].flags & _splice.DIR_DONE:
                continue
            if self.ins[1 - j] == fd and not self.dirs[1 - j].flags & _splice.DIR_DONE:
                continue
            self._unwatch(w)
            del self.watchers[fd]
            os.close(fd)
            self.outs[j] = -1
            if self.ins[1 - j] == fd:
                self.ins[1 - j] = -1

    def _unwatch(self, w: _Watcher) -> None:
        if w.reading:
            self.reactor.removeReader(w)
        if w.writing:
            self.reactor.removeWriter(w)
        w.reading = w.writing = False

    def end(self, err: int, side: str | None, aborted: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        if self._again is not None and self._again.active():
            self._again.cancel()
        self._again = None
        for fd, w in self.watchers.items():
            self._unwatch(w)
            _reset_and_close(fd, bool(err) and w.is_socket)
        self.watchers.clear()
        fell_back = False
        for d in self.dirs:
            fell_back |= bool(d.flags & _splice.DIR_FELL_BACK)
            d.release()
        self._done(_splice.PairEnd(
            id=self.id, a_to_b=self.dirs[0].moved, b_to_a=self.dirs[1].moved, error=err,
            side=side if err else None, aborted=aborted, fell_back=fell_back))


class ReactorPump:
    """Pairs driven from the reactor thread: the ``python`` backend (``PyDirection``),
    or, with ``native=True``, ``lr_move`` called once per wakeup (kept for the
    benchmark that shows why the C backend is a thread)."""

    def __init__(self, reactor: Any, *, pipe_size: int = DEFAULT_PIPE_SIZE,
                 max_pipes: int = 1024, max_idle_pipes: int = 64,
                 budget: int = DEFAULT_BUDGET, copy: bool = False,
                 short_waits: bool = True, native: bool = False) -> None:
        self.reactor = reactor
        self.budget = budget
        self.copy = copy
        self.short_waits = short_waits
        self.native = native
        self._next = 0
        self.pairs: dict[int, _ReactorPair] = {}
        self.pool: Any = (_splice.PipePool(max_pipes, max_idle_pipes, pipe_size) if native
                          else PyPipePool(max_pipes, max_idle_pipes, pipe_size))

    def _mover(self, in_fd: int, out_fd: int, close_out: bool) -> Mover:
        in_mode = os.fstat(in_fd).st_mode
        kwargs = dict(out_socket=_is_socket(out_fd), close_out=close_out,
                      in_file=stat.S_ISREG(in_mode), copy=self.copy,
                      short_waits=self.short_waits)
        if self.native:
            return _splice.Direction(self.pool, in_fd, out_fd, **kwargs)
        return PyDirection(self.pool, in_fd, out_fd, **kwargs)

    def add(self, a: End, b: End, ab_prefix: bytes, ba_prefix: bytes, done: PairDone) -> int:
        for fd in dict.fromkeys((*a, *b)):
            os.set_blocking(fd, False)
        movers = (self._mover(a.rfd, b.wfd, False), self._mover(b.rfd, a.wfd, False))
        movers[0].prefix(ab_prefix)
        movers[1].prefix(ba_prefix)
        pair_id = self._next
        self._next += 1

        def finished(end: _splice.PairEnd) -> None:
            self.pairs.pop(pair_id, None)
            done(end)

        pair = _ReactorPair(self, pair_id, a, b, movers, finished)
        self.pairs[pair_id] = pair
        pair.start()
        return pair_id

    def abort(self, pair_id: int) -> None:
        pair = self.pairs.get(pair_id)
        if pair is not None:
            pair.end(errno.ECANCELED, None, aborted=True)

    def pair_bytes(self, pair_id: int) -> tuple[int, int] | None:
        pair = self.pairs.get(pair_id)
        return None if pair is None else (pair.dirs[0].moved, pair.dirs[1].moved)

    def stats(self) -> dict[str, int]:
        return {"pipes_total": self.pool.total, "pipes_idle": self.pool.idle,
                "pipe_size": self.pool.pipe_size}

    def close(self) -> None:
        for pair_id in list(self.pairs):
            self.abort(pair_id)
        self.pool.close()


@implementer(IReadDescriptor)
class _Notify:
    """Reads the pump thread's eventfd: the only wakeup the reactor gets from it."""

    def __init__(self, pump: ThreadPump) -> None:
        self.pump = pump

    def fileno(self) -> int:
        return self.pump.native.notify_fd if not self.pump.native.closed else -1

    def logPrefix(self) -> str:
        return "datapath"

    def doRead(self) -> None:
        self.pump.reaped()

    def connectionLost(self, reason: Failure) -> None:
        pass


class ThreadPump:
    """The ``c`` backend: :class:`relay.datapath._splice.Pump` plus the reactor reader that
    collects ended pairs."""

    def __init__(self, reactor: Any, *, pipe_size: int = DEFAULT_PIPE_SIZE,
                 max_pipes: int = 1024, max_idle_pipes: int = 64,
                 budget: int = DEFAULT_BUDGET, copy: bool = False,
                 short_waits: bool = True) -> None:
        self.reactor = reactor
        self.native = _splice.Pump(_splice.PumpConfig(
            pipe_size=pipe_size, max_pipes=max_pipes, max_idle_pipes=max_idle_pipes,
            budget=budget, copy=copy, short_waits=short_waits))
        self._done: dict[int, PairDone] = {}
        self._final: dict[str, int] = {}
        self._reader = _Notify(self)
        reactor.addReader(self._reader)

    def add(self, a: End, b: End, ab_prefix: bytes, ba_prefix: bytes, done: PairDone) -> int:
        pair_id = self.native.add(a.rfd, a.wfd, b.rfd, b.wfd, ab_prefix, ba_prefix)
        self._done[pair_id] = done
        return pair_id

    def reaped(self) -> None:
        for end in self.native.reap():
            done = self._done.pop(end.id, None)
            if done is not None:
                done(end)

    def abort(self, pair_id: int) -> None:
        if not self.native.closed:  # once closed, every pair was reset already
            self.native.abort(pair_id)

    def pair_bytes(self, pair_id: int) -> tuple[int, int] | None:
        return None if self.native.closed else self.native.pair_bytes(pair_id)

    def stats(self) -> dict[str, int]:
        return self._final if self.native.closed else self.native.stats()

    def close(self) -> None:
        if self.native.closed:
            return
        self._final = {**self.native.stats(), "pairs_active": 0, "pipes_total": 0,
                       "pipes_idle": 0}
        self.reactor.removeReader(self._reader)
        pending, self._done = self._done, {}
        ids = list(pending)
        self.native.close()
        for pair_id in ids:
            pending[pair_id](_splice.PairEnd(pair_id, 0, 0, errno.ECANCELED, None, True, False))


# --- the facade -----------------------------------------------------------------


class SplicedPair:
    """A pair handed to the data path.  ``done`` fires with :class:`PairResult` when
    both directions ended cleanly, or fails with :class:`PairError` (cancelling it
    resets both ends)."""

    def __init__(self, datapath: DataPath) -> None:
        self._datapath = datapath
        self.id = -1
        self.result: PairResult | None = None
        self.done: defer.Deferred[PairResult] = defer.Deferred(lambda _: self.abort())

    def bytes(self) -> PairResult:
        """Bytes moved so far (final once ended)."""
        if self.result is not None:
            return self.result
        counts = self._datapath.pump.pair_bytes(self.id)
        return PairResult(*counts) if counts is not None else PairResult(0, 0)

    def abort(self) -> None:
        """Reset both ends now."""
        if self.result is None:
            self._datapath.pump.abort(self.id)


class DataPath:
    """The process's pump for one reactor; see the module docstring."""

    def __init__(self, reactor: Any, backend: Backend | None = None, *,
                 pipe_size: int = DEFAULT_PIPE_SIZE, max_pipes: int = 1024,
                 max_idle_pipes: int = 64, budget: int = DEFAULT_BUDGET,
                 copy: bool = False, short_waits: bool = True,
                 variant: str | None = None) -> None:
        self.reactor = reactor
        self.backend = backend if backend is not None else choose_backend()
        self._options: dict[str, Any] = dict(
            pipe_size=pipe_size, max_pipes=max_pipes, max_idle_pipes=max_idle_pipes,
            budget=budget, copy=copy, short_waits=short_waits)
        self._variant = variant
        self._pump: ThreadPump | ReactorPump | None = None
        self.pairs: dict[int, SplicedPair] = {}
        self.pairs_total = 0
        self.pairs_failed = 0
        self.pairs_fell_back = 0
        self.bytes_done = 0
        self._closed = False
        _raise_fd_limit()

    @property
    def pump(self) -> ThreadPump | ReactorPump:
        """The pump, started on first use.  Not at construction: ``twistd`` builds the
        service tree before it forks into the background, and a thread does not
        survive a fork."""
        if self._pump is None:
            if self._closed:
                raise ConnectionError(errno.ESHUTDOWN, "the data path is closed")
            options = self._options
            if self._variant == "c-reactor":  # benchmark only: lr_move from the reactor
                self._pump = ReactorPump(self.reactor, native=True, **options)
            elif self.backend.name == "c":
                self._pump = ThreadPump(self.reactor, **options)
            else:
                self._pump = ReactorPump(self.reactor, **options)
        return self._pump

    def start(self) -> None:
        """Start the pump now (at reactor start-up, so a failure shows early)."""
        if not self._closed:
            self.pump  # noqa: B018

    def splice(self, a: End, b: End, *, from_a: bytes = b"", from_b: bytes = b"") -> SplicedPair:
        """Join ``a`` and ``b``; the data path owns (and will close) their fds.

        ``from_a`` are bytes already read from ``a`` (they go to ``b`` first);
        ``from_b`` likewise.  On an error the fds are still the caller's."""
        if self._closed:
            raise ConnectionError(errno.ESHUTDOWN, "the data path is closed")
        pair = SplicedPair(self)
        pair.id = self.pump.add(a, b, from_a, from_b, lambda end: self._ended(pair, end))
        if pair.result is None:
            self.pairs[pair.id] = pair
        self.pairs_total += 1
        return pair

    def splice_transports(self, transport_a: Any, transport_b: Any, *,
                          from_a: bytes = b"", from_b: bytes = b"") -> SplicedPair:
        """Take two connected Twisted TCP transports (see :func:`detach_transport`)
        and join their sockets.  Bytes either transport still had to send go first."""
        fd_a, unsent_a = detach_transport(transport_a)
        try:
            fd_b, unsent_b = detach_transport(transport_b)
        except BaseException:
            _reset_and_close(fd_a, True)
            raise
        try:
            return self.splice(End(fd_a, fd_a), End(fd_b, fd_b),
                               from_a=unsent_b + from_a, from_b=unsent_a + from_b)
        except BaseException:
            _reset_and_close(fd_a, True)
            _reset_and_close(fd_b, True)
            raise

    def _ended(self, pair: SplicedPair, end: _splice.PairEnd) -> None:
        self.pairs.pop(pair.id, None)
        pair.result = PairResult(end.a_to_b, end.b_to_a)
        self.bytes_done += end.a_to_b + end.b_to_a
        self.pairs_fell_back += end.fell_back
        if end.error:
            self.pairs_failed += 1
            cls = PairAborted if end.aborted else PairError
            if not pair.done.called:
                pair.done.errback(Failure(cls(end.error, end.side, end.a_to_b, end.b_to_a)))
        elif not pair.done.called:
            pair.done.callback(pair.result)

    def status(self) -> dict[str, Any]:
        live = [p.bytes() for p in list(self.pairs.values())]
        return {
            "backend": self.backend.name,
            "reason": self.backend.reason,
            "pairs_active": len(self.pairs),
            "pairs_total": self.pairs_total,
            "pairs_failed": self.pairs_failed,
            "pairs_fell_back": self.pairs_fell_back,
            "bytes": self.bytes_done + sum(a + b for a, b in live),
            **(self._pump.stats() if self._pump is not None else {}),
        }

    def close(self) -> None:
        """Reset every pair still running and stop the pump."""
        if not self._closed:
            self._closed = True
            if self._pump is not None:
                self._pump.close()


def _raise_fd_limit() -> None:
    """Each spliced direction may hold a pipe (two fds): lift the soft fd limit to the
    hard one, as servers do, so pairs are limited by memory, not by 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


_datapaths: weakref.WeakKeyDictionary[Any, DataPath] = weakref.WeakKeyDictionary()
_logged: set[tuple[str, str]] = set()


def get(reactor: Any) -> DataPath:
    """The data path of ``reactor``, created (and its backend chosen and logged) on
    first use; it is closed when the reactor shuts down."""
    dp = _datapaths.get(reactor)
    if dp is None:
        backend = choose_backend()
        dp = DataPath(reactor, backend)
        _datapaths[reactor] = dp
        reactor.callWhenRunning(dp.start)
        reactor.addSystemEventTrigger("after", "shutdown", dp.close)
        key = (backend.name, backend.reason)
        if key not in _logged:
            _logged.add(key)
            _log.info("data path: {backend} backend ({reason})", event="datapath_backend",
                      backend=backend.name, reason=backend.reason)
    return dp


def splice_pair(reactor: Any, transport_a: Any, transport_b: Any, *,
                from_a: bytes = b"", from_b: bytes = b"") -> defer.Deferred[PairResult]:
    """Join two connected Twisted TCP transports in the kernel.

    Returns a Deferred that fires with ``PairResult(a_to_b, b_to_a)`` once both
    directions have ended, or fails with :class:`PairError` (one end failed; the
    other was reset).  Cancelling it resets both ends.  The transports' protocols
    get ``connectionLost(ConnectionDone)`` at once: from here on the data path owns
    the sockets."""
    return get(reactor).splice_transports(transport_a, transport_b,
                                          from_a=from_a, from_b=from_b).done


def status(reactor: Any) -> dict[str, Any] | None:
    """The data path's status for ``reactor``, or None if it was never used."""
    dp = _datapaths.get(reactor)
    return None if dp is None else dp.status()
