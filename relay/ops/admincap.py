"""Bounds on the admin endpoint's connections: how many, from whom, for how long.

The admin endpoint is a plain Twisted ``Site``: it took every connection it was offered
and kept each while bytes trickled in (Twisted's timer is an idle timer, 60 s, reset by
every byte).  Its answers are cheap, but every connection is a file descriptor of the
relay's process, and the SSH port, the data port and the public ports draw on the same
descriptors: a client that opened enough admin connections (a header byte every 50 s
each) left the relay unable to accept anyone (``EMFILE``), on every port, for as long
as it liked.  The admin port needs no handshake and no key, so whoever can reach it
(anyone on the network, with a non-loopback ``listen`` and a token) could do it
(docs/security.md, "The admin endpoint").

Now the endpoint holds at most :data:`MAX_CONNECTIONS` connections, at most
:data:`MAX_PER_SOURCE` from one address, each for at most :data:`LIFETIME` seconds
from its accept (a deadline, not an idle timer: trickling bytes does not extend it);
one past a cap is closed at accept, before a byte is read.  The operator's own address
(``127.0.0.1``, ``::1``) is not counted against the total, only against its own share.
``labrelay status``, a browser and a scraper need one or a few short connections.

A request's body is bounded too (:class:`BoundedRequest`): Twisted writes any body of
100 000 bytes or more, or of no stated length (chunked), to a temporary file, without
limit, before the resource (and the token check) sees the request, so one connection
could fill the relay host's disk.  No admin request needs a body: past
:data:`MAX_BODY` bytes the answer is ``413`` and the connection is closed.

The four numbers are the defaults of ``[admin]`` settings (``max_connections``,
``max_connections_per_source``, ``connection_lifetime``, ``max_body``;
:class:`relay.config.schema.AdminConfig`), bound when the node starts
(:func:`capped_site`, :func:`request_factory`).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Request

from relay.config.schema import AdminConfig
from relay.core.burstlog import BurstLog

MAX_CONNECTIONS = 32
"""Admin connections open at once, from everyone."""
MAX_PER_SOURCE = 8
"""Admin connections open at once from one address (a browser opens up to 6)."""
OPERATOR_SOURCES = frozenset({"127.0.0.1", "::1"})
"""The operator's own ``labrelay status`` and browser: not counted against
:data:`MAX_CONNECTIONS` (their own :data:`MAX_PER_SOURCE` still holds), so that others
filling the endpoint do not lock the operator out of it."""
LIFETIME = 30.0
"""Seconds an admin connection may stay open from its accept, whatever it sends: every
answer is computed at once, so an honest request is done in well under a second, and a
keep-alive scraper reconnects."""
IDLE_TIMEOUT = 10
"""Twisted's idle timer for the ``Site`` (its default is 60 s)."""
MAX_BODY = 64 * 1024
"""Bytes of a request body the admin endpoint reads (``POST /reload`` sends none)."""
REFUSAL_LOG_WINDOW = 10.0
"""Refusals are logged once per burst of this many seconds (relay.core.burstlog)."""


