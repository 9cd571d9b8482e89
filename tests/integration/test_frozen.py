"""A relay or an agent that stops running for a while (SIGSTOP then SIGCONT: a paused
VM, a machine swapping hard, a laptop lid) does not call its healthy peers dead when it
runs again.

Its keepalive timers are all found due long ago on waking; the silence they measure is
the process's own absence, not the peers'.  Until round 14 a relay frozen for longer
than ``keepalive_interval × (keepalive_count + 1)`` closed, on waking, every user's
connection and the agent's link (``relay_peer_dead``) although each peer was there and
answering; the users' stock ``ssh -L`` ended.  relay.core.keepalive now asks the peer
first.  The other side's keepalives here are slow, so only the frozen process could
judge the link.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    HarnessError,
    RelayNode,
    SshProcess,
    connect,
    free_port,
    make_key,
    recv_exactly,
    ssh_argv,
)
from test_resume import Interactive

pytestmark = pytest.mark.integration

FAST = 1  # the frozen side's keepalive interval: dead after 4 × 1 = 4 s of silence
SLOW = 60  # the other side's: it judges nothing within the test
FROZEN = 6.0  # one and a half of the frozen side's limit
KEEPALIVE = r"client_input_global_request: rtype keepalive@openssh\.com"


@pytest.mark.parametrize("frozen", ["relay", "agent"])
def test_a_process_that_was_stopped_keeps_its_healthy_peers(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
    frozen: str,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice")}
    echo = targets.echo()
    public, nowhere = free_port(), free_port()
    closed = free_port()  # nothing listens there: a session to it is the agent's barrier
    relay_ka = FAST if frozen == "relay" else SLOW
    agent_ka = SLOW if frozen == "relay" else FAST
    relay = start_relay(
        agents=[f'permitlisten="{public}",permitlisten="{nowhere}",permitlisten="web:8080" '
                f'{keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {keys["alice"].public_blob()} alice'],
        relay_toml=(f'public_bind = "127.0.0.1"\nresume_grace = 30\n'
                    f'keepalive_interval = {relay_ka}\nkeepalive_count = 3\n'
                    'penalty_exempt = ["127.0.0.1"]\n'),
    )  # fmt: skip
    agent = start_agent(
        "-p", str(relay.port), "-i", str(keys["lab_pc"].path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", f"ServerAliveInterval={agent_ka}", "-o", "ServerAliveCountMax=3",
        "--resume-grace", "30",
        "-R", f"0.0.0.0:{public}:127.0.0.1:{echo.port}",
        "-R", f"0.0.0.0:{nowhere}:127.0.0.1:{closed}",
        "-R", f"web:8080:127.0.0.1:{echo.port}",
        "lab_pc@127.0.0.1",
    )  # fmt: skip
    assert len(agent.events_at_least("forward_ready", 3, timeout=20)) == 3
    web = free_port()
    alice = start_ssh(ssh_argv(relay.port, keys["alice"].path, relay.known_hosts, "-v", "-N",
                               "-o", "ExitOnForwardFailure=yes",
                               "-L", f"127.0.0.1:{web}:web:8080", user="alice"),
                      name="alice")  # fmt: skip
    alice.wait_stderr(r"new port-listener")
    by_port, by_name = Interactive(public), Interactive(web)
    assert by_port.line(b"before ") == b"before "
    assert by_name.line(b"before ") == b"before "

    proc = relay.proc if frozen == "relay" else agent
    mark, rmark = agent.mark(), relay.mark()
    proc.sigstop()
    time.sleep(FROZEN)  # the fault itself: how long the process does not run
    proc.sigcont()

    # Both sessions go on where they were, on the same link: nothing was held.
    assert by_port.line(b"after") == b"after"
    assert by_name.line(b"after") == b"after"
    if frozen == "relay":
        # It asked alice (her ssh -v logs each keepalive) past a whole limit of its
        # running time, and she answered: a dead peer would have been found by now.
        seen = alice.stderr.mark()
        for _ in range(5):
            line = alice.stderr.wait_for(KEEPALIVE, 10, since=seen, what="alice").string
            seen = alice.stderr.lines.index(line, seen) + 1
    else:
        # The verdict comes on the first turn after waking; the agent logs a failed
        # target after it, so its log up to here is read.
        with contextlib.suppress(OSError, HarnessError):
            recv_exactly(connect(nowhere, timeout=10), 1)
        with contextlib.suppress(HarnessError):  # judged below, with what went wrong
            agent.wait_for("target_unreachable", timeout=10, since=mark)
    assert relay.events("relay_peer_dead", since=rmark) == []
    assert agent.events("link_dead", since=mark) == []
    assert agent.events("link_lost", since=mark) == []
    assert relay.events("session_held", since=rmark) == []
    assert alice.returncode is None
    if frozen == "agent":
        assert agent.events("target_unreachable", since=mark), "the barrier never came"
