"""The benchmark suite: run the benchmark modules, combine their results, report and plot.

``python -m bench`` (or ``labrelay bench``) runs ``bench.agent_vs_openssh``,
``bench.relay_vs_openssh``, ``bench.plain_hop`` and ``bench.fast_path`` (or the ones named
with ``--only``) as
subprocesses, streams their output with a prefix and the elapsed time, then reads the JSON
each wrote and writes

- ``bench/results/<YYYY-MM-DD>-<commit>.json``: the conditions and each suite's key figures;
- ``bench/results/latest.md``: the key figures as tables, goals PASS/MISS, the plots;
- ``bench/results/latest-*.png``: the plots (needs matplotlib: ``pip install labrelay[bench]``).

``--compare`` then compares the key figures with the newest earlier combined file and
flags every figure more than 15 % worse (a report: the exit status stays 0).
``--report-only`` skips running and builds the report from the newest JSON files there.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SUITE_ID = "labrelay-bench"
COMBINED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}-[0-9a-f]{4,40}\.json$")
WORSE = 0.15


@dataclass(frozen=True)
class Suite:
    name: str
    module: str
    stem: str
    quick_args: tuple[str, ...]
    dated: bool  # writes STEM-DATE-COMMIT.json (else STEM-latest.json)


SUITES: dict[str, Suite] = {
    "agent": Suite("agent", "bench.agent_vs_openssh", "agent_vs_openssh",
                   ("--quick", "--sessions", "100", "--gap-sessions", "20"), True),
    "relay": Suite("relay", "bench.relay_vs_openssh", "relay_vs_openssh",
                   ("--quick", "--sessions", "100", "--gap-sessions", "20",
                    "--idle-sessions", "1000", "--echoes", "200", "--settle", "1"), True),
    "plain_hop": Suite("plain_hop", "bench.plain_hop", "plain_hop", ("--quick",), False),
    "fast_path": Suite("fast_path", "bench.fast_path", "fast_path", ("--quick",), False),
}


# ---------------------------------------------------------------- small helpers

def _get(d: Any, *keys: Any) -> Any:
    """``d[k1][k2]...`` or None if any level is missing or not a dict/list."""
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _stat(x: Any) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) from a ``{"median","min","max"}`` dict or a bare number."""
    if isinstance(x, dict):
        return _num(x.get("median")), _num(x.get("min")), _num(x.get("max"))
    v = _num(x)
    return v, None, None


def lower_is_better(name: str, unit: str = "") -> bool:
    """Direction of a figure: latency, CPU and memory are better lower, throughput higher."""
    if unit in ("ms", "KiB", "CPU-s/GiB"):
        return True
    if unit == "MB/s":
        return False
    n = name.lower()
    if any(w in n for w in ("cpu", "kib", "rss", "memory", "_ms", "setup", "echo", "latency")):
        return True
    return False  # throughput and throughput ratios


def _fig(figs: dict[str, dict[str, Any]], name: str, stat: Any, unit: str,
         label: str) -> None:
    med, lo, hi = _stat(stat)
    if med is None:
        return
    figs[name] = {"value": med, "min": lo, "max": hi, "unit": unit, "label": label,
                  "better": "lower" if lower_is_better(name, unit) else "higher"}


# ---------------------------------------------------------------- key figures

