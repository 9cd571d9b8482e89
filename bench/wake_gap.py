"""What an idle gap costs a wake-up on this machine, without labrelay (issue 13 item 5).

A new session after 50 ms idle crosses five processes (client, ``ssh -L``, relay, agent,
target) and the relay and agent several times.  The working theory for the gap penalty
(2.4 ms after a gap against 1.5 ms back to back) was that each wake-up of an idle
process costs far more after a gap (the vCPU's halt and IPI, cold caches), more so with
Python's larger working set.  This measures it bare: one-byte round trips over loopback
TCP from one process to ``hops`` echo processes in turn, back to back and after a sleep,
with echo processes in C (``bench/wake_gap.c``, built with ``cc`` if there is one) and
in Python (an epoll loop, recv, send)::

    python bench/wake_gap.py --rounds 200 --gaps 0,50 --hops 1,4

Results and what they say: docs/benchmarks.md, "Set-up after an idle gap", round 6.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def python_round_trips(n: int, gap_ms: float, hops: int) -> list[float]:
    """Microseconds of each round (one byte to each echo process and back, in turn)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    kids = []
    for _ in range(hops):
        pid = os.fork()
        if pid == 0:
            c, _addr = ls.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ep = select.epoll()
            ep.register(c.fileno(), select.EPOLLIN)
            while True:
                ep.poll()
                b = c.recv(4096)
                if not b:
                    os._exit(0)
                c.send(b)
        kids.append(pid)
    socks = [socket.create_connection(ls.getsockname()) for _ in range(hops)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    took = []
    for _ in range(n):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        t = time.perf_counter()
        for s in socks:
            s.send(b"x")
            s.recv(1)
        took.append((time.perf_counter() - t) * 1e6)
    for s in socks:
        s.close()
    for pid in kids:
        os.waitpid(pid, 0)
    ls.close()
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--gaps", default="0,50", help="ms of sleep before each round")
    p.add_argument("--hops", default="1,4", help="echo processes per round")
    args = p.parse_args()
    cc = shutil.which("cc")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "wake_gap"
        if cc is not None:
            subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).with_suffix(".c"))],
                           check=True)
        for gap in (float(g) for g in args.gaps.split(",")):
            for hops in (int(h) for h in args.hops.split(",")):
                if cc is not None:
                    out = subprocess.run([str(exe), str(args.rounds), str(gap), str(hops)],
                                         check=True, capture_output=True, text=True)
                    print(out.stdout.strip(), flush=True)
                took = sorted(python_round_trips(args.rounds, gap, hops))
                print(f"Python hops={hops} gap={gap:g}ms: p50 {took[len(took) // 2]:.1f} us, "
                      f"p90 {took[len(took) * 9 // 10]:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
