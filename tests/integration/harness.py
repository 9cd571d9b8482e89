"""Real-process test harness: OpenSSH sshd instances, labrelay processes, TCP targets.

Everything here binds 127.0.0.1 port 0 (or a port chosen at run time), waits on
streams, queues and sockets with bounded timeouts -- never on a fixed sleep -- and
cleans up after itself.  A timeout or an early exit raises ``HarnessError`` (an
``AssertionError``) whose message carries what the process printed, so a failing
test explains itself.

Main pieces:

``Sshd``           an OpenSSH ``sshd -D -e`` from a temp dir; kill/restart/stop/cont.
``AgentProcess``   a labrelay process whose ``--log-format json`` stdout is parsed into
                   events that tests ``wait_for``.
``SshProcess``     a stock ``ssh`` client process whose stderr can be waited on.
``EchoServer``, ``HashSink``, ``Source``, ``LazyReader``   threaded TCP targets.
``TcpProxy``       a selectors-based TCP proxy with ``blackhole()``/``restore()``/``kill_all()``.
``DataStream``     deterministic pseudo-random bytes with a known sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024


class HarnessError(AssertionError):
    """A bounded wait ran out, or a process ended before what a test waited for."""


# ---------------------------------------------------------------------------
# small utilities


def _named_port_range() -> tuple[int, int]:
    """The ports just below the kernel's ephemeral range: ``bind(0)`` never hands them
    out, so a port named here is not taken, before it is used, by one of the test's own
    listeners that binds port 0 (the relay, an echo server, a proxy)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1024, low - 12000), low


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago: a random one below the ephemeral range
    that binds (then released), else one ``bind(0)`` picks.

    Racy (another process may take it before it is used), so only for a port that
    must be named before anything listens on it: a public port written in a grant,
    a port a forward must keep across a server restart, a stock ``ssh -L`` (OpenSSH
    refuses a local forward on port 0), an sshd (whose start retries on a bind
    failure).  Everything labrelay listens on binds port 0 and is read back from its
    events (``relay_listening``, ``admin_listening``, ``relay_data_port``,
    ``forward_ready``, ``plain_forward_ready``).  Below the ephemeral range, since a
    port from ``bind(0)`` was once handed straight to the echo server the test
    started next, and the relay could not bind the public port named in its grant."""
    low, high = _named_port_range()
    pick = random.SystemRandom()
    for _ in range(100):
        port = pick.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_program(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (``sshd``)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _descendants(root: int) -> set[int]:
    """All live descendants of ``root`` (by walking /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ..." -- comm may contain spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z":
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


def _signal_pids(pids: Iterator[int] | set[int] | list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_pids_gone(pids: set[int], timeout: float) -> None:
    """Block until every pid has exited (pidfds become readable at exit)."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue
    try:
        deadline = time.monotonic() + timeout
        pending = list(fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(f"processes still alive after SIGKILL: {sorted(pids)}")
            ready, _, _ = select.select(pending, [], [], remaining)
            pending = [fd for fd in pending if fd not in ready]
    finally:
        for fd in fds:
            os.close(fd)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise HarnessError(f"no VmRSS for pid {pid}")


class PipeReader:
    """A thread that reads a child's pipe line by line and can be *settled*.

    A process that writes a log line and then answers a client has put the line in
    the pipe before the client sees the answer, but the thread reading the pipe may
    not have had its turn yet (under load it is one more thread waiting for a CPU):
    read at once, the line was missing (test_channel_requests' refusal, once under two
    xdist workers).  So the reader reads the raw pipe (not a buffered file), holds
    ``_reading`` from a read until its lines are delivered, and counts the bytes it
    took; ``settle()`` takes what the pipe holds now (FIONREAD) plus what was taken so
    far as the count to reach, i.e. every byte written before the call.  It waits for
    nothing when nothing is unread, terminates under a continuous writer (its target is
    fixed at call time), and raises ``HarnessError`` rather than hang.

    Used by ``AgentProcess`` (stdout events) and ``LineLog`` (stderr, sshd logs, ssh's
    ``-v`` output, the relay's connect audit): one implementation, so the two kinds of
    log cannot drift apart again.
    """

    def __init__(
        self,
        stream: IO[bytes],
        on_line: Callable[[bytes], None],
        on_eof: Callable[[], None],
        name: str,
    ) -> None:
        self._stream = stream
        self._fd = stream.fileno()
        self._on_line = on_line
        self._on_eof = on_eof
        self._reading = threading.Lock()
        self._cond = threading.Condition()
        self._consumed = 0
        self._eof = False
        self.thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self.thread.start()

    @property
    def eof(self) -> bool:
        with self._cond:
            return self._eof

    def _pump(self) -> None:
        # Waits for data without the lock, so that ``settle`` never waits behind an
        # idle reader.
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        pending = b""
        try:
            while True:
                poller.poll()
                with self._reading:
                    chunk = os.read(self._fd, 1 << 16)
                    if not chunk:
                        break
                    *lines, pending = (pending + chunk).split(b"\n")
                    for raw in lines:
                        self._on_line(raw)
                    with self._cond:
                        self._consumed += len(chunk)
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._reading:
                if pending:
                    self._on_line(pending)
                with self._cond:
                    self._eof = True
                    self._cond.notify_all()
                self._on_eof()
                # The pipe is this thread's once it read EOF: close it here, or every
                # process a test starts leaves its pipe open in pytest until the end.
                with contextlib.suppress(OSError):
                    self._stream.close()

    def settle(self, what: str, timeout: float = 10.0) -> None:
        """Return once every byte written to the pipe before this call was delivered."""
        with self._reading:
            if self._eof:
                return
            try:
                unread = struct.unpack(
                    "i", fcntl.ioctl(self._fd, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                return
            target = self._consumed + unread
        if not unread:
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._consumed >= target or self._eof, timeout):
                raise HarnessError(f"{what}: {target - self._consumed} bytes of its pipe "
                                   f"still unread after {timeout}s")

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


class LineLog:
    """Lines read from a stream by a background thread; waiters block on a condition.

    Several streams (for instance successive sshd runs) can feed one log; ``eof``
    refers to the most recently attached stream.  ``lines``, ``text()`` and ``mark()``
    first take every line already written to the streams (``PipeReader.settle``): a
    line written before the client saw its answer is there when the test reads.
    Lines written later still need ``wait_for``.
    """

    def __init__(self, copy_to: Path | None = None, name: str = "log") -> None:
        self.name = name
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = True
        self._copy_to = copy_to
        self._readers: list[PipeReader] = []

    def attach(self, stream: IO[bytes], name: str = "reader") -> threading.Thread:
        with self._cond:
            self._eof = False
            generation = len(self._readers) + 1
            reader = PipeReader(
                stream,
                on_line=lambda raw: self.append(raw.decode("utf-8", "replace").rstrip("\r\n")),
                on_eof=lambda: self._ended(generation),
                name=name,
            )
            self._readers.append(reader)
        return reader.thread

    def _ended(self, generation: int) -> None:
        with self._cond:
            if generation == len(self._readers):
                self._eof = True
            self._cond.notify_all()

    def append(self, line: str) -> None:
        with self._cond:
            self._lines.append(line)
            if self._copy_to is not None:
                with open(self._copy_to, "a") as f:
                    f.write(line + "\n")
            self._cond.notify_all()

    def settle(self) -> None:
        """Take every line written to the attached streams before this call."""
        with self._cond:
            readers = list(self._readers)
        for reader in readers:
            reader.settle(self.name)

    @property
    def lines(self) -> list[str]:
        """A copy of the lines so far, every line written before the call included."""
        self.settle()
        with self._cond:
            return list(self._lines)

    def mark(self) -> int:
        """The index the next line will get (after every line already written)."""
        self.settle()
        with self._cond:
            return len(self._lines)

    @property
    def eof(self) -> bool:
        with self._cond:
            return self._eof

    def text(self, since: int = 0) -> str:
        """The lines from ``since``, every line written before the call included."""
        self.settle()
        return self.dump(since)

    def dump(self, since: int = 0) -> str:
        """The lines read so far, without settling (for diagnostics after a failure)."""
        with self._cond:
            return "\n".join(self._lines[since:])

    def join(self, timeout: float = 10.0) -> None:
        with self._cond:
            readers = list(self._readers)
        for reader in readers:
            reader.join(timeout)

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        since: int = 0,
        what: str = "log",
        stop_at_eof: bool = True,
    ) -> re.Match[str]:
        """The first line at index >= ``since`` matching ``pattern`` (``re.search``)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self._lines):
                    m = regex.search(self._lines[index])
                    index += 1
                    if m:
                        return m
                if stop_at_eof and self._eof:
                    raise HarnessError(
                        f"{what} ended before a line matching {regex.pattern!r}:\n"
                        + self._tail(since)
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"no {what} line matching {regex.pattern!r} within {timeout}s:\n"
                        + self._tail(since)
                    )
                self._cond.wait(remaining)

    def _tail(self, since: int, n: int = 60) -> str:
        return "\n".join(self._lines[max(since, len(self._lines) - n) :])


# ---------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key made with ssh-keygen (private file mode 0600)."""

    path: Path
    public: str  # "ssh-ed25519 AAAA... comment"

    @property
    def public_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pub")

    def fingerprint(self) -> str:
        return key_fingerprint(self.public_path)

    def public_blob(self) -> str:
        """``ssh-ed25519 AAAA...`` without the comment."""
        return " ".join(self.public.split()[:2])


def make_key(path: Path, comment: str = "labrelay-test") -> KeyPair:
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    keygen = find_program("ssh-keygen") or "ssh-keygen"
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    os.chmod(path, 0o600)
    public = path.with_name(path.name + ".pub").read_text().strip()
    return KeyPair(path, public)


def key_fingerprint(public_path: Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it."""
    keygen = find_program("ssh-keygen") or "ssh-keygen"
    out = subprocess.run(
        [keygen, "-l", "-E", "sha256", "-f", str(public_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


def known_hosts_line(public_blob: str, port: int, host: str = LOOPBACK) -> str:
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"{pattern} {public_blob}"


def write_known_hosts(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------
# sshd

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts clientspecified
PrintMotd no
PrintLastLog no
SetEnv LABRELAY_TEST_HOST={name}
LogLevel VERBOSE
ClientAliveInterval 0
Subsystem sftp internal-sftp
"""

_BIND_FAILED = re.compile(r"Bind to port \d+ .*failed|Cannot bind any address")


_CONN_FROM = re.compile(r"Connection from 127\.0\.0\.1 port (\d+) on ")


def _connection_ended(port: int) -> str:
    return (
        r"(?:closed by|reset by|Disconnected from|Received disconnect from|"
        r"Timeout before authentication for|Unable to negotiate with)"
        rf"\D*127\.0\.0\.1 port {port}\b"
    )


class Sshd:
    """A real OpenSSH sshd on 127.0.0.1, configured from its own temp dir.

    ``start()`` picks a free port (retrying if another process takes it first) and
    returns once the log says "Server listening on".  Session processes fork from
    the listener and call setsid(), so signals go to the whole /proc descendant tree
    rather than to a process group.
    """

    START_TIMEOUT = 15.0

    def __init__(
        self, directory: Path, name: str, authorized: Sequence[str] = (), extra_config: str = ""
    ) -> None:
        self.dir = directory
        self.name = name
        self.extra_config = extra_config  # appended to SSHD_CONFIG (e.g. "Ciphers ...\n")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.host_key = make_key(self.dir / "ssh_host_ed25519_key", comment=f"host-{name}")
        (self.dir / "authorized_keys").write_text("".join(k + "\n" for k in authorized))
        self.port = 0
        self.log = LineLog(copy_to=self.log_path, name=f"sshd {name}'s log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._binary = find_program("sshd")
        if self._binary is None:
            raise HarnessError("sshd not found")

    # -- lifecycle

    def start(self, attempts: int = 5) -> Sshd:
        for _ in range(attempts):
            if self._run(free_port()):
                return self
        raise HarnessError(f"sshd {self.name}: could not bind a port:\n{self.log_text()}")

    def restart(self) -> None:
        """Start again on the same port (after ``kill()``)."""
        if self.running:
            raise HarnessError("restart() while sshd is running; kill() it first")
        if not self._run(self.port):
            raise HarnessError(f"sshd {self.name}: port {self.port} not free:\n{self.log_text()}")

    def _run(self, port: int) -> bool:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = port
        self.config_path.write_text(
            SSHD_CONFIG.format(port=port, dir=self.dir, name=self.name) + self.extra_config
        )
        since = self.log.mark()
        self.log.append(f"=== labrelay-test: starting sshd {self.name} on port {port} ===")
        self.proc = subprocess.Popen(
            [self._binary or "sshd", "-D", "-e", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        self.log.attach(self.proc.stderr, name=f"sshd-{self.name}-log")
        try:
            self.log.wait_for(
                rf"Server listening on 127\.0\.0\.1 port {port}\b",
                self.START_TIMEOUT,
                since=since,
                what=f"sshd {self.name}",
            )
            return True
        except HarnessError:
            if self.running:
                self.kill()
            self._reap()
            if _BIND_FAILED.search(self.log.text(since)):
                return False
            raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError("sshd not started")
        return self.proc.pid

    def _tree(self) -> set[int]:
        """Stop the listener, then every descendant until the set stops growing; return it.

        Stopping first means nothing forks between the scan and the signal.
        """
        pids = {self.pid}
        _signal_pids(pids, signal.SIGSTOP)
        while True:
            found = _descendants(self.pid) - pids
            if not found:
                return pids
            _signal_pids(found, signal.SIGSTOP)
            pids |= found

    def kill(self) -> None:
        """SIGKILL the listener and every session process; return when all are gone."""
        if not self.running:
            return
        pids = self._tree()
        _signal_pids(pids, signal.SIGKILL)
        _wait_pids_gone(pids, 10.0)
        self._reap()
        self.log.append(f"=== labrelay-test: sshd {self.name} killed ===")

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.log.join(5)

    def stop_sessions(self) -> None:
        """SIGKILL every session process; the listener keeps accepting."""
        if not self.running:
            return
        # Freeze the listener while scanning so no new session forks in between.
        os.kill(self.pid, signal.SIGSTOP)
        try:
            pids: set[int] = set()
            while True:
                found = _descendants(self.pid) - pids
                if not found:
                    break
                _signal_pids(found, signal.SIGSTOP)
                pids |= found
            _signal_pids(pids, signal.SIGKILL)
            _wait_pids_gone(pids, 10.0)
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def sigstop_all(self) -> None:
        """Freeze the listener and every session: the silent-peer failure."""
        self._tree()

    def sigcont_all(self) -> None:
        pids = {self.pid} | _descendants(self.pid)
        _signal_pids(pids, signal.SIGCONT)

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.sigcont_all()
            self.kill()

    # -- what it looks like from outside

    def authorize(self, public: str) -> None:
        with open(self.dir / "authorized_keys", "a") as f:
            f.write(public + "\n")

    def known_hosts_line(self, port: int | None = None, host: str = LOOPBACK) -> str:
        """``[127.0.0.1]:PORT ssh-ed25519 ...``; ``port`` for reaching it through a forward."""
        return known_hosts_line(self.host_key.public_blob(), port or self.port, host)

    def fingerprint(self) -> str:
        return self.host_key.fingerprint()

    def log_text(self, since: int = 0) -> str:
        return self.log.text(since)

    def wait_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        return self.log.wait_for(
            pattern, timeout, since=since, what=f"sshd {self.name}", stop_at_eof=False
        )

    def connection_ports(self, since: int = 0) -> list[int]:
        """Client ports of the connections logged since line ``since``."""
        return [int(m.group(1)) for m in map(_CONN_FROM.search, self.log.lines[since:]) if m]

    def sync_log(self, since: int = 0, timeout: float = 15.0) -> int:
        """Wait until the log has caught up with every connection made so far.

        Opens and closes a sentinel connection (after its banner, so its session
        process exists) and waits for its lines, then waits until each connection
        logged since ``since`` is also logged as ended.  Returns the sentinel's port,
        which callers leave out of ``connection_ports``.
        """
        with connect(self.port, timeout=timeout) as sock:
            sentinel = sock.getsockname()[1]
            recv_exactly(sock, 4)  # "SSH-"
        self.wait_log(rf"Connection from 127\.0\.0\.1 port {sentinel} ", timeout, since)
        for port in self.connection_ports(since):
            self.wait_log(_connection_ended(port), timeout, since)
        return sentinel

    def diagnostics(self) -> str:
        state = f"pid {self.proc.pid}, running={self.running}" if self.proc else "not started"
        return f"sshd {self.name} port {self.port} ({state}); log:\n" + self.log.dump()


# ---------------------------------------------------------------------------
# processes: the agent and stock ssh


class _Process:
    """A child process in its own session, with stderr (and stdout) read by threads."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str = "process",
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        self.stderr = LineLog(name=f"{name}'s stderr")
        self.stderr.attach(self.proc.stderr, name=f"{name}-stderr")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name} still running after {timeout}s\n{self.diagnostics()}"
            ) from None
        self._join_readers()
        return rc

    def _join_readers(self) -> None:
        self.stderr.join(5)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL.  Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._join_readers()
        return self.proc.returncode

    def kill(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._join_readers()
        return self.proc.returncode

    def sigstop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def stderr_text(self) -> str:
        return self.stderr.text()

    def diagnostics(self) -> str:
        return (
            f"{self.name}: {' '.join(self.argv)}\n"
            f"pid {self.proc.pid}, returncode {self.proc.poll()}\n"
            f"--- stderr ---\n{self.stderr.dump()}"
        )


class SshProcess(_Process):
    """A stock OpenSSH client; wait on its stderr (``-v`` lines, "Allocated port ...")."""

    def __init__(self, argv: Sequence[str], name: str = "ssh") -> None:
        super().__init__(argv, name=name)
        assert self.proc.stdout is not None
        self.stdout = LineLog(name=f"{name}'s stdout")
        self.stdout.attach(self.proc.stdout, name=f"{name}-stdout")

    def wait_stderr(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        return self.stderr.wait_for(pattern, timeout, what=self.name)

    def _join_readers(self) -> None:
        super()._join_readers()
        self.stdout.join(5)

    def diagnostics(self) -> str:
        return super().diagnostics() + f"\n--- stdout ---\n{self.stdout.dump()}"


def ssh_argv(
    port: int,
    identity: Path,
    known_hosts: Path,
    *options: str,
    command: str | None = None,
    user: str = "root",
    host: str = LOOPBACK,
) -> list[str]:
    """A stock ``ssh`` command line isolated from the user's and system's config."""
    return [
        find_program("ssh") or "ssh",
        "-F",
        "/dev/null",
        "-p",
        str(port),
        "-i",
        str(identity),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "ConnectTimeout=10",
        *options,
        f"{user}@{host}",
        *([command] if command is not None else []),
    ]


Matcher = Any  # a value compared with ==, or a callable predicate


class AgentProcess(_Process):
    """A labrelay process whose stdout carries one JSON event per line.

    Every event is kept (with ``_index``, its position).  ``wait_for`` searches from a
    cursor that advances past each match, so consecutive waits assert order; pass
    ``since=`` (for example a ``mark()``) to search from elsewhere.  A line that is not
    a JSON event is kept as ``{"event": "_raw", "text": line}``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str = "agent",
    ) -> None:
        super().__init__(argv, env=env, cwd=cwd, name=name)
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._cursor = 0
        self._stdout_eof = False
        assert self.proc.stdout is not None
        self._reader = PipeReader(
            self.proc.stdout, on_line=self._take, on_eof=self._ended, name=f"{name}-stdout"
        )

    @staticmethod
    def _parse(line: str) -> dict[str, Any]:
        for start in (0, line.find("{")):
            if start < 0:
                continue
            try:
                obj = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                return obj
        return {"event": "_raw", "text": line}

    def _take(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.strip():
            return
        event = self._parse(line)
        with self._cond:
            event["_index"] = len(self._events)
            self._events.append(event)
            self._cond.notify_all()

    def _ended(self) -> None:
        with self._cond:
            self._stdout_eof = True
            self._cond.notify_all()

    def _settle(self) -> None:
        """Every line the process wrote to stdout before this call is an event here
        (``PipeReader.settle``).  Events it writes *after* the client's effect still
        need ``wait_for`` / ``events_at_least``."""
        self._reader.settle(f"{self.name}'s stdout")

    def _join_readers(self) -> None:
        super()._join_readers()
        self._reader.join(5)

    # -- queries

    def mark(self) -> int:
        """The index the next event will get (after every line already written)."""
        self._settle()
        with self._cond:
            return len(self._events)

    def events(self, name: str | None = None, since: int = 0, **match: Matcher) -> list[dict]:
        """The events so far, including every line the process wrote before this call
        (``_settle``); not those it writes later: await those."""
        self._settle()
        with self._cond:
            return [
                e
                for e in self._events[since:]
                if (name is None or e.get("event") == name) and _matches(e, match)
            ]

    def wait_for(
        self, event: str, timeout: float = 15.0, since: int | None = None,
        advance: bool = True, **match: Matcher,
    ) -> dict[str, Any]:
        """Block until an event named ``event`` whose fields match arrives; return it.

        Later waits with ``since=None`` start after it, unless ``advance`` is false
        (a look-up of a fact, such as a bound port, that must not skip events).
        Fails at once if the process closes its stdout (exits) first.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            index = self._cursor if since is None else since
            while True:
                while index < len(self._events):
                    e = self._events[index]
                    index += 1
                    if e.get("event") == event and _matches(e, match):
                        if advance:
                            self._cursor = index
                        return e
                if self._stdout_eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"no {event} {match or ''} from {self.name} within {timeout}s\n"
                        + self.diagnostics()
                    )
                self._cond.wait(remaining)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._join_readers()
        raise HarnessError(
            f"{self.name} exited (status {self.proc.poll()}) before {event} {match or ''}\n"
            + self.diagnostics()
        )

    def events_at_least(self, event: str, count: int, since: int = 0, timeout: float = 15.0,
                        **match: Matcher) -> list[dict]:
        """The events named ``event`` (fields matching) since ``since``, once at least
        ``count`` arrived: for events written a little after what a test just did (the
        relay writes a session's ``session_open`` just after its set-up, audit.SetupLog)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self._events[since:]
                         if e.get("event") == event and _matches(e, match)]
                if len(found) >= count or self._stdout_eof:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(f"{len(found)} of {count} {event} {match or ''} from "
                                       f"{self.name} within {timeout}s\n" + self.diagnostics())
                self._cond.wait(remaining)

    def assert_no_event(self, event: str, since: int = 0, **match: Matcher) -> None:
        found = self.events(event, since=since, **match)
        if found:
            raise HarnessError(f"unexpected {event}: {found}\n" + self.diagnostics())

    def diagnostics(self) -> str:
        with self._cond:
            lines = [json.dumps(e, sort_keys=True) for e in self._events]
        return super().diagnostics() + "\n--- events ---\n" + "\n".join(lines)


def is_unhandled(event: dict[str, Any]) -> bool:
    """An event no test may cause: Twisted's "Unhandled Error" (an exception that escaped
    a callback or a protocol method) or anything else logged at level critical."""
    return event.get("level") == "critical" or "Unhandled Error" in str(event.get("text", ""))


def unhandled_errors(procs: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(process name, event) of every unhandled error the labrelay processes among
    ``procs`` logged (processes without a JSON log, such as ssh, are skipped).  The
    integration, security and e2e fixtures fail a test that leaves any."""
    return [(proc.name, e) for proc in procs if isinstance(proc, AgentProcess)
            for e in proc.events() if is_unhandled(e)]


def _matches(event: dict[str, Any], match: dict[str, Matcher]) -> bool:
    for key, want in match.items():
        if key not in event:
            return False
        have = event[key]
        if callable(want):
            if not want(have):
                return False
        elif have != want:
            return False
    return True


# ---------------------------------------------------------------------------
# data


class DataStream:
    """``size`` deterministic pseudo-random bytes from ``seed``, produced in chunks.

    The same (seed, size) always yields the same bytes, so sender and checker need
    share nothing but the two numbers.
    """

    def __init__(self, seed: int, size: int, chunk: int = MiB) -> None:
        self.seed = seed
        self.size = size
        self.chunk = chunk
        self._digest: str | None = None

    def chunks(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left > 0:
            n = min(self.chunk, left)
            yield rng.randbytes(n)
            left -= n

    @property
    def sha256(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for c in self.chunks():
                h.update(c)
            self._digest = h.hexdigest()
        return self._digest

    def bytes(self) -> bytes:
        return b"".join(self.chunks())


@dataclass(frozen=True)
class Received:
    nbytes: int
    sha256: str


def read_to_eof(sock: socket.socket, bufsize: int = 256 * 1024) -> Received:
    h = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(bufsize)
        if not data:
            return Received(total, h.hexdigest())
        h.update(data)
        total += len(data)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(n - len(buf), 256 * 1024))
        if not data:
            raise HarnessError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def connect(port: int, host: str = LOOPBACK, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Thread(threading.Thread):
    """A thread that keeps its target's exception to re-raise in ``result()``."""

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self._result: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as e:
            self._error = e

    def result(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise HarnessError(f"{self.name} did not finish within {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result


def echo_roundtrip(
    port: int,
    payload: bytes,
    host: str = LOOPBACK,
    timeout: float = 30.0,
    greeting: bytes = b"",
) -> bytes:
    """Send ``payload`` to an echo server through ``port``; return what came back.

    Reads exactly ``len(greeting) + len(payload)`` bytes, sending from a second thread
    so a payload larger than the socket buffers cannot deadlock.  Does not rely on
    half-close.
    """
    with connect(port, host, timeout) as sock:
        sender = _Thread(lambda: sock.sendall(payload), name="echo-sender")
        sender.start()
        got = recv_exactly(sock, len(greeting) + len(payload))
        sender.result(timeout)
    if not got.startswith(greeting):
        raise HarnessError(f"expected greeting {greeting!r}, got {got[: len(greeting)]!r}")
    return got[len(greeting) :]


def send_stream(port: int, stream: DataStream, host: str = LOOPBACK, timeout: float = 60.0) -> None:
    """Connect, send ``stream``, then half-close and drain until the peer closes."""
    with connect(port, host, timeout) as sock:
        for chunk in stream.chunks():
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            read_to_eof(sock)


def receive_stream(port: int, host: str = LOOPBACK, timeout: float = 60.0) -> Received:
    """Connect and read to EOF; return length and sha256."""
    with connect(port, host, timeout) as sock:
        return read_to_eof(sock)


# ---------------------------------------------------------------------------
# TCP targets


def close_woken(sock: socket.socket) -> None:
    """Close a socket that another thread may be blocked on (``accept()``, ``recv()``):
    ``shutdown()`` first, which wakes that call, then ``close()``.  ``close()`` alone does
    not: the blocked call keeps the old socket alive and the thread outlives its test,
    and such zombie accept threads took later tests' connections in CI twice
    (test_trusted_ca's echo in round 9, test_relay's takeover echo in round 10)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpServer:
    """A threaded server on 127.0.0.1 port 0: one thread per accepted connection."""

    kind = "server"

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port: int = self.sock.getsockname()[1]
        self.address = (LOOPBACK, self.port)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"{self.kind}-{self.port}", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(
                target=self._serve, args=(conn,), name=f"{self.kind}-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError as e:
            if not self._closed:
                self.errors.append(e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


class EchoServer(TcpServer):
    """Sends ``greeting`` (to tell servers apart), then echoes until EOF."""

    kind = "echo"

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        if self.greeting:
            conn.sendall(self.greeting)
        while True:
            data = conn.recv(256 * 1024)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)


class HashSink(TcpServer):
    """Reads each connection to EOF and records (length, sha256) in ``results``.

    With ``reply=True`` it then writes ``b"<length> <sha256>\\n"`` back before closing.
    """

    kind = "sink"

    def __init__(self, reply: bool = False) -> None:
        self.reply = reply
        self.results: queue.Queue[Received] = queue.Queue()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        got = read_to_eof(conn)
        self.results.put(got)
        if self.reply:
            conn.sendall(f"{got.nbytes} {got.sha256}\n".encode())
        conn.shutdown(socket.SHUT_WR)

    def result(self, timeout: float = 60.0) -> Received:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(f"sink {self.port}: no complete stream within {timeout}s") from None


class Source(TcpServer):
    """Sends ``stream`` on each connection, half-closes, drains until the peer closes."""

    kind = "source"

    def __init__(self, stream: DataStream) -> None:
        self.stream = stream
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        for chunk in self.stream.chunks():
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(120)
        read_to_eof(conn)


class LazyReader(TcpServer):
    """Accepts and reads nothing until ``release`` is set; then reads to EOF and hashes.

    ``connected`` is set once a connection has been accepted.
    """

    kind = "lazy"

    def __init__(self, hold_timeout: float = 300.0) -> None:
        self.release = threading.Event()
        self.connected = threading.Event()
        self.hold_timeout = hold_timeout
        self.results: queue.Queue[Received] = queue.Queue()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connected.set()
        if not self.release.wait(self.hold_timeout):
            return
        got = read_to_eof(conn)
        self.results.put(got)

    def result(self, timeout: float = 120.0) -> Received:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(f"lazy reader: no complete stream within {timeout}s") from None


class ModeServer(TcpServer):
    """One target for several jobs, chosen by the first byte a client sends.

    ``b"E"``: echo everything after it.  ``b"U"``: read to EOF and record (length,
    sha256) in ``results``.  ``b"D"`` + seed + size (8 bytes each, big-endian): send
    ``DataStream(seed, size)`` and half-close.  Use with ``mode_echo``,
    ``mode_upload`` and ``mode_download``.
    """

    kind = "mode"

    def __init__(self) -> None:
        self.results: queue.Queue[Received] = queue.Queue()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        mode = recv_exactly(conn, 1)
        if mode == b"E":
            while data := conn.recv(256 * 1024):
                conn.sendall(data)
        elif mode == b"U":
            self.results.put(read_to_eof(conn))
        elif mode == b"D":
            header = recv_exactly(conn, 16)
            stream = DataStream(int.from_bytes(header[:8]), int.from_bytes(header[8:]))
            for chunk in stream.chunks():
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(120)
            read_to_eof(conn)
            return
        conn.shutdown(socket.SHUT_WR)

    def result(self, timeout: float = 120.0) -> Received:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(f"mode server: no complete upload within {timeout}s") from None


def mode_echo(port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    """Echo ``payload`` through a ModeServer behind ``port``."""
    with connect(port, timeout=timeout) as sock:
        sender = _Thread(lambda: sock.sendall(b"E" + payload), name="echo-sender")
        sender.start()
        got = recv_exactly(sock, len(payload))
        sender.result(timeout)
    return got


def mode_upload(port: int, stream: DataStream, timeout: float = 120.0) -> None:
    """Send ``stream`` to a ModeServer (it records what arrived), half-close, drain."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(b"U")
        for chunk in stream.chunks():
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            read_to_eof(sock)


def mode_download(port: int, stream: DataStream, timeout: float = 120.0) -> Received:
    """Ask a ModeServer for ``stream`` and read it to EOF."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(b"D" + stream.seed.to_bytes(8) + stream.size.to_bytes(8))
        return read_to_eof(sock)


@dataclass
class PushOutcome:
    sent: int = 0
    stalled_at: int | None = None


class StallingPusher:
    """Pushes a DataStream into a port from a thread; notices when the pipeline is full.

    Each ``send()`` waits at most ``stall_after`` seconds for room.  The first time one
    gets none, ``stalled`` is set (the bytes accepted so far are in ``outcome``) and the
    pusher waits for ``resume`` before going on with a long timeout.  Then it half-closes.
    """

    def __init__(
        self, port: int, stream: DataStream, stall_after: float = 2.0, host: str = LOOPBACK
    ) -> None:
        self.port = port
        self.stream = stream
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self.resume = threading.Event()
        self._settled = threading.Event()  # stalled, or finished, or failed
        self.outcome = PushOutcome()
        self._sock = connect(port, host, timeout=stall_after)
        self._thread = _Thread(self._run, name="pusher")
        self._thread.start()

    def _run(self) -> PushOutcome:
        sock = self._sock
        try:
            for chunk in self.stream.chunks():
                view = memoryview(chunk)
                while view:
                    try:
                        n = sock.send(view)
                    except TimeoutError:
                        if self.stalled.is_set():
                            raise
                        self.outcome.stalled_at = self.outcome.sent
                        self.stalled.set()
                        self._settled.set()
                        if not self.resume.wait(300):
                            raise HarnessError("pusher: never resumed") from None
                        sock.settimeout(120)
                        continue
                    view = view[n:]
                    self.outcome.sent += n
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                read_to_eof(sock)
            return self.outcome
        finally:
            sock.close()
            self._settled.set()

    def wait_stalled(self, timeout: float) -> int:
        """Block until the push stalls; return the bytes accepted by then.

        Fails at once if the push ends (all sent, or an error) without stalling.
        """
        self._settled.wait(timeout)
        if not self.stalled.is_set():
            if not self._thread.is_alive():
                self._thread.result(0)  # re-raises the pusher's error, if any
            raise HarnessError(
                f"push never stalled within {timeout}s ({self.outcome.sent} bytes sent, "
                f"pusher {'running' if self._thread.is_alive() else 'done'})"
            )
        return self.outcome.stalled_at or 0

    def result(self, timeout: float = 300.0) -> PushOutcome:
        self.resume.set()
        result: PushOutcome = self._thread.result(timeout)
        return result


# ---------------------------------------------------------------------------
# TCP proxy


class _End:
    __slots__ = ("events", "outbuf", "peer", "rd_eof", "sock", "wr_shut")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outbuf = bytearray()  # bytes waiting to be written to this socket
        self.rd_eof = False
        self.wr_shut = False
        self.events = 0
        self.peer: _End = self


class TcpProxy:
    """A TCP proxy on 127.0.0.1 port 0 to ``upstream``, run by one selector thread.

    ``blackhole()`` stops moving bytes both ways on every connection (new ones too)
    without closing anything -- to both ends it looks like a silent network.
    ``restore()`` moves bytes again; ``kill_all()`` resets every connection.  Each
    control call returns after the proxy thread has applied it.
    """

    BUFFER_LIMIT = 512 * 1024

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lsock = socket.create_server((LOOPBACK, 0))
        self._lsock.setblocking(False)
        self.port: int = self._lsock.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._lsock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._ends: list[_End] = []
        self._commands: queue.Queue[tuple[str, threading.Event]] = queue.Queue()
        self._blackholed = False
        self._running = True
        self.accepted = 0
        self._thread = threading.Thread(target=self._loop, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- control (from any thread)

    def _command(self, name: str) -> None:
        done = threading.Event()
        self._commands.put((name, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise HarnessError(f"proxy did not apply {name}")

    def blackhole(self) -> None:
        self._command("blackhole")

    def restore(self) -> None:
        self._command("restore")

    def kill_all(self) -> None:
        self._command("kill_all")

    @property
    def connections(self) -> int:
        return len(self._ends) // 2

    def close(self) -> None:
        if self._running:
            with contextlib.suppress(HarnessError):
                self._command("close")
            self._thread.join(5)

    # -- the loop

    def _loop(self) -> None:
        try:
            while self._running:
                for key, mask in self._sel.select():
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._control()
                    else:
                        self._io(key.data, mask)
                self._update()
        finally:
            for end in self._ends:
                end.sock.close()
            self._lsock.close()
            self._wake_r.close()
            self._wake_w.close()
            self._sel.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._lsock.accept()
            except BlockingIOError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            a, b = _End(client), _End(server)
            a.peer, b.peer = b, a
            for end in (a, b):
                end.sock.setblocking(False)
                end.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._ends.append(end)

    def _control(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while True:
            try:
                name, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "blackhole":
                self._blackholed = True
            elif name == "restore":
                self._blackholed = False
            elif name == "kill_all":
                for end in list(self._ends):
                    self._drop(end, reset=True)
            elif name == "close":
                for end in list(self._ends):
                    self._drop(end, reset=True)
                self._running = False
            done.set()

    def _io(self, end: _End, mask: int) -> None:
        if end not in self._ends:  # dropped earlier in this select() round
            return
        try:
            if mask & selectors.EVENT_READ and not end.rd_eof:
                data = end.sock.recv(256 * 1024)
                if data:
                    end.peer.outbuf += data
                else:
                    end.rd_eof = True
            if mask & selectors.EVENT_WRITE and end.outbuf:
                n = end.sock.send(end.outbuf)
                del end.outbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(end, reset=True)

    def _drop(self, end: _End, reset: bool) -> None:
        for e in (end, end.peer):
            if e not in self._ends:
                continue
            self._ends.remove(e)
            if e.events:
                self._sel.unregister(e.sock)
                e.events = 0
            if reset:
                with contextlib.suppress(OSError):
                    e.sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            e.sock.close()

    def _update(self) -> None:
        for end in list(self._ends):
            if end not in self._ends:
                continue
            if self._blackholed:
                want = 0
            else:
                want = 0
                if not end.rd_eof and len(end.peer.outbuf) < self.BUFFER_LIMIT:
                    want |= selectors.EVENT_READ
                if end.outbuf:
                    want |= selectors.EVENT_WRITE
                # Pass a FIN on once everything before it has been written.
                if end.peer.rd_eof and not end.outbuf and not end.wr_shut:
                    with contextlib.suppress(OSError):
                        end.sock.shutdown(socket.SHUT_WR)
                    end.wr_shut = True
                if end.wr_shut and end.peer.wr_shut:
                    self._drop(end, reset=False)
                    continue
            if want != end.events:
                if end.events == 0:
                    self._sel.register(end.sock, want, end)
                elif want == 0:
                    self._sel.unregister(end.sock)
                else:
                    self._sel.modify(end.sock, want, end)
                end.events = want


# ---------------------------------------------------------------------------
# the labrelay relay as a process, and what it does on the network

# Runs ``labrelay ARGS`` with an audit hook that reports every outbound connect()
# and name lookup of the process on stderr, so a test can assert on the relay's
# connection *attempts*, not only on the replies it sends.
AUDITED_LABRELAY = """\
import os, sys
def _audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        os.write(2, ("labrelay-audit %s %r\\n" % (event, args[1:] if event == "socket.connect"
                                                   else args[:2])).encode())
sys.addaudithook(_audit)
sys.argv[0] = "labrelay"
from relay.cli.main import main
raise SystemExit(main())
"""

_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING", "0C": "NEW_SYN_RECV",
}  # fmt: skip


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket a process holds, from /proc/PID/fd and /proc/PID/net/tcp{,6}."""

    state: str
    local: tuple[str, int]
    remote: tuple[str, int]


def _proc_address(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    if len(addr) == 8:  # IPv4, little-endian
        host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
    else:  # IPv6: four little-endian 32-bit words
        raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8))
        host = socket.inet_ntop(socket.AF_INET6, raw)
    return host, int(port, 16)


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """Every TCP socket ``pid`` has open, with its state and both addresses."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[9]) in inodes:
                    found.append(
                        TcpSocket(
                            _TCP_STATES.get(fields[3], fields[3]),
                            _proc_address(fields[1]),
                            _proc_address(fields[2]),
                        )
                    )
    return found


class CountingSource(TcpServer):
    """Sends ``stream`` on each connection, counting what the peer's path accepted.

    A ``send`` that gets no room for ``stall_after`` seconds sets ``stalled`` (bytes
    accepted by then in ``stalled_at``); sending then goes on with a long timeout, so a
    reader that starts reading later still gets the whole stream.  ``connected`` is set
    on accept, ``finished`` once everything was sent and the peer closed.
    """

    kind = "counting-source"

    def __init__(self, stream: DataStream, stall_after: float = 2.0) -> None:
        self.stream = stream
        self.stall_after = stall_after
        self.sent = 0
        self.stalled_at: int | None = None
        self.connected = threading.Event()
        self.stalled = threading.Event()
        self.finished = threading.Event()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connected.set()
        conn.settimeout(self.stall_after)
        for chunk in self.stream.chunks():
            view = memoryview(chunk)
            while view:
                try:
                    n = conn.send(view)
                except TimeoutError:
                    if self.stalled.is_set():
                        raise
                    self.stalled_at = self.sent
                    self.stalled.set()
                    conn.settimeout(300)
                    continue
                view = view[n:]
                self.sent += n
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(120)
        read_to_eof(conn)
        self.finished.set()

    def wait_stalled(self, timeout: float) -> int:
        if not self.stalled.wait(timeout):
            raise HarnessError(
                f"source {self.port}: never stalled within {timeout}s ({self.sent} bytes sent)"
            )
        return self.stalled_at or 0


class RelayNode:
    """A running ``labrelay relay`` process (see ``start_relay`` in conftest.py).

    ``port`` is its SSH port, ``known_hosts`` a file trusting its host key (tests may
    add lines with ``trust()``), ``admin`` its status endpoint ``host:port``.
    Outbound connection attempts of the process are in ``connect_attempts()``.
    """

    def __init__(self, proc: AgentProcess, directory: Path, admin_port: int) -> None:
        self.proc = proc
        self.name = proc.name
        self.dir = directory
        listening = proc.wait_for("relay_listening", timeout=20)
        self.port: int = listening["port"]
        self.fingerprints: str = listening["fingerprints"]
        self.admin = f"{LOOPBACK}:{admin_port}"
        self.admin_port = admin_port
        self.host_key_path = directory / "state" / "ssh_host_ed25519_key"
        blob = " ".join(
            self.host_key_path.with_name("ssh_host_ed25519_key.pub").read_text().split()[:2]
        )
        self.host_key_blob = blob
        self.known_hosts = directory / "known_hosts"
        write_known_hosts(self.known_hosts, known_hosts_line(blob, self.port))

    # -- the process

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> int:
        return self.proc.rss_kb()

    def wait_for(
        self, event: str, timeout: float = 15.0, since: int | None = None, **match: Matcher
    ) -> dict[str, Any]:
        return self.proc.wait_for(event, timeout=timeout, since=since, **match)

    def events(self, event: str | None = None, since: int = 0, **match: Matcher) -> list[dict]:
        """Like ``AgentProcess.events``; ``match`` may include ``name`` (a relay field)."""
        return [e for e in self.proc.events(event, since=since) if _matches(e, match)]

    def events_at_least(self, event: str, count: int, since: int = 0, timeout: float = 15.0,
                        **match: Matcher) -> list[dict]:
        """Like ``AgentProcess.events_at_least``."""
        return self.proc.events_at_least(event, count, since=since, timeout=timeout, **match)

    def mark(self) -> int:
        return self.proc.mark()

    def diagnostics(self) -> str:
        return self.proc.diagnostics()

    # -- trust and status

    def trust(self, *lines: str) -> None:
        """Add known_hosts lines (targets reached through the relay by name)."""
        with open(self.known_hosts, "a") as f:
            f.write("".join(line + "\n" for line in lines))

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.admin}/status.json", timeout=timeout) as r:
            result: dict[str, Any] = json.load(r)
            return result

    def metrics(self, timeout: float = 10.0) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=timeout) as r:
            return str(r.read().decode())

    # -- what it did on the network

    def connect_attempts(self) -> list[str]:
        """Audit lines for every connect()/getaddrinfo() the relay process made."""
        return [line for line in self.proc.stderr.lines if line.startswith("labrelay-audit ")]

    def listening_ports(self) -> set[int]:
        return {s.local[1] for s in tcp_sockets(self.pid) if s.state == "LISTEN"}

    def outbound_sockets(self) -> list[TcpSocket]:
        """TCP sockets of the relay that are not its listeners nor accepted from them."""
        sockets = tcp_sockets(self.pid)
        mine = {s.local[1] for s in sockets if s.state == "LISTEN"}
        return [s for s in sockets if s.state != "LISTEN" and s.local[1] not in mine]
