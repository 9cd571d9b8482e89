"""The fair-share scheduler and the token bucket, with plain calls and ``now`` values.

The scheduler is driven as the link drives it: every flow keeps a backlog (its
source refills it as fast as the link takes bytes), and the link pops a fixed
number of bytes; what each user got is then compared with its share.  The token
bucket is driven by ``task.Clock``: a source that pauses for as long as the bucket
says moves ``rate`` bytes per second."""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet import task

from relay.core.fairshare import FairScheduler, jain_index
from relay.core.ratelimit import DOWN, UP, Limit, TokenBucket, UserLimits

PACKET = 32 * 1024


def run_link(sched: FairScheduler[str], flows: dict[str, str], total: int,
             packet: int = PACKET, backlog: int = 4) -> Counter[str]:
    """Keep ``backlog`` packets queued per flow, pop ``total`` bytes; bytes per user."""
    got: Counter[str] = Counter()
    for flow, user in flows.items():
        for _ in range(backlog):
            sched.push(flow, user, flow, packet)
    moved = 0
    while moved < total:
        popped = sched.pop()
        assert popped is not None
        flow, _ = popped
        got[flows[str(flow)]] += packet
        moved += packet
        sched.push(flow, flows[str(flow)], str(flow), packet)  # the source refills it
    return got


def share(got: Counter[str], user: str) -> float:
    return got[user] / sum(got.values())


def test_one_stream_against_eight_gets_half() -> None:
    flows = {"a1": "alice"} | {f"b{i}": "bob" for i in range(8)}
    got = run_link(FairScheduler(), flows, 64 * 1024 * 1024)
    assert share(got, "alice") == pytest.approx(0.5, abs=0.01)


def test_weights_two_to_one() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.set_weight("alice", 2)
    flows = {"a1": "alice"} | {f"b{i}": "bob" for i in range(8)}
    got = run_link(sched, flows, 64 * 1024 * 1024)
    assert share(got, "alice") == pytest.approx(2 / 3, abs=0.01)


def test_a_flow_queued_under_no_one_takes_its_users_weight_once_tagged() -> None:
    """The agent's view of a download whose request went ahead as early data: its
    bytes are queued before the relay says whose session it is (user "", weight 1),
    and on a congested link the flow never drains.  Tagged, it must count as its user's
    (weight 2: two thirds), not stay no one's (an unweighted half): FairScheduler.move."""
    sched: FairScheduler[str] = FairScheduler()
    sched.set_weight("alice", 2)
    flows = {"a1": ""} | {f"b{i}": "bob" for i in range(8)}
    for flow, user in flows.items():
        for _ in range(40 if flow == "a1" else 4):  # its backlog never drains
            sched.push(flow, user, flow, PACKET)
    for _ in range(10):  # some bytes leave while it is no one's
        assert sched.pop() is not None
    assert sched.queued("a1") > 0
    sched.move("a1", "alice")
    assert set(sched.users()) == {"alice", "bob"}  # no one's user is gone
    got = run_link(sched, {"a1": "alice"} | {f"b{i}": "bob" for i in range(8)},
                   64 * 1024 * 1024, backlog=0)
    assert share(got, "alice") == pytest.approx(2 / 3, abs=0.01)


def test_moving_a_flow_keeps_every_queued_byte_and_its_order() -> None:
    sched: FairScheduler[int] = FairScheduler()
    for i in range(6):
        sched.push("f", "", i, PACKET)
    sched.push("g", "bob", 100, PACKET)
    sched.move("f", "alice")
    sched.move("f", "alice")  # again: nothing to do
    sched.move("nothing", "alice")  # a flow with nothing queued: nothing to do
    out = []
    while (popped := sched.pop()) is not None:
        out.append(popped)
    assert [item for flow, item in out if flow == "f"] == list(range(6))
    assert [item for flow, item in out if flow == "g"] == [100]
    assert len(sched) == 0 and sched.users() == {}


def test_a_users_sessions_share_its_part_equally() -> None:
    flows = {"a1": "alice", "b1": "bob", "b2": "bob", "b3": "bob"}
    sched: FairScheduler[str] = FairScheduler()
    per_flow: Counter[str] = Counter()
    for flow, user in flows.items():
        sched.push(flow, user, flow, PACKET)
    for _ in range(3000):
        popped = sched.pop()
        assert popped is not None
        per_flow[str(popped[0])] += 1
        sched.push(popped[0], flows[str(popped[0])], str(popped[0]), PACKET)
    assert per_flow["a1"] == pytest.approx(1500, abs=2)
    for b in ("b1", "b2", "b3"):
        assert per_flow[b] == pytest.approx(500, abs=2)


def test_unequal_packet_sizes_are_counted_in_bytes() -> None:
    sched: FairScheduler[str] = FairScheduler()
    got: Counter[str] = Counter()
    sizes = {"small": 1500, "big": PACKET}
    for flow in sizes:
        for _ in range(4):
            sched.push(flow, flow, flow, sizes[flow])
    for _ in range(5000):
        popped = sched.pop()
        assert popped is not None
        flow = str(popped[0])
        got[flow] += sizes[flow]
        sched.push(flow, flow, flow, sizes[flow])
    assert share(got, "small") == pytest.approx(0.5, abs=0.02)


