"""What the benchmark modules share: constants, the client/target session protocol,
process plumbing, CPU and memory accounting from /proc, a private OpenSSH ``sshd`` with
its keys, statistics, report pieces, result files, the command line and signal handling.

Used by ``bench.agent_vs_openssh``, ``bench.relay_vs_openssh``, ``bench.fast_path`` and
``bench.plain_hop``; it measures nothing by itself.
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
from typing import IO, Any, Protocol, TypeVar

from bench.history import HISTORY, write_latest

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
LOOPBACK = "127.0.0.1"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 1 * MiB  # one sendall / recv_into buffer
STALL_SECONDS = 30.0  # a single send or recv blocked this long is a stall
START_TIMEOUT = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# the session protocol of the client and target workers (agent and relay benches)

MODE_ECHO, MODE_SINK, MODE_SOURCE = b"E", b"S", b"R"
# a sink told its byte count up front (8 bytes after the mode byte), for forwarders that
# cannot pass on a half-close: it replies once that many bytes arrived, not at EOF
MODE_COUNTED = b"C"


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def drain(sock: socket.socket, view: memoryview) -> int:
    """Read until EOF into ``view``; the byte count."""
    total = 0
    while True:
        n = sock.recv_into(view)
        if n == 0:
            return total
        total += n


def send_count(sock: socket.socket, payload: memoryview, nbytes: int) -> None:
    left = nbytes
    size = len(payload)
    while left:
        k = size if left >= size else left
        sock.sendall(payload[:k])
        left -= k


def _target_session(conn: socket.socket, payload: memoryview) -> None:
    with conn:
        try:
            nodelay(conn)
            mode = conn.recv(1)
            if mode == MODE_ECHO:
                conn.sendall(mode)
                while conn.recv(4096):
                    pass
            elif mode == MODE_SINK:
                view = memoryview(bytearray(CHUNK))
                count = 1 + drain(conn, view)  # the mode byte counts too
                conn.sendall(struct.pack(">Q", count))
            elif mode == MODE_COUNTED:
                (nbytes,) = struct.unpack(">Q", recv_exact(conn, 8))
                view = memoryview(bytearray(CHUNK))
                count, left = 9, nbytes - 9  # the mode byte and the count count too
                while left > 0:
                    n = conn.recv_into(view[:min(left, CHUNK)])
                    if n == 0:
                        break
                    count += n
                    left -= n
                conn.sendall(struct.pack(">Q", count))
            elif mode == MODE_SOURCE:
                (nbytes,) = struct.unpack(">Q", recv_exact(conn, 8))
                send_count(conn, payload, nbytes)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
            # anything else (an empty readiness probe): just close
        except OSError:
            pass


def exit_when_parent_goes() -> None:
    """Our stdin is the harness's pipe: EOF means the harness is gone."""
    sys.stdin.buffer.read()
    os._exit(0)


def target_worker() -> None:
    """Serve echo / sink / source sessions, one thread each; print our port as JSON."""
    payload = memoryview(os.urandom(CHUNK))
    server = socket.create_server((LOOPBACK, 0), backlog=256)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_target_session, args=(conn, payload), daemon=True).start()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=STALL_SECONDS)
    nodelay(sock)
    return sock


