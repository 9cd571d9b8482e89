"""Early confirmation of a user's channel (relay.core.earlyopen and its shell in
relay.server.opening), with a fake clock, fake connections and a real BridgedChannel.

The integration tests (tests/integration/test_earlyconfirm.py) run it with a real relay,
agent and OpenSSH; these pin down when a channel is confirmed early, what happens to the
user's held bytes, and how each way out of the early phase ends.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.conch import error
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from relay.config.schema import RelayConfig
from relay.core.earlyopen import (
    EarlyPhase,
    EarlySession,
    OpenHealth,
    after_open,
    confirms_early,
)
from relay.core.resume import OPEN_RESUMABLE, SID_LEN
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh.channels import BridgedChannel
from relay.ssh.resumable import ResumableSessions
from relay.ssh.wire import EARLY_DATA_OK, EARLY_LIMIT, pack_early_data_ok, unpack_early_data
from relay.testing import (
    FakeIdentity,
    FakeRelayConnection,
    FakeSide,
    FakeSSHConnection,
    KeyRing,
    result_of,
)


def _register(core: RelayCore, conn: Any, name: str = "gpu-cluster", port: int = 22) -> Any:
    payload = common.NS(name.encode()) + struct.pack(">L", port)
    return defer.maybeDeferred(core.globalRequest, conn, b"tcpip-forward", payload)


# the health memory and the phase, alone


def test_only_a_healthy_registration_with_a_live_agent_is_confirmed_early() -> None:
    assert confirms_early(True, OpenHealth.HEALTHY, True)
    assert not confirms_early(False, OpenHealth.HEALTHY, True), "early_confirm = false"
    assert not confirms_early(True, OpenHealth.UNKNOWN, True), "no open answered yet"
    assert not confirms_early(True, OpenHealth.FAILING, True), "its last open failed"
    assert not confirms_early(True, OpenHealth.HEALTHY, False), "its agent is not here"


def test_the_last_answer_decides_the_health() -> None:
    health = OpenHealth.UNKNOWN
    health = after_open(health, True)
    assert health is OpenHealth.HEALTHY
    health = after_open(health, False)
    assert health is OpenHealth.FAILING
    assert after_open(health, False) is OpenHealth.FAILING
    assert after_open(health, True) is OpenHealth.HEALTHY


def test_an_early_session_is_bridged_or_ended_once() -> None:
    bridged = EarlySession()
    assert bridged.agent_opened() and bridged.phase is EarlyPhase.BRIDGED
    assert not bridged.end("late failure"), "a bridged session is the bridge's to end"
    ended = EarlySession()
    assert ended.end("grant revoked") and ended.phase is EarlyPhase.CLOSED
    assert ended.why == "grant revoked"
    assert not ended.agent_opened(), "an agent side opening after the end is aborted"
    assert not ended.end("again")
    left = EarlySession()
    assert left.user_closed() and left.phase is EarlyPhase.CLOSED
    assert not left.agent_opened() and not left.end("late failure")
    assert not ended.user_closed(), "a channel the relay closed ends no session twice"
    assert not bridged.user_closed(), "a bridged channel's close is the bridge's"


# the shell: RelayCore.openUserSession with fakes


class _UserConn:
    """The user's connection as a BridgedChannel sees it: what it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.scheduler = None
        self.transport = None

    def sendData(self, channel: Any, data: bytes) -> None:
        self.sent.append(("data", bytes(data)))

    def sendEOF(self, channel: Any) -> None:
        self.sent.append(("eof", None))
        channel.localClosed = False

    def sendClose(self, channel: Any) -> None:
        if not channel.localClosed:
            channel.localClosed = True
            self.sent.append(("close", None))

    def adjustWindow(self, channel: Any, n: int) -> None:
        self.sent.append(("adjust", n))

    def sendRequest(self, channel: Any, kind: bytes, data: bytes) -> None:
        self.sent.append(("request", kind))


