"""The relay's host key as an operator meets it: restored from a backup with the wrong
owner or mode, emptied by a full disk, damaged, or left half-rotated.

Each used to stop ``labrelay relay`` with a Python traceback (exit status 1; a damaged
file's bytes — the private key — quoted in it) while ``labrelay check`` said OK.  Now
start-up exits 2 naming the file and the fix, ``labrelay check`` finds the same, and
nothing of the key is printed.  Real processes, as the admin runs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


def _config(tmp: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice",
                    "-f", str(tmp / "alice")], check=True)
    pub = " ".join((tmp / "alice.pub").read_text().split()[:2])
    (tmp / "users").write_text(f'permitopen="gpu:22" {pub} alice\n')
    config = tmp / "relay.toml"
    config.write_text('[relay]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
                      'users_file = "users"\n')
    return config


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _host_key(tmp: Path) -> Path:
    state = tmp / "state"
    state.mkdir(mode=0o700)
    key = state / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.mark.parametrize("damage", ["mode 644", "empty", "first line", "public key"])
def test_a_bad_host_key_stops_start_and_check_with_the_file_and_the_fix(
        tmp_path: Path, damage: str) -> None:
    config = _config(tmp_path)
    key = _host_key(tmp_path)
    secret_lines = key.read_text().splitlines()[1:-1]
    if damage == "mode 644":
        key.chmod(0o644)
        expect = "too open"
    elif damage == "empty":
        key.write_bytes(b"")
        expect = "the file is empty"
    elif damage == "first line":
        key.write_text(key.read_text()[1:])
        expect = "first line is not a private key header"
    else:
        shutil.copy(key.with_name(key.name + ".pub"), key)
        expect = "public key"
    for argv in (("check", str(config)), ("relay", "--config", str(config))):
        done = _run(*argv)
        out = done.stdout + done.stderr
        assert done.returncode == 2, (argv, out)
        assert "Traceback" not in out, out
        assert str(key) in out and "relay.state_dir" in out, out
        assert expect in out, out
        assert "install -o USER -m 600" in out, out
        for line in secret_lines:
            assert line[4:40] not in out, "host key material printed"


def test_a_host_key_left_without_its_private_half_is_replaced(tmp_path: Path) -> None:
    """Rotation by moving only the private key away: the stale .pub must not stop the
    relay (it did: KeygenError, a traceback); a new pair is written and announced."""
    config = _config(tmp_path)
    key = _host_key(tmp_path)
    old_pub = key.with_name(key.name + ".pub").read_text()
    key.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "relay", "relay", "--config", str(config),
                             "--log-format", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            assert "Traceback" not in line, line
            if '"relay_listening"' in line:
                break
        else:
            pytest.fail(f"relay exited {proc.wait()} before listening")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    new_pub = key.with_name(key.name + ".pub").read_text()
    assert new_pub != old_pub
    assert (key.stat().st_mode & 0o077) == 0
    found = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                           text=True, check=True).stdout.split()[:2]
    assert found == new_pub.split()[:2]


@pytest.mark.parametrize("damage", ["missing", "mode 644", "empty", "first line", "public key"])
def test_a_bad_next_host_key_stops_start_and_check_with_the_file_and_the_fix(
        tmp_path: Path, damage: str) -> None:
    """``[relay] next_host_key`` (announced to clients for a rotation) is checked as the
    current key is, and must exist: it is never generated."""
    config = _config(tmp_path)
    _host_key(tmp_path)
    next_dir = tmp_path / "next"
    next_dir.mkdir(mode=0o700)
    key = next_dir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    secret_lines = key.read_text().splitlines()[1:-1]
    config.write_text(config.read_text() + 'next_host_key = "next/ssh_host_ed25519_key"\n')
    fix = "install -o USER -m 600"
    if damage == "missing":
        key.unlink()
        expect, fix = "does not exist", "ssh-keygen -t ed25519"
    elif damage == "mode 644":
        key.chmod(0o644)
        expect = "too open"
    elif damage == "empty":
        key.write_bytes(b"")
        expect = "the file is empty"
    elif damage == "first line":
        key.write_text(key.read_text()[1:])
        expect = "first line is not a private key header"
    else:
        shutil.copy(key.with_name(key.name + ".pub"), key)
        expect = "public key"
    for argv in (("check", str(config)), ("relay", "--config", str(config))):
        done = _run(*argv)
        out = done.stdout + done.stderr
        assert done.returncode == 2, (argv, out)
        assert "Traceback" not in out, out
        assert str(key) in out and "relay.next_host_key" in out, out
        assert expect in out, out
        assert fix in out, out
        for line in secret_lines:
            assert line[4:40] not in out, "host key material printed"


def test_a_good_next_host_key_passes_check(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _host_key(tmp_path)
    key = tmp_path / "next_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config.write_text(config.read_text() + f'next_host_key = "{key}"\n')
    done = _run("check", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