def test_a_small_packet_of_an_idle_session_goes_before_queued_bulk() -> None:
    sched: FairScheduler[str] = FairScheduler()
    for i in range(50):
        sched.push("bulk", "bob", f"bulk{i}", PACKET)
    sched.push("ssh", "carol", "keystroke", 48)
    assert sched.pop() == ("ssh", "keystroke")
    # Its second packet, queued behind its first, would wait its turn like bulk;
    # once the first left, the session is idle again and its next one skips ahead.
    assert sched.pop() == ("bulk", "bulk0")
    sched.push("ssh", "carol", "echo", 48)
    assert sched.pop() == ("ssh", "echo")


def test_small_packets_cannot_take_more_than_the_share() -> None:
    """Sparse packets are charged to their user: a user sending only small packets,
    each from an idle session, still gets half of a link shared with one bulk user."""
    sched: FairScheduler[str] = FairScheduler()
    got: Counter[str] = Counter()
    for _ in range(4):
        sched.push("bulk", "bob", "b", PACKET)
    for round_ in range(20000):
        sched.push(f"tiny{round_}", "mallory", "t", 1000)
        popped = sched.pop()
        assert popped is not None
        if popped[0] == "bulk":
            got["bob"] += PACKET
            sched.push("bulk", "bob", "b", PACKET)
        else:
            got["mallory"] += 1000
    while (popped := sched.pop()) is not None:
        if popped[0] != "bulk":
            got["mallory"] += 1000
    assert share(got, "mallory") <= 0.55


def test_drop_forgets_a_closed_session() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.push("a", "alice", "x", 5000)
    sched.push("a", "alice", "y", 5000)
    sched.push("b", "bob", "z", 5000)
    assert sched.queued("a") == 10000 and len(sched) == 15000
    assert sched.drop("a") == 10000
    assert sched.queued("a") == 0 and len(sched) == 5000
    assert sched.pop() == ("b", "z")
    assert sched.pop() is None and not sched and len(sched) == 0
    assert sched.users() == {}


def test_an_idle_user_keeps_no_credit() -> None:
    """A user whose queue emptied starts its next burst with at most one quantum, not
    with what it saved up while idle."""
    sched: FairScheduler[str] = FairScheduler(quantum=1000)
    sched.push("a", "alice", "a0", 100)
    sched.push("a", "alice", "a1", 100)
    assert sched.pop() is not None and sched.pop() is not None
    for i in range(10):
        sched.push("a", "alice", f"a{i}", 1000)
        sched.push("b", "bob", f"b{i}", 1000)
    order = [sched.pop() for _ in range(4)]
    assert [f for f, _ in order if f is not None] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        FairScheduler(quantum=0)
    with pytest.raises(ValueError):
        FairScheduler().set_weight("alice", 0)


def test_jain_index() -> None:
    assert jain_index([0.5, 0.5]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0]) == pytest.approx(0.5)
    assert jain_index([1, 1, 1, 1]) == pytest.approx(1.0)
    assert jain_index([]) == 1.0


# --- token bucket -------------------------------------------------------------------


def test_a_source_paused_as_told_moves_rate_bytes_per_second() -> None:
    clock = task.Clock()
    bucket = TokenBucket(rate=20e6, burst=1e6, now=clock.seconds())
    moved = 0
    while clock.seconds() < 10.0:
        moved += 65536  # one read of a source
        wait = bucket.charge(65536, clock.seconds())
        clock.advance(wait if wait > 0 else 65536 / 1e9)  # a fast source otherwise
    # 10 s at 20 MB/s plus the initial burst, within one read.
    assert moved == pytest.approx(20e6 * 10 + 1e6, abs=65536 * 2)
    assert not clock.getDelayedCalls()


def test_the_burst_is_free_then_the_debt_is_waited_out() -> None:
    bucket = TokenBucket(rate=1000, burst=5000, now=0.0)
    assert bucket.charge(5000, 0.0) == 0.0
    assert bucket.charge(2000, 0.0) == pytest.approx(2.0)
    assert bucket.wait(1.0) == pytest.approx(1.0)
    assert bucket.wait(2.0) == 0.0
    assert bucket.available(100.0) == 5000  # never more than the burst


def test_reconfigure_caps_the_credit() -> None:
    bucket = TokenBucket(rate=1000, burst=5000, now=0.0)
    bucket.configure(rate=10, burst=100, now=0.0)
    assert bucket.available(0.0) == 100
    assert bucket.charge(200, 0.0) == pytest.approx(10.0)


def test_user_limits_share_one_bucket_per_user_and_direction() -> None:
    limits = UserLimits()
    limits.set_limits({"alice": Limit(rate=100)}, now=0.0)
    assert limits.bucket("bob", UP, 0.0) is None
    up = limits.bucket("alice", UP, 0.0)
    assert up is not None and up is limits.bucket("alice", UP, 1.0)
    assert limits.bucket("alice", DOWN, 0.0) is not up
    up.charge(150, 0.0)
    assert limits.status(0.0)["alice"] == {"rate": 100, "burst": 100,
                                           "credit_to_service": 0, "credit_from_service": 100}
    limits.set_limits({"alice": Limit(rate=50, burst=10)}, now=0.0)
    assert limits.bucket("alice", UP, 0.0) is up and up.rate == 50
    limits.set_limits({}, now=0.0)
    assert limits.bucket("alice", UP, 0.0) is None and limits.status(0.0) == {}
