"""relay.agent.datapool (the agent's end of the fast path) with a fake link, a fake SSH
connection, a MemoryReactorClock and StringTransports: no sockets, nothing sleeps.

Dials go through the real endpoints (relay.datapath.net.client_endpoint with IP literals:
TCP4ClientEndpoint), so MemoryReactorClock.tcpClients records them; a test plays
the reactor by building the protocol from the recorded factory and connecting a
StringTransport (or by calling the factory's clientConnectionFailed).  The splice
itself takes real sockets: relay.datapath.splicing.get is replaced by
``relay.testing.FakeDataPath``, and tests/integration/test_fastpath.py covers the real
path.  A StringTransport never calls connectionLost by itself:
``relay.testing.connection_lost`` does, where a real reactor would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.conch.error import ConchError
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

import relay.agent.datapool
from relay.agent.datapool import (
    REFILL_AFTER_USE,
    RETRY_DELAY,
    TARGET_CONNECT_TIMEOUT,
    DataPool,
    PoolConnection,
)
from relay.config.schema import HostPort, RemoteForward
from relay.core import fastwire as fw
from relay.core.sessioncap import SessionCap, SessionSlot
from relay.datapath.dialnow import connect_endpoint
from relay.datapath.join import SessionCounters
from relay.datapath.splicing import PairAborted, PairResult
from relay.testing import FakeDataPath, connection_lost, feed_bytewise

RELAY_HOST = "192.0.2.10"
DATA_PORT = 7022
CONNECT_TIMEOUT = 7.0
LIFETIME = 60.0
GPU = ("gpu-cluster", 22)
GPU_TARGET = HostPort("127.0.0.1", 2222)


# --- fakes ---------------------------------------------------------------------------------


class FakeForward:
    """Just what DataPool asks of a RemoteForwardRunner."""

    def __init__(self, bind: str, port: int, connect: HostPort = GPU_TARGET, *,
                 via_relay: bool = False, bound_port: int | None = None) -> None:
        self.config = RemoteForward(bind, port, connect, f"fwd-{bind or 'default'}:{port}",
                                    via_relay)
        self.name = self.config.name
        self.bound_port = bound_port if bound_port is not None else port
        self.counters = SessionCounters()
        self.ready = True

    def matches(self, host: str, port: int) -> bool:
        # As RemoteForwardRunner.matches: ready, and by port alone (DataPool must not
        # rely on it for the name).
        return self.ready and self.bound_port == port


@dataclass
class FakeLinkConfig:
    host: str = RELAY_HOST
    connect_timeout: float = CONNECT_TIMEOUT


@dataclass(eq=False)
class FakeLink:
    """Just what DataPool asks of a Link."""

    remote: list[FakeForward]
    name: str = "lab"
    config: FakeLinkConfig = field(default_factory=FakeLinkConfig)
    clock: MemoryReactorClock = field(default_factory=MemoryReactorClock)
    local_relay: Any = None  # this node's RelayCore, when it runs one (chaining)
    sessions: SessionCap = field(default_factory=SessionCap)
    #: what DataPool told the link (Link.targetUnreachable burst-logs it)
    unreachable: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def reactor(self) -> MemoryReactorClock:
        return self.clock

    def admitSession(self, forward: str) -> SessionSlot | str:
        return self.sessions.admit(forward)

    def targetUnreachable(self, forward: str, target: str, reason: str) -> None:
        self.unreachable.append((forward, target, reason))

    def remoteForwardFor(self, host: str, port: int) -> FakeForward | None:
        # Link's own is by port alone (channels); DataPool must not use it.
        for f in self.remote:
            if f.bound_port == port:
                return f
        return None


@dataclass(eq=False)
class FakeConn:
    """Just what DataPool asks of a LinkConnection: global requests, answered by hand."""

    requests: list[tuple[bytes, bytes, int, defer.Deferred[bytes]]] = field(
        default_factory=list)
    peer: Any = field(default_factory=lambda: IPv4Address("TCP", RELAY_HOST, 22))

    @property
    def link_transport(self) -> Any:
        """The SSH transport, whose TCP transport's peer is the address the link
        actually reached: the data port is dialled there."""
        tcp = StringTransport(peerAddress=self.peer)
        return type("T", (), {"tcp": tcp})()

    def sendGlobalRequest(self, type: bytes, data: bytes, wantReply: int = 0
                          ) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.requests.append((type, data, wantReply, d))
        return d


@dataclass
class World:
    link: FakeLink
    pool: DataPool
    conn: FakeConn
    clock: MemoryReactorClock
    datapath: FakeDataPath
    gpu: FakeForward


def _make(monkeypatch: pytest.MonkeyPatch, size: int = 2,
          extra: list[FakeForward] | None = None) -> World:
    fake = FakeDataPath()
    monkeypatch.setattr(relay.agent.datapool.datapath, "get", lambda reactor: fake)
    gpu = FakeForward("GPU-Cluster", 22)
    link = FakeLink([gpu, *(extra or [])])
    # The endpoint's dial (connectTCP, recorded by the MemoryReactorClock), not dial_now's
    # real socket: tests/unit/test_dialnow.py covers that one.
    pool = DataPool(link, size, dial=connect_endpoint)  # type: ignore[arg-type]
    return World(link, pool, FakeConn(), link.clock, fake, gpu)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return _make(monkeypatch)


def _tokens(n: int, first: int = 1) -> list[bytes]:
    return [bytes([first + i]) * fw.TOKEN_LEN for i in range(n)]


def _answer(world: World, reply: bytes, index: int = -1) -> None:
    world.conn.requests[index][3].callback(reply)


def _grant(world: World, tokens: list[bytes], lifetime: float = LIFETIME,
           index: int = -1, services: list[tuple[str, int]] | None = None) -> None:
    """The relay's OK; ``services`` (what it will dispatch) default: all offered."""
    if services is None:
        services = fw.unpack_pool_request(world.conn.requests[index][1])[1]
    _answer(world, fw.pack_pool_reply(fw.Status.OK, "", DATA_PORT, tokens, lifetime, services),
            index)


