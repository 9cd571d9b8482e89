"""Property tests (Hypothesis) for the whole resume hello at each end
(:mod:`resumetargets`): sequences of link events and the relay's answers, built from
well-formed messages with hostile values mixed in, run through the same targets the
corpus and atheris run; and the clean rejections spelled out once each.
"""

from __future__ import annotations

import struct

import pytest
import resumetargets as rt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core import resume as rs
from relay.testing import FakeSSHConnection

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_replies = st.one_of(
    st.builds(rs.pack_hello_reply, st.binary(min_size=1, max_size=64),
              st.integers(0, 2**32 - 1)),
    st.builds(lambda n, body: struct.pack(">L", n) + body, st.integers(0, 2**32 - 1),
              st.binary(max_size=80)),
    st.binary(max_size=40),
)
_counts = st.one_of(
    st.builds(rs.pack_counts, st.integers(0, 2000), st.booleans()),
    st.builds(rs.pack_counts, st.integers(0, rs.MAX_COUNT), st.booleans()),
    st.binary(max_size=12),
)
_step = st.one_of(
    st.just((0, b"")),
    st.tuples(st.just(1), _replies),
    st.tuples(st.just(2), st.binary(max_size=8)),
    st.tuples(st.just(3), _counts),
    st.tuples(st.just(4), st.binary(max_size=30)),
    st.just((5, b"")),
    st.tuples(st.just(6), st.binary(min_size=1, max_size=1)),
)


def _script(first: int, steps: list[tuple[int, bytes]]) -> bytes:
    return bytes((first,)) + b"".join(rt._r(op, payload) for op, payload in steps)


@FAST
@given(st.integers(0, 255), st.lists(_step, max_size=24))
def test_the_agent_survives_any_sequence_of_relay_answers(
        first: int, steps: list[tuple[int, bytes]]) -> None:
    rt.resume_hello_agent(_script(first, steps))


_hellos = st.one_of(
    st.builds(rs.pack_hello, st.sampled_from([b"agent-instance-1", b"agent-instance-2"])),
    st.builds(rs.pack_hello, st.binary(min_size=1, max_size=64)),
    st.builds(lambda v, n, body: struct.pack(">LL", v, n) + body, st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1), st.binary(max_size=80)),
    st.binary(max_size=30),
)


@FAST
@given(st.lists(st.tuples(st.sampled_from([0, 0x80, 7]), _hellos), max_size=16))
def test_the_relay_survives_any_sequence_of_hellos(steps: list[tuple[int, bytes]]) -> None:
    rt.resume_hello_relay(b"".join(rt._r(sel, payload) for sel, payload in steps))


def test_a_malformed_reply_ends_every_held_session_with_a_reason() -> None:
    link, _, sides, _ = rt._held_link(b"\x03")
    conn = FakeSSHConnection()
    link.connection = conn  # type: ignore[assignment]
    link._hello(conn)  # type: ignore[arg-type]
    conn.globalRequests[0][2].callback(b"\x00\x00\x00\x05abc")
    assert len(sides) == 4 and not any(s.held for s in sides)
    assert all(s.stream.state is rs.StreamState.ENDED for s in sides)
    assert conn.opens == [] and not conn.resumable


def test_counts_beyond_what_was_sent_end_that_session_only() -> None:
    link, _, sides, replay = rt._held_link(b"\x01")
    conn = FakeSSHConnection()
    link.connection = conn  # type: ignore[assignment]
    link._hello(conn)  # type: ignore[arg-type]
    conn.globalRequests[0][2].callback(rs.pack_hello_reply(b"relay", 60))
    (bad, _), (good, _) = conn.opens
    for ch in (bad, good):  # as Conch sets them from the confirmation
        ch.remoteWindowLeft, ch.remoteMaxPacket = rt.WINDOW, 32768
    bad.channelOpen(rs.pack_counts(2**40, False))  # the relay claims bytes never sent
    good.channelOpen(rs.pack_counts(0, False))
    assert sides[0].stream.state is rs.StreamState.ENDED and sides[0].channel is not bad
    assert sides[1].channel is good and not sides[1].held
    assert conn.sent == sides[1].stream.unacked <= replay  # only the good one sent again


@pytest.mark.parametrize("target", sorted(rt.TARGETS))
def test_every_seed_replays(target: str) -> None:
    for data in rt.SEEDS[target]().values():
        rt.TARGETS[target](data)
