"""The relay's one table of user sessions (no I/O): what status, metrics and logs read.

Every way a user's bytes reach a service is one row here: a user's SSH channel or a
public-port connection bridged to an agent's channel (``path="channel"``), a user's SSH
channel to an end-to-end encrypted service joined to an agent's pooled data connection
(``path="pooled"``), or a fast-path data connection spliced to an agent's
(``path="spliced"``).  The relay's shell
(:mod:`relay.server.relay`) opens a row when a session is admitted (it counts against
the user's cap from then on, even while it waits for its agent), attaches a byte meter
once bytes can move, and closes the row with the final counts and why it ended.

The table holds no transport: bytes are read through the meter the shell attaches (a
plain callable), and the decisions it makes — which sessions are idle, which belong to
a revoked registration — come back as rows for the shell to close.  Time is given in as
``now``.  Per-service totals (sessions ever opened, bytes of ended sessions) outlive
their rows; a bounded list of recently ended rows keeps the end and its reason for
logs and diagnostics without growing with uptime.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

CHANNEL = "channel"
"""A user's SSH channel or a public-port connection, bridged to an agent's channel."""
SPLICED = "spliced"
"""A fast-path data connection spliced to an agent's data connection."""
POOLED = "pooled"
"""A user's SSH channel joined to one of the agent's pooled data connections (an
end-to-end encrypted service: relay.server.dataport.DataPort.pooledRoute)."""

RECENT = 256
"""How many ended rows the table remembers (for diagnostics; totals are kept apart)."""

MAX_TOTALS = 512
"""How many distinct services the table keeps totals for; past it, new names
are counted under :data:`OTHER`.  The shell already counts a wildcard grant's
unregistered ports under one name (relay.core.router.Router.totals_name); this is the
backstop that keeps status and ``/metrics`` bounded whatever the names (a hostile agent
registering every port of its ``name:*`` grant)."""

OTHER = "(other)"
"""The totals name of the services seen after :data:`MAX_TOTALS` others."""

Meter = Callable[[], tuple[int, int]]
"""Live byte counts of a moving session: (to the service, from the service)."""


class State(Enum):
    OPENING = "opening"  # admitted, not moving bytes yet (waiting for its agent)
    MOVING = "moving"  # a meter is attached: bytes can flow
    ENDED = "ended"


@dataclass(eq=False)
class SessionRow:
    """One user session.  ``key`` is the user's key blob (None: a public-port
    connection, whose ``user`` is its ``public:PORT`` label)."""

    user: str
    service: str
    origin: str
    started: float
    path: str = CHANNEL
    key: bytes | None = None
    login: str = ""  # the login name the user's connection gave (its certificate's grants)
    agent: object = None  # the agent connection serving it, once known
    state: State = State.OPENING
    totals_as: str = ""  # the per-service totals it counts in ("": ``service``)
    meter: Meter | None = None
    closing: str | None = None  # the relay asked for it to close, and why
    ended: float | None = None
    why: str | None = None  # why it ended
    to_service: int = 0  # final counts once ended
    from_service: int = 0
    seen: tuple[int, int] = (0, 0)  # byte counts at the last idle check
    active_at: float = 0.0  # when they last changed

    def counts(self) -> tuple[int, int]:
        """Bytes (to the service, from the service) so far."""
        if self.state is State.ENDED:
            return self.to_service, self.from_service
        if self.meter is None:
            return 0, 0
        return self.meter()

    @property
    def moving(self) -> bool:
        return self.state is State.MOVING


@dataclass
class ServiceTotals:
    """What a service's (or a user's) sessions add up to; ``active`` are its open rows."""

    sessions_total: int = 0
    bytes_to_service: int = 0  # of ended sessions; add the active rows' counts
    bytes_from_service: int = 0
    active: set[SessionRow] = field(default_factory=set)


