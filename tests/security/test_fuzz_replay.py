"""The fuzz corpus against a real relay: every banner and packet input of
tests/fuzz (seeds, and the inputs that once crashed Conch's parsing) sent over TCP to
a running ``labrelay relay``, while alice's session through an agent's service stays
open and keeps echoing.

Each input must end in a disconnect or an idle connection the relay will time out,
never in an "Unhandled Error" (a critical log line with a traceback), and the relay
must neither die nor grow.  The in-process targets check the same invariants on
millions of inputs; this test shows the real process, its reactor and its log agree.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Targets
from harness import (
    LOOPBACK,
    AgentProcess,
    KeyPair,
    RelayNode,
    SshProcess,
    connect,
    make_key,
    recv_exactly,
    ssh_argv,
)
from relay_fixtures import stock_local_forward

pytestmark = [pytest.mark.integration, pytest.mark.security]

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzztargets  # noqa: E402
import fuzzworld  # noqa: E402
from twisted.conch.ssh import common  # noqa: E402

CLIENT_VERSION = fuzzworld.CLIENT_VERSION


def wire_bytes(target: str, data: bytes) -> bytes:
    """What a client would send for one corpus input of ``target`` (as the in-process
    target builds it, minus the read cuts)."""
    if target == "transport_banner":
        return data[1:]
    body = data[1:]
    if data[0] & 1:
        body = b"".join(fuzzworld.frame_plain(bytes((sel,)) + payload)
                        for sel, payload in fuzztargets._records(body))
    return CLIENT_VERSION + body


def exchange(port: int, payload: bytes, source: str,
             timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``payload`` from the loopback address ``source``; everything the relay
    answers and whether it closed.

    Each input comes from its own address: the relay's per-source penalties (a protocol
    error costs its source 10 s, refused at accept past 15 s) would otherwise refuse
    most of the corpus at accept -- a closed connection with no bytes -- and the
    parsers would never see it.  The penalties stay on."""
    with socket.create_connection((LOOPBACK, port), timeout=30, source_address=(source, 0)) as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(timeout)
        got = bytearray()
        try:
            while data := s.recv(65536):
                got += data
        except ConnectionResetError:
            return bytes(got), True
        except TimeoutError:
            return bytes(got), False  # waiting for more: the login grace time ends it
        return bytes(got), True


@pytest.fixture
def alice_key(openssh: None, tmp_path: Path) -> KeyPair:
    return make_key(tmp_path / "alice", comment="alice")


def test_fuzz_corpus_against_a_real_relay(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    client_key: KeyPair,
    alice_key: KeyPair,
) -> None:
    relay = start_relay(
        agents=[f'permitlisten="web:8080" {client_key.public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {alice_key.public_blob()} alice'],
        relay_toml="login_grace = 5",
    )
    web = targets.echo()
    agent = start_agent(
        "-p", str(relay.port), "-i", str(client_key.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-R", f"web:8080:127.0.0.1:{web.port}", "lab_pc@127.0.0.1",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, kind="remote", bind="web")
    _ssh, port = stock_local_forward(
        start_ssh,
        lambda port: ssh_argv(relay.port, alice_key.path, relay.known_hosts, "-v", "-N",
                              "-o", "ExitOnForwardFailure=yes",
                              "-L", f"127.0.0.1:{port}:web:8080", user="alice"),
        name="alice")  # fmt: skip
    alice = connect(port)

    def alice_echoes(text: bytes) -> None:
        alice.sendall(text)
        assert recv_exactly(alice, len(text)) == text

    alice_echoes(b"before")
    mark = relay.mark()
    rss_before = relay.rss_kb()
    inputs = [(t, p) for t in ("transport_banner", "transport_packets")
              for p in sorted((FUZZ / "corpus" / t).iterdir())]
    assert len(inputs) >= 20
    # In parallel, well under max_unauthenticated (64): each either closes at once or
    # idles for exchange()'s timeout.
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(len(inputs))]
    with ThreadPoolExecutor(16) as pool:
        replies = pool.map(lambda tp, src: exchange(relay.port,
                                                    wire_bytes(tp[0], tp[1].read_bytes()), src),
                           inputs, sources)
        outcomes = {path.name: reply for (_t, path), reply in zip(inputs, replies, strict=True)}
    alice_echoes(b"after the corpus")

    bad = [e for e in relay.events(since=mark) if e.get("level") in ("critical", "error")]
    assert not bad, (len(bad), bad[:3])
    assert relay.proc.returncode is None, "the relay died"
    assert relay.rss_kb() - rss_before < 32 * 1024
    # The inputs that once raised out of Conch now end in a protocol-error disconnect
    # (SSH_MSG_DISCONNECT, reason 2), in the clear before keys: relay.ssh.guard's
    # "malformed message N", or for a KEXINIT cut short the transport policy's own
    # parse of it, which now runs before Conch's.
    for name, why in (("regress-truncated-kexinit", b"KEXINIT shorter than its cookie"),
                      ("regress-ecdh-before-kexinit", b"malformed message 30"),
                      ("regress-userauth-in-clear", b"malformed message 5")):
        reply, closed = outcomes[name]
        assert closed and b"\x01\x00\x00\x00\x02" + common.NS(why) in reply, (name, reply[-200:])
    malformed = relay.events("malformed_packet", since=mark)
    assert len(malformed) >= 3

