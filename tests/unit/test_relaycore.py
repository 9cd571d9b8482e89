"""RelayCore's decisions with a fake clock and fake SSH connections.

The integration tests drive the relay with real OpenSSH; these pin down the timing
and the state machine of registration and takeover exactly, without a network.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from relay.config.schema import HostPort, RelayConfig, ServiceGrant
from relay.core.routing import Outcome, Registry
from relay.core.sessions import SPLICED, SessionRow
from relay.server.grants import Grants
from relay.server.relay import TAKEOVER_PROBE, RelayCore
from relay.ssh.server import RefusedRequest
from relay.testing import (
    FakeIdentity,
    FakePair,
    FakeRelayConnection,
    KeyRing,
    new_key,
    result_of,
)


def _forward(name: str, port: int) -> bytes:
    return common.NS(name.encode()) + struct.pack(">L", port)


@pytest.fixture
def world() -> tuple[RelayCore, MemoryReactorClock, dict[str, bytes]]:
    ring = KeyRing()
    config = RelayConfig(
        agents=(ring.agent("lab_pc", "gpu-cluster:22"), ring.agent("intruder", "other:22")),
        users=(ring.user("alice", "gpu-cluster:22"),),
        idle_timeout=60,
    )
    clock = MemoryReactorClock()
    core = RelayCore(config, Grants(config, "test"), clock)
    blobs = {name: ring.blob(name) for name in ("lab_pc", "intruder", "alice")}
    return core, clock, blobs


def _conn(core: RelayCore, blobs: dict[str, bytes], name: str, kind: str = "agent") -> Any:
    conn = FakeRelayConnection(FakeIdentity(blobs[name], name, kind))
    core.connections.add(conn)  # type: ignore[arg-type]
    return conn


def _register(core: RelayCore, conn: Any, name: str = "gpu-cluster", port: int = 22) -> Any:
    return defer.maybeDeferred(core.globalRequest, conn, b"tcpip-forward", _forward(name, port))


def test_first_registration_is_granted_at_once(world: Any) -> None:
    core, _clock, blobs = world
    agent = _conn(core, blobs, "lab_pc")
    assert result_of(_register(core, agent)) is True
    reg = core.registry.lookup("gpu-cluster", 22)
    assert reg is not None and reg.session is agent and reg.bind == "gpu-cluster"


def test_names_are_case_insensitive(world: Any) -> None:
    core, _clock, blobs = world
    agent = _conn(core, blobs, "lab_pc")
    assert result_of(_register(core, agent, "GPU-Cluster")) is True
    reg = core.registry.lookup("gpu-cluster", 22)
    assert reg is not None and reg.bind == "GPU-Cluster"  # echoed as the agent sent it


def test_ungranted_name_and_user_registration_are_refused(world: Any) -> None:
    core, _clock, blobs = world
    agent = _conn(core, blobs, "lab_pc")
    user = _conn(core, blobs, "alice", kind="user")
    # The answer carries the reason a labrelay agent is told (request-refused@labrelay).
    assert result_of(_register(core, agent, "other")) == RefusedRequest(
        "service other:22 is not granted to agent lab_pc")
    assert result_of(_register(core, user)) == RefusedRequest("users may not register services")
    assert core.registry.registrations() == []
    assert core.counters["requests_refused"] == 2


def test_stale_holder_is_taken_over_after_the_probe_window(world: Any) -> None:
    core, clock, blobs = world
    old = _conn(core, blobs, "lab_pc")
    new = _conn(core, blobs, "lab_pc")
    result_of(_register(core, old))
    pending = _register(core, new)
    assert len(old.probes) == 1
    clock.advance(TAKEOVER_PROBE - 0.01)
    assert not pending.called, "decided before the probe window closed"
    clock.advance(0.02)
    assert result_of(pending) is True
    assert core.registry.lookup("gpu-cluster", 22).session is new
    assert old.disconnected == ["superseded by a newer session of the same agent"]


def test_live_holder_keeps_the_name_no_flapping(world: Any) -> None:
    core, clock, blobs = world
    holder = _conn(core, blobs, "lab_pc")
    newcomer = _conn(core, blobs, "lab_pc")
    result_of(_register(core, holder))
    pending = _register(core, newcomer)
    holder.probes[0].callback(True)  # the holder answers its keepalive
    assert result_of(pending) == RefusedRequest(
        "held by a live session of lab_pc from 127.0.0.1:1 (answered a probe just now)")
    clock.advance(TAKEOVER_PROBE * 2)  # the timer was cancelled: nothing changes later
    assert core.registry.lookup("gpu-cluster", 22).session is holder
    assert holder.disconnected == []
    core.requestLog.stop()  # the log's per-key windows; the probe's timer is gone already
    assert not clock.getDelayedCalls()


def test_other_agent_is_refused_online_or_not(world: Any) -> None:
    core, _clock, blobs = world
    owner = _conn(core, blobs, "lab_pc")
    intruder = _conn(core, blobs, "intruder")
    not_granted = RefusedRequest("service gpu-cluster:22 is not granted to agent intruder")
    assert result_of(_register(core, intruder)) == not_granted  # owner offline: not granted
    result_of(_register(core, owner))
    assert result_of(_register(core, intruder)) == not_granted
    assert owner.probes == []  # never probed on behalf of another agent


def test_holder_dying_during_the_probe_hands_over_cleanly(world: Any) -> None:
    core, _clock, blobs = world
    old = _conn(core, blobs, "lab_pc")
    new = _conn(core, blobs, "lab_pc")
    result_of(_register(core, old))
    pending = _register(core, new)
    core.sessionStopped(old)  # its connection closed while we waited
    old.probes[0].callback(False)
    assert result_of(pending) is True
    assert core.registry.lookup("gpu-cluster", 22).session is new


def test_holder_stopping_before_answering_is_a_takeover_at_once(world: Any) -> None:
    core, clock, blobs = world
    old = _conn(core, blobs, "lab_pc")
    new = _conn(core, blobs, "lab_pc")
    result_of(_register(core, old))
    pending = _register(core, new)
    old.probes[0].callback(False)  # its connection stopped: no answer will come
    assert result_of(pending) is True
    assert core.registry.lookup("gpu-cluster", 22).session is new
    core.requestLog.stop()  # the log's per-key windows (relay.core.burstlog)
    assert not clock.getDelayedCalls()


def test_waiting_user_session_is_released_by_registration(world: Any) -> None:
    core, clock, blobs = world
    waiting = core.whenRegistered("gpu-cluster", 22, timeout=10)
    agent = _conn(core, blobs, "lab_pc")
    clock.advance(3)
    result_of(_register(core, agent))
    assert result_of(waiting).session is agent
    core.requestLog.stop()  # the log's per-key windows (relay.core.burstlog)
    assert not clock.getDelayedCalls()


def _holding(conn: Any) -> list[defer.Deferred[None]]:
    """Make ``conn``'s replies wait until the test fires them (a reply on its way)."""
    replies: list[defer.Deferred[None]] = []

    def whenReplied() -> defer.Deferred[None]:
        replies.append(defer.Deferred())
        return replies[-1]

    conn.whenReplied = whenReplied
    return replies


