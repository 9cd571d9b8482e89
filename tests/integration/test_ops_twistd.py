"""Issue 14, twistd: ``twistd -n labrelay --config F`` runs a relay and an agent that
carry a user's session; SIGHUP reloads under twistd too; a bad config, and a fatal
error after start, make twistd exit non-zero."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Targets, child_env, twistd_command
from harness import (
    AgentProcess,
    RelayNode,
    SshProcess,
    echo_roundtrip,
    free_port,
    make_key,
    ssh_argv,
)

pytestmark = pytest.mark.integration


def test_twistd_runs_the_relay_and_the_agent(
    start_process: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    lab_pc, alice = make_key(tmp_path / "lab_pc", "lab_pc"), make_key(tmp_path / "alice", "alice")
    web = targets.echo(greeting=b"twistd\n")
    directory = tmp_path / "relay"
    directory.mkdir()
    admin = free_port()
    relay_config = directory / "relay.toml"
    relay_config.write_text(f"""\
[admin]
listen = "127.0.0.1:{admin}"

[relay]
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
penalty_exempt = ["127.0.0.1"]

[[relay.agent]]
name = "lab_pc"
keys = ["{lab_pc.public_blob()} lab_pc"]
services = ["web:8080"]

[[relay.user]]
name = "alice"
keys = ["{alice.public_blob()} alice"]
services = ["web:8080"]
""")
    relay = RelayNode(start_process(twistd_command(
        "-n", "--pidfile", str(directory / "relay.pid"), "labrelay", "--config",
        str(relay_config), "--log-format", "json"), name="twistd-relay"), directory, admin)
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(f"""\
[[link]]
name = "relay"
host = "127.0.0.1"
port = {relay.port}
user = "lab_pc"
identity = "{lab_pc.path}"
known_hosts = "{relay.known_hosts}"
backoff_initial = 0.2
backoff_max = 1.0

[[link.remote]]
name = "web"
listen = "web:8080"
connect = "127.0.0.1:{web.port}"
""")
    agent = start_process(twistd_command(
        "-n", "--pidfile", str(tmp_path / "agent.pid"), "labrelay", "--config",
        str(agent_config), "--log-format", "json"), name="twistd-agent")
    agent.wait_for("forward_ready", timeout=30, forward="web")
    relay.wait_for("relay_service_registered", service="web:8080")

    port = free_port()
    ssh = start_ssh(ssh_argv(relay.port, alice.path, relay.known_hosts, "-v", "-N",
                             "-o", "ExitOnForwardFailure=yes",
                             "-L", f"127.0.0.1:{port}:web:8080", user="alice"),
                    name="alice")  # fmt: skip
    ssh.wait_stderr(r"new port-listener")
    assert echo_roundtrip(port, b"under twistd", greeting=b"twistd\n") == b"under twistd"
    # twistd was given no --reactor: both run labrelay's (relay.ops.reactor).
    for proc in (relay.proc, agent):
        started = proc.events("agent_started")
        assert [e["reactor"] for e in started] == ["LeanEPollReactor"], started

    mark = relay.mark()
    os.kill(relay.pid, signal.SIGHUP)
    assert relay.wait_for("reload_done", since=mark)["changes"] == []
    assert relay.status()["relay"]["per_user_totals"]["alice"]["bytes_to_service"] == 12


def twistd(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twistd_command("-n", "--pidfile", str(tmp_path / "t.pid"), "labrelay", "--config",
                       str(config)),
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, **child_env()})


def test_twistd_exits_non_zero_on_a_bad_config_and_on_a_fatal_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[relay]\nlisten = "127.0.0.1:0"\nmax_channels = 0\n')
    out = twistd(bad, tmp_path)
    assert out.returncode == 1, out  # operations.md, twistd: "exits at once with status 1"
    assert "relay.max_channels" in out.stdout + out.stderr

    # A plain hop whose port is taken: a fatal error once running, so exit 1.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        hop = tmp_path / "hop.toml"
        hop.write_text(f'[[forward]]\nlisten = "127.0.0.1:{taken}"\n'
                       f'connect = "127.0.0.1:{free_port()}"\n')
        out = twistd(hop, tmp_path)
    assert out.returncode == 1, out
    assert "cannot listen on" in out.stdout + out.stderr
    assert not (tmp_path / "t.pid").exists()


def test_an_admin_port_in_use_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    """The admin endpoint's port held by another process (a second labrelay): one
    line saying what, which port and how to fix it, and exit 1, under twistd and under
    ``labrelay run``.  Before: twistd logged a traceback (exit 1), and ``labrelay run``
    logged a critical traceback and ran on without its admin endpoint (never telling
    systemd it was ready)."""
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config = tmp_path / "node.toml"
        hop = f'listen = "127.0.0.1:{free_port()}"\nconnect = "127.0.0.1:{free_port()}"\n'
        config.write_text(f'[admin]\nlisten = "127.0.0.1:{taken}"\n\n[[forward]]\n{hop}')
        under_twistd = twistd(config, tmp_path)
        under_labrelay = subprocess.run(
            [sys.executable, "-m", "relay", "run", str(config)], capture_output=True,
            text=True, timeout=60, cwd=REPO_ROOT, env={**os.environ, **child_env()})
    line = (f"admin endpoint cannot listen on 127.0.0.1:{taken}: Address already in use "
            "(is another labrelay running? change [admin] listen, or stop what holds the port)")
    for out in (under_twistd, under_labrelay):
        text = out.stdout + out.stderr
        assert out.returncode == 1, out
        assert line in text and "Traceback" not in text, text
    assert not (tmp_path / "t.pid").exists()


def test_an_agents_local_forward_that_cannot_listen_exits_1(tmp_path: Path) -> None:
    """operations.md, "Exit status": ``1``: a fatal runtime problem (a local forward
    cannot listen).  An ``-L`` whose port another process holds must stop the agent
    with that reason, not leave it running without the forward the user asked for
    (round 20's audit: only a plain hop and the admin port were tested)."""
    import sys

    key = make_key(tmp_path / "lab_pc", "lab_pc")
    (tmp_path / "known_hosts").write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "relay", "agent", "-i", str(key.path),
             "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "-p", str(free_port()),
             "-L", f"127.0.0.1:{taken}:127.0.0.1:9", "lab_pc@127.0.0.1"],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
            env={**os.environ, **child_env()})
    text = out.stdout + out.stderr
    assert out.returncode == 1, out
    assert f"local forward L:{taken}: cannot listen on 127.0.0.1:{taken}" in text, text
    assert "Traceback" not in text, text
