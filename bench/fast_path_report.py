"""The fast path bench's paths, labels, goals and report: its summary of a run, the markdown
report and the table it prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.report import (
    anomaly_lines,
    conditions_text,
    fmt,
    machine_conditions,
    machine_text,
    print_anomalies,
    result_head,
    spread,
    uncommitted,
)
from bench.runs import FastRun
from bench.sessions import (
    GiB,
    MiB,
)

SSH_RATIO_GOAL = 0.65  # fast path ssh session ÷ direct
PORTABLE_RATIO_GOAL = 0.6  # the same with labrelay connect on its portable copy loop
SEED_RATIO_SEEN = 0.30  # the seed's chain as the issue measured it before (not this harness)
CPU_GOAL, CPU_MOONSHOT = 0.7, 0.4  # CPU-s/GiB of each fast-path process
RAW_RATIO_GOAL, RAW_RATIO_MOONSHOT = 0.35, 0.5
SSH, RAW = "ssh", "raw"
DIRECT, FAST, SEED = "direct", "fast", "seed"
FAST_PORTABLE = "fast_portable"  # labrelay connect with LABRELAY_DATAPATH=portable (a laptop)
SEED_FULL = "seed_full"  # the seed's full chain: ssh -R, ssh -L detach, autossh -R
SOCAT_SOCK, FAST_SOCK = "socat_sock", "fast_sock"  # socket-fed: FAST_SOCK is the raw goal's
SOCAT_PIPE, FAST_PIPE = "socat_pipe", "fast_pipe"  # pipe-fed: reported extras
VARIANTS = {SSH: (DIRECT, FAST, FAST_PORTABLE, SEED, SEED_FULL),
            RAW: (DIRECT, SOCAT_SOCK, FAST_SOCK, SEED_FULL, SOCAT_PIPE, FAST_PIPE)}
# through labrelay connect, relay and agent
FAST_VARIANTS = (FAST, FAST_PORTABLE, FAST_SOCK, FAST_PIPE)
PIPE_FED = (SOCAT_PIPE, FAST_PIPE)
RAW_GOAL_PATH = FAST_SOCK
LABELS = {
    (SSH, DIRECT): "ssh direct to the target",
    (SSH, FAST): "ssh via the fast path (ProxyCommand labrelay connect)",
    (SSH, FAST_PORTABLE): "ssh via the fast path, labrelay connect on its portable copy "
                          "loop (LABRELAY_DATAPATH=portable, as on a Mac)",
    (SSH, SEED): "ssh via the seed's OpenSSH chain (cloud sshd + ssh -N -R, public port)",
    (SSH, SEED_FULL): "ssh via the seed's full chain (ssh -R, ssh -L detach, autossh -R; "
                      "public port)",
    (RAW, DIRECT): "direct loopback (Python client)",
    (RAW, SOCAT_SOCK): "socat TCP-LISTEN → TCP:sink, one plain hop (socket-fed, no relay)",
    (RAW, FAST_SOCK): "labrelay connect sink:9000 via the fast path, socket-fed "
                      "(inetd-style; the raw goal)",
    (RAW, SEED_FULL): "the seed's full chain (ssh -R, ssh -L detach, autossh -R), "
                      "socket-fed, public port",
    (RAW, SOCAT_PIPE): "extra: socat -u STDIN TCP:sink (pipe-fed, no relay)",
    (RAW, FAST_PIPE): "extra: labrelay connect sink:9000 via the fast path (pipe-fed)",
}
CARRIERS = {
    (SSH, DIRECT): "feeder's pipe → ssh → target sshd",
    (SSH, FAST): "feeder's pipe → ssh → `labrelay connect` (splice) → relay data port "
                 "(splice) → agent's pool connection (splice) → target sshd",
    (SSH, FAST_PORTABLE): "feeder's pipe → ssh → `labrelay connect` (readv/write copy "
                          "loop) → relay data port (splice) → agent's pool connection "
                          "(splice) → target sshd",
    (SSH, SEED): "feeder's pipe → ssh → cloud sshd's `-R` port → cloud sshd session → "
                 "ssh -N -R link (lab_pc) → target sshd",
    (SSH, SEED_FULL): "feeder's pipe → ssh → cloud sshd's `-R` port → cloud sshd session → "
                      "autossh's ssh -N -R (lab_pc) → `-L` port → ssh -N -L (detach) → "
                      "lab_pc sshd session of the `-L` → lab_pc sshd's `-R` port → lab_pc "
                      "sshd session of the `-R` → ssh -N -R (gpu_cluster) → target sshd",
    (RAW, DIRECT): "Python client → sink",
    (RAW, SOCAT_SOCK): "Python client → socat (read/write, 128 KiB) → sink",
    (RAW, FAST_SOCK): "Python client → the harness's listener: the accepted socket is "
                      "`labrelay connect`'s stdin and stdout (splice) → relay data port "
                      "(splice) → agent's pool connection (splice) → sink",
    (RAW, SEED_FULL): "Python client → cloud sshd session → autossh's ssh -N -R → ssh -N -L "
                      "(detach) → lab_pc sshd session of the `-L` → lab_pc sshd session of "
                      "the `-R` → ssh -N -R (gpu_cluster) → sink",
    (RAW, SOCAT_PIPE): "feeder's pipe → socat → sink",
    (RAW, FAST_PIPE): "feeder's pipe → `labrelay connect` (splice) → relay (splice) → "
                      "agent (splice) → sink",
}
PROCS = {
    "connect": "labrelay connect",
    "relay": "relay",
    "agent": "agent",
    "ssh_R": "ssh -N -R (lab_pc)",
    "cloud_sshd": "cloud sshd session",
    "socat": "socat",
    # the seed's full chain, in the order the user's bytes cross it
    "full_cloud_sshd": "cloud sshd session (autossh's)",
    "full_autossh_R": "autossh -R (lab_pc → cloud)",
    "full_ssh_L": "ssh -N -L (lab_pc detach)",
    "full_lab_sshd_L": "lab_pc sshd session of the -L",
    "full_lab_sshd_R": "lab_pc sshd session of the -R",
    "full_gpu_ssh_R": "ssh -N -R (gpu_cluster → lab_pc)",
}
FULL_PROCS = tuple(k for k in PROCS if k.startswith("full_"))
SERVICES = ("gpu-cluster:22", "sink:9000")
RAW_VARIANTS_TEXT = (
    "socket-fed (the raw goal is judged on these): one Python client (bench.plain_hop's "
    "source: 1 MiB sendall of memoryview slices, TCP_NODELAY; here it waits for 'go' once "
    "connected) sends to the sink directly (direct loopback), to socat -b 131072 "
    "TCP-LISTEN → TCP:sink (one plain user-space hop, for reference), or to a listener in "
    "the harness that accepts it and starts labrelay connect with the accepted socket as "
    "its stdin and stdout, like inetd (fast_sock: connect's pump splices socket↔socket, "
    "as do the relay and the agent: three spliced hops); pipe-fed (extras, not judged): a "
    "feeder process writes a pipe that is the stdin of socat -u STDIN TCP:sink (no relay) "
    "or of labrelay connect (which grows it to 1 MiB; socat leaves it at 64 KiB); these "
    "are not judged because direct loopback has no pipe in front of it, and a feeder that "
    "must write() every byte into a pipe first adds its own cost: socat_pipe, with no relay "
    "at all, shows what that shape allows socat")
REMOTE_COMMAND = "echo ready; wc -c"


def _goal(goals: list[dict[str, Any]], text: str, value: float | None, target: float,
          higher: bool, unit: str = "", level: str = "goal") -> None:
    ok = value is not None and (value >= target if higher else value <= target)
    margin = None if value is None else (value - target if higher else target - value)
    goals.append({"goal": text, "value": value, "target": target, "unit": unit,
                  "level": level, "status": "PASS" if ok else "MISS", "margin": margin,
                  "margin_pct": None if margin is None or not target else 100 * margin / target})


def summarize(bench: FastRun, samples: dict[str, dict[str, list[dict[str, Any]]]],
              machine: dict[str, Any]) -> dict[str, Any]:
    args = bench.args
    gib = args.bytes / GiB
    series: list[dict[str, Any]] = []
    for workload, per_variant in samples.items():
        direct = {r["run"]: r["seconds"] for r in per_variant.get(DIRECT, [])}
        for variant, runs in per_variant.items():
            order = list(PROCS)
            groups = sorted(dict.fromkeys(g for r in runs for g in r["cpu"]),
                            key=lambda g: order.index(g) if g in order else len(order))
            ratios = [direct[r["run"]] / r["seconds"] for r in runs if r["run"] in direct]
            series.append({
                "workload": workload, "path": variant, "label": LABELS[workload, variant],
                "carrier": CARRIERS[workload, variant],
                "mb_per_s": spread([args.bytes / r["seconds"] / 1e6 for r in runs]),
                # the median of per-run ratios: each run's variants ran back to back
                "ratio_to_direct": spread(ratios) if variant != DIRECT else None,
                "cpu_s_per_gib": {g: spread([r["cpu"][g] / gib for r in runs if g in r["cpu"]])
                                  for g in groups},
                "core_share": {g: spread([r["cpu"][g] / r["seconds"] for r in runs
                                          if g in r["cpu"]]) for g in groups},
                # the whole machine (every process, loopback TCP softirq) during the stream
                "machine_cores": {k: spread([r["machine"][k] for r in runs
                                             if k in (r.get("machine") or {})])
                                  for k in ("busy_cores", "kernel_cores")},
                "machine_cpu_s_per_gib": spread([r["machine"]["busy_cpu_s"] / gib for r in runs
                                                 if "busy_cpu_s" in (r.get("machine") or {})]),
                "setup_s": spread([r["setup_s"] for r in runs]),
                "setup_cpu_s": {g: spread([r["setup_cpu"][g] for r in runs
                                           if g in r["setup_cpu"]]) for g in groups},
                "teardown_cpu_s": {g: spread([r["teardown_cpu"][g] for r in runs
                                              if g in r["teardown_cpu"]]) for g in groups},
                "own_exited_before_stream_end": sum(
                    bool(r.get("own_exited_before_stream_end")) for r in runs),
                "samples": runs,
            })

    def find(workload: str, path: str) -> dict[str, Any]:
        return next((s for s in series if s["workload"] == workload and s["path"] == path), {})

    def med(x: dict[str, Any] | None) -> float | None:
        return x["median"] if x else None

    def per_run(workload: str, path: str, over: str) -> dict[str, float] | None:
        """``over``'s seconds ÷ ``path``'s, run by run (how many times ``over``'s speed)."""
        base = {r["run"]: r["seconds"] for r in samples[workload].get(over, [])}
        return spread([base[r["run"]] / r["seconds"] for r in samples[workload].get(path, [])
                       if r["run"] in base])

    full_ssh, full_raw = find(SSH, SEED_FULL), find(RAW, SEED_FULL)
    seed_full = {
        "what": "the seed's full chain: gpu_cluster ssh -N -R to lab_pc, lab_pc's ssh -N -L "
                "detach hop to itself, lab_pc's autossh -M 0 -N -R to the cloud; a user's "
                "ssh (ssh) or a raw client (raw) to the cloud's public port",
        "autossh": bench.autossh,
        "ssh_mb_per_s": full_ssh.get("mb_per_s"),
        "ssh_ratio_to_direct": full_ssh.get("ratio_to_direct"),
        "ssh_ratio_to_fast": per_run(SSH, SEED_FULL, FAST),
        "ssh_ratio_to_seed_one_hop": per_run(SSH, SEED_FULL, SEED),
        "ssh_cpu_s_per_gib": full_ssh.get("cpu_s_per_gib"),
        "ssh_cpu_s_per_gib_total": spread([sum(r["cpu"].values()) / gib
                                           for r in samples[SSH].get(SEED_FULL, [])]),
        "raw_mb_per_s": full_raw.get("mb_per_s"),
        "raw_ratio_to_direct": full_raw.get("ratio_to_direct"),
        "raw_ratio_to_fast_sock": per_run(RAW, SEED_FULL, FAST_SOCK),
        "raw_cpu_s_per_gib": full_raw.get("cpu_s_per_gib"),
        "raw_cpu_s_per_gib_total": spread([sum(r["cpu"].values()) / gib
                                           for r in samples[RAW].get(SEED_FULL, [])]),
        "earlier_ratio_seen": SEED_RATIO_SEEN,
    }

    goals: list[dict[str, Any]] = []
    fast = find(SSH, FAST)
    _goal(goals, f"ssh session via the fast path ÷ direct >= {SSH_RATIO_GOAL}",
          med(fast.get("ratio_to_direct")), SSH_RATIO_GOAL, True, "×")
    for proc in ("connect", "relay", "agent"):
        value = med((fast.get("cpu_s_per_gib") or {}).get(proc))
        for level, target in (("goal", CPU_GOAL), ("moonshot", CPU_MOONSHOT)):
            _goal(goals, f"ssh stream: {PROCS[proc]} CPU-s/GiB <= {target}", value, target,
                  False, "CPU-s/GiB", level)
    _goal(goals, f"ssh session via the fast path, labrelay connect portable, ÷ direct >= "
          f"{PORTABLE_RATIO_GOAL}", med(find(SSH, FAST_PORTABLE).get("ratio_to_direct")),
          PORTABLE_RATIO_GOAL, True, "×")
    raw = med(find(RAW, RAW_GOAL_PATH).get("ratio_to_direct"))  # socket-fed, inetd-style
    for level, target in (("goal", RAW_RATIO_GOAL), ("moonshot", RAW_RATIO_MOONSHOT)):
        _goal(goals, f"raw TCP via the fast path (socket-fed) ÷ direct loopback >= {target}",
              raw, target, True, "×", level)

    cond = {
        **machine_conditions(args.python, bench.loadavg_at_start),
        "bytes": args.bytes,
        "runs": args.runs,
        "ciphers": bench.ciphers,
        "mb": "10^6 bytes",
        "order": f"fresh processes; a warm-up of {min(args.bytes, 64 * MiB) // MiB} MiB per "
                 "variant (not recorded); then per run: the ssh variants, then the raw "
                 "variants, each workload's order rotated by one every run",
        "datapath_backend": bench.backend,
        "datapath_env": os.environ.get("LABRELAY_DATAPATH", "(unset: auto)"),
        "backends_logged": {k: v for k, v in bench.events.items() if " backend: " in k},
        "remote_command": REMOTE_COMMAND,
        "seed_variant": "public port: user ssh -p PUB to the cloud sshd, whose -R listener "
                        "belongs to lab_pc's ssh -N -R 127.0.0.1:PUB:127.0.0.1:TARGET "
                        "(autossh would run this same ssh; -J through the cloud is not "
                        "measured)",
        "seed_full_variant": "its hops as the seed's, with loopback addresses: a third "
                             "private sshd is lab_pc; gpu_cluster's ssh -N "
                             "-R 127.0.0.1:LABPORT:127.0.0.1:TARGET to it; on lab_pc the detach "
                             "hop ssh -N -L 127.0.0.1:REASSIGN:127.0.0.1:LABPORT to its own sshd "
                             "(127.0.0.1, not *: all on loopback) and autossh -M 0 -N -R "
                             "127.0.0.1:PUBFULL:127.0.0.1:REASSIGN to the cloud sshd (the one "
                             "of the one-hop chain); default ciphers, no keepalive options (the "
                             "seed sets none), ExitOnForwardFailure=yes on each (set-up only). "
                             "Each hop carries a second forward the same way whose innermost "
                             "target is the sink: the raw variant uses it (same processes and "
                             "connections, another channel); the user's ssh -p PUBFULL "
                             "reaches the target sshd",
        "autossh": bench.autossh,
        "seed_full_ports": bench.full_ports,
        "seed_full_argv": {"gpu_ssh_R": bench.full_gpu.argv, "ssh_L": bench.full_detach.argv,
                           "autossh_R": bench.full_auto.argv},
        "timing": "ssh: from 'go' to the feeder (session already up) to ssh's exit; raw: "
                  "the sink's first byte to its EOF (the client or feeder gets 'go' once the "
                  "sink accepted, so set-up is not in it)",
        "raw_variants": RAW_VARIANTS_TEXT,
        "cpu_method": "utime+stime from /proc/PID/stat (all threads: the C pump is one; "
                      "10 ms ticks) of relay, agent, ssh -N -R, the cloud sshd session "
                      "processes, the full chain's three ssh clients (autossh's: autossh "
                      "and its ssh together) and its lab_pc and cloud sshd session processes, "
                      "and of labrelay connect / socat at the session's start, "
                      "the stream's start and its end; labrelay connect and socat also run "
                      "under a wrapper that reads their exact lifetime total with wait4 "
                      "(set-up + stream + teardown)",
        "rusage_wrapper_start_s": bench.wrapper_start_s,
        "relay_argv": bench.relay_argv, "agent_argv": bench.agent_argv,
        "ssh_R_argv": bench.ssh_r.argv,
        "user_ssh_argv": {v: bench.user_ssh(v, Path("RUSAGE.jsonl")) for v in VARIANTS[SSH]},
        "events": dict(sorted(bench.events.items())),
    }
    return {
        **result_head("fast_path", bench),
        "conditions": cond,
        "series": series,
        "seed_full": seed_full,
        "goals": goals,
        "machine_cpu_during_measurement": machine,
        "anomalies": bench.anomalies,
    }


def _cpu_cell(entry: dict[str, Any], key: str, digits: int = 2) -> str:
    groups = entry.get(key) or {}
    return ", ".join(f"{PROCS.get(g, g)} {fmt(s, digits)}" for g, s in groups.items()
                     if s) or "–"


def _machine_cell(entry: dict[str, Any]) -> str:
    m = entry.get("machine_cores") or {}
    busy, kernel = m.get("busy_cores"), m.get("kernel_cores")
    if not busy:
        return "–"
    per_gib = entry.get("machine_cpu_s_per_gib")
    return f"{fmt(busy, 2)} / {fmt(kernel, 2)}" + (
        f"; {fmt(per_gib, 2)} CPU-s/GiB" if per_gib else "")


def _goal_row(g: dict[str, Any]) -> str:
    v, m = g.get("value"), g.get("margin")
    value = "n/a" if v is None else f"{v:.3f} {g.get('unit') or ''}".strip()
    margin = "n/a" if m is None else f"{m:+.3f}" + (
        f" ({g['margin_pct']:+.0f} %)" if g.get("margin_pct") is not None else "")
    return f"| {g['goal']} | {g.get('level', 'goal')} | {value} | {margin} | **{g['status']}** |"


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    dirty, changes = uncommitted(res, "the run started")
    mib = c["bytes"] / MiB
    out = [
        f"# labrelay fast path vs direct ssh and the seed's OpenSSH chains — {res['date']}, "
        f"commit `{res['commit']}`{dirty}",
        "",
        *changes,
        conditions_text(c) +
        f"{mib:g} MiB per transfer, {c['runs']} runs; within each run every variant takes its "
        "turn (order rotated run by run); figures are the median (min–max) over the runs; "
        "× direct is the median (min–max) of the per-run ratios; MB = 10^6 bytes. "
        f"Data path: LABRELAY_DATAPATH {c.get('datapath_env')}; labrelay connect's backend "
        f"{c.get('datapath_backend')}; the relay and the agent logged: "
        + ("; ".join(k.replace(" backend: data path:", ":") for k in
                     c.get("backends_logged") or {}) or "nothing") + ". Ciphers: "
        + "; ".join(f"{k}: {v}" for k, v in (c.get("ciphers") or {}).items()) + ".",
        "",
        "| workload | path | what carries it |",
        "|---|---|---|",
    ]
    out += [f"| {s['workload']} | {s['label']} | {s['carrier']} |" for s in res["series"]]
    titles = {
        SSH: f"## A user's ssh session: `ssh … '{c.get('remote_command')}'` fed {mib:g} MiB "
             "on stdin",
        RAW: f"## Raw TCP: {mib:g} MiB into a sink service (`sink:9000`, declared e2e)",
    }
    notes = {
        SSH: "Timed from 'go' to the feeder (the session is already up: it printed 'ready') "
             "to ssh's exit; `wc -c` reads to EOF like `cat > /dev/null` and its count is "
             "checked. Set-up: ssh started → 'ready' (the fast path's includes "
             f"{(c.get('rusage_wrapper_start_s') or 0) * 1000:.0f} ms for the CPU-accounting "
             "wrapper's own start).",
        RAW: "Timed at the sink from its first byte to EOF; the byte count is checked. "
             "Set-up: client (or socat, or feeder) started → the sink accepted; for the "
             "socket-fed fast path that includes the harness accepting the client and "
             "starting labrelay connect on the socket. The raw goal is judged on the "
             "socket-fed fast path, fed like direct loopback; the rows marked extra are "
             "pipe-fed (a feeder process writes a pipe in front of socat or labrelay "
             "connect), a shape direct loopback does not have.",
    }
    for workload in (SSH, RAW):
        rows = [s for s in res["series"] if s["workload"] == workload]
        if not rows:
            continue
        out += ["", titles[workload], "", notes[workload], "",
                "| path | MB/s | × direct | CPU-s/GiB of each relaying process (stream) "
                "| busy share of a core | machine during the stream: cores busy "
                f"(of {c['nproc']}) / of them kernel; all its CPU-s per GiB "
                "| set-up s | CPU-s per session: set-up "
                "| CPU-s per session: teardown |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            ratio = fmt(s.get("ratio_to_direct"), 2) if s["path"] != DIRECT else "1"
            out.append(f"| {s['label']} | {fmt(s.get('mb_per_s'))} | {ratio} "
                       f"| {_cpu_cell(s, 'cpu_s_per_gib')} | {_cpu_cell(s, 'core_share')} "
                       f"| {_machine_cell(s)} "
                       f"| {fmt(s.get('setup_s'), 3)} | {_cpu_cell(s, 'setup_cpu_s', 3)} "
                       f"| {_cpu_cell(s, 'teardown_cpu_s', 3)} |")

    def raw_ratio(path: str) -> str:
        s: dict[str, Any] = next((x for x in res["series"]
                                  if x["workload"] == RAW and x["path"] == path), {})
        r = s.get("ratio_to_direct")
        return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})" if r else "n/a"

    def ssh_ratio(path: str) -> str:
        s: dict[str, Any] = next((x for x in res["series"]
                                  if x["workload"] == SSH and x["path"] == path), {})
        r = s.get("ratio_to_direct")
        return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})" if r else "n/a"

    def times(r: dict[str, float] | None) -> str:
        return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})" if r else "n/a"

    full = res.get("seed_full") or {}
    seed_text = (
        f"The seed's full chain (`ssh -R`, `ssh -L` detach, `autossh -R`), measured here in "
        f"the same run: a user's ssh session {ssh_ratio(SEED_FULL)} direct "
        f"({times(full.get('ssh_ratio_to_fast'))} the fast path's), raw "
        f"{raw_ratio(SEED_FULL)} direct loopback ({times(full.get('raw_ratio_to_fast_sock'))} "
        f"the socket-fed fast path's); the issue's earlier measurement of the seed's chain "
        f"(not this harness) gave about {SEED_RATIO_SEEN:.2f}×. The one-hop chain (cloud sshd + "
        f"`ssh -N -R`): {ssh_ratio(SEED)}. Both are references, not goals."
        if full else
        f"An earlier measurement of the seed chain (not this harness) gave about "
        f"{SEED_RATIO_SEEN}× direct; here it is a reference, not a goal.")
    out += ["", "## Goals", "",
            f"{seed_text} The raw goal is "
            "judged on the socket-fed fast path (labrelay connect as an inetd-style service: "
            f"{raw_ratio(FAST_SOCK)} direct); for reference, one plain socat hop socket to "
            f"socket got {raw_ratio(SOCAT_SOCK)}, and the pipe-fed extras "
            f"{raw_ratio(FAST_PIPE)} (fast path) and {raw_ratio(SOCAT_PIPE)} (socat, no "
            "relay: what a pipe in front allows socat). Margin: how far the value is on the "
            "good side of the target (negative: short of it).", "",
            "| goal | level | value | margin | status |", "|---|---|---|---|---|"]
    out += [_goal_row(g) for g in res["goals"]]
    out += ["", "## Method", "",
            f"- Seed chain: {c.get('seed_variant')}.",
            *([f"- Seed's full chain: {c['seed_full_variant']}; autossh: "
               f"{c.get('autossh')}."] if c.get("seed_full_variant") else []),
            f"- Timing: {c.get('timing')}.",
            *([f"- Raw variants: {c['raw_variants']}."] if c.get("raw_variants") else []),
            "- Machine during the stream: the whole machine's user+nice and "
            "system+irq+softirq CPU seconds (/proc/stat) from the stream's start to its end, "
            "over its wall time, in cores: every process on the box (client or feeder, sink, "
            "ssh and sshd as well as the relaying processes, and anything else running) plus "
            "the kernel's loopback TCP work, much of it in softirq; 'kernel' is the "
            "system+irq+softirq part; CPU-s/GiB is all of it over the bytes moved.",
            f"- CPU: {c.get('cpu_method')}. The stream's CPU is counted from its start to "
            "its end (ssh's exit; the sink's EOF); set-up CPU from the session's start to the "
            "stream's (for connect and socat: their whole start-up, Python and SSH "
            "handshake with the relay included); teardown CPU from the stream's end to the "
            "per-session process's exit (for connect: mostly the Python interpreter "
            "shutting down).",
            f"- Order: {c.get('order')}."]
    m = res.get("machine_cpu_during_measurement")
    if m:
        out += ["", machine_text(m, c["nproc"], "long-lived processes (sshds, relay, agent, "
                                 "ssh -N -R, the full chain's ssh, autossh and sshd sessions, "
                                 "sink, harness; the rest is the per-session ssh "
                                 "clients, sshd sessions, labrelay connect, socat and feeders, "
                                 "loopback TCP softirq work, plus whatever else ran)")]
    out.append("")
    out += anomaly_lines(res["anomalies"], "No anomalies: every transfer arrived complete, "
                         "every fast-path session was spliced (one relay_fast_session each), "
                         "nothing fell back to a channel, and relay and agent logged no warning "
                         "or error.")
    if c.get("note"):
        out += [str(c["note"]), ""]
    return "\n".join(out)


def print_table(res: dict[str, Any]) -> None:
    print()
    print(f"{'workload':8} {'path':10} {'MB/s':>22} {'× direct':>18} "
          f"{'machine: cores, CPU-s/GiB':>26}  CPU s/GiB")
    for s in res["series"]:
        cpu = ", ".join(f"{g} {v['median']:.2f}" for g, v in s["cpu_s_per_gib"].items() if v)
        ratio = fmt(s.get("ratio_to_direct"), 2) if s["path"] != DIRECT else "1"
        busy = ((s.get("machine_cores") or {}).get("busy_cores") or {}).get("median")
        per_gib = (s.get("machine_cpu_s_per_gib") or {}).get("median")
        busy_text = "" if busy is None else f"{busy:.2f}" + (
            "" if per_gib is None else f" {per_gib:.2f}")
        print(f"{s['workload']:8} {s['path']:10} {fmt(s.get('mb_per_s')):>22} {ratio:>18} "
              f"{busy_text:>26}  {cpu}")
    print()
    for g in res["goals"]:
        v = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        print(f"  {g['status']:4}  [{g['level']}] {g['goal']}: {v}")
    print_anomalies(res)
