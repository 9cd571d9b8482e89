"""Real processes on the topology's hosts, built on the loopback harness.

``tests/integration/harness.py`` runs everything on 127.0.0.1; here the same pieces
run inside a host's namespace (``ip netns exec NS argv``, which execs ``argv`` so the
PID is the program's own) and listen on that host's address:

``NsSshd``       a real OpenSSH sshd on a host (``SetEnv LABRELAY_TEST_HOST=<host>``).
``NsRelay``      ``labrelay relay`` (audited: every outbound connect() it makes is
                 logged on its stderr) with its status read inside its namespace.
``LanServer``    the harness's ``ModeServer`` (echo / upload / download by the first
                 byte) listening on a host's address.
``Site``         the whole seed set-up, with the keys, configs and ssh_config files of
                 the users on mac; every test starts the parts it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    AUDITED_LABRELAY,
    SSHD_CONFIG,
    AgentProcess,
    DataStream,
    HarnessError,
    KeyPair,
    ModeServer,
    RelayNode,
    Sshd,
    SshProcess,
    find_program,
    make_key,
    recv_exactly,
    unhandled_errors,
)
from topology import ADDR, Topology

REPO_ROOT = Path(__file__).resolve().parents[2]
INTEGRATION = REPO_ROOT / "tests" / "integration"
MiB = 1024 * 1024

GPU, LAB, CLOUD, MAC = ADDR["gpu_cluster"], ADDR["lab_pc"], ADDR["cloud"], ADDR["mac"]
RELAY_PORT = 2222  # the labrelay relay's SSH port on cloud
PUBLIC_PORT = 2201  # the seed's <port_on_server>: a public port that reaches gpu_cluster:22
DATA_PORT = 9000  # a plain TCP service on gpu_cluster (the harness's ModeServer)
DATA_PUBLIC_PORT = 2202  # a public port that reaches the data service
ECHO_PORT = 7  # an echo service on gpu_cluster (registered only where a test asks for it)
LAB_RELAY_PORT = 2222  # the chain: a relay on lab_pc for gpu_cluster's own agent


def child_env() -> dict[str, str]:
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), existing) if p)}


def labrelay_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", *args]


def audited_relay_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", AUDITED_LABRELAY, *args]


# ---------------------------------------------------------------------------
# sshd on a host


class NsSshd(Sshd):
    """``Sshd`` inside a namespace, listening on ``address:22``.

    ``extra`` is appended to the harness's sshd_config; the log shows each session start
    (``Starting session: subsystem 'sftp'`` for scp).
    """

    def __init__(self, topo: Topology, host: str, directory: Path, authorized: list[str],
                 address: str, extra: str = "") -> None:
        self.topo = topo
        self.host = host
        self.address = address
        self.extra = extra
        super().__init__(directory, host, authorized)

    def start(self, attempts: int = 1) -> NsSshd:
        if not self._run(22):
            raise HarnessError(f"sshd {self.name}: could not bind {self.address}:22")
        return self

    def _run(self, port: int) -> bool:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = port
        config = SSHD_CONFIG.format(port=port, dir=self.dir, name=self.name)
        config = config.replace("ListenAddress 127.0.0.1", f"ListenAddress {self.address}")
        self.config_path.write_text(config + self.extra)
        since = self.log.mark()
        self.log.append(f"=== e2e: starting sshd {self.name} on {self.address}:{port} ===")
        self.proc = subprocess.Popen(
            self.topo.argv(self.host, self._binary or "sshd", "-D", "-e", "-f", self.config_path),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        self.log.attach(self.proc.stderr, name=f"sshd-{self.name}-log")
        self.log.wait_for(rf"Server listening on {re.escape(self.address)} port {port}\b",
                          self.START_TIMEOUT, since=since, what=f"sshd {self.name}")
        return True

    def connections_from(self, address: str, since: int = 0) -> int:
        pattern = re.compile(rf"Connection from {re.escape(address)} port \d+ ")
        return sum(1 for line in self.log.lines[since:] if pattern.search(line))

    def connections(self, since: int = 0) -> int:
        return sum(1 for line in self.log.lines[since:] if "Connection from " in line)


# ---------------------------------------------------------------------------
# a plain TCP service on a host


@dataclass(frozen=True)
class UploadEnd:
    nbytes: int
    sha256: str
    ended: str  # "eof" (a clean FIN), "reset" or "error: ..."


class LanServer(ModeServer):
    """The harness's ModeServer, listening on ``address:port`` inside ``host``.

    (``TcpServer`` binds 127.0.0.1 port 0; this sets up the same state around a
    socket made in the host's namespace.)
    """

    kind = "lan"

    def __init__(self, topo: Topology, host: str, address: str, port: int,
                 echo: bool = False) -> None:
        self.echo = echo  # a plain echo service instead
        self.results: queue.Queue[Any] = queue.Queue()
        self.uploads: queue.Queue[UploadEnd] = queue.Queue()
        with topo.inside(host):
            self.sock = socket.create_server((address, port), backlog=512)
        self.port = port
        self.address = (address, port)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._accept_loop, name=f"lan-{port}",
                                        daemon=True)
        self._thread.start()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(300)
        if self.echo:
            while data := conn.recv(256 * 1024):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return
        if conn.recv(1, socket.MSG_PEEK) != b"U":
            super().handle(conn)
            return
        # Uploads: record how the stream ended too (ModeServer only records clean ends).
        recv_exactly(conn, 1)
        h = hashlib.sha256()
        n = 0
        ended = "eof"
        try:
            while data := conn.recv(256 * 1024):
                h.update(data)
                n += len(data)
        except ConnectionResetError:
            ended = "reset"
        except OSError as e:
            ended = f"error: {e}"
        self.uploads.put(UploadEnd(n, h.hexdigest(), ended))
        if ended == "eof":
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------
# the labrelay relay on a host


class NsRelay(RelayNode):
    """``RelayNode`` for a relay inside a namespace: known_hosts names its address,
    status is read from inside the namespace (its admin port is on that loopback)."""

    def __init__(self, proc: AgentProcess, directory: Path, admin_port: int,
                 topo: Topology, host: str, address: str) -> None:
        self.topo = topo
        self.host = host
        self.address = address
        super().__init__(proc, directory, admin_port)
        self.known_hosts.write_text(self.known_hosts_line() + "\n")

    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {self.host_key_blob}"

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        with self.topo.inside(self.host):
            opener = urllib.request.urlopen(f"http://{self.admin}/status.json", timeout=timeout)
        with opener as r:
            result: dict[str, Any] = json.load(r)
            return result


def relay_toml(address: str, port: int, state: Path, agents: list[tuple[str, KeyPair, list[str],
               list[int]]], users: list[tuple[str, KeyPair, list[str]]], extra: str = "",
               admin_port: int = 7022, user_settings: dict[str, str] | None = None) -> str:
    def strings(xs: list[str]) -> str:
        return ", ".join(f'"{x}"' for x in xs)

    text = (f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n\n'
            f'[relay]\nlisten = "{address}:{port}"\nstate_dir = "{state}"\n'
            f'public_bind = "{address}"\n{extra}\n')
    for name, key, services, ports in agents:
        text += (f'\n[[relay.agent]]\nname = "{name}"\nkeys = ["{key.public}"]\n'
                 f"services = [{strings(services)}]\npublic_ports = {ports}\n")
    for name, key, services in users:
        text += (f'\n[[relay.user]]\nname = "{name}"\nkeys = ["{key.public}"]\n'
                 f"services = [{strings(services)}]\n")
        if user_settings and name in user_settings:
            text += user_settings[name] + "\n"
    return text


# ---------------------------------------------------------------------------
# the whole site


@dataclass(frozen=True)
class Keys:
    lab_pc: KeyPair  # the agent on lab_pc
    gpu_agent: KeyPair  # gpu_cluster's own agent (the chain)
    alice: KeyPair  # gpu-cluster:22 and data:9000
    bob: KeyPair  # gpu-cluster:22
    carol: KeyPair  # data:9000
    eve: KeyPair  # data:9000 (the abuser)
    stranger: KeyPair  # known to nobody


def make_keys(directory: Path) -> Keys:
    return Keys(**{n: make_key(directory / n, comment=n) for n in Keys.__dataclass_fields__})


USER_GRANTS = {
    "alice": ["gpu-cluster:22", "data:9000"],
    "bob": ["gpu-cluster:22"],
    "carol": ["data:9000"],
    "eve": ["data:9000", f"echo:{ECHO_PORT}"],
}

# What a user configures the way a user would; short keepalives so that five trials of
# each fault fit in the suite's time budget (a user would keep 15 s x 3).
# The bad-input scenarios abuse the relay from mac, where alice's and carol's sessions
# also come from: mac is exempt from penalties and its per-source share is the global
# cap, so those scenarios keep testing what they were written for (the global cap,
# login_grace).  Per-source limits and penalties are tests/security/test_admission.py.
RELAY_SETTINGS = f"""\
login_grace = 3
max_auth_tries = 3
max_unauthenticated = 32
per_source_max_unauthenticated = 32
penalty_exempt = ["{MAC}"]
keepalive_interval = 1
keepalive_count = 3
public_wait = 5
data_port = 2223
e2e_services = ["gpu-cluster:22"]
"""
RELAY_DATA_PORT = 2223
KEEPALIVE = (1.0, 3)  # interval, count: dead after interval x (count + 1) = 4 s of silence
BACKOFF = (0.5, 2.0)  # initial, max (jitter 0.2, labrelay's default)


class Site:
    """Keys, configs and processes of one scenario on the topology.

    Everything started through it is stopped by ``close()`` (the ``site`` fixture).
    """

    def __init__(self, topo: Topology, keys: Keys, directory: Path,
                 register: Callable[[Any], Any]) -> None:
        self.topo = topo
        self.keys = keys
        self.dir = directory
        self._register = register
        self._procs: list[Any] = []
        self._servers: list[LanServer] = []
        self._sshds: list[NsSshd] = []
        self._configs: dict[tuple[str, str], Path] = {}
        self._lock = threading.Lock()
        self.unhandled: list[tuple[str, dict[str, Any]]] = []  # set by close()
        self.gpu: NsSshd | None = None
        self.relay: NsRelay | None = None
        self.data: LanServer | None = None
        self.echo: LanServer | None = None
        self.ssh_bin = find_program("ssh") or "ssh"
        self.scp_bin = find_program("scp") or "scp"
        gpu_ns = os.stat(f"/run/netns/{topo.ns('gpu_cluster')}").st_ino
        self.gpu_netns = f"net:[{gpu_ns}]"

    # -- processes

    def process(self, host: str, argv: list[str], name: str) -> AgentProcess:
        proc = AgentProcess(self.topo.argv(host, *argv), env=child_env(), cwd=REPO_ROOT,
                            name=name)
        self._procs.append(proc)
        self._register(proc)
        return proc

    def ssh_process(self, argv: list[str], name: str, host: str = "mac") -> SshProcess:
        proc = SshProcess(self.topo.argv(host, *argv), name=name)
        self._procs.append(proc)
        self._register(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop(5)
        self.unhandled = unhandled_errors(self._procs)
        for server in self._servers:
            server.close()
        for sshd in self._sshds:
            sshd.close()

    # -- gpu_cluster

    def start_gpu(self, data: bool = True, echo: bool = False) -> NsSshd:
        """gpu_cluster's sshd (alice and bob may log in as root), its data service and,
        with ``echo``, an echo service on port 7."""
        k = self.keys
        self.gpu = self.start_sshd("gpu_cluster", GPU, [k.alice.public, k.bob.public])
        if data:
            self.data = LanServer(self.topo, "gpu_cluster", GPU, DATA_PORT)
            self._servers.append(self.data)
        if echo:
            self.echo = LanServer(self.topo, "gpu_cluster", GPU, ECHO_PORT, echo=True)
            self._servers.append(self.echo)
        return self.gpu

    def start_sshd(self, host: str, address: str, authorized: list[str]) -> NsSshd:
        """A real OpenSSH sshd on ``host``, listening on ``address:22``."""
        sshd = NsSshd(self.topo, host, self.dir / f"sshd-{host}", authorized, address)
        self._sshds.append(sshd)
        self._register(sshd)
        return sshd.start()

    def marker_command(self) -> str:
        """Prints what only gpu_cluster's sshd can: its SetEnv and its namespace."""
        return 'echo "$LABRELAY_TEST_HOST $(readlink /proc/self/ns/net)"'

    def expected_marker(self) -> str:
        return f"gpu_cluster {self.gpu_netns}"

    # -- cloud: the labrelay relay

    def start_relay(self, extra: str = "", name: str = "relay",
                    user_settings: dict[str, str] | None = None,
                    user_services: dict[str, list[str]] | None = None,
                    e2e_services: list[str] | None = None) -> NsRelay:
        """The relay on cloud; ``user_settings`` adds lines to a user's ``[[relay.user]]``
        table (``{"alice": "share = 2"}``), ``user_services`` replaces a user's grants,
        ``e2e_services`` the services declared end-to-end (``gpu-cluster:22``)."""
        grants = {**USER_GRANTS, **(user_services or {})}
        settings = RELAY_SETTINGS
        if e2e_services is not None:
            listed = ", ".join(f'"{s}"' for s in e2e_services)
            settings = settings.replace('e2e_services = ["gpu-cluster:22"]',
                                        f"e2e_services = [{listed}]")
        k = self.keys
        directory = self.dir / "relay"
        directory.mkdir(exist_ok=True)
        config = directory / "relay.toml"
        config.write_text(relay_toml(
            CLOUD, RELAY_PORT, directory / "state",
            [("lab_pc", k.lab_pc, ["gpu-cluster:22", "data:9000", f"echo:{ECHO_PORT}"],
              [PUBLIC_PORT, DATA_PUBLIC_PORT])],
            [(u, getattr(k, u), s) for u, s in grants.items()],
            extra=settings + extra, user_settings=user_settings,
        ))
        proc = self.process("cloud", audited_relay_argv("relay", "--log-format", "json",
                                                        "--config", str(config)), name=name)
        self.relay = NsRelay(proc, directory, 7022, self.topo, "cloud", CLOUD)
        return self.relay

    def restart_relay(self) -> NsRelay:
        """The same relay again (same config, state and host key) after it died."""
        assert self.relay is not None
        config = self.relay.dir / "relay.toml"
        proc = self.process("cloud", audited_relay_argv("relay", "--log-format", "json",
                                                        "--config", str(config)),
                            name="relay-restarted")
        self.relay = NsRelay(proc, self.relay.dir, 7022, self.topo, "cloud", CLOUD)
        return self.relay

    # -- lab_pc: the agent

    def agent_argv(self, port: int, known_hosts: Path, *forwards: str,
                   server: str = CLOUD, user: str = "lab_pc",
                   key: KeyPair | None = None,
                   keepalive: tuple[float, int] = KEEPALIVE) -> list[str]:
        interval, count = keepalive
        initial, most = BACKOFF
        rs = [a for f in forwards for a in ("-R", f)]
        return labrelay_argv(
            "agent", "--log-format", "json",
            "-p", str(port), "-i", str((key or self.keys.lab_pc).path),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", f"ServerAliveInterval={interval:g}", "-o", f"ServerAliveCountMax={count}",
            "-o", "ConnectTimeout=3",
            "--backoff-initial", str(initial), "--backoff-max", str(most),
            *rs, f"{user}@{server}",
        )  # fmt: skip

    def start_agent(self, *extra: str, name: str = "agent",
                    keepalive: tuple[float, int] = KEEPALIVE) -> AgentProcess:
        """lab_pc's agent against the relay: gpu-cluster:22 and data:9000 by name, public
        ports 2201 (gpu_cluster's sshd) and 2202 (the data service); ``extra`` -R specs;
        ``keepalive`` (ServerAliveInterval, ServerAliveCountMax), short by default so the
        fault scenarios see a dead link within seconds."""
        assert self.relay is not None
        argv = self.agent_argv(
            RELAY_PORT, self.relay.known_hosts,
            f"gpu-cluster:22:{GPU}:22", f"data:{DATA_PORT}:{GPU}:{DATA_PORT}",
            f"{PUBLIC_PORT}:{GPU}:22", f"{DATA_PUBLIC_PORT}:{GPU}:{DATA_PORT}", *extra,
            keepalive=keepalive,
        )
        return self.process("lab_pc", argv, name=name)

    def wait_agent_ready(self, agent: AgentProcess, since: int = 0,
                         timeout: float = 20.0) -> None:
        for bind, port in (("gpu-cluster", 22), ("data", DATA_PORT), ("localhost", PUBLIC_PORT),
                           ("localhost", DATA_PUBLIC_PORT)):
            agent.wait_for("forward_ready", timeout=timeout, since=since, kind="remote",
                           bind=bind, port=port)

    # -- mac: users

    def user_config(self, user: str, relay: NsRelay | None = None) -> Path:
        """``~/.ssh/config`` of ``user`` on mac: ``cloud`` (the relay), ``gpu-cluster``
        (through it by name) and ``gpu-public`` (public port 2201)."""
        relay = relay or self.relay
        assert relay is not None and self.gpu is not None
        path = self.dir / f"ssh_config.{user}"
        cache_key = (user, relay.known_hosts_line())
        with self._lock:
            if self._configs.get(cache_key) == path:
                return path
            self._configs[cache_key] = path
            self._write_user_config(user, relay, path)
        return path

    def _write_user_config(self, user: str, relay: NsRelay, path: Path) -> None:
        assert self.gpu is not None
        key: KeyPair = getattr(self.keys, user)
        known = self.dir / f"known_hosts.{user}"
        known.write_text(relay.known_hosts_line() + "\n"
                         + f"gpu-cluster {self.gpu.host_key.public_blob()}\n")
        path.write_text(f"""\
Host cloud
  HostName {CLOUD}
  Port {relay.port}
  User {user}
Host gpu-cluster
  ProxyJump cloud
  User root
Host gpu-public
  HostName {CLOUD}
  Port {PUBLIC_PORT}
  HostKeyAlias gpu-cluster
  User root
Host *
  IdentityFile {key.path}
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {known}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  ConnectTimeout 10
  LogLevel ERROR
""")

    def mac_run(self, argv: list[str], timeout: float = 60.0,
                input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.topo.argv("mac", *argv), capture_output=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def ssh_cmd(self, user: str, alias: str, command: str, timeout: float = 60.0,
                config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """Stock ``ssh -F ~user/.ssh/config ALIAS COMMAND`` on mac."""
        cfg = config or self.user_config(user)
        return self.mac_run([self.ssh_bin, "-F", str(cfg), alias, command], timeout=timeout)

    def assert_marker(self, user: str, alias: str, config: Path | None = None) -> None:
        out = self.ssh_cmd(user, alias, self.marker_command(), config=config)
        assert out.returncode == 0, (alias, out.stderr.decode(errors="replace"))
        assert out.stdout.decode().strip() == self.expected_marker(), (alias, out.stdout)

    def scp(self, user: str, src: str, dst: str, timeout: float = 300.0,
            config: Path | None = None) -> tuple[subprocess.CompletedProcess[bytes], float]:
        """Stock ``scp -F ~user/.ssh/config SRC DST`` on mac; (result, seconds)."""
        cfg = config or self.user_config(user)
        started = time.monotonic()
        out = self.mac_run([self.scp_bin, "-q", "-F", str(cfg), src, dst], timeout=timeout)
        return out, time.monotonic() - started

    def local_forward(self, user: str, service: str, port: int) -> SshProcess:
        """``ssh -N -L 127.0.0.1:PORT:SERVICE cloud`` on mac; returns once it listens."""
        cfg = self.user_config(user)
        proc = self.ssh_process(
            [self.ssh_bin, "-F", str(cfg), "-v", "-N", "-o", "ExitOnForwardFailure=yes",
             "-o", "LogLevel=VERBOSE", "-L", f"127.0.0.1:{port}:{service}", "cloud"],
            name=f"ssh-L-{user}-{service}")
        proc.wait_stderr(r"Entering interactive session")
        return proc

    @contextlib.contextmanager
    def mac_socket(self, port: int, host: str = "127.0.0.1",
                   timeout: float = 30.0) -> Iterator[socket.socket]:
        with self.topo.inside("mac"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield sock
        finally:
            sock.close()

    def write_file(self, name: str, stream: DataStream) -> Path:
        path = self.dir / name
        with open(path, "wb") as f:
            for chunk in stream.chunks():
                f.write(chunk)
        return path


def file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


@dataclass
class Download:
    """A raw TCP download of ``DataStream(seed, size)`` from the data service."""

    expected: int
    received: int = 0
    sha256: str = ""
    ended: str = ""  # "eof" (a clean FIN), "reset", "timeout", "error: ..."

    @property
    def complete(self) -> bool:
        return self.received == self.expected


def download(sock: socket.socket, stream: DataStream, progress: threading.Event | None = None,
             threshold: int = MiB) -> Download:
    """Ask a ModeServer for ``stream`` and read until the connection ends; classify the end."""
    result = Download(stream.size)
    h = hashlib.sha256()
    try:
        sock.sendall(b"D" + stream.seed.to_bytes(8) + stream.size.to_bytes(8))
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                result.ended = "eof"
                break
            h.update(data)
            result.received += len(data)
            if progress is not None and result.received >= threshold:
                progress.set()
    except ConnectionResetError:
        result.ended = "reset"
    except TimeoutError:
        result.ended = "timeout"
    except OSError as e:
        result.ended = f"error: {e}"
    result.sha256 = h.hexdigest()
    return result


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else 0.0

