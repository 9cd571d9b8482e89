"""The admin endpoint: JSON status, Prometheus metrics, and ``labrelay status``.

Served over HTTP, on a loopback address unless a bearer token is configured (the
config refuses others): it shows link health, each forward's state (ready, or
refused and retrying, with the reason) and per-forward session counters.
``labrelay status`` fetches the JSON and prints it as tables.

Every request first passes :class:`AdminGate`: it must be addressed to this endpoint
(its ``Host`` header names the address the connection arrived on, or ``localhost``
when that is loopback), so a web page whose name an attacker re-points at 127.0.0.1
(DNS rebinding) gets ``421 Misdirected Request`` and no data; with a token, it must
also carry ``Authorization: Bearer <token>`` (``401`` otherwise).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import stat
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from relay import __version__
from relay.ops.logfmt import escape
from relay.ops.page import age
from relay.ops.statusview import BadQuery, bounded, cut, limit_of

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
        request.setHeader(b"cache-control", b"no-store")
        try:
            limit = limit_of(request.args or {})
        except BadQuery as e:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"{e}\n".encode()
        request.setHeader(b"content-type", self._type.encode())
        # Bounded (relay.ops.statusview): a wildcard grant's thousands of registrations
        # must not make every answer (and every refresh of the page) unbounded.
        return self._render(bounded(self._snapshot(), limit)).encode()


def _json(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True) + "\n"


MIN_TOKEN_LENGTH = 16
CELL_LIMIT = 120
_WILDCARDS = ("", "*", "0.0.0.0", "::")


class TokenError(Exception):
    """The admin token file is missing, unreadable, too open or too short."""


def read_token(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding white space stripped).

    The file must be a regular file readable by its owner only (``chmod 600``), as
    OpenSSH requires of private keys, and hold at least :data:`MIN_TOKEN_LENGTH`
    characters (``openssl rand -hex 32 > admin.token`` makes one)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(4096)
    except OSError as e:
        raise TokenError(f"cannot read the admin token file {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise TokenError(f"the admin token file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise TokenError(f"the admin token file {path} is readable by others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    token = data.strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c < 0x21 or c > 0x7E for c in token):
        raise TokenError(f"the admin token in {path} must be at least {MIN_TOKEN_LENGTH} "
                         "printable ASCII characters without spaces")
    return token


class TokenFile:
    """The admin token as its file says now: rotating the token is writing the file.

    The token used to be read once at start-up, and ``[admin]`` is a restart-only
    setting, so rotating it meant restarting the node — every session through a relay
    ended — and ``labrelay reload --config`` could not even ask for the restart's
    alternative: it sends the token the file holds, the new one, which the running
    node refused.  The file is stat'ed at each request (one ``stat``) and read again
    when its inode, size or times changed.  A file that became unusable (too open,
    too short, gone) refuses every request until it is fixed: the old token, which
    the operator meant to retire, is not kept."""

    _log = Logger()

    def __init__(self, path: Path, token: bytes) -> None:
        self.path = path
        self._token: bytes | None = token
        self._problem = ""
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> bytes | None:
        """The token in force; None while the file is unusable (logged once a change)."""
        stamp = self._stamp()
        if stamp != self._seen:
            self._seen = stamp
            try:
                self._token = read_token(self.path)
                self._problem = ""
                self._log.info("admin token file {path} read again: the new token is in "
                               "force", event="admin_token_changed", path=str(self.path))
            except TokenError as e:
                self._token = None
                self._problem = str(e)
                self._log.error("admin endpoint refuses every request until its token file "
                                "is fixed: {problem}", event="admin_token_invalid",
                                problem=self._problem)
        return self._token


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer that carries no data."""

    code: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _host_name(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminGate:
    """Decides, from a request's headers and the address it arrived on, whether the
    admin endpoint answers it.  Sans-IO: :func:`admin_resource` feeds it requests.

    Accepted ``Host`` values (case-insensitive): the configured listen host (unless a
    wildcard) and the local address the connection arrived on, each with the local
    port, plus ``localhost``, ``127.0.0.1`` and ``[::1]`` when that address is
    loopback; the bare name without a port only on port 80.  A missing ``Host`` is
    refused too (every browser, curl, urllib and Prometheus send one).
    """

    def __init__(self, listen_host: str, token: bytes | None = None,
                 token_file: TokenFile | None = None) -> None:
        self.listen_host = listen_host
        self.token = token
        self.token_file = token_file

    def allowed_hosts(self, local_host: str, local_port: int) -> set[str]:
        names = {_host_name(local_host)}
        if self.listen_host not in _WILDCARDS:
            names.add(_host_name(self.listen_host))
        if _is_loopback(local_host):
            names |= {"localhost", "127.0.0.1", "[::1]"}
        allowed = {f"{name}:{local_port}".lower() for name in names}
        if local_port == 80:
            allowed |= {name.lower() for name in names}
        return allowed

    def check(self, host_header: bytes | None, local_host: str, local_port: int,
              authorization: bytes | None) -> Refusal | None:
        """None to answer the request, else the refusal to send instead."""
        host = (host_header or b"").decode("latin-1").strip().lower()
        if host not in self.allowed_hosts(local_host, local_port):
            return Refusal(421, "misdirected request: this endpoint answers only requests "
                           "addressed to its own address or localhost")
        token = self.token
        if self.token_file is not None:
            token = self.token_file.current()
            if token is None:
                return Refusal(503, "the admin token file is not usable: see this node's log")
        if token is not None:
            scheme, _, presented = (authorization or b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer"
                    and hmac.compare_digest(presented.strip(), token)):
                return Refusal(401, "a bearer token is required",
                               ((b"www-authenticate", b'Bearer realm="labrelay"'),))
        return None


class _Refused(Resource):
    isLeaf = True

    def __init__(self, refusal: Refusal) -> None:
        super().__init__()
        self._refusal = refusal

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self._refusal.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in self._refusal.headers:
            request.setHeader(name, value)
        return (self._refusal.reason + "\n").encode()


class _Gated(Resource):
    """The admin tree behind an :class:`AdminGate`: every path is decided here first."""

    def __init__(self, inner: Resource, gate: AdminGate) -> None:
        super().__init__()
        self._inner = inner
        self._gate = gate

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        local = request.getHost()
        refusal = self._gate.check(request.getHeader(b"host"), getattr(local, "host", ""),
                                   getattr(local, "port", 0),
                                   request.getHeader(b"authorization"))
        if refusal is not None:
            return _Refused(refusal)
        child: Resource | None = self._inner.children.get(path)
        return child if child is not None else notFound()


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, exposition: Callable[[], bytes]) -> None:
        super().__init__()
        self._exposition = exposition

    def render_GET(self, request: Request) -> bytes:
        from relay.ops.metrics import CONTENT_TYPE

        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        request.setHeader(b"cache-control", b"no-store")
        return self._exposition()


