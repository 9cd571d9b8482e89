"""The fast-path benches' peers: the processes ``bench.fast_path`` (and, building on it,
``bench.stock_paths``) measure through, started once per run.

The target sshd, a raw TCP sink, ``labrelay relay`` with a data port, ``labrelay agent``
with its pool of data connections, the seed's cloud sshd with lab_pc's ``ssh -N -R``, and
the seed's full three-hop chain (see ``bench/fast_path.py``'s docstring for the picture).
The trials over them are in ``bench/fast_trials.py``, the workers in
``bench/fast_workers.py``."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.fast_path_report import SERVICES
from bench.fast_workers import THIS as WORKERS
from bench.fast_workers import tcp_listening
from bench.meter import descendants
from bench.procs import (
    BenchError,
    Lines,
    alive,
    check_procs,
    find_program,
    free_port,
    json_event,
    read_port,
    run_text,
)
from bench.relay_setup import RelayPeers
from bench.sessions import LOOPBACK, REPO, START_TIMEOUT
from bench.sshd import Route, SshdBench, public_key

RELAY_CONFIG = """\
[relay]
listen = "127.0.0.1:0"
state_dir = "{dir}/relay-state"
public_bind = "127.0.0.1"
# every load generator is this host: one source, not to be capped as one
public_max_per_source = 0
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


def quoted(items: Sequence[str]) -> str:
    """TOML's list items: ``"a", "b"``."""
    return ", ".join(f'"{s}"' for s in items)