def test_waiting_sessions_get_the_registration_only_once_the_reply_was_sent(world: Any) -> None:
    """The race of issue 16: a forwarded-tcpip sent before the tcpip-forward's reply is
    refused by the agent ("no such forward").  Waiters, and sessions arriving while the
    reply is on its way, are handed the registration after it was sent."""
    core, clock, blobs = world
    waiting = core.whenRegistered("gpu-cluster", 22, timeout=10)
    agent = _conn(core, blobs, "lab_pc")
    agent.replies = _holding(agent)
    assert result_of(_register(core, agent)) is True
    late = core.whenRegistered("gpu-cluster", 22, timeout=10)
    assert not waiting.called and not late.called, "handed out before the agent heard"
    agent.replies[0].callback(None)
    assert result_of(waiting).session is agent and result_of(late).session is agent
    core.requestLog.stop()  # the log's per-key windows (relay.core.burstlog)
    assert not clock.getDelayedCalls()


def test_waiters_wait_on_when_the_agent_goes_before_its_reply(world: Any) -> None:
    core, clock, blobs = world
    waiting = core.whenRegistered("gpu-cluster", 22, timeout=10)
    gone = _conn(core, blobs, "lab_pc")
    gone.replies = _holding(gone)
    result_of(_register(core, gone))
    core.connections.discard(gone)
    core.sessionStopped(gone)
    gone.replies[0].errback(RuntimeError("connection stopped before the reply"))
    assert not waiting.called
    clock.advance(2)
    back = _conn(core, blobs, "lab_pc")
    result_of(_register(core, back))
    assert result_of(waiting).session is back
    core.requestLog.stop()  # the log's per-key windows (relay.core.burstlog)
    assert not clock.getDelayedCalls()


