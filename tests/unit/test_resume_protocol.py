"""The resume protocol's state machine (relay.core.resume), with no reactor at all.

Two ends are plain objects passing bytes through lists that stand for channels; a
"link loss" drops whatever is in flight.  Time is a number given in.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.resume import (
    SID_LEN,
    Offer,
    Refusal,
    ResumeRefused,
    ResumeTable,
    Stream,
    StreamState,
    pack_hello,
    pack_hello_reply,
    pack_offer,
    split_sid,
    unpack_hello,
    unpack_hello_reply,
    unpack_offer,
)

SID = b"s" * SID_LEN
GRACE = 60.0


class End:
    """One end of a session: its stream, what it delivered downstream, a window."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.stream = Stream(SID, owner="lab_pc")
        self.window = window
        self.remote_window = window  # what the peer lets us send on this channel
        self.pending: list[bytes] = []  # written, waiting for the window
        self.delivered = bytearray()  # what reached the downstream (TCP) here

    def write(self, data: bytes, wire: list[tuple[str, object]]) -> None:
        self.stream.wrote(data)
        self.pending.append(data)
        self.flush(wire)

    def flush(self, wire: list[tuple[str, object]]) -> None:
        while self.pending and self.remote_window > 0:
            head = self.pending.pop(0)
            now, rest = head[:self.remote_window], head[self.remote_window:]
            if rest:
                self.pending.insert(0, rest)
            self.remote_window -= len(now)
            wire.append(("data", now))

    def receive(self, message: tuple[str, object], back: list[tuple[str, object]]) -> None:
        kind, value = message
        if kind == "data":
            assert isinstance(value, bytes)
            self.stream.got(len(value))
            self.delivered += value
            back.append(("adjust", len(value)))  # delivered downstream: re-open the window
        elif kind == "adjust":
            assert isinstance(value, int)
            self.stream.credited(value)
            self.remote_window += value

    def resume_with(self, peer: Offer, now: float, wire: list[tuple[str, object]]) -> None:
        """Resume on a new channel: a fresh window, the rest sent again first."""
        plan = self.stream.resume(peer, now)
        self.remote_window = self.window
        self.pending = list(plan.retransmit)
        self.flush(wire)


def deliver(wire: list[tuple[str, object]], to: End, back: list[tuple[str, object]],
            count: int | None = None) -> None:
    n = len(wire) if count is None else min(count, len(wire))
    for _ in range(n):
        to.receive(wire.pop(0), back)


def test_bytes_in_flight_when_both_sides_lose_the_link_are_sent_again_once() -> None:
    """Both ends lose the link at once with data in flight both ways and acks lost;
    each offers what it received, each sends the rest again; nothing is lost or
    duplicated, and each kept at most one window."""
    relay, agent = End("relay", 64), End("agent", 64)
    to_agent: list[tuple[str, object]] = []
    to_relay: list[tuple[str, object]] = []
    up, down = os.urandom(300), os.urandom(250)
    relay.write(down[:200], to_agent)
    agent.write(up[:180], to_relay)
    deliver(to_agent, agent, to_relay, count=1)  # some arrive, some acks too
    deliver(to_relay, relay, to_agent, count=2)
    assert relay.stream.unacked <= relay.window + 200 and agent.stream.unacked <= 180
    # the cut: everything in flight is gone, both notice
    to_agent.clear()
    to_relay.clear()
    assert relay.stream.lost(10.0, GRACE) and agent.stream.lost(10.5, GRACE)
    assert relay.stream.state is agent.stream.state is StreamState.HELD
    assert not relay.stream.lost(11.0, GRACE), "held once"
    # more written while held (a read that was under way): kept, sent after resume
    relay.write(down[200:], [])
    agent.write(up[180:], [])
    # the agent offers (new link), the relay answers with its own offer
    offer_a, offer_r = agent.stream.offer(), relay.stream.offer()
    relay.resume_with(offer_a, 20.0, to_agent)
    agent.resume_with(offer_r, 20.0, to_relay)
    for _ in range(50):
        deliver(to_agent, agent, to_relay)
        deliver(to_relay, relay, to_agent)
        relay.flush(to_agent)
        agent.flush(to_relay)
    assert bytes(agent.delivered) == down and bytes(relay.delivered) == up
    assert relay.stream.unacked == agent.stream.unacked == 0
    assert relay.stream.resumes == agent.stream.resumes == 1


