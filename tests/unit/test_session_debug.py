"""An agent's per-session debug events: emitted with ``-v``, not emitted at all without.

``labrelay`` without ``-v`` prints no debug event, so emitting one per session open is
CPU on the set-up turn for nothing (docs/benchmarks.md, round 12).  What must not
change: with ``-v`` (and in-process nodes and twistd, which keep the default) the
events are there; and the close of a session whose target answered nothing is an
info line either way."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from relay.agent.link import Link
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
"""


class Side:
    """What a bridge needs of a side at its start."""

    def attach(self, bridge: Any) -> None:
        self.bridge = bridge


@pytest.fixture
def events() -> Any:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def session(session_debug: bool | None, events: list[dict[str, Any]],
            to_target: int, from_target: int) -> list[tuple[str, str]]:
    """Open one session on a link built with ``session_debug`` (None: the default),
    close it with those byte counts; the (event, level) pairs the link emitted."""
    config = parse_config(CONFIG, "test.toml", base_dir=Path("/"))
    options = {} if session_debug is None else {"session_debug": session_debug}
    link = Link(config.links[0], MemoryReactorClock(), [], **options)
    forward = link.remote[0]
    bridge = link.sessionStarted(forward, Side(), Side(), "10.0.0.7:5000")
    # A reverse forward's bridge: a is the target, b the relay's channel.
    bridge._onClosed(from_target, to_target)
    assert forward.counters.as_dict()["sessions_total"] == 1
    return [(e["event"], e["log_level"].name) for e in events
            if e.get("event") in ("session_open", "session_closed")]


def test_with_session_debug_both_events_are_emitted(events: list[dict[str, Any]]) -> None:
    assert session(True, events, 10, 20) == [("session_open", "debug"),
                                             ("session_closed", "debug")]


def test_the_default_emits_them(events: list[dict[str, Any]]) -> None:
    """In-process nodes (tests) and twistd keep them: twistd's observer may print them."""
    assert session(None, events, 10, 20) == [("session_open", "debug"),
                                             ("session_closed", "debug")]


def test_without_session_debug_none_is_emitted(events: list[dict[str, Any]]) -> None:
    assert session(False, events, 10, 20) == []


def test_a_target_that_answered_nothing_is_logged_either_way(
    events: list[dict[str, Any]],
) -> None:
    assert session(False, events, 10, 0) == [("session_closed", "info")]


@pytest.mark.parametrize("verbose", [True, False])
def test_labrelay_passes_its_v_flag_down_to_the_links(verbose: bool, tmp_path: Path) -> None:
    from relay.cli.main import _node
    from relay.ssh.keygen import generate_keypair

    key = tmp_path / "id_lab"
    generate_keypair(key, "lab")
    config = parse_config(CONFIG.replace('user = "lab"', f'user = "lab"\nidentity = "{key}"'),
                          "test.toml", base_dir=tmp_path)
    before = signal.getsignal(signal.SIGHUP)
    try:  # _node's service takes SIGHUP when built (relay.ops.hangup)
        node = _node(config, MemoryReactorClock(), print, lambda: config,
                     argparse.Namespace(verbose=verbose, hangup=None))
    finally:
        signal.signal(signal.SIGHUP, before)
    assert [link.session_debug for link in node.links] == [verbose]
