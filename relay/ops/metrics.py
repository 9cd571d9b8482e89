"""``/metrics``: the node's status as Prometheus metrics, through ``prometheus_client``.

One custom collector reads the same status snapshot as ``/status.json`` at every
scrape (:class:`SnapshotCollector`), so the two never disagree, and the exposition
format, escaping and process metrics are the library's.  Each node has its own
``CollectorRegistry`` (no global state; two nodes in one process do not mix).

Names follow the Prometheus conventions (docs/operations.md lists every family):
``labrelay_`` prefix, base units in the name's tail (``_bytes_total``,
``_timestamp_seconds``), ``_total`` on counters only, one family per quantity with
labels for what varies (``direction="to_service"``), a HELP on every family,
``labrelay_build_info`` for the version, and the standard ``process_*`` metrics.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

Snapshot = Callable[[], dict[str, Any]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _gauge(name: str, doc: str, labels: Iterable[str] = (), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _s(value: object) -> str:
    return "" if value is None else str(value)


class SnapshotCollector(Collector):
    """Metric families built from one status snapshot per scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        info = _gauge("labrelay_build_info", "labrelay's version and Python; always 1.",
                      ["version", "python"])
        info.add_metric([_s(snap.get("version")), platform.python_version()], 1)
        yield info
        yield from _links(snap.get("links", []))
        if snap.get("forwards"):
            yield from _plain(snap["forwards"])
        if snap.get("datapath"):
            yield from _datapath(snap["datapath"])
        if snap.get("relay") is not None:
            yield from _relay(snap["relay"])
        if snap.get("reload") is not None:
            yield from _reload(snap["reload"])


def _links(links: list[dict[str, Any]]) -> Iterator[Metric]:
    up = _gauge("labrelay_link_up", "1 while the link is connected and authenticated.",
                ["link"])
    reconnects = _counter("labrelay_link_reconnects",
                          "Times the link came up again after it was lost.", ["link"])
    last_up = _gauge("labrelay_link_last_up_timestamp_seconds",
                     "When the link last came up (Unix time; absent until it has).", ["link"])
    ready = _gauge("labrelay_forward_ready", "1 while the forward is usable.",
                   ["link", "forward", "kind"])
    refusals = _gauge("labrelay_forward_consecutive_refusals",
                      "Refusals of the forward in a row (0 once granted).",
                      ["link", "forward", "kind"])
    active = _gauge("labrelay_forward_sessions_active", "Sessions open now through the forward.",
                    ["link", "forward", "kind"])
    total = _counter("labrelay_forward_sessions", "Sessions through the forward since start.",
                     ["link", "forward", "kind"])
    moved = _counter("labrelay_forward_bytes",
                     "Bytes through the forward, by direction (to_target, from_target).",
                     ["link", "forward", "kind", "direction"])
    fast = _gauge("labrelay_link_fast_path_idle_connections",
                  "Idle pre-dialled fast-path data connections of the link.", ["link"])
    for link in links:
        name = _s(link["name"])
        up.add_metric([name], int(link.get("state") == "connected"))
        reconnects.add_metric([name], link.get("reconnects", 0))
        if link.get("last_up"):
            last_up.add_metric([name], link["last_up"])
        fp = link.get("fast_path") or {}
        if fp.get("state") not in (None, "off"):
            fast.add_metric([name], fp.get("idle", 0))
        for f in link.get("forwards", []):
            labels = [name, _s(f["name"]), _s(f["kind"])]
            ready.add_metric(labels, int(f["state"] in ("ready", "listening")))
            refusals.add_metric(labels, f.get("failures", 0))
            active.add_metric(labels, f["sessions_active"])
            total.add_metric(labels, f["sessions_total"])
            moved.add_metric([*labels, "to_target"], f["bytes_to_target"])
            moved.add_metric([*labels, "from_target"], f["bytes_from_target"])
    yield from (up, reconnects, last_up, ready, refusals, active, total, moved, fast)


