"""Sessions that arrive while their agent is away are served once it is back.

docs/relay.md promises that public listeners stay bound while their agent reconnects
and that new connections wait (``public_wait``) for it.  Only the time-out half was
tested; tried by hand, a waiting connection was closed the moment the agent came back:
the relay opened its ``forwarded-tcpip`` before the reply to the agent's
``tcpip-forward`` had gone out, and the labrelay agent, not yet holding the forward as
registered, answered "no such forward".  Now the relay hands a registration to waiting
sessions only after its reply was sent, and the agent also accepts a session for a
forward whose request is on its way (as OpenSSH's client does).

Issue 16, item 5: an agent is SIGKILLed; during the gap five connections to its public
port and five ``ssh -J`` sessions to its named service are made (the test waits until
the relay logs all ten as waiting); a new agent is started; all ten are carried
byte-exact.  With a stock ``ssh -R`` agent and with the labrelay agent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    DataStream,
    KeyPair,
    RelayNode,
    Sshd,
    SshProcess,
    echo_roundtrip,
    find_program,
    free_port,
    known_hosts_line,
    make_key,
    sha256_hex,
    ssh_argv,
)
from relay_fixtures import jump_config

pytestmark = pytest.mark.integration

SESSIONS = 5
PAYLOAD = 256 * 1024


def _agent(kind: str, relay: RelayNode, key: KeyPair, forwards: list[str],
           start_agent: Callable[..., AgentProcess],
           start_ssh: Callable[..., SshProcess], name: str) -> Any:
    """A stock ``ssh -N -R`` or a labrelay agent with ``forwards``, once all are granted."""
    rs = [a for f in forwards for a in ("-R", f)]
    if kind == "stock":
        proc = start_ssh(ssh_argv(relay.port, key.path, relay.known_hosts, "-v", "-N",
                                  "-o", "ExitOnForwardFailure=yes", *rs, user="lab_pc"),
                         name=name)  # fmt: skip
        for f in forwards:
            listen = ":".join(f.split(":")[:2]).replace(".", r"\.")
            proc.wait_stderr(rf"remote forward success for: listen {listen},", timeout=20)
        return proc
    agent = start_agent(
        "-p", str(relay.port), "-i", str(key.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "ServerAliveInterval=1", "--backoff-initial", "0.2", "--backoff-max", "1",
        *rs, "lab_pc@127.0.0.1", name=name,
    )  # fmt: skip
    agent.wait_for("link_connected", timeout=20)
    for f in forwards:
        agent.wait_for("forward_ready", timeout=20, since=0, kind="remote",
                       bind=f.split(":")[0])
    return agent


def _jump_cat(cfg: Path, relay: RelayNode, payload: bytes) -> bytes:
    """``ssh -J alice@relay root@gpu-cluster cat``: what ``cat`` sent back."""
    ssh = find_program("ssh") or "ssh"
    out = subprocess.run(
        [ssh, "-F", str(cfg), "-J", f"alice@127.0.0.1:{relay.port}", "root@gpu-cluster", "cat"],
        input=payload, capture_output=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def _wait_count(relay: RelayNode, event: str, n: int, since: int, **match: Any) -> None:
    """Until ``n`` events ``event`` matching ``match`` were logged after ``since``."""
    at = since
    for _ in range(n):
        at = relay.wait_for(event, timeout=30, since=at, **match)["_index"] + 1


@pytest.mark.parametrize("kind", ["stock", "labrelay"])
def test_sessions_made_while_the_agent_is_away_are_served_when_it_is_back(
    kind: str,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    sshd_factory: Callable[[str], Sshd],
    client_key: KeyPair,
    targets: Targets,
    tmp_path: Path,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice")}
    public = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public}",permitlisten="gpu-cluster:22" '
                f"{keys['lab_pc'].public_blob()} lab_pc"],
        users=[f'permitopen="gpu-cluster:22" {keys["alice"].public_blob()} alice'],
        relay_toml='public_bind = "127.0.0.1"\npublic_wait = 60\npenalty_exempt = ["127.0.0.1"]',
    )
    gpu = sshd_factory("gpu_cluster")
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    echo = targets.echo()
    forwards = [f"gpu-cluster:22:127.0.0.1:{gpu.port}", f"0.0.0.0:{public}:127.0.0.1:{echo.port}"]
    cfg = jump_config(tmp_path / "ssh_config", relay, keys["alice"], client_key, connect_timeout=30)

    first = _agent(kind, relay, keys["lab_pc"], forwards, start_agent, start_ssh, "agent-1")
    hello = b"before the kill"
    assert echo_roundtrip(public, hello) == hello
    assert _jump_cat(cfg, relay, hello) == hello

    mark = relay.mark()
    first.kill()  # SIGKILL: no goodbye, no cancel-tcpip-forward
    relay.wait_for("relay_disconnected", timeout=15, since=mark, kind="agent", name="lab_pc")

    payloads = [DataStream(100 + i, PAYLOAD).bytes() for i in range(2 * SESSIONS)]
    with ThreadPoolExecutor(max_workers=2 * SESSIONS) as pool:
        public_runs = [pool.submit(echo_roundtrip, public, payloads[i], timeout=120)
                       for i in range(SESSIONS)]
        jump_runs = [pool.submit(_jump_cat, cfg, relay, payloads[SESSIONS + i])
                     for i in range(SESSIONS)]
        # All ten are waiting at the relay before the agent comes back.
        for service in (f"public:{public}", "gpu-cluster:22"):
            _wait_count(relay, "relay_session_waiting", SESSIONS, mark, service=service)
        assert not any(f.done() for f in public_runs + jump_runs), "served with no agent?"

        back = relay.mark()
        _agent(kind, relay, keys["lab_pc"], forwards, start_agent, start_ssh, "agent-2")
        got = [f.result(timeout=120) for f in public_runs + jump_runs]

    for i, (sent, came) in enumerate(zip(payloads, got, strict=True)):
        assert len(came) == len(sent) and sha256_hex(came) == sha256_hex(sent), i
    for service in (f"public:{public}", "gpu-cluster:22"):
        relay.wait_for("relay_service_registered", timeout=5, since=back, service=service)
    assert relay.events("relay_public_refused", since=mark) == []
    assert relay.events("relay_session_refused", since=mark) == []
    assert relay.events(level="critical") == []
