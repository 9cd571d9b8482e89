"""Keystroke round trips beside bulk: on the pooled ``ssh -J`` route and on the fast path.

The relay's native thread of a pooled session (``csrc/gpump.c``) is SCHED_BATCH while its
session moves bulk, which spares wake-ups but could cost a keystroke its promptness; this
measures that.  Over the stock-paths bench's processes (:class:`bench.stock_paths.
StockBench`: relay, agent, target sshd, on loopback), 1-byte echo round trips (``cat``
on the target), one every 10 ms, through:

* ``alone``: a pooled ``ssh -J relay gpu-cluster cat`` with nothing else running;
* ``beside_bulk``: the same while a second pooled session pushes from ``/dev/zero``
  (each session has its own thread: the bulk one turns SCHED_BATCH, the echo one not);
* ``same_channel``: a session multiplexed (``ControlMaster``) over the same inner ssh
  connection as the bulk one, hence the same pooled channel and the same thread.

And on the fast path (``ssh`` with ``ProxyCommand labrelay connect``, spliced), where one
thread in the relay and one in the agent (``lr-pump``) carry every session's bytes and
turn SCHED_BATCH while they move bulk (round 10), the question is whether one user's bulk
delays the others' keystrokes:

* ``fast_alone``: an echo session on the fast path with nothing else running;
* ``fast_beside_bulk``: the same while another fast-path session pushes from
  ``/dev/zero`` through the same two pumps;
* ``fast_beside_4_bulk``: the same beside four such sessions;
* ``direct_alone`` and ``direct_beside_4_bulk``: for reference, the same with ``ssh``
  straight to the target sshd, no relay: what four bulk sessions cost a keystroke on
  this machine's CPUs by themselves.

Prints, as JSON, p50/p90/p99/max in ms per case, and the scheduling policies of the
relay's ``lr-gpump`` threads (pooled cases) and of the relay's and the agent's
``lr-pump`` threads (fast-path cases) while the bulk ran (0 SCHED_OTHER, 3 SCHED_BATCH).
Writes no results file.  Compare two trees alternately, each from its own root (copy this file
into a tree that lacks it: it runs that tree's relay and agent)::

    for i in 1 2 3; do for t in /tmp/base .; do
        (cd $t && .venv/bin/python -m bench.jecho --echoes 400); done; done
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stock_paths as sp
from bench.cli import quick_defaults
from bench.procs import BenchError, find_program
from bench.report import pctl

GAP = 0.010  # between keystrokes
RAMP = 1.0  # seconds of bulk before the echoes: the bulk session armed and at speed


def round_trips(p: subprocess.Popen[bytes], n: int) -> list[float]:
    """``n`` 1-byte echoes through ``p`` (an ssh running ``cat``), in ms."""
    assert p.stdin is not None and p.stdout is not None
    fd_in, fd_out = p.stdin.fileno(), p.stdout.fileno()
    ms = []
    for _ in range(n):
        time.sleep(GAP)  # the typist's pace, not a wait for anything
        t0 = time.perf_counter()
        os.write(fd_in, b"k")
        if os.read(fd_out, 1) != b"k":
            raise BenchError("the echo session ended")
        ms.append((time.perf_counter() - t0) * 1000)
    return ms


def summary(ms: list[float]) -> dict[str, float]:
    return {f"p{q}": round(pctl(ms, q), 3) for q in (50, 90, 99)} | {"max": round(max(ms), 3)}


def gpump_policies(pid: int, name: str = "lr-gpump") -> list[int]:
    """The scheduling policies of process ``pid``'s threads called ``name`` now."""
    policies = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == name:
                policies.append(os.sched_getscheduler(int(tid)))
        except OSError:  # it ended meanwhile
            continue
    return sorted(policies)


