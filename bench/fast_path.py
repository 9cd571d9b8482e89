"""The fast path (``labrelay connect`` -> relay data port -> agent data pool, spliced)
against ssh straight to the target and the seed's OpenSSH chain, side by side in one run.

Everything on 127.0.0.1, real processes, from a temporary directory:

* a private OpenSSH ``sshd``, the target ("gpu-cluster");
* a ``labrelay relay`` with ``data_port = 0`` and ``e2e_services = ["gpu-cluster:22",
  "sink:9000"]``, and a ``labrelay agent`` ("lab_pc") registering ``-R gpu-cluster:22:TARGET``
  and ``-R sink:9000:SINK`` that keeps its pool of data connections (``fast_path_ready``);
  both with ``LABRELAY_DATAPATH`` as inherited (default ``auto``: the C pump thread);
* a second private ``sshd``, the seed's "cloud", and ``ssh -N -R 127.0.0.1:PUB:127.0.0.1:TARGET``
  to it (the seed's ``autossh -M 0 -R ...`` from lab_pc is this same ssh): the one-hop chain;
* the seed's full chain: a third private ``sshd``, "lab_pc", and, exactly as the seed's hops,
  gpu_cluster's ``ssh -N -R 127.0.0.1:LABPORT:127.0.0.1:TARGET`` to it, on lab_pc the
  "detach" hop ``ssh -N -L 127.0.0.1:REASSIGN:127.0.0.1:LABPORT`` to lab_pc's own sshd, and
  ``autossh -M 0 -N -R 127.0.0.1:PUBFULL:127.0.0.1:REASSIGN`` to the cloud sshd (plain
  ``ssh -N -R`` when autossh is missing); each hop also carries a second forward, the same
  way, whose innermost target is the sink (for the raw workload: same processes, same
  connections, one more channel);
* a raw TCP sink (this file re-run as ``--worker sink``) that counts what arrives.

Workload ``ssh``: a user's ``ssh ... 'echo ready; wc -c'`` (a sink like ``cat > /dev/null``
that also prints the byte count, which is checked), OpenSSH's default cipher, fed
``--bytes`` on stdin by a feeder process once the session printed ``ready``:

* ``direct``  ssh straight to the target sshd;
* ``fast``    ssh with ``ProxyCommand`` = ``python -m relay connect ... %h:%p`` as alice;
* ``seed``    ssh to the cloud's public port ``-p PUB`` (the seed's public-port way; the
  target's sshd answers through the ``ssh -R`` tunnel);
* ``seed_full`` ssh to the cloud's public port ``-p PUBFULL`` of the seed's full chain
  (cloud sshd -> autossh's ssh -> ssh -L detach -> lab_pc sshd -> gpu_cluster's ssh -R).

Workload ``raw``: the same bytes into the sink. Socket-fed (what the raw goal is judged
on): one Python client (this file's ``--worker source``: bench.plain_hop's source, 1 MiB
``sendall`` of memoryview slices with TCP_NODELAY, but waiting for "go" once connected)
sends to

* ``direct``      the sink itself (direct loopback);
* ``socat_sock``  ``socat -b 131072 TCP-LISTEN:P,bind=127.0.0.1,reuseaddr TCP:SINK``: one
  plain user-space relay hop, for reference;
* ``fast_sock``   labrelay connect as an inetd-style service: the harness listens, accepts
  the client and starts ``python -m relay connect ... sink:9000`` with the accepted socket
  as its stdin and stdout, so its pump splices socket<->socket like the relay and the
  agent (three spliced hops; sink:9000 is declared e2e: raw TCP is not really encrypted);
* ``seed_full``   the seed's full chain raw: the client connects to the cloud's second
  public port, carried like the ssh variant's bytes down to the sink.

Pipe-fed (reported extras, not judged: direct loopback has no pipe in front of it, and a
feeder process writing a pipe adds its own cost; socat with no relay at all gets only
about 0.15x direct from such a pipe, which it leaves at 64 KiB; labrelay connect grows
its pipes to 1 MiB):

* ``socat_pipe``  the feeder's pipe into ``socat -u STDIN TCP:SINK``;
* ``fast_pipe``   the feeder's pipe into ``python -m relay connect ... sink:9000``, stdout
  to /dev/null.

Within each run every variant takes its turn, the order rotated run by run, so machine
noise falls on all alike. Throughput: ssh from "go" to ssh's exit; raw from the sink's
first byte to its EOF. CPU seconds per GiB of every relaying process during the stream:
long-lived processes (relay, agent, ``ssh -R``, cloud sshd sessions, the full chain's
three ssh clients and its lab_pc and cloud sshd sessions) from
``/proc/PID/stat`` (all threads: the C pump is one) before and after; processes that live
for one session (``labrelay connect``, socat) run under a small wrapper (``--worker
rusage``) that reads their exact lifetime total with ``wait4``; the stream share is that
total minus ``/proc/PID/stat`` read when the stream starts.

Run from the repository root with the venv's Python::

    python -m bench.fast_path             # 1 GiB x 5 runs
    python -m bench.fast_path --quick     # 256 MiB x 3 runs

Results: a table on stdout, ``bench/results/fast_path-latest.json`` and
``bench/results/fast_path-latest.md`` (overwritten), and a line in
``bench/results/history.jsonl``. Also run by ``python -m bench --only fast_path``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the ProxyCommand wrapper): make bench importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import relay_vs_openssh as rvo
from bench.cli import (
    add_python_and_results,
    add_run_options,
    bench_parser,
    quick_defaults,
    run_bench,
)
from bench.fast_path_report import (
    DIRECT,
    FAST,
    FAST_PORTABLE,
    FAST_SOCK,
    FAST_VARIANTS,
    PIPE_FED,
    RAW,
    REMOTE_COMMAND,
    SEED,
    SEED_FULL,
    SERVICES,
    SOCAT_PIPE,
    SOCAT_SOCK,
    SSH,
    VARIANTS,
    markdown,
    print_table,
    summarize,
)
from bench.meter import MachineMeter, cpu_note, cpu_seconds, descendants, machine_split, proc_cpu
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
from bench.sessions import (
    CHUNK,
    LOOPBACK,
    REPO,
    STALL_SECONDS,
    START_TIMEOUT,
    MiB,
    connect_retry,
    exit_when_parent_goes,
)
from bench.sshd import Route, SshdBench, public_key

THIS = str(Path(__file__).resolve())


RELAY_CONFIG = """\
[relay]
listen = "127.0.0.1:0"
state_dir = "{dir}/relay-state"
public_bind = "127.0.0.1"
data_port = 0
e2e_services = [{services}]

