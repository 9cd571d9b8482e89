"""The ``labrelay agent`` command line: OpenSSH's flags, meaning what they mean to ssh.

``labrelay agent -R 2201:localhost:22 lab@cloud.example.org`` keeps up what
``ssh -N -R 2201:localhost:22 lab@cloud.example.org`` would, forever.  The flags
either describe a link of their own (when a destination is given; it is added to the
links of ``--config``) or adjust the single link of ``--config FILE``.  Either way
the result is the same frozen :class:`~relay.config.schema.NodeConfig` a file gives, and
the command line wins over the file where both set the same value.
"""

from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from twisted.logger import Logger

from relay.config.checks import validate_node
from relay.config.errors import ConfigError
from relay.config.grammar import parse_fingerprint, parse_forward_spec, parse_host, parse_name
from relay.config.loader import load_config
from relay.config.schema import (
    HostKeyPolicy,
    Keepalive,
    LinkConfig,
    LocalForward,
    NodeConfig,
    RemoteForward,
    current_user,
    default_known_hosts,
)
from relay.config.transport import OPTION_KEYS, apply_options, claim_option

CLI = "command line"

_log = Logger()

_SUPPORTED = {
    name.lower(): name
    for name in (
        "ConnectTimeout",
        "ExitOnForwardFailure",
        "IdentityFile",
        "Port",
        "ServerAliveCountMax",
        "ServerAliveInterval",
        "StrictHostKeyChecking",
        "User",
        "UserKnownHostsFile",
        *OPTION_KEYS,
    )
}
_OPTION_RE = re.compile(r"\s*([A-Za-z]+)\s*(?:=\s*|\s+)(.*?)\s*\Z")
# Every group but the last has its unit, so there is one way to match a string: no
# backtracking blow-up (the old "(?:[0-9]+[smhdw]?)+" took seconds on 30 digits and a
# letter; found by tests/fuzz agent_option).
_TIME_RE = re.compile(r"(?:[0-9]+[smhdwSMHDW])*[0-9]*\Z")
_MAX_SECONDS = 2**31 - 1  # OpenSSH's convtime() limit (INT_MAX)
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``labrelay agent``'s options (ssh's letters, ssh's meanings) to ``parser``."""
    parser.add_argument(
        "destination",
        nargs="?",
        metavar="DESTINATION",
        help="the SSH server to keep a link to, as [user@]host (like ssh); the flags below "
        "then describe that link. Without it, they apply to the single link of --config",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a node config file (TOML, see docs/config.md); a DESTINATION adds one more link",
    )
    parser.add_argument(
        "-p", dest="port", metavar="PORT", help="the server's SSH port (default 22)"
    )
    parser.add_argument(
        "-l",
        dest="login",
        metavar="LOGIN",
        help="the user to log in as on the server (default: user@ in DESTINATION, else you)",
    )
    parser.add_argument(
        "-i",
        dest="identity",
        action="append",
        default=[],
        metavar="IDENTITY",
        help="a private key file to authenticate with; repeat to try several in order",
    )
    parser.add_argument(
        "-R",
        dest="remote",
        action="append",
        default=[],
        metavar="PORT:HOST:HOSTPORT",
        help="reverse forward, [bind:]port:host:hostport: the server listens on [bind:]port "
        "and each connection to it is carried back here and connected to host:hostport. "
        "Repeatable. Example: -R 2201:localhost:22",
    )
    parser.add_argument(
        "-L",
        dest="local",
        action="append",
        default=[],
        metavar="PORT:HOST:HOSTPORT",
        help="local forward, [bind:]port:host:hostport: listen here on [bind:]port (bind "
        "defaults to 127.0.0.1) and connect each connection, from the server, to "
        "host:hostport. Repeatable. Example: -L 8888:localhost:8888",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="an ssh_config option; supported: "
        + ", ".join(sorted(_SUPPORTED.values()))
        + ". Example: -o ServerAliveInterval=15",
    )
    parser.add_argument(
        "-N",
        dest="no_command",
        action="store_true",
        help="accepted for ssh muscle memory and ignored: the agent never runs a remote command",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="the name of DESTINATION's link in logs and status (default: its host)",
    )
    parser.add_argument(
        "--fast-path-pool",
        dest="fast_path_pool",
        metavar="N",
        help="idle data connections kept open to a labrelay relay's data port, so users' "
        "fast-path sessions start at once (default 4; 0 turns the fast path off here)",
    )
    parser.add_argument(
        "--host-key",
        dest="host_key",
        metavar="SHA256:FINGERPRINT",
        help="pin the server's host key by fingerprint, as `ssh-keygen -lf KEY.pub` prints "
        "it, instead of checking known_hosts",
    )


