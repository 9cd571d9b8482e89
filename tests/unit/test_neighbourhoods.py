"""relay.core.admission: neighbourhoods at the full cap ([relay.crowding] netblock4/6).

The attack the source and stall rules could not answer: many sources (an IPv6 /56 is
256 /64s; an IPv4 /24 is 256 addresses), one place each, each place *recycled* before
it stalls (closed and reopened every < 2 s, a version line each).  No source holds
more than another and no place is ever past its stage's seconds, so a newcomer from
another network was refused for as long as the crowd kept it up.  Driven by a
task.Clock and Twisted's memory reactor (no sockets)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from test_source_limits import _TCP, _connect, _end, relay  # noqa: F401 (relay: a fixture)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from relay.config.schema import CrowdingConfig, RelayConfig
from relay.core.admission import Admission, Gate, Offence, Refusal, Stage, Ticket
from relay.ops.metrics import prometheus_text
from relay.server.relay import RelayCore
from relay.ssh.server import RelayFactory

ONE56 = [f"2001:db8:66:{i:x}::1" for i in range(256)]  # 256 sources, one /48
ONE24 = [f"10.66.0.{i}" for i in range(1, 255)]  # 254 sources, one /24
ALICE = "198.51.100.9"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _gate(clock: Clock, cap: int = 64, **changes: Any) -> tuple[Admission, Gate]:
    adm = Admission(dataclasses.replace(RelayConfig(), **changes), clock)
    return adm, adm.gate("ssh", global_cap=cap)


def _ticket(gate: Gate, host: str) -> Ticket:
    verdict = gate.admit(host)
    assert isinstance(verdict, Ticket), verdict
    return verdict


def _recycle(gate: Gate, crowd: list[str], holding: dict[int, Ticket], clock: Clock,
             age: float) -> None:
    """The recycling attacker, one step: every place of its older than ``age`` is
    closed (before its ``silent`` seconds; it costs the source ``noauth``, 1 s) and
    the crowd reconnects from its next addresses, each sending its version line at
    once, until the cap refuses it."""
    now = clock.seconds()
    for i, held in list(holding.items()):
        if not held.pending or now - held.admitted >= age:
            gate.closed(held, None if held.evicted else Offence.NOAUTH)
            del holding[i]
    for i, host in enumerate(crowd):
        if i in holding:
            continue
        verdict = gate.admit(host)
        if not isinstance(verdict, Ticket):
            if verdict is Refusal.GLOBAL:
                break  # the cap is full again
            continue  # this one's source is penalised: the next
        gate.advance(verdict, Stage.HANDSHAKE)  # its version line
        holding[i] = verdict


@pytest.mark.parametrize("crowd", [ONE56, ONE24], ids=["ipv6-56", "ipv4-24"])
def test_a_recycling_crowd_from_one_network_no_longer_keeps_alice_out(
        clock: Clock, crowd: list[str]) -> None:
    """The crowd closes and reopens each place every 1.5 s (a version line each, never
    stalled); every 2 s alice, from another network, connects and logs in.  She was
    refused every time (``global_cap``); now her neighbourhood holds fewer places than
    the crowd's, so she takes the place of its lowest-stage oldest, a fresh one, whose
    source is not penalised (it did nothing wrong on its own)."""
    adm, gate = _gate(clock)
    holding: dict[int, Ticket] = {}
    alice: list[bool] = []
    for tick in range(40):  # 20 s, a step every 0.5 s
        _recycle(gate, crowd, holding, clock, age=1.5)
        assert gate.total == 64
        if tick % 4 == 3:
            verdict = gate.admit(ALICE)
            alice.append(isinstance(verdict, Ticket))
            if isinstance(verdict, Ticket):
                victim = verdict.take_displaced()
                assert victim is not None and victim.crowded and victim.stalled is None
                assert victim.neighbourhood != verdict.neighbourhood
                gate.advance(verdict, Stage.AUTH)
                gate.passed(verdict)  # she logs in
        clock.advance(0.5)
    assert alice == [True] * 10, alice
    assert gate.crowded == 10 and gate.stalled == {"silent": 0, "handshake": 0, "auth": 0}
    assert adm.penalties.penalised["grace-exceeded"] == 0  # nobody stalled
    assert adm.penalties.activated == 0  # and the crowd's early closes stay below min
    assert gate.status()["neighbourhood_evicted"] == 10


def test_on_the_old_rules_alone_the_recycling_crowd_keeps_alice_out(clock: Clock) -> None:
    """The same crowd, the neighbourhood as narrow as a source (``netblock6 = 64``: the
    rule can take nothing the busiest-source rule does not): alice is refused every
    time.  What the neighbourhoods answer, and what a wider neighbourhood costs."""
    _adm, gate = _gate(clock, crowding=CrowdingConfig(netblock6=64))
    holding: dict[int, Ticket] = {}
    refused = 0
    for tick in range(40):
        _recycle(gate, ONE56, holding, clock, age=1.5)
        if tick % 4 == 3:
            refused += gate.admit(ALICE) is Refusal.GLOBAL
        clock.advance(0.5)
    assert refused == 10 and gate.crowded == 0


def test_the_busiest_neighbourhood_gives_up_its_lowest_stage_first(clock: Clock) -> None:
    """An office /24 shares its network with an attacker: two of its users are
    authenticating (``auth``), the attacker's places are fresh (``silent``, then a
    version line).  Newcomers from elsewhere take the attacker's places, silent before
    handshake, oldest first, unpenalised; the users keep theirs.  A place of that
    neighbourhood stalled past its stage's seconds is charged ``grace-exceeded``."""
    adm, gate = _gate(clock, cap=6)
    users = [_ticket(gate, f"192.0.2.{i}") for i in (1, 2)]
    for user in users:
        gate.advance(user, Stage.AUTH)
    spoke = _ticket(gate, "192.0.2.50")
    gate.advance(spoke, Stage.HANDSHAKE)
    silent = [_ticket(gate, f"192.0.2.{i}") for i in (51, 52)]
    other = _ticket(gate, "203.0.113.1")  # another /24, one place
    assert gate.total == 6
    first = _ticket(gate, ALICE).take_displaced()
    second = _ticket(gate, "198.51.101.1").take_displaced()
    third = _ticket(gate, "198.51.102.1").take_displaced()
    assert [first, second, third] == [*silent, spoke]
    assert all(t.crowded and t.stalled is None for t in (first, second, third))
    # the office holds its two users now, as many as... nobody else holds two: a
    # newcomer from a fourth /24 (with it, 1) still takes one of theirs
    assert all(u.pending for u in users) and other.pending
    clock.advance(20.0)  # the users' 20 s authenticating are up: stalled
    fourth = _ticket(gate, "198.51.103.1").take_displaced()
    assert fourth is users[0] and fourth.crowded and fourth.stalled is Stage.AUTH
    assert adm.penalties.penalised["grace-exceeded"] == 1
    assert gate.stalled["auth"] == 1 and gate.crowded == 4
    # now every /24 holds one: nobody is busier, and the stall rule takes over
    assert gate.refuses("198.51.104.1") is None  # the other user is stalled too


