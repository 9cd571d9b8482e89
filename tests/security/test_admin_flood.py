"""Connections held open on the admin endpoint of a real relay.

The admin endpoint took every connection it was offered and kept each while a header
byte trickled in (Twisted's 60 s timer is an idle timer).  Every one is a file
descriptor of the relay's process, which the SSH port needs too: whoever could reach
the admin port (no key, no handshake) could leave the relay unable to accept anyone.
Here the relay's descriptor limit is lowered to 256 (``prlimit``; the default 20 000
only takes longer to fill) and five hosts (127.0.0.2-6) open 60 connections each that
send half a request and hold.  Before the fix every one was accepted and alice's
paramiko login then failed (``Error reading SSH protocol banner``: the SSH port could
not accept).  Now the admin endpoint holds at most 32 (8 per address) and closes the
rest at accept; alice logs in and the operator's ``/status.json`` from 127.0.0.1 is
still answered (docs/security.md).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from harness import LOOPBACK, RelayNode, make_key
from test_admin import http_get

from relay.ops.admincap import MAX_CONNECTIONS, MAX_PER_SOURCE

pytestmark = [pytest.mark.integration, pytest.mark.security]

SOURCES = [f"127.0.0.{i}" for i in range(2, 7)]
PER_SOURCE = 60
NOFILE = 256


def _held(sock: socket.socket, wait: float) -> bool:
    """True if the relay keeps ``sock`` open (nothing to read, no EOF, no reset)."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return True
    try:
        return sock.recv(1) != b""
    except OSError:
        return False


def test_connections_held_on_the_admin_port_do_not_take_the_ssh_port(
    start_relay: Callable[..., RelayNode], tmp_path: Path
) -> None:
    alice = make_key(tmp_path / "alice", comment="alice")
    relay = start_relay(users=[f'permitopen="web:8080" {alice.public_blob()} alice'])
    subprocess.run(["prlimit", f"--pid={relay.pid}", f"--nofile={NOFILE}:{NOFILE}"],
                   check=True)
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for source in SOURCES:
            for _ in range(PER_SOURCE):
                s = socket.create_connection((LOOPBACK, relay.admin_port), timeout=5,
                                             source_address=(source, 0))
                s.sendall(b"GET /status.json HTTP/1.1\r\nX-Slow: ")  # and never the rest
                socks.append(s)
        # Give the relay time to accept (or refuse) everything in its backlog.
        held = sum(_held(s, 0.5 if i == 0 else 0.01) for i, s in enumerate(socks))
        for s in socks:  # a byte more each: trickling does not make a refused one come back
            try:
                s.send(b"a")
            except OSError:
                pass
        held = min(held, sum(_held(s, 0.01) for s in socks))
        print(f"\nadmin connections held: {held} of {len(socks)} "
              f"(relay descriptors limited to {NOFILE}) in {time.monotonic() - started:.2f}s")
        t = paramiko.Transport((LOOPBACK, relay.port))
        t.banner_timeout = 10
        try:
            t.connect(username="alice",
                      pkey=paramiko.Ed25519Key.from_private_key_file(str(alice.path)))
            alice_in: object = t.is_authenticated()
        except (paramiko.SSHException, OSError) as e:
            alice_in = e
        finally:
            t.close()
        assert alice_in is True, f"alice could not log in: {alice_in!r}"
        assert held <= MAX_CONNECTIONS, held
        assert held >= MAX_CONNECTIONS - MAX_PER_SOURCE  # the caps, not something else
        status, _, body = http_get(relay.admin_port, f"127.0.0.1:{relay.admin_port}")
        assert status == 200 and b'"relay"' in body
        relay.wait_for("admin_connection_refused", timeout=5, since=0)
    finally:
        for s in socks:
            s.close()


BODY = 32 * 1024 * 1024


def _temporary_files(pid: int) -> int:
    """Bytes in the deleted files the process holds open (Twisted's request bodies)."""
    total = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).endswith("(deleted)"):
                total += os.stat(fd).st_size
        except OSError:
            continue
    return total


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_request_body_sent_to_the_admin_port_is_bounded(
    start_relay: Callable[..., RelayNode], framing: str
) -> None:
    """Twisted wrote every request body of 100 000 bytes or more (or chunked) to a
    temporary file, before the token check or the resource saw it: 127.0.0.2 sending
    32 MiB to ``/status.json`` made the relay write 32 MiB to its temporary directory,
    as much as it was sent.  Now past 64 KiB it answers 413 and closes."""
    relay = start_relay()
    head = b"POST /status.json HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % relay.admin_port
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n\r\n"
    else:
        head += b"Content-Length: %d\r\n\r\n" % (BODY * 4)
    chunk = b"x" * 65536
    piece = b"%x\r\n%s\r\n" % (len(chunk), chunk) if framing == "chunked" else chunk
    sock = socket.create_connection((LOOPBACK, relay.admin_port), timeout=10,
                                    source_address=("127.0.0.2", 0))
    sent, answer, on_disk = 0, b"", 0
    try:
        sock.sendall(head)
        while sent < BODY:
            try:
                sock.sendall(piece)
            except OSError:  # closed by the relay
                break
            sent += len(chunk)
            on_disk = max(on_disk, _temporary_files(relay.pid))
        sock.settimeout(10)
        try:
            answer = sock.recv(4096)
        except OSError:
            pass
    finally:
        sock.close()
    print(f"\n{framing}: sent {sent} bytes, the relay wrote up to {on_disk} to temporary "
          f"files; answer {answer[:40]!r}")
    assert on_disk == 0
    assert sent < BODY  # stopped reading it
    assert answer.startswith(b"HTTP/1.1 413")
    status, _, body = http_get(relay.admin_port, f"127.0.0.1:{relay.admin_port}")
    assert status == 200 and b'"relay"' in body
