"""The TOML file: each section read into the schema, then the whole node checked.

:func:`load_config` reads a file, :func:`parse_config` its text; each section has its
reader here (``[admin]``, ``[relay]`` with ``[relay.penalties]`` and its principals,
``[[forward]]``) or in :mod:`relay.config.readers` (``[[link]]`` with its
``[[link.remote]]``/``[[link.local]]``, and the small readers all sections share).
They walk the file with :class:`~relay.config.section.Section`, check single strings
with :mod:`relay.config.grammar`, and leave what spans entries to
:mod:`relay.config.checks`.  Nothing starts on a bad file: parsing is complete before
any service is built.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import stat
import tomllib
from pathlib import Path
from typing import Any

from relay.config import grammar
from relay.config.checks import (
    check_principals,
    config_sites,
    validate_node,
    validate_plain_forwards,
)
from relay.config.errors import ConfigError, raise_all
from relay.config.grammar import (
    default_plain_forward_name,
    parse_admin_listen,
    parse_relay_listen,
)
from relay.config.keys import (
    ADMIN_KEYS,
    CROWDING_KEYS,
    FORWARD_KEYS,
    LINK_KEYS,
    PENALTY_KEYS,
    RELAY_AGENT_KEYS,
    RELAY_KEYS,
    RELAY_USER_KEYS,
    TOP_KEYS,
)
from relay.config.lifecycle import read_lifecycle
from relay.config.readers import (
    _collect,
    _each,
    _forward_entry,
    _keepalive,
    _parse_link,
    _path,
    _window,
)
from relay.config.safepath import open_to_anyone
from relay.config.schema import (
    DEFAULT_ADMIN_LISTEN,
    LOCAL_DEFAULT_BIND,
    AdminConfig,
    CrowdingConfig,
    IPNetwork,
    NodeConfig,
    PenaltyConfig,
    PlainForwardConfig,
    PrincipalConfig,
    RelayConfig,
)
from relay.config.section import Section, describe, fmt
from relay.config.transport import tls_listen

ADMIN_MAX_BODY = 1024 * 1024
"""The most ``[admin] max_body`` may be: a body is kept in memory, for each of up to
``max_connections`` connections, and no admin request needs one."""
ADMIN_MAX_LIFETIME = 3600.0
"""The most ``[admin] connection_lifetime`` may be (an hour): past a few seconds it
only lets a trickling client hold a descriptor longer."""


def _parse_admin(sec: Section, base: Path) -> AdminConfig:
    token_file = sec.string("token_file")
    listen = parse_admin_listen(
        sec.string("listen") or DEFAULT_ADMIN_LISTEN, source=sec.source,
        keypath=sec.keypath("listen"),
        token_file=_path(token_file, base) if token_file else None,
    )
    defaults = AdminConfig(listen.listen)
    total = sec.integer("max_connections", defaults.max_connections, 1, 4096)
    per_source = sec.integer("max_connections_per_source",
                             defaults.max_connections_per_source, 1, 4096)
    if per_source > total:
        raise sec.error(
            "max_connections_per_source",
            f"max_connections_per_source ({per_source}) must be at most max_connections "
            f"({total}): one address could otherwise hold every admin connection",
            f"e.g. max_connections_per_source = {min(defaults.max_connections_per_source, total)}"
            f", or a larger max_connections")
    return dataclasses.replace(
        listen, max_connections=total, max_connections_per_source=per_source,
        connection_lifetime=sec.number("connection_lifetime", defaults.connection_lifetime,
                                       low=0, above=True, high=ADMIN_MAX_LIFETIME),
        max_body=sec.integer("max_body", defaults.max_body, 0, ADMIN_MAX_BODY),
    )


def _parse_principal(sec: Section, kind: str, trusted_ca: bool = False) -> PrincipalConfig:
    """One ``[[relay.agent]]`` or ``[[relay.user]]`` table (conflicts between tables
    are checked afterwards, by :func:`check_principals`).  With ``trusted_ca`` (a
    relay-wide ``trusted_user_ca``), a user needs no keys: its certificates log in."""
    name = sec.string("name", required=True)
    assert name is not None
    with sec.at("name"):
        grammar.principal_name(name)
    certified = "cert_authorities" in sec.data
    by_relay_ca = trusted_ca and kind == "user"
    if "keys" not in sec.data and not certified and not by_relay_ca:
        raise sec.error("keys", "missing required key 'keys'",
                        f"e.g. {sec.examples['keys']}, or cert_authorities = [...] "
                        "(or trusted_user_ca in [relay], for users) to accept certificates")
    keys = [line.strip() for line in sec.strings("keys")]
    if not keys and not certified and not by_relay_ca:
        raise sec.error("keys", f"the {kind} has no keys")
    _each(sec, "keys", grammar.public_key, keys)
    life = read_lifecycle(sec, name, keys)
    if not keys and not life.authorities and not by_relay_ca:
        raise sec.error("cert_authorities", f"the {kind} has no keys and no certificate "
                        "authorities")
    services = _each(sec, "services", lambda text: grammar.service_grant(text, kind))
    if kind == "agent":
        return PrincipalConfig(
            kind=kind,
            name=name,
            keys=tuple(keys),
            services=tuple(dict.fromkeys(services)),
            public_ports=tuple(dict.fromkeys(sec.integers("public_ports", 1, 65535))),
            key_limits=life.key_limits,
            authorities=life.authorities,
        )
    max_sessions = sec.integer("max_sessions", 1, 1) if "max_sessions" in sec.data else None
    return PrincipalConfig(
        kind=kind,
        name=name,
        keys=tuple(keys),
        services=tuple(dict.fromkeys(services)),
        max_sessions=max_sessions,
        share=sec.number("share", 1.0, low=0.01, high=100),
        rate_limit=_byte_rate(sec, "rate_limit"),
        rate_burst=_byte_rate(sec, "rate_burst"),
        key_limits=life.key_limits,
        authorities=life.authorities,
        expires=life.expires,
        sources=life.sources,
    )


def _byte_rate(sec: Section, key: str) -> int | None:
    """``rate_limit``/``rate_burst``: a byte count as an integer or a string with a unit."""
    value = sec.data.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise sec.error(key, f"expected a string or an integer, got {describe(value)}")
    return grammar.parse_byte_rate(value, source=sec.source, keypath=sec.keypath(key))


def _parse_penalties(sec: Section | None) -> PenaltyConfig:
    defaults = PenaltyConfig()
    if sec is None:
        return defaults
    enabled = sec.data.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise sec.error("enabled", f"expected true or false, got {describe(enabled)}")
    overflow = sec.data.get("overflow", defaults.overflow)
    if overflow not in ("permissive", "deny-all"):
        raise sec.error("overflow", f"expected \"permissive\" or \"deny-all\", got "
                        f"{describe(overflow)}",
                        'overflow = "permissive" (a full table forgets the penalties '
                        'expiring soonest) or "deny-all" (it refuses everyone not exempt)')
    seconds = {key: sec.number(key, getattr(defaults, key), low=0)
               for key in ("authfail", "noauth", "grace_exceeded", "protocol", "min")}
    maximum = sec.number("max", defaults.max, low=0, above=True)
    if seconds["min"] >= maximum:
        raise sec.error("min", f"min ({fmt(seconds['min'])}) must be below max "
                        f"({fmt(maximum)}): a penalty could never become active",
                        "e.g. min = 15 and max = 600")
    return PenaltyConfig(
        enabled=enabled, authfail=seconds["authfail"], noauth=seconds["noauth"],
        grace_exceeded=seconds["grace_exceeded"], protocol=seconds["protocol"],
        max=maximum, min=seconds["min"],
        max_sources=sec.integer("max_sources", defaults.max_sources, 1, 16 * 1024 * 1024),
        overflow=overflow,
    )


CROWDING_FLOOR = 1.0
"""The least ``[relay.crowding] silent`` may be: a real client's version line (or
hello, or ClientHello) arrives within one round trip of accept, and a TCP
retransmission of it (the first retransmission timeout is 1 s) must not cost a
client on a bad link its place."""


def _parse_crowding(sec: Section | None, login_grace: float, source4: int,
                    source6: int) -> CrowdingConfig:
    # A short login_grace shortens the stages left to their defaults; a per-source
    # netblock wider than a neighbourhood's default widens that default to it.
    base = CrowdingConfig()
    defaults = CrowdingConfig(silent=min(base.silent, login_grace),
                              handshake=min(base.handshake, login_grace),
                              auth=min(base.auth, login_grace),
                              netblock4=min(base.netblock4, source4),
                              netblock6=min(base.netblock6, source6))
    if sec is None:
        return defaults
    netblocks = {}
    for key, source, top, example in (("netblock4", source4, 32, "netblock4 = 24"),
                                       ("netblock6", source6, 128, "netblock6 = 48")):
        bits = netblocks[key] = sec.integer(key, getattr(defaults, key), 0, top)
        if bits > source:
            raise sec.error(key, f"{key} ({bits}) must be at most per_source_{key} "
                            f"({source}): a neighbourhood is made of whole sources, so its "
                            "network cannot be narrower than a source's", f"e.g. {example}")
    enabled = sec.data.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise sec.error("enabled", f"expected true or false, got {describe(enabled)}")
    silent = sec.number("silent", defaults.silent, low=CROWDING_FLOOR)
    handshake = sec.number("handshake", defaults.handshake, low=0, above=True)
    auth = sec.number("auth", defaults.auth, low=0, above=True)
    if handshake < silent:
        raise sec.error("handshake", f"handshake ({fmt(handshake)}) must be at least silent "
                        f"({fmt(silent)}): a connection that has spoken must not lose its "
                        "place before one that has not", "e.g. silent = 2, handshake = 10")
    if auth < handshake:
        raise sec.error("auth", f"auth ({fmt(auth)}) must be at least handshake "
                        f"({fmt(handshake)}): a connection past key exchange must not lose "
                        "its place before one still in it", "e.g. handshake = 10, auth = 20")
    if auth > login_grace:
        raise sec.error("auth", f"auth ({fmt(auth)}) must be at most login_grace "
                        f"({fmt(login_grace)}): past login_grace the connection is closed "
                        "anyway", f"e.g. auth = {fmt(login_grace)}, or a longer login_grace")
    return CrowdingConfig(enabled=enabled, silent=silent, handshake=handshake, auth=auth,
                          netblock4=netblocks["netblock4"], netblock6=netblocks["netblock6"])


def _networks(sec: Section, key: str) -> tuple[IPNetwork, ...]:
    nets = []
    for j, text in enumerate(sec.strings(key)):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(sec.source, f"{sec.keypath(key)}[{j}]",
                              f"{text!r} is not an IP address or network",
                              f"e.g. {sec.examples[key]}") from None
    return tuple(dict.fromkeys(nets))


def _principals(sec: Section, kind: str, examples: Any,
                problems: list[ConfigError] | None,
                trusted_ca: bool = False) -> tuple[PrincipalConfig, ...]:
    """The ``[[relay.agent]]`` or ``[[relay.user]]`` entries; with ``problems``, a wrong
    entry is added there and the others are still read."""
    if problems is None:
        return tuple(_parse_principal(s, kind, trusted_ca)
                     for s in sec.tables(kind, examples))
    read = [_collect(problems,
                     lambda s=s: _parse_principal(s, kind, trusted_ca))  # type: ignore[misc]
            for s in sec.tables(kind, examples)]
    return tuple(p for p in read if p is not None)


def _trusted_user_ca(sec: Section) -> tuple[str, ...]:
    """``trusted_user_ca``: CA public-key lines (a string or an array), each checked as a
    key (an error names its index; a certificate or a DSA key is refused)."""
    cas = [line.strip() for line in sec.strings("trusted_user_ca")]
    _each(sec, "trusted_user_ca", grammar.public_key, cas)
    return tuple(dict.fromkeys(cas))


def _parse_relay(sec: Section, base: Path,
                 problems: list[ConfigError] | None = None) -> RelayConfig:
    listen = parse_relay_listen(
        sec.string("listen") or "0.0.0.0:2222", source=sec.source, keypath=sec.keypath("listen")
    )
    state_dir = sec.string("state_dir")
    next_host_key = sec.string("next_host_key")
    public_bind = sec.string("public_bind")
    if public_bind is not None:
        with sec.at("public_bind"):
            public_bind = grammar.bind_address(public_bind)
    agents_file = sec.string("agents_file")
    users_file = sec.string("users_file")
    revoked_keys = sec.string("revoked_keys")
    trusted_user_ca = _trusted_user_ca(sec)
    window, max_packet = _window(sec)
    data_bind = sec.string("data_bind")
    if data_bind is not None:
        with sec.at("data_bind"):
            data_bind = grammar.bind_address(data_bind)
    e2e = _each(sec, "e2e_services", lambda text: grammar.service_grant(text, "user"))
    defaults = RelayConfig()
    relay = RelayConfig(
        data_port=sec.integer("data_port", 0, 0, 65535) if "data_port" in sec.data else None,
        data_bind=data_bind,
        e2e_services=tuple(dict.fromkeys(e2e)),
        token_lifetime=sec.number("token_lifetime", defaults.token_lifetime, low=0, above=True),
        data_hello_timeout=sec.number("data_hello_timeout", defaults.data_hello_timeout,
                                      low=0, above=True),
        grants_poll_interval=sec.number("grants_poll_interval", defaults.grants_poll_interval,
                                        low=0, above=True, high=10),
        max_tokens_per_session=sec.integer("max_tokens_per_session",
                                           defaults.max_tokens_per_session, 1),
        max_tokens_per_user=sec.integer("max_tokens_per_user", defaults.max_tokens_per_user, 1),
        listen=listen,
        state_dir=defaults.state_dir if state_dir is None else _path(state_dir, base),
        next_host_key=None if next_host_key is None else _path(next_host_key, base),
        public_bind=defaults.public_bind if public_bind is None else public_bind,
        agents_file=None if agents_file is None else _path(agents_file, base),
        users_file=None if users_file is None else _path(users_file, base),
        revoked_keys=None if revoked_keys is None else _path(revoked_keys, base),
        agents=_principals(sec, "agent", RELAY_AGENT_KEYS, problems),
        trusted_user_ca=trusted_user_ca,
        users=_principals(sec, "user", RELAY_USER_KEYS, problems, bool(trusted_user_ca)),
        login_grace=sec.number("login_grace", defaults.login_grace, low=0, above=True),
        max_auth_tries=sec.integer("max_auth_tries", defaults.max_auth_tries, 1),
        kex_timeout=sec.number("kex_timeout", defaults.kex_timeout, low=0, above=True),
        max_unauthenticated=sec.integer(
            "max_unauthenticated", defaults.max_unauthenticated, 1
        ),
        per_source_max_unauthenticated=sec.integer(
            "per_source_max_unauthenticated", defaults.per_source_max_unauthenticated, 1
        ),
        per_source_netblock4=sec.integer("per_source_netblock4",
                                         defaults.per_source_netblock4, 0, 32),
        per_source_netblock6=sec.integer("per_source_netblock6",
                                         defaults.per_source_netblock6, 0, 128),
        penalties=_parse_penalties(sec.table("penalties", PENALTY_KEYS)),
        penalty_exempt=_networks(sec, "penalty_exempt"),
        crowding=_parse_crowding(sec.table("crowding", CROWDING_KEYS),
                                 sec.number("login_grace", defaults.login_grace, low=0,
                                            above=True),
                                 sec.integer("per_source_netblock4",
                                             defaults.per_source_netblock4, 0, 32),
                                 sec.integer("per_source_netblock6",
                                             defaults.per_source_netblock6, 0, 128)),
        max_channels=sec.integer("max_channels", defaults.max_channels, 1),
        max_sessions_per_user=sec.integer(
            "max_sessions_per_user", defaults.max_sessions_per_user, 1
        ),
        max_connections_per_user=sec.integer(
            "max_connections_per_user", defaults.max_connections_per_user, 1
        ),
        idle_timeout=sec.number("idle_timeout", defaults.idle_timeout, low=0),
        public_wait=sec.number("public_wait", defaults.public_wait, low=0),
        public_max_connections=(sec.integer("public_max_connections", 0, 1)
                                if "public_max_connections" in sec.data else None),
        public_max_per_source=sec.integer("public_max_per_source",
                                          defaults.public_max_per_source, 0),
        public_per_source_exempt=_networks(sec, "public_per_source_exempt"),
        early_confirm=sec.boolean("early_confirm", defaults.early_confirm),
        resume_grace=sec.number("resume_grace", defaults.resume_grace, low=0, high=86400),
        resume_max_sessions=sec.integer("resume_max_sessions", defaults.resume_max_sessions, 0),
        resume_max_sessions_per_agent=sec.integer(
            "resume_max_sessions_per_agent", defaults.resume_max_sessions_per_agent, 0),
        keepalive=_keepalive(sec),
        window=window,
        max_packet=max_packet,
        tls=tls_listen(sec, lambda text: _path(text, base)),
    )
    check_principals(config_sites(relay, sec.source), relay, (sec.source, sec.keypath("listen")))
    return relay


def _parse_plain_forward(sec: Section) -> PlainForwardConfig:
    listen = sec.string("listen", required=True)
    connect = sec.string("connect", required=True)
    assert listen is not None and connect is not None
    fields = _forward_entry(
        sec, listen, LOCAL_DEFAULT_BIND, "connect", connect, default_plain_forward_name
    )
    return PlainForwardConfig(*fields)


def _parse_plain_forwards(top: Section,
                          problems: list[ConfigError]) -> tuple[PlainForwardConfig, ...]:
    read = [_collect(problems, lambda sec=sec: _parse_plain_forward(sec))  # type: ignore[misc]
            for sec in top.tables("forward", FORWARD_KEYS)]
    return tuple(f for f in read if f is not None)


def parse_config(text: str, source: str, *, base_dir: Path | None = None) -> NodeConfig:
    """Parse a node's TOML config.  ``source`` names it in errors; relative paths in
    it are relative to ``base_dir`` (default: the directory of ``source``).

    Every entry (each ``[[link]]``, ``[admin]``, ``[relay]``, each principal and each
    ``[[forward]]``) is read even when an earlier one is wrong: one problem raises its
    ConfigError, several raise :class:`~relay.config.errors.ConfigErrors` with the
    first problem of each entry.  The checks that span entries run once every entry
    read.

    A config with no links, no relay and no admin section is valid here; whether that
    is enough to run is the caller's decision.  Grant files named by ``[relay]`` are
    read by :class:`relay.server.grants.Grants`, not here."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"TOML syntax error: {e}", _toml_hint(str(e))) from None
    base = base_dir if base_dir is not None else Path(source).expanduser().absolute().parent
    problems: list[ConfigError] = []
    top = Section(source, doc, "", TOP_KEYS)
    admin = _collect(problems, lambda: top.table("admin", ADMIN_KEYS))
    relay = _collect(problems, lambda: top.table("relay", RELAY_KEYS))
    link_secs = _collect(problems, lambda: top.tables("link", LINK_KEYS)) or []
    links = [_collect(problems, lambda i=i, sec=sec: _parse_link(sec, i, base))  # type: ignore[misc]
             for i, sec in enumerate(link_secs)]
    admin_config = _collect(problems, lambda: _parse_admin(admin, base)) if admin else None
    relay_config = _collect(problems, lambda: _parse_relay(relay, base, problems)) \
        if relay is not None else None
    forwards = _collect(problems, lambda: _parse_plain_forwards(top, problems))
    raise_all(problems)
    assert forwards is not None
    config = NodeConfig(
        source=source,
        links=tuple(link for link in links if link is not None),
        admin=admin_config,
        relay=relay_config,
        forwards=forwards,
    )
    validate_node(config)
    validate_plain_forwards(config)
    return config


