"""A bad grant file at start-up, as operators start the relay: ``labrelay relay
--config F``, ``twistd -n labrelay --config F`` and ``labrelay check F``.

docs/security.md ("Fail closed, per line"): a missing, unreadable, ``o+w`` or
non-UTF-8 file, a bad line or a conflict "stops the relay" at start-up; docs/relay.md:
"reported (exit status 2)"; docs/operations.md: twistd exits 1 with the problems on
stderr; the message names the file (and line), what is wrong and the fix.  Each case
is checked for all three commands: the exit status, one ``labrelay: FILE[:LINE]:
PROBLEM (FIX)`` line on stderr, and nothing started (no listening event).

An empty grant file is the exception the page states: it grants nothing and the
relay starts (a relay whose users file has no one yet).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env, twistd_command
from harness import AgentProcess, RelayNode, make_key
from relay_fixtures import admin_port, permissions_apply, relay_command

pytestmark = pytest.mark.integration

ALICE = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def _write(directory: Path, users: bytes | None, agents: bytes = b"") -> Path:
    """The relay's node config, its agents file and (unless None) its users file."""
    (directory / "agents").write_bytes(agents)
    if users is not None:
        (directory / "users").write_bytes(users)
    config = directory / "node.toml"
    config.write_text(f"""\
[relay]
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
agents_file = "agents"
users_file = "users"
""")
    return config


def _bad_line(d: Path) -> tuple[Path, list[str]]:
    return _write(d, b"ssh-ed25519 AAAAnotbase64!! alice\n"), [
        f"{d}/users:1: the key data", "is not base64", "(give one line of a .pub file"]


def _missing(d: Path) -> tuple[Path, list[str]]:
    return _write(d, None), [
        f"{d}/users: cannot read the users file: No such file or directory",
        "(check users_file in [relay] or --users)"]


def _unreadable(d: Path) -> tuple[Path, list[str]]:
    config = _write(d, f"ssh-ed25519 {ALICE} alice\n".encode())
    os.chmod(d / "users", 0)
    return config, [f"{d}/users: cannot read the users file: Permission denied",
                    f"&& chmod 640 {d}/users)"]


def _world_writable(d: Path) -> tuple[Path, list[str]]:
    config = _write(d, f"ssh-ed25519 {ALICE} alice\n".encode())
    os.chmod(d / "users", 0o666)
    return config, [f"{d}/users: the users file is writable by anyone",
                    f"(chmod o-w {d}/users)"]


def _not_utf8(d: Path) -> tuple[Path, list[str]]:
    return _write(d, b"\xff\xfe alice\n"), [
        f"{d}/users: not UTF-8 text (bad byte at offset 0)", "(save it as UTF-8)"]


def _conflict(d: Path) -> tuple[Path, list[str]]:
    key = f"ssh-ed25519 {ALICE}"
    return _write(d, f'permitopen="web:80" {key} alice\n'.encode(),
                  agents=f'permitlisten="web:80" {key} lab_pc\n'.encode()), [
        f"{d}/users:1: this key already belongs to agent 'lab_pc' (also {d}/agents:1)",
        "(identity comes from the key alone"]


CASES: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    "bad line": _bad_line, "missing": _missing, "unreadable": _unreadable,
    "world-writable": _world_writable, "not UTF-8": _not_utf8, "conflict": _conflict,
}

RUNNERS = {
    # the command, its exit status for a bad config (docs/operations.md, Exit status)
    "labrelay relay": (lambda config: [sys.executable, "-m", "relay", "relay",
                                       "--log-format", "json", "--config", str(config)], 2),
    "twistd labrelay": (lambda config: twistd_command(
        "-n", "--pidfile", "", "labrelay", "--log-format", "json", "--config", str(config)), 1),
    "labrelay check": (lambda config: [sys.executable, "-m", "relay", "check", str(config)], 2),
}


# every case under labrelay relay; under the others one of each kind (a file that cannot
# be used, a line, two files that conflict): the same Grants raise, the runners differ
PAIRS = [(case, "labrelay relay") for case in CASES] + [
    (case, runner) for runner in ("twistd labrelay", "labrelay check")
    for case in ("bad line", "unreadable", "conflict")]


@pytest.mark.parametrize(("case", "runner"), PAIRS, ids=[f"{c}-{r}" for c, r in PAIRS])
def test_a_bad_grant_file_stops_the_relay_at_start_up_and_says_what_where_and_how(
    tmp_path: Path, case: str, runner: str,
) -> None:
    config, said = CASES[case](tmp_path)
    argv, status = RUNNERS[runner]
    wrap = permissions_apply() if case == "unreadable" else []
    done = subprocess.run([*wrap, *argv(config)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **child_env()})
    assert done.returncode == status, (done.stdout, done.stderr)
    problems = [ln for ln in done.stderr.splitlines() if ln.startswith("labrelay: /")]
    assert len(problems) == 1 + (runner == "labrelay check"), done.stderr  # check counts
    for words in said:
        assert words in problems[0], (words, done.stderr)
    assert problems[0].endswith(")"), problems[0]  # whole, with its fix
    out = done.stdout + done.stderr
    assert "relay_listening" not in out and "Traceback" not in out, out


def test_an_empty_grant_file_at_start_up_grants_nothing_and_the_relay_runs(
    start_process: Callable[..., AgentProcess], tmp_path: Path,
) -> None:
    """The page's exception: an empty users file starts a relay that grants no user
    (as a new install's), where a missing one stops it."""
    lab_pc = make_key(tmp_path / "lab_pc", "lab_pc")
    config = _write(tmp_path, b"", agents=f"{lab_pc.public_blob()} lab_pc\n".encode())
    config.write_text(config.read_text() + '\n[admin]\nlisten = "127.0.0.1:0"\n')
    proc = start_process(relay_command("--config", str(config)), name="relay-empty")
    relay = RelayNode(proc, tmp_path, admin_port(proc))
    snapshot = relay.status()["relay"]
    assert snapshot["users"] == [], snapshot
