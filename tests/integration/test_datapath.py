"""The spliced data path end to end: ``labrelay run`` with a ``[[forward]]`` plain
hop as a real process, real sockets on both sides.

The backend is ``LABRELAY_DATAPATH``'s (``auto``: C when built); CI runs this file
once with ``c`` and once with ``python``, and every test checks the relay really
used the backend asked for.  Bulk traffic comes from helper processes (``PEER``
below), so neither the test's GIL nor the relay's is what is measured.  Nothing
sleeps: tests wait on events, sockets and processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import AgentProcess
from relay_fixtures import admin_port

from relay.datapath import _splice
from relay.ops.status import fetch

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
GiB = 1024 * MiB

# One end of a bulk transfer: sends NBYTES of seeded pseudo-random data (then shuts
# its write side) while it reads until EOF, hashing both; prints one JSON line.
PEER = r'''
import hashlib, json, random, socket, struct, sys, threading
mode, port, nbytes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reset_after = int(sys.argv[5]) if len(sys.argv) > 5 else 0
if mode == "serve":
    listener = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    sock, _ = listener.accept()
    listener.close()
else:
    sock = socket.create_connection(("127.0.0.1", port))
report = {"sent": 0, "received": 0, "error": None}

def send():
    rng, h = random.Random(seed), hashlib.sha256()
    try:
        left = nbytes
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            sock.sendall(chunk)
            h.update(chunk)
            report["sent"] += len(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        report["send_error"] = type(e).__name__
    report["sent_sha"] = h.hexdigest()

sender = threading.Thread(target=send, daemon=True)
sender.start()
h, buf = hashlib.sha256(), bytearray(1 << 20)
try:
    while True:
        n = sock.recv_into(buf)
        if not n:
            break
        h.update(memoryview(buf)[:n])
        report["received"] += n
        if reset_after and report["received"] >= reset_after:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            report["reset"] = True
            break
except OSError as e:
    report["error"] = type(e).__name__
report["received_sha"] = h.hexdigest()
if not report.get("reset"):
    sender.join()
print(json.dumps(report), flush=True)
'''

# Accepts connections, hashes each until EOF, and answers with the digest, but only
# once BARRIER connections have all reached EOF: so they were all open at once.
HASH_TARGET = r'''
import hashlib, json, selectors, socket, sys
barrier = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
listener.setblocking(False)
print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
conns, finished, peak, live = {}, [], 0, 0
while len(finished) < barrier:
    for key, _ in sel.select():
        if key.fileobj is listener:
            conn, _ = listener.accept()
            conn.setblocking(True)
            sel.register(conn, selectors.EVENT_READ)
            conns[conn] = hashlib.sha256()
            live += 1
            peak = max(peak, live)
            continue
        conn = key.fileobj
        data = conn.recv(1 << 16)
        if data:
            conns[conn].update(data)
        else:
            sel.unregister(conn)
            finished.append(conn)
for conn in finished:
    conn.sendall(conns[conn].hexdigest().encode())
    conn.close()
print(json.dumps({"done": len(finished), "peak": peak}), flush=True)
'''


def selected_backend() -> str:
    value = os.environ.get("LABRELAY_DATAPATH", "").strip().lower() or "auto"
    if value == "python":
        return "python"
    if value == "c" and not _splice.AVAILABLE:
        pytest.fail(
            f"LABRELAY_DATAPATH=c but relay.datapath._splice_c is missing: {_splice.IMPORT_ERROR}"
        )
    return "c" if _splice.AVAILABLE else "python"


class Helper:
    """A helper process that prints JSON lines on stdout."""

    def __init__(self, script: str, *args: object) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                                     stdout=subprocess.PIPE, text=True)

    def line(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "helper said nothing"
        text = self.proc.stdout.readline()
        assert text, f"helper exited ({self.proc.wait(10)})"
        result: dict[str, Any] = json.loads(text)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Hop:
    """``labrelay run`` with one ``[[forward]]`` to ``target_port`` and an admin endpoint."""

    def __init__(self, proc: AgentProcess, admin: str) -> None:
        self.proc = proc
        self.admin = admin
        ready = proc.wait_for("plain_forward_ready", timeout=30)
        self.port: int = ready["port"]

    def status(self) -> dict[str, Any]:
        return fetch(self.admin)

    def forward(self) -> dict[str, Any]:
        forwards: list[dict[str, Any]] = self.status()["forwards"]
        return forwards[0]

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def fds(self, kind: str) -> int:
        count = 0
        for name in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                count += os.readlink(f"/proc/{self.proc.pid}/fd/{name}").startswith(kind + ":")
            except OSError:
                pass
        return count

    def pair_sockets(self, target_port: int) -> int:
        """Sockets this process holds for sessions: accepted on the hop's port or
        connected to ``target_port`` (not the listener, not admin requests)."""
        inodes = set()
        for name in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                link = os.readlink(f"/proc/{self.proc.pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        count = 0
        for table in ("tcp", "tcp6"):
            lines = Path(f"/proc/{self.proc.pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if inode not in inodes or state == "0A":  # 0A: LISTEN
                    continue
                if int(local.rsplit(":", 1)[1], 16) == self.port or int(
                        remote.rsplit(":", 1)[1], 16) == target_port:
                    count += 1
        return count

    def session_ended(self) -> dict[str, Any]:
        return self.proc.wait_for("plain_session_ended", timeout=60)


@pytest.fixture
def backend() -> str:
    return selected_backend()


@pytest.fixture
def helpers() -> Any:
    started: list[Helper] = []

    def start(script: str, *args: object) -> Helper:
        helper = Helper(script, *args)
        started.append(helper)
        return helper

    yield start
    for helper in started:
        helper.close()


@pytest.fixture
def start_hop(start_process: Callable[..., AgentProcess], tmp_path: Path,
              backend: str) -> Callable[[int], Hop]:
    def start(target_port: int) -> Hop:
        config = tmp_path / "hop.toml"
        config.write_text(
            '[admin]\nlisten = "127.0.0.1:0"\n\n'
            f'[[forward]]\nname = "hop"\nlisten = "127.0.0.1:0"\n'
            f'connect = "127.0.0.1:{target_port}"\n'
        )
        proc = start_process(
            [sys.executable, "-m", "relay", "run", str(config), "--log-format", "json", "-v"],
            name=f"hop-{backend}", env={"LABRELAY_DATAPATH": backend})
        chosen = proc.wait_for("datapath_backend", timeout=30)
        assert chosen["backend"] == backend
        return Hop(proc, f"127.0.0.1:{admin_port(proc)}")

    return start


@pytest.fixture
def listener() -> Any:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(30)
    yield sock
    sock.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_one_gib_each_way_through_a_plain_hop(start_hop: Callable[[int], Hop],
                                             helpers: Callable[..., Helper]) -> None:
    target = helpers(PEER, "serve", 0, GiB, 2)
    hop = start_hop(target.line()["port"])
    client = helpers(PEER, "connect", hop.port, GiB, 1)
    sent, served = client.line(timeout=240), target.line(timeout=240)
    assert sent["error"] is None and served["error"] is None
    assert sent["sent"] == served["received"] == GiB
    assert served["sent"] == sent["received"] == GiB
    assert sent["sent_sha"] == served["received_sha"]
    assert served["sent_sha"] == sent["received_sha"]
    ended = hop.session_ended()
    assert (ended["to_target"], ended["from_target"], ended["error"]) == (GiB, GiB, None)
    status = hop.status()
    assert status["datapath"]["pairs_total"] == 1
    assert status["forwards"][0]["bytes_to_target"] == GiB
    assert status["forwards"][0]["path"] == "spliced"


@pytest.mark.parametrize("first", ["client", "target"])
def test_half_close_in_both_directions(start_hop: Callable[[int], Hop], listener: Any,
                                       first: str) -> None:
    """Whoever finishes first shuts its write side; the other still sends, then
    finishes: each sees all of the other's bytes, then EOF, and the pair ends."""
    hop = start_hop(listener.getsockname()[1])
    client = connect(hop.port)
    server, _ = listener.accept()
    server.settimeout(30)
    early, late = (client, server) if first == "client" else (server, client)
    question, answer = os.urandom(3 * MiB), os.urandom(2 * MiB)
    sender = threading.Thread(target=lambda: (early.sendall(question),
                                              early.shutdown(socket.SHUT_WR)))
    sender.start()
    assert recv_all(late) == question  # EOF arrived after every byte
    sender.join(30)
    late.sendall(answer)  # the half-closed direction did not stop this one
    late.shutdown(socket.SHUT_WR)
    assert recv_all(early) == answer
    ended = hop.session_ended()
    assert ended["error"] is None
    to_target = (question if first == "client" else answer)
    assert ended["to_target"] == len(to_target)
    client.close()
    server.close()


