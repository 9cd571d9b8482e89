"""The pumps: what runs the movers of every spliced pair.

:class:`ThreadPump` is the ``c`` backend: the native pump thread of
:class:`relay.datapath._splice.Pump` (csrc/pump.c) owns the pairs, and the reactor
only reads its eventfd to collect ended ones.  :class:`ReactorPump` is the
``python`` backend: each pair's fds are reactor readers/writers and
:class:`~relay.datapath.pymover.PyDirection` moves the bytes.  Both have the same
small interface (``add``, ``abort``, ``pair_bytes``, ``stats``, ``close``) that
:class:`relay.datapath.splicing.DataPath` uses.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.datapath import _splice
from relay.datapath._splice import MOVED, WAIT_IN, WAIT_OUT, MoveError
from relay.datapath.pymover import (
    DEFAULT_BUDGET,
    DEFAULT_PIPE_SIZE,
    End,
    Mover,
    PyDirection,
    PyPipePool,
    _is_socket,
    _reset_and_close,
)

_log = Logger(namespace="labrelay.datapath")

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
        self.paused = 0  # bit i: direction i is paused (a rate limit)
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
            if not which & (1 << i) or d.flags & _splice.DIR_DONE or self.paused & (1 << i):
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
                if self.dirs[i].flags & _splice.DIR_DONE or self.paused & (1 << i):
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

    def pause(self, dirs: int) -> None:
        """Pause the directions in ``dirs`` and resume the others (as lr_pump_pause)."""
        if self.ended:
            return
        resumed = self.paused & ~dirs
        self.paused = dirs & 3
        if resumed:
            self.serve(resumed)
        else:
            self._update_interest()

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
    """Pairs driven from the reactor thread: the ``python`` backend.

    ``pool`` and :meth:`mover` are the seams a subclass may replace (the benchmark's
    ``c-reactor`` variant, bench/reactor_native.py, drives ``lr_move`` from here)."""

    def __init__(self, reactor: Any, *, pipe_size: int = DEFAULT_PIPE_SIZE,
                 max_pipes: int = 1024, max_idle_pipes: int = 64,
                 budget: int = DEFAULT_BUDGET, copy: bool = False,
                 short_waits: bool = True) -> None:
        self.reactor = reactor
        self.budget = budget
        self.copy = copy
        self.short_waits = short_waits
        self._next = 0
        self.pairs: dict[int, _ReactorPair] = {}
        self.pool: Any = PyPipePool(max_pipes, max_idle_pipes, pipe_size)

    def mover_options(self, in_fd: int, out_fd: int, close_out: bool) -> dict[str, bool]:
        """How to move ``in_fd`` to ``out_fd``: the keyword arguments of a mover."""
        return dict(out_socket=_is_socket(out_fd), close_out=close_out,
                    in_file=stat.S_ISREG(os.fstat(in_fd).st_mode), copy=self.copy,
                    short_waits=self.short_waits)

    def mover(self, in_fd: int, out_fd: int, close_out: bool) -> Mover:
        """The mover of one direction (a :class:`PyDirection` on :attr:`pool`)."""
        return PyDirection(self.pool, in_fd, out_fd,
                           **self.mover_options(in_fd, out_fd, close_out))

    def add(self, a: End, b: End, ab_prefix: bytes, ba_prefix: bytes, done: PairDone) -> int:
        for fd in dict.fromkeys((*a, *b)):
            os.set_blocking(fd, False)
        movers = (self.mover(a.rfd, b.wfd, False), self.mover(b.rfd, a.wfd, False))
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

    def pause(self, pair_id: int, dirs: int) -> None:
        pair = self.pairs.get(pair_id)
        if pair is not None:
            pair.pause(dirs)

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

    def pause(self, pair_id: int, dirs: int) -> None:
        if not self.native.closed:
            self.native.pause(pair_id, dirs)

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

