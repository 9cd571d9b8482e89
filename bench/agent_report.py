"""The agent bench's paths, goals and report: its summary of a run, the markdown report and
the table it prints."""

from __future__ import annotations

from typing import Any

from bench.report import (
    anomaly_lines,
    conditions_text,
    fmt,
    fmt_ratio,
    goals_table,
    machine_conditions,
    machine_text,
    per_run_latency,
    pooled_latency,
    print_goals,
    result_head,
    spread,
    uncommitted,
)
from bench.runs import AgentRun
from bench.sessions import (
    CHUNK,
    STALL_SECONDS,
    GiB,
    MiB,
)

THROUGHPUT_GOAL = 0.8  # agent / ssh, from the issue
SETUP_P50_GOAL_MS = 2.0
AGENT, SSH, SSH_SAME, DIRECT = "agent", "ssh", "ssh-same", "direct"
ASYNCSSH, SSH_L, SSHTUNNEL = "asyncssh", "ssh-L", "sshtunnel"
LOCAL = (SSH_L, SSHTUNNEL)  # local forwards (-L): the listener is on the client's side
LABELS = {
    AGENT: "labrelay agent",
    SSH: "ssh -R (default cipher)",
    SSH_SAME: "ssh -R, the agent's cipher",
    ASYNCSSH: "asyncssh forward_remote_port (-R)",
    SSH_L: "ssh -L (default cipher), local forward",
    SSHTUNNEL: "sshtunnel (paramiko), local forward -L",
    DIRECT: "direct (no tunnel)",
}
# the peers' ratios (numerator, denominator), reported when the denominator was measured:
# the agent against each peer, and sshtunnel against OpenSSH's own local forward
PEER_RATIOS = ((AGENT, ASYNCSSH), (AGENT, SSHTUNNEL), (AGENT, SSH_L), (SSHTUNNEL, SSH_L))