@pytest.mark.parametrize("resetting", ["client", "target"])
def test_peer_reset_mid_transfer(start_hop: Callable[[int], Hop],
                                 helpers: Callable[..., Helper], resetting: str) -> None:
    """One end resets while bytes flow both ways: the other sees a reset (not a clean
    EOF), neither hangs, and the relay holds no socket of the pair afterwards."""
    reset_at = 8 * MiB
    target = helpers(PEER, "serve", 0, 256 * MiB, 2, reset_at if resetting == "target" else 0)
    target_port = target.line()["port"]
    hop = start_hop(target_port)
    pipes_before = hop.fds("pipe")
    client = helpers(PEER, "connect", hop.port, 256 * MiB, 1,
                     reset_at if resetting == "client" else 0)
    reports = {"client": client.line(timeout=120), "target": target.line(timeout=120)}
    assert reports[resetting].get("reset") is True
    survivor = reports["target" if resetting == "client" else "client"]
    assert "ConnectionResetError" in (survivor["error"], survivor.get("send_error"))
    ended = hop.session_ended()
    assert ended["error"] is not None
    assert ("client" if resetting == "client" else "target") in ended["error"]
    status = hop.status()["datapath"]
    assert status["pairs_active"] == 0 and status["pairs_failed"] == 1
    assert hop.pair_sockets(target_port) == 0
    assert hop.fds("pipe") <= pipes_before + 2 * status["pipes_idle"]


