"""relay.server.dataport's state machine with a fake core, a MemoryReactorClock and
StringTransports: no sockets, nothing sleeps.

What a unit test cannot do is the splice itself (it takes real TCP sockets): the
step that calls relay.datapath.splicing is replaced by ``relay.testing.FakeDataPath``
here, and tests/integration/test_fastpath.py covers the real path end to end.  A
StringTransport never calls connectionLost by itself: ``relay.testing.connection_lost``
does, where a real reactor would after an abort or a close.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

import relay.server.dataport
from relay.config.schema import KeyLimitsConfig, RelayConfig, ServiceGrant
from relay.core import fastwire as fw
from relay.core.clock import expire
from relay.core.routing import Registry
from relay.server.dataconn import AgentPool, DataConnection, PairingError
from relay.server.dataport import (
    AGENT_REPLY_TIMEOUT,
    CAP_LOG_WINDOW,
    MAX_TOKENS_PER_REQUEST,
    POOL_TOKEN_LIFETIME,
    DataPort,
)
from relay.server.grants import Grants
from relay.testing import (
    FakeDataPath,
    FakeIdentity,
    FakeRelayConnection,
    KeyRing,
    connection_lost,
    feed_bytewise,
)

GPU = ("gpu-cluster", 22)
SOURCE = "192.0.2.7"


# --- fakes ---------------------------------------------------------------------------


@dataclass
class Row:
    """A session row as DataPort sees one: ``closing`` set when the relay closes it."""

    n: int
    closing: str | None = None


@dataclass(eq=False)
class FakeCore:
    """Just what DataPort asks of a RelayCore."""

    config: RelayConfig
    grants: Grants
    reactor: MemoryReactorClock
    registry: Registry = field(default_factory=Registry)
    connections: set[Any] = field(default_factory=set)
    cap_reached: bool = False
    opened: list[tuple[str, str, str]] = field(default_factory=list)
    spliced: list[tuple[object, Any]] = field(default_factory=list)
    failed: list[object] = field(default_factory=list)
    cancels: dict[int, Any] = field(default_factory=dict)  # by row number
    waiting_rows: list[object] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def whenRegistered(self, name: str, port: int, timeout: float,
                       row: object = None) -> defer.Deferred[Any]:
        reg = self.registry.lookup(name, port)
        if reg is not None:
            return defer.succeed(reg)
        self.waiting_rows.append(row)
        return expire(defer.Deferred(), timeout, self.reactor)

    def fastSessionOpening(self, principal: Any, service: str, origin: str,
                           key: bytes | None = None, login: str = "") -> object:
        if self.cap_reached:
            raise PairingError(f"user {principal.name} already has 1 sessions open")
        self.opened.append((principal.name, service, origin))
        self.rows.append(Row(len(self.opened)))
        return self.rows[-1]

    def fastSessionWaiting(self, session: Row, cancel: Any) -> None:
        self.cancels[session.n] = cancel

    def fastSessionCounters(self, session: object, agent: Any = None) -> Any:
        core = self

        class Recorder:
            def pairStarted(self, pair: Any) -> None:
                core.spliced.append((session, pair))

            def pairEnded(self, pair: Any, result: Any) -> None:
                pass

        return Recorder()

    def fastSessionFailed(self, session: object) -> None:
        self.failed.append(session)


@dataclass
class World:
    core: FakeCore
    port: DataPort
    clock: MemoryReactorClock
    ring: KeyRing

    def ssh(self, name: str, kind: str) -> FakeRelayConnection:
        """An authenticated SSH session of ``name``, alive."""
        conn = FakeRelayConnection(FakeIdentity(self.ring.blob(name), name, kind))
        self.core.connections.add(conn)
        return conn

    def agent_with_pool(self, spliceable: bool = True) -> tuple[FakeRelayConnection, AgentPool]:
        """lab_pc online: gpu-cluster:22 registered and a data pool kept for it."""
        agent = self.ssh("lab_pc", "agent")
        self.core.registry.register(*GPU, agent, "GPU-Cluster", self.clock.seconds())
        pool = AgentPool(agent, {GPU} if spliceable else set())
        self.port.pools[agent] = pool
        return agent, pool


@pytest.fixture
def world() -> World:
    ring = KeyRing()
    config = RelayConfig(
        agents=(ring.agent("lab_pc", "gpu-cluster:22", "plain:22"),),
        users=(ring.user("alice", "gpu-cluster:22", "plain:22"), ring.user("bob", "plain:22")),
        data_port=0,
        e2e_services=(ServiceGrant("gpu-cluster", 22), ServiceGrant("lonely", 22)),
        token_lifetime=5,
        data_hello_timeout=1,
        public_wait=3,
        max_unauthenticated=4,
    )
    clock = MemoryReactorClock()
    core = FakeCore(config, Grants(config, "test"), clock)
    port = DataPort(core)  # type: ignore[arg-type]
    port.start()
    return World(core, port, clock, ring)


def _dial(port: DataPort, host: str = SOURCE) -> tuple[DataConnection, StringTransport]:
    factory = port.clock.tcpServers[-1][1]
    addr = IPv4Address("TCP", host, 40000)
    dc = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    dc.makeConnection(transport)
    if dc.state == "hello":  # admitted: the relay spoke first, with a fresh nonce
        assert transport.value() == fw.challenge(dc.nonce)
        transport.clear()
    return dc, transport


def _pool_hello(world: World, agent: FakeRelayConnection, dc: DataConnection) -> bytes:
    """A fresh pool ticket of ``agent``'s, presented on ``dc`` as the agent would."""
    return fw.agent_hello(world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent), dc.nonce)


