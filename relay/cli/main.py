"""The ``labrelay`` command.

``labrelay agent`` keeps a link and its forwards up (OpenSSH's own flags, or a
config file, or both); ``labrelay keygen`` makes a key for it; ``labrelay demo``
runs the whole path on loopback.  Only this module and :mod:`relay.ops.tap` pick the
global reactor.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import __version__
from relay.config.errors import ConfigError
from relay.config.schema import NodeConfig
from relay.ops.hangup import HangupBeforeStart
from relay.ops.logfmt import start_logging
from relay.ssh.keygen import KeygenError

EXIT_USAGE = 2

DESCRIPTION = """\
labrelay keeps a lab's private hosts reachable through a server on the internet.

  labrelay agent  -R 2201:10.0.0.5:22 lab@cloud.example.org
      like `autossh -M0 -N -R 2201:10.0.0.5:22 lab@cloud.example.org`, but with
      keepalives on, forwards re-requested after every reconnect, a refused
      forward retried on the same link, and bounded memory per session.
  labrelay agent  --config /etc/labrelay/lab_pc.toml
  labrelay keygen ~/.ssh/labrelay_ed25519
  labrelay demo   (the whole path on loopback, ready to try)

Run `labrelay COMMAND --help` for a command's options; docs/ has the rest.
"""


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="text (default) for people; json writes one JSON object per event to stdout",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show debug events (every session) and library messages")


def build_parser() -> argparse.ArgumentParser:
    from relay.config.agentargs import add_agent_arguments

    parser = argparse.ArgumentParser(
        prog="labrelay", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"labrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    agent = sub.add_parser(
        "agent", help="keep a link to an SSH server and its forwards up",
        description="Keep one SSH link to [user@]host up, with the given reverse (-R) and "
        "local (-L) forwards, reconnecting with backoff forever. Flags mean what they "
        "mean to ssh(1); a --config file may add links or settings.",
    )
    add_agent_arguments(agent)
    agent.add_argument("--backoff-initial", type=float, metavar="SECONDS",
                       help="first reconnect/retry delay (default 1)")
    agent.add_argument("--backoff-max", type=float, metavar="SECONDS",
                       help="longest reconnect/retry delay (default 60)")
    agent.add_argument("--resume-grace", type=float, metavar="SECONDS",
                       help="hold sessions this long for resumption when the link to a "
                       "labrelay relay breaks (default 60; 0: never)")
    agent.add_argument("--admin", metavar="[ADDR:]PORT",
                       help="serve status (JSON, Prometheus /metrics) on this loopback "
                       "address; read it with `labrelay status`")
    _add_logging(agent)

    relay = sub.add_parser(
        "relay", help="run labrelay's own SSH relay (the cloud end)",
        description="Run labrelay's SSH relay: agents register named services (ssh -R "
        "NAME:PORT:host:port) and public ports they are granted; users reach them with "
        "stock `ssh -J user@relay:PORT me@NAME` or `ssh -L`. Grants come from "
        "[[relay.agent]]/[[relay.user]] in --config or from authorized_keys-style files.",
    )
    from relay.cli.relayargs import add_relay_arguments

    add_relay_arguments(relay)
    _add_logging(relay)

    run = sub.add_parser(
        "run", help="run what a node config file describes (= agent --config FILE)",
        description="Run the links and forwards of a node config file (TOML, see "
        "docs/config.md). The same service as `twistd -n labrelay --config FILE`.",
    )
    run.add_argument("config_file", metavar="CONFIG", help="the node config file")
    run.add_argument("--admin", metavar="[ADDR:]PORT", help="serve status on this loopback "
                     "address (overrides [admin] in the file)")
    _add_logging(run)

    keygen = sub.add_parser(
        "keygen", help="write an ed25519 key pair for an agent",
        description="Write an ed25519 key pair in OpenSSH format (private key mode 0600) "
        "and print the authorized_keys line to install on the server.",
    )
    keygen.add_argument("path", type=Path, help="where to write the private key (.pub is added)")
    keygen.add_argument("-C", "--comment", default=None, help="key comment (default user@host)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")

    status = sub.add_parser(
        "status", help="show a running labrelay's links, forwards and sessions",
        description="Fetch the status of a labrelay started with --admin (or [admin] in "
        "its config) and print it as tables.",
    )
    status.add_argument("--config", default=None, type=Path, metavar="CONFIG",
                        help="take the admin address and token file from this config's "
                        "[admin], as labrelay reload --config does")
    status.add_argument("--admin", default=None, metavar="ADDR:PORT",
                        help="its admin endpoint (default: --config's [admin], else "
                        "127.0.0.1:7022)")
    status.add_argument("--token-file", default=None, type=Path, metavar="FILE",
                        help="send the bearer token in FILE (its [admin] token_file)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--all", action="store_true",
                        help="every registration, session and user connection (by default "
                        "the first 100 of each, with exact counts of the rest)")

    check = sub.add_parser(
        "check", help="validate a node config without starting anything (exit 0 or 2)",
        description="Check a node config file as start-up would (as `sshd -t` does): "
        "its syntax, the key files of its links, the grant files of its relay, its admin "
        "token file. Every problem is printed; exit 0 if there is none, 2 otherwise. "
        "For systemd's ExecStartPre=.",
    )
    check.add_argument("config_file", metavar="CONFIG", help="the node config file")
    check.add_argument("-q", "--quiet", action="store_true", help="print problems only")

    reload = sub.add_parser(
        "reload", help="make a running labrelay re-read its config (as SIGHUP does)",
        description="Ask a running labrelay, through its admin endpoint, to re-read its "
        "config and apply the differences; a config with problems changes nothing. Prints "
        "what changed or every problem; exit 0 if applied, 1 if refused or unreachable. "
        "For systemd's ExecReload=.",
    )
    reload.add_argument("--config", default=None, type=Path, metavar="CONFIG",
                        help="take the admin address and token file from this config's "
                        "[admin]")
    reload.add_argument("--admin", default=None, metavar="ADDR:PORT",
                        help="its admin endpoint (default: --config's [admin], else "
                        "127.0.0.1:7022)")
    reload.add_argument("--token-file", default=None, type=Path, metavar="FILE",
                        help="send the bearer token in FILE")

    sshcfg = sub.add_parser(
        "ssh-config", help="print a relay user's ~/.ssh/config snippet",
        description="Print the ~/.ssh/config entries one user of a labrelay relay needs: "
        "the relay, a ProxyJump Host per ssh service they are granted, LocalForward "
        "lines for the others, and the relay's host key (and, while [relay] "
        "next_host_key is set, the key it will switch to). Run it where the relay's "
        "config (and state dir) are.",
    )
    sshcfg.add_argument("--config", required=True, metavar="FILE",
                        help="the relay's node config (grants come from it and its files)")
    sshcfg.add_argument("--user", required=True, help="the user (a [[relay.user]] name)")
    sshcfg.add_argument("--host", required=True, metavar="HOST[:PORT]",
                        help="the relay's public name and port as users reach it")
    sshcfg.add_argument("--identity", default="~/.ssh/id_ed25519",
                        help="the user's private key path on their machine")
    sshcfg.add_argument("--alias", default="labrelay", metavar="NAME",
                        help="the Host name of the relay's entry (default labrelay); give "
                        "each relay its own: ssh uses the first Host entry of a name")
    sshcfg.add_argument("--tls", nargs="?", const=0, type=int, default=None, metavar="PORT",
                        help="reach the relay through its TLS port (PORT, default the "
                        "relay's tls_listen port) with `openssl s_client` as ProxyCommand, "
                        "for networks that block SSH (docs/networks.md)")
    sshcfg.add_argument("--tls-ca-file", default=None, metavar="FILE",
                        help="with --tls: the CA certificate users check the relay's "
                        "certificate against (default: their system's CAs)")

    demo = sub.add_parser(
        "demo", help="run the whole path on loopback and show it working",
        description="Start a private OpenSSH sshd (standing in for the cloud server), a "
        "small target service (standing in for the GPU cluster) and an agent, all on "
        "127.0.0.1, prove a session through the tunnel and print what to try.",
    )
    demo.add_argument("--once", action="store_true",
                      help="prove the path, then stop (instead of running until Ctrl-C)")
    _add_logging(demo)
    connect = sub.add_parser(
        "connect", help="reach a relay's service through the fast path (an ssh ProxyCommand)",
        description="Join stdin/stdout to SERVICE behind a labrelay relay: authenticate over "
        "SSH, take the fast path (a spliced data connection) when the relay offers it for "
        "SERVICE, else an SSH channel. Made to be OpenSSH's ProxyCommand, e.g.\n\n"
        "  ssh -o ProxyCommand='labrelay connect -p 2222 alice@relay %h:%p' me@gpu-cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from relay.user.connect import add_connect_arguments

    add_connect_arguments(connect)
    sub.add_parser("bench", add_help=False, help="run the benchmark suite (from a checkout; "
                   "`labrelay bench --help`)")
    return parser


def _with_admin(config: NodeConfig, ns: argparse.Namespace) -> NodeConfig:
    if ns.admin is None:
        return config
    from relay.config.grammar import parse_admin_listen

    admin = parse_admin_listen(ns.admin, source="command line", keypath="--admin",
                               token_file=config.admin.token_file if config.admin else None)
    return dataclasses.replace(config, admin=admin)


def _with_backoff(config: NodeConfig, ns: argparse.Namespace) -> NodeConfig:
    changes: dict[str, float] = {}
    if ns.backoff_initial is not None:
        changes["initial"] = ns.backoff_initial
    if ns.backoff_max is not None:
        changes["maximum"] = ns.backoff_max
    grace = getattr(ns, "resume_grace", None)
    if grace is not None:
        if not 0 <= grace <= 86400:
            raise ConfigError("command line", "--resume-grace",
                              f"need 0 <= seconds <= 86400, got {grace}")
        config = dataclasses.replace(config, links=tuple(
            dataclasses.replace(link, resume_grace=grace) for link in config.links))
    if not changes:
        return config
    links = []
    for link in config.links:
        backoff = dataclasses.replace(link.backoff, **changes)
        if backoff.initial <= 0 or backoff.maximum < backoff.initial:
            raise ConfigError("command line", "--backoff-initial/--backoff-max",
                              f"need 0 < initial <= max, got {backoff.initial} and "
                              f"{backoff.maximum}")
        links.append(dataclasses.replace(link, backoff=backoff))
    return dataclasses.replace(config, links=tuple(links))


REACTOR_COMMANDS = frozenset({"agent", "relay", "run", "demo", "connect"})
"""The commands that run a reactor and so choose it (:func:`choose_reactor`)."""

NODE_COMMANDS = frozenset({"agent", "relay", "run"})
"""The commands that run a node, which reloads on SIGHUP (the others end on it)."""


def choose_reactor() -> str:
    """Install labrelay's epoll reactor (:mod:`relay.ops.reactor`) while it can still
    be chosen: before anything imports Conch, which imports the global reactor.
    Returns the name of the reactor the process will run, for its start-up event
    (the installed one's, when called again)."""
    from relay.ops.reactor import install

    return install()


def run_reactor(build: Callable[[Any, Callable[[str], object]], Any],
                reactor_name: str) -> int:
    """Build the service tree with the real reactor, run it until a signal, stop it."""
    from twisted.internet import reactor
    from twisted.logger import Logger

    log = Logger(namespace="labrelay")
    exit_code = [0]

    def fatal(why: str) -> None:
        log.critical("{why}; stopping", why=why, event="fatal")
        exit_code[0] = 1
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    service = build(reactor, fatal)
    log.info("labrelay {version} started (pid {pid})", event="agent_started",
             version=__version__, pid=os.getpid(), reactor=reactor_name)
    reactor.callWhenRunning(service.startService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    log.info("labrelay stopped", event="agent_stopped")
    return exit_code[0]


def _node(config: NodeConfig, reactor: Any, fatal: Callable[[str], object],
          load: Callable[[], NodeConfig], ns: argparse.Namespace) -> Any:
    """The node service of a ``labrelay`` command: it reloads with ``load`` on SIGHUP
    and ``POST /reload``, and speaks sd_notify when systemd runs it.  Without ``-v``
    (``verbose``) its links do not emit the per-session debug events no observer of
    this process would print (:class:`relay.agent.link.Link`).  A SIGHUP that came
    while the process started (``ns.hangup``, :func:`main`) reloads once it runs."""
    from relay.ops.notify import SystemdNotifier
    from relay.ops.service import make_node_service

    return make_node_service(config, reactor, on_fatal=fatal, load=load,
                             notifier=SystemdNotifier(), handle_sighup=True,
                             pace_gc=True, session_debug=ns.verbose,
                             hangup=getattr(ns, "hangup", None))


def cmd_agent(ns: argparse.Namespace) -> int:
    reactor_name = choose_reactor()
    from relay.config.agentargs import config_from_agent_args

    def load() -> NodeConfig:
        return _with_admin(_with_backoff(config_from_agent_args(ns), ns), ns)

    config = load()
    start_logging(ns.log_format, ns.verbose)
    # run_reactor builds the tree before the reactor runs: a bad key file
    # raises ConfigError here and exits 2 with nothing started.
    return run_reactor(lambda r, fatal: _node(config, r, fatal, load, ns),
                       reactor_name)


def cmd_run(ns: argparse.Namespace) -> int:
    reactor_name = choose_reactor()
    from relay.config.loader import load_config

    def load() -> NodeConfig:
        return _with_admin(load_config(ns.config_file), ns)

    config = load()
    start_logging(ns.log_format, ns.verbose)
    return run_reactor(lambda r, fatal: _node(config, r, fatal, load, ns),
                       reactor_name)


def cmd_relay(ns: argparse.Namespace) -> int:
    reactor_name = choose_reactor()
    from relay.cli.relayargs import config_from_relay_args

    config = config_from_relay_args(ns)
    start_logging(ns.log_format, ns.verbose)
    return run_reactor(lambda r, fatal: _node(config, r, fatal,
                                              lambda: config_from_relay_args(ns), ns),
                       reactor_name)


def cmd_check(ns: argparse.Namespace) -> int:
    from relay.config.loader import load_config
    from relay.ops.check import check_config

    problems = check_config(lambda: load_config(ns.config_file))
    for problem in problems:
        print(f"labrelay: {problem}", file=sys.stderr)
    if problems:
        print(f"labrelay: {ns.config_file}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    if not ns.quiet:
        print(f"{ns.config_file}: OK")
    return 0


def admin_table(text: str) -> str | None:
    """The ``[admin]`` table of a TOML config's ``text`` alone (its header line to the
    next table header), or None: read from a file TOML cannot parse as a whole."""
    import re

    lines = text.splitlines()
    header = re.compile(r"\s*\[\s*admin\s*\]\s*(#.*)?$")
    for i, line in enumerate(lines):
        if header.fullmatch(line):
            end = next((j for j in range(i + 1, len(lines))
                        if re.match(r"\s*\[", lines[j])), len(lines))
            return "\n".join(lines[i:end]) + "\n"
    return None


def _admin_of(path: Path) -> tuple[str, Path | None]:
    """The admin address and token file of the config at ``path``, read leniently: the
    config being reloaded may be the broken one, and the running labrelay (not this
    command) is the one to say everything that is wrong with it."""
    import tomllib

    from relay.config.grammar import parse_admin_listen

    try:
        text = path.read_text("utf-8")
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), "", f"cannot read it: {e}") from None
    try:
        admin = tomllib.loads(text).get("admin")
    except tomllib.TOMLDecodeError as e:
        # A syntax error elsewhere in the file: its [admin] table alone still says where
        # the running labrelay listens, and asking it to reload is what puts the error
        # in its journal and in /status.json, where the operator looks (ExecReload=).
        section = admin_table(text)
        try:
            admin = tomllib.loads(section).get("admin") if section is not None else None
        except tomllib.TOMLDecodeError:
            admin = None
        if not isinstance(admin, dict):
            raise ConfigError(str(path), "", f"cannot read it: {e}",
                              "the running labrelay was not asked to reload: fix the file, "
                              "or pass --admin ADDR:PORT") from None
    if not isinstance(admin, dict):
        raise ConfigError(str(path), "admin", "no [admin] section: a running labrelay is "
                          "reloaded through its admin endpoint",
                          "add [admin] (or send SIGHUP to its process)")
    token = admin.get("token_file")
    token_path = None
    if isinstance(token, str):
        token_path = Path(token).expanduser()
        if not token_path.is_absolute():
            token_path = path.absolute().parent / token_path
    listen = parse_admin_listen(str(admin.get("listen", "")), source=str(path),
                                keypath="admin.listen", token_file=token_path)
    return str(listen.listen), token_path


def _admin_target(ns: argparse.Namespace) -> tuple[str, Any]:
    """The admin endpoint and token file ``labrelay status``/``reload`` talk to: the
    command line's, else ``--config``'s ``[admin]``, else the default address."""
    from relay.config.schema import DEFAULT_ADMIN_LISTEN

    address, token_file = ns.admin, ns.token_file
    if ns.config is not None and (address is None or token_file is None):
        admin_listen, admin_token = _admin_of(ns.config)
        address = address or admin_listen
        token_file = token_file or admin_token
    return address or DEFAULT_ADMIN_LISTEN, token_file


def cmd_reload(ns: argparse.Namespace) -> int:
    import urllib.error

    from relay.ops.status import TokenError, post_reload, read_token

    address, token_file = _admin_target(ns)
    try:
        token = read_token(token_file) if token_file is not None else None
    except TokenError as e:
        print(f"labrelay: {e}", file=sys.stderr)
        return 2
    try:
        result = post_reload(address, token=token)
    except urllib.error.HTTPError as e:
        print(f"labrelay: http://{address}/reload answered {e.code} {e.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"labrelay: cannot reach http://{address}/reload: {e}", file=sys.stderr)
        return 1
    if not result["ok"]:
        for error in result["errors"]:
            print(f"labrelay: {error}", file=sys.stderr)
        print(f"labrelay: reload refused ({len(result['errors'])} problem(s)); the running "
              "config is unchanged", file=sys.stderr)
        return 1
    for change in result["changes"]:
        print(change)
    if not result["changes"]:
        print("reloaded: nothing changed")
    return 0


def cmd_keygen(ns: argparse.Namespace) -> int:
    import getpass
    import socket

    from relay.ssh.keygen import generate_keypair

    comment = ns.comment or f"{getpass.getuser()}@{socket.gethostname()}"
    line = generate_keypair(ns.path, comment, overwrite=ns.force)
    print(f"wrote {ns.path} (private, mode 0600) and {ns.path}.pub", file=sys.stderr)
    print("add this line to the server's ~/.ssh/authorized_keys (a stock sshd), or to a "
          "labrelay relay's agents file with permitlisten=\"NAME:PORT\" in front, its "
          "comment being the agent's name there (-C NAME sets it; docs/relay.md):",
          file=sys.stderr)
    print(line)
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    import json
    import urllib.error

    from relay.ops.status import TokenError, fetch, format_status, read_token

    address, token_file = _admin_target(ns)
    try:
        token = read_token(token_file) if token_file is not None else None
    except TokenError as e:
        print(f"labrelay: {e}", file=sys.stderr)
        return 2
    try:
        snapshot = fetch(address, token=token, everything=ns.all)
    except urllib.error.HTTPError as e:
        print(f"labrelay: http://{address}/status.json answered {e.code} {e.reason}"
              + (" (give its token with --token-file)" if e.code == 401 else ""),
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"labrelay: cannot read status from http://{address}/status.json: {e}\n"
              "  is labrelay running with --admin (or [admin] in its config)?",
              file=sys.stderr)
        return 1
    print(json.dumps(snapshot, indent=2) if ns.json else format_status(snapshot), end="")
    return 0


def cmd_ssh_config(ns: argparse.Namespace) -> int:
    from relay.config.loader import load_config
    from relay.server.grants import Grants
    from relay.user.sshconfig import (
        check_alias,
        fast_path_note,
        next_host_key_line,
        relay_address,
        relay_host_key_line,
        render,
    )

    config = load_config(ns.config)
    if config.relay is None:
        raise ConfigError(config.source, "relay", "this config has no [relay] section",
                          "point --config at the relay's node config")
    user = next((p for p in Grants(config.relay, config.source).principals()
                 if p.kind == "user" and p.name == ns.user), None)
    if user is None:
        raise ConfigError(config.source, "relay.user", f"no user named {ns.user!r}",
                          "use a name from [[relay.user]] or the users file")
    host, relay_port = relay_address(ns.host, config.relay.listen.port)
    alias = check_alias(ns.alias)
    fast = config.relay.e2e_services if config.relay.data_port is not None else ()
    tls_port = ns.tls
    if tls_port == 0:
        tls = config.relay.tls
        tls_port = tls.listen.port if tls is not None and tls.listen.port else 443
    next_path = config.relay.next_host_key
    next_line = None if next_path is None else next_host_key_line(next_path)
    print(render(user=user.name, relay_host=host, relay_port=relay_port,
                 services=user.services, identity=ns.identity,
                 host_key_line=relay_host_key_line(config.relay.state_dir),
                 next_host_key_line=next_line, fast=fast,
                 tls_port=tls_port, tls_ca_file=ns.tls_ca_file, alias=alias),
          end="")
    if next_path is not None and next_line is None:
        print(f"labrelay ssh-config: the next host key {next_path} (relay.next_host_key) "
              "cannot be read here, nor its .pub: its known_hosts line is not printed; "
              "run this as the relay's user", file=sys.stderr)
    note = fast_path_note(user.services, fast, alias) if tls_port is None else None
    if note is not None:
        print(f"labrelay ssh-config: {note}", file=sys.stderr)
    return 0


def cmd_connect(ns: argparse.Namespace) -> int:
    from relay.user.connect import run

    return run(ns)


def cmd_demo(ns: argparse.Namespace) -> int:
    from relay.cli.demo import run_demo

    return run_demo(once=ns.once, log_format=ns.log_format, verbose=ns.verbose)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: bench/suite.py, found in the checkout
        from relay.cli.benchcmd import main as bench_main

        return bench_main(argv[1:])
    # Before the parser is built: building it imports Conch, which imports the global
    # reactor.  choose_reactor() again in the command is a no-op that names it.
    command = next((a for a in argv if not a.startswith("-")), None)
    hangup = None
    if command in NODE_COMMANDS:  # first: a SIGHUP from now on reloads (relay.ops.hangup)
        hangup = HangupBeforeStart()
        hangup.install()
    if command in REACTOR_COMMANDS:
        choose_reactor()
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.hangup = hangup
    commands = {
        "agent": cmd_agent, "relay": cmd_relay, "run": cmd_run, "keygen": cmd_keygen,
        "status": cmd_status, "ssh-config": cmd_ssh_config, "demo": cmd_demo,
        "connect": cmd_connect, "check": cmd_check, "reload": cmd_reload,
    }
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return commands[ns.command](ns)
    except ConfigError as e:
        print(f"labrelay: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeygenError as e:
        print(f"labrelay: {e}", file=sys.stderr)
        return EXIT_USAGE
