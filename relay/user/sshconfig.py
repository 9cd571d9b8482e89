"""``labrelay ssh-config``: the ``~/.ssh/config`` snippet a relay's user needs.

Users of a labrelay relay need nothing but stock OpenSSH.  This prints, for one
user, a ``Host`` entry for the relay itself and one per ssh service they are
granted (reached by name through ``ProxyJump``), plus ``LocalForward`` lines for
their other services, and the relay's host key for ``known_hosts`` so the first
connection is verified instead of trusted blindly.  While a host key rotation is under
way (``[relay] next_host_key``) it prints the next key's line too: a user who adds both
logs in with no prompt after the relay switches, whether or not their ssh learns keys
by itself (``UpdateHostKeys``; docs/operations.md, rotating the host key).

A service on the fast path gets two entries that work with and without labrelay
installed: a ``Match originalhost NAME exec "command -v labrelay"`` block with
``ProxyCommand labrelay connect RELAY-ALIAS %h:%p`` (taken when the ``labrelay``
command exists), then the ``Host NAME`` entry with ``ProxyJump``.  ssh keeps the
first of ``ProxyCommand``/``ProxyJump`` it reads, so without labrelay the same file
goes through the relay as ``ssh -J`` does.  ``labrelay connect`` reads the relay
alias's ``HostName``, ``Port``, ``User``, ``IdentityFile`` with ``ssh -G``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from relay.config.errors import ConfigError
from relay.config.schema import ALPN_SSH, ServiceGrant
from relay.ssh.identity import IdentityError, parse_key, read_key_file

RELAY_ALIAS = "labrelay"


def render(
    *,
    user: str,
    relay_host: str,
    relay_port: int,
    services: Iterable[ServiceGrant],
    identity: str = "~/.ssh/id_ed25519",
    host_key_line: str | None = None,
    next_host_key_line: str | None = None,
    known_hosts: str = "~/.ssh/known_hosts",
    fast: Iterable[ServiceGrant] = (),
    config_file: str | None = None,
    tls_port: int | None = None,
    tls_ca_file: str | None = None,
    tls_connect: str | None = None,
    alias: str = RELAY_ALIAS,
) -> str:
    """The snippet, as text.  ``host_key_line`` is ``"ssh-ed25519 AAAA..."``;
    ``next_host_key_line`` the key the relay will switch to (its ``next_host_key``),
    printed as a second known_hosts line: ssh accepts a host key when any line for
    the host matches, so both lines make the switch need no prompt.

    Services matched by ``fast`` (the relay's ``e2e_services``, when it has a data
    port) are reached with ``ProxyCommand labrelay connect`` (the fast path) where
    labrelay is installed, else with ``ProxyJump``; ``labrelay connect`` falls back to a
    channel by itself.  ``config_file``: where the snippet goes, when not
    ``~/.ssh/config`` (``labrelay connect -F`` then reads the relay's entry there).

    With ``tls_port`` the relay is reached through its TLS port by ``openssl s_client``
    (:func:`tls_proxy_command`; ``tls_connect`` is the address it dials when that is
    not ``relay_host``), and every service through the relay entry: for networks that
    block SSH, with stock tools only.

    ``alias`` names the relay's entry (``labrelay`` by default): a second relay needs
    its own, since ssh reads the first ``Host`` entry of a name and ignores later
    ones, so a second ``Host labrelay`` appended would silently send that relay's
    services through the first."""
    fast = tuple(fast)
    port_part = "" if relay_port == 22 else f"[{relay_host}]:{relay_port}"
    kh_name = port_part or relay_host
    lines = [
        f"# labrelay: services on {relay_host}:{relay_port} for {user}",
        "# Append to ~/.ssh/config; then e.g. `ssh gpu-cluster` or `scp file gpu-cluster:`.",
        "# ssh takes each option from the FIRST entry that sets it: remove (or rename) any",
        "# earlier Host entry of these names, or it wins over these silently.",
    ]
    if host_key_line:
        lines += [
            f"# The relay's host key; add it to {known_hosts} once:",
            f"#   echo '{kh_name} {host_key_line}' >> {known_hosts}",
        ]
    if next_host_key_line and next_host_key_line != host_key_line:
        lines += [
            "# and the key it will switch to (a host key rotation is under way), so that",
            "# the switch needs no prompt:",
            f"#   echo '{kh_name} {next_host_key_line}' >> {known_hosts}",
        ]
    lines += [
        "",
        f"Host {alias}",
        f"    HostName {relay_host}",
        f"    Port {relay_port}",
        f"    User {user}",
        f"    IdentityFile {identity}",
        "    IdentitiesOnly yes",
        "    ServerAliveInterval 15",
        "    ExitOnForwardFailure yes",
    ]
    if tls_port is not None:
        lines.insert(-6, "    # SSH inside TLS (docs/networks.md); the SSH host key is checked too")
        lines.insert(-6, "    ProxyCommand " + tls_proxy_command(
            relay_host, tls_port, ca_file=tls_ca_file, connect=tls_connect))
        fast = ()  # the fast path's data port is what such networks block
    tunnels: list[ServiceGrant] = []
    wildcard = False
    for grant in services:
        if grant.name == "*":
            wildcard = True
        elif grant.port == 22 and any(f.matches(grant.name, 22) for f in fast):
            dash_f = f"-F {config_file} " if config_file else ""
            lines += [
                "",
                f"# {grant.name}: the fast path where labrelay is installed (spliced at the "
                "relay, encrypted once: docs/fastpath.md),",
                f"# else ProxyJump {alias} (stock ssh).  ssh keeps the first of the two "
                "it reads.",
                f'Match originalhost {grant.name} exec "command -v labrelay >/dev/null 2>&1"',
                f"    ProxyCommand labrelay connect {dash_f}{alias} %h:%p",
                f"Host {grant.name}",
                f"    ProxyJump {alias}",
                "    # User <your account on that host>",
            ]
        elif grant.port == 22:
            lines += [
                "",
                f"Host {grant.name}",
                f"    ProxyJump {alias}",
                "    # User <your account on that host>",
            ]
        else:
            tunnels.append(grant)
    if tunnels:
        lines += ["", f"# Other services: `ssh -N {alias}-tunnels` keeps these open",
                  f"Host {alias}-tunnels",
                  f"    HostName {relay_host}", f"    Port {relay_port}", f"    User {user}",
                  f"    IdentityFile {identity}", "    IdentitiesOnly yes",
                  "    SessionType none"]
        for grant in tunnels:
            if grant.port is None:
                lines.append(f"    # LocalForward PORT {grant.name}:PORT   (any port of "
                             f"{grant.name} is granted)")
            else:
                lines.append(f"    LocalForward {grant.port} {grant.name}:{grant.port}")
    if wildcard:
        lines += ["", "# You may reach every service on this relay: add a Host entry with",
                  f"# `ProxyJump {alias}` for each ssh service you use."]
    return "\n".join(lines) + "\n"


def check_alias(alias: str) -> str:
    """An ``--alias`` usable as one ``Host`` name (no pattern, no space); ConfigError."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", alias):
        raise ConfigError("command line", "--alias", f"{alias!r} is not a plain host alias",
                          "letters, digits, '.', '_' and '-', e.g. labrelay-lab2")
    return alias


