"""The TOML file: each section read into the schema, then the whole node checked.

:func:`load_config` reads a file, :func:`parse_config` its text; each section has its
reader here (``[[link]]`` with its ``[[link.remote]]``/``[[link.local]]``,
``[admin]``, ``[relay]`` with ``[relay.penalties]`` and its principals,
``[[forward]]``).  They walk the file with :class:`~relay.config.section.Section`,
check single strings with :mod:`relay.config.grammar`, and leave what spans entries
to :mod:`relay.config.checks`.  Nothing starts on a bad file: parsing is complete
before any service is built.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from relay.config import grammar
from relay.config.checks import (
    check_principals,
    config_sites,
    validate_node,
    validate_plain_forwards,
)
from relay.config.errors import ConfigError, located, raise_all
from relay.config.grammar import (
    EXAMPLE_FINGERPRINT,
    default_forward_name,
    default_plain_forward_name,
    parse_admin_listen,
    parse_relay_listen,
)
from relay.config.keys import (
    ADMIN_KEYS,
    FORWARD_KEYS,
    LINK_KEYS,
    LOCAL_KEYS,
    PENALTY_KEYS,
    RELAY_AGENT_KEYS,
    RELAY_KEYS,
    RELAY_USER_KEYS,
    REMOTE_KEYS,
    TOP_KEYS,
)
from relay.config.schema import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_MAX_PACKET,
    DEFAULT_WINDOW,
    LOCAL_DEFAULT_BIND,
    REMOTE_DEFAULT_BIND,
    AdminConfig,
    Backoff,
    ForwardKind,
    HostKeyPolicy,
    HostPort,
    IPNetwork,
    Keepalive,
    LinkConfig,
    LocalForward,
    NodeConfig,
    PenaltyConfig,
    PlainForwardConfig,
    PrincipalConfig,
    RelayConfig,
    RemoteForward,
    current_user,
    default_known_hosts,
)
from relay.config.section import Section, describe, fmt
from relay.config.transport import tls_listen, transport_config

T = TypeVar("T")


def _collect(problems: list[ConfigError], parse: Callable[[], T]) -> T | None:
    """``parse()``, or None with its ConfigError added to ``problems``: one wrong entry
    does not hide the problems of the next ones."""
    try:
        return parse()
    except ConfigError as e:
        problems.append(e)
        return None


def _path(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _each(
    sec: Section, key: str, parse: Callable[[str], T], items: list[str] | None = None
) -> list[T]:
    """``parse`` applied to every string of ``key`` (or to ``items`` read from it), a
    syntax error located at its element (``relay.agent[0].keys[1]``)."""
    parsed = []
    for j, text in enumerate(sec.strings(key) if items is None else items):
        with located(sec.source, f"{sec.keypath(key)}[{j}]"):
            parsed.append(parse(text))
    return parsed


def _name_or(sec: Section, default: str) -> str:
    """The entry's ``name`` (checked), or the name it gets by default."""
    name = sec.string("name")
    if name is None:
        return default
    with sec.at("name"):
        grammar.object_name(name)
    return name


def _window(sec: Section) -> tuple[int, int]:
    """``window`` and ``max_packet``, shared by ``[[link]]`` and ``[relay]``."""
    window = sec.integer("window", DEFAULT_WINDOW, 32 * 1024, 16 * 1024 * 1024)
    max_packet = sec.integer("max_packet", DEFAULT_MAX_PACKET, 1024, 256 * 1024)
    if max_packet > window:
        raise sec.error(
            "max_packet",
            f"max_packet {max_packet} is larger than window {window}",
            "max_packet must fit in the window, e.g. window = 2097152 and max_packet = 32768",
        )
    return window, max_packet


def _keepalive(sec: Section) -> Keepalive:
    """``keepalive_interval`` and ``keepalive_count``, shared by ``[[link]]`` and ``[relay]``."""
    return Keepalive(
        interval=sec.number("keepalive_interval", Keepalive.interval, low=0),
        count_max=sec.integer("keepalive_count", Keepalive.count_max, 1),
    )


def _forward_entry(
    sec: Section,
    listen: str,
    default_bind: str,
    target_key: str,
    target: str,
    default_name: Callable[[str, int], str],
) -> tuple[str, int, HostPort, str]:
    """What every forward table has, whatever its kind (``[[link.remote]]``,
    ``[[link.local]]``, ``[[forward]]``): a listen address, a target and a name."""
    with sec.at("listen"):
        bind, port = grammar.listen_address(listen, default_bind)
    with sec.at(target_key):
        connect = grammar.host_port(target)
    return bind, port, connect, _name_or(sec, default_name(bind, port))


