"""The authorized_keys-format grant files (``permitlisten="gpu-cluster:22"`` on an
agent's key line, ``permitopen="gpu-cluster:22"`` on a user's; the key's comment is
the name): :func:`parse_grant_file` turns one into principal sites with the config
grammar and checks; :class:`relay.server.grants.Grants` reads, merges and reloads them.
See docs/relay.md, "Grants"."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from relay.config.checks import PrincipalSite
from relay.config.errors import ConfigError, Where
from relay.config.grammar import (
    parse_byte_rate,
    parse_principal_name,
    parse_public_key,
    parse_service_grant,
    parse_share,
)
from relay.config.schema import (
    CertAuthorityConfig,
    KeyLimitsConfig,
    PrincipalConfig,
    ServiceGrant,
)
from relay.core.grants import AGENT, USER
from relay.core.keylife import KeyOptionError, parse_expiry, parse_from

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
    "command": "the relay runs no commands",
    "environment": "the relay runs no commands, so it sets no environment",
    "tunnel": "tun/tap forwarding is not supported",
    "pty": "the relay never allocates a pty",
    "x11-forwarding": "the relay never forwards X11",
    "agent-forwarding": "the relay never forwards the SSH agent",
    "user-rc": "the relay runs no commands",
    "verify-required": "security-key verification is not supported",
    "touch-required": "security-key touch policies are not supported",
}


@dataclass
class _Entry:
    """One principal being assembled from the lines that carry its name."""

    name: str
    name_at: Where
    keys: list[tuple[str, Where]]
    services: dict[ServiceGrant, Where]
    ports: dict[int, Where]
    max_sessions: tuple[int, Where] | None = None
    limits: list[KeyLimitsConfig] = field(default_factory=list)
    authorities: list[CertAuthorityConfig] = field(default_factory=list)
    # a user's sharing options: option -> (value, FILE:LINE)
    sharing: dict[str, tuple[float, str]] = field(default_factory=dict)


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


_SHARING = ("share", "rate-limit", "rate-burst")
"""A user's sharing options (docs/sharing.md): its weight on a congested link and its
rate limit each way with the burst."""


def _sharing(option: str, value: str | None, where: str, written: str) -> float:
    example = {"share": "2", "rate-limit": "20MB", "rate-burst": "4MB"}[option]
    if value is None:
        raise ConfigError(where, written, f"{option} needs a value", f'e.g. {option}="{example}"')
    if option == "share":
        return parse_share(value, source=where, keypath=written)
    return float(parse_byte_rate(value, source=where, keypath=written))


_LIFECYCLE = ("expiry-time", "from", "cert-authority", "principals")
"""Options that say when, from where and with what the key may log in."""


def _lifecycle(option: str, value: str | None, where: str, written: str) -> Any:
    """``expiry-time`` as a Unix time, ``from`` as written (checked), ``cert-authority``
    as True, ``principals`` as a tuple of names."""
    if option == "cert-authority":
        if value is not None:
            raise ConfigError(where, written, "cert-authority takes no value",
                              'write cert-authority,principals="alice" before the CA key')
        return True
    examples = {"expiry-time": '"20260630"', "from": '"10.0.0.0/8,!10.0.0.66"',
                "principals": '"alice,alice@lab"'}
    if value is None:
        raise ConfigError(where, written, f"{option} needs a value",
                          f"e.g. {option}={examples[option]}")
    try:
        if option == "expiry-time":
            return parse_expiry(value)
        if option == "from":
            parse_from(value)
            return value
    except KeyOptionError as e:
        raise ConfigError(where, written, str(e), f"e.g. {option}={examples[option]}") from None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise ConfigError(where, written, "principals lists no names",
                          f"e.g. principals={examples[option]}")
    return names


def _grant_line(
    line: str, kind: str, where: str, sharing: dict[str, Any] | None = None
) -> tuple[str, str, list[tuple[ServiceGrant | int, str]], tuple[int, str] | None]:
    """(name, key text, each grant with the option it came from, max-sessions); a user's
    sharing options go into ``sharing``."""
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
        elif option in _LIFECYCLE:
            if sharing is not None:
                sharing[option] = _lifecycle(option, value, where, written)
        elif option in _SHARING and kind == USER:
            value_ = _sharing(option, value, where, written)
            if sharing is not None:
                sharing[option] = value_
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
                *(["max-sessions", *_SHARING] if kind == USER else []),
                *_LIFECYCLE,
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


def _whole(setting: tuple[float, str] | None) -> int | None:
    return None if setting is None else int(setting[0])


def parse_grant_file(
    text: str, kind: str, source: str, *, problems: list[ConfigError] | None = None
) -> list[PrincipalSite]:
    """Parse an agents file (``kind="agent"``) or users file (``kind="user"``).

    Lines with the same name (key comment) make one principal with several keys, its
    grants merged.  Errors name ``FILE:LINE`` and, where it helps, the option.  With
    ``problems``, a bad line is appended there and grants nothing instead of raising
    (a reload: one typo must not revoke every other line)."""
    entries: dict[str, _Entry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        sharing: dict[str, Any] = {}
        try:
            name, key_text, grants, max_sessions = _grant_line(line, kind, where, sharing)
            entry = entries.get(name)
            if "principals" in sharing and "cert-authority" not in sharing:
                raise ConfigError(where, "principals", "principals is only for a "
                                  "cert-authority line", "add cert-authority before it")
            for option, value in sharing.items():
                if option not in _SHARING:
                    continue
                earlier = entry.sharing.get(option) if entry is not None else None
                if earlier is not None and earlier[0] != value:
                    raise ConfigError(
                        where, option,
                        f"{name} already has a different {option} (on {earlier[1]})",
                        f"give {option} once per user, or the same on every line",
                    )
            if max_sessions is not None and entry is not None:
                value, written = max_sessions
                if entry.max_sessions is not None and entry.max_sessions[0] != value:
                    first = entry.max_sessions[1]
                    raise ConfigError(
                        where,
                        written,
                        f'{name} already has max-sessions="{entry.max_sessions[0]}" '
                        f"(also {first[0]})",
                        "give max-sessions once per user, or the same on every line",
                    )
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(e)
            continue
        if entry is None:
            entry = entries[name] = _Entry(name, (where, ""), [], {}, {})
        expires, sources = sharing.get("expiry-time"), sharing.get("from")
        if sharing.get("cert-authority"):
            entry.authorities.append(CertAuthorityConfig(
                key_text, tuple(sharing.get("principals", (name,))), expires, sources, where))
        else:
            entry.keys.append((key_text, (where, "")))
            if expires is not None or sources is not None:
                entry.limits.append(KeyLimitsConfig(key_text, expires, sources))
        for grant, written in grants:
            if isinstance(grant, int):
                entry.ports.setdefault(grant, (where, written))
            else:
                entry.services.setdefault(grant, (where, written))
        if max_sessions is not None:
            entry.max_sessions = (max_sessions[0], (where, max_sessions[1]))
        for option, value in sharing.items():
            if option in _SHARING:
                entry.sharing[option] = (value, where)
    sites = []
    for entry in entries.values():
        principal = PrincipalConfig(
            kind=kind,
            name=entry.name,
            keys=tuple(key for key, _ in entry.keys),
            services=tuple(entry.services),
            public_ports=tuple(entry.ports),
            max_sessions=None if entry.max_sessions is None else entry.max_sessions[0],
            share=entry.sharing.get("share", (1.0, ""))[0],
            rate_limit=_whole(entry.sharing.get("rate-limit")),
            rate_burst=_whole(entry.sharing.get("rate-burst")),
            key_limits=tuple(entry.limits),
            authorities=tuple(entry.authorities),
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
