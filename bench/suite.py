"""The benchmark suite: run the benchmark modules, combine their results, report and plot.

``python -m bench`` (or ``labrelay bench``) runs ``bench.agent_vs_openssh``,
``bench.relay_vs_openssh``, ``bench.plain_hop``, ``bench.fast_path`` and
``bench.stock_paths`` (or the ones named
with ``--only``) as subprocesses and streams their output with a prefix and the elapsed
time. Each writes ``<stem>-latest.json`` and ``.md`` (overwritten) and appends its line to
``history.jsonl`` (``bench.history``). Then this reads each suite's latest JSON and writes

- ``bench/results/latest.md``: the key figures as tables, goals PASS/MISS, the plots;
- ``bench/results/latest-*.png``: the plots (needs matplotlib: ``pip install labrelay[bench]``).

``--compare`` then compares each suite's latest run with the run before it in the history
(by commit order) and flags every figure more than 15 % worse (a report: the exit status
stays 0). ``--report-only`` skips running and rebuilds the report from the latest files.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import (  # noqa: F401  (lower_is_better: the tests use it from here)
    conditions,
    get_in,
    goals,
    key_figures,
    lower_is_better,
    num,
)
from bench.history import (
    HISTORY,
    CommitOrder,
    history_line,
    latest_result,
    line_figures,
    parse_date,
    previous_line,
    read_history,
)
from bench.plots import make_plots

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SUITE_ID = "labrelay-bench"
WORSE = 0.15


@dataclass(frozen=True)
class Suite:
    name: str
    module: str
    stem: str
    quick_args: tuple[str, ...]


SUITES: dict[str, Suite] = {
    "agent": Suite("agent", "bench.agent_vs_openssh", "agent_vs_openssh",
                   ("--quick", "--sessions", "100", "--gap-sessions", "20")),
    "relay": Suite("relay", "bench.relay_vs_openssh", "relay_vs_openssh",
                   ("--quick", "--sessions", "100", "--gap-sessions", "20",
                    "--idle-sessions", "1000", "--echoes", "200", "--settle", "1")),
    "plain_hop": Suite("plain_hop", "bench.plain_hop", "plain_hop", ("--quick",)),
    "fast_path": Suite("fast_path", "bench.fast_path", "fast_path", ("--quick",)),
    "stock_paths": Suite("stock_paths", "bench.stock_paths", "stock_paths", ("--quick",)),
}


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
        before = get_in(old, "figures", suite) or {}
        for name, f in figs.items():
            o, n = num(get_in(before, name, "value")), num(get_in(f, "value"))
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


def history_baseline(suite: str, data: dict[str, Any], dirs: list[Path],
                     order: CommitOrder) -> dict[str, Any] | None:
    """The history line of ``suite`` just before the run in ``data`` (by commit order), from
    the ``history.jsonl`` of each of ``dirs``."""
    lines = list({json.dumps(x, sort_keys=True): x
                  for d in dict.fromkeys(dirs) for x in read_history(d)}.values())
    return previous_line(lines, history_line(suite, data), order)


def compare_with_history(datas: dict[str, dict[str, Any]], dirs: list[Path],
                         order: CommitOrder) -> str:
    """``--compare``: each suite's latest run against its previous history line."""
    out = []
    for suite, data in datas.items():
        prev = history_baseline(suite, data, dirs, order)
        if prev is None:
            out.append(f"compare [{suite}]: no earlier run of this suite in {HISTORY}; "
                       "nothing to compare with\n")
            continue
        new = {"figures": {suite: key_figures(suite, data)}}
        old = {"figures": {suite: line_figures(prev)}}
        name = f"[{suite}] the run at {prev.get('commit')} ({str(prev.get('date'))[:16]})"
        out.append(format_compare(compare(new, old), name))
    return "".join(out)


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
    sp = figs.get("stock_paths") or {}
    rows = [(k[:-len(".mb_per_s")], v) for k, v in sp.items() if k.endswith(".mb_per_s")]
    if rows:
        L += ["", "## Stock OpenSSH paths: ssh -J and ssh -L through the relay vs the seed's "
              "(MB/s = 10^6 bytes/s)", "",
              "| workload | path | MB/s | × direct | CPU-s/GiB of each relaying process |",
              "|---|---|---|---|---|"]
        for base, v in rows:
            ratio = sp.get(f"{base}.ratio_to_direct")
            cpu = [f"{k.rsplit('.', 1)[-1]} {c['value']:.2f}" for k, c in sp.items()
                   if k.startswith(f"{base}.cpu_s_per_gib.")]
            L.append(f"| {base.split('.', 1)[1]} | {v['label']} | {_fmt(v)} | "
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


def fresh_result(suite: Suite, results_dir: Path, started: float,
                 order: CommitOrder) -> tuple[Path, dict[str, Any]] | None:
    """The result the run just made: ``<stem>-latest.json`` if its recorded date is not
    before the run started (a failed run leaves the previous one there)."""
    found = latest_result(suite.stem, [results_dir], order)
    if found is None:
        return None
    date = parse_date(conditions(suite.name, found[1]).get("date"))
    # plain_hop records minutes only
    return found if date.timestamp() >= started - 60 else None


def git_commit(cwd: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "nogit"
    except (OSError, subprocess.TimeoutExpired):
        return "nogit"


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run labrelay's benchmark suite side by side with OpenSSH, "
        "socat and the loopback limit; each suite writes SUITE-latest.json/.md and a line in "
        "history.jsonl; then write bench/results/latest.md and plots. "
        "See docs/performance.md.")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB x 3 runs and fewer sessions (under 5 minutes on 2 cores)")
    p.add_argument("--only", default=",".join(SUITES), metavar="LIST",
                   help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    p.add_argument("--compare", action="store_true",
                   help="compare each suite's latest run with the run before it in "
                   "history.jsonl, by commit order (report only)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: build the report from each suite's latest JSON "
                   "(the newest by commit order of the results dir and bench/results)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench",
         repo: Path | None = REPO) -> int:
    """Run (unless ``--report-only``), then report; ``repo`` is the git repository whose
    history orders the runs (None: by their recorded dates, with a warning)."""
    args = build_parser(prog).parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"{prog}: unknown suite(s) {', '.join(unknown)}; choose from "
              f"{', '.join(SUITES)}", file=sys.stderr)
        return 2
    results_dir: Path = args.results_dir.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    dirs = [results_dir]  # every suite takes --results-dir
    order = CommitOrder(repo)
    started = time.time()
    datas: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for n in names:
        suite = SUITES[n]
        if args.report_only:
            found = latest_result(suite.stem, dirs, order)
        else:
            try:
                code = run_one(suite, args.quick, results_dir, REPO)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            if code is None:
                continue
            found = fresh_result(suite, results_dir, started, order)
        if found is None:
            print(f"[{n}] no results found", flush=True)
            continue
        path, datas[n] = found
        sources[n] = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    if not datas:
        print(f"{prog}: no results to report", file=sys.stderr)
        return 1
    now = datetime.datetime.now(datetime.UTC)
    combined = combine(datas, sources, git_commit(REPO), now.isoformat(timespec="seconds"))
    plots, note = make_plots(datas, combined, results_dir)
    if note:
        print(note, flush=True)
    md = results_dir / "latest.md"
    md.write_text(markdown(combined, plots, note))
    print(f"wrote {md}" + "".join(f", {p.name}" for p in plots), flush=True)
    for g in combined["goals"]:
        val = "–" if g["value"] is None else f"{g['value']:.2f}"
        print(f"  {g['status']:4}  [{g['suite']}] {g['goal']}: {val} {g.get('unit') or ''}")
    if args.compare:
        print(compare_with_history(datas, dirs, order), end="")
    return 0
