"""The plain-hop bench's results and their report (``bench.plain_hop`` measures, this
writes): the samples of each path and workload, and the markdown table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.sessions import MiB

GOAL_RATIO = 0.55  # of direct, from the issue
GOAL_CPU = 0.3  # CPU-s/GiB

LABELS = {
    "direct": "direct loopback (no relay)",
    "socat": "socat -b 131072",
    "c": "labrelay, C pump thread (LABRELAY_DATAPATH=c)",
    "python": "labrelay, Python backend (os.splice from the reactor)",
    "c-64k": "C pump thread, 64 KiB pipes",
    "c-256k": "C pump thread, 256 KiB pipes",
    "c-copy": "C pump thread, read/write instead of splice",
    "c-noshort": "C pump thread, read until EAGAIN (no short-read waits)",
    "c-reactor": "lr_move once per wakeup from the Twisted loop",
    "python-copy": "Python backend, os.read/os.write",
    "twisted": "pure Twisted relay (relay.datapath.bridge, producers both ways)",
}

@dataclass
class Sample:
    mbps: float
    cpu_per_gib: float | None
    wakeups_per_gib: float | None = None
    syscalls_per_gib: float | None = None


@dataclass
class Series:
    path: str
    workload: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return statistics.median(values) if values else None

    def spread(self) -> tuple[float, float]:
        rates = [s.mbps for s in self.samples]
        return min(rates), max(rates)

    def ratio(self, direct: Series | None) -> float | None:
        """Median over runs of this path's rate / direct's rate in the same run: the
        paths of a run are measured back to back, so load that drifts over the whole
        bench cancels out."""
        if direct is None or not direct.samples:
            return None
        return statistics.median(s.mbps / d.mbps for s, d in zip(self.samples, direct.samples,
                                                                   strict=False))


def fmt_or_dash(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render(series: list[Series], meta: dict[str, Any]) -> str:
    lines = [
        "# One plain TCP hop: labrelay's data path vs socat vs direct",
        "",
        f"`python -m bench.plain_hop {' '.join(meta['argv'])}` — {meta['date']}, commit "
        f"{meta['commit']}, {meta['cpus']} CPUs ({meta['cpu_model']}), Linux {meta['kernel']}, "
        f"Python {meta['python']}.",
        f"{meta['size'] // MiB} MiB per transfer, median of {meta['runs']} runs, paths "
        "interleaved within each run. Source, relay and sink are separate processes sharing "
        "the CPUs. MB/s = 10^6 bytes/s at the sink; CPU-s/GiB of the relaying process only "
        "(all its threads); × direct is the median of per-run ratios. Load average "
        f"{meta['loadavg'][0]} before, {meta['loadavg'][1]} after (other work on the box "
        "makes MB/s noisy; CPU-s/GiB much less so).",
        "",
    ]
    for workload, title in (("bulk", "Bulk: the source writes 1 MiB at a time, as fast as "
                             "it can"),
                            ("paced", "Paced: 32 KiB bursts at ~400 MB/s (an ssh session's "
                             "wakeup pattern)"),
                            ("small", "Small writes: 2 KiB bursts, paced (interactive-like; "
                             "1/16 of the size)")):
        rows = [s for s in series if s.workload == workload]
        if not rows:
            continue
        direct = next((s for s in rows if s.path == "direct"), None)
        lines += [f"## {title}", "",
                  "| path | MB/s | (min–max) | × direct | relay CPU-s/GiB | pump wakeups/GiB | "
                  "pump syscalls/GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for s in rows:
            low, high = s.spread()
            lines.append(
                f"| {LABELS[s.path]} | {fmt_or_dash(s.median('mbps'), '.0f')} | "
                f"{low:.0f}–{high:.0f} | {fmt_or_dash(s.ratio(direct), '.2f')} | "
                f"{fmt_or_dash(s.median('cpu_per_gib'), '.3f')} | "
                f"{fmt_or_dash(s.median('wakeups_per_gib'), ',.0f')} | "
                f"{fmt_or_dash(s.median('syscalls_per_gib'), ',.0f')} |")
        lines.append("")
    bulk = {s.path: s for s in series if s.workload == "bulk"}
    if "direct" in bulk and "c" in bulk:
        ratio = bulk["c"].ratio(bulk["direct"]) or 0.0
        c_cpu = bulk["c"].median("cpu_per_gib") or 0.0
        met = ratio >= GOAL_RATIO and c_cpu <= GOAL_CPU
        lines += [
            f"Goal (issue 4): one plain hop ≥ {GOAL_RATIO}× direct at ≤ {GOAL_CPU} CPU-s/GiB. "
            f"C backend: {ratio:.2f}× at {c_cpu:.3f} CPU-s/GiB — "
            f"{'met' if met else 'NOT met'}.", ""]
    return "\n".join(lines)