def _parse_forwards(link: Section, kind: ForwardKind) -> list[tuple[Any, ...]]:
    """The ``[[link.remote]]`` or ``[[link.local]]`` entries as (bind, port, connect, name)
    (and, for remote forwards, whether ``connect`` is a service of this node's relay)."""
    examples = REMOTE_KEYS if kind == "remote" else LOCAL_KEYS
    default_bind = REMOTE_DEFAULT_BIND if kind == "remote" else LOCAL_DEFAULT_BIND
    forwards: list[tuple[Any, ...]] = []
    for sec in link.tables(kind, examples):
        listen = sec.string("listen", required=True)
        service = sec.string("service") if kind == "remote" else None
        if service is not None and sec.string("connect") is not None:
            raise sec.error("service", "set either connect (a host:port reached from this "
                            "node) or service (a service registered at this node's relay), "
                            "not both", 'e.g. service = "gpu-cluster:22"')
        connect = service if service is not None else sec.string("connect", required=True)
        assert listen is not None and connect is not None
        fields = _forward_entry(
            sec, listen, default_bind, "service" if service is not None else "connect", connect,
            lambda bind, port: default_forward_name(kind, bind, port),
        )
        forwards.append((*fields, True) if service is not None else fields)
    return forwards


def _parse_host_key(sec: Section, base: Path) -> HostKeyPolicy:
    fingerprint = sec.string("host_key")
    if fingerprint is not None:
        with sec.at("host_key"):
            grammar.fingerprint(fingerprint)
    known_hosts_text = sec.string("known_hosts")
    if fingerprint is not None and known_hosts_text is not None:
        raise sec.error(
            "known_hosts",
            "set either host_key (pin one key) or known_hosts, not both",
            f'keep one of them, e.g. host_key = "{EXAMPLE_FINGERPRINT}"',
        )
    strict = sec.string("strict_host_key_checking") or "yes"
    if strict in ("no", "off", "false", "ask"):
        raise sec.error(
            "strict_host_key_checking",
            f"'{strict}' is not allowed: an unattended agent must never trust an unverified "
            "server (anyone on the path could impersonate it)",
            'use "accept-new" (record the key on first connection) or pin host_key = "SHA256:..."',
        )
    if strict not in ("yes", "accept-new"):
        raise sec.error(
            "strict_host_key_checking", f'expected "yes" or "accept-new", got {strict!r}'
        )
    accept_new = strict == "accept-new"
    if fingerprint is not None and accept_new:
        raise sec.error(
            "strict_host_key_checking",
            '"accept-new" has no effect with a pinned host_key',
            "remove strict_host_key_checking, or use known_hosts instead of host_key",
        )
    if fingerprint is not None:
        return HostKeyPolicy(fingerprint=fingerprint)
    known_hosts = (
        default_known_hosts() if known_hosts_text is None else _path(known_hosts_text, base)
    )
    return HostKeyPolicy(known_hosts=known_hosts, accept_new=accept_new)


def _parse_link(sec: Section, index: int, base: Path) -> LinkConfig:
    name = _name_or(sec, f"link{index}")
    host_text = sec.string("host", required=True)
    assert host_text is not None
    with sec.at("host"):
        host = grammar.host_name(host_text)
    user = sec.string("user")
    if user is None:
        user = current_user(source=sec.source, keypath=sec.keypath("user"))
    elif any(ch.isspace() for ch in user):
        raise sec.error("user", f"user {user!r} contains white space")

    backoff_initial = sec.number("backoff_initial", Backoff.initial, low=0, above=True)
    backoff_max = sec.number("backoff_max", Backoff.maximum, low=0, above=True)
    if backoff_max < backoff_initial:
        given = "" if "backoff_max" in sec.data else " (the default)"
        raise sec.error(
            "backoff_max",
            f"backoff_max {fmt(backoff_max)}{given} is less than "
            f"backoff_initial {fmt(backoff_initial)}",
            f"make backoff_max at least backoff_initial, e.g. backoff_max = "
            f"{fmt(max(60.0, backoff_initial))}",
        )
    window, max_packet = _window(sec)
    remote = tuple(RemoteForward(*fields) for fields in _parse_forwards(sec, "remote"))
    local = tuple(LocalForward(*fields) for fields in _parse_forwards(sec, "local"))
    return LinkConfig(
        name=name,
        host=host,
        port=sec.integer("port", 22, 1, 65535),
        user=user,
        identities=tuple(_path(text, base) for text in sec.strings("identity")),
        host_key=_parse_host_key(sec, base),
        keepalive=_keepalive(sec),
        backoff=Backoff(
            initial=backoff_initial,
            maximum=backoff_max,
            factor=sec.number("backoff_factor", Backoff.factor, low=1),
            jitter=sec.number("backoff_jitter", Backoff.jitter, low=0, high=1),
        ),
        connect_timeout=sec.number("connect_timeout", 15.0, low=0, above=True),
        local_wait=sec.number("local_wait", 10.0, low=0),
        window=window,
        max_packet=max_packet,
        fast_path_pool=sec.integer("fast_path_pool", 4, 0, 64),
        transport=transport_config(
            sec.string, lambda key: (sec.source, sec.keypath(key)),
            lambda text: _path(text, base),
            lambda key: sec.integer(key, 443, 1, 65535) if key in sec.data else None),
        resume_grace=sec.number("resume_grace", LinkConfig.resume_grace, low=0, high=86400),
        remote=remote,
        local=local,
    )


