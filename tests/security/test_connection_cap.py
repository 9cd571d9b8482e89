"""One valid key cannot take the relay's connections from everyone else.

Before ``max_connections_per_user`` a granted user could hold any number of
authenticated SSH connections (asyncssh opened 4000 as alice in 20 s, ~33 KiB of the
relay's memory each, until the relay's descriptors ran out and nobody could connect):
the threat model's "a malicious user must not deny others service"
(docs/security.md).  Here the cap is 3 and alice's stock ``ssh`` is the client: the
fourth connection is told why by a disconnect OpenSSH prints, is logged, is not held
against alice's source (127.0.0.1 is not exempt: a penalty would refuse her next
connection), and bob, meanwhile, connects; once alice closes one, she connects again.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import RelayNode, SshProcess, make_key, ssh_argv

pytestmark = [pytest.mark.integration, pytest.mark.security]

CAP = 3


def test_a_user_past_max_connections_per_user_is_told_why_and_others_connect(
    start_relay: Callable[..., RelayNode], start_ssh: Callable[..., SshProcess], tmp_path: Path,
) -> None:
    alice = make_key(tmp_path / "keys" / "alice", comment="alice")
    bob = make_key(tmp_path / "keys" / "bob", comment="bob")
    relay = start_relay(users=[f"{alice.public_blob()} alice", f"{bob.public_blob()} bob"],
                        relay_toml=f"max_connections_per_user = {CAP}")

    def argv(key: Path, user: str) -> list[str]:
        return ssh_argv(relay.port, key, relay.known_hosts, "-N", user=user)

    mark = relay.mark()
    held = [start_ssh(argv(alice.path, "alice"), name=f"alice-{i}") for i in range(CAP)]
    relay.events_at_least("relay_connected", CAP, since=mark, name="alice")

    fourth = subprocess.run(argv(alice.path, "alice"), capture_output=True, text=True,
                            timeout=30)
    assert fourth.returncode == 255, fourth
    assert (f"user alice already has {CAP} connections open on this relay "
            f"(max_connections_per_user = {CAP})") in fourth.stderr, fourth.stderr
    refused = relay.wait_for("relay_connection_cap", since=mark)
    assert (refused["name"], refused["held"], refused["cap"]) == ("alice", CAP, CAP)

    bob_mark = relay.mark()
    start_ssh(argv(bob.path, "bob"), name="bob")
    relay.wait_for("relay_connected", since=bob_mark, name="bob")

    status = relay.status()["relay"]
    assert status["counters"]["connections_refused_per_user_cap"] == 1
    # the key was valid: no offence of the source's (a noauth would be counted here)
    assert sum(status["admission"]["penalties"].values()) == 0, status["admission"]

    held[0].stop()
    relay.wait_for("relay_disconnected", since=mark, name="alice")
    again = relay.mark()
    start_ssh(argv(alice.path, "alice"), name="alice-again")
    relay.wait_for("relay_connected", since=again, name="alice")
