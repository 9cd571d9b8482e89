"""An agent whose key the relay refuses does not get its lab's address locked out.

Found in round 13's operator review: with its key out of the agents file, a labrelay
agent retried on its normal backoff (0.5 s at first), each attempt a failed login that
charged its address 5 s of penalty at the relay; after four, the relay refused every
connection from that address for a while, the lab mates' laptops behind the same NAT
included, and the agent's own log said only "Connection was closed cleanly".  Now an
attempt whose keys were refused is followed by one no sooner than
``KEYS_REFUSED_RETRY`` (10 s, twice the default penalty of a failed login), which
keeps the address under the penalty's threshold, and the agent's reason says where
its key goes on a labrelay relay.  127.0.0.1 is not exempt here (the relay's
defaults), and the agent's backoff is set short (0.2..1 s) as the tests' agents are,
so without the floor it would retry at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from harness import AgentProcess, RelayNode, make_key
from relay_fixtures import admin_port, admin_status, wait_until

from relay.agent.link import KEYS_REFUSED_RETRY

pytestmark = [pytest.mark.integration, pytest.mark.security]


def test_a_refused_agent_waits_before_trying_again_and_says_where_its_key_goes(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    lab_pc = make_key(tmp_path / "keys" / "lab_pc", comment="lab_pc")
    relay = start_relay(agents=[])  # lab_pc's key is not (or no longer) granted
    agent = start_agent(
        "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "--backoff-initial", "0.2", "--backoff-max", "1", "--admin", "127.0.0.1:0",
        "-R", "gpu-cluster:22:127.0.0.1:22", "lab_pc@127.0.0.1",
    )  # fmt: skip

    failed = agent.wait_for("auth_failed", timeout=20)
    assert "agents file" in failed["reason"], failed
    retry = agent.wait_for("link_retry", timeout=20)
    assert retry["delay"] == KEYS_REFUSED_RETRY >= 10, retry
    assert retry["keys_refused"] is True
    assert "the server refused our keys" in retry["text"]
    (link,) = admin_status(admin_port(agent))["links"]
    assert "agents file" in link["last_error"], link

    relay.wait_for("relay_auth_refused", timeout=20, user="lab_pc")
    # The relay charges a failed login when its connection ends (RelayHandler.disconnected),
    # and the agent is the one that closes it: the count has no event; await it.
    wait_until(lambda: relay.status()["relay"]["admission"]["penalties"]["authfail"] >= 1,
               "the refused login to be charged when its connection ended")
    admission = relay.status()["relay"]["admission"]
    assert admission["penalties"]["authfail"] == 1, admission
    assert admission["penalties_activated"] == 0, admission