def connect_retry(port: int, timeout: float) -> socket.socket:
    """Connect to ``port`` (TCP_NODELAY), retried while a listener (socat) is starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((LOOPBACK, port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # socat is still starting
    nodelay(sock)
    return sock


def push_bytes(payload: memoryview, port: int, nbytes: int,
               counted: bool = False) -> dict[str, Any]:
    """Client -> tunnel -> target sink; done when the sink reports its count. ``counted``:
    the sink is told the count first and replies without waiting for our half-close
    (for a forwarder that closes the whole connection at EOF, as sshtunnel does)."""
    start = time.perf_counter()
    with connect(port) as sock:
        if counted:
            sock.sendall(MODE_COUNTED + struct.pack(">Q", nbytes))
            send_count(sock, payload, nbytes - 9)
        else:
            sock.sendall(MODE_SINK)
            send_count(sock, payload, nbytes - 1)
            sock.shutdown(socket.SHUT_WR)
        reply = recv_exact(sock, 8)
    seconds = time.perf_counter() - start
    count = struct.unpack(">Q", reply)[0] if len(reply) == 8 else -1
    return {"seconds": seconds, "count": count}


def pull_bytes(view: memoryview, port: int, nbytes: int) -> dict[str, Any]:
    """Target source -> tunnel -> client; done at EOF."""
    start = time.perf_counter()
    with connect(port) as sock:
        sock.sendall(MODE_SOURCE + struct.pack(">Q", nbytes))
        count = drain(sock, view)
    return {"seconds": time.perf_counter() - start, "count": count}


def setup_sessions(port: int, sessions: int, gap: float) -> dict[str, Any]:
    """``sessions`` echo sessions one after another, ``gap`` idle seconds before each."""
    times: list[float] = []
    for _ in range(sessions):
        if gap:
            time.sleep(gap)  # idle time, outside the measured interval
        start = time.perf_counter()
        sock = connect(port)
        try:
            sock.sendall(MODE_ECHO)
            if sock.recv(1) != MODE_ECHO:
                raise OSError(f"session {len(times) + 1} closed before the echo")
        finally:
            sock.close()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"ms": times}


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


def read_port(lines: Lines, what: str) -> int:
    """The port a worker prints as its first JSON line."""
    return int(json.loads(lines.wait_for(lambda s: s, START_TIMEOUT, what))["port"])


def wait_ready(name: str, proc: subprocess.Popen[bytes], log: Lines,
               match: Callable[[str], Any], what: str) -> Any:
    """``log.wait_for(match)`` within START_TIMEOUT; a failure names ``proc``'s exit status."""
    try:
        return log.wait_for(match, START_TIMEOUT, what)
    except BenchError as e:
        raise BenchError(f"{name} (exit status {proc.poll()}): {e}") from None


def json_event(line: str) -> dict[str, Any] | None:
    """A JSON log line as a dict, or None."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


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


def check_procs(procs: Sequence[tuple[str, subprocess.Popen[bytes] | None, Lines | None]]
                ) -> None:
    """BenchError naming the first of ``(name, process, its output)`` that has exited."""
    for name, proc, log in procs:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{name} exited ({proc.returncode}) mid-run:\n"
                             + (log.text() if log else ""))


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
        return sorted(fds[fd] for fd in pending if alive(fds[fd]))
    finally:
        for fd in fds:
            os.close(fd)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


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


def run_text(argv: Sequence[str], **kw: Any) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout + p.stderr).strip()


def git_commit() -> str:
    return run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "nogit"


def git_relay_changes() -> list[str]:
    """Uncommitted changes under relay/, as ``git status --porcelain`` lines (read-only:
    ``--no-optional-locks`` keeps git from writing its index)."""
    out = run_text(["git", "-C", str(REPO), "--no-optional-locks", "status", "--porcelain",
                    "--", "relay"])
    return out.splitlines()


# ---------------------------------------------------------------------------
# CPU and memory accounting from /proc


def _stat_ticks(pid: int) -> int | None:
    """utime + stime clock ticks of ``pid`` (all its threads), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of live ``pids``, from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        ticks += _stat_ticks(pid) or 0
    return ticks / CLOCK_TICKS


def proc_cpu(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), or None when it is gone."""
    ticks = _stat_ticks(pid)
    return None if ticks is None else ticks / CLOCK_TICKS


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU time (all CPUs) from /proc/stat: busy in this VM, and stolen by
    the hypervisor (time this VM wanted to run but its vCPU was not scheduled)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLOCK_TICKS,
            "steal": steal / CLOCK_TICKS}


def machine_split() -> tuple[float, float, float]:
    """(monotonic seconds, user+nice CPU-s, system+irq+softirq CPU-s) of the whole machine,
    from /proc/stat: loopback TCP's work (softirq included) shows up as kernel time."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = v
    return (time.monotonic(), (user + nice) / CLOCK_TICKS,
            (system + irq + softirq) / CLOCK_TICKS)


def cpu_note(cpu: dict[str, float], nbytes: int) -> str:
    """A progress line's CPU seconds per GiB of each process group, if any."""
    text = " ".join(f"{g} {s / (nbytes / GiB):.2f}" for g, s in cpu.items())
    return f"   CPU s/GiB: {text}" if text else ""


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class MachineMeter:
    """The whole machine's CPU time from now on, and how much of it this benchmark's
    processes (the harness and every descendant alive now) took."""

    def __init__(self) -> None:
        self.ours = [os.getpid(), *descendants(os.getpid())]
        self.machine0, self.ours0, self.wall0 = (machine_cpu(), cpu_seconds(self.ours),
                                                 time.monotonic())

    def result(self) -> dict[str, Any]:
        machine1, wall = machine_cpu(), time.monotonic() - self.wall0
        return {
            "wall_s": wall,
            "busy_cpu_s": machine1["busy"] - self.machine0["busy"],
            "bench_processes_cpu_s": cpu_seconds(self.ours) - self.ours0,
            "steal_cpu_s": machine1["steal"] - self.machine0["steal"],
            "loadavg_at_end": loadavg(),
        }


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