def test_neighbourhoods_cannot_trade_places_and_a_busy_office_keeps_its_share(
        clock: Clock) -> None:
    """An office behind one /24 (eight users, each its own source) fills a cap of 8;
    newcomers from seven other /24s take one place each from it, and no more: the
    office keeps one, what every other neighbourhood holds, never none.  A place
    moves only from a neighbourhood holding ``n`` to one that then holds at most
    ``n - 1``, so two neighbourhoods holding 4 and 4, or 5 and 3 once evened, cannot
    trade places back and forth for ever, unpenalised."""
    _adm, gate = _gate(clock, cap=8)
    office = [_ticket(gate, f"192.0.2.{i}") for i in range(1, 9)]
    outsiders = [_ticket(gate, f"198.51.{100 + i}.1") for i in range(7)]
    assert [t.take_displaced() for t in outsiders] == office[:7]
    assert office[7].pending and gate.pending[f"{office[7].source}"] == 1
    assert gate.admit("198.51.120.1") is Refusal.GLOBAL  # everyone holds one
    assert gate.admit("192.0.2.100") is Refusal.GLOBAL  # the office would hold two
    # 5 and 3: the three's newcomer evens it to 4 and 4, then nobody moves
    _adm, gate = _gate(clock, cap=8)
    for i in range(5):
        _ticket(gate, f"192.0.2.{i + 1}")
    for i in range(3):
        _ticket(gate, f"203.0.113.{i + 1}")
    assert _ticket(gate, "203.0.113.9").take_displaced() is not None
    assert gate.status()["neighbourhoods"] == 2
    for round_ in range(100):
        host = f"192.0.2.{100 + round_}" if round_ % 2 else f"203.0.113.{100 + round_}"
        assert gate.admit(host) is Refusal.GLOBAL
    assert gate.crowded == 1


