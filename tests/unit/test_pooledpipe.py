"""The pooled route's pipelining at the relay (relay.server.pooled, issue 13 item 5): a
user's channel confirmed early has her bytes written to the dispatched data connection
right behind the GO, not after the agent's ``K``.

A real RelayCore, DataPort, DataConnection and BridgedChannel; StringTransports for the
agent's data connection, a fake clock, a fake user connection.  What must hold:

- her bytes leave after the GO, in order, as they arrive, and nothing is written twice
  once ``K`` comes (the bridge counts and credits them instead);
- her window stays bounded as when the bytes were held: no window is re-opened for
  them before ``K``;
- nothing the agent sends is the stream's before ``K``, and the native thread is not
  offered the session before it;
- ``E`` (or a timeout) after bytes were written ends her session as an early-confirmed
  one ends (EOF, close, its row closed) and aborts the data connection; a connection
  found dead sends her held bytes on the link instead, once, in order.

tests/integration/test_earlyconfirm.py and test_stockpaths.py run the route with a real
agent and OpenSSH.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.config.schema import RelayConfig, ServiceGrant
from relay.core import fastwire as fw
from relay.core.earlyopen import OpenHealth
from relay.core.sessions import CHANNEL, POOLED
from relay.server.dataconn import AgentPool, DataConnection
from relay.server.dataport import AGENT_REPLY_TIMEOUT
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh import nativeforward
from relay.ssh.channels import BridgedChannel
from relay.testing import (
    FakeIdentity,
    FakeRelayConnection,
    FakeSide,
    KeyRing,
    connection_lost,
    result_of,
)

WINDOW = 1000


class _UserConn:
    """The user's SSH connection as a BridgedChannel sees it: what it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.scheduler = None
        self.transport = None
        self.offered: list[Any] = []

    def sendData(self, channel: Any, data: bytes) -> None:
        self.sent.append(("data", bytes(data)))

    def sendEOF(self, channel: Any) -> None:
        self.sent.append(("eof", None))

    def sendClose(self, channel: Any) -> None:
        if not channel.localClosed:
            channel.localClosed = True
            self.sent.append(("close", None))

    def adjustWindow(self, channel: Any, n: int) -> None:
        channel.localWindowLeft += n
        self.sent.append(("adjust", n))

    def sendRequest(self, channel: Any, kind: bytes, data: bytes) -> None:
        self.sent.append(("request", kind))

    def offerNative(self, channel: Any) -> None:  # relay.ssh.connection.FlowConnection
        self.offered.append(channel)


@dataclasses.dataclass(eq=False)
class _Agent(FakeRelayConnection):
    """An agent whose link is up; its link's opens wait for the test to answer them."""

    transport: Any = "up"
    opens: list[defer.Deferred[Any]] = dataclasses.field(default_factory=list)

    def openForwarded(self, bind: str, port: int, host: str, oport: int,
                      onPending: Any = None) -> defer.Deferred[Any]:
        self.opens.append(defer.Deferred())
        return self.opens[-1]


class World:
    """A relay with a data port, lab_pc registered with a pool for gpu-cluster:22 (an
    e2e service), alice granted it."""

    def __init__(self) -> None:
        self.ring = ring = KeyRing()
        config = RelayConfig(agents=(ring.agent("lab_pc", "gpu-cluster:22"),),
                             users=(ring.user("alice", "gpu-cluster:22"),),
                             data_port=0, e2e_services=(ServiceGrant("gpu-cluster", 22),))
        self.clock = MemoryReactorClock()
        self.core = RelayCore(config, Grants(config, "test"), self.clock)
        self.core.dataport.start()
        self.agent = _Agent(FakeIdentity(ring.blob("lab_pc"), "lab_pc", "agent"))
        self.core.connections.add(self.agent)  # type: ignore[arg-type]
        payload = common.NS(b"gpu-cluster") + struct.pack(">L", 22)
        assert result_of(defer.maybeDeferred(self.core.globalRequest, self.agent,
                                             b"tcpip-forward", payload)) is True
        self.pool = AgentPool(self.agent, {("gpu-cluster", 22)})
        self.core.dataport.pools[self.agent] = self.pool
        self.alice = FakeRelayConnection(FakeIdentity(ring.blob("alice"), "alice", "user"))
        self.core.connections.add(self.alice)  # type: ignore[arg-type]

    def pooled(self) -> tuple[DataConnection, StringTransport]:
        """One more idle pooled connection of lab_pc's, its hello proved."""
        factory = self.clock.tcpServers[-1][1]
        addr = IPv4Address("TCP", "203.0.113.5", 40000)
        dc = factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        dc.makeConnection(transport)
        token = self.core.dataport.tokens.issue(fw.ROLE_AGENT, "lab_pc", self.agent)
        dc.dataReceived(fw.agent_hello(token, dc.nonce))
        assert dc.state == "idle"
        transport.clear()
        return dc, transport

    def open(self) -> tuple[Any, BridgedChannel, _UserConn]:
        conn = _UserConn()
        channel = BridgedChannel(b"direct-tcpip", window=WINDOW, remoteWindow=1 << 20,
                                 remoteMaxPacket=32768, conn=conn)
        before = set(self.core.sessions.rows())
        answer = self.core.openUserSession(self.alice, "gpu-cluster", 22, "10.0.0.1:5",
                                           channel)
        (self.last,) = set(self.core.sessions.rows()) - before
        return answer, channel, conn

    def healthy(self) -> None:
        """One session opened late (a fresh registration) and answered K."""
        dc, _t = self.pooled()
        answer, channel, _ = self.open()
        assert isinstance(answer, defer.Deferred)
        dc.dataReceived(fw.AGENT_OK)
        assert result_of(answer) is channel
        assert self.health() is OpenHealth.HEALTHY

    def health(self) -> OpenHealth:
        return self.core.registry.lookup("gpu-cluster", 22).open_health  # type: ignore[union-attr]

    def row(self) -> Any:
        """The last session opened."""
        return self.last