def _timers(world: World) -> list[Any]:
    """Pending timers but the token sweep's (it runs while the data port listens)."""
    sweeper = world.port.tokens._sweeper
    return [c for c in world.clock.getDelayedCalls() if c is not sweeper]


def _go(dc: DataConnection, name: str, port: int) -> bytes:
    """The GO the relay must send ``dc``: MAC'd with its ticket, bound to its nonce."""
    assert dc.ticket is not None
    return fw.pack_go(name, port, fw.go_mac(dc.ticket.secret, dc.ticket.token_id, dc.nonce,
                                            name, port))


def _aborted(t: StringTransport) -> bool:
    return bool(t.disconnected)  # StringTransport.abortConnection sets it, close does not


def _penalties(world: World) -> dict[str, int]:
    """Offences the data port's admission has counted, by kind (non-zero only)."""
    return {k: v for k, v in world.port.admission.penalties.penalised.items() if v}


def _token_request(world: World, who: FakeRelayConnection, name: str = "gpu-cluster",
                   port: int = 22) -> tuple[fw.Status, str, int, bytes, float]:
    ok, reply = world.port.tokenRequest(who, fw.pack_token_request(name, port))  # type: ignore[arg-type]
    assert ok is True
    return fw.unpack_token_reply(reply)


# --- the hello -------------------------------------------------------------------------------


def test_expired_tokens_are_swept_while_the_port_listens(world: World) -> None:
    alice = world.ssh("alice", "user")
    world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    world.clock.advance(5.5)  # token_lifetime 5: one sweep later it is gone
    world.clock.advance(5.0)
    assert len(world.port.tokens) == 0 and world.port.tokens.swept == 1
    world.port.stop()
    assert not world.clock.getDelayedCalls()


def test_token_requests_are_capped_per_session(world: World) -> None:
    world.agent_with_pool()
    alice = world.ssh("alice", "user")
    world.port.tokens.max_per_session = 2
    assert _token_request(world, alice)[0] is fw.Status.OK
    assert _token_request(world, alice)[0] is fw.Status.OK
    status, message, _port, token, _life = _token_request(world, alice)
    assert status is fw.Status.UNAVAILABLE and token == b""  # falls back to a channel
    assert "max_tokens_per_session" in message
    assert world.port.status()["tokens_capped"] == 1


def test_listener_and_status(world: World) -> None:
    assert world.port.enabled
    (port, _factory, _backlog, interface), = world.clock.tcpServers
    assert port == 0 and interface == "0.0.0.0"
    assert world.port.status()["data_port"] == world.port.bound_port


def test_silent_connection_is_aborted_after_the_hello_timeout(world: World) -> None:
    dc, t = _dial(world.port)
    assert dc.source == SOURCE and dc in world.port.pending
    world.clock.advance(0.99)
    assert not t.disconnecting
    world.clock.advance(0.02)
    assert _aborted(t) and t.value() == b"" and dc.state == "closed"
    assert dc not in world.port.pending
    assert world.port.counters["data_refused"] == 1
    assert _penalties(world) == {"grace-exceeded": 1}  # its source is penalised
    connection_lost(dc)
    assert not _timers(world)


def test_slow_but_complete_hello_is_not_timed_out(world: World) -> None:
    world.agent_with_pool()
    dc, t = _dial(world.port)
    world.clock.advance(0.9)
    feed_bytewise(dc, fw.agent_hello(b"\x00" * fw.TOKEN_LEN, dc.nonce))  # a bad token, but in time
    assert not _timers(world)  # the timer was cancelled
    assert _aborted(t) and world.port.counters["data_refused"] == 1


@pytest.mark.parametrize("garbage", [b"X", b"SSH-2.0-OpenSSH_9.6\r\n", b"LRD1Z", b"\x00",
                                     b"LRD1A" + bytes(32)])  # a version-1 hello
def test_garbage_is_refused_at_once(world: World, garbage: bytes) -> None:
    dc, t = _dial(world.port)
    dc.dataReceived(garbage)
    assert _aborted(t) and t.value() == b"" and dc.state == "closed"
    assert _penalties(world) == {"protocol": 1}
    assert dc not in world.port.pending
    connection_lost(dc)
    assert not _timers(world)
    assert world.port.counters["data_refused"] == 1


def test_penalised_source_is_turned_away_before_its_hello(world: World) -> None:
    """Two garbage hellos earn 2 x 10 s of penalty, past ``min`` (15 s): the source's
    next connection is closed at accept; another source is not affected; once the
    penalty runs out the source is let in again."""
    for _ in range(2):
        dc, _t = _dial(world.port)
        dc.dataReceived(b"?")
        connection_lost(dc)
    dc, t = _dial(world.port)
    assert _aborted(t) and dc.state == "closed" and dc not in world.port.pending
    assert not _timers(world)  # no hello timer for it
    connection_lost(dc)
    other, t2 = _dial(world.port, "198.51.100.1")
    assert not t2.disconnecting and other.state == "hello"
    assert world.port.counters["data_throttled"] == 1
    assert world.port.counters["data_connections"] == 4
    assert world.port.status()["admission"]["refused"]["penalty"] == 1
    connection_lost(other)
    world.clock.advance(20.1)
    again, t3 = _dial(world.port)
    assert not t3.disconnecting and again.state == "hello"
    connection_lost(again)


def test_close_before_the_hello_is_penalised_and_after_it_is_not(world: World) -> None:
    """``noauth``: a connection that closes owing its hello costs its source 1 s; one
    that sent a hello (here an agent's, pooled) and closes later costs nothing."""
    dc, _t = _dial(world.port)
    connection_lost(dc)
    assert _penalties(world) == {"noauth": 1}
    assert dc not in world.port.pending and world.port.gate.total == 0
    agent, _pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    pooled, t = _dial(world.port)
    pooled.dataReceived(fw.agent_hello(token, pooled.nonce))
    assert pooled.state == "idle" and not t.disconnecting
    connection_lost(pooled)
    assert _penalties(world) == {"noauth": 1}


