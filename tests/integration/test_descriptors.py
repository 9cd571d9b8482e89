"""A labrelay agent out of file descriptors (``ulimit -n`` reached: a busy lab PC, a
unit's ``LimitNOFILE``) refuses the sessions it cannot serve, with the reason, and
serves again as soon as descriptors are free.

Until round 14 the target's ``socket()`` failing with EMFILE raised out of the
channel's open (relay.datapath.dialnow): an unhandled error at level critical per
session, and the relay told only "internal error".  Now it is a failed connect like a
refused one: ``target_unreachable`` with "Too many open files" at the agent, the
relay's ``relay_public_refused`` says so, in words (it said the repr of Conch's error,
"(b'connect failed: ...', 2)", as did ``labrelay connect``), and the user's connection is
closed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    HarnessError,
    RelayNode,
    connect,
    find_program,
    free_port,
    make_key,
    recv_exactly,
)
from relay_fixtures import connect_argv, wait_until

pytestmark = pytest.mark.integration


def _highest_fd(pid: int) -> int:
    return max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def _echoes(port: int) -> socket.socket | None:
    """A session through the public port, if it echoes; ``None`` if it was closed."""
    sock = connect(port, timeout=10)
    try:
        sock.sendall(b"?")
        if recv_exactly(sock, 1) == b"?":
            return sock
    except (OSError, HarnessError):
        pass
    sock.close()
    return None


def test_an_agent_out_of_descriptors_refuses_with_the_reason_and_recovers(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    prlimit = find_program("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) not installed")
    key = make_key(tmp_path / "lab_pc", comment="lab_pc")
    echo = targets.echo()
    public = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public}" {key.public_blob()} lab_pc'],
        relay_toml='public_bind = "127.0.0.1"\npenalty_exempt = ["127.0.0.1"]\n',
    )
    agent = start_agent(
        "-p", str(relay.port), "-i", str(key.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-R", f"0.0.0.0:{public}:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20)
    first = _echoes(public)
    assert first is not None
    first.close()

    # Each session costs the agent one descriptor (its target's): with the limit one
    # above the highest in use, the holes below it and that one fill, then socket()
    # fails.
    before = len(os.listdir(f"/proc/{agent.pid}/fd"))
    limit = _highest_fd(agent.pid) + 2
    subprocess.run([prlimit, f"--pid={agent.pid}", f"--nofile={limit}:{limit}"], check=True)
    mark, rmark = agent.mark(), relay.mark()
    open_sessions = []
    for _ in range(limit):
        session = _echoes(public)
        if session is None:
            break
        open_sessions.append(session)
    else:
        pytest.fail(f"{limit} sessions served under a limit of {limit} descriptors")

    assert open_sessions, "not even the session the limit left room for was served"
    failed = agent.wait_for("target_unreachable", timeout=10, since=mark)
    assert "Too many open files" in failed["reason"], failed
    refused = relay.wait_for("relay_public_refused", timeout=10, since=rmark)
    assert "Too many open files" in refused["why"], refused
    # in words, not the repr of Conch's error ("(b'connect failed: ...', 2)")
    assert refused["why"].startswith("could not connect it (connect failed: "), refused
    assert agent.events(level="critical") == []

    # Descriptors free again (once the agent has closed those sessions' targets; it
    # logs no event per session): the next session is served.
    for session in open_sessions:
        session.close()
    wait_until(lambda: len(os.listdir(f"/proc/{agent.pid}/fd")) <= before,
               "the agent to close the ended sessions' targets")
    with contextlib.closing(connect(public, timeout=10)) as again:
        again.sendall(b"back")
        assert recv_exactly(again, 4) == b"back"


def _greeted(port: int) -> tuple[socket.socket, bytes]:
    """A raw TCP connection to the relay's SSH port and what it said first (``b""``:
    closed before its version line)."""
    sock = connect(port, timeout=10)
    try:
        return sock, sock.recv(64)
    except OSError:
        return sock, b""


def test_a_relay_out_of_descriptors_says_so(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    """Twisted accepts and closes the connections it has no descriptor for (or leaves
    them queued) and logs that only as library chatter: the relay was silent while
    users read a hint about login penalties.  Now ``relay_accept_failed`` says why and
    what to do, once per burst, and ``accept_failed`` counts them."""
    prlimit = find_program("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) not installed")
    relay = start_relay(relay_toml="per_source_max_unauthenticated = 64\n"
                                   'penalty_exempt = ["127.0.0.1"]\n')
    sock, hello = _greeted(relay.port)
    assert hello.startswith(b"SSH-2.0-"), hello
    sock.close()
    assert relay.status()["relay"]["counters"]["accept_failed"] == 0

    limit = _highest_fd(relay.pid) + 4
    subprocess.run([prlimit, f"--pid={relay.pid}", f"--nofile={limit}:{limit}"], check=True)
    mark = relay.mark()
    held = []
    refused = 0
    try:
        for _ in range(limit):
            sock, hello = _greeted(relay.port)
            held.append(sock)
            if not hello.startswith(b"SSH-2.0-"):
                refused += 1
                if refused == 3:
                    break
        assert refused, f"{len(held)} connections greeted under a limit of {limit}"
        failed = relay.wait_for("relay_accept_failed", timeout=10, since=mark)
        assert failed["errno"] == "EMFILE", failed
        assert "Too many open files" in failed["why"], failed
        assert "LimitNOFILE" in failed["text"], failed
        # which listener: users on the SSH port, not a public port's clients
        assert (failed["listener"], failed["listener_port"]) == ("SSH", relay.port), failed
        assert f"on the SSH port {relay.port}: Too many open files" in failed["text"], failed
        # one line for the burst, not one per connection
        assert len(relay.events("relay_accept_failed", since=mark)) == 1
        # what a user's labrelay connect says names this cause, not penalties alone
        user = make_key(tmp_path / "alice", comment="alice")
        out = subprocess.run(connect_argv(relay, "alice", user, "web:8080"),
                             capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert out.returncode != 0, out
        assert "before its SSH version line" in out.stderr, out.stderr
        assert "out of file descriptors" in out.stderr, out.stderr
        assert "relay_accept_failed" in out.stderr, out.stderr
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _highest_fd(relay.pid) < limit - 2, "the relay to close the connections")
    sock, hello = _greeted(relay.port)
    sock.close()
    assert hello.startswith(b"SSH-2.0-"), hello
    assert relay.status()["relay"]["counters"]["accept_failed"] >= refused
    assert "labrelay_relay_accept_failed_total" in relay.metrics()
