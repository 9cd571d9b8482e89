"""The shell of the resume protocol (relay.ssh.resumable, relay.server.resumes) with no
reactor: channels on a scripted connection, time on a ``task.Clock``.

What a held session keeps besides its bytes: whose they are on a congested link (the
fair share's tag, relay.core.fairshare), so that a session resumed on a new channel is
scheduled as its user's again, at the agent from what it knew and at the relay from
its session row (which also re-sends the tag to the agent); and that the sessions of
a lost link, once all held, give back what was in flight on it once.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock

from relay.core.resume import OPEN_RESUMABLE, RESUME_CHANNEL, SID_LEN, Offer, pack_offer
from relay.datapath.bridge import Bridge
from relay.server.resumes import RelayResumes
from relay.server.sharing import Sharing
from relay.ssh.channels import BridgedChannel
from relay.ssh.resumable import HELD, RELEASE_EVERY, ResumableSessions
from relay.ssh.wire import SHARE, pack_share
from relay.testing import FakeSide, FakeSSHConnection

SID = b"k" * SID_LEN
WINDOW = 1 << 20


def channel(kind: bytes, link: FakeSSHConnection) -> BridgedChannel:
    return BridgedChannel(kind, remoteWindow=WINDOW, remoteMaxPacket=32 * 1024, conn=link)


def test_the_agent_schedules_a_resumed_session_as_its_user_again() -> None:
    clock, releases = Clock(), []
    sessions = ResumableSessions(clock, 60.0, "link test",
                                 release=lambda: releases.append(clock.seconds()) or True)
    old = FakeSSHConnection()
    old.takesShare = True  # the agent's link: the relay tags its channels
    ch1 = channel(OPEN_RESUMABLE, old)
    assert ch1.requestReceived(SHARE, pack_share("alice", 2.0)) == 1  # the relay's tag
    side = sessions.open(SID, None, ch1, "web from 10.0.0.9:5000")
    target = FakeSide()
    Bridge(target, side)
    target.receive(b"hello ")
    ch1.closed()  # the link went (no CHANNEL_CLOSE from the peer)
    assert side.held and HELD in target.pauses
    clock.advance(0)  # once all are held: what was in flight is given back, once
    assert releases == [0.0]

    new = FakeSSHConnection()
    ch2 = channel(RESUME_CHANNEL, new)
    side.resumeOn(ch2, side.stream.resume(Offer(SID, 0, False), clock.seconds()))
    assert (ch2.shareUser, ch2.shareWeight) == ("alice", 2.0)
    assert new.scheduler.weight("alice") == 2.0
    assert new.data == [b"hello "]  # sent again, as alice's
    assert HELD not in target.pauses


def test_the_relay_tags_a_resumed_channel_from_its_row_and_tells_the_agent() -> None:
    clock = Clock()
    sharing = Sharing(SimpleNamespace(principals=lambda: []), clock)
    resumes = RelayResumes(clock, 60.0, retag=sharing.tagAgentChannel)
    owner = (b"agent key", b"instance")
    old, new = FakeSSHConnection(), FakeSSHConnection()
    ch1 = channel(OPEN_RESUMABLE, old)
    side = resumes.sessions.open(SID, owner, ch1, "web:8080 from 10.0.0.9:5000")
    side.row = SimpleNamespace(user="alice", agent=old)
    sharing.tagAgentChannel(side, "alice")
    # The agent is told with the channel's first packet (BridgedChannel.announce).
    assert ch1.shareUser == "alice" and old.channelRequests == []
    user = FakeSide()
    Bridge(user, side)
    user.receive(b"hi")
    assert old.channelRequests == [(ch1, SHARE, pack_share("alice", 1.0))] and old.data == [b"hi"]
    ch1.closed()
    assert side.held

    ch2 = resumes.sessions.accept(new, owner, WINDOW, 32 * 1024, WINDOW, 32 * 1024,
                                  pack_offer(Offer(SID, 0, False)))
    assert ch2.name == RESUME_CHANNEL
    ch2.channelOpen(b"")  # confirmed: the session carries on over it
    assert side.channel is ch2 and side.row.agent is new
    assert ch2.shareUser == "alice"
    assert new.data == [b"hi"]  # sent again
    user.receive(b" again")  # the tag goes with the new channel's next packet
    assert new.channelRequests == [(ch2, SHARE, pack_share("alice", 1.0))]
    assert new.data == [b"hi", b" again"]


def test_memory_is_given_back_once_per_loss_and_at_most_every_few_seconds() -> None:
    clock, releases = Clock(), []
    sessions = ResumableSessions(clock, 60.0, "link test",
                                 release=lambda: releases.append(clock.seconds()) or True)
    sides = []
    for i in range(3):
        ch = channel(OPEN_RESUMABLE, FakeSSHConnection())
        side = sessions.open(bytes([i]) * SID_LEN, None, ch, f"s{i}")
        Bridge(FakeSide(), side)
        sides.append((ch, side))
    for ch, _ in sides[:2]:
        ch.closed()
    clock.advance(0)
    assert releases == [0.0]  # two held together: one release
    clock.advance(1)
    sides[2][0].closed()
    clock.advance(0)
    assert releases == [0.0]  # too soon after the last one
    assert len(sessions.held_sides()) == 3
    clock.advance(RELEASE_EVERY)
    ch = channel(OPEN_RESUMABLE, FakeSSHConnection())
    side = sessions.open(b"z" * SID_LEN, None, ch, "late")
    Bridge(FakeSide(), side)
    ch.closed()
    clock.advance(0)
    assert releases == [0.0, 1.0 + RELEASE_EVERY]


def test_a_side_aborted_before_its_bridge_attached_reports_its_end_at_attach() -> None:
    """A bridge made with its other side already closed aborts this one while it is
    being made, before attaching it (relay.datapath.bridge); the bridge must still hear
    that it ended, or the session never closes (an early-confirmed user channel closed
    before its agent answered, on the link route, left its row open for good)."""
    sessions = ResumableSessions(Clock(), 60.0, "link test")
    side = sessions.open(SID, None, channel(OPEN_RESUMABLE, FakeSSHConnection()), "web")
    ended: list[tuple[int, int]] = []

    class _Closed(FakeSide):
        def attach(self, bridge: Bridge) -> None:
            super().attach(bridge)
            bridge.sideClosed(self, clean=False)  # as a closed BridgedChannel does

    Bridge(_Closed(), side, onClosed=lambda a, b: ended.append((a, b)))
    assert ended == [(0, 0)], "the bridge never heard its second side end"


def test_a_held_sessions_status_row_counts_down_to_its_reset() -> None:
    """resilience.md, "Settings and what to watch": each held session is listed with
    its age, its unacknowledged bytes and the seconds left before it is reset; at the
    grace its other side is reset (never an EOF) and the row is gone.  (The status
    page's tests feed it made-up rows; nothing else computed ``expires_in``.)"""
    clock = Clock()
    sessions = ResumableSessions(clock, 60.0, "link test")
    ch = channel(OPEN_RESUMABLE, FakeSSHConnection())
    side = sessions.open(SID, None, ch, "web from 10.0.0.9:5000")
    target = FakeSide()
    Bridge(target, side)
    target.receive(b"x" * 1000)  # sent on the link, never acknowledged
    clock.advance(5)
    ch.closed()  # the link went
    assert sessions.status() == [{"session": "web from 10.0.0.9:5000", "id": SID.hex()[:8],
                                  "age": 0.0, "unacked_bytes": 1000, "expires_in": 60.0}]
    clock.advance(45)
    [row] = sessions.status()
    assert (row["age"], row["expires_in"], row["unacked_bytes"]) == (45.0, 15.0, 1000)
    assert target.abortCalls == 0
    clock.advance(15)
    assert sessions.status() == []
    assert target.abortCalls == 1 and not target.wroteEOF