def relay_address(text: str, default_port: int) -> tuple[str, int]:
    """``--host HOST[:PORT]`` as users reach the relay: ``[v6]:PORT`` and a bare IPv6
    address too (whose last group is not a port); ConfigError saying what is wrong."""
    host, port = text, ""
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            host = ""
        else:
            host, port = inside, rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or (port and (not port.isdigit() or not 1 <= int(port) <= 65535)):
        raise ConfigError("command line", "--host", f"{text!r} is not HOST or HOST:PORT",
                          "the relay's public name and its SSH port, e.g. "
                          "relay.example.org:2222 or [2001:db8::1]:2222")
    if not port and not default_port:
        raise ConfigError("command line", "--host", f"{text!r} has no port, and the relay's "
                          "listen port is chosen when it starts (0)",
                          "give the port users reach it at: --host "
                          + (f"[{host}]:PORT" if ":" in host else f"{host}:PORT"))
    return host, int(port) if port else default_port


def tls_proxy_command(relay_host: str, tls_port: int, *, ca_file: str | None = None,
                      connect: str | None = None) -> str:
    """``openssl s_client`` as ssh's ProxyCommand: TLS to the relay's port with ALPN
    ``labrelay-ssh/1``, the certificate checked for ``relay_host`` (``-verify_return_error``:
    s_client otherwise carries on after a failed check)."""
    target = connect or relay_host
    target = f"[{target}]" if ":" in target else target
    ca = f" -CAfile {ca_file}" if ca_file else ""
    return (f"openssl s_client -quiet -verify_return_error -verify_hostname {relay_host} "
            f"-servername {relay_host} -alpn {ALPN_SSH}{ca} -connect {target}:{tls_port}")


def fast_path_note(services: Iterable[ServiceGrant], fast: Iterable[ServiceGrant],
                   alias: str = RELAY_ALIAS) -> str | None:
    """What ``labrelay ssh-config`` says on stderr about the entries it wrote."""
    fast = tuple(fast)
    names = [g.name for g in services
             if g.name != "*" and g.port == 22 and any(f.matches(g.name, 22) for f in fast)]
    if not names:
        return None
    return (f"{', '.join(names)}: the fast path (ProxyCommand labrelay connect) where "
            f"labrelay is installed, else ProxyJump {alias}; both entries are written")


def next_host_key_line(path: Path) -> str | None:
    """``"ssh-ed25519 AAAA..."`` of the relay's ``next_host_key`` (a private key file):
    the public half of the key itself where it is readable here (what the relay
    announces), else its ``.pub``; None if neither can be read."""
    try:
        key = parse_key(path, read_key_file(path))
    except IdentityError:
        key = None
    if key is not None and not key.isPublic():
        return key.public().toString("OPENSSH").decode("ascii")
    try:
        fields = path.with_name(path.name + ".pub").read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return " ".join(fields[:2]) if len(fields) >= 2 else None


def relay_host_key_line(state_dir: Path) -> str | None:
    """``"ssh-ed25519 AAAA..."`` of a relay whose state directory is readable here."""
    path = state_dir / "ssh_host_ed25519_key.pub"
    try:
        return " ".join(path.read_text().split()[:2])
    except OSError:
        return None
