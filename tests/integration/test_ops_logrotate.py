"""Log rotation under twistd, as logrotate does it: move ``--logfile`` away, then
SIGHUP.

twistd rotates its own file (at 1 MB, or at SIGUSR1) but never reopens it, and its
SIGUSR1 rotation skips a path that no longer exists: after logrotate's move the
process wrote on into the moved file (compressed and deleted by later rotations: the
log was lost) until a restart.  Now a SIGHUP reopens the file before it reloads.  A
real ``twistd labrelay`` relay; its JSON events on stdout are the synchronisation
point, the log file is what is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import child_env, twistd_command
from harness import make_key

pytestmark = pytest.mark.integration


def _until(proc: subprocess.Popen[str], event: str) -> dict[str, object]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{") and f'"{event}"' in line:
            found: dict[str, object] = json.loads(line)
            return found
    raise AssertionError(f"twistd exited {proc.wait()} before {event}")


def test_sighup_reopens_a_logfile_that_logrotate_moved(tmp_path: Path) -> None:
    key = make_key(tmp_path / "alice")
    pub = " ".join(key.public.split()[:2])
    (tmp_path / "users").write_text(f'permitopen="gpu:22" {pub} alice\n')
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
                      'users_file = "users"\n')
    log = tmp_path / "labrelay.log"
    proc = subprocess.Popen(
        twistd_command("-n", "--pidfile", str(tmp_path / "t.pid"), "--logfile", str(log),
                       "labrelay", "--config", str(config), "--log-format", "json"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **child_env(), "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    try:
        _until(proc, "relay_listening")
        moved = tmp_path / "labrelay.log.1"
        log.rename(moved)  # logrotate's default: move, then signal
        proc.send_signal(signal.SIGHUP)
        _until(proc, "reload_done")
        # The JSON line on stdout is written just before the same event's line in the
        # file: a second HUP's reload_done is the point where the first is surely there.
        proc.send_signal(signal.SIGHUP)  # a HUP without a move goes on in the same file
        _until(proc, "reload_done")
        assert log.exists(), "the moved log was not reopened"
        fresh = log.read_text()
        assert fresh.count("reopened") == 2 and "config reloaded" in fresh, fresh
        assert "config reloaded" not in moved.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
