"""The relay's part of ``labrelay status`` (the admin endpoint's JSON): who is
connected, what is registered, every session with its bytes, and the aggregates of
the one :class:`relay.core.sessions.SessionTable` (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from relay.config.schema import RelayConfig
from relay.core.router import label_of
from relay.core.routing import Registration, Registry
from relay.core.sessions import SessionTable
from relay.ssh.server import RelayConnection


def relay_status(now: float, config: RelayConfig, connections: Collection[RelayConnection],
                 registry: Registry, sessions: SessionTable, public_ports: list[int],
                 more: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot at ``now``; ``more`` (fast path, admission, counters) is added as is.

    Built whole at each request (the admin endpoint cuts the long lists afterwards,
    relay.ops.statusview), so each registration's row costs little: its label made
    once, its totals looked up once (an agent granted ``tb:*`` may hold thousands; at
    3000 this took 4.4 ms of the reactor per request, now about half: docs/operations.md)."""
    conns = sorted(connections, key=lambda c: (c.identity.kind, c.principal_name))
    regs = registry.registrations()
    labels = {id(r): _label(r) for r in regs}
    services = []
    for r in regs:
        label = labels[id(r)]
        active, total = sessions.session_counts(label)
        services.append({"service": label, "owner": r.owner, "since": r.since,
                         "sessions_active": active, "sessions_total": total})
    return {
        "listen": str(config.listen),
        "agents": [
            {"name": c.principal_name, "peer": c.peer,
             # what its version line said (relay.ssh.peersoftware): "0.2.0.dev0",
             # "unknown (before 0.2.0.dev0)", "not labrelay: OpenSSH_9.2p1"
             "version": c.software.shown, "software": c.software.software,
             "services": [labels.get(id(r)) or _label(r) for r in registry.held_by(c)]}
            for c in conns if c.identity.kind == "agent"
        ],
        "users": [{"name": c.principal_name, "peer": c.peer}
                  for c in conns if c.identity.kind == "user"],
        "services": services,
        "sessions": [
            {"user": s.user, "service": s.service, "origin": s.origin, "path": s.path,
             "age": round(now - s.started, 3), "bytes_to_service": s.counts()[0],
             "bytes_from_service": s.counts()[1]}
            for s in sessions.rows()
        ],
        "per_service": sessions.per_service(),
        "per_user": sessions.per_user(),
        "per_user_totals": sessions.per_user_totals(),
        "public_ports": public_ports,
        **more,
    }


def _label(reg: Registration) -> str:
    return label_of(reg.name, reg.port)
