"""The labrelay agent against stock OpenSSH ``ssh -N -R``, side by side in one run.

Every path forwards the same kind of session through the same private OpenSSH
``sshd`` on loopback to the same target:

* ``agent``      ``python -m relay agent -R 127.0.0.1:0:127.0.0.1:TARGET`` (a real process);
* ``ssh``        ``ssh -N -R 127.0.0.1:PORT:127.0.0.1:TARGET`` with OpenSSH's default cipher;
* ``ssh-same``   the same with ``-c``/``-m`` set to whatever cipher and MAC the agent's link
  negotiated (read from its ``ssh_keys`` event), for a comparison at equal cipher;
* ``direct``     the client straight to the target, no tunnel: what the harness can do.

Measured, interleaved path by path within each run so machine noise hits all alike:
bulk throughput client -> tunnel -> target ("push") and target -> tunnel -> client
("pull"), with the CPU seconds of the forwarding process (agent or ssh) and of its
sshd session per GiB; and new-session set-up latency (connect, 1 byte, 1-byte echo,
close). The client and the target run in their own processes (this file re-run
with ``--worker``), so the harness never shares a GIL with the bytes it measures.

Run from the repository root with the venv's Python::

    python -m bench.agent_vs_openssh            # 1 GiB x 5 runs, 200 sessions per run
    python -m bench.agent_vs_openssh --quick    # 256 MiB x 3 runs

Results: a table on stdout, ``bench/results/agent_vs_openssh-DATE-COMMIT.json`` and
``bench/results/agent_vs_openssh-latest.md``. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import getpass
import json
import math
import os
import platform
import queue
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
LOOPBACK = "127.0.0.1"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 1 * MiB  # one sendall / recv_into buffer
STALL_SECONDS = 30.0  # a single send or recv blocked this long is a stall
START_TIMEOUT = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

THROUGHPUT_GOAL = 0.8  # agent / ssh, from the issue
SETUP_P50_GOAL_MS = 2.0

AGENT, SSH, SSH_SAME, DIRECT = "agent", "ssh", "ssh-same", "direct"
PATHS = (AGENT, SSH, SSH_SAME, DIRECT)
LABELS = {
    AGENT: "labrelay agent",
    SSH: "ssh -R (default cipher)",
    SSH_SAME: "ssh -R, the agent's cipher",
    DIRECT: "direct (no tunnel)",
}
AEAD_MARKERS = ("gcm", "poly1305")  # ciphers whose MAC is implicit
# The link's cipher before AES-GCM; bench.relay_vs_openssh still uses it for its ssh-aes path.
AES_OPTIONS = ("-c", "aes128-ctr", "-m", "hmac-sha2-256")


# ---------------------------------------------------------------------------
# workers: the client and the target, each in its own process

MODE_ECHO, MODE_SINK, MODE_SOURCE = b"E", b"S", b"R"


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _drain(sock: socket.socket, view: memoryview) -> int:
    """Read until EOF into ``view``; the byte count."""
    total = 0
    while True:
        n = sock.recv_into(view)
        if n == 0:
            return total
        total += n


def _send_count(sock: socket.socket, payload: memoryview, nbytes: int) -> None:
    left = nbytes
    size = len(payload)
    while left:
        k = size if left >= size else left
        sock.sendall(payload[:k])
        left -= k


def _target_session(conn: socket.socket, payload: memoryview) -> None:
    with conn:
        try:
            _nodelay(conn)
            mode = conn.recv(1)
            if mode == MODE_ECHO:
                conn.sendall(mode)
                while conn.recv(4096):
                    pass
            elif mode == MODE_SINK:
                view = memoryview(bytearray(CHUNK))
                count = 1 + _drain(conn, view)  # the mode byte counts too
                conn.sendall(struct.pack(">Q", count))
            elif mode == MODE_SOURCE:
                (nbytes,) = struct.unpack(">Q", _recv_exact(conn, 8))
                _send_count(conn, payload, nbytes)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
            # anything else (an empty readiness probe): just close
        except OSError:
            pass


def _exit_when_parent_goes() -> None:
    """Our stdin is the harness's pipe: EOF means the harness is gone."""
    sys.stdin.buffer.read()
    os._exit(0)