def test_duplicate_and_reordered_acknowledgements_are_ignored() -> None:
    s = Stream(SID)
    for chunk in (b"a" * 10, b"b" * 10, b"c" * 10):
        s.wrote(chunk)
    s.ack(15)
    s.ack(15)  # duplicate
    s.ack(5)  # reordered: older than what is known
    assert (s.acked, s.unacked) == (15, 15)
    plan = s.resume(Offer(SID, 15, False), 1.0)
    assert b"".join(plan.retransmit) == b"b" * 5 + b"c" * 10
    s.ack(30)
    s.ack(20)
    assert s.unacked == 0


def test_an_acknowledgement_beyond_what_was_sent_is_refused() -> None:
    s = Stream(SID)
    s.wrote(b"x" * 10)
    with pytest.raises(ResumeRefused) as refused:
        s.credited(11)
    assert refused.value.why is Refusal.BEYOND


def test_a_resume_count_beyond_what_was_sent_is_refused_and_ends_the_session() -> None:
    table = ResumeTable()
    s = table.open(SID, owner="lab_pc")
    s.wrote(b"x" * 100)
    s.lost(0.0, GRACE)
    with pytest.raises(ResumeRefused) as refused:
        table.offered(Offer(SID, 101, False), "lab_pc", 1.0)
    assert refused.value.why is Refusal.BEYOND
    assert s.state is StreamState.ENDED and SID not in table
    with pytest.raises(ResumeRefused) as again:
        table.offered(Offer(SID, 100, False), "lab_pc", 2.0)
    assert again.value.why is Refusal.UNKNOWN


def test_a_count_behind_what_was_acknowledged_or_an_eof_never_sent_is_refused() -> None:
    s = Stream(SID)
    s.wrote(b"x" * 100)
    s.ack(60)
    with pytest.raises(ResumeRefused) as behind:
        s.resume(Offer(SID, 59, False), 1.0)
    assert behind.value.why is Refusal.BEHIND and s.state is StreamState.ENDED
    t = Stream(SID)
    t.wrote(b"y" * 10)
    with pytest.raises(ResumeRefused) as eof:
        t.resume(Offer(SID, 10, True), 1.0)
    assert eof.value.why is Refusal.BEYOND


def test_offers_for_unknown_ended_or_other_keys_sessions_are_refused() -> None:
    table = ResumeTable()
    with pytest.raises(ResumeRefused) as unknown:
        table.offered(Offer(SID, 0, False), "lab_pc", 0.0)
    assert unknown.value.why is Refusal.UNKNOWN
    s = table.open(SID, owner="lab_pc")
    s.lost(0.0, GRACE)
    with pytest.raises(ResumeRefused) as theirs:
        table.offered(Offer(SID, 0, False), "intruder", 1.0)
    assert theirs.value.why is Refusal.NOT_YOURS
    assert s.state is StreamState.HELD, "another key's offer does not end it"
    table.forget(s)  # ended (its bridge closed)
    with pytest.raises(ResumeRefused) as ended:
        table.offered(Offer(SID, 0, False), "lab_pc", 2.0)
    assert ended.value.why is Refusal.UNKNOWN


