"""The only importer of the compiled ``relay.datapath._splice_c``: its codes become Python.

Nothing here touches Twisted; :mod:`relay.datapath.splicing` builds on it.  Two layers, as
in ``csrc/relay_splice.h``:

* :class:`Direction` and :class:`PipePool` wrap ``lr_move``, the stateless mover
  (one direction, fd -> pipe -> fd, as much as the kernel allows per call).
  Results are :data:`MOVED`, :data:`WAIT_IN`, :data:`WAIT_OUT`, :data:`DONE`; a
  failure raises :class:`MoveError` (an ``OSError`` that says which side failed).
* :class:`Pump` wraps the pump thread: it owns spliced pairs and says, through
  :attr:`Pump.notify_fd`, only when some have ended (:meth:`Pump.reap`).

``IMPORT_ERROR`` holds why the extension is unavailable (``None`` when it loaded).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

try:
    from relay.datapath import _splice_c  # type: ignore[attr-defined]
except ImportError as e:  # not built (pure-Python install) or not Linux
    _splice_c = None
    IMPORT_ERROR: str | None = f"{e}"
else:
    IMPORT_ERROR = None

ffi: Any = _splice_c.ffi if _splice_c is not None else None
lib: Any = _splice_c.lib if _splice_c is not None else None

AVAILABLE = lib is not None


def aead_library() -> str:
    """The libcrypto the native AES-GCM thread (pooled ``ssh -J``) uses, as OpenSSL names
    itself, with " (bundled)" when the module carries its own (scripts/openssl); ""
    when it has none (no module, no libcrypto, or a module from before it said)."""
    if lib is None or not hasattr(lib, "lr_gcm_libcrypto"):
        return ""
    return str(ffi.string(lib.lr_gcm_libcrypto()).decode("ascii", "replace"))

MOVED, WAIT_IN, WAIT_OUT, DONE = 1, 2, 3, 4
RESULT_NAMES = {MOVED: "moved", WAIT_IN: "wait-in", WAIT_OUT: "wait-out", DONE: "done"}

DIR_OUT_SOCKET = 0x01
DIR_OUT_CLOSE = 0x02
DIR_IN_FILE = 0x04
DIR_COPY = 0x08
DIR_SHORT_WAITS = 0x10
DIR_EOF = 0x100
DIR_DONE = 0x200
DIR_FELL_BACK = 0x400

END_ABORTED = 0x01
END_FELL_BACK = 0x02

SIDE_IN, SIDE_OUT = 1, 2


class MoveError(OSError):
    """``lr_move`` failed: ``side`` is ``"in"`` or ``"out"`` (which fd the errno is about)."""

    def __init__(self, code: int, side: str) -> None:
        super().__init__(code, f"{os.strerror(code)} (on the {side} side)")
        self.side = side


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _require() -> None:
    if lib is None:
        raise ImportError(f"relay.datapath._splice_c is not available: {IMPORT_ERROR}")


class PipePool:
    """A capped pool of pipes for :class:`Direction` (not thread-safe)."""

    def __init__(self, max_total: int = 64, max_idle: int = 16, pipe_size: int = 0) -> None:
        _require()
        self._pool = ffi.new("struct lr_pool *")
        _check(lib.lr_pool_init(self._pool, max_total, max_idle, pipe_size), "lr_pool_init")

    @property
    def total(self) -> int:
        return int(self._pool.total)

    @property
    def idle(self) -> int:
        return int(self._pool.idle)

    @property
    def pipe_size(self) -> int:
        return int(self._pool.actual_size)

    def close(self) -> None:
        lib.lr_pool_destroy(self._pool)


class Direction:
    """One direction ``in_fd -> out_fd`` driven by the caller (the fds stay the caller's,
    except that ``close_out=True`` closes ``out_fd`` at EOF)."""

    def __init__(self, pool: PipePool, in_fd: int, out_fd: int, *, out_socket: bool = True,
                 close_out: bool = False, in_file: bool = False, copy: bool = False,
                 short_waits: bool = False) -> None:
        _require()
        self.pool = pool
        self._dir = ffi.new("struct lr_dir *")
        self._dir.in_fd = in_fd
        self._dir.out_fd = out_fd
        self._dir.pipe_r = self._dir.pipe_w = -1
        self._dir.flags = (
            (DIR_OUT_SOCKET if out_socket else 0) | (DIR_OUT_CLOSE if close_out else 0)
            | (DIR_IN_FILE if in_file else 0) | (DIR_COPY if copy else 0)
            | (DIR_SHORT_WAITS if short_waits else 0)
        )
        self._moved = ffi.new("uint64_t *")

    def prefix(self, data: bytes) -> None:
        """Queue ``data`` to go out before anything read from ``in_fd``."""
        _check(lib.lr_dir_prefix(self._dir, data, len(data)), "lr_dir_prefix")

    def move(self, budget: int = 1 << 62) -> tuple[int, int]:
        """Move until would-block, EOF or ``budget`` bytes: ``(result, bytes written)``."""
        self._moved[0] = 0
        rc = lib.lr_move(self._dir, self.pool._pool, budget, self._moved)
        if rc < 0:
            raise MoveError(-rc, "in" if self._dir.err_side == SIDE_IN else "out")
        return rc, int(self._moved[0])

    @property
    def flags(self) -> int:
        return int(self._dir.flags)

    @property
    def held(self) -> int:
        """Bytes read but not yet written (in the pipe or the buffer)."""
        d = self._dir
        return int(d.pipe_held) + int(d.buf_len) - int(d.buf_off)

    @property
    def moved(self) -> int:
        return int(self._dir.moved)

    @property
    def syscalls(self) -> int:
        return int(self._dir.syscalls)

    @property
    def holds_pipe(self) -> bool:
        return bool(self._dir.pipe_r >= 0)

    def release(self) -> None:
        lib.lr_dir_release(self._dir, self.pool._pool)


@dataclass(frozen=True)
class PairEnd:
    """How a pump pair ended.  ``error`` is an errno (0: both directions ended cleanly)
    and ``side`` the end it came from (``"a"``/``"b"``, ``None`` when none)."""

    id: int
    a_to_b: int
    b_to_a: int
    error: int
    side: str | None
    aborted: bool
    fell_back: bool


@dataclass(frozen=True)
class PumpConfig:
    pipe_size: int = 1024 * 1024
    max_pipes: int = 1024
    max_idle_pipes: int = 64
    budget: int = 1 << 20
    copy: bool = False  # read/write through a buffer instead of splice (measurements)
    short_waits: bool = True  # a short read ends a turn: the next epoll_wait says if more


class Pump:
    """The native pump thread.  Methods are called from one thread (the reactor's)."""

    def __init__(self, config: PumpConfig = PumpConfig()) -> None:
        _require()
        cfg = ffi.new("struct lr_pump_config *")
        cfg.pipe_size = config.pipe_size
        cfg.max_pipes = config.max_pipes
        cfg.max_idle_pipes = config.max_idle_pipes
        cfg.budget = config.budget
        cfg.dir_flags = (DIR_COPY if config.copy else 0) | (
            DIR_SHORT_WAITS if config.short_waits else 0)
        err = ffi.new("int *")
        pump = lib.lr_pump_new(cfg, err)
        if pump == ffi.NULL:
            raise OSError(err[0], f"cannot start the pump thread: {os.strerror(err[0])}")
        self._pump: Any = pump
        self._ends = ffi.new("struct lr_pair_end[]", 64)
        self._a = ffi.new("uint64_t *")
        self._b = ffi.new("uint64_t *")
        self.notify_fd: int = lib.lr_pump_notify_fd(pump)

    def add(self, a_rfd: int, a_wfd: int, b_rfd: int, b_wfd: int,
            ab_prefix: bytes = b"", ba_prefix: bytes = b"") -> int:
        """Hand over the fds (the pump closes them); returns the pair's id."""
        rc = lib.lr_pump_add(self._live(), a_rfd, a_wfd, b_rfd, b_wfd,
                             ab_prefix, len(ab_prefix), ba_prefix, len(ba_prefix))
        return _check(int(rc), "lr_pump_add")

    def abort(self, pair_id: int) -> bool:
        """Reset both ends of a live pair; False if it has already ended."""
        rc = lib.lr_pump_abort(self._live(), pair_id)
        if rc == -errno.ENOENT:
            return False
        _check(rc, "lr_pump_abort")
        return True

    def pause(self, pair_id: int, dirs: int) -> bool:
        """Pause the directions in ``dirs`` (bit 0: a to b, bit 1: b to a) and resume
        the others; False if the pair has already ended."""
        rc = lib.lr_pump_pause(self._live(), pair_id, dirs)
        if rc == -errno.ENOENT:
            return False
        _check(rc, "lr_pump_pause")
        return True

    def pair_bytes(self, pair_id: int) -> tuple[int, int] | None:
        """Bytes moved so far ``(a_to_b, b_to_a)``, or None once reaped."""
        if lib.lr_pump_pair_bytes(self._live(), pair_id, self._a, self._b) < 0:
            return None
        return int(self._a[0]), int(self._b[0])

    def reap(self) -> list[PairEnd]:
        """The pairs that ended since the last call (clears :attr:`notify_fd`)."""
        ends: list[PairEnd] = []
        while True:
            n = lib.lr_pump_reap(self._live(), self._ends, len(self._ends))
            for i in range(n):
                e = self._ends[i]
                ends.append(PairEnd(
                    id=int(e.id), a_to_b=int(e.a_to_b), b_to_a=int(e.b_to_a), error=int(e.err),
                    side=None if e.side < 0 else "ab"[e.side],
                    aborted=bool(e.flags & END_ABORTED), fell_back=bool(e.flags & END_FELL_BACK),
                ))
            if n < len(self._ends):
                return ends

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct lr_pump_stats *")
        lib.lr_pump_get_stats(self._live(), s)
        return {name: int(getattr(s, name)) for name in (
            "wakeups", "turns", "syscalls", "bytes", "pairs_total", "pairs_active",
            "fell_back", "batched", "pipes_total", "pipes_idle", "pipe_size")}

    def close(self) -> None:
        """Stop the thread; pairs still running are reset and closed (not reported)."""
        pump, self._pump = self._pump, None
        if pump is not None:
            lib.lr_pump_free(pump)

    @property
    def closed(self) -> bool:
        return self._pump is None

    def _live(self) -> Any:
        if self._pump is None:
            raise ValueError("the pump is closed")
        return self._pump
