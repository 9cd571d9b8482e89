"""The agent's own cap on the sessions its relay opens (:class:`SessionCap`).

The relay says which sessions to open; the agent connects each to a declared target.
A relay that was taken over could open ``forwarded-tcpip`` channels (or dispatch
fast-path connections) without end and never close them: 3 000 back to back were 3 000
TCP connections from the lab PC to a lab host and 3 000 descriptors on the lab PC in
under a second (docs/security.md, round 19).  The relay caps its users
(``max_sessions_per_user``); this is the agent's cap on the relay, per link:

- ``max_sessions`` sessions open at once (from the open's arrival to its close), and
- ``max_connecting`` of them still connecting to one forward's target (a lab host that
  stopped accepting must not collect connects for its connect timeout each; counted per
  target, so that a dead host does not hold up the sessions to the others).

Over either, the open is refused (``OPEN_RESOURCE_SHORTAGE`` on a channel) with the
reason :meth:`SessionCap.admit` returns.  Sans-IO: counters and slots only; the caller
refuses, logs and releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.config.schema import DEFAULT_MAX_CONNECTING, DEFAULT_MAX_SESSIONS


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
        self.cap.open -= 1


@dataclass
class SessionCap:
    """Counts a link's sessions and refuses one over its caps."""

    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_connecting: int = DEFAULT_MAX_CONNECTING
    open: int = 0
    connecting: int = 0  # over all forwards
    refused: int = 0
    #: connects in flight per forward (only forwards with some: the keys are the
    #: link's own forward names, never a peer's string)
    by_forward: dict[str, int] = field(default_factory=dict)

    def admit(self, forward: str = "") -> SessionSlot | str:
        """A slot for one more session to ``forward``, or why not (one line, the
        setting named)."""
        if self.open >= self.max_sessions:
            self.refused += 1
            return (f"the agent has {self.open} sessions open on this link "
                    f"(max_sessions = {self.max_sessions})")
        pending = self.by_forward.get(forward, 0)
        if pending >= self.max_connecting:
            self.refused += 1
            return (f"the agent has {pending} sessions still connecting to the target of "
                    f"{forward or 'this forward'} (max_connecting = {self.max_connecting})")
        self.open += 1
        self.connecting += 1
        self.by_forward[forward] = pending + 1
        return SessionSlot(self, forward)

    def connected(self, forward: str) -> None:
        """One connect to ``forward``'s target ended (connected or failed)."""
        self.connecting -= 1
        left = self.by_forward.get(forward, 0) - 1
        if left > 0:
            self.by_forward[forward] = left
        else:
            self.by_forward.pop(forward, None)

    def reconfigure(self, max_sessions: int, max_connecting: int) -> None:
        """New caps (a reload): sessions already open stay; new ones are counted
        against the new caps."""
        self.max_sessions = max_sessions
        self.max_connecting = max_connecting

    def status(self) -> dict[str, int]:
        return {"sessions_open": self.open, "sessions_connecting": self.connecting,
                "max_sessions": self.max_sessions, "max_connecting": self.max_connecting,
                "sessions_refused_cap": self.refused}
