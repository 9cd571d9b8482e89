"""The relay bench's workers, each run in its own process (``relay_workers.py
--worker KIND``, as :class:`bench.relay_setup.RelayPeers` starts them): the greeter
target, the client that holds idle sessions and times echoes, and the bulk pusher."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (a worker process): make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import (
    pctl,
)
from bench.sessions import (
    CHUNK,
    LOOPBACK,
    MODE_SINK,
    STALL_SECONDS,
    MiB,
    connect,
    nodelay,
    pull_bytes,
    push_bytes,
    recv_exact,
    setup_sessions,
)

NOFILE = 65536  # RLIMIT_NOFILE for the harness and (inherited) every child


GREETING = b"G"


def raise_nofile(limit: int = NOFILE) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to ``limit`` (root may raise the hard limit too); the result."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((limit, max(hard, limit)), (min(limit, hard), hard)):
        try:  # raising the hard limit needs CAP_SYS_RESOURCE; else up to the hard one
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def greeter_worker() -> None:
    """The second target: greets every connection with one byte, then echoes.

    One thread, epoll, non-blocking sockets: holds tens of thousands of idle
    connections cheaply. ``count`` on stdin prints how many it holds; EOF exits.
    """
    raise_nofile()
    server = socket.create_server((LOOPBACK, 0), backlog=4096)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    accepted = 0
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "count":
                print(json.dumps({"open": len(conns), "accepted": accepted}), flush=True)
        os._exit(0)

    threading.Thread(target=commands, daemon=True).start()

    def drop(sock: socket.socket) -> None:
        fd = sock.fileno()
        sel.unregister(sock)
        conns.pop(fd, None)
        pending.pop(fd, None)
        sock.close()

    while True:
        for key, mask in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                for _ in range(256):
                    try:
                        conn, _ = server.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE and friends: leave it in the backlog
                        break
                    conn.setblocking(False)
                    nodelay(conn)
                    conn.send(GREETING)  # a fresh socket always takes one byte
                    conns[conn.fileno()] = conn
                    accepted += 1
                    sel.register(conn, selectors.EVENT_READ)
                continue
            fd = sock.fileno()
            try:
                if mask & selectors.EVENT_WRITE:
                    out = pending.pop(fd)
                    n = sock.send(out)
                    if n < len(out):
                        pending[fd] = out[n:]
                    else:
                        sel.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(65536)
                if not data:
                    drop(sock)
                    continue
                n = sock.send(data)
                if n < len(data):
                    pending[fd] = data[n:]
                    sel.modify(sock, selectors.EVENT_WRITE)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(sock)


def _hold(port: int, count: int, in_flight: int, held: list[socket.socket]) -> dict[str, Any]:
    """Open ``count`` connections to ``port``, at most ``in_flight`` not yet greeted at a
    time; each counts once the target's greeting came back through the path. Kept open."""
    sel = selectors.DefaultSelector()
    started: dict[int, float] = {}
    opened = failed = 0
    errors: dict[str, int] = {}
    first_error = ""
    begin = time.perf_counter()
    deadline = time.monotonic() + STALL_SECONDS
    waits: list[float] = []

    def fail(sock: socket.socket, why: str) -> None:
        nonlocal failed, first_error
        failed += 1
        errors[why] = errors.get(why, 0) + 1
        first_error = first_error or why
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(sock)
        sock.close()

    launched = 0
    while opened + failed < count:
        while launched < count and launched - opened - failed < in_flight:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((LOOPBACK, port))
            launched += 1
            if code not in (0, errno.EINPROGRESS):
                fail(sock, os.strerror(code))
                continue
            started[sock.fileno()] = time.perf_counter()
            sel.register(sock, selectors.EVENT_READ)
        events = sel.select(timeout=1.0)
        if events:
            deadline = time.monotonic() + STALL_SECONDS
        elif time.monotonic() > deadline:
            for key in list(sel.get_map().values()):
                fail(key.fileobj, f"no greeting within {STALL_SECONDS:g}s")  # type: ignore[arg-type]
            break
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1)
            except OSError as e:
                fail(sock, type(e).__name__)
                continue
            if data != GREETING:
                fail(sock, "closed before the greeting" if not data else f"got {data!r}")
                continue
            sel.unregister(sock)
            waits.append((time.perf_counter() - started[sock.fileno()]) * 1000.0)
            opened += 1
            held.append(sock)
    sel.close()
    seconds = time.perf_counter() - begin
    return {"opened": opened, "failed": failed, "errors": errors, "first_error": first_error,
            "seconds": seconds, "held": len(held),
            "greeting_ms": {"p50": pctl(waits, 50), "p99": pctl(waits, 99),
                            "max": max(waits)} if waits else None,
            "slow": sum(w > 900 for w in waits)}


