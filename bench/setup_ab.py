"""Set-up latency only, two source trees side by side in one session (A/B).

Issue 13 item 5 (set-up after a 50 ms idle gap) is a per-session figure of a few
milliseconds on a shared machine, where the spread between runs is larger than most
changes: the only comparison that means anything is two trees measured alternately in
the same minutes.  This starts :class:`bench.stock_paths.StockBench` (only its set-up;
no bulk trials) once per tree, each in a server process importing that tree's
``bench`` and running that tree's relay and agent, and then alternates set-up rounds
between them, A B B A A B ..., printing each round's p50 and the medians at the end::

    git archive main | tar -x -C /tmp/base      # the baseline tree (build its C module)
    python bench/setup_ab.py /tmp/base . --rounds 8 --sessions 30

The paths measured are the stock ones (``relay_L``: ``ssh -L`` to a non-e2e service, on
the link; ``relay_L_e2e``: the same to an e2e service, the pooled route; ``direct``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def cost(pid: int) -> tuple[int, int]:
    """CPU nanoseconds on a core and voluntary context switches (each a sleep in
    ``epoll_wait`` or another blocking call: a wake-up) of all ``pid``'s threads so far,
    from /proc: counts that do not depend on the other processes' load, unlike the
    wall-clock p50."""
    ns = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return ns, switches


def serve(repo: Path, suite: str) -> int:
    """One tree's bench: set up, then answer ``variant sessions gap_ms`` lines with the
    round's milliseconds as JSON, until stdin closes.  ``suite``: ``stock``
    (bench.stock_paths: ``relay_L``, ``relay_L_e2e``, ``direct``, ``seed_L``) or
    ``relay`` (bench.relay_vs_openssh: ``relay``, the public port; ``relay-L``, ``ssh``,
    ``direct``)."""
    sys.path.insert(0, str(repo))
    from bench import relay_vs_openssh as rv  # the tree's own bench
    from bench import stock_paths as sp

    with tempfile.TemporaryDirectory(prefix="labrelay-setup-ab-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        bench: Any
        if suite == "stock":
            bench = sp.StockBench(sp.quick_defaults(sp.build_parser().parse_args(["--quick"])),
                                  workdir)

            def round_(variant: str, n: int, gap: float) -> list[float] | None:
                return bench.setup_round(variant, n, gap)
        else:
            args = rv.quick_defaults(rv.build_parser().parse_args(["--quick"]))
            bench = rv.RelayBench(args, workdir)

            def round_(variant: str, n: int, gap: float) -> list[float] | None:
                r = bench.sessions(bench.paths[variant], n, gap, "set-up A/B")
                return None if r is None else list(r["ms"])
        try:
            bench.setup()
            names = sp.VARIANTS[sp.RAW] if suite == "stock" else list(bench.paths)
            for variant in names:
                round_(variant, 20, 0)  # warm-up, not recorded
            print(json.dumps({"ready": True}), flush=True)
            pids = {"relay": bench.relay.pid, "agent": bench.agent.pid}
            for line in sys.stdin:
                variant, sessions, gap = line.split()
                before = {k: cost(pid) for k, pid in pids.items()}
                ms = round_(variant, int(sessions), float(gap))
                after = {k: cost(pid) for k, pid in pids.items()}
                per = {f"{k} {what}": (after[k][i] - before[k][i]) / int(sessions) / scale
                       for k in pids for i, (what, scale) in enumerate(
                           (("CPU-us", 1000), ("wake-ups", 1)))}
                print(json.dumps({"ms": ms, "per_session": per,
                                  "anomalies": bench.anomalies[-1:]}), flush=True)
        finally:
            if os.environ.get("LABRELAY_STAMP_DIR"):  # a stamping sitecustomize: dump now
                for proc in (bench.relay, bench.agent):
                    if proc is not None and proc.poll() is None:
                        os.kill(proc.pid, signal.SIGUSR2)
                        proc.wait(10)
            for note in bench.cleanup():
                print(f"cleanup: {note}", file=sys.stderr)
    return 0


def _ask(proc: subprocess.Popen[str], line: str) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    while True:
        out = proc.stdout.readline()
        if not out:
            raise SystemExit(f"a bench server ended: {proc.args}")
        if out.startswith("{"):
            return dict(json.loads(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="*", type=Path, help="two source trees: A (base), B")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sessions", type=int, default=30, help="sessions per round")
    p.add_argument("--gap-ms", type=float, default=50.0)
    p.add_argument("--suite", choices=("stock", "relay"), default="stock")
    p.add_argument("--stamp-dir", type=Path, default=None,
                   help="stamp the relay's and agent's socket calls (bench/stamps): each "
                        "tree's in DIR/A and DIR/B, for bench/setup_steps.py")
    p.add_argument("--variants", default=None,
                   help="default: relay_L,relay_L_e2e,direct (stock); relay,relay-L,direct")
    args = p.parse_args()
    if args.serve is not None:
        return serve(args.serve.resolve(), args.suite)
    if len(args.trees) != 2:
        p.error("give two trees")
    names = ["A", "B"]
    procs = []
    for name, tree in zip(names, args.trees, strict=True):
        env = dict(os.environ)
        if args.stamp_dir is not None:
            (args.stamp_dir / name).mkdir(parents=True, exist_ok=True)
            env["LABRELAY_STAMP_DIR"] = str((args.stamp_dir / name).resolve())
            stamps = str(Path(__file__).resolve().parent / "stamps")  # its sitecustomize
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (stamps, env.get("PYTHONPATH", "")) if p)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--serve", str(tree.resolve()), "--suite", args.suite],
            text=True, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tree))
    for proc in procs:
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith('{"ready"'):
            if proc.poll() is not None:
                raise SystemExit(f"a bench server failed to start: {proc.args}")
    variants = (args.variants or ("relay_L,relay_L_e2e,direct" if args.suite == "stock"
                                  else "relay,relay-L,direct")).split(",")
    p50: dict[tuple[str, str], list[float]] = {(n, v): [] for n in names for v in variants}
    per: dict[tuple[str, str, str], list[float]] = {}
    every: dict[tuple[str, str], list[float]] = {(n, v): [] for n in names for v in variants}
    try:
        for r in range(args.rounds):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for variant in variants:
                for i in order:
                    got = _ask(procs[i], f"{variant} {args.sessions} {args.gap_ms}")
                    if not got.get("ms"):
                        print(f"round {r} {names[i]} {variant}: {got}", flush=True)
                        continue
                    m = statistics.median(got["ms"])
                    p50[(names[i], variant)].append(m)
                    every[(names[i], variant)].extend(got["ms"])
                    for k, v in got.get("per_session", {}).items():
                        per.setdefault((names[i], variant, k), []).append(v)
                    costs = "  ".join(f"{k} {v:.1f}" for k, v in got.get("per_session", {}).items())
                    print(f"round {r} {names[i]} {variant:12} p50 {m:6.3f} ms  per session: "
                          f"{costs}", flush=True)
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            proc.wait(60)
    print(f"medians of the rounds' p50 ({args.sessions} sessions, {args.gap_ms} ms gap):")
    for variant in variants:
        a, b = p50[("A", variant)], p50[("B", variant)]
        if a and b:
            print(f"  {variant:12} A {statistics.median(a):6.3f}  B {statistics.median(b):6.3f}"
                  f"  B/A {statistics.median(b) / statistics.median(a):5.3f}")
    print("the tail, over every session of every round (a stall in one turn, such as a "
          "collection, shows here, not in the p50):")
    for variant in variants:
        a, b = sorted(every[("A", variant)]), sorted(every[("B", variant)])
        if a and b:
            q = {k: (a[int(len(a) * k / 100)], b[int(len(b) * k / 100)]) for k in (90, 99)}
            print(f"  {variant:12} p90 A {q[90][0]:6.3f}  B {q[90][1]:6.3f}   "
                  f"p99 A {q[99][0]:6.3f}  B {q[99][1]:6.3f}   max A {a[-1]:6.3f}  B {b[-1]:6.3f}")
    print("per session, medians of the rounds (the processes' CPU-us from schedstat, "
          "voluntary context switches = wake-ups):")
    for variant in variants:
        for k in sorted({k for (_, v, k) in per if v == variant}):
            a, b = per.get(("A", variant, k), []), per.get(("B", variant, k), [])
            if a and b:
                print(f"  {variant:12} {k:16} A {statistics.median(a):7.1f}  "
                      f"B {statistics.median(b):7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
