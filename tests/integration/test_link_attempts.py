"""The agent's link against servers that hang up during the handshake.

A relay that is restarting, an HTTP proxy that gives up, a load balancer probing: the
TCP connection is accepted and then closed before the SSH handshake is done.  Each such
attempt must count as a failed attempt (``link_failed``, backoff) and nothing more:
Twisted's ``ClientService`` used to raise ``automat.NoTransition`` out of the lost
connection, which the reactor logged as a critical "Unhandled Error" traceback on every
attempt (seen in CI while a relay restarted behind a proxy).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import AgentProcess, KeyPair

pytestmark = pytest.mark.integration


class HangUp:
    """A TCP server that accepts and closes each connection, after ``banner`` (if any)."""

    def __init__(self, banner: bytes) -> None:
        self.banner = banner
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, name="hangup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                if self.banner:
                    conn.sendall(self.banner)
                    conn.recv(4096)  # the agent's banner (and maybe its KEXINIT)

    def close(self) -> None:
        # shutdown() first: it wakes a thread blocked in accept(), which close() alone
        # does not; a thread left blocked there outlives the test, and once the fd
        # number is reused it can accept a later test's connections and answer them with
        # this banner (seen: test_trusted_ca's echo target answered "SSH-2.0-OpenSSH_9.6").
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def hangup() -> Iterator[Callable[[bytes], HangUp]]:
    servers: list[HangUp] = []

    def make(banner: bytes) -> HangUp:
        servers.append(HangUp(banner))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("banner", [b"", b"SSH-2.0-OpenSSH_9.6\r\n"],
                         ids=["before-banner", "after-banner"])
def test_a_server_that_hangs_up_mid_handshake_is_retried_without_a_traceback(
    banner: bytes,
    hangup: Callable[[bytes], HangUp],
    client_key: KeyPair,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    server = hangup(banner)
    known = tmp_path / "known_hosts"
    known.write_text("")
    agent = start_agent(
        "-p", str(server.port), "-i", str(client_key.path),
        "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
        "--backoff-initial", "0.05", "--backoff-max", "0.1",
        "-R", "0:127.0.0.1:9", "lab_pc@127.0.0.1",
    )  # fmt: skip
    for _ in range(4):
        agent.wait_for("link_failed", timeout=20)
    retries = agent.events("link_retry")
    assert len(retries) >= 3, retries
    assert server.accepted >= 4
    unhandled = [e for e in agent.events() if e.get("level") in ("critical", "error")]
    assert unhandled == [], unhandled
    assert agent.proc.poll() is None, "the agent gave up"