def _echo(port: int, count: int, gap: float) -> dict[str, Any]:
    """``count`` 1-byte round trips on one connection to the greeter, ``gap`` s apart."""
    times: list[float] = []
    with connect(port) as sock:
        if recv_exact(sock, 1) != GREETING:
            raise OSError("no greeting from the echo target")
        for i in range(count):
            time.sleep(gap)
            start = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise OSError(f"echo {i + 1}: connection closed")
            times.append((time.perf_counter() - start) * 1000.0)
    return {"ms": times}


def client_worker() -> None:
    """JSON commands on stdin, one JSON answer line each: push, pull and set-up (both the
    agent bench and this one run it; ``counted`` pushes are for peers that cannot
    half-close), plus echo round trips, holding idle sessions and releasing them."""
    raise_nofile()
    payload = memoryview(os.urandom(CHUNK))
    view = memoryview(bytearray(CHUNK))
    held: list[socket.socket] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "push":
                result = push_bytes(payload, cmd["port"], cmd["bytes"],
                                    cmd.get("counted", False))
            elif op == "pull":
                result = pull_bytes(view, cmd["port"], cmd["bytes"])
            elif op == "setup":
                result = setup_sessions(cmd["port"], cmd["sessions"], cmd["gap"])
            elif op == "echo":
                result = _echo(cmd["port"], cmd["count"], cmd["gap"])
            elif op == "hold":
                result = _hold(cmd["port"], cmd["count"], cmd["in_flight"], held)
            elif op == "release":
                for sock in held:
                    sock.close()
                result = {"closed": len(held)}
                held.clear()
            else:
                result = {"error": f"unknown op {op!r}"}
        except (OSError, ValueError, struct.error) as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


def bulk_worker(port: int) -> None:
    """Push into the sink at ``port`` until a line arrives on stdin; then report."""
    payload = memoryview(os.urandom(CHUNK))
    stop = threading.Event()

    def wait_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_stop, daemon=True).start()
    sent = 0
    announced = False
    start = time.perf_counter()
    try:
        with connect(port) as sock:
            sock.sendall(MODE_SINK)
            sent = 1
            while not stop.is_set():
                sock.sendall(payload)
                sent += len(payload)
                if not announced and sent >= 32 * MiB:
                    announced = True
                    print(json.dumps({"started": time.perf_counter() - start}), flush=True)
            seconds = time.perf_counter() - start
            sock.shutdown(socket.SHUT_WR)
            reply = recv_exact(sock, 8)
        count = int.from_bytes(reply, "big") if len(reply) == 8 else -1
        print(json.dumps({"bytes": sent, "count": count, "seconds": seconds}), flush=True)
    except OSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "bytes": sent}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``--worker bulk PORT | client | greeter``: run one worker."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--worker"] or len(argv) < 2:
        print("usage: relay_workers.py --worker bulk PORT|client|greeter", file=sys.stderr)
        return 2
    if argv[1] == "bulk":
        bulk_worker(int(argv[2]))
    else:
        {"client": client_worker, "greeter": greeter_worker}[argv[1]]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