def test_connections_owing_a_hello_are_capped(world: World) -> None:
    conns = [_dial(world.port, f"198.51.100.{i}") for i in (1, 1, 2, 2)]
    assert all(not t.disconnecting for _dc, t in conns)
    dc, t = _dial(world.port, "198.51.100.1")  # holds as many as anyone: no eviction
    assert _aborted(t) and dc not in world.port.pending
    assert world.port.counters["data_refused"] == 1
    connection_lost(conns[0][0])  # one goes: room for another
    _dc, t = _dial(world.port, "198.51.100.10")
    assert not t.disconnecting


def test_at_the_full_cap_a_source_holding_fewer_evicts_the_busiest(world: World) -> None:
    """Two hosts holding every place (2 each, max_unauthenticated 4) no longer keep a
    third out until ``data_hello_timeout``: the oldest connection of the host holding
    the most (tie: the oldest) is closed for it, counted, logged once per burst and
    not penalised."""
    from twisted.logger import capturedLogs

    conns = [_dial(world.port, f"198.51.100.{i}") for i in (1, 2, 1, 2)]
    with capturedLogs() as logs:
        dc, t = _dial(world.port, "203.0.113.9")
        assert not t.disconnecting and dc in world.port.pending
        victim, vt = conns[0]
        assert _aborted(vt) and victim.state == "closed" and victim not in world.port.pending
        assert not [c for c in world.clock.getDelayedCalls()
                    if getattr(c.func, "__self__", None) is victim]  # its hello timer
        connection_lost(victim)
        # .2 (2) holds the most now: the next newcomer takes its oldest
        _dc2, t2 = _dial(world.port, "203.0.113.10")
        assert not t2.disconnecting and _aborted(conns[1][1])
        connection_lost(conns[1][0])
        assert _penalties(world) == {}  # the relay closed them: no noauth
        assert world.port.counters["data_evicted"] == 2 and world.port.gate.total == 4
        assert world.port.status()["admission"]["evicted"] == 2
        world.clock.advance(CAP_LOG_WINDOW)
    assert _penalties(world) == {"grace-exceeded": 4}  # the four still owing their hello
    lines = [e for e in logs if e.get("event") == "relay_data_evicted"]
    assert [e["count"] for e in lines] == [1, 1], lines  # the first, then "1 more"
    assert lines[0]["source"] == "198.51.100.1/32" and lines[0]["peer"] == "203.0.113.9"
    assert lines[1]["source"] == "198.51.100.2/32" and lines[1]["peer"] == "203.0.113.10"



def test_at_the_full_cap_one_place_each_the_silent_one_gives_way_not_the_speaking_one(
        world: World) -> None:
    """Four sources, one connection each, each in a /24 of its own, fill the cap:
    no source nor neighbourhood holds more, so the connection that stalled longest at
    the lowest stage gives way ([relay.crowding]).
    The oldest began its hello (a few bytes): the next oldest, silent, goes, and its
    source is charged ``grace-exceeded``; the reason is logged."""
    from twisted.logger import capturedLogs

    from relay.config.schema import CrowdingConfig

    world.port.admission.crowding = CrowdingConfig(silent=0.25, handshake=0.5, auth=0.75)
    conns = [_dial(world.port, f"198.51.{99 + i}.{i}") for i in (1, 2, 3, 4)]
    first, _ = conns[0]
    first.dataReceived(fw.agent_hello(b"\x00" * fw.TOKEN_LEN, first.nonce)[:3])
    assert first.admission is not None and first.admission.stage.name == "HANDSHAKE"
    assert _dial(world.port, "203.0.113.9")[1].disconnected  # within 0.25 s: dropped
    world.clock.advance(0.3)
    with capturedLogs() as logs:
        _dc, t = _dial(world.port, "203.0.113.10")
    assert not t.disconnecting
    assert _aborted(conns[1][1]) and not _aborted(conns[0][1])
    assert _penalties(world) == {"grace-exceeded": 1}
    assert world.port.status()["admission"]["stalled_evicted"]["silent"] == 1
    (line,) = [e for e in logs if e.get("event") == "relay_data_evicted"]
    assert line["source"] == "198.51.101.2/32" and "stalled at silent" in line["why"]


def test_at_the_full_cap_a_crowd_of_one_24_gives_up_a_fresh_place_unpenalised(
        world: World) -> None:
    """Four sources of one /24, one fresh connection each, fill the cap (a crowd that
    recycles its places before they stall): a newcomer from another /24 takes the place
    of its neighbourhood's lowest-stage oldest at once, fresh as it is, and nobody is
    charged; the reason names the neighbourhood.  Dropped at accept before."""
    from twisted.logger import capturedLogs

    conns = [_dial(world.port, f"198.51.100.{i}") for i in (1, 2, 3, 4)]
    first, _ = conns[0]
    first.dataReceived(fw.agent_hello(b"\x00" * fw.TOKEN_LEN, first.nonce)[:3])
    with capturedLogs() as logs:
        _dc, t = _dial(world.port, "203.0.113.10")
    assert not t.disconnecting
    assert _aborted(conns[1][1]) and not _aborted(conns[0][1])  # silent before handshake
    connection_lost(conns[1][0])
    assert _penalties(world) == {}
    assert world.port.status()["admission"]["neighbourhood_evicted"] == 1
    (line,) = [e for e in logs if e.get("event") == "relay_data_evicted"]
    assert line["source"] == "198.51.100.2/32"
    assert "198.51.100.0/24, the neighbourhood holding the most places" in line["why"]
    assert _dial(world.port, "198.51.100.9")[1].disconnected  # its own crowd: no