@dataclass
class _Flags:
    """What the command line says about one link, each value with the flag it came from."""

    origin: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    user: str | None = None
    known_hosts: Path | None = None
    accept_new: bool | None = None
    fingerprint: str | None = None
    keepalive_interval: float | None = None
    keepalive_count: int | None = None
    connect_timeout: float | None = None
    fast_path_pool: int | None = None
    identities: list[Path] = field(default_factory=list)
    # -o Transport, TLSPort, ...: the raw text by TOML key (relay.config.transport)
    transport: dict[str, tuple[str, str]] = field(default_factory=dict)
    remote: list[tuple[RemoteForward, str]] = field(default_factory=list)
    local: list[tuple[LocalForward, str]] = field(default_factory=list)

    def claim(self, attr: str, value: object, keypath: str) -> None:
        """Set a single-valued setting; two flags giving it different values is an error."""
        previous = getattr(self, attr)
        if previous is not None and previous != value:
            raise ConfigError(
                CLI,
                keypath,
                f"{value} conflicts with {previous} from {self.origin[attr]}",
                "give each setting once",
            )
        setattr(self, attr, value)
        self.origin.setdefault(attr, keypath)

    def touches_link(self) -> bool:
        return bool(self.origin or self.identities or self.remote or self.local
                    or self.transport)


