"""The paths a user with nothing but stock OpenSSH takes (``ssh -J`` and ``ssh -L``
through the relay), side by side in one run with the seed's way: a stock cloud sshd,
the lab's ``ssh -N -R`` to it, the user's ``ssh -J cloud -p PORT`` and ``ssh -L``.

Everything on 127.0.0.1, real processes, from a temporary directory:

* the target: a private OpenSSH ``sshd`` (``gpu-cluster``) and the bench's raw target
  worker (``web``: sink, source and 1-byte echo, bench.common's target);
* a ``labrelay relay`` with a data port and ``e2e_services = ["gpu-cluster:22",
  "web-e2e:80"]``, and a ``labrelay agent`` registering ``gpu-cluster:22`` and
  ``gpu-chan:22`` (both the target sshd; ``gpu-chan`` is *not* declared e2e: the same
  session on the link, for reference), ``web:80`` (not e2e: the ``-L`` goal's service)
  and ``web-e2e:80`` (the same target, e2e: the pooled route for raw TCP);
* the user's stock ``ssh -N -L L1:web:80 -L L2:web-e2e:80 alice@relay`` (long-lived);
* the seed: a second private sshd (the cloud), the lab's ``ssh -N -R PUB:TARGET_SSHD
  -R PUBWEB:WEB`` to it, and the user's ``ssh -N -L L3:127.0.0.1:PUBWEB cloud``.

Workload ``ssh``: a user's ``ssh ... 'echo ready; wc -c'`` fed ``--bytes`` on stdin once
it printed ``ready`` (timed from "go" to ssh's exit), OpenSSH's default cipher:

* ``direct``   straight to the target sshd;
* ``relay_J``  ``ssh -J alice@relay gpu-cluster`` (e2e: the pooled route; the relay
  logs ``relay_pooled_session``, checked per trial);
* ``relay_J_chacha`` the same with ``Ciphers chacha20-poly1305@openssh.com`` for the
  jump host (the relay otherwise agrees AES-GCM with a stock ssh): which AEAD is cheaper;
* ``relay_J_link`` ``ssh -J alice@relay gpu-chan`` (not e2e: a channel on the link);
* ``fast``     for reference, the same session with ``ProxyCommand labrelay connect``
  (the fast path: spliced at relay and agent; its relay and agent CPU in the same run
  say what the machine's load does to a path with no Python per byte);
* ``seed_J``   ``ssh -J cloud -p PUB 127.0.0.1``: the jump through the cloud's sshd to
  the ``-R`` port, the seed's way for a user with no public port open.

Workload ``raw`` (the client worker's push and pull through a local port):

* ``direct``  the target worker itself;
* ``relay_L`` the user's ``ssh -L`` to ``web:80`` (not e2e: channel on the link);
* ``relay_L_e2e`` the same ``ssh -L`` process's forward to ``web-e2e:80`` (pooled);
* ``seed_L``  the user's ``ssh -L`` to the cloud, to the lab's ``-R`` port there.

Set-up latency (p50/p99 of a 1-byte echo through a new connection, back to back and
after an idle gap of ``--gap-ms``) on the raw paths.

CPU seconds per GiB of every relaying process during each stream, from
``/proc/PID/stat`` before and after (all threads): relay, agent, the user's ssh (its
``-J`` child included); the seed's ``ssh -N -R``, its cloud sshd session and the cloud
sshd session of the user's jump or ``-L``.

Run from the repository root with the venv's Python::

    python -m bench.stock_paths             # 1 GiB x 5 runs
    python -m bench.stock_paths --quick     # 256 MiB x 3 runs

Results: ``bench/results/stock_paths-latest.json`` and ``.md`` and a line in
``bench/results/history.jsonl``. Also run by ``python -m bench --only stock_paths``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import agent_vs_openssh as avo
from bench import fast_path as fp
from bench.cli import (
    add_python_and_results,
    add_run_options,
    bench_parser,
    quick_defaults,
    run_bench,
)
from bench.fast_workers import wait_exit
from bench.meter import MachineMeter, descendants, proc_cpu
from bench.procs import BenchError, Lines, check_procs, find_program, free_port
from bench.report import pctl
from bench.sessions import LOOPBACK, STALL_SECONDS, GiB, MiB
from bench.sshd import public_key
from bench.stock_paths_report import (
    DIRECT,
    E2E,
    FAST,
    RAW,
    RELAY_J,
    RELAY_J_CHACHA,
    RELAY_J_LINK,
    RELAY_L,
    RELAY_L_E2E,
    REMOTE_COMMAND,
    SEED_J,
    SEED_L,
    SERVICES,
    SSH,
    VARIANTS,
    aead_cost,
    markdown,
    print_table,
    summarize,
)


def _per_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each live pid of ``pids``."""
    return {p: c for p in pids if (c := proc_cpu(p)) is not None}


