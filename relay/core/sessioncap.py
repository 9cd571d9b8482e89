"""The agent's own cap on the sessions its relay opens (:class:`SessionCap`).

The relay says which sessions to open; the agent connects each to a declared target.
A relay that was taken over could open ``forwarded-tcpip`` channels (or dispatch
fast-path connections) without end and never close them: 3 000 back to back were 3 000
TCP connections from the lab PC to a lab host and 3 000 descriptors on the lab PC in
under a second (docs/security.md, round 19).  The relay caps its users
(``max_sessions_per_user``); this is the agent's cap on the relay, per link:

- ``max_sessions`` sessions open at once (from the open's arrival to its close),
- ``max_sessions_per_target`` of them open to one forward's target (round 20: the
  link's whole cap on one lab host was 1 024 connections to one Jupyter, whose
  descriptor limit is often 1 024 too; docs/security.md has the numbers), and
- ``max_connecting`` of those still connecting (a lab host that stopped accepting must
  not collect connects for its connect timeout each; counted per target, so that a
  dead host does not hold up the sessions to the others).

The per-target counts are one :class:`TargetCount` per forward with sessions (open
and, of those, connecting), kept while it has any: the keys are the link's own
forward names, never a peer's string.

Over either, the open is refused (``OPEN_RESOURCE_SHORTAGE`` on a channel) with the
reason :meth:`SessionCap.admit` returns.  Sans-IO: counters and slots only; the caller
refuses, logs and releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.config.schema import (
    DEFAULT_MAX_CONNECTING,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_TARGET,
)


@dataclass
class TargetCount:
    """One forward's target's sessions: open, and of those still connecting."""

    open: int = 0
    connecting: int = 0


@dataclass
class SessionSlot:
    """One admitted session's place: connecting until :meth:`connected`, open until
    :meth:`release`.  Both are idempotent, so every path that ends a session (a failed
    connect, a refused confirmation, the bridge's close) may call them."""

    cap: SessionCap
    forward: str
    connecting: bool = True
    released: bool = False

    def connected(self) -> None:
        if self.connecting and not self.released:
            self.connecting = False
            self.cap.connected(self.forward)

    def release(self) -> None:
        if self.released:
            return
        self.connected()
        self.released = True
        self.cap.released(self.forward)


@dataclass
class SessionCap:
    """Counts a link's sessions, in all and per forward's target, and refuses one over
    its caps."""

    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_connecting: int = DEFAULT_MAX_CONNECTING
    max_sessions_per_target: int = DEFAULT_MAX_SESSIONS_PER_TARGET
    open: int = 0
    connecting: int = 0  # over all forwards
    refused: int = 0
    #: per forward with sessions open (the link's own forward names)
    targets: dict[str, TargetCount] = field(default_factory=dict)

    def admit(self, forward: str = "") -> SessionSlot | str:
        """A slot for one more session to ``forward``, or why not (one line, the
        setting named)."""
        if self.open >= self.max_sessions:
            self.refused += 1
            return (f"the agent has {self.open} sessions open on this link "
                    f"(max_sessions = {self.max_sessions})")
        count = self.targets.get(forward) or TargetCount()
        if count.open >= self.max_sessions_per_target:
            self.refused += 1
            return (f"the agent has {count.open} sessions open to the target of "
                    f"{forward or 'this forward'} (max_sessions_per_target = "
                    f"{self.max_sessions_per_target})")
        if count.connecting >= self.max_connecting:
            self.refused += 1
            return (f"the agent has {count.connecting} sessions still connecting to the "
                    f"target of {forward or 'this forward'} (max_connecting = "
                    f"{self.max_connecting})")
        self.open += 1
        self.connecting += 1
        count.open += 1
        count.connecting += 1
        self.targets[forward] = count
        return SessionSlot(self, forward)

    def connected(self, forward: str) -> None:
        """One connect to ``forward``'s target ended (connected or failed)."""
        self.connecting -= 1
        self.targets[forward].connecting -= 1

    def released(self, forward: str) -> None:
        """One session to ``forward``'s target ended (after :meth:`connected`)."""
        self.open -= 1
        count = self.targets[forward]
        count.open -= 1
        if count.open <= 0:
            del self.targets[forward]

    @property
    def by_forward(self) -> dict[str, int]:
        """Connects in flight per forward (those with some)."""
        return {f: c.connecting for f, c in self.targets.items() if c.connecting}

    def reconfigure(self, max_sessions: int, max_connecting: int,
                    max_sessions_per_target: int = DEFAULT_MAX_SESSIONS_PER_TARGET) -> None:
        """New caps (a reload): sessions already open stay; new ones are counted
        against the new caps."""
        self.max_sessions = max_sessions
        self.max_connecting = max_connecting
        self.max_sessions_per_target = max_sessions_per_target

    def status(self) -> dict[str, Any]:
        return {"sessions_open": self.open, "sessions_connecting": self.connecting,
                "max_sessions": self.max_sessions, "max_connecting": self.max_connecting,
                "max_sessions_per_target": self.max_sessions_per_target,
                "sessions_by_target": {f: c.open for f, c in sorted(self.targets.items())},
                "sessions_refused_cap": self.refused}