def _summed(totals: dict[str, ServiceTotals]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, t in sorted(totals.items()):
        live = [r.counts() for r in t.active]
        out[name] = {
            "sessions_total": t.sessions_total, "sessions_active": len(t.active),
            "bytes_to_service": t.bytes_to_service + sum(c[0] for c in live),
            "bytes_from_service": t.bytes_from_service + sum(c[1] for c in live),
        }
    return out


class SessionTable:
    """Open sessions, per-service totals and per-user counts."""

    def __init__(self, max_totals: int = MAX_TOTALS) -> None:
        self._max_totals = max_totals
        self._open: set[SessionRow] = set()
        self._services: dict[str, ServiceTotals] = {}
        self._users: dict[str, int] = {}  # open sessions per user (users seen stay, at 0)
        self._user_totals: dict[str, ServiceTotals] = {}
        self.recent: deque[SessionRow] = deque(maxlen=RECENT)

    # rows

    def open(self, user: str, service: str, origin: str, now: float, *, path: str = CHANNEL,
             key: bytes | None = None, agent: object = None,
             totals_as: str | None = None, login: str = "") -> SessionRow:
        """Count a new session: it holds a place in its user's cap from now on.  Its
        service's totals are ``totals_as``'s (default: ``service``), or :data:`OTHER`'s
        once the table keeps :data:`MAX_TOTALS` names."""
        row = SessionRow(user, service, origin, now, path=path, key=key, login=login,
                         agent=agent, active_at=now)
        row.totals_as = self._bounded(self._services, totals_as or service)
        self._open.add(row)
        self._users[user] = self._users.get(user, 0) + 1
        for totals in (self._services.setdefault(row.totals_as, ServiceTotals()),
                       self._user_totals.setdefault(user, ServiceTotals())):
            totals.sessions_total += 1
            totals.active.add(row)
        return row

    def moving(self, row: SessionRow, meter: Meter, agent: object = None) -> bool:
        """Bytes can move now, read through ``meter``.  False if the relay asked for the
        row to close meanwhile (a grant went while it was opening): the caller closes it."""
        if agent is not None:
            row.agent = agent
        if row.state is State.OPENING:
            row.state = State.MOVING
            row.meter = meter
        return row.closing is None

    def request_close(self, row: SessionRow, why: str) -> None:
        """Note that the relay is closing ``row`` (the shell aborts its transports)."""
        if row.closing is None:
            row.closing = why

    def close(self, row: SessionRow, now: float, to_service: int = 0, from_service: int = 0,
              why: str = "closed") -> bool:
        """The session ended with these final counts; False if it had already."""
        if row not in self._open:
            return False
        self._open.discard(row)
        row.state, row.ended, row.meter = State.ENDED, now, None
        row.why = row.closing or why
        row.to_service, row.from_service = to_service, from_service
        self._users[row.user] -= 1
        for totals in (self._services[row.totals_as], self._user_totals[row.user]):
            totals.active.discard(row)
            totals.bytes_to_service += to_service
            totals.bytes_from_service += from_service
        self.recent.append(row)
        return True

    def _bounded(self, totals: dict[str, ServiceTotals], name: str) -> str:
        if name in totals or len(totals) < self._max_totals:
            return name
        return OTHER

    # reading

    def rows(self) -> list[SessionRow]:
        """The open rows, oldest first."""
        return sorted(self._open, key=lambda r: r.started)

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, row: object) -> bool:
        return row in self._open

    def active_for_user(self, user: str) -> int:
        return self._users.get(user, 0)

    def totals(self, service: str) -> ServiceTotals:
        return self._services.get(service) or ServiceTotals()

    def session_counts(self, service: str) -> tuple[int, int]:
        """``(open, opened in all)`` for ``service``, with nothing made: the status
        snapshot asks it for each of possibly thousands of registrations per request."""
        t = self._services.get(service)
        return (0, 0) if t is None else (len(t.active), t.sessions_total)

    def per_service(self) -> dict[str, dict[str, int]]:
        """Per service ever seen: sessions opened and open, bytes each way (ended and live)."""
        return _summed(self._services)

    def per_user_totals(self) -> dict[str, dict[str, int]]:
        """Per user ever seen (a public port's connections under ``public:PORT``): the
        same running totals as :meth:`per_service`, kept for the table's lifetime."""
        return _summed(self._user_totals)

    def per_user(self) -> dict[str, int]:
        """Open sessions per user ever seen (0 once all ended)."""
        return dict(sorted(self._users.items()))

    # decisions

    def idle(self, now: float, timeout: float) -> list[SessionRow]:
        """Rows that moved no byte either way for ``timeout`` seconds, as of ``now``.

        Call it periodically: each call notes the counts it saw, so a row is idle once
        two calls ``timeout`` apart saw the same counts.  A row still opening is never
        idle (its wait for the agent has its own limit)."""
        quiet = []
        for row in self.rows():
            counts = row.counts()
            if counts != row.seen or not row.moving:
                row.seen, row.active_at = counts, now
            elif now - row.active_at >= timeout:
                quiet.append(row)
        return quiet

    def pooled_of_agent(self, agent: object) -> list[SessionRow]:
        """The open rows carried on ``agent``'s pooled data connections (path
        ``pooled``): they end with its link, as its channels do."""
        return [r for r in self.rows() if r.agent is agent and r.path == POOLED]

    def of_agent_service(self, agent: object, service: str) -> list[SessionRow]:
        """The open rows to ``service`` served by ``agent`` (a registration's sessions)."""
        return [r for r in self.rows() if r.agent is agent and r.service == service]

    def of_keys(self, keys: Iterable[bytes]) -> list[SessionRow]:
        """The open rows of users with one of these keys, oldest first."""
        wanted = set(keys)
        return [r for r in self.rows() if r.key is not None and r.key in wanted]
