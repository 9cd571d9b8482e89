"""The constants of the benchmarks and the session protocol of their client and target
workers (push, pull, set-up; a target that sinks, echoes or counts)."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
LOOPBACK = "127.0.0.1"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 1 * MiB  # one sendall / recv_into buffer
STALL_SECONDS = 30.0  # a single send or recv blocked this long is a stall
START_TIMEOUT = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# the session protocol of the client and target workers (agent and relay benches)

MODE_ECHO, MODE_SINK, MODE_SOURCE = b"E", b"S", b"R"
# a sink told its byte count up front (8 bytes after the mode byte), for forwarders that
# cannot pass on a half-close: it replies once that many bytes arrived, not at EOF
MODE_COUNTED = b"C"


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def drain(sock: socket.socket, view: memoryview) -> int:
    """Read until EOF into ``view``; the byte count."""
    total = 0
    while True:
        n = sock.recv_into(view)
        if n == 0:
            return total
        total += n


def send_count(sock: socket.socket, payload: memoryview, nbytes: int) -> None:
    left = nbytes
    size = len(payload)
    while left:
        k = size if left >= size else left
        sock.sendall(payload[:k])
        left -= k


def _target_session(conn: socket.socket, payload: memoryview) -> None:
    with conn:
        try:
            nodelay(conn)
            mode = conn.recv(1)
            if mode == MODE_ECHO:
                conn.sendall(mode)
                while conn.recv(4096):
                    pass
            elif mode == MODE_SINK:
                view = memoryview(bytearray(CHUNK))
                count = 1 + drain(conn, view)  # the mode byte counts too
                conn.sendall(struct.pack(">Q", count))
            elif mode == MODE_COUNTED:
                (nbytes,) = struct.unpack(">Q", recv_exact(conn, 8))
                view = memoryview(bytearray(CHUNK))
                count, left = 9, nbytes - 9  # the mode byte and the count count too
                while left > 0:
                    n = conn.recv_into(view[:min(left, CHUNK)])
                    if n == 0:
                        break
                    count += n
                    left -= n
                conn.sendall(struct.pack(">Q", count))
            elif mode == MODE_SOURCE:
                (nbytes,) = struct.unpack(">Q", recv_exact(conn, 8))
                send_count(conn, payload, nbytes)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
            # anything else (an empty readiness probe): just close
        except OSError:
            pass


def exit_when_parent_goes() -> None:
    """Our stdin is the harness's pipe: EOF means the harness is gone."""
    sys.stdin.buffer.read()
    os._exit(0)


def target_worker() -> None:
    """Serve echo / sink / source sessions, one thread each; print our port as JSON."""
    payload = memoryview(os.urandom(CHUNK))
    server = socket.create_server((LOOPBACK, 0), backlog=256)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_target_session, args=(conn, payload), daemon=True).start()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=STALL_SECONDS)
    nodelay(sock)
    return sock


def connect_retry(port: int, timeout: float) -> socket.socket:
    """Connect to ``port`` (TCP_NODELAY), retried while a listener (socat) is starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((LOOPBACK, port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # socat is still starting
    nodelay(sock)
    return sock


def push_bytes(payload: memoryview, port: int, nbytes: int,
               counted: bool = False) -> dict[str, Any]:
    """Client -> tunnel -> target sink; done when the sink reports its count. ``counted``:
    the sink is told the count first and replies without waiting for our half-close
    (for a forwarder that closes the whole connection at EOF, as sshtunnel does)."""
    start = time.perf_counter()
    with connect(port) as sock:
        if counted:
            sock.sendall(MODE_COUNTED + struct.pack(">Q", nbytes))
            send_count(sock, payload, nbytes - 9)
        else:
            sock.sendall(MODE_SINK)
            send_count(sock, payload, nbytes - 1)
            sock.shutdown(socket.SHUT_WR)
        reply = recv_exact(sock, 8)
    seconds = time.perf_counter() - start
    count = struct.unpack(">Q", reply)[0] if len(reply) == 8 else -1
    return {"seconds": seconds, "count": count}


def pull_bytes(view: memoryview, port: int, nbytes: int) -> dict[str, Any]:
    """Target source -> tunnel -> client; done at EOF."""
    start = time.perf_counter()
    with connect(port) as sock:
        sock.sendall(MODE_SOURCE + struct.pack(">Q", nbytes))
        count = drain(sock, view)
    return {"seconds": time.perf_counter() - start, "count": count}


def setup_sessions(port: int, sessions: int, gap: float) -> dict[str, Any]:
    """``sessions`` echo sessions one after another, ``gap`` idle seconds before each."""
    times: list[float] = []
    for _ in range(sessions):
        if gap:
            time.sleep(gap)  # idle time, outside the measured interval
        start = time.perf_counter()
        sock = connect(port)
        try:
            sock.sendall(MODE_ECHO)
            if sock.recv(1) != MODE_ECHO:
                raise OSError(f"session {len(times) + 1} closed before the echo")
        finally:
            sock.close()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"ms": times}