def test_drops_at_the_global_cap_are_logged_once_per_burst(world: World) -> None:
    """A connection dropped at the global cap earns no penalty, so each was one
    ``relay_data_cap`` warning for as long as anyone connected and closed: now the
    first of a burst in full and the rest as one count when its window ends."""
    from twisted.logger import capturedLogs

    held = [_dial(world.port, f"198.51.100.{i}") for i in range(4)]
    assert all(not t.disconnecting for _dc, t in held)
    with capturedLogs() as logs:
        for _ in range(100):
            # one of the holders: it holds as many as anyone, so it evicts nobody
            _dc, t = _dial(world.port, "198.51.100.0")
            assert _aborted(t)
        world.clock.advance(CAP_LOG_WINDOW)
    lines = [e for e in logs if e.get("event") == "relay_data_cap"]
    assert [e["count"] for e in lines] == [1, 99], lines
    assert lines[0]["n"] == 4 and lines[1]["source"] == "198.51.100.0"
    assert world.port.counters["data_refused"] >= 100  # and the held ones' hello timeouts
    assert len(held) == 4


# --- agents' pooled connections ---------------------------------------------------------------


def test_agent_hello_with_a_pool_token_becomes_idle(world: World) -> None:
    agent, pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, t = _dial(world.port)
    feed_bytewise(dc, fw.agent_hello(token, dc.nonce))
    assert dc.state == "idle" and dc.pool is pool and list(pool.idle) == [dc]
    assert not t.disconnecting and t.value() == b""
    assert t.producerState == "producing"  # read again, only to notice its end
    assert dc not in world.port.pending and not _timers(world)
    assert world.port.tokens.redeemed["agent"] == 1
    connection_lost(dc)
    assert not pool.idle


def test_pool_request_gives_tokens_that_open_idle_connections(world: World) -> None:
    agent = world.ssh("lab_pc", "agent")
    request = fw.pack_pool_request(3, [("gpu-cluster", 22), ("plain", 22), ("stolen", 22)])
    ok, reply = world.port.poolRequest(agent, request)  # type: ignore[arg-type]
    r = fw.unpack_pool_reply(reply)
    tokens = r.tokens
    assert ok and r.status is fw.Status.OK and r.message == ""
    assert r.data_port == world.port.bound_port and r.lifetime == POOL_TOKEN_LIFETIME
    assert len(tokens) == 3 and len(set(tokens)) == 3
    pool = world.port.pools[agent]
    # plain:22 is granted but not end-to-end encrypted, stolen:22 not granted: dropped,
    # and the reply tells the agent which ones it may be dispatched to.
    assert pool.spliceable == {("gpu-cluster", 22)} == r.services
    for token in tokens:
        dc, _t = _dial(world.port)
        dc.dataReceived(fw.agent_hello(token, dc.nonce))
        assert dc.state == "idle"
    assert len(pool.idle) == 3


def test_pool_request_is_capped_per_request(world: World) -> None:
    agent = world.ssh("lab_pc", "agent")
    _ok, reply = world.port.poolRequest(agent, fw.pack_pool_request(1000, []))  # type: ignore[arg-type]
    assert len(fw.unpack_pool_reply(reply).tokens) == MAX_TOKENS_PER_REQUEST


def test_pool_request_from_a_user_or_without_a_data_port(world: World) -> None:
    alice = world.ssh("alice", "user")
    _ok, reply = world.port.poolRequest(alice, fw.pack_pool_request(2, []))  # type: ignore[arg-type]
    r = fw.unpack_pool_reply(reply)
    assert (r.status, r.message) == (fw.Status.REFUSED, "only agents keep data pools")
    assert world.port.poolRequest(alice, b"\x00") == (False, b"")  # type: ignore[arg-type]
    world.port.stop()
    agent = world.ssh("lab_pc", "agent")
    _ok, reply = world.port.poolRequest(agent, fw.pack_pool_request(2, []))  # type: ignore[arg-type]
    assert fw.unpack_pool_reply(reply).status is fw.Status.UNAVAILABLE


def test_agent_token_whose_pool_is_gone_is_refused(world: World) -> None:
    agent = world.ssh("lab_pc", "agent")
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)  # no pool for it
    dc, t = _dial(world.port)
    dc.dataReceived(fw.agent_hello(token, dc.nonce))
    assert _aborted(t) and dc.state == "closed"
    assert _penalties(world) == {}  # a valid token: not a guess


def test_agent_bytes_after_the_hello_are_refused(world: World) -> None:
    agent, pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.agent_hello(token, dc.nonce) + b"x")
    assert _aborted(t) and dc.state == "closed" and not pool.idle


def test_agent_token_used_as_a_user_is_refused(world: World) -> None:
    agent, _pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.user_hello(token, dc.nonce, *GPU))
    assert t.value() == fw.pack_error(fw.USER_ERROR, "token refused: wrong role")
    assert t.disconnecting and dc.state == "closed"


def test_idle_connection_sending_bytes_is_closed(world: World) -> None:
    agent, _pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.agent_hello(token, dc.nonce))
    dc.dataReceived(b"K")
    assert _aborted(t) and dc.state == "closed"


def test_idle_connection_refused_leaves_the_pool(world: World) -> None:
    agent, pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, _t = _dial(world.port)
    dc.dataReceived(fw.agent_hello(token, dc.nonce))
    dc.dataReceived(b"K")  # refused: closed
    connection_lost(dc)
    assert dc not in pool.idle


