"""Process plumbing of the benchmarks: children that die with the harness, their output
lines, readiness, exits, ports, programs, git."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO, Any

from bench.sessions import LOOPBACK, REPO, START_TIMEOUT


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


PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
            "socat": "socat", "dbclient": "dropbear-bin", "plink": "putty-tools",
            "tinyproxy": "tinyproxy", "openssl": "openssl"}
"""The Debian package of each program a bench runs (``scripts/dev setup`` installs them)."""


def find_program(name: str) -> str:
    """The path of ``name``, or a BenchError that names the package to install."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        package = PACKAGES.get(name, name)
        raise BenchError(f"{name} not found; on Debian/Ubuntu: apt-get install {package} "
                         "(or run scripts/dev setup as root)")
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