class FastPeers(RelayPeers):
    """The processes of one run: target sshd, sink, relay, agent, cloud sshd, ``ssh -R``,
    the seed's full chain. A subclass names its relay's services (``SERVICES``, ``E2E``),
    the agent's forwards (:meth:`agent_forwards`) and the seed's (:meth:`seed_forwards`)."""

    SERVICES: tuple[str, ...] = SERVICES
    E2E: tuple[str, ...] = SERVICES  # raw TCP to the sink is not really encrypted: e2e

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.paths = {}  # this bench's variants are not RelayBench's paths
        self.user_known_hosts = workdir / "user_known_hosts"
        self.sink: subprocess.Popen[bytes] | None = None
        self.sink_out: Lines | None = None
        self.sink_port = 0
        self.data_port = 0
        self.pub_port = 0
        self.cloud: SshdBench | None = None
        self.ssh_r = Route("ssh_R")
        # the seed's full chain: lab_pc's sshd and the three hops
        self.lab: SshdBench | None = None
        self.full_gpu = Route("full_gpu_ssh_R")  # gpu_cluster: ssh -N -R to lab_pc
        self.full_detach = Route("full_ssh_L")  # lab_pc: ssh -N -L to itself
        self.full_auto = Route("full_autossh_R")  # lab_pc: autossh -M 0 -N -R to the cloud
        self.full_ports: dict[str, int] = {}
        self.full_pub = self.full_raw_pub = 0
        self.autossh = ""  # its version, or why plain ssh -N -R stands in for it
        self.autossh_ssh: list[int] = []  # the ssh that autossh runs
        self.ciphers: dict[str, str] = {}
        self.backend = ""
        self.failed: set[tuple[str, str]] = set()
        self.events: dict[str, int] = {}
        self.stray: set[int] = set()  # per-session processes not our children (connect)
        self.trials = 0
        self.wrapper_start_s: float | None = None
        self.feeders: list[subprocess.Popen[bytes]] = []  # feeders and raw clients
        self.inetd: socket.socket | None = None  # fast_sock's listener (inetd-style)

    # -- processes

    def start_sink(self) -> None:
        self.sink, self.sink_out = self.start_worker("sink", WORKERS, "sink")
        self.sink_port = read_port(self.sink_out, "the sink's port")

    def start_relay(self) -> None:
        blob = self.user_keys("agent", "alice")
        config = self.dir / "relay.toml"
        config.write_text(RELAY_CONFIG.format(
            dir=self.dir, agent_key=blob["agent"], alice_key=blob["alice"],
            e2e=quoted(self.E2E), services=quoted(self.SERVICES)))
        ports: dict[str, int] = {}

        def both(line: str) -> bool:
            event = json_event(line) or {}
            if event.get("event") in ("relay_listening", "relay_data_port"):
                ports[str(event["event"])] = int(event["port"])
            return len(ports) == 2

        self.start_relay_process(config, both, "relay_listening and relay_data_port")
        self.relay_port, self.data_port = ports["relay_listening"], ports["relay_data_port"]
        self.trust_relay_host()

    def agent_forwards(self) -> list[str]:
        """The agent's ``-R`` forwards: the target sshd, and the sink."""
        assert self.target_port and self.sink_port
        return [f"gpu-cluster:22:{LOOPBACK}:{self.target_port}",
                f"sink:9000:{LOOPBACK}:{self.sink_port}"]

    def start_relay_agent(self) -> None:
        """The agent with :meth:`agent_forwards`, ready once each is and its pool is."""
        forwards = self.agent_forwards()
        seen: set[str] = set()

        def ready(line: str) -> bool:
            event = json_event(line) or {}
            if event.get("event") == "forward_ready":
                seen.add(f"{event.get('bind')}")
            elif event.get("event") == "fast_path_off":
                raise BenchError(f"the agent has no fast path: {event.get('reason')}")
            elif event.get("event") == "fast_path_ready":
                seen.add("fast path")
            return len(seen) == len(forwards) + 1

        self.start_relay_agent_process(forwards, "lab_pc", ready,
                                       "fast_path_ready and forward_ready from the agent")

    def start_peer_sshd(self, name: str) -> SshdBench:
        """Another private sshd (the seed's "cloud", "lab_pc") in its own directory,
        stopped with everything else."""
        peer_dir = self.dir / name
        peer_dir.mkdir()
        peer_dir.chmod(0o755)
        peer = SshdBench(self.args, peer_dir)
        peer.children = self.children  # one cleanup for everything
        peer.start_sshd()
        return peer

    def seed_forwards(self) -> list[tuple[int, int]]:
        """lab_pc's ``ssh -N -R`` forwards to the cloud: (public port, target port)."""
        self.pub_port = free_port()
        return [(self.pub_port, self.target_port)]

    def start_seed(self) -> None:
        """The seed's cloud: a second private sshd, and lab_pc's ``ssh -N -R`` to it."""
        cloud = self.cloud = self.start_peer_sshd("cloud")
        cloud.ssh_reverse(self.ssh_r, "ssh -R", (), self.seed_forwards(), "ssh -N -R")
        if not self.ssh_r.sshd_pids:
            raise BenchError("no cloud sshd session process found for ssh -N -R")

    def _hop(self, on: SshdBench, route: Route, name: str, argv: list[str], probe: int,
             listening: Sequence[int], env: dict[str, str] | None = None) -> None:
        """Start one hop of the full chain (``argv``, an ssh to ``on``'s sshd) as ``route``'s
        forwarder; ready once ``probe`` accepts (a connection through the chain so far, down
        to the target sshd, which sees an empty probe) and every port of ``listening`` is in
        LISTEN (not probed: those lead to the sink, which must not see stray connections)."""
        assert on.sshd is not None
        before = descendants(on.sshd.pid)
        route.argv = argv
        route.forwarder = self.children.start(name, argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, env=env)
        assert route.forwarder.stderr is not None
        route.log = Lines(route.forwarder.stderr, f"{name}-stderr")
        on._wait_listening(name, route.forwarder, route.log, probe)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(tcp_listening(port) for port in listening):
            if route.forwarder.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{name}: ports {list(listening)} not all listening:\n"
                                 f"{route.log.text()}")
            time.sleep(0.02)
        on._new_sshd_sessions(before, route)
        if not route.sshd_pids:
            raise BenchError(f"no sshd session process found for {name}")

    def _autossh(self) -> str | None:
        """autossh's path (installed with apt-get if missing, as root), or None."""
        found = shutil.which("autossh")
        if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "autossh"], capture_output=True,
                           timeout=300, stdin=subprocess.DEVNULL,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            found = shutil.which("autossh")
        return found

    def start_seed_full(self) -> None:
        """The seed's full chain. lab_pc: a third private sshd. Its hops as the seed's, with
        loopback addresses and a second forward on each, whose innermost target is the sink:
        gpu_cluster ``ssh -N -R LABPORT:TARGET`` to lab_pc; on lab_pc the detach hop
        ``ssh -N -L REASSIGN:LABPORT`` to itself and ``autossh -M 0 -N -R PUB:REASSIGN`` to
        the cloud. Default ciphers; no keepalive options (the seed sets none)."""
        assert self.cloud is not None
        lab = self.lab = self.start_peer_sshd("lab_pc")
        ports = self.full_ports = {k: free_port() for k in (
            "lab", "lab_sink", "reassign", "reassign_sink", "pub", "pub_sink")}
        self.full_pub, self.full_raw_pub = ports["pub"], ports["pub_sink"]
        to = f"{LOOPBACK}:{{}}:{LOOPBACK}:{{}}"
        opts = ["-N", "-o", "ExitOnForwardFailure=yes"]
        target = f"{lab.user}@{LOOPBACK}"
        self._hop(lab, self.full_gpu, "ssh -N -R (gpu_cluster)", [
            *lab.ssh_base(), *opts,
            "-R", to.format(ports["lab"], self.target_port),
            "-R", to.format(ports["lab_sink"], self.sink_port), target],
            ports["lab"], [ports["lab_sink"]])
        self._hop(lab, self.full_detach, "ssh -N -L (detach)", [
            *lab.ssh_base(), *opts,
            "-L", to.format(ports["reassign"], ports["lab"]),
            "-L", to.format(ports["reassign_sink"], ports["lab_sink"]), target],
            ports["reassign"], [ports["reassign_sink"]])
        ssh = self.cloud.ssh_base()
        env = None
        autossh = self._autossh()
        if autossh:
            self.autossh = run_text([autossh, "-V"]) or "autossh"
            front = [autossh, "-M", "0", *ssh[1:]]
            env = {**os.environ, "AUTOSSH_PATH": ssh[0]}
        else:
            self.autossh = ("not installed (and not installable here): plain ssh -N -R "
                            "stands in for autossh -M 0 -R")
            front = ssh
        self._hop(self.cloud, self.full_auto, "autossh -R", [
            *front, *opts,
            "-R", to.format(ports["pub"], ports["reassign"]),
            "-R", to.format(ports["pub_sink"], ports["reassign_sink"]),
            f"{self.cloud.user}@{LOOPBACK}"], ports["pub"], [ports["pub_sink"]], env)
        assert self.full_auto.pid is not None
        self.autossh_ssh = sorted(descendants(self.full_auto.pid)) if autossh else []
        if autossh and not self.autossh_ssh:
            raise BenchError("autossh runs no ssh")

    def write_user_known_hosts(self) -> None:
        host = public_key(self.dir / "host_ed25519.pub")
        self.user_known_hosts.write_text(
            f"[{LOOPBACK}]:{self.sshd_port} {host}\n[{LOOPBACK}]:{self.pub_port} {host}\n"
            f"[{LOOPBACK}]:{self.full_pub} {host}\ngpu-cluster {host}\n")

    def probe_backend(self) -> str:
        probe = ("from relay.datapath.splicing import choose_backend as c; b = c(); "
                 "print(f'{b.name} ({b.reason})')")
        out = subprocess.run([self.args.python, "-c", probe], cwd=REPO, capture_output=True,
                             text=True, timeout=START_TIMEOUT)
        return out.stdout.strip() or f"unknown: {out.stderr.strip()[-200:]}"

    def wrapper_overhead(self) -> float:
        """Seconds the rusage wrapper adds to starting a process (it delays the fast path's
        session set-up, not its stream): the median of 3 ``wrapper -- true``."""
        times = []
        for i in range(3):
            start = time.perf_counter()
            subprocess.run(self.wrapped(self.dir / f"overhead-{i}.jsonl",
                                        [find_program("true")]), check=True, cwd=REPO)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def setup(self) -> None:
        self.start_sshd()
        self.start_target_noop()
        self.start_sink()
        self.inetd = socket.create_server((LOOPBACK, 0), backlog=8)
        self.start_relay()
        self.start_relay_agent()
        self.start_seed()
        self.start_seed_full()
        self.write_user_known_hosts()
        assert self.cloud is not None and self.lab is not None
        self.ciphers = {"user ssh (all ssh variants)": self.negotiated(()),
                        "seed ssh -N -R link": self.cloud.negotiated(()),
                        "seed full chain's links (to lab_pc's sshd; to the cloud's as "
                        "above)": self.lab.negotiated(())}
        self.backend = self.probe_backend()
        self.wrapper_start_s = self.wrapper_overhead()

    def start_target_noop(self) -> None:
        """The target is the sshd itself: the avo target worker is not needed."""
        self.target_port = self.sshd_port

    def connect_argv(self, service: str) -> list[str]:
        """``labrelay connect`` as alice to ``service``."""
        return [self.args.python, "-m", "relay", "connect", "-p", str(self.relay_port),
                "-i", str(self.dir / "alice_ed25519"),
                "-o", f"UserKnownHostsFile={self.relay_known_hosts}",
                f"alice@{LOOPBACK}", service]

    def wrapped(self, out: Path, argv: list[str]) -> list[str]:
        """``argv`` under the rusage wrapper, which writes its pid and CPU to ``out``."""
        return [self.args.python, WORKERS, "--worker", "rusage", str(out), "--", *argv]

    def check_alive(self) -> None:
        procs = [("relay", self.relay, self.relay_log), ("agent", self.agent, self.agent_log),
                 ("sink", self.sink, self.sink_out), ("ssh -N -R", self.ssh_r.forwarder,
                                                      self.ssh_r.log),
                 ("target sshd", self.sshd, self.sshd_log)]
        if self.cloud is not None:
            procs.append(("cloud sshd", self.cloud.sshd, self.cloud.sshd_log))
        if self.lab is not None:
            procs += [("lab_pc sshd", self.lab.sshd, self.lab.sshd_log)]
            procs += [(r.name, r.forwarder, r.log)
                      for r in (self.full_gpu, self.full_detach, self.full_auto)]
        check_procs(procs)
        for pid in self.autossh_ssh:  # autossh restarting its ssh would void the accounting
            if not alive(pid):
                raise BenchError(f"autossh's ssh (pid {pid}) exited mid-run")

    def cleanup(self) -> list[str]:
        if self.inetd is not None:
            self.inetd.close()
        notes = self.children.stop_all()
        self.stray |= set(self.autossh_ssh)  # autossh ends it; if not, it is ended here
        for pid in sorted(self.stray):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                notes.append(f"killed leftover process {pid}")
        return notes
