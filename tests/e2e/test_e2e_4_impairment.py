"""A 64 MiB scp arrives intact over an impaired lab_pc<->cloud link (issue 5 §3):
delay 200 ms ± 50 ms; loss 1 % and 5 %; reorder 25 %; duplicate 1 %; the throughput
under each is reported.

The impairment is ``tc qdisc ... netem`` on the router when the kernel has it; this
machine's kernel has no ``sch_netem``, so ``wire.py`` (a userspace TUN wire with
netem's semantics) stands in for it. Either way it applies to both directions of the
lab_pc<->cloud hop only; mac<->cloud stays clean. netem's ``reorder`` needs a delay to
reorder against: 25 % of packets go at once, the rest wait 10 ms.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from harness import DataStream, recv_exactly
from nodes import CLOUD, ECHO_PORT, GPU, MiB, Site, file_sha256, rate
from topology import Impairment

Record = Callable[..., dict[str, Any]]
SIZE = 64 * MiB
FAR_PORT = 7600  # eve's ssh -L on mac

SETTINGS = [
    ("none, through the impairment path", Impairment()),
    ("delay 200 ms ± 50 ms", Impairment(delay_ms=200, jitter_ms=50)),
    ("loss 1 %", Impairment(loss=0.01)),
    ("loss 5 %", Impairment(loss=0.05)),
    ("reorder 25 % (delay 10 ms)", Impairment(delay_ms=10, reorder=0.25)),
    ("duplicate 1 %", Impairment(duplicate=0.01)),
]


def connect_time(site: Site, port: int) -> float:
    """One TCP handshake lab_pc -> cloud (a round trip over the impaired hop)."""
    with site.topo.inside("lab_pc"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        started = time.monotonic()
        sock.connect((CLOUD, port))
        return time.monotonic() - started
    finally:
        sock.close()


def test_64mib_scp_intact_under_each_impairment(site: Site, record: Record) -> None:
    gpu = site.start_gpu(data=False)
    relay = site.start_relay()
    # The fault scenarios' 1 s x 3 keepalive declares the link dead after 4 s of silence;
    # under 200 ms ± 50 ms of jitter through the userspace wire, TCP's retransmission
    # back-off alone can be that silent (seen once in CI), and this scenario is about the
    # bytes arriving intact, not about detecting a dead link: 1 s x 10.
    agent = site.start_agent(keepalive=(1, 10))
    site.wait_agent_ready(agent)
    stream = DataStream(900, SIZE)
    src = site.write_file("impaired.bin", stream)
    dst = site.dir / "arrived.bin"

    def scp(label: str) -> float:
        if dst.exists():
            dst.unlink()
        out, took = site.scp("alice", str(src), f"gpu-cluster:{dst}", timeout=400)
        assert out.returncode == 0, (label, out.stderr.decode(errors="replace"))
        assert file_sha256(dst) == (stream.size, stream.sha256), label
        return took

    took = scp("kernel path")
    record("impairment: none (kernel path, no wire)", bytes_sent=SIZE, bytes_received=SIZE,
           bytes_lost=0, sessions=1, silently_wrong=0, throughput_mib_s=round(rate(SIZE, took), 1))
    backend = ""
    for label, imp in SETTINGS:
        backend = site.topo.impair(imp)
        rtt = connect_time(site, relay.port)
        if imp.delay_ms >= 100:
            assert rtt >= 2 * (imp.delay_ms - imp.jitter_ms) / 1000 * 0.9, rtt
        before = site.topo.wire_stats()
        took = scp(label)
        after = site.topo.wire_stats()
        notes = f"{backend}; handshake {rtt * 1000:.0f} ms"
        if before is not None and after is not None:
            moved = {k: sum(after[d][k] - before[d][k] for d in ("to_cloud", "to_lab"))
                     for k in ("received", "lost", "duplicated", "reordered", "overflow")}
            notes += (f"; packets {moved['received']}, lost {moved['lost']}, "
                      f"duplicated {moved['duplicated']}, sent early {moved['reordered']}, "
                      f"over limit {moved['overflow']}")
            if imp.loss:
                assert moved["lost"] > 0, moved
            if imp.duplicate:
                assert moved["duplicated"] > 0, moved
            if imp.reorder:
                assert moved["reordered"] > 0, moved
        record(f"impairment: {label}", bytes_sent=SIZE, bytes_received=SIZE, bytes_lost=0,
               sessions=1, silently_wrong=0, throughput_mib_s=round(rate(SIZE, took), 1),
               impairment=imp.as_dict(), backend=backend, seconds=round(took, 2), notes=notes)
    site.topo.clear_impairment()
    assert len(agent.events("link_connected")) == 1, agent.events("link_lost")
    assert gpu.connections() == gpu.connections_from(site.topo.address("lab_pc"))


def first_echo(site: Site, port: int, payload: bytes) -> float:
    """A new connection to eve's ``ssh -L`` port on mac: ``payload`` sent at once,
    seconds until all of it came back (a session's set-up to its first echo)."""
    started = time.monotonic()
    with site.mac_socket(port) as sock:
        sock.sendall(payload)
        got = recv_exactly(sock, len(payload))
        took = time.monotonic() - started
    assert got == payload
    return took


def far_first_echoes(site: Site, relay_port: int, record: Record, scenario: str, notes: str,
                     before_each: Callable[[], object] = lambda: None,
                     check: Callable[[], object] = lambda: None) -> None:
    """Five new sessions' first echoes with the agent 100 ms away (one way) and the user
    next to the relay, recorded as ``scenario``: the median must be under 1.5 round trips
    of the far link (one, not two).  ``before_each`` runs before each session (the
    pooled route waits for an idle connection); ``check`` runs once the link is clean
    again, before the row is recorded (the route's own counters)."""
    imp = Impairment(delay_ms=100)
    backend = site.topo.impair(imp)
    try:
        rtt = connect_time(site, relay_port)
        assert rtt >= 0.18, rtt
        took: list[float] = []
        for _ in range(5):
            before_each()
            took.append(first_echo(site, FAR_PORT, os.urandom(200)))
    finally:
        site.topo.clear_impairment()
    check()
    took.sort()
    median = took[2]
    record(scenario, sessions=5, bytes_lost=0, silently_wrong=0, impairment=imp.as_dict(),
           backend=backend, handshake_ms=round(rtt * 1000),
           first_echo_ms=[round(t * 1000) for t in took], round_trips=round(median / rtt, 2),
           notes=notes)
    assert median < 1.5 * rtt, (took, rtt)


def test_a_far_agents_new_session_echoes_after_one_round_trip_not_two(
        site: Site, record: Record) -> None:
    """The agent 100 ms away (one way), the user next to the relay: her first bytes go
    to the agent with the open (early-data@labrelay, docs/relay.md), so a new session's
    first echo takes one round trip of the far link, not two (the agent's answer, then
    her bytes).  Protocol round trips, not speed: 1 against 2 times 200 ms."""
    site.start_gpu(data=False, echo=True)
    relay = site.start_relay()
    agent = site.start_agent(f"echo:{ECHO_PORT}:{GPU}:{ECHO_PORT}", keepalive=(1, 10))
    site.wait_agent_ready(agent)
    agent.wait_for("forward_ready", timeout=20, kind="remote", bind="echo", port=ECHO_PORT)
    site.local_forward("eve", f"echo:{ECHO_PORT}", FAR_PORT)
    first_echo(site, FAR_PORT, b"warm")  # a fresh registration: confirmed after the agent

    def counters() -> dict[str, int]:
        return dict(relay.status()["relay"]["counters"])

    before = counters()

    def check() -> None:
        after = counters()
        assert after["early_data_sessions"] - before["early_data_sessions"] == 5
        assert after["early_data_bytes"] - before["early_data_bytes"] == 5 * 200

    far_first_echoes(
        site, relay.port, record, "a far agent: a new session's first echo",
        notes="the user's first bytes sent with the open (early-data@labrelay)", check=check)


def test_a_far_agents_pooled_session_echoes_after_one_round_trip_not_two(
        site: Site, record: Record) -> None:
    """The same on the pooled route (docs/fastpath.md, "GO, her bytes, then K"): the
    echo service declared end-to-end, so each of eve's ``ssh -L`` sessions rides one of
    the agent's pooled data connections, across the far hop too.  Her bytes follow the
    GO on it as they arrive, so the first echo takes one round trip of the far link, not
    two (the agent's ``K``, then her bytes)."""
    site.start_gpu(data=False, echo=True)
    relay = site.start_relay(e2e_services=["gpu-cluster:22", f"echo:{ECHO_PORT}"])
    agent = site.start_agent(f"echo:{ECHO_PORT}:{GPU}:{ECHO_PORT}", keepalive=(1, 10))
    site.wait_agent_ready(agent)
    agent.wait_for("forward_ready", timeout=20, kind="remote", bind="echo", port=ECHO_PORT)
    site.local_forward("eve", f"echo:{ECHO_PORT}", FAR_PORT)

    def fast() -> dict[str, Any]:
        return dict(relay.status()["relay"]["fast_path"])

    def pool_has_one() -> None:
        """Each session finds an idle pooled connection (the pool refills across the
        far hop between sessions; a session that found none would take the link)."""
        deadline = time.monotonic() + 20
        while fast()["pools"].get("lab_pc", 0) < 1:
            assert time.monotonic() < deadline, fast()["pools"]
            time.sleep(0.05)

    pool_has_one()
    first_echo(site, FAR_PORT, b"warm")  # a fresh registration: confirmed after the agent
    before = fast()["pooled"]

    def check() -> None:
        assert fast()["pooled"] - before == 5, fast()

    far_first_echoes(
        site, relay.port, record, "a far agent, pooled route: a new session's first echo",
        notes="the user's first bytes written behind the GO on a pooled data connection",
        before_each=pool_has_one, check=check)