def _plain(forwards: list[dict[str, Any]]) -> Iterator[Metric]:
    ready = _gauge("labrelay_plain_forward_listening", "1 while the plain hop listens.",
                   ["forward"])
    active = _gauge("labrelay_plain_forward_sessions_active",
                    "Connections spliced now by the plain hop.", ["forward"])
    total = _counter("labrelay_plain_forward_sessions",
                     "Connections through the plain hop since start.", ["forward"])
    failures = _counter("labrelay_plain_forward_connect_failures",
                        "Target connections the plain hop could not make.", ["forward"])
    moved = _counter("labrelay_plain_forward_bytes",
                     "Bytes through the plain hop, by direction (to_target, from_target).",
                     ["forward", "direction"])
    for f in forwards:
        name = _s(f["name"])
        ready.add_metric([name], int(f.get("state") == "listening"))
        active.add_metric([name], f.get("sessions_active", 0))
        total.add_metric([name], f.get("sessions_total", 0))
        failures.add_metric([name], f.get("connect_failures", 0))
        moved.add_metric([name, "to_target"], f.get("bytes_to_target", 0))
        moved.add_metric([name, "from_target"], f.get("bytes_from_target", 0))
    yield from (ready, active, total, failures, moved)


def _datapath(dp: dict[str, Any]) -> Iterator[Metric]:
    backend = _gauge("labrelay_datapath_backend_info",
                     "The data path's splice backend (c or python); always 1.", ["backend"])
    backend.add_metric([_s(dp.get("backend"))], 1)
    active = _gauge("labrelay_datapath_pairs_active", "Spliced socket pairs now.")
    active.add_metric([], dp.get("pairs_active", 0))
    pairs = _counter("labrelay_datapath_pairs", "Socket pairs spliced since start.")
    pairs.add_metric([], dp.get("pairs_total", 0))
    failed = _counter("labrelay_datapath_pairs_failed", "Spliced pairs that ended in an error.")
    failed.add_metric([], dp.get("pairs_failed", 0))
    moved = _counter("labrelay_datapath_bytes", "Bytes moved by the data path, both ways.")
    moved.add_metric([], dp.get("bytes", 0))
    yield from (backend, active, pairs, failed, moved)


def _totals(prefix: str, what: str, label: str,
            totals: dict[str, dict[str, int]]) -> Iterator[Metric]:
    active = _gauge(f"labrelay_relay_{prefix}sessions_active", f"Sessions open now, by {what}.",
                    [label])
    total = _counter(f"labrelay_relay_{prefix}sessions", f"Sessions opened since start, by "
                     f"{what} (kept across reloads).", [label])
    moved = _counter(f"labrelay_relay_{prefix}bytes", f"Bytes of sessions, by {what} and "
                     "direction (to_service, from_service; kept across reloads).",
                     [label, "direction"])
    for name, values in totals.items():
        active.add_metric([name], values["sessions_active"])
        total.add_metric([name], values["sessions_total"])
        moved.add_metric([name, "to_service"], values["bytes_to_service"])
        moved.add_metric([name, "from_service"], values["bytes_from_service"])
    yield from (active, total, moved)


def _relay(relay: dict[str, Any]) -> Iterator[Metric]:
    agents = _gauge("labrelay_relay_agents_connected", "Agent connections now.")
    agents.add_metric([], len(relay.get("agents", [])))
    # by agent and the version its version line named: which labs run old agents
    running: Counter[tuple[str, str]] = Counter(
        (a["name"], a.get("version", "?")) for a in relay.get("agents", []))
    versions = _gauge("labrelay_relay_agent_connections",
                      "Agent connections now, by agent and the labrelay version it runs "
                      "('unknown (before 0.2.0.dev0)': an older agent; 'not labrelay: ...').",
                      ["agent", "version"])
    for (name, version), n in sorted(running.items()):
        versions.add_metric([_s(name), _s(version)], n)
    users = _gauge("labrelay_relay_users_connected", "User connections now.")
    users.add_metric([], len(relay.get("users", [])))
    service_up = _gauge("labrelay_relay_service_up",
                        "1 while an agent holds the service (0: granted, not registered); "
                        "for a NAME:* grant, how many of its ports are held.",
                        ["service", "owner"])
    held = set()
    for (service, owner), n in _services_up(relay).items():
        held.add(service)
        service_up.add_metric([_s(service), _s(owner)], n)
    for grant in relay.get("service_grants", []):
        if grant["service"] not in held and not grant["service"].endswith(":*"):
            service_up.add_metric([_s(grant["service"]), _s(grant["owner"])], 0)
    grant_problems = _gauge("labrelay_relay_grant_problems",
                            "Problems in the grant files now: each file or line named "
                            "grants nothing (labrelay status lists them).", [])
    grant_problems.add_metric([], relay.get("grant_problem_count",
                                            len(relay.get("grant_problems", []))))
    yield from (agents, versions, users, service_up, grant_problems)
    yield from _totals("", "service", "service", relay.get("per_service", {}))
    yield from _totals("user_", "user", "user", relay.get("per_user_totals", {}))
    for counter, value in relay.get("counters", {}).items():
        family = _counter(f"labrelay_relay_{counter}", f"Relay events: {counter}.")
        family.add_metric([], value)
        yield family
    yield from _fast(relay.get("fast_path") or {})
    yield from _admission(relay.get("admission") or {})
    yield from _sharing(relay.get("sharing") or {})


