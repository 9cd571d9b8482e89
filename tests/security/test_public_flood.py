"""Connections to a public port whose agent is away: a bounded log.

While lab_pc's link is down its public port stays bound, and connections to it wait
``public_wait`` for the agent; at most ``max_unauthenticated`` wait per port, and every
one past that was refused with one ``relay_public_refused`` warning: anyone on the
internet, connecting and closing in a loop, wrote a line per connection, as fast as
the relay accepted (the log flood docs/security.md rules out).  Now the first refusal
of a burst is logged, then one count line when the burst's 10 s end; the counter
``sessions_refused`` counts them all.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from harness import LOOPBACK, RelayNode, free_port, make_key

pytestmark = [pytest.mark.integration, pytest.mark.security]

CAP = 8
EXTRA = 2000


def test_connections_past_the_waiting_cap_cost_a_bounded_number_of_log_lines(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    public_port = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public_port}" {lab_pc.public_blob()} lab_pc'],
        relay_toml=f'public_bind = "127.0.0.1"\npublic_wait = 30\n'
                   f'max_unauthenticated = {CAP}\n')
    agent = paramiko.Transport((LOOPBACK, relay.port))
    agent.connect(username="lab_pc",
                  pkey=paramiko.Ed25519Key.from_private_key_file(str(lab_pc.path)))
    assert agent.global_request("tcpip-forward", ("", public_port), wait=True) is not None
    agent.close()  # the agent is away; its port stays bound
    relay.wait_for("relay_disconnected", timeout=10, since=0)

    waiting = [socket.create_connection((LOOPBACK, public_port), timeout=5)
               for _ in range(CAP)]
    try:
        refused0 = relay.status()["relay"]["counters"]["sessions_refused"]
        for _ in range(EXTRA):
            try:
                with socket.create_connection((LOOPBACK, public_port), timeout=5) as s:
                    s.recv(1)  # closed (reset) by the relay
            except ConnectionResetError:
                pass  # reset at once, even before connect() returned
        status = relay.status()["relay"]["counters"]
        lines = relay.events("relay_public_refused")
        print(f"\n{EXTRA} connections past the waiting cap: {len(lines)} log lines, "
              f"sessions_refused +{status['sessions_refused'] - refused0}")
        assert status["sessions_refused"] - refused0 == EXTRA
        assert len(lines) <= 2, len(lines)
        more = relay.wait_for("relay_public_refused", timeout=15, since=0,
                              count=lambda n: bool(n))
        assert more["count"] == EXTRA - 1
    finally:
        for s in waiting:
            s.close()
