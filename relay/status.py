"""The local admin endpoint: JSON status, Prometheus metrics, and ``labrelay status``.

Served over HTTP on a loopback address only (the config refuses others): it
shows link health, each forward's state (ready, or refused and retrying, with
the reason) and per-forward session counters.  ``labrelay status`` fetches the
JSON and prints it as tables.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from . import __version__

Snapshot = Callable[[], dict[str, Any]]


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, snapshot: Snapshot, render: Callable[[dict[str, Any]], str],
                 content_type: str) -> None:
        super().__init__()
        self._snapshot = snapshot
        self._render = render
        self._type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return self._render(self._snapshot()).encode()


def _json(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True) + "\n"


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """Prometheus exposition format (text 0.0.4) of a status snapshot."""
    lines = [
        "# HELP labrelay_info labrelay version.",
        "# TYPE labrelay_info gauge",
        f'labrelay_info{{version="{_label(snapshot.get("version", ""))}"}} 1',
        "# HELP labrelay_link_up 1 when the link is connected and authenticated.",
        "# TYPE labrelay_link_up gauge",
    ]
    forwards: list[tuple[str, dict[str, Any]]] = []
    for link in snapshot.get("links", []):
        name = _label(link["name"])
        lines.append(f'labrelay_link_up{{link="{name}"}} {int(link["state"] == "connected")}')
        forwards.extend((name, f) for f in link.get("forwards", []))
    series = [
        ("forward_ready", "gauge", "1 when the forward is usable.",
         lambda f: int(f["state"] in ("ready", "listening"))),
        ("forward_failures", "gauge", "Refusals in a row (0 once granted).",
         lambda f: f.get("failures", 0)),
        ("sessions_active", "gauge", "Sessions open now.", lambda f: f["sessions_active"]),
        ("sessions_total", "counter", "Sessions since start.", lambda f: f["sessions_total"]),
        ("bytes_to_target_total", "counter", "Bytes carried toward the target.",
         lambda f: f["bytes_to_target"]),
        ("bytes_from_target_total", "counter", "Bytes carried back from the target.",
         lambda f: f["bytes_from_target"]),
    ]
    for metric, kind, help_text, value in series:
        lines.append(f"# HELP labrelay_{metric} {help_text}")
        lines.append(f"# TYPE labrelay_{metric} {kind}")
        for link_name, f in forwards:
            labels = f'link="{link_name}",forward="{_label(f["name"])}",kind="{f["kind"]}"'
            lines.append(f"labrelay_{metric}{{{labels}}} {value(f)}")
    return "\n".join(lines) + "\n"


def admin_resource(snapshot: Snapshot) -> Resource:
    root = Resource()
    root.putChild(b"status.json", _Leaf(snapshot, _json, "application/json"))
    root.putChild(b"metrics", _Leaf(snapshot, prometheus_text, "text/plain; version=0.0.4"))
    root.putChild(b"", _Leaf(snapshot, _json, "application/json"))
    return root


def fetch(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """The JSON status of the labrelay whose admin endpoint is ``host:port``."""
    with urllib.request.urlopen(f"http://{address}/status.json", timeout=timeout) as reply:
        result: dict[str, Any] = json.load(reply)
        return result


def _age(since: float | None, now: float) -> str:
    if not since:
        return "-"
    seconds = int(now - since)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def format_status(snapshot: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    links = [["LINK", "SERVER", "STATE", "FOR", "LAST ERROR"]]
    forwards = [["LINK", "FORWARD", "KIND", "LISTEN", "CONNECT", "STATE", "SESSIONS",
                 "BYTES IN/OUT", "NOTE"]]
    for link in snapshot.get("links", []):
        links.append([link["name"], link["server"], link["state"], _age(link.get("since"), now),
                      link.get("last_error") or ""])
        for f in link.get("forwards", []):
            listen = f["listen"]
            if f.get("bound_port") is not None and listen.endswith(":0"):
                listen = listen[:-1] + str(f["bound_port"])
            note = f.get("last_error") or ""
            if f["state"] == "refused":
                note = f"retrying ({f.get('failures', 0)} refusals): {note}"
            forwards.append([
                link["name"], f["name"], f["kind"], listen, f["connect"], f["state"],
                f"{f['sessions_active']} open / {f['sessions_total']}",
                f"{f['bytes_to_target']}/{f['bytes_from_target']}", note,
            ])
    head = f"labrelay {snapshot.get('version', '?')} (pid {snapshot.get('pid', '?')})"
    return f"{head}\n\n{_table(links)}\n\n{_table(forwards)}\n"


def base_snapshot(pid: int, started: float) -> dict[str, Any]:
    return {"version": __version__, "pid": pid, "started": started}
