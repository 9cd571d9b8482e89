"""The ``portable`` backend: a plain copy loop for systems without ``splice``.

macOS, the BSDs and any POSIX system have ``read``/``write`` and a reactor, not
``splice(2)``, pipes that can be resized, or an eventfd.  :class:`CopyDirection`
moves one direction through one fixed buffer with ``os.readv`` into it and
``os.write`` out of a ``memoryview`` of it: no allocation per read, no copy on a
partial write.  It is the same contract as ``lr_move`` and
:class:`~relay.datapath.pymover.PyDirection` (``MOVED``/``WAIT_IN``/``WAIT_OUT``/
``DONE``), so :class:`CopyPump` is :class:`~relay.datapath.pumps.ReactorPump` with
this mover and no pipe pool.

Flow control is the buffer: a direction reads again only once everything it read
was written, so a slow reader stops its writer at one buffer (``COPY_BUFFER``)
per direction, and the kernel's socket buffers push back from there.  EINTR is
retried by Python (PEP 475); EAGAIN is a wait; EOF after the buffer drained shuts
the output down (``shutdown(SHUT_WR)`` for a socket, ``close`` for a pipe).

Nothing here imports a Linux-only module or calls a Linux-only function: this is
what ``labrelay connect`` runs on a laptop.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from relay.datapath import _splice
from relay.datapath.pumps import ReactorPump
from relay.datapath.pymover import DEFAULT_BUDGET, LoopDirection, Mover, _is_socket

# One buffer per direction.  256 KiB: a loopback or LAN socket often holds more than
# 64 KiB, and a larger read halves the wakeups for the same bytes (bench/, docs/datapath.md).
COPY_BUFFER = 256 * 1024


class CopyDirection(LoopDirection):
    """One direction, ``in_fd`` to ``out_fd``, through one buffer (see the module);
    the loop is :class:`~relay.datapath.pymover.LoopDirection`'s."""

    def __init__(self, in_fd: int, out_fd: int, *, out_socket: bool = True,
                 close_out: bool = False, short_waits: bool = False,
                 buffer_size: int = COPY_BUFFER) -> None:
        super().__init__(in_fd, out_fd, (
            _splice.DIR_COPY
            | (_splice.DIR_OUT_SOCKET if out_socket else 0)
            | (_splice.DIR_OUT_CLOSE if close_out else 0)
            | (_splice.DIR_SHORT_WAITS if short_waits else 0)
        ))
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._prefix = b""

    @property
    def held(self) -> int:
        return len(self._prefix) + self._end - self._start

    def prefix(self, data: bytes) -> None:
        """Bytes already read from ``in_fd`` elsewhere: they go out first."""
        if self._end > self._start:
            raise OSError(errno.EBUSY, "the prefix must come before anything copied")
        self._prefix += data

    def _deliver(self) -> int:
        self.syscalls += 1
        if self._prefix:
            n = os.write(self.out_fd, self._prefix)  # EPIPE, not SIGPIPE (Python ignores it)
            self._prefix = self._prefix[n:]
            return n
        n = os.write(self.out_fd, self._view[self._start:self._end])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return n

    def _fill(self, want: int) -> tuple[int, int]:
        # The whole buffer, whatever the budget asks: one read is one buffer at most.
        self.syscalls += 1
        n = os.readv(self.in_fd, [self._view])
        self._start, self._end = 0, n
        return n, len(self._buf)

    def release(self) -> None:
        self._start = self._end = 0
        self._prefix = b""


class _NoPipes:
    """The pipe pool of a pump that has no pipes (for :meth:`ReactorPump.stats`)."""

    total = 0
    idle = 0
    pipe_size = 0

    def close(self) -> None:
        pass


class CopyPump(ReactorPump):
    """The ``portable`` backend's pump: :class:`ReactorPump` driving :class:`CopyDirection`s."""

    def __init__(self, reactor: Any, *, budget: int = DEFAULT_BUDGET,
                 buffer_size: int = COPY_BUFFER, **_splice_options: Any) -> None:
        # No short waits here: they pay off for splice (a pipe's worth per call), but a
        # copy that reads again until EAGAIN meets the writer's next chunk and wakes far
        # less often: 0.3 against 0.7 CPU-s/GiB for a pipe fed 32 KiB at a time, as ssh
        # feeds its ProxyCommand (docs/datapath.md).
        super().__init__(reactor, budget=budget, short_waits=False, copy=True,
                         max_pipes=0, max_idle_pipes=0, pipe_size=0)
        self.pool = _NoPipes()
        self.buffer_size = buffer_size

    def mover(self, in_fd: int, out_fd: int, close_out: bool) -> Mover:
        return CopyDirection(in_fd, out_fd, out_socket=_is_socket(out_fd), close_out=close_out,
                             short_waits=self.short_waits, buffer_size=self.buffer_size)

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "copy_buffer": self.buffer_size}
