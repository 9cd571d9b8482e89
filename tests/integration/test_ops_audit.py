"""Issue 14, audit log and accounting: three users' sessions through a real relay, the
audit events checked against the bytes the test sent, and the same per-user totals in
``/status.json``, ``/metrics`` (parsed with prometheus_client's own parser) and
``labrelay status``, kept across a reload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import (
    AgentProcess,
    KeyPair,
    RelayNode,
    SshProcess,
    echo_roundtrip,
    free_port,
    make_key,
    ssh_argv,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

SENT = {"alice": [1000, 20000], "bob": [3000], "carol": [4096, 1, 70000]}
"""Bytes each user's sessions send (the echo target sends as many back)."""


def metrics_samples(relay: RelayNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{relay.admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_three_users_sessions_audit_events_and_totals(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    base = tmp_path
    keys: dict[str, KeyPair] = {n: make_key(base / "keys" / n, n)
                                for n in ("lab_pc", "alice", "bob", "carol")}
    echo = targets.echo()
    relay = start_relay(
        agents=[f'permitlisten="echo:7000" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="echo:7000" {keys[u].public_blob()} {u}'
               for u in ("alice", "bob", "carol")],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    agent = start_agent("-p", str(relay.port), "-i", str(keys["lab_pc"].path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes",
                        "-R", f"echo:7000:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1")
    agent.wait_for("forward_ready", timeout=30, bind="echo")

    def sessions_of(user: str) -> None:
        port = free_port()
        ssh = start_ssh(ssh_argv(relay.port, keys[user].path, relay.known_hosts, "-v", "-N",
                                 "-o", "ExitOnForwardFailure=yes",
                                 "-L", f"127.0.0.1:{port}:echo:7000", user=user),
                        name=f"ssh-{user}")  # fmt: skip
        ssh.wait_stderr(r"new port-listener")
        for n in SENT[user]:
            payload = os.urandom(n)
            assert echo_roundtrip(port, payload) == payload
            relay.wait_for("session_close", since=0, user=user, bytes_to_service=n)

    sessions_of("alice")
    # A reload between users: the totals live in the relay's session table, not in
    # anything a reload rebuilds.
    mark = relay.mark()
    os.kill(relay.pid, signal.SIGHUP)
    relay.wait_for("reload_done", since=mark)
    sessions_of("bob")
    sessions_of("carol")

    for user, sizes in SENT.items():
        opens = relay.events("session_open", user=user)
        closes = relay.events("session_close", user=user)
        assert len(opens) == len(closes) == len(sizes), (user, opens, closes)
        assert sorted(c["bytes_to_service"] for c in closes) == sorted(sizes)
        assert sorted(c["bytes_from_service"] for c in closes) == sorted(sizes)
        for event in opens + closes:
            assert event["key"] == keys[user].fingerprint()
            assert event["service"] == "echo:7000" and event["path"] == "channel"
            assert event["origin"].startswith("127.0.0.1:") and event["audit"] is True
        for close in closes:
            assert close["duration"] >= 0 and close["why"] == "bridge closed"

    totals = relay.status()["relay"]["per_user_totals"]
    samples = metrics_samples(relay)
    for user, sizes in SENT.items():
        expected = {"sessions_total": len(sizes), "sessions_active": 0,
                    "bytes_to_service": sum(sizes), "bytes_from_service": sum(sizes)}
        assert totals[user] == expected, (user, totals)
        labels = (("user", user),)
        assert samples[("labrelay_relay_user_sessions_total", labels)] == len(sizes)
        assert samples[("labrelay_relay_user_sessions_active", labels)] == 0
        for direction in ("to_service", "from_service"):
            key = ("labrelay_relay_user_bytes_total", (("direction", direction), *labels))
            assert samples[key] == sum(sizes), (key, samples.get(key))
    service = relay.status()["relay"]["per_service"]["echo:7000"]
    everything = sum(sum(s) for s in SENT.values())
    assert service["bytes_to_service"] == everything
    assert samples[("labrelay_relay_bytes_total",
                    (("direction", "to_service"), ("service", "echo:7000")))] == everything

    table = subprocess.run([sys.executable, "-m", "relay", "status", "--admin", relay.admin],
                           capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
                           env={**os.environ, **child_env()})
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()]
    for user, sizes in SENT.items():
        assert [user, "0", str(len(sizes)), f"{sum(sizes)}/{sum(sizes)}"] in rows, table.stdout