RELOAD_HEADER = b"x-labrelay-action"
"""``POST /reload`` must carry ``X-Labrelay-Action: reload``: a page in a browser cannot
add that header to a cross-site request without a CORS preflight this endpoint never
grants, so a web page the operator visits cannot make the relay reload."""


class _Reload(Resource):
    """``POST /reload``: reload the config now; 200 with what changed, 409 with every
    problem when the new config was refused (nothing changed)."""

    isLeaf = True

    def __init__(self, reload: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._reload = reload

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if request.getHeader(RELOAD_HEADER) != b"reload":
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"POST /reload needs the header X-Labrelay-Action: reload\n"
        result = self._reload()
        request.setResponseCode(200 if result["ok"] else 409)
        request.setHeader(b"content-type", b"application/json")
        return _json(result).encode()


def admin_resource(snapshot: Snapshot, gate: AdminGate, *,
                   metrics: Callable[[], bytes] | None = None,
                   reload: Callable[[], dict[str, Any]] | None = None) -> Resource:
    """The admin tree: ``/`` (the status page), ``/status.json``, ``/metrics`` and,
    when the node can reload, ``POST /reload``; every path behind ``gate``."""
    from relay.ops.metrics import MetricsRegistry
    from relay.ops.page import render_page

    if metrics is None:
        metrics = MetricsRegistry(snapshot).exposition
    root = Resource()
    root.putChild(b"status.json", _Leaf(snapshot, _json, "application/json"))
    root.putChild(b"metrics", _Metrics(metrics))
    root.putChild(b"", _Leaf(snapshot, render_page, "text/html; charset=utf-8"))
    if reload is not None:
        root.putChild(b"reload", _Reload(reload))
    return _Gated(root, gate)


def post_reload(address: str, timeout: float = 60.0,
                token: bytes | None = None) -> dict[str, Any]:
    """Ask the labrelay whose admin endpoint is ``host:port`` to reload; its answer
    (``ok``, ``changes``, ``errors``), also when it refused the new config."""
    import urllib.error

    request = urllib.request.Request(f"http://{address}/reload", data=b"", method="POST")
    request.add_header("X-Labrelay-Action", "reload")
    if token is not None:
        request.add_header("Authorization", "Bearer " + token.decode("ascii"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            result: dict[str, Any] = json.load(reply)
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise
        result = json.load(e)
    return result


def fetch(address: str, timeout: float = 5.0, token: bytes | None = None,
          everything: bool = False) -> dict[str, Any]:
    """The JSON status of the labrelay whose admin endpoint is ``host:port`` (with
    ``Authorization: Bearer`` when a token is given); its long lists cut to their first
    entries (relay.ops.statusview) unless ``everything``."""
    query = "?all=1" if everything else ""
    request = urllib.request.Request(f"http://{address}/status.json{query}")
    if token is not None:
        request.add_header("Authorization", "Bearer " + token.decode("ascii"))
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        result: dict[str, Any] = json.load(reply)
        return result


def _table(rows: list[list[str]]) -> str:
    # Cells carry peer-supplied strings (a session's claimed origin): one visible line each.
    rows = [[escape(cell, CELL_LIMIT) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _session_cap(link: dict[str, Any]) -> str:
    """One line: the sessions the relay opened through ``link``, the agent's caps on
    them and how many it refused (docs/security.md, "The agent against a relay it
    trusted"); per target only where some are open."""
    line = (f"link {link['name']} sessions: {link['sessions_open']} open "
            f"({link.get('sessions_connecting', 0)} connecting); max_sessions "
            f"{link.get('max_sessions', '?')}, max_sessions_per_target "
            f"{link.get('max_sessions_per_target', '?')}, max_connecting "
            f"{link.get('max_connecting', '?')}; refused over them "
            f"{link.get('sessions_refused_cap', 0)}")
    by_target = link.get("sessions_by_target") or {}
    if by_target:
        line += "; open per target: " + ", ".join(f"{name} {count}"
                                                 for name, count in by_target.items())
    return line


def format_status(snapshot: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    links = [["LINK", "SERVER", "STATE", "FOR", "RECONNECTS", "LAST ERROR"]]
    forwards = [["LINK", "FORWARD", "KIND", "LISTEN", "CONNECT", "STATE", "SESSIONS",
                 "BYTES IN/OUT", "NOTE"]]
    for link in snapshot.get("links", []):
        links.append([link["name"], link["server"], link["state"], age(link.get("since"), now),
                      str(link.get("reconnects", "")), link.get("last_error") or ""])
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
    parts = [head]
    if len(links) > 1:
        parts += [_table(links), _table(forwards)]
        for link in snapshot.get("links", []):
            fp = link.get("fast_path")
            if fp and fp.get("state") != "off":
                parts.append(
                    f"link {link['name']} fast path: {fp['state']}"
                    + (f" ({fp['reason']})" if fp.get("reason") else "")
                    + f"; {fp['idle']} idle data connections, {fp['sessions_active']} open / "
                    f"{fp['sessions_total']} spliced sessions, bytes in/out "
                    f"{fp['bytes_to_target']}/{fp['bytes_from_target']}")
        for link in snapshot.get("links", []):
            if "sessions_open" in link:  # the agent's own cap (relay.core.sessioncap)
                parts.append(_session_cap(link))
        for link in snapshot.get("links", []):
            if link.get("held_sessions"):
                parts.append(f"link {link['name']}: sessions held for resumption\n"
                             + _held(link["held_sessions"]))
    relay = snapshot.get("relay")
    if relay is not None:
        parts += _relay_tables(relay, now)
    dp = snapshot.get("datapath")
    if dp:
        parts.append(f"data path: {dp.get('backend', '?')} backend ({dp.get('reason', '')})")
    reload = snapshot.get("reload")
    if reload is not None and reload.get("last") is not None:
        last = reload["last"]
        parts.append(f"last reload {age(last['at'], now)} ago: " + (
            "applied" if last["ok"] else "REFUSED: " + "; ".join(last["errors"])))
    lines = "\n\n".join(parts).split("\n")
    return "".join(escape(line, None, backslash=False) + "\n" for line in lines)


def _relay_tables(relay: dict[str, Any], now: float) -> list[str]:
    agents = [["AGENT", "FROM", "VERSION", "SERVICES"]] + [
        # (a relay before 0.2.0.dev0 reports no version)
        # (the count first: the cell is cut at CELL_LIMIT characters)
        [a["name"], a["peer"], a.get("version", "?"), (
            f"{a['services_count']} (first {len(a['services'])}): "
            if a.get("services_count", 0) > len(a["services"]) else ""
        ) + " ".join(a["services"]) or "-"]
        for a in relay.get("agents", [])
    ]
    services = [["SERVICE", "OWNER", "FOR", "OPEN", "TOTAL", "BYTES TO/FROM"]]
    per_service = relay.get("per_service", {})
    for svc in relay.get("services", []):
        totals = per_service.get(svc["service"], {})
        services.append([
            svc["service"], svc["owner"], age(svc.get("since"), now),
            str(totals.get("sessions_active", 0)), str(totals.get("sessions_total", 0)),
            f"{totals.get('bytes_to_service', 0)}/{totals.get('bytes_from_service', 0)}",
        ])
    sessions = [["USER", "SERVICE", "FROM", "PATH", "AGE", "BYTES TO/FROM"]] + [
        [s["user"], s["service"], s["origin"], s.get("path", "channel"), f"{s['age']:.0f}s",
         f"{s['bytes_to_service']}/{s['bytes_from_service']}"]
        for s in relay.get("sessions", [])
    ]
    accounts = [["USER", "OPEN", "SESSIONS", "BYTES TO/FROM"]] + [
        [name, str(t["sessions_active"]), str(t["sessions_total"]),
         f"{t['bytes_to_service']}/{t['bytes_from_service']}"]
        for name, t in relay.get("per_user_totals", {}).items()
    ]
    agent_count = relay.get("agents_count", len(relay.get("agents", [])))
    user_count = relay.get("users_count", len(relay.get("users", [])))
    out = [f"relay on {relay.get('listen', '?')}: {agent_count} agent(s), "
           f"{user_count} user connection(s)", _table(agents), _table(services)]
    if cut(relay, "services"):
        # the exact counts, per agent and name, of what the table leaves out
        held = ", ".join(f"{s['owner']} {s['name']}: {s['registered']}"
                         for s in relay.get("services_summary", [])[:20])
        out.append(f"... {cut(relay, 'services')} more of {relay['services_count']} "
                   f"registrations not shown (labrelay status --all); registered per "
                   f"agent and name: {held}")
    if len(sessions) > 1:
        out.append(_table(sessions))
    if cut(relay, "sessions"):
        out.append(f"... {cut(relay, 'sessions')} more of {relay['sessions_count']} open "
                   "sessions not shown (labrelay status --all)")
    if len(accounts) > 1:
        out.append(_table(accounts))
    if relay.get("held_sessions"):
        out.append("sessions held for their agent to resume them\n"
                   + _held(relay["held_sessions"]))
    fast = relay.get("fast_path")
    if fast is not None:
        if fast.get("data_port") is None:
            out.append("fast path: off (no data_port)")
        else:
            refused = sum(fast.get("tokens_refused", {}).values())
            pools = " ".join(f"{n}={k}" for n, k in sorted(fast.get("pools", {}).items()))
            out.append(
                f"fast path: data port {fast['data_port']}, e2e "
                f"{' '.join(fast.get('e2e_services', [])) or '(none)'}; "
                f"{fast.get('paired', 0)} paired, {fast.get('pair_failed', 0)} failed, "
                f"{fast.get('pooled', 0)} stock sessions pooled, "
                f"{refused} tokens refused; idle agent connections: {pools or '-'}")
    tls = relay.get("tls")
    if tls:
        cert = tls.get("certificate") or {}
        out.append(
            f"TLS port {tls.get('port')}: certificate for {','.join(cert.get('names', []))}"
            f" (not after {cert.get('not_after', '?')}, loaded {cert.get('loads', 0)}x); "
            f"{tls.get('handshakes', 0)} handshakes, {tls.get('handshake_failed', 0)} failed, "
            f"{tls.get('handshake_timeout', 0)} timed out")
    problems = relay.get("grant_problems") or []
    count = relay.get("grant_problem_count", len(problems))
    if count:
        lines = [f"GRANTS: {count} problem(s); what each names grants nothing "
                 "until it is fixed:"]
        lines += [f"  {p[:2000]}" for p in problems[:20]]
        if count > 20:
            lines.append(f"  ... and {count - 20} more (the log has each)")
        out.append("\n".join(lines))
    admission = relay.get("admission")
    if admission:
        refused_at = " ".join(
            f"{port} {sum((admission.get(port) or {}).get('refused', {}).values())}"
            for port in ("ssh", "data", "tls") if port in admission)
        out.append(f"admission: {admission.get('penalised_sources', 0)} source(s) penalised "
                   f"now; refused at accept: {refused_at}")
    return out


def _held(held: list[dict[str, Any]]) -> str:
    """Held sessions (docs/resilience.md): how long each has been held, and until when;
    at the relay, for which agent (and the login it made, if not its name: a
    certificate's held sessions are checked as that login)."""
    rows = [[h["session"], h["id"], f"{h['age']:.0f}s", f"{h['expires_in']:.0f}s",
             str(h["unacked_bytes"])] for h in held]
    if not any("agent" in h for h in held):  # an agent link's, or an older relay's
        return _table([["SESSION", "ID", "HELD FOR", "RESET IN", "UNACKED BYTES"], *rows])
    for row, h in zip(rows, held, strict=True):
        agent, login = h.get("agent") or "-", h.get("login") or ""
        row.insert(0, agent if login in ("", agent) else f"{agent} (login {login})")
    return _table([["AGENT", "SESSION", "ID", "HELD FOR", "RESET IN", "UNACKED BYTES"],
                   *rows])


def base_snapshot(pid: int, started: float) -> dict[str, Any]:
    return {"version": __version__, "pid": pid, "started": started}
