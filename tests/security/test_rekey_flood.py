"""Key exchanges started in a loop by a logged-in user.

Every key exchange a peer starts costs the relay a curve25519 or ML-KEM exchange, a
host key signature and the key derivation, on its one thread (~0.9-1.4 ms), and
nothing bounded how many a connection could start: alice (paramiko, granted
``web:8080``) calling ``renegotiate_keys()`` in a loop on six connections took ~2 400
in 5 s, ~2 s of the relay's CPU (sshd does not limit them either, but it forks a
process per connection; here everyone shares one).  Now the key exchanges a peer
starts after the first are paced per connection (relay.ssh.kex: 16 at once, then one
a second): a KEXINIT before its turn is held, and nothing more of that peer read,
until its turn (and since round 17 also per user, across her connections:
test_user_rekey_pace.py; the bound below is the per-connection one, still an upper
bound).  Nobody is disconnected: alice's connections stay up and echo, bob's
echoes meanwhile, and the relay's CPU for her loop is bounded by the pace.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode
from relay_fixtures import wait_until
from test_greedy_user import _echo, _login, _world

from relay.ssh.kex import KEX_PACE_BURST, KEX_PACE_RATE

pytestmark = [pytest.mark.integration, pytest.mark.security]

CONNECTIONS = 6
SECONDS = 5.0
ECHOES = 200


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_key_exchanges_started_in_a_loop_are_paced(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    bob = _login(relay, keys["bob"], "bob")
    alices = [_login(relay, keys["alice"], "alice") for _ in range(CONNECTIONS)]
    counts = [0] * CONNECTIONS
    stop = threading.Event()

    def rekey(i: int) -> None:
        t = alices[i]
        while not stop.is_set() and t.is_active():
            t.renegotiate_keys()
            counts[i] += 1

    cpu0, started = _cpu_seconds(relay.pid), time.monotonic()
    loops = [threading.Thread(target=rekey, args=(i,), daemon=True) for i in range(CONNECTIONS)]
    for loop in loops:
        loop.start()
    echoes: list[float] = []
    ch = bob.open_channel("direct-tcpip", ("web", 8080), ("127.0.0.1", 1), timeout=20)
    ch.settimeout(20)
    deadline = threading.Timer(SECONDS, stop.set)
    deadline.start()
    try:
        for _ in range(ECHOES):  # a bounded number: their CPU is not alice's
            t0 = time.monotonic()
            ch.sendall(b"bob")
            got = b""
            while len(got) < 3:
                got += ch.recv(3 - len(got))
            assert got == b"bob"
            echoes.append(time.monotonic() - t0)
    finally:
        for loop in loops:
            loop.join(timeout=SECONDS + 10)
        stop.set()
        deadline.cancel()
    elapsed = time.monotonic() - started
    cpu = _cpu_seconds(relay.pid) - cpu0
    done = sum(counts)
    echoes.sort()
    print(f"\nalice: {done} key exchanges on {CONNECTIONS} connections in {elapsed:.2f}s; "
          f"relay CPU {cpu:.2f}s; bob {len(echoes)} echoes, median "
          f"{echoes[len(echoes) // 2] * 1000:.1f} ms, max {echoes[-1] * 1000:.1f} ms")
    # Each connection: the burst, then one a second (and the one in flight when the
    # loop stopped; renegotiate_keys returns once its exchange is done).
    bound = CONNECTIONS * (KEX_PACE_BURST + KEX_PACE_RATE * elapsed + 2)
    assert done <= bound, (done, bound)
    assert all(t.is_active() for t in alices)  # paced, not disconnected
    for t in alices:
        assert _echo(t, b"alice") == b"alice"
        t.close()
    relay.wait_for("ssh_kex_paced", timeout=5, since=0)
    bob.close()


def test_a_client_that_rekeys_every_megabyte_is_not_slowed(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    """paramiko re-keying after every 1 MiB (its packetizer's limit, lowered) moves
    8 MiB through the relay byte-exact; every key exchange it starts completes at the
    relay, none held by the pace (they are within the burst)."""
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    t = _login(relay, keys["alice"], "alice")
    t.packetizer.REKEY_BYTES = 1 << 20
    t.packetizer.REKEY_PACKETS = 1 << 30
    newkeys = 0
    activate = t._activate_inbound

    def counted() -> None:
        nonlocal newkeys
        newkeys += 1
        activate()

    t._activate_inbound = counted  # type: ignore[method-assign]
    payload = os.urandom(8 << 20)
    t0 = time.monotonic()
    got = _echo(t, payload)
    print(f"\n8 MiB echoed in {time.monotonic() - t0:.2f}s across {newkeys} key exchanges")
    assert got == payload
    # No more triggers; let an exchange already started finish (paramiko clears in_kex
    # after counting the relay's NEWKEYS, its own sent before).
    t.packetizer.REKEY_BYTES = 1 << 40
    wait_until(lambda: not t.in_kex and not t.packetizer.need_rekey(), "paramiko's last rekey")
    # How many paramiko starts depends on load: it checks its limit per packet, sent and
    # received apart, and what a key exchange in flight carries is not counted toward the
    # next (7-9 seen, once 7 in CI's parallel run; it used to be asserted >= 6). What the
    # test is for does not: each of them completed at the relay (its count on her
    # connection, logged at her NEWKEYS, is her first exchange + hers), none was held.
    # Several, or the test does not exercise a client that keeps re-keying: 3 is well
    # under the 7 seen under load (each exchange would have to absorb ~2 MiB).
    assert 3 <= newkeys <= KEX_PACE_BURST, newkeys
    relay.proc.wait_for("ssh_keys", count=newkeys + 1, advance=False, timeout=10)
    assert max(e["count"] for e in relay.events("ssh_keys")) == newkeys + 1
    assert not relay.events("ssh_kex_paced")
    t.close()
