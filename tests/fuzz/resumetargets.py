"""Fuzz targets for the whole resume hello (docs/resilience.md, docs/fuzzing.md), not
only its parsers (``formattargets.resume_wire``): what each end *does* with a hostile
``resume@labrelay`` exchange.  Same contract as :mod:`fuzztargets`, which lists them in
its ``TARGETS``.

- ``resume_hello_agent``: the agent's :meth:`relay.agent.link.Link._hello` on a
  scripted connection, with sessions held from a lost link: the relay's reply (any
  bytes), or its refusal, then its answers to each ``resume-session@labrelay`` offer
  (any confirmation data, refusals, the link lost half-way, time passing, new links).
- ``resume_hello_relay``: the relay's ``RelayCore.globalRequest`` for
  ``resume@labrelay`` with any payload, from the agent whose sessions are held and from
  a user, in any order.

Both must never let an exception out nor log a failure, never grow what they keep
(sessions, replay bytes, the instance ids they remember), and reject cleanly: a
malformed reply or offer answer ends what cannot be resumed with a reason, and nothing
is left held past the grace period.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import fuzzworld as world
from twisted.conch import error
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relay.agent.link import Link
from relay.config.schema import LinkConfig
from relay.core import resume as rs
from relay.datapath.bridge import Bridge
from relay.ssh.channels import BridgedChannel
from relay.ssh.resumable import ResumableSessions, ResumableSide
from relay.testing import FakeSide, FakeSSHConnection

Target = Callable[[bytes], None]
GRACE = 60.0
WINDOW = 1 << 16
MAX_HELD = 4
MAX_STEPS = 32


def _held_link(data: bytes) -> tuple[Link, MemoryReactorClock, list[ResumableSide], int]:
    """An agent link whose 1..4 sessions (``data[0]``) were cut with bytes unacknowledged
    both ways: held, as a lost link leaves them.  The replay bytes they keep, summed."""
    clock = MemoryReactorClock()
    link = Link(LinkConfig(name="fuzz", host="relay.example.org", user="lab_pc",
                           resume_grace=GRACE, fast_path_pool=0), clock, [])
    # Not the process-wide gc + malloc_trim of a real loss (tens of ms an input).
    link.resume = ResumableSessions(clock, GRACE, "link fuzz", release=lambda: False)
    old = FakeSSHConnection()
    sides = []
    for i in range((data[0] if data else 0) % MAX_HELD + 1):
        ch = BridgedChannel(rs.OPEN_RESUMABLE, remoteWindow=WINDOW, remoteMaxPacket=32768,
                            conn=old)
        side = link.resume.open(bytes([i + 1]) * rs.SID_LEN, None, ch, f"s{i}")
        target = FakeSide()
        Bridge(target, side)
        target.receive(b"u" * (100 * i + 7))  # sent to the relay, never acknowledged
        ch.dataReceived(b"r" * (50 * i + 3))  # received from it
        ch.closed()  # the link went
        sides.append(side)
    clock.advance(0)
    assert all(s.held for s in sides)
    return link, clock, sides, sum(s.stream.unacked for s in sides)


def _lost(conn: FakeSSHConnection) -> None:
    """The link goes: pending requests and opens fail as Conch fails them on a stopped
    connection, open channels close."""
    for _, _, d in conn.globalRequests:
        if not d.called:
            d.errback(error.ConchError("Connection stopped."))
    for ch, _ in conn.opens:
        if not ch.opened.called:
            ch.openFailed(Failure(ConnectionLost("the link went")))
        else:
            ch.closed()


def resume_hello_agent(data: bytes) -> None:
    """The agent's whole resume hello on a new link (records: ``sel, len u16, payload``;
    ``sel % 7`` picks a new link and hello, the relay's reply = payload, its refusal,
    confirm the next offer with payload as its counts, refuse it with payload as its
    reason, lose the link, or let ``payload[0]`` seconds pass).  Nothing escapes and no
    failure is logged; no session, channel per link or replay byte is added to what the
    cut left; a malformed reply ends every held session with a reason; a session whose
    offer is answered with bad counts ends and its channel is aborted; a resumed one
    runs on the new link's channel; none is held past the grace period."""
    link, clock, sides, replay = _held_link(data)
    conn: FakeSSHConnection | None = None
    for sel, payload in world.records(data[1:])[:MAX_STEPS]:
        op = sel % 7
        if op == 0 or conn is None:
            if conn is not None:
                _lost(conn)
            conn = FakeSSHConnection()
            link.connection = conn  # type: ignore[assignment]
            link._hello(conn)  # type: ignore[arg-type]
            assert [k for k, _, _ in conn.globalRequests] == [rs.HELLO], conn.globalRequests
            continue
        pending = [d for _, _, d in conn.globalRequests if not d.called]
        offers = [ch for ch, _ in conn.opens if not ch.opened.called]
        if op == 1 and pending:
            held = [s for s in sides if s.held]
            pending[0].callback(payload)
            try:
                instance, _ = rs.unpack_hello_reply(payload)
            except ValueError:
                assert not any(s.held for s in sides), "a malformed reply kept sessions held"
                assert conn.opens == [] and not conn.resumable
            else:
                assert conn.resumable and link._relayInstance == instance
                assert len(conn.opens) <= len(held)
        elif op == 2 and pending:
            pending[0].errback(error.ConchError("global request failed", payload))
            assert not any(s.held for s in sides), "refused, yet sessions stay held"
        elif op == 3 and offers:
            ch = offers[0]
            sid = rs.unpack_offer(next(x for c, x in conn.opens if c is ch)).sid
            side = next(s for s in sides if s.sid == sid)
            ch.remoteWindowLeft, ch.remoteMaxPacket = WINDOW, 32768  # as Conch does first
            ch.channelOpen(payload)
            try:
                rs.unpack_counts(payload)
            except ValueError:
                assert side.stream.state is rs.StreamState.ENDED, "bad counts, not ended"
            assert side.channel is ch or side.stream.state is rs.StreamState.ENDED
        elif op == 4 and offers:
            offers[0].openFailed(Failure(error.ConchError(payload[:200], 2)))
        elif op == 5:
            _lost(conn)
            link.connection = None
            conn = None
        elif op == 6:
            clock.advance(payload[0] if payload else 1)
        _check_agent(link, sides, replay, conn)
    if conn is not None:
        _lost(conn)
    link.connection = None
    clock.advance(GRACE + 1)
    assert not any(s.held for s in sides), "held past the grace period"
    assert clock.getDelayedCalls() == [], clock.getDelayedCalls()
    world.no_failures_logged()