def target_worker() -> None:
    """Serve echo / sink / source sessions, one thread each; print our port as JSON."""
    payload = memoryview(os.urandom(CHUNK))
    server = socket.create_server((LOOPBACK, 0), backlog=256)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_target_session, args=(conn, payload), daemon=True).start()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=STALL_SECONDS)
    _nodelay(sock)
    return sock


def _push(payload: memoryview, port: int, nbytes: int) -> dict[str, Any]:
    """Client -> tunnel -> target sink; done when the sink reports its count."""
    start = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(MODE_SINK)
        _send_count(sock, payload, nbytes - 1)
        sock.shutdown(socket.SHUT_WR)
        reply = _recv_exact(sock, 8)
    seconds = time.perf_counter() - start
    count = struct.unpack(">Q", reply)[0] if len(reply) == 8 else -1
    return {"seconds": seconds, "count": count}


def _pull(view: memoryview, port: int, nbytes: int) -> dict[str, Any]:
    """Target source -> tunnel -> client; done at EOF."""
    start = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(MODE_SOURCE + struct.pack(">Q", nbytes))
        count = _drain(sock, view)
    return {"seconds": time.perf_counter() - start, "count": count}


def _setup(port: int, sessions: int, gap: float) -> dict[str, Any]:
    """``sessions`` echo sessions one after another, ``gap`` idle seconds before each."""
    times: list[float] = []
    for _ in range(sessions):
        if gap:
            time.sleep(gap)  # idle time, outside the measured interval
        start = time.perf_counter()
        sock = _connect(port)
        try:
            sock.sendall(MODE_ECHO)
            if sock.recv(1) != MODE_ECHO:
                raise OSError(f"session {len(times) + 1} closed before the echo")
        finally:
            sock.close()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"ms": times}


def client_worker() -> None:
    """Run JSON commands from stdin, one per line; answer each with one JSON line."""
    payload = memoryview(os.urandom(CHUNK))
    view = memoryview(bytearray(CHUNK))
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "push":
                result = _push(payload, cmd["port"], cmd["bytes"])
            elif cmd["op"] == "pull":
                result = _pull(view, cmd["port"], cmd["bytes"])
            elif cmd["op"] == "setup":
                result = _setup(cmd["port"], cmd["sessions"], cmd["gap"])
            else:
                result = {"error": f"unknown op {cmd['op']!r}"}
        except (OSError, struct.error) as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# process plumbing


class BenchError(Exception):
    """Set-up failed or a path misbehaved; ``str()`` carries what the process said."""


def _libc_prctl() -> Callable[[int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
PR_SET_PDEATHSIG = 1


def _die_with_harness() -> None:
    """In the child: get SIGTERM if the harness dies (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Lines:
    """Lines of a child's stream, read by a thread; waiters block on a queue."""

    def __init__(self, stream: IO[bytes], name: str, keep: int = 400) -> None:
        self.tail: deque[str] = deque(maxlen=keep)
        self.count = 0
        self.queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), name=name,
                                        daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.tail.append(line)
                self.count += 1
                self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, match: Callable[[str], Any], timeout: float, what: str) -> Any:
        """The first truthy ``match(line)`` among new lines, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no {what} within {timeout:g}s:\n" + self.text())
            try:
                line = self.queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"stream ended before {what}:\n" + self.text())
            found = match(line)
            if found:
                return found

    def text(self, n: int = 40) -> str:
        return "\n".join(list(self.tail)[-n:])


class Children:
    """Every process the harness starts; ``stop_all`` ends them, newest first."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.extra_pids: set[int] = set()  # sshd session processes we caused

    def start(self, name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), start_new_session=True,
                                preexec_fn=_die_with_harness, **kw)
        self.procs.append((name, proc))
        return proc

    def stop_all(self, timeout: float = 10.0) -> list[str]:
        """SIGTERM (stdin closed first), then SIGKILL after ``timeout``; what was left over."""
        notes = []
        for name, proc in reversed(self.procs):
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                notes.append(f"{name} (pid {proc.pid}) ignored SIGTERM for {timeout:g}s: killed")
                proc.kill()
                proc.wait()
        # sshd sessions end by themselves once their client has gone; wait on
        # their pidfds (readable at exit), then end whatever is left.
        for pid in _wait_exit(self.extra_pids, timeout):
            notes.append(f"sshd session pid {pid} outlived its client: terminated")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return notes


