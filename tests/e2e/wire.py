"""A userspace impairment wire: what ``tc qdisc ... netem`` does, for kernels without it.

This machine's kernel is built without ``CONFIG_NET_SCH_NETEM``, so the router
namespace of the e2e topology steers lab_pc<->cloud packets through two TUN devices
(``--lab`` gets what lab_pc sends towards cloud, ``--cloud`` what cloud sends towards
lab_pc) and this process carries each packet from one to the other, applying per
direction, with netem's meaning:

``delay_ms`` ± ``jitter_ms``
    each packet waits delay + uniform(−jitter, +jitter); packets leave in order of
    their send time, so jitter reorders them, as netem's tfifo does;
``loss``
    each packet is dropped with this probability (independently, no correlation);
``duplicate``
    each packet is sent twice with this probability;
``reorder``
    (with a delay) this fraction of packets is sent at once, ahead of the queue; the
    rest wait ``delay_ms``: netem's ``delay D reorder P``;
``limit``
    at most this many packets wait per direction; more are dropped (netem's limit).

Pure Python, no dependencies: ``/dev/net/tun`` with ``TUNSETIFF``
(``IFF_TUN | IFF_NO_PI``), non-blocking reads, one ``select`` loop and a heap of
(send time, packet). The TUN devices exist only while the process runs.

Control on stdin, one JSON object per line; each is answered on stdout with
``{"stats": {...}}``: ``{"set": {"delay_ms": 200, "jitter_ms": 50, ...}}`` changes the
impairment (missing keys become 0), ``{"stats": true}`` only reports. The first line
printed is ``{"ready": true}`` once both devices are up.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
BATCH = 256  # packets read from one device per wakeup, at most

KNOBS = ("delay_ms", "jitter_ms", "loss", "reorder", "duplicate", "limit")


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "link", "set", "dev", name, "up", "mtu", "1500", "txqueuelen", "10000"],
                   check=True)
    return fd


class Direction:
    def __init__(self, name: str, src: int, dst: int, rng: random.Random) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.rng = rng
        self.delay = self.jitter = self.loss = self.reorder = self.duplicate = 0.0
        self.limit = 10000
        self.queue: list[tuple[float, int, bytes]] = []
        self.seq = 0
        self.counters = dict.fromkeys(
            ("received", "sent", "bytes", "lost", "duplicated", "reordered", "overflow",
             "write_errors"), 0)

    def configure(self, settings: dict[str, Any]) -> None:
        self.delay = float(settings.get("delay_ms", 0)) / 1000
        self.jitter = float(settings.get("jitter_ms", 0)) / 1000
        self.loss = float(settings.get("loss", 0))
        self.reorder = float(settings.get("reorder", 0))
        self.duplicate = float(settings.get("duplicate", 0))
        self.limit = int(settings.get("limit", 10000))

    @property
    def clean(self) -> bool:
        return not (self.delay or self.jitter or self.loss or self.reorder or self.duplicate)

    def _write(self, packet: bytes) -> None:
        try:
            os.write(self.dst, packet)
        except OSError:
            self.counters["write_errors"] += 1
            return
        self.counters["sent"] += 1
        self.counters["bytes"] += len(packet)

    def packet(self, packet: bytes, now: float) -> None:
        c = self.counters
        c["received"] += 1
        if self.clean and not self.queue:
            self._write(packet)
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            c["lost"] += 1
            return
        copies = 1
        if self.duplicate and rng.random() < self.duplicate:
            copies = 2
            c["duplicated"] += 1
        for _ in range(copies):
            if len(self.queue) >= self.limit:
                c["overflow"] += 1
                continue
            if self.reorder and self.delay and rng.random() < self.reorder:
                wait = 0.0  # ahead of everything queued, as netem's reorder does
                c["reordered"] += 1
            else:
                wait = self.delay
                if self.jitter:
                    wait = max(0.0, wait + rng.uniform(-self.jitter, self.jitter))
            self.seq += 1
            heapq.heappush(self.queue, (now + wait, self.seq, packet))

    def flush(self, now: float) -> float | None:
        """Send what is due; return when the next packet is due (None: nothing queued)."""
        q = self.queue
        while q and q[0][0] <= now:
            self._write(heapq.heappop(q)[2])
        return q[0][0] if q else None

    def read(self, now: float) -> None:
        for _ in range(BATCH):
            try:
                packet = os.read(self.src, 65535)
            except BlockingIOError:
                return
            self.packet(packet, now)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "queued": len(self.queue)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", required=True, help="TUN device facing lab_pc")
    parser.add_argument("--cloud", required=True, help="TUN device facing cloud")
    parser.add_argument("--seed", type=int, default=5)
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    lab = open_tun(opts.lab)
    cloud = open_tun(opts.cloud)
    rng = random.Random(opts.seed)
    up = Direction("to_cloud", lab, cloud, rng)  # read from wl, write into wc
    down = Direction("to_lab", cloud, lab, rng)
    by_fd = {lab: up, cloud: down}
    settings: dict[str, Any] = {}
    os.set_blocking(sys.stdin.fileno(), True)
    stdin = sys.stdin.buffer

    def report() -> None:
        line = {"stats": {"settings": settings, up.name: up.stats(), down.name: down.stats()}}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    fds = [lab, cloud, stdin.fileno()]
    next_due: float | None = None
    while True:
        timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            if fd in by_fd:
                by_fd[fd].read(now)
                continue
            line = stdin.readline()
            if not line:
                return  # the test process went away
            cmd = json.loads(line)
            if "set" in cmd:
                settings = {k: cmd["set"].get(k, 0) for k in KNOBS}
                settings["limit"] = settings["limit"] or 10000
                for d in (up, down):
                    d.configure(settings)
            report()
        dues = [t for t in (up.flush(now), down.flush(now)) if t is not None]
        next_due = min(dues) if dues else None


if __name__ == "__main__":
    main()
