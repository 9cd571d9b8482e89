"""A channel's first bytes before its open is confirmed (relay.ssh.earlydata,
``early-data@labrelay``): the relay's side (``BridgedChannel.sendEarly`` and the skip
when the bridge writes them), the agent's side (``FlowConnection`` with an
``EarlyIntake``), the wire format, and the relay's choice of when to send them
(relay.server.opening).  tests/integration/test_earlyconfirm.py runs them between a
real relay and agent under stock ssh.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import common, connection
from twisted.internet import defer

from relay.ssh.channels import BridgedChannel
from relay.ssh.connection import FlowConnection
from relay.ssh.earlydata import EarlyError, EarlyFeed, EarlyIntake, EarlySend
from relay.ssh.wire import (
    EARLY_DATA,
    EARLY_LIMIT,
    SHARE,
    pack_early_data,
    pack_early_data_ok,
    pack_share,
    unpack_early_data,
    unpack_early_data_ok,
)
from relay.testing import FakeSSHConnection
from relay.testing.ssh import FakeSSHTransport

# the wire


def test_the_payloads_round_trip_and_malformed_ones_are_refused() -> None:
    assert unpack_early_data(pack_early_data(7, b"hello")) == (7, b"hello")
    assert unpack_early_data_ok(pack_early_data_ok(EARLY_LIMIT)) == EARLY_LIMIT
    assert unpack_early_data_ok(pack_early_data_ok(1 << 30)) == EARLY_LIMIT, "capped"
    for bad in (b"", b"\x00\x00\x00\x07", pack_early_data(7, b"hello")[:-1],
                pack_early_data(7, b"hello") + b"x"):
        with pytest.raises(ValueError):
            unpack_early_data(bad)
    with pytest.raises(ValueError):
        unpack_early_data_ok(b"\x00")


# the relay's side: what goes early is a prefix, within the limit


def test_what_goes_early_is_a_prefix_within_the_limit() -> None:
    send = EarlySend(10)
    assert send.take(4) and send.take(6)
    assert not send.take(1), "past the limit"
    assert not send.take(0), "and nothing after it, ever"
    assert send.sent == 10
    assert send.skipped(3) == 3 and send.skipped(20) == 7 and send.skipped(5) == 0
    closed = EarlySend(10)
    closed.close()
    assert not closed.take(1), "the agent answered: the rest is CHANNEL_DATA"
    assert not EarlySend(0).take(1)


def _agentChannel(conn: FakeSSHConnection, limit: int = EARLY_LIMIT) -> BridgedChannel:
    channel = BridgedChannel(b"forwarded-tcpip", window=1 << 20, conn=conn)
    channel.id = 3
    channel.allowEarly(limit)
    return channel


def _confirm(channel: BridgedChannel, window: int, maxPacket: int = 32768) -> None:
    """What Conch does with the agent's CHANNEL_OPEN_CONFIRMATION."""
    channel.remoteWindowLeft = window
    channel.remoteMaxPacket = maxPacket
    channel.channelOpen(b"")


def test_early_bytes_are_not_sent_again_and_count_in_the_window() -> None:
    conn = FakeSSHConnection()
    channel = _agentChannel(conn)
    assert channel.sendEarly(b"GET / HTTP/1.1\r\n")
    assert channel.sendEarly(b"Host: x\r\n")
    requests = [(kind, unpack_early_data(data)) for kind, data, _ in conn.globalRequests]
    assert requests == [(EARLY_DATA, (3, b"GET / HTTP/1.1\r\n")), (EARLY_DATA, (3, b"Host: x\r\n"))]
    _confirm(channel, window=1000)
    assert not channel.sendEarly(b"late"), "after the answer: CHANNEL_DATA only"
    # the bridge then writes what it held, from the start of the stream, then more
    channel.write(b"GET / HTTP/1.1\r\n")
    channel.write(b"Host: x\r\n\r\n")
    assert conn.data == [b"\r\n"], "only what did not go early"
    assert channel.remoteWindowLeft == 1000 - len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=900), min_size=1, max_size=12),
       limit=st.integers(min_value=0, max_value=4000),
       writes=st.lists(st.integers(min_value=1, max_value=1500), min_size=1, max_size=20))
