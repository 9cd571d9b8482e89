"""A greedy lab mate's small-packet flood, whatever its shape, costs bob no latency
beyond what the same load costs him without the relay in the way.

alice (paramiko, in a process of her own) floods 1-byte ``CHANNEL_DATA`` to an echo
service, reading the echoes back: on 50 channels of one connection, and on 5 connections
of her key with 10 channels each; a third shape adds ``SSH_MSG_IGNORE`` and keepalive
global requests to the data.  bob is a stock ``ssh -N -L`` through the same relay and
agent to the same echo server (a process of its own); the test times 100-byte round
trips on his forwarded port with a plain socket.

Round 15 held each of a user's *connections* to ``PACKETS_PER_TURN`` packets per reactor
turn (relay.ssh.aead) and joined small packets per channel per read: bob's p99 held,
but the relay still opened every one of her packets, her 5 connections got 5 budgets,
and an ``SSH_MSG_IGNORE`` or a global request between her 1-byte packets undid the
joining.  Now the budget is her *user's*, shared by all her connections and served in
turn (relay.ssh.turnshare), those messages leave the joining alone, while another user
is active she waits after each turn past her budget as long as it took, and what one
read makes the relay send leaves in one write per peer (docs/security.md, "One user's
share of the relay's CPU").

The bounds are relative, measured in the same run: the control is alice running the
same client loop straight against the echo server (the same CPU load of hers on this
2-core box, no relay work); bob's median and p99 under her flood are compared with the
control's.  Measured on the shared 2-core box (load average ~4 from other jobs), bob's
median ms under the flood (control 0.3-1.9 ms) before / after, interleaved runs:
50 channels 6.9-13.5 (6 runs) / 0.4-4.8 (8 runs), and one run of 10.5 whose control
p99 was 46 ms (the box busy: it fails this bound); 5 connections 7.2-18.6 (6) / 0.8-1.5
(5); with IGNORE and keepalives 55-90 (6) / 1.0-1.5 (5).  The figures without the fix
fail the bounds in every run.  The 50-channel shape varies most: in its slow runs
(4.8, 10.5 ms) she sent twice as many packets as in the others (92 000 against 18 000-
48 000), i.e. she was not held back, as when her reads stay under the turn's budget and
she never waits (not checked directly; docs/security.md: not bounded by design).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import AgentProcess, RelayNode, SshProcess, free_port, make_key, ssh_argv

pytestmark = [pytest.mark.integration, pytest.mark.security]

SAMPLES = 400  # bob's round trips per phase
MEDIAN_RATIO = 5.0  # bob's median under the flood / control, at most (+ MEDIAN_SLACK_MS)
MEDIAN_SLACK_MS = 2.0
P99_RATIO = 3.0  # the same for his p99 (+ P99_SLACK_MS)
P99_SLACK_MS = 15.0

# The echo server, a process of its own (a thread in the test's process would share the
# GIL with bob's timing loop).  Prints its port.
ECHO = r"""
import selectors, socket
sel = selectors.DefaultSelector()
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(256); ls.setblocking(False)
sel.register(ls, selectors.EVENT_READ)
print(ls.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is ls:
            c, _ = ls.accept(); c.setblocking(False)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            d = s.recv(65536)
        except OSError:
            d = b""
        if not d:
            sel.unregister(s); s.close(); continue
        s.setblocking(True); s.sendall(d); s.setblocking(False)
"""

# alice's side.  argv: relay port, key, mode, connections, channels per connection,
# echo port.  Prints "ready", floods until its stdin closes, then prints how many
# packets she sent and whether every byte came back exact and in order.
ALICE = r"""
import select, socket, sys, paramiko
port, keyfile, mode, nconn, nchan, echo_port = sys.argv[1:7]
nconn, nchan = int(nconn), int(nchan)
def stopped():
    return select.select([sys.stdin], [], [], 0)[0]
n = 0
if mode == "control":
    socks = [socket.create_connection(("127.0.0.1", int(echo_port)))
             for _ in range(nconn * nchan)]
    for s in socks:
        s.setblocking(False)
    print("ready", flush=True)
    while not (n % 1000 == 0 and stopped()):
        for s in socks:
            s.send(b"a"); n += 1
            try: s.recv(65536)
            except BlockingIOError: pass
    print(n, True, flush=True)
    sys.exit()
key = paramiko.Ed25519Key.from_private_key_file(keyfile)
ts = []
for _ in range(nconn):
    t = paramiko.Transport(("127.0.0.1", int(port)))
    t.connect(username="alice", pkey=key)
    ts.append(t)
chans = [t.open_channel("direct-tcpip", ("web", 8080), ("127.0.0.1", 1), timeout=30)
         for t in ts for _ in range(nchan)]
sent = [bytearray() for _ in chans]
got = [bytearray() for _ in chans]
print("ready", flush=True)
while not (n % 1000 == 0 and stopped()):
    for i, c in enumerate(chans):
        b = bytes(((len(sent[i]) * 7 + i) % 256,))
        c.send(b); sent[i] += b; n += 1
        if mode == "noise" and i % 2 == 0:  # messages that are not channel data
            t = c.get_transport()
            t.send_ignore(1)
            t.global_request("keepalive@openssh.com", wait=False)
            n += 2
        while c.recv_ready():
            got[i] += c.recv(65536)
for c in chans:
    c.shutdown_write()
for i, c in enumerate(chans):
    c.settimeout(60)
    while True:
        d = c.recv(65536)
        if not d:
            break
        got[i] += d
print(n, all(g == s for g, s in zip(got, sent)), flush=True)
for t in ts:
    t.close()
"""


def _round_trips(sock: socket.socket, n: int) -> list[float]:
    """``n`` echoes of 100 bytes, one after the other: each one's time in ms."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        sock.sendall(b"x" * 100)
        got = 0
        while got < 100:
            d = sock.recv(1000)
            assert d, "bob's session ended"
            got += len(d)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _median(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def _p99(samples: list[float]) -> float:
    return sorted(samples)[int(0.99 * len(samples))]


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def world(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess], tmp_path: Path,
) -> Iterator[tuple[RelayNode, AgentProcess, dict, int, socket.socket]]:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice", "bob")}
    relay = start_relay(
        agents=[f'permitlisten="web:8080" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {keys[u].public_blob()} {u}' for u in ("alice", "bob")],
    )
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None
        echo_port = int(echo.stdout.readline())
        agent = start_agent(
            "-p", str(relay.port), "-i", str(keys["lab_pc"].path),
            "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-R", f"web:8080:127.0.0.1:{echo_port}", "lab_pc@127.0.0.1", name="agent",
        )  # fmt: skip
        agent.wait_for("forward_ready", timeout=20, since=0, forward="R:web:8080")
        port = free_port()
        start_ssh(ssh_argv(relay.port, keys["bob"].path, relay.known_hosts, "-v", "-N",
                           "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:web:8080",
                           user="bob"), name="bob").wait_stderr(r"new port-listener")
        bob = socket.create_connection(("127.0.0.1", port), timeout=30)
        bob.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _round_trips(bob, 50)  # warm
        yield relay, agent, keys, echo_port, bob
        bob.close()
    finally:
        echo.kill()
        echo.wait()


def _phase(world: tuple, mode: str, nconn: int, nchan: int
           ) -> tuple[list[float], int, bool, float, float]:
    """bob's round trips while alice runs ``mode``: (samples, her packets, exact,
    relay CPU s, agent CPU s)."""
    relay, agent, keys, echo_port, bob = world
    alice = subprocess.Popen(
        [sys.executable, "-c", ALICE, str(relay.port), str(keys["alice"].path), mode,
         str(nconn), str(nchan), str(echo_port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert alice.stdout is not None and alice.stdin is not None
        assert alice.stdout.readline().strip() == "ready"
        cpu = _cpu(relay.pid), _cpu(agent.pid)
        samples = _round_trips(bob, SAMPLES)
        cpu = _cpu(relay.pid) - cpu[0], _cpu(agent.pid) - cpu[1]
        alice.stdin.close()  # stop
        packets, exact = alice.stdout.read().split()
        assert alice.wait(120) == 0
    finally:
        if alice.poll() is None:
            alice.kill()
    return samples, int(packets), exact == "True", *cpu


@pytest.mark.parametrize(("mode", "nconn", "nchan"), [
    ("flood", 1, 50),  # 50 channels of one connection
    ("flood", 5, 10),  # 5 connections of her key
    ("noise", 5, 10),  # and messages that are not channel data
])
def test_bobs_median_and_tail_under_alices_small_packet_flood(
    world: tuple, mode: str, nconn: int, nchan: int,
) -> None:
    # Two tries at most, each a control and a flood measured back to back: other jobs
    # on the box only ever add latency, so a try within the bounds shows the relay
    # holds them; a relay without the budget fails both (6.9-90 ms medians above).
    for attempt in (1, 2):
        control, _, _, rc, ac = _phase(world, "control", nconn, nchan)
        flood, packets, exact, rf, af = _phase(world, mode, nconn, nchan)
        print(f"\n{mode} {nconn}x{nchan} try {attempt}: bob median/p99 ms control "
              f"{_median(control):.2f}/{_p99(control):.1f}, flood {_median(flood):.2f}/"
              f"{_p99(flood):.1f}; alice {packets} packets; relay CPU {rc:.2f}/{rf:.2f} s, "
              f"agent {ac:.2f}/{af:.2f} s (control/flood)")
        # Her bytes and her flood are checked on every try, never retried away.
        assert exact, "alice's bytes did not come back exact and in order"
        assert packets > 10 * SAMPLES  # she did flood
        within = (
            _median(flood) <= MEDIAN_RATIO * _median(control) + MEDIAN_SLACK_MS
            and _p99(flood) <= P99_RATIO * _p99(control) + P99_SLACK_MS)
        if within:
            break
    assert _median(flood) <= MEDIAN_RATIO * _median(control) + MEDIAN_SLACK_MS, (
        f"bob's median {_median(flood):.2f} ms under the flood, control "
        f"{_median(control):.2f} ms (both tries)")
    assert _p99(flood) <= P99_RATIO * _p99(control) + P99_SLACK_MS, (
        f"bob's p99 {_p99(flood):.1f} ms under the flood, control {_p99(control):.1f} ms "
        f"(both tries)")
    assert _round_trips(world[4], 5)  # bob's session still works
