"""Fair share of a congested agent link (issue 15): one user with 1 stream against one
with 8, through lab_pc's link shaped to 40 MB/s, while a third user types.

The lab_pc -> cloud direction of the link is shaped (40 MB/s) with ``tc qdisc ... tbf`` on
lab_pc's ``wan0`` (this kernel has TBF), so the agent's link is the bottleneck, as
in a lab whose uplink is shared: alice downloads from the data service on
gpu_cluster with one connection, carol with eight, each through their own stock
``ssh -L``; over 10 s each user's share of what crossed the link is measured (with
equal weights, and with alice's ``share = 2``), and eve's echo round trips through
the same link meanwhile.  Bounds are loose enough
for a shared 2-core box; the figures are reported (and benchmarked in
``bench/sharing.py``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from nodes import DATA_PORT, ECHO_PORT, Site
from topology import run

Record = Callable[..., dict[str, Any]]
RATE_MBIT = 320  # 40 MB/s
WINDOW = 10.0
WARMUP = 2.0


def shape(site: Site, mbit: int) -> None:
    run(["ip", "netns", "exec", site.topo.ns("lab_pc"), "tc", "qdisc", "replace", "dev",
         "wan0", "root", "tbf", "rate", f"{mbit}mbit", "burst", "32kb", "latency", "5ms"])


def unshape(site: Site) -> None:
    run(["ip", "netns", "exec", site.topo.ns("lab_pc"), "tc", "qdisc", "del", "dev", "wan0",
         "root"], check=False)


class Puller:
    """Downloads from the data service through a local forward until told to stop,
    counting bytes."""

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


def echo_times(site: Site, port: int, until: float) -> list[float]:
    times = []
    with site.mac_socket(port) as sock:
        while time.monotonic() < until:
            started = time.monotonic()
            sock.sendall(b"x" * 64)
            got = b""
            while len(got) < 64:
                chunk = sock.recv(64 - len(got))
                assert chunk, "echo closed"
                got += chunk
            times.append(time.monotonic() - started)
            time.sleep(0.02)
    return sorted(times)


@pytest.mark.parametrize(("alice_share", "bounds"), [
    (1, (0.35, 0.65)),  # the goal: 40-60 %
    (2, (0.55, 0.78)),  # the goal: 60-73 %
], ids=["equal", "alice-share-2"])
def test_one_stream_against_eight_share_the_link_by_user(
    site: Site, record: Record, alice_share: int, bounds: tuple[float, float]
) -> None:
    site.start_gpu(data=True, echo=True)
    site.start_relay(user_settings={"alice": f"share = {alice_share}"})
    agent = site.start_agent(f"echo:{ECHO_PORT}:10.201.0.20:{ECHO_PORT}")
    site.wait_agent_ready(agent)
    a_port, c_port, e_port = 17001, 17002, 17003
    site.local_forward("alice", f"data:{DATA_PORT}", a_port)
    site.local_forward("carol", f"data:{DATA_PORT}", c_port)
    site.local_forward("eve", f"echo:{ECHO_PORT}", e_port)
    shape(site, RATE_MBIT)
    try:
        alice = [Puller(site, a_port)]
        carol = [Puller(site, c_port) for _ in range(8)]
        time.sleep(WARMUP)  # the transfers reach their steady state; nothing to await
        a0, c0 = sum(p.received for p in alice), sum(p.received for p in carol)
        started = time.monotonic()
        rtts = echo_times(site, e_port, started + WINDOW)
        took = time.monotonic() - started
        a1, c1 = sum(p.received for p in alice), sum(p.received for p in carol)
        for p in alice + carol:
            p.stop()
    finally:
        unshape(site)
    a, c = a1 - a0, c1 - c0
    share = a / (a + c)
    p99 = rtts[int(len(rtts) * 0.99) - 1] * 1000 if rtts else float("inf")
    record(f"fair share: 1 stream (share {alice_share}) vs 8 through a 40 MB/s link",
           alice_share=round(share, 3), link_mb_s=round((a + c) / took / 1e6, 1),
           echo_p99_ms=round(p99, 1), echo_samples=len(rtts))
    print(f"alice (1 stream) {share:.1%}, carol (8) {1 - share:.1%}, "
          f"{(a + c) / took / 1e6:.1f} MB/s; echo p99 {p99:.1f} ms over {len(rtts)}; "
          f"p50 {rtts[len(rtts) // 2] * 1000:.1f} p90 {rtts[int(len(rtts) * 0.9)] * 1000:.1f} "
          f"max {rtts[-1] * 1000:.1f}")
    assert (a + c) / took > 0.5 * RATE_MBIT / 8 * 1e6  # the link was the bottleneck, and full
    assert bounds[0] <= share <= bounds[1], share
    assert p99 <= 100, p99  # the goal is 20 ms; loose here, for a loaded shared box
