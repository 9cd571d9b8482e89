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
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import agent_vs_openssh as avo
from bench import fast_path as fp
from bench import fast_path_report as fpr
from bench.cli import (
    add_python_and_results,
    add_run_options,
    bench_parser,
    quick_defaults,
    run_bench,
)
from bench.meter import MachineMeter, descendants, proc_cpu
from bench.procs import BenchError, Lines, check_procs, find_program, free_port, json_event
from bench.report import fmt, machine_conditions, pctl, per_run_latency, result_head, spread
from bench.sessions import LOOPBACK, REPO, STALL_SECONDS, START_TIMEOUT, GiB, MiB
from bench.sshd import SshdBench, public_key

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

RELAY_CONFIG = """\
[relay]
listen = "127.0.0.1:0"
state_dir = "{dir}/relay-state"
public_bind = "127.0.0.1"
data_port = 0
e2e_services = [{e2e}]

[[relay.agent]]
name = "lab_pc"
keys = ["{agent_key}"]
services = [{services}]

[[relay.user]]
name = "alice"
keys = ["{alice_key}"]
services = [{services}]
"""


def _quoted(items: tuple[str, ...]) -> str:
    return ", ".join(f'"{s}"' for s in items)


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
    """The processes of one run and one trial of each variant at a time over them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.ssh_config = workdir / "user_ssh_config"
        self.ports: dict[str, int] = {}  # raw variant -> local port
        self.user_L: subprocess.Popen[bytes] | None = None
        self.seed_L: subprocess.Popen[bytes] | None = None
        self.seed_L_sshd: set[int] = set()
        self.cloud_sshd_seen: set[int] = set()

    # -- processes

    def start_relay(self) -> None:
        blob = self.user_keys("agent", "alice")
        config = self.dir / "relay.toml"
        config.write_text(RELAY_CONFIG.format(dir=self.dir, agent_key=blob["agent"],
                                              alice_key=blob["alice"], e2e=_quoted(E2E),
                                              services=_quoted(SERVICES)))
        ports: dict[str, int] = {}

        def both(line: str) -> bool:
            event = json_event(line) or {}
            if event.get("event") in ("relay_listening", "relay_data_port"):
                ports[str(event["event"])] = int(event["port"])
            return len(ports) == 2

        self.start_relay_process(config, both, "relay_listening and relay_data_port")
        self.relay_port, self.data_port = ports["relay_listening"], ports["relay_data_port"]
        self.trust_relay_host()

    def start_relay_agent(self) -> None:
        sshd, web = f"{LOOPBACK}:{self.sshd_port}", f"{LOOPBACK}:{self.target_port}"
        forwards = [f"gpu-cluster:22:{sshd}", f"gpu-chan:22:{sshd}", f"web:80:{web}",
                    f"web-e2e:80:{web}"]
        seen: set[str] = set()

        def ready(line: str) -> bool:
            event = json_event(line) or {}
            if event.get("event") == "forward_ready":
                seen.add(str(event.get("bind")))
            elif event.get("event") == "fast_path_off":
                raise BenchError(f"the agent has no fast path: {event.get('reason')}")
            elif event.get("event") == "fast_path_ready":
                seen.add("fast path")
            return len(seen) == len(forwards) + 1

        self.start_relay_agent_process(forwards, "lab_pc", ready,
                                       "fast_path_ready and forward_ready from the agent")

    def start_seed(self) -> None:
        """The seed's cloud sshd and the lab's ``ssh -N -R PUB:sshd -R PUBWEB:web``."""
        cloud_dir = self.dir / "cloud"
        cloud_dir.mkdir()
        cloud_dir.chmod(0o755)
        cloud = self.cloud = SshdBench(self.args, cloud_dir)
        cloud.children = self.children
        cloud.start_sshd()
        self.pub_port, self.ports["pub_web"] = free_port(), free_port()
        cloud.ssh_reverse(self.ssh_r, "ssh -R", (), [(self.pub_port, self.sshd_port),
                                                     (self.ports["pub_web"], self.target_port)],
                          "ssh -N -R")
        if not self.ssh_r.sshd_pids:
            raise BenchError("no cloud sshd session process found for ssh -N -R")

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
        argv = self.user_ssh(variant, out)
        spawned = time.perf_counter()
        ssh = self.children.start(f"ssh {variant}", argv, stdin=r, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=REPO, env=fp.avo_env())
        os.close(r)
        assert ssh.stdout is not None and ssh.stderr is not None
        sout, serr = Lines(ssh.stdout, "ssh-stdout"), Lines(ssh.stderr, "ssh-stderr")
        try:
            sout.wait_for(lambda s: s.strip() == "ready", START_TIMEOUT, "'ready' from ssh")
        except BenchError as e:
            ssh.kill()
            raise BenchError(f"{e}\nssh stderr:\n{serr.text()}") from None
        ready = time.perf_counter()
        groups = self.ssh_groups(variant, ssh.pid)
        before = {g: _per_pid(p) for g, p in groups.items()}
        start = self._go(feeder)
        deadline = start + nbytes / 1e6 + 2 * STALL_SECONDS + 30
        last = before
        # Polled while the stream runs: the cloud sshd session of the seed's jump ends
        # with the user's ssh, before its CPU could be read afterwards.
        while not fp.wait_exit(ssh, 0.05):
            if time.perf_counter() > deadline:
                ssh.kill()
                raise BenchError(f"ssh did not finish in time:\n{serr.text()}")
            last = {g: {**last[g], **_per_pid(p)} for g, p in groups.items()}
        seconds = time.perf_counter() - start
        # The user's ssh and its -J child have exited: the relaying processes are what is
        # judged (a pid gone by now counts up to its last poll).
        cpu = {g: _delta(before[g], p, last[g]) for g, p in groups.items() if g != "user_ssh"}
        feeder.wait(30)
        try:
            count = sout.wait_for(lambda s: s.strip() if s.strip().isdigit() else None, 10,
                                  "the byte count from wc -c")
        except BenchError:
            count = "-1"
        result: dict[str, Any] = {"seconds": seconds, "setup_s": ready - spawned, "cpu": cpu,
                                  "bytes": int(count)}
        if ssh.returncode != 0 or int(count) != nbytes:
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
            for feeder in self.feeders:
                try:
                    assert feeder.stdin is not None
                    feeder.stdin.close()
                except (OSError, ValueError):
                    pass
                try:
                    feeder.wait(10)
                except subprocess.TimeoutExpired:
                    feeder.kill()
            self.feeders.clear()
        self.drain_logs()
        pooled = self.events.get("relay:relay_pooled_session", 0) - pooled0
        spliced = self.events.get("relay:relay_fast_session", 0) - spliced0
        if "error" not in result and variant == FAST and spliced != 1:
            result["error"] = f"{spliced} relay_fast_session events, not 1: not the fast path"
        if "error" not in result and variant in (RELAY_J, RELAY_J_CHACHA) and pooled != 1:
            result["error"] = f"{pooled} relay_pooled_session events, not 1: not pooled"
        if "error" not in result and variant in (RELAY_J_LINK, RELAY_L) and pooled:
            result["error"] = "a session to a service not declared e2e was pooled"
        if "error" in result:
            self.failed.add((workload, variant))
            report = f"{workload} {variant}: {result['error']}"
            self.anomalies.append(report)
            print(f"!! {report}", file=sys.stderr, flush=True)
            return None
        return result

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
        keys = [(SSH, v, "ssh") for v in VARIANTS[SSH]] + [
            (RAW, v, op) for op in ("push", "pull") for v in VARIANTS[RAW]]
        samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {k: [] for k in keys}
        setups: dict[str, dict[str, list[list[float]]]] = {
            "back_to_back": {v: [] for v in VARIANTS[RAW]},
            "idle_gap": {v: [] for v in VARIANTS[RAW]}}
        warm = min(args.bytes, 64 * MiB)
        print(f"warming up: {warm // MiB} MiB per variant (not recorded)", flush=True)
        for workload, variant, op in keys:
            self.trial(workload, variant, warm, op)
        for variant in VARIANTS[RAW]:
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
                for variant in VARIANTS[RAW]:
                    ms = self.setup_round(variant, n, gap)
                    if ms is not None:
                        setups[kind][variant].append(ms)
                        print(f"run {run}/{args.runs} set-up {kind:12} {variant:12} p50 "
                              f"{pctl(ms, 50):6.2f} p99 {pctl(ms, 99):6.2f} ms", flush=True)
        res = summarize(self, samples, setups, meter.result())
        res["aead_cpu_s_per_gib"] = aead_cost(args.python)
        if args.note:
            res["conditions"]["note"] = args.note
        return res

    def cleanup(self) -> list[str]:
        return self.children.stop_all()


# ---------------------------------------------------------------------------
# the AEAD ciphers' own cost, in the relay's code


AEAD_PROBE = """
import os, time
from relay.ssh import aead
packet, n = 32 * 1024, 8192  # 256 MiB in 32 KiB packets
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
print(__import__("json").dumps(out))
"""


def aead_cost(python: str) -> dict[str, Any]:
    """CPU-s/GiB of sealing and opening 32 KiB packets with each AEAD the relay offers a
    stock ssh, in its own code (relay.ssh.aead); one process, nothing else."""
    out = subprocess.run([python, "-c", AEAD_PROBE], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    try:
        result: dict[str, Any] = __import__("json").loads(out.stdout)
    except ValueError:
        return {"error": out.stderr[-500:]}
    return result


# ---------------------------------------------------------------------------
# statistics and reports


def summarize(bench: StockBench, samples: dict[tuple[str, str, str], list[dict[str, Any]]],
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
           f"{c.get('loadavg_at_start')}; {c['bytes'] // MiB} MiB per transfer, {c['runs']} "
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
                          for k, v in aead.items())]
    out += ["", "| goal | value | status |", "|---|---|---|"]
    for g in res["goals"]:
        v = "–" if g["value"] is None else f"{g['value']:.2f} {g['unit']}"
        out.append(f"| {g['goal']} ({g['level']}) | {v} | {g['status']} |")
    if res["anomalies"]:
        out += ["", "Anomalies:", ""] + [f"- {a[:500]}" for a in res["anomalies"]]
    return "\n".join(out) + "\n"


def print_table(res: dict[str, Any]) -> None:
    print(markdown(res))


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
    add_python_and_results(p, "the Python that runs relay and agent")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return fp.main(argv)
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