_NONCES = iter(range(1, 1 << 30))


def _go(pc: PoolConnection, name: str, port: int) -> bytes:
    """The GO the real relay would send ``pc``: MAC'd with its ticket, bound to its
    ticket id and the nonce it was sent."""
    return fw.pack_go(name, port, fw.go_mac(pc.secret, pc.token_id, pc.nonce, name, port))


def _dials(world: World) -> list[tuple[Any, ...]]:
    """The connects to the relay's data port, in order."""
    return [c for c in world.clock.tcpClients if c[:2] == (RELAY_HOST, DATA_PORT)]


def _targets(world: World) -> list[tuple[Any, ...]]:
    return [c for c in world.clock.tcpClients if c[:2] != (RELAY_HOST, DATA_PORT)]


def _connect(client: tuple[Any, ...]) -> tuple[Any, StringTransport]:
    """What the reactor does once a recorded connectTCP succeeds: the endpoint's
    wrapped protocol, connected; returns the application's protocol and its transport."""
    host, port, factory = client[:3]
    wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    wrapper.makeConnection(transport)
    proto = wrapper._wrappedProtocol
    if isinstance(proto, PoolConnection) and proto.state == "challenge":
        assert transport.value() == b""  # it waits for the relay to speak first
        proto.dataReceived(fw.challenge(next(_NONCES).to_bytes(fw.NONCE_LEN, "big")))
    return proto, transport


def _refuse(world: World, client: tuple[Any, ...]) -> Failure:
    """What the reactor does once a recorded connectTCP fails."""
    reason = Failure(ConnectionRefusedError("nobody listens"))
    connector = world.clock.connectors[world.clock.tcpClients.index(client)]
    client[2].clientConnectionFailed(connector, reason)
    return reason


def _ready(world: World, tokens: list[bytes] | None = None) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    _grant(world, tokens if tokens is not None else _tokens(world.pool.size))


def _idle(world: World) -> tuple[PoolConnection, StringTransport]:
    """A ready pool and its first dial connected (idle), the hello cleared."""
    _ready(world)
    pc, t = _connect(_dials(world)[0])
    assert pc.state == "idle"
    t.clear()
    return pc, t


def _events(logs: Any, name: str) -> list[Any]:
    return [e for e in logs if e.get("event") == name]


# --- off, asking ------------------------------------------------------------------------------


def test_size_zero_is_off_and_asks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, size=0)
    assert w.pool.state == "off" and w.pool.reason == "fast_path_pool = 0"
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    w.pool.refill()
    assert w.conn.requests == [] and w.clock.tcpClients == []
    assert w.pool.state == "off"
    assert w.pool.status()["state"] == "off" and w.pool.status()["data_port"] is None
    w.pool.linkDown()
    assert w.pool.state == "off"


def test_link_up_asks_once_for_size_tokens_naming_spliceable_services(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, size=3, extra=[
        FakeForward("", 8080),
        FakeForward("0.0.0.0", 9000),
        FakeForward("localhost", 2200),
        FakeForward("*", 2201),
        FakeForward("chained", 23, via_relay=True),
        FakeForward("Web", 0, bound_port=45000),  # allocated by the server
    ])
    assert w.pool.state == "down"
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    assert w.pool.state == "starting"
    ((kind, data, want_reply, _d),) = w.conn.requests
    assert kind == fw.POOL_REQUEST == b"data-pool-v2@labrelay" and want_reply
    assert fw.unpack_pool_request(data) == (3, [GPU, ("web", 45000)])
    w.pool.refill()  # still waiting for the answer: no second request
    assert len(w.conn.requests) == 1 and w.clock.tcpClients == []


# --- the answer -------------------------------------------------------------------------------


