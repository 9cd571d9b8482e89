"""The status page at ``/`` on the admin endpoint: the status snapshot, for people.

One server-rendered HTML page, no JavaScript at all: it refreshes itself every
:data:`REFRESH` seconds with ``<meta http-equiv="refresh">``, and every value in it
is HTML-escaped (service names, user names and a session's claimed origin come from
peers).  It shows what an operator asks first: which services are up and which agent
holds them, which agents are connected and which version each runs, who is connected
and what each user has moved, the fast path, each link's health, the plain hops and the
last reload.  ``/status.json`` has the same data.

An agent's version is what its SSH version line said (relay.ssh.peersoftware): cut to
64 characters of printable ASCII already, which still allows ``<``, ``&`` and quotes,
so it is escaped like every peer string.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any

from relay.ops.statusview import cut

REFRESH = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:28em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#116611;font-weight:600}.down{color:#b00020;font-weight:600}
.muted{color:#777}p.meta{margin:0;color:#555}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def age(since: float | None, now: float) -> str:
    """How long ago ``since`` was, short and coarse ("42s", "17m", "3h05m"; "-" for
    never): the status page and ``labrelay status`` show ages the same way."""
    if not since:
        return "-"
    seconds = int(now - since)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _state(up: bool, yes: str = "up", no: str = "down") -> str:
    return f'<span class="up">{yes}</span>' if up else f'<span class="down">{no}</span>'


def _table(title: str, head: list[str], rows: Iterable[list[str]], empty: str) -> str:
    rows = list(rows)
    out = [f"<h2>{_e(title)}</h2>"]
    if not rows:
        return out[0] + f'<p class="muted">{_e(empty)}</p>'
    out.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="n">{cell[2:]}</td>' if cell.startswith("#:") else f"<td>{cell}</td>"
            for cell in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _num(value: object) -> str:
    """A right-aligned cell (already safe: a number)."""
    return "#:" + _e(value)


def _relay(relay: dict[str, Any], now: float) -> list[str]:
    per_service = relay.get("per_service", {})
    held = {s["service"]: s for s in relay.get("services", [])}
    granted = {g["service"]: g["owner"] for g in relay.get("service_grants", [])}
    names = sorted(set(held) | {n for n in granted if not n.endswith(":*")})
    agents = {s: a["name"] for a in relay.get("agents", []) for s in a["services"]}
    # The view lists the explicitly granted registrations first (relay.ops.statusview):
    # when it shows any other, it shows every granted one that is registered.
    seen_all_granted = not cut(relay, "services") or any(
        name not in granted for name in held)
    services = []
    for name in names:
        svc, totals = held.get(name), per_service.get(name, {})
        services.append([
            # a granted name past the list's cut may be registered: not called down
            _e(name), _state(svc is not None) if svc is not None or seen_all_granted
            else '<span class="muted">not shown</span>',
            _e(agents.get(name) or (svc or {}).get("owner") or granted.get(name, "")),
            _e(age(svc.get("since"), now) if svc else "-"),
            _num(totals.get("sessions_active", 0)), _num(totals.get("sessions_total", 0)),
            _num(_bytes(totals.get("bytes_to_service", 0))),
            _num(_bytes(totals.get("bytes_from_service", 0))),
        ])
    agent_rows = [
        # (a relay before 0.2.0.dev0 reports no version)
        [_e(a["name"]), _e(a["peer"]), _e(a.get("version", "?")),
         _e(", ".join(a["services"]) + (
             f" (+{a['services_count'] - len(a['services'])} more)"
             if a.get("services_count", 0) > len(a["services"]) else "") or "-")]
        for a in relay.get("agents", [])
    ]
    connected: dict[str, int] = {}
    for user in relay.get("users", []):
        connected[user["name"]] = connected.get(user["name"], 0) + 1
    totals_by_user = relay.get("per_user_totals", {})
    users = [
        [_e(name), _state(name in connected, "connected", "away"),
         _num(t["sessions_active"]), _num(t["sessions_total"]),
         _num(_bytes(t["bytes_to_service"])), _num(_bytes(t["bytes_from_service"]))]
        for name, t in sorted(totals_by_user.items())
    ] + [[_e(name), _state(True, "connected"), _num(0), _num(0), _num(_bytes(0)),
          _num(_bytes(0))] for name in sorted(connected) if name not in totals_by_user]
    sessions = [
        [_e(s["user"]), _e(s["service"]), _e(s["origin"]), _e(s.get("path", "channel")),
         _num(f"{s['age']:.0f}s"), _num(_bytes(s["bytes_to_service"])),
         _num(_bytes(s["bytes_from_service"]))]
        for s in relay.get("sessions", [])
    ]
    problems = relay.get("grant_problems") or []
    count = relay.get("grant_problem_count", len(problems))
    warn = ([f"<h2>Grant problems: {_e(count)}</h2><p>each names a file or line that "
             "grants nothing until it is fixed</p><ul>"
             + "".join(f"<li>{_e(p)}</li>" for p in problems[:20])
             + (f"<li>… and {count - 20} more</li>" if count > 20 else "") + "</ul>"]
            if count else [])
    out = [
        f'<p class="meta">relay on {_e(relay.get("bound") or relay.get("listen"))}: '
        f'{_e(relay.get("agents_count", len(relay.get("agents", []))))} agent(s), '
        + (f'{_e(relay["users_count"])} user connections</p>' if cut(relay, "users")
           else f'{len(connected)} user(s) connected</p>'),
        *warn,
        _table("Services", ["service", "state", "agent", "up for", "open", "sessions",
                            "bytes to", "bytes from"], services, "no service granted"),
        *_more(relay, "services", "registrations"),
        _table("Agents", ["agent", "from", "version", "services"], agent_rows,
               "no agent connected"),
        _table("Users", ["user", "state", "open", "sessions", "bytes to services",
                         "bytes from services"], users, "no user has connected yet"),
        _table("Open sessions", ["user", "service", "from", "path", "age", "bytes to",
                                 "bytes from"], sessions, "no open session"),
        *_more(relay, "sessions", "open sessions"),
    ]
    fast = relay.get("fast_path")
    if fast is not None:
        if fast.get("data_port") is None:
            line = "off (no data_port)"
        else:
            pools = ", ".join(f"{_e(n)}: {k} idle" for n, k in sorted(fast.get("pools", {})
                                                                        .items()))
            line = (f"data port {_e(fast['data_port'])}; {fast.get('paired', 0)} sessions "
                    f"paired, {fast.get('pair_failed', 0)} failed; agents' pools: "
                    f"{pools or 'none'}; end-to-end services: "
                    f"{_e(', '.join(fast.get('e2e_services', [])) or 'none')}")
        out.append(f"<h2>Fast path</h2><p>{line}</p>")
    return out


def _more(relay: dict[str, Any], key: str, what: str) -> list[str]:
    """A line under a cut table (relay.ops.statusview): how many were left out, of how
    many, and for the registrations the exact count per agent and name."""
    left = cut(relay, key)
    if not left:
        return []
    line = (f'<p class="muted">{left} more of {_e(relay[f"{key}_count"])} {_e(what)} not '
            f'shown (<a href="?all=1">show all</a>)')
    if key == "services":
        line += "; registered per agent and name: " + _e(", ".join(
            f"{s['owner']} {s['name']}: {s['registered']}"
            for s in relay.get("services_summary", [])[:50]))
    return [line + "</p>"]


def _links(links: list[dict[str, Any]], now: float) -> str:
    rows = []
    for link in links:
        fp = link.get("fast_path") or {}
        rows.append([
            _e(link["name"]), _e(link["server"]),
            _state(link["state"] == "connected", "connected", _e(link["state"])),
            _e(age(link.get("since"), now)), _num(link.get("reconnects", 0)),
            _e(", ".join(f"{f['name']} ({f['state']})" for f in link.get("forwards", []))),
            _e(fp.get("state", "off")), _e(link.get("last_error") or ""),
        ])
    return _table("Links", ["link", "server", "state", "for", "reconnects", "forwards",
                            "fast path", "last error"], rows, "no link")


def render_page(snapshot: dict[str, Any], now: float | None = None) -> str:
    """The whole page for one status snapshot."""
    now = time.time() if now is None else now
    body = [f"<h1>labrelay {_e(snapshot.get('version', '?'))}</h1>",
            f'<p class="meta">pid {_e(snapshot.get("pid", "?"))}, up '
            f'{_e(age(snapshot.get("started"), now))}; this page refreshes every '
            f"{REFRESH}s</p>"]
    if snapshot.get("relay") is not None:
        body += _relay(snapshot["relay"], now)
    if snapshot.get("links"):
        body.append(_links(snapshot["links"], now))
    if snapshot.get("forwards"):
        body.append(_table("Plain forwards", ["forward", "listen", "connect", "state", "open",
                                              "sessions", "data path"], [
            [_e(f["name"]), _e(f["listen"]), _e(f["connect"]), _e(f["state"]),
             _num(f.get("sessions_active", 0)), _num(f.get("sessions_total", 0)),
             _e(f.get("datapath", ""))] for f in snapshot["forwards"]], "none"))
    if snapshot.get("datapath"):
        dp = snapshot["datapath"]
        body.append(f"<h2>Data path</h2><p>backend {_e(dp.get('backend'))}; "
                    f"{dp.get('pairs_active', 0)} pairs spliced now, "
                    f"{dp.get('pairs_total', 0)} since start</p>")
    last = (snapshot.get("reload") or {}).get("last")
    if last is not None:
        text = ("applied" if last["ok"]
                else "refused, the previous config still runs: " + "; ".join(last["errors"]))
        body.append(f"<h2>Last reload</h2><p>{_e(age(last['at'], now))} ago: {_e(text)}</p>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>labrelay status</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
