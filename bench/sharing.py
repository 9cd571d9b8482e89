"""Fair share of a congested agent link: per-user shares and Jain's fairness index.

Runs in the e2e network namespaces (tests/e2e: gpu_cluster, lab_pc, cloud, mac and the
router; root and ``ip netns`` needed) with the lab_pc -> cloud direction of the
agent's link shaped to ``--mbit`` (``tc ... tbf`` on lab_pc's ``wan0``), so the link
is the bottleneck.  Each user downloads from gpu_cluster's data service through its
own stock ``ssh -L`` with a number of TCP connections; over ``--seconds`` each user's
share of the bytes that crossed the link is measured (tests/e2e/sharingload.py, the
same load as tests/e2e/test_e2e_6_sharing.py).  Scenarios:

* ``echo_alone``: eve's echo round trips with no bulk at all: what the box's load alone
  costs an interactive session (the reference for the echo figures below);
* ``2u_1v8``: alice 1 stream, carol 8, equal weights; eve's echo round trips meanwhile;
* ``2u_1v8_w2``: the same with alice's ``share = 2``; eve's echo too;
* ``4u_1_2_4_8``: alice 1, bob 2, carol 4, eve 8 streams, equal weights.

Without per-user scheduling the shares follow the number of streams (alice would get
1/9 = 11 % in ``2u_1v8``; measured before issue 15: 20 % with 1 stream against 4).
Jain's index is computed over each user's throughput divided by its weight
(1.0: exactly its weighted share each; 1/n: one user takes everything).

    sudo .venv/bin/python -m bench.sharing            # 3 runs of each scenario
    sudo .venv/bin/python -m bench.sharing --quick    # 1 run each

Results: ``bench/results/sharing-latest.json`` and ``.md``, a line in
``history.jsonl``, and the plot ``bench/results/latest-sharing.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
E2E = REPO / "tests" / "e2e"
RESULTS = REPO / "bench" / "results"
STEM = "sharing"

SCENARIOS: dict[str, dict[str, Any]] = {
    "echo_alone": {"streams": {}, "shares": {}, "echo": "eve"},
    "2u_1v8": {"streams": {"alice": 1, "carol": 8}, "shares": {}, "echo": "eve"},
    "2u_1v8_w2": {"streams": {"alice": 1, "carol": 8}, "shares": {"alice": 2}, "echo": "eve"},
    "4u_1_2_4_8": {"streams": {"alice": 1, "bob": 2, "carol": 4, "eve": 8}, "shares": {},
                   "echo": None, "services": {"bob": ["data:9000"]}},
}


def jain(values: list[float]) -> float:
    from relay.core.fairshare import jain_index

    return jain_index(values)


def run_scenario(topo: Any, keys: Any, workdir: Path, name: str, spec: dict[str, Any],
                 mbit: int, seconds: float) -> dict[str, Any]:
    from nodes import Site
    from sharingload import measure, percentile, start_site

    workdir.mkdir(parents=True, exist_ok=True)
    site = Site(topo, keys, workdir, lambda obj: obj)
    try:
        start_site(site, shares=spec["shares"], services=spec.get("services"))
        m = measure(site, spec["streams"], mbit=mbit, seconds=seconds, echo_user=spec["echo"])
    finally:
        site.close()
        topo.reap(timeout=5.0)
    weights = {u: float(spec["shares"].get(u, 1)) for u in spec["streams"]}
    out: dict[str, Any] = {
        "shares": {u: round(m.share(u), 4) for u in spec["streams"]},
        "jain": round(jain([m.bytes[u] / weights[u] for u in spec["streams"]]), 4),
        "link_mb_s": round(m.link_mb_s, 2) if spec["streams"] else 0.0,
    }
    if m.rtts:
        out["echo_p50_ms"] = round(percentile(m.rtts, 0.5) * 1000, 2)
        out["echo_p99_ms"] = round(percentile(m.rtts, 0.99) * 1000, 2)
        out["echo_samples"] = len(m.rtts)
    return out


def summarize(name: str, spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    weights = {u: float(spec["shares"].get(u, 1)) for u in spec["streams"]}
    total_w = sum(weights.values())
    users = {
        u: {"streams": n, "weight": weights[u], "ideal": round(weights[u] / total_w, 4),
            "per_stream_share": round(n / sum(spec["streams"].values()), 4),
            "share": statistics.median(r["shares"][u] for r in runs),
            "runs": [r["shares"][u] for r in runs]}
        for u, n in spec["streams"].items()
    }
    out: dict[str, Any] = {"users": users,
                           "jain": statistics.median(r["jain"] for r in runs),
                           "link_mb_s": statistics.median(r["link_mb_s"] for r in runs),
                           "runs": runs}
    if spec["echo"]:
        out["echo_p50_ms"] = statistics.median(r["echo_p50_ms"] for r in runs)
        out["echo_p99_ms"] = statistics.median(r["echo_p99_ms"] for r in runs)
    return out


def goals(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    def goal(text: str, value: float, ok: bool, unit: str = "") -> dict[str, Any]:
        return {"goal": text, "value": round(value, 4), "unit": unit,
                "status": "PASS" if ok else "MISS"}

    out = []
    a = scenarios["2u_1v8"]["users"]["alice"]["share"]
    out.append(goal("1 stream vs 8: each user's share within 40-60 %", a, 0.40 <= a <= 0.60))
    w = scenarios["2u_1v8_w2"]["users"]["alice"]["share"]
    out.append(goal("weights 2:1: within 60-73 % / 27-40 %", w, 0.60 <= w <= 0.73))
    p99 = max(scenarios[s]["echo_p99_ms"] for s in ("2u_1v8", "2u_1v8_w2"))
    out.append(goal("interactive echo p99 under both <= 20 ms", p99, p99 <= 20, "ms"))
    return out


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    lines = [
        "# Fair share of a congested agent link",
        "",
        f"{res['date']}, commit {res['commit']}; {c['nproc']} cores, load "
        f"{c['loadavg_at_start']} at start, {c.get('loadavg_at_end', '?')} at the end "
        f"(the bench's own load included); lab_pc -> cloud shaped to {c['mbit']} Mbit/s "
        f"(tbf), the link's TCP congestion control {c.get('tcp_congestion_control', '?')}; "
        f"{c['runs']} run(s) of {c['seconds']:g} s per scenario (medians).",
        "",
        "| scenario | user | streams | weight | share | ideal | by streams | Jain | link MB/s |"
        " echo p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in res["scenarios"].items():
        echo = (f"{s['echo_p50_ms']:.1f} / {s['echo_p99_ms']:.1f}" if "echo_p99_ms" in s
                else "")
        if not s["users"]:
            lines.append(f"| {name} | (no bulk) | | | | | | | | {echo} |")
        for i, (user, u) in enumerate(s["users"].items()):
            lines.append(
                f"| {name if i == 0 else ''} | {user} | {u['streams']} | {u['weight']:g} | "
                f"{u['share']:.1%} | {u['ideal']:.1%} | {u['per_stream_share']:.1%} | "
                + (f"{s['jain']:.3f} | {s['link_mb_s']:.1f} | {echo} |" if i == 0 else "| | |"))
    lines += ["", "| goal | value | status |", "|---|---|---|"]
    for g in res["goals"]:
        value = f"{g['value']:.1%}" if not g["unit"] else f"{g['value']:.1f} {g['unit']}"
        lines.append(f"| {g['goal']} | {value} | {g['status']} |")
    lines += ["", "Plot: `latest-sharing.png`.", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install labrelay[bench]): no plot"
    names = [n for n, s in res["scenarios"].items() if s["users"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), sharey=True)
    for ax, name in zip(axes, names, strict=True):
        s = res["scenarios"][name]
        users = list(s["users"])
        x = range(len(users))
        ax.bar([i - 0.27 for i in x], [s["users"][u]["per_stream_share"] * 100 for u in users],
               0.27, label="by streams (no fair share)", color="#bbbbbb")
        ax.bar(list(x), [s["users"][u]["share"] * 100 for u in users], 0.27,
               label="measured", color="#3a76b0")
        ax.bar([i + 0.27 for i in x], [s["users"][u]["ideal"] * 100 for u in users], 0.27,
               label="weighted ideal", color="#9bc48a")
        ticks = [f"{u}\n{s['users'][u]['streams']} str., w {s['users'][u]['weight']:g}"
                 for u in users]
        ax.set_xticks(list(x), ticks, fontsize=8)
        title = f"{name}\nJain {s['jain']:.3f}, {s['link_mb_s']:.0f} MB/s"
        if "echo_p99_ms" in s:
            alone = res["scenarios"].get("echo_alone", {}).get("echo_p99_ms")
            title += f", echo p99 {s['echo_p99_ms']:.0f} ms"
            if alone is not None:
                title += f" ({alone:.0f} alone)"
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("share of the link, %")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Per-user fair share through a {res['conditions']['mbit']} Mbit/s agent link "
                 f"({res['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sharing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 run per scenario")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mbit", type=int, default=320, help="the shaped link (default 40 MB/s)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    sys.path.insert(0, str(E2E))
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from nodes import make_keys
    from topology import Topology

    from bench.history import write_latest
    from bench.meter import loadavg
    from bench.procs import git_commit

    topo = Topology()
    load = loadavg()
    congestion = "?"
    scenarios: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="labrelay-bench-sharing-") as tmp:
        workdir = Path(tmp)
        try:
            topo.up()
            # The link's congestion control is the agent's namespace's default: a
            # condition of every latency figure here (a host's default may be bbr).
            congestion = topo.sysctl("lab_pc", "net.ipv4.tcp_congestion_control")
            keys = make_keys(workdir / "keys")
            for name, spec in SCENARIOS.items():
                results = []
                for i in range(runs):
                    print(f"sharing: {name} run {i + 1}/{runs}", flush=True)
                    results.append(run_scenario(topo, keys, workdir / f"{name}-{i}", name, spec,
                                                args.mbit, args.seconds))
                    print(f"  {results[-1]}", flush=True)
                scenarios[name] = summarize(name, spec, results)
        finally:
            topo.down()
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "conditions": {"nproc": os.cpu_count(), "kernel": platform.release(),
                       "python": platform.python_version(), "loadavg_at_start": load,
                       "loadavg_at_end": loadavg(),
                       "runs": runs, "seconds": args.seconds, "mbit": args.mbit,
                       "tcp_congestion_control": congestion},
        "scenarios": scenarios,
    }
    res["goals"] = goals(scenarios)
    res["ratios"] = {
        "alice_share_1v8": scenarios["2u_1v8"]["users"]["alice"]["share"],
        "alice_share_1v8_w2": scenarios["2u_1v8_w2"]["users"]["alice"]["share"],
        "jain_2_users": scenarios["2u_1v8"]["jain"],
        "jain_2_users_weighted": scenarios["2u_1v8_w2"]["jain"],
        "jain_4_users": scenarios["4u_1_2_4_8"]["jain"],
    }
    res["interactive_under_bulk"] = {
        name: {"p50_ms": scenarios[name]["echo_p50_ms"], "p99_ms": scenarios[name]["echo_p99_ms"]}
        for name in ("echo_alone", "2u_1v8", "2u_1v8_w2")}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    note = plot(res, args.results_dir / "latest-sharing.png")
    write_latest(args.results_dir, STEM, res, markdown(res) + (f"\n{note}\n" if note else ""))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
