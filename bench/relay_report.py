"""The relay bench's paths, goals and report: its summary of a run, the markdown report and
the table it prints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from bench import agent_report
from bench.procs import (
    run_text,
)
from bench.report import (
    anomaly_lines,
    conditions_text,
    fmt,
    fmt_ratio,
    goals_table,
    machine_text,
    per_run_latency,
    pooled_latency,
    print_goals,
    result_head,
    spread,
    uncommitted,
)
from bench.runs import RelayRun
from bench.sessions import (
    STALL_SECONDS,
    GiB,
    MiB,
)

THROUGHPUT_GOAL = 0.75  # relay+agent / ssh -N -R (default cipher), from issues 3 and 6
SETUP_P50_GOAL_MS = 2.0
IDLE_KIB_GOAL = 10.0  # per session, each of relay and agent
ECHO_P99_GOAL_MS = 20.0
RELAY, RELAY_L, SSH, SSH_AES, DIRECT = "relay", "relay-L", "ssh", "ssh-aes", "direct"
LABELS = {
    RELAY: "relay+agent, public port",
    RELAY_L: "relay+agent, user's ssh -L",
    SSH: "ssh -R (default cipher)",
    SSH_AES: "ssh -R aes128-gcm (the link's cipher)",
    DIRECT: "direct (no tunnel)",
}


def _median(s: dict[str, float] | None) -> float | None:
    return s["median"] if s else None


def summarize(bench: RelayRun, tput: dict[str, dict[str, list[dict[str, Any]]]],
              lat: dict[str, dict[str, list[dict[str, Any]]]],
              echo: dict[str, list[dict[str, Any]]], idle: dict[str, Any],
              health: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    args = bench.args
    gib = args.bytes / GiB
    throughput: dict[str, Any] = {}
    for op, per_path in tput.items():
        throughput[op] = {}
        for name, runs in per_path.items():
            groups = list(runs[0]["cpu"]) if runs else []
            throughput[op][name] = {
                "mb_per_s": spread([args.bytes / r["seconds"] / 1e6 for r in runs]),
                "seconds": [r["seconds"] for r in runs],
                "cpu_s_per_gib": {g: spread([r["cpu"][g] / gib for r in runs])
                                  for g in groups},
                # busy share of one core: ~1.0 means that process was the bottleneck
                "core_share": {g: spread([r["cpu"][g] / r["seconds"] for r in runs])
                               for g in groups},
            }
    latency: dict[str, Any] = {}
    for kind, per_path in lat.items():
        latency[kind] = {name: _latency(runs) for name, runs in per_path.items()}
    interactive = {}
    for name, runs in echo.items():
        entry = _latency(runs)
        if entry is not None:
            entry["bulk_mb_per_s"] = spread([r["bulk_mb_per_s"] for r in runs])
        interactive[name] = entry

    def tp(op: str, name: str) -> float | None:
        return _median(throughput.get(op, {}).get(name, {}).get("mb_per_s"))

    ratios: dict[str, Any] = {}
    goals: list[dict[str, Any]] = []

    def goal(text: str, value: float | None, ok: Callable[[float], bool], unit: str = ""
             ) -> None:
        goals.append({"goal": text, "value": value, "unit": unit,
                      "status": "PASS" if value is not None and ok(value) else "MISS"})

    for op in throughput:
        for name in (RELAY, RELAY_L):
            for ref in (SSH, SSH_AES):
                a, b = tp(op, name), tp(op, ref)
                ratios[f"{op}_{name}_over_{ref}"] = a / b if a and b else None
            value = ratios[f"{op}_{name}_over_{SSH}"]
            goal(f"throughput {op}: {LABELS[name]} / ssh -R (default cipher) "
                 f">= {THROUGHPUT_GOAL}", value, lambda v: v >= THROUGHPUT_GOAL)
    for kind, per_path in latency.items():
        label = "back to back" if kind == "back_to_back" else f"{args.gap_ms:g} ms idle before"
        for name in (RELAY, RELAY_L):
            entry = per_path.get(name)
            value = _median(entry["p50_ms"]) if entry else None
            goal(f"set-up p50, {label}: {LABELS[name]} <= {SETUP_P50_GOAL_MS:g} ms", value,
                 lambda v: v <= SETUP_P50_GOAL_MS, "ms")
            ref = per_path.get(SSH)
            refv = _median(ref["p50_ms"]) if ref else None
            ratios[f"setup_p50_{kind}_{name}_over_{SSH}"] = (
                value / refv if value and refv else None)
    for name, entry in idle.items():
        if name != RELAY or entry is None:  # the goal is judged on the first round
            continue
        for proc in ("relay", "agent"):
            goal(f"{args.idle_sessions} idle sessions: {proc} memory per session "
                 f"<= {IDLE_KIB_GOAL:g} KiB", entry["kib_per_session"].get(proc),
                 lambda v: v <= IDLE_KIB_GOAL, "KiB")
    for name in (RELAY, RELAY_L):
        entry = interactive.get(name)
        value = _median(entry["p99_ms"]) if entry else None
        goal(f"echo p99 under bulk on the same link: {LABELS[name]} "
             f"<= {ECHO_P99_GOAL_MS:g} ms", value, lambda v: v <= ECHO_P99_GOAL_MS, "ms")
        ref = interactive.get(SSH)
        refv = _median(ref["p99_ms"]) if ref else None
        ratios[f"echo_p99_{name}_over_{SSH}"] = value / refv if value and refv else None

    cond = agent_report.conditions(bench)
    cond.update({
        "order": "fresh processes: 20 warm-up sessions per path; then "
                 f"{args.idle_sessions} idle sessions through relay, then through ssh; "
                 "64 MiB each way per path (warm-up, not recorded); then per run: push "
                 "a,b,c,d,e; pull a,b,c,d,e; back-to-back sessions a..e; idle-gap sessions "
                 "a..e; echo under bulk a..e",
        "idle_sessions": args.idle_sessions, "idle_in_flight": args.in_flight,
        "idle_settle_s": args.settle,
        "echoes_per_run": args.echoes, "echo_gap_ms": args.echo_gap_ms,
        "rlimit_nofile": {name: _nofile(pid) for name, pid in bench.process_pids().items()},
        "relay_argv": bench.relay_argv, "agent_argv": bench.agent_argv,
        "link_cipher": bench.link_cipher,
        "relay_window": "default (2 MiB per channel, 32 KiB packets)",
    })
    return {
        **result_head("relay_vs_openssh", bench),
        "conditions": cond,
        "paths": {name: {"label": LABELS[name], "cipher": p.cipher, "port": p.port,
                         "echo_port": p.echo_port, "argv": p.argv,
                         "cpu_groups": list(p.groups)}
                  for name, p in bench.paths.items()},
        "throughput": throughput,
        "setup_latency": latency,
        "interactive_under_bulk": interactive,
        "idle_sessions": idle,
        "ratios": ratios,
        "goals": goals,
        "process_health": health,
        "machine_cpu_during_measurement": machine,
        "anomalies": bench.anomalies,
    }


def _latency(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    samples = [r["ms"] for r in runs]
    pooled = [x for s in samples for x in s]
    groups = list(runs[0]["cpu"])
    return {
        "samples_per_run": len(samples[0]),
        **per_run_latency(samples),
        "pooled": {"samples": len(pooled), **pooled_latency(pooled)},
        "cpu_ms_per_sample": {g: spread([r["cpu"][g] * 1000 / len(r["ms"]) for r in runs])
                              for g in groups},
        "ms": [[round(x, 3) for x in s] for s in samples],
    }


def listen_overflows() -> int:
    """TcpExt ListenOverflows (machine-wide): SYNs dropped because a listen backlog was full."""
    with contextlib.suppress(OSError, ValueError), open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            if head.startswith("TcpExt:"):
                table = dict(zip(head.split()[1:], values.split()[1:], strict=True))
                return int(table["ListenOverflows"])
    return -1


def listen_backlog(port: int) -> int | None:
    """The accept backlog of the socket listening on 127.0.0.1:``port`` (``ss``'s Send-Q)."""
    out = run_text(["ss", "-Hltn", f"sport = :{port}"])
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "LISTEN":
            return int(fields[2])
    return None


def _nofile(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
    return "?"


def _cpu_cell(entry: dict[str, Any], key: str = "cpu_s_per_gib") -> str:
    groups = entry.get(key) or {}
    return ", ".join(f"{g} {fmt(s, 2)}" for g, s in groups.items()) or "–"


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    dirty, changes = uncommitted(res, "the run started")
    r = res["ratios"]
    out = [
        f"# labrelay relay + agent vs OpenSSH `ssh -N -R` — {res['date']}, commit "
        f"`{res['commit']}`{dirty}",
        "",
        *changes,
        conditions_text(c) +
        f"{c['bytes'] / MiB:g} MiB per transfer, {c['runs']} runs interleaved path by path; "
        "figures are the median (min–max) over the runs; MB = 10^6 bytes, KiB = 1024 bytes; "
        "CPU is user+system seconds from /proc/PID/stat. Everything on 127.0.0.1: one "
        "`labrelay relay` process, one `labrelay agent` process holding one SSH link to it "
        f"({c['link_cipher']}), a private OpenSSH `sshd` for the `ssh -R` paths. "
        f"RLIMIT_NOFILE of relay/agent: {c['rlimit_nofile']}.",
        "",
        "| path | what carries it | cipher |",
        "|---|---|---|",
    ]
    carriers = {
        RELAY: "client → relay public port → agent link channel → target",
        RELAY_L: "client → user's `ssh -N -L …:bulk:9000` → relay → agent link → target",
        SSH: "client → sshd's `-R` port → ssh -N -R → target",
        SSH_AES: "the same, `-c aes128-gcm@openssh.com` (the cipher of labrelay's link)",
        DIRECT: "client → target",
    }
    for name, p in res["paths"].items():
        out.append(f"| {p['label']} | {carriers[name]} | {p['cipher']} |")
    tp = res["throughput"]
    out += ["", "## Throughput", "",
            "| path | push MB/s | pull MB/s | CPU s/GiB push | CPU s/GiB pull "
            "| busy share of a core, push |",
            "|---|---|---|---|---|---|"]
    for name, p in res["paths"].items():
        push = tp.get("push", {}).get(name, {})
        pull = tp.get("pull", {}).get(name, {})
        out.append(f"| {p['label']} | {fmt(push.get('mb_per_s'))} "
                   f"| {fmt(pull.get('mb_per_s'))} | {_cpu_cell(push)} | {_cpu_cell(pull)} "
                   f"| {_cpu_cell(push, 'core_share')} |")
    out += ["", "Ratios to `ssh -R` (default cipher / the link's aes128-gcm): " + "; ".join(
        f"{op} {LABELS[n]} {fmt_ratio(r.get(f'{op}_{n}_over_{SSH}'))} / "
        f"{fmt_ratio(r.get(f'{op}_{n}_over_{SSH_AES}'))}" for op in tp for n in (RELAY, RELAY_L))
        + "."]
    titles = {"back_to_back": "New-session set-up latency, back to back (connect, 1 byte, "
                              "1-byte echo, close)",
              "idle_gap": f"The same with {c['gap_ms']:g} ms idle before each session"}
    for kind, per_path in res["setup_latency"].items():
        first = next((v for v in per_path.values() if v), None)
        n = first["samples_per_run"] if first else 0
        out += ["", "## " + titles[kind], "", f"{n} sessions per path per run.", "",
                "| path | p50 ms | p99 ms | max ms | all runs: p90 ms, > 20 ms "
                "| CPU ms/session |", "|---|---|---|---|---|---|"]
        out += _latency_rows(res, per_path)
    ia = res["interactive_under_bulk"]
    first = next((v for v in ia.values() if v), None)
    out += ["", "## Interactive echo while another session pushes bulk on the same link", "",
            f"{first['samples_per_run'] if first else 0} round trips of 1 byte, "
            f"{c['echo_gap_ms']:g} ms apart, on one session to the echo target, while a second "
            "session of the same path pushes into the sink without pause (for the relay paths "
            "both cross the one agent link; for ssh -R both ride one ssh connection; relay-L "
            "uses two users' ssh -L, alice's bulk and bob's echo).", "",
            "| path | p50 ms | p99 ms | max ms | all runs: p90 ms, > 20 ms | CPU ms/echo "
            "| bulk meanwhile MB/s |", "|---|---|---|---|---|---|---|"]
    rows = _latency_rows(res, ia)
    for i, name in enumerate(n for n in res["paths"]):
        entry = ia.get(name)
        rows[i] += f" {fmt(entry.get('bulk_mb_per_s')) if entry else 'n/a'} |"
    out += rows
    idle = res["idle_sessions"]
    if idle:
        out += ["", f"## {c['idle_sessions']} concurrent idle sessions on one link", "",
                f"Fresh processes (after 20 warm-up sessions, before any bulk): the client opens "
                f"{c['idle_sessions']} TCP connections to the path's echo port, at most "
                f"{c['idle_in_flight']} not yet confirmed at a time; each counts once the "
                "target's 1-byte greeting has come back through the path; the target holds "
                "them all. RSS from /proc/PID/status before and with them open "
                f"({c['idle_settle_s']:g} s after the last one), then all are closed.", "",
                "| path | held | open rate /s | greeting p50 / p99 / max ms, > 0.9 s "
                "| KiB per session "
                "| fds per session | CPU s to open all | RSS KiB before → with → after close |",
                "|---|---|---|---|---|---|---|---|"]
        for name, e in idle.items():
            if e is None:
                continue
            kib = ", ".join(f"{k} {v:.2f}" for k, v in e["kib_per_session"].items()
                            if v is not None)
            fds = ", ".join(f"{k} {v:.2f}" for k, v in e["fds_per_session"].items()
                            if v is not None and not k.startswith("sshd "))
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in e["cpu_s_opening"].items())
            rss = "; ".join(
                f"{k} {e['before'][k].get('vmrss_kib')} → {e['during'][k].get('vmrss_kib')} → "
                f"{e['after'][k].get('vmrss_kib')}" for k in e["before"])
            g = e.get("greeting_ms") or {}
            label = LABELS[e["path"]] + name.removeprefix(e["path"])
            out.append(f"| {label} | {e['held_at_target']}/{e['requested']} "
                       f"| {e['sessions_per_s'] or 0:.0f} "
                       f"| {g.get('p50', 0):.1f} / {g.get('p99', 0):.1f} / {g.get('max', 0):.0f}, "
                       f"{e.get('greetings_over_900ms')} | {kib} | {fds} "
                       f"| {cpu} | {rss} |")
        out += ["", "Listen backlog of the port the idle sessions connect to (`ss` Send-Q): "
                + ", ".join(f"{k} {e.get('listen_backlog')}" for k, e in idle.items() if e)
                + "; SYNs dropped on a full backlog while opening (TcpExt ListenOverflows, "
                "machine-wide): " + ", ".join(
                    f"{k} {e.get('listen_overflows_machine_wide')}"
                    for k, e in idle.items() if e) + ". A dropped SYN is retried after 1 s, "
                "which is what greetings over 0.9 s are."]
    out += goals_table(res["goals"])
    m = res.get("machine_cpu_during_measurement")
    if m:
        out += ["", machine_text(m, c["nproc"], "processes (the rest is mostly loopback TCP "
                                 "softirq work, plus whatever else ran)")]
    h = res["process_health"]
    out += ["", "Relay and agent (RSS KiB, peak RSS KiB, fds): " + "; ".join(
        f"{stage} " + ", ".join(f"{p} {v.get('vmrss_kib')}/{v.get('vmhwm_kib')}/{v.get('fds')}"
                                for p, v in procs.items())
        for stage, procs in h.items() if stage in ("ready", "after_idle", "after_warmup_bulk")
        or stage == f"after_run_{c['runs']}") + ".", ""]
    out += anomaly_lines(res["anomalies"], "No anomalies: every transfer arrived complete, "
                         "every idle session reached the target, no session failed or stalled "
                         f"past {STALL_SECONDS:g} s, relay and agent logged no warning or error, "
                         "and sshd logged nothing.")
    out += ["What bounds each figure, and how to reproduce: `docs/benchmarks.md`.", ""]
    return "\n".join(out)


def _latency_rows(res: dict[str, Any], per_path: dict[str, Any]) -> list[str]:
    rows = []
    for name, p in res["paths"].items():
        lat = per_path.get(name) or {}
        pooled = lat.get("pooled") or {}
        over = (f"{pooled['p90_ms']:.2f}, {pooled['over_20ms']}/{pooled['samples']}"
                if pooled else "n/a")
        cpu = ", ".join(f"{g} {fmt(s, 3)}" for g, s in
                        (lat.get("cpu_ms_per_sample") or {}).items()) or "–"
        rows.append(f"| {p['label']} | {fmt(lat.get('p50_ms'), 2)} "
                    f"| {fmt(lat.get('p99_ms'), 2)} | {fmt(lat.get('max_ms'), 2)} "
                    f"| {over} | {cpu} |")
    return rows


def print_table(res: dict[str, Any]) -> None:
    tp, lat, ia = res["throughput"], res["setup_latency"], res["interactive_under_bulk"]
    print()
    print(f"{'path':32} {'push MB/s':>22} {'pull MB/s':>22} {'set-up p50/p99':>15} "
          f"{'echo p50/p99 ms':>16}  CPU s/GiB push")
    for name, p in res["paths"].items():
        push = tp.get("push", {}).get(name, {})
        pull = tp.get("pull", {}).get(name, {})
        s = lat.get("back_to_back", {}).get(name)
        e = ia.get(name)
        setup = f"{s['p50_ms']['median']:.2f}/{s['p99_ms']['median']:.2f}" if s else "n/a"
        echo = f"{e['p50_ms']['median']:.2f}/{e['p99_ms']['median']:.2f}" if e else "n/a"
        cpu = ", ".join(f"{g} {v['median']:.2f}" for g, v in
                        (push.get("cpu_s_per_gib") or {}).items() if v)
        print(f"{p['label']:32} {fmt(push.get('mb_per_s')):>22} "
              f"{fmt(pull.get('mb_per_s')):>22} {setup:>15} {echo:>16}  {cpu}")
    for name, e in res["idle_sessions"].items():
        if e:
            kib = ", ".join(f"{k} {v:.2f}" for k, v in e["kib_per_session"].items()
                            if v is not None and not k.startswith("sshd "))
            print(f"{e['held_at_target']} idle sessions via {name}: KiB/session {kib}")
    print_goals(res)
