"""Global requests refused, or granted and cancelled, in a loop: a bounded log.

Every ``tcpip-forward`` the relay refused was one ``relay_request_refused`` warning,
and every one it granted or cancelled one ``relay_service_registered`` /
``relay_service_cancelled`` line, with no bound: alice (paramiko, a user: users may
not register services) sending ``tcpip-forward`` without waiting for the answers, and
lab_pc (an agent granted ``tb:*``) registering and cancelling ports in a loop, each
wrote a line per request, thousands a second, for as long as they liked (the log flood
docs/security.md rules out; refused sessions were bounded in round 12).  Now, per key,
the first 32 of each 10 s are logged one by one and the rest as one count line when
the window ends; the counters count them all; bob's refusal is still logged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from harness import RelayNode, make_key

pytestmark = [pytest.mark.integration, pytest.mark.security]

REQUESTS = 3000


def _login(relay: RelayNode, key: object, user: str) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", relay.port))
    t.connect(username=user, pkey=paramiko.Ed25519Key.from_private_key_file(
        str(key.path)))  # type: ignore[attr-defined]
    return t


def test_requests_in_a_loop_cost_a_bounded_number_of_log_lines(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice", "bob")}
    relay = start_relay(
        agents=[f'permitlisten="tb:*" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="tb:*" {keys[u].public_blob()} {u}' for u in ("alice", "bob")],
    )
    alice = _login(relay, keys["alice"], "alice")
    agent = _login(relay, keys["lab_pc"], "lab_pc")
    try:
        for port in range(1, REQUESTS + 1):
            alice.global_request("tcpip-forward", ("tb", port), wait=False)
        for port in range(1, REQUESTS // 2 + 1):
            agent.global_request("tcpip-forward", ("tb", port), wait=False)
            agent.global_request("cancel-tcpip-forward", ("tb", port), wait=False)
        # answered in order: once these are, every request before them was handled
        assert alice.global_request("keepalive@openssh.com", wait=True) is None
        assert agent.global_request("keepalive@openssh.com", wait=True) is None
        bob = _login(relay, keys["bob"], "bob")
        assert bob.global_request("tcpip-forward", ("tb", 1), wait=True) is None
        bob.close()
        relay.wait_for("relay_request_refused", name="bob", timeout=5, since=0)

        refused = relay.events("relay_request_refused")
        agent_lines = (relay.events("relay_service_registered")
                       + relay.events("relay_service_cancelled"))
        print(f"\nalice's {REQUESTS} refused tcpip-forward: "
              f"{sum(e.get('name') == 'alice' for e in refused)} lines; lab_pc's "
              f"{REQUESTS} registrations and cancels: {len(agent_lines)} lines")
        assert sum(e.get("name") == "alice" for e in refused) <= 32
        assert len(agent_lines) <= 32
        assert relay.status()["relay"]["counters"]["requests_refused"] >= REQUESTS + 1
    finally:
        alice.close()
        agent.close()
    # the windows end: one count line each
    more = relay.wait_for("relay_request_refused", name="alice", timeout=15, since=0,
                          count=lambda n: bool(n))
    assert more["count"] == REQUESTS - 32
    agent_more = relay.wait_for("relay_service_registered", timeout=15, since=0,
                                count=lambda n: bool(n))
    assert agent_more["count"] == REQUESTS - 32
