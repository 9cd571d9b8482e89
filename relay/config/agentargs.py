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
from dataclasses import replace

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
from relay.config.sshoptions import _SUPPORTED, CLI, _cli_path, _Flags, _int, _option
from relay.config.transport import apply_options


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
        for attr in ("known_hosts", "global_known_hosts"):
            if getattr(flags, attr) is not None:
                raise ConfigError(
                    CLI,
                    "--host-key",
                    f"cannot be combined with {flags.origin[attr]}",
                    "pin the key with --host-key, or check known_hosts files, not both",
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
    elif flags.known_hosts is not None or flags.global_known_hosts is not None:
        # Either replaces a pin from the file (its files then start from the defaults);
        # each replaces the file's list of its kind and keeps the other.
        if host_key.fingerprint is not None:
            host_key = HostKeyPolicy(known_hosts=default_known_hosts())
        if flags.known_hosts is not None:
            host_key = host_key.with_user_files(flags.known_hosts)
        if flags.global_known_hosts is not None:
            host_key = replace(host_key, global_known_hosts=flags.global_known_hosts)
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