class Echoes:
    """The sessions of one measurement, all stopped by :meth:`stop`."""

    def __init__(self, bench: sp.StockBench, control: Path) -> None:
        self.bench = bench
        self.ssh = [find_program("ssh"), "-F", str(bench.ssh_config), "-o",
                    f"ControlPath={control}", "-o", "ControlMaster=no"]
        self.control = control
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], stdin: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([*self.ssh, *argv], stdin=stdin, stdout=subprocess.PIPE
                             if stdin == subprocess.PIPE else subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, bufsize=0)
        self.procs.append(p)
        return p

    def echo(self, via_master: bool) -> subprocess.Popen[bytes]:
        """An echo session, up (one round trip done)."""
        p = self.start(["gpu-cluster", "cat"] if via_master else
                       ["-J", "relay", "-S", "none", "gpu-cluster", "cat"])
        round_trips(p, 50)  # set up, armed, warm
        return p

    def bulk(self, via_master: bool) -> subprocess.Popen[bytes]:
        with open("/dev/zero", "rb") as zero:
            p = self.start(["gpu-cluster", "cat >/dev/null"] if via_master else
                           ["-J", "relay", "-S", "none", "gpu-cluster", "cat >/dev/null"],
                           stdin=zero)
        time.sleep(RAMP)  # bulk at speed before the echoes, not a wait for an event
        return p

    def fast(self, command: str, stdin: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        """A fast-path session (``ProxyCommand labrelay connect``) running ``command``."""
        proxy = " ".join(self.bench.connect_argv("%h:%p"))
        return self.start(["-o", f"ProxyCommand={proxy}", "gpu-cluster", command], stdin)

    def direct(self, command: str, stdin: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        """A session straight to the target sshd running ``command``."""
        return self.start(["-p", str(self.bench.sshd_port), sp.LOOPBACK, command], stdin)

    def fast_echo(self, direct: bool = False) -> subprocess.Popen[bytes]:
        p = self.direct("cat") if direct else self.fast("cat")
        round_trips(p, 50)  # set up, spliced, warm
        return p

    def fast_bulk(self, n: int, direct: bool = False) -> None:
        with open("/dev/zero", "rb") as zero:
            for _ in range(n):
                (self.direct if direct else self.fast)("cat >/dev/null", stdin=zero)
        time.sleep(RAMP)  # bulk at speed before the echoes, not a wait for an event

    def master(self) -> None:
        """The inner connection that ``same_channel``'s two sessions share."""
        self.procs.append(subprocess.Popen(
            [*self.ssh[:-2], "-o", "ControlMaster=yes", "-N", "-J", "relay", "gpu-cluster"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not self.control.exists():  # no event says the master is listening
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise BenchError("the ControlMaster did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.kill()
            p.wait()
        self.procs.clear()


def measure(bench: sp.StockBench, workdir: Path, n: int) -> dict[str, Any]:
    assert bench.relay is not None
    res: dict[str, Any] = {"policies_during_bulk": {}}
    sessions = Echoes(bench, workdir / "cm")
    try:
        e = sessions.echo(via_master=False)
        res["alone"] = summary(round_trips(e, n))
        sessions.bulk(via_master=False)
        res["beside_bulk"] = summary(round_trips(e, n))
        res["policies_during_bulk"]["beside_bulk"] = gpump_policies(bench.relay.pid)
        sessions.stop()
        sessions.master()
        e = sessions.echo(via_master=True)
        sessions.bulk(via_master=True)
        res["same_channel"] = summary(round_trips(e, n))
        res["policies_during_bulk"]["same_channel"] = gpump_policies(bench.relay.pid)
        sessions.stop()
        assert bench.agent is not None
        e = sessions.fast_echo()
        res["fast_alone"] = summary(round_trips(e, n))
        for case, bulk in (("fast_beside_bulk", 1), ("fast_beside_4_bulk", 3)):
            sessions.fast_bulk(bulk)  # 1, then 3 more: 4
            res[case] = summary(round_trips(e, n))
            res["policies_during_bulk"][case] = {
                "relay": gpump_policies(bench.relay.pid, "lr-pump"),
                "agent": gpump_policies(bench.agent.pid, "lr-pump")}
        sessions.stop()
        e = sessions.fast_echo(direct=True)
        res["direct_alone"] = summary(round_trips(e, n))
        sessions.fast_bulk(4, direct=True)
        res["direct_beside_4_bulk"] = summary(round_trips(e, n))
    finally:
        sessions.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.jecho", description=__doc__.split("\n")[0])
    p.add_argument("--echoes", type=int, default=400, help="round trips per case (default 400)")
    args = p.parse_args(argv)
    bargs = quick_defaults(sp.build_parser().parse_args(["--quick"]))
    bargs.sessions, bargs.gap_sessions = 5, 2
    with tempfile.TemporaryDirectory(prefix="labrelay-jecho-") as tmp:
        bench = sp.StockBench(bargs, Path(tmp))
        try:
            bench.setup()
            res = measure(bench, Path(tmp), args.echoes)
        finally:
            bench.cleanup()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