WILDCARD_SERIES = 16
"""Ports held under one ``NAME:*`` grant shown one by one in ``service_up``; past it,
all of them count as one ``NAME:*`` series."""


def _services_up(relay: dict[str, Any]) -> dict[tuple[str, str], int]:
    """The registrations by (service label, owner).  An agent granted
    ``tensorboard:*`` may register all 65 535 ports, and each was a series of its own
    (3 000 registrations: /metrics 9 KB -> 200 KB; docs/security.md): the ports held
    under a ``NAME:*`` grant (and granted by no line of their own) are shown one by one
    up to :data:`WILDCARD_SERIES` of them, and past it counted as one ``NAME:*`` series
    whose value is how many are held."""
    grants = {g["service"] for g in relay.get("service_grants", [])}
    up: dict[tuple[str, str], int] = {}
    wild: dict[tuple[str, str], list[str]] = {}
    for svc in relay.get("services", []):
        service, owner = svc["service"], svc["owner"]
        name, _, _ = service.rpartition(":")
        if service not in grants and f"{name}:*" in grants:
            wild.setdefault((f"{name}:*", owner), []).append(service)
        else:
            up[(service, owner)] = up.get((service, owner), 0) + 1
    for (pattern, owner), services in wild.items():
        if len(services) > WILDCARD_SERIES:
            up[(pattern, owner)] = len(services)
        else:
            for service in services:
                up[(service, owner)] = up.get((service, owner), 0) + 1
    return up


def _sharing(sharing: dict[str, Any]) -> Iterator[Metric]:
    """Shares, rate limits and what waits for a congested agent link (docs/sharing.md)."""
    if not sharing:
        return
    share = _gauge("labrelay_relay_user_share",
                   "A user's weight on a congested link (users not listed have 1).", ["user"])
    for user, weight in sharing.get("shares", {}).items():
        share.add_metric([_s(user)], weight)
    rate = _gauge("labrelay_relay_user_rate_limit_bytes",
                  "A user's rate limit each way (bytes/s).", ["user"])
    credit = _gauge("labrelay_relay_user_rate_credit_bytes",
                    "Bytes a limited user may move now without waiting, by direction.",
                    ["user", "direction"])
    for user, limit in sharing.get("rate_limits", {}).items():
        rate.add_metric([_s(user)], limit["rate"])
        for direction in ("to_service", "from_service"):
            credit.add_metric([_s(user), direction], limit[f"credit_{direction}"])
    queued = _gauge("labrelay_relay_link_queued_bytes",
                    "Bytes waiting for a congested agent link, by agent and user.",
                    ["agent", "user"])
    for agent, users in sharing.get("queued", {}).items():
        for user, nbytes in users.items():
            queued.add_metric([_s(agent), _s(user)], nbytes)
    yield from (share, rate, credit, queued)


