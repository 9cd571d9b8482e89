"""Fast-path sessions waiting for their agent end when a grants change takes the
service away, as the channel and public-port waits do (test_resume_attacks.py).

alice holds two fast-path tickets for ``gpu-cluster:22`` (tokenclient.py keeps her SSH
session open); the agent then goes away, and she presents a ticket on the data port by
hand: the relay waits up to ``public_wait`` (30 s here) for the agent.  Then:

1. the agents file takes ``gpu-cluster:22`` from lab_pc: no agent may ever serve it,
   so her wait ends at once, with the reason;
2. the grant comes back; she presents the second ticket and waits again; the users
   file takes ``gpu-cluster:22`` from her (she keeps ``web:8080``, so her SSH session
   stays): her wait ends at once too.

Before the fix both waited the full ``public_wait``: the fast path's wait was not one
of the relay's tracked waits (relay.server.waiting) and nothing could cancel it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import LOOPBACK, AgentProcess, RelayNode, make_key
from relay_fixtures import connect_argv, wait_until
from test_fastpath import _read_all

from relay.core import fastwire as fw

pytestmark = [pytest.mark.integration, pytest.mark.security]

TOKENCLIENT = Path(__file__).parents[1] / "integration" / "tokenclient.py"
PUBLIC_WAIT = 30
BOUND = 5.0


def _challenge(s: socket.socket) -> bytes:
    got = b""
    while True:
        parsed = fw.parse_challenge(got)
        if parsed is not None:
            return parsed[0]
        chunk = s.recv(fw.CHALLENGE_LEN - len(got))
        assert chunk, got
        got += chunk




def _write(path: Path, *lines: str) -> float:
    t0 = time.monotonic()
    with open(path, "w") as f:
        f.write("".join(entry + "\n" for entry in lines))
    return t0


def _waiting_ticket(relay: RelayNode, data_port: int, token: bytes) -> socket.socket:
    """A data connection that presented ``token`` and now waits for the agent."""
    mark = relay.mark()
    s = socket.create_connection((LOOPBACK, data_port), timeout=PUBLIC_WAIT + 15)
    s.sendall(fw.user_hello(token, _challenge(s), "gpu-cluster", 22))
    relay.wait_for("relay_session_waiting", timeout=10, since=mark, service="gpu-cluster:22")
    return s


def _ended(s: socket.socket, t0: float) -> tuple[float, str]:
    reply = _read_all(s)
    took = time.monotonic() - t0
    s.close()
    parsed = fw.parse_reply(reply, fw.USER_OK, fw.USER_ERROR)
    assert parsed is not None and not parsed[0], reply
    return took, parsed[1]


def test_a_grants_change_ends_fast_path_waits_at_once(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    lab_pc, alice = make_key(tmp_path / "lab_pc", "lab_pc"), make_key(tmp_path / "alice", "alice")
    agent_line = (f'permitlisten="gpu-cluster:22",permitlisten="web:8080" '
                  f"{lab_pc.public_blob()} lab_pc")
    alice_line = f'permitopen="gpu-cluster:22",permitopen="web:8080" {alice.public_blob()} alice'
    relay = start_relay(
        agents=[agent_line], users=[alice_line],
        relay_toml=f'data_port = 0\ne2e_services = ["gpu-cluster:22"]\n'
                   f'public_wait = {PUBLIC_WAIT}\npenalty_exempt = ["127.0.0.1"]\n')
    data_port = relay.wait_for("relay_data_port", since=0)["port"]
    echo = targets.echo()
    agent = start_agent("-p", str(relay.port), "-i", str(lab_pc.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-R", f"gpu-cluster:22:127.0.0.1:{echo.port}",
                        "-R", f"web:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
                        name="agent")
    agent.wait_for("fast_path_ready", timeout=20)
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")

    tokens = subprocess.Popen(
        [sys.executable, str(TOKENCLIENT), "-p", str(relay.port), "-i", str(alice.path),
         "-o", f"UserKnownHostsFile={relay.known_hosts}", "--count", "2",
         f"alice@{LOOPBACK}", "gpu-cluster"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **child_env()}, cwd=REPO_ROOT)  # fmt: skip
    try:
        assert tokens.stdout is not None
        replies = [json.loads(tokens.stdout.readline()) for _ in range(2)]
        assert [r["status"] for r in replies] == ["OK", "OK"], replies
        first, second = (bytes.fromhex(r["token"]) for r in replies)

        mark = relay.mark()
        agent.kill()
        relay.wait_for("relay_disconnected", timeout=20, since=mark, kind="agent")

        # 1. the agent loses the service: no agent may serve it any more
        waiting = _waiting_ticket(relay, data_port, first)
        t0 = _write(relay.dir / "agents",
                    f'permitlisten="web:8080" {lab_pc.public_blob()} lab_pc')
        agent_lost, why = _ended(waiting, t0)
        assert "no longer granted to any agent" in why, why

        # 2. the grant comes back; alice waits again and loses the service herself
        mark = relay.mark()
        _write(relay.dir / "agents", agent_line)
        relay.wait_for("grants_reloaded", timeout=10, since=mark)
        waiting = _waiting_ticket(relay, data_port, second)
        t0 = _write(relay.dir / "users", f'permitopen="web:8080" {alice.public_blob()} alice')
        user_lost, why = _ended(waiting, t0)
        assert "no longer granted to user alice" in why, why
        print(f"\nfast-path waits ended {agent_lost:.2f} s (agent's grant) and "
              f"{user_lost:.2f} s (user's grant) after the change; public_wait {PUBLIC_WAIT} s")
        assert agent_lost < BOUND and user_lost < BOUND
        assert tokens.poll() is None  # her SSH session (web:8080 still granted) stays
        fast = relay.status()["relay"]["fast_path"]
        assert fast["paired"] == 0 and fast["pair_failed"] == 2, fast
        assert relay.status()["relay"]["sessions"] == []
    finally:
        if tokens.poll() is None:
            assert tokens.stdin is not None
            tokens.stdin.close()
            tokens.wait(timeout=15)


def test_labrelay_connect_waiting_for_a_free_data_connection_ends_when_its_grant_goes(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    """Real ``labrelay connect`` processes, a real relay and agent: the agent (pool of
    one) is frozen (SIGSTOP: a machine under load, a debugger), so the first session
    takes its one idle data connection and waits for its answer, and the second finds
    none free and waits for the agent to dial another (relay.server.pooled's wait, so far
    only unit-tested: test_dataport.py, ``stage == "pool"``).  The users file then takes
    ``gpu-cluster:22`` from alice: both ``labrelay connect`` exit 1 at once, saying why
    on stderr, not after ``public_wait``."""
    lab_pc, alice = make_key(tmp_path / "lab_pc", "lab_pc"), make_key(tmp_path / "alice", "alice")
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22",permitopen="web:8080" {alice.public_blob()} alice'],
        relay_toml=f'data_port = 0\ne2e_services = ["gpu-cluster:22"]\n'
                   f'public_wait = {PUBLIC_WAIT}\npenalty_exempt = ["127.0.0.1"]\n')
    echo = targets.echo()
    agent = start_agent("-p", str(relay.port), "-i", str(lab_pc.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "--fast-path-pool", "1",
                        "-R", f"gpu-cluster:22:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
                        name="agent")
    agent.wait_for("fast_path_ready", timeout=20)
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    wait_until(lambda: relay.status()["relay"]["fast_path"]["pools"].get("lab_pc") == 1,
               "the agent's one data connection idle at the relay")
    agent.sigstop()
    connects: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(2):
            mark = relay.mark()
            connects.append(subprocess.Popen(
                connect_argv(relay, "alice", alice, "gpu-cluster"), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, **child_env()}, cwd=REPO_ROOT))
            relay.wait_for("session_open", timeout=20, since=mark, service="gpu-cluster:22")
        fast = relay.status()["relay"]["fast_path"]
        assert fast["paired"] == 0 and fast["pools"].get("lab_pc", 0) == 0, fast

        t0 = _write(relay.dir / "users", f'permitopen="web:8080" {alice.public_blob()} alice')
        ended = []
        for proc in connects:
            _, err = proc.communicate(timeout=PUBLIC_WAIT)
            ended.append(time.monotonic() - t0)
            assert proc.returncode == 1, err
            assert b"gpu-cluster:22 is no longer granted to user alice" in err, err
        print(f"\nlabrelay connect (one awaiting the agent's answer, one a free data "
              f"connection) ended {ended[0]:.2f} / {ended[1]:.2f} s after the grant went; "
              f"public_wait {PUBLIC_WAIT} s")
        assert max(ended) < BOUND
        fast = relay.status()["relay"]["fast_path"]
        assert fast["paired"] == 0 and fast["pair_failed"] == 2, fast
        assert relay.status()["relay"]["sessions"] == []
    finally:
        agent.sigcont()
        for proc in connects:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=15)