def _parse_admin(sec: Section, base: Path) -> AdminConfig:
    token_file = sec.string("token_file")
    return parse_admin_listen(
        sec.string("listen") or DEFAULT_ADMIN_LISTEN, source=sec.source,
        keypath=sec.keypath("listen"),
        token_file=_path(token_file, base) if token_file else None,
    )


def _parse_principal(sec: Section, kind: str) -> PrincipalConfig:
    """One ``[[relay.agent]]`` or ``[[relay.user]]`` table (conflicts between tables
    are checked afterwards, by :func:`check_principals`)."""
    name = sec.string("name", required=True)
    assert name is not None
    with sec.at("name"):
        grammar.principal_name(name)
    if "keys" not in sec.data:
        raise sec.error("keys", "missing required key 'keys'")
    keys = [line.strip() for line in sec.strings("keys")]
    if not keys:
        raise sec.error("keys", f"the {kind} has no keys")
    _each(sec, "keys", grammar.public_key, keys)
    services = _each(sec, "services", lambda text: grammar.service_grant(text, kind))
    if kind == "agent":
        return PrincipalConfig(
            kind=kind,
            name=name,
            keys=tuple(keys),
            services=tuple(dict.fromkeys(services)),
            public_ports=tuple(dict.fromkeys(sec.integers("public_ports", 1, 65535))),
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
                problems: list[ConfigError] | None) -> tuple[PrincipalConfig, ...]:
    """The ``[[relay.agent]]`` or ``[[relay.user]]`` entries; with ``problems``, a wrong
    entry is added there and the others are still read."""
    if problems is None:
        return tuple(_parse_principal(s, kind) for s in sec.tables(kind, examples))
    read = [_collect(problems, lambda s=s: _parse_principal(s, kind))  # type: ignore[misc]
            for s in sec.tables(kind, examples)]
    return tuple(p for p in read if p is not None)


def _parse_relay(sec: Section, base: Path,
                 problems: list[ConfigError] | None = None) -> RelayConfig:
    listen = parse_relay_listen(
        sec.string("listen") or "0.0.0.0:2222", source=sec.source, keypath=sec.keypath("listen")
    )
    state_dir = sec.string("state_dir")
    public_bind = sec.string("public_bind")
    if public_bind is not None:
        with sec.at("public_bind"):
            public_bind = grammar.bind_address(public_bind)
    agents_file = sec.string("agents_file")
    users_file = sec.string("users_file")
    revoked_keys = sec.string("revoked_keys")
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
        public_bind=defaults.public_bind if public_bind is None else public_bind,
        agents_file=None if agents_file is None else _path(agents_file, base),
        users_file=None if users_file is None else _path(users_file, base),
        revoked_keys=None if revoked_keys is None else _path(revoked_keys, base),
        agents=_principals(sec, "agent", RELAY_AGENT_KEYS, problems),
        users=_principals(sec, "user", RELAY_USER_KEYS, problems),
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
        max_channels=sec.integer("max_channels", defaults.max_channels, 1),
        max_sessions_per_user=sec.integer(
            "max_sessions_per_user", defaults.max_sessions_per_user, 1
        ),
        idle_timeout=sec.number("idle_timeout", defaults.idle_timeout, low=0),
        public_wait=sec.number("public_wait", defaults.public_wait, low=0),
        resume_grace=sec.number("resume_grace", defaults.resume_grace, low=0, high=86400),
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
        raise ConfigError(
            source,
            "",
            f"TOML syntax error: {e}",
            'strings need double quotes and tables brackets, e.g. host = "cloud.example.org"',
        ) from None
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
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            source, "", f"not UTF-8 text (bad byte at offset {e.start})", "save it as UTF-8"
        ) from None
    return parse_config(text, source, base_dir=file.absolute().parent)