def test_held_sessions_expire_at_their_deadline_and_then_cannot_resume() -> None:
    table = ResumeTable()
    a = table.open(b"a" * SID_LEN, owner="k")
    b = table.open(b"b" * SID_LEN, owner="k")
    assert table.lost([a], 10.0, 8.0) == [a]
    table.lost([b], 12.0, 8.0)
    assert table.next_deadline() == 18.0
    assert [s.age(15.0) for s in table.held()] == [5.0, 3.0]
    assert table.expired(17.9) == []
    assert table.expired(18.0) == [a] and a.state is StreamState.ENDED
    with pytest.raises(ResumeRefused) as late:
        table.offered(Offer(b"b" * SID_LEN, 0, False), "k", 20.5)
    assert late.value.why is Refusal.EXPIRED and len(table) == 0


def test_an_open_stream_may_be_resumed_when_this_end_missed_the_loss() -> None:
    """The relay may not have noticed the old link die when the agent offers: the
    stream is still OPEN there; the offer resumes it (the old channel is abandoned)."""
    s = Stream(SID)
    s.wrote(b"0123456789")
    plan = s.resume(Offer(SID, 4, False), 3.0)
    assert b"".join(plan.retransmit) == b"456789" and plan.outage == 0.0


def test_eof_is_sent_again_only_if_the_peer_did_not_get_it() -> None:
    s = Stream(SID)
    s.wrote(b"abc")
    s.wrote_eof()
    s.lost(0.0, GRACE)
    assert s.resume(Offer(SID, 1, False), 1.0).resend_eof
    s.lost(2.0, GRACE)
    plan = s.resume(Offer(SID, 3, True), 3.0)
    assert not plan.resend_eof and plan.retransmit == []


def test_wire_formats_round_trip_and_reject_garbage() -> None:
    offer = Offer(SID, 2**40 + 5, True)
    assert unpack_offer(pack_offer(offer)) == offer
    assert unpack_hello_reply(pack_hello_reply(b"i" * 16, 60)) == (b"i" * 16, 60)
    assert unpack_hello(pack_hello(b"a" * 16)) == (1, b"a" * 16)
    head, sid = split_sid(b"fields" + b"\x00\x00\x00\x10" + SID)
    assert (head, sid) == (b"fields", SID)
    for bad in (b"", b"\x00\x00\x00\x10" + SID, b"\x00\x00\x00\x05abcde" + b"\x00" * 9):
        with pytest.raises(ValueError):
            unpack_offer(bad)
    with pytest.raises(ValueError):
        unpack_hello_reply(b"\x00\x00\x00\x00")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.integers(1, 5000), min_size=1, max_size=30),
       st.integers(8, 4096))
def test_unacked_bytes_never_exceed_what_the_window_lets_out(seed: int, writes: list[int],
                                                             window: int) -> None:
    """Whatever the interleaving of writes, deliveries, lost acks and cuts, the
    receiver ends with exactly the sender's bytes, and the sender never keeps more than
    one window plus what was written but not yet let out by the window."""
    rng = random.Random(seed)
    a, b = End("a", window), End("b", window)
    wire: list[tuple[str, object]] = []
    back: list[tuple[str, object]] = []
    sent = bytearray()
    for n in writes:
        data = rng.randbytes(n)
        sent += data
        a.write(data, wire)
        queued = sum(len(p) for p in a.pending)
        assert a.stream.unacked <= window + queued
        deliver(wire, b, back, count=rng.randint(0, len(wire)))
        deliver(back, a, [], count=rng.randint(0, len(back)))
        a.flush(wire)
        if rng.random() < 0.2:  # cut
            wire.clear()
            back.clear()
            a.stream.lost(0.0, GRACE)
            b.stream.lost(0.0, GRACE)
            a.resume_with(b.stream.offer(), 1.0, wire)
            b.stream.resume(a.stream.offer(), 1.0)
    for _ in range(10_000):
        if not (wire or back or a.pending):
            break
        deliver(wire, b, back)
        deliver(back, a, [])
        a.flush(wire)
    assert bytes(b.delivered) == bytes(sent)
