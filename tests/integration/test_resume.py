"""Sessions that survive the agent's link (issue 16), with real processes.

A labrelay agent reaches a real ``labrelay relay`` through a :class:`TcpProxy` that can
reset every connection at once (``kill_all``: both ends lose the link together, as
when a NAT or a router reboots) or go silent (``blackhole``: nothing arrives, both
ends find the link dead by their keepalives).  Sessions through a public port and
through a stock ``ssh -L`` to a named service are under way when the link breaks; the
agent reconnects and they continue byte-exact.  Past the grace period they end with
an error, never short.  docs/resilience.md states what survives what.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    DataStream,
    HarnessError,
    MiB,
    RelayNode,
    SshProcess,
    TcpProxy,
    connect,
    free_port,
    known_hosts_line,
    make_key,
    recv_exactly,
    send_stream,
    ssh_argv,
)

pytestmark = pytest.mark.integration


@dataclass
class World:
    relay: RelayNode
    proxy: TcpProxy
    agent: AgentProcess
    echo_port: int  # public port -> echo
    sink_port: int  # public port -> hash sink
    sink: Any
    web_port: int  # alice's ssh -L to web:8080 -> echo


def _world(start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
           start_ssh: Callable[..., SshProcess], targets: Targets, tmp_path: Path,
           grace: float, relay_grace: float | None = None) -> World:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice")}
    echo_port, sink_port = free_port(), free_port()
    relay = start_relay(
        agents=[f'permitlisten="{echo_port}",permitlisten="{sink_port}",'
                f'permitlisten="web:8080" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {keys["alice"].public_blob()} alice'],
        relay_toml=(f'public_bind = "127.0.0.1"\npublic_wait = 30\n'
                    f"resume_grace = {relay_grace if relay_grace is not None else grace}\n"
                    'keepalive_interval = 1\nkeepalive_count = 3\n'
                    'penalty_exempt = ["127.0.0.1"]'),
    )
    proxy = targets.proxy(("127.0.0.1", relay.port))
    relay.trust(known_hosts_line(relay.host_key_blob, proxy.port))
    echo, sink = targets.echo(), targets.sink()
    agent = start_agent(
        "-p", str(proxy.port), "-i", str(keys["lab_pc"].path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3",
        "--backoff-initial", "0.2", "--backoff-max", "1", "--resume-grace", str(grace),
        "-R", f"0.0.0.0:{echo_port}:127.0.0.1:{echo.port}",
        "-R", f"0.0.0.0:{sink_port}:127.0.0.1:{sink.port}",
        "-R", f"web:8080:127.0.0.1:{echo.port}",
        "lab_pc@127.0.0.1", name="agent",
    )  # fmt: skip
    agent.wait_for("link_connected", timeout=20)
    for bind in ("0.0.0.0", "web"):
        agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", bind=bind)
    web_port = free_port()
    alice = start_ssh(ssh_argv(relay.port, keys["alice"].path, relay.known_hosts, "-v", "-N",
                               "-o", "ExitOnForwardFailure=yes",
                               "-L", f"127.0.0.1:{web_port}:web:8080", user="alice"),
                      name="alice")  # fmt: skip
    alice.wait_stderr(r"new port-listener")
    return World(relay, proxy, agent, echo_port, sink_port, sink, web_port)


class Interactive:
    """An echo session typed into line by line: each line must come back before the
    next is sent, so it sees exactly where a cut happened."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port, timeout=60)
        self.sent = bytearray()

    def line(self, text: bytes) -> bytes:
        self.sock.sendall(text)
        self.sent += text
        return recv_exactly(self.sock, len(text))


