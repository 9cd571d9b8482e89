"""Fixtures for the real-process tests: sshd instances, keys, agents, targets.

A plain module, not a conftest: ``tests/integration/conftest.py`` and
``tests/security/conftest.py`` both take its fixtures and hook with a star import, so a
test that patches a helper (``relay_command``) patches it here, where the fixtures
look it up.

Everything a fixture starts is torn down by it, also when the test fails.  When a
test fails, the events and stderr of every agent and the log of every sshd it used
are attached to the report as extra sections.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    AUDITED_LABRELAY,
    LOOPBACK,
    AgentProcess,
    CountingSource,
    DataStream,
    EchoServer,
    HarnessError,
    HashSink,
    KeyPair,
    LazyReader,
    ModeServer,
    RelayNode,
    Source,
    Sshd,
    SshProcess,
    TcpProxy,
    find_program,
    free_port,
    make_key,
    ssh_argv,
    unhandled_errors,
    write_known_hosts,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DIAGNOSTICS = pytest.StashKey[list[Any]]()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def openssh() -> None:
    """Skip when OpenSSH is missing on a developer machine; fail in CI."""
    missing = [p for p in ("sshd", "ssh", "ssh-keygen") if find_program(p) is None]
    if missing:
        reason = f"OpenSSH not installed ({', '.join(missing)} missing; `scripts/dev setup`)"
        if in_ci():
            pytest.fail(reason + " and CI=true")
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for obj in item.stash.get(DIAGNOSTICS, []):
            try:
                text = obj.diagnostics()
            except Exception as e:  # diagnostics must never hide the real failure
                text = f"(diagnostics failed: {e!r})"
            report.sections.append((f"{obj.__class__.__name__} {getattr(obj, 'name', '')}", text))
    return report


@pytest.fixture
def diagnostics(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    """Register an object whose ``diagnostics()`` goes into the report if the test fails."""
    registry = request.node.stash.setdefault(DIAGNOSTICS, [])

    def register(obj: Any) -> Any:
        registry.append(obj)
        return obj

    return register


@pytest.fixture(scope="session")
def client_key(openssh: None, tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The ed25519 key every agent and ssh client logs in with; authorized on every Sshd."""
    return make_key(tmp_path_factory.mktemp("client") / "id_ed25519", comment="labrelay-client")


@pytest.fixture
def sshd_factory(
    openssh: None,
    client_key: KeyPair,
    tmp_path: Path,
    diagnostics: Callable[[Any], Any],
) -> Iterator[Callable[[str], Sshd]]:
    """``sshd_factory(name)`` starts one more sshd (``SetEnv LABRELAY_TEST_HOST=name``)."""
    started: list[Sshd] = []

    def start(name: str) -> Sshd:
        sshd = Sshd(tmp_path / f"sshd-{name}", name, authorized=[client_key.public])
        started.append(sshd)
        diagnostics(sshd)
        return sshd.start()

    yield start
    for sshd in reversed(started):
        sshd.close()


@pytest.fixture
def sshd(sshd_factory: Callable[[str], Sshd]) -> Sshd:
    return sshd_factory("cloud")


@pytest.fixture
def known_hosts(tmp_path: Path) -> Callable[..., Path]:
    """``known_hosts(*lines, name=...)`` writes a known_hosts file and returns its path."""
    count = 0

    def write(*lines: str, name: str | None = None) -> Path:
        nonlocal count
        count += 1
        return write_known_hosts(tmp_path / (name or f"known_hosts.{count}"), *lines)

    return write


def agent_command(*args: str) -> list[str]:
    """``python -m relay agent --log-format json ARGS``."""
    return [sys.executable, "-m", "relay", "agent", "--log-format", "json", *args]


TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def twistd_command(*args: str) -> list[str]:
    """``twistd ARGS`` with this interpreter (``python -m twisted`` is ``twist``, not twistd)."""
    return [sys.executable, "-c", TWISTD, *args]


def child_env() -> dict[str, str]:
    """PYTHONPATH with the checkout root first, so ``twisted/plugins`` here is found."""
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), existing) if p)}


