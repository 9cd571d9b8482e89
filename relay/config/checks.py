"""Checks that span entries: what one entry alone cannot tell is wrong.

Principals (:func:`check_principals`): one name per agent or user, one owner per key,
per service name and per public port, in the config and the grant files together (a
conflict names both places, :class:`PrincipalSite`).  Links and forwards
(:func:`validate_node`, :func:`validate_plain_forwards`): unique names, and a listen
address used once.  The TOML loader, the command line and the grant-file reader all
call these after parsing the entries one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.config.errors import ConfigError, Locate, Where, located
from relay.config.grammar import (
    WILDCARD_BINDS,
    bracket,
    default_forward_name,
    default_plain_forward_name,
    public_key,
)
from relay.config.schema import (
    ForwardKind,
    LocalForward,
    NodeConfig,
    PrincipalConfig,
    RelayConfig,
    RemoteForward,
)


@dataclass(frozen=True)
class PrincipalSite:
    """A principal and where each of its parts was written, so that a conflict between
    two grants (in the config, in grant files, or one of each) names both places."""

    principal: PrincipalConfig
    name_at: Where
    keys_at: tuple[Where, ...]
    services_at: tuple[Where, ...]
    ports_at: tuple[Where, ...]


def config_sites(relay: RelayConfig, source: str) -> list[PrincipalSite]:
    """The ``[[relay.agent]]`` and ``[[relay.user]]`` entries as sites in ``source``."""
    sites = []
    for kind, entries in (("agent", relay.agents), ("user", relay.users)):
        for i, p in enumerate(entries):
            base = f"relay.{kind}[{i}]"
            sites.append(
                PrincipalSite(
                    principal=p,
                    name_at=(source, f"{base}.name"),
                    keys_at=tuple((source, f"{base}.keys[{j}]") for j in range(len(p.keys))),
                    services_at=tuple(
                        (source, f"{base}.services[{j}]") for j in range(len(p.services))
                    ),
                    ports_at=tuple(
                        (source, f"{base}.public_ports[{j}]") for j in range(len(p.public_ports))
                    ),
                )
            )
    return sites


def check_principals(
    sites: Sequence[PrincipalSite], relay: RelayConfig, listen_at: Where
) -> list[tuple[bytes, ...]]:
    """Check that identity and ownership are unambiguous across all principals, and
    return each site's key blobs (a key listed twice for one principal counts once).

    Refused: two agents (or two users) with one name; one key in two principals
    (identity comes from the key); one service name granted to two agents (only its
    owner may take a name over); one public port granted to two agents, or equal to
    the relay's own SSH port on an overlapping address."""

    def conflict(at: Where, first: Where, problem: str, hint: str) -> ConfigError:
        if first[0] == at[0]:
            also = first[1]
        else:
            also = f"{first[1]} in {first[0]}" if first[1] else first[0]
        return ConfigError(at[0], at[1], problem.replace("{also}", also), hint)

    names: dict[tuple[str, str], Where] = {}
    keys: dict[bytes, tuple[int, Where]] = {}
    services: dict[str, tuple[int, Where]] = {}
    ports: dict[int, tuple[int, Where]] = {}
    listen = relay.listen
    overlaps = (
        listen.host in WILDCARD_BINDS
        or relay.public_bind in WILDCARD_BINDS
        or listen.host == relay.public_bind
    )
    if listen.port and overlaps:
        ports[listen.port] = (-1, listen_at)
    blobs: list[tuple[bytes, ...]] = []
    for i, site in enumerate(sites):
        p = site.principal
        if (p.kind, p.name) in names:
            raise conflict(
                site.name_at,
                names[(p.kind, p.name)],
                f"duplicate {p.kind} name {p.name!r} (also {{also}})",
                f"give each {p.kind} its own name; one {p.kind} may have several keys",
            )
        names[(p.kind, p.name)] = site.name_at
        mine: list[bytes] = []
        for line, at in zip(p.keys, site.keys_at, strict=True):
            with located(*at):
                blob, _ = public_key(line)
            if blob in keys:
                owner, first = keys[blob]
                if owner == i:
                    continue
                other = sites[owner].principal
                raise conflict(
                    at,
                    first,
                    f"this key already belongs to {other.kind} {other.name!r} (also {{also}})",
                    "identity comes from the key alone: give every agent and user keys of "
                    "their own; labrelay keygen makes one",
                )
            keys[blob] = (i, at)
            mine.append(blob)
        blobs.append(tuple(mine))
        if p.kind != "agent":
            continue
        for grant, at in zip(p.services, site.services_at, strict=True):
            owner, first = services.setdefault(grant.name, (i, at))
            if owner != i:
                raise conflict(
                    at,
                    first,
                    f"service {grant.name!r} is already granted to agent "
                    f"{sites[owner].principal.name!r} (also {{also}})",
                    "a service name has one owning agent, so that only it can take the name "
                    "over when it reconnects; give the other service another name",
                )
        for port, at in zip(p.public_ports, site.ports_at, strict=True):
            owner, first = ports.setdefault(port, (i, at))
            if owner == -1:
                raise conflict(
                    at,
                    first,
                    f"public port {port} is the relay's own SSH port (also {{also}})",
                    "pick another public port, or move the relay's listen port",
                )
            if owner != i:
                raise conflict(
                    at,
                    first,
                    f"public port {port} is already granted to agent "
                    f"{sites[owner].principal.name!r} (also {{also}})",
                    "each public port belongs to one agent; pick another port",
                )
    return blobs



