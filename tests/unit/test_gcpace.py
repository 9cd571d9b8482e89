"""relay.ops.gcpace: cyclic garbage collected at the pacer's ticks, not in sessions'
turns; the interpreter's own threshold kept (raised) so memory stays bounded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from twisted.internet.task import Clock

from relay.ops.gcpace import CEILING, FLOOR, INTERVAL, CollectorPacing, due_generation


@pytest.mark.parametrize(("counts", "due"), [
    ((0, 0, 0), None),
    ((FLOOR - 1, 9, 9), None),
    ((FLOOR, 0, 0), 0),
    ((5000, 3, 0), 0),
    ((0, 10, 0), 1),
    ((FLOOR, 10, 9), 1),
    ((0, 0, 10), 2),
    ((FLOOR, 10, 10), 2),
])
def test_the_oldest_generation_whose_count_reached_its_threshold_is_due(
        counts: tuple[int, int, int], due: int | None) -> None:
    assert due_generation(counts) == due


class FakeCollector:
    """The interpreter's bookkeeping of gc.collect and its counts, without touching the
    test process's own collector."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.threshold = (700, 10, 10)
        self.frozen = False
        self.calls: list[int] = []

    def collect(self, generation: int = 2) -> int:
        self.calls.append(generation)
        for g in range(generation + 1):
            self.counts[g] = 0
        if generation < 2:
            self.counts[generation + 1] += 1
        return 0

    def freeze(self) -> None:
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    def get_count(self) -> tuple[int, int, int]:
        return (self.counts[0], self.counts[1], self.counts[2])

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, t0: int, t1: int = 10, t2: int = 10) -> None:
        self.threshold = (t0, t1, t2)


def test_start_collects_once_freezes_and_raises_the_young_threshold_stop_undoes_it() -> None:
    clock, gc = Clock(), FakeCollector()
    pacing = CollectorPacing(clock, gc)
    pacing.startService()
    assert gc.calls == [2] and gc.frozen and gc.threshold == (CEILING, 10, 10)
    pacing.stopService()
    assert gc.threshold == (700, 10, 10) and not gc.frozen
    assert not clock.getDelayedCalls()


def test_ticks_collect_what_is_due_and_nothing_when_idle() -> None:
    clock, gc = Clock(), FakeCollector()
    pacing = CollectorPacing(clock, gc)
    pacing.startService()
    gc.calls.clear()
    clock.advance(INTERVAL)  # idle: nothing new
    assert gc.calls == []
    for _ in range(10):  # ten busy ticks: ten young collections...
        gc.counts[0] += FLOOR
        clock.advance(INTERVAL)
    assert gc.calls == [0] * 10
    clock.advance(INTERVAL)  # ...make the middle generation due, even with nothing new
    assert gc.calls[-1] == 1
    assert pacing.status() == {"paced": True, "interval_s": INTERVAL,
                               "collections": [10, 1, 0],
                               "longest_ms": pacing.status()["longest_ms"]}
    for _ in range(9):  # ten middle ones make the full one due
        gc.counts[1] = 10
        clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert gc.calls[-1] == 2 and pacing.collections == [10, 10, 1]
    pacing.stopService()
    assert pacing.status()["paced"] is False


def test_with_the_real_collector_cycles_wait_for_the_tick_and_a_burst_still_collects() -> None:
    """In a child process (the collector is the process's): cyclic garbage below the
    ceiling lives until the next tick and is collected there; a burst past the ceiling
    is collected by the interpreter itself, between ticks."""
    script = textwrap.dedent(f"""
        import gc, weakref
        from twisted.internet.task import Clock
        from relay.ops.gcpace import CollectorPacing, CEILING

        class Node:
            pass

        def cycles(n):
            refs = []
            for _ in range(n):
                a, b = Node(), Node()
                a.other, b.other = b, a
                refs.append(weakref.ref(a))
            return refs

        clock = Clock()
        pacing = CollectorPacing(clock)
        pacing.startService()
        assert gc.get_threshold()[0] == CEILING, gc.get_threshold()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        few = cycles(2000)                      # 8000 objects: below the ceiling
        assert sum(r() is not None for r in few) == 2000
        clock.advance({INTERVAL})
        assert all(r() is None for r in few), "the tick did not collect them"
        burst = cycles(CEILING)                 # past the ceiling, with no tick
        assert sum(r() is None for r in burst) > 0, "the ceiling did not hold"
        pacing.stopService()
        assert gc.get_threshold()[0] == 700 and gc.get_freeze_count() == 0
        print("ok", pacing.collections)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok [1, 0, 0]"), done.stdout