def test_a_refused_newcomer_that_stops_before_its_reply_leaves_no_unhandled_error(
        world: Any) -> None:
    """The newcomer is refused (the holder is alive) and its connection stops before
    the refusal is sent: the reply's Deferred fails, and nothing waited on it, which
    was an "Unhandled error in Deferred" (a critical line; tests/integration fail on
    one).  Now the refusal's path takes that failure."""
    core, _clock, blobs = world
    holder = _conn(core, blobs, "lab_pc")
    newcomer = _conn(core, blobs, "lab_pc")
    newcomer.replies = _holding(newcomer)
    result_of(_register(core, holder))
    pending = _register(core, newcomer)
    holder.probes[0].callback(True)
    assert isinstance(result_of(pending), RefusedRequest)
    reply = newcomer.replies[-1]
    reply.errback(RuntimeError("connection stopped before the reply"))
    failure = reply.result
    reply.addErrback(lambda _: None)  # (so that a failing run does not log it too)
    assert failure is None, "the reply's failure was left unhandled"
    core.requestLog.stop()


def test_waiting_gives_up_after_the_timeout(world: Any) -> None:
    core, clock, _blobs = world
    waiting = core.whenRegistered("gpu-cluster", 22, timeout=10)
    clock.advance(10)
    assert isinstance(result_of(waiting).value, defer.CancelledError)


class _FakeSide:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class _FakeBridge:
    def __init__(self) -> None:
        self.bytesAtoB = 0
        self.bytesBtoA = 0
        self.a = _FakeSide()
        self.b = _FakeSide()


def test_idle_sessions_are_closed_busy_ones_kept(world: Any) -> None:
    core, clock, _blobs = world
    core.start()
    idle, busy = _FakeBridge(), _FakeBridge()
    for bridge in (idle, busy):
        row = core.sessions.open("alice", "gpu-cluster:22", "x:1", 0.0)
        core._moving(row, lambda b=bridge: (b.bytesAtoB, b.bytesBtoA),
                     lambda b=bridge: (b.a.abort(), b.b.abort()))
    for _ in range(4):  # two minutes, sweeping every 30 s
        busy.bytesAtoB += 1
        clock.advance(30)
    assert idle.a.aborted and idle.b.aborted
    assert not busy.a.aborted
    core.stop()
    assert not clock.getDelayedCalls()


def test_registry_offer_outcomes() -> None:
    @dataclass(eq=False)
    class S:
        principal_name: str

        def disconnect(self, why: str) -> None:
            pass

    registry = Registry()
    a1, a2, b = S("a"), S("a"), S("b")
    assert registry.offer("svc", 1, a1)[0] is Outcome.GRANTED
    registry.register("svc", 1, a1, "svc", 0.0)
    assert registry.offer("svc", 1, a1)[0] is Outcome.GRANTED
    assert registry.offer("svc", 1, a2)[0] is Outcome.PROBE
    assert registry.offer("svc", 1, b)[0] is Outcome.REFUSED
    assert [r.name for r in registry.drop_session(a1)] == ["svc"]
    assert registry.lookup("svc", 1) is None


# --- grants reloaded: revocation and narrowing take effect at once ------------------------


