"""A user's ``max-sessions`` lowered in the users file while she has sessions open: her
open sessions carry on and new ones over the new cap are refused, as docs/security.md
says ("A lowered ``max-sessions`` does not close open sessions; it refuses new ones over
the cap").  Real relay, labrelay agent and stock ``ssh -L``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode, SshProcess, connect, free_port, make_key, ssh_argv
from test_resume import Interactive

pytestmark = pytest.mark.integration


def test_a_lowered_max_sessions_keeps_open_sessions_and_refuses_new_ones(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice")}
    echo = targets.echo()

    def alice_line(cap: int) -> str:
        return f'max-sessions="{cap}",permitopen="web:8080" {keys["alice"].public_blob()} alice'

    relay = start_relay(
        agents=[f'permitlisten="web:8080" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[alice_line(3)],
        relay_toml='penalty_exempt = ["127.0.0.1"]\n',
    )
    agent = start_agent(
        "-p", str(relay.port), "-i", str(keys["lab_pc"].path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-R", f"web:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", bind="web")
    port = free_port()
    start_ssh(ssh_argv(relay.port, keys["alice"].path, relay.known_hosts, "-v", "-N",
                       "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:web:8080",
                       user="alice"), name="alice").wait_stderr(r"new port-listener")
    open_ = [Interactive(port) for _ in range(3)]
    for i, session in enumerate(open_):
        assert session.line(b"before %d " % i) == b"before %d " % i

    mark = relay.mark()
    (relay.dir / "users").write_text(alice_line(1) + "\n")
    relay.wait_for("grants_reloaded", since=mark, timeout=10)
    assert relay.events("relay_key_ended", since=mark) == []
    for i, session in enumerate(open_):  # all three carry on, over the new cap of 1
        assert session.line(b"after %d" % i) == b"after %d" % i

    with connect(port, timeout=15) as sock:  # a fourth: refused, 3 open >= 1
        sock.sendall(b"ping")
        try:
            assert sock.recv(4) == b"", "a session over the lowered cap was opened"
        except ConnectionResetError:
            pass
    refused = relay.wait_for("relay_session_refused", since=mark, timeout=10, name="alice")
    # the count she has, not the new cap (it said "already has 1 sessions open")
    assert "already has 3 sessions open (max_sessions 1)" in str(refused), refused
    assert open_[0].line(b"still") == b"still"