@dataclasses.dataclass(eq=False)
class _Agent(FakeRelayConnection):
    """An agent whose link is up: each open waits for the test to answer it."""

    transport: Any = "up"
    opens: list[defer.Deferred[Any]] = dataclasses.field(default_factory=list)
    takesEarly: bool = False  # said early-data-ok@labrelay (relay.ssh.earlydata)
    pendings: list[BridgedChannel] = dataclasses.field(default_factory=list)

    def openForwarded(self, bind: str, port: int, host: str, oport: int,
                      onPending: Any = None) -> defer.Deferred[Any]:
        self.opens.append(defer.Deferred())
        if self.takesEarly and onPending is not None:
            pending = BridgedChannel(b"forwarded-tcpip", conn=FakeSSHConnection())
            pending.id = len(self.opens)
            pending.allowEarly(EARLY_LIMIT)
            self.pendings.append(pending)
            onPending(pending)
        return self.opens[-1]


class World:
    def __init__(self, early: bool = True) -> None:
        ring = KeyRing()
        config = RelayConfig(agents=(ring.agent("lab_pc", "gpu-cluster:22"),),
                             users=(ring.user("alice", "gpu-cluster:22"),),
                             early_confirm=early)
        self.clock = MemoryReactorClock()
        self.core = RelayCore(config, Grants(config, "test"), self.clock)
        blobs = {name: ring.blob(name) for name in ("lab_pc", "alice")}
        self.agent = _Agent(FakeIdentity(blobs["lab_pc"], "lab_pc", "agent"))
        self.core.connections.add(self.agent)  # type: ignore[arg-type]
        assert result_of(_register(self.core, self.agent)) is True
        self.alice = FakeRelayConnection(FakeIdentity(blobs["alice"], "alice", "user"))
        self.core.connections.add(self.alice)  # type: ignore[arg-type]

    def open(self) -> tuple[Any, BridgedChannel, _UserConn]:
        """A user's direct-tcpip: what openUserSession returned, and the channel."""
        conn = _UserConn()
        channel = BridgedChannel(b"direct-tcpip", window=1000, remoteWindow=1 << 20,
                                 remoteMaxPacket=32768, conn=conn)
        return (self.core.openUserSession(self.alice, "gpu-cluster", 22, "10.0.0.1:5",
                                          channel), channel, conn)

    def confirm(self, channel: BridgedChannel) -> None:
        """What FlowConnection does with a channel returned at once: confirm it."""
        channel.channelOpen(b"")

    def health(self) -> OpenHealth:
        return self.core.registry.lookup("gpu-cluster", 22).open_health  # type: ignore[union-attr]

    def healthy(self) -> None:
        """One session opened and answered: the registration is healthy."""
        answer, channel, _ = self.open()
        assert isinstance(answer, defer.Deferred), "a fresh registration confirms late"
        self.agent.opens[-1].callback(FakeSide())
        assert result_of(answer) is channel
        assert self.health() is OpenHealth.HEALTHY


@pytest.fixture
def world() -> World:
    return World()


def test_a_healthy_service_is_confirmed_at_once_and_the_held_bytes_go_on(world: World) -> None:
    world.healthy()
    answer, channel, conn = world.open()
    assert answer is channel, "confirmed at once"
    assert len(world.agent.opens) == 2, "the agent's open left before the answer"
    world.confirm(channel)
    channel.dataReceived(b"hello ")
    channel.localWindowLeft -= 6
    channel.dataReceived(b"there")
    assert ("adjust", 6) not in conn.sent, "held bytes re-open no window"
    side = FakeSide()
    world.agent.opens[-1].callback(side)
    assert side.written == [b"hello ", b"there"]
    assert side.bridge is channel.bridge is not None
    assert world.core.sessions.active_for_user("alice") == 2


def _early(pending: BridgedChannel) -> list[bytes]:
    conn: Any = pending.conn
    return [unpack_early_data(data)[1] for _, data, _ in conn.globalRequests]


