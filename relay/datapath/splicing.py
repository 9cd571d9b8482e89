"""The data path: joins two file descriptors (usually two TCP sockets) and moves
their bytes in the kernel, away from the Twisted loop.

Twisted accepts and connects; :func:`relay.datapath.join.join` then takes the two
sockets out of Twisted and gives them to a *pump*, which copies both directions until both
have ended (half-close travels: EOF one way, data still flowing the other), or
one end fails (the other end is then reset).  Back-pressure is the kernel's: a
full socket stops its direction until it drains; nothing is buffered beyond one
pipe (or one 64 KiB buffer) per direction.  No byte is lost to EAGAIN, EINTR,
partial moves, or EOF with bytes still in the pipe.

Two backends, chosen once per process by ``LABRELAY_DATAPATH``:

``c``
    :mod:`relay.datapath._splice`'s pump thread (csrc/pump.c): a native thread with
    its own epoll set owns the pairs; the reactor hears from it only when a pair
    ends.  Per wakeup no Python runs at all.  docs/datapath.md has the figures.
``python``
    the same state machine in Python, driven by the reactor (``os.splice``, or
    ``os.read``/``os.write`` where splice is refused).
``portable``
    :mod:`relay.datapath.copyloop`: a plain copy loop (``readv``/``write`` through one
    buffer per direction), driven by the reactor; nothing Linux-only.  What runs
    where there is no ``splice`` (macOS, the BSDs).
``auto`` (default)
    ``c`` when the extension is built, else ``python`` where ``os.splice`` exists
    (Linux), else ``portable``.

Either way, a direction whose fds cannot be spliced (``EINVAL``/``ENOSYS``: a file
opened for append, a tty …) falls back to read/write for that direction alone.
The choice is logged once (``event="datapath_backend"``) and shown by
:meth:`DataPath.status`.
The pieces: :mod:`relay.datapath.pymover` (the Python mover and pipe pool),
:mod:`relay.datapath.pumps` (the two pumps), :mod:`relay.datapath.handoff`
(taking a socket from Twisted).  This module is the facade: the backend choice,
:class:`DataPath`; it re-exports the names callers use.  The hand-off itself (a
connection's preface, then the splice and its counters) is :mod:`relay.datapath.handoff`
and :mod:`relay.datapath.join`.
"""

from __future__ import annotations

import errno
import os
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.datapath import _splice
from relay.datapath.copyloop import CopyPump
from relay.datapath.handoff import Held as Held
from relay.datapath.handoff import detach_transport as detach_transport
from relay.datapath.pumps import PairDone as PairDone
from relay.datapath.pumps import ReactorPump as ReactorPump
from relay.datapath.pumps import ThreadPump as ThreadPump
from relay.datapath.pymover import COPY_BUF_SIZE as COPY_BUF_SIZE
from relay.datapath.pymover import DEFAULT_BUDGET, DEFAULT_PIPE_SIZE, End, _reset_and_close
from relay.datapath.pymover import Mover as Mover
from relay.datapath.pymover import PyDirection as PyDirection
from relay.datapath.pymover import PyPipePool as PyPipePool

ENV = "LABRELAY_DATAPATH"
CHOICES = ("auto", "c", "python", "portable")

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
    name: str  # "c", "python" or "portable"
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
    if wanted == "portable":
        return Backend("portable", f"{ENV}=portable")
    can_splice = hasattr(os, "splice")
    if wanted == "python":
        if not can_splice:
            raise DatapathError(f"{ENV}=python needs os.splice (Linux); "
                                f"set {ENV}=portable (or auto) here")
        return Backend("python", f"{ENV}=python")
    if _splice.AVAILABLE:
        return Backend("c", f"{ENV}={wanted}")
    if wanted == "c":
        raise DatapathError(
            f"{ENV}=c but the native module is not available ({_splice.IMPORT_ERROR}); "
            "rebuild with `pip install -e .` (needs a C compiler and Python headers), "
            f"or set {ENV}={'python' if can_splice else 'portable'}"
        )
    if not can_splice:
        return Backend("portable", "no native module and no splice on this system")
    return Backend("python", f"native module not available ({_splice.IMPORT_ERROR})")

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

    def pause(self, a_to_b: bool, b_to_a: bool) -> None:
        """Pause (True) or resume (False) each direction: a paused direction reads no
        more from its source, so its peer's TCP window closes (a rate limit)."""
        if self.result is None:
            self._datapath.pump.pause(self.id, int(a_to_b) | int(b_to_a) << 1)


class DataPath:
    """The process's pump for one reactor; see the module docstring."""

    def __init__(self, reactor: Any, backend: Backend | None = None, *,
                 pipe_size: int = DEFAULT_PIPE_SIZE, max_pipes: int = 1024,
                 max_idle_pipes: int = 64, budget: int = DEFAULT_BUDGET,
                 copy: bool = False, short_waits: bool = True) -> None:
        self.reactor = reactor
        self.backend = backend if backend is not None else choose_backend()
        self._options: dict[str, Any] = dict(
            pipe_size=pipe_size, max_pipes=max_pipes, max_idle_pipes=max_idle_pipes,
            budget=budget, copy=copy, short_waits=short_waits)
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
            self._pump = self.make_pump(**self._options)
        return self._pump

    def make_pump(self, **options: Any) -> ThreadPump | ReactorPump:
        """A new pump of the chosen backend (the seam the benchmark's variants use)."""
        if self.backend.name == "c":
            return ThreadPump(self.reactor, **options)
        if self.backend.name == "portable":
            return CopyPump(self.reactor, **options)
        return ReactorPump(self.reactor, **options)

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
            _log.info("data path: {backend} backend ({reason}); AES-GCM thread: {aead}",
                      event="datapath_backend", backend=backend.name, reason=backend.reason,
                      aead=(backend.name == "c" and _splice.aead_library()) or "none")
    return dp


def status(reactor: Any) -> dict[str, Any] | None:
    """The data path's status for ``reactor``, or None if it was never used."""
    dp = _datapaths.get(reactor)
    return None if dp is None else dp.status()


def describe(reactor: Any) -> dict[str, Any]:
    """What ``labrelay status`` shows of the data path: its status once used, else the
    backend it will run (``backend``, ``reason``), or why none can."""
    used = status(reactor)
    if used is not None:
        return used
    try:
        backend = choose_backend()
    except DatapathError as e:
        return {"backend": "none", "reason": str(e)}
    return {"backend": backend.name, "reason": backend.reason}
