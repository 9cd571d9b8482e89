"""The relay's Router with plain calls and ``now`` values: no reactor, no Deferreds.

The shell's side (probing over SSH, the 0.5 s window, disconnecting) is covered by
test_relaycore.py and the integration tests; here the decisions alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import ServiceGrant
from relay.core.grants import AGENT, USER, Principal
from relay.core.router import SUPERSEDED, Refused, Router, Verdict
from relay.core.routing import PUBLIC, Registry


@dataclass(eq=False)
class Conn:
    principal_name: str
    peer: str = "10.0.0.9:4000"

    def disconnect(self, why: str) -> None:
        raise AssertionError("the router never does I/O itself")


def _principal(name: str, kind: str = AGENT, services: tuple[tuple[str, int], ...] = (),
               public: tuple[int, ...] = ()) -> Principal:
    return Principal(kind=kind, name=name,
                     services=tuple(ServiceGrant(n, p) for n, p in services),
                     public_ports=frozenset(public), max_sessions=None)


LAB = _principal("lab_pc", services=(("gpu-cluster", 22),), public=(2201,))
OTHER = _principal("intruder", services=(("other", 22),))


class World:
    """A router over an in-memory registry; grants and liveness set by the test."""

    def __init__(self) -> None:
        self.granted: dict[Conn, Principal | None] = {}
        self.up: set[Conn] = set()
        self.router = Router(Registry(), lambda s: self.granted.get(s),  # type: ignore[call-overload]
                             lambda s: s in self.up)

    def conn(self, principal: Principal | None, name: str = "lab_pc") -> Conn:
        c = Conn(name)
        self.granted[c] = principal
        self.up.add(c)
        return c


def test_claims_follow_the_grants() -> None:
    router = World().router
    assert router.claim(LAB, "GPU-Cluster", 22) == ("gpu-cluster", None)
    assert router.claim(LAB, "0.0.0.0", 2201) == (PUBLIC, None)
    assert router.claim(LAB, "", 0)[1] == "public port 0 is not granted to agent lab_pc"
    assert router.claim(LAB, "other", 22)[1] == (
        "service other:22 is not granted to agent lab_pc")
    assert router.claim(None, "gpu-cluster", 22)[1] == "this key is no longer granted"
    alice = _principal("alice", USER, services=(("gpu-cluster", 22),))
    assert router.claim(alice, "gpu-cluster", 22)[1] == "users may not register services"


def test_first_offer_is_granted_and_the_same_session_again_too() -> None:
    w = World()
    agent = w.conn(LAB)
    d = w.router.offer("gpu-cluster", 22, agent, "GPU-Cluster", 5.0)
    assert d.verdict is Verdict.GRANTED and d.ok
    assert d.registration is not None and d.registration.since == 5.0
    assert d.registration.bind == "GPU-Cluster" and d.registration.session is agent
    assert w.router.offer("gpu-cluster", 22, agent, "gpu-cluster", 6.0).verdict is Verdict.GRANTED


def test_another_agent_is_refused_without_a_probe() -> None:
    w = World()
    owner, intruder = w.conn(LAB), w.conn(OTHER, "intruder")
    w.router.offer("gpu-cluster", 22, owner, "gpu-cluster", 0.0)
    d = w.router.offer("gpu-cluster", 22, intruder, "gpu-cluster", 1.0)
    assert d.verdict is Verdict.REFUSED and d.why == "held by agent lab_pc"
    assert d.probe is None


def test_a_silent_holder_is_taken_over() -> None:
    w = World()
    old, new = w.conn(LAB), w.conn(LAB)
    w.router.offer("gpu-cluster", 22, old, "gpu-cluster", 0.0)
    d = w.router.offer("gpu-cluster", 22, new, "gpu-cluster", 10.0)
    assert d.verdict is Verdict.PROBE and d.probe is not None
    assert d.probe.holder.session is old
    done = w.router.probe_silent(d.probe, 10.5)
    assert done is not None and done.verdict is Verdict.TAKEOVER and done.ok
    assert done.superseded is old and SUPERSEDED.startswith("superseded")
    assert w.router.registry.lookup("gpu-cluster", 22).session is new  # type: ignore[union-attr]
    assert w.router.probe_answered(d.probe, 10.6) is None  # the first outcome settles it


def test_a_live_holder_keeps_the_name() -> None:
    w = World()
    holder, newcomer = w.conn(LAB), w.conn(LAB)
    w.router.offer("gpu-cluster", 22, holder, "gpu-cluster", 0.0)
    probe = w.router.offer("gpu-cluster", 22, newcomer, "gpu-cluster", 1.0).probe
    assert probe is not None
    d = w.router.probe_answered(probe, 1.1)
    assert d is not None and d.verdict is Verdict.REFUSED
    assert d.why == ("held by a live session of lab_pc from 10.0.0.9:4000 "
                     "(answered a probe just now)")
    assert w.router.probe_silent(probe, 1.5) is None  # the window closing later changes nothing
    assert w.router.registry.lookup("gpu-cluster", 22).session is holder  # type: ignore[union-attr]


def test_a_holder_that_died_while_probed_hands_over() -> None:
    w = World()
    old, new = w.conn(LAB), w.conn(LAB)
    w.router.offer("gpu-cluster", 22, old, "gpu-cluster", 0.0)
    probe = w.router.offer("gpu-cluster", 22, new, "gpu-cluster", 1.0).probe
    assert probe is not None
    w.up.discard(old)
    assert [r.name for r in w.router.drop_session(old)] == ["gpu-cluster"]
    d = w.router.probe_answered(probe, 1.2)  # an answer from a dead holder is no answer
    assert d is not None and d.verdict is Verdict.GRANTED and d.superseded is None


def test_a_newcomer_gone_meanwhile_gets_nothing() -> None:
    w = World()
    old, new = w.conn(LAB), w.conn(LAB)
    w.router.offer("gpu-cluster", 22, old, "gpu-cluster", 0.0)
    probe = w.router.offer("gpu-cluster", 22, new, "gpu-cluster", 1.0).probe
    assert probe is not None
    w.up.discard(new)
    d = w.router.probe_silent(probe, 1.5)
    assert d is not None and d.verdict is Verdict.GONE and not d.ok
    assert w.router.registry.lookup("gpu-cluster", 22).session is old  # type: ignore[union-attr]


def test_waiters_are_woken_by_the_registration_and_expire_by_now() -> None:
    w = World()
    early = w.router.wait("gpu-cluster", 22, "first", now=0.0, timeout=10.0)
    late = w.router.wait("gpu-cluster", 22, "second", now=5.0, timeout=10.0)
    other = w.router.wait("web", 80, "third", now=0.0, timeout=3.0)
    assert early.until == 10.0 and late.until == 15.0
    assert w.router.expired(2.9) == []
    assert w.router.expired(3.0) == [other]
    assert w.router.waiting("web", 80) == []
    d = w.router.offer("gpu-cluster", 22, w.conn(LAB), "gpu-cluster", 4.0)
    assert [x.who for x in d.woken] == ["first", "second"]
    assert w.router.waiting("gpu-cluster", 22) == []


def test_a_waiter_that_gave_up_is_not_woken() -> None:
    w = World()
    gave_up = w.router.wait("gpu-cluster", 22, "gone", now=0.0, timeout=10.0)
    w.router.unwait(gave_up)
    assert w.router.offer("gpu-cluster", 22, w.conn(LAB), "gpu-cluster", 1.0).woken == []


def test_a_holder_whose_grant_went_is_evicted_before_the_offer() -> None:
    w = World()
    k1, k2 = w.conn(LAB), w.conn(LAB)
    w.router.offer("gpu-cluster", 22, k1, "gpu-cluster", 0.0)
    assert w.router.ungranted_holder("gpu-cluster", 22, k2) is None  # K1 still granted
    w.granted[k1] = None  # its key was revoked (the reload not applied yet)
    holder = w.router.ungranted_holder("gpu-cluster", 22, k2)
    assert holder is not None and holder.session is k1
    assert w.router.ungranted_holder("gpu-cluster", 22, k1) is None  # never itself
    assert w.router.drop(holder) is True and w.router.drop(holder) is False
    d = w.router.offer("gpu-cluster", 22, k2, "gpu-cluster", 1.0)
    assert d.verdict is Verdict.GRANTED, "no probe of a holder that may not hold it"


def test_narrowed_agent_holds_only_what_it_may() -> None:
    w = World()
    agent = w.conn(_principal("lab_pc", services=(("gpu-cluster", 22), ("web", 80)),
                              public=(2201,)))
    for name, port in (("gpu-cluster", 22), ("web", 80), (PUBLIC, 2201)):
        w.router.offer(name, port, agent, name or "0.0.0.0", 0.0)
    w.granted[agent] = _principal("lab_pc", services=(("gpu-cluster", 22),))
    lost = w.router.no_longer_held(agent)
    assert sorted((r.name, r.port) for r in lost) == [(PUBLIC, 2201), ("web", 80)]


def test_cancel_forgets_only_the_holders_own() -> None:
    w = World()
    agent, other = w.conn(LAB), w.conn(OTHER, "intruder")
    w.router.offer(PUBLIC, 2201, agent, "0.0.0.0", 0.0)
    assert w.router.cancel("localhost", 2201, other) is None
    assert w.router.cancel("localhost", 2201, agent) == PUBLIC
    assert w.router.registry.registrations() == []


ALICE = Principal(kind=USER, name="alice", services=(ServiceGrant("gpu-cluster", 22),),
                  public_ports=frozenset(), max_sessions=None)


def test_user_sessions_need_a_grant_a_place_under_the_cap_and_a_service_that_can_come() -> None:
    w = World()
    router = w.router
    assert router.admit_session(ALICE, "gpu-cluster", 22, 0, 10, LAB) is None  # waits for it
    assert router.admit_session(None, "gpu-cluster", 22, 0, 10, LAB) == (
        Refused.PROHIBITED, "this key is no longer granted")
    assert router.admit_session(ALICE, "localhost", 2201, 0, 10, LAB)[0] is Refused.PROHIBITED
    assert router.admit_session(ALICE, "web", 80, 0, 10, LAB) == (
        Refused.PROHIBITED, "web:80 is not granted to user alice")
    assert router.admit_session(LAB, "gpu-cluster", 22, 0, 10, LAB) == (
        Refused.PROHIBITED, "gpu-cluster:22 is not granted to agent lab_pc")
    assert router.admit_session(ALICE, "gpu-cluster", 22, 10, 10, LAB) == (
        Refused.CAP, "user alice already has 10 sessions open (max_sessions)")
    own = Principal(kind=USER, name="alice", services=ALICE.services,
                    public_ports=frozenset(), max_sessions=2)
    assert router.admit_session(own, "gpu-cluster", 22, 2, 10, LAB)[0] is Refused.CAP
    # max-sessions lowered under her open sessions: the refusal says what she has
    assert router.admit_session(own, "gpu-cluster", 22, 3, 10, LAB) == (
        Refused.CAP, "user alice already has 3 sessions open (max_sessions 2)")
    assert router.admit_session(ALICE, "gpu-cluster", 22, 0, 10, None) == (
        Refused.NO_SERVICE, "no service gpu-cluster:22 on this relay")
    router.offer("gpu-cluster", 22, w.conn(LAB), "gpu-cluster", 0.0)
    assert router.admit_session(ALICE, "gpu-cluster", 22, 0, 10, None) is None  # registered


def test_totals_name_one_name_for_a_wildcard_grants_unregistered_ports() -> None:
    """A ``name:*`` grant's ports count under ``name:*`` unless registered or granted
    one by one: a user cannot grow the totals' (and /metrics') names port by port."""
    w = World()
    lab = Principal(kind=AGENT, name="lab_pc",
                    services=(ServiceGrant("tb", None), ServiceGrant("tb", 6006)),
                    public_ports=frozenset(), max_sessions=None)
    agent = w.conn(lab)
    assert w.router.totals_name(lab, "tb", 1234) == "tb:*"
    assert w.router.totals_name(lab, "tb", 6006) == "tb:6006"  # granted by port
    assert w.router.offer("tb", 7000, agent, "tb", 1.0).ok
    assert w.router.totals_name(lab, "tb", 7000) == "tb:7000"  # registered now
    assert w.router.totals_name(None, "gone", 22) == "gone:22"
