"""A user whose laptop vanishes without a FIN or RST (Wi-Fi gone, lid closed): the relay
ends its side of her connection once its keepalives go unanswered, as docs/resilience.md
promises ("the relay ends its side once its keepalives to the user go unanswered
(``keepalive_interval`` × (``keepalive_count`` + 1))"), and frees her session; the
agent's link and other users are untouched.

Her stock ``ssh -L`` is SIGSTOPped: its TCP connection stays open (the kernel still
acknowledges), but nothing answers at the SSH layer, which is what a vanished laptop
looks like to the relay until TCP gives up, some 15 minutes later.  Before this test
only agents' links were checked for this (``relay_peer_dead`` with ``kind="agent"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode, SshProcess, free_port, make_key, ssh_argv
from test_resume import Interactive

pytestmark = pytest.mark.integration

INTERVAL, COUNT = 1, 2  # the relay's: dead after (2 + 1) × 1 = 3 s without an answer
DEAD_AFTER = INTERVAL * (COUNT + 1)


def test_a_user_who_vanished_is_closed_after_the_keepalive_limit(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice", "bob")}
    echo = targets.echo()
    relay = start_relay(
        agents=[f'permitlisten="web:8080" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {keys[u].public_blob()} {u}' for u in ("alice", "bob")],
        relay_toml=(f"keepalive_interval = {INTERVAL}\nkeepalive_count = {COUNT}\n"
                    'penalty_exempt = ["127.0.0.1"]\n'),
    )  # fmt: skip
    agent = start_agent(
        "-p", str(relay.port), "-i", str(keys["lab_pc"].path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-R", f"web:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", bind="web")
    ports = {}
    users = {}
    for user in ("alice", "bob"):
        ports[user] = free_port()
        users[user] = start_ssh(ssh_argv(relay.port, keys[user].path, relay.known_hosts, "-v",
                                         "-N", "-o", "ExitOnForwardFailure=yes",
                                         "-L", f"127.0.0.1:{ports[user]}:web:8080", user=user),
                                name=user)  # fmt: skip
        users[user].wait_stderr(r"new port-listener")
    hers, his = Interactive(ports["alice"]), Interactive(ports["bob"])
    assert hers.line(b"before ") == b"before " and his.line(b"before ") == b"before "
    assert {s["user"] for s in relay.status()["relay"]["sessions"]} == {"alice", "bob"}

    rmark = relay.mark()
    t0 = time.monotonic()
    users["alice"].sigstop()
    try:
        dead = relay.wait_for("relay_peer_dead", timeout=DEAD_AFTER + 10, since=rmark,
                              kind="user", name="alice")
        elapsed = time.monotonic() - t0
        print(f"alice's connection closed {elapsed:.2f} s after her ssh stopped answering "
              f"(silence {dead['silence']:.2f} s; limit {DEAD_AFTER} s)")
        assert dead["silence"] >= DEAD_AFTER - 0.5, dead
        assert elapsed <= DEAD_AFTER + 3, elapsed
        # Her session is freed at the relay; bob's goes on, on the same agent link.
        deadline = time.monotonic() + 10
        while any(s["user"] == "alice" for s in relay.status()["relay"]["sessions"]):
            assert time.monotonic() < deadline, relay.status()["relay"]["sessions"]
            time.sleep(0.05)
        assert his.line(b"after") == b"after"
        assert [e for e in relay.events("relay_peer_dead", since=rmark)
                if e.get("kind") != "user"] == [], "the agent's link was called dead"
    finally:
        users["alice"].sigcont()
