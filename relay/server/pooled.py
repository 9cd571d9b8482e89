"""A stock user's SSH channel to an end-to-end encrypted service, carried from the relay
to the agent on one of the agent's pooled data connections (issue 13).

``ssh -J alice@relay gpu-cluster`` and ``ssh -L 8888:gpu-cluster:22 alice@relay`` arrive
as ``direct-tcpip`` channels.  On the link they would be encrypted a second time (by the
relay) and decrypted again (by the agent) although their payload is the user's own
end-to-end encrypted stream.  For a service declared end-to-end encrypted
(``e2e_services``) whose agent keeps a fast-path pool, the relay instead dispatches one of
that agent's idle data connections exactly as the fast path does (a GO MAC'd with that
connection's ticket secret; the agent connects the target, answers ``K`` and splices),
and joins the user's channel to it with the one flow-controlled bridge
(:class:`relay.datapath.bridge.Bridge`): the relay decrypts the user's outer SSH layer
and writes the channel's bytes to the data connection, the agent moves them in its
splice pump.  A channel confirmed before the agent's answer (early confirmation) has
its first bytes written right behind the GO, not after the ``K``: the agent keeps what
it reads past the GO and hands it to the target first, so they no longer wait at the
relay for the answer (:func:`pooled_route`).

The same rules as the fast path: only what the relay lists as end-to-end encrypted *and*
the agent offered as such is ever written to a data connection, so a service that is not
declared end-to-end encrypted never touches one (tests/integration/test_stockpaths.py
watches every byte of every data connection).  A session never waits for the pool: with
no idle pooled connection, or one found dead, it takes the link as before.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.core.clock import expire
from relay.core.routing import Registration
from relay.core.sessions import CHANNEL, POOLED, SessionRow, SessionTable
from relay.datapath.bridge import Side, TCPSide
from relay.server.dataconn import AgentConnectionGone, DataState, PairingError
from relay.server.dataport import AGENT_REPLY_TIMEOUT, DataPort
from relay.ssh.channels import BridgedChannel
from relay.ssh.resumable import ResumableSessions

_log = Logger(namespace="relay.server.pooled")


class PooledShell(TypingProtocol):
    """What this needs of the relay (:class:`relay.server.relay.RelayCore`)."""

    @property
    def dataport(self) -> DataPort: ...

    @property
    def sessions(self) -> SessionTable: ...

    @property
    def resume(self) -> ResumableSessions: ...

    @property
    def connections(self) -> Collection[Any]: ...

    def abortSession(self, session: SessionRow, why: str) -> None:
        """Close ``session`` now (or as soon as it would start)."""

    def openToAgent(self, reg: Registration, port: int, origin: str,
                    session: SessionRow | None = None,
                    onPending: Callable[[BridgedChannel], object] | None = None,
                    ) -> defer.Deferred[BridgedChannel]:
        """A ``forwarded-tcpip`` channel on the agent's link."""


def pooled_route(dataport: DataPort, reg: Registration, port: int,
                 early: BridgedChannel | None = None) -> defer.Deferred[TCPSide] | None:
    """One of ``reg``'s agent's idle pooled data connections, dispatched to ``reg`` and
    answered ``K``, as a bridge side; or None: use the link (not declared end-to-end
    encrypted here, not offered as such by the agent, no pool, no idle connection now).

    ``early``: the user's channel, confirmed before the answer (relay.server.opening
    ``_openEarly``): what she sends meanwhile is written to the data connection right
    behind the GO (:class:`WriteAhead`, the channel's early sink), not held until ``K``;
    the channel must then be bridged to the side this returns, or, on failure, it stops
    sending and keeps the bytes (see below).  Her window stays bounded as when they were held: it
    re-opens for them only at the bridge.  Only the answer, ``K`` or ``E``, is read
    before the bridge exists, so nothing the agent sends is taken as the stream's (or
    handed to the native thread) before ``K``.

    Fails with PairingError if the agent could not connect the target (or did not
    answer within ``AGENT_REPLY_TIMEOUT``), AgentConnectionGone if the connection turned
    out dead.  Either way ``early`` stops sending first: the bytes written are gone with
    the connection, and the copies it holds go to the link (a dead connection: the agent
    never acted on the GO, or it would have answered ``K`` before anything else) or are
    dropped with the session."""
    if not dataport.enabled or dataport.listener is None or not dataport.e2e(reg.name, port):
        return None
    pool = dataport.pools.get(reg.session)
    if pool is None or (reg.bind.lower(), port) not in pool.spliceable:
        return None
    agent = pool.take_idle()
    if agent is None:
        return None
    d = expire(agent.dispatch(reg.bind, port), AGENT_REPLY_TIMEOUT, dataport.clock)
    if early is not None:
        early.sendHeldTo(WriteAhead(agent.writeAhead))

    def answered(_: str) -> TCPSide:
        agent.state = DataState.JOINED
        dataport.counters["pooled"] += 1
        side = TCPSide.adopt(agent.transport, agent.extra)
        # the user's bytes may be written by the native thread (relay.ssh.nativeforward)
        side.nativeStats = dataport.counters
        return side

    def failed(f: Failure) -> Failure:
        if early is not None:
            early.stopSending()
        if agent.state is not DataState.CLOSED:
            agent.transport.abortConnection()
        if f.check(defer.CancelledError):
            return Failure(PairingError(f"the agent did not answer within "
                                        f"{AGENT_REPLY_TIMEOUT:g}s"))
        return f

    return d.addCallbacks(answered, failed)


