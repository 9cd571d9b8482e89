"""Which agent session serves which service: the relay's routing table (no I/O).

A service is a ``(name, port)`` pair registered by an agent with a standard
``tcpip-forward`` whose bind address is the name.  Ownership comes from the
grants: a name is granted to one agent only (checked at configuration time), so
a conflicting registration is either the same agent again — a reconnect whose
old session is not dead yet — or refused.

The same agent registering again *takes the name over* unless the current
holder proves alive: the caller probes it (one keepalive, a short timeout) and
reports back with :meth:`Registry.takeover`.  That keeps the two properties the
relay needs: a reconnecting agent gets its name back at once (the stale session
cannot answer), and two live processes with the same key do not flap (the
newcomer is refused while the holder answers).

Kept behind this small interface so the table can later move to a shared store
(DESIGN §10).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from relay.core.earlyopen import OpenHealth

PUBLIC_BINDS = frozenset({"", "0.0.0.0", "*", "::", "localhost", "127.0.0.1", "::1"})
"""``tcpip-forward`` binds that ask the relay for a public port, not a named service.
The agent needs them too: it never offers such a forward on the fast path."""
PUBLIC = ""
"""The registry's name of a public port's registration."""


class AgentSession(Protocol):
    """What the routing table needs to know of an agent's SSH connection."""

    @property
    def principal_name(self) -> str: ...

    @property
    def peer(self) -> str: ...

    def disconnect(self, why: str) -> None: ...


class Outcome(Enum):
    GRANTED = "granted"  # new, or the same session again
    PROBE = "probe"  # the same agent holds it in another session: probe that one
    REFUSED = "refused"


@dataclass
class Registration:
    name: str
    port: int
    owner: str
    session: AgentSession
    bind: str  # the bind string the agent sent, echoed in forwarded-tcpip
    since: float
    sessions_total: int = 0
    active: set[object] = field(default_factory=set)
    # How the last open of its sessions went (relay.core.earlyopen: early confirmation).
    open_health: OpenHealth = OpenHealth.UNKNOWN


class ServiceRegistry(Protocol):
    """The registry interface: what :class:`relay.core.router.Router` needs of the table.

    :class:`Registry` is the in-memory implementation; a shared store (DESIGN §10)
    plugs in here.  ``session`` values are compared by identity."""

    def lookup(self, name: str, port: int) -> Registration | None: ...

    def registrations(self) -> list[Registration]: ...

    def offer(self, name: str, port: int, session: AgentSession) -> tuple[Outcome, str]: ...

    def register(self, name: str, port: int, session: AgentSession, bind: str,
                 now: float) -> Registration | None: ...

    def unregister(self, name: str, port: int, session: AgentSession) -> bool: ...

    def drop_session(self, session: AgentSession) -> list[Registration]: ...

    def held_by(self, session: AgentSession) -> list[Registration]: ...


class Registry:
    """Services by ``(name, port)``, in memory: the first :class:`ServiceRegistry`."""

    def __init__(self) -> None:
        self._services: dict[tuple[str, int], Registration] = {}

    def lookup(self, name: str, port: int) -> Registration | None:
        return self._services.get((name, port))

    def registrations(self) -> list[Registration]:
        return sorted(self._services.values(), key=lambda r: (r.name, r.port))

    def offer(self, name: str, port: int, session: AgentSession) -> tuple[Outcome, str]:
        """What should happen if ``session`` registers ``name:port``."""
        current = self._services.get((name, port))
        if current is None or current.session is session:
            return Outcome.GRANTED, ""
        if current.owner == session.principal_name:
            return Outcome.PROBE, f"held by another session of {current.owner}"
        return Outcome.REFUSED, f"held by agent {current.owner}"

    def register(
        self, name: str, port: int, session: AgentSession, bind: str, now: float
    ) -> Registration | None:
        """Record ``session`` as the holder; return the registration it replaced."""
        old = self._services.get((name, port))
        if old is not None and old.session is session:
            return None
        self._services[(name, port)] = Registration(
            name, port, session.principal_name, session, bind, now
        )
        return old

    def unregister(self, name: str, port: int, session: AgentSession) -> bool:
        current = self._services.get((name, port))
        if current is None or current.session is not session:
            return False
        del self._services[(name, port)]
        return True

    def drop_session(self, session: AgentSession) -> list[Registration]:
        """Forget everything ``session`` held (it disconnected)."""
        gone = [r for r in self._services.values() if r.session is session]
        for r in gone:
            del self._services[(r.name, r.port)]
        return gone

    def held_by(self, session: AgentSession) -> list[Registration]:
        return [r for r in self._services.values() if r.session is session]