def _go(dc: DataConnection) -> bytes:
    assert dc.ticket is not None
    return fw.pack_go("gpu-cluster", 22, fw.go_mac(dc.ticket.secret, dc.ticket.token_id,
                                                   dc.nonce, "gpu-cluster", 22))


def _her(channel: BridgedChannel, data: bytes) -> None:
    """Her CHANNEL_DATA, as FlowConnection delivers it (window first)."""
    assert len(data) <= channel.localWindowLeft, "her client keeps within the window"
    channel.localWindowLeft -= len(data)
    channel.dataReceived(data)


@pytest.fixture
def world() -> World:
    w = World()
    w.healthy()
    return w


def test_her_bytes_follow_the_go_in_order_and_are_not_written_again_at_k(
        world: World) -> None:
    dc, at = world.pooled()
    answer, channel, conn = world.open()
    assert answer is channel, "confirmed early"
    assert at.value() == _go(dc), "the GO left first, before her confirmation"
    channel.channelOpen(b"")
    _her(channel, b"SSH-2.0-")
    _her(channel, b"OpenSSH\r\n")
    _her(channel, b"x" * 600)
    assert at.value() == _go(dc) + b"SSH-2.0-OpenSSH\r\n" + b"x" * 600, "as they arrive"
    assert not [s for s in conn.sent if s[0] == "adjust"], "no window re-opened before K"
    assert channel.localWindowLeft == WINDOW - 617
    assert conn.offered == [] and nativeforward._data_side(channel) is None, (
        "the native thread cannot take the data connection before K")
    # the agent's K, and the target's first bytes in the same read
    dc.dataReceived(fw.AGENT_OK + b"SSH-2.0-server\r\n")
    assert world.row().path == POOLED
    assert at.value() == _go(dc) + b"SSH-2.0-OpenSSH\r\n" + b"x" * 600, "nothing twice"
    assert ("data", b"SSH-2.0-server\r\n") in conn.sent, "after K: the stream's bytes"
    assert ("adjust", 617) in conn.sent, "credited once handed on, as held bytes are"
    assert conn.offered == [channel], "offered to the native thread as after a read"
    bridge = channel.bridge
    assert bridge is not None and bridge.bytesAtoB == 617 and bridge.bytesBtoA == 16
    _her(channel, b"more")
    assert at.value().endswith(b"x" * 600 + b"more"), "then through the bridge"


def test_the_answer_is_read_before_anything_is_the_streams(world: World) -> None:
    """An ``E`` split over reads, her bytes arriving in between: they keep following the
    GO, nothing the agent sent reaches her, and the session ends once the answer is
    whole; bytes behind a ``K`` reach her only through the bridge (the test above)."""
    dc, at = world.pooled()
    _, channel, conn = world.open()
    channel.channelOpen(b"")
    answer = fw.pack_error(fw.AGENT_ERROR, "no route")
    for i in range(len(answer) - 1):
        _her(channel, bytes([97 + i]))
        dc.dataReceived(answer[i:i + 1])
        assert channel.bridge is None and conn.sent == []
    dc.dataReceived(answer[-1:])
    assert at.value() == _go(dc) + bytes(range(97, 97 + len(answer) - 1))
    assert conn.sent == [("eof", None), ("close", None)] and at.disconnected