# ---------------------------------------------------------------------------
# a private OpenSSH sshd on loopback, with its keys

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


def public_key(path: Path) -> str:
    """``TYPE BASE64`` of an OpenSSH public key file (the comment left out)."""
    return " ".join(path.read_text().split()[:2])


def ssh_client(key: Path, known_hosts: Path, port: int) -> list[str]:
    """``ssh`` with no config, only ``key``, and host keys checked against ``known_hosts``."""
    return [find_program("ssh"), "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(key),
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-p", str(port)]


def ssh_negotiated(argv: Sequence[str]) -> str:
    """The client->server cipher and MAC that ``argv`` (an ``ssh -v``) negotiates."""
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=START_TIMEOUT,
                         stdin=subprocess.DEVNULL).stderr
    m = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", out)
    return f"{m.group(1)} + {m.group(2)}" if m else "unknown"


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


class SshdBench:
    """A private ``sshd`` with its host and client keys, and every process of one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.key = workdir / "client_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.sshd_config_path = workdir / "sshd_config"
        self.sshd_binary = ""
        self.children = Children()
        self.user = getpass.getuser()
        self.anomalies: list[str] = []
        self.sshd: subprocess.Popen[bytes] | None = None
        self.sshd_log: Lines | None = None
        self.sshd_port = 0
        self.loadavg_at_start = loadavg()
        # the code the agent will import: the commit plus any uncommitted changes
        self.commit = git_commit()
        self.relay_changes = git_relay_changes()

    def keygen(self, name: str) -> Path:
        path = self.dir / name
        subprocess.run([find_program("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C",
                        f"labrelay-bench-{name}", "-f", str(path)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        return path

    def user_keys(self, *names: str) -> dict[str, str]:
        """A new key ``NAME_ed25519`` for each name; their public keys by name."""
        keys = {name: self.keygen(f"{name}_ed25519") for name in names}
        return {name: public_key(Path(f"{path}.pub")) for name, path in keys.items()}

    def start_sshd(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host = self.keygen("host_ed25519")
        self.keygen(self.key.name)
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        self.sshd_port = free_port()
        host_pub = public_key(Path(f"{host}.pub"))
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

    def start_worker(self, name: str, script: str, *argv: str
                     ) -> tuple[subprocess.Popen[bytes], Lines]:
        """``script --worker ARGV...`` with pipes to its stdin and from its stdout."""
        proc = self.children.start(name, [sys.executable, script, "--worker", *argv],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return proc, Lines(proc.stdout, f"{name}-stdout")

    def ssh_base(self) -> list[str]:
        return ssh_client(self.key, self.known_hosts, self.sshd_port)

    def negotiated(self, extra: Sequence[str]) -> str:
        """What ``ssh`` with ``extra`` options negotiates with our sshd, from ``ssh -v``."""
        return ssh_negotiated([*self.ssh_base(), *extra, "-v", f"{self.user}@{LOOPBACK}",
                               "true"])

    def _new_sshd_sessions(self, before: set[int], path: Route) -> None:
        assert self.sshd is not None
        path.sshd_pids = descendants(self.sshd.pid) - before
        self.children.extra_pids |= path.sshd_pids

    def _wait_listening(self, name: str, proc: subprocess.Popen[bytes], log: Lines,
                        port: int) -> None:
        """Readiness of an ssh forward: its port accepts (the target sees an empty probe)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited ({proc.returncode}) before its forward was "
                                 f"up:\n{log.text()}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: port {port} not listening within "
                                 f"{START_TIMEOUT:g}s:\n{log.text()}")
            time.sleep(0.02)

    def ssh_reverse(self, path: Route, name: str, extra: Sequence[str],
                    forwards: Sequence[tuple[int, int]], label: str = "") -> None:
        """``ssh -N -R 127.0.0.1:PORT:127.0.0.1:TO`` to our sshd for each (PORT, TO) of
        ``forwards``, as ``path``'s forwarder; ready once every PORT accepts."""
        assert self.sshd is not None
        before = descendants(self.sshd.pid)
        path.argv = [*self.ssh_base(), *extra, "-N", "-o", "ExitOnForwardFailure=yes",
                     *[arg for port, to in forwards
                       for arg in ("-R", f"{LOOPBACK}:{port}:{LOOPBACK}:{to}")],
                     f"{self.user}@{LOOPBACK}"]
        path.forwarder = self.children.start(name, path.argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
        assert path.forwarder.stderr is not None
        path.log = Lines(path.forwarder.stderr, f"{name}-stderr")
        for port, _ in forwards:
            self._wait_listening(label or name, path.forwarder, path.log, port)
        self._new_sshd_sessions(before, path)

    def cleanup(self) -> list[str]:
        return self.children.stop_all()


# ---------------------------------------------------------------------------
# statistics


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


def per_run_latency(samples: Sequence[Sequence[float]]) -> dict[str, Any]:
    """p50, p99 and max of each run's samples (ms), as spreads over the runs."""
    return {"p50_ms": spread([pctl(s, 50) for s in samples]),
            "p99_ms": spread([pctl(s, 99) for s in samples]),
            "max_ms": spread([max(s) for s in samples])}


def pooled_latency(pooled: Sequence[float]) -> dict[str, Any]:
    """Percentiles, max, mean and the count over 20 ms of every run's samples together."""
    return {"p50_ms": pctl(pooled, 50), "p90_ms": pctl(pooled, 90), "p99_ms": pctl(pooled, 99),
            "max_ms": max(pooled), "mean_ms": statistics.fmean(pooled),
            "over_20ms": sum(x > 20 for x in pooled)}


# ---------------------------------------------------------------------------
# results and reports


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine_conditions(python: str, loadavg_at_start: str) -> dict[str, Any]:
    """The machine and the versions of what runs: the head of every report's conditions."""
    versions = run_text([python, "-c",
                         "import twisted, cryptography, relay; print(twisted.__version__, "
                         "cryptography.__version__, relay.__version__)"], cwd=REPO).split()
    versions += ["?"] * (3 - len(versions))
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "loadavg_at_start": loadavg_at_start,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": versions[0],
        "cryptography": versions[1],
        "labrelay": versions[2],
        "openssh": run_text([find_program("ssh"), "-V"]),
    }


