"""What a reload of the grants took away, key by key (part of :mod:`relay.server.grants`).

:func:`diff_grants` is pure (plain data in, plain data out): the :class:`GrantsChange`
of every reload, which the relay applies to what is already running.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from relay.config.schema import ServiceGrant
from relay.core.grants import Principal


@dataclass(frozen=True)
class Loss:
    """What one key lost in a reload.

    ``everything``: the key is granted nothing any more, or now belongs to another
    principal (identity comes from the key alone, so a key that changed hands is a new
    identity: what it holds goes, and it may log in again as who it now is).
    Otherwise the key was narrowed: ``services`` are grants it had that nothing it has
    now covers, ``public_ports`` the public ports it no longer has.  Either way the
    relay checks what runs against the grants now in force; this only says whom to
    check and what to log."""

    before: Principal
    everything: bool
    services: tuple[ServiceGrant, ...] = ()
    public_ports: tuple[int, ...] = ()
    where: str = ""  # where the key was granted before (FILE:LINE or the config)

    def describe(self) -> str:
        if self.everything:
            return f"{self.before.kind} {self.before.name}: key no longer granted"
        lost = [str(g) for g in self.services] + [f"public:{p}" for p in self.public_ports]
        return f"{self.before.kind} {self.before.name}: lost {', '.join(lost)}"


@dataclass(frozen=True)
class GrantsChange:
    """The difference between two grant states, by key (see :func:`diff_grants`)."""

    losses: Mapping[bytes, Loss]
    added: int = 0  # keys granted now that were not before

    @property
    def revoked(self) -> dict[bytes, Loss]:
        return {k: v for k, v in self.losses.items() if v.everything}

    @property
    def narrowed(self) -> dict[bytes, Loss]:
        return {k: v for k, v in self.losses.items() if not v.everything}


def _covers(other: ServiceGrant, grant: ServiceGrant) -> bool:
    """Whether ``other`` allows everything ``grant`` allows."""
    return other.name in ("*", grant.name) and (other.port is None or other.port == grant.port)


def diff_grants(
    old: Mapping[bytes, Principal],
    new: Mapping[bytes, Principal],
    origins: Mapping[bytes, str] | None = None,
) -> GrantsChange:
    """What each key of ``old`` lost in ``new`` (pure: plain data in, plain data out).

    A key missing from ``new``, or whose principal changed kind or name, lost
    everything; one whose grants shrank lost the grants no new grant covers (so
    ``gpu-*`` -> ``gpu-a`` is a loss of ``gpu-*``, ``gpu:22`` -> ``gpu:*`` none).
    ``max_sessions`` is not a loss: a lowered cap refuses new sessions only."""
    losses: dict[bytes, Loss] = {}
    where = origins or {}
    for key, before in old.items():
        after = new.get(key)
        if after is None or (after.kind, after.name) != (before.kind, before.name):
            losses[key] = Loss(before, True, before.services,
                               tuple(sorted(before.public_ports)), where.get(key, ""))
            continue
        services = tuple(
            g for g in before.services if not any(_covers(h, g) for h in after.services)
        )
        ports = tuple(sorted(before.public_ports - after.public_ports))
        if services or ports:
            losses[key] = Loss(before, False, services, ports, where.get(key, ""))
    return GrantsChange(losses, sum(1 for key in new if key not in old))
