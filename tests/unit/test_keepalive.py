"""``KeepaliveMonitor`` driven by ``task.Clock``: when keepalives go out, when a link is dead."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from relay.core.keepalive import KeepaliveMonitor

INTERVAL = 15.0
COUNT = 3


class Recorder:
    """Records keepalives sent and deaths declared, with the clock time of each."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[float] = []
        self.dead: list[float] = []

    def send(self) -> None:
        self.sent.append(self.clock.seconds())

    def on_dead(self, silence: float) -> None:
        self.dead.append(silence)


def make(
    interval: float = INTERVAL, count: int = COUNT
) -> tuple[Clock, Recorder, KeepaliveMonitor]:
    clock = Clock()
    rec = Recorder(clock)
    monitor = KeepaliveMonitor(clock, interval, count, rec.send, rec.on_dead)
    monitor.start()
    return clock, rec, monitor


def advance(clock: Clock, seconds: float, step: float = 1.0) -> None:
    """Advance in small steps, as a real reactor would, so chained timers fire."""
    target = clock.seconds() + seconds
    while clock.seconds() + step < target:
        clock.advance(step)
    clock.advance(target - clock.seconds())


def test_no_keepalive_while_traffic_flows() -> None:
    clock, rec, monitor = make()
    for _ in range(100):  # a packet every 10 s for 1000 s
        clock.advance(10.0)
        monitor.activity()
    assert rec.sent == []
    assert rec.dead == []
    monitor.stop()


def test_first_keepalive_after_one_interval_of_silence() -> None:
    clock, rec, monitor = make()
    clock.advance(INTERVAL - 0.001)
    assert rec.sent == []
    clock.advance(0.001)
    assert rec.sent == [INTERVAL]
    monitor.stop()


def test_one_keepalive_per_interval_then_dead_after_count_unanswered() -> None:
    """count_max keepalives go out, one per interval, each given an interval to be
    answered; then the link is dead (OpenSSH's ServerAliveCountMax)."""
    clock, rec, monitor = make()
    limit = INTERVAL * (COUNT + 1)
    assert monitor.limit == limit
    advance(clock, limit - 0.001, step=0.5)
    assert rec.sent == [INTERVAL * k for k in range(1, COUNT + 1)]
    assert monitor.sent == COUNT
    assert rec.dead == []
    clock.advance(0.001)
    assert rec.dead == [pytest.approx(limit)]
    assert len(rec.sent) == COUNT
    assert clock.getDelayedCalls() == []


def test_dead_is_declared_once() -> None:
    clock, rec, _monitor = make()
    advance(clock, 1000.0)
    assert len(rec.dead) == 1
    assert clock.getDelayedCalls() == []


def test_count_max_one_still_probes_before_declaring_dead() -> None:
    """An idle but healthy link must not be cut without asking the peer first."""
    clock, rec, monitor = make(count=1)
    clock.advance(INTERVAL)
    assert rec.sent == [INTERVAL]
    assert rec.dead == []
    clock.advance(1.0)  # the peer answers the keepalive
    monitor.activity()
    advance(clock, INTERVAL * 2 - 0.001)
    assert rec.dead == []
    assert rec.sent == [INTERVAL, INTERVAL * 2 + 1.0]
    monitor.stop()


def test_any_activity_resets_the_count_and_the_deadline() -> None:
    clock, rec, monitor = make()
    advance(clock, INTERVAL * COUNT)  # every keepalive sent, none answered yet
    assert monitor.sent == COUNT
    answered = clock.seconds()
    monitor.activity()  # e.g. the REQUEST_FAILURE answering the last one
    assert monitor.sent == 0
    advance(clock, INTERVAL - 0.001)
    assert len(rec.sent) == COUNT  # silence restarts from the answer
    clock.advance(0.001)
    assert rec.sent[-1] == answered + INTERVAL
    advance(clock, INTERVAL * COUNT - 0.001)
    assert rec.dead == []
    clock.advance(0.001)
    assert rec.dead == [pytest.approx(INTERVAL * (COUNT + 1))]


def test_activity_between_ticks_defers_the_next_keepalive() -> None:
    clock, rec, monitor = make()
    clock.advance(10.0)
    monitor.activity()
    clock.advance(INTERVAL - 0.001)  # 24.999: the timer set for 15 fired and rescheduled
    assert rec.sent == []
    clock.advance(0.001)
    assert rec.sent == [pytest.approx(10.0 + INTERVAL)]
    monitor.stop()


def test_interval_zero_disables() -> None:
    clock, rec, monitor = make(interval=0.0)
    assert clock.getDelayedCalls() == []
    clock.advance(10_000.0)
    assert rec.sent == []
    assert rec.dead == []
    monitor.stop()


def test_stop_leaves_no_delayed_calls() -> None:
    clock, rec, monitor = make()
    clock.advance(INTERVAL)  # mid-sequence, with a timer pending
    assert clock.getDelayedCalls() != []
    monitor.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10_000.0)
    assert rec.dead == []
    monitor.stop()  # idempotent


def test_restart_does_not_leak_a_timer() -> None:
    clock, _rec, monitor = make()
    monitor.start()
    assert len(clock.getDelayedCalls()) == 1
    monitor.stop()
    assert clock.getDelayedCalls() == []


def test_fractional_interval_is_exact() -> None:
    clock, rec, monitor = make(interval=0.1, count=3)
    advance(clock, 0.4 - 1e-6, step=0.01)
    assert len(rec.sent) == 3
    assert rec.dead == []
    advance(clock, 1e-6)
    assert len(rec.dead) == 1
    assert monitor.sent == 3


def test_a_process_that_did_not_run_does_not_call_its_peer_dead_on_waking() -> None:
    """SIGSTOP/SIGCONT, a paused VM: the timer is found due long ago (one advance, as a
    stopped reactor sees it).  The peer never got a keepalive to answer, so it is asked
    now, not declared dead; it answers and the link lives on."""
    clock, rec, monitor = make()
    clock.advance(5.0)  # a healthy idle peer: silent, not yet probed
    clock.advance(INTERVAL * (COUNT + 1) * 3)  # the process stopped for 3 limits
    assert rec.dead == []
    assert rec.sent == [clock.seconds()]  # probed on waking
    clock.advance(0.05)
    monitor.activity()  # the peer answers
    advance(clock, INTERVAL * COUNT, step=0.5)
    assert rec.dead == []
    monitor.stop()


def test_a_dead_peer_is_still_found_after_the_process_ran_again() -> None:
    """Waking does not spare a peer that is really gone: count_max keepalives in the
    process's running time, then dead, ``limit`` after the silence began (minus what
    was slept)."""
    clock, rec, _monitor = make()
    clock.advance(5.0)
    clock.advance(1000.0)  # stopped
    woke = clock.seconds()
    advance(clock, INTERVAL * (COUNT + 1), step=0.5)
    assert len(rec.dead) == 1
    assert len(rec.sent) == COUNT
    assert rec.sent[0] == woke
    assert rec.dead[0] == pytest.approx(INTERVAL * (COUNT + 1))
