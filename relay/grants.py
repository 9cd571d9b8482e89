"""Who may use the relay, and for what: agents and users known by their public keys.

Grants come from two places, merged into one view: ``[[relay.agent]]`` and
``[[relay.user]]`` in the node config, and authorized_keys-format grant files for
SSH admins (``permitlisten="gpu-cluster:22"`` on an agent's key line,
``permitopen="gpu-cluster:22"`` on a user's; the key's comment is the name).  See
docs/relay.md, "Grants".

Identity comes from the key alone, so a key belongs to one principal, and a service
name to one agent (only its owner may ever take it over).  A grant file that changes
is re-read on the next lookup; a bad new version is refused as a whole and the
previous grants stay in force until the file is fixed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from relay.config import (
    ConfigError,
    PrincipalConfig,
    PrincipalSite,
    RelayConfig,
    ServiceGrant,
    Where,
    check_principals,
    config_sites,
    parse_principal_name,
    parse_public_key,
    parse_service_grant,
)

_log = Logger()

AGENT = "agent"
USER = "user"

_RACY_NS = 2_000_000_000
"""How long after a file's last change its content, not only its stat, is compared:
a rewrite within one tick of the file system's clock keeps size, mtime and inode."""

_KEY_TYPE_RE = re.compile(r"(?:ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]*(?:[ \t]|\Z)")
_OPTION_NAME_RE = re.compile(r"[A-Za-z0-9-]+")
_NUMBER_RE = re.compile(r"[0-9]{1,9}")
_WILDCARD_HOSTS = ("", "*", "0.0.0.0", "[::]")

# OpenSSH options that only restrict what labrelay never offers anyway (ptys, X11,
# agent forwarding, user rc): accepted and ignored.  ``port-forwarding`` undoes the
# ``restrict`` of a line whose permitopen/permitlisten labrelay honours anyway.
_IGNORED = ("restrict", "port-forwarding")
# Known OpenSSH options labrelay does not implement: refusing them is safer than
# silently granting more than the line says.
_UNSUPPORTED = {
    "from": "source-address restrictions are not supported; drop it or filter with a firewall",
    "expiry-time": "key expiry is not supported; remove the line when the key should expire",
    "command": "the relay runs no commands",
    "environment": "the relay runs no commands, so it sets no environment",
    "principals": "certificates are not supported",
    "cert-authority": "certificates are not supported",
    "tunnel": "tun/tap forwarding is not supported",
    "pty": "the relay never allocates a pty",
    "x11-forwarding": "the relay never forwards X11",
    "agent-forwarding": "the relay never forwards the SSH agent",
    "user-rc": "the relay runs no commands",
    "verify-required": "security-key verification is not supported",
    "touch-required": "security-key touch policies are not supported",
}


@dataclass(frozen=True)
class Principal:
    """An agent or a user as the relay sees it after authentication.

    ``max_sessions`` is a user's cap on concurrent sessions: its own grant, else the
    relay's ``max_sessions_per_user``; always None for agents."""

    kind: str  # "agent" | "user"
    name: str
    services: tuple[ServiceGrant, ...]
    public_ports: frozenset[int]
    max_sessions: int | None

    def may_register(self, name: str, port: int) -> bool:
        """Whether this agent may register the service ``name:port`` (``tcpip-forward``)."""
        return self.kind == AGENT and self._granted(name, port)

    def may_reach(self, name: str, port: int) -> bool:
        """Whether this user may open a session to ``name:port`` (``direct-tcpip``)."""
        return self.kind == USER and self._granted(name, port)

    def may_bind_public(self, port: int) -> bool:
        """Whether this agent may have the relay listen on public port ``port``."""
        return self.kind == AGENT and port in self.public_ports

    def _granted(self, name: str, port: int) -> bool:
        if not 1 <= port <= 65535:
            return False
        lowered = name.lower()
        return any(grant.matches(lowered, port) for grant in self.services)


@dataclass(frozen=True)
class _State:
    by_key: dict[bytes, Principal]
    principals: tuple[Principal, ...]
    owners: dict[str, Principal]
    public_ports: dict[int, Principal]


@dataclass(frozen=True)
class _Snapshot:
    """One grant file as last read: stat signature, bytes (None if unreadable)."""

    path: Path
    kind: str
    signature: tuple[int, ...]
    data: bytes | None
    error: str
    mode: int = 0

    @property
    def racy_until(self) -> int:
        return self.signature[4] + _RACY_NS if self.data is not None else 0


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, max(st.st_mtime_ns, st.st_ctime_ns))


