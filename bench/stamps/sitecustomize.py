"""Stamps on the socket calls and reactor wake-ups of ``labrelay relay`` and ``labrelay
agent`` processes (CLOCK_MONOTONIC, about a microsecond per call, no ptrace): the
per-step timing of a new session in docs/benchmarks.md ("Set-up after an idle gap").

Put this directory first on ``PYTHONPATH`` and set ``LABRELAY_STAMP_DIR``; every
``python -m relay relay|agent`` started then records ``accept``, ``connect`` (and
``connect_ex``), ``send``/``sendmsg``/``sendall``, ``recv``, each return of the epoll
reactor's poll (``wake``, a reactor iteration; ``sleep`` as it enters it) and each
``epoll_ctl`` (``ctl``), and
writes them to ``$LABRELAY_STAMP_DIR/<relay|agent>-<pid>.txt`` at exit or on SIGUSR2
(with ``LABRELAY_STAMP_PROFILE=1`` also a cProfile of the whole process, ``.prof``).
``bench/setup_ab.py --stamp-dir`` does this for both trees; ``bench/setup_steps.py``
reads the files.  Nothing here is imported by labrelay itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_LOG: list[tuple[int, str, int, int, int]] = []


def _install(role: str, where: str) -> None:
    import atexit
    import signal
    import socket
    import time

    now = time.monotonic_ns
    rec = _LOG.append
    cls = socket.socket

    def wrap(name: str, kind: str) -> None:
        orig = getattr(cls, name)

        def stamped(self: Any, *a: Any, **k: Any) -> Any:
            r = orig(self, *a, **k)
            t = now()
            if kind == "recv":
                rec((t, "recv", self.fileno(), len(r), 0))
            elif kind == "send":
                rec((t, "send", self.fileno(), r if isinstance(r, int) else -1, 0))
            elif kind == "accept":
                peer = r[1][1] if isinstance(r[1], tuple) else 0
                rec((t, "accept", r[0].fileno(), 0, peer))
            else:
                port = a[0][1] if a and isinstance(a[0], tuple) else 0
                rec((t, "connect", self.fileno(), 0, port))
            return r

        setattr(cls, name, stamped)

    wrap("recv", "recv")
    for name in ("send", "sendmsg", "sendall"):
        wrap(name, "send")
    wrap("accept", "accept")
    wrap("connect_ex", "connect")
    wrap("connect", "connect")

    profile = None
    mode = os.environ.get("LABRELAY_STAMP_PROFILE", "")
    if mode:  # cProfile too: where the Python time goes
        import cProfile

        profile = cProfile.Profile()
        if mode != "idle":
            profile.enable()

    def dump() -> None:
        with open(os.path.join(where, f"{role}-{os.getpid()}.txt"), "w") as f:
            for e in _LOG:
                f.write(" ".join(map(str, e)) + "\n")
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.path.join(where, f"{role}-{os.getpid()}.prof"))

    def dump_and_exit(signum: int, frame: Any) -> None:
        dump()
        os._exit(0)

    atexit.register(dump)
    signal.signal(signal.SIGUSR2, dump_and_exit)
    _patch_epoll(now, profile if mode == "idle" else None)
    _watch_gc(now)


def _watch_gc(now: Any) -> None:
    """A ``gc`` stamp per cyclic-GC collection: its generation, the objects it freed and
    its nanoseconds (``gc.callbacks``), to see whether collections fall on a set-up."""
    import gc

    rec = _LOG.append
    started = [0]

    def watch(phase: str, info: dict[str, int]) -> None:
        t = now()
        if phase == "start":
            started[0] = t
        else:
            rec((t, "gc", info.get("generation", -1), info.get("collected", 0), t - started[0]))

    gc.callbacks.append(watch)


def _patch_epoll(now: Any, idle_profile: Any = None) -> None:
    """``idle_profile``: a cProfile enabled only for the reactor turn that follows an
    idle gap of 20 ms or more (``LABRELAY_STAMP_PROFILE=idle``), or for every turn
    within ``LABRELAY_STAMP_WINDOW_MS`` of it: the call counts of a set-up after idle,
    summed over sessions (exact whatever the load)."""
    from twisted.internet import epollreactor

    init = epollreactor.EPollReactor.__init__
    rec = _LOG.append
    slept = [0, False]  # when the profiled window began; whether it is on
    # LABRELAY_STAMP_WINDOW_MS: profile every turn this long after the idle wake (the
    # whole set-up) rather than the first turn only (0, the default)
    window = float(os.environ.get("LABRELAY_STAMP_WINDOW_MS", "0")) * 1e6

    class Poller:
        def __init__(self, real: Any) -> None:
            self.real = real

        def poll(self, *a: Any) -> Any:
            t = now()
            if slept[1] and t - slept[0] > window:
                idle_profile.disable()
                slept[1] = False
            rec((t, "sleep", 0, 0, 0))  # the iteration's work is done: into epoll_wait
            r = self.real.poll(*a)
            woke = now()
            rec((woke, "wake", len(r), 0, 0))
            if idle_profile is not None and r and not slept[1] and woke - t > 20_000_000:
                slept[0], slept[1] = woke, True
                idle_profile.enable()
            return r

        def register(self, *a: Any) -> Any:
            rec((now(), "ctl", 0, 0, 0))
            return self.real.register(*a)

        def modify(self, *a: Any) -> Any:
            rec((now(), "ctl", 0, 0, 0))
            return self.real.modify(*a)

        def unregister(self, *a: Any) -> Any:
            rec((now(), "ctl", 0, 0, 0))
            return self.real.unregister(*a)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    def __init__(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        self._poller = Poller(self._poller)

    epollreactor.EPollReactor.__init__ = __init__  # type: ignore[method-assign]


def _role() -> str | None:
    args = getattr(sys, "orig_argv", sys.argv)
    if "-m" not in args:
        return None
    i = args.index("-m")
    if args[i + 1:i + 2] == ["relay"] and args[i + 2:i + 3] in (["relay"], ["agent"]):
        return args[i + 2]
    return None


_where = os.environ.get("LABRELAY_STAMP_DIR")
_r = _role() if _where else None
if _where and _r:
    _install(_r, _where)