def load_config(path: str | Path) -> NodeConfig:
    """Read and parse a config file; a missing or unreadable file is a ConfigError."""
    source = str(path)
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError(
            source,
            "",
            f"cannot read the config file: {e.strerror or e}",
            "check the path; docs/config.md has a complete example to start from",
        ) from None
    # The config may grant ([[relay.user]]) and says where links go and what they
    # forward: one that others could rewrite is refused, as a grant file is (a pipe,
    # e.g. --config <(...), has no directories to check).
    try:
        regular = stat.S_ISREG(file.stat().st_mode)
    except OSError:
        regular = False
    if regular:
        unsafe = open_to_anyone(file)
        if unsafe is not None:
            raise ConfigError(source, "", f"anyone could change what this node does: "
                              f"{unsafe[0]}", unsafe[1])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            source, "", f"not UTF-8 text (bad byte at offset {e.start})", "save it as UTF-8"
        ) from None
    return parse_config(text, source, base_dir=file.absolute().parent)


def _toml_hint(message: str) -> str:
    """The fix for a TOML error: tomllib says "Cannot overwrite a value" (or "Cannot
    declare ... twice") for a key or table written twice — an admin who added a second
    ``listen =`` or pasted a ``[relay]`` table twice — where the quoting hint misled."""
    if message.startswith(("Cannot overwrite a value", "Cannot declare")):
        return ("a key is set twice in the same table, or a [table] appears twice: keep one "
                "(a list of tables is written [[link]], [[relay.user]] …)")
    return 'strings need double quotes and tables brackets, e.g. host = "cloud.example.org"'