class WriteAhead:
    """Her channel's :class:`relay.datapath.bridge.EarlySink` on the pooled route: her
    held bytes written to the dispatched data connection (``write``, that is
    ``DataConnection.writeAhead``) as they arrive, right behind the GO, until ``K``.

    ``write`` returns whether the connection took the bytes whole (the kernel, not a
    buffer in this process); once it did not, nothing more is written before the
    answer, so this process holds her window's worth (in her channel) and at most one
    chunk more (in the connection's buffer)."""

    __slots__ = ("full", "sent", "write")

    def __init__(self, write: Callable[[bytes], bool]) -> None:
        self.write = write
        self.sent = 0  # the bytes written, from the first: the data connection has them
        self.full = False  # the last write was not taken whole: write no more

    def offer(self, data: bytes) -> None:
        """Write her next held chunk unless the connection is full."""
        if not self.full:
            self.full = not self.write(data)
            self.sent += len(data)

    def stop(self) -> int:
        """What was written: the data connection bridged at ``K`` has it already."""
        self.full = True
        return self.sent


def open_user_side(relay: PooledShell, reg: Registration, port: int, origin: str,
                   session: SessionRow,
                   onPending: Callable[[BridgedChannel], object] | None = None,
                   early: BridgedChannel | None = None) -> defer.Deferred[Side]:
    """The agent's side of a user's channel session: a pooled data connection when
    :func:`pooled_route` has one (session path ``pooled``; :func:`log_pooled` once the
    channel is open; ``early``, her channel confirmed now, pipes her bytes to it before
    the answer), else a channel on the agent's link (path ``channel``; given to
    ``onPending`` before the agent answers if it takes early bytes)."""
    pooled = pooled_route(relay.dataport, reg, port, early)
    if pooled is None:
        channel: defer.Deferred[Any] = relay.openToAgent(reg, port, origin, session,
                                                         onPending)
        return channel
    session.agent = reg.session
    session.path = POOLED

    def stale(f: Failure) -> Any:
        # The pooled connection was dead (the agent notices and replaces it): the link
        # carries this session.
        f.trap(AgentConnectionGone)
        session.path = CHANNEL
        return relay.openToAgent(reg, port, origin, session, onPending)

    return pooled.addErrback(stale)


def log_pooled(session: SessionRow) -> None:
    """``relay_pooled_session``: ``session`` is carried on a pooled data connection.
    Logged once the user's channel is open, that is after its confirmation left
    (relay.server.opening), not between the agent's ``K`` and the confirmation: a log
    line is a write to the log's pipe or file that wakes its reader, ~0.1-0.5 ms of an
    e2e session's set-up on a small machine (docs/benchmarks.md)."""
    _log.info("{user}: {service} carried on the agent's pooled data connection",
              event="relay_pooled_session", user=session.user, service=session.service,
              origin=session.origin)


def close_pooled(relay: PooledShell, agent: Any) -> None:
    """``agent``'s link ended: its pooled sessions follow the link's channels.  Where
    those end at once (``resume_grace = 0``, or an agent that did not say the resume
    hello), so do the pooled sessions.  Where they are held for resume, the pooled
    sessions' bytes ride their own TCP connections across the cut (as a fast-path
    session's do), and they end ``resume_grace`` seconds later only if the agent has not
    come back by then, when the held channels end too (docs/resilience.md)."""
    resume = relay.resume
    if not (getattr(agent, "resumable", False) and resume.enabled):
        _end_pooled(relay, agent, "its agent's link ended")
        return
    key = agent.identity.key_blob

    def expired() -> None:
        if not any(c.identity.key_blob == key for c in relay.connections):
            _end_pooled(relay, agent, f"its agent did not come back within "
                                      f"{resume.grace:g}s (resume_grace)")

    resume.clock.callLater(resume.grace, expired)


def _end_pooled(relay: PooledShell, agent: Any, why: str) -> None:
    for row in relay.sessions.pooled_of_agent(agent):
        _log.info("closing {user}'s pooled session to {service}: {why}",
                  event="relay_pooled_session_ended", user=row.user, service=row.service,
                  origin=row.origin, why=why)
        relay.abortSession(row, why)