def test_agent_session_ending_closes_its_pool_and_forgets_its_tokens(world: World) -> None:
    agent, pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    unused = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.agent_hello(token, dc.nonce))
    world.port.sessionStopped(agent)
    assert t.disconnecting and agent not in world.port.pools and not pool.idle
    assert len(world.port.tokens) == 0
    connection_lost(dc)
    dc2, t2 = _dial(world.port)
    dc2.dataReceived(fw.agent_hello(unused, dc2.nonce))
    assert _aborted(t2)


# --- users -----------------------------------------------------------------------------------


def test_user_hello_with_a_bad_token_is_told_and_closed(world: World) -> None:
    dc, t = _dial(world.port)
    feed_bytewise(dc, fw.user_hello(b"\x42" * fw.TOKEN_LEN, dc.nonce, *GPU))
    assert t.value() == b"\x01" + bytes([len("token refused: unknown")]) + b"token refused: unknown"
    assert t.disconnecting and not _aborted(t)  # closed after the message, not reset
    assert dc.state == "closed" and dc not in world.port.pending
    assert _penalties(world) == {"authfail": 1}
    assert world.port.tokens.refused["unknown"] == 1


def test_user_token_for_another_service_is_refused(world: World) -> None:
    world.agent_with_pool()
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.user_hello(token, dc.nonce, "gpu-cluster", 2222))
    assert t.value() == fw.pack_error(fw.USER_ERROR, "token refused: issued for another service")


def test_user_token_whose_ssh_session_ended_is_refused(world: World) -> None:
    world.agent_with_pool()
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    world.core.connections.discard(alice)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.user_hello(token, dc.nonce, *GPU))
    assert t.value() == fw.pack_error(fw.USER_ERROR, "token refused: its SSH session ended")
    assert _penalties(world) == {}  # a real token, late: not a guess, not penalised


def _paired_up(world: World, extra: bytes = b"") -> tuple[DataConnection, StringTransport,
                                                             DataConnection, StringTransport]:
    """alice's data connection, dispatched to lab_pc's idle one."""
    agent, pool = world.agent_with_pool()
    adc, at = _dial(world.port, "203.0.113.5")
    adc.dataReceived(_pool_hello(world, agent, adc))
    alice = world.ssh("alice", "user")
    status, _msg, _port, token, _life = _token_request(world, alice)
    assert status is fw.Status.OK
    udc, ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(token, udc.nonce, "GPU-Cluster", 22) + extra)
    assert udc.state == "user" and ut.producerState == "paused" and udc.extra == extra
    assert adc.state == "dispatched" and not pool.idle
    assert at.value() == _go(adc, "GPU-Cluster", 22)  # the bind the agent registered
    assert world.core.opened == [("alice", "gpu-cluster:22", SOURCE)]
    return udc, ut, adc, at