@dataclass
class Filed:
    """A core whose grants come from files, and the keys: ``lines[name]``, ``blobs[name]``."""

    core: RelayCore
    clock: MemoryReactorClock
    agents: Path
    users: Path
    lines: dict[str, str]
    blobs: dict[str, bytes]

    def write(self, agents: list[str] | None = None, users: list[str] | None = None) -> None:
        for path, entries in ((self.agents, agents), (self.users, users)):
            if entries is not None:
                path.write_text("".join(e + "\n" for e in entries))
        self.core.grants.reload()


LAB = 'permitlisten="gpu-cluster:22",permitlisten="web:80",permitlisten="2201" {key}'
ALICE = 'permitopen="gpu-cluster:22",permitopen="web:80" {key}'


@pytest.fixture
def filed(tmp_path: Path) -> Filed:
    lines, blobs = {}, {}
    for name in ("k1", "k2", "alice", "bob"):
        key = new_key("x")
        lines[name], blobs[name] = key.public, key.blob
    agents, users = tmp_path / "agents", tmp_path / "users"
    agents.write_text(LAB.format(key=lines["k1"]) + " lab_pc\n")
    users.write_text(ALICE.format(key=lines["alice"]) + " alice\n"
                     f'permitopen="web:80" {lines["bob"]} bob\n')
    config = RelayConfig(agents_file=agents, users_file=users,
                         listen=HostPort("127.0.0.1", 2222))
    clock = MemoryReactorClock()
    core = RelayCore(config, Grants(config, "test"), clock)
    return Filed(core, clock, agents, users, lines, blobs)


def _session(core: RelayCore, user: str, service: str, key: bytes | None,
             agent: Any) -> FakePair:
    session = core.sessions.open(user, service, "x:1", 0.0, key=key, agent=agent, path=SPLICED)
    pair = FakePair()
    core._moving(session, lambda: (0, 0), pair.abort)
    return pair


def _aborted(pair: FakePair) -> bool:
    return pair.aborted


def test_revoked_agent_key_loses_its_names_sessions_and_connection(filed: Filed) -> None:
    core, b = filed.core, filed.blobs
    k1 = _conn(core, b, "k1")
    k1.identity.name = "lab_pc"
    assert result_of(_register(core, k1)) is True
    assert result_of(_register(core, k1, "")) == RefusedRequest(
        "public port 22 is not granted to agent lab_pc")
    assert result_of(_register(core, k1, "", 2201)) is True
    assert 2201 in core.publicPorts.listeners
    alice = _session(core, "alice", "gpu-cluster:22", b["alice"], k1)
    public = _session(core, "public:2201", "public:2201", None, k1)
    filed.write(agents=[LAB.format(key=filed.lines["k2"]) + " lab_pc"])
    assert core.registry.registrations() == []
    assert core.publicPorts.listeners == {}
    assert _aborted(alice) and _aborted(public)
    assert k1.disconnected == ["this key is no longer granted on this relay"]
    assert k1.revoked == []  # told by the disconnect
    # K2 is the lab's key now: it takes the name at once, no probe of anyone.
    k2 = _conn(core, b, "k2")
    k2.identity.name = "lab_pc"
    assert result_of(_register(core, k2)) is True
    assert k1.probes == []


def test_narrowed_agent_loses_only_what_it_lost_and_is_told(filed: Filed) -> None:
    core, b = filed.core, filed.blobs
    k1 = _conn(core, b, "k1")
    k1.identity.name = "lab_pc"
    result_of(_register(core, k1))
    result_of(_register(core, k1, "web", 80))
    gpu = _session(core, "alice", "gpu-cluster:22", b["alice"], k1)
    web = _session(core, "alice", "web:80", b["alice"], k1)
    filed.write(agents=['permitlisten="gpu-cluster:22" ' + filed.lines["k1"] + " lab_pc"])
    assert [(r.name, r.port) for r in core.registry.registrations()] == [("gpu-cluster", 22)]
    assert _aborted(web) and not _aborted(gpu)
    assert k1.disconnected == []
    assert k1.revoked == [("web", 80, "web:80 is no longer granted to agent lab_pc")]
    # ... and cannot register it again.
    assert not result_of(_register(core, k1, "web", 80))


