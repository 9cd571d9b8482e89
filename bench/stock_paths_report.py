"""The stock-paths bench's variants, goals and report (``bench.stock_paths``): the
statistics over its samples, the Markdown, and the AEADs' own cost, measured apart."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bench import fast_path_report as fpr
from bench.report import fmt, machine_conditions, per_run_latency, result_head, spread
from bench.runs import StockRun
from bench.sessions import REPO, GiB, MiB

J_RATIO_GOAL = 0.55  # ssh -J session ÷ direct
L_RATIO_GOAL, L_RATIO_MOONSHOT = 1.0, 1.3  # ssh -L bulk, relay ÷ seed
J_CPU_GOAL = 1.0  # relay CPU-s/GiB on -J
SETUP_GOAL_MS = 2.0  # set-up p50 after the idle gap, relay + agent

SSH, RAW = "ssh", "raw"
DIRECT = "direct"
RELAY_J, RELAY_J_LINK, SEED_J = "relay_J", "relay_J_link", "seed_J"
RELAY_J_CHACHA = "relay_J_chacha"  # the same as relay_J with chacha20-poly1305 to the relay
FAST = "fast"  # the same session through labrelay connect (the fast path), for reference
RELAY_L, RELAY_L_E2E, SEED_L = "relay_L", "relay_L_e2e", "seed_L"
VARIANTS = {SSH: (DIRECT, RELAY_J, RELAY_J_CHACHA, RELAY_J_LINK, SEED_J, FAST),
            RAW: (DIRECT, RELAY_L, RELAY_L_E2E, SEED_L)}
LABELS = {
    (SSH, DIRECT): "ssh direct to the target",
    (SSH, RELAY_J): "ssh -J alice@relay gpu-cluster (e2e: pooled data connection)",
    (SSH, RELAY_J_CHACHA): "the same, chacha20-poly1305 to the relay (-J host's Ciphers)",
    (SSH, RELAY_J_LINK): "ssh -J alice@relay gpu-chan (not e2e: channel on the link)",
    (SSH, SEED_J): "the seed: ssh -J cloud -p PUB (cloud sshd + ssh -N -R)",
    (SSH, FAST): "for reference: ssh with ProxyCommand labrelay connect (fast path, spliced)",
    (RAW, DIRECT): "direct loopback (client worker → target)",
    (RAW, RELAY_L): "user's ssh -L to web:80 through relay + agent (not e2e: link)",
    (RAW, RELAY_L_E2E): "user's ssh -L to web-e2e:80 (e2e: pooled data connection)",
    (RAW, SEED_L): "the seed: user's ssh -L to the cloud's -R port (cloud sshd + ssh -N -R)",
}
PROCS = {"relay": "relay", "agent": "agent", "user_ssh": "user's ssh (with its -J child)",
         "ssh_R": "ssh -N -R (lab_pc)", "cloud_sshd_R": "cloud sshd session of the -R",
         "cloud_sshd_user": "cloud sshd session of the user's jump or -L"}
E2E = ("gpu-cluster:22", "web-e2e:80")
SERVICES = ("gpu-cluster:22", "gpu-chan:22", "web:80", "web-e2e:80")
REMOTE_COMMAND = fpr.REMOTE_COMMAND


# ---------------------------------------------------------------------------
# the AEAD ciphers' own cost, in the relay's code


AEAD_PROBE = """
import os, sys, time
from relay.ssh import aead
packet, n = 32 * 1024, int(sys.argv[1])  # 8192: 256 MiB in 32 KiB packets
plain = os.urandom(packet)
out = {}
for name, make in (("aes128-gcm@openssh.com", lambda: aead.GCMDirection(bytes(16), bytes(12))),
                   ("chacha20-poly1305@openssh.com", lambda: aead.ChaChaDirection(bytes(64)))):
    tx, rx = make(), make()
    sealed = [b"".join(tx.seal(i, plain)) for i in range(64)]
    t0 = time.process_time()
    for i in range(n):
        tx.seal(i, plain)
    t1 = time.process_time()
    for i in range(n):
        wire = memoryview(sealed[i % 64])
        if isinstance(rx, aead.GCMDirection):
            rx.counter = i % 64
            rx.aead.decrypt(rx.nonce(), wire[4:], wire[:4])
        else:
            rx.open(i % 64, wire[:-16], wire[-16:])
    t2 = time.process_time()
    gib = n * packet / 2 ** 30
    out[name] = {"seal": (t1 - t0) / gib, "open": (t2 - t1) / gib}