class AdminSlots:
    """Counts the admin connections open, in all and per source address; sans-IO.

    :meth:`take` says whether one more from ``source`` may open (and counts it),
    :meth:`give_back` forgets it.  Only sources with an open connection are kept."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_source: int = MAX_PER_SOURCE) -> None:
        self.max_total = total
        self.max_per_source = per_source
        self.open = 0
        self.by_source: dict[str, int] = {}
        self.refused = 0

    def refusal(self, source: str) -> str | None:
        """Why one more connection from ``source`` may not open now, or None."""
        if self.open >= self.max_total and source not in OPERATOR_SOURCES:
            return f"{self.open} admin connections open (at most {self.max_total})"
        held = self.by_source.get(source, 0)
        if held >= self.max_per_source:
            return f"{held} admin connections open from {source} (at most {self.max_per_source})"
        return None

    def take(self, source: str) -> str | None:
        """Count a new connection from ``source``; or why it is refused (not counted
        as open, counted in :attr:`refused`)."""
        why = self.refusal(source)
        if why is not None:
            self.refused += 1
            return why
        self.open += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return None

    def give_back(self, source: str) -> None:
        self.open -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]


class _Bounded(ProtocolWrapper):
    """One admitted admin connection: closed at its deadline, its slot given back when
    it ends."""

    factory: Any  # the CappedFactory

    def __init__(self, factory: Any, wrapped: Protocol, source: str) -> None:
        super().__init__(factory, wrapped)
        self.source = source
        self._deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._deadline = self.factory.clock.callLater(self.factory.lifetime, self._expired)
        super().makeConnection(transport)

    def _expired(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        call, self._deadline = self._deadline, None
        if call is not None and call.active():
            call.cancel()
        self.factory.slots.give_back(self.source)
        super().connectionLost(reason)


class CappedFactory(WrappingFactory):
    """Wraps the admin ``Site``: a connection past :class:`AdminSlots`' caps is closed
    at accept (``buildProtocol`` returns None, so Twisted closes it before reading), one
    let in is closed ``lifetime`` seconds after its accept."""

    _log = Logger()
    noisy = False
    protocol = _Bounded  # type: ignore[assignment]

    def __init__(self, site: Any, clock: Any, slots: AdminSlots | None = None,
                 lifetime: float = LIFETIME) -> None:
        super().__init__(site)
        self.clock = clock
        self.slots = slots if slots is not None else AdminSlots()
        self.lifetime = lifetime
        self.refusals = BurstLog(clock, REFUSAL_LOG_WINDOW, self._firstRefusal,
                                 self._moreRefusals)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        source = str(getattr(addr, "host", addr))
        why = self.slots.take(source)
        if why is not None:
            self.refusals.failed(why)
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            self.slots.give_back(source)
            return None
        return self.protocol(self, wrapped, source)

    def stopFactory(self) -> None:
        self.refusals.stop()
        super().stopFactory()

    def _firstRefusal(self, why: str) -> None:
        self._log.warn("admin endpoint: connection refused at accept: {why}",
                       event="admin_connection_refused", why=why)

    def _moreRefusals(self, count: int, why: str) -> None:
        self._log.warn("admin endpoint: {count} more connections refused at accept in the "
                       "last {window}s (last: {why})", event="admin_connection_refused_burst",
                       count=count, window=REFUSAL_LOG_WINDOW, why=why)


class BoundedRequest(Request):
    """A ``Request`` whose body is kept in memory up to :data:`MAX_BODY` bytes; past
    that (stated or sent) the peer is answered ``413`` and the connection closed."""

    maxBody = MAX_BODY
    _bodyBytes = 0
    _tooLarge = False

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()  # never Twisted's temporary file
        if length is not None and length > self.maxBody:
            self._refuseBody()

    def handleContentChunk(self, data: bytes) -> None:
        if self._tooLarge:
            return
        self._bodyBytes += len(data)
        if self._bodyBytes > self.maxBody:
            self._refuseBody()
            return
        super().handleContentChunk(data)

    def _refuseBody(self) -> None:
        self._tooLarge = True
        transport: Any = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
                        b"Content-Length: 0\r\n\r\n")
        transport.loseConnection()


def request_factory(max_body: int = MAX_BODY) -> type[BoundedRequest]:
    """The admin ``Site``'s request class, reading bodies up to ``max_body`` bytes."""
    if max_body == MAX_BODY:
        return BoundedRequest
    return type("BoundedRequest", (BoundedRequest,), {"maxBody": max_body})


def capped_site(site: Any, clock: Any, config: AdminConfig | None = None) -> CappedFactory:
    """The admin ``site`` behind the caps (``config``'s, else the defaults), as the
    admin listener's factory."""
    if config is None:
        return CappedFactory(site, clock)
    return CappedFactory(site, clock,
                         AdminSlots(config.max_connections, config.max_connections_per_source),
                         config.connection_lifetime)