def _read(path: Path, kind: str) -> _Snapshot:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        return _Snapshot(path, kind, (-1, e.errno or 0), None, e.strerror or str(e))
    return _Snapshot(path, kind, _signature(st), data, "", st.st_mode)


class Grants:
    """Who is who, by public key, and what each may do.

    Every lookup stats the grant files (cheap) and re-reads them when an inode, size
    or time changed (and, for two seconds after a change, when the content did: a
    rewrite within one clock tick keeps all three), so a revoked key loses new sessions
    at once.  A new version that fails to parse, conflicts, or vanishes is refused as a
    whole: the previous grants stay in force, an error is logged
    (``event="grants_reload_failed"``) and the files are tried again once one changes."""

    def __init__(self, relay: RelayConfig, source: str) -> None:
        """Raises ConfigError if a grant file is missing, unreadable or bad, or if the
        grants conflict (one key twice, one service name for two agents ...)."""
        self._relay = relay
        self._source = source
        self._sites = config_sites(relay, source)
        self._files = [
            (path, kind)
            for path, kind in ((relay.agents_file, AGENT), (relay.users_file, USER))
            if path is not None
        ]
        self._seen = tuple(_read(path, kind) for path, kind in self._files)
        self._state = self._build(self._seen)

    # --- lookups ---------------------------------------------------------

    def principal_for(self, key_blob: bytes) -> Principal | None:
        """The agent or user whose key has this SSH wire blob (``Key.blob()``)."""
        self._refresh()
        return self._state.by_key.get(key_blob)

    def principals(self) -> list[Principal]:
        """Every principal: config tables first, then the agents file, then the users file."""
        self._refresh()
        return list(self._state.principals)

    def owner_of(self, service_name: str) -> Principal | None:
        """The agent granted ``service_name`` (case-insensitive), if any."""
        self._refresh()
        return self._state.owners.get(service_name.lower())

    def public_port_owner(self, port: int) -> Principal | None:
        """The agent granted public port ``port``, if any."""
        self._refresh()
        return self._state.public_ports.get(port)

    # --- reloading -------------------------------------------------------

    def _refresh(self) -> None:
        if not self._files or not self._changed():
            return
        snapshot = tuple(_read(path, kind) for path, kind in self._files)
        if [(s.signature, s.data, s.mode) for s in snapshot] == [
            (s.signature, s.data, s.mode) for s in self._seen
        ]:
            return
        self._seen = snapshot
        try:
            state = self._build(snapshot)
        except ConfigError as e:
            _log.error(
                "grants not reloaded, the previous grants stay in force: {reason}",
                event="grants_reload_failed",
                reason=str(e),
                file=e.source,
            )
            return
        self._state = state
        _log.info(
            "grants reloaded: {agents} agents, {users} users",
            event="grants_reloaded",
            agents=sum(p.kind == AGENT for p in state.principals),
            users=sum(p.kind == USER for p in state.principals),
        )

    def _changed(self) -> bool:
        now = time.time_ns()
        for seen in self._seen:
            try:
                signature = _signature(os.stat(seen.path))
            except OSError as e:
                signature = (-1, e.errno or 0)
            if signature != seen.signature:
                return True
            if now < seen.racy_until and _read(seen.path, seen.kind).data != seen.data:
                return True
        return False

    def _build(self, snapshot: Iterable[_Snapshot]) -> _State:
        sites = list(self._sites)
        for file in snapshot:
            if file.data is None:
                raise ConfigError(
                    str(file.path),
                    "",
                    f"cannot read the {file.kind}s file: {file.error}",
                    f"check {file.kind}s_file in [relay] or --{file.kind}s",
                )
            if file.mode & stat.S_IWOTH:
                raise ConfigError(
                    str(file.path),
                    "",
                    f"the {file.kind}s file is writable by anyone, so anyone could grant "
                    "themselves access",
                    f"chmod o-w {file.path}",
                )
            try:
                text = file.data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    str(file.path),
                    "",
                    f"not UTF-8 text (bad byte at offset {e.start})",
                    "save it as UTF-8",
                ) from None
            sites.extend(parse_grant_file(text, file.kind, str(file.path)))
        blobs = check_principals(sites, self._relay, (self._source, "relay.listen"))
        by_key: dict[bytes, Principal] = {}
        owners: dict[str, Principal] = {}
        public_ports: dict[int, Principal] = {}
        principals = []
        for site, keys in zip(sites, blobs, strict=True):
            p = site.principal
            max_sessions = p.max_sessions
            if p.kind == USER and max_sessions is None:
                max_sessions = self._relay.max_sessions_per_user
            principal = Principal(
                kind=p.kind,
                name=p.name,
                services=p.services,
                public_ports=frozenset(p.public_ports),
                max_sessions=max_sessions,
            )
            principals.append(principal)
            by_key.update(dict.fromkeys(keys, principal))
            if p.kind == AGENT:
                owners.update(dict.fromkeys((g.name for g in p.services), principal))
                public_ports.update(dict.fromkeys(p.public_ports, principal))
        return _State(by_key, tuple(principals), owners, public_ports)


