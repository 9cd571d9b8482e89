"""What a reload changes: the difference between two node configs, as plain actions.

Sans-IO and pure: :func:`diff_links`, :func:`diff_plain_forwards` and
:func:`diff_relay` take the config in force and the one just read and say what to
start, stop or change so that the running node matches the new file while everything
the change does not touch keeps running.  The reload shell
(:mod:`relay.ops.reload`) hands each *reloadable part* of the node the old and new
config; each part asks the function for its section and does the I/O.

Entries are matched by name (a link's ``name``, a forward's ``name``), so an edit
elsewhere in the file, or a reordering, changes nothing.  A forward whose settings
changed is removed and added again (its own sessions end, nothing else does); a link
whose connection settings changed (host, key, keepalive ...) is restarted (its
sessions end), while a link whose only change is its list of forwards keeps its
connection and has forwards added and cancelled on it.

Some relay settings are bound into listeners and tables at start-up (the listen
address, the data port, per-source limits ...): a change to one of them is reported
as :class:`NeedsRestart`, not applied, and everything else in the file still is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from relay.config.schema import (
    AdminConfig,
    LinkConfig,
    LocalForward,
    NodeConfig,
    PlainForwardConfig,
    RelayConfig,
    RemoteForward,
)

T = TypeVar("T")

RELAY_RESTART_ONLY = (
    "listen", "state_dir", "public_bind", "data_port", "data_bind",
    "max_unauthenticated", "per_source_max_unauthenticated", "per_source_netblock4",
    "per_source_netblock6", "penalties", "penalty_exempt", "crowding", "token_lifetime",
    "data_hello_timeout", "max_tokens_per_session", "max_tokens_per_user",
    "grants_poll_interval", "tls",
)
"""``[relay]`` keys bound into listeners, the admission table or the token book when
the relay starts: a reload reports their change and keeps the running value."""

LINK_LIVE = ("max_sessions", "max_connecting", "max_sessions_per_target")
"""``[[link]]`` keys a reload applies to the running link without restarting it (its
sessions keep running; new ones are counted against the new value)."""

RELAY_GRANT_FIELDS = ("agents", "users", "agents_file", "users_file", "trusted_user_ca")
"""``[relay]`` keys that say who may do what: a change re-reads the grants."""


# --- actions ------------------------------------------------------------------------


@dataclass(frozen=True)
class StartLink:
    new: LinkConfig


@dataclass(frozen=True)
class StopLink:
    old: LinkConfig


@dataclass(frozen=True)
class RestartLink:
    """The link's connection settings changed: its sessions end, it reconnects."""

    old: LinkConfig
    new: LinkConfig
    fields: tuple[str, ...]


@dataclass(frozen=True)
class LinkSettings:
    """Only live settings of the link changed (:data:`LINK_LIVE`): applied in place."""

    new: LinkConfig
    fields: tuple[str, ...]


@dataclass(frozen=True)
class AddForward:
    link: str
    forward: RemoteForward | LocalForward


@dataclass(frozen=True)
class RemoveForward:
    link: str
    forward: RemoteForward | LocalForward


@dataclass(frozen=True)
class StartPlain:
    new: PlainForwardConfig


@dataclass(frozen=True)
class StopPlain:
    old: PlainForwardConfig


@dataclass(frozen=True)
class RelaySettings:
    """Live ``[relay]`` settings changed (limits, timeouts, grants): the new config
    replaces the old one; ``grants`` says whether the grants must be re-read."""

    new: RelayConfig
    fields: tuple[str, ...]
    grants: bool


@dataclass(frozen=True)
class NeedsRestart:
    """A change a reload cannot apply: it is logged, and the running value stays."""

    keypath: str
    why: str


LinkAction = StartLink | StopLink | RestartLink | LinkSettings | AddForward | RemoveForward
PlainAction = StartPlain | StopPlain
RelayAction = RelaySettings | NeedsRestart


# --- diffs ----------------------------------------------------------------------------


