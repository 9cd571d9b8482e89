"""Bulk downloads and an interactive echo through a shaped agent link: the load the
fair-share e2e test (test_e2e_6_sharing.py) and the benchmark (bench/sharing.py) share.

The lab_pc -> cloud direction of the agent's link is shaped with ``tc qdisc ... tbf``
on lab_pc's ``wan0`` (this kernel has TBF, not netem), so the link is the bottleneck;
each user opens its own stock ``ssh -L`` to the data service on gpu_cluster and pulls
with as many TCP connections as it is given, counting bytes; a third user's echo round
trips measure what an interactive session waits meanwhile.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from nodes import DATA_PORT, ECHO_PORT, Site
from topology import run

FIRST_PORT = 17001


def shape(site: Site, mbit: int) -> None:
    run(["ip", "netns", "exec", site.topo.ns("lab_pc"), "tc", "qdisc", "replace", "dev",
         "wan0", "root", "tbf", "rate", f"{mbit}mbit", "burst", "32kb", "latency", "5ms"])


def unshape(site: Site) -> None:
    run(["ip", "netns", "exec", site.topo.ns("lab_pc"), "tc", "qdisc", "del", "dev", "wan0",
         "root"], check=False)


class Puller:
    """Downloads from the data service through a local forward until stopped."""

    def __init__(self, site: Site, port: int) -> None:
        self.received = 0
        self._stop = threading.Event()
        with site.topo.inside("mac"):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            size = 1 << 40
            self.sock.sendall(b"D" + (7).to_bytes(8) + size.to_bytes(8))
            while not self._stop.is_set():
                data = self.sock.recv(256 * 1024)
                if not data:
                    return
                self.received += len(data)
        except OSError:
            return

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(10)


_ECHO_LOOP = """
import json, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(30)
until = float(sys.argv[2])
times = []
while time.monotonic() < until:
    started = time.monotonic()
    sock.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        chunk = sock.recv(64 - len(got))
        if not chunk:
            raise ConnectionError("echo closed")
        got += chunk
    times.append(time.monotonic() - started)
    time.sleep(0.02)  # a typist's pace, not a wait for anything
json.dump(times, sys.stdout)
"""


def echo_times(site: Site, port: int, until: float) -> list[float]:
    """Round trips of 64 bytes every 20 ms until ``until`` (a ``time.monotonic()``); sorted,
    in seconds.  Timed in a process of its own, as a user's terminal is: in this process
    the pullers' threads hold the GIL, and each of the probe's steps could wait up to
    Python's 5 ms switch interval for it, which has nothing to do with the relay."""
    with site.mac_socket(port) as sock:
        out = subprocess.run([sys.executable, "-c", _ECHO_LOOP, str(sock.fileno()), repr(until)],
                             pass_fds=(sock.fileno(),), capture_output=True, text=True,
                             timeout=max(30.0, until - time.monotonic() + 30), check=True)
    return sorted(json.loads(out.stdout))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, int(len(sorted_values) * q) - 1))]


@dataclass
class Measured:
    """Bytes per user over the window, its length, and the echo round trips."""

    bytes: dict[str, int]
    seconds: float
    rtts: list[float] = field(default_factory=list)

    def share(self, user: str) -> float:
        total = sum(self.bytes.values())
        return self.bytes[user] / total if total else 0.0

    @property
    def link_mb_s(self) -> float:
        return sum(self.bytes.values()) / self.seconds / 1e6


def start_site(site: Site, shares: dict[str, float] | None = None,
               services: dict[str, list[str]] | None = None) -> None:
    """gpu_cluster's data and echo services, the relay (with ``shares``, and
    ``services`` replacing some users' grants) and the agent."""
    site.start_gpu(data=True, echo=True)
    settings = {u: f"share = {w:g}" for u, w in (shares or {}).items()}
    site.start_relay(user_settings=settings, user_services=services)
    agent = site.start_agent(f"echo:{ECHO_PORT}:10.201.0.20:{ECHO_PORT}")
    site.wait_agent_ready(agent)


def measure(site: Site, streams: dict[str, int], *, mbit: int, seconds: float,
            warmup: float = 2.0, echo_user: str | None = None) -> Measured:
    """Each user of ``streams`` pulls with that many connections through its own
    ``ssh -L``; bytes counted over ``seconds`` after ``warmup``."""
    ports = {}
    for i, user in enumerate(streams):
        ports[user] = FIRST_PORT + i
        site.local_forward(user, f"data:{DATA_PORT}", ports[user])
    echo_port = FIRST_PORT + len(streams)
    if echo_user is not None:
        site.local_forward(echo_user, f"echo:{ECHO_PORT}", echo_port)
    shape(site, mbit)
    pullers: dict[str, list[Puller]] = {}
    try:
        for user, n in streams.items():
            pullers[user] = [Puller(site, ports[user]) for _ in range(n)]
        time.sleep(warmup)  # the transfers reach their steady state; nothing to await
        before = {u: sum(p.received for p in ps) for u, ps in pullers.items()}
        started = time.monotonic()
        if echo_user is not None:
            rtts = echo_times(site, echo_port, started + seconds)
        else:
            rtts = []
            time.sleep(seconds)  # the measurement window itself
        took = time.monotonic() - started
        after = {u: sum(p.received for p in ps) for u, ps in pullers.items()}
    finally:
        for ps in pullers.values():
            for p in ps:
                p.stop()
        unshape(site)
    return Measured({u: after[u] - before[u] for u in streams}, took, rtts)