# --- grant files ---------------------------------------------------------------


@dataclass
class _Entry:
    """One principal being assembled from the lines that carry its name."""

    name: str
    name_at: Where
    keys: list[tuple[str, Where]]
    services: dict[ServiceGrant, Where]
    ports: dict[int, Where]
    max_sessions: tuple[int, Where] | None = None


def _options(line: str, where: str) -> tuple[list[tuple[str, str | None, str]], str]:
    """Split an authorized_keys line into its options and the key part.

    Options are ``name`` or ``name="value"`` separated by commas, up to the first
    blank outside quotes; ``\\"`` is a quote inside a value.  Returns
    ``[(lower-cased name, value or None, text as written)]`` and the rest of the line."""
    if _KEY_TYPE_RE.match(line):
        return [], line
    hint = 'write options as name="value" separated by commas, e.g. permitopen="gpu-cluster:22"'
    options = []
    i, n = 0, len(line)
    while True:
        match = _OPTION_NAME_RE.match(line, i)
        if match is None:
            raise ConfigError(
                where, "", f"expected an option or a key type at column {i + 1}", hint
            )
        start, name = i, match.group()
        i = match.end()
        value = None
        if i < n and line[i] == "=":
            i += 1
            if i >= n or line[i] != '"':
                raise ConfigError(
                    where, name, f"the value of {name} must be in double quotes", hint
                )
            i += 1
            chars = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n and line[i + 1] == '"':
                    i += 1
                chars.append(line[i])
                i += 1
            if i >= n:
                raise ConfigError(where, name, f"unclosed quote in the value of {name}", hint)
            i += 1
            value = "".join(chars)
        options.append((name.lower(), value, line[start:i]))
        if i >= n:
            raise ConfigError(where, "", "options but no key after them", hint)
        if line[i] == ",":
            i += 1
            continue
        if line[i] in " \t":
            return options, line[i:].strip()
        raise ConfigError(where, line[start:i], f"unexpected {line[i]!r} after an option", hint)


def _small_number(text: str) -> bool:
    """Whether ``text`` is 1..9 ASCII digits.  ``str.isdigit`` also accepts "²" and
    other Unicode digits that ``int()`` refuses with a ValueError (found by tests/fuzz
    grant_file), and ``int()`` refuses more than 4300 digits."""
    return _NUMBER_RE.fullmatch(text) is not None


