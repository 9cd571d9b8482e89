"""CPU and memory accounting of the benchmarks, from /proc."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

from bench.sessions import CLOCK_TICKS, GiB

# CPU and memory accounting from /proc


def _stat_ticks(pid: int) -> int | None:
    """utime + stime clock ticks of ``pid`` (all its threads), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of live ``pids``, from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        ticks += _stat_ticks(pid) or 0
    return ticks / CLOCK_TICKS


def proc_cpu(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), or None when it is gone."""
    ticks = _stat_ticks(pid)
    return None if ticks is None else ticks / CLOCK_TICKS


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU time (all CPUs) from /proc/stat: busy in this VM, and stolen by
    the hypervisor (time this VM wanted to run but its vCPU was not scheduled)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLOCK_TICKS,
            "steal": steal / CLOCK_TICKS}


def machine_split() -> tuple[float, float, float]:
    """(monotonic seconds, user+nice CPU-s, system+irq+softirq CPU-s) of the whole machine,
    from /proc/stat: loopback TCP's work (softirq included) shows up as kernel time."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = v
    return (time.monotonic(), (user + nice) / CLOCK_TICKS,
            (system + irq + softirq) / CLOCK_TICKS)


def cpu_note(cpu: dict[str, float], nbytes: int) -> str:
    """A progress line's CPU seconds per GiB of each process group, if any."""
    text = " ".join(f"{g} {s / (nbytes / GiB):.2f}" for g, s in cpu.items())
    return f"   CPU s/GiB: {text}" if text else ""


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class MachineMeter:
    """The whole machine's CPU time from now on, and how much of it this benchmark's
    processes (the harness and every descendant alive now) took."""

    def __init__(self) -> None:
        self.ours = [os.getpid(), *descendants(os.getpid())]
        self.machine0, self.ours0, self.wall0 = (machine_cpu(), cpu_seconds(self.ours),
                                                 time.monotonic())

    def result(self) -> dict[str, Any]:
        machine1, wall = machine_cpu(), time.monotonic() - self.wall0
        return {
            "wall_s": wall,
            "busy_cpu_s": machine1["busy"] - self.machine0["busy"],
            "bench_processes_cpu_s": cpu_seconds(self.ours) - self.ours0,
            "steal_cpu_s": machine1["steal"] - self.machine0["steal"],
            "loadavg_at_end": loadavg(),
        }


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def proc_health(pid: int) -> dict[str, Any]:
    """RSS, peak RSS (KiB), open fds and state of ``pid``: what a leak would grow, and
    whether a stalled process is running, sleeping or stopped."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key.lower() + "_kib"] = int(value.split()[0])
                elif key == "State":
                    out["state"] = value.strip()
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out
