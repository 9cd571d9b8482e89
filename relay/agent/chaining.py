"""Chaining: what the agent needs of the relay running in the same node.

A node that runs both an agent and a relay can offer, upstream, a service registered
at its own relay (a forward with ``via_relay``).  The node hands its agent's links the
relay as a :class:`LocalRelay`; the agent knows it only through this interface, so
nothing in ``relay.agent`` imports ``relay.server``.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer

from relay.ssh.channels import BridgedChannel


class LocalDataPort(Protocol):
    """The local relay's data port, as the chaining agent's data pool uses it."""

    def spliceable(self, name: str, port: int) -> bool:
        """Whether :meth:`pairLocal` can serve ``name:port``."""

    def pairLocal(self, name: str, port: int) -> defer.Deferred[Any]:
        """A data connection of ``name:port``'s agent, answered ``K``: fires with an
        object carrying ``transport`` and ``extra`` (bytes read past the answer)."""


class LocalRelay(Protocol):
    """The relay of this node, as its agent's links use it."""

    @property
    def dataport(self) -> LocalDataPort: ...

    def openLocal(self, name: str, port: int, origin: str) -> defer.Deferred[BridgedChannel]:
        """An SSH-path session to ``name:port`` registered at this relay."""