def test_a_holder_whose_grant_went_cannot_keep_a_name_by_answering_probes(filed: Filed) -> None:
    """Even if a reload was not applied to it (belt and braces): the holder's key is
    checked before the takeover probe."""
    core, b = filed.core, filed.blobs
    k1 = _conn(core, b, "k1")
    k1.identity.name = "lab_pc"
    result_of(_register(core, k1))
    core.grants._observers.clear()  # the reload is not applied to what runs
    filed.write(agents=[LAB.format(key=filed.lines["k2"]) + " lab_pc"])
    assert core.registry.lookup("gpu-cluster", 22).session is k1  # type: ignore[union-attr]
    k2 = _conn(core, b, "k2")
    k2.identity.name = "lab_pc"
    assert result_of(_register(core, k2)) is True, "no probe: K1 may not hold it"
    assert k1.probes == []
    assert core.registry.lookup("gpu-cluster", 22).session is k2  # type: ignore[union-attr]
    assert k1.revoked == [("gpu-cluster", 22, "gpu-cluster:22 is no longer granted to this key")]


def test_revoked_user_key_loses_its_sessions_and_connection(filed: Filed) -> None:
    core, b = filed.core, filed.blobs
    agent = _conn(core, b, "k1")
    alice, bob = _conn(core, b, "alice", kind="user"), _conn(core, b, "bob", kind="user")
    hers = _session(core, "alice", "gpu-cluster:22", b["alice"], agent)
    his = _session(core, "bob", "web:80", b["bob"], agent)
    filed.write(users=[f'permitopen="web:80" {filed.lines["bob"]} bob'])
    assert _aborted(hers) and not _aborted(his)
    assert alice.disconnected == ["this key is no longer granted on this relay"]
    assert bob.disconnected == [] and agent.disconnected == []


def test_narrowed_user_loses_the_sessions_it_may_no_longer_have(filed: Filed) -> None:
    core, b = filed.core, filed.blobs
    agent = _conn(core, b, "k1")
    alice = _conn(core, b, "alice", kind="user")
    gpu = _session(core, "alice", "gpu-cluster:22", b["alice"], agent)
    web = _session(core, "alice", "web:80", b["alice"], agent)
    filed.write(users=[f'permitopen="web:80" {filed.lines["alice"]} alice'])
    assert _aborted(gpu) and not _aborted(web)
    assert alice.disconnected == []


def test_a_session_revoked_while_opening_is_closed_when_it_connects(filed: Filed) -> None:
    core, b = filed.core, filed.blobs
    session: SessionRow = core.sessions.open("alice", "gpu-cluster:22", "x:1", 0.0,
                                             key=b["alice"])
    filed.write(users=[])
    assert session.closing
    pair = FakePair()
    pair.done = defer.Deferred()  # type: ignore[attr-defined]
    core.fastSessionCounters(session).pairStarted(pair)  # type: ignore[arg-type]
    assert pair.aborted


def test_the_watcher_runs_with_the_core(filed: Filed) -> None:
    core, clock = filed.core, filed.clock
    core.start()
    assert len(clock.getDelayedCalls()) == 1
    core.stop()
    assert clock.getDelayedCalls() == []


def test_version_1_fast_path_requests_are_refused_by_name(world: Any) -> None:
    """Fast path v1 (a bearer token in the clear, an unauthenticated dispatch) is not
    spoken: its requests get a standard failure, so a v1 agent turns its pool off and a
    v1 ``labrelay connect`` falls back to a channel (docs/fastpath.md "Versions")."""
    from relay.core import fastwire

    core, _clock, blobs = world
    agent, alice = _conn(core, blobs, "lab_pc"), _conn(core, blobs, "alice", "user")
    pool = fastwire.pack_pool_request(4, [("gpu-cluster", 22)])
    assert core.globalRequest(agent, b"data-pool@labrelay", pool) is False
    token = fastwire.pack_token_request("gpu-cluster", 22)
    assert core.globalRequest(alice, b"data-token@labrelay", token) is False
    assert fastwire.POOL_REQUEST != b"data-pool@labrelay"


