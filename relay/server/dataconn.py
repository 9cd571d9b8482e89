"""One connection to the relay's data port (:class:`DataConnection`: the challenge,
the hello, an agent's idle pooled connection and its GO) and an agent's pool of them
(:class:`AgentPool`); :class:`relay.server.dataport.DataPort` decides what becomes of
each.  The wire format is in :mod:`relay.core.fastwire`."""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from relay.core import fastwire as fw
from relay.core.admission import Offence
from relay.core.admission import Ticket as AdmissionTicket
from relay.core.clock import expire
from relay.core.peertext import shown
from relay.core.tokens import Ticket
from relay.datapath.handoff import Handoff
from relay.datapath.net import unsent, write_now


class DataPortHandler(TypingProtocol):
    """What a :class:`DataConnection` needs of its data port
    (:class:`relay.server.dataport.DataPort`)."""

    clock: Any
    hello_timeout: float

    def admit(self, dc: DataConnection) -> bool: ...

    def refuse(self, dc: DataConnection, what: str, why: str, *,
               failure: bool | Offence = ..., tell: str | None = ...) -> None: ...

    def helloStarted(self, dc: DataConnection) -> None: ...

    def helloReceived(self, dc: DataConnection, hello: fw.Hello) -> None: ...

    def lost(self, dc: DataConnection, was: DataState) -> None: ...


class PairingError(Exception):
    """Why a user's data connection was not paired (sent to the user)."""


class AgentConnectionGone(PairingError):
    """The agent's data connection closed before it answered GO (a stale one: try
    another)."""


@dataclass(eq=False)
class AgentPool:
    """The idle data connections one agent session dialled, and who waits for one."""

    session: Any
    spliceable: set[tuple[str, int]]
    idle: deque[DataConnection] = field(default_factory=deque)
    waiters: deque[defer.Deferred[DataConnection]] = field(default_factory=deque)

    def put(self, conn: DataConnection) -> None:
        while self.waiters:
            d = self.waiters.popleft()
            if not d.called:
                d.callback(conn)
                return
        self.idle.append(conn)

    def take_idle(self) -> DataConnection | None:
        """An idle connection now, or None (nobody waits)."""
        while self.idle:
            conn = self.idle.popleft()
            if conn.state is DataState.IDLE:
                return conn
        return None

    def take(self, clock: Any, timeout: float) -> defer.Deferred[DataConnection]:
        while self.idle:
            conn = self.idle.popleft()
            if conn.state is DataState.IDLE:
                return defer.succeed(conn)
        d: defer.Deferred[DataConnection] = defer.Deferred()
        self.waiters.append(d)
        return expire(d, timeout, clock)

    def close(self) -> None:
        for conn in list(self.idle):
            conn.transport.loseConnection()
        self.idle.clear()
        while self.waiters:
            d = self.waiters.popleft()
            if not d.called:
                d.errback(PairingError("the agent disconnected"))


class DataState(StrEnum):
    """A connection to the data port: ``HELLO`` -> ``USER`` or ``IDLE`` ->
    ``DISPATCHED`` -> ``SPLICED`` (or ``JOINED``: an agent's answered for a user's SSH
    channel, its transport now a bridge side, :mod:`relay.server.pooled`); any ->
    ``CLOSED``."""

    HELLO = "hello"  # challenge sent, collecting the hello
    USER = "user"  # a user's, paused, waiting to be paired
    IDLE = "idle"  # an agent's pooled connection, read only to notice its end
    DISPATCHED = "dispatched"  # an agent's, sent a GO, waiting for K/E
    SPLICED = "spliced"
    JOINED = "joined"  # an agent's, answered for a user's SSH channel: a bridge side now
    CLOSED = "closed"