def test_user_is_paired_and_spliced_once_the_agent_says_k(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDataPath()
    monkeypatch.setattr(relay.server.dataport.datapath, "get", lambda clock: fake)
    udc, ut, adc, at = _paired_up(world, extra=b"SSH-2.0-client\r\n")
    adc.dataReceived(fw.AGENT_OK + b"SSH-2.0-server\r\n")
    assert fake.calls == [(ut, at, b"SSH-2.0-client\r\n", fw.USER_OK + b"SSH-2.0-server\r\n")]
    assert udc.state == adc.state == "spliced"
    assert world.core.spliced == [(Row(1), fake.pairs[0])] and not world.core.failed
    assert world.port.counters["paired"] == 1
    assert not _timers(world)  # the agent reply timer was cancelled
    assert ut.value() == b""  # USER_OK goes through the splice, not this transport


def test_agent_that_cannot_connect_fails_the_user(world: World) -> None:
    udc, ut, adc, at = _paired_up(world)
    feed_bytewise(adc, fw.pack_error(fw.AGENT_ERROR, "connection refused"))
    told = ut.value()
    assert told.startswith(fw.USER_ERROR)
    ok, message, rest = fw.parse_reply(told, fw.USER_OK, fw.USER_ERROR)  # type: ignore[misc]
    assert not ok and rest == b""
    assert message == ("gpu-cluster:22 unavailable: the agent could not connect the service: "
                       "connection refused")
    assert ut.disconnecting and udc.state == "closed"
    assert _aborted(at)
    assert world.core.failed == [Row(1)] and world.port.counters["pair_failed"] == 1
    assert not _timers(world)


def test_an_agents_reason_reaches_the_user_as_printable_text(world: World) -> None:
    """A malicious agent's ``E`` reason is passed on to the user's data connection,
    whose client may print it to her terminal (``labrelay connect``): escape
    sequences (OSC 52 writes a clipboard, CSI 2J clears the screen), CR/LF and a
    bidi override are shown as text, not sent as they came
    (tests/security/test_shown_words.py has the other doors)."""
    _udc, ut, adc, _at = _paired_up(world)
    feed_bytewise(adc, fw.pack_error(fw.AGENT_ERROR,
                                     "\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\nPassword: \u202e"))
    ok, message, _ = fw.parse_reply(ut.value(), fw.USER_OK, fw.USER_ERROR)  # type: ignore[misc]
    assert not ok and message.isprintable()
    assert message.endswith("the agent could not connect the service: "
                            "\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J\\r\\nPassword: \\u202e")


def test_agent_answering_nonsense_fails_the_user(world: World) -> None:
    _udc, ut, adc, at = _paired_up(world)
    adc.dataReceived(b"?")
    assert b"the agent answered nonsense" in ut.value() and ut.disconnecting
    assert _aborted(at) and world.core.failed


def test_agent_that_never_answers_is_given_up(world: World) -> None:
    _udc, ut, _adc, at = _paired_up(world)
    world.clock.advance(AGENT_REPLY_TIMEOUT - 0.1)
    assert ut.value() == b""
    world.clock.advance(0.2)
    assert ut.value().startswith(fw.USER_ERROR) and ut.disconnecting
    assert _aborted(at) and world.core.failed


def test_agent_reply_timeout_is_not_reported_as_no_free_connection(world: World) -> None:
    _udc, ut, _adc, _at = _paired_up(world)
    world.clock.advance(AGENT_REPLY_TIMEOUT + 0.1)
    assert b"became free in time" not in ut.value()


def _pooled(world: World) -> tuple[DataConnection, StringTransport]:
    """One more idle connection from lab_pc's (already registered) session."""
    agent = next(iter(world.port.pools))
    adc, at = _dial(world.port, "203.0.113.5")
    adc.dataReceived(_pool_hello(world, agent, adc))
    return adc, at


def test_a_stale_agent_connection_is_replaced_by_the_next_one(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled connection that closes when dispatched (it died idle) costs the user
    nothing: the next one the agent dials gets the GO."""
    fake = FakeDataPath()
    monkeypatch.setattr(relay.server.dataport.datapath, "get", lambda clock: fake)
    udc, ut, adc, _at = _paired_up(world)
    connection_lost(adc)
    assert ut.value() == b"" and udc.state == "user"
    adc2, at2 = _pooled(world)
    assert adc2.state == "dispatched" and at2.value() == _go(adc2, "GPU-Cluster", 22)
    adc2.dataReceived(fw.AGENT_OK)
    assert fake.calls == [(ut, at2, b"", fw.USER_OK)]
    assert world.core.failed == []


def test_agent_connections_closing_while_dispatched_fail_the_user_at_last(
        world: World) -> None:
    _udc, ut, adc, _at = _paired_up(world)
    connection_lost(adc)
    for _ in range(2):  # MAX_DISPATCH_TRIES in all
        more, _t = _pooled(world)
        assert more.state == "dispatched"
        connection_lost(more)
    assert b"the agent's data connection closed" in ut.value()
    assert world.core.failed == [Row(1)]


def test_user_waits_for_a_free_agent_connection_then_gives_up(world: World) -> None:
    world.agent_with_pool()  # a pool, but nothing idle in it
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    udc, ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(token, udc.nonce, *GPU))
    world.clock.advance(world.core.config.public_wait - 0.1)
    assert ut.value() == b"" and udc.state == "user"
    world.clock.advance(0.2)
    assert ut.value() == fw.pack_error(
        fw.USER_ERROR, "gpu-cluster:22 unavailable: no agent data connection became free in time")
    assert world.core.failed == [Row(1)]
    assert not _timers(world)


def test_agent_connection_arriving_later_is_handed_to_the_waiting_user(world: World) -> None:
    agent, pool = world.agent_with_pool()
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    udc, _ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(token, udc.nonce, *GPU))
    world.clock.advance(1)
    adc, at = _dial(world.port, "203.0.113.5")
    adc.dataReceived(_pool_hello(world, agent, adc))
    assert adc.state == "dispatched" and not pool.idle
    assert at.value() == _go(adc, "GPU-Cluster", 22)


def test_user_whose_grant_was_revoked_is_refused(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    world.agent_with_pool()
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    monkeypatch.setattr(world.core.grants, "principal_for", lambda blob, login=None: None)
    udc, ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(token, udc.nonce, *GPU))
    assert ut.value() == fw.pack_error(fw.USER_ERROR, "gpu-cluster:22 is not granted to you")
    assert not world.core.opened


def test_user_at_the_session_cap_is_refused(world: World) -> None:
    world.agent_with_pool()
    world.core.cap_reached = True
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    udc, ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(token, udc.nonce, *GPU))
    assert ut.value() == fw.pack_error(fw.USER_ERROR, "user alice already has 1 sessions open")
    assert udc.state == "closed"


# --- data-token-v2@labrelay -----------------------------------------------------------------


def test_token_request_ok(world: World) -> None:
    world.agent_with_pool()
    alice = world.ssh("alice", "user")
    status, message, data_port, token, lifetime = _token_request(world, alice, "GPU-Cluster")
    assert (status, message, data_port, lifetime) == (fw.Status.OK, "", world.port.bound_port,
                                                      5.0)
    assert len(token) == fw.TOKEN_LEN == 32
    proof = fw.hello_proof(token[8:], fw.ROLE_USER, token[:8], b"n" * 32, GPU)
    ticket = world.port.tokens.redeem(fw.ROLE_USER, token[:8], b"n" * 32, proof, None,
                                      GPU)  # lower-cased
    assert ticket.principal == "alice" and ticket.session is alice


def test_token_request_refused_when_not_granted(world: World) -> None:
    world.agent_with_pool()
    bob = world.ssh("bob", "user")
    status, message, _port, token, lifetime = _token_request(world, bob)
    assert status is fw.Status.REFUSED and token == b"" and lifetime == 0.0
    assert message == "gpu-cluster:22 is not granted to user bob"
    agent = world.ssh("lab_pc", "agent")
    assert _token_request(world, agent)[0] is fw.Status.REFUSED
    stranger = FakeRelayConnection(FakeIdentity(b"not a granted key", "mallory", "user"))
    assert _token_request(world, stranger)[:2] == (fw.Status.REFUSED,
                                                   "this key is no longer granted")
    assert len(world.port.tokens) == 0


def test_token_request_unavailable_for_a_service_not_e2e(world: World) -> None:
    agent, pool = world.agent_with_pool()
    world.core.registry.register("plain", 22, agent, "plain", 0.0)
    pool.spliceable.add(("plain", 22))
    alice = world.ssh("alice", "user")
    status, message, *_ = _token_request(world, alice, "plain")
    assert status is fw.Status.UNAVAILABLE and "e2e_services" in message


def test_token_request_unavailable_when_not_registered(world: World) -> None:
    alice = world.ssh("alice", "user")
    status, message, *_ = _token_request(world, alice)
    assert status is fw.Status.UNAVAILABLE and "not registered" in message


def test_token_request_unavailable_for_an_agent_without_a_pool(world: World) -> None:
    agent, _pool = world.agent_with_pool()
    del world.port.pools[agent]
    alice = world.ssh("alice", "user")
    status, message, *_ = _token_request(world, alice)
    assert status is fw.Status.UNAVAILABLE and "keeps no data connections" in message


def test_token_request_unavailable_for_a_service_the_agent_cannot_splice(world: World) -> None:
    world.agent_with_pool(spliceable=False)
    alice = world.ssh("alice", "user")
    status, message, *_ = _token_request(world, alice)
    assert status is fw.Status.UNAVAILABLE and "cannot splice" in message


def test_token_request_unavailable_without_a_data_port(world: World) -> None:
    world.agent_with_pool()
    world.port.stop()
    alice = world.ssh("alice", "user")
    status, message, *_ = _token_request(world, alice)
    assert status is fw.Status.UNAVAILABLE and "no data port" in message


def test_malformed_token_request_is_a_request_failure(world: World) -> None:
    alice = world.ssh("alice", "user")
    assert world.port.tokenRequest(alice, b"\x00\x00") == (False, b"")  # type: ignore[arg-type]


def test_status_counts(world: World) -> None:
    world.agent_with_pool()
    alice = world.ssh("alice", "user")
    _token_request(world, alice)
    dc, _t = _dial(world.port)
    dc.dataReceived(b"?")
    status = world.port.status()
    assert status["tokens_outstanding"] == 1 and status["tokens_issued"] == {"user": 1,
                                                                             "agent": 0}
    assert status["pools"] == {"lab_pc": 0}
    assert status["data_connections"] == 1 and status["data_refused"] == 1
    assert status["e2e_services"] == ["gpu-cluster:22", "lonely:22"]


def test_pair_local_hands_over_an_agent_connection_that_said_k(world: World) -> None:
    """Chaining: this node's own link asks for ``gpu-cluster:22`` registered here; it gets
    the agent's data connection once the agent answered K, to splice on itself."""
    agent, _pool = world.agent_with_pool()
    adc, at = _dial(world.port, "203.0.113.5")
    adc.dataReceived(_pool_hello(world, agent, adc))
    got: list[DataConnection] = []
    world.port.pairLocal("GPU-Cluster", 22).addCallback(got.append)
    assert at.value() == _go(adc, "GPU-Cluster", 22)
    adc.dataReceived(fw.AGENT_OK + b"SSH-2.0-server\r\n")
    assert got == [adc] and adc.extra == b"SSH-2.0-server\r\n"
    assert world.port.counters["paired_local"] == 1
    assert world.port.spliceable("GPU-Cluster", 22) and not world.port.spliceable("web", 8080)


# --- the proof and the authenticated dispatch (issue 10 §3) ---------------------------------


def test_every_connection_gets_its_own_nonce(world: World) -> None:
    nonces = {_dial(world.port, f"198.51.100.{i}")[0].nonce for i in range(4)}
    assert len(nonces) == 4 and all(len(n) == fw.NONCE_LEN for n in nonces)


def test_a_hello_replayed_on_another_connection_is_refused(world: World) -> None:
    """What an on-path attacker who read (or solicited) the agent's hello can do with
    it at the real data port: nothing; the ticket is burnt."""
    agent, pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    seen, _t = _dial(world.port)  # the connection the agent's hello was made for
    hello = fw.agent_hello(token, seen.nonce)
    dc, t = _dial(world.port)
    dc.dataReceived(hello)
    assert _aborted(t) and t.value() == b"" and dc.state == "closed" and not pool.idle
    assert world.port.tokens.refused["wrong proof"] == 1
    seen.dataReceived(hello)  # now even its own connection: the ticket is gone
    assert seen.state == "closed" and world.port.tokens.refused["unknown"] == 1


def test_a_bearer_token_sent_as_the_proof_is_refused(world: World) -> None:
    """Version 1 sent the whole token: sent in the proof's place, it proves nothing."""
    agent, pool = world.agent_with_pool()
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    dc, t = _dial(world.port)
    dc.dataReceived(fw.MAGIC + fw.ROLE_AGENT + token[:8] + token[8:] + bytes(8))
    assert _aborted(t) and not pool.idle


def test_go_is_macd_with_the_connections_ticket(world: World) -> None:
    agent, _pool = world.agent_with_pool()
    adc, at = _dial(world.port)
    token = world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent)
    adc.dataReceived(fw.agent_hello(token, adc.nonce))
    alice = world.ssh("alice", "user")
    utoken = _token_request(world, alice)[3]
    udc, _ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(utoken, udc.nonce, *GPU))
    (name, port), mac, rest = fw.parse_go(at.value())  # type: ignore[misc]
    assert (name, port, rest) == ("GPU-Cluster", 22, b"")
    # What the agent checks: its own ticket's secret, its id, the nonce it was sent.
    assert fw.go_valid(token[8:], token[:8], adc.nonce, name, port, mac)
    assert not fw.go_valid(token[8:], token[:8], udc.nonce, name, port, mac)
    assert token[8:] not in at.value()


