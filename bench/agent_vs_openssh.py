"""The labrelay agent against stock OpenSSH ``ssh -N -R``, side by side in one run.

Every path forwards the same kind of session through the same private OpenSSH
``sshd`` on loopback to the same target:

* ``agent``      ``python -m relay agent -R 127.0.0.1:0:127.0.0.1:TARGET`` (a real process);
* ``ssh``        ``ssh -N -R 127.0.0.1:PORT:127.0.0.1:TARGET`` with OpenSSH's default cipher;
* ``ssh-same``   the same with ``-c``/``-m`` set to whatever cipher and MAC the agent's link
  negotiated (read from its ``ssh_keys`` event), for a comparison at equal cipher;
* ``direct``     the client straight to the target, no tunnel: what the harness can do;

and the Python tools a user might pick instead (``bench.peers``; their own venv, made
and cached by the set-up, or reported as skipped):

* ``asyncssh``   asyncssh's ``conn.forward_remote_port('127.0.0.1', 0, '127.0.0.1', TARGET)``,
  the same reverse forward;
* ``sshtunnel``  sshtunnel (paramiko) ``SSHTunnelForwarder(remote_bind_address=TARGET)``: a
  LOCAL forward (``-L``; sshtunnel has no reverse forward), so next to it
* ``ssh-L``      ``ssh -N -L 127.0.0.1:PORT:127.0.0.1:TARGET``, OpenSSH's local forward.

Measured, interleaved path by path within each run so machine noise hits all alike:
bulk throughput client -> tunnel -> target ("push") and target -> tunnel -> client
("pull"), with the CPU seconds of the forwarding process (agent or ssh) and of its
sshd session per GiB; and new-session set-up latency (connect, 1 byte, 1-byte echo,
close). The client and the target run in their own processes (this file re-run
with ``--worker``), so the harness never shares a GIL with the bytes it measures.

Run from the repository root with the venv's Python::

    python -m bench.agent_vs_openssh            # 1 GiB x 5 runs, 200 sessions per run
    python -m bench.agent_vs_openssh --quick    # 256 MiB x 3 runs
    python -m bench.agent_vs_openssh --no-peers # without asyncssh, sshtunnel and ssh -L

Results: a table on stdout, ``bench/results/agent_vs_openssh-latest.json`` and
``bench/results/agent_vs_openssh-latest.md`` (overwritten), and a line in
``bench/results/history.jsonl``. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the workers): make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.agent_report import (
    AGENT,
    ASYNCSSH,
    DIRECT,
    SSH,
    SSH_L,
    SSH_SAME,
    SSHTUNNEL,
    markdown,
    print_table,
    summarize,
)
from bench.cli import (
    add_python_and_results,
    add_run_options,
    add_session_options,
    bench_parser,
    quick_defaults,
    run_bench,
)
from bench.meter import MachineMeter, cpu_seconds, descendants, proc_health
from bench.peers import ensure_peers
from bench.procs import BenchError, Lines, check_procs, free_port, json_event, read_port, wait_ready
from bench.relay_workers import client_worker
from bench.report import (
    pctl,
)
from bench.sessions import (
    LOOPBACK,
    REPO,
    STALL_SECONDS,
    MiB,
    target_worker,
)
from bench.sshd import Route, SshdBench, labrelay_argv

PEERS_SCRIPT = str(Path(__file__).resolve().parent / "peers.py")

THIS = str(Path(__file__).resolve())


PEERS = (ASYNCSSH, SSHTUNNEL)  # Python tools, from their own venv (bench.peers)
PATHS = (AGENT, SSH, SSH_SAME, ASYNCSSH, SSH_L, SSHTUNNEL, DIRECT)  # the order of every round
# sshtunnel ends the whole channel when the client half-closes, so the sink's reply to a
# push never comes back: its pushes tell the sink the count first (MODE_COUNTED) instead
NO_HALF_CLOSE = (SSHTUNNEL,)
AEAD_MARKERS = ("gcm", "poly1305")  # ciphers whose MAC is implicit
# The link's cipher before AES-GCM; bench.relay_vs_openssh still uses it for its ssh-aes path.
AES_OPTIONS = ("-c", "aes128-ctr", "-m", "hmac-sha2-256")

Samples = dict[str, dict[str, list[dict[str, Any]]]]  # per op or kind, per path: results


# ---------------------------------------------------------------------------
# the set-up: sshd, target, agent, two ssh clients, the client worker


class Bench(SshdBench):
    """The processes of one benchmark run, and the measurements over them."""

    MAX_MS_WIDTH = 6  # of the max set-up latency in the progress lines

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.paths = {name: Route(name) for name in PATHS}
        self.target_port = 0
        self.client: subprocess.Popen[bytes] | None = None
        self.client_out: Lines | None = None
        self.agent_events: list[dict[str, Any]] = []
        self.agent_keys: tuple[str, str] | None = None  # (cipher, MAC) from ssh_keys
        # the peers' venv, versions and any skipped peer with its reason (bench.peers)
        self.peers: dict[str, Any] = {"skipped": {}, "versions": {}}

    # -- set-up

    def start_target(self) -> None:
        _, out = self.start_worker("target", THIS, "target")
        self.target_port = read_port(out, "the target's port")

    def start_client(self) -> None:
        self.client, self.client_out = self.start_worker("client", THIS, "client")

    def start_agent(self) -> None:
        path = self.paths[AGENT]
        assert self.sshd is not None
        before = descendants(self.sshd.pid)
        path.argv = labrelay_argv(
            self.args.python, "agent",
            "-p", str(self.sshd_port), "-i", str(self.key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-R", f"{LOOPBACK}:0:{LOOPBACK}:{self.target_port}", f"{self.user}@{LOOPBACK}",
        )

        def ready(line: str) -> int | None:
            event = json_event(line)
            if event and event.get("event") == "ssh_keys" and self.agent_keys is None:
                self.agent_keys = (str(event.get("cipher_out")), str(event.get("mac_out")))
            if event and event.get("event") == "forward_ready" and event.get("kind") == "remote":
                return int(event["port"])
            return None

        path.forwarder, path.log, path.port = self.start_labrelay(
            "agent", path.argv, ready, "forward_ready event from the agent")
        self._new_sshd_sessions(before, path)

    def start_ssh(self, name: str, extra: Sequence[str]) -> None:
        path = self.paths[name]
        path.port = free_port()
        self.ssh_reverse(path, name, extra, [(path.port, self.target_port)])

    def start_ssh_local(self, name: str) -> None:
        """``ssh -N -L 127.0.0.1:PORT:127.0.0.1:TARGET``: OpenSSH's local forward."""
        path = self.paths[name]
        path.port = free_port()
        assert self.sshd is not None
        before = descendants(self.sshd.pid)
        path.argv = [*self.ssh_base(), "-N", "-o", "ExitOnForwardFailure=yes",
                     "-L", f"{LOOPBACK}:{path.port}:{LOOPBACK}:{self.target_port}",
                     f"{self.user}@{LOOPBACK}"]
        path.forwarder = self.children.start(name, path.argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
        assert path.forwarder.stderr is not None
        path.log = Lines(path.forwarder.stderr, f"{name}-stderr")
        self._wait_listening(name, path.forwarder, path.log, path.port)
        self._new_sshd_sessions(before, path)

    def start_peer(self, name: str) -> None:
        """A Python peer (``bench/peers.py NAME``) in the peers' venv; ready at its JSON line."""
        path = self.paths[name]
        assert self.sshd is not None
        before = descendants(self.sshd.pid)
        path.argv = [self.peers["python"], PEERS_SCRIPT, name, str(self.sshd_port), self.user,
                     str(self.key), str(self.known_hosts), str(self.target_port)]
        path.forwarder = self.children.start(name, path.argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert path.forwarder.stdout is not None
        path.log = Lines(path.forwarder.stdout, f"{name}-output")

        def ready(line: str) -> dict[str, Any] | None:
            event = json_event(line)
            return event if event and "port" in event else None

        event = wait_ready(name, path.forwarder, path.log, ready, f"ready line from {name}")
        path.port = int(event["port"])
        path.cipher = str(event.get("cipher"))
        self.peers["versions"].update(event.get("versions") or {})
        self._new_sshd_sessions(before, path)

    def setup_peers(self) -> None:
        """The peers' venv (made or reused), then each peer and ssh -L; a peer that cannot
        be installed or started is dropped from the run with its reason."""
        if self.args.no_peers:
            self.peers["skipped"] = {p: "--no-peers" for p in PEERS}
        else:
            self.peers.update(ensure_peers(self.args.peers_venv))
        for name in PEERS:
            if name in self.peers["skipped"]:
                continue
            try:
                self.start_peer(name)
            except BenchError as e:
                self.peers["skipped"][name] = f"did not start: {e}"
                proc = self.paths[name].forwarder
                if proc is not None and proc.poll() is None:
                    proc.terminate()
        for name, reason in self.peers["skipped"].items():
            print(f"  {name}: skipped ({reason.splitlines()[0] if reason else '?'})",
                  flush=True)
        if SSHTUNNEL not in self.peers["skipped"]:
            self.start_ssh_local(SSH_L)
            self.paths[SSH_L].cipher = self.negotiated(())
        else:
            del self.paths[SSH_L]  # only there as sshtunnel's OpenSSH counterpart
        for name in self.peers["skipped"]:
            self.paths.pop(name, None)

    def agent_cipher(self) -> tuple[str, str]:
        """The cipher and MAC of the agent's link: from its ``ssh_keys`` event, else (an
        agent that does not log it) its first preferences that this sshd allows."""
        if self.agent_keys is not None:
            return self.agent_keys
        probe = ("from relay.ssh.client import LinkTransport as T; "
                 "print(' '.join(c.decode() for c in T.supportedCiphers)); "
                 "print(' '.join(m.decode() for m in T.supportedMACs))")
        ours = subprocess.run([self.args.python, "-c", probe], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.splitlines()
        server = subprocess.run([self.sshd_binary, "-T", "-f", str(self.sshd_config_path)],
                                capture_output=True, text=True, check=True).stdout
        allowed = {k: v.split(",") for k, v in
                   (line.split(" ", 1) for line in server.splitlines() if " " in line)}
        cipher = next((c for c in ours[0].split() if c in allowed.get("ciphers", [])), "?")
        mac = next((m for m in ours[1].split() if m in allowed.get("macs", [])), "?")
        if any(marker in cipher for marker in AEAD_MARKERS):
            mac = "<implicit>"
        return cipher, mac

    def setup(self) -> None:
        self.start_sshd()
        self.start_target()
        self.paths[DIRECT].port = self.target_port
        self.start_agent()
        cipher, mac = self.agent_cipher()
        same = ["-c", cipher] + (["-m", mac] if mac != "<implicit>" else [])
        self.start_ssh(SSH, ())
        self.start_ssh(SSH_SAME, same)
        self.setup_peers()
        self.start_client()
        self.paths[AGENT].cipher = f"{cipher} + {mac}"
        self.paths[SSH].cipher = self.negotiated(())
        self.paths[SSH_SAME].cipher = self.negotiated(same)
        self.paths[DIRECT].cipher = "none"
        if self.paths[SSH_SAME].cipher != self.paths[AGENT].cipher:
            self.anomalies.append(
                f"ssh-same negotiated {self.paths[SSH_SAME].cipher}, the agent "
                f"{self.paths[AGENT].cipher}: the equal-cipher comparison is not equal")

    # -- running commands in the client worker

    def client_call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.client is not None and self.client.stdin is not None
        assert self.client_out is not None
        self.client.stdin.write((json.dumps(cmd) + "\n").encode())
        self.client.stdin.flush()
        line = self.client_out.wait_for(lambda s: s, timeout, f"client reply to {cmd['op']}")
        result: dict[str, Any] = json.loads(line)
        return result

    def check_alive(self) -> None:
        """A core path's forwarder gone ends the run; a peer's is a failure of that path."""
        check_procs([(path.name, path.forwarder, path.log) for path in self.paths.values()
                     if path.name not in PEERS])
        for name in PEERS:
            path = self.paths.get(name)
            if (path is not None and path.forwarder is not None
                    and path.forwarder.poll() is not None and not path.failures):
                self.fail(path, "forwarding", f"exited ({path.forwarder.returncode})")

    def diagnose(self, path: Route, what: str, error: str) -> str:
        """Everything worth reporting about a path that failed a measurement."""
        lines = [f"{path.name}: {what} failed: {error}"]
        if path.pid is not None:
            lines.append(f"  forwarder pid {path.pid}: {proc_health(path.pid)}, "
                         f"running={path.forwarder is not None and path.forwarder.poll() is None}")
        for pid in sorted(path.sshd_pids):
            lines.append(f"  sshd session pid {pid}: {proc_health(pid)}")
        if path.log is not None:
            lines.append("  last output:\n    " + path.log.text(20).replace("\n", "\n    "))
        return "\n".join(lines)

    def measured(self, path: Route, fn: Callable[[], dict[str, Any]], what: str
                 ) -> dict[str, Any] | None:
        """Run ``fn`` with CPU accounting of ``path``'s forwarder and sshd sessions."""
        fwd = [path.pid] if path.pid is not None else []
        sshd = sorted(path.sshd_pids)
        cpu0, scpu0 = cpu_seconds(fwd), cpu_seconds(sshd)
        result = fn()
        result["cpu_forwarder"] = cpu_seconds(fwd) - cpu0 if fwd else None
        result["cpu_sshd"] = cpu_seconds(sshd) - scpu0 if sshd else None
        if "error" in result:
            self.fail(path, what, result["error"])
            return None
        return result

    def fail(self, path: Route, what: str, error: str) -> None:
        report = self.diagnose(path, what, error)
        path.failures.append(report)
        self.anomalies.append(report)
        print(f"!! {report}", file=sys.stderr, flush=True)

    def transfer(self, op: str, path: Route, nbytes: int) -> dict[str, Any] | None:
        timeout = nbytes / 1e6 + 2 * STALL_SECONDS + 30  # >= 1 MB/s, then a stall
        cmd = {"op": op, "port": path.port, "bytes": nbytes}
        if path.name in NO_HALF_CLOSE:
            cmd["counted"] = True
        result = self.measured(path, lambda: self.client_call(cmd, timeout),
                               f"{op} of {nbytes} bytes")
        if result is not None and result["count"] != nbytes:
            report = self.diagnose(path, f"{op} of {nbytes} bytes",
                                   f"{result['count']} bytes arrived")
            path.failures.append(report)
            self.anomalies.append(report)
            return None
        return result

    # -- the measurements

    def sessions(self, path: Route, sessions: int, gap_ms: float, what: str
                 ) -> dict[str, Any] | None:
        timeout = sessions * (gap_ms / 1000 + 1) + STALL_SECONDS + 30
        return self.measured(
            path, lambda: self.client_call({"op": "setup", "port": path.port,
                                            "sessions": sessions, "gap": gap_ms / 1000},
                                           timeout), what)

    def warm_up(self) -> None:
        for path in self.paths.values():
            for op in ("push", "pull"):
                self.transfer(op, path, 64 * MiB)
            self.sessions(path, 20, 0, "warm-up sessions")

    def active(self) -> list[Route]:
        return [p for p in self.paths.values() if not p.failures or self.args.keep_going]

    def sample_tables(self) -> tuple[list[str], Samples, list[str], Samples]:
        """The directions and set-up kinds to measure, and empty per-path sample lists."""
        args = self.args
        directions = ["push"] + ([] if args.no_reverse else ["pull"])
        tput: Samples = {op: {p: [] for p in self.paths} for op in directions}
        kinds = ["back_to_back"] + (["idle_gap"] if args.gap_sessions else [])
        lat: Samples = {kind: {p: [] for p in self.paths} for kind in kinds}
        return directions, tput, kinds, lat

    def transfer_note(self, r: dict[str, Any]) -> str:
        """What the progress line of a transfer adds after its MB/s."""
        return ""

    def throughput_round(self, run: int, directions: list[str], tput: Samples) -> None:
        """One run's transfers: each direction, path by path."""
        args = self.args
        for op in directions:
            for path in self.active():
                r = self.transfer(op, path, args.bytes)
                self.check_alive()
                if r is not None:
                    tput[op][path.name].append(r)
                    print(f"run {run}/{args.runs} {op:4} {path.name:9} "
                          f"{args.bytes / r['seconds'] / 1e6:8.1f} MB/s" + self.transfer_note(r),
                          flush=True)

    def latency_round(self, run: int, kinds: list[str], lat: Samples) -> None:
        """One run's set-up latency sessions: each kind, path by path."""
        args = self.args
        for kind in kinds:
            n, gap = ((args.sessions, 0.0) if kind == "back_to_back"
                      else (args.gap_sessions, args.gap_ms))
            for path in self.active():
                r = self.sessions(path, n, gap, f"set-up latency ({kind})")
                self.check_alive()
                if r is not None:
                    lat[kind][path.name].append(r)
                    ms = r["ms"]
                    print(f"run {run}/{args.runs} set-up {kind:12} {path.name:9} "
                          f"p50 {pctl(ms, 50):6.2f}  p99 {pctl(ms, 99):6.2f}  "
                          f"max {max(ms):{self.MAX_MS_WIDTH}.2f} ms", flush=True)

    def sshd_lines_since(self, count0: int) -> int:
        """How many lines sshd logged since it had logged ``count0``; any is an anomaly."""
        if self.sshd_log is None:
            return 0
        lines = self.sshd_log.count - count0
        if lines:
            self.anomalies.append(f"sshd logged {lines} lines during the measurements:\n"
                                  + self.sshd_log.text(min(lines, 20)))
        return lines

    def run(self) -> dict[str, Any]:
        args = self.args
        directions, tput, kinds, lat = self.sample_tables()
        health: dict[str, Any] = {}
        agent_pid = self.paths[AGENT].pid
        assert agent_pid is not None and self.sshd_log is not None
        health["agent_ready"] = proc_health(agent_pid)
        print("warming up (64 MiB each way and 20 sessions per path, not recorded)", flush=True)
        self.warm_up()
        self.check_alive()
        sshd_lines0 = self.sshd_log.count
        health["agent_after_warmup"] = proc_health(agent_pid)
        meter = MachineMeter()

        for run in range(1, args.runs + 1):
            self.throughput_round(run, directions, tput)
            health.setdefault("agent_after_throughput", proc_health(agent_pid))
            self.latency_round(run, kinds, lat)
            health.setdefault("agent_after_first_latency_run", proc_health(agent_pid))

        health["agent_end"] = proc_health(agent_pid)
        machine = meter.result()
        sshd_lines = self.sshd_lines_since(sshd_lines0)
        agent_log = self.paths[AGENT].log
        assert agent_log is not None
        health["key_exchanges"] = 0  # the agent's ssh_keys events: the first, then rekeys
        for line in agent_log.tail:
            event = json_event(line)
            if event is not None and event.get("event") == "ssh_keys":
                health["key_exchanges"] += 1
            if event is None:
                self.anomalies.append(f"agent printed a non-JSON line: {line}")
            elif event.get("level") not in ("info", "debug"):
                self.agent_events.append(event)
        for event in self.agent_events:
            self.anomalies.append(f"agent logged {event.get('level')}: {event.get('text')}")
        return summarize(self, tput, lat, health, sshd_lines, machine)


# ---------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("python -m bench.agent_vs_openssh",
                     "labrelay agent vs OpenSSH ssh -N -R on loopback: throughput, CPU and "
                     "new-session latency, side by side in one run.",
                     "runs per measurement (default 5)")
    add_session_options(p, "set-up latency sessions per path per run (default 200)", 100,
                        "idle time before each of those sessions (default 50 ms: longer than "
                        "Linux's 40 ms delayed-ACK timer)")
    add_run_options(p, "path")
    p.add_argument("--no-peers", action="store_true",
                   help="leave out the Python peers (asyncssh, sshtunnel) and ssh -L")
    p.add_argument("--peers-venv", type=Path, default=None,
                   help="the peers' venv, made and filled with pip if it lacks them "
                   "(default: $LABRELAY_BENCH_PEERS or ~/.cache/labrelay-bench-peers)")
    add_python_and_results(p, "the Python that runs the agent (default: this one; it must "
                           "import relay)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        {"client": client_worker, "target": target_worker}[argv[1]]()
        return 0
    args = quick_defaults(build_parser().parse_args(argv))

    def announce(bench: Bench) -> None:
        for p in bench.paths.values():
            print(f"  {p.name:9} port {p.port:5}  {p.cipher}", flush=True)

    return run_bench("labrelay-bench-", lambda workdir: Bench(args, workdir), announce,
                     markdown, print_table, args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