def _wait_exit(pids: set[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for ``pids`` (not our children) to exit;
    the ones still alive."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fds[os.pidfd_open(pid)] = pid
    try:
        deadline = time.monotonic() + timeout
        pending = list(fds)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(pending, [], [], remaining)
            pending = [fd for fd in pending if fd not in ready]
        return sorted(fds[fd] for fd in pending if _alive(fds[fd]))
    finally:
        for fd in fds:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of live ``pids``, from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / CLOCK_TICKS


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU time (all CPUs) from /proc/stat: busy in this VM, and stolen by
    the hypervisor (time this VM wanted to run but its vCPU was not scheduled)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLOCK_TICKS,
            "steal": steal / CLOCK_TICKS}


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def proc_health(pid: int) -> dict[str, Any]:
    """RSS, peak RSS (KiB), open fds and state of ``pid``: what a leak would grow, and
    whether a stalled process is running, sleeping or stopped."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key.lower() + "_kib"] = int(value.split()[0])
                elif key == "State":
                    out["state"] = value.strip()
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def find_program(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise BenchError(f"{name} not found; on Debian/Ubuntu: apt-get install "
                         "openssh-server openssh-client")
    return found


# ---------------------------------------------------------------------------
# the set-up: sshd, target, agent, two ssh clients, the client worker

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
ClientAliveInterval 0
# INFO, not ERROR: sshd prints "Server listening" (our readiness signal) only at
# INFO. It logs nothing per forwarded session at INFO; the harness counts its
# lines during the measurements to show that.
LogLevel INFO
"""


@dataclass
class Route:
    """One forwarding path under test."""

    name: str
    port: int = 0  # where the client connects
    forwarder: subprocess.Popen[bytes] | None = None  # agent or ssh
    sshd_pids: set[int] = field(default_factory=set)  # its sshd session processes
    argv: list[str] = field(default_factory=list)
    cipher: str = ""
    log: Lines | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.forwarder.pid if self.forwarder is not None else None


class Bench:
    """The processes of one benchmark run, and the measurements over them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.key = workdir / "client_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.sshd_config_path = workdir / "sshd_config"
        self.sshd_binary = ""
        self.children = Children()
        self.user = getpass.getuser()
        self.paths = {name: Route(name) for name in PATHS}
        self.anomalies: list[str] = []
        self.sshd: subprocess.Popen[bytes] | None = None
        self.sshd_log: Lines | None = None
        self.sshd_port = 0
        self.target_port = 0
        self.client: subprocess.Popen[bytes] | None = None
        self.client_out: Lines | None = None
        self.agent_events: list[dict[str, Any]] = []
        self.agent_keys: tuple[str, str] | None = None  # (cipher, MAC) from ssh_keys
        self.loadavg_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
        # the code the agent will import: the commit plus any uncommitted changes
        self.commit = git_commit()
        self.relay_changes = git_relay_changes()

    # -- set-up

    def keygen(self, name: str) -> Path:
        path = self.dir / name
        subprocess.run([find_program("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C",
                        f"labrelay-bench-{name}", "-f", str(path)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        return path

    def start_sshd(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host = self.keygen("host_ed25519")
        self.keygen(self.key.name)
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        self.sshd_port = free_port()
        host_pub = " ".join(Path(f"{host}.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[{LOOPBACK}]:{self.sshd_port} {host_pub}\n")
        self.sshd_config_path.write_text(SSHD_CONFIG.format(port=self.sshd_port, dir=self.dir))
        self.sshd_binary = find_program("sshd")
        self.sshd = self.children.start(
            "sshd", [self.sshd_binary, "-D", "-e", "-f", str(self.sshd_config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.sshd.stderr is not None
        self.sshd_log = Lines(self.sshd.stderr, "sshd-stderr")
        self.sshd_log.wait_for(lambda line: "Server listening" in line, START_TIMEOUT,
                               "'Server listening' from sshd")

    def start_target(self) -> None:
        proc = self.children.start(
            "target", [sys.executable, str(Path(__file__).resolve()), "--worker", "target"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = Lines(proc.stdout, "target-stdout").wait_for(
            lambda s: s, START_TIMEOUT, "the target's port")
        self.target_port = int(json.loads(line)["port"])

    def start_client(self) -> None:
        self.client = self.children.start(
            "client", [sys.executable, str(Path(__file__).resolve()), "--worker", "client"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.client.stdout is not None
        self.client_out = Lines(self.client.stdout, "client-stdout")

    def _new_sshd_sessions(self, before: set[int], path: Route) -> None:
        assert self.sshd is not None
        path.sshd_pids = descendants(self.sshd.pid) - before
        self.children.extra_pids |= path.sshd_pids

    def start_agent(self) -> None:
        path = self.paths[AGENT]
        assert self.sshd is not None
        before = descendants(self.sshd.pid)
        path.argv = [
            self.args.python, "-m", "relay", "agent", "--log-format", "json",
            "-p", str(self.sshd_port), "-i", str(self.key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-R", f"{LOOPBACK}:0:{LOOPBACK}:{self.target_port}", f"{self.user}@{LOOPBACK}",
        ]
        path.forwarder = self.children.start("agent", path.argv, cwd=REPO,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert path.forwarder.stdout is not None
        path.log = Lines(path.forwarder.stdout, "agent-stdout")

        def ready(line: str) -> int | None:
            event = self._agent_event(line)
            if event and event.get("event") == "ssh_keys" and self.agent_keys is None:
                self.agent_keys = (str(event.get("cipher_out")), str(event.get("mac_out")))
            if event and event.get("event") == "forward_ready" and event.get("kind") == "remote":
                return int(event["port"])
            return None

        try:
            path.port = path.log.wait_for(ready, START_TIMEOUT,
                                          "forward_ready event from the agent")
        except BenchError as e:
            raise BenchError(f"agent (exit status {path.forwarder.poll()}): {e}") from None
        self._new_sshd_sessions(before, path)

    def _agent_event(self, line: str) -> dict[str, Any] | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return event if isinstance(event, dict) else None

    def ssh_base(self) -> list[str]:
        return [find_program("ssh"), "-F", "/dev/null", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-i", str(self.key),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-p", str(self.sshd_port)]

    def start_ssh(self, name: str, extra: Sequence[str]) -> None:
        path = self.paths[name]
        assert self.sshd is not None
        before = descendants(self.sshd.pid)
        path.port = free_port()
        path.argv = [*self.ssh_base(), *extra, "-N", "-o", "ExitOnForwardFailure=yes",
                     "-R", f"{LOOPBACK}:{path.port}:{LOOPBACK}:{self.target_port}",
                     f"{self.user}@{LOOPBACK}"]
        path.forwarder = self.children.start(name, path.argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
        assert path.forwarder.stderr is not None
        path.log = Lines(path.forwarder.stderr, f"{name}-stderr")
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # readiness: the server-side port accepts (the target sees an empty probe)
            if path.forwarder.poll() is not None:
                raise BenchError(f"{name} exited ({path.forwarder.returncode}) before its "
                                 f"forward was up:\n{path.log.text()}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, path.port), 1):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: port {path.port} not listening within "
                                 f"{START_TIMEOUT:g}s:\n{path.log.text()}")
            time.sleep(0.02)
        self._new_sshd_sessions(before, path)

    def negotiated(self, extra: Sequence[str]) -> str:
        """What ``ssh`` with ``extra`` options negotiates with our sshd, from ``ssh -v``."""
        out = subprocess.run([*self.ssh_base(), *extra, "-v", f"{self.user}@{LOOPBACK}", "true"],
                             capture_output=True, text=True, timeout=START_TIMEOUT,
                             stdin=subprocess.DEVNULL).stderr
        m = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", out)
        return f"{m.group(1)} + {m.group(2)}" if m else "unknown"

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
        for path in self.paths.values():
            if path.forwarder is not None and path.forwarder.poll() is not None:
                raise BenchError(f"{path.name} exited ({path.forwarder.returncode}) mid-run:\n"
                                 + (path.log.text() if path.log else ""))

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
            report = self.diagnose(path, what, result["error"])
            path.failures.append(report)
            self.anomalies.append(report)
            print(f"!! {report}", file=sys.stderr, flush=True)
            return None
        return result

    def transfer(self, op: str, path: Route, nbytes: int) -> dict[str, Any] | None:
        timeout = nbytes / 1e6 + 2 * STALL_SECONDS + 30  # >= 1 MB/s, then a stall
        result = self.measured(
            path, lambda: self.client_call({"op": op, "port": path.port, "bytes": nbytes},
                                           timeout),
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

    def run(self) -> dict[str, Any]:
        args = self.args
        directions = ["push"] + ([] if args.no_reverse else ["pull"])
        tput: dict[str, dict[str, list[dict[str, Any]]]] = {
            op: {p: [] for p in PATHS} for op in directions}
        kinds = ["back_to_back"] + (["idle_gap"] if args.gap_sessions else [])
        lat: dict[str, dict[str, list[dict[str, Any]]]] = {
            kind: {p: [] for p in PATHS} for kind in kinds}
        health: dict[str, Any] = {}
        agent_pid = self.paths[AGENT].pid
        assert agent_pid is not None and self.sshd_log is not None
        health["agent_ready"] = proc_health(agent_pid)
        print("warming up (64 MiB each way and 20 sessions per path, not recorded)", flush=True)
        self.warm_up()
        self.check_alive()
        sshd_lines0 = self.sshd_log.count
        health["agent_after_warmup"] = proc_health(agent_pid)
        ours = [os.getpid(), *descendants(os.getpid())]
        machine0, ours0, wall0 = machine_cpu(), cpu_seconds(ours), time.monotonic()

        for run in range(1, args.runs + 1):
            for op in directions:
                for path in self.active():
                    r = self.transfer(op, path, args.bytes)
                    self.check_alive()
                    if r is not None:
                        tput[op][path.name].append(r)
                        mbps = args.bytes / r["seconds"] / 1e6
                        print(f"run {run}/{args.runs} {op:4} {path.name:8} {mbps:8.1f} MB/s",
                              flush=True)
            health.setdefault("agent_after_throughput", proc_health(agent_pid))
            for kind in kinds:
                n, gap = ((args.sessions, 0.0) if kind == "back_to_back"
                          else (args.gap_sessions, args.gap_ms))
                for path in self.active():
                    r = self.sessions(path, n, gap, f"set-up latency ({kind})")
                    self.check_alive()
                    if r is not None:
                        lat[kind][path.name].append(r)
                        ms = r["ms"]
                        print(f"run {run}/{args.runs} set-up {kind:12} {path.name:8} "
                              f"p50 {pctl(ms, 50):6.2f}  p99 {pctl(ms, 99):6.2f}  "
                              f"max {max(ms):6.2f} ms", flush=True)
            health.setdefault("agent_after_first_latency_run", proc_health(agent_pid))

        health["agent_end"] = proc_health(agent_pid)
        machine1, wall = machine_cpu(), time.monotonic() - wall0
        machine = {
            "wall_s": wall,
            "busy_cpu_s": machine1["busy"] - machine0["busy"],
            "bench_processes_cpu_s": cpu_seconds(ours) - ours0,
            "steal_cpu_s": machine1["steal"] - machine0["steal"],
            "loadavg_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
        sshd_lines = self.sshd_log.count - sshd_lines0
        if sshd_lines:
            self.anomalies.append(f"sshd logged {sshd_lines} lines during the measurements:\n"
                                  + self.sshd_log.text(min(sshd_lines, 20)))
        agent_log = self.paths[AGENT].log
        assert agent_log is not None
        health["key_exchanges"] = 0  # the agent's ssh_keys events: the first, then rekeys
        for line in agent_log.tail:
            event = self._agent_event(line)
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
# statistics and reports


def pctl(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(bench: Bench, tput: dict[str, dict[str, list[dict[str, Any]]]],
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
                "p50_ms": spread([pctl(s, 50) for s in samples]),
                "p99_ms": spread([pctl(s, 99) for s in samples]),
                "max_ms": spread([max(s) for s in samples]),
                "pooled": {"sessions": len(pooled), "p50_ms": pctl(pooled, 50),
                           "p90_ms": pctl(pooled, 90), "p99_ms": pctl(pooled, 99),
                           "max_ms": max(pooled), "mean_ms": statistics.fmean(pooled),
                           "over_20ms": sum(x > 20 for x in pooled)},
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

    return {
        "benchmark": "agent_vs_openssh",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": bench.commit,
        "relay_uncommitted_at_start": bench.relay_changes,
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


def _run_text(argv: Sequence[str], **kw: Any) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout + p.stderr).strip()


def git_commit() -> str:
    return _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "nogit"


def git_relay_changes() -> list[str]:
    """Uncommitted changes under relay/, as ``git status --porcelain`` lines (read-only:
    ``--no-optional-locks`` keeps git from writing its index)."""
    out = _run_text(["git", "-C", str(REPO), "--no-optional-locks", "status", "--porcelain",
                     "--", "relay"])
    return out.splitlines()


def conditions(bench: Bench) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = _run_text([bench.args.python, "-c",
                          "import twisted, cryptography, relay; print(twisted.__version__, "
                          "cryptography.__version__, relay.__version__)"], cwd=REPO).split()
    versions += ["?"] * (3 - len(versions))
    args = bench.args
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "loadavg_at_start": bench.loadavg_at_start,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": versions[0],
        "cryptography": versions[1],
        "labrelay": versions[2],
        "openssh": _run_text([find_program("ssh"), "-V"]),
        "bytes": args.bytes,
        "runs": args.runs,
        "setup_sessions_per_run": args.sessions,
        "gap_sessions_per_run": args.gap_sessions,
        "gap_ms": args.gap_ms,
        "directions": ["push"] + ([] if args.no_reverse else ["pull"]),
        "chunk_bytes": CHUNK,
        "ciphers": {name: p.cipher for name, p in bench.paths.items()},
        "mb": "10^6 bytes",
        "order": "per run: push a,b,c,d; pull a,b,c,d; back-to-back sessions a,b,c,d; "
                 "idle-gap sessions a,b,c,d. A warm-up of 64 MiB each way and 20 sessions "
                 "per path comes first and is not recorded",
    }


def _fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "n/a"


def _goal_value(g: dict[str, Any]) -> str:
    value = g["value"]
    if value is None:
        return "n/a"
    return f"{value:.2f} ms" if g.get("unit") == "ms" else f"{value:.2f}"


LATENCY_TITLES = {
    "back_to_back": "New-session set-up latency, sessions back to back (connect, 1 byte, "
                    "1-byte echo, close)",
    "idle_gap": "The same with the link idle before each session ({gap:g} ms)",
}


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    changes = res.get("relay_uncommitted_at_start") or []
    dirty = " plus uncommitted changes in relay/" if changes else ""
    tp = res["throughput"]
    r = res["ratios"]
    out = [
        f"# labrelay agent vs OpenSSH `ssh -N -R` — {res['date']}, commit "
        f"`{res['commit']}`{dirty}",
        "",
        *([f"Uncommitted in relay/ when the agent started: {', '.join(changes)}.", ""]
          if changes else []),
        f"{c['cpu_model']}, {c['nproc']} CPUs (load {c['loadavg_at_start']} at start), "
        f"Linux {c['kernel']}, Python {c['python']}, Twisted {c['twisted']}, "
        f"cryptography {c['cryptography']}, labrelay {c['labrelay']}, {c['openssh']}. "
        f"{c['bytes'] / MiB:g} MiB per transfer, {c['runs']} runs interleaved path by path; "
        "figures are the median (min–max) over the runs; MB = 10^6 bytes; CPU is user+system "
        "seconds of the forwarding process (agent or ssh) and of its sshd session processes.",
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
            fcpu = (f"{_fmt(push.get('forwarder_cpu_s_per_gib'), 2)} / "
                    f"{_fmt(pull.get('forwarder_cpu_s_per_gib'), 2)}")
            share = (f"{_fmt(push.get('forwarder_core_share'), 2)} / "
                     f"{_fmt(pull.get('forwarder_core_share'), 2)}")
            scpu = (f"{_fmt(push.get('sshd_cpu_s_per_gib'), 2)} / "
                    f"{_fmt(pull.get('sshd_cpu_s_per_gib'), 2)}")
        out.append(f"| {p['label']} | {p['cipher']} | {_fmt(push.get('mb_per_s'))} "
                   f"| {_fmt(pull.get('mb_per_s'))} | {fcpu} | {share} | {scpu} |")
    out += ["", "Agent ÷ ssh, throughput: " + "; ".join(
        f"{op} {_ratio(r.get(f'{op}_agent_over_ssh'))} (default cipher), "
        f"{_ratio(r.get(f'{op}_agent_over_ssh-same'))} (same cipher)" for op in tp) + "."]
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
            cpu = "–" if name == DIRECT else _fmt(lat.get("forwarder_cpu_ms_per_session"), 3)
            out.append(f"| {p['label']} | {_fmt(lat.get('p50_ms'), 2)} "
                       f"| {_fmt(lat.get('p99_ms'), 2)} | {_fmt(lat.get('max_ms'), 2)} "
                       f"| {over} | {cpu} |")
        out += ["", f"Agent ÷ ssh, set-up p50: "
                f"{_ratio(r.get(f'setup_p50_{kind}_agent_over_ssh'))} (default cipher), "
                f"{_ratio(r.get(f'setup_p50_{kind}_agent_over_ssh-same'))} (same cipher)."]
    out += ["", "## Goals", "", "| goal | value | status |", "|---|---|---|"]
    for g in res["goals"]:
        out.append(f"| {g['goal']} | {_goal_value(g)} | **{g['status']}** |")
    m = res.get("machine_cpu_during_measurement")
    if m:
        out += ["", f"Machine during the measurements ({m['wall_s']:.0f} s): CPUs busy "
                f"{m['busy_cpu_s']:.0f} of {m['wall_s'] * (c['nproc'] or 1):.0f} CPU-seconds, "
                f"{m['bench_processes_cpu_s']:.0f} of them in this benchmark's processes "
                "(the rest is mostly loopback TCP softirq work, plus anything else running); "
                f"hypervisor steal {m['steal_cpu_s']:.1f} s; load average at end "
                f"{m['loadavg_at_end']}."]
    h = res["agent_health"]
    out += ["", "Agent process (RSS KiB, peak RSS KiB, open fds): ready "
            f"{h.get('agent_ready')}, after warm-up {h.get('agent_after_warmup')}, "
            f"end {h.get('agent_end')}.", ""]
    if res["anomalies"]:
        out += ["Anomalies:", ""] + [
            "    " + a.replace("\n", "\n    ") for a in res["anomalies"]] + [""]
    else:
        out += ["No anomalies: every transfer arrived complete, no session failed or stalled "
                f"past {STALL_SECONDS:g} s, the agent logged no warning or error, and sshd "
                "logged nothing during the measurements.", ""]
    out += ["What bounds each figure, and how to reproduce: `docs/benchmarks.md`.", ""]
    return "\n".join(out)


def print_table(res: dict[str, Any]) -> None:
    tp = res["throughput"]
    lat = res["setup_latency"]
    kinds = list(lat)
    print()
    head = f"{'path':32} {'push MB/s':>22} {'pull MB/s':>22} {'CPU s/GiB':>10}"
    for kind in kinds:
        head += f" {'p50/p99 ms ' + ('b2b' if kind == 'back_to_back' else 'gap'):>17}"
    print(head)
    for name, p in res["paths"].items():
        push = tp.get("push", {}).get(name, {})
        pull = tp.get("pull", {}).get(name, {})
        cpu = push.get("forwarder_cpu_s_per_gib")
        cpu_text = format(cpu["median"], ".2f") if cpu else "-"
        line = (f"{p['label']:32} {_fmt(push.get('mb_per_s')):>22} "
                f"{_fmt(pull.get('mb_per_s')):>22} {cpu_text:>10}")
        for kind in kinds:
            entry = lat[kind].get(name)
            cell = (f"{entry['p50_ms']['median']:.2f}/{entry['p99_ms']['median']:.2f}"
                    if entry else "n/a")
            line += f" {cell:>17}"
        print(line)
    print()
    for g in res["goals"]:
        print(f"  {g['status']:4}  {g['goal']}: {_goal_value(g)}")
    for a in res["anomalies"]:
        print(f"  !! {a}")


# ---------------------------------------------------------------------------
# command line


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 256MiB, 1000000)")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    value = int(float(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[unit])
    if value < 1 * MiB:
        raise argparse.ArgumentTypeError("use at least 1 MiB")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.agent_vs_openssh",
        description="labrelay agent vs OpenSSH ssh -N -R on loopback: throughput, CPU and "
        "new-session latency, side by side in one run.")
    p.add_argument("--bytes", type=parse_bytes, default=None,
                   help="bytes per transfer, e.g. 1GiB (default), 256MiB")
    p.add_argument("--runs", type=int, default=None, help="runs per measurement (default 5)")
    p.add_argument("--sessions", type=int, default=200,
                   help="set-up latency sessions per path per run (default 200)")
    p.add_argument("--gap-sessions", type=int, default=100,
                   help="also time this many sessions per path per run with the link idle "
                   "before each (default 100; 0 skips it)")
    p.add_argument("--gap-ms", type=float, default=50.0,
                   help="idle time before each of those sessions (default 50 ms: longer "
                   "than Linux's 40 ms delayed-ACK timer)")
    p.add_argument("--quick", action="store_true", help="256 MiB and 3 runs")
    p.add_argument("--no-reverse", action="store_true",
                   help="skip the pull direction (target -> client)")
    p.add_argument("--keep-going", action="store_true",
                   help="keep measuring a path after it failed once")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that runs the agent (default: this one; it must "
                   "import relay)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        {"client": client_worker, "target": target_worker}[argv[1]]()
        return 0
    args = build_parser().parse_args(argv)
    if args.bytes is None:
        args.bytes = 256 * MiB if args.quick else GiB
    if args.runs is None:
        args.runs = 3 if args.quick else 5

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT explicitly too: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    code = 1
    with tempfile.TemporaryDirectory(prefix="labrelay-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the privilege-separated sshd reads its files
        bench = Bench(args, workdir)
        try:
            print(f"setting up in {workdir} ...", flush=True)
            bench.setup()
            for p in bench.paths.values():
                print(f"  {p.name:8} port {p.port:5}  {p.cipher}", flush=True)
            res = bench.run()
            write_results(args.results_dir, res)
            print_table(res)
            code = 0 if not res["anomalies"] else 3
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping everything", file=sys.stderr)
            code = 130
        finally:
            for note in bench.children.stop_all():
                print(f"bench: cleanup: {note}", file=sys.stderr)
    return code


def write_results(directory: Path, res: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    day = res["date"][:10]
    js = directory / f"agent_vs_openssh-{day}-{res['commit']}.json"
    js.write_text(json.dumps(res, indent=2) + "\n")
    md = directory / "agent_vs_openssh-latest.md"
    shown = js.relative_to(REPO) if js.is_relative_to(REPO) else js
    md.write_text(markdown(res) + f"\nRaw data: `{shown}`.\n")
    print(f"wrote {js} and {md}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