def test_pool_lists_only_e2e_services_and_only_those_are_dispatched(world: World) -> None:
    agent = world.ssh("lab_pc", "agent")
    world.core.registry.register("plain", 22, agent, "plain", world.clock.seconds())
    _ok, reply = world.port.poolRequest(  # type: ignore[arg-type]
        agent, fw.pack_pool_request(2, [("gpu-cluster", 22), ("plain", 22)]))
    assert fw.unpack_pool_reply(reply).services == {("gpu-cluster", 22)}
    alice = world.ssh("alice", "user")
    status, message, *_ = _token_request(world, alice, "plain", 22)
    assert status is fw.Status.UNAVAILABLE and "not declared end-to-end" in message


def test_pair_local_obeys_the_e2e_rule(world: World) -> None:
    """Chaining has no shortcut: a service not declared e2e on this node's relay is
    never dispatched, even for this node's own agent; an agent that did not offer it
    (its pool's spliceable) is not dispatched either."""
    agent, pool = world.agent_with_pool()
    world.core.registry.register("plain", 22, agent, "plain", world.clock.seconds())
    pool.spliceable.add(("plain", 22))  # even if the pool had it
    adc, at = _dial(world.port)
    adc.dataReceived(fw.agent_hello(world.port.tokens.issue(fw.ROLE_AGENT, "lab_pc", agent),
                                    adc.nonce))
    failures: list[Failure] = []
    world.port.pairLocal("plain", 22).addErrback(failures.append)
    assert failures and "not declared end-to-end encrypted" in failures[0].getErrorMessage()
    assert at.value() == b"" and adc.state == "idle"
    pool.spliceable.discard(GPU)
    world.port.pairLocal(*GPU).addErrback(failures.append)
    assert len(failures) == 2 and "keeps no data connections" in failures[1].getErrorMessage()
    assert at.value() == b""