def validate_node(config: NodeConfig, locate: Locate | None = None) -> None:
    """Check what spans links: link names and forward names are unique in the node,
    a remote listen address is used once per link and a local one once per node.

    ``locate`` turns canonical key paths into what the user wrote (the command line
    uses it); by default every path is in ``config.source``."""

    def where(keypath: str) -> tuple[str, str]:
        return locate(keypath) if locate is not None else (config.source, keypath)

    def fail(keypath: str, first: str, problem: str, hint: str) -> None:
        source, path = where(keypath)
        first_source, first_path = where(first)
        also = first_path if first_source == source else f"{first_path} in {first_source}"
        raise ConfigError(source, path, problem.replace("{also}", also), hint)

    links: dict[str, str] = {}
    for i, link in enumerate(config.links):
        keypath = f"link[{i}].name"
        if link.name in links:
            fail(
                keypath,
                links[link.name],
                f"duplicate link name {link.name!r} (also {{also}})",
                'give each link its own name: name = "..." in the file, --name on the command line',
            )
        links[link.name] = keypath

    names: dict[str, str] = {}
    local_listens: dict[tuple[str, int], str] = {}
    for i, link in enumerate(config.links):
        remote_listens: dict[tuple[str, int], str] = {}
        forwards: list[tuple[ForwardKind, int, RemoteForward | LocalForward]] = [
            *(("remote", j, f) for j, f in enumerate(link.remote)),
            *(("local", j, f) for j, f in enumerate(link.local)),
        ]
        for kind, j, fwd in forwards:
            base = f"link[{i}].{kind}[{j}]"
            listens = remote_listens if kind == "remote" else local_listens
            key = (fwd.bind, fwd.port)
            if fwd.port != 0 and key in listens:
                address = f"{bracket(fwd.bind)}:{fwd.port}" if fwd.bind else str(fwd.port)
                fail(
                    f"{base}.listen",
                    listens[key],
                    f"{address} is already forwarded by {{also}}",
                    "each listen address carries one forward; change the port",
                )
            listens[key] = f"{base}.listen"
            derived = fwd.name == default_forward_name(kind, fwd.bind, fwd.port)
            keypath = base if derived else f"{base}.name"
            if fwd.name in names:
                what = "derived " if derived else ""
                fail(
                    keypath,
                    names[fwd.name],
                    f"duplicate {what}forward name {fwd.name!r} (also {{also}})",
                    'forward names are unique within a node: set name = "..." on one of them',
                )
            names[fwd.name] = keypath



def validate_plain_forwards(config: NodeConfig) -> None:
    """A ``[[forward]]`` name is unique among all the node's forwards, and its listen
    address is not used by another ``[[forward]]`` or ``[[link.local]]`` (port 0 excepted)."""
    names: dict[str, str] = {}
    listens: dict[tuple[str, int], str] = {}
    for i, link in enumerate(config.links):
        for j, remote in enumerate(link.remote):
            names.setdefault(remote.name, f"link[{i}].remote[{j}]")
        for j, local in enumerate(link.local):
            names.setdefault(local.name, f"link[{i}].local[{j}]")
            if local.port != 0:
                listens.setdefault((local.bind, local.port), f"link[{i}].local[{j}].listen")
    for i, fwd in enumerate(config.forwards):
        base = f"forward[{i}]"
        key = (fwd.bind, fwd.port)
        if fwd.port != 0 and key in listens:
            address = f"{bracket(fwd.bind)}:{fwd.port}" if fwd.bind else str(fwd.port)
            raise ConfigError(
                config.source, f"{base}.listen",
                f"{address} is already used by {listens[key]}",
                "each listen address carries one forward; change the port",
            )
        listens[key] = f"{base}.listen"
        derived = fwd.name == default_plain_forward_name(fwd.bind, fwd.port)
        if fwd.name in names:
            raise ConfigError(
                config.source, base if derived else f"{base}.name",
                f"duplicate {'derived ' if derived else ''}forward name {fwd.name!r} "
                f"(also {names[fwd.name]})",
                'forward names are unique within a node: set name = "..." on one of them',
            )
        names[fwd.name] = base