def _check_agent(link: Link, sides: list[ResumableSide], replay: int,
                 conn: FakeSSHConnection | None) -> None:
    assert link.resume is not None
    assert len(link.resume.sides) <= len(sides), "a session appeared"
    assert sum(s.stream.unacked for s in sides) <= replay, "replay grew"
    assert link._relayInstance is None or 1 <= len(link._relayInstance) <= 64
    if conn is not None:
        assert len(conn.opens) <= len(sides), "more offers than held sessions"
        assert len(conn.globalRequests) == 1, "more than one hello on a link"
        assert conn.sent <= replay, "sent again more than was held"
    for s in sides:
        assert s.held or s.stream.state is rs.StreamState.ENDED or (
            s.channel is not None and conn is not None
            and any(s.channel is ch for ch, _ in conn.opens)), s.label


# --- the relay's end --------------------------------------------------------------


def resume_hello_relay(data: bytes) -> None:
    """``resume@labrelay`` hellos (records: ``sel, len u16, payload``; bit 7 of ``sel``:
    from the user, else from the agent whose previous instance left two sessions held)
    and time passing.  Every hello is answered ``False`` (a user, a malformed hello) or
    with this relay's instance and grace; only an agent's well-formed hello with
    another instance ends its held sessions (a restarted agent), one with the old
    instance keeps them; nothing escapes, no failure is logged, nothing is added."""
    core, clock = world.new_core()
    agent = world.new_connection(core, "agent")[0]
    user = world.new_connection(core, "user")[0]
    key = agent.identity.key_blob
    old_instance = b"agent-instance-1"
    sessions = core.resumes.sessions
    sessions._release = lambda: False  # not the process-wide gc + malloc_trim (~55 ms)
    link = FakeSSHConnection()
    for i in range(2):
        ch = BridgedChannel(rs.OPEN_RESUMABLE, remoteWindow=WINDOW, remoteMaxPacket=32768,
                            conn=link)
        owner = rs.ResumeOwner(key, old_instance, "")
        side = sessions.open(bytes([i + 9]) * rs.SID_LEN, owner, ch, f"h{i}")
        user_end = FakeSide()
        Bridge(user_end, side)
        user_end.receive(b"x" * 10)
        ch.closed()
    clock.advance(0)
    held = sessions.held_sides()
    assert len(held) == 2
    reply = rs.pack_hello_reply(core.resumes.instance, core.resumes.grace)
    for sel, payload in world.records(data)[:MAX_STEPS]:
        if sel % 8 == 7:
            clock.advance(payload[0] if payload else 1)
            continue
        conn = user if sel & 0x80 else agent
        was_held = [s for s in held if s.held]
        answer = core.globalRequest(conn, rs.HELLO, payload)
        try:
            _, instance = rs.unpack_hello(payload)
        except ValueError:
            instance = None
        if conn is user or instance is None:
            assert answer is False, answer
            assert [s for s in held if s.held] == was_held, "a refused hello ended sessions"
            continue
        assert answer == (True, reply), answer
        assert agent.agent_instance == instance and len(instance) <= 64
        still = [s for s in held if s.held]
        assert still == (was_held if instance == old_instance else []), (instance, still)
        assert len(sessions.sides) <= 2, "a session appeared"
    for conn in (user, agent):
        conn.serviceStopped()
    clock.advance(GRACE + 1)
    assert sessions.held_sides() == []
    core.dataport.stop()
    world.no_failures_logged()