def test_a_source_at_its_cap_takes_no_place_of_another_neighbourhood(clock: Clock) -> None:
    """The neighbourhood rule never breaks ``per_source_max_unauthenticated``."""
    _adm, gate = _gate(clock, cap=6, per_source_max_unauthenticated=2)
    for i in range(4):
        _ticket(gate, f"2001:db8:66:{i:x}::1")  # one /48, four sources
    _ticket(gate, ALICE)
    _ticket(gate, ALICE)
    assert gate.admit(ALICE) is Refusal.GLOBAL and gate.refuses(ALICE) is Refusal.GLOBAL
    assert gate.refuses("198.51.100.10") is None  # her source's neighbour is not at it
    assert gate.crowded == 0


def test_crowding_off_turns_the_neighbourhood_rule_off(clock: Clock) -> None:
    _adm, gate = _gate(clock, cap=4, crowding=CrowdingConfig(enabled=False))
    for i in range(4):
        _ticket(gate, f"2001:db8:66:{i:x}::1")
    assert gate.admit(ALICE) is Refusal.GLOBAL and gate.crowded == 0


def test_refuses_sees_a_neighbourhood_place_and_marks_nothing(clock: Clock) -> None:
    _adm, gate = _gate(clock, cap=4)
    crowd = [_ticket(gate, f"2001:db8:66:{i:x}::1") for i in range(4)]
    assert gate.refuses(ALICE) is None
    assert all(t.pending and not t.crowded and not t.evicted for t in crowd)
    assert gate.crowded == 0 and gate.evicted == 0


def test_neighbourhoods_by_netblock(clock: Clock) -> None:
    """IPv4 /24 and IPv6 /48 by default; IPv4-mapped addresses count as IPv4; a host
    that is not an address is its own; configurable, never narrower than a source."""
    adm = _gate(clock)[0]
    assert adm.place("10.66.0.7") == ("10.66.0.7/32", "10.66.0.0/24", False)
    assert adm.place("::ffff:10.66.0.7")[1] == "10.66.0.0/24"
    assert adm.place("2001:db8:66:ff::1")[:2] == ("2001:db8:66:ff::/64", "2001:db8:66::/48")
    assert adm.place("unix:/run/x")[:2] == ("unix:/run/x", "unix:/run/x")
    adm = _gate(clock, crowding=CrowdingConfig(netblock4=16, netblock6=56))[0]
    assert adm.place("10.66.9.7")[1] == "10.66.0.0/16"
    assert adm.place("2001:db8:66:ff::1")[1] == "2001:db8:66::/56"


def test_the_tally_keeps_the_most_under_any_sequence_of_changes() -> None:
    """The O(1) count of the busiest (sources and neighbourhoods alike) against a
    recount, over random admissions and departures."""
    from relay.core.admission import _Tally

    rng = random.Random(17)
    counts: dict[str, int] = {}
    tally = _Tally(counts)
    held: list[str] = []
    for _ in range(5000):
        if held and rng.random() < 0.5:
            key = held.pop(rng.randrange(len(held)))
            tally.remove(key)
        else:
            key = f"k{rng.randrange(12)}"
            held.append(key)
            tally.add(key)
        most = max(counts.values(), default=0)
        assert tally.most == most
        assert set(tally.busiest()) == {k for k, n in counts.items() if n == most and most}
        assert sum(counts.values()) == len(held)