def test_two_hundred_concurrent_pairs(start_hop: Callable[[int], Hop],
                                      helpers: Callable[..., Helper]) -> None:
    count = 200
    target = helpers(HASH_TARGET, count)
    hop = start_hop(target.line()["port"])
    payloads = [os.urandom(256 * 1024 + i) for i in range(count)]

    def session(data: bytes) -> bytes:
        with connect(hop.port) as sock:
            sock.settimeout(120)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)

    with ThreadPoolExecutor(max_workers=count) as pool:
        replies = list(pool.map(session, payloads))
    summary = target.line()
    assert summary == {"done": count, "peak": count}  # all open at once
    assert replies == [hashlib.sha256(p).hexdigest().encode() for p in payloads]
    for _ in range(count):
        assert hop.session_ended()["error"] is None
    status = hop.status()
    assert status["datapath"]["pairs_total"] == count
    assert status["datapath"]["pairs_failed"] == 0
    assert status["forwards"][0]["bytes_to_target"] == sum(map(len, payloads))


def _fill_until_stalled(sock: socket.socket, pattern: bytes, quiet: float) -> int:
    """Send ``pattern`` over and over until the socket has not become writable for
    ``quiet`` seconds; returns the bytes sent."""
    sent = 0
    twice = memoryview(pattern * 2)
    while True:
        start = sent % len(pattern)
        try:
            sent += sock.send(twice[start:start + len(pattern)])
            continue
        except BlockingIOError:
            pass
        _, writable, _ = select.select([], [sock], [], quiet)
        if not writable:
            return sent


