"""Cyclic garbage collection at a steady pace, in a turn of its own, not in a session's.

Why: CPython starts a young collection whenever 700 more container objects are alive
than at the last one.  In a relay or an agent that is about every second new session,
inside whichever turn made the 700th object, and that is usually a session's set-up or
its teardown.  Measured on the bench VM after a 50 ms idle gap (docs/benchmarks.md,
"Set-up after an idle gap"), caches are cold then:
- a young collection costs 0.08–0.3 ms;
- every tenth one, the middle generation, about 1 ms;
- a full one 13–18 ms, most of it spent walking the start-up heap (imported modules,
  the config, keys), which is never garbage.
A session that had its open in such a turn waited for it.

So a process that owns itself (``labrelay relay|agent``, ``twistd labrelay``; never a
node built inside a test process) runs :class:`CollectorPacing`:
- at start, one full collection, then ``gc.freeze()``: the start-up heap goes to the
  permanent generation, and no later collection walks it again;
- every ``interval`` seconds, in a timer's own turn, the generation that is due, by
  the interpreter's own rule (young when ``floor`` objects are new; the middle one
  every tenth young one, the oldest every tenth middle one); nothing when idle;
- the interpreter's automatic threshold stays, raised to ``ceiling``: a burst that
  makes that many objects between two ticks is still collected at once, so memory
  stays bounded whatever the load.
At stop the thresholds are restored and the start-up heap unfrozen.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

INTERVAL = 0.5
"""Seconds between ticks: cyclic garbage waits at most this long unless the
``ceiling`` is reached first."""

FLOOR = 100
"""A young collection is due once this many container objects are new: an idle
process does nothing at its ticks."""

CEILING = 20_000
"""The interpreter's own young threshold while paced (its default: 700)."""

OLDER_EVERY = 10
"""An older generation is due after this many collections of the one below it (the
interpreter's default for both)."""


class Collector(Protocol):
    """What :class:`CollectorPacing` uses of the :mod:`gc` module (tests give a fake:
    the real one is the test process's own)."""

    def collect(self, generation: int = 2) -> int: ...
    def freeze(self) -> None: ...
    def unfreeze(self) -> None: ...
    def get_count(self) -> tuple[int, int, int]: ...
    def get_threshold(self) -> tuple[int, int, int]: ...
    def set_threshold(self, threshold0: int, threshold1: int = ...,
                      threshold2: int = ...) -> None: ...


def due_generation(counts: tuple[int, int, int], floor: int = FLOOR,
                   older_every: int = OLDER_EVERY) -> int | None:
    """The generation to collect at a tick, from ``gc.get_count()``: the oldest one
    whose count has reached its threshold (``counts[1]`` counts young collections since
    the last middle one, ``counts[2]`` middle ones since the last full one), or ``None``
    when nothing is due."""
    young, middle, full = counts
    if full >= older_every:
        return 2
    if middle >= older_every:
        return 1
    if young >= floor:
        return 0
    return None


class CollectorPacing(Service):
    """Collects cyclic garbage at ticks of ``interval`` seconds of ``clock`` (see the
    module's docstring); :meth:`status` is what ``labrelay status`` shows of it."""

    def __init__(self, clock: Any, collector: Collector = gc, *,  # type: ignore[assignment]
                 interval: float = INTERVAL, floor: int = FLOOR, ceiling: int = CEILING,
                 older_every: int = OLDER_EVERY) -> None:
        self.clock = clock
        self.collector = collector
        self.interval = interval
        self.floor = floor
        self.ceiling = ceiling
        self.older_every = older_every
        self.collections = [0, 0, 0]
        self.longest_ns = 0
        self._saved: tuple[int, int, int] | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)  # first: its first use imports
        c = self.collector
        self._saved = c.get_threshold()
        c.collect()
        c.freeze()
        c.set_threshold(self.ceiling, self._saved[1], self._saved[2])

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._saved is not None:
            self.collector.set_threshold(*self._saved)
            self.collector.unfreeze()
            self._saved = None
        return super().stopService()

    def tick(self) -> int | None:
        """Collect the generation that is due, if any; which one it was."""
        generation = due_generation(self.collector.get_count(), self.floor, self.older_every)
        if generation is None:
            return None
        started = time.perf_counter_ns()
        self.collector.collect(generation)
        self.longest_ns = max(self.longest_ns, time.perf_counter_ns() - started)
        self.collections[generation] += 1
        return generation

    def status(self) -> dict[str, Any]:
        return {"paced": bool(self.running), "interval_s": self.interval,
                "collections": list(self.collections),
                "longest_ms": round(self.longest_ns / 1e6, 3)}