def _permitlisten(value: str, where: str, written: str) -> ServiceGrant | int:
    """An agent's ``permitlisten``: a service (``name:port``/``name:*``) or a public
    port (``2201``, ``0.0.0.0:2201``, ``*:2201``, ``[::]:2201``)."""
    hint = 'e.g. permitlisten="gpu-cluster:22" (a service) or permitlisten="2201" (a public port)'
    host, sep, port_text = value.rpartition(":")
    if sep and host not in _WILDCARD_HOSTS:
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return parse_service_grant(value, AGENT, source=where, keypath=written)
        raise ConfigError(
            where,
            written,
            f"{host} is an address: public ports listen on the relay's public_bind address",
            'write just the port, e.g. permitlisten="2201"',
        )
    if not _small_number(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(
            where, written, f"public port {port_text!r} must be a number in 1..65535", hint
        )
    return int(port_text)


def _max_sessions(value: str, where: str, written: str) -> int:
    if not _small_number(value) or int(value) < 1:
        raise ConfigError(
            where,
            written,
            f"max-sessions must be a whole number >= 1, got {value!r}",
            'e.g. max-sessions="10"',
        )
    return int(value)


def _grant_line(
    line: str, kind: str, where: str
) -> tuple[str, str, list[tuple[ServiceGrant | int, str]], tuple[int, str] | None]:
    """(name, key text, each grant with the option it came from, max-sessions)."""
    options, key_text = _options(line, where)
    parse_public_key(key_text, source=where, keypath="")
    fields = key_text.split(None, 2)
    name = fields[2].strip() if len(fields) == 3 else ""
    example = "lab_pc" if kind == AGENT else "alice"
    if not name:
        raise ConfigError(
            where,
            "",
            f"the key has no comment, and the comment is the {kind}'s name",
            f"add the name after the key, e.g. ssh-ed25519 AAAA... {example}",
        )
    try:
        parse_principal_name(name, source=where, keypath="")
    except ConfigError as e:
        raise ConfigError(
            where, "", e.problem, f"the key's comment is the {kind}'s name, e.g. {example}"
        ) from None
    grant_option = "permitlisten" if kind == AGENT else "permitopen"
    grants: list[tuple[ServiceGrant | int, str]] = []
    max_sessions = None
    for option, value, written in options:
        if option == grant_option or (option == "max-sessions" and kind == USER):
            if value is None:
                example_value = "10" if option == "max-sessions" else "gpu-cluster:22"
                raise ConfigError(
                    where, written, f"{option} needs a value", f'e.g. {option}="{example_value}"'
                )
            if option == "max-sessions":
                max_sessions = (_max_sessions(value, where, written), written)
            elif kind == AGENT:
                grants.append((_permitlisten(value, where, written), written))
            else:
                grant = parse_service_grant(value, USER, source=where, keypath=written)
                grants.append((grant, written))
        elif option == "no-port-forwarding":
            raise ConfigError(
                where,
                written,
                "no-port-forwarding would forbid everything this line grants",
                f"remove it: labrelay forwards only what {grant_option} grants",
            )
        elif option in _IGNORED or option.startswith("no-"):
            if value is not None:
                raise ConfigError(where, written, f"{option} takes no value", f"write {option}")
        elif option in ("permitopen", "permitlisten", "max-sessions"):
            other = "users" if kind == AGENT else "agents"
            raise ConfigError(
                where,
                written,
                f"{option} belongs in the {other} file, not the {kind}s file",
                f"a {kind}s file grants with {grant_option}"
                + (" and max-sessions" if kind == USER else ""),
            )
        elif option in _UNSUPPORTED:
            raise ConfigError(
                where, written, f"{option} is not supported by labrelay", _UNSUPPORTED[option]
            )
        else:
            valid = [
                grant_option,
                *(["max-sessions"] if kind == USER else []),
                "restrict",
                "no-pty and the other no-* options",
            ]
            raise ConfigError(
                where,
                written,
                f"unknown option {option!r}",
                "valid options here: " + ", ".join(valid),
            )
    return name, key_text, grants, max_sessions


def parse_grant_file(text: str, kind: str, source: str) -> list[PrincipalSite]:
    """Parse an agents file (``kind="agent"``) or users file (``kind="user"``).

    Lines with the same name (key comment) make one principal with several keys, its
    grants merged.  Errors name ``FILE:LINE`` and, where it helps, the option."""
    entries: dict[str, _Entry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        name, key_text, grants, max_sessions = _grant_line(line, kind, where)
        entry = entries.get(name)
        if entry is None:
            entry = entries[name] = _Entry(name, (where, ""), [], {}, {})
        entry.keys.append((key_text, (where, "")))
        for grant, written in grants:
            if isinstance(grant, int):
                entry.ports.setdefault(grant, (where, written))
            else:
                entry.services.setdefault(grant, (where, written))
        if max_sessions is not None:
            value, written = max_sessions
            if entry.max_sessions is not None and entry.max_sessions[0] != value:
                first = entry.max_sessions[1]
                raise ConfigError(
                    where,
                    written,
                    f'{name} already has max-sessions="{entry.max_sessions[0]}" (also {first[0]})',
                    "give max-sessions once per user, or the same on every line",
                )
            entry.max_sessions = (value, (where, written))
    sites = []
    for entry in entries.values():
        principal = PrincipalConfig(
            kind=kind,
            name=entry.name,
            keys=tuple(key for key, _ in entry.keys),
            services=tuple(entry.services),
            public_ports=tuple(entry.ports),
            max_sessions=None if entry.max_sessions is None else entry.max_sessions[0],
        )
        sites.append(
            PrincipalSite(
                principal=principal,
                name_at=entry.name_at,
                keys_at=tuple(at for _, at in entry.keys),
                services_at=tuple(entry.services.values()),
                ports_at=tuple(entry.ports.values()),
            )
        )
    return sites