def _moved(relay: RelayNode, service: str, at_least: int, timeout: float = 60.0) -> None:
    """Until the relay's session to ``service`` moved ``at_least`` bytes to it (bounded
    polling: the relay logs no event per byte)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [s for s in relay.status()["relay"]["sessions"] if s["service"] == service]
        if rows and rows[0]["bytes_to_service"] >= at_least:
            return
        time.sleep(0.05)
    raise HarnessError(f"{service}: fewer than {at_least} bytes moved in {timeout}s")


def _upload(port: int, stream: DataStream, errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            send_stream(port, stream, timeout=120)
        except BaseException as e:  # reported by the test
            errors.append(e)

    t = threading.Thread(target=run, name="upload", daemon=True)
    t.start()
    return t


def test_sessions_continue_byte_exact_when_both_ends_lose_the_link_at_once(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    w = _world(start_relay, start_agent, start_ssh, targets, tmp_path, grace=30)
    public, named = Interactive(w.echo_port), Interactive(w.web_port)
    assert public.line(b"before ") == b"before "
    assert named.line(b"before ") == b"before "
    stream = DataStream(7, 48 * MiB)
    errors: list[BaseException] = []
    upload = _upload(w.sink_port, stream, errors)
    _moved(w.relay, f"public:{w.sink_port}", 4 * MiB)

    mark, rmark = w.agent.mark(), w.relay.mark()
    w.proxy.kill_all()  # both ends see the link reset at once, mid-transfer
    lost = w.agent.wait_for("link_lost", timeout=10, since=mark)
    assert lost["held"] == 3, lost
    w.agent.wait_for("link_connected", timeout=20, since=mark)
    for _ in range(3):
        w.agent.wait_for("session_resumed", timeout=20)
    w.relay.wait_for("relay_disconnected", timeout=10, since=rmark, kind="agent")

    assert public.line(b"after") == b"after"
    assert named.line(b"after") == b"after"
    upload.join(120)
    assert not errors, errors
    got = w.sink.result(timeout=60)
    assert (got.nbytes, got.sha256) == (stream.size, stream.sha256)
    w.agent.assert_no_event("session_resume_refused")
    w.agent.assert_no_event("session_hold_expired")
    assert w.relay.events("session_resume_refused", since=rmark) == []
    assert w.relay.events(level="critical") == []


def test_a_silent_link_holds_sessions_and_they_resume_when_it_is_back(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    """The link goes silent (nothing is reset): both ends find it dead by keepalives,
    hold their sessions, and resume them once the link carries bytes again."""
    w = _world(start_relay, start_agent, start_ssh, targets, tmp_path, grace=30)
    public = Interactive(w.echo_port)
    assert public.line(b"one ") == b"one "
    stream = DataStream(8, 32 * MiB)
    errors: list[BaseException] = []
    upload = _upload(w.sink_port, stream, errors)
    _moved(w.relay, f"public:{w.sink_port}", 2 * MiB)

    mark, rmark = w.agent.mark(), w.relay.mark()
    w.proxy.blackhole()
    w.agent.wait_for("link_dead", timeout=15, since=mark)
    w.relay.wait_for("relay_peer_dead", timeout=15, since=rmark)
    w.relay.wait_for("session_held", timeout=10, since=rmark)
    held = w.relay.status()["relay"]["held_sessions"]
    assert len(held) == 2 and all(h["age"] >= 0 for h in held), held
    w.proxy.restore()
    for _ in range(2):
        w.agent.wait_for("session_resumed", timeout=30)
    assert public.line(b"two") == b"two"
    upload.join(120)
    assert not errors, errors
    got = w.sink.result(timeout=60)
    assert (got.nbytes, got.sha256) == (stream.size, stream.sha256)
    assert w.relay.status()["relay"]["held_sessions"] == []


def test_past_the_grace_held_sessions_end_with_a_reset_never_short(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    w = _world(start_relay, start_agent, start_ssh, targets, tmp_path, grace=3)
    public = Interactive(w.echo_port)
    assert public.line(b"x") == b"x"
    stream = DataStream(9, 64 * MiB)
    errors: list[BaseException] = []
    upload = _upload(w.sink_port, stream, errors)
    _moved(w.relay, f"public:{w.sink_port}", 2 * MiB)
    mark, rmark = w.agent.mark(), w.relay.mark()
    w.proxy.blackhole()
    w.relay.wait_for("session_hold_expired", timeout=30, since=rmark)
    w.agent.wait_for("session_hold_expired", timeout=30, since=mark)
    with pytest.raises(OSError):
        public.line(b"y")
        public.line(b"z")  # the reset may be seen on the second
    upload.join(60)
    assert errors and isinstance(errors[0], OSError), errors
    # the target saw a reset, not a clean end: the sink records no complete stream
    with pytest.raises(HarnessError):
        w.sink.result(timeout=2)
    w.proxy.restore()
    w.agent.wait_for("link_connected", timeout=30, since=mark)
