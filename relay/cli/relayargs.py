"""The ``labrelay relay`` command line.

``labrelay relay --agents agents --users users`` runs labrelay's SSH relay with the
grants in two authorized_keys-format files; ``labrelay relay node.toml`` (or
``--config node.toml``) runs the ``[relay]`` of a node config, and flags given as
well win over the file's ``[relay]`` keys.  The result is the same frozen
:class:`~relay.config.schema.NodeConfig` a file gives.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from relay.config.errors import ConfigError
from relay.config.grammar import (
    parse_admin_listen,
    parse_public_bind,
    parse_relay_listen,
    parse_service_grant,
)
from relay.config.loader import load_config
from relay.config.schema import NodeConfig, RelayConfig
from relay.server.grants import Grants

CLI = "command line"


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``labrelay relay``'s options to ``parser``."""
    parser.add_argument(
        "config_file",
        nargs="?",
        metavar="CONFIG",
        help="a node config file with a [relay] section (the same as --config)",
    )
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="a node config file (TOML, see docs/relay.md); the flags below override "
        "its [relay] keys",
    )
    parser.add_argument(
        "--listen",
        metavar="[ADDR:]PORT",
        help="where the relay's SSH server listens (default 0.0.0.0:2222)",
    )
    parser.add_argument(
        "--state-dir",
        dest="state_dir",
        metavar="DIR",
        help="where host keys are generated on first start and kept (default /var/lib/labrelay)",
    )
    parser.add_argument(
        "--agents",
        metavar="FILE",
        help='agents and their grants, authorized_keys format: permitlisten="gpu-cluster:22" '
        '(a service name) or permitlisten="2201" (a public port); the key\'s comment is '
        "the agent's name. Re-read when it changes",
    )
    parser.add_argument(
        "--users",
        metavar="FILE",
        help='users and their grants, authorized_keys format: permitopen="gpu-cluster:22"; '
        "the key's comment is the user's name. Re-read when it changes",
    )
    parser.add_argument(
        "--public-bind",
        dest="public_bind",
        metavar="ADDR",
        help="the address granted public ports listen on (default 0.0.0.0)",
    )
    parser.add_argument(
        "--data-port",
        dest="data_port",
        metavar="PORT",
        help="turn the fast path on: the TCP port users' and agents' data connections "
        "meet at (0 = any free port; see docs/fastpath.md)",
    )
    parser.add_argument(
        "--e2e",
        dest="e2e_services",
        action="append",
        metavar="SERVICE",
        help="a service whose payload is end-to-end encrypted (ssh: NAME:22, or *:22), so "
        "it may take the fast path; repeat for several. Replaces e2e_services",
    )
    parser.add_argument(
        "--admin",
        metavar="[ADDR:]PORT",
        help="serve status (JSON, Prometheus /metrics) on this loopback address; read it "
        "with `labrelay status`",
    )


def _cli_port(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ConfigError(CLI, f"{flag} {text}", f"{text!r} is not a port number",
                          f"give 1..65535 (or 0 for any free port), e.g. {flag} 2223")
    return int(text)


def _cli_path(text: str) -> Path:
    return Path(text).expanduser().absolute()


def config_from_relay_args(ns: argparse.Namespace) -> NodeConfig:
    """The node a ``relay`` command line describes (see the module docstring).

    The grant files are read once here, so that a missing or bad one is reported
    before anything starts.  Raises ConfigError: from the config file or a grant file
    (its name as the source), or with source ``"command line"`` and the offending flag
    as the key path, or when nobody at all is granted anything."""
    if ns.config_file is not None and ns.config is not None:
        raise ConfigError(
            CLI,
            "--config",
            "the config file is given twice (CONFIG and --config)",
            "give it once, e.g. labrelay relay /etc/labrelay/relay.toml",
        )
    path = ns.config if ns.config is not None else ns.config_file
    base = load_config(path) if path is not None else NodeConfig(source=CLI)
    relay = base.relay if base.relay is not None else RelayConfig()
    if ns.listen is not None:
        relay = replace(relay, listen=parse_relay_listen(ns.listen, source=CLI, keypath="--listen"))
    if ns.state_dir is not None:
        relay = replace(relay, state_dir=_cli_path(ns.state_dir))
    if ns.agents is not None:
        relay = replace(relay, agents_file=_cli_path(ns.agents))
    if ns.users is not None:
        relay = replace(relay, users_file=_cli_path(ns.users))
    if ns.public_bind is not None:
        relay = replace(
            relay,
            public_bind=parse_public_bind(ns.public_bind, source=CLI, keypath="--public-bind"),
        )
    if ns.data_port is not None:
        relay = replace(relay, data_port=_cli_port(ns.data_port, "--data-port"))
    if ns.e2e_services is not None:
        relay = replace(relay, e2e_services=tuple(
            parse_service_grant(text, "user", source=CLI, keypath=f"--e2e {text}")
            for text in ns.e2e_services))
    admin = base.admin
    if ns.admin is not None:
        admin = parse_admin_listen(ns.admin, source=CLI, keypath="--admin",
                                   token_file=base.admin.token_file if base.admin else None)
    if not (relay.agents or relay.users or relay.agents_file or relay.users_file):
        raise ConfigError(
            base.source,
            "",
            "nobody may use this relay: give --agents/--users or [[relay.agent]]/[[relay.user]]",
            "e.g. labrelay relay --agents /etc/labrelay/agents --users /etc/labrelay/users; "
            "docs/relay.md shows both formats",
        )
    Grants(relay, base.source)  # a missing or bad grant file stops us here, not later
    return replace(base, relay=relay, admin=admin)
