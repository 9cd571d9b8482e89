"""A grant file the admin broke shows in `labrelay status` and /metrics, not only in
the log.

The watch applies a changed grant file by itself, failing closed: a bad line grants
nothing, a file anyone may write grants nothing.  The students it named are refused at
once, and until round 16 `labrelay status` showed no sign of why (the USER table just
lost them), nor did /metrics.  Real ``labrelay relay``; real CLI.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


def _labrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60)


def _metric(admin: str, name: str) -> float:
    request = urllib.request.Request(f"http://{admin}/metrics", headers={"Host": admin})
    with urllib.request.urlopen(request, timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_broken_grant_file_is_shown_in_status_and_metrics(tmp_path: Path) -> None:
    keys = {}
    for who in ("alice", "bob"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", who,
                        "-f", str(tmp_path / who)], check=True)
        keys[who] = " ".join((tmp_path / f"{who}.pub").read_text().split()[:2])
    users = tmp_path / "users"
    good = f'permitopen="gpu:22" {keys["alice"]} alice\n'
    users.write_text(good)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    admin = f"127.0.0.1:{free}"
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
                      f'users_file = "users"\ngrants_poll_interval = 0.05\n\n'
                      f'[admin]\nlisten = "{admin}"\n')
    relay = subprocess.Popen([sys.executable, "-m", "relay", "relay", "--config", str(config),
                              "--log-format", "json"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})

    pending = b""

    def until(event: str, timeout: float = 20.0) -> dict[str, object]:
        """The next JSON event named ``event``; fails after ``timeout`` seconds.  Lines
        are cut from raw reads here: a buffered reader could hold the awaited line
        while select() waits on the descriptor."""
        nonlocal pending
        assert relay.stdout is not None
        fd = relay.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"{") and f'"{event}"'.encode() in line:
                    found: dict[str, object] = json.loads(line)
                    return found
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no {event} within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"relay exited {relay.wait()} before {event}")
            pending += chunk

    try:
        until("admin_listening")
        status = _labrelay("status", "--config", str(config))
        assert status.returncode == 0 and "GRANTS" not in status.stdout, status.stdout
        assert _metric(admin, "labrelay_relay_grant_problems") == 0

        # bob's line with a typo: his line grants nothing, alice's still does
        users.write_text(good + f'permitopen="gpu:22",bogus-option {keys["bob"]} bob\n')
        until("grants_line_invalid")
        until("grants_reloaded")
        status = _labrelay("status", "--config", str(config))
        assert "GRANTS: 1 problem(s)" in status.stdout, status.stdout
        assert f"{users}:2: this line grants nothing" in status.stdout
        assert "bogus-option" in status.stdout
        assert _metric(admin, "labrelay_relay_grant_problems") == 1
        snapshot = json.loads(_labrelay("status", "--config", str(config), "--json").stdout)
        assert snapshot["relay"]["grant_problem_count"] == 1

        # the whole file refused: writable by anyone
        users.write_text(good)
        users.chmod(0o666)
        until("grants_file_invalid")
        status = _labrelay("status", "--config", str(config))
        assert f"users file {users} grants nothing" in status.stdout, status.stdout

        users.chmod(0o644)  # fixed: the problems go with the next read
        until("grants_reloaded")
        status = _labrelay("status", "--config", str(config))
        assert "GRANTS" not in status.stdout, status.stdout
        assert _metric(admin, "labrelay_relay_grant_problems") == 0
    finally:
        relay.terminate()
        relay.wait(timeout=15)
