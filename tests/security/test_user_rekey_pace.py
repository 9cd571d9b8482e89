"""Key exchanges started in a loop on many connections of one user (round 17).

Round 16 paced the re-keys a peer starts per *connection* (16 at once, then one a
second; test_rekey_flood.py), and a user may hold ``max_connections_per_user`` (64)
connections: 64 bursts of 16 and ~64 curve25519 exchanges a second.  Now all the
connections of one user also draw on one shared bucket (relay.ssh.kex
``USER_KEX_PACE_BURST`` at once, then ``USER_KEX_PACE_RATE`` a second): a re-key past it
is held like one past its connection's pace, and completes later; nobody is
disconnected.

The control is in the same test: bob, another user, re-keying in the same loop on ONE
connection for the same seconds (his own connection's pace).  alice on 16 connections
must get at most a small multiple of his key exchanges, not sixteen times as many.  And
stock OpenSSH re-keying on its own (``RekeyLimit``) through the relay while alice's
shared bucket is empty moves its bytes exact: its re-keys wait, then complete.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode, SshProcess, ssh_argv
from relay_fixtures import stock_local_forward
from test_greedy_user import _echo, _login, _world

from relay.ssh.kex import KEX_PACE_BURST, USER_KEX_PACE_BURST, USER_KEX_PACE_RATE

pytestmark = [pytest.mark.integration, pytest.mark.security]

CONNECTIONS = 16
SECONDS = 4.0
RATIO = 3.0  # alice's key exchanges on 16 connections / bob's on one, at most


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rekey_loops(relay: RelayNode, conns: list[paramiko.Transport],
                 seconds: float) -> tuple[int, float, list[threading.Thread], list[int]]:
    """``renegotiate_keys()`` in a loop on every connection for ``seconds``: (key
    exchanges completed by then, relay CPU seconds meanwhile, the loops, the counts)."""
    counts = [0] * len(conns)
    stop = threading.Event()

    def loop(i: int) -> None:
        t = conns[i]
        while not stop.is_set() and t.is_active():
            t.renegotiate_keys()
            counts[i] += 1

    loops = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(conns))]
    cpu0 = _cpu_seconds(relay.pid)
    for t in loops:
        t.start()
    stop.wait(seconds)
    stop.set()
    done = sum(counts)  # at the deadline: the held ones complete later
    return done, _cpu_seconds(relay.pid) - cpu0, loops, counts


def test_many_connections_of_one_user_share_one_rekey_pace(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    bob = _login(relay, keys["bob"], "bob")
    alices = [_login(relay, keys["alice"], "alice") for _ in range(CONNECTIONS)]

    control, control_cpu, loops, _ = _rekey_loops(relay, [bob], SECONDS)
    for t in loops:
        t.join(timeout=10)
    done, cpu, loops, counts = _rekey_loops(relay, alices, SECONDS)
    print(f"\nbob (1 connection): {control} key exchanges in {SECONDS:g}s, relay CPU "
          f"{control_cpu:.2f}s; alice ({CONNECTIONS} connections): {done}, relay CPU "
          f"{cpu:.2f}s; per connection {counts}")
    # Her re-keys held at the deadline complete later, in turn (one each at most).
    for t in loops:
        t.join(timeout=CONNECTIONS / USER_KEX_PACE_RATE + 10)
    assert not any(t.is_alive() for t in loops), "a held re-key never completed"
    assert all(t.is_active() for t in alices)  # paced, not disconnected
    assert _echo(alices[0], b"alice") == b"alice"
    assert control >= KEX_PACE_BURST  # his loop ran
    # Per connection only (round 16), she had ~16 times his: 16 bursts and 16 a second.
    assert done <= RATIO * control, (done, control)
    assert done <= USER_KEX_PACE_BURST + USER_KEX_PACE_RATE * (SECONDS + 1) + CONNECTIONS
    relay.wait_for("ssh_kex_paced", timeout=5, since=0)
    for t in [bob, *alices]:
        t.close()


def _exhaust(relay: RelayNode, key: object) -> None:
    """alice re-keys on three connections until her shared bucket holds one back."""
    conns = [_login(relay, key, "alice") for _ in range(3)]
    stop = threading.Event()

    def loop(t: paramiko.Transport) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            t.renegotiate_keys()
            if time.monotonic() - t0 > 0.3:  # held: the bucket is empty
                stop.set()

    loops = [threading.Thread(target=loop, args=(t,), daemon=True) for t in conns]
    for t in loops:
        t.start()
    for t in loops:
        t.join(timeout=30)
    assert stop.is_set()
    for t in conns:
        t.close()


def test_stock_ssh_rekeys_complete_while_the_users_pace_holds_them(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess], targets: Targets, tmp_path: Path,
) -> None:
    """OpenSSH's own re-keys (``RekeyLimit=1M``) during a 3 MiB echo, started when
    alice's shared bucket is empty: held for their turn, then completed; byte-exact."""
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    _exhaust(relay, keys["alice"])
    mark = relay.mark()
    ssh, port = stock_local_forward(
        start_ssh,
        lambda port: ssh_argv(relay.port, keys["alice"].path, relay.known_hosts, "-v",
                              "-N", "-o", "ExitOnForwardFailure=yes", "-o",
                              "RekeyLimit=1M", "-L", f"127.0.0.1:{port}:web:8080",
                              user="alice"),
    )  # fmt: skip
    payload = os.urandom(3 << 20)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    t0 = time.monotonic()
    sender.start()
    got = bytearray()
    while len(got) < len(payload):
        d = sock.recv(1 << 16)
        assert d, "the echo ended early"
        got += d
    sender.join(timeout=10)
    elapsed = time.monotonic() - t0
    sock.close()
    newkeys = ssh.stderr_text().count("SSH2_MSG_NEWKEYS received")
    paced = relay.events("ssh_kex_paced", since=mark)
    print(f"\n3 MiB echoed in {elapsed:.2f}s across {newkeys} key exchanges; "
          f"held: {[e.get('wait') for e in paced]}")
    assert bytes(got) == payload
    assert newkeys >= 4, ssh.stderr_text()[-2000:]
    assert paced, "ssh's re-keys were not held: the test did not test the pace"
    assert ssh.returncode is None