def test_her_bytes_go_to_an_agent_that_takes_them_before_it_answered(world: World) -> None:
    world.healthy()
    world.agent.takesEarly = True
    _, channel, _ = world.open()
    world.confirm(channel)
    channel.dataReceived(b"hello ")
    channel.dataReceived(b"there")
    (pending,) = world.agent.pendings
    assert _early(pending) == [b"hello ", b"there"], "sent on as they arrived"
    assert world.core.counters["early_data_sessions"] == 1
    assert world.core.counters["early_data_bytes"] == 11
    side = FakeSide()
    world.agent.opens[-1].callback(side)
    assert side.written == [b"hello ", b"there"], "the bridge hands them on as before"
    channel.dataReceived(b"!")
    assert _early(pending) == [b"hello ", b"there"], "after the answer: the bridge's"
    assert side.written[-1] == b"!"


def test_only_an_agent_may_say_it_takes_early_bytes(world: World) -> None:
    ok = pack_early_data_ok(EARLY_LIMIT)
    assert world.core.globalRequest(world.alice, EARLY_DATA_OK, ok) is False, "a user"
    assert getattr(world.alice, "earlyLimit", 0) == 0
    assert world.core.globalRequest(world.agent, EARLY_DATA_OK, b"\x00") is False
    assert world.core.globalRequest(world.agent, EARLY_DATA_OK, ok) is True
    assert world.agent.earlyLimit == EARLY_LIMIT


def test_without_early_confirmation_nothing_goes_early(world: World) -> None:
    world.agent.takesEarly = True
    answer, _, _ = world.open()  # a fresh registration: confirmed after the agent
    assert isinstance(answer, defer.Deferred)
    world.agent.opens[-1].callback(FakeSide())
    assert not world.agent.pendings or not _early(world.agent.pendings[0])
    assert world.core.counters["early_data_bytes"] == 0


def test_an_agent_failure_after_early_confirmation_closes_the_users_channel(
        world: World) -> None:
    world.healthy()
    refused = world.core.counters["sessions_refused"]
    _, channel, conn = world.open()
    world.confirm(channel)
    channel.dataReceived(b"lost")
    world.agent.opens[-1].errback(error.ConchError("connection refused", 2))
    assert conn.sent == [("eof", None), ("close", None)]
    assert world.core.counters["sessions_refused"] == refused + 1
    assert world.core.sessions.active_for_user("alice") == 1, "its row is closed"
    assert world.health() is OpenHealth.FAILING
    # the next open confirms only after the agent's answer, until one succeeds
    later, _, _ = world.open()
    assert isinstance(later, defer.Deferred)
    world.agent.opens[-1].errback(error.ConchError("connection refused", 2))
    assert isinstance(result_of(later).value, error.ConchError), "open failed, as without"
    world.healthy()


def test_a_grants_reload_in_the_early_phase_ends_it_and_the_late_agent_side(
        world: World) -> None:
    world.healthy()
    _, channel, conn = world.open()
    world.confirm(channel)
    rows = list(world.core._aborts)
    assert len(rows) == 1, "the early session can be aborted"
    world.core.abortSession(rows[0], "grant revoked")
    assert conn.sent == [("eof", None), ("close", None)]
    assert world.core.sessions.active_for_user("alice") == 1
    side = FakeSide()
    world.agent.opens[-1].callback(side)
    assert side.abortCalls == 1 and side.bridge is None


def test_without_early_confirm_every_channel_waits_for_the_agent() -> None:
    world = World(early=False)
    for _ in range(2):
        answer, channel, _ = world.open()
        assert isinstance(answer, defer.Deferred)
        world.agent.opens[-1].callback(FakeSide())
        assert result_of(answer) is channel
    assert world.health() is OpenHealth.HEALTHY


def test_an_agent_whose_link_is_down_is_not_confirmed_early(world: World) -> None:
    world.healthy()
    world.agent.transport = None
    answer, _, _ = world.open()
    assert isinstance(answer, defer.Deferred)