def test_reconfigure_applies_limits_grants_and_the_idle_sweep(world: Any) -> None:
    """A reload's live [relay] settings: the idle sweep follows the new timeout (off, then
    on again), the default per-user cap reaches the grants, a user removed from the
    tables loses her connection at once, and an agent's new service can be claimed."""
    import dataclasses

    core, clock, blobs = world
    core.start()
    alice = _conn(core, blobs, "alice", kind="user")
    agent = _conn(core, blobs, "lab_pc")
    assert not result_of(_register(core, agent, "web", 8080))  # not granted yet
    config = core.config
    assert core.grants.principal_for(blobs["alice"]).max_sessions == 64
    lab_pc = dataclasses.replace(config.agents[0], services=(
        *config.agents[0].services, ServiceGrant("web", 8080)))
    quieter = dataclasses.replace(config, idle_timeout=0, max_sessions_per_user=3,
                                  agents=(lab_pc, config.agents[1]))
    def sweeps_in(seconds: float) -> bool:
        return any(abs(c.getTime() - clock.seconds() - seconds) < 1e-9
                   for c in clock.getDelayedCalls())

    assert sweeps_in(30)  # idle_timeout 60: every 30 s
    core.reconfigure(quieter)
    assert core.config is quieter and not sweeps_in(30)
    assert core.grants.principal_for(blobs["alice"]).max_sessions == 3
    assert result_of(_register(core, agent, "web", 8080)) is True
    core.reconfigure(dataclasses.replace(quieter, users=(), idle_timeout=10))
    assert alice.disconnected == ["this key is no longer granted on this relay"]
    assert sweeps_in(5)
    core.stop()
    assert not clock.getDelayedCalls()


def test_reconfigure_applies_resume_grace(world: Any) -> None:
    """``resume_grace`` is a live [relay] setting (not in diff.RELAY_RESTART_ONLY, so a
    reload reports it changed): the hello answer and what is held from now on use the
    new value.  It used to be read once, when the relay started: the reload said
    "relay: resume_grace changed" and nothing changed."""
    import dataclasses

    from relay.core.resume import HELLO, pack_hello, unpack_hello_reply

    core, _clock, blobs = world
    agent = _conn(core, blobs, "lab_pc")
    core.reconfigure(dataclasses.replace(core.config, resume_grace=5))
    assert core.resumes.sessions.grace == 5 and core.resumes.sessions.enabled
    ok, reply = core.globalRequest(agent, HELLO, pack_hello(b"agent-instance"))
    assert ok and unpack_hello_reply(reply)[1] == 5
    core.reconfigure(dataclasses.replace(core.config, resume_grace=0))
    assert not core.resumes.sessions.enabled


def test_max_connections_per_user_counts_each_principal_s_live_connections() -> None:
    ring = KeyRing()
    config = RelayConfig(users=(ring.user("alice", "gpu-cluster:22"),
                                ring.user("bob", "gpu-cluster:22")),
                         max_connections_per_user=2)
    core = RelayCore(config, Grants(config, "test"), MemoryReactorClock())
    alice = FakeIdentity(ring.blob("alice"), "alice", "user")
    bob = FakeIdentity(ring.blob("bob"), "bob", "user")
    conns = [FakeRelayConnection(alice) for _ in range(2)]
    for conn in conns:
        assert core.connectionRefusal(alice) is None  # type: ignore[arg-type]
        core.sessionStarted(conn)  # type: ignore[arg-type]
    why = core.connectionRefusal(alice)  # type: ignore[arg-type]
    assert why is not None and "user alice already has 2 connections open" in why
    assert core.connectionRefusal(bob) is None  # type: ignore[arg-type]
    assert core.counters["connections_refused_per_user_cap"] == 1
    core.sessionStopped(conns[0])  # type: ignore[arg-type]
    core.sessionStopped(conns[0])  # type: ignore[arg-type]  # (twice: counted once)
    assert core.connectionRefusal(alice) is None  # type: ignore[arg-type]
    core.sessionStopped(conns[1])  # type: ignore[arg-type]
    assert core.status()["counters"]["connections_refused_per_user_cap"] == 1
