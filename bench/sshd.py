"""A private OpenSSH ``sshd`` on loopback with its keys, for the benchmarks that compare
with OpenSSH (and its client command lines)."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.meter import descendants, loadavg
from bench.procs import (
    BenchError,
    Children,
    Lines,
    find_program,
    free_port,
    git_commit,
    git_relay_changes,
    json_event,
    wait_ready,
)
from bench.sessions import LOOPBACK, REPO, START_TIMEOUT

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


def labrelay_argv(python: str, command: str, *args: str) -> list[str]:
    """``python -m relay COMMAND --log-format json ARGS...``."""
    return [python, "-m", "relay", command, "--log-format", "json", *args]


def on_event(name: str) -> Callable[[str], bool]:
    """A ``ready`` test for :meth:`SshdBench.start_labrelay`: a log line that is event
    ``name``."""
    return lambda line: (json_event(line) or {}).get("event") == name


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

    def start_labrelay(self, name: str, argv: list[str], ready: Callable[[str], Any],
                       what: str) -> tuple[subprocess.Popen[bytes], Lines, Any]:
        """A ``labrelay`` process (``argv`` from :func:`labrelay_argv`) logging JSON to
        its stdout: the process, its log, and the first truthy ``ready(line)`` of that
        log (a port, an event), within the start-up timeout.  One shape for every bench
        that starts a relay or an agent."""
        proc = self.children.start(name, argv, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        log = Lines(proc.stdout, f"{name}-stdout")
        return proc, log, wait_ready(name, proc, log, ready, what)

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