def test_ok_reply_makes_it_ready_and_dials_size_connections(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    with capturedLogs() as logs:
        _grant(world, _tokens(2))
    assert world.pool.state == "ready" and world.pool.data_port == DATA_PORT
    (ready,) = _events(logs, "fast_path_ready")
    assert ready["n"] == 2 and ready["port"] == DATA_PORT and ready["link"] == "lab"
    dials = _dials(world)
    assert len(dials) == 2 == len(world.clock.tcpClients)
    assert all(timeout == CONNECT_TIMEOUT for _h, _p, _f, timeout, _b in dials)
    assert world.pool.dialing == 2 and world.pool.stash == []
    assert len(world.conn.requests) == 1
    status = world.pool.status()
    assert (status["state"], status["data_port"], status["dialing"], status["idle"]) == (
        "ready", DATA_PORT, 2, 0)


def test_pool_connection_writes_its_hello_and_joins_idle(world: World) -> None:
    granted = _tokens(2)
    _ready(world, granted)
    hellos = []
    for client in _dials(world):
        pc, t = _connect(client)
        assert isinstance(pc, PoolConnection)
        assert t.value() in (fw.agent_hello(granted[0], pc.nonce),
                             fw.agent_hello(granted[1], pc.nonce))
        assert t.value() == fw.agent_hello(pc.token, pc.nonce)  # the hello, nothing more
        assert pc.state == "idle" and pc in world.pool.idle
        assert t.producerState == "producing" and not t.disconnecting
        hellos.append(t.value()[5:13])
    assert sorted(hellos) == sorted(t[:8] for t in granted)  # one ticket each
    assert world.pool.dialing == 0 and world.pool.status()["idle"] == 2
    assert len(world.conn.requests) == 1  # full: nothing asked


def test_extra_tokens_are_stashed_and_used_for_refills_without_asking(world: World) -> None:
    granted = _tokens(5)
    _ready(world, granted)
    assert len(_dials(world)) == 2 and len(world.pool.stash) == 3
    pc, _t = _connect(_dials(world)[0])
    _connect(_dials(world)[1])
    connection_lost(pc)  # the relay closed an idle connection
    assert pc not in world.pool.idle and len(_dials(world)) == 2  # not at once
    world.clock.advance(RETRY_DELAY)
    assert len(_dials(world)) == 3 and len(world.pool.stash) == 2
    assert len(world.conn.requests) == 1
    new, t3 = _connect(_dials(world)[2])
    assert new.token in granted[2:] and t3.value() == fw.agent_hello(new.token, new.nonce)
    assert len(world.pool.idle) == 2


def test_expired_stashed_tokens_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, size=1)
    lifetime = 10.0
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    with capturedLogs() as logs:
        _grant(w, _tokens(3), lifetime=lifetime)
        assert len(_dials(w)) == 1 and len(w.pool.stash) == 2
        _refuse(w, _dials(w)[0])
        w.clock.advance(RETRY_DELAY)  # t=2: well within the lifetime
        assert len(_dials(w)) == 2 and len(w.pool.stash) == 1 and len(w.conn.requests) == 1
        _refuse(w, _dials(w)[1])
        w.clock.advance(lifetime - 1.0 + 0.1 - w.clock.seconds())  # past lifetime - 1 s
        assert w.clock.seconds() > lifetime - 1.0
        assert len(_dials(w)) == 2  # the stashed token was not dialled ...
        assert len(w.conn.requests) == 2 and w.pool.stash == []  # ... new ones were asked for
        _grant(w, _tokens(1, first=9))
        assert len(_dials(w)) == 3
        assert len(_events(logs, "fast_path_ready")) == 1  # said once


def test_stashed_token_just_before_the_margin_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, size=1)
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    _grant(w, _tokens(2), lifetime=10.0)
    _refuse(w, _dials(w)[0])
    w.clock.advance(8.9)  # the retry runs at 8.9 < 10 - 1
    assert len(_dials(w)) == 2 and len(w.conn.requests) == 1