def test_the_gate_keeps_its_work_bounded_under_recycling(clock: Clock) -> None:
    """Ten minutes of a recycling crowd with newcomers: every per-stage heap (the
    gate's and each neighbourhood's) stays within twice the cap plus a constant (stale
    entries are dropped at the heads and by a rebuild), and neighbourhoods without a
    place are forgotten."""
    _adm, gate = _gate(clock)
    holding: dict[int, Ticket] = {}
    for tick in range(1200):
        _recycle(gate, ONE56, holding, clock, age=1.5)
        if tick % 4 == 3:
            verdict = gate.admit(f"198.51.{100 + tick % 50}.1")
            if isinstance(verdict, Ticket):
                gate.passed(verdict)
        for heaps in [gate._stages, *gate._crowds.values()]:
            # rebuilt past 2 x live + 16 at each push; live may fall after it
            assert all(len(h) <= 2 * 64 + 17 for h in heaps.heaps)
        assert sum(len(h) for c in gate._crowds.values() for h in c.heaps) <= 3 * (2 * 64 + 17)
        clock.advance(0.5)
    assert set(gate._crowds) == {"2001:db8:66::/48"}
    assert gate.total == sum(gate.pending.values()) == sum(gate._hoods.count.values())
    assert gate.crowded == 300  # every newcomer got in


def test_ssh_neighbourhood_eviction_is_logged_once_per_burst_and_counted(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:  # noqa: F811
    """The gate picks, the relay closes: a crowd from one /56 fills the SSH port's
    places; newcomers from other networks each abort one of its fresh connections,
    logged once per burst with a count (``relay_unauth_evicted``, why naming the
    neighbourhood), counted in the status and ``/metrics``, the crowd unpenalised."""
    from twisted.internet.address import IPv6Address

    from relay.server.dataport import CAP_LOG_WINDOW

    core, factory, reactor = relay
    core.ssh_gate.global_cap = 8
    held = []
    for host in ONE56[:8]:
        addr = IPv6Address("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        assert proto is not None
        tcp = _TCP(peerAddress=addr)
        proto.makeConnection(tcp)
        held.append((proto, tcp))
    with capturedLogs() as logs:
        newcomers = [_connect(factory, f"198.51.{100 + i}.1") for i in range(3)]
        assert all(proto is not None for proto, _tcp in newcomers)
        aborted = [proto for proto, tcp in held if tcp.disconnecting]
        assert len(aborted) == 3
        for proto in aborted:
            _end(proto)
        reactor.advance(CAP_LOG_WINDOW)
    lines = [e for e in logs if e.get("event") == "relay_unauth_evicted"]
    assert [e["count"] for e in lines] == [1, 2], lines
    assert "2001:db8:66::/48, the neighbourhood holding the most places" in lines[0]["why"]
    assert core.counters["connections_evicted_unauthenticated_cap"] == 3
    status = core.admission.status()["ssh"]
    assert status["neighbourhood_evicted"] == 3
    assert core.admission.penalties.penalised["noauth"] == 0  # evicted: not charged
    metrics = prometheus_text({"relay": core.status()})
    assert 'labrelay_relay_admission_neighbourhood_evicted_total{port="ssh"} 3.0' in metrics
    for proto, _tcp in [p for p in held if p[0] not in aborted] + newcomers:
        _end(proto)


def test_exempt_networks_give_way_like_any_other_but_are_never_charged(
        clock: Clock) -> None:
    """``penalty_exempt`` (a bastion, loopback if listed) spares penalties, not places:
    an exempt /24 holding the most gives up its lowest-stage oldest to a newcomer from
    elsewhere, and is not charged even when that one had stalled; an exempt newcomer
    takes a place like anyone."""
    import ipaddress

    adm, gate = _gate(clock, cap=4,
                      penalty_exempt=(ipaddress.ip_network("192.0.2.0/24"),))
    bastion = [_ticket(gate, f"192.0.2.{i}") for i in (1, 2, 3)]
    _ticket(gate, "203.0.113.1")
    clock.advance(3.0)  # the bastion's places are silent past 2 s: stalled
    victim = _ticket(gate, ALICE).take_displaced()
    assert victim is bastion[0] and victim.crowded and victim.stalled is Stage.SILENT
    assert adm.penalties.penalised["grace-exceeded"] == 0 and len(adm.penalties) == 0
    assert [t.pending for t in bastion] == [False, True, True]  # it keeps two of four