def _int(text: str, keypath: str, low: int, high: int, example: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ConfigError(CLI, keypath, f"expected a number, got {text!r}", f"e.g. {example}")
    # int() refuses strings of more than 4300 digits (ValueError): compare lengths first.
    digits = text.lstrip("0")
    value = int(digits or "0") if len(digits) <= 18 else None
    if value is None or not low <= value <= high:
        got = value if value is not None else f"{digits[:20]}... ({len(digits)} digits)"
        raise ConfigError(
            CLI, keypath, f"must be between {low} and {high}, got {got}", f"e.g. {example}"
        )
    return value


def _seconds(text: str, keypath: str, example: str) -> int:
    """OpenSSH's time format: ``30``, ``30s``, ``5m``, ``1h30m``."""
    if not text or not _TIME_RE.match(text):
        raise ConfigError(
            CLI, keypath, f"expected seconds or a time like 1m30s, got {text!r}", f"e.g. {example}"
        )
    total = 0
    for n, unit in re.findall(r"([0-9]+)([a-zA-Z]?)", text):
        digits = n.lstrip("0")
        if len(digits) > 10:  # int() refuses more than 4300 digits; this is far past the cap
            total = _MAX_SECONDS + 1
            break
        total += int(digits or "0") * _TIME_UNITS[unit.lower()]
    if total > _MAX_SECONDS:
        raise ConfigError(
            CLI, keypath, f"{text!r} is more than {_MAX_SECONDS} seconds", f"e.g. {example}"
        )
    return total


def _cli_path(text: str, keypath: str = "-i") -> Path:
    try:
        return Path(text).expanduser().absolute()
    except RuntimeError:  # "~nobody/key": no such user (found by tests/fuzz agent_option)
        raise ConfigError(
            CLI, keypath, f"cannot expand {text[:100]!r}: no such user's home directory",
            "give the path without ~user, or with ~ for your own home",
        ) from None


def _yes_no(text: str, keypath: str) -> bool:
    value = text.lower()
    if value not in ("yes", "no", "true", "false"):
        raise ConfigError(CLI, keypath, f"expected yes or no, got {text!r}", "e.g. yes")
    return value in ("yes", "true")


def _option(flags: _Flags, text: str) -> None:
    if "\x00" in text:  # a path with one makes pathlib raise ValueError
        raise ConfigError(CLI, "-o", "a NUL character in an option", "remove it")
    match = _OPTION_RE.match(text)
    if match is None or not match.group(2):
        raise ConfigError(
            CLI,
            f"-o {text!r}",
            "expected Option=Value",
            "e.g. -o ServerAliveInterval=15 or -o 'ServerAliveInterval 15'",
        )
    key, value = match.group(1), match.group(2)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    name = _SUPPORTED.get(key.lower())
    if name is None:
        close = difflib.get_close_matches(key.lower(), list(_SUPPORTED), n=1, cutoff=0.6)
        hint = f"did you mean {_SUPPORTED[close[0]]}? " if close else ""
        if "fingerprint" in key.lower() or key.lower() == "hostkey":
            hint = "to pin the server's key use --host-key SHA256:...; "
        raise ConfigError(
            CLI,
            f"-o {key}",
            f"unsupported option {key!r}",
            hint + "supported: " + ", ".join(sorted(_SUPPORTED.values())),
        )
    keypath = f"-o {name}"
    if name == "Port":
        flags.claim("port", _int(value, keypath, 1, 65535, "-o Port=2222"), keypath)
    elif name == "User":
        flags.claim("user", value, keypath)
    elif name == "IdentityFile":
        flags.identities.append(_cli_path(value, keypath))
    elif name == "UserKnownHostsFile":
        if len(value.split()) != 1:
            raise ConfigError(
                CLI,
                keypath,
                "exactly one known_hosts file is supported",
                "e.g. -o UserKnownHostsFile=~/.ssh/known_hosts",
            )
        flags.claim("known_hosts", _cli_path(value, keypath), keypath)
    elif name == "StrictHostKeyChecking":
        flags.claim("accept_new", _strict(value, keypath), keypath)
    elif name == "ServerAliveInterval":
        seconds = _seconds(value, keypath, "-o ServerAliveInterval=15")
        flags.claim("keepalive_interval", float(seconds), keypath)
    elif name == "ServerAliveCountMax":
        count = _int(value, keypath, 1, 2**31 - 1, "-o ServerAliveCountMax=3")
        flags.claim("keepalive_count", count, keypath)
    elif name == "ConnectTimeout":
        seconds = _seconds(value, keypath, "-o ConnectTimeout=15")
        if seconds == 0:
            raise ConfigError(CLI, keypath, "must be more than 0 seconds", "e.g. 15")
        flags.claim("connect_timeout", float(seconds), keypath)
    elif name in OPTION_KEYS:
        claim_option(flags.transport, OPTION_KEYS[name], value, keypath, CLI)
    elif name == "ExitOnForwardFailure":
        _yes_no(value, keypath)
        _log.info(
            "ExitOnForwardFailure is ignored: labrelay keeps the link up and retries a "
            "forward that failed, with backoff (see status)"
        )


def _strict(value: str, keypath: str) -> bool:
    """StrictHostKeyChecking: ``yes`` -> False, ``accept-new`` -> True; never ``no``."""
    lowered = value.lower()
    if lowered in ("yes", "true"):
        return False
    if lowered == "accept-new":
        return True
    if lowered in ("no", "off", "false"):
        raise ConfigError(
            CLI,
            keypath,
            f"{value!r} is refused: an unattended agent that trusts any host key would hand "
            "its forwards to whoever intercepts the connection",
            "use StrictHostKeyChecking=accept-new to trust and record the key on first "
            "connection, or pin it with --host-key SHA256:...",
        )
    if lowered == "ask":
        raise ConfigError(
            CLI,
            keypath,
            "'ask' is not possible: the agent runs unattended",
            "use StrictHostKeyChecking=accept-new or --host-key SHA256:...",
        )
    raise ConfigError(CLI, keypath, f"expected yes or accept-new, got {value!r}", "e.g. yes")


def _flags(ns: argparse.Namespace) -> _Flags:
    flags = _Flags()
    if ns.destination is not None and "@" in ns.destination:
        user = ns.destination.rpartition("@")[0]
        if not user:
            raise ConfigError(CLI, repr(ns.destination), "empty user before '@'", "e.g. lab@cloud")
        flags.claim("user", user, repr(ns.destination))
    if ns.login is not None:
        flags.claim("user", ns.login, "-l")
    if ns.port is not None:
        flags.claim("port", _int(ns.port, "-p", 1, 65535, "-p 2222"), "-p")
    flags.identities.extend(_cli_path(text) for text in ns.identity)
    if ns.host_key is not None:
        fingerprint = parse_fingerprint(ns.host_key, source=CLI, keypath="--host-key")
        flags.claim("fingerprint", fingerprint, "--host-key")
    if getattr(ns, "fast_path_pool", None) is not None:
        flags.claim("fast_path_pool", _int(ns.fast_path_pool, "--fast-path-pool", 0, 64,
                                           "--fast-path-pool 4"), "--fast-path-pool")
    for text in ns.options:
        _option(flags, text)
    if flags.user is not None and (not flags.user or any(ch.isspace() for ch in flags.user)):
        raise ConfigError(CLI, flags.origin["user"], f"bad user name {flags.user!r}", "e.g. -l lab")
    if flags.fingerprint is not None:
        if flags.known_hosts is not None:
            raise ConfigError(
                CLI,
                "--host-key",
                f"cannot be combined with {flags.origin['known_hosts']}",
                "pin the key with --host-key, or check a known_hosts file, not both",
            )
        if flags.accept_new:
            raise ConfigError(
                CLI,
                flags.origin["accept_new"],
                "accept-new has no effect with a pinned --host-key",
                "drop the option",
            )
    for spec in ns.remote:
        keypath = f"-R {spec!r}"
        fwd = parse_forward_spec(spec, "remote", source=CLI, keypath=keypath)
        assert isinstance(fwd, RemoteForward)
        flags.remote.append((fwd, keypath))
    for spec in ns.local:
        keypath = f"-L {spec!r}"
        lfwd = parse_forward_spec(spec, "local", source=CLI, keypath=keypath)
        assert isinstance(lfwd, LocalForward)
        flags.local.append((lfwd, keypath))
    return flags


def _apply(link: LinkConfig, flags: _Flags) -> LinkConfig:
    """``link`` with the command line's settings on top (the command line wins)."""
    host_key = link.host_key
    if flags.fingerprint is not None:
        host_key = HostKeyPolicy(fingerprint=flags.fingerprint)
    elif flags.known_hosts is not None:
        host_key = HostKeyPolicy(known_hosts=flags.known_hosts, accept_new=host_key.accept_new)
    if flags.accept_new is not None:
        if flags.accept_new and host_key.fingerprint is not None:
            raise ConfigError(
                CLI,
                flags.origin["accept_new"],
                f"accept-new has no effect: link {link.name!r} pins its host key (host_key)",
                "drop the option, or add -o UserKnownHostsFile=... to check a known_hosts "
                "file instead",
            )
        host_key = replace(host_key, accept_new=flags.accept_new)
    keepalive = Keepalive(
        interval=(
            link.keepalive.interval
            if flags.keepalive_interval is None
            else flags.keepalive_interval
        ),
        count_max=(
            link.keepalive.count_max if flags.keepalive_count is None else flags.keepalive_count
        ),
    )
    return replace(
        link,
        port=link.port if flags.port is None else flags.port,
        user=link.user if flags.user is None else flags.user,
        identities=tuple(dict.fromkeys([*flags.identities, *link.identities])),
        host_key=host_key,
        keepalive=keepalive,
        connect_timeout=(
            link.connect_timeout if flags.connect_timeout is None else flags.connect_timeout
        ),
        fast_path_pool=(
            link.fast_path_pool if flags.fast_path_pool is None else flags.fast_path_pool
        ),
        transport=apply_options(link.transport, flags.transport, CLI),
        remote=link.remote + tuple(fwd for fwd, _ in flags.remote),
        local=link.local + tuple(fwd for fwd, _ in flags.local),
    )


def config_from_agent_args(ns: argparse.Namespace) -> NodeConfig:
    """The node an ``agent`` command line describes (see the module docstring).

    Raises ConfigError: from the config file (its name as the source), or with source
    ``"command line"`` and the offending flag as the key path."""
    if ns.destination is None and ns.config is None:
        raise ConfigError(
            CLI,
            "",
            "nothing to do: give [user@]host or --config FILE",
            "e.g. labrelay agent -R 2201:localhost:22 lab@cloud.example.org",
        )
    flags = _flags(ns)
    base = load_config(ns.config) if ns.config is not None else None
    links = list(base.links) if base is not None else []
    where: dict[str, tuple[str, str]] = {}

    if ns.destination is not None:
        dest = ns.destination
        host = parse_host(dest.rpartition("@")[2], source=CLI, keypath=repr(dest))
        if ns.name is not None:
            name = parse_name(ns.name, source=CLI, keypath="--name")
        else:
            name = parse_name(host, source=CLI, keypath=repr(dest))
        fresh = LinkConfig(
            name=name,
            host=host,
            user=current_user(source=CLI, keypath="-l") if flags.user is None else flags.user,
            host_key=HostKeyPolicy(known_hosts=default_known_hosts()),
        )
        where[f"link[{len(links)}].name"] = (CLI, "--name" if ns.name is not None else repr(dest))
        links.append(fresh)
        index = len(links) - 1
    else:
        assert base is not None
        if ns.name is not None:
            raise ConfigError(
                CLI,
                "--name",
                "--name names the link of a DESTINATION, and none was given",
                'give [user@]host, or set name = "..." in the config file',
            )
        if not flags.touches_link():
            return base
        if len(links) != 1:
            raise ConfigError(
                CLI,
                "",
                f"{base.source} has {len(links)} links, so it is unclear which one the "
                "flags apply to",
                "give a destination [user@]host for a link of its own, or put the settings "
                "in the config file",
            )
        index = 0

    link = links[index]
    for kind, forwards in (("remote", flags.remote), ("local", flags.local)):
        existing = len(link.remote) if kind == "remote" else len(link.local)
        for k, (_, keypath) in enumerate(forwards):
            where[f"link[{index}].{kind}[{existing + k}]"] = (CLI, keypath)
    links[index] = _apply(link, flags)

    config = NodeConfig(
        source=base.source if base is not None else CLI,
        links=tuple(links),
        admin=base.admin if base is not None else None,
    )
    default_source = config.source

    def locate(keypath: str) -> tuple[str, str]:
        for candidate in (keypath, keypath.rpartition(".")[0]):
            if candidate in where:
                return where[candidate]
        return default_source, keypath

    validate_node(config, locate)
    return config
