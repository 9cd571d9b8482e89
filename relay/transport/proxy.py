"""An endpoint through an HTTP proxy: TCP to the proxy, ``CONNECT host:port``, then the
tunnel is the connection.

The request and the answer are :mod:`relay.core.httpconnect`'s; this module only moves
the bytes.  The caller's protocol is connected once the proxy said 2xx, on the proxy's
own TCP transport (nothing is copied: the tunnel's bytes go to it straight), with the
bytes that came with the answer delivered first.  A refusal fails the connect with
:class:`~relay.core.httpconnect.ProxyError`, whose text has the proxy's status line.
The whole exchange is bounded by the timeout given (a proxy that accepts and then says
nothing is a failed attempt, not a hang).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from relay.config.schema import ProxyURL
from relay.core.httpconnect import ProxyError, Tunnel, connect_request, parse_response
from relay.datapath.net import client_endpoint
from relay.transport import explain


class TunnelState(Enum):
    """``asking`` (CONNECT sent, reading the answer) -> ``open`` (the caller's protocol
    runs on the connection) or ``failed``."""

    ASKING = "asking"
    OPEN = "open"
    FAILED = "failed"


class _Tunnel(Protocol):
    """The connection to the proxy: the request out, the answer in, then a pipe to the
    caller's protocol."""

    transport: Any

    def __init__(self, request: bytes, factory: IProtocolFactory, addr: Any,
                 ready: defer.Deferred[IProtocol], proxy: ProxyURL) -> None:
        self.request = request
        self.inner_factory = factory
        self.addr = addr
        self.ready = ready
        self.proxy = proxy
        self.buf = b""
        self.state = TunnelState.ASKING
        self.inner: Any = None  # the caller's protocol, once OPEN

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.state is TunnelState.OPEN:
            self.inner.dataReceived(data)
            return
        if self.state is TunnelState.FAILED:
            return
        self.buf += data
        try:
            answer = parse_response(self.buf)
        except ProxyError as e:
            self._fail(Failure(ProxyError(f"{self.proxy}: {e}")))
            return
        if answer is not None:
            self._open(answer)

    def _open(self, answer: Tunnel) -> None:
        self.buf = b""
        inner = self.inner_factory.buildProtocol(self.addr)
        if inner is None:
            self._fail(Failure(ConnectionRefusedError("the protocol factory refused")))
            return
        self.state = TunnelState.OPEN
        self.inner = inner
        inner.makeConnection(self.transport)
        if not self.ready.called:
            self.ready.callback(inner)
        if answer.rest:
            inner.dataReceived(answer.rest)

    def _fail(self, why: Failure) -> None:
        self.state = TunnelState.FAILED
        if not self.ready.called:
            self.ready.errback(why)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.state is TunnelState.OPEN:
            self.inner.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(Failure(ProxyError(
                f"{self.proxy} closed the connection before answering CONNECT (is it an "
                "HTTP proxy, at that port? Some proxies close instead of refusing with 403 "
                "or 407)")))


class ConnectProxyEndpoint:
    """``IStreamClientEndpoint`` for ``host:port`` through the proxy ``proxy``."""

    def __init__(self, reactor: Any, proxy: ProxyURL, host: str, port: int,
                 timeout: float) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        request = connect_request(self.host, self.port, self.proxy)
        ready: defer.Deferred[IProtocol] = defer.Deferred()
        tunnels: list[_Tunnel] = []

        def build() -> _Tunnel:
            tunnel = _Tunnel(request, factory, None, ready, self.proxy)
            tunnels.append(tunnel)
            return tunnel

        def timed_out(result: Any, timeout: float) -> Failure:
            for t in tunnels:
                if t.transport is not None:
                    t.transport.abortConnection()
            return Failure(ProxyError(
                f"{self.proxy} did not open the tunnel to {self.host}:{self.port} "
                f"within {timeout:g}s (it could not reach that port: is the relay up, and "
                "is the port right? Or it is not an HTTP proxy)"))

        def unreachable(f: Failure) -> None:
            if not ready.called:
                why = explain.unreachable(
                    f.value or Exception(f.getErrorMessage()), host=self.proxy.host,
                    port=self.proxy.port, tls=False, timeout=self.timeout, to_proxy=True)
                ready.errback(Failure(ProxyError(f"cannot reach the proxy {self.proxy}: {why}")))

        ready.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        endpoint = client_endpoint(self.reactor, self.proxy.host, self.proxy.port, self.timeout)
        endpoint.connect(Factory.forProtocol(build)).addErrback(unreachable)
        return ready