def _fast(fast: dict[str, Any]) -> Iterator[Metric]:
    docs = {"paired": "Fast-path sessions paired.", "pair_failed": "Fast-path pairings failed.",
            "pooled": "Stock users' channels carried on an agent's pooled data connection.",
            "native_runs": "Times the native thread took a pooled channel's bulk direction.",
            "native_bytes": "Bytes the native thread forwarded to pooled data connections.",
            "native_sealed": "Bytes the native thread sealed from pooled data connections "
                             "to their users.",
            "native_yields": "Times the native thread handed a session back because the relay "
                             "had its own packet to send the user (a keepalive, a rekey).",
            "data_connections": "Data-port connections accepted.",
            "data_refused": "Data-port connections refused.",
            "data_throttled": "Data-port connections throttled.",
            "data_evicted": "Data-port connections owing their hello closed at the full "
                            "global cap to admit a source holding fewer places."}
    for counter, doc in docs.items():
        if counter in fast:
            family = _counter(f"labrelay_relay_fast_{counter}", doc)
            family.add_metric([], fast[counter])
            yield family
    if "tokens_refused" in fast:
        refused = _counter("labrelay_relay_fast_tokens_refused",
                           "Fast-path tickets refused, by reason.", ["reason"])
        for reason, value in fast["tokens_refused"].items():
            refused.add_metric([_s(reason)], value)
        yield refused


def _admission(admission: dict[str, Any]) -> Iterator[Metric]:
    if not admission:
        return
    penalised = _gauge("labrelay_relay_penalised_sources", "Sources refused now for a penalty.")
    penalised.add_metric([], admission.get("penalised_sources", 0))
    penalties = _counter("labrelay_relay_penalties", "Penalties given, by offence.",
                         ["offence"])
    for offence, value in admission.get("penalties", {}).items():
        penalties.add_metric([_s(offence)], value)
    refused = _counter("labrelay_relay_admission_refused",
                       "Connections closed at accept, by port and reason.", ["port", "reason"])
    evicted = _counter("labrelay_relay_admission_evicted",
                       "Unauthenticated connections closed at the full global cap to admit "
                       "another (for a source holding fewer places, or stalled), by port.",
                       ["port"])
    stalled = _counter("labrelay_relay_admission_stalled_evicted",
                       "Of those, connections that stalled past their stage's seconds "
                       "([relay.crowding]), by port and stage.", ["port", "stage"])
    crowded = _counter("labrelay_relay_admission_neighbourhood_evicted",
                       "Of those, connections that gave way to a newcomer from a "
                       "neighbourhood holding fewer places ([relay.crowding] netblock4/6), "
                       "by port.", ["port"])
    waiting = _gauge("labrelay_relay_unauthenticated", "Connections not yet authenticated "
                     "(SSH) or owing their hello (data), by port.", ["port"])
    for port in ("ssh", "data", "tls"):
        for stage, value in (admission.get(port) or {}).get("stalled_evicted", {}).items():
            stalled.add_metric([port, _s(stage)], value)
        if port in admission:
            crowded.add_metric([port], admission[port].get("neighbourhood_evicted", 0))
    for port in ("ssh", "data"):
        gate = admission.get(port)
        if gate is None:
            continue
        for reason, value in gate.get("refused", {}).items():
            refused.add_metric([port, _s(reason)], value)
        evicted.add_metric([port], gate.get("evicted", 0))
        waiting.add_metric([port], gate["unauthenticated"])
    yield from (penalised, penalties, refused, evicted, stalled, crowded, waiting)


def _reload(reload: dict[str, Any]) -> Iterator[Metric]:
    last = reload.get("last")
    ok = _gauge("labrelay_config_last_reload_successful",
                "1 if the last reload applied (or none was asked), 0 if it was refused.")
    ok.add_metric([], 1 if last is None or last["ok"] else 0)
    when = _gauge("labrelay_config_last_reload_success_timestamp_seconds",
                  "When a reload last applied (Unix time; absent until one has).")
    if reload.get("last_success"):
        when.add_metric([], reload["last_success"])
    reloads = _counter("labrelay_config_reloads", "Reloads asked for, by result.", ["result"])
    for result, value in reload.get("reloads", {}).items():
        reloads.add_metric([result], value)
    yield from (ok, when, reloads)


class MetricsRegistry:
    """A node's own registry: its snapshot collector plus process and platform metrics."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def exposition(self) -> bytes:
        """The text exposition format (0.0.4) of every metric now."""
        return generate_latest(self.registry)


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """The metrics of one snapshot, without process metrics (for tests and tools)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(registry).decode()