def summarize(bench: AgentRun, tput: dict[str, dict[str, list[dict[str, Any]]]],
              lat: dict[str, dict[str, list[dict[str, Any]]]],
              health: dict[str, Any], sshd_lines: int, machine: dict[str, Any]
              ) -> dict[str, Any]:
    args = bench.args
    gib = args.bytes / GiB
    throughput: dict[str, Any] = {}
    for op, per_path in tput.items():
        throughput[op] = {}
        for name, runs in per_path.items():
            throughput[op][name] = {
                "mb_per_s": spread([args.bytes / r["seconds"] / 1e6 for r in runs]),
                "seconds": [r["seconds"] for r in runs],
                "forwarder_cpu_s_per_gib": spread(
                    [r["cpu_forwarder"] / gib for r in runs if r["cpu_forwarder"] is not None]),
                "sshd_cpu_s_per_gib": spread(
                    [r["cpu_sshd"] / gib for r in runs if r["cpu_sshd"] is not None]),
                # busy fraction of one core during the transfer: ~1.0 means that
                # single-threaded process was the bottleneck
                "forwarder_core_share": spread(
                    [r["cpu_forwarder"] / r["seconds"] for r in runs
                     if r["cpu_forwarder"] is not None]),
                "sshd_core_share": spread(
                    [r["cpu_sshd"] / r["seconds"] for r in runs if r["cpu_sshd"] is not None]),
            }
    latency: dict[str, Any] = {}
    for kind, per_path in lat.items():
        latency[kind] = {}
        for name, runs in per_path.items():
            if not runs:
                latency[kind][name] = None
                continue
            samples = [r["ms"] for r in runs]
            pooled = [x for s in samples for x in s]
            latency[kind][name] = {
                "sessions_per_run": len(samples[0]),
                **per_run_latency(samples),
                "pooled": {"sessions": len(pooled), **pooled_latency(pooled)},
                "forwarder_cpu_ms_per_session": spread(
                    [r["cpu_forwarder"] * 1000 / len(r["ms"]) for r in runs
                     if r["cpu_forwarder"] is not None]),
                "sshd_cpu_ms_per_session": spread(
                    [r["cpu_sshd"] * 1000 / len(r["ms"]) for r in runs
                     if r["cpu_sshd"] is not None]),
                "ms": [[round(x, 3) for x in s] for s in samples],
            }

    def median_of(op: str, name: str) -> float | None:
        s = throughput.get(op, {}).get(name, {}).get("mb_per_s")
        return s["median"] if s else None

    ratios: dict[str, Any] = {}
    goals: list[dict[str, Any]] = []
    for op in throughput:
        agent = median_of(op, AGENT)
        for ref in (SSH, SSH_SAME):
            other = median_of(op, ref)
            ratio = agent / other if agent and other else None
            key = f"{op}_agent_over_{ref}"
            ratios[key] = ratio
            goals.append({"goal": f"throughput {op}: agent / {ref} >= {THROUGHPUT_GOAL}",
                          "value": ratio,
                          "status": "PASS" if ratio is not None and ratio >= THROUGHPUT_GOAL
                          else "MISS"})
        for num, den in PEER_RATIOS:  # no goals: context for the reader
            if den in throughput[op]:
                a, b = median_of(op, num), median_of(op, den)
                ratios[f"{op}_{num}_over_{den}"] = a / b if a and b else None
    for kind, per_path in latency.items():
        def p50(name: str, per_path: dict[str, Any] = per_path) -> float | None:
            entry = per_path.get(name)
            return entry["p50_ms"]["median"] if entry and entry["p50_ms"] else None

        agent_p50 = p50(AGENT)
        label = "sessions back to back" if kind == "back_to_back" else \
            f"{args.gap_ms:g} ms idle before each session"
        goals.append({"goal": f"set-up p50 (agent, {label}) <= {SETUP_P50_GOAL_MS} ms",
                      "value": agent_p50, "unit": "ms",
                      "status": "PASS" if agent_p50 is not None
                      and agent_p50 <= SETUP_P50_GOAL_MS else "MISS"})
        for ref in (SSH, SSH_SAME):
            other = p50(ref)
            ratios[f"setup_p50_{kind}_agent_over_{ref}"] = (
                agent_p50 / other if agent_p50 and other else None)
        for num, den in PEER_RATIOS:
            if den in per_path:
                a, b = p50(num), p50(den)
                ratios[f"setup_p50_{kind}_{num}_over_{den}"] = a / b if a and b else None

    return {
        **result_head("agent_vs_openssh", bench),
        "conditions": conditions(bench),
        "paths": {name: {"label": LABELS[name], "cipher": p.cipher, "port_on_server": p.port,
                         "argv": p.argv} for name, p in bench.paths.items()},
        "throughput": throughput,
        "setup_latency": latency,
        "ratios": ratios,
        "goals": goals,
        "agent_health": health,
        "sshd_log_lines_during_measurement": sshd_lines,
        "machine_cpu_during_measurement": machine,
        "anomalies": bench.anomalies,
    }


def conditions(bench: AgentRun) -> dict[str, Any]:
    args = bench.args
    order = ",".join(bench.paths)
    return {
        **machine_conditions(args.python, bench.loadavg_at_start),
        "bytes": args.bytes,
        "runs": args.runs,
        "setup_sessions_per_run": args.sessions,
        "gap_sessions_per_run": args.gap_sessions,
        "gap_ms": args.gap_ms,
        "directions": ["push"] + ([] if args.no_reverse else ["pull"]),
        "chunk_bytes": CHUNK,
        "ciphers": {name: p.cipher for name, p in bench.paths.items()},
        "mb": "10^6 bytes",
        "order": f"per run: push {order}; pull {order}; back-to-back sessions {order}; "
                 f"idle-gap sessions {order}. A warm-up of 64 MiB each way and 20 sessions "
                 "per path comes first and is not recorded",
        # the Python peers: their venv, versions (asyncssh, sshtunnel, paramiko and the
        # cryptography they use), and any skipped with its reason
        "peers": {
            "venv": bench.peers.get("venv"),
            "versions": bench.peers.get("versions") or {},
            "skipped": bench.peers.get("skipped") or {},
            "local_forwards": [name for name in LOCAL if name in bench.paths],
        },
    }


