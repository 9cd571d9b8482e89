"""The ways to reach a relay, in order, and the one that worked last (docs/networks.md).

A :class:`Route` is one way: SSH straight to ``host:port`` (``tcp``), SSH inside TLS to
``host:tls_port`` (``tls``), or either through an HTTP proxy.  ``routes(config)`` lists
them for a link's :class:`~relay.config.schema.TransportConfig`: one for ``tcp`` or
``tls`` (through the proxy if one is set), and for ``auto`` plain SSH, then TLS, then
TLS through the proxy.

A :class:`Dialer` is what the agent's ``ClientService`` and ``labrelay connect`` dial
with: its :meth:`Dialer.connect` (an ``IStreamClientEndpoint``) connects the route
to try now, logs the attempt and tags the protocol with it (``transport_route``).
Whether the route *worked* is known only once the SSH link is up (a port may accept
TCP and then never speak SSH), so the owner reports :meth:`worked` or :meth:`failed`:
a failure moves on to the next route, and the next reconnect starts with the route
that worked last.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.config.schema import ALPN_SSH, LinkConfig, ProxyURL
from relay.core.httpconnect import proxy_from_env
from relay.datapath.net import client_endpoint
from relay.transport import explain
from relay.transport.proxy import ConnectProxyEndpoint
from relay.transport.tlsclient import client_creator


@dataclass(frozen=True)
class Route:
    """One way to the relay."""

    tls: bool
    host: str
    port: int
    proxy: ProxyURL | None = None

    @property
    def direct(self) -> bool:
        """A plain TCP connection to the relay itself: the fast path's data port is
        reachable the same way (at the peer's address)."""
        return not self.tls and self.proxy is None

    def __str__(self) -> str:
        kind = "tls" if self.tls else "tcp"
        via = f" via proxy {self.proxy}" if self.proxy is not None else ""
        return f"{kind} {self.host}:{self.port}{via}"


def routes(cfg: LinkConfig, env: Mapping[str, str] | None = None) -> list[Route]:
    """The routes of ``cfg`` in the order they are tried."""
    t = cfg.transport
    proxy = t.proxy
    if proxy is None and t.proxy_from_env:
        proxy = proxy_from_env(os.environ if env is None else env, cfg.host)
    if t.mode == "tcp":
        return [Route(False, cfg.host, cfg.port, proxy)]
    if t.mode == "tls":
        return [Route(True, cfg.host, t.tls_port, proxy)]
    found = [Route(False, cfg.host, cfg.port), Route(True, cfg.host, t.tls_port)]
    if proxy is not None:
        found.append(Route(True, cfg.host, t.tls_port, proxy))
    return found


def endpoint(reactor: Any, cfg: LinkConfig, route: Route, *,
             alpn: str = ALPN_SSH, port: int | None = None) -> IStreamClientEndpoint:
    """The endpoint of ``route`` (``port`` and ``alpn`` instead of the route's and SSH's,
    for another connection the same way)."""
    target = route.port if port is None else port
    inner: Any
    if route.proxy is not None:
        inner = ConnectProxyEndpoint(reactor, route.proxy, route.host, target,
                                     cfg.connect_timeout)
    else:
        inner = client_endpoint(reactor, route.host, target, cfg.connect_timeout)
    if not route.tls:
        return inner  # type: ignore[no-any-return]
    return wrapClientTLS(client_creator(cfg.transport, cfg.host, alpn), inner)


class Dialer:
    """The routes of one link and which to try next."""

    log = Logger()

    def __init__(self, reactor: Any, cfg: LinkConfig, *, label: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.label = label or cfg.name
        self.routes = routes(cfg, env)
        self.index = 0  # the route the next attempt takes
        self.last: Route | None = None  # the route of the latest attempt
        self.winner: Route | None = None  # the route of the latest ready link

    @property
    def current(self) -> Route:
        return self.routes[self.index]

    def connect(self, factory: IProtocolFactory, *, tries: int | None = None,
                errors: list[str] | None = None) -> defer.Deferred[IProtocol]:
        """Connect the current route; a TCP/proxy failure moves on at once to the next
        route (up to ``tries`` routes: one round by default), a later failure is for
        :meth:`failed`.  Each route that failed adds ``"ROUTE: why"`` to ``errors``
        (the caller's list, to say every route's fate once: :func:`open_connection`)."""
        return self._try(factory, len(self.routes) if tries is None else tries,
                         [] if errors is None else errors)

    def _try(self, factory: IProtocolFactory, left: int,
             errors: list[str]) -> defer.Deferred[IProtocol]:
        route = self.current
        self.last = route
        self.log.info("link {link}: trying {route} ({n}/{of})", event="link_attempt",
                      link=self.label, route=str(route), n=self.index + 1,
                      of=len(self.routes))
        d = endpoint(self.reactor, self.cfg, route).connect(factory)

        def connected(proto: IProtocol) -> IProtocol:
            # ClientService hands us a proxy of the protocol its factory built; the
            # tag goes on the protocol itself (the proxy forwards attribute reads).
            inner: Any = proto
            while "_protocol" in getattr(inner, "__dict__", {}):
                inner = inner.__dict__["_protocol"]
            inner.transport_route = route
            return proto

        def unreachable(f: Any) -> Any:
            if f.check(defer.CancelledError, neterror.ConnectingCancelledError):
                # The process is stopping (ClientService cancels the attempt): not a
                # route's failure, and Twisted's text for it is the address's repr.
                return f
            why = explain.unreachable(f.value, host=route.host, port=route.port,
                                      tls=route.tls, timeout=self.cfg.connect_timeout)
            self.log.warn("link {link}: {route} failed: {reason}", event="link_route_failed",
                          link=self.label, route=str(route), reason=why)
            errors.append(f"{route}: {why}")
            if len(self.routes) == 1:
                return f
            if left <= 1:
                return Failure(ConnectionError("every route failed: " + "; ".join(errors)))
            self._advance()
            return self._try(factory, left - 1, errors)

        return d.addCallbacks(connected, unreachable)

    def _advance(self) -> None:
        self.index = (self.index + 1) % len(self.routes)

    def worked(self, route: Route) -> None:
        """The link came up over ``route``: the next reconnect starts there."""
        if route in self.routes:
            self.index = self.routes.index(route)
        if self.winner != route and len(self.routes) > 1:
            self.log.info("link {link}: {route} works; reconnects start with it",
                          event="link_route_chosen", link=self.label, route=str(route))
        self.winner = route

    def failed(self, route: Route | None, why: str) -> None:
        """An attempt over ``route`` connected but did not become a link: the next
        attempt takes the next route."""
        if route is None or len(self.routes) == 1:
            return
        self.log.warn("link {link}: {route} failed: {reason}", event="link_route_failed",
                      link=self.label, route=str(route), reason=why)
        if route == self.current:
            self._advance()


def route_of(proto: Any) -> Route | None:
    """The route a connected protocol (an SSH client transport) took, if a Dialer made it."""
    route = getattr(proto, "transport_route", None)
    return route if isinstance(route, Route) else None