def key_figures(suite: str, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures worth tracking from one suite's JSON, flat: name -> value, min, max, unit."""
    figs: dict[str, dict[str, Any]] = {}
    if suite == "fast_path":
        for s in data.get("series") or []:
            if not isinstance(s, dict):
                continue
            base = f"fast_path.{s.get('workload', '?')}.{s.get('path', '?')}"
            label = f"{s.get('label') or s.get('path')}, {s.get('workload')}"
            _fig(figs, f"{base}.mb_per_s", s.get("mb_per_s"), "MB/s", label)
            _fig(figs, f"{base}.ratio_to_direct", s.get("ratio_to_direct"), "×",
                 f"{label} ÷ direct")
            for proc, st in (s.get("cpu_s_per_gib") or {}).items():
                _fig(figs, f"{base}.cpu_s_per_gib.{proc}", st, "CPU-s/GiB", f"{label}, {proc}")
        return figs
    if suite == "plain_hop":
        for s in data.get("series") or []:
            if not isinstance(s, dict):
                continue
            base = f"plain_hop.{s.get('workload', '?')}.{s.get('path', '?')}"
            samples = [_num(x.get("mbps")) for x in s.get("samples") or []
                       if isinstance(x, dict)]
            vals = [v for v in samples if v is not None]
            med = _get(s, "median", "mbps")
            stat = {"median": med, "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None}
            label = s.get("label") or s.get("path")
            _fig(figs, f"{base}.throughput_mb_per_s", stat, "MB/s", f"{label}, {s.get('workload')}")
            _fig(figs, f"{base}.cpu_s_per_gib", _get(s, "median", "cpu_per_gib"), "CPU-s/GiB",
                 f"{label}, {s.get('workload')}")
            _fig(figs, f"{base}.ratio_to_direct", s.get("ratio_to_direct"), "×",
                 f"{label}, {s.get('workload')} ÷ direct")
        return figs
    labels = {p: (_get(v, "label") or p) for p, v in (data.get("paths") or {}).items()}
    for direction, paths in (data.get("throughput") or {}).items():
        for path, t in (paths or {}).items():
            base = f"{suite}.throughput.{direction}.{path}"
            label = f"{labels.get(path, path)}, {direction}"
            _fig(figs, f"{base}.mb_per_s", _get(t, "mb_per_s"), "MB/s", label)
            _fig(figs, f"{base}.forwarder_cpu_s_per_gib", _get(t, "forwarder_cpu_s_per_gib"),
                 "CPU-s/GiB", label)
            for proc, st in (_get(t, "cpu_s_per_gib") or {}).items():
                _fig(figs, f"{base}.cpu_s_per_gib.{proc}", st, "CPU-s/GiB", f"{label}, {proc}")
    for mode, paths in (data.get("setup_latency") or {}).items():
        for path, s in (paths or {}).items():
            for q in ("p50_ms", "p99_ms"):
                _fig(figs, f"{suite}.setup.{mode}.{path}.{q}", _get(s, q), "ms",
                     f"{labels.get(path, path)}, set-up {q[:3]}, {mode.replace('_', ' ')}")
    for path, s in (data.get("interactive_under_bulk") or {}).items():
        for q in ("p50_ms", "p99_ms"):
            _fig(figs, f"{suite}.echo_under_bulk.{path}.{q}", _get(s, q), "ms",
                 f"{labels.get(path, path)}, echo {q[:3]} under bulk")
    for key, s in (data.get("idle_sessions") or {}).items():
        if "2nd" in key:
            continue
        for proc, kib in (_get(s, "kib_per_session") or {}).items():
            if proc.startswith("sshd ") and proc != "sshd (all)":
                continue
            _fig(figs, f"{suite}.memory_per_session.{key}.{proc}_kib", kib, "KiB",
                 f"{proc}, {_get(s, 'requested')} idle sessions")
    end = _get(data, "agent_health", "agent_end", "vmrss_kib")
    _fig(figs, f"{suite}.agent_rss_end_kib", end, "KiB", "agent RSS at the end")
    for name, v in (data.get("ratios") or {}).items():
        _fig(figs, f"{suite}.ratio.{name}", v, "×", name.replace("_", " "))
    return figs


def goals(suite: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for g in data.get("goals") or []:
        if isinstance(g, dict) and "goal" in g:
            out.append({"suite": suite, "goal": g["goal"], "value": _num(g.get("value")),
                        "unit": g.get("unit", ""), "status": g.get("status", "?"),
                        "margin": _num(g.get("margin"))})
    if suite == "plain_hop":  # no goals list in its JSON: issue 4's goal, from the figures
        c = next((s for s in data.get("series") or [] if isinstance(s, dict)
                  and s.get("path") == "c" and s.get("workload") == "bulk"), None)
        r = _num(_get(c, "ratio_to_direct"))
        if r is not None:
            out.append({"suite": suite, "goal": "plain hop (C backend) ÷ direct >= 0.55",
                        "value": r, "unit": "×", "status": "PASS" if r >= 0.55 else "MISS",
                        "margin": r - 0.55})
        cpu = _num(_get(c, "median", "cpu_per_gib"))
        if cpu is not None:
            out.append({"suite": suite, "goal": "plain hop (C backend) CPU-s/GiB <= 0.3",
                        "value": cpu, "unit": "CPU-s/GiB",
                        "status": "PASS" if cpu <= 0.3 else "MISS", "margin": 0.3 - cpu})
    return out


def conditions(suite: str, data: dict[str, Any]) -> dict[str, Any]:
    c = dict(data.get("conditions") or {})
    meta = data.get("meta") or {}
    keep = ("cpu_model", "nproc", "kernel", "python", "twisted", "cryptography", "labrelay",
            "openssh", "bytes", "runs", "ciphers", "link_cipher", "relay_window",
            "loadavg_at_start", "idle_sessions", "datapath_backend", "peers")
    out = {k: c[k] for k in keep if k in c}
    if meta:
        out.update({"cpu_model": meta.get("cpu_model"), "nproc": meta.get("cpus"),
                    "kernel": meta.get("kernel"), "python": meta.get("python"),
                    "bytes": meta.get("size"), "runs": meta.get("runs")})
    out["date"] = data.get("date") or meta.get("date")
    out["commit"] = data.get("commit") or meta.get("commit")
    return {k: v for k, v in out.items() if v is not None}


def combine(datas: dict[str, dict[str, Any]], sources: dict[str, str], commit: str,
            date: str) -> dict[str, Any]:
    return {
        "suite": SUITE_ID, "date": date, "commit": commit, "sources": sources,
        "conditions": {s: conditions(s, d) for s, d in datas.items()},
        "figures": {s: key_figures(s, d) for s, d in datas.items()},
        "goals": [g for s, d in datas.items() for g in goals(s, d)],
    }


# ---------------------------------------------------------------- compare

def compare(new: dict[str, Any], old: dict[str, Any],
            threshold: float = WORSE) -> list[dict[str, Any]]:
    """Per figure in both: old, new, new ÷ old and whether it got more than threshold worse."""
    rows = []
    for suite, figs in (new.get("figures") or {}).items():
        before = _get(old, "figures", suite) or {}
        for name, f in figs.items():
            o, n = _num(_get(before, name, "value")), _num(_get(f, "value"))
            if o is None or n is None:
                continue
            ratio = n / o if o else None
            lower = f.get("better") == "lower"
            worse = ratio is not None and (ratio > 1 + threshold if lower
                                           else ratio < 1 - threshold)
            rows.append({"suite": suite, "figure": name, "old": o, "new": n, "ratio": ratio,
                         "unit": f.get("unit", ""), "better": f.get("better"), "worse": worse})
    return rows


def format_compare(rows: list[dict[str, Any]], old_name: str) -> str:
    if not rows:
        return f"compare with {old_name}: no figures in common\n"
    out = [f"compare with {old_name} (new ÷ old; '!!' = more than {WORSE:.0%} worse):"]
    for r in rows:
        ratio = "   n/a" if r["ratio"] is None else f"{r['ratio']:6.2f}"
        out.append(f"  {'!!' if r['worse'] else '  '} {ratio}  {r['figure']:<60} "
                   f"{r['old']:.4g} -> {r['new']:.4g} {r['unit']} ({r['better']} is better)")
    n = sum(r["worse"] for r in rows)
    out.append(f"{n} of {len(rows)} figures more than {WORSE:.0%} worse")
    return "\n".join(out) + "\n"


def previous_combined(results_dir: Path, exclude: Path | None) -> Path | None:
    found = []
    for p in results_dir.glob("*-*.json"):
        if not COMBINED_RE.match(p.name) or (exclude and p.resolve() == exclude.resolve()):
            continue
        try:
            if json.loads(p.read_text()).get("suite") == SUITE_ID:
                found.append(p)
        except (OSError, ValueError, AttributeError):
            continue
    return max(found, key=lambda p: (p.name[:10], p.stat().st_mtime), default=None)


# ---------------------------------------------------------------- markdown

def _fmt(f: dict[str, Any] | None, digits: int = 1) -> str:
    if not f:
        return "–"
    s = f"{f['value']:.{digits}f}"
    if f.get("min") is not None and f.get("max") is not None:
        s += f" ({f['min']:.{digits}f}–{f['max']:.{digits}f})"
    return s


def conditions_line(c: dict[str, Any]) -> str:
    parts = [f"{c.get('cpu_model', '?')}, {c.get('nproc', '?')} CPUs",
             f"Linux {c.get('kernel', '?')}", f"Python {c.get('python', '?')}"]
    for k in ("twisted", "cryptography", "labrelay"):
        if c.get(k):
            parts.append(f"{k} {c[k]}")
    if c.get("openssh"):
        parts.append(str(c["openssh"]).split(",")[0])
    if c.get("bytes"):
        parts.append(f"{c['bytes'] / 2**20:.0f} MiB per transfer")
    if c.get("runs"):
        parts.append(f"{c['runs']} runs")
    if c.get("link_cipher"):
        parts.append(f"link {c['link_cipher']}")
    if c.get("datapath_backend"):
        parts.append(f"data path {c['datapath_backend']}")
    parts.append(f"commit {c.get('commit', '?')}, {str(c.get('date', '?'))[:16]}")
    return "; ".join(parts)


def peers_line(peers: dict[str, Any]) -> str:
    """The Python peers of the agent bench: their versions, and any skipped with why."""
    versions = peers.get("versions") or {}
    skipped = peers.get("skipped") or {}
    shown = [f"{k} {v}" for k, v in versions.items() if v and k not in skipped]
    text = "Python peers: " + (", ".join(shown) or "none measured")
    if peers.get("local_forwards"):
        text += f" (local forwards -L: {', '.join(peers['local_forwards'])})"
    if skipped:
        text += "; skipped: " + "; ".join(
            f"{k} ({str(v).splitlines()[0] if v else '?'})" for k, v in skipped.items())
    return text


def markdown(combined: dict[str, Any], plots: list[Path], plot_note: str = "") -> str:
    figs = combined.get("figures") or {}
    L = [f"# labrelay benchmark suite — {combined.get('date', '?')[:16]}, "
         f"commit `{combined.get('commit', '?')}`", "",
         "Generated by `python -m bench` (bench/suite.py). Each figure is the median of the "
         "runs with (min–max). What bounds each figure: docs/benchmarks.md; overview and WAN "
         "notes: docs/performance.md.", "", "## Conditions", ""]
    for s, c in (combined.get("conditions") or {}).items():
        L.append(f"- **{s}**: {conditions_line(c)}")
        if isinstance(c.get("ciphers"), dict):
            L.append("  - ciphers: " + "; ".join(f"{p}: {v}" for p, v in c["ciphers"].items()))
        if isinstance(c.get("peers"), dict):
            L.append("  - " + peers_line(c["peers"]))
    L += ["", "## Throughput (MB/s = 10^6 bytes/s)", "",
          "| suite | path | push / bulk | pull / paced | CPU-s/GiB (push) |",
          "|---|---|---|---|---|"]
    for s in ("agent", "relay"):
        f = figs.get(s) or {}
        paths = sorted({k.split(".")[3] for k in f if k.startswith(f"{s}.throughput.")},
                       key=lambda p: (p == "direct", p))
        for p in paths:
            push, pull = f.get(f"{s}.throughput.push.{p}.mb_per_s"), \
                f.get(f"{s}.throughput.pull.{p}.mb_per_s")
            cpu = [f"{k.rsplit('.', 1)[-1]} {v['value']:.2f}" for k, v in f.items()
                   if k.startswith(f"{s}.throughput.push.{p}.cpu_s_per_gib.")]
            fw = f.get(f"{s}.throughput.push.{p}.forwarder_cpu_s_per_gib")
            if fw:
                cpu.insert(0, f"forwarder {fw['value']:.2f}")
            label = (push or pull or {}).get("label", p).rsplit(",", 1)[0]
            L.append(f"| {s} | {label} | {_fmt(push)} | {_fmt(pull)} | "
                     f"{', '.join(cpu) or '–'} |")
    ph = figs.get("plain_hop") or {}
    for k, v in ph.items():
        if k.endswith(".throughput_mb_per_s") and ".bulk." in k:
            paced = ph.get(k.replace(".bulk.", ".paced."))
            cpu = ph.get(k.replace("throughput_mb_per_s", "cpu_s_per_gib"))
            L.append(f"| plain_hop | {v['label'].rsplit(',', 1)[0]} | {_fmt(v)} | {_fmt(paced)} "
                     f"| {_fmt(cpu, 2) if cpu else '–'} |")
    if L[-1] == "|---|---|---|---|---|":  # no agent, relay or plain_hop figures
        del L[-5:]
    fp = figs.get("fast_path") or {}
    rows = [(k[:-len(".mb_per_s")], v) for k, v in fp.items() if k.endswith(".mb_per_s")]
    if rows:
        L += ["", "## Fast path: a user's ssh session and raw TCP (MB/s = 10^6 bytes/s)", "",
              "| workload | path | MB/s | × direct | CPU-s/GiB of each relaying process |",
              "|---|---|---|---|---|"]
        for base, v in rows:
            ratio = fp.get(f"{base}.ratio_to_direct")
            cpu = [f"{k.rsplit('.', 1)[-1]} {c['value']:.2f}" for k, c in fp.items()
                   if k.startswith(f"{base}.cpu_s_per_gib.")]
            L.append(f"| {base.split('.')[1]} | {v['label'].rsplit(',', 1)[0]} | {_fmt(v)} | "
                     f"{_fmt(ratio, 2) if ratio else '–'} | {', '.join(cpu) or '–'} |")
    ratios = [(s, k, v) for s, f in figs.items() for k, v in f.items()
              if ".ratio." in k or k.endswith(".ratio_to_direct")]
    if ratios:
        L += ["", "## Ratios", "", "| suite | ratio | value |", "|---|---|---|"]
        L += [f"| {s} | {v['label']} | {v['value']:.2f} |" for s, _k, v in ratios]
    lat = [(s, k, v) for s, f in figs.items() for k, v in f.items() if ".setup." in k
           and k.endswith(".p50_ms")]
    if lat:
        L += ["", "## New-session set-up latency (connect, 1 byte, echo, close)", "",
              "| suite | path, mode | p50 ms | p99 ms |", "|---|---|---|---|"]
        for s, k, v in lat:
            p99 = figs[s].get(k[:-len("p50_ms")] + "p99_ms")
            L.append(f"| {s} | {v['label'].replace(', set-up p50', '')} | {_fmt(v, 2)} | "
                     f"{_fmt(p99, 2)} |")
    mem = [(s, v) for s, f in figs.items() for k, v in f.items()
           if ".memory_per_session." in k or k.endswith("agent_rss_end_kib")]
    if mem:
        L += ["", "## Memory", "", "| suite | process | KiB |", "|---|---|---|"]
        L += [f"| {s} | {v['label']} | {_fmt(v, 2)} |" for s, v in mem]
    echo = [(s, k, v) for s, f in figs.items() for k, v in f.items()
            if ".echo_under_bulk." in k and k.endswith(".p99_ms")]
    if echo:
        L += ["", "## Interactive 1-byte echo under bulk on the same link", "",
              "| suite | path | p50 ms | p99 ms |", "|---|---|---|---|"]
        for s, k, v in echo:
            p50 = figs[s].get(k[:-len("p99_ms")] + "p50_ms")
            L.append(f"| {s} | {v['label'].rsplit(', echo', 1)[0]} | {_fmt(p50, 2)} | "
                     f"{_fmt(v, 2)} |")
    gl = combined.get("goals") or []
    if gl:
        L += ["", "## Goals", "", "| suite | goal | value | status |", "|---|---|---|---|"]
        for g in gl:
            val = "–" if g["value"] is None else f"{g['value']:.2f} {g.get('unit') or ''}".strip()
            margin = f" (margin {g['margin']:+.3f})" if g.get("margin") is not None else ""
            L.append(f"| {g['suite']} | {g['goal']} | {val} | **{g['status']}**{margin} |")
    L += ["", "## Plots", ""]
    if plot_note:
        L.append(plot_note)
    L += [f"![{p.stem}]({p.name})" for p in plots]
    srcs = combined.get("sources") or {}
    if srcs:
        L += ["", "Raw data: " + ", ".join(f"`{v}`" for v in srcs.values()) + "."]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- plots

def _title(combined: dict[str, Any], suite: str) -> str:
    c = _get(combined, "conditions", suite) or {}
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
    for k, v in (figs.get("fast_path") or {}).items():
        if k.endswith(".mb_per_s"):
            rows.append(("fast_path", v))
    if rows:
        fig, ax = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.8))
        names = [f"{s}: {v['label']}" for s, v in rows]
        vals = [v["value"] for _s, v in rows]
        err = [[max(0.0, v["value"] - (v["min"] if v["min"] is not None else v["value"]))
                for _s, v in rows],
               [max(0.0, (v["max"] if v["max"] is not None else v["value"]) - v["value"])
                for _s, v in rows]]
        ax.barh(range(len(rows)), vals, xerr=err, capsize=3,
                color=[{"agent": "C0", "relay": "C1", "plain_hop": "C2", "fast_path": "C3"}[s]
                       for s, _ in rows])
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("MB/s (10^6 B/s), median with min/max over runs, log scale")
        ax.set_title("Throughput per path on loopback\n" + "\n".join(
            f"{s}: {_title(combined, s)}" for s in dict.fromkeys(s for s, _ in rows)),
            fontsize=7)
        save(fig, "throughput")

    # set-up latency: distributions from the raw per-session samples
    for s in ("agent", "relay"):
        lat = _get(datas.get(s), "setup_latency") or {}
        series = []
        for mode, paths in lat.items():
            for path, v in (paths or {}).items():
                ms = [x for run in (_get(v, "ms") or []) if isinstance(run, list)
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
        n = _get(combined, "conditions", "relay", "idle_sessions") or "?"
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


# ---------------------------------------------------------------- running

def module_flags(module: str, cwd: Path) -> str | None:
    """The module's --help text, or None if it cannot be run (missing, broken)."""
    try:
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=cwd, text=True,
                           capture_output=True, timeout=60, env=_env(cwd))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _env(cwd: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    return env


def run_one(suite: Suite, quick: bool, results_dir: Path, cwd: Path) -> int | None:
    help_text = module_flags(suite.module, cwd)
    if help_text is None:
        print(f"[{suite.name}] skipped: `python -m {suite.module}` is missing or fails", flush=True)
        return None
    args: list[str] = []
    if quick:
        i = 0
        qa = suite.quick_args
        while i < len(qa):  # only flags the module has (plain_hop is still changing)
            takes = i + 1 < len(qa) and not qa[i + 1].startswith("--")
            if qa[i] in help_text:
                args += list(qa[i:i + 2] if takes else qa[i:i + 1])
            i += 2 if takes else 1
    if "--results-dir" in help_text:
        args += ["--results-dir", str(results_dir)]
    argv = [sys.executable, "-m", suite.module, *args]
    print(f"[{suite.name}] {' '.join(argv[1:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            print(f"[{suite.name} {time.monotonic() - start:6.1f}s] {line.rstrip()}", flush=True)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)
        raise
    print(f"[{suite.name}] exit {code} after {time.monotonic() - start:.0f} s", flush=True)
    return code


def find_result(suite: Suite, dirs: list[Path], since: float = 0.0) -> Path | None:
    """The newest JSON the suite wrote (modified at or after since)."""
    pat = re.compile(rf"^{re.escape(suite.stem)}-\d{{4}}-\d{{2}}-\d{{2}}-.+\.json$"
                     if suite.dated else rf"^{re.escape(suite.stem)}-latest\.json$")
    found = [p for d in dirs if d.is_dir() for p in d.iterdir()
             if pat.match(p.name) and p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def git_commit(cwd: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "nogit"
    except (OSError, subprocess.TimeoutExpired):
        return "nogit"


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run labrelay's benchmark suite side by side with OpenSSH, "
        "socat and the loopback limit; write a combined JSON, bench/results/latest.md and "
        "plots. See docs/performance.md.")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB x 3 runs and fewer sessions (under 5 minutes on 2 cores)")
    p.add_argument("--only", default=",".join(SUITES), metavar="LIST",
                   help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    p.add_argument("--compare", action="store_true",
                   help="compare with the newest earlier combined results (report only)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: build the report from the newest JSON in the results dir")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = build_parser(prog).parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"{prog}: unknown suite(s) {', '.join(unknown)}; choose from "
              f"{', '.join(SUITES)}", file=sys.stderr)
        return 2
    results_dir: Path = args.results_dir.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    dirs = list(dict.fromkeys([results_dir, RESULTS_DIR]))
    started = time.time()
    datas: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for n in names:
        suite = SUITES[n]
        since = 0.0
        if not args.report_only:
            try:
                code = run_one(suite, args.quick, results_dir, REPO)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            if code is None:
                continue
            since = started
        path = find_result(suite, dirs, since)
        if path is None:
            print(f"[{n}] no results found", flush=True)
            continue
        try:
            datas[n] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"[{n}] cannot read {path}: {e}", flush=True)
            continue
        sources[n] = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    if not datas:
        print(f"{prog}: no results to report", file=sys.stderr)
        return 1
    now = datetime.datetime.now(datetime.UTC)
    commit = git_commit(REPO)
    combined = combine(datas, sources, commit, now.isoformat(timespec="seconds"))
    out = results_dir / f"{now:%Y-%m-%d}-{commit}.json"
    # the baseline is read before writing: the new file may replace one of the same name
    prev = previous_combined(results_dir, exclude=None) if args.compare else None
    baseline = json.loads(prev.read_text()) if prev else None
    out.write_text(json.dumps(combined, indent=2) + "\n")
    plots, note = make_plots(datas, combined, results_dir)
    if note:
        print(note, flush=True)
    md = results_dir / "latest.md"
    md.write_text(markdown(combined, plots, note))
    print(f"wrote {out}, {md}" + "".join(f", {p.name}" for p in plots), flush=True)
    for g in combined["goals"]:
        val = "–" if g["value"] is None else f"{g['value']:.2f}"
        print(f"  {g['status']:4}  [{g['suite']}] {g['goal']}: {val} {g.get('unit') or ''}")
    if args.compare:
        if prev is None or baseline is None:
            print("compare: no earlier combined results file in "
                  f"{results_dir} (YYYY-MM-DD-COMMIT.json); nothing to compare with")
        else:
            same = " (the file this run replaced)" if prev.name == out.name else ""
            print(format_compare(compare(combined, baseline), prev.name + same), end="")
    return 0