LATENCY_TITLES = {
    "back_to_back": "New-session set-up latency, sessions back to back (connect, 1 byte, "
                    "1-byte echo, close)",
    "idle_gap": "The same with the link idle before each session ({gap:g} ms)",
}


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    dirty, changes = uncommitted(res, "the agent started")
    tp = res["throughput"]
    r = res["ratios"]
    out = [
        f"# labrelay agent vs OpenSSH `ssh -N -R` — {res['date']}, commit "
        f"`{res['commit']}`{dirty}",
        "",
        *changes,
        conditions_text(c) +
        f"{c['bytes'] / MiB:g} MiB per transfer, {c['runs']} runs interleaved path by path; "
        "figures are the median (min–max) over the runs; MB = 10^6 bytes; CPU is user+system "
        "seconds of the forwarding process (agent, ssh or the Python peer) and of its sshd "
        "session processes.",
        *peers_text(c.get("peers")),
        "",
        "## Throughput",
        "",
        "| path | cipher | push MB/s | pull MB/s | forwarder CPU s/GiB push / pull "
        "| forwarder busy share of a core, push / pull | sshd CPU s/GiB push / pull |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in res["paths"].items():
        push = tp.get("push", {}).get(name, {})
        pull = tp.get("pull", {}).get(name, {})
        if name == DIRECT:
            fcpu = share = scpu = "–"
        else:
            fcpu = (f"{fmt(push.get('forwarder_cpu_s_per_gib'), 2)} / "
                    f"{fmt(pull.get('forwarder_cpu_s_per_gib'), 2)}")
            share = (f"{fmt(push.get('forwarder_core_share'), 2)} / "
                     f"{fmt(pull.get('forwarder_core_share'), 2)}")
            scpu = (f"{fmt(push.get('sshd_cpu_s_per_gib'), 2)} / "
                    f"{fmt(pull.get('sshd_cpu_s_per_gib'), 2)}")
        out.append(f"| {p['label']} | {p['cipher']} | {fmt(push.get('mb_per_s'))} "
                   f"| {fmt(pull.get('mb_per_s'))} | {fcpu} | {share} | {scpu} |")
    out += ["", "Agent ÷ ssh, throughput: " + "; ".join(
        f"{op} {fmt_ratio(r.get(f'{op}_agent_over_ssh'))} (default cipher), "
        f"{fmt_ratio(r.get(f'{op}_agent_over_ssh-same'))} (same cipher)" for op in tp) + "."]
    out += peer_ratio_lines(r, [f"{op}_" for op in tp], "throughput")
    for kind, per_path in res["setup_latency"].items():
        first = next((v for v in per_path.values() if v), None)
        n = first["sessions_per_run"] if first else 0
        out += ["", "## " + LATENCY_TITLES[kind].format(gap=c.get("gap_ms", 0)), "",
                f"{n} sessions per path per run.", "",
                "| path | p50 ms | p99 ms | max ms | all sessions: p90 ms, > 20 ms "
                "| forwarder CPU ms/session |",
                "|---|---|---|---|---|---|"]
        for name, p in res["paths"].items():
            lat = per_path.get(name) or {}
            pooled = lat.get("pooled") or {}
            over = (f"{pooled['p90_ms']:.2f}, {pooled['over_20ms']}/{pooled['sessions']}"
                    if pooled else "n/a")
            cpu = "–" if name == DIRECT else fmt(lat.get("forwarder_cpu_ms_per_session"), 3)
            out.append(f"| {p['label']} | {fmt(lat.get('p50_ms'), 2)} "
                       f"| {fmt(lat.get('p99_ms'), 2)} | {fmt(lat.get('max_ms'), 2)} "
                       f"| {over} | {cpu} |")
        out += ["", f"Agent ÷ ssh, set-up p50: "
                f"{fmt_ratio(r.get(f'setup_p50_{kind}_agent_over_ssh'))} (default cipher), "
                f"{fmt_ratio(r.get(f'setup_p50_{kind}_agent_over_ssh-same'))} (same cipher)."]
        out += peer_ratio_lines(r, [f"setup_p50_{kind}_"], "set-up p50")
    out += goals_table(res["goals"])
    m = res.get("machine_cpu_during_measurement")
    if m:
        out += ["", machine_text(m, c["nproc"], "processes (the rest is mostly loopback TCP "
                                 "softirq work, plus anything else running)")]
    h = res["agent_health"]
    out += ["", "Agent process (RSS KiB, peak RSS KiB, open fds): ready "
            f"{h.get('agent_ready')}, after warm-up {h.get('agent_after_warmup')}, "
            f"end {h.get('agent_end')}.", ""]
    out += anomaly_lines(res["anomalies"], "No anomalies: every transfer arrived complete, no "
                         f"session failed or stalled past {STALL_SECONDS:g} s, the agent logged "
                         "no warning or error, and sshd logged nothing during the measurements.")
    out += ["What bounds each figure, and how to reproduce: `docs/benchmarks.md`.", ""]
    return "\n".join(out)


PEER_NAMES = {ASYNCSSH: "asyncssh", SSHTUNNEL: "sshtunnel", SSH_L: "ssh -L"}


def peers_text(peers: dict[str, Any] | None) -> list[str]:
    """The report's paragraph on the Python peers: versions, what sshtunnel forwards,
    and any peer skipped with its reason."""
    if not peers:
        return []
    v = peers.get("versions") or {}
    measured = [f"{name} {v[name]}" for name in ("asyncssh", "sshtunnel") if v.get(name)
                and name not in (peers.get("skipped") or {})]
    lines = [""]
    if measured:
        extra = (f" (paramiko {v['paramiko']})" if v.get("paramiko") and "sshtunnel"
                 not in (peers.get("skipped") or {}) else "")
        lines.append(
            f"Python peers, in their own venv (`{peers.get('venv')}`, cryptography "
            f"{v.get('cryptography', '?')}): {', '.join(measured)}{extra}, each with its "
            "defaults. asyncssh does the same reverse forward (`forward_remote_port`) as "
            "the agent and `ssh -R`; sshtunnel has only local forwards, so it is a `-L` "
            "(listener on the client's side, the sshd connects to the target) and is "
            "set beside `ssh -N -L`, not the reverse forwards. Its host key is not checked, and "
            "its pushes tell the sink their byte count first: sshtunnel closes the whole "
            "channel when the client half-closes, so the sink's count would never come back.")
    for name, reason in (peers.get("skipped") or {}).items():
        lines.append(f"Skipped: {name} ({reason.splitlines()[0] if reason else '?'}).")
    return lines if len(lines) > 1 else []


def peer_ratio_lines(r: dict[str, Any], prefixes: list[str], what: str) -> list[str]:
    """``Agent ÷ asyncssh ...`` for the peer ratios that this result has."""
    parts = []
    for num, den in PEER_RATIOS:
        vals = [(p, r.get(f"{p}{num}_over_{den}")) for p in prefixes
                if f"{p}{num}_over_{den}" in r]
        if not vals:
            continue
        text = ", ".join((f"{p.rstrip('_')} " if len(prefixes) > 1 else "") + fmt_ratio(x)
                         for p, x in vals)
        parts.append(f"{'agent' if num == AGENT else PEER_NAMES[num]} ÷ {PEER_NAMES[den]} "
                     f"{text}")
    if not parts:
        return []
    return ["", f"Python peers, {what}: " + "; ".join(parts) + "."]


def print_table(res: dict[str, Any]) -> None:
    tp = res["throughput"]
    lat = res["setup_latency"]
    kinds = list(lat)
    print()
    head = f"{'path':40} {'push MB/s':>22} {'pull MB/s':>22} {'CPU s/GiB':>10}"
    for kind in kinds:
        head += f" {'p50/p99 ms ' + ('b2b' if kind == 'back_to_back' else 'gap'):>17}"
    print(head)
    for name, p in res["paths"].items():
        push = tp.get("push", {}).get(name, {})
        pull = tp.get("pull", {}).get(name, {})
        cpu = push.get("forwarder_cpu_s_per_gib")
        cpu_text = format(cpu["median"], ".2f") if cpu else "-"
        line = (f"{p['label']:40} {fmt(push.get('mb_per_s')):>22} "
                f"{fmt(pull.get('mb_per_s')):>22} {cpu_text:>10}")
        for kind in kinds:
            entry = lat[kind].get(name)
            cell = (f"{entry['p50_ms']['median']:.2f}/{entry['p99_ms']['median']:.2f}"
                    if entry else "n/a")
            line += f" {cell:>17}"
        print(line)
    print_goals(res)
