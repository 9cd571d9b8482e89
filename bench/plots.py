"""The suite report's plots (PNG, with matplotlib if installed): throughput per path,
set-up latency, memory per idle session, interactive latency under bulk, and the
stock-paths suite against its goals (bench/stock_plot.py)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench import stock_plot
from bench.figures import get_in


def _title(combined: dict[str, Any], suite: str) -> str:
    c = get_in(combined, "conditions", suite) or {}
    bits = [f"{c.get('nproc', '?')} CPUs {c.get('cpu_model', '')}".strip(),
            f"Linux {c.get('kernel', '?')}", f"Py {c.get('python', '?')}"]
    if c.get("openssh"):
        bits.append(str(c["openssh"]).split(" ")[0])
    if c.get("link_cipher"):
        bits.append(f"link {str(c['link_cipher']).split(' ')[0]}")
    if c.get("bytes"):
        bits.append(f"{c['bytes'] / 2**20:.0f} MiB")
    bits.append(f"{c.get('runs', '?')} runs, {c.get('commit', '?')}")
    return ", ".join(bits)


def make_plots(datas: dict[str, dict[str, Any]], combined: dict[str, Any],
               outdir: Path) -> tuple[list[Path], str]:
    """PNG plots into outdir; returns them and a note (why some or all were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ("matplotlib is not installed, so no plots "
                    "(`pip install 'labrelay[bench]'`).")
    out: list[Path] = []
    figs = combined.get("figures") or {}

    def save(fig: Any, name: str) -> None:
        p = outdir / f"latest-{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(p)

    # throughput bars per path, median with min/max error bars
    rows = []
    for s in ("agent", "relay"):
        for k, v in (figs.get(s) or {}).items():
            if k.startswith(f"{s}.throughput.") and k.endswith(".mb_per_s"):
                rows.append((s, v))
    for k, v in (figs.get("plain_hop") or {}).items():
        if k.endswith(".throughput_mb_per_s"):
            rows.append(("plain_hop", v))
    for suite in ("fast_path", "stock_paths"):
        for k, v in (figs.get(suite) or {}).items():
            if k.endswith(".mb_per_s"):
                rows.append((suite, v))
    if rows:
        fig, ax = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.8))
        names = [f"{s}: {v['label']}" for s, v in rows]
        vals = [v["value"] for _s, v in rows]
        err = [[max(0.0, v["value"] - (v["min"] if v["min"] is not None else v["value"]))
                for _s, v in rows],
               [max(0.0, (v["max"] if v["max"] is not None else v["value"]) - v["value"])
                for _s, v in rows]]
        ax.barh(range(len(rows)), vals, xerr=err, capsize=3,
                color=[{"agent": "C0", "relay": "C1", "plain_hop": "C2", "fast_path": "C3",
                        "stock_paths": "C4"}[s]
                       for s, _ in rows])
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("MB/s (10^6 B/s), median with min/max over runs, log scale")
        ax.set_title("Throughput per path on loopback\n" + "\n".join(
            f"{s}: {_title(combined, s)}" for s in dict.fromkeys(s for s, _ in rows)),
            fontsize=7)
        save(fig, "throughput")

    # the stock-paths suite: ratios, CPU per GiB and set-up against their goals
    if datas.get("stock_paths"):
        fig = stock_plot.draw(plt, datas["stock_paths"], _title(combined, "stock_paths"))
        if fig is not None:
            save(fig, "stock-paths")

    # set-up latency: distributions from the raw per-session samples
    for s in ("agent", "relay"):
        lat = get_in(datas.get(s), "setup_latency") or {}
        series = []
        for mode, paths in lat.items():
            for path, v in (paths or {}).items():
                ms = [x for run in (get_in(v, "ms") or []) if isinstance(run, list)
                      for x in run if isinstance(x, int | float)]
                if ms:
                    series.append((f"{path}\n{mode.replace('_', ' ')}", ms))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(series)), 4.5))
        ax.boxplot([m for _n, m in series], whis=(1, 99), showfliers=False)
        for i, (_n, m) in enumerate(series, 1):
            q = statistics.quantiles(m, n=100) if len(m) > 1 else [m[0]] * 99
            ax.plot([i], [q[49]], "k_", markersize=14)
            ax.plot([i], [q[98]], "rv", markersize=5)
        ax.set_xticks(range(1, len(series) + 1), [n for n, _ in series], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per session (box 25–75 %, whiskers 1–99 %, red ▼ p99)")
        ax.set_title(f"New-session set-up latency ({s}), all sessions of all runs\n"
                     + _title(combined, s), fontsize=7)
        save(fig, f"setup-{s}")

    # memory per session
    mem = [(v["label"], v["value"]) for k, v in (figs.get("relay") or {}).items()
           if ".memory_per_session." in k]
    if mem:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(mem)), [v for _l, v in mem],
               color=["C1" if ("relay" in lab or "agent" in lab) else "C7" for lab, _ in mem])
        ax.set_xticks(range(len(mem)), [lab.split(",")[0] for lab, _ in mem], fontsize=8)
        ax.axhline(10, color="r", linestyle="--", linewidth=1, label="goal 10 KiB")
        ax.legend(fontsize=7)
        ax.set_ylabel("KiB RSS per idle session")
        n = get_in(combined, "conditions", "relay", "idle_sessions") or "?"
        ax.set_title(f"Memory per session, {n} idle sessions on one link/process\n"
                     + _title(combined, "relay"), fontsize=7)
        save(fig, "memory")

    # interactive p99 under bulk
    echo = [(k.split(".")[2], v) for k, v in (figs.get("relay") or {}).items()
            if ".echo_under_bulk." in k and k.endswith(".p99_ms")]
    if echo:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        vals = [v["value"] for _p, v in echo]
        err = [[max(0.0, v["value"] - (v["min"] or v["value"])) for _p, v in echo],
               [max(0.0, (v["max"] or v["value"]) - v["value"]) for _p, v in echo]]
        ax.bar(range(len(echo)), vals, yerr=err, capsize=3, color="C1")
        ax.set_xticks(range(len(echo)), [p for p, _ in echo], fontsize=8)
        ax.axhline(20, color="r", linestyle="--", linewidth=1, label="goal 20 ms")
        ax.legend(fontsize=7)
        ax.set_ylabel("1-byte echo p99, ms (median, min/max over runs)")
        ax.set_title("Interactive p99 while a bulk transfer shares the link\n"
                     + _title(combined, "relay"), fontsize=7)
        save(fig, "interactive")
    return out, ""
