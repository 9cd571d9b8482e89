"""The figures worth tracking from each benchmark's JSON: flat key figures with their
direction (lower or higher is better), the goals with PASS/MISS, and the conditions.

Shared by the combined report (``bench.suite``) and the history table
(``bench.history``), so a history line and the report name a figure the same way.
"""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------- small helpers

def get_in(d: Any, *keys: Any) -> Any:
    """``d[k1][k2]...`` or None if any level is missing or not a dict/list."""
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _stat(x: Any) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) from a ``{"median","min","max"}`` dict or a bare number."""
    if isinstance(x, dict):
        return num(x.get("median")), num(x.get("min")), num(x.get("max"))
    v = num(x)
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

def _series_figures(figs: dict[str, dict[str, Any]], suite: str, data: dict[str, Any],
                    with_op: bool) -> None:
    """The ``series`` of fast_path and stock_paths: MB/s, × direct, CPU-s/GiB per process."""
    for s in data.get("series") or []:
        if not isinstance(s, dict):
            continue
        base = f"{suite}.{s.get('workload', '?')}.{s.get('path', '?')}"
        what = f"{s.get('workload')} {s.get('op')}" if with_op else f"{s.get('workload')}"
        label = f"{s.get('label') or s.get('path')}, {what}"
        _fig(figs, f"{base}.mb_per_s", s.get("mb_per_s"), "MB/s", label)
        _fig(figs, f"{base}.ratio_to_direct", s.get("ratio_to_direct"), "×",
             f"{label} ÷ direct")
        for proc, st in (s.get("cpu_s_per_gib") or {}).items():
            _fig(figs, f"{base}.cpu_s_per_gib.{proc}", st, "CPU-s/GiB", f"{label}, {proc}")


def _setup_figures(figs: dict[str, dict[str, Any]], suite: str, data: dict[str, Any],
                   labels: dict[str, Any]) -> None:
    """``setup_latency``: p50 and p99 per mode (back to back, idle gap) and path."""
    for mode, paths in (data.get("setup_latency") or {}).items():
        for path, st in (paths or {}).items():
            for q in ("p50_ms", "p99_ms"):
                _fig(figs, f"{suite}.setup.{mode}.{path}.{q}", get_in(st, q), "ms",
                     f"{labels.get(path, path)}, set-up {q[:3]}, {mode.replace('_', ' ')}")


def _ratio_figures(figs: dict[str, dict[str, Any]], suite: str, data: dict[str, Any]) -> None:
    for name, v in (data.get("ratios") or {}).items():
        _fig(figs, f"{suite}.ratio.{name}", v, "×", name.replace("_", " "))


def key_figures(suite: str, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures worth tracking from one suite's JSON, flat: name -> value, min, max, unit."""
    figs: dict[str, dict[str, Any]] = {}
    if suite == "fast_path":
        _series_figures(figs, suite, data, with_op=False)
        return figs
    if suite == "stock_paths":
        _series_figures(figs, suite, data, with_op=True)
        _setup_figures(figs, suite, data, {})
        _ratio_figures(figs, suite, data)
        return figs
    if suite == "plain_hop":
        for s in data.get("series") or []:
            if not isinstance(s, dict):
                continue
            base = f"plain_hop.{s.get('workload', '?')}.{s.get('path', '?')}"
            samples = [num(x.get("mbps")) for x in s.get("samples") or []
                       if isinstance(x, dict)]
            vals = [v for v in samples if v is not None]
            med = get_in(s, "median", "mbps")
            stat = {"median": med, "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None}
            label = str(s.get("label") or s.get("path"))
            _fig(figs, f"{base}.throughput_mb_per_s", stat, "MB/s", f"{label}, {s.get('workload')}")
            _fig(figs, f"{base}.cpu_s_per_gib", get_in(s, "median", "cpu_per_gib"), "CPU-s/GiB",
                 f"{label}, {s.get('workload')}")
            _fig(figs, f"{base}.ratio_to_direct", s.get("ratio_to_direct"), "×",
                 f"{label}, {s.get('workload')} ÷ direct")
        return figs
    labels = {p: (get_in(v, "label") or p) for p, v in (data.get("paths") or {}).items()}
    for direction, paths in (data.get("throughput") or {}).items():
        for path, t in (paths or {}).items():
            base = f"{suite}.throughput.{direction}.{path}"
            label = f"{labels.get(path, path)}, {direction}"
            _fig(figs, f"{base}.mb_per_s", get_in(t, "mb_per_s"), "MB/s", label)
            _fig(figs, f"{base}.forwarder_cpu_s_per_gib", get_in(t, "forwarder_cpu_s_per_gib"),
                 "CPU-s/GiB", label)
            for proc, st in (get_in(t, "cpu_s_per_gib") or {}).items():
                _fig(figs, f"{base}.cpu_s_per_gib.{proc}", st, "CPU-s/GiB", f"{label}, {proc}")
    _setup_figures(figs, suite, data, labels)
    for path, s in (data.get("interactive_under_bulk") or {}).items():
        for q in ("p50_ms", "p99_ms"):
            _fig(figs, f"{suite}.echo_under_bulk.{path}.{q}", get_in(s, q), "ms",
                 f"{labels.get(path, path)}, echo {q[:3]} under bulk")
    for key, s in (data.get("idle_sessions") or {}).items():
        if "2nd" in key:
            continue
        for proc, kib in (get_in(s, "kib_per_session") or {}).items():
            if proc.startswith("sshd ") and proc != "sshd (all)":
                continue
            _fig(figs, f"{suite}.memory_per_session.{key}.{proc}_kib", kib, "KiB",
                 f"{proc}, {get_in(s, 'requested')} idle sessions")
    end = get_in(data, "agent_health", "agent_end", "vmrss_kib")
    _fig(figs, f"{suite}.agent_rss_end_kib", end, "KiB", "agent RSS at the end")
    _ratio_figures(figs, suite, data)
    return figs


def goals(suite: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for g in data.get("goals") or []:
        if isinstance(g, dict) and "goal" in g:
            out.append({"suite": suite, "goal": g["goal"], "value": num(g.get("value")),
                        "unit": g.get("unit", ""), "status": g.get("status", "?"),
                        "margin": num(g.get("margin"))})
    if suite == "plain_hop":  # no goals list in its JSON: issue 4's goal, from the figures
        c = next((s for s in data.get("series") or [] if isinstance(s, dict)
                  and s.get("path") == "c" and s.get("workload") == "bulk"), None)
        r = num(get_in(c, "ratio_to_direct"))
        if r is not None:
            out.append({"suite": suite, "goal": "plain hop (C backend) ÷ direct >= 0.55",
                        "value": r, "unit": "×", "status": "PASS" if r >= 0.55 else "MISS",
                        "margin": r - 0.55})
        cpu = num(get_in(c, "median", "cpu_per_gib"))
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
