"""The audit's ``session_open`` is logged once the new session's open has left for the
agent, and always before its ``session_close`` (RelayCore.auditOpened; set-up latency,
docs/benchmarks.md "Set-up after an idle gap")."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from relay.config.schema import RelayConfig
from relay.datapath.dialnow import dial_now
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.testing import KeyRing


def _core(reactor: Any) -> RelayCore:
    ring = KeyRing()
    config = RelayConfig(agents=(ring.agent("lab_pc", "gpu-cluster:22"),),
                         users=(ring.user("alice", "gpu-cluster:22"),))
    return RelayCore(config, Grants(config, "test"), reactor)


def _audit(logs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if e.get("audit")]


def test_logged_after_the_turns_writes_left() -> None:
    """Turn N queues a write (the open) and asks for the event; the next reactor
    iteration sends the write, and only the one after that logs the event."""
    reactor = EPollReactor()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        proto = []
        dial_now(reactor, socket.AF_INET, "127.0.0.1", listener.getsockname()[1], Protocol,
                 5.0).addCallback(proto.append)
        peer, _ = listener.accept()
        peer.setblocking(False)
        core = _core(reactor)
        row = core.sessions.open("alice", "gpu-cluster:22", "127.0.0.1:5000", 0.0)
        with capturedLogs() as logs:
            proto[0].transport.write(b"CHANNEL_OPEN")  # turn N
            core.auditOpened(row)
            assert _audit(logs) == []
            reactor.iterate(0)
            assert peer.recv(64) == b"CHANNEL_OPEN"
            assert _audit(logs) == []
            reactor.iterate(0)
            assert _audit(logs) == ["session_open"]
            (event,) = [e for e in logs if e.get("event") == "session_open"]
            assert event["user"] == "alice" and event["started"] == 0.0
            reactor.iterate(0)
            assert _audit(logs) == ["session_open"]  # once
        proto[0].transport.abortConnection()
        peer.close()
    finally:
        listener.close()
        for call in reactor.getDelayedCalls():
            call.cancel()


def test_a_session_that_ends_first_logs_its_open_then_its_close_once() -> None:
    clock = MemoryReactorClock()
    core = _core(clock)
    row = core.sessions.open("alice", "gpu-cluster:22", "127.0.0.1:5000", 0.0)
    with capturedLogs() as logs:
        core.auditOpened(row)
        core.sessionEnded(row, 0, 0, "agent unavailable")
        clock.advance(0)
        clock.advance(0)
    assert _audit(logs) == ["session_open", "session_close"]