TARGETS: dict[str, Target] = {
    "resume_hello_agent": resume_hello_agent,
    "resume_hello_relay": resume_hello_relay,
}


# --- seeds (make_corpus.py) ----------------------------------------------------------


def _r(sel: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", sel, len(payload)) + payload


def agent_seeds() -> dict[str, bytes]:
    good = rs.pack_hello_reply(b"relay-instance-1", 60)
    return {
        "resume-all": b"\x03" + _r(0) + _r(1, good) + b"".join(
            _r(3, rs.pack_counts(0, False)) for _ in range(4)),
        "bad-counts": b"\x01" + _r(0) + _r(1, good) + _r(3, rs.pack_counts(2**40, True))
        + _r(3, b"\x00"),
        "malformed-reply": b"\x02" + _r(0) + _r(1, b"\x00\x00\x00\x01\xff"),
        "refused": b"\x00" + _r(0) + _r(2, b"\x00"),
        "offer-refused": b"\x01" + _r(0) + _r(1, good) + _r(4, b"no such session"),
        "restarted": b"\x01" + _r(0) + _r(1, good) + _r(5) + _r(0)
        + _r(1, rs.pack_hello_reply(b"relay-instance-2", 60)) + _r(3, rs.pack_counts(0, False)),
        "lost-mid-offer": b"\x03" + _r(0) + _r(1, good) + _r(5) + _r(6, b"\x3d"),
        "long-instance": b"\x00" + _r(0) + _r(1, struct.pack(">L", 65) + b"i" * 65 + b"\0" * 4),
    }


def relay_seeds() -> dict[str, bytes]:
    same, other = rs.pack_hello(b"agent-instance-1"), rs.pack_hello(b"agent-instance-2")
    return {
        "same": _r(0, same) + _r(0, same),
        "restarted": _r(0, other),
        "user": _r(0x80, same) + _r(0x80, other),
        "malformed": _r(0, b"\x00\x00\x00\x01") + _r(0, struct.pack(">LL", 1, 2**31)),
        "empty-instance": _r(0, struct.pack(">LL", 1, 0)),
        "expire": _r(0, same) + _r(7, b"\x3d") + _r(0, other),
    }


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "resume_hello_agent": agent_seeds,
    "resume_hello_relay": relay_seeds,
}