def test_a_confirmation_that_could_not_leave_ends_the_session(world: World) -> None:
    """The user's connection stopped in the turn of the open: the channel is never
    confirmed (FlowConnection calls openFailed); the session ends and the agent's side,
    when it opens, is aborted; nothing is sent to the user."""
    world.healthy()
    _, channel, conn = world.open()
    channel.openFailed(error.ConchError("link lost", 2))
    assert world.core.sessions.active_for_user("alice") == 1
    side = FakeSide()
    world.agent.opens[-1].callback(side)
    assert side.abortCalls == 1 and conn.sent == []


@pytest.mark.parametrize("how", ["close", "connection lost"])
def test_a_user_who_leaves_before_the_agent_answers_ends_her_session_at_once(
        world: World, how: str) -> None:
    """Her channel closes (ssh -L's socket closed, or her connection dropped) while the
    agent has not answered: her row closes now, not when (or if) the agent answers; the
    agent's side, when it opens, is aborted and never bridged.  (Before this, the late
    answer bridged a closed channel, and on the link route the session was never
    closed: it counted against her cap for good.)"""
    world.healthy()
    _, channel, conn = world.open()
    world.confirm(channel)
    channel.dataReceived(b"held")
    if how == "close":
        channel.eofReceived()
    channel.localClosed = channel.remoteClosed = True
    channel.closed()  # Conch's channelClosed, after her CLOSE or at serviceStopped
    assert world.core.sessions.active_for_user("alice") == 1, "her row closed at once"
    assert world.core._aborts == {}
    side = FakeSide()
    world.agent.opens[-1].callback(side)
    assert side.abortCalls == 1 and side.bridge is None and side.written == []
    assert [kind for kind, _ in conn.sent if kind in ("data", "eof")] == []
    assert world.core.sessions.active_for_user("alice") == 1
    assert world.health() is OpenHealth.HEALTHY, "the agent's open itself succeeded"


def test_a_bridged_early_channel_forgets_its_unbridged_close_hook(world: World) -> None:
    world.healthy()
    _, channel, _ = world.open()
    world.confirm(channel)
    assert channel.onClosedUnbridged is not None
    world.agent.opens[-1].callback(FakeSide())
    assert channel.onClosedUnbridged is None, "an idle session keeps no closure for it"


# the native thread and held bytes (relay.ssh.nativeforward arms after a read that
# carried a channel's data; held bytes handed on at the bridge count as that read)


@pytest.mark.parametrize("held", [b"GET / HTTP/1.0\r\n\r\n", b""])
def test_held_bytes_handed_on_offer_the_session_to_the_native_thread(
        world: World, held: bytes) -> None:
    """A download begun by one held request must be offered; with nothing held nothing
    is (the next read that carries data arms it, as without early confirmation)."""
    world.healthy()
    _, channel, conn = world.open()
    offers: list[Any] = []
    conn.offerNative = offers.append  # type: ignore[attr-defined]
    world.confirm(channel)
    if held:
        channel.dataReceived(held)  # held: the agent has not answered
    world.agent.opens[-1].callback(FakeSide())
    assert offers == ([channel] if held else [])


def test_an_offer_arms_in_the_next_turn_never_inside_a_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.ssh import connection as flow

    armed: list[Any] = []
    monkeypatch.setattr(flow.nativeforward, "maybe_arm",
                        lambda t: armed.append(t.nativeCandidate))
    clock = MemoryReactorClock()

    class _Transport:
        nativeForward = None
        nativeCandidate = None
        transport = type("TCP", (), {"reactor": clock})()

    conn = flow.FlowConnection()
    conn.transport = _Transport()  # type: ignore[assignment]
    conn._nativeOK = True
    channel = object()
    conn.channelsToRemoteChannel[channel] = 7  # type: ignore[index]
    conn.offerNative(channel)
    assert armed == [], "not inside the turn that handed the bytes on"
    clock.advance(0)
    assert armed == [channel]
    conn._nativeOK = False  # a transport that cannot arm (TLS port, python data path)
    conn.offerNative(channel)
    clock.advance(0)
    assert armed == [channel]


# every order of events in and just after the early phase (found by CI: a user who left
# before the agent answered kept her session row for good on the link route)

_EVENTS = ("data", "user_eof", "user_close", "user_reset", "agent_ok", "agent_fail",
           "reload", "agent_close")