class DataConnection(Handoff):
    """One connection to the data port, until it is spliced or closed (:class:`DataState`)."""

    def __init__(self, port: DataPortHandler) -> None:
        super().__init__()
        self.port = port
        self.state = DataState.HELLO
        self.source = "?"
        self.pool: AgentPool | None = None
        self.reply: defer.Deferred[str] | None = None
        self._timer: IDelayedCall | None = None
        self.admission: AdmissionTicket | None = None  # from DataPort.admit
        self.nonce = b""  # this connection's challenge: what its hello must prove over
        self.ticket: Ticket | None = None  # once proved: its secret keys the GO's MAC

    def prefaceStarted(self) -> None:
        peer = self.transport.getPeer()
        self.source = str(getattr(peer, "host", "?"))
        if not self.port.admit(self):
            self.state = DataState.CLOSED
            self.transport.abortConnection()
            return
        self._timer = self.port.clock.callLater(self.port.hello_timeout, self._helloTimeout)
        self.nonce = secrets.token_bytes(fw.NONCE_LEN)
        write_now(self.transport, (fw.challenge(self.nonce),))

    def evict(self) -> None:
        """The admission gate dropped this connection, still owing its hello, to make
        room for a source holding fewer places (relay.core.admission; counted and
        logged by the port, no penalty): closed at once."""
        if self.state is not DataState.HELLO:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.state = DataState.CLOSED
        self.transport.abortConnection()

    def _helloTimeout(self) -> None:
        self._timer = None
        self.port.refuse(self, "no hello", f"did not send its hello within "
                         f"{self.port.hello_timeout:g}s", failure=Offence.GRACE)

    def prefaceReceived(self) -> None:
        if self.state is DataState.HELLO:
            try:
                length = fw.hello_length(self.buf)
            except fw.WireError as e:
                self.port.refuse(self, "not a data connection", str(e),
                                 failure=Offence.PROTOCOL)
                return
            if length is None or len(self.buf) < length:
                if self.buf:
                    self.port.helloStarted(self)
                return
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            hello = self.buf[:length]
            self.hold(self.buf[length:])
            self.port.helloReceived(self, fw.parse_hello(hello))
        elif self.state is DataState.IDLE:
            self.port.refuse(self, "protocol", "an idle agent data connection sent bytes")
        elif self.state is DataState.DISPATCHED:
            try:
                parsed = fw.parse_reply(self.buf, fw.AGENT_OK, fw.AGENT_ERROR)
            except fw.WireError as e:
                self._answered(Failure(PairingError(f"the agent answered nonsense: {e}")))
                return
            if parsed is None:
                return
            ok, message, rest = parsed
            self.hold(rest)
            # Its words reach the user (the data port's error byte): printable only.
            self._answered(message if ok else Failure(PairingError(
                f"the agent could not connect the service: {shown(message)}")))

    def _answered(self, result: Any) -> None:
        d, self.reply = self.reply, None
        if d is not None and not d.called:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def dispatch(self, bind: str, port: int) -> defer.Deferred[str]:
        """Send GO to this idle agent connection, MAC'd with its ticket's secret and
        bound to its ticket id and nonce; fires once the agent answers."""
        assert self.ticket is not None
        self.state = DataState.DISPATCHED
        self.reply = defer.Deferred()
        mac = fw.go_mac(self.ticket.secret, self.ticket.token_id, self.nonce, bind, port)
        # At once, not a reactor turn later (after the rest of the user's open and an
        # epoll_wait): ~0.3 ms of an e2e session's set-up (docs/benchmarks.md).
        write_now(self.transport, (fw.pack_go(bind, port, mac),))
        self.resume()
        return self.reply

    def writeAhead(self, data: bytes) -> bool:
        """Bytes of the stream a GO opened, written before the agent's answer (the
        pooled route's pipelining, relay.server.pooled): they follow the GO on the wire,
        the agent keeps what it reads past the GO (``PoolConnection.prefaceReceived``)
        and hands them to the target first, once it is connected.  Nothing is read as
        the stream's here until ``K`` was read.  Dropped once the connection is closed
        or closing: the session then ends, or takes the link, whose channel still holds
        them (``BridgedChannel.stopSending``).

        Returns whether nothing waits for this connection in Twisted's buffer now (the
        kernel took everything): the caller writes no more ahead of the answer when it
        does, so its copies and this buffer do not both hold her window."""
        if (self.state not in (DataState.DISPATCHED, DataState.JOINED)
                or self.transport.disconnecting):
            return False
        write_now(self.transport, (data,), limit=None)
        return unsent(self.transport) == 0

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        was, self.state = self.state, DataState.CLOSED
        self.port.lost(self, was)
        self._answered(Failure(AgentConnectionGone("the agent's data connection closed")))