@pytest.mark.parametrize("how", ["E", "timeout"])
def test_a_failure_after_her_bytes_went_ends_her_session_cleanly(world: World,
                                                                  how: str) -> None:
    dc, at = world.pooled()
    _, channel, conn = world.open()
    channel.channelOpen(b"")
    _her(channel, b"held and sent")
    assert at.value() == _go(dc) + b"held and sent"
    if how == "E":
        dc.dataReceived(fw.pack_error(fw.AGENT_ERROR, "connection refused"))
    else:
        world.clock.advance(AGENT_REPLY_TIMEOUT + 0.1)
    assert conn.sent == [("eof", None), ("close", None)], "EOF then close, as before"
    assert at.disconnected, "the data connection is aborted: what went is discarded"
    assert world.row().ended is not None
    assert world.core.sessions.active_for_user("alice") == 1, "only the first one's"
    assert world.health() is OpenHealth.FAILING
    connection_lost(dc)
    channel.dataReceived(b"late")  # in flight when it ended: goes nowhere
    assert at.value() == _go(dc) + b"held and sent"


def test_a_dead_connection_sends_her_held_bytes_on_the_link_once(world: World) -> None:
    """A pooled connection that closes unanswered (it died idle) never acted on the GO:
    the session takes the link, and the bytes written to the dead connection go there,
    held until then as without the pipe."""
    dc, at = world.pooled()
    _, channel, _conn = world.open()
    channel.channelOpen(b"")
    _her(channel, b"one ")
    connection_lost(dc)
    _her(channel, b"two")
    assert at.value() == _go(dc) + b"one "
    assert world.row().path == CHANNEL and len(world.agent.opens) == 1
    side = FakeSide()  # the channel on the agent's link
    world.agent.opens[-1].callback(side)
    assert side.written == [b"one ", b"two"] and channel.bridge is side.bridge
    assert side.bridge.bytesAtoB == 7


def test_her_window_bounds_what_goes_before_k(world: World) -> None:
    """Before K she can send her window and no more: each byte she sends before the
    answer still counts against it, whatever the data connection took."""
    dc, at = world.pooled()
    _, channel, conn = world.open()
    channel.channelOpen(b"")
    _her(channel, b"y" * WINDOW)
    assert channel.localWindowLeft == 0
    assert len(at.value()) == len(_go(dc)) + WINDOW
    assert not [s for s in conn.sent if s[0] == "adjust"]
    with pytest.raises(AssertionError, match="window"):
        _her(channel, b"z")
    dc.dataReceived(fw.AGENT_OK)
    assert ("adjust", WINDOW) in conn.sent


def test_a_session_ended_before_k_writes_nothing_more(world: World) -> None:
    """A grants reload in the early phase: her channel closes; what she sent before went,
    nothing after; the late K finds the session closed and aborts the connection."""
    dc, at = world.pooled()
    _, channel, conn = world.open()
    channel.channelOpen(b"")
    _her(channel, b"before")
    world.core.abortSession(world.row(), "grant revoked")
    assert conn.sent == [("eof", None), ("close", None)]
    channel.dataReceived(b"after")
    dc.dataReceived(fw.AGENT_OK)
    assert at.value() == _go(dc) + b"before" and at.disconnected
    assert channel.bridge is None


def test_nothing_more_goes_ahead_once_the_connection_does_not_take_it_whole(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay keeps her held bytes until K: were the data connection's own buffer in
    this process to fill with them too, the session would hold her window twice.  So
    once a write ahead is not taken whole by the kernel, the rest waits here (as without
    the pipe) and follows the K, in order, once."""
    from relay.server import dataconn

    dc, at = world.pooled()
    _, channel, conn = world.open()
    channel.channelOpen(b"")
    _her(channel, b"one ")
    monkeypatch.setattr(dataconn, "unsent", lambda transport: 1)  # the kernel is full
    _her(channel, b"two ")
    _her(channel, b"three")
    assert at.value() == _go(dc) + b"one two ", "the write that was not taken whole, no more"
    dc.dataReceived(fw.AGENT_OK)
    assert at.value() == _go(dc) + b"one two three"
    assert channel.bridge is not None and channel.bridge.bytesAtoB == 13
    assert not [s for s in conn.sent if s[0] == "adjust"], "13 of 1000: no credit due yet"
    assert channel._credit == 13, "all of it credited once handed on"