def result_head(benchmark: str, bench: SshdBench) -> dict[str, Any]:
    """The first keys of a result: which benchmark, when, and the code it ran."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": bench.commit,
        "relay_uncommitted_at_start": bench.relay_changes,
    }


def fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    """A spread as ``median (min–max)``."""
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "n/a"


def goal_value(g: dict[str, Any]) -> str:
    value = g["value"]
    if value is None:
        return "n/a"
    return f"{value:.2f} {g.get('unit') or ''}".strip()


def uncommitted(res: dict[str, Any], when: str) -> tuple[str, list[str]]:
    """The title's note on uncommitted changes in relay/, and the lines that list them."""
    changes = res.get("relay_uncommitted_at_start") or []
    if not changes:
        return "", []
    return (" plus uncommitted changes in relay/",
            [f"Uncommitted in relay/ when {when}: {', '.join(changes)}.", ""])


def conditions_text(c: dict[str, Any]) -> str:
    """The machine and versions sentence of a report, from ``machine_conditions``."""
    return (f"{c['cpu_model']}, {c['nproc']} CPUs (load {c['loadavg_at_start']} at start), "
            f"Linux {c['kernel']}, Python {c['python']}, Twisted {c['twisted']}, "
            f"cryptography {c['cryptography']}, labrelay {c['labrelay']}, {c['openssh']}. ")


def goals_table(goals: list[dict[str, Any]]) -> list[str]:
    return ["", "## Goals", "", "| goal | value | status |", "|---|---|---|",
            *[f"| {g['goal']} | {goal_value(g)} | **{g['status']}** |" for g in goals]]


def machine_text(m: dict[str, Any], nproc: int | None, processes: str) -> str:
    """The machine's CPU during the measurements (``MachineMeter.result``); ``processes``
    says which are this benchmark's and what the rest is."""
    return (f"Machine during the measurements ({m['wall_s']:.0f} s): CPUs busy "
            f"{m['busy_cpu_s']:.0f} of {m['wall_s'] * (nproc or 1):.0f} CPU-seconds, "
            f"{m['bench_processes_cpu_s']:.0f} of them in this benchmark's {processes}; "
            f"hypervisor steal {m['steal_cpu_s']:.1f} s; load average at end "
            f"{m['loadavg_at_end']}.")


