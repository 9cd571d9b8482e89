"""Grant decisions: who a principal is and what it may do (sans-IO).

:class:`Principal` is what the relay knows of an agent or a user after authentication;
its ``may_*`` methods are the whole authorization decision.  :mod:`relay.server.grants`
builds principals from the config and grant files (and reloads them); the SSH server
(:mod:`relay.ssh.server`) carries the principal a key authenticated as.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import ServiceGrant

AGENT = "agent"
USER = "user"

PUBLIC_PORT_NAMES = frozenset(
    {"", "*", "0.0.0.0", "::", "[::]", "localhost", "127.0.0.1", "::1", "[::1]"}
)
"""Names a ``tcpip-forward`` bind turns into a public-port registration (a superset of
``relay.core.routing.PUBLIC_BINDS``).  They never name a service, so no user grant, not
even ``*``, reaches them: a public port is reached through its public listener only."""


@dataclass(frozen=True)
class Principal:
    """An agent or a user as the relay sees it after authentication.

    ``max_sessions`` is a user's cap on concurrent sessions: its own grant, else the
    relay's ``max_sessions_per_user``; always None for agents.  ``share``,
    ``rate_limit`` and ``rate_burst`` are how a user's bytes are scheduled on a
    congested link and limited (:mod:`relay.core.fairshare`, :mod:`relay.core.ratelimit`)."""

    kind: str  # "agent" | "user"
    name: str
    services: tuple[ServiceGrant, ...]
    public_ports: frozenset[int]
    max_sessions: int | None
    share: float = 1.0
    rate_limit: int | None = None
    rate_burst: int | None = None

    def may_register(self, name: str, port: int) -> bool:
        """Whether this agent may register the service ``name:port`` (``tcpip-forward``)."""
        return self.kind == AGENT and self._granted(name, port)

    def may_reach(self, name: str, port: int) -> bool:
        """Whether this user may open a session to ``name:port`` (``direct-tcpip`` or a
        fast-path token).  Never to a public port's registration (see
        :data:`PUBLIC_PORT_NAMES`), whatever the grant says."""
        return (self.kind == USER and name.lower() not in PUBLIC_PORT_NAMES
                and self._granted(name, port))

    def may_bind_public(self, port: int) -> bool:
        """Whether this agent may have the relay listen on public port ``port``."""
        return self.kind == AGENT and port in self.public_ports

    def _granted(self, name: str, port: int) -> bool:
        if not 1 <= port <= 65535:
            return False
        lowered = name.lower()
        return any(grant.matches(lowered, port) for grant in self.services)
