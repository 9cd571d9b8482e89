"""Rotating the admin token of a running relay, as an admin does it: write the new
token into the file, then use it (`labrelay status`, `labrelay reload --config`).

The token was read once at start-up and ``[admin]`` is restart-only, so the new token
was refused (401) until a restart ended every session through the relay, and
``labrelay reload --config`` — which sends the token the file holds — failed too.
Real processes; the relay is a real ``labrelay relay``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


def _labrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_rotated_admin_token_is_used_without_a_restart(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice",
                    "-f", str(tmp_path / "alice")], check=True)
    pub = " ".join((tmp_path / "alice.pub").read_text().split()[:2])
    (tmp_path / "users").write_text(f'permitopen="gpu:22" {pub} alice\n')
    token = tmp_path / "admin.token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    # A fixed admin port, as an admin's config has (`labrelay reload --config` reads
    # it from the file), chosen free at run time.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
                      f'users_file = "users"\n\n[admin]\nlisten = "127.0.0.1:{free}"\n'
                      'token_file = "admin.token"\n')
    relay = subprocess.Popen([sys.executable, "-m", "relay", "relay", "--config", str(config),
                              "--log-format", "json"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert relay.stdout is not None
        port = None
        for line in relay.stdout:
            if '"admin_listening"' in line:
                port = json.loads(line)["port"]
                break
        assert port is not None, f"relay exited {relay.wait()}"
        admin = f"127.0.0.1:{port}"
        before = _labrelay("status", "--admin", admin, "--token-file", str(token))
        assert before.returncode == 0, before.stderr

        old = token.read_text()
        token.write_text("fedcba9876543210fedcba9876543210\n")  # the rotation
        (tmp_path / "old.token").write_text(old)
        (tmp_path / "old.token").chmod(0o600)

        after = _labrelay("status", "--admin", admin, "--token-file", str(token))
        assert after.returncode == 0, after.stdout + after.stderr
        assert "relay on 127.0.0.1" in after.stdout
        stale = _labrelay("status", "--admin", admin, "--token-file", str(tmp_path / "old.token"))
        assert stale.returncode != 0 and "401" in stale.stdout + stale.stderr
        # The admin's own commands take the address and token from the config, as
        # `systemctl reload`'s ExecReload= does (status had no --config until round 16).
        by_config = _labrelay("status", "--config", str(config))
        assert by_config.returncode == 0, by_config.stdout + by_config.stderr
        assert "relay on 127.0.0.1" in by_config.stdout
        reload = _labrelay("reload", "--config", str(config))
        assert reload.returncode == 0, reload.stdout + reload.stderr
        assert relay.poll() is None
    finally:
        relay.terminate()
        relay.wait(timeout=15)
