"""A user granted ``lab:*`` asks for 2,000 distinct ports: ``/metrics`` must not grow.

alice's grant covers every port of ``lab``, and so does the agent's (it registers only
``lab:8080``).  With asyncssh (a client we did not write) she opens ``direct-tcpip``
channels to ``lab:1`` … ``lab:2000``, many at a time; each waits ``public_wait`` for an
agent that never registers that port and is refused.  Before the fix each port became a
``service`` label of four families for the process's life (up to 65,535 per such
name); now the ports nobody registered nor granted one by one count under ``lab:*``
(relay.core.router.Router.totals_name), and the table keeps at most
``relay.core.sessions.MAX_TOTALS`` names whatever they are.  The exposition's size,
its label set and the relay's RSS are measured before and after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncssh
import paramiko
import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode, make_key, recv_exactly
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.security]

PORTS = 2000
BATCH = 250


def service_labels(text: str) -> set[str]:
    return {s.labels["service"] for f in text_string_to_metric_families(text)
            for s in f.samples if "service" in s.labels}


def test_two_thousand_ports_of_a_wildcard_grant_do_not_grow_metrics(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    lab_pc, alice = make_key(tmp_path / "lab_pc", "lab_pc"), make_key(tmp_path / "alice", "alice")
    relay = start_relay(
        agents=[f'permitlisten="lab:*" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="lab:*" {alice.public_blob()} alice'],
        relay_toml=f'penalty_exempt = ["127.0.0.1"]\npublic_wait = 0.5\n'
                   f'max_sessions_per_user = {BATCH + 10}\n')
    echo = targets.echo()
    agent = start_agent("-p", str(relay.port), "-i", str(lab_pc.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-R", f"lab:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
                        name="agent")
    agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", bind="lab")

    # one honest session to the registered port: its own label, kept
    t = paramiko.Transport(("127.0.0.1", relay.port))
    t.connect(username="alice", pkey=paramiko.Ed25519Key.from_private_key_file(str(alice.path)))
    chan = t.open_channel("direct-tcpip", ("lab", 8080), ("127.0.0.1", 4242), timeout=30)
    chan.settimeout(30)
    chan.sendall(b"ping")
    assert recv_exactly(chan, 4) == b"ping"  # type: ignore[arg-type]
    before_text = relay.metrics()
    before_rss = relay.rss_kb()
    assert "lab:8080" in service_labels(before_text)

    async def flood() -> int:
        refused = 0
        async with asyncssh.connect(
            "127.0.0.1", port=relay.port, username="alice", client_keys=[str(alice.path)],
            known_hosts=str(relay.known_hosts), agent_path=None, config=None,
        ) as conn:  # fmt: skip
            for start in range(1, PORTS + 1, BATCH):
                ports = range(start, min(start + BATCH, PORTS + 1))
                results = await asyncio.gather(
                    *(conn.open_connection("lab", p) for p in ports), return_exceptions=True)
                refused += sum(isinstance(r, asyncssh.ChannelOpenError) for r in results)
        return refused

    assert asyncio.run(asyncio.wait_for(flood(), 120)) == PORTS
    after_text = relay.metrics()
    after_rss = relay.rss_kb()
    labels = service_labels(after_text)
    grown = len(after_text) - len(before_text)
    print(f"/metrics {len(before_text)} -> {len(after_text)} bytes, service labels {labels}, "
          f"RSS {before_rss} -> {after_rss} KiB")
    assert labels == {"lab:8080", "lab:*"}, sorted(labels)[:20]
    # one new label (lab:*) of a few families, and counters growing by digits
    assert grown < 2048, grown
    assert after_rss - before_rss < 16 * 1024, (before_rss, after_rss)
    totals = relay.status()["relay"]["per_service"]
    assert totals["lab:*"]["sessions_total"] == PORTS and totals["lab:*"]["sessions_active"] == 0

    # the honest session still works, and is counted under its own name
    chan.sendall(b"pong")
    assert recv_exactly(chan, 4) == b"pong"  # type: ignore[arg-type]
    t.close()


REGISTERED = 3000


def test_an_agent_registering_every_port_of_its_wildcard_grant_does_not_grow_metrics(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    """The agent's side of the same grant: lab_pc (paramiko), granted ``tb:*``, asks
    for ``tb:1`` … ``tb:3000`` (one ``tcpip-forward`` each, all granted).  Before, each
    registration was a ``labrelay_relay_service_up`` series of its own: /metrics grew
    by ~65 bytes a port (200 KB for 3 000; 4 MB for the 65 535 the grant allows, at
    every scrape).  Now, past ``WILDCARD_SERIES`` ports held under one ``NAME:*`` grant,
    they are one ``tb:*`` series whose value is how many; an explicitly granted
    service keeps its own."""
    lab_pc = make_key(tmp_path / "lab_pc", "lab_pc")
    relay = start_relay(
        agents=[f'permitlisten="tb:*",permitlisten="web:8080" {lab_pc.public_blob()} lab_pc'])
    t = paramiko.Transport(("127.0.0.1", relay.port))
    t.connect(username="lab_pc",
              pkey=paramiko.Ed25519Key.from_private_key_file(str(lab_pc.path)))
    try:
        assert t.global_request("tcpip-forward", ("web", 8080), wait=True) is not None
        for port in range(1, 4):
            assert t.global_request("tcpip-forward", ("tb", port), wait=True) is not None
        few = relay.metrics()
        assert {"web:8080", "tb:1", "tb:2", "tb:3"} <= service_labels(few)
        for port in range(4, REGISTERED + 1):
            t.global_request("tcpip-forward", ("tb", port), wait=False)
        assert t.global_request("keepalive@openssh.com", wait=True) is None  # all answered
        assert relay.status()["relay"]["services_count"] == REGISTERED + 1
        text = relay.metrics()
        up = {s.labels["service"]: s.value for f in text_string_to_metric_families(text)
              if f.name == "labrelay_relay_service_up" for s in f.samples}
        print(f"\n/metrics with 4 registrations {len(few)} bytes, with {REGISTERED + 1}: "
              f"{len(text)} bytes; service_up {up}")
        assert up == {"web:8080": 1, "tb:*": REGISTERED}
        assert len(text) - len(few) < 1024, len(text) - len(few)
    finally:
        t.close()