def _delta(before: dict[int, float], pids: list[int],
           polled: dict[int, float] | None = None) -> float:
    """CPU seconds ``pids`` used since ``before``: each pid read at the first read and now
    (or, if it is gone now, at its last poll in ``polled``); one gone with no poll (a
    process of the previous session still exiting at the first read) is left out."""
    after = {**(polled or {}), **_per_pid(pids)}
    return sum(after[p] - c for p, c in before.items() if p in after)


class StockBench(fp.FastBench):
    """The processes of one run and one trial of each variant at a time over them: the
    fast-path bench's relay, agent and seed cloud (``bench/fast_setup.py``), with this
    bench's services and forwards, the user's ``ssh -L`` and the raw target."""

    SERVICES = SERVICES
    E2E = E2E

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.ssh_config = workdir / "user_ssh_config"
        self.ports: dict[str, int] = {}  # raw variant -> local port
        self.user_L: subprocess.Popen[bytes] | None = None
        self.seed_L: subprocess.Popen[bytes] | None = None
        self.seed_L_sshd: set[int] = set()
        self.cloud_sshd_seen: set[int] = set()

    # -- processes

    def agent_forwards(self) -> list[str]:
        """The target sshd (``gpu-cluster`` e2e, ``gpu-chan`` not) and the raw target
        (``web`` not e2e, ``web-e2e`` e2e)."""
        sshd, web = f"{LOOPBACK}:{self.sshd_port}", f"{LOOPBACK}:{self.target_port}"
        return [f"gpu-cluster:22:{sshd}", f"gpu-chan:22:{sshd}", f"web:80:{web}",
                f"web-e2e:80:{web}"]

    def seed_forwards(self) -> list[tuple[int, int]]:
        """The lab's ``ssh -N -R PUB:sshd -R PUBWEB:web`` to the cloud."""
        self.pub_port, self.ports["pub_web"] = free_port(), free_port()
        return [(self.pub_port, self.sshd_port), (self.ports["pub_web"], self.target_port)]

    def write_ssh_config(self) -> None:
        """The user's ssh_config: ``relay`` and ``cloud`` as jump hosts, the targets'
        host keys (the same sshd behind every name)."""
        assert self.cloud is not None
        host = public_key(self.dir / "host_ed25519.pub")
        cloud_host = public_key(self.cloud.dir / "host_ed25519.pub")
        self.user_known_hosts.write_text(
            f"[{LOOPBACK}]:{self.sshd_port} {host}\n[{LOOPBACK}]:{self.pub_port} {host}\n"
            f"gpu-cluster {host}\ngpu-chan {host}\n"
            f"[{LOOPBACK}]:{self.cloud.sshd_port} {cloud_host}\n"
            f"[{LOOPBACK}]:{self.relay_port} "
            f"{public_key(self.dir / 'relay-state' / 'ssh_host_ed25519_key.pub')}\n")
        self.ssh_config.write_text(f"""\
Host relay
  HostName {LOOPBACK}
  Port {self.relay_port}
  User alice
  IdentityFile {self.dir / 'alice_ed25519'}
Host relay-chacha
  HostName {LOOPBACK}
  Port {self.relay_port}
  User alice
  IdentityFile {self.dir / 'alice_ed25519'}
  Ciphers chacha20-poly1305@openssh.com
Host cloud
  HostName {LOOPBACK}
  Port {self.cloud.sshd_port}
  User {self.cloud.user}
  IdentityFile {self.cloud.key}
Host *
  User {self.user}
  IdentityFile {self.key}
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {self.user_known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
""")

    def start_local_forwards(self) -> None:
        """The user's two long-lived ``ssh -N -L``: to the relay (both web services) and
        to the cloud (the lab's ``-R`` port there)."""
        assert self.cloud is not None and self.cloud.sshd is not None
        ssh = find_program("ssh")
        relay_L, relay_e2e, seed_L = free_port(), free_port(), free_port()
        self.user_L = self.children.start("ssh -L (relay)", [
            ssh, "-F", str(self.ssh_config), "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"{LOOPBACK}:{relay_L}:web:80", "-L", f"{LOOPBACK}:{relay_e2e}:web-e2e:80",
            "relay"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.user_L.stderr is not None
        log = Lines(self.user_L.stderr, "ssh-L-relay-stderr")
        self._wait_listening("ssh -L (relay)", self.user_L, log, relay_L)
        self._wait_listening("ssh -L (relay, e2e)", self.user_L, log, relay_e2e)
        before = descendants(self.cloud.sshd.pid)
        self.seed_L = self.children.start("ssh -L (cloud)", [
            ssh, "-F", str(self.ssh_config), "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"{LOOPBACK}:{seed_L}:{LOOPBACK}:{self.ports['pub_web']}", "cloud"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.seed_L.stderr is not None
        self._wait_listening("ssh -L (cloud)", self.seed_L,
                             Lines(self.seed_L.stderr, "ssh-L-cloud-stderr"), seed_L)
        self.seed_L_sshd = descendants(self.cloud.sshd.pid) - before
        self.children.extra_pids |= self.seed_L_sshd
        self.ports.update({DIRECT: self.target_port, RELAY_L: relay_L, RELAY_L_E2E: relay_e2e,
                           SEED_L: seed_L})

    def setup(self) -> None:
        self.start_sshd()
        self.start_target()
        self.start_client()
        self.start_relay()
        self.start_relay_agent()
        self.start_seed()
        self.write_ssh_config()
        self.start_local_forwards()
        assert self.cloud is not None
        link, user = self.relay_ciphers()
        self.ciphers = {"user ssh to the target and to the cloud": self.negotiated(()),
                        "user ssh to the relay": user,
                        "seed ssh -N -R link": self.cloud.negotiated(()),
                        "relay link (agent)": link}

    def start_target(self) -> None:
        avo.Bench.start_target(self)

    # -- one trial

    def user_ssh(self, variant: str, rusage_out: Path) -> list[str]:
        ssh = [find_program("ssh"), "-F", str(self.ssh_config)]
        if variant == DIRECT:
            return [*ssh, "-p", str(self.sshd_port), LOOPBACK, REMOTE_COMMAND]
        if variant == SEED_J:
            return [*ssh, "-J", "cloud", "-p", str(self.pub_port), LOOPBACK, REMOTE_COMMAND]
        if variant == FAST:
            proxy = " ".join(self.connect_argv("%h:%p"))
            return [*ssh, "-o", f"ProxyCommand={proxy}", "gpu-cluster", REMOTE_COMMAND]
        host = "gpu-chan" if variant == RELAY_J_LINK else "gpu-cluster"
        jump = "relay-chacha" if variant == RELAY_J_CHACHA else "relay"
        return [*ssh, "-J", jump, host, REMOTE_COMMAND]

    def ssh_groups(self, variant: str, ssh_pid: int) -> dict[str, list[int]]:
        """The relaying processes of an ssh variant once its session is up."""
        user = [ssh_pid, *descendants(ssh_pid)]
        if variant in (RELAY_J, RELAY_J_CHACHA, RELAY_J_LINK, FAST):
            assert self.relay is not None and self.agent is not None
            return {"relay": [self.relay.pid], "agent": [self.agent.pid], "user_ssh": user}
        if variant == SEED_J:
            assert self.cloud is not None and self.cloud.sshd is not None
            jump = descendants(self.cloud.sshd.pid) - self.ssh_r.sshd_pids - self.seed_L_sshd
            assert self.ssh_r.pid is not None
            return {"ssh_R": [self.ssh_r.pid], "cloud_sshd_R": sorted(self.ssh_r.sshd_pids),
                    "cloud_sshd_user": sorted(jump), "user_ssh": user}
        return {"user_ssh": user}

    def raw_groups(self, variant: str) -> dict[str, list[int]]:
        if variant in (RELAY_L, RELAY_L_E2E):
            assert self.relay is not None and self.agent is not None and self.user_L
            return {"relay": [self.relay.pid], "agent": [self.agent.pid],
                    "user_ssh": [self.user_L.pid]}
        if variant == SEED_L:
            assert self.ssh_r.pid is not None and self.seed_L is not None
            return {"ssh_R": [self.ssh_r.pid], "cloud_sshd_R": sorted(self.ssh_r.sshd_pids),
                    "cloud_sshd_user": sorted(self.seed_L_sshd), "user_ssh": [self.seed_L.pid]}
        return {}

    def _ssh_trial(self, variant: str, nbytes: int, out: Path) -> dict[str, Any]:
        feeder, r = self._feeder(nbytes)
        ssh, sout, serr, spawned = self._spawn_user_ssh(variant, self.user_ssh(variant, out), r)
        ready = time.perf_counter()
        groups = self.ssh_groups(variant, ssh.pid)
        before = {g: _per_pid(p) for g, p in groups.items()}
        start = self._go(feeder)
        deadline = start + nbytes / 1e6 + 2 * STALL_SECONDS + 30
        last = before
        # Polled while the stream runs: the cloud sshd session of the seed's jump ends
        # with the user's ssh, before its CPU could be read afterwards.
        while not wait_exit(ssh, 0.05):
            if time.perf_counter() > deadline:
                ssh.kill()
                raise BenchError(f"ssh did not finish in time:\n{serr.text()}")
            last = {g: {**last[g], **_per_pid(p)} for g, p in groups.items()}
        seconds = time.perf_counter() - start
        # The user's ssh and its -J child have exited: the relaying processes are what is
        # judged (a pid gone by now counts up to its last poll).
        cpu = {g: _delta(before[g], p, last[g]) for g, p in groups.items() if g != "user_ssh"}
        feeder.wait(30)
        count = self._byte_count(sout)
        result: dict[str, Any] = {"seconds": seconds, "setup_s": ready - spawned, "cpu": cpu,
                                  "bytes": count}
        if ssh.returncode != 0 or count != nbytes:
            result["error"] = (f"ssh exited {ssh.returncode}, {count} of {nbytes} bytes "
                               f"arrived:\n{serr.text()}")
        return result

    def _raw_trial(self, variant: str, nbytes: int, op: str  # type: ignore[override]
                   ) -> dict[str, Any]:
        groups = self.raw_groups(variant)
        before = {g: _per_pid(p) for g, p in groups.items()}
        timeout = nbytes / 1e6 + 2 * STALL_SECONDS + 30
        r = self.client_call({"op": op, "port": self.ports[variant], "bytes": nbytes}, timeout)
        if "error" in r:
            return {"error": f"{op}: {r['error']}"}
        cpu = {g: _delta(before[g], p) for g, p in groups.items()}
        result = {"seconds": r["seconds"], "bytes": r["count"], "cpu": cpu, "op": op}
        if r["count"] != nbytes:
            result["error"] = f"{op}: {r['count']} of {nbytes} bytes arrived"
        return result

    def trial(self, workload: str, variant: str, nbytes: int, op: str = "push"
              ) -> dict[str, Any] | None:  # type: ignore[override]
        self.trials += 1
        self.drain_logs()
        pooled0 = self.events.get("relay:relay_pooled_session", 0)
        spliced0 = self.events.get("relay:relay_fast_session", 0)
        try:
            if workload == SSH:
                result = self._ssh_trial(variant, nbytes, self.dir / "unused.jsonl")
            else:
                result = self._raw_trial(variant, nbytes, op)
        except BenchError as e:
            result = {"error": str(e)}
        finally:
            self._end_feeders()
        self.drain_logs()
        pooled = self.events.get("relay:relay_pooled_session", 0) - pooled0
        spliced = self.events.get("relay:relay_fast_session", 0) - spliced0
        if "error" not in result and variant == FAST and spliced != 1:
            result["error"] = f"{spliced} relay_fast_session events, not 1: not the fast path"
        if "error" not in result and variant in (RELAY_J, RELAY_J_CHACHA) and pooled != 1:
            result["error"] = f"{pooled} relay_pooled_session events, not 1: not pooled"
        if "error" not in result and variant in (RELAY_J_LINK, RELAY_L) and pooled:
            result["error"] = "a session to a service not declared e2e was pooled"
        return self._recorded(workload, variant, result)

    def setup_round(self, variant: str, sessions: int, gap_ms: float) -> list[float] | None:
        timeout = sessions * (gap_ms / 1000 + 1) + STALL_SECONDS + 30
        r = self.client_call({"op": "setup", "port": self.ports[variant], "sessions": sessions,
                              "gap": gap_ms / 1000}, timeout)
        if "error" in r:
            self.anomalies.append(f"set-up {variant}: {r['error']}")
            return None
        return list(r["ms"])

    def check_alive(self) -> None:
        procs = [("relay", self.relay, self.relay_log), ("agent", self.agent, self.agent_log),
                 ("ssh -N -R", self.ssh_r.forwarder, self.ssh_r.log),
                 ("target sshd", self.sshd, self.sshd_log),
                 ("ssh -L (relay)", self.user_L, None), ("ssh -L (cloud)", self.seed_L, None)]
        if self.cloud is not None:
            procs.append(("cloud sshd", self.cloud.sshd, self.cloud.sshd_log))
        check_procs(procs)

    def run(self) -> dict[str, Any]:  # type: ignore[override]
        args = self.args
        only = set(args.only or [])
        keys = [(SSH, v, "ssh") for v in VARIANTS[SSH] if not only or v in only] + [
            (RAW, v, op) for op in ("push", "pull") for v in VARIANTS[RAW]
            if not only or v in only]
        raw = [v for v in VARIANTS[RAW] if not only or v in only]
        samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {k: [] for k in keys}
        setups: dict[str, dict[str, list[list[float]]]] = {
            "back_to_back": {v: [] for v in VARIANTS[RAW]},
            "idle_gap": {v: [] for v in VARIANTS[RAW]}}
        warm = min(args.bytes, 64 * MiB)
        print(f"warming up: {warm // MiB} MiB per variant (not recorded)", flush=True)
        for workload, variant, op in keys:
            self.trial(workload, variant, warm, op)
        for variant in raw:
            self.setup_round(variant, 20, 0)
        self.failed.clear()
        self.check_alive()
        meter = MachineMeter()
        for run in range(1, args.runs + 1):
            k = (run - 1) % len(keys)
            for workload, variant, op in keys[k:] + keys[:k]:  # rotated run by run
                if (workload, variant) in self.failed and not args.keep_going:
                    continue
                r = self.trial(workload, variant, args.bytes, op)
                self.check_alive()
                if r is None:
                    continue
                r["run"] = run
                samples[(workload, variant, op)].append(r)
                cpu = ", ".join(f"{g} {c / (args.bytes / GiB):.2f}" for g, c in r["cpu"].items())
                print(f"run {run}/{args.runs} {workload:3} {op:4} {variant:12} "
                      f"{args.bytes / r['seconds'] / 1e6:8.1f} MB/s  CPU-s/GiB {cpu}", flush=True)
            for kind, (n, gap) in (("back_to_back", (args.sessions, 0.0)),
                                   ("idle_gap", (args.gap_sessions, args.gap_ms))):
                if n == 0:  # --gap-sessions 0 skips it, as in the agent bench
                    continue
                for variant in raw:
                    ms = self.setup_round(variant, n, gap)
                    if ms is not None:
                        setups[kind][variant].append(ms)
                        print(f"run {run}/{args.runs} set-up {kind:12} {variant:12} p50 "
                              f"{pctl(ms, 50):6.2f} p99 {pctl(ms, 99):6.2f} ms", flush=True)
        res = summarize(self, samples, setups, meter.result())
        if not only:
            res["aead_cpu_s_per_gib"] = aead_cost(args.python)
        else:
            res["conditions"]["only"] = sorted(only)
        if args.note:
            res["conditions"]["note"] = args.note
        return res

    def cleanup(self) -> list[str]:
        return self.children.stop_all()


def _variants(text: str) -> list[str]:
    """``--only``'s comma-separated variant names, each checked against VARIANTS."""
    known = {v for vs in VARIANTS.values() for v in vs}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"valid: {', '.join(sorted(known))}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("python -m bench.stock_paths",
                     "ssh -J and ssh -L through relay + agent vs the seed's cloud sshd + "
                     "ssh -N -R, and direct; side by side in one run, on loopback.",
                     "runs (default 5; --quick 3)")
    add_run_options(p, "variant", reverse=False)
    p.add_argument("--sessions", type=int, default=None,
                   help="back-to-back set-up sessions per run (default 300; --quick 100)")
    p.add_argument("--gap-sessions", type=int, default=None,
                   help="set-up sessions after an idle gap per run (default 50; --quick 20)")
    p.add_argument("--gap-ms", type=float, default=50.0, help="the idle gap (default 50 ms)")
    p.add_argument("--note", default="", help="a sentence to add to the Markdown report")
    p.add_argument("--only", type=_variants, default=None, metavar="V1,V2",
                   help="run only these variants, e.g. relay_L,seed_L (all processes still "
                   "start; ratios whose two sides did not both run are left out)")
    add_python_and_results(p, "the Python that runs relay and agent")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return fp.main(argv)  # the fast-path workers (bench/fast_workers.py)
    args = quick_defaults(build_parser().parse_args(argv))
    if args.sessions is None:
        args.sessions = 100 if args.quick else 300
    if args.gap_sessions is None:
        args.gap_sessions = 20 if args.quick else 50

    def announce(bench: StockBench) -> None:
        print(f"  target sshd {bench.sshd_port}, web {bench.target_port}, relay "
              f"{bench.relay_port} (data port {bench.data_port}), cloud public port "
              f"{bench.pub_port}, local ports {bench.ports}; {bench.ciphers}", flush=True)

    return run_bench("labrelay-stockpaths-bench-", lambda workdir: StockBench(args, workdir),
                     announce, markdown, print_table, args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