def test_a_reader_that_never_reads(start_hop: Callable[[int], Hop], listener: Any,
                                   backend: str) -> None:
    """The pump pauses: memory stays bounded and the relay spends no CPU while the
    target does not read; once it reads, every byte arrives, then EOF (including
    what sat in the relay's pipe when the client's EOF came)."""
    hop = start_hop(listener.getsockname()[1])
    rss_before = hop.rss_mib()
    client = connect(hop.port)
    server, _ = listener.accept()  # and never reads, for now
    client.setblocking(False)
    pattern = os.urandom(MiB)
    sent = _fill_until_stalled(client, pattern, quiet=0.5)
    assert sent < 64 * MiB  # the kernel's buffers and one pipe, not the whole stream

    forward_before = hop.forward()["bytes_to_target"]
    cpu_before = hop.cpu_seconds()
    _, writable, _ = select.select([], [client], [], 1.0)  # the window: still stalled
    cpu_used = hop.cpu_seconds() - cpu_before
    assert not writable
    assert cpu_used <= 0.03, f"relay used {cpu_used:.3f} CPU-s while stalled"
    assert hop.forward()["bytes_to_target"] == forward_before
    assert hop.rss_mib() - rss_before < 16, "the relay buffered the stream in memory"

    client.setblocking(True)
    client.shutdown(socket.SHUT_WR)
    server.settimeout(30)
    received = recv_all(server)
    assert len(received) == sent
    expected = (pattern * (sent // len(pattern) + 1))[:sent]
    assert hashlib.sha256(received).digest() == hashlib.sha256(expected).digest()
    server.close()
    assert client.recv(1) == b""
    client.close()
    assert hop.session_ended()["error"] is None


def test_bytes_held_at_eof_are_delivered(start_hop: Callable[[int], Hop]) -> None:
    """The client sends and closes completely before the target reads anything."""
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.bind(("127.0.0.1", 0))
        slow.listen()
        slow.settimeout(30)
        hop = start_hop(slow.getsockname()[1])
        data = os.urandom(2 * MiB)
        client = connect(hop.port)
        server, _ = slow.accept()
        client.sendall(data)
        client.close()
        server.settimeout(30)
        start = time.monotonic()
        assert recv_all(server) == data
        assert time.monotonic() - start < 30
        server.close()
    assert hop.session_ended()["error"] is None


def test_connection_refused_by_the_target_closes_the_client(
        start_hop: Callable[[int], Hop]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: refused
        hop = start_hop(dead_port)
        client = connect(hop.port)
        client.sendall(b"hello?")
        assert recv_all(client) == b""
        client.close()
        failed = hop.proc.wait_for("plain_connect_failed", timeout=30)
    assert failed["forward"] == "hop"
    assert hop.forward()["connect_failures"] == 1


@pytest.mark.parametrize(("value", "said"), [
    ("bogus", "LABRELAY_DATAPATH='bogus' is not one of auto, c, python, portable"),
    ("c", "LABRELAY_DATAPATH=c but the native module is not available"),
])
def test_a_backend_that_cannot_be_had_stops_the_node_with_exit_2(
        tmp_path: Path, value: str, said: str) -> None:
    """docs/datapath.md: ``c`` with the module missing makes labrelay refuse to start
    (exit 2), and a bad ``LABRELAY_DATAPATH`` is refused; both say what to set instead.
    The module is hidden from the child (``None`` in ``sys.modules``), as on a machine
    where it was never built.  Only ``choose_backend`` was tested (test_splice_pump),
    not that a node stops on it rather than running without a data path."""
    config = tmp_path / "hop.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:0"\n\n[[forward]]\nname = "hop"\n'
                      'listen = "127.0.0.1:0"\nconnect = "127.0.0.1:9"\n')
    hide = ("import runpy, sys; sys.modules['relay.datapath._splice_c'] = None; "
            f"sys.argv = ['labrelay', 'run', {str(config)!r}]; "
            "runpy.run_module('relay', run_name='__main__')")
    env = {**os.environ, "LABRELAY_DATAPATH": value}
    done = subprocess.run([sys.executable, "-c", hide], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert said in done.stderr, done.stderr
    if value == "c":
        assert "or set LABRELAY_DATAPATH=python" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
