"""The relay's end of resumable sessions (docs/resilience.md).

A labrelay agent says ``resume@labrelay`` first on every link; the relay answers with
its instance id (new at every start: an agent that finds another one knows the relay
restarted and nothing it held can be resumed) and from then on opens that agent's
sessions as ``forwarded-resumable@labrelay``, which :mod:`relay.ssh.resumable` holds
when the link breaks and resumes over the next one.  The agent's hello carries its own
instance id: sessions its key's *previous* process left held cannot come back, so they
are reset at once instead of waiting out the grace period.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from relay.core.resume import ResumeOwner, pack_hello_reply, unpack_hello
from relay.core.routing import PUBLIC
from relay.ssh.resumable import ResumableSessions, ResumableSide
from relay.ssh.server import RelayConnection, resume_owner


class RelayResumes:
    """The relay's resumable sessions, its instance id and the agents' hellos."""

    _log = Logger()

    def __init__(self, reactor: Any, grace: float,
                 retag: Callable[[ResumableSide, str], object] | None = None,
                 principal_for: Callable[[bytes, str | None], Any] | None = None) -> None:
        self.grace = grace
        self._retag = retag  # the fair share's tag for an agent channel (server.sharing)
        self._principal_for = principal_for  # the grants' look-up (relay.server.grants)
        self.sessions = ResumableSessions(reactor, grace, "relay", on_resumed=self._resumed,
                                          vet=self._still_granted)
        self.instance = secrets.token_bytes(16)

    def hello(self, conn: RelayConnection, data: bytes) -> Any:
        """``resume@labrelay`` from ``conn``: the reply, or False (not resumable)."""
        if not self.sessions.enabled or conn.identity.kind != "agent":
            return False
        try:
            _version, instance = unpack_hello(data)
        except ValueError:
            return False
        conn.resumable, conn.agent_instance = True, instance
        me = resume_owner(conn.identity, instance)
        for side in self.sessions.held_sides():
            owner = _owner(side)
            if owner is not None and owner.instance != instance and owner.same_agent(me):
                # The relay cannot tell a restart from a second process running with
                # the same key (a standby): either way the held session's other end is
                # not this process's, and the log says both (docs/resilience.md).  The
                # same certificate logged in under another name is another agent, not
                # this one's restart: its sessions wait for their own agent.  A renewed
                # certificate of the same key is the same agent.
                why = "its agent restarted, or another agent with its key connected"
                self._log.warn(
                    "agent {agent}: session {label} cannot be resumed: {why}",
                    event="session_resume_refused", where="relay", agent=conn.principal_name,
                    label=side.label, why=why)
                side.refused(why)
        return True, pack_hello_reply(self.instance, self.grace)

    def agent_left(self, conn: RelayConnection) -> None:
        """``conn``'s agent disconnected on purpose (it is stopping): the sessions held
        for it end now, with a reset, instead of leaving their users' connections
        stalled for ``resume_grace`` and then reset all the same."""
        for side in self.sessions.held_sides():
            if side.row is not None and side.row.agent is conn:
                self._log.warn(
                    "agent {agent}: session {label} cannot be resumed: its agent stopped",
                    event="session_resume_refused", where="relay", agent=conn.principal_name,
                    label=side.label, why="its agent stopped")
                side.refused("its agent stopped")

    def held_for(self, conn: RelayConnection) -> int:
        """How many sessions are held whose agent connection was ``conn``."""
        return sum(1 for s in self.sessions.held_sides()
                   if s.row is not None and s.row.agent is conn)

    def no_longer_granted(self, looked: Mapping[bytes, bool],
                          principal_for: Callable[[bytes, str | None], Any]
                          ) -> list[tuple[Any, str]]:
        """Held sessions whose agent key lost the grant for their service (or every
        grant): ``(session row, why)`` each, for the relay to close.  ``looked``: the
        keys a reload may have taken something from, each with whether it lost
        everything.  A held session has no registration left to drop (its agent's
        connection is gone), so a reload that narrows an agent's grants must find them
        here, or the agent would resume a session to a service it may no longer serve
        (docs/security.md).  Each is looked up as the login its agent made (a
        certificate's grants depend on it)."""
        out = []
        for side in self.sessions.held_sides():
            owner = _owner(side)
            everything = looked.get(owner.key) if owner is not None else None
            if everything is None or owner is None or side.row is None \
                    or side.row.closing is not None:
                continue
            principal = None if everything else principal_for(owner.key, owner.login or None)
            if principal is not None and _grants(principal, side.row.service):
                continue
            why = ("its agent's key is no longer granted" if principal is None
                   else f"{side.row.service} is no longer granted to agent {principal.name}")
            out.append((side.row, why))
        return out

    def held_holders(self) -> set[tuple[bytes, str]]:
        """The agent keys sessions are held for (their links are down), each with the
        login it made ("" for a plain key): what the key checks look up, per login, as
        they do a connected agent's (relay.server.expiry)."""
        return {(owner.key, owner.login) for owner in map(_owner, self.sessions.held_sides())
                if owner is not None}

    def held_rows_of(self, key_blob: bytes, login: str | None = None) -> list[Any]:
        """The session rows held for agent key ``key_blob`` (it expired or was revoked:
        its agent cannot resume them); with ``login``, only those its agent opened
        logged in under that name (a certificate no longer usable as one login may
        still be as another, and that agent's held sessions are its own)."""
        out = []
        for side in self.sessions.held_sides():
            owner = _owner(side)
            if side.row is not None and owner is not None and owner.key == key_blob \
                    and (login is None or owner.login == login):
                out.append(side.row)
        return out

    def status(self) -> list[dict[str, Any]]:
        """The held sessions (:meth:`ResumableSessions.status`), each with the agent it
        is held for and the login that agent made ("" for a plain key): for a
        certificate, the login whose grants it is checked against while its link is
        down, and the one that may resume it."""
        out = []
        for side, shown in zip(self.sessions.held_sides(), self.sessions.status(),
                               strict=True):
            owner, agent = _owner(side), getattr(side.row, "agent", None)
            out.append({**shown, "agent": getattr(agent, "principal_name", ""),
                        "login": owner.login if owner is not None else ""})
        return out

    def _still_granted(self, side: ResumableSide, owner: object) -> str | None:
        """Why ``owner`` (the agent offering to resume ``side``) may not have it back, or
        None.  Its key's grants were kept in step while the session was held
        (:meth:`no_longer_granted`), but a renewed certificate
        (relay.core.resume.may_resume) carries grants of its own: its ``name:port``
        principals may name fewer services than the one the session was opened under.
        The same owner is not looked up again: a certificate's look-up verifies its
        signature, and an agent back from a cut may resume a hundred sessions at once."""
        row = side.row
        if self._principal_for is None or row is None or not isinstance(owner, ResumeOwner) \
                or side.stream.owner == owner:
            return None
        principal = self._principal_for(owner.key, owner.login or None)
        if principal is not None and _grants(principal, row.service):
            return None
        return (f"{row.service} is not granted to agent "
                f"{principal.name if principal is not None else owner.login}")

    def _resumed(self, side: ResumableSide) -> None:
        """A session continues over its agent's new connection: its row follows, and
        the new channel is scheduled as its user's again, here and at the agent."""
        row = side.row
        if row is not None and side.channel is not None:
            row.agent = side.channel.conn
            if self._retag is not None and row.user:
                self._retag(side, row.user)


def _grants(principal: Any, service: str) -> bool:
    """Whether ``principal`` may serve ``service`` (a session row's: ``NAME:PORT``, or
    ``public:PORT``)."""
    name, _, port = service.rpartition(":")
    return bool(principal.may_bind_public(int(port)) if name in (PUBLIC, "public")
                else principal.may_register(name, int(port)))


def _owner(side: ResumableSide) -> ResumeOwner | None:
    """Who may resume ``side``: ``(agent key, agent instance, login)``, as
    :attr:`relay.ssh.server.RelayConnection.resumeOwner` made it (None: not the
    relay's; a test's or fuzzer's side)."""
    owner: Any = side.stream.owner
    return owner if isinstance(owner, ResumeOwner) else None
