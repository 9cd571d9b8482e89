"""What ``/status.json`` and the status page show of a snapshot: bounded lists.

The relay's snapshot lists every registration, every open session and every user
connection, and an agent granted ``tb:*`` may register all 65 535 ports of it: at
3 000 registrations ``/status.json`` was ~900 KB, and the HTML page as large, at every
request and every 5 s refresh of an open page (docs/security.md, "The admin
endpoint").  :func:`bounded` keeps the first ``limit`` entries of each such list and
says, exactly, how many there are (``<list>_count``) and, for the registrations, how
many each agent holds under each service name (``services_summary``), so that the
counts stay exact whatever is cut.  ``/status.json?limit=N`` asks for another
``N``, ``?all=1`` for everything (the operator's explicit choice).

Pure: the snapshot in, a new snapshot out; ``/metrics`` still reads the whole
snapshot (its own bound is relay.ops.metrics.WILDCARD_SERIES).
"""

from __future__ import annotations

from typing import Any

DEFAULT_LIMIT = 100
"""Entries of each long list shown unless the request asks otherwise."""
MAX_LIMIT = 10_000
"""The largest ``?limit=`` accepted; ``?all=1`` is the way to ask for everything."""
LONG_LISTS = ("services", "sessions", "users")
"""The relay's lists that grow with what others do (registrations, sessions, user
connections) rather than with the config."""


class BadQuery(ValueError):
    """A ``limit``/``all`` argument that is not a number in range."""


def limit_of(args: dict[bytes, list[bytes]]) -> int | None:
    """The limit a request's query arguments ask for: ``None`` for ``all=1``, else
    ``limit`` (0 .. :data:`MAX_LIMIT`) or :data:`DEFAULT_LIMIT`."""
    if args.get(b"all", [b""])[-1] in (b"1", b"true", b"yes"):
        return None
    raw = args.get(b"limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw[-1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadQuery(f"limit must be a whole number, got {raw[-1]!r}") from None
    if not 0 <= value <= MAX_LIMIT:
        raise BadQuery(f"limit must be between 0 and {MAX_LIMIT} (or ask all=1), got {value}")
    return value


def _explicit(relay: dict[str, Any]) -> set[str]:
    return {g["service"] for g in relay.get("service_grants", [])
            if not g["service"].endswith(":*")}


def bounded(snapshot: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """``snapshot`` with each long list of its relay part cut to ``limit`` entries
    (``None``: nothing cut), each with its exact ``<list>_count``; the registrations
    explicitly granted come first (the page shows a granted service absent from the
    list as down), and ``services_summary`` counts them per agent and name."""
    relay = snapshot.get("relay")
    if relay is None:
        return snapshot
    relay = dict(relay)
    services = relay.get("services", [])
    summary: dict[tuple[str, str], int] = {}
    for svc in services:
        key = (svc["owner"], svc["service"].rpartition(":")[0])
        summary[key] = summary.get(key, 0) + 1
    relay["services_summary"] = [{"owner": owner, "name": name, "registered": n}
                                 for (owner, name), n in sorted(summary.items())]
    for name in LONG_LISTS:
        relay[f"{name}_count"] = len(relay.get(name, []))
    relay["limit"] = limit
    if limit is None:
        return {**snapshot, "relay": relay}
    granted = _explicit(relay)
    first = [s for s in services if s["service"] in granted]
    relay["services"] = (first + [s for s in services if s["service"] not in granted])[:limit]
    relay["sessions"] = relay.get("sessions", [])[:limit]
    relay["users"] = relay.get("users", [])[:limit]
    shown = {s["service"] for s in relay["services"]}
    per_service = relay.get("per_service", {})
    relay["per_service_count"] = len(per_service)
    if len(per_service) > limit:
        # the rows shown first, then the busiest
        keep = [name for name in per_service if name in shown][:limit]
        rest = sorted((n for n in per_service if n not in shown),
                      key=lambda n: -per_service[n].get("sessions_active", 0))
        keep += rest[:limit - len(keep)]
        relay["per_service"] = {name: per_service[name] for name in keep}
    agents = []
    for agent in relay.get("agents", [])[:limit]:
        held = agent.get("services", [])
        agents.append({**agent, "services": held[:limit], "services_count": len(held)})
    relay["agents_count"] = len(relay.get("agents", []))
    relay["agents"] = agents
    return {**snapshot, "relay": relay}


def cut(relay: dict[str, Any], key: str) -> int:
    """How many entries of the relay's list ``key`` the view left out (0 from a relay
    that does not bound its lists)."""
    total = relay.get(f"{key}_count")
    return 0 if total is None else max(0, int(total) - len(relay.get(key, [])))