class _Orders:
    """One early session driven through an order of events, every event applied only
    where the protocol allows it (a closed channel gets no data, an agent answers once),
    then brought to its end as real peers would (each side that was told to close
    answers with its close; an agent that has not answered, answers)."""

    def __init__(self, resumable: bool) -> None:
        self.world = World()
        self.world.healthy()
        core = self.world.core
        self.base = core.sessions.active_for_user("alice")
        before = set(core._aborts)
        self.answer, self.channel, self.conn = self.world.open()
        (self.row,) = set(core._aborts) - before
        self.closes: list[bool] = []
        close = core.sessions.close

        def counted(row: Any, *args: Any, **kwargs: Any) -> bool:
            done = close(row, *args, **kwargs)
            if row is self.row:
                self.closes.append(done)
            return done

        core.sessions.close = counted  # type: ignore[method-assign]
        self.inner: BridgedChannel | None = None
        if resumable:  # the link route: the agent's channel under a ResumableSide
            self.inner = BridgedChannel(OPEN_RESUMABLE, remoteWindow=1 << 20,
                                        remoteMaxPacket=32768, conn=FakeSSHConnection())
            sessions = ResumableSessions(Clock(), 60.0, "orders")
            self.side: Any = sessions.open(b"s" * SID_LEN, None, self.inner, "gpu-cluster")
        else:  # the pooled route: a TCP side (its close arrives after an abort)
            self.side = FakeSide()
        self.confirmed = self.user_closed = self.user_eof = self.agent_closed = False
        self.agent = "pending"

    def confirm(self, ok: bool) -> None:
        if ok:
            self.world.confirm(self.channel)
            self.confirmed = True
        else:  # her connection went in the turn of the open (FlowConnection)
            self.channel.openFailed(error.ConchError("link lost", 2))
            self.user_closed = True

    def apply(self, event: str) -> None:
        ch, open_ = self.channel, self.confirmed and not self.user_closed
        if event == "data" and open_ and not self.user_eof:
            ch.localWindowLeft -= 1
            ch.dataReceived(b"x")
        elif event == "user_eof" and open_ and not self.user_eof:
            self.user_eof = True
            ch.eofReceived()
        elif event in ("user_close", "user_reset") and open_:
            if event == "user_close":
                ch.closeReceived()  # her CHANNEL_CLOSE; then Conch's channelClosed
            self._userGone()
        elif event in ("agent_ok", "agent_fail") and self.agent == "pending":
            opened = self.world.agent.opens[-1]
            if event == "agent_ok":
                self.agent = "ok"
                opened.callback(self.side)
            else:
                self.agent = "failed"
                opened.errback(error.ConchError("connection refused", 2))
        elif event == "reload" and self.row in self.world.core.sessions:
            self.world.core.abortSession(self.row, "grant revoked")
        elif event == "agent_close" and self.agent == "ok":
            self._agentGone()

    def _userGone(self) -> None:
        self.user_closed = True
        self.channel.localClosed = self.channel.remoteClosed = True
        self.channel.closed()

    def _agentGone(self) -> None:
        if self.agent_closed:
            return
        self.agent_closed = True
        if self.inner is not None:
            self.inner.closeReceived()
            self.inner.localClosed = self.inner.remoteClosed = True
            self.inner.closed()
        elif self.side.bridge is not None:
            self.side.closed()

    def finish(self) -> None:
        """The peers end what is left: an agent that has not answered answers, and
        every side closes (as its peer does once told to, or on its own)."""
        if self.agent == "pending":
            self.apply("agent_ok")
        if self.confirmed and not self.user_closed:
            self._userGone()
        if self.agent == "ok":
            self._agentGone()


@settings(max_examples=400, deadline=None)
@given(confirmed=st.booleans(), resumable=st.booleans(),
       events=st.lists(st.sampled_from(_EVENTS), max_size=8))
