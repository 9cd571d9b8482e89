"""Readers shared by the TOML file's sections, and the ``[[link]]`` section's own.

Part of :mod:`relay.config.loader`: the small readers every section uses (paths
relative to the file, a list of strings each checked, an entry's ``name``, ``window``
and ``max_packet``, keepalive) and ``[[link]]`` with its ``[[link.remote]]``,
``[[link.local]]`` and host-key settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from relay.config import grammar
from relay.config.errors import ConfigError, located
from relay.config.grammar import (
    EXAMPLE_FINGERPRINT,
    default_forward_name,
)
from relay.config.keys import (
    LOCAL_KEYS,
    REMOTE_KEYS,
)
from relay.config.schema import (
    DEFAULT_MAX_PACKET,
    DEFAULT_WINDOW,
    LOCAL_DEFAULT_BIND,
    REMOTE_DEFAULT_BIND,
    Backoff,
    ForwardKind,
    HostKeyPolicy,
    HostPort,
    Keepalive,
    LinkConfig,
    LocalForward,
    RemoteForward,
    current_user,
    default_known_hosts,
)
from relay.config.section import Section, fmt
from relay.config.transport import transport_config

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
    user_files = _known_hosts_files(sec, "known_hosts", base)
    global_files = _known_hosts_files(sec, "global_known_hosts", base)
    for key, files in (("known_hosts", user_files), ("global_known_hosts", global_files)):
        if fingerprint is not None and files is not None:
            raise sec.error(
                key,
                f"set either host_key (pin one key) or {key}, not both",
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
    policy = HostKeyPolicy(known_hosts=default_known_hosts(), accept_new=accept_new)
    if user_files is not None:
        policy = policy.with_user_files(user_files)
    return replace(policy, global_known_hosts=global_files or ())


def _known_hosts_files(sec: Section, key: str, base: Path) -> tuple[Path, ...] | None:
    """``key`` as ssh's list of known_hosts files: a path, an array of paths (read in
    order; the first of ``known_hosts`` is the one written), or ``"none"`` for no file
    (ssh's ``none``: never a file named ``none``); None if the key is not set."""
    if key not in sec.data:
        return None
    names = sec.strings(key)
    if not names:
        raise sec.error(key, "an empty array names no file",
                        f'to read no file write {key} = "none"; '
                        f'else e.g. {key} = ["~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts"]')
    if any(n.lower() == "none" for n in names):
        if len(names) > 1:
            raise sec.error(key, f'"none" appears with other files in {names!r}',
                            f'give either "none" or the files, e.g. {key} = "none"')
        return ()
    return tuple(_path(n, base) for n in names)


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
        max_sessions=sec.integer("max_sessions", LinkConfig.max_sessions, 1, 1_000_000),
        max_connecting=sec.integer("max_connecting", LinkConfig.max_connecting, 1, 1_000_000),
        max_sessions_per_target=sec.integer("max_sessions_per_target",
                                            LinkConfig.max_sessions_per_target, 1, 1_000_000),
        remote=remote,
        local=local,
    )
