"""Early confirmation of a user's channel: when the relay may confirm it before the agent.

A stock user's ``direct-tcpip`` (``ssh -L``, ``ssh -J``) is answered, by default, only
once the agent answered the relay's own open: the user's first bytes then leave after a
relay -> user -> relay crossing that comes after the agent's answer.  The seed's chain
(a cloud sshd and ``ssh -R``) confirms at once and lets the first bytes travel while its
far side is still opening; the relay does the same (``[relay] early_confirm``) for a
service whose agent is connected *and* whose last open succeeded, so a user is almost
never shown an open that then closes.  This module is that decision, sans-IO: each
registration's open health (:class:`OpenHealth`, kept on its
:class:`relay.core.routing.Registration`, so it goes with the registration) and a
session's phase while it is confirmed but not yet bridged (:class:`EarlyPhase`).
"""

from __future__ import annotations

from enum import Enum


class OpenHealth(Enum):
    """How the last open of a registration's sessions went (at the agent)."""

    UNKNOWN = "unknown"
    """No open answered yet (a fresh registration): confirm after the agent."""
    HEALTHY = "healthy"
    """The last open succeeded: confirm at once."""
    FAILING = "failing"
    """The last open failed: confirm after the agent until an open succeeds, so the
    user of a service that is down sees the client's "open failed" message."""


def after_open(health: OpenHealth, succeeded: bool) -> OpenHealth:
    """The health once an open of the registration's service was answered."""
    del health  # only the last answer counts (a failure is never averaged away)
    return OpenHealth.HEALTHY if succeeded else OpenHealth.FAILING


def confirms_early(enabled: bool, health: OpenHealth, agent_live: bool) -> bool:
    """Whether a user's admitted channel is confirmed before its agent answered."""
    return enabled and agent_live and health is OpenHealth.HEALTHY


class EarlyPhase(Enum):
    """An early-confirmed session between its confirmation and its bridge."""

    HOLDING = "holding"
    """Confirmed; the user's bytes wait (within the channel's window) for the agent."""
    BRIDGED = "bridged"
    """The agent's side opened: the held bytes went to it, the bridge carries the rest."""
    CLOSED = "closed"
    """The agent's side failed, or the relay ended the session (the user's channel is
    closed: EOF and close), or the user closed her channel first; the agent's side is
    aborted if it opens later."""


class EarlySession:
    """The phase of one early-confirmed session (its shell acts on what each event
    returns: True means "do it", False "too late, undo what arrived")."""

    __slots__ = ("phase", "why")

    def __init__(self) -> None:
        self.phase = EarlyPhase.HOLDING
        self.why = ""

    def agent_opened(self) -> bool:
        """The agent's side is open: bridge it (True) or abort it (False: closed)."""
        if self.phase is EarlyPhase.HOLDING:
            self.phase = EarlyPhase.BRIDGED
            return True
        return False

    def end(self, why: str) -> bool:
        """The agent failed or the relay ends the session: close the user's channel
        (True) unless it is already bridged or closed (False: the bridge ends it)."""
        if self.phase is EarlyPhase.HOLDING:
            self.phase, self.why = EarlyPhase.CLOSED, why
            return True
        return False

    def user_closed(self) -> bool:
        """The user's channel closed before the bridge existed: end the session now
        (True: its row must not wait for an agent that may answer late, or never)
        unless it is already bridged or closed (False: the bridge, or whoever closed
        it, ends it)."""
        if self.phase is EarlyPhase.HOLDING:
            self.phase, self.why = EarlyPhase.CLOSED, "user closed"
            return True
        return False
