"""labrelay's relay + agent against stock OpenSSH ``ssh -N -R``, side by side in one run.

A real ``labrelay relay`` process (the cloud end) and a real ``labrelay agent``
process (the lab end) hold one SSH link; the agent registers the named services
``bulk:9000`` and ``echo:7`` and two granted public ports, all pointing at target
processes on loopback. Paths from a client process to those targets:

* ``relay``       the relay's public port: relay -> agent's channel -> target (the pure
  relay+agent figure: no user-side ssh);
* ``relay-L``     a stock ``ssh -N -L LOCAL:bulk:9000 alice@relay`` (and a second user's
  ``ssh -N -L LOCAL:echo:7 bob@relay``): the user's ssh adds its own cost;
* ``ssh``         ``ssh -N -R PORT:127.0.0.1:TARGET`` to a private OpenSSH ``sshd``, OpenSSH's
  default cipher (the issue's baseline);
* ``ssh-aes``     the same with ``-c aes128-gcm@openssh.com``, the relay link's cipher;
* ``direct``      the client straight to the target: the harness's own ceiling.

Measured, path by path within each run so machine noise hits all alike: bulk throughput
each way with the CPU seconds per GiB of every forwarding process; new-session set-up
latency; interactive 1-byte echo round trips while another session on the same link
pushes bulk. Once, on fresh processes: 10 000 concurrent idle sessions through the relay's
public port (each confirmed end to end by a 1-byte greeting from the target), with the
relay's and the agent's RSS per session, and the same through ``ssh -R``.

The sshd set-up (``bench/sshd.py``), process plumbing (``bench/procs.py``), CPU
accounting (``bench/meter.py``) and the push/pull/set-up client code
(``bench/sessions.py``) are shared, the measurement loop from ``bench/agent_vs_openssh.py``.

Run from the repository root with the venv's Python::

    python -m bench.relay_vs_openssh            # 1 GiB x 5 runs
    python -m bench.relay_vs_openssh --quick    # 256 MiB x 3 runs

Results: a table on stdout, ``bench/results/relay_vs_openssh-latest.json`` and
``bench/results/relay_vs_openssh-latest.md`` (overwritten), and a line in
``bench/results/history.jsonl``. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import (
    add_python_and_results,
    add_run_options,
    add_session_options,
    bench_parser,
    quick_defaults,
    run_bench,
)
from bench.meter import MachineMeter, cpu_note, cpu_seconds, proc_health
from bench.procs import (
    BenchError,
    json_event,
)
from bench.relay_report import (
    RELAY,
    RELAY_L,
    SSH,
    listen_backlog,
    listen_overflows,
    markdown,
    print_table,
    summarize,
)
from bench.relay_setup import (
    PATHS,
    WORKERS,
    RelayPeers,
    Route,
)
from bench.relay_workers import (
    bulk_worker,
    client_worker,
    greeter_worker,
    raise_nofile,
)
from bench.report import (
    pctl,
)
from bench.sessions import (
    STALL_SECONDS,
    MiB,
)
from bench.sshd import Route as BaseRoute

# 10 000 idle sessions: through the relay twice (the second round shows whether the
# first one's memory is reused, i.e. nothing leaked), then through ssh -R
IDLE_ROUNDS = ((RELAY, "relay"), (RELAY, "relay, 2nd round"), (SSH, "ssh"))


class RelayBench(RelayPeers):
    """The measurements over :class:`~bench.relay_setup.RelayPeers`' processes (their
    set-up is there): bulk, set-up latency, echo under bulk, idle sessions."""

    MAX_MS_WIDTH = 7

    def diagnose(self, path: BaseRoute, what: str, error: str) -> str:
        text = super().diagnose(path, what, error)
        extra = []
        if path.name in (RELAY, RELAY_L):
            for name, pid in self.process_pids().items():
                extra.append(f"  {name} pid {pid}: {proc_health(pid)}")
            for name, log in (("relay", self.relay_log), ("agent", self.agent_log)):
                if log is not None:
                    extra.append(f"  {name} last output:\n    "
                                 + log.text(10).replace("\n", "\n    "))
        return "\n".join([text, *extra])

    def measured(self, path: BaseRoute, fn: Callable[[], dict[str, Any]], what: str
                 ) -> dict[str, Any] | None:
        """Run ``fn`` with the CPU seconds of every process of ``path``, by group."""
        groups: dict[str, list[int]] = getattr(path, "groups", {})
        before = {g: cpu_seconds(pids) for g, pids in groups.items()}
        result = fn()
        result["cpu"] = {g: cpu_seconds(pids) - before[g] for g, pids in groups.items()}
        if "error" in result:
            self.fail(path, what, result["error"])
            return None
        return result

    # -- interactive echo while another session pushes bulk on the same link

    def interactive(self, path: Route) -> dict[str, Any] | None:
        args = self.args
        bulk, out = self.start_worker(f"bulk-{path.name}", WORKERS, "bulk", str(path.port))
        assert bulk.stdin is not None
        result: dict[str, Any] | None = None
        try:
            started = json.loads(out.wait_for(lambda s: s, STALL_SECONDS, "bulk to start"))
            if "error" in started:
                self.fail(path, "bulk push for the echo test", started["error"])
                return None
            timeout = args.echoes * (args.echo_gap_ms / 1000 + 1) + STALL_SECONDS
            result = self.measured(
                path, lambda: self.client_call({"op": "echo", "port": path.echo_port,
                                                "count": args.echoes,
                                                "gap": args.echo_gap_ms / 1000}, timeout),
                "interactive echo under bulk")
            bulk.stdin.write(b"stop\n")
            bulk.stdin.flush()
            done = json.loads(out.wait_for(lambda s: s, STALL_SECONDS + 30, "bulk to stop"))
            if "error" in done:
                self.fail(path, "bulk push during the echo test", done["error"])
                return None
            if done["count"] != done["bytes"]:
                self.fail(path, "bulk push during the echo test",
                          f"{done['bytes']} bytes sent, {done['count']} arrived")
                return None
            if result is not None:
                result["bulk_mb_per_s"] = done["bytes"] / done["seconds"] / 1e6
        except BenchError as e:
            self.fail(path, "interactive echo under bulk", str(e))
            return None
        finally:
            with contextlib.suppress(OSError):
                bulk.stdin.close()
            try:
                bulk.wait(STALL_SECONDS)
            except subprocess.TimeoutExpired:
                bulk.kill()
                bulk.wait()
        return result

    # -- 10 000 idle sessions

    def idle(self, path: Route) -> dict[str, Any] | None:
        """Open ``--idle-sessions`` connections through ``path`` to the greeter and hold
        them; RSS and fds of the forwarding processes before, with them, and after."""
        args = self.args
        if path.name == RELAY:
            pids = self.process_pids()
        else:
            assert path.forwarder is not None
            pids = {"ssh": path.forwarder.pid,
                    **{f"sshd {pid}": pid for pid in sorted(path.sshd_pids)}}
        base = self.greeter_count()["open"]
        time.sleep(0.5)
        before = {name: proc_health(pid) for name, pid in pids.items()}
        cpu0 = {name: cpu_seconds([pid]) for name, pid in pids.items()}
        timeout = args.idle_sessions / 100 + 2 * STALL_SECONDS
        overflows0 = listen_overflows()
        opened = self.client_call({"op": "hold", "port": path.echo_port,
                                   "count": args.idle_sessions, "in_flight": args.in_flight},
                                  timeout)
        cpu = {name: cpu_seconds([pid]) - cpu0[name] for name, pid in pids.items()}
        overflows = listen_overflows() - overflows0
        time.sleep(args.settle)
        held = self.greeter_count()["open"] - base
        during = {name: proc_health(pid) for name, pid in pids.items()}
        released = self.client_call({"op": "release"}, 60)
        t0 = time.monotonic()
        while self.greeter_count()["open"] > base and time.monotonic() - t0 < STALL_SECONDS:
            time.sleep(0.1)
        drained = self.greeter_count()["open"] - base
        drain_s = time.monotonic() - t0
        time.sleep(args.settle)
        after = {name: proc_health(pid) for name, pid in pids.items()}
        n = opened.get("opened", 0)
        res: dict[str, Any] = {
            "requested": args.idle_sessions, "opened": n, "failed": opened.get("failed"),
            "errors": opened.get("errors"), "open_seconds": opened.get("seconds"),
            "sessions_per_s": n / opened["seconds"] if opened.get("seconds") else None,
            "greeting_ms": opened.get("greeting_ms"),
            "greetings_over_900ms": opened.get("slow"),
            "listen_overflows_machine_wide": overflows,
            "listen_backlog": listen_backlog(path.echo_port), "held_at_target": held,
            "released": released.get("closed"), "left_at_target_after_release": drained,
            "release_seconds": drain_s, "cpu_s_opening": cpu,
            "before": before, "during": during, "after": after,
            "kib_per_session": {name: (during[name].get("vmrss_kib", 0)
                                       - before[name].get("vmrss_kib", 0)) / n if n else None
                                for name in pids},
            "fds_per_session": {name: (during[name].get("fds", 0) - before[name].get("fds", 0))
                                / n if n else None for name in pids},
        }
        if path.name != RELAY:  # the sshd session: privsep monitor plus its child, summed
            sshd = [name for name in pids if name.startswith("sshd")]
            total = sum(during[s].get("vmrss_kib", 0) - before[s].get("vmrss_kib", 0)
                        for s in sshd)
            res["kib_per_session"]["sshd (all)"] = total / n if n else None
        problems = []
        if "error" in opened:
            problems.append(opened["error"])
        if n != args.idle_sessions:
            problems.append(f"{n} of {args.idle_sessions} sessions connected through "
                            f"(first error: {opened.get('first_error')}; {opened.get('errors')})")
        if held < n:
            problems.append(f"the target held {held} connections, {n} expected")
        if drained > 0:
            problems.append(f"{drained} connections still open at the target "
                            f"{STALL_SECONDS:g} s after the client closed them")
        for text in problems:
            self.fail(path, f"{args.idle_sessions} idle sessions", text)
        return res

    # -- the run

    def warm_up_sessions(self) -> None:
        for path in self.paths.values():
            self.sessions(path, 20, 0, "warm-up sessions")

    def warm_up_bulk(self) -> None:
        for path in self.paths.values():
            for op in ("push", "pull"):
                self.transfer(op, path, 64 * MiB)

    def active(self) -> list[Route]:  # type: ignore[override]
        return [p for p in self.paths.values() if not p.failures or self.args.keep_going]

    def transfer_note(self, r: dict[str, Any]) -> str:
        return cpu_note(r["cpu"], self.args.bytes)

    def run(self) -> dict[str, Any]:  # type: ignore[override]
        args = self.args
        directions, tput, kinds, lat = self.sample_tables()
        echo: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        idle: dict[str, Any] = {}
        health: dict[str, Any] = {"ready": self.health()}
        meter = MachineMeter()
        sshd_lines0 = self.sshd_log.count if self.sshd_log else 0

        print("warming up: 20 sessions per path (not recorded)", flush=True)
        self.warm_up_sessions()
        self.check_alive()
        health["after_warmup_sessions"] = self.health()
        if args.idle_sessions:
            for name, key in IDLE_ROUNDS:
                print(f"{args.idle_sessions} idle sessions through {key} ...", flush=True)
                idle[key] = entry = self.idle(self.paths[name])
                entry["path"] = name
                self.check_alive()
                kib = entry["kib_per_session"]
                print(f"  {entry['opened']} held, {entry['sessions_per_s'] or 0:.0f} sessions/s "
                      "opening; KiB/session "
                      + ", ".join(f"{k} {v:.2f}" for k, v in kib.items() if v is not None),
                      flush=True)
        health["after_idle"] = self.health()
        print("warming up: 64 MiB each way per path (not recorded)", flush=True)
        self.warm_up_bulk()
        self.check_alive()
        health["after_warmup_bulk"] = self.health()

        for run in range(1, args.runs + 1):
            self.throughput_round(run, directions, tput)
            self.latency_round(run, kinds, lat)
            for path in self.active():
                r = self.interactive(path)
                self.check_alive()
                if r is not None:
                    echo[path.name].append(r)
                    ms = r["ms"]
                    print(f"run {run}/{args.runs} echo under bulk  {path.name:8} "
                          f"p50 {pctl(ms, 50):6.2f}  p99 {pctl(ms, 99):6.2f}  "
                          f"max {max(ms):7.2f} ms  (bulk {r['bulk_mb_per_s']:.0f} MB/s)",
                          flush=True)
            health[f"after_run_{run}"] = self.health()

        machine = meter.result()
        self.sshd_lines_since(sshd_lines0)
        for name, log in (("relay", self.relay_log), ("agent", self.agent_log)):
            if log is None:
                continue
            for line in log.tail:
                event = json_event(line)
                if event is None:
                    self.anomalies.append(f"{name} printed a non-JSON line: {line}")
                elif event.get("level") not in ("info", "debug"):
                    self.anomalies.append(f"{name} logged {event.get('level')}: "
                                          f"{event.get('text')}")
        return summarize(self, tput, lat, echo, idle, health, machine)


# ---------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("python -m bench.relay_vs_openssh",
                     "labrelay relay + agent vs OpenSSH ssh -N -R on loopback: throughput and "
                     "CPU, set-up latency, 10 000 idle sessions, interactive echo under bulk, "
                     "side by side in one run.",
                     "runs (default 5; --quick 3)")
    add_session_options(p, "back-to-back set-up sessions per path per run (default 200)", 50,
                        "idle time before each of those (default 50 ms)")
    p.add_argument("--idle-sessions", type=int, default=10000,
                   help="concurrent idle sessions held through one link (default 10000; "
                   "0 skips it)")
    p.add_argument("--in-flight", type=int, default=64,
                   help="idle sessions opened but not yet confirmed, at most (default 64)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait before reading RSS with the idle sessions open")
    p.add_argument("--echoes", type=int, default=500,
                   help="1-byte round trips per path per run under bulk (default 500)")
    p.add_argument("--echo-gap-ms", type=float, default=5.0,
                   help="pause between round trips (default 5 ms)")
    add_run_options(p, "path")
    add_python_and_results(p, "the Python that runs the relay and the agent (default: this one)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind = argv[1]
        if kind == "bulk":
            bulk_worker(int(argv[2]))
        else:
            {"client": client_worker, "greeter": greeter_worker}[kind]()
        return 0
    args = quick_defaults(build_parser().parse_args(argv))
    nofile = raise_nofile()  # inherited by every child: relay, agent, sshd, ssh, workers
    if args.idle_sessions and nofile[0] < args.idle_sessions + 1024:
        print(f"bench: RLIMIT_NOFILE is {nofile[0]}; {args.idle_sessions} idle sessions need "
              "more (run as root or raise the hard limit)", file=sys.stderr)
        return 1

    def announce(bench: RelayBench) -> None:
        for p in bench.paths.values():
            print(f"  {p.name:8} port {p.port:5} echo port {p.echo_port:5}  {p.cipher}",
                  flush=True)

    return run_bench("labrelay-relay-bench-", lambda workdir: RelayBench(args, workdir),
                     announce, markdown, print_table, args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
