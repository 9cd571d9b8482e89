"""Connections to a public port whose agent is away: a bounded log.

While lab_pc's link is down its public port stays bound, and connections to it wait
``public_wait`` for the agent; at most ``max_unauthenticated`` wait per port, and every
one past that was refused with one ``relay_public_refused`` warning: anyone on the
internet, connecting and closing in a loop, wrote a line per connection, as fast as
the relay accepted (the log flood docs/security.md rules out).  Now the first refusal
of a burst is logged, then one count line when the burst's 10 s end; the counter
``sessions_refused`` counts them all.

Connections the agent serves are not capped per port (they are the target's to
limit), but each is a descriptor of the relay's one process, which the SSH port needs
too: 127.0.0.2 holding 300 connections to a public port (no key, no SSH) ran a relay
limited to 256 descriptors out of them, and alice could no longer log in.  Now the
public ports hold at most half the descriptor limit; alice logs in.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from conftest import Targets
from harness import LOOPBACK, RelayNode, SshProcess, free_port, make_key, ssh_argv
from relay_fixtures import burst_windows, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.security]

CAP = 8
EXTRA = 2000


def test_connections_past_the_waiting_cap_cost_a_bounded_number_of_log_lines(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    public_port = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public_port}" {lab_pc.public_blob()} lab_pc'],
        relay_toml=f'public_bind = "127.0.0.1"\npublic_wait = 30\n'
                   f'max_unauthenticated = {CAP}\n')
    agent = paramiko.Transport((LOOPBACK, relay.port))
    agent.connect(username="lab_pc",
                  pkey=paramiko.Ed25519Key.from_private_key_file(str(lab_pc.path)))
    assert agent.global_request("tcpip-forward", ("", public_port), wait=True) is not None
    agent.close()  # the agent is away; its port stays bound
    relay.wait_for("relay_disconnected", timeout=10, since=0)

    waiting = [socket.create_connection((LOOPBACK, public_port), timeout=5)
               for _ in range(CAP)]
    try:
        refused0 = relay.status()["relay"]["counters"]["sessions_refused"]
        for _ in range(EXTRA):
            try:
                with socket.create_connection((LOOPBACK, public_port), timeout=5) as s:
                    s.recv(1)  # closed (reset) by the relay
            except ConnectionResetError:
                pass  # reset at once, even before connect() returned
        ended = time.time()  # the relay's log times are wall-clock times
        status = relay.status()["relay"]["counters"]
        assert status["sessions_refused"] - refused0 == EXTRA
        # Every refusal is in the log once each window's count line is (the first line
        # of a burst stands for one): two lines a window.  The flood takes ~1-3 s, one
        # window; past 10 s on a slow box it opens a second (it used to fail there).
        wait_until(lambda: sum(e.get("count", 1) for e in relay.events("relay_public_refused"))
                   == EXTRA, "the bursts' count lines", timeout=25)
        lines = relay.events("relay_public_refused")
        windows = burst_windows(lines[0]["time"], ended)
        print(f"\n{EXTRA} connections past the waiting cap: {len(lines)} log lines in "
              f"{windows} window(s), sessions_refused +{status['sessions_refused'] - refused0}")
        assert "count" not in lines[0] and lines[-1]["count"] >= 1, lines
        assert len(lines) <= 2 * windows, lines
    finally:
        for s in waiting:
            s.close()


NOFILE = 256
HELD = 300


def test_connections_held_on_a_public_port_do_not_take_the_ssh_port(
    start_relay: Callable[..., RelayNode], start_ssh: Callable[..., SshProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice")}
    public_port = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public_port}" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {keys["alice"].public_blob()} alice'],
        # one source (127.0.0.2) plays every holder: no per-source cap here
        # (test_public_per_source.py has it)
        relay_toml='public_bind = "127.0.0.1"\npublic_max_per_source = 0\n')
    target = targets.echo(greeting=b"P")
    agent = start_ssh(ssh_argv(
        relay.port, keys["lab_pc"].path, relay.known_hosts, "-v", "-N",
        "-R", f"0.0.0.0:{public_port}:127.0.0.1:{target.port}", user="lab_pc",
    ), name="stock-agent")  # fmt: skip
    agent.wait_stderr(rf"remote forward success for: listen 0\.0\.0\.0:{public_port},")
    subprocess.run(["prlimit", f"--pid={relay.pid}", f"--nofile={NOFILE}:{NOFILE}"],
                   check=True)
    held: list[socket.socket] = []
    try:
        for _ in range(HELD):
            held.append(socket.create_connection((LOOPBACK, public_port), timeout=5,
                                                 source_address=("127.0.0.2", 0)))
        served = 0
        for s in held:
            s.settimeout(0.5 if served == 0 else 0.05)
            try:
                served += s.recv(1) == b"P"
            except OSError:
                pass
        t = paramiko.Transport((LOOPBACK, relay.port))
        t.banner_timeout = 10
        try:
            t.connect(username="alice",
                      pkey=paramiko.Ed25519Key.from_private_key_file(str(keys["alice"].path)))
            alice_in: object = t.is_authenticated()
        except (paramiko.SSHException, OSError) as e:
            alice_in = e
        finally:
            t.close()
        print(f"\n{HELD} connections held on a public port (relay limited to {NOFILE} "
              f"descriptors): {served} served; alice: {alice_in!r}")
        assert alice_in is True, f"alice could not log in: {alice_in!r}"
        assert served <= NOFILE // 2
        assert served >= NOFILE // 2 - 8  # the cap, not the descriptor limit
        relay.wait_for("relay_public_cap", timeout=5, since=0)
        assert not relay.events("relay_accept_failed")
    finally:
        for s in held:
            s.close()

    def served_again() -> bool:  # the places come back as the connections end
        with socket.create_connection((LOOPBACK, public_port), timeout=5) as s:
            s.settimeout(2)
            try:
                return s.recv(1) == b"P"
            except OSError:
                return False

    wait_until(lambda: sum(served_again() for _ in range(NOFILE // 2 + 8)) == NOFILE // 2 + 8,
               "public connections served again", timeout=30)
