"""relay.core.admission: per-source caps and penalties, driven by a task.Clock (no sockets)."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relay.config.schema import CrowdingConfig, PenaltyConfig, RelayConfig
from relay.core.admission import Admission, Gate, Offence, Refusal, Stage, Ticket, worst
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh.server import RelayFactory
from relay.testing import FakeTCPTransport, new_key

A, B, C = "192.0.2.1", "192.0.2.2", "198.51.100.9"


def _admission(clock: Clock, **changes: object) -> Admission:
    penalty = {k[len("penalty_"):]: changes.pop(k) for k in list(changes)
               if k.startswith("penalty_") and k != "penalty_exempt"}
    config = dataclasses.replace(RelayConfig(), penalties=PenaltyConfig(**penalty),  # type: ignore[arg-type]
                                 **changes)  # type: ignore[arg-type]
    return Admission(config, clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _ticket(gate: Gate, host: str) -> Ticket:
    verdict = gate.admit(host)
    assert isinstance(verdict, Ticket), verdict
    return verdict


def test_sources_are_ipv4_addresses_and_ipv6_64s_by_default(clock: Clock) -> None:
    adm = _admission(clock)
    assert adm.source("192.0.2.7") == ("192.0.2.7/32", False)
    assert adm.source("2001:db8:1:2:aaaa::1") == ("2001:db8:1:2::/64", False)
    assert adm.source("2001:db8:1:2:bbbb::9")[0] == adm.source("2001:db8:1:2::5")[0]
    assert adm.source("2001:db8:1:3::1")[0] != adm.source("2001:db8:1:2::1")[0]
    assert adm.source("::ffff:192.0.2.7") == ("192.0.2.7/32", False)  # dual-stack listener
    assert adm.source("fe80::1%eth0") == ("fe80::/64", False)
    assert adm.source("?") == ("?", False)  # not an address: its own source


def test_netblocks_and_exempt_networks_are_configurable(clock: Clock) -> None:
    adm = _admission(clock, per_source_netblock4=24, per_source_netblock6=48,
                     penalty_exempt=(ipaddress.ip_network("192.0.2.0/28"),
                                     ipaddress.ip_network("2001:db8::/32")))
    assert adm.source("192.0.2.200") == ("192.0.2.0/24", False)
    assert adm.source("192.0.2.3") == ("192.0.2.0/24", True)
    assert adm.source("2001:db8:1:2::1") == ("2001:db8:1::/48", True)


def test_per_source_cap_then_global_cap(clock: Clock) -> None:
    adm = _admission(clock, per_source_max_unauthenticated=2)
    gate = adm.gate("ssh", global_cap=3)
    a1, _a2 = _ticket(gate, A), _ticket(gate, A)
    assert gate.admit(A) is Refusal.PER_SOURCE  # A holds its 2
    _ticket(gate, B)
    assert gate.admit(B) is Refusal.GLOBAL  # 3 in all; with it B would hold 2, as A does
    c = _ticket(gate, C)  # with it C holds 1, fewer than A's 2: A's oldest gives way
    assert c.take_displaced() is a1 and a1.evicted and not a1.pending
    assert gate.total == 3 and gate.pending == {f"{A}/32": 1, f"{B}/32": 1, f"{C}/32": 1}
    gate.passed(a1)  # already released by its eviction: nothing changes
    assert gate.total == 3
    assert gate.admit(C) is Refusal.GLOBAL  # one each: nobody holds more
    assert gate.refused == {"penalty": 0, "per_source_cap": 1, "global_cap": 2,
                            "penalty_table_full": 0}
    assert not clock.getDelayedCalls()


def test_a_source_holding_fewer_evicts_the_oldest_of_the_source_holding_most(
        clock: Clock) -> None:
    """At the full global cap, 7 hosts x 10 idle connections no longer keep a new
    source out until ``login_grace``: its connection takes the place of the oldest
    one of the source holding the most (ties: the one whose oldest is oldest)."""
    adm = _admission(clock)
    gate = adm.gate("ssh", 64)
    hosts = [f"203.0.113.{i}" for i in range(2, 9)]
    held: dict[str, list[Ticket]] = {h: [] for h in hosts}
    for _round in range(10):
        for h in hosts:
            if gate.total < 64:
                held[h].append(_ticket(gate, h))
                clock.advance(0.01)
    assert gate.total == 64 and len(held[hosts[0]]) == 10  # the others hold 9
    # alice (0 places): hosts[0] holds the most; its oldest goes
    alice = _ticket(gate, A)
    victim = alice.take_displaced()
    assert victim is held[hosts[0]][0] and victim.evicted and not victim.pending
    assert alice.take_displaced() is None  # handed over once
    assert gate.total == 64 and gate.pending[f"{hosts[0]}/32"] == 9
    # bob: all 7 hold 9; the oldest connection of theirs is hosts[1]'s first
    assert _ticket(gate, B).take_displaced() is held[hosts[1]][0]
    # a host holding the most evicts nobody, nor one holding one less (hosts[1], 8):
    # with its new connection it would hold as many as the one it took from
    assert gate.admit(hosts[2]) is Refusal.GLOBAL
    assert gate.admit(hosts[1]) is Refusal.GLOBAL
    # carol: the oldest of those holding 9 is hosts[2]'s first
    assert _ticket(gate, C).take_displaced() is held[hosts[2]][0]
    assert gate.evicted == 3 and gate.refused["global_cap"] == 2
    assert gate.status()["evicted"] == 3
    # an evicted connection earns its source nothing when it closes
    gate.closed(victim, Offence.NOAUTH)
    assert len(adm.penalties) == 0 and gate.total == 64
    assert not clock.getDelayedCalls()


def test_a_crowd_cannot_trade_places_for_ever(clock: Clock) -> None:
    """An evicted connection earns no penalty, so a crowd that could evict itself
    without end would be admitted without end: with "fewer than the most" alone, two
    hosts holding 10 and 9 traded a place back and forth, 10 000 connects all admitted.
    A source evicts only if, with its new connection, it still holds fewer than the
    busiest did: each eviction lowers the sum of the squares of the counts, so the
    crowd settles after a few."""
    adm = _admission(clock)
    gate = adm.gate("ssh", 19)
    for _ in range(10):
        _ticket(gate, A)
    for _ in range(9):
        _ticket(gate, B)
    admitted = sum(isinstance(gate.admit(A if i % 2 else B), Ticket) for i in range(10_000))
    assert admitted == 0 and gate.evicted == 0
    gate = adm.gate("ssh2", 64)
    hosts = [f"203.0.113.{i}" for i in range(2, 9)]
    admitted = sum(isinstance(gate.admit(hosts[i % 7]), Ticket) for i in range(10_000))
    assert gate.total == 64 and admitted - 64 == gate.evicted <= 64 * 64 // 2
    assert admitted < 100, admitted  # settled: the rest dropped at accept
    assert len(adm.penalties) == 0


def test_ties_are_broken_by_the_oldest_connection(clock: Clock) -> None:
    adm = _admission(clock, per_source_max_unauthenticated=3)
    gate = adm.gate("data", 4)
    b1 = _ticket(gate, B)
    a1 = _ticket(gate, A)
    _ticket(gate, A), _ticket(gate, B)  # A and B hold 2 each; B's oldest is older
    assert _ticket(gate, C).take_displaced() is b1
    assert _ticket(gate, "198.51.100.10").take_displaced() is a1  # A holds 2, B 1 now
    # one each: a fifth source evicts nobody (with it, it would hold as many)
    assert gate.admit("198.51.100.11") is Refusal.GLOBAL


def test_refuses_says_none_when_admit_would_evict(clock: Clock) -> None:
    """The TLS port asks the SSH gate before a handshake: a source that would evict
    after it is not refused before it."""
    adm = _admission(clock, per_source_max_unauthenticated=2)
    gate = adm.gate("ssh", 2)
    _ticket(gate, A), _ticket(gate, A)
    assert gate.refuses(B) is None and gate.refuses(A) is Refusal.GLOBAL
    assert gate.total == 2 and gate.evicted == 0 and gate.pending == {f"{A}/32": 2}


def test_exempt_sources_evict_and_are_evicted_like_any_other(clock: Clock) -> None:
    """Exemption is about penalties, not places: an exempt network holding the most
    gives way, and one holding fewer takes a place, as any source."""
    adm = _admission(clock, per_source_max_unauthenticated=4,
                     penalty_exempt=(ipaddress.ip_network("192.0.2.0/24"),))
    gate = adm.gate("ssh", 4)
    a = [_ticket(gate, A) for _ in range(4)]  # A is exempt
    assert _ticket(gate, C).take_displaced() is a[0]
    assert _ticket(gate, C).take_displaced() is a[1]  # C 1 + 1 < A's 3
    b = _ticket(gate, B)  # exempt too: 0 + 1 < 2 (A and C); A's oldest is older
    assert b.exempt and b.take_displaced() is a[2]
    assert gate.pending == {f"{A}/32": 1, f"{B}/32": 1, f"{C}/32": 2}


def test_penalised_sources_evict_nobody(clock: Clock) -> None:
    adm = _admission(clock, per_source_max_unauthenticated=2)
    gate = adm.gate("ssh", 2)
    _ticket(gate, A), _ticket(gate, A)
    for _ in range(4):
        adm.penalties.penalise(f"{B}/32", Offence.AUTHFAIL)
    assert gate.admit(B) is Refusal.PENALTY and gate.evicted == 0


def test_refuses_asks_without_counting(clock: Clock) -> None:
    """What the TLS port asks of the SSH gate at accept: the verdict admit() would give,
    with nothing admitted or recorded."""
    adm = _admission(clock)
    gate = adm.gate("ssh", 64)
    for _ in range(adm.per_source):
        assert gate.refuses(A) is None
        _ticket(gate, A)
    assert gate.refuses(A) is Refusal.PER_SOURCE
    assert gate.refuses(B) is None
    assert gate.total == adm.per_source and gate.refused[Refusal.PER_SOURCE.value] == 0
    for _ in range(4):
        adm.penalties.penalise(f"{B}/32", Offence.AUTHFAIL)
    assert gate.refuses(B) is Refusal.PENALTY


def test_gates_count_separately_but_share_penalties(clock: Clock) -> None:
    adm = _admission(clock, per_source_max_unauthenticated=1)
    ssh, data = adm.gate("ssh", 10), adm.gate("data", 10)
    t = _ticket(ssh, A)
    _ticket(data, A)  # the data port has its own count
    ssh.closed(t, Offence.GRACE)  # 20 s > min 15 s: active at once
    assert ssh.admit(A) is Refusal.PENALTY and data.admit(A) is Refusal.PENALTY
    assert adm.status()["penalised_sources"] == 1


def test_penalties_accumulate_and_activate_past_min(clock: Clock) -> None:
    """sshd's arithmetic: each authfail adds 5 s to what is left; the penalty is
    enforced once what is left exceeds min (15 s)."""
    adm = _admission(clock)
    gate = adm.gate("ssh", 64)
    for expected_left in (5, 10, 15):
        gate.closed(_ticket(gate, A), Offence.AUTHFAIL)
        assert adm.penalties.left(f"{A}/32") == expected_left
    assert isinstance(gate.admit(A), Ticket)  # 15 s is not more than min
    clock.advance(1)
    gate.closed(_ticket(gate, A), Offence.AUTHFAIL)  # 14 + 5 = 19 s left
    assert gate.admit(A) is Refusal.PENALTY
    assert isinstance(gate.admit(B), Ticket)  # someone else is not affected
    clock.advance(18.9)
    assert gate.admit(A) is Refusal.PENALTY
    clock.advance(0.2)
    assert isinstance(gate.admit(A), Ticket)  # ran out
    assert len(adm.penalties) == 0  # and was forgotten
    assert adm.penalties.penalised["authfail"] == 4 and adm.penalties.activated == 1


def test_penalty_is_capped_at_max(clock: Clock) -> None:
    adm = _admission(clock, penalty_max=60.0)
    gate = adm.gate("ssh", 64)
    for _ in range(50):
        adm.penalties.penalise(f"{A}/32", Offence.GRACE)
    assert gate.admit(A) is Refusal.PENALTY
    assert adm.penalties.left(f"{A}/32") == 60.0
    clock.advance(60.01)
    assert isinstance(gate.admit(A), Ticket)


def test_noauth_alone_takes_many_closes_to_matter(clock: Clock) -> None:
    """An honest client that connects and goes away (a port probe, ssh -G mistakes)
    costs 1 s; 16 of them in a burst are needed before its host is refused."""
    adm = _admission(clock)
    gate = adm.gate("data", 64)
    for _ in range(15):
        gate.closed(_ticket(gate, A), Offence.NOAUTH)
    last = _ticket(gate, A)  # 15 s left is not more than min: still let in
    gate.closed(last, Offence.NOAUTH)
    assert gate.admit(A) is Refusal.PENALTY


def test_exempt_sources_are_never_penalised_but_are_capped(clock: Clock) -> None:
    adm = _admission(clock, per_source_max_unauthenticated=1,
                     penalty_exempt=(ipaddress.ip_network("192.0.2.0/24"),))
    gate = adm.gate("ssh", 64)
    t = _ticket(gate, A)
    assert gate.admit(A) is Refusal.PER_SOURCE
    for _ in range(10):
        gate.closed(t, Offence.GRACE)
    assert len(adm.penalties) == 0
    _ticket(gate, A)


def test_disabled_penalties_record_nothing(clock: Clock) -> None:
    adm = _admission(clock, penalty_enabled=False)
    gate = adm.gate("ssh", 64)
    for _ in range(10):
        gate.closed(_ticket(gate, A), Offence.GRACE)
    assert len(adm.penalties) == 0 and isinstance(gate.admit(A), Ticket)


def test_a_full_table_is_permissive_by_default(clock: Clock) -> None:
    """max_sources bounds memory; when a new source arrives the penalty that would
    expire soonest is forgotten (sshd's permissive overflow): nobody is locked out."""
    adm = _admission(clock, penalty_max_sources=3)
    gate = adm.gate("ssh", 64)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        gate.closed(_ticket(gate, host), Offence.GRACE)  # 20 s each, staggered
        clock.advance(1)
    gate.closed(_ticket(gate, "10.0.0.4"), Offence.GRACE)
    assert len(adm.penalties) == 3 and adm.penalties.forgotten == 1
    assert isinstance(gate.admit("10.0.0.1"), Ticket)  # the soonest to expire: forgotten
    for host in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        assert gate.admit(host) is Refusal.PENALTY
    assert isinstance(gate.admit(C), Ticket)  # strangers are let in


def test_a_full_table_can_deny_all(clock: Clock) -> None:
    adm = _admission(clock, penalty_max_sources=2, penalty_overflow="deny-all",
                     penalty_exempt=(ipaddress.ip_network("203.0.113.0/24"),))
    gate = adm.gate("ssh", 64)
    gate.closed(_ticket(gate, A), Offence.NOAUTH)
    gate.closed(_ticket(gate, B), Offence.NOAUTH)
    assert gate.admit(C) is Refusal.OVERFLOW  # not exempt: refused while full
    assert isinstance(gate.admit("203.0.113.5"), Ticket)  # exempt
    t = _ticket(gate, "203.0.113.6")
    gate.closed(t, Offence.GRACE)  # exempt: not recorded
    clock.advance(1.01)  # both 1 s penalties ran out
    assert isinstance(gate.admit(C), Ticket)
    assert gate.refused["penalty_table_full"] == 1


def test_the_table_stays_bounded_under_an_address_flood(clock: Clock) -> None:
    adm = _admission(clock, penalty_max_sources=100)
    gate = adm.gate("ssh", 64)
    for i in range(5000):
        host = str(ipaddress.ip_address("2001:db8::") + (i << 64))  # a new /64 each time
        gate.closed(_ticket(gate, host), Offence.AUTHFAIL)
        clock.advance(0.001)
    assert len(adm.penalties) == 100
    assert len(adm.penalties._heap) <= 2 * 100 + 64
    assert gate.total == 0 and gate.pending == {}


def test_status(clock: Clock) -> None:
    adm = _admission(clock)
    ssh = adm.gate("ssh", 64)
    ssh.closed(_ticket(ssh, A), Offence.GRACE)
    _ticket(ssh, B)
    status = adm.status()
    assert status["penalised_sources"] == 1 and status["tracked_sources"] == 1
    assert status["penalties"]["grace-exceeded"] == 1
    assert status["ssh"] == {"unauthenticated": 1, "sources": 1,
                             "refused": {"penalty": 0, "per_source_cap": 0, "global_cap": 0,
                                         "penalty_table_full": 0}, "evicted": 0,
                             "stalled_evicted": {"silent": 0, "handshake": 0, "auth": 0},
                             "neighbourhood_evicted": 0, "neighbourhoods": 1,
                             "stages": {"silent": 1, "handshake": 0, "auth": 0}}
    assert not clock.getDelayedCalls()


# --- the SSH port: how a connection ended decides its offence ---------------------------


class _TCP(FakeTCPTransport):
    """A TCP transport in memory whose abort is a close (so ``disconnecting`` tells
    both)."""

    def abortConnection(self) -> None:
        self.loseConnection()


@pytest.fixture
def relay() -> tuple[RelayCore, RelayFactory, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    config = dataclasses.replace(RelayConfig(), login_grace=5.0,
                                 per_source_max_unauthenticated=2)
    core = RelayCore(config, Grants(config, "test"), reactor)
    host_key = new_key().key
    factory = RelayFactory(core, {host_key.sshType(): host_key})
    factory.startFactory()
    return core, factory, reactor


def _connect(factory: RelayFactory, host: str = A) -> tuple[Any, _TCP]:
    addr = IPv4Address("TCP", host, 40000)
    proto = factory.buildProtocol(addr)
    tcp = _TCP(peerAddress=addr)
    if proto is not None:
        proto.makeConnection(tcp)
    return proto, tcp


def _end(proto: Any) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize(
    ("misbehave", "offence"),
    [
        (lambda proto, reactor: None, "noauth"),  # connects and goes away
        (lambda proto, reactor: reactor.advance(5.0), "grace-exceeded"),
        (lambda proto, reactor: proto.dataReceived(b"SSH-1.5-old\r\n"), "protocol"),
        (lambda proto, reactor: proto.dataReceived(b"SSH-2.0-x\r\n" + b"\x00" * 64),
         "protocol"),  # a packet length of 0
    ],
    ids=["closed", "login-grace", "ssh-1", "bad-packet"],
)
def test_ssh_connection_ending_unauthenticated_is_penalised(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock], misbehave: Any,
        offence: str) -> None:
    core, factory, reactor = relay
    proto, _tcp = _connect(factory)
    assert core.ssh_gate.total == 1
    misbehave(proto, reactor)
    _end(proto)
    assert core.ssh_gate.total == 0
    penalised = {k: v for k, v in core.admission.penalties.penalised.items() if v}
    assert penalised == {offence: 1}
    assert not reactor.getDelayedCalls()


def test_ssh_auth_failure_counts_as_authfail_and_wins_over_noauth(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    core, factory, _reactor = relay
    proto, _tcp = _connect(factory)
    proto.offended(Offence.AUTHFAIL)  # what RelayUserAuth._ebBadAuth records
    proto.offended(Offence.NOAUTH)  # not worse
    _end(proto)
    assert core.admission.penalties.penalised["authfail"] == 1
    assert core.admission.penalties.penalised["noauth"] == 0


def test_worst_offence_wins() -> None:
    assert worst(None, Offence.NOAUTH) is Offence.NOAUTH
    assert worst(Offence.AUTHFAIL, Offence.NOAUTH) is Offence.AUTHFAIL
    assert worst(Offence.AUTHFAIL, Offence.PROTOCOL) is Offence.PROTOCOL
    assert worst(Offence.GRACE, Offence.PROTOCOL) is Offence.GRACE


def test_ssh_refused_at_accept_by_source_cap_then_penalty(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    core, factory, reactor = relay
    held = [_connect(factory)[0] for _ in range(2)]
    assert _connect(factory)[0] is None  # per_source_max_unauthenticated = 2
    assert _connect(factory, B)[0] is not None  # another host is not affected
    reactor.advance(5.0)  # the held ones reach login_grace: 2 x 20 s
    for proto in held:
        _end(proto)
    assert _connect(factory)[0] is None
    status = core.status()["admission"]
    assert status["ssh"]["refused"] == {"penalty": 1, "per_source_cap": 1, "global_cap": 0,
                                        "penalty_table_full": 0}
    assert status["penalised_sources"] == 1
    assert core.counters["connections_dropped_unauthenticated_cap"] == 0


def test_authenticated_connections_are_not_penalised(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    core, factory, _reactor = relay
    proto, _tcp = _connect(factory)
    core.authenticated(proto)  # what RelayTransport.setService does on success
    proto.authenticated = True
    _end(proto)
    assert sum(core.admission.penalties.penalised.values()) == 0
    assert core.ssh_gate.total == 0


# --- before the version line, and `none` requests: closed at once, counted ---------------


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", b"\r\n", b"\x16\x03\x01\x02\x00",
                                   b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 22\r\n", b"S", b"x"])
def test_a_client_line_before_its_version_line_is_refused_at_once(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock], first: bytes) -> None:
    """sshd refuses a client that sends anything but its version line first; Conch's
    server skipped such lines, holding the place until ``login_grace``."""
    core, factory, reactor = relay
    proto, tcp = _connect(factory)
    for i in range(len(first)):  # byte by byte: the refusal comes with the first bad one
        proto.dataReceived(first[i:i + 1])
        if tcp.disconnecting:
            break
    if first == b"S":
        assert not tcp.disconnecting  # "S" may still begin "SSH-"
        proto.dataReceived(b"x")
    assert tcp.disconnecting and not proto.gotVersion
    _end(proto)
    assert {k: v for k, v in core.admission.penalties.penalised.items() if v} == {"protocol": 1}
    assert not reactor.getDelayedCalls()


def test_a_version_line_in_pieces_is_read() -> None:
    from relay.ssh.guard import client_first_line_refusal as refusal

    for n in range(1, 9):
        assert refusal(b"SSH-2.0-x"[:n]) is None
    assert refusal(b"GET / HTTP/1.1") == "not an SSH version line: an HTTP request"
    assert refusal(b"\x16\x03\x01") == (
        "not an SSH version line: a TLS handshake (TLS goes to the relay's tls_listen port)")
    assert refusal(b"PROXY TC") == (
        "not an SSH version line: a PROXY protocol header (the relay does not take one)")
    assert refusal(b"SSh-") == refusal(b" SSH-") == refusal(b"G") == "not an SSH version line"


def test_a_connection_logs_nothing_about_a_moduli_file(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    """Conch's factory logged "disabling non-fixed-group key exchange algorithms
    because we cannot find moduli file" (info) for every connection: the relay has no
    primes on purpose, and twistd's log shows every info line.  The transport still
    gets the host key's signature algorithms and offers the policy's key exchanges."""
    from twisted.logger import capturedLogs

    from relay.ssh import policy

    _core, factory, _reactor = relay
    with capturedLogs() as logs:
        proto, tcp = _connect(factory)
    assert not [e for e in logs if "moduli" in str(e.get("log_format", ""))], logs
    assert proto.supportedPublicKeys == [b"ssh-ed25519"]
    assert [k for k in proto.supportedKeyExchanges if k in policy.KEX_ALGORITHMS] == list(
        policy.KEX_ALGORITHMS)
    assert not tcp.disconnecting
    _end(proto)


def test_the_first_bytes_check_is_gone_once_the_version_line_is_in(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of a client's first bytes runs on the reads before its version line
    only: after it, the instance reads straight into the packet path (no frame and no
    check on each read of bulk data).  A ``GET /`` line after a good version line is
    then not a first-line offence: it is read as a packet, as Conch reads it (a bad
    packet length)."""
    from relay.ssh import server
    from relay.ssh.aead import AEADTransportMixin

    checked: list[bytes] = []
    check = server.client_first_line_refusal
    monkeypatch.setattr(server, "client_first_line_refusal",
                        lambda head: checked.append(head) or check(head))
    _core, factory, _reactor = relay
    proto, tcp = _connect(factory)
    proto.dataReceived(b"SSH-2.")
    proto.dataReceived(b"0-OpenSSH_9.6\r\n")
    assert proto.gotVersion and len(checked) == 2
    direct = vars(proto)["dataReceived"]
    assert direct.__func__ is AEADTransportMixin.dataReceived and direct.__self__ is proto
    proto.dataReceived(b"GET / HTTP/1.1\r\n")
    assert len(checked) == 2  # not asked again
    assert tcp.disconnecting
    sent = tcp.value()
    assert b"bad packet length" in sent and b"not an SSH version line" not in sent
    _end(proto)
    assert "dataReceived" not in vars(proto)  # no cycle left behind


def test_only_the_bytes_before_the_version_line_count_toward_its_limit(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    """Conch counted every byte of the read that held the version line toward its
    4 KiB limit: a client whose first read carried its version line and a KEXINIT of
    more than 4 KiB (long post-quantum and host key lists) was dropped.  And it took
    the last line of that read beginning ``SSH-`` as the version line."""
    from twisted.conch.ssh import common

    from relay.ssh import policy

    lists = [
        b",".join([*policy.KEX_ALGORITHMS, policy.STRICT_KEX_CLIENT]
                  + [b"x-kex-%d@example.com" % i for i in range(200)]),
        b"ssh-ed25519", policy.AES128_GCM, policy.AES128_GCM,
        b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-256-etm@openssh.com",
        b"none", b"none", b"", b"",
    ]
    kexinit = b"\x14" + bytes(16) + b"".join(common.NS(x) for x in lists) + bytes(5)
    # An "SSH-" line inside the packet: Conch would have taken it as the version line.
    kexinit = kexinit.replace(b"x-kex-7@", b"\nSSH-97@")
    pad = 8 - (5 + len(kexinit)) % 8 + 8
    packet = struct.pack(">LB", 1 + len(kexinit) + pad, pad) + kexinit + bytes(pad)
    assert len(packet) > 4096
    _core, factory, _reactor = relay
    proto, tcp = _connect(factory)
    proto.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n" + packet)
    assert proto.gotVersion and not tcp.disconnecting, tcp.value()[-200:]
    assert proto.otherVersionString == b"SSH-2.0-OpenSSH_9.6"
    assert proto._peerInKex  # the KEXINIT was read
    # The version line alone still has Conch's limit.
    proto, tcp = _connect(factory, "192.0.2.7")
    proto.dataReceived(b"SSH-2.0-" + b"x" * 4087 + b"\r\n")
    assert tcp.disconnecting and not proto.gotVersion
    assert b"Peer version string longer than 4KB" in tcp.value()


def test_a_server_may_send_bounded_lines_before_its_version_line() -> None:
    """The client side (an agent's link) takes lines before the server's version line
    as sshd's client does: up to 1024, each up to 8192 bytes; a server takes none."""
    from relay.ssh.guard import VERSION_TOO_LONG, scan_version_line

    scan = scan_version_line(b"hello\r\nworld\nSSH-2.0-x\r\nrest", 0, preamble=True)
    assert (scan.skip, scan.lines, scan.end, scan.refusal) == (13, 2, 24, None)
    scan = scan_version_line(b"hello\r\nwor", 5, preamble=True)
    assert (scan.skip, scan.lines, scan.end, scan.refusal) == (7, 6, None, None)
    assert scan_version_line(b"x" * 8193, 0, preamble=True).refusal is not None
    assert scan_version_line(b"x" * 8192, 0, preamble=True).refusal is None
    assert scan_version_line(b"\n", 1023, preamble=True).refusal == (
        b"no SSH version line in the first 1024 lines")
    assert scan_version_line(b"\n", 0, preamble=False).refusal == b"not an SSH version line"
    assert scan_version_line(b"SSH-2.0-" + b"x" * 4089, 0, preamble=False).refusal == (
        VERSION_TOO_LONG)
    assert scan_version_line(b"SSH-2.0-" + b"x" * 4087 + b"\n", 0, preamble=True).end == 4096
    assert scan_version_line(b"SS", 0, preamble=False) == scan_version_line(b"", 0, preamble=False)


def _userauth(factory: RelayFactory) -> tuple[Any, _TCP]:
    """A connection from A past a (simulated) strict key exchange, with ``ssh-userauth``
    started: the seams ``tests/fuzz/fuzzworld.after_strict_kex`` uses."""
    from twisted.conch.ssh import common

    from relay.ssh import policy

    proto, tcp = _connect(factory)
    proto.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
    guard = proto.kexGuard
    assert guard.kexinit_received([policy.CURVE25519, policy.STRICT_KEX_CLIENT], 0) is None
    guard.newkeys_received()
    proto.sessionID = bytes(range(32))
    proto.keyExchanges = 1
    proto.dispatchMessage(5, common.NS(b"ssh-userauth"))
    assert not tcp.disconnecting
    return proto, tcp


def _auth_none(proto: Any) -> None:
    from twisted.conch.ssh import common

    proto.dispatchMessage(50, common.NS(b"mallory") + common.NS(b"ssh-connection")
                          + common.NS(b"none"))


def test_the_first_none_is_free_and_each_further_one_counts(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    """As sshd: a client's first ``none`` (to learn the methods) costs nothing, every
    later one is a failed attempt; the one past ``max_auth_tries`` (6) disconnects and is
    an ``authfail`` offence.  Conch counted none of them."""
    core, factory, _reactor = relay
    proto, tcp = _userauth(factory)
    answered = 0
    while not tcp.disconnecting and answered < 50:
        _auth_none(proto)
        answered += 1
    assert answered == 1 + core.config.max_auth_tries
    assert proto.offence is Offence.AUTHFAIL
    _end(proto)
    assert core.admission.penalties.penalised["authfail"] == 1


def test_a_none_counts_with_the_keys_tried(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    """``none`` and other methods share one count: the first ``none``, four unsupported
    ``password`` attempts and then ``none`` again and again: the sixth counted one
    disconnects."""
    from twisted.conch.ssh import common

    _core, factory, _reactor = relay
    proto, tcp = _userauth(factory)
    _auth_none(proto)
    for _ in range(4):
        proto.dispatchMessage(50, common.NS(b"mallory") + common.NS(b"ssh-connection")
                              + common.NS(b"password") + b"\x00" + common.NS(b"x"))
    assert proto.service.loginAttempts == 4 and not tcp.disconnecting
    _auth_none(proto)
    assert proto.service.loginAttempts == 5 and not tcp.disconnecting
    _auth_none(proto)
    assert tcp.disconnecting
    assert proto.offence is Offence.AUTHFAIL  # max_auth_tries exceeded, whatever the methods


@pytest.mark.parametrize("service,method", [
    (b"s" * 65, b"publickey"),  # a service name one byte over
    (b"ssh-connection", b"m" * 65),  # a method name one byte over
    (b"s" * 30000, b"m" * 30000),
])
def test_a_method_or_service_name_over_64_bytes_fails_that_attempt(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock],
        service: bytes, method: bytes) -> None:
    """docs/security.md: "the relay keeps at most 256 bytes of a user name and 64 of a
    method or service name (a longer one fails that attempt)": it counts as a failed
    attempt, is logged as ``relay_auth_refused``, the connection stays to try again, and
    no more than 64 bytes of either is held."""
    from twisted.conch.ssh import common
    from twisted.logger import Logger

    from relay.ssh.serverauth import NAME_LIMIT

    _core, factory, _reactor = relay
    proto, tcp = _userauth(factory)
    logged: list[dict[str, Any]] = []
    proto.service._log = Logger(observer=logged.append)
    proto.dispatchMessage(50, common.NS(b"mallory") + common.NS(service) + common.NS(method))
    assert proto.service.loginAttempts == 1, "a name over the limit was not a failed attempt"
    # operations.md: "(a longer one fails that attempt, ``relay_auth_refused``)", once,
    # whatever the method (only a refused publickey attempt was logged)
    [refused] = [e for e in logged if e.get("event") == "relay_auth_refused"]
    assert "too long" in refused["why"] and refused["user"] == "mallory", refused
    assert not tcp.disconnecting
    assert len(proto.service.nextService) <= NAME_LIMIT == 64
    assert len(proto.service.method) <= NAME_LIMIT


def test_ssh_eviction_closes_the_oldest_of_the_busiest_source_unpenalised(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    """The gate picks, the relay closes: at the full global cap a new host's
    connection is admitted and the oldest of the host holding the most is aborted,
    counted, logged once per burst (``relay_unauth_evicted``) and not penalised."""
    from twisted.logger import capturedLogs

    from relay.server.dataport import CAP_LOG_WINDOW

    core, factory, reactor = relay
    core.ssh_gate.global_cap = 4
    held = [_connect(factory, h) for h in (A, B, A, B)]  # 2 each (the per-source cap)
    with capturedLogs() as logs:
        newcomers = [_connect(factory, f"198.51.100.{i}") for i in range(1, 21)]
        # the first takes A's oldest, the second B's oldest; then every source holds
        # one and the others are dropped at accept as before
        assert [proto is not None for proto, _tcp in newcomers] == [True] * 2 + [False] * 18
        aborted = [proto for proto, tcp in held if tcp.disconnecting]
        assert aborted == [held[0][0], held[1][0]]
        for proto in aborted:  # the reactor's connectionLost for each abort
            _end(proto)
        reactor.advance(CAP_LOG_WINDOW)
    assert core.counters["connections_evicted_unauthenticated_cap"] == 2
    assert core.counters["connections_dropped_unauthenticated_cap"] == 18
    for proto, _tcp in held[2:] + newcomers[:2]:  # aborted at login_grace
        _end(proto)
    assert core.ssh_gate.total == 0 and core.ssh_gate.evicted == 2
    lines = [e for e in logs if e.get("event") == "relay_unauth_evicted"]
    assert [e["count"] for e in lines] == [1, 1], lines
    assert lines[0]["source"] == f"{A}/32" and lines[0]["peer"] == "198.51.100.1:40000"
    assert lines[1]["source"] == f"{B}/32" and lines[1]["peer"] == "198.51.100.2:40000"
    # the four still open reached login_grace; the two evicted cost nothing
    penalised = {k: v for k, v in core.admission.penalties.penalised.items() if v}
    assert penalised == {"grace-exceeded": 4}


# --- [relay.crowding]: at the full cap, the connection that stalled longest gives way ----


def _crowd(gate: Gate, n: int) -> list[Ticket]:
    """``n`` sources, one place each, each in a neighbourhood of its own (IPv6 /64s of
    distinct /48s): no source nor neighbourhood holds more, so only progress decides."""
    return [_ticket(gate, f"2001:db8:{i:x}::1") for i in range(n)]


def test_one_idle_place_per_source_gives_way_once_silent_past_its_seconds(
        clock: Clock) -> None:
    """The attack the busiest-source rule cannot answer: 64 sources, one idle
    connection each (an IPv6 /56 has 256).  Before its ``silent`` seconds nobody is
    evicted (a real client's version line is on its way); after them the newcomer takes
    the oldest silent place, and that source is charged ``grace-exceeded`` (20 s, past
    ``min``): its next connection is refused at accept."""
    adm = _admission(clock)
    gate = adm.gate("ssh", global_cap=64)
    crowd = _crowd(gate, 64)
    assert gate.admit(A) is Refusal.GLOBAL  # everyone holds one: no busiest source
    clock.advance(1.9)
    assert gate.admit(A) is Refusal.GLOBAL  # within ``silent`` (2 s)
    clock.advance(0.2)
    alice = _ticket(gate, A)
    assert alice.take_displaced() is crowd[0] and crowd[0].stalled is Stage.SILENT
    assert gate.total == 64 and gate.stalled == {"silent": 1, "handshake": 0, "auth": 0}
    assert adm.penalties.penalised["grace-exceeded"] == 1
    assert gate.admit("2001:db8:0:0::7") is Refusal.PENALTY  # the evicted /64, refused
    gate.closed(crowd[0], Offence.NOAUTH)  # its connection's end is not charged again
    assert adm.penalties.penalised == {"authfail": 0, "noauth": 0, "grace-exceeded": 1,
                                       "protocol": 0}


def test_progress_decides_who_gives_way_before_age(clock: Clock) -> None:
    """The lowest stage first, the oldest within it: a connection that sent its version
    line outlasts an older silent one, one past key exchange outlasts both; each is
    evictable only past its own stage's seconds (counted from accept)."""
    adm = _admission(clock)
    gate = adm.gate("ssh", global_cap=3)
    keyed, spoke, silent = _crowd(gate, 3)
    gate.advance(keyed, Stage.AUTH)
    gate.advance(spoke, Stage.HANDSHAKE)
    gate.advance(spoke, Stage.SILENT)  # never backwards
    assert spoke.stage is Stage.HANDSHAKE
    clock.advance(2.0)
    alice = _ticket(gate, A)  # a real client: keyed within a few round trips
    assert alice.take_displaced() is silent  # the youngest, but silent past 2 s
    gate.advance(alice, Stage.AUTH)
    assert gate.admit("203.0.113.2") is Refusal.GLOBAL  # the version line's 10 s not yet up
    clock.advance(8.0)
    bob = _ticket(gate, "203.0.113.2")  # not alice's /24: each neighbourhood holds one
    assert bob.take_displaced() is spoke and spoke.stalled is Stage.HANDSHAKE
    gate.advance(bob, Stage.AUTH)
    assert gate.admit(C) is Refusal.GLOBAL  # all keyed, ``keyed`` for 10 s of its 20
    clock.advance(10.0)
    assert _ticket(gate, C).take_displaced() is keyed and keyed.stalled is Stage.AUTH
    assert gate.stalled == {"silent": 1, "handshake": 1, "auth": 1}
    assert adm.penalties.penalised["grace-exceeded"] == 3


def test_a_stalled_eviction_keeps_the_per_source_cap(clock: Clock) -> None:
    """A source at ``per_source_max_unauthenticated`` gets no stalled place of another
    source's (it would hold one more than its cap); it may replace its own."""
    adm = _admission(clock, per_source_max_unauthenticated=2)
    gate = adm.gate("ssh", global_cap=4)
    a1, a2 = _ticket(gate, A), _ticket(gate, A)
    _b1, _b2 = _ticket(gate, B), _ticket(gate, B)
    clock.advance(5.0)
    assert gate.refuses(A) is None  # its own oldest, a1, is stalled
    assert _ticket(gate, A).take_displaced() is a1
    assert gate.admit(B) is Refusal.GLOBAL  # the stalled oldest is A's a2: not B's own
    assert gate.pending == {f"{A}/32": 2, f"{B}/32": 2}
    # C holds none: A's a2 goes (the busiest-source rule, which comes first: unpenalised)
    assert _ticket(gate, C).take_displaced() is a2 and a2.stalled is None
    assert gate.stalled["silent"] == 1


def test_crowding_can_be_turned_off(clock: Clock) -> None:
    config = dataclasses.replace(RelayConfig(), crowding=CrowdingConfig(enabled=False))
    gate = Admission(config, clock).gate("ssh", global_cap=8)
    _crowd(gate, 8)
    clock.advance(29.0)
    assert gate.admit(A) is Refusal.GLOBAL and gate.refuses(A) is Refusal.GLOBAL


def test_refuses_marks_nothing_and_the_tls_door_sees_stalled_places(clock: Clock) -> None:
    """``refuses`` (the TLS port asks it before a handshake) says None when a stalled
    place would be given, without marking it: a later eviction of the same ticket for
    the busiest-source rule must not be charged as stalled."""
    adm = _admission(clock)
    gate = adm.gate("ssh", global_cap=4)
    crowd = _crowd(gate, 4)
    clock.advance(3.0)
    assert gate.refuses(A) is None
    assert all(t.stalled is None and t.pending for t in crowd)
    assert adm.penalties.penalised["grace-exceeded"] == 0


def test_reconnecting_sources_lose_their_places_to_penalties(clock: Clock) -> None:
    """A crowd of 256 sources (an IPv6 /56 at /64 grouping) that reconnects every
    0.25 s whenever it holds no place (refused, evicted): each stalled eviction blocks
    its source for ``grace_exceeded`` (20 s), so the crowd runs out of sources and a
    newcomer gets in; the gate's work stays bounded (heaps at most 2 x live + 64)."""
    adm = _admission(clock)
    gate = adm.gate("ssh", global_cap=64)
    holding: dict[int, Ticket] = {}
    sources = [f"2001:db8:0:{i:x}::1" for i in range(256)]
    admitted_alice = []
    for tick in range(240):  # 60 s
        for i, host in enumerate(sources):
            held = holding.get(i)
            if held is not None and held.pending:
                continue
            if held is not None:  # evicted: its connection ends
                gate.closed(held, Offence.NOAUTH)
                del holding[i]
            verdict = gate.admit(host)
            if isinstance(verdict, Ticket):
                holding[i] = verdict
        if tick % 8 == 7:  # every 2 s, a newcomer (alice, her own source each time)
            verdict = gate.admit(f"192.0.2.{tick // 8}")
            admitted_alice.append(isinstance(verdict, Ticket))
            if isinstance(verdict, Ticket):
                gate.passed(verdict)  # she logs in
        assert all(len(h) <= 2 * live + 16 for h, live in zip(gate._stages.heaps,
                                                               gate._stages.live, strict=True))
        clock.advance(0.25)
    print(f"\n256 reconnecting sources, 60 s: {sum(admitted_alice)}/{len(admitted_alice)} "
          f"newcomers admitted, {gate.stalled['silent']} stalled evictions, "
          f"{adm.penalties.activated} penalties activated, "
          f"{gate.refused['penalty']} refused for a penalty")
    assert sum(admitted_alice[-10:]) >= 5  # once the crowd is penalised


def test_the_ssh_transport_reports_its_version_line_to_the_gate(
        relay: tuple[RelayCore, RelayFactory, MemoryReactorClock]) -> None:
    """The stage a connection's place is judged by: silent until its version line is
    in (a line in pieces counts once whole), then handshake."""
    core, factory, _reactor = relay
    proto, _tcp = _connect(factory)
    ticket = proto.admission
    assert ticket.stage is Stage.SILENT
    proto.dataReceived(b"SSH-2.0-Open")
    assert ticket.stage is Stage.SILENT
    proto.dataReceived(b"SSH_9.6\r\n")
    assert ticket.stage is Stage.HANDSHAKE
    assert core.ssh_gate.status()["stages"] == {"silent": 0, "handshake": 1, "auth": 0}
    _end(proto)
    assert core.ssh_gate.status()["stages"] == {"silent": 0, "handshake": 0, "auth": 0}
