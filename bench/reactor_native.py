"""The ``c-reactor`` design variant of bench/plain_hop.py: ``lr_move`` driven from the
Twisted loop, once per wakeup, instead of from the native pump thread.

Benchmark only (docs/datapath.md shows why the product's C backend is a thread):
it reuses the ``python`` backend's reactor pump with the native mover and pipe pool.
"""

from __future__ import annotations

from typing import Any

from relay.datapath import _splice
from relay.datapath.pumps import ReactorPump, ThreadPump
from relay.datapath.pymover import Mover
from relay.datapath.splicing import DataPath


class NativeReactorPump(ReactorPump):
    """:class:`ReactorPump` with ``_splice.Direction`` (``lr_move``) and ``_splice.PipePool``."""

    def __init__(self, reactor: Any, *, pipe_size: int, max_pipes: int,
                 max_idle_pipes: int, **options: Any) -> None:
        super().__init__(reactor, pipe_size=pipe_size, max_pipes=max_pipes,
                         max_idle_pipes=max_idle_pipes, **options)
        self.pool.close()
        self.pool = _splice.PipePool(max_pipes, max_idle_pipes, pipe_size)

    def mover(self, in_fd: int, out_fd: int, close_out: bool) -> Mover:
        return _splice.Direction(self.pool, in_fd, out_fd,
                                 **self.mover_options(in_fd, out_fd, close_out))


class NativeReactorDataPath(DataPath):
    """A :class:`DataPath` whose pump is a :class:`NativeReactorPump`."""

    def make_pump(self, **options: Any) -> ThreadPump | ReactorPump:
        return NativeReactorPump(self.reactor, **options)
