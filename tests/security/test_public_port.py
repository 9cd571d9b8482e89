"""A user granted ``*`` must not reach a public port's registration over SSH.

The relay registers a public port under the empty service name; before the fix a
``direct-tcpip`` to host ``""`` (port P) matched ``*`` and the registry, so any user
with a ``*`` grant reached the agent's public service without going through the
public listener.  paramiko plays the user and asks for every spelling of "the public
address" a client can send; all are refused, while the public listener itself, a named
service for the same ``*`` user and alice's stock ``ssh -L`` keep working.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest
from conftest import Targets
from harness import (
    LOOPBACK,
    KeyPair,
    RelayNode,
    SshProcess,
    echo_roundtrip,
    free_port,
    make_key,
    ssh_argv,
)

pytestmark = [pytest.mark.integration, pytest.mark.security]

# docs/security.md, "Public ports only through their listener": every spelling it lists,
# and one in another case (round 20: "::1", "[::]" and "[::1]" were not tried)
PUBLIC_SPELLINGS = ["", "0.0.0.0", "localhost", "127.0.0.1", "*", "::", "LOCALHOST", "::1",
                    "[::]", "[::1]"]


@contextmanager
def paramiko_login(port: int, key: KeyPair, user: str) -> Iterator[paramiko.Transport]:
    """An authenticated paramiko transport to the relay (a third-party SSH client)."""
    transport = paramiko.Transport((LOOPBACK, port))
    try:
        transport.connect(username=user,
                          pkey=paramiko.Ed25519Key.from_private_key_file(str(key.path)))
        yield transport
    finally:
        transport.close()


def paramiko_echo(transport: paramiko.Transport, host: str, port: int, payload: bytes) -> bytes:
    channel = transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 40000),
                                     timeout=15)
    try:
        channel.settimeout(15)
        channel.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = channel.recv(65536)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        channel.close()


def test_star_user_cannot_reach_a_public_port_over_ssh(
    start_relay: Callable[..., RelayNode],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> None:
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "ops", "alice")}
    public_port = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public_port}",permitlisten="web:8080" '
                f"{keys['lab_pc'].public_blob()} lab_pc"],
        users=[f'permitopen="*" {keys["ops"].public_blob()} ops',
               f'permitopen="web:8080" {keys["alice"].public_blob()} alice'],
        relay_toml='public_bind = "127.0.0.1"\npublic_wait = 1',
    )
    public_target = targets.echo(greeting=b"PUBLIC ")
    web_target = targets.echo(greeting=b"WEB ")
    agent = start_ssh(ssh_argv(
        relay.port, keys["lab_pc"].path, relay.known_hosts, "-v", "-N",
        "-o", "ExitOnForwardFailure=yes",
        "-R", f"0.0.0.0:{public_port}:127.0.0.1:{public_target.port}",
        "-R", f"web:8080:127.0.0.1:{web_target.port}", user="lab_pc",
    ), name="stock-agent")  # fmt: skip
    agent.wait_stderr(rf"remote forward success for: listen 0\.0\.0\.0:{public_port},")
    agent.wait_stderr(r"remote forward success for: listen web:8080,")

    # alice's stock ssh -L to the named service, open through the whole attack
    alice_port = free_port()
    alice = start_ssh(ssh_argv(
        relay.port, keys["alice"].path, relay.known_hosts, "-v", "-N",
        "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{alice_port}:web:8080",
        user="alice",
    ), name="alice")  # fmt: skip
    alice.wait_stderr(r"new port-listener")
    assert echo_roundtrip(alice_port, b"hello", greeting=b"WEB ") == b"hello"

    mark = relay.mark()
    with paramiko_login(relay.port, keys["ops"], "ops") as ops:
        for host in PUBLIC_SPELLINGS:
            with pytest.raises(paramiko.ChannelException) as refused:
                ops.open_channel("direct-tcpip", (host, public_port), ("127.0.0.1", 40000),
                                 timeout=15)
            assert refused.value.code in (1, 2), (host, refused.value)  # prohibited / failed
        # the same * user still reaches a named service, on the same connection
        assert paramiko_echo(ops, "web", 8080, b"named ok") == b"WEB named ok"

    refusals = relay.events("relay_session_refused", since=mark, name="ops")
    assert len(refusals) == len(PUBLIC_SPELLINGS)
    assert all(re.search(r"public listener|not granted", e["why"]) for e in refusals), refusals
    assert public_target.accepted == 0  # nothing reached the public target over SSH

    # the public listener serves, and alice's session still works afterwards
    assert echo_roundtrip(public_port, b"via listener", greeting=b"PUBLIC ") == b"via listener"
    assert echo_roundtrip(alice_port, b"still here", greeting=b"WEB ") == b"still here"
