"""An agent granted ``tb:*`` registers 3 000 ports: the admin answers stay bounded.

lab_pc (paramiko) asks for ``tb:1`` … ``tb:3000`` and ``web:8080`` (one
``tcpip-forward`` each, all granted).  ``/status.json`` listed every registration
three times over (``services``, the agent's ``services``, ``per_service`` once
sessions ran) and the status page every one as a row: each answer, and each 5 s
refresh of an open page, grew with what an agent chose to register.  Now each long
list shows its first 100 (``?limit=N``, ``?all=1`` for all) with exact counts
(``services_count``, ``services_summary`` per agent and name); ``labrelay status``
says how many it left out.  The sizes are measured and bounded (64 KiB).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
from harness import RelayNode, make_key
from relay_fixtures import REPO_ROOT, child_env

pytestmark = [pytest.mark.integration, pytest.mark.security]

REGISTERED = 3000
BOUND = 64 * 1024


def _get(relay: RelayNode, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{relay.admin}{path}", timeout=30) as r:
        return bytes(r.read())


def test_thousands_of_registrations_keep_the_status_answers_bounded_and_exact(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    lab_pc = make_key(tmp_path / "lab_pc", "lab_pc")
    relay = start_relay(
        agents=[f'permitlisten="tb:*",permitlisten="web:8080" {lab_pc.public_blob()} lab_pc'])
    t = paramiko.Transport(("127.0.0.1", relay.port))
    t.connect(username="lab_pc",
              pkey=paramiko.Ed25519Key.from_private_key_file(str(lab_pc.path)))
    try:
        for port in range(1, REGISTERED + 1):
            t.global_request("tcpip-forward", ("tb", port), wait=False)
        assert t.global_request("tcpip-forward", ("web", 8080), wait=True) is not None
        assert t.global_request("keepalive@openssh.com", wait=True) is None  # all answered

        raw = _get(relay, "/status.json")
        page = _get(relay, "/")
        everything = _get(relay, "/status.json?all=1")
        print(f"\n{REGISTERED + 1} registrations: /status.json {len(raw)} bytes, page "
              f"{len(page)} bytes; ?all=1 {len(everything)} bytes")
        assert len(raw) < BOUND and len(page) < BOUND

        status: dict[str, Any] = json.loads(raw)["relay"]
        assert status["services_count"] == REGISTERED + 1
        assert status["services_summary"] == [
            {"owner": "lab_pc", "name": "tb", "registered": REGISTERED},
            {"owner": "lab_pc", "name": "web", "registered": 1}]
        assert len(status["services"]) == 100 and status["limit"] == 100
        assert status["services"][0]["service"] == "web:8080"  # explicitly granted first
        [agent] = status["agents"]
        assert agent["services_count"] == REGISTERED + 1 and len(agent["services"]) == 100
        assert b"2901 more of 3001 registrations not shown" in page
        assert b"lab_pc tb: 3000" in page

        full = json.loads(everything)["relay"]
        assert len(full["services"]) == REGISTERED + 1 and full["limit"] is None
        few = json.loads(_get(relay, "/status.json?limit=7"))["relay"]
        assert len(few["services"]) == 7 and few["services_count"] == REGISTERED + 1
        with pytest.raises(urllib.error.HTTPError) as bad:
            _get(relay, "/status.json?limit=lots")
        assert bad.value.code == 400

        cli = subprocess.run(
            [sys.executable, "-m", "relay", "status", "--admin", relay.admin],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=child_env(),
            check=True).stdout
        print(f"labrelay status: {len(cli)} characters, {cli.count(chr(10))} lines")
        assert len(cli) < BOUND
        assert ("... 2901 more of 3001 registrations not shown (labrelay status --all); "
                "registered per agent and name: lab_pc tb: 3000, lab_pc web: 1") in cli
        assert "3001 (first 100): tb:1 tb:2 tb:3" in cli, cli[:600]
        every = subprocess.run(
            [sys.executable, "-m", "relay", "status", "--all", "--admin", relay.admin],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=child_env(),
            check=True).stdout
        assert "tb:2999" in every and "more of" not in every
    finally:
        t.close()
