"""``PerKeyLog``: a user refused in a loop costs a bounded number of log lines."""

from __future__ import annotations

from twisted.internet.task import Clock

from relay.core.burstlog import PerKeyLog


def test_the_first_of_a_window_are_logged_the_rest_counted_per_key() -> None:
    clock = Clock()
    said: list[tuple[str, int, str]] = []
    log = PerKeyLog(clock, 10.0, 3, lambda k, n, why: said.append((k, n, why)))
    assert [log.allow("alice", f"r{i}") for i in range(1000)] == [True] * 3 + [False] * 997
    assert log.allow("bob", "x")  # another user's budget is her own
    clock.advance(10)
    assert said == [("alice", 997, "r999")]  # bob had nothing unlogged: no line
    assert log.allow("alice", "again")  # a new window
    assert log.allow("alice", "again") and log.allow("alice", "again")
    assert not log.allow("alice", "again")
    log.stop()
    assert said[-1] == ("alice", 1, "again") and clock.getDelayedCalls() == []