@pytest.mark.parametrize("stage", ["registration", "pool"])
def test_a_session_closed_by_the_relay_stops_waiting_at_once(world: World, stage: str) -> None:
    """A grants change closes a waiting fast-path session (RelayCore.abortSession sets
    its ``closing`` and calls the canceller it was given): the user is told why at
    once, not after public_wait; the wait for the agent's registration is one the relay
    tracks (by its row)."""
    if stage == "pool":
        world.agent_with_pool()  # registered, nothing idle
    alice = world.ssh("alice", "user")
    token = world.port.tokens.issue(fw.ROLE_USER, "alice", alice, GPU)
    udc, ut = _dial(world.port)
    udc.dataReceived(fw.user_hello(token, udc.nonce, *GPU))
    world.clock.advance(1)
    assert ut.value() == b"" and udc.state == "user"
    row = world.core.rows[0]
    assert world.core.waiting_rows == ([row] if stage == "registration" else [])
    row.closing = "gpu-cluster:22 is no longer granted to user alice"
    world.core.cancels[1]()
    assert ut.value() == fw.pack_error(
        fw.USER_ERROR, "gpu-cluster:22 unavailable: gpu-cluster:22 is no longer granted to "
        "user alice")
    assert world.core.failed == [row] and not _timers(world)
    assert world.port.counters["pair_failed"] == 1


# --- the login's address limits hold on the data port ------------------------------------------


@pytest.mark.parametrize("source,paired", [
    ("10.1.2.3", True),  # the login's own address
    ("10.9.9.9", True),  # another address from= allows
    ("192.0.2.66", False),  # elsewhere: a leaked ticket, or one handed on
])
def test_a_users_from_limit_holds_on_her_data_connection(
    world: World, source: str, paired: bool,
) -> None:
    """``from=`` (and a certificate's ``source-address``) were checked at the SSH login
    only: a fast-path ticket the login obtained (a bearer secret) opened a spliced
    session from any address.  The data connection is held to the login's address
    limits: from the login's own address nothing is re-checked; from another, the
    login's checks run again with that address."""
    ring = world.ring
    carol = dataclasses.replace(
        ring.user("carol", "gpu-cluster:22"),
        key_limits=(KeyLimitsConfig(ring.line("carol"), sources="10.0.0.0/8"),))
    config = dataclasses.replace(world.core.config, users=(*world.core.config.users, carol))
    world.core.config = config
    world.core.grants = Grants(config, "test")
    world.agent_with_pool()
    conn = FakeRelayConnection(FakeIdentity(ring.blob("carol"), "carol", "user",
                                            login="carol", address="10.1.2.3"))
    world.core.connections.add(conn)
    status, why, _port, token, _life = _token_request(world, conn)
    assert status is fw.Status.OK, why
    udc, ut = _dial(world.port, source)
    udc.dataReceived(fw.user_hello(token, udc.nonce, *GPU))
    if paired:
        assert world.core.opened == [("carol", "gpu-cluster:22", source)]
    else:
        assert not world.core.opened, "a ticket opened a session from outside from="
        assert ut.value() == fw.pack_error(fw.USER_ERROR,
                                           "this key may not be used from 192.0.2.66")
        assert udc.state == "closed"


def test_an_agents_from_limit_holds_on_its_pooled_data_connections(world: World) -> None:
    """The same for an agent: a pool ticket its login obtained does not let a data
    connection from outside its key's ``from=`` into the pool."""
    ring = world.ring
    lab = dataclasses.replace(
        world.core.config.agents[0],
        key_limits=(KeyLimitsConfig(ring.line("lab_pc"), sources="10.0.0.0/8"),))
    config = dataclasses.replace(world.core.config, agents=(lab,))
    world.core.config = config
    world.core.grants = Grants(config, "test")
    agent = FakeRelayConnection(FakeIdentity(ring.blob("lab_pc"), "lab_pc", "agent",
                                             login="lab_pc", address="10.1.2.3"))
    world.core.connections.add(agent)
    pool = AgentPool(agent, {GPU})
    world.port.pools[agent] = pool  # type: ignore[index]
    for source, taken in (("10.1.2.3", True), ("192.0.2.66", False)):
        dc, _t = _dial(world.port, source)
        feed_bytewise(dc, _pool_hello(world, agent, dc))
        assert (dc in pool.idle) is taken
        assert dc.state == ("idle" if taken else "closed")