@pytest.fixture
def start_process(
    diagnostics: Callable[[Any], Any],
) -> Iterator[Callable[..., AgentProcess]]:
    """``start_process(argv, name=...)``: an AgentProcess for any JSON-logging command."""
    procs: list[AgentProcess] = []

    def start(argv: list[str], name: str = "agent", env: dict[str, str] | None = None) -> Any:
        proc = AgentProcess(argv, env={**child_env(), **(env or {})}, cwd=REPO_ROOT, name=name)
        procs.append(proc)
        diagnostics(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()
    unhandled = unhandled_errors(procs)
    if unhandled:
        pytest.fail("a labrelay process logged an unhandled error (a traceback at level "
                    f"critical): {unhandled}")


@pytest.fixture
def start_agent(
    start_process: Callable[..., AgentProcess],
) -> Callable[..., AgentProcess]:
    """``start_agent(*args, name=...)`` runs ``python -m relay agent --log-format json ARGS``."""

    def start(*args: str, name: str = "agent") -> AgentProcess:
        return start_process(agent_command(*args), name=name)

    return start


@pytest.fixture
def start_ssh(
    diagnostics: Callable[[Any], Any],
) -> Iterator[Callable[..., SshProcess]]:
    """``start_ssh(argv, name=...)`` runs a stock ssh client, stopped at teardown."""
    procs: list[SshProcess] = []

    def start(argv: list[str], name: str = "ssh") -> SshProcess:
        proc = SshProcess(argv, name=name)
        procs.append(proc)
        diagnostics(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


class Targets:
    """Creates threaded TCP targets and proxies; all closed at teardown."""

    def __init__(self) -> None:
        self._open: list[Any] = []

    def _keep(self, obj: Any) -> Any:
        self._open.append(obj)
        return obj

    def echo(self, greeting: bytes = b"") -> EchoServer:
        return self._keep(EchoServer(greeting))

    def mode(self) -> ModeServer:
        return self._keep(ModeServer())

    def sink(self, reply: bool = False) -> HashSink:
        return self._keep(HashSink(reply))

    def source(self, stream: DataStream) -> Source:
        return self._keep(Source(stream))

    def lazy_reader(self) -> LazyReader:
        return self._keep(LazyReader())

    def counting_source(self, stream: DataStream, stall_after: float = 2.0) -> CountingSource:
        return self._keep(CountingSource(stream, stall_after))

    def proxy(self, upstream: tuple[str, int]) -> TcpProxy:
        return self._keep(TcpProxy(upstream))

    def close(self) -> None:
        for obj in reversed(self._open):
            if isinstance(obj, LazyReader):
                obj.release.set()
            obj.close()


@pytest.fixture
def targets() -> Iterator[Targets]:
    t = Targets()
    yield t
    t.close()


@pytest.fixture
def ssh_command(client_key: KeyPair) -> Callable[..., list[str]]:
    """``ssh_command(port, known_hosts, *options, command=None)``: a stock ssh argv
    logging in with the client key."""

    def build(port: int, known_hosts: Path, *options: str, command: str | None = None) -> list[str]:
        return ssh_argv(port, client_key.path, known_hosts, *options, command=command)

    return build


def relay_command(*args: str) -> list[str]:
    """``labrelay relay --log-format json ARGS``, with outbound connects audited on stderr."""
    return [sys.executable, "-c", AUDITED_LABRELAY, "relay", "--log-format", "json", *args]


@pytest.fixture
def start_relay(
    start_process: Callable[..., AgentProcess], tmp_path: Path
) -> Callable[..., RelayNode]:
    """``start_relay(agents=[...], users=[...], relay_toml="", name="relay")``.

    Writes the agents and users grant files (authorized_keys lines; none with
    ``grant_files=False``: the ``[[relay.*]]`` tables in ``relay_toml`` grant) and a node config
    whose ``[relay]`` and ``[admin]`` listen on 127.0.0.1 port 0 (the ports are read
    back from the ``relay_listening`` and ``admin_listening`` events); ``relay_toml``
    is added to the ``[relay]`` table, ``admin_toml`` to ``[admin]`` (``listen``
    replaces the SSH port's address: ``"[::]:0"`` for a dual-stack one) (keys, then
    ``[[relay.user]]``/``[[relay.agent]]`` tables).  Returns once it listens.
    """
    count = 0

    def start(
        agents: list[str] | None = None,
        users: list[str] | None = None,
        relay_toml: str = "",
        name: str = "relay",
        grant_files: bool = True,
        wrap: list[str] | None = None,
        listen: str = "127.0.0.1:0",
        admin_toml: str = "",
    ) -> RelayNode:
        nonlocal count
        count += 1
        directory = tmp_path / f"{name}-{count}"
        directory.mkdir()
        files = ""
        if grant_files:  # else: grants from [[relay.agent]]/[[relay.user]] tables only
            (directory / "agents").write_text("".join(line + "\n" for line in agents or []))
            (directory / "users").write_text("".join(line + "\n" for line in users or []))
            files = 'agents_file = "agents"\nusers_file = "users"\n'
        config = directory / "node.toml"
        config.write_text(
            f"""\
[admin]
listen = "127.0.0.1:0"
{admin_toml}
[relay]
listen = "{listen}"
state_dir = "{directory / "state"}"
{files}{relay_toml}
"""
        )
        proc = start_process([*(wrap or []), *relay_command("--config", str(config))],
                             name=name)
        return RelayNode(proc, directory, admin_port(proc))

    return start


def permissions_apply() -> list[str]:
    """A command prefix under which a ``chmod 000`` file cannot be read, as it cannot by
    a relay that runs as its own user: the tests run as root (CI too), whom file modes
    do not stop.  For root, ``setpriv`` (util-linux) drops ``CAP_DAC_OVERRIDE`` and
    ``CAP_DAC_READ_SEARCH`` from the bounding set, so the process keeps uid 0 and its
    access to the test's root-owned directories but ``open()`` meets the file's mode
    and fails with ``EACCES``, the error an unprivileged relay gets.  Nothing for
    anyone else; skips if setpriv is missing."""
    if os.geteuid() != 0:
        return []
    setpriv = find_program("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed: root reads a chmod 000 file")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    tried = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if tried.returncode != 0:  # no CAP_SETPCAP (a restricted container)
        pytest.skip(f"setpriv cannot drop capabilities here: {tried.stderr.strip()}")
    return prefix


# --- what several real-process tests do the same way ------------------------------------


def admin_port(proc: AgentProcess, timeout: float = 20.0) -> int:
    """The port a labrelay process's admin endpoint bound (``--admin 127.0.0.1:0`` or
    ``listen = "127.0.0.1:0"``), from its ``admin_listening`` event."""
    return int(proc.wait_for("admin_listening", timeout=timeout, since=0, advance=False)["port"])


def admin_status(port: int, host: str = LOOPBACK) -> dict[str, Any]:
    """``/status.json`` of a labrelay admin endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}/status.json", timeout=10) as r:
        return dict(json.load(r))


def burst_windows(first: float, last: float, window: float = 10.0) -> int:
    """How many log windows (relay.core.burstlog: the first event of a burst at once,
    a count line when its ``window`` seconds end) a burst from ``first`` to ``last``
    (wall-clock seconds, as the relay's log ``time``) can have opened: one, unless a
    slow box stretched it past a window.  A test that asserts the lines a burst costs
    asserts them per window, so that the pace of its own loop cannot cross the bound."""
    return 1 + int(max(0.0, last - first) // window)


def burst_total(lines: list[dict[str, Any]]) -> int:
    """How many events a burst's log lines stand for: one per line logged as it came,
    plus each count line's ``count`` (relay.core.burstlog).  A test awaits this total
    (``wait_until``) before it counts the lines: a loop stretched past a window by a
    loaded box ends with a count line later than the first."""
    return sum(1 for e in lines if "count" not in e) + sum(int(e.get("count", 0))
                                                            for e in lines)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``cond`` (a remote process's counters, read from its status endpoint, have
    no event to await) until it holds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def connect_argv(relay: RelayNode, user: str, key: KeyPair, service: str,
                 *extra: str) -> list[str]:
    """``labrelay connect`` as ``user`` (logging in with ``key``) to ``service`` through
    ``relay``, trusting the relay's host key."""
    return [sys.executable, "-m", "relay", "connect", "-p", str(relay.port),
            "-i", str(key.path), "-o", f"UserKnownHostsFile={relay.known_hosts}",
            *extra, f"{user}@{LOOPBACK}", service]


def ssh_defaults(known_hosts: Path, connect_timeout: int = 20, *,
                 identities_only: bool = True) -> str:
    """The ``Host *`` block every test's ssh_config ends with: batch mode, only the
    relay's ``known_hosts``, strict host key checking, no host key updates."""
    only = "  IdentitiesOnly yes\n" if identities_only else ""
    return (f"Host *\n{only}  BatchMode yes\n  UserKnownHostsFile {known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
            f"  UpdateHostKeys no\n  ConnectTimeout {connect_timeout}\n")


def jump_config(path: Path, relay: RelayNode, user_key: KeyPair, target_key: KeyPair,
                connect_timeout: int = 10) -> Path:
    """An ssh_config for ``ssh -J alice@127.0.0.1:PORT root@gpu-cluster`` (and scp):
    ``target_key`` logs in to gpu-cluster, ``user_key`` to the relay."""
    path.write_text(f"Host gpu-cluster\n  User root\n  IdentityFile {target_key.path}\n"
                    f"Host {LOOPBACK}\n  IdentityFile {user_key.path}\n"
                    + ssh_defaults(relay.known_hosts, connect_timeout))
    return path


def user_ssh_config(path: Path, relay: RelayNode, client_key: KeyPair, user: str,
                    user_key: KeyPair, connect_err: Path, connect_timeout: int = 20) -> Path:
    """A user's ssh_config for the service gpu-cluster (a target sshd that trusts
    ``client_key``), two ways: ``gpu-cluster`` by the fast path (``labrelay connect`` as
    ProxyCommand, its stderr appended to ``connect_err``: on the fast path it says
    nothing), ``gpu-jump`` by ``-J user@relay`` (an SSH channel).  ``-J`` to the relay
    by hand (``ssh -J user@127.0.0.1:PORT gpu-cluster``) uses ``user_key`` too.
    ``connect_timeout`` (ssh's ConnectTimeout) bounds, with a ProxyCommand, everything
    up to the target's banner: the command's own start-up and login included."""
    connect = connect_argv(relay, user, user_key, "%h:%p")
    proxy = f"sh -c 'exec {' '.join(connect)} 2>>{connect_err}'"
    path.write_text(f"""\
Host gpu-cluster
  User root
  IdentityFile {client_key.path}
  ProxyCommand {proxy}
Host gpu-jump
  HostName gpu-cluster
  HostKeyAlias gpu-cluster
  User root
  IdentityFile {client_key.path}
  ProxyJump {user}@{LOOPBACK}:{relay.port}
Host {LOOPBACK}
  IdentityFile {user_key.path}
""" + ssh_defaults(relay.known_hosts, connect_timeout))
    return path


@contextlib.contextmanager
def running_ssh_agent(sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """OpenSSH's ``ssh-agent -D -a sock``, once its socket is there (it prints nothing
    to await: it binds, then serves); terminated on the way out."""
    agent_bin = find_program("ssh-agent")
    assert agent_bin, "OpenSSH's ssh-agent is needed"
    agent = subprocess.Popen([agent_bin, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and agent.poll() is None, "ssh-agent did not start"
            time.sleep(0.02)
        yield agent
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def stock_local_forward(start_ssh: Callable[..., SshProcess], argv: Callable[[int], list[str]],
                        name: str = "ssh-L", attempts: int = 5) -> tuple[SshProcess, int]:
    """A stock ``ssh -v -N -o ExitOnForwardFailure=yes -L 127.0.0.1:PORT:...`` (``argv(PORT)``),
    once its listener is up: ``(process, PORT)``.

    OpenSSH refuses a local forward on port 0, so PORT is one that was free a moment
    ago; if another process took it first, ssh fails to bind and exits, and the next
    attempt takes another port."""
    for _ in range(attempts):
        port = free_port()
        proc = start_ssh(argv(port), name=name)
        try:
            # ssh logs "Local forwarding listening" before bind(); the channel comes
            # after listen().
            proc.wait_stderr(rf"Local forwarding listening on 127\.0\.0\.1 port {port}\b")
            proc.wait_stderr(r"new port-listener")
            return proc, port
        except HarnessError:
            if "Address already in use" not in proc.stderr_text():
                raise
            proc.stop()
    raise HarnessError(f"{name}: no free port for ssh -L in {attempts} attempts")