# The relay's native thread opens -J's packets with its own libcrypto (csrc/sshopen.c:
# the one built into the module from scripts/openssl, or else the system's
# libcrypto.so.3), not cryptography's bundled OpenSSL: its cost is the floor of the
# thread's CPU-s/GiB, and it differs by OpenSSL version.
from relay.datapath import _splice
from relay.ssh import gcmrun
if gcmrun.native_enabled():
    import ctypes
    ffi, lib = _splice.ffi, _splice.lib
    tx = aead.GCMDirection(bytes(16), bytes(12))
    body = bytes(4) + packet.to_bytes(4, "big") + plain  # recipient 0, data length
    pad = 16 - (2 + len(body)) % 16
    pad += 16 if pad < 4 else 0
    run = b"".join(b"".join(tx.seal(i, bytes((pad, 94)) + body + bytes(pad))) for i in range(64))
    ctx = lib.lr_gcm_new(bytes(16), 16)
    src, dst = ffi.from_buffer(run), ffi.new("unsigned char[]", len(run))
    r = ffi.new("struct lr_gcm_run *")
    t0 = time.process_time()
    for i in range(max(1, n // 64)):
        r.counter, r.fixed, r.channel, r.window = 0, 0, 0, 1 << 40
        r.max_data, r.max_packet_length = 1 << 20, 1 << 20
        lib.lr_gcm_open_run(ctx, r, src, len(run), dst, len(run))
    t1 = time.process_time()
    assert r.packets == 64, r.packets
    lib.lr_gcm_free(ctx)
    which = _splice.aead_library()
    if not which:  # a module from before it said (it loads the system's)
        crypto = ctypes.CDLL("libcrypto.so.3")
        crypto.OpenSSL_version.restype = ctypes.c_char_p
        which = crypto.OpenSSL_version(0).decode()
    opened = max(1, n // 64) * 64 * packet
    out["aes128-gcm, native thread"] = {"open": (t1 - t0) / (opened / 2 ** 30),
                                        "libcrypto": which}
print(__import__("json").dumps(out))
"""


def aead_cost(python: str, packets: int = 8192) -> dict[str, Any]:
    """CPU-s/GiB of sealing and opening 32 KiB packets with each AEAD the relay offers a
    stock ssh, in its own code (relay.ssh.aead); one process, nothing else.  Also the
    native -J thread's opening (csrc/sshopen.c) with the libcrypto it loads, and that
    libcrypto's version: the floor of the relay's CPU-s/GiB on pooled -J."""
    out = subprocess.run([python, "-c", AEAD_PROBE, str(packets)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    try:
        result: dict[str, Any] = __import__("json").loads(out.stdout)
    except ValueError:
        return {"error": out.stderr[-500:]}
    return result


# ---------------------------------------------------------------------------
# statistics and reports


def summarize(bench: StockRun, samples: dict[tuple[str, str, str], list[dict[str, Any]]],
              setups: dict[str, dict[str, list[list[float]]]],
              machine: dict[str, Any]) -> dict[str, Any]:
    args = bench.args
    gib = args.bytes / GiB
    series: list[dict[str, Any]] = []

    def ratio(key: tuple[str, str, str], over: tuple[str, str, str]) -> dict[str, float] | None:
        """``key``'s speed ÷ ``over``'s, run by run."""
        base = {r["run"]: r["seconds"] for r in samples.get(over, [])}
        return spread([base[r["run"]] / r["seconds"] for r in samples.get(key, [])
                       if r["run"] in base])

    for (workload, variant, op), runs in samples.items():
        groups = sorted(dict.fromkeys(g for r in runs for g in r["cpu"]), key=list(PROCS).index)
        series.append({
            "workload": workload, "op": op, "path": variant if workload == SSH
            else f"{variant}.{op}", "variant": variant, "label": LABELS[(workload, variant)],
            "mb_per_s": spread([args.bytes / r["seconds"] / 1e6 for r in runs]),
            "ratio_to_direct": ratio((workload, variant, op), (workload, DIRECT, op)),
            "cpu_s_per_gib": {g: spread([r["cpu"][g] / gib for r in runs if g in r["cpu"]])
                              for g in groups},
            "samples": runs,
        })

    def find(variant: str, op: str) -> dict[str, Any]:
        return next((s for s in series if s["variant"] == variant and s["op"] == op), {})

    def med(x: dict[str, Any] | None) -> float | None:
        return x["median"] if x else None

    latency = {kind: {v: per_run_latency(runs) for v, runs in per.items() if runs}
               for kind, per in setups.items()}
    ratios = {
        "J_to_direct": med(find(RELAY_J, "ssh").get("ratio_to_direct")),
        "J_link_to_direct": med(find(RELAY_J_LINK, "ssh").get("ratio_to_direct")),
        "J_chacha_to_J": med(ratio((SSH, RELAY_J_CHACHA, "ssh"), (SSH, RELAY_J, "ssh"))),
        "fast_to_direct": med(find(FAST, "ssh").get("ratio_to_direct")),
        "seed_J_to_direct": med(find(SEED_J, "ssh").get("ratio_to_direct")),
        "J_to_seed_J": med(ratio((SSH, RELAY_J, "ssh"), (SSH, SEED_J, "ssh"))),
        "L_push_to_seed": med(ratio((RAW, RELAY_L, "push"), (RAW, SEED_L, "push"))),
        "L_pull_to_seed": med(ratio((RAW, RELAY_L, "pull"), (RAW, SEED_L, "pull"))),
        "L_e2e_push_to_seed": med(ratio((RAW, RELAY_L_E2E, "push"), (RAW, SEED_L, "push"))),
        "L_e2e_pull_to_seed": med(ratio((RAW, RELAY_L_E2E, "pull"), (RAW, SEED_L, "pull"))),
    }
    goals: list[dict[str, Any]] = []
    fpr._goal(goals, f"ssh -J session through the relay ÷ direct >= {J_RATIO_GOAL}",
             ratios["J_to_direct"], J_RATIO_GOAL, True, "×")
    for op in ("push", "pull"):
        for level, target in (("goal", L_RATIO_GOAL), ("moonshot", L_RATIO_MOONSHOT)):
            fpr._goal(goals, f"ssh -L bulk {op} to a non-e2e service ÷ the seed's >= {target}",
                     ratios[f"L_{op}_to_seed"], target, True, "×", level)
    fpr._goal(goals, f"no regression: ssh via the fast path ÷ direct >= {fpr.SSH_RATIO_GOAL}",
             ratios["fast_to_direct"], fpr.SSH_RATIO_GOAL, True, "×")
    fpr._goal(goals, f"relay CPU-s/GiB on -J <= {J_CPU_GOAL}",
             med(find(RELAY_J, "ssh").get("cpu_s_per_gib", {}).get("relay")), J_CPU_GOAL,
             False, "CPU-s/GiB")
    for variant in (RELAY_L, RELAY_L_E2E):
        fpr._goal(goals, f"set-up p50 after {args.gap_ms:g} ms idle, {variant} (relay + agent) "
                        f"<= {SETUP_GOAL_MS} ms",
                 med(latency.get("idle_gap", {}).get(variant, {}).get("p50_ms")),
                 SETUP_GOAL_MS, False, "ms")
    cond = {
        **machine_conditions(args.python, bench.loadavg_at_start),
        "bytes": args.bytes, "runs": args.runs, "ciphers": bench.ciphers, "mb": "10^6 bytes",
        "order": "fresh processes; a warm-up of 64 MiB per variant and 20 set-ups per raw "
                 "path (not recorded); per run every (workload, variant, direction) in turn, "
                 "the order rotated by one every run; then the set-up rounds",
        "timing": "ssh: from 'go' to the feeder (session already up) to ssh's exit; raw: "
                  "the client worker's push (to the sink's byte count) or pull (to EOF)",
        "cpu_method": "utime+stime from /proc/PID/stat (all threads) of relay, agent, "
                      "ssh -N -R, the cloud sshd sessions of the -R and of the user's jump "
                      "or -L, read when the stream starts and when it ends",
        "gap_ms": args.gap_ms, "setup_sessions": args.sessions,
        "gap_sessions": args.gap_sessions, "e2e_services": list(E2E),
        "relay_argv": bench.relay_argv, "agent_argv": bench.agent_argv,
        "user_ssh_argv": {v: bench.user_ssh(v, Path("-")) for v in VARIANTS[SSH]},
        "events": dict(sorted(bench.events.items())),
    }
    return {**result_head("stock_paths", bench), "conditions": cond, "series": series,
            "setup_latency": latency, "ratios": ratios, "goals": goals,
            "machine_cpu_during_measurement": machine, "anomalies": bench.anomalies}


def _cpu(entry: dict[str, Any]) -> str:
    cells = [f"{g} {fmt(s, 2)}" for g, s in (entry.get("cpu_s_per_gib") or {}).items() if s]
    return ", ".join(cells) or "–"


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    out = [f"# Stock OpenSSH paths: ssh -J and ssh -L through the relay vs the seed's way "
           f"({res['date']}, commit {res['commit']})", "",
           f"{c.get('cpu_model')}, {c.get('nproc')} CPUs, load at start "
           f"{c.get('loadavg_at_start')}, TCP congestion control "
           f"{c.get('tcp_congestion_control', '?')}; {c['bytes'] // MiB} MiB per transfer, "
           f"{c['runs']} "
           "runs; side by side in one run on one shared machine: compare ratios, not MB/s "
           "across runs.", "", f"Ciphers: {c['ciphers']}", "",
           "| workload | path | MB/s | × direct | CPU-s/GiB during the stream |",
           "|---|---|---|---|---|"]
    for s in res["series"]:
        op = "" if s["workload"] == SSH else f" ({s['op']})"
        out.append(f"| {s['workload']}{op} | {s['label']} | {fmt(s['mb_per_s'])} | "
                   f"{fmt(s['ratio_to_direct'], 2)} | {_cpu(s)} |")
    out += ["", "Ratios (run by run, medians): " + ", ".join(
        f"{k} {v:.2f}" for k, v in res["ratios"].items() if v is not None), "",
        "| set-up (1-byte echo through a new connection) | path | p50 ms | p99 ms |",
        "|---|---|---|---|"]
    for kind, per in res["setup_latency"].items():
        for v, s in per.items():
            out.append(f"| {kind.replace('_', ' ')} | {LABELS[(RAW, v)]} | "
                       f"{fmt(s['p50_ms'], 2)} | {fmt(s['p99_ms'], 2)} |")
    aead = res.get("aead_cpu_s_per_gib") or {}
    if aead and "error" not in aead:
        out += ["", "The AEADs' own cost in relay.ssh.aead (32 KiB packets, one process): " +
                "; ".join(f"{k} seal {v['seal']:.2f}, open {v['open']:.2f} CPU-s/GiB"
                          for k, v in aead.items() if "seal" in v)]
        out += [f"{k} (the -J thread's floor): open {v['open']:.2f} CPU-s/GiB with "
                f"{v['libcrypto']}" for k, v in aead.items() if "seal" not in v]
    out += ["", "| goal | value | status |", "|---|---|---|"]
    partial = bool(res.get("conditions", {}).get("only"))
    for g in res["goals"]:
        v = "–" if g["value"] is None else f"{g['value']:.2f} {g['unit']}"
        # A figure with no value is a MISS in a full run (its measurement failed); in a
        # run of some variants only (--only) it was not measured.
        status = "not run (--only)" if partial and g["value"] is None else g["status"]
        out.append(f"| {g['goal']} ({g['level']}) | {v} | {status} |")
    if res["anomalies"]:
        out += ["", "Anomalies:", ""] + [f"- {a[:500]}" for a in res["anomalies"]]
    return "\n".join(out) + "\n"


def print_table(res: dict[str, Any]) -> None:
    print(markdown(res))