def test_the_peer_gets_every_byte_once_in_order(chunks: list[bytes], limit: int,
                                                writes: list[int]) -> None:
    """Whatever goes early and however the bridge's writes are cut, the agent receives
    the stream exactly once, in order, and the window counts every byte."""
    conn = FakeSSHConnection()
    channel = _agentChannel(conn, limit)
    early = b"".join(c for c in chunks if channel.sendEarly(c))
    stream = b"".join(chunks) + b"tail"
    assert stream.startswith(early)
    _confirm(channel, window=1 << 20)
    offset, i = 0, 0
    while offset < len(stream):
        n = writes[i % len(writes)]
        channel.write(stream[offset:offset + n])
        offset, i = offset + n, i + 1
    sent = b"".join(unpack_early_data(d)[1] for _, d, _ in conn.globalRequests)
    assert sent + b"".join(conn.data) == stream
    assert channel.remoteWindowLeft == (1 << 20) - len(stream)


def test_a_refused_open_sends_nothing_more_early() -> None:
    conn = FakeSSHConnection()
    channel = _agentChannel(conn)
    channel.opened.addErrback(lambda _: None)
    channel.openFailed(Exception("connect failed"))
    assert not channel.sendEarly(b"x") and not conn.globalRequests


def test_a_channel_not_allowed_early_bytes_never_sends_them() -> None:
    conn = FakeSSHConnection()
    channel = BridgedChannel(b"forwarded-tcpip", conn=conn)
    assert not channel.sendEarly(b"x") and not conn.globalRequests


# the agent's side: a real FlowConnection with an EarlyIntake


class _Agent(FlowConnection):
    """The agent's connection service: opens answered at once, or when the test says."""

    def __init__(self, later: bool = False) -> None:
        super().__init__()
        self.transport = FakeSSHTransport()
        self.early = EarlyIntake()
        self.later = later
        self.made: list[BridgedChannel] = []
        self.answers: list[defer.Deferred[Any]] = []

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int,
                   data: bytes) -> Any:
        channel = BridgedChannel(channelType, window=64 * 1024, remoteWindow=windowSize,
                                 remoteMaxPacket=maxPacket)
        self.made.append(channel)
        if not self.later:
            return channel
        d: defer.Deferred[Any] = defer.Deferred()
        self.answers.append(d)
        return d


def _open(agent: _Agent, sender: int) -> None:
    head = common.NS(b"forwarded-tcpip") + struct.pack(">3L", sender, 1 << 20, 32768)
    agent.ssh_CHANNEL_OPEN(head + common.NS(b"web") + struct.pack(">L", 80)
                           + common.NS(b"10.0.0.1") + struct.pack(">L", 5))


def _held(channel: BridgedChannel) -> bytes:
    return b"".join(channel._early or [])


def test_the_agent_takes_early_bytes_for_a_channel_it_confirmed() -> None:
    agent = _Agent()
    _open(agent, sender=9)
    (channel,) = agent.made
    agent.earlyReceived(pack_early_data(9, b"hello"))
    assert _held(channel) == b"hello", "delivered, for the bridge to hand on"
    assert channel.localWindowLeft == 64 * 1024 - 5, "out of the window it confirmed"
    assert agent.transport.kinds() == [connection.MSG_CHANNEL_OPEN_CONFIRMATION]


def test_early_bytes_for_an_open_being_answered_wait_for_its_answer() -> None:
    agent = _Agent(later=True)
    _open(agent, sender=9)
    agent.earlyReceived(pack_early_data(9, b"hel"))
    agent.earlyReceived(pack_early_data(9, b"lo"))
    (channel,) = agent.made
    assert _held(channel) == b""
    agent.answers[0].callback(channel)
    assert _held(channel) == b"hello"
    assert channel.localWindowLeft == 64 * 1024 - 5