def anomaly_lines(anomalies: list[str], none: str) -> list[str]:
    """The report's list of anomalies, or ``none`` (what a clean run means)."""
    if anomalies:
        return ["Anomalies:", "", *["    " + a.replace("\n", "\n    ") for a in anomalies], ""]
    return [none, ""]


def print_goals(res: dict[str, Any]) -> None:
    print()
    for g in res["goals"]:
        print(f"  {g['status']:4}  {g['goal']}: {goal_value(g)}")
    print_anomalies(res)


def print_anomalies(res: dict[str, Any]) -> None:
    for a in res["anomalies"]:
        print(f"  !! {a}")


def write_results(directory: Path, res: dict[str, Any], markdown: str) -> None:
    """Overwrite ``BENCHMARK-latest.json`` and ``BENCHMARK-latest.md`` in ``directory`` and
    append the run's line to ``history.jsonl`` (``bench.history``)."""
    js = write_latest(directory, res["benchmark"], res, markdown)
    print(f"wrote {js}, {js.with_suffix('.md')} and a line in {js.parent / HISTORY}",
          flush=True)


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


def bench_parser(prog: str, description: str, runs_help: str) -> argparse.ArgumentParser:
    """A parser with ``--bytes`` and ``--runs`` (see ``quick_defaults``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--bytes", type=parse_bytes, default=None,
                   help="bytes per transfer, e.g. 1GiB (default), 256MiB")
    p.add_argument("--runs", type=int, default=None, help=runs_help)
    return p


def add_session_options(p: argparse.ArgumentParser, sessions_help: str, gap_sessions: int,
                        gap_ms_help: str) -> None:
    """``--sessions``, ``--gap-sessions`` and ``--gap-ms``: the set-up latency sessions."""
    p.add_argument("--sessions", type=int, default=200, help=sessions_help)
    p.add_argument("--gap-sessions", type=int, default=gap_sessions,
                   help="also time this many sessions per path per run with the link idle "
                   f"before each (default {gap_sessions}; 0 skips it)")
    p.add_argument("--gap-ms", type=float, default=50.0, help=gap_ms_help)


def add_run_options(p: argparse.ArgumentParser, what: str, reverse: bool = True) -> None:
    """``--quick``, ``--no-reverse`` (if ``reverse``) and ``--keep-going``."""
    p.add_argument("--quick", action="store_true", help="256 MiB and 3 runs")
    if reverse:
        p.add_argument("--no-reverse", action="store_true",
                       help="skip the pull direction (target -> client)")
    p.add_argument("--keep-going", action="store_true",
                   help=f"keep measuring a {what} after it failed once")


def add_python_and_results(p: argparse.ArgumentParser, python_help: str) -> None:
    p.add_argument("--python", default=sys.executable, help=python_help)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def quick_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``--bytes`` and ``--runs`` not given: 1 GiB x 5 runs, or 256 MiB x 3 with --quick."""
    if args.bytes is None:
        args.bytes = 256 * MiB if args.quick else GiB
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    return args


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP interrupt the harness like Ctrl-C, so everything is stopped."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT explicitly too: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)


class Harness(Protocol):
    def setup(self) -> None: ...

    def run(self) -> dict[str, Any]: ...

    def cleanup(self) -> list[str]: ...


H = TypeVar("H", bound=Harness)


def run_bench(prefix: str, make: Callable[[Path], H], announce: Callable[[H], None],
              markdown: Callable[[dict[str, Any]], str],
              print_table: Callable[[dict[str, Any]], None], results_dir: Path) -> int:
    """Set up ``make(workdir)`` in a new temporary directory, ``announce`` it, run it, write
    its result and report (``write_results``) and print its table; everything is stopped at
    the end. The exit status: 0 clean, 3 with anomalies, 1 set-up failed, 130 interrupted."""
    install_signal_handlers()
    code = 1
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the privilege-separated sshd reads its files
        bench = make(workdir)
        try:
            print(f"setting up in {workdir} ...", flush=True)
            bench.setup()
            announce(bench)
            res = bench.run()
            write_results(results_dir, res, markdown(res))
            print_table(res)
            code = 0 if not res["anomalies"] else 3
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping everything", file=sys.stderr)
            code = 130
        finally:
            for note in bench.cleanup():
                print(f"bench: cleanup: {note}", file=sys.stderr)
    return code
