"""The fast-path benches' helpers that run beside the harness: the workers (this file
re-run as ``python bench/fast_workers.py --worker KIND``: a feeder, the raw client, the
sink, and the rusage wrapper that ssh's ProxyCommand and the raw variants run under),
and the harness's per-trial bookkeeping (:class:`Wrapped`, :class:`Accounting`) and
process helpers. Used by ``bench.fast_path`` and ``bench.stock_paths``."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the ProxyCommand wrapper): make bench importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.meter import cpu_seconds, machine_split, proc_cpu
from bench.sessions import (
    CHUNK,
    LOOPBACK,
    REPO,
    START_TIMEOUT,
    connect_retry,
    exit_when_parent_goes,
)

THIS = str(Path(__file__).resolve())


# ---------------------------------------------------------------------------
# workers: this file re-run with --worker KIND


def feed_worker(nbytes: int) -> None:
    """Wait for one line on stdin, then write ``nbytes`` (random, 1 MiB at a time) to stdout."""
    block = memoryview(os.urandom(CHUNK))
    if not sys.stdin.buffer.readline():
        return  # the harness went away or gave up on this trial
    left = nbytes
    try:
        while left:
            left -= os.write(1, block[:min(left, len(block))])
    except BrokenPipeError:
        print(f"feed: the reader closed with {left} bytes left", file=sys.stderr)
        os._exit(1)
    os.close(1)


def source_worker(port: int, nbytes: int) -> None:
    """The raw client: bench.plain_hop's source worker (TCP_NODELAY, one 1 MiB random block,
    ``sendall`` of memoryview slices, then close), connecting first (retried while a listener
    starts) and sending only after a line on stdin, so that the stream starts on "go"."""
    sock = connect_retry(port, START_TIMEOUT)
    block = memoryview(os.urandom(CHUNK))
    if not sys.stdin.buffer.readline():
        return  # the harness went away or gave up on this trial
    sent = 0
    while sent < nbytes:
        n = min(len(block), nbytes - sent)
        sock.sendall(block[:n])
        sent += n
    sock.close()


def sink_worker() -> None:
    """Count what arrives on each connection: ``accepted`` at accept, ``done`` with the byte
    count and first byte -> EOF seconds at EOF, as JSON lines; exits when stdin closes."""
    server = socket.create_server((LOOPBACK, 0), backlog=64)
    lock = threading.Lock()

    def say(obj: dict[str, Any]) -> None:
        with lock:
            print(json.dumps(obj), flush=True)

    def serve(conn: socket.socket, n: int) -> None:
        view = memoryview(bytearray(CHUNK))
        with conn:
            say({"event": "accepted", "conn": n})
            accepted = time.perf_counter()
            total = first_n = 0
            try:
                first_n = conn.recv_into(view)
                first = time.perf_counter()
                total = first_n
                while first_n and (k := conn.recv_into(view)):
                    total += k
            except OSError as e:
                say({"event": "error", "conn": n, "error": str(e), "bytes": total})
                return
            end = time.perf_counter()
            say({"event": "done", "conn": n, "bytes": total,
                 "seconds": end - first if first_n else 0.0, "since_accept": end - accepted})

    say({"port": server.getsockname()[1]})
    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    n = 0
    while True:
        conn, _ = server.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n), daemon=True).start()


def rusage_worker(out: str, argv: list[str]) -> int:
    """Run ``argv`` (sharing our stdin/stdout/stderr) and write its pid, then its exit status
    and exact lifetime CPU seconds (``wait4``: every thread), as JSON lines to ``out``."""
    # ssh sends its ProxyCommand SIGHUP when it exits: we must still report. A handler,
    # not SIG_IGN, so that the child starts with the default disposition.
    signal.signal(signal.SIGHUP, lambda *_: None)
    pid = os.posix_spawn(argv[0], argv, dict(os.environ))
    with open(out, "a") as f:
        f.write(json.dumps({"pid": pid}) + "\n")
    _, status, ru = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(out, "a") as f:
        f.write(json.dumps({"exit": code, "cpu_s": ru.ru_utime + ru.ru_stime,
                            "utime": ru.ru_utime, "stime": ru.ru_stime,
                            "maxrss_kib": ru.ru_maxrss}) + "\n")
    return code if code >= 0 else 128 - code



# ---------------------------------------------------------------------------
# the harness's side


class Wrapped:
    """A process started under ``--worker rusage``: its pid and, once it ended, its rusage."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _lines(self) -> list[dict[str, Any]]:
        with contextlib.suppress(OSError, ValueError):
            return [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return []

    def wait(self, key: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            for entry in self._lines():
                if key in entry:
                    return entry
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)


class Accounting:
    """CPU seconds of one trial's relaying processes in three phases: set-up (session
    started -> stream starts), the stream, and teardown (stream ended -> the per-session
    process exited). Long-lived processes (``groups``) are read from /proc/PID/stat; the
    per-session one (``own``: labrelay connect, socat) from /proc while it lives and, for
    its whole life, from ``wait4`` (``finish``'s ``own_total``)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.own_name = ""
        self.own_pid = 0
        self.spawn = self._sample()
        self.start: dict[str, float | None] = {}
        self.end: dict[str, float | None] = {}
        self.machine0 = self.machine1 = (0.0, 0.0, 0.0)

    def own(self, name: str, pid: int) -> None:
        self.own_name, self.own_pid = name, pid

    def _sample(self) -> dict[str, float | None]:
        found: dict[str, float | None] = {g: cpu_seconds(p) for g, p in self.groups.items()}
        if self.own_pid:
            found[self.own_name] = proc_cpu(self.own_pid)
        return found

    def stream_start(self) -> None:
        self.start = self._sample()
        self.machine0 = machine_split()

    def stream_end(self) -> None:
        self.machine1 = machine_split()
        self.end = self._sample()

    def machine(self) -> dict[str, float]:
        """The whole machine during the stream: CPUs busy, and of them in the kernel."""
        (t0, u0, k0), (t1, u1, k1) = self.machine0, self.machine1
        wall = t1 - t0
        if wall <= 0:
            return {}
        busy = u1 - u0 + k1 - k0
        return {"busy_cores": busy / wall, "kernel_cores": (k1 - k0) / wall, "busy_cpu_s": busy}

    def finish(self, own_total: float | None) -> dict[str, Any]:
        after = self._sample()
        cpu: dict[str, float] = {}
        setup: dict[str, float] = {}
        teardown: dict[str, float] = {}
        for g in self.groups:
            s0, s1, s2, s3 = self.spawn[g], self.start[g], self.end[g], after[g]
            assert s0 is not None and s1 is not None and s2 is not None and s3 is not None
            setup[g], cpu[g], teardown[g] = s1 - s0, s2 - s1, s3 - s2
        gone_early = False
        if self.own_pid and own_total is not None:
            g = self.own_name
            at_start, at_end = self.start.get(g), self.end.get(g)
            setup[g] = at_start or 0.0
            if at_end is None:  # it had already exited: its teardown counts as stream
                gone_early = True
                cpu[g], teardown[g] = own_total - (at_start or 0.0), 0.0
            else:
                cpu[g], teardown[g] = at_end - (at_start or 0.0), own_total - at_end
        return {"cpu": cpu, "setup_cpu": setup, "teardown_cpu": teardown,
                "own_exited_before_stream_end": gone_early, "machine": self.machine()}


def tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (/proc/net/tcp, state 0A)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f, None)
        return any(len(parts) > 3 and parts[1] == want and parts[3] == "0A"
                   for parts in (line.split() for line in f))


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` to exit, woken by its pidfd the moment it does (``Popen.wait``
    with a timeout polls with sleeps of up to 50 ms); False on timeout."""
    fd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        return False
    proc.wait()
    return True


def avo_env() -> dict[str, str]:
    """The environment of ssh (and so of its ProxyCommand) and of the wrapped processes:
    ours, with the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def main(argv: list[str] | None = None) -> int:
    """``--worker KIND ARGS...``: run one worker (the harness starts them so)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--worker"] or len(argv) < 2:
        print("usage: fast_workers.py --worker feed|sink|source|rusage ARGS...", file=sys.stderr)
        return 2
    kind = argv[1]
    if kind == "feed":
        feed_worker(int(argv[2]))
    elif kind == "sink":
        sink_worker()
    elif kind == "source":
        source_worker(int(argv[2]), int(argv[3]))
    elif kind == "rusage":
        rest = argv[3:]
        return rusage_worker(argv[2], rest[1:] if rest[:1] == ["--"] else rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