def test_early_bytes_for_a_refused_open_or_an_unknown_channel_are_dropped() -> None:
    agent = _Agent(later=True)
    _open(agent, sender=9)
    agent.earlyReceived(pack_early_data(9, b"lost"))
    agent.answers[0].errback(Exception("connect failed"))
    agent.earlyReceived(pack_early_data(9, b"after the refusal"))
    agent.earlyReceived(pack_early_data(77, b"never opened"))
    assert not agent.transport.disconnects
    assert agent.early is not None and not agent.early._pending and not agent.early._channels


def test_more_than_the_limit_is_a_protocol_error() -> None:
    for later in (False, True):
        agent = _Agent(later=later)
        _open(agent, sender=9)
        agent.earlyReceived(pack_early_data(9, b"x" * EARLY_LIMIT))
        assert not agent.transport.disconnects
        agent.earlyReceived(pack_early_data(9, b"y"))
        assert agent.transport.disconnects, "past the limit"


def test_a_malformed_request_is_a_protocol_error() -> None:
    agent = _Agent()
    agent.earlyReceived(b"\x00\x00")
    assert agent.transport.disconnects


def test_a_closed_channel_is_forgotten() -> None:
    intake = EarlyIntake(100)
    intake.opening(1)
    channel = BridgedChannel(b"forwarded-tcpip", window=1000)
    assert intake.confirmed(1, channel) == []
    intake.closed(1)
    assert intake.received(1, b"x") is None
    with pytest.raises(EarlyError):
        intake.opening(2)
        intake.received(2, b"x" * 101)


def test_the_feed_sends_a_sessions_bytes_until_the_bridge_takes_over() -> None:
    counters = {"early_data_sessions": 0, "early_data_bytes": 0}
    conn = FakeSSHConnection()
    feed = EarlyFeed(counters)
    feed.offer(b"nowhere yet")  # no pending channel: nothing goes early
    feed.pending(_agentChannel(conn), holding=False)
    feed.offer(b"abc")
    feed.offer(b"de")
    assert counters == {"early_data_sessions": 1, "early_data_bytes": 5}
    feed.stop()
    feed.offer(b"late")
    assert [unpack_early_data(d)[1] for _, d, _ in conn.globalRequests] == [b"abc", b"de"]
    held = EarlyFeed(counters)
    held.pending(_agentChannel(FakeSSHConnection()), holding=True)
    held.offer(b"x")
    assert counters["early_data_sessions"] == 1, "bytes held already: no prefix, none go"


def test_the_share_tag_goes_even_when_every_byte_went_early() -> None:
    """The relay's share@labrelay rides a channel's next packet; when the bridge's
    first writes were all sent early there is none, so it goes on its own: the agent
    schedules the reply as that user's (found by the resume test's public ports)."""
    conn = FakeSSHConnection()
    channel = _agentChannel(conn)
    assert channel.sendEarly(b"GET / HTTP/1.1\r\n\r\n")
    _confirm(channel, window=1000)
    channel.announce(SHARE, pack_share("alice", 2.0))
    channel.write(b"GET / HTTP/1.1\r\n\r\n")
    assert conn.data == []
    assert [(kind, data) for _, kind, data in conn.channelRequests] == [
        (SHARE, pack_share("alice", 2.0))]


def test_nothing_goes_early_past_a_congested_link() -> None:
    """While the link's fair share holds bytes, her first bytes wait for the answer like
    any channel data (through the scheduler), and none after them go early."""
    conn = FakeSSHConnection()
    channel = _agentChannel(conn)
    conn.congested = True  # type: ignore[attr-defined]
    assert not channel.sendEarly(b"first")
    conn.congested = False  # type: ignore[attr-defined]
    assert not channel.sendEarly(b"second"), "only a prefix goes early"
    assert not conn.globalRequests
    queued = _agentChannel(FakeSSHConnection())
    queued.conn.scheduler.push("flow", "bob", b"x" * 10, 10)
    assert not queued.sendEarly(b"first")
