"""Token flooding (issue 10 §5): a granted user asks for fast-path tickets without end
and never uses them.  Outstanding tickets are capped per SSH session
(``max_tokens_per_session``) and per user (``max_tokens_per_user``); past a cap the
answer is *unavailable* (``labrelay connect`` falls back to an SSH channel), and
expired tickets are swept on a timer, not only when a new one is issued.  Meanwhile
another user's fast path and the flooder's own sessions keep working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import LOOPBACK, AgentProcess, DataStream, KeyPair, RelayNode, make_key

pytestmark = pytest.mark.integration
TOKENCLIENT = Path(__file__).resolve().parents[1] / "integration" / "tokenclient.py"


class Flood:
    """One SSH session of ``user`` asking for ``count`` tickets; held open until closed."""

    def __init__(self, relay: RelayNode, key: KeyPair, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TOKENCLIENT), "-p", str(relay.port), "-i", str(key.path),
             "-o", f"UserKnownHostsFile={relay.known_hosts}", "--count", str(count),
             f"alice@{LOOPBACK}", "echo:7"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **child_env()}, cwd=REPO_ROOT)
        assert self.proc.stdout is not None
        self.replies = [json.loads(self.proc.stdout.readline()) for _ in range(count)]

    def statuses(self) -> list[str]:
        return [r["status"] for r in self.replies]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=15)


def _connect(relay: RelayNode, key: KeyPair, user: str, payload: bytes,
             ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "connect", "-v", "-p", str(relay.port), "-i", str(key.path),
         "-o", f"UserKnownHostsFile={relay.known_hosts}", f"{user}@{LOOPBACK}", "echo:7"],
        input=payload, capture_output=True, timeout=60, env={**os.environ, **child_env()},
        cwd=REPO_ROOT)


def _fast(relay: RelayNode) -> dict[str, Any]:
    return dict(relay.status()["relay"]["fast_path"])


def test_token_flood_is_capped_and_swept(
        openssh: None, start_relay: Callable[..., RelayNode],
        start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path) -> None:
    lab_pc, alice, bob = (make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice", "bob"))
    echo = targets.echo(greeting=b"echo\n")
    relay = start_relay(
        agents=[f'permitlisten="echo:7" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="echo:7" {alice.public_blob()} alice',
               f'permitopen="echo:7" {bob.public_blob()} bob'],
        relay_toml='data_port = 0\ne2e_services = ["echo:7"]\ntoken_lifetime = 8\n'
                   "max_tokens_per_session = 8\nmax_tokens_per_user = 12\n")
    agent = start_agent(
        "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}",
        "-R", f"echo:7:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1", name="agent")
    agent.wait_for("fast_path_ready", timeout=20)
    agent.wait_for("forward_ready", timeout=20, since=0, bind="echo")

    first = Flood(relay, alice, 40)
    second = Flood(relay, alice, 40)
    try:
        assert first.statuses() == ["OK"] * 8 + ["UNAVAILABLE"] * 32
        assert "max_tokens_per_session" in first.replies[8]["message"]
        assert second.statuses() == ["OK"] * 4 + ["UNAVAILABLE"] * 36  # 12 for alice in all
        assert "max_tokens_per_user" in second.replies[4]["message"]
        fast = _fast(relay)
        assert fast["tokens_issued"]["user"] == 12 and fast["tokens_capped"] == 68, fast

        # Meanwhile: alice's own session falls back to a channel; bob's is spliced.
        payload = DataStream(5, 256 * 1024).bytes()
        out = _connect(relay, alice, "alice", payload)
        assert out.returncode == 0 and out.stdout == b"echo\n" + payload, out.stderr.decode()
        assert b"max_tokens_per_user" in out.stderr and b"using an SSH channel" in out.stderr
        out = _connect(relay, bob, "bob", payload)
        assert out.returncode == 0 and out.stdout == b"echo\n" + payload, out.stderr.decode()
        assert b"fast path (spliced)" in out.stderr

        # Swept on the clock: both flooding sessions stay open and ask for nothing more,
        # and their expired tickets go (token_lifetime 8 s, swept every 5 s).
        deadline = time.monotonic() + 20
        while _fast(relay)["tokens_outstanding_by_role"]["user"] > 0:  # no event: poll
            assert time.monotonic() < deadline, _fast(relay)
            time.sleep(0.1)
        out = _connect(relay, alice, "alice", payload)  # her room is back
        assert out.returncode == 0 and out.stdout == b"echo\n" + payload, out.stderr.decode()
        assert b"fast path (spliced)" in out.stderr
    finally:
        first.close()
        second.close()
    for proc in (relay, agent):
        crit = [e for e in proc.events() if e.get("level") == "critical"]
        assert not crit, (proc.name, crit)
