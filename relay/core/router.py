"""The relay's routing decisions (no I/O): who may hold a name, takeover, waiters.

:class:`Router` answers the questions the relay's shell (:mod:`relay.server.relay`) asks
when an agent sends ``tcpip-forward``, when a holder's grant goes, and when a session
needs a service that is not registered yet.  It returns :class:`Decision` values; the
shell does the I/O they call for (probing a holder, disconnecting a superseded one,
listening on a public port, closing sessions, firing a waiter's Deferred).

Takeover is a small state machine held as data: an offer of a name held by another
session of the same agent gives a :class:`Probe`; the shell probes the holder and feeds
the outcome back (:meth:`Router.probe_answered`, :meth:`Router.probe_silent`), and the
first outcome settles the probe.  Waiters are data too (who waits, for what, until
when); time is always given in as ``now``.

The table itself is behind :class:`relay.core.routing.ServiceRegistry`, whose first
implementation is the in-memory :class:`relay.core.routing.Registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from relay.core.grants import Principal
from relay.core.routing import (
    PUBLIC,
    PUBLIC_BINDS,
    AgentSession,
    Outcome,
    Registration,
    ServiceRegistry,
)

SUPERSEDED = "superseded by a newer session of the same agent"
"""Why a stale holder is disconnected when its name is taken over."""


class Verdict(Enum):
    GRANTED = "granted"  # registered now
    TAKEOVER = "takeover"  # registered now; ``superseded`` holder must be disconnected
    PROBE = "probe"  # the same agent holds it in another session: probe ``probe.holder``
    REFUSED = "refused"  # tell the agent no, and why
    GONE = "gone"  # the newcomer disconnected meanwhile: answer no, nothing to log


@dataclass
class Probe:
    """A takeover in progress: ``newcomer`` wants what ``holder`` holds."""

    name: str
    port: int
    bind: str
    newcomer: AgentSession
    holder: Registration
    settled: bool = False

    @property
    def why_alive(self) -> str:
        return f"held by a live session of {self.holder.owner} from {self.holder.session.peer}"


class Refused(Enum):
    """Why a user session is refused (the shell maps it to an SSH open-failure code)."""

    PROHIBITED = "prohibited"  # not granted, or a public port's name
    CAP = "cap"  # the user has its sessions' worth open (max_sessions)
    NO_SERVICE = "no-service"  # not registered and never can be: not worth waiting for


@dataclass(eq=False)
class Waiter:
    """Someone (``who``: opaque to the router) waiting for ``name:port`` until ``until``."""

    name: str
    port: int
    who: object
    until: float


@dataclass
class Decision:
    verdict: Verdict
    why: str = ""
    registration: Registration | None = None  # GRANTED/TAKEOVER: the new registration
    superseded: AgentSession | None = None  # TAKEOVER: disconnect it (SUPERSEDED)
    probe: Probe | None = None  # PROBE
    woken: list[Waiter] = field(default_factory=list)  # GRANTED/TAKEOVER: hand them it

    @property
    def ok(self) -> bool:
        return self.verdict in (Verdict.GRANTED, Verdict.TAKEOVER)


def label_of(name: str, port: int) -> str:
    """How a registration is named in logs and status: ``name:port`` or ``public:PORT``."""
    return f"public:{port}" if name == PUBLIC else f"{name}:{port}"


def may_hold(principal: Principal | None, reg: Registration) -> bool:
    """Whether ``principal`` (None: an ungranted key) may hold registration ``reg``."""
    if principal is None:
        return False
    if reg.name == PUBLIC:
        return principal.may_bind_public(reg.port)
    return principal.may_register(reg.name, reg.port)


class Router:
    """Registrations, takeover and waiters over a :class:`ServiceRegistry`.

    ``principal_of`` maps an agent session to the principal its key is granted as now
    (None: no longer granted); ``connected`` says whether a session is still up."""

    def __init__(self, registry: ServiceRegistry,
                 principal_of: Callable[[AgentSession], Principal | None],
                 connected: Callable[[AgentSession], bool]) -> None:
        self.registry = registry
        self._principal_of = principal_of
        self._connected = connected
        self._waiters: dict[tuple[str, int], list[Waiter]] = {}

    # per-agent, per-name rules

    def claim(self, principal: Principal | None, bind: str, port: int) -> tuple[str, str | None]:
        """The registry name ``bind:port`` asks for, and why it is refused (None: it may
        be offered).  ``ssh`` lower-cases host names, so names are case-insensitive; a
        public bind asks for public port ``port``."""
        public = bind in PUBLIC_BINDS
        name = PUBLIC if public else bind.lower()
        if principal is None:
            return name, "this key is no longer granted"
        if principal.kind != "agent":
            return name, "users may not register services"
        if public:
            if port == 0 or not principal.may_bind_public(port):
                return name, f"public port {port} is not granted to agent {principal.name}"
        elif not principal.may_register(name, port):
            return name, f"service {bind}:{port} is not granted to agent {principal.name}"
        return name, None

    def admit_session(self, principal: Principal | None, name: str, port: int, active: int,
                      default_cap: int, owner: Principal | None) -> tuple[Refused, str] | None:
        """Whether a user (``principal``, with ``active`` sessions open) may open a session
        to ``name:port`` (lower-cased); None: yes, wait for its agent if it is away.
        ``owner`` is the agent the name is granted to (None: nobody)."""
        service = f"{name}:{port}"
        if principal is None:
            return Refused.PROHIBITED, "this key is no longer granted"
        if name in PUBLIC_BINDS:  # the registry's name for public ports: never over SSH
            return Refused.PROHIBITED, ("public ports are reached through their public "
                                        "listener only, not over SSH")
        if principal.kind != "user" or not principal.may_reach(name, port):
            return Refused.PROHIBITED, (f"{service} is not granted to {principal.kind} "
                                        f"{principal.name}")
        refused = self.over_cap(principal, active, default_cap)
        if refused is not None:
            return refused
        if self.registry.lookup(name, port) is None and not self.may_appear(owner, name, port):
            return Refused.NO_SERVICE, f"no service {service} on this relay"
        return None

    @staticmethod
    def over_cap(principal: Principal, active: int,
                 default_cap: int) -> tuple[Refused, str] | None:
        """The per-user cap: the user's own ``max-sessions``, else the relay's."""
        cap = principal.max_sessions or default_cap
        if active >= cap:
            # ``active`` exceeds ``cap`` after a lowered max-sessions (open sessions are
            # kept): say both, or the refusal names a count she does not have.
            limit = "max_sessions" if active == cap else f"max_sessions {cap}"
            return Refused.CAP, (f"user {principal.name} already has {active} sessions open "
                                 f"({limit})")
        return None

    @staticmethod
    def may_appear(owner: Principal | None, name: str, port: int) -> bool:
        """Whether ``name:port`` can ever be registered (by ``owner``, the agent its name
        is granted to): worth waiting for its agent."""
        return owner is not None and owner.may_register(name, port)

    def totals_name(self, owner: Principal | None, name: str, port: int) -> str:
        """The name ``name:port``'s sessions are counted under in the per-service totals
        (status, ``/metrics``): the service itself if its agent holds it now or its
        agent's grant names that port, else the agent's wildcard grant ``name:*``.

        A user granted ``name:*`` may ask for any of 65 535 ports; counting each under
        its own name would let her grow the totals (and ``/metrics``' label set) without
        bound, so the ports nobody registered or granted one by one share one name."""
        if self.registry.lookup(name, port) is not None or owner is None:
            return f"{name}:{port}"
        if any(g.name == name and g.port == port for g in owner.services):
            return f"{name}:{port}"
        return f"{name}:*"

    def ungranted_holder(self, name: str, port: int, session: AgentSession) -> Registration | None:
        """The holder of ``name:port`` (not ``session``) whose key no longer holds the
        grant: the shell drops it before the offer, so it can neither answer the takeover
        probe nor refuse the newcomer."""
        holder = self.registry.lookup(name, port)
        if holder is None or holder.session is session:
            return None
        return None if may_hold(self._principal_of(holder.session), holder) else holder

    def no_longer_held(self, session: AgentSession) -> list[Registration]:
        """The registrations ``session`` holds that its key's grants no longer allow."""
        principal = self._principal_of(session)
        return [r for r in self.registry.held_by(session) if not may_hold(principal, r)]

    # registration and takeover

    def offer(self, name: str, port: int, session: AgentSession, bind: str,
              now: float) -> Decision:
        """``session`` registers ``name:port`` (its claim was allowed)."""
        outcome, why = self.registry.offer(name, port, session)
        if outcome is Outcome.GRANTED:
            return self._register(name, port, session, bind, now)
        if outcome is Outcome.REFUSED:
            return Decision(Verdict.REFUSED, why)
        holder = self.registry.lookup(name, port)
        assert holder is not None
        return Decision(Verdict.PROBE, why, probe=Probe(name, port, bind, session, holder))

    def probe_answered(self, probe: Probe, now: float) -> Decision | None:
        """The holder answered the probe: it is alive, and keeps the name (unless its
        connection stopped meanwhile).  None: the probe was settled already."""
        if probe.settled:
            return None
        probe.settled = True
        if not self._connected(probe.holder.session):  # it died meanwhile: not an answer
            return self._again(probe, now)
        if not self._connected(probe.newcomer):
            return Decision(Verdict.GONE)
        return Decision(Verdict.REFUSED, f"{probe.why_alive} (answered a probe just now)")

    def probe_silent(self, probe: Probe, now: float) -> Decision | None:
        """The probe window closed, or the holder's connection stopped, with no answer:
        the newcomer takes the name over.  None: the probe was settled already."""
        if probe.settled:
            return None
        probe.settled = True
        current = self.registry.lookup(probe.name, probe.port)
        if not self._connected(probe.newcomer):
            return Decision(Verdict.GONE)
        if current is None or current.session is not probe.holder.session:
            return self._again(probe, now)
        decision = self._register(probe.name, probe.port, probe.newcomer, probe.bind, now)
        decision.verdict, decision.superseded = Verdict.TAKEOVER, probe.holder.session
        return decision

    def _again(self, probe: Probe, now: float) -> Decision:
        """Offer again after the holder went: whatever holds the name now decides."""
        if not self._connected(probe.newcomer):  # gone while we probed: register nothing
            return Decision(Verdict.GONE)
        outcome, why = self.registry.offer(probe.name, probe.port, probe.newcomer)
        if outcome is Outcome.GRANTED:
            return self._register(probe.name, probe.port, probe.newcomer, probe.bind, now)
        return Decision(Verdict.REFUSED, why)

    def _register(self, name: str, port: int, session: AgentSession, bind: str,
                  now: float) -> Decision:
        self.registry.register(name, port, session, bind, now)
        reg = self.registry.lookup(name, port)
        woken = self._waiters.pop((name, port), [])
        return Decision(Verdict.GRANTED, registration=reg, woken=woken)

    def cancel(self, bind: str, port: int, session: AgentSession) -> str | None:
        """``session`` cancels its forward: the registry name it held, or None."""
        name = PUBLIC if bind in PUBLIC_BINDS else bind.lower()
        return name if self.registry.unregister(name, port, session) else None

    def drop(self, reg: Registration) -> bool:
        """Forget ``reg`` (its grant went); False if it was not held any more."""
        return self.registry.unregister(reg.name, reg.port, reg.session)

    def drop_session(self, session: AgentSession) -> list[Registration]:
        """``session`` disconnected: what it held, now waiting for its agent."""
        return self.registry.drop_session(session)

    # waiters

    def wait(self, name: str, port: int, who: object, now: float, timeout: float) -> Waiter:
        """Note that ``who`` waits for ``name:port`` until ``now + timeout``."""
        waiter = Waiter(name, port, who, now + timeout)
        self._waiters.setdefault((name, port), []).append(waiter)
        return waiter

    def requeue(self, waiter: Waiter) -> None:
        """``waiter`` was woken by a registration that went before it was served: it
        waits for the next one (still until its own ``until``)."""
        waiters = self._waiters.setdefault((waiter.name, waiter.port), [])
        if waiter not in waiters:
            waiters.append(waiter)

    def unwait(self, waiter: Waiter) -> None:
        """``waiter`` stopped waiting (it was served, or gave up)."""
        waiters = self._waiters.get((waiter.name, waiter.port), [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop((waiter.name, waiter.port), None)

    def waiting(self, name: str, port: int) -> list[Waiter]:
        return list(self._waiters.get((name, port), []))

    def expired(self, now: float) -> list[Waiter]:
        """The waiters whose time is up as of ``now``, removed."""
        out = [w for ws in self._waiters.values() for w in ws if w.until <= now]
        for w in out:
            self.unwait(w)
        return out