def test_every_order_of_events_ends_the_early_session_exactly_once(
        confirmed: bool, resumable: bool, events: list[str]) -> None:
    run = _Orders(resumable)
    assert run.answer is run.channel, "a healthy service: confirmed early"
    run.confirm(confirmed)
    for event in events:
        run.apply(event)
    run.finish()
    core = run.world.core
    assert run.closes.count(True) == 1, f"the row closed {run.closes.count(True)} times"
    assert run.row not in core.sessions and run.row not in core._aborts
    assert core.sessions.active_for_user("alice") == run.base
    assert run.channel.onClosedUnbridged is None
    if run.agent == "ok" and run.channel.bridge is None:
        # ended before the agent's side opened: that side was aborted, never bridged
        assert run.inner is None or run.inner in run.inner.conn.closes
        assert run.inner is not None or run.side.abortCalls


# the session's opening events, written after its set-up (relay.server.audit.SetupLog)


@pytest.fixture
def events() -> Any:
    """The ``event`` names of what the relay logs meanwhile, in order."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "event" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_setup_log_writes_later_in_order_or_at_a_flush() -> None:
    from twisted.internet.task import Clock

    from relay.server.audit import SETUP_LOG_DELAY, SetupLog

    clock, written = Clock(), []
    log = SetupLog(clock)
    log.later("a", lambda: written.append("a1"))
    log.later("a", lambda: written.append("a2"))
    log.later("b", lambda: written.append("b1"))
    clock.advance(SETUP_LOG_DELAY * 0.9)
    assert written == [] and len(log) == 2
    log.flush("b")
    assert written == ["b1"] and len(clock.getDelayedCalls()) == 1, "b's timer cancelled"
    clock.advance(SETUP_LOG_DELAY * 0.1)
    assert written == ["b1", "a1", "a2"] and len(log) == 0
    log.flush("a")  # nothing held: nothing written twice
    log.later("c", lambda: written.append("c1"))
    log.flushAll()
    assert written[-1] == "c1" and not clock.getDelayedCalls()


def test_an_early_sessions_open_event_is_written_after_its_set_up(
        world: World, events: list[dict[str, Any]]) -> None:
    from relay.server.audit import SETUP_LOG_DELAY

    world.healthy()
    world.clock.advance(SETUP_LOG_DELAY)
    del events[:]
    _, channel, _ = world.open()
    world.confirm(channel)
    world.agent.opens[-1].callback(FakeSide())
    assert [e["event"] for e in events] == [], "nothing written in the set-up's turns"
    world.clock.advance(SETUP_LOG_DELAY)
    (opened,) = events
    assert opened["event"] == "session_open" and opened["early"] is True
    assert opened["user"] == "alice" and opened["service"] == "gpu-cluster:22"
    assert opened["started"] == 0 + SETUP_LOG_DELAY, "the time it opened, not written"


def test_a_held_open_event_comes_before_what_ends_the_session(
        world: World, events: list[dict[str, Any]]) -> None:
    world.healthy()
    _, channel, _ = world.open()
    world.confirm(channel)
    world.agent.opens[-1].errback(error.ConchError("connection refused", 2))
    names = [e["event"] for e in events]
    assert names[-3:] == ["session_open", "relay_session_refused", "session_close"]
    assert names.count("session_open") == 1, "the first, healthy session's is still held"
    assert len(world.core.setupLog) == 1


def test_a_late_sessions_open_event_is_written_before_its_close(
        events: list[dict[str, Any]]) -> None:
    world = World(early=False)
    answer, _channel, _ = world.open()
    world.agent.opens[-1].errback(error.ConchError("connection refused", 2))
    assert isinstance(result_of(answer).value, error.ConchError)
    names = [e["event"] for e in events if e["event"].startswith(("session", "relay_session"))]
    assert names == ["session_open", "session_close", "relay_session_refused"], (
        "the same order as when session_open was written at once")


def test_the_relay_writes_every_held_event_when_it_stops(
        world: World, events: list[dict[str, Any]]) -> None:
    world.healthy()
    world.core.stop()
    assert [e["event"] for e in events].count("session_open") == 1
    assert not world.core.setupLog