def changed_fields(old: object, new: object, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The dataclass fields whose values differ between ``old`` and ``new``."""
    skipped = set(skip)
    return tuple(f.name for f in dataclasses.fields(old)  # type: ignore[arg-type]
                 if f.name not in skipped and getattr(old, f.name) != getattr(new, f.name))


def _by_name(items: Sequence[T], name: Callable[[T], str]) -> dict[str, T]:
    return {name(item): item for item in items}


def _forwards(link: str, old: Sequence[RemoteForward] | Sequence[LocalForward],
              new: Sequence[RemoteForward] | Sequence[LocalForward]) -> list[LinkAction]:
    before = {f.name: f for f in old}
    after = {f.name: f for f in new}
    actions: list[LinkAction] = []
    for name, fwd in before.items():
        if after.get(name) != fwd:
            actions.append(RemoveForward(link, fwd))
    for name, fwd in after.items():
        if before.get(name) != fwd:
            actions.append(AddForward(link, fwd))
    return actions


def diff_links(old: Sequence[LinkConfig], new: Sequence[LinkConfig]) -> list[LinkAction]:
    """Links stopped, started, restarted, and forwards removed then added, in that order
    (a removal first frees a name or a port an addition may take)."""
    before = _by_name(old, lambda link: link.name)
    after = _by_name(new, lambda link: link.name)
    stops: list[LinkAction] = [StopLink(link) for name, link in before.items()
                               if name not in after]
    removes: list[LinkAction] = []
    adds: list[LinkAction] = []
    starts: list[LinkAction] = []
    for name, link in after.items():
        was = before.get(name)
        if was is None:
            starts.append(StartLink(link))
            continue
        fields = changed_fields(was, link, skip=("remote", "local", *LINK_LIVE))
        if fields:
            starts.append(RestartLink(was, link, fields))
            continue
        live = tuple(f for f in LINK_LIVE if getattr(was, f) != getattr(link, f))
        if live:
            starts.append(LinkSettings(link, live))
        for action in (_forwards(name, was.remote, link.remote)
                       + _forwards(name, was.local, link.local)):
            (removes if isinstance(action, RemoveForward) else adds).append(action)
    return stops + removes + starts + adds


def diff_plain_forwards(old: Sequence[PlainForwardConfig],
                        new: Sequence[PlainForwardConfig]) -> list[PlainAction]:
    """``[[forward]]`` hops stopped (removed or changed) then started (added or changed)."""
    before = _by_name(old, lambda f: f.name)
    after = _by_name(new, lambda f: f.name)
    stops: list[PlainAction] = [StopPlain(f) for name, f in before.items()
                                if after.get(name) != f]
    starts: list[PlainAction] = [StartPlain(f) for name, f in after.items()
                                 if before.get(name) != f]
    return stops + starts


def diff_relay(old: RelayConfig | None, new: RelayConfig | None) -> list[RelayAction]:
    """What changes in ``[relay]``: live settings (one :class:`RelaySettings` carrying
    the new config, restart-only keys kept at their running values) and what needs a
    restart."""
    if old is None and new is None:
        return []
    if old is None or new is None:
        return [NeedsRestart("relay", "adding or removing the [relay] section")]
    actions: list[RelayAction] = []
    fields = changed_fields(old, new)
    kept = {}
    for name in fields:
        if name in RELAY_RESTART_ONLY:
            actions.append(NeedsRestart(f"relay.{name}", "bound when the relay starts"))
            kept[name] = getattr(old, name)
    live = tuple(name for name in fields if name not in RELAY_RESTART_ONLY)
    if live:
        applied = dataclasses.replace(new, **kept)
        grants = any(name in RELAY_GRANT_FIELDS for name in live)
        actions.append(RelaySettings(applied, live, grants))
    return actions


def diff_admin(old: AdminConfig | None, new: AdminConfig | None) -> list[NeedsRestart]:
    """The admin endpoint is the way reloads arrive: it is never rebound by one."""
    if old == new:
        return []
    return [NeedsRestart("admin", "the admin endpoint is bound when labrelay starts")]


def describe(action: LinkAction | PlainAction | RelayAction) -> str:
    """One line for the log: what a reload did or will do."""
    match action:
        case StartLink(new):
            return f"link {new.name}: started"
        case StopLink(old):
            return f"link {old.name}: stopped"
        case RestartLink(old, _, fields):
            return f"link {old.name}: restarted ({', '.join(fields)} changed)"
        case LinkSettings(new, fields):
            return f"link {new.name}: {', '.join(fields)} changed"
        case AddForward(link, fwd):
            return f"link {link}: forward {fwd.name} added"
        case RemoveForward(link, fwd):
            return f"link {link}: forward {fwd.name} removed"
        case StartPlain(new):
            return f"forward {new.name}: started"
        case StopPlain(old):
            return f"forward {old.name}: stopped"
        case RelaySettings(_, fields, _):
            return f"relay: {', '.join(fields)} changed"
        case NeedsRestart(keypath, why):
            return f"{keypath}: not changed until a restart ({why})"
    raise TypeError(action)


def plan(old: NodeConfig, new: NodeConfig) -> list[LinkAction | PlainAction | RelayAction]:
    """Every action of a reload from ``old`` to ``new`` (what ``labrelay check`` shows)."""
    return [*diff_links(old.links, new.links),
            *diff_plain_forwards(old.forwards, new.forwards),
            *diff_relay(old.relay, new.relay), *diff_admin(old.admin, new.admin)]
