"""The stock-paths suite's plot (issue 13): what a user with nothing but OpenSSH gets.

One figure, three panels, each against its goal line, so the suite's PASS/MISS table
can be read at a glance: the throughput ratios (``-J`` ÷ direct, ``-L`` ÷ the seed's
chain, the fast path ÷ direct), CPU-s per GiB of every process on each path (stacked:
what the relay, the agent and the user's own ssh pay, next to the seed's three
OpenSSH processes), and new-session set-up p50 back to back and after the idle gap.
Drawn from ``stock_paths-latest.json`` alone, so ``python -m bench --report-only``
redraws it without measuring anything.
"""

from __future__ import annotations

from typing import Any

#: (ratio key, label, goal) in the order the panel shows them.
RATIOS = (
    ("J_to_direct", "ssh -J (pooled) ÷ direct", 0.55),
    ("seed_J_to_direct", "seed's ssh -J ÷ direct", None),
    ("L_push_to_seed", "ssh -L push ÷ seed's", 1.0),
    ("L_pull_to_seed", "ssh -L pull ÷ seed's", 1.0),
    ("fast_to_direct", "fast path ÷ direct", 0.65),
)

#: Setup paths drawn, with their labels.
SETUP = (("direct", "direct"), ("relay_L", "ssh -L (link)"),
         ("relay_L_e2e", "ssh -L (e2e, pooled)"), ("seed_L", "seed's ssh -L"))

#: CPU colours per process name (the seed's processes share one hue family).
_COLOURS = {"relay": "C1", "agent": "C0", "user_ssh": "C7", "ssh_R": "C2",
            "cloud_sshd_R": "C8", "cloud_sshd_user": "C9"}


def _median(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("median")
    return float(v) if isinstance(v, int | float) else None


def draw(plt: Any, data: dict[str, Any], title: str) -> Any:
    """The figure for one stock_paths result (``data``), or None when it has nothing
    to draw (an old result without ratios)."""
    ratios = data.get("ratios") or {}
    rows = [(label, ratios[k], goal) for k, label, goal in RATIOS
            if isinstance(ratios.get(k), int | float)]
    if not rows:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.8),
                                  gridspec_kw={"width_ratios": [1, 1.5, 1]})

    a.barh(range(len(rows)), [v for _l, v, _g in rows], color="C4")
    for i, (_l, v, goal) in enumerate(rows):
        if goal is not None:
            a.plot([goal, goal], [i - 0.4, i + 0.4], "r-", linewidth=2)
        a.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    a.set_yticks(range(len(rows)), [lab for lab, _v, _g in rows], fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("throughput ratio (median of runs); red: the goal", fontsize=7)
    a.set_title("Throughput", fontsize=9)

    series = [s for s in data.get("series") or [] if s.get("cpu_s_per_gib")]
    names = [f"{s.get('variant')} {s.get('op')}".replace(" ssh", "") for s in series]
    bottoms = [0.0] * len(series)
    for proc in dict.fromkeys(p for s in series for p in s["cpu_s_per_gib"]):
        vals = [_median(s["cpu_s_per_gib"].get(proc)) or 0.0 for s in series]
        b.bar(range(len(series)), vals, bottom=bottoms, label=proc,
              color=_COLOURS.get(proc, "C5"))
        bottoms = [x + y for x, y in zip(bottoms, vals, strict=True)]
    for i, s in enumerate(series):
        if s.get("variant") == "relay_J":
            relay = _median(s["cpu_s_per_gib"].get("relay")) or 0.0
            b.plot([i - 0.4, i + 0.4], [1.0, 1.0], "r-", linewidth=2)
            b.text(i, relay, f"relay {relay:.2f}", ha="center", va="bottom", fontsize=7)
    b.set_xticks(range(len(series)), names, fontsize=7, rotation=30, ha="right")
    b.set_ylabel("CPU-s per GiB carried (stacked per process)", fontsize=7)
    b.legend(fontsize=6, ncol=2)
    b.set_title("CPU per GiB; red: the relay's goal on pooled -J", fontsize=9)

    lat = data.get("setup_latency") or {}
    xs = [(key, label) for key, label in SETUP
          if any(key in (lat.get(m) or {}) for m in ("back_to_back", "idle_gap"))]
    width = 0.38
    for j, (mode, colour) in enumerate((("back_to_back", "C0"), ("idle_gap", "C1"))):
        paths = lat.get(mode) or {}
        meds, lo, hi = [], [], []
        for key, _label in xs:
            p50 = (paths.get(key) or {}).get("p50_ms") or {}
            m = _median(p50) or 0.0
            meds.append(m)
            lo.append(max(0.0, m - (p50.get("min") if isinstance(p50.get("min"), int | float)
                                    else m)))
            hi.append(max(0.0, (p50.get("max") if isinstance(p50.get("max"), int | float)
                                else m) - m))
        c.bar([i + (j - 0.5) * width for i in range(len(xs))], meds, width, yerr=[lo, hi],
              capsize=2, color=colour, label=mode.replace("_", " "))
    c.axhline(2.0, color="r", linewidth=1, linestyle="--", label="goal 2 ms (after idle)")
    c.set_xticks(range(len(xs)), [label for _k, label in xs], fontsize=7, rotation=20,
                 ha="right")
    c.set_yscale("log")
    c.set_ylabel("set-up p50, ms (median, min/max over runs; log)", fontsize=7)
    c.legend(fontsize=6)
    c.set_title("New-session set-up", fontsize=9)
    fig.suptitle("Stock OpenSSH paths through relay + agent vs the seed's chain\n" + title,
                 fontsize=8)
    return fig
