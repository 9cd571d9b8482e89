"""``target_unreachable``: a failed connect to a forward's target, logged once per burst
per target (relay.agent.link.Link.targetUnreachable, round 20).

It was one warning per failed connect, from the channel route (relay.ssh.client) and
the fast path's dispatches (relay.agent.datapool): a relay taken over, or a busy lab
whose host died, filled the agent's log and the journal at the rate of failures.  The
real-process count is ``tests/security/test_hostile_relay.py::
test_failed_connects_to_a_declared_target_cost_two_log_lines``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from relay.agent.link import UNREACHABLE_WINDOW, Link
from relay.config.loader import parse_config

CONFIG = """
[[link]]
name = "cloud"
host = "cloud.example.org"
user = "lab"

[[link.remote]]
name = "web"
listen = "web:8080"
connect = "127.0.0.1:8080"

[[link.remote]]
name = "gpu"
listen = "gpu:22"
connect = "10.0.0.5:22"
"""


@pytest.fixture
def events() -> Any:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _unreachable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "target_unreachable"]


def test_a_burst_of_failed_connects_is_one_line_then_a_count_per_target(
    events: list[dict[str, Any]],
) -> None:
    clock = MemoryReactorClock()
    link = Link(parse_config(CONFIG, "test.toml", base_dir=Path("/")).links[0], clock, [])
    for i in range(500):
        link.targetUnreachable("web", "127.0.0.1:8080", f"Connection refused #{i}")
    (first,) = _unreachable(events)
    assert first["forward"] == "web" and first["target"] == "127.0.0.1:8080"
    assert first["reason"] == "Connection refused #0" and first["count"] == 1
    assert first["log_level"].name == "warn"
    # Another target's failure in the same window is news: its own first line.
    link.targetUnreachable("gpu", "10.0.0.5:22", "No route to host")
    assert [e["forward"] for e in _unreachable(events)] == ["web", "gpu"]
    clock.advance(UNREACHABLE_WINDOW)
    web_more = [e for e in _unreachable(events) if e["forward"] == "web"][1:]
    assert [(e["count"], e["reason"]) for e in web_more] == [(499, "Connection refused #499")]
    assert len(_unreachable(events)) == 3  # gpu had one failure: no count line
    # After the window, the next failure is a new burst's first line, at once.
    link.targetUnreachable("web", "127.0.0.1:8080", "Connection refused again")
    assert _unreachable(events)[-1]["reason"] == "Connection refused again"
    assert _unreachable(events)[-1]["count"] == 1


def test_the_link_stopping_says_how_many_more_there_were(events: list[dict[str, Any]]) -> None:
    clock = MemoryReactorClock()
    link = Link(parse_config(CONFIG, "test.toml", base_dir=Path("/")).links[0], clock, [])
    for _ in range(3):
        link.targetUnreachable("gpu", "10.0.0.5:22", "timeout")
    link.stopService()
    assert [e["count"] for e in _unreachable(events)] == [1, 2]
