"""relay.server.status.relay_status with thousands of registrations: the snapshot is
built whole at every ``/status.json``, page and ``/metrics`` request (the admin
endpoint cuts it afterwards), so each registration's row must cost one label and one
session lookup, making nothing.  Round 18 measured it with 3000 registrations (an
agent granted ``tb:*``): 7.2 ms of the relay's CPU per ``/status.json`` before, 5.2 ms
after, against 0.8 ms with one registration (docs/operations.md)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from relay.config.schema import RelayConfig
from relay.core.routing import Registry
from relay.core.sessions import SessionTable
from relay.server.status import relay_status
from relay.ssh.peersoftware import read_version_line


class _CountingTable(SessionTable):
    def __init__(self) -> None:
        super().__init__()
        self.calls = {"totals": 0, "session_counts": 0}

    def totals(self, service: str) -> Any:
        self.calls["totals"] += 1
        return super().totals(service)

    def session_counts(self, service: str) -> tuple[int, int]:
        self.calls["session_counts"] += 1
        return super().session_counts(service)


def test_each_registration_is_looked_up_once_per_snapshot() -> None:
    registry = Registry()
    agent: Any = SimpleNamespace(identity=SimpleNamespace(kind="agent"),
                                 principal_name="lab_pc", peer="192.0.2.1:1",
                                 software=read_version_line(b"SSH-2.0-labrelay_0.3.0"))
    for port in range(1, 3001):
        registry.register("tb", port, agent, "tb", 0.0)
    registry.register("web", 8080, agent, "web", 0.0)
    sessions = _CountingTable()
    snap = relay_status(0.0, RelayConfig(), [agent], registry, sessions, [], {})
    assert sessions.calls == {"totals": 0, "session_counts": 3001}
    assert len(snap["services"]) == 3001
    assert snap["services"][0] == {"service": "tb:1", "owner": "lab_pc", "since": 0.0,
                                   "sessions_active": 0, "sessions_total": 0}
    # the agent's own list: in the order it registered, as before
    assert snap["agents"][0]["services"][:2] == ["tb:1", "tb:2"]
    assert snap["agents"][0]["services"][-1] == "web:8080"


def test_the_counts_are_the_session_tables() -> None:
    table = SessionTable()
    assert table.session_counts("web:8080") == (0, 0)
    first = table.open("alice", "web:8080", "x:1", 0.0)
    table.open("bob", "web:8080", "x:2", 1.0)
    table.close(first, 2.0)
    totals = table.totals("web:8080")
    assert table.session_counts("web:8080") == (len(totals.active), totals.sessions_total)
    assert table.session_counts("web:8080") == (1, 2)
