"""Round 20's probe of round 19's lapsed-ticket table (relay.core.tokens, ``7d66fcf``)
with raw sockets on the data port, not ``labrelay connect``.

A ticket the sweep forgot is remembered with its secret for one more lifetime, so a
late presentation is ``expired`` (no penalty: only an honest, late client holds the
secret) and a made-up proof for the same id is ``wrong proof`` (a guess, ``authfail``
for its source).  Checked here end to end, from two source addresses: a stranger at
127.0.0.2 presenting alice's lapsed ticket id with a made-up secret is refused as a
guess and charged; alice at 127.0.0.1 presenting her other lapsed ticket with its
secret is told ``expired`` and charged nothing.  The stranger's guess used up the id
(single use, as for a live ticket): its owner presenting it afterwards is ``unknown``,
a guess.  Only someone who saw the id can do that, and the id crosses the wire only in
its owner's own hello, after which it is spent anyway.
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
from typing import Any

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import LOOPBACK, AgentProcess, RelayNode, make_key

from relay.core import fastwire as fw

pytestmark = [pytest.mark.integration, pytest.mark.security]
TOKENCLIENT = Path(__file__).resolve().parents[1] / "integration" / "tokenclient.py"


def _present(port: int, source: str, token: bytes) -> tuple[bool, str]:
    """One data connection from ``source``: the challenge read, a user hello for
    echo:7 with ``token``; the relay's answer (ok, its words)."""
    with socket.create_connection((LOOPBACK, port), timeout=10,
                                  source_address=(source, 0)) as sock:
        buf = b""
        while (challenge := fw.parse_challenge(buf)) is None:
            chunk = sock.recv(4096)
            assert chunk, "closed before the challenge"
            buf += chunk
        nonce, buf = challenge
        sock.sendall(fw.user_hello(token, nonce, "echo", 7))
        while (reply := fw.parse_reply(buf, fw.USER_OK, fw.USER_ERROR)) is None:
            chunk = sock.recv(4096)
            assert chunk, "closed without an answer"
            buf += chunk
        ok, message, _ = reply
        return ok, message


def _authfail(relay: RelayNode) -> int:
    return int(relay.status()["relay"]["admission"]["penalties"]["authfail"])


def test_a_lapsed_tickets_id_with_a_made_up_proof_is_a_penalised_guess(
        openssh: None, start_relay: Callable[..., RelayNode],
        start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path) -> None:
    lab_pc, alice = (make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice"))
    echo = targets.echo(greeting=b"echo\n")
    relay = start_relay(
        agents=[f'permitlisten="echo:7" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="echo:7" {alice.public_blob()} alice'],
        relay_toml='data_port = 0\ne2e_services = ["echo:7"]\ntoken_lifetime = 5\n')
    agent = start_agent(
        "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}",
        "-R", f"echo:7:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1", name="agent")
    agent.wait_for("fast_path_ready", timeout=20)
    agent.wait_for("forward_ready", timeout=20, since=0, bind="echo")
    data_port = relay.wait_for("relay_data_port", since=0)["port"]

    proc = subprocess.Popen(
        [sys.executable, str(TOKENCLIENT), "-p", str(relay.port), "-i", str(alice.path),
         "-o", f"UserKnownHostsFile={relay.known_hosts}", "--count", "2",
         f"alice@{LOOPBACK}", "echo:7"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **child_env()}, cwd=REPO_ROOT)
    try:
        assert proc.stdout is not None
        replies: list[dict[str, Any]] = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [r["status"] for r in replies] == ["OK", "OK"], replies
        first, second = (bytes.fromhex(r["token"]) for r in replies)
        # Swept (lifetime 5 s, swept every 5 s, remembered 5 s more): no event says
        # so, the status does.
        deadline = time.monotonic() + 20
        while relay.status()["relay"]["fast_path"]["tokens_outstanding_by_role"]["user"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        before = _authfail(relay)

        forged = first[:fw.TOKEN_ID_LEN] + os.urandom(fw.TOKEN_LEN - fw.TOKEN_ID_LEN)
        ok, said = _present(data_port, "127.0.0.2", forged)
        print(f"\nlapsed id, made-up proof, from 127.0.0.2: {said!r}")
        assert not ok
        refused = relay.wait_for("relay_data_refused", timeout=10, source="127.0.0.2")
        assert "wrong proof" in refused["why"], refused
        deadline = time.monotonic() + 10
        while _authfail(relay) < before + 1:  # charged when the connection is closed
            assert time.monotonic() < deadline, relay.status()["relay"]["admission"]
            time.sleep(0.05)

        ok, said = _present(data_port, LOOPBACK, second)
        print(f"lapsed ticket, its own proof, from 127.0.0.1: {said!r}")
        assert not ok
        refused = relay.wait_for("relay_data_refused", timeout=10, source=LOOPBACK)
        assert "expired" in refused["why"], refused
        ok, said = _present(data_port, LOOPBACK, first)  # the guess used it up
        print(f"the guessed one, its own proof, from 127.0.0.1: {said!r}")
        assert not ok
        refused = relay.wait_for("relay_data_refused", timeout=10, source=LOOPBACK,
                                 since=refused["_index"] + 1)
        assert "unknown" in refused["why"], refused
        deadline = time.monotonic() + 10
        while _authfail(relay) < before + 2:
            assert time.monotonic() < deadline, relay.status()["relay"]["admission"]
            time.sleep(0.05)
        assert _authfail(relay) == before + 2  # the guess and the unknown, not 'expired'
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