[[relay.agent]]
name = "lab_pc"
keys = ["{agent_key}"]
services = [{services}]

[[relay.user]]
name = "alice"
keys = ["{alice_key}"]
services = [{services}]
"""


# ---------------------------------------------------------------------------
# workers: this file re-run with --worker KIND


def feed_worker(nbytes: int) -> None:
    """Wait for one line on stdin, then write ``nbytes`` (random, 1 MiB at a time) to stdout."""
    block = memoryview(os.urandom(CHUNK))
    if not sys.stdin.buffer.readline():
        return  # the harness went away or gave up on this trial
    left = nbytes
    try:
        while left:
            left -= os.write(1, block[:min(left, len(block))])
    except BrokenPipeError:
        print(f"feed: the reader closed with {left} bytes left", file=sys.stderr)
        os._exit(1)
    os.close(1)


def source_worker(port: int, nbytes: int) -> None:
    """The raw client: bench.plain_hop's source worker (TCP_NODELAY, one 1 MiB random block,
    ``sendall`` of memoryview slices, then close), connecting first (retried while a listener
    starts) and sending only after a line on stdin, so that the stream starts on "go"."""
    sock = connect_retry(port, START_TIMEOUT)
    block = memoryview(os.urandom(CHUNK))
    if not sys.stdin.buffer.readline():
        return  # the harness went away or gave up on this trial
    sent = 0
    while sent < nbytes:
        n = min(len(block), nbytes - sent)
        sock.sendall(block[:n])
        sent += n
    sock.close()


def sink_worker() -> None:
    """Count what arrives on each connection: ``accepted`` at accept, ``done`` with the byte
    count and first byte -> EOF seconds at EOF, as JSON lines; exits when stdin closes."""
    server = socket.create_server((LOOPBACK, 0), backlog=64)
    lock = threading.Lock()

    def say(obj: dict[str, Any]) -> None:
        with lock:
            print(json.dumps(obj), flush=True)

    def serve(conn: socket.socket, n: int) -> None:
        view = memoryview(bytearray(CHUNK))
        with conn:
            say({"event": "accepted", "conn": n})
            accepted = time.perf_counter()
            total = first_n = 0
            try:
                first_n = conn.recv_into(view)
                first = time.perf_counter()
                total = first_n
                while first_n and (k := conn.recv_into(view)):
                    total += k
            except OSError as e:
                say({"event": "error", "conn": n, "error": str(e), "bytes": total})
                return
            end = time.perf_counter()
            say({"event": "done", "conn": n, "bytes": total,
                 "seconds": end - first if first_n else 0.0, "since_accept": end - accepted})

    say({"port": server.getsockname()[1]})
    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    n = 0
    while True:
        conn, _ = server.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n), daemon=True).start()


def rusage_worker(out: str, argv: list[str]) -> int:
    """Run ``argv`` (sharing our stdin/stdout/stderr) and write its pid, then its exit status
    and exact lifetime CPU seconds (``wait4``: every thread), as JSON lines to ``out``."""
    # ssh sends its ProxyCommand SIGHUP when it exits: we must still report. A handler,
    # not SIG_IGN, so that the child starts with the default disposition.
    signal.signal(signal.SIGHUP, lambda *_: None)
    pid = os.posix_spawn(argv[0], argv, dict(os.environ))
    with open(out, "a") as f:
        f.write(json.dumps({"pid": pid}) + "\n")
    _, status, ru = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(out, "a") as f:
        f.write(json.dumps({"exit": code, "cpu_s": ru.ru_utime + ru.ru_stime,
                            "utime": ru.ru_utime, "stime": ru.ru_stime,
                            "maxrss_kib": ru.ru_maxrss}) + "\n")
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------------------
# the set-up


class Wrapped:
    """A process started under ``--worker rusage``: its pid and, once it ended, its rusage."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _lines(self) -> list[dict[str, Any]]:
        with contextlib.suppress(OSError, ValueError):
            return [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return []

    def wait(self, key: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            for entry in self._lines():
                if key in entry:
                    return entry
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)


class Accounting:
    """CPU seconds of one trial's relaying processes in three phases: set-up (session
    started -> stream starts), the stream, and teardown (stream ended -> the per-session
    process exited). Long-lived processes (``groups``) are read from /proc/PID/stat; the
    per-session one (``own``: labrelay connect, socat) from /proc while it lives and, for
    its whole life, from ``wait4`` (``finish``'s ``own_total``)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.own_name = ""
        self.own_pid = 0
        self.spawn = self._sample()
        self.start: dict[str, float | None] = {}
        self.end: dict[str, float | None] = {}
        self.machine0 = self.machine1 = (0.0, 0.0, 0.0)

    def own(self, name: str, pid: int) -> None:
        self.own_name, self.own_pid = name, pid

    def _sample(self) -> dict[str, float | None]:
        found: dict[str, float | None] = {g: cpu_seconds(p) for g, p in self.groups.items()}
        if self.own_pid:
            found[self.own_name] = proc_cpu(self.own_pid)
        return found

    def stream_start(self) -> None:
        self.start = self._sample()
        self.machine0 = machine_split()

    def stream_end(self) -> None:
        self.machine1 = machine_split()
        self.end = self._sample()

    def machine(self) -> dict[str, float]:
        """The whole machine during the stream: CPUs busy, and of them in the kernel."""
        (t0, u0, k0), (t1, u1, k1) = self.machine0, self.machine1
        wall = t1 - t0
        if wall <= 0:
            return {}
        busy = u1 - u0 + k1 - k0
        return {"busy_cores": busy / wall, "kernel_cores": (k1 - k0) / wall, "busy_cpu_s": busy}

    def finish(self, own_total: float | None) -> dict[str, Any]:
        after = self._sample()
        cpu: dict[str, float] = {}
        setup: dict[str, float] = {}
        teardown: dict[str, float] = {}
        for g in self.groups:
            s0, s1, s2, s3 = self.spawn[g], self.start[g], self.end[g], after[g]
            assert s0 is not None and s1 is not None and s2 is not None and s3 is not None
            setup[g], cpu[g], teardown[g] = s1 - s0, s2 - s1, s3 - s2
        gone_early = False
        if self.own_pid and own_total is not None:
            g = self.own_name
            at_start, at_end = self.start.get(g), self.end.get(g)
            setup[g] = at_start or 0.0
            if at_end is None:  # it had already exited: its teardown counts as stream
                gone_early = True
                cpu[g], teardown[g] = own_total - (at_start or 0.0), 0.0
            else:
                cpu[g], teardown[g] = at_end - (at_start or 0.0), own_total - at_end
        return {"cpu": cpu, "setup_cpu": setup, "teardown_cpu": teardown,
                "own_exited_before_stream_end": gone_early, "machine": self.machine()}


class FastBench(rvo.RelayBench):
    """The processes of one run: target sshd, sink, relay, agent, cloud sshd, ``ssh -R``;
    and one trial of each variant at a time over them."""

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
        self.sink, self.sink_out = self.start_worker("sink", THIS, "sink")
        self.sink_port = read_port(self.sink_out, "the sink's port")

    def start_relay(self) -> None:
        blob = self.user_keys("agent", "alice")
        config = self.dir / "relay.toml"
        config.write_text(RELAY_CONFIG.format(
            dir=self.dir, agent_key=blob["agent"], alice_key=blob["alice"],
            services=", ".join(f'"{s}"' for s in SERVICES)))
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
        assert self.target_port and self.sink_port
        forwards = [f"gpu-cluster:22:{LOOPBACK}:{self.target_port}",
                    f"sink:9000:{LOOPBACK}:{self.sink_port}"]
        seen: set[str] = set()

        def ready(line: str) -> bool:
            event = json_event(line) or {}
            if event.get("event") == "forward_ready":
                seen.add(f"{event.get('bind')}")
            elif event.get("event") in ("fast_path_ready", "fast_path_off"):
                if event["event"] == "fast_path_off":
                    raise BenchError(f"the agent has no fast path: {event.get('reason')}")
                seen.add("fast path")
            return len(seen) == len(forwards) + 1

        self.start_relay_agent_process(forwards, "lab_pc", ready,
                                       "fast_path_ready and forward_ready from the agent")

    def start_seed(self) -> None:
        """The seed's cloud: a second private sshd, and lab_pc's ``ssh -N -R`` to it."""
        cloud_dir = self.dir / "cloud"
        cloud_dir.mkdir()
        cloud_dir.chmod(0o755)
        cloud = self.cloud = SshdBench(self.args, cloud_dir)
        cloud.children = self.children  # one cleanup for everything
        cloud.start_sshd()
        self.pub_port = free_port()
        r = self.ssh_r
        cloud.ssh_reverse(r, "ssh -R", (), [(self.pub_port, self.target_port)], "ssh -N -R")
        if not r.sshd_pids:
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
        lab_dir = self.dir / "lab_pc"
        lab_dir.mkdir()
        lab_dir.chmod(0o755)
        lab = self.lab = SshdBench(self.args, lab_dir)
        lab.children = self.children  # one cleanup for everything
        lab.start_sshd()
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

    # -- one trial

    def user_ssh(self, variant: str, rusage_out: Path) -> list[str]:
        argv = [find_program("ssh"), "-F", "/dev/null", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-i", str(self.key),
                "-o", f"UserKnownHostsFile={self.user_known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "UpdateHostKeys=no"]
        if variant == DIRECT:
            return [*argv, "-p", str(self.sshd_port), f"{self.user}@{LOOPBACK}", REMOTE_COMMAND]
        if variant in (SEED, SEED_FULL):
            port = self.pub_port if variant == SEED else self.full_pub
            return [*argv, "-p", str(port), f"{self.user}@{LOOPBACK}", REMOTE_COMMAND]
        connect = self.connect_argv("%h:%p")
        if variant == FAST_PORTABLE:  # only the user's end: relay and agent as inherited
            connect = [find_program("env") or "/usr/bin/env", "LABRELAY_DATAPATH=portable",
                       *connect]
        proxy = " ".join(self.wrapped(rusage_out, connect))
        return [*argv, "-o", f"ProxyCommand={proxy}", f"{self.user}@gpu-cluster",
                REMOTE_COMMAND]

    def connect_argv(self, service: str) -> list[str]:
        return [self.args.python, "-m", "relay", "connect", "-p", str(self.relay_port),
                "-i", str(self.dir / "alice_ed25519"),
                "-o", f"UserKnownHostsFile={self.relay_known_hosts}",
                f"alice@{LOOPBACK}", service]

    def wrapped(self, out: Path, argv: list[str]) -> list[str]:
        return [self.args.python, THIS, "--worker", "rusage", str(out), "--", *argv]

    def groups(self, workload: str, variant: str) -> dict[str, list[int]]:
        """The long-lived relaying processes of a variant, by name (CPU from /proc)."""
        if variant in FAST_VARIANTS:
            assert self.relay is not None and self.agent is not None
            return {"relay": [self.relay.pid], "agent": [self.agent.pid]}
        if variant == SEED:
            assert self.ssh_r.pid is not None
            return {"ssh_R": [self.ssh_r.pid], "cloud_sshd": sorted(self.ssh_r.sshd_pids)}
        if variant == SEED_FULL:
            gpu, detach, auto = self.full_gpu, self.full_detach, self.full_auto
            assert gpu.pid is not None and detach.pid is not None and auto.pid is not None
            return {"full_cloud_sshd": sorted(auto.sshd_pids),
                    "full_autossh_R": [auto.pid, *self.autossh_ssh],
                    "full_ssh_L": [detach.pid], "full_lab_sshd_L": sorted(detach.sshd_pids),
                    "full_lab_sshd_R": sorted(gpu.sshd_pids), "full_gpu_ssh_R": [gpu.pid]}
        return {}

    def drain_logs(self) -> None:
        """Count the relay's and the agent's events so far; warnings are anomalies."""
        for name, log in (("relay", self.relay_log), ("agent", self.agent_log)):
            if log is None:
                continue
            while True:
                try:
                    line = log.queue.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    break
                event = json_event(line)
                if event is None:
                    self.anomalies.append(f"{name} printed a non-JSON line: {line}")
                    continue
                key = f"{name}:{event.get('event')}"
                self.events[key] = self.events.get(key, 0) + 1
                if event.get("event") == "datapath_backend":
                    self.events[f"{name} backend: {event.get('text')}"] = 1
                elif event.get("level") not in ("info", "debug"):
                    self.anomalies.append(f"{name} logged {event.get('level')}: "
                                          f"{event.get('text')}")

    def trial(self, workload: str, variant: str, nbytes: int) -> dict[str, Any] | None:
        self.trials += 1
        out = self.dir / f"rusage-{self.trials}.jsonl"
        self.drain_logs()
        spliced0 = self.events.get("relay:relay_fast_session", 0)
        try:
            if workload == SSH:
                result = self._ssh_trial(variant, nbytes, out)
            else:
                result = self._raw_trial(variant, nbytes, out)
        except BenchError as e:
            result = {"error": str(e)}
        finally:
            self._reap(out)
            for feeder in self.feeders:  # one that never got "go" ends on EOF
                with contextlib.suppress(OSError, ValueError):
                    assert feeder.stdin is not None
                    feeder.stdin.close()
                try:
                    feeder.wait(10)
                except subprocess.TimeoutExpired:
                    feeder.kill()
            self.feeders.clear()
        self.drain_logs()
        if "error" not in result and variant in FAST_VARIANTS and \
                self.events.get("relay:relay_fast_session", 0) != spliced0 + 1:
            result["error"] = ("the relay did not log exactly one relay_fast_session: the "
                               "session did not take the fast path")
        if "error" in result:
            self.failed.add((workload, variant))
            report = f"{workload} {variant}: {result['error']}"
            self.anomalies.append(report)
            print(f"!! {report}", file=sys.stderr, flush=True)
            return None
        return result

    def _reap(self, out: Path) -> None:
        """A wrapped process left over from a failed trial: ended here."""
        pid = Wrapped(out).wait("pid", 0)
        if pid is None:
            return
        if Wrapped(out).wait("exit", 5.0) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid["pid"]), signal.SIGTERM)
            self.stray.add(int(pid["pid"]))

    def _feeder(self, nbytes: int) -> tuple[subprocess.Popen[bytes], int]:
        """A feeder waiting for "go", and the read end of its pipe (the caller closes it)."""
        r, w = os.pipe()
        feeder = self.children.start("feed", [sys.executable, THIS, "--worker", "feed",
                                              str(nbytes)], stdin=subprocess.PIPE, stdout=w)
        os.close(w)
        self.feeders.append(feeder)
        return feeder, r

    @staticmethod
    def _go(feeder: subprocess.Popen[bytes]) -> float:
        assert feeder.stdin is not None
        start = time.perf_counter()
        feeder.stdin.write(b"go\n")
        feeder.stdin.close()
        return start

    def _ssh_trial(self, variant: str, nbytes: int, out: Path) -> dict[str, Any]:
        feeder, r = self._feeder(nbytes)
        argv = self.user_ssh(variant, out)
        acct = Accounting(self.groups(SSH, variant))
        spawned = time.perf_counter()
        ssh = self.children.start(f"ssh {variant}", argv, stdin=r, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=REPO, env=avo_env())
        os.close(r)
        assert ssh.stdout is not None and ssh.stderr is not None
        sout, serr = Lines(ssh.stdout, "ssh-stdout"), Lines(ssh.stderr, "ssh-stderr")
        try:
            sout.wait_for(lambda s: s.strip() == "ready", START_TIMEOUT, "'ready' from ssh")
        except BenchError as e:
            ssh.kill()
            raise BenchError(f"{e}\nssh stderr:\n{serr.text()}") from None
        ready = time.perf_counter()
        if variant in (FAST, FAST_PORTABLE):
            entry = Wrapped(out).wait("pid", 5.0)
            if entry is None:
                ssh.kill()
                raise BenchError("the ProxyCommand wrapper wrote no pid")
            acct.own("connect", int(entry["pid"]))
        acct.stream_start()
        start = self._go(feeder)
        if not wait_exit(ssh, nbytes / 1e6 + 2 * STALL_SECONDS + 30):
            ssh.kill()
            raise BenchError(f"ssh did not finish in time:\n{serr.text()}")
        seconds = time.perf_counter() - start
        acct.stream_end()
        result: dict[str, Any] = {"seconds": seconds, "setup_s": ready - spawned}
        if variant in (FAST, FAST_PORTABLE):
            end = Wrapped(out).wait("exit", 30.0)
            if end is None:
                raise BenchError("labrelay connect did not exit within 30 s of ssh")
            if end["exit"] != 0:
                result["error"] = f"labrelay connect exited {end['exit']}"
            result.update(acct.finish(end["cpu_s"]))
        else:
            result.update(acct.finish(None))
        feeder.wait(30)
        try:
            count = sout.wait_for(lambda s: s.strip() if s.strip().isdigit() else None, 10,
                                  "the byte count from wc -c")
        except BenchError:
            count = "-1"
        result["bytes"] = int(count)
        stderr = serr.text()
        if ssh.returncode != 0 or int(count) != nbytes:
            result["error"] = (f"ssh exited {ssh.returncode}, {count} of {nbytes} bytes "
                               f"arrived:\n{stderr}")
        elif stderr:
            self.anomalies.append(f"ssh {variant} said on stderr: {stderr}")
        return result

    def _sink_event(self, conn_event: str, timeout: float, conn: int | None = None
                    ) -> dict[str, Any]:
        """The sink's next ``conn_event`` (of connection ``conn``, if given)."""
        assert self.sink_out is not None

        def match(line: str) -> dict[str, Any] | None:
            event = json.loads(line)
            if conn is not None and event.get("conn") != conn:
                return None  # a connection of an earlier, failed trial
            if event.get("event") == "error":
                raise BenchError(f"sink: {event['error']} after {event['bytes']} bytes")
            return event if event.get("event") == conn_event else None

        result: dict[str, Any] = self.sink_out.wait_for(match, timeout, f"sink {conn_event}")
        return result

    def _source(self, port: int, nbytes: int) -> subprocess.Popen[bytes]:
        """The raw client, connecting to ``port`` and waiting for "go" (``_go``)."""
        client = self.children.start(
            "source", [sys.executable, THIS, "--worker", "source", str(port), str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO)
        self.feeders.append(client)  # ended like a feeder if the trial fails
        return client

    def _inetd_accept(self, timeout: float) -> socket.socket:
        assert self.inetd is not None
        self.inetd.settimeout(timeout)
        try:
            conn, _ = self.inetd.accept()
        except TimeoutError:
            raise BenchError(f"the raw client did not connect to the listener in "
                             f"{timeout:g} s") from None
        conn.setblocking(True)
        return conn

    def _raw_trial(self, variant: str, nbytes: int, out: Path) -> dict[str, Any]:
        """One raw transfer; the per-session process (socat, labrelay connect) runs under
        the rusage wrapper. Socket-fed: the client connects (to the sink, socat's listener
        or the harness's inetd-style listener, which starts labrelay connect on the accepted
        socket); pipe-fed: the feeder's pipe is the process's stdin. Either way the bytes
        start on "go", once the sink accepted."""
        timeout = nbytes / 1e6 + 2 * STALL_SECONDS + 30
        acct = Accounting(self.groups(RAW, variant))
        own = {SOCAT_SOCK: "socat", SOCAT_PIPE: "socat"}.get(variant, "connect")
        proc: subprocess.Popen[bytes] | None = None  # the wrapped per-session process
        errs: Lines | None = None
        spawned = time.perf_counter()
        if variant in PIPE_FED:
            gate, r = self._feeder(nbytes)
            argv = ([find_program("socat"), "-b", "131072", "-u", "STDIN",
                     f"TCP:{LOOPBACK}:{self.sink_port}"] if variant == SOCAT_PIPE
                    else self.connect_argv("sink:9000"))
            spawned = time.perf_counter()
            proc = self.children.start(variant, self.wrapped(out, argv), stdin=r,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       cwd=REPO, env=avo_env())
            os.close(r)
        elif variant == SOCAT_SOCK:
            port = free_port()
            argv = [find_program("socat"), "-b", "131072",
                    f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr",
                    f"TCP:{LOOPBACK}:{self.sink_port}"]
            proc = self.children.start(variant, self.wrapped(out, argv),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       cwd=REPO, env=avo_env())
            gate = self._source(port, nbytes)
        elif variant == FAST_SOCK:
            assert self.inetd is not None
            gate = self._source(self.inetd.getsockname()[1], nbytes)
            with self._inetd_accept(START_TIMEOUT) as conn:  # inetd: the socket is stdio
                proc = self.children.start(variant, self.wrapped(
                    out, self.connect_argv("sink:9000")), stdin=conn, stdout=conn,
                    stderr=subprocess.PIPE, cwd=REPO, env=avo_env())
        elif variant == SEED_FULL:  # the full chain's second forward leads to the sink
            gate = self._source(self.full_raw_pub, nbytes)
        else:
            gate = self._source(self.sink_port, nbytes)
        if proc is not None:
            assert proc.stderr is not None
            errs = Lines(proc.stderr, f"{variant}-stderr")
        try:
            conn_n = self._sink_event("accepted", START_TIMEOUT)["conn"]
        except BenchError as e:
            if proc is not None:
                proc.kill()
            raise BenchError(f"{e}\n{errs.text() if errs else ''}") from None
        ready = time.perf_counter()
        if proc is not None:
            entry = Wrapped(out).wait("pid", 5.0)
            if entry is None:
                proc.kill()
                raise BenchError("the rusage wrapper wrote no pid")
            acct.own(own, int(entry["pid"]))
        acct.stream_start()
        self._go(gate)
        done = self._sink_event("done", timeout, conn_n)
        acct.stream_end()
        result: dict[str, Any] = {"seconds": done["seconds"], "bytes": done["bytes"],
                                  "setup_s": ready - spawned}
        for name, p in (("the client or feeder", gate), (variant, proc)):
            if p is not None and not wait_exit(p, 30):
                p.kill()
                raise BenchError(f"{name} did not exit within 30 s of the sink's EOF")
        if proc is not None:
            end = Wrapped(out).wait("exit", 10.0)
            if end is None:
                raise BenchError(f"{variant} did not report its exit")
            result.update(acct.finish(end["cpu_s"]))
        else:
            result.update(acct.finish(None))
        text = errs.text() if errs else ""
        codes = [p.returncode for p in (gate, proc) if p is not None]
        if any(codes) or done["bytes"] != nbytes:
            result["error"] = (f"{variant}: exit statuses (client or feeder, relaying "
                               f"process) {codes}, {done['bytes']} of {nbytes} bytes "
                               f"arrived:\n{text}")
        elif text:
            self.anomalies.append(f"raw {variant} said on stderr: {text}")
        return result

    # -- the run

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

    def run(self) -> dict[str, Any]:  # type: ignore[override]
        args = self.args
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            w: {v: [] for v in vs} for w, vs in VARIANTS.items()}
        warm = min(args.bytes, 64 * MiB)
        print(f"warming up: {warm // MiB} MiB per variant (not recorded)", flush=True)
        for workload, variants in VARIANTS.items():
            for variant in variants:
                self.trial(workload, variant, warm)
        self.failed.clear()  # a warm-up failure is reported, and measured again
        self.check_alive()
        meter = MachineMeter()
        for run in range(1, args.runs + 1):
            for workload, variants in VARIANTS.items():
                k = (run - 1) % len(variants)
                for variant in variants[k:] + variants[:k]:  # rotated run by run
                    if (workload, variant) in self.failed and not args.keep_going:
                        continue
                    r = self.trial(workload, variant, args.bytes)
                    self.check_alive()
                    if r is None:
                        continue
                    r["run"] = run
                    samples[workload][variant].append(r)
                    print(f"run {run}/{args.runs} {workload:3} {variant:10} "
                          f"{args.bytes / r['seconds'] / 1e6:8.1f} MB/s  set-up "
                          f"{r['setup_s'] * 1000:6.0f} ms" + cpu_note(r["cpu"], args.bytes),
                          flush=True)
        res = summarize(self, samples, meter.result())
        if args.note:
            res["conditions"]["note"] = args.note
        return res

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


def tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (/proc/net/tcp, state 0A)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f, None)
        return any(len(parts) > 3 and parts[1] == want and parts[3] == "0A"
                   for parts in (line.split() for line in f))


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` to exit, woken by its pidfd the moment it does (``Popen.wait``
    with a timeout polls with sleeps of up to 50 ms); False on timeout."""
    fd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        return False
    proc.wait()
    return True


def avo_env() -> dict[str, str]:
    """The environment of ssh (and so of its ProxyCommand) and of the wrapped processes:
    ours, with the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("python -m bench.fast_path",
                     "labrelay's fast path (labrelay connect -> relay data port -> agent, "
                     "spliced) vs ssh direct and the seed's ssh -R chain, and raw TCP through "
                     "it vs direct loopback; side by side in one run, on loopback.",
                     "runs (default 5; --quick 3)")
    add_run_options(p, "variant", reverse=False)
    p.add_argument("--note", default="", help="a sentence to add to the Markdown report")
    add_python_and_results(p, "the Python that runs relay, agent and labrelay connect")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind = argv[1]
        if kind == "feed":
            feed_worker(int(argv[2]))
        elif kind == "sink":
            sink_worker()
        elif kind == "source":
            source_worker(int(argv[2]), int(argv[3]))
        elif kind == "rusage":
            rest = argv[3:]
            return rusage_worker(argv[2], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    args = quick_defaults(build_parser().parse_args(argv))

    def announce(bench: FastBench) -> None:
        print(f"  target sshd {bench.sshd_port}, relay {bench.relay_port} (data port "
              f"{bench.data_port}), cloud public port {bench.pub_port}, sink "
              f"{bench.sink_port}; the seed's full chain: lab_pc sshd "
              f"{bench.lab.sshd_port if bench.lab else '?'}, ports {bench.full_ports}, "
              f"{bench.autossh}; backend {bench.backend}; {bench.ciphers}", flush=True)

    return run_bench("labrelay-fastpath-bench-", lambda workdir: FastBench(args, workdir),
                     announce, markdown, print_table, args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