def test_unavailable_reply_turns_it_off_with_the_relays_reason(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    ready = world.pool.whenReady()
    with capturedLogs() as logs:
        _answer(world, fw.pack_pool_reply(fw.Status.UNAVAILABLE, "this relay has no data port"))
    assert world.pool.state == "unavailable"
    assert world.pool.reason == "this relay has no data port"
    assert world.clock.tcpClients == []
    (off,) = _events(logs, "fast_path_off")
    assert off["reason"] == "this relay has no data port"
    world.pool.refill()
    assert len(world.conn.requests) == 1 and not ready.called


def test_nonsense_reply_turns_it_off(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    _answer(world, b"\x00\x00")
    assert world.pool.state == "unavailable"
    assert world.pool.reason.startswith("the relay answered nonsense: ")
    assert world.clock.tcpClients == []


def test_request_failure_means_unsupported(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    world.conn.requests[0][3].errback(ConchError("global request failed", b"packet"))
    assert world.pool.state == "unsupported"
    assert "does not offer labrelay's fast path" in world.pool.reason
    world.pool.refill()
    assert len(world.conn.requests) == 1 and world.clock.tcpClients == []


def test_connection_stopped_errback_leaves_it_alone(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    stopped = ConchError("Connection stopped.")  # what Conch's serviceStopped errbacks with
    with capturedLogs() as logs:
        world.conn.requests[0][3].errback(stopped)
    assert _events(logs, "fast_path_off") == []
    assert world.pool.state == "starting" and world.pool.reason == ""


def test_other_errbacks_leave_it_alone(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    world.conn.requests[0][3].errback(ConnectionDone("gone"))
    assert world.pool.state == "starting" and world.pool.reason == ""
    assert world.clock.tcpClients == []
    world.pool.refill()  # no longer asking: it may ask again
    assert len(world.conn.requests) == 2


def test_link_stopping_mid_request_recovers_on_the_next_link(world: World) -> None:
    """Conch errbacks pending requests (serviceStopped) before the link calls
    linkDown; whatever that did, the next link asks again and gets ready."""
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    world.conn.requests[0][3].errback(ConchError("Connection stopped."))
    world.pool.linkDown()
    assert world.pool.state == "down"
    conn2 = FakeConn()
    world.pool.linkUp(conn2)  # type: ignore[arg-type]
    assert len(conn2.requests) == 1
    conn2.requests[0][3].callback(fw.pack_pool_reply(fw.Status.OK, "", DATA_PORT, _tokens(2),
                                                     LIFETIME, [GPU]))
    assert world.pool.state == "ready" and len(_dials(world)) == 2


def test_reason_is_cleared_once_ready_again(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    _answer(world, fw.pack_pool_reply(fw.Status.UNAVAILABLE, "data port restarting"))
    world.pool.linkDown()
    conn2 = FakeConn()
    world.pool.linkUp(conn2)  # type: ignore[arg-type]
    conn2.requests[0][3].callback(fw.pack_pool_reply(fw.Status.OK, "", DATA_PORT, _tokens(2),
                                                     LIFETIME, [GPU]))
    assert world.pool.state == "ready"
    assert world.pool.status()["reason"] == ""


def test_answer_for_a_previous_connection_is_ignored(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    world.pool.linkDown()
    _grant(world, _tokens(2))
    assert world.pool.state == "down" and world.clock.tcpClients == []
    conn2 = FakeConn()
    world.pool.linkUp(conn2)  # type: ignore[arg-type]
    assert len(conn2.requests) == 1


def test_when_ready_fires_on_the_grant_and_at_once_when_ready(world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    first, second = world.pool.whenReady(), world.pool.whenReady()
    assert not first.called and not second.called
    _grant(world, _tokens(2))
    assert first.called and second.called
    now = world.pool.whenReady()
    assert now.called
    results: list[object] = []
    now.addCallback(results.append)
    assert results == [None]


# --- a session --------------------------------------------------------------------------------


def test_go_for_a_known_forward_connects_its_target_and_splices(world: World) -> None:
    pc, t = _idle(world)
    _connect(_dials(world)[1])
    assert len(world.pool.idle) == 2 and len(world.conn.requests) == 1
    feed_bytewise(pc, _go(pc, "GPU-Cluster", 22))
    assert pc.state == "connecting" and t.producerState == "paused"
    assert pc not in world.pool.idle
    # refill: one more token asked for (none stashed), once the set-up is over (another
    # connection is idle)
    assert len(world.conn.requests) == 1
    world.clock.advance(REFILL_AFTER_USE)
    assert len(world.conn.requests) == 2
    _grant(world, _tokens(2, first=10))
    assert len(_dials(world)) == 3 and world.pool.dialing == 1
    (target,) = _targets(world)
    assert target[:2] == (GPU_TARGET.host, GPU_TARGET.port)
    assert target[3] == TARGET_CONNECT_TIMEOUT
    assert t.value() == b"" and world.datapath.calls == []
    _server, st = _connect(target)
    assert t.value() == fw.AGENT_OK
    assert world.datapath.calls == [(t, st, b"", b"")]
    assert st.producerState == "paused"  # Held: nothing read before the splice
    assert pc.state == "spliced"
    counters = world.gpu.counters
    assert (counters.active, counters.total) == (1, 1)
    (pair,) = world.datapath.pairs
    pair.moved = PairResult(100, 2000)
    status = world.pool.status()
    assert status["sessions_active"] == 1 and status["sessions_total"] == 1
    assert (status["bytes_to_target"], status["bytes_from_target"]) == (100, 2000)
    pair.moved = PairResult(123, 4567)
    pair.done.callback(pair.moved)
    assert (counters.active, counters.total) == (0, 1)
    assert (counters.bytes_in, counters.bytes_out) == (123, 4567)
    status = world.pool.status()
    assert status["sessions_active"] == 0 and status["sessions_total"] == 1
    assert (status["bytes_to_target"], status["bytes_from_target"]) == (123, 4567)


def test_a_go_over_the_links_session_cap_is_refused_and_a_closed_session_frees_it(
    world: World,
) -> None:
    """Dispatched sessions count in the link's cap as channels do (round 19): the relay
    replaces every data connection it uses, so they have no other bound."""
    world.link.sessions.reconfigure(1, 1)
    pc, t = _idle(world)
    _connect(_dials(world)[1])
    feed_bytewise(pc, _go(pc, *GPU))
    (target,) = _targets(world)
    assert world.link.sessions.connecting == 1
    _server, _st = _connect(target)
    assert t.value() == fw.AGENT_OK and world.link.sessions.open == 1
    assert world.link.sessions.connecting == 0
    pc2 = next(iter(world.pool.idle))
    t2 = pc2.transport
    t2.clear()
    pc2.dataReceived(_go(pc2, *GPU))
    assert t2.value() == fw.pack_error(
        fw.AGENT_ERROR, "the agent has 1 sessions open on this link (max_sessions = 1)")
    assert len(_targets(world)) == 1  # nothing connected for it
    (pair,) = world.datapath.pairs
    pair.done.callback(PairResult(1, 1))
    assert world.link.sessions.open == 0


def test_go_uses_a_stashed_token_for_the_refill(world: World) -> None:
    _ready(world, _tokens(3))
    pc, _t = _connect(_dials(world)[0])
    pc.dataReceived(_go(pc, *GPU))
    assert len(_dials(world)) == 3 and len(world.conn.requests) == 1


def test_used_connection_is_replaced_after_the_set_up_while_others_are_idle(
        world: World) -> None:
    """The dial that replaces a used connection (and the relay's accept, challenge and
    hello check it causes) does not run during the session's set-up while at least
    half the pool is idle: REFILL_AFTER_USE later; with fewer idle it is dialled at
    once, as before."""
    _ready(world, _tokens(4))  # two dialled, two stashed
    pcs = [_connect(d)[0] for d in _dials(world)]
    assert len(world.pool.idle) == 2 and len(_dials(world)) == 2
    pcs[0].dataReceived(_go(pcs[0], *GPU))
    _connect(_targets(world)[0])
    assert pcs[0].state == "spliced"
    assert len(_dials(world)) == 2  # not during this session's set-up
    (soon,) = world.clock.getDelayedCalls()
    assert soon.getTime() == pytest.approx(REFILL_AFTER_USE)
    world.clock.advance(REFILL_AFTER_USE)
    assert len(_dials(world)) == 3 and world.pool.dialing == 1
    # The last idle one used: replaced at once (the next session would take the link).
    pcs[1].dataReceived(_go(pcs[1], *GPU))
    assert len(_dials(world)) == 4 and world.pool.dialing == 2
    assert world.clock.getDelayedCalls() == []


def test_a_burst_of_sessions_refills_at_once_below_half_the_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One timer for the first sessions of a burst; the one that leaves less than half
    the pool idle refills all that was used, at once, and the timer then has nothing
    left to do."""
    w = _make(monkeypatch, size=4)
    _ready(w, _tokens(8))
    pcs = [_connect(d)[0] for d in _dials(w)]
    assert len(w.pool.idle) == 4
    for pc in pcs[:2]:
        pc.dataReceived(_go(pc, *GPU))
    assert len(w.clock.getDelayedCalls()) == 1 and len(_dials(w)) == 4
    pcs[2].dataReceived(_go(pcs[2], *GPU))  # one idle of four left
    assert len(_dials(w)) == 7 and w.pool.dialing == 3  # all three replaced, free
    w.clock.advance(REFILL_AFTER_USE)
    assert len(_dials(w)) == 7 and w.clock.getDelayedCalls() == []


def test_link_down_cancels_a_pending_refill(world: World) -> None:
    _ready(world, _tokens(4))
    pcs = [_connect(d)[0] for d in _dials(world)]
    pcs[0].dataReceived(_go(pcs[0], *GPU))
    assert len(world.clock.getDelayedCalls()) == 1
    world.pool.linkDown()
    assert world.clock.getDelayedCalls() == []
    assert len(_dials(world)) == 2


def test_bytes_after_the_go_go_to_the_target_first(world: World) -> None:
    pc, t = _idle(world)
    pc.dataReceived(_go(pc, *GPU) + b"SSH-2.0-")
    pc.dataReceived(b"client\r\n")  # raced the pause
    _server, st = _connect(_targets(world)[0])
    assert world.datapath.calls == [(t, st, b"SSH-2.0-client\r\n", b"")]


def test_pair_ending_on_an_error_still_counts_its_bytes(world: World) -> None:
    pc, _t = _idle(world)
    pc.dataReceived(_go(pc, *GPU))
    _connect(_targets(world)[0])
    (pair,) = world.datapath.pairs
    pair.moved = PairResult(5, 6)
    pair.done.errback(Failure(PairAborted(104, "a", 5, 6)))
    c = world.gpu.counters
    assert (c.active, c.total, c.bytes_in, c.bytes_out) == (0, 1, 5, 6)
    assert world.pool.status()["sessions_active"] == 0


def test_stop_aborts_live_pairs_and_closes_idle_ones(world: World) -> None:
    pc, _t = _idle(world)
    _idle_pc, it = _connect(_dials(world)[1])
    pc.dataReceived(_go(pc, *GPU))
    _connect(_targets(world)[0])
    (pair,) = world.datapath.pairs
    world.pool.stop()
    assert pair.aborted and it.disconnecting and not world.pool.idle
    assert world.pool.state == "down"


@pytest.mark.parametrize(("name", "port"), [("nothing-here", 22), ("GPU-Cluster", 23)])
def test_go_for_an_unknown_service_is_answered_with_an_error(world: World, name: str,
                                                             port: int) -> None:
    pc, t = _idle(world)
    feed_bytewise(pc, _go(pc, name, port))
    assert t.value() == fw.pack_error(fw.AGENT_ERROR,
                                      "no such end-to-end encrypted forward on this agent")
    assert t.disconnecting and not t.disconnected  # closed after the message, not reset
    assert _targets(world) == [] and world.datapath.calls == []
    assert pc not in world.pool.idle


def test_go_for_a_via_relay_forward_is_answered_with_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, extra=[FakeForward("chained", 23, via_relay=True)])
    pc, t = _idle(w)
    feed_bytewise(pc, _go(pc, "chained", 23))
    assert t.value() == fw.pack_error(fw.AGENT_ERROR,
                                      "no such end-to-end encrypted forward on this agent")
    assert t.disconnecting and _targets(w) == []


def test_target_connect_failing_is_answered_with_the_reason(world: World) -> None:
    pc, t = _idle(world)
    pc.dataReceived(_go(pc, *GPU))
    reason = _refuse(world, _targets(world)[0])
    why = f"connect to {GPU_TARGET} failed: {reason.getErrorMessage()}"
    assert t.value() == fw.pack_error(fw.AGENT_ERROR, why)
    assert t.disconnecting and world.datapath.calls == []
    assert world.gpu.counters.total == 0
    assert world.link.unreachable == [(world.gpu.name, str(world.gpu.config.connect),
                                       reason.getErrorMessage())]


def test_target_failing_after_the_pool_connection_closed_writes_nothing(world: World) -> None:
    pc, t = _idle(world)
    pc.dataReceived(_go(pc, *GPU))
    connection_lost(pc)
    _refuse(world, _targets(world)[0])
    assert t.value() == b""


def test_target_connecting_after_the_pool_connection_closed_is_aborted(world: World) -> None:
    pc, t = _idle(world)
    pc.dataReceived(_go(pc, *GPU))
    connection_lost(pc)
    _server, st = _connect(_targets(world)[0])
    assert st.disconnected and t.value() == b"" and world.datapath.calls == []
    assert world.gpu.counters.total == 0


def test_splice_failing_resets_both(world: World) -> None:
    world.datapath.fail_with = OSError(9, "bad file descriptor")
    pc, t = _idle(world)
    pc.dataReceived(_go(pc, *GPU))
    with capturedLogs() as logs:
        _server, st = _connect(_targets(world)[0])
    assert t.disconnected and st.disconnected
    assert world.gpu.counters.total == 0 and world.pool.status()["sessions_total"] == 0
    assert _events(logs, "fast_path_splice_failed")


@pytest.mark.parametrize("garbage", [b"X", b"LRGX", b"SSH-2.0-x\r\n", b"K"])
def test_garbage_instead_of_go_aborts_the_connection(world: World, garbage: bytes) -> None:
    pc, t = _idle(world)
    with capturedLogs() as logs:
        feed_bytewise(pc, garbage)
    assert t.disconnected and pc not in world.pool.idle
    assert _targets(world) == [] and _events(logs, "fast_path_protocol")


def test_connection_dropped_for_garbage_is_replaced_later(world: World) -> None:
    pc, _t = _idle(world)
    _connect(_dials(world)[1])
    pc.dataReceived(b"X")
    connection_lost(pc)  # what the reactor does after the abort
    world.clock.advance(RETRY_DELAY)
    assert len(world.conn.requests) == 2  # a token asked for, to replace it


# --- link down, losses, failures --------------------------------------------------------------


def test_link_down_closes_idle_connections_and_stops_refills(world: World) -> None:
    pc, t = _idle(world)
    other, ot = _connect(_dials(world)[1])
    world.pool.linkDown()
    assert world.pool.state == "down"
    assert t.disconnecting and ot.disconnecting and not world.pool.idle
    connection_lost(pc)
    connection_lost(other)
    world.pool.refill()
    world.clock.advance(RETRY_DELAY * 10)
    assert len(world.conn.requests) == 1 and len(_dials(world)) == 2
    assert world.clock.getDelayedCalls() == []


def test_link_down_cancels_a_pending_retry(world: World) -> None:
    pc, _t = _idle(world)
    connection_lost(pc)
    assert len(world.clock.getDelayedCalls()) == 2  # the retry and the burst's end
    world.pool.linkDown()
    assert world.clock.getDelayedCalls() == []


def test_dial_completing_after_link_down_is_closed(world: World) -> None:
    _ready(world)
    world.pool.linkDown()
    pc, t = _connect(_dials(world)[0])
    assert t.disconnecting and pc not in world.pool.idle and world.pool.dialing == 1
    _refuse(world, _dials(world)[1])
    assert world.pool.dialing == 0 and world.clock.getDelayedCalls() == []


def test_lost_idle_connection_is_redialled_after_the_retry_delay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, size=1)
    pc, _t = _idle(w)
    connection_lost(pc)
    assert not w.pool.idle and len(w.conn.requests) == 1  # not at once
    w.clock.advance(RETRY_DELAY - 0.1)
    assert len(w.conn.requests) == 1
    w.clock.advance(0.1)
    assert len(w.conn.requests) == 2
    _grant(w, _tokens(1, first=7))
    assert len(_dials(w)) == 2


def test_lost_connection_that_was_not_idle_schedules_nothing(world: World) -> None:
    pc, _t = _idle(world)
    pc.dataReceived(_go(pc, *GPU))  # refill asks for one at once
    connection_lost(pc)
    assert world.clock.getDelayedCalls() == [] and len(world.conn.requests) == 2


def test_dial_failure_is_counted_and_retried_later(world: World) -> None:
    _ready(world, _tokens(3))  # one spare in the stash
    with capturedLogs() as logs:
        _refuse(world, _dials(world)[0])
    assert world.pool.dial_failures == 1 and world.pool.status()["dial_failures"] == 1
    assert world.pool.dialing == 1 and _events(logs, "fast_path_dial_failed")
    assert len(_dials(world)) == 2  # not at once
    _refuse(world, _dials(world)[1])  # a second failure: still one retry
    assert world.pool.dial_failures == 2 and len(world.clock.getDelayedCalls()) == 1
    world.clock.advance(RETRY_DELAY)
    assert len(_dials(world)) == 3  # the stashed token
    assert len(world.conn.requests) == 2  # and one more asked for


def test_dial_uses_the_link_host_and_the_granted_data_port(world: World) -> None:
    _ready(world)
    assert {c[:2] for c in world.clock.tcpClients} == {(RELAY_HOST, DATA_PORT)}


@dataclass(eq=False)
class FakeLocalDataPort:
    """This node's relay's data port, as the chaining agent uses it."""

    e2e: set[tuple[str, int]]
    asked: list[tuple[str, int, defer.Deferred[Any]]] = field(default_factory=list)

    def spliceable(self, name: str, port: int) -> bool:
        return (name, port) in self.e2e

    def pairLocal(self, name: str, port: int) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.asked.append((name, port, d))
        return d


@dataclass
class FakeLocalRelay:
    dataport: FakeLocalDataPort


@dataclass(eq=False)
class FakeAgentDataConnection:
    transport: StringTransport
    extra: bytes


def test_a_chained_service_is_offered_and_spliced_through_this_nodes_relay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Chaining: ``chained:23`` is a service of this node's own relay (``via_relay``).
    With a data port there it is offered to the upstream relay; a GO for it is paired
    with one of that service's agent's data connections at the local relay (already
    answered K) and the two are spliced; K goes upstream only then."""
    chained = FakeForward("chained", 23, via_relay=True)
    w = _make(monkeypatch, extra=[chained])
    local = FakeLocalDataPort({(chained.config.connect.host, chained.config.connect.port)})
    w.link.local_relay = FakeLocalRelay(local)
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    ((_kind, data, _want, _d),) = w.conn.requests
    assert fw.unpack_pool_request(data)[1] == [GPU, ("chained", 23)]
    pc, t = _idle(w)
    feed_bytewise(pc, _go(pc, "chained", 23) + b"SSH-2.0-client\r\n")
    ((name, port, d),) = local.asked
    assert (name, port) == (chained.config.connect.host, chained.config.connect.port)
    assert t.value() == b"" and _targets(w) == []  # no socket of its own: the local relay's
    downstream = StringTransport()
    d.callback(FakeAgentDataConnection(downstream, b"SSH-2.0-server\r\n"))
    assert t.value() == fw.AGENT_OK
    assert w.datapath.calls == [(t, downstream, b"SSH-2.0-client\r\n", b"SSH-2.0-server\r\n")]
    assert pc.state == "spliced" and chained.counters.total == 1


def test_a_chained_service_whose_local_pairing_fails_is_answered_with_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    chained = FakeForward("chained", 23, via_relay=True)
    w = _make(monkeypatch, extra=[chained])
    local = FakeLocalDataPort({(chained.config.connect.host, chained.config.connect.port)})
    w.link.local_relay = FakeLocalRelay(local)
    pc, t = _idle(w)
    feed_bytewise(pc, _go(pc, "chained", 23))
    local.asked[0][2].errback(RuntimeError("no agent data connection became free in time"))
    assert t.value().startswith(fw.AGENT_ERROR) and b"became free in time" in t.value()
    assert t.disconnecting and w.datapath.calls == []


# --- what someone on the path can send (issue 10 §3) -----------------------------------------


def test_dials_the_address_the_link_reached_not_the_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The data port is dialled at the link's peer address (whose host key was checked),
    not at a fresh resolution of the configured name."""
    w = _make(monkeypatch)
    w.link.config.host = "relay.example.org"
    w.conn.peer = IPv4Address("TCP", "198.51.100.3", 22)
    _ready(w)
    assert {c[:2] for c in w.clock.tcpClients} == {("198.51.100.3", DATA_PORT)}
    assert w.pool.status()["data_host"] == "198.51.100.3"


def test_a_link_without_an_ip_peer_keeps_no_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet.address import UNIXAddress

    w = _make(monkeypatch)
    w.conn.peer = UNIXAddress(b"/run/relay.sock")
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    assert w.pool.state == "off" and w.conn.requests == [] and w.clock.tcpClients == []


def test_the_hello_waits_for_the_challenge_and_proves_without_the_secret(world: World) -> None:
    _ready(world)
    wrapper_client = _dials(world)[0]
    host, port, factory = wrapper_client[:3]
    wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
    t = StringTransport()
    wrapper.makeConnection(t)
    pc = wrapper._wrappedProtocol
    assert pc.state == "challenge" and t.value() == b""
    nonce = b"\x11" * fw.NONCE_LEN
    feed_bytewise(pc, fw.challenge(nonce))
    assert t.value() == fw.agent_hello(pc.token, nonce) and pc.secret not in t.value()
    assert pc.state == "idle"


@pytest.mark.parametrize("garbage", [b"LRD1", b"LRGO\x00\x16\x00", b"X"])
def test_a_wrong_challenge_aborts(world: World, garbage: bytes) -> None:
    _ready(world)
    host, port, factory = _dials(world)[0][:3]
    wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
    t = StringTransport()
    wrapper.makeConnection(t)
    wrapper._wrappedProtocol.dataReceived(garbage)
    assert t.disconnected and t.value() == b"" and not world.pool.idle - {wrapper._wrappedProtocol}


def _assert_refused_without_a_byte(world: World, pc: PoolConnection, t: StringTransport) -> None:
    assert t.disconnected and t.value() == b""  # aborted: nothing said to the sender
    assert pc not in world.pool.idle and pc.state == "closed"
    assert _targets(world) == [] and world.datapath.calls == []


def test_a_forged_go_is_refused(world: World) -> None:
    """``LRGO`` + a service with a MAC made without the ticket's secret."""
    pc, t = _idle(world)
    with capturedLogs() as logs:
        feed_bytewise(pc, fw.pack_go(*GPU, bytes(fw.MAC_LEN)))
    _assert_refused_without_a_byte(world, pc, t)
    (event,) = _events(logs, "fast_path_protocol")
    assert "wrong MAC" in event["why"]


def test_a_go_replayed_from_another_connection_is_refused(world: World) -> None:
    pc, t = _idle(world)
    other, _ot = _connect(_dials(world)[1])
    feed_bytewise(pc, _go(other, *GPU))  # a valid GO, but for the other connection
    _assert_refused_without_a_byte(world, pc, t)


def test_a_go_made_with_a_guessed_nonce_is_refused(world: World) -> None:
    pc, t = _idle(world)
    mac = fw.go_mac(pc.secret, pc.token_id, bytes(fw.NONCE_LEN), *GPU)
    feed_bytewise(pc, fw.pack_go(*GPU, mac))
    _assert_refused_without_a_byte(world, pc, t)


def test_an_altered_go_is_refused(world: World) -> None:
    pc, t = _idle(world)
    go = _go(pc, "GPU-Cluster", 22)
    feed_bytewise(pc, go[:4] + b"\x00\x17" + go[6:])  # port 22 -> 23, MAC left
    _assert_refused_without_a_byte(world, pc, t)


@pytest.mark.parametrize(("name", "port"), [
    ("jupyter", 8888),  # offered, but not listed e2e by the relay
    ("web", 22),  # the port of an e2e forward, another name (port alone would match)
    ("gpu-cluster", 2222),  # the right name, another port
    ("", 8080),  # a public-port forward: never offered
])
def test_a_go_with_a_valid_mac_outside_the_e2e_set_connects_nothing(
        monkeypatch: pytest.MonkeyPatch, name: str, port: int) -> None:
    w = _make(monkeypatch, extra=[FakeForward("jupyter", 8888), FakeForward("", 8080)])
    w.pool.linkUp(w.conn)  # type: ignore[arg-type]
    offered = fw.unpack_pool_request(w.conn.requests[0][1])[1]
    assert offered == [GPU, ("jupyter", 8888)]
    _grant(w, _tokens(2), services=[GPU])  # the relay lists gpu-cluster:22 only
    assert w.pool.dispatchable == {GPU}
    pc, t = _connect(_dials(w)[0])
    t.clear()
    with capturedLogs() as logs:
        feed_bytewise(pc, _go(pc, name, port))
    assert t.value() == fw.pack_error(fw.AGENT_ERROR,
                                      "no such end-to-end encrypted forward on this agent")
    assert _targets(w) == [] and w.datapath.calls == []
    assert _events(logs, "fast_path_dispatch_refused")


def test_a_service_the_relay_lists_but_this_agent_did_not_offer_is_refused(
        world: World) -> None:
    world.pool.linkUp(world.conn)  # type: ignore[arg-type]
    _grant(world, _tokens(2), services=[GPU, ("stolen", 22)])
    assert world.pool.dispatchable == {GPU}


def test_refill_after_failures_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone on the path closes (or garbles) every data connection at once: the
    agent redials at most pool-size per REFILL_WINDOW after its first fill and a
    bucket's worth, and logs once per window, not once per connection."""
    from relay.agent.refill import REFILL_WINDOW

    size = 4
    w = _make(monkeypatch, size=size)
    with capturedLogs() as logs:
        _ready(w, _tokens(size))
        served = 0
        for step in range(int(20 / 0.05)):
            dials = _dials(w)
            for client in dials[served:]:
                pc, _t = _connect(client)
                pc.dataReceived(b"LRGO\x00\x16\x07jupyter" + bytes(fw.MAC_LEN) if step % 2
                                else b"X")
                connection_lost(pc)
            served = len(dials)
            for _k, _data, _want, d in w.conn.requests:
                if not d.called:
                    d.callback(fw.pack_pool_reply(fw.Status.OK, "", DATA_PORT,
                                                  _tokens(size, first=step % 200 + 1),
                                                  LIFETIME, [GPU]))
            w.clock.advance(0.05)
        w.pool.linkDown()  # ends the last burst: its summary is logged
    # 20 s: the first fill, a bucket of `size`, then size per window.
    bound = size + size + size * 20 / REFILL_WINDOW
    assert len(_dials(w)) <= bound + 1, len(_dials(w))
    assert len(_dials(w)) >= size * 20 / REFILL_WINDOW  # it does keep trying
    firsts = _events(logs, "fast_path_protocol")
    assert len(firsts) <= 20 / REFILL_WINDOW + 1
    summaries = _events(logs, "fast_path_protocol_burst")
    assert sum(e["count"] for e in summaries) + len(firsts) == w.pool.failures
    assert w.pool.status()["failures"] == len(_dials(w))


def test_a_valid_dispatch_is_replaced_at_once_even_after_failures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = _make(monkeypatch, size=1)
    _ready(w, _tokens(8))
    pc, _t = _connect(_dials(w)[0])
    for _ in range(3):  # spend the budget: closed without a dispatch, three times
        pc.dataReceived(b"X")
        connection_lost(pc)
        n = len(_dials(w))
        w.clock.advance(w.pool.budget.wait() + RETRY_DELAY)
        assert len(_dials(w)) == n + 1
        pc, _t = _connect(_dials(w)[-1])
    assert w.pool.budget.tokens < 1
    before = len(_dials(w))
    pc.dataReceived(_go(pc, *GPU))
    assert len(_dials(w)) == before + 1  # at once: the relay used it


def test_refill_budget_and_burst_log_on_a_clock() -> None:
    from twisted.internet.task import Clock

    from relay.agent.refill import BurstLog, RefillBudget

    clock = Clock()
    budget = RefillBudget(clock, 4, window=5.0)
    assert [budget.take() for _ in range(5)] == [True] * 4 + [False]
    assert budget.wait() == pytest.approx(1.25)
    clock.advance(1.25)
    assert budget.take() and not budget.take()
    clock.advance(100)
    assert sum(budget.take() for _ in range(10)) == 4  # never more than its capacity

    said: list[tuple[str, Any]] = []
    log = BurstLog(clock, 5.0, lambda why: said.append(("first", why)),
                   lambda n, why: said.append(("more", (n, why))))
    for i in range(10):
        log.failed(f"closed {i}")
    assert said == [("first", "closed 0")]
    clock.advance(5.0)
    assert said[1] == ("more", (9, "closed 9"))
    log.failed("again")
    assert said[2] == ("first", "again")
    clock.advance(5.0)
    assert len(said) == 3  # one failure in that burst: no summary
    assert not clock.getDelayedCalls()
