"""Statistics, report pieces and result files of the benchmarks."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.history import HISTORY, write_latest
from bench.procs import find_program, run_text
from bench.runs import Run
from bench.sessions import REPO


def pctl(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def per_run_latency(samples: Sequence[Sequence[float]]) -> dict[str, Any]:
    """p50, p99 and max of each run's samples (ms), as spreads over the runs."""
    return {"p50_ms": spread([pctl(s, 50) for s in samples]),
            "p99_ms": spread([pctl(s, 99) for s in samples]),
            "max_ms": spread([max(s) for s in samples])}


def pooled_latency(pooled: Sequence[float]) -> dict[str, Any]:
    """Percentiles, max, mean and the count over 20 ms of every run's samples together."""
    return {"p50_ms": pctl(pooled, 50), "p90_ms": pctl(pooled, 90), "p99_ms": pctl(pooled, 99),
            "max_ms": max(pooled), "mean_ms": statistics.fmean(pooled),
            "over_20ms": sum(x > 20 for x in pooled)}


# ---------------------------------------------------------------------------
# results and reports


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine_conditions(python: str, loadavg_at_start: str) -> dict[str, Any]:
    """The machine and the versions of what runs: the head of every report's conditions."""
    versions = run_text([python, "-c",
                         "import twisted, cryptography, relay; print(twisted.__version__, "
                         "cryptography.__version__, relay.__version__)"], cwd=REPO).split()
    versions += ["?"] * (3 - len(versions))
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "loadavg_at_start": loadavg_at_start,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": versions[0],
        "cryptography": versions[1],
        "labrelay": versions[2],
        "openssh": run_text([find_program("ssh"), "-V"]),
        "tcp_congestion_control": tcp_congestion_control(),
    }


def tcp_congestion_control() -> str:
    """The host's default TCP congestion control (every socket of a loopback suite
    uses it): a condition of the latency figures, which a host may set to bbr."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "?"



def result_head(benchmark: str, bench: Run) -> dict[str, Any]:
    """The first keys of a result: which benchmark, when, and the code it ran."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": bench.commit,
        "relay_uncommitted_at_start": bench.relay_changes,
    }


def fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    """A spread as ``median (min–max)``."""
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "n/a"


def goal_value(g: dict[str, Any]) -> str:
    value = g["value"]
    if value is None:
        return "n/a"
    return f"{value:.2f} {g.get('unit') or ''}".strip()


def uncommitted(res: dict[str, Any], when: str) -> tuple[str, list[str]]:
    """The title's note on uncommitted changes in relay/, and the lines that list them."""
    changes = res.get("relay_uncommitted_at_start") or []
    if not changes:
        return "", []
    return (" plus uncommitted changes in relay/",
            [f"Uncommitted in relay/ when {when}: {', '.join(changes)}.", ""])


def conditions_text(c: dict[str, Any]) -> str:
    """The machine and versions sentence of a report, from ``machine_conditions``."""
    return (f"{c['cpu_model']}, {c['nproc']} CPUs (load {c['loadavg_at_start']} at start), "
            f"Linux {c['kernel']}, Python {c['python']}, Twisted {c['twisted']}, "
            f"cryptography {c['cryptography']}, labrelay {c['labrelay']}, {c['openssh']}, "
            f"TCP congestion control {c.get('tcp_congestion_control', '?')}. ")


def goals_table(goals: list[dict[str, Any]]) -> list[str]:
    return ["", "## Goals", "", "| goal | value | status |", "|---|---|---|",
            *[f"| {g['goal']} | {goal_value(g)} | **{g['status']}** |" for g in goals]]


def machine_text(m: dict[str, Any], nproc: int | None, processes: str) -> str:
    """The machine's CPU during the measurements (``MachineMeter.result``); ``processes``
    says which are this benchmark's and what the rest is."""
    return (f"Machine during the measurements ({m['wall_s']:.0f} s): CPUs busy "
            f"{m['busy_cpu_s']:.0f} of {m['wall_s'] * (nproc or 1):.0f} CPU-seconds, "
            f"{m['bench_processes_cpu_s']:.0f} of them in this benchmark's {processes}; "
            f"hypervisor steal {m['steal_cpu_s']:.1f} s; load average at end "
            f"{m['loadavg_at_end']}.")


def anomaly_lines(anomalies: list[str], none: str) -> list[str]:
    """The report's list of anomalies, or ``none`` (what a clean run means)."""
    if anomalies:
        return ["Anomalies:", "", *["    " + a.replace("\n", "\n    ") for a in anomalies], ""]
    return [none, ""]


def print_goals(res: dict[str, Any]) -> None:
    print()
    for g in res["goals"]:
        print(f"  {g['status']:4}  {g['goal']}: {goal_value(g)}")
    print_anomalies(res)


def print_anomalies(res: dict[str, Any]) -> None:
    for a in res["anomalies"]:
        print(f"  !! {a}")


def write_results(directory: Path, res: dict[str, Any], markdown: str) -> None:
    """Overwrite ``BENCHMARK-latest.json`` and ``BENCHMARK-latest.md`` in ``directory`` and
    append the run's line to ``history.jsonl`` (``bench.history``)."""
    js = write_latest(directory, res["benchmark"], res, markdown)
    print(f"wrote {js}, {js.with_suffix('.md')} and a line in {js.parent / HISTORY}",
          flush=True)
