"""Mixed versions: this relay with the previous agent, the previous relay with this agent.

A shared relay serves agents in several labs, upgraded by different people at different
times, so each side must work with the other's previous version; labrelay's wire
extensions (``...@labrelay``, docs/relay.md) are each meant to degrade to what the older
peer knows.  There is no release yet, so "the previous version" is the last commit of
the previous round, ``PREVIOUS`` (round 12's head): its tree is extracted with
``git archive`` from the repository these tests run in, and its processes run its own
Python code only (``python -P`` with ``PYTHONPATH`` = that tree, from no directory on
the path).  They run with ``LABRELAY_DATAPATH=python``: the extracted tree has no built
native module (building one costs far more than this test, and csrc/ is the same at
both commits, so the native path's wire bytes are this tree's, tested elsewhere); the
previous relay's pooled route then runs its Python data path.

In each pairing: the agent registers an end-to-end service (gpu-cluster:22, a real
sshd) and a plain one (web:8080, an echo server); a stock OpenSSH user moves 4 MiB
each way by ``ssh -J`` to gpu-cluster (on the pooled data route: both sides have
data-pool-v2) and 4 MiB through ``ssh -L`` to web (on the link), checksummed, and a
user's ``labrelay connect`` of the agent's version reaches gpu-cluster on the fast path
(data-token-v2); the agent's link is cut (reset at both ends) with a session open on
it, and the session resumes (resume@labrelay, forwarded-resumable@labrelay); then
what this round added behaves as the older side allows:

* ``request-refused@labrelay`` (a refused forward's reason): only when both are new;
  with an older peer the agent says the generic reason, and the old agent ignores the
  relay's note without a word (it is a global request that wants no reply);
* the keys-refused back-off (at least 10 s before the next attempt after the relay
  refused every key) is the agent's own: this agent keeps it against the previous
  relay; the previous agent retries on its plain backoff against this relay;
* ``max_connections_per_user`` is this relay's: the previous agent past the cap is
  told why and carries on with its other connection; the previous relay refuses to
  start with that key in its config (a downgrade must remove it).

The relay shows which version the agent runs (docs/operations.md, "Which version each
agent runs"): this relay shows the previous agent's as ``unknown (before 0.2.0.dev0)``,
the previous relay shows none.  The previous version has the TLS transport, so both
mixed pairings also run with the agent's link over TLS (port 443's transport), where
stock ssh reaches the relay through ``openssl s_client``.

Nothing is logged at level critical, and no traceback, by either side.  A control
pairing (this version on both sides) runs the same steps, so each degraded answer is
shown to differ from the full one.  Last, the relay upgraded in place and rolled back
(same config, port and state_dir) under a connected previous agent.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import (
    AUDITED_LABRELAY,
    LOOPBACK,
    AgentProcess,
    DataStream,
    KeyPair,
    MiB,
    RelayNode,
    Sshd,
    SshProcess,
    TcpProxy,
    connect,
    echo_roundtrip,
    find_program,
    free_port,
    known_hosts_line,
    make_key,
    recv_exactly,
    write_known_hosts,
)
from prometheus_client.parser import text_string_to_metric_families
from relay_fixtures import (
    admin_port,
    admin_status,
    connect_argv,
    ssh_defaults,
    stock_local_forward,
    wait_until,
)
from tlscerts import CA, RELAY_NAME

from relay import __version__
from relay.ssh.peersoftware import FIRST_SENT
from relay.user.sshconfig import tls_proxy_command

pytestmark = pytest.mark.integration

PREVIOUS = "4a17b4f"  # round 12's head: the last commit of the previous round
POOL = 2
SIZE = 4 * MiB
GENERIC_REFUSAL = "refused by the server (port in use or not permitted)"
KEYS_REFUSED_RETRY = 10.0  # relay.agent.link.KEYS_REFUSED_RETRY (this agent's floor)
OLD_AGENT = f"unknown (before {FIRST_SENT})"  # how this relay shows the previous agent


# --- the previous version's tree ---------------------------------------------------------


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([shutil.which("git") or "git", "-C", str(repo), *args],
                          capture_output=True, timeout=60)


def why_missing(repo: Path, commit: str) -> str | None:
    """Why ``commit`` cannot be extracted from ``repo``, with how to get it; None if it
    can."""
    if shutil.which("git") is None:
        return f"git is not installed: it extracts the previous version ({commit})"
    if _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}").returncode == 0:
        return None
    shallow = _git(repo, "rev-parse", "--is-shallow-repository").stdout.decode().strip()
    where = ("this is a shallow clone: run `git fetch --unshallow` (or clone without "
             "--depth)" if shallow == "true" else
             f"{repo} is not a git checkout with that commit (an sdist or an export?): "
             "run the tests from a full `git clone` of labrelay")
    return (f"the mixed-version tests need commit {commit} (the previous version) in the "
            f"repository's history: {where}")


@pytest.fixture(scope="session")
def previous_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous version's ``relay`` package, extracted from this repository's history.

    Fails (never skips) without that history: a shallow clone or an sdist would
    otherwise pass without testing anything."""
    why = why_missing(REPO_ROOT, PREVIOUS)
    if why is not None:
        pytest.fail(why)
    archive = _git(REPO_ROOT, "archive", "--format=tar", PREVIOUS, "relay")
    assert archive.returncode == 0, archive.stderr.decode()
    tree = tmp_path_factory.mktemp(f"labrelay-{PREVIOUS}")
    # tar(1), as git archive's users do (tarfile's extraction filter needs 3.11.4+)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    # Its processes must import its code, not this checkout's (an editable install, the
    # current directory): checked once, the way they are started.
    where = subprocess.run([sys.executable, "-P", "-c", "import relay; print(relay.__file__)"],
                           capture_output=True, env={**os.environ, **previous_env(tree)},
                           cwd=REPO_ROOT, timeout=60)
    assert where.stdout.decode().strip() == str(tree / "relay" / "__init__.py"), where
    return tree


def previous_env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree), "LABRELAY_DATAPATH": "python"}


def agent_argv(previous: bool, *args: str) -> list[str]:
    """``labrelay agent`` of this version, or (``-P``: no current directory on the
    path) of the previous one."""
    return [sys.executable, *(["-P"] if previous else []), "-m", "relay", "agent",
            "--log-format", "json", *args]


def relay_argv(previous: bool, config: Path) -> list[str]:
    return [sys.executable, *(["-P"] if previous else []), "-c", AUDITED_LABRELAY, "relay",
            "--log-format", "json", "--config", str(config)]


def write_relay_dir(directory: Path, agents: list[str], users: list[str],
                    relay_toml: str, listen: str = "127.0.0.1:0") -> Path:
    """A relay's directory as ``start_relay`` writes it, with keys both versions know."""
    directory.mkdir()
    (directory / "agents").write_text("".join(line + "\n" for line in agents))
    (directory / "users").write_text("".join(line + "\n" for line in users))
    config = directory / "node.toml"
    config.write_text(f"""\
[admin]
listen = "127.0.0.1:0"

[relay]
listen = "{listen}"
state_dir = "{directory / "state"}"
agents_file = "agents"
users_file = "users"
{relay_toml}""")
    return config


# --- one pairing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Versions:
    """Which side runs the previous version's code."""

    relay_previous: bool
    agent_previous: bool

    @property
    def both_new(self) -> bool:
        return not (self.relay_previous or self.agent_previous)


PAIRINGS = {
    # the usual upgrade order: the relay first, the labs' agents later
    "this-relay+previous-agent": Versions(relay_previous=False, agent_previous=True),
    "previous-relay+this-agent": Versions(relay_previous=True, agent_previous=False),
    # the control: the same steps with both sides of this version, so that each degraded
    # answer of the two pairings above is shown to differ from the full one
    "this-relay+this-agent": Versions(relay_previous=False, agent_previous=False),
}
GRACE = 6  # resume_grace: the previous relay holds a stopped agent's sessions this long


@dataclass
class Pairing:
    versions: Versions
    relay: RelayNode
    gpu: Sshd
    web: Any
    alice: KeyPair
    lab_pc: KeyPair
    client_key: KeyPair
    tmp: Path
    start: Callable[..., AgentProcess]  # the start_process fixture
    tree: Path  # the previous version's
    proxy: Callable[[tuple[str, int]], TcpProxy]  # targets.proxy

    def config(self) -> Path:
        """An ssh_config for ``ssh -J alice@relay gpu-cluster`` and ``ssh -L`` as alice,
        and ``gpu-fast``: gpu-cluster by ``labrelay connect`` (the fast path) of the
        agent's version (a user who upgrades with her lab), its stderr in connect.err."""
        previous = self.versions.agent_previous
        argv = connect_argv(self.relay, "alice", self.alice, "%h:%p")
        if previous:  # its own code only, as the agent
            argv = ["env", *(f"{k}={v}" for k, v in previous_env(self.tree).items()),
                    argv[0], "-P", *argv[1:]]
        path = self.tmp / "ssh_config"
        path.write_text(f"""\
Host gpu-fast
  HostName gpu-cluster
  HostKeyAlias gpu-cluster
  User root
  IdentityFile {self.client_key.path}
  ProxyCommand {shlex.join(argv)} 2>>{self.tmp / "connect.err"}
Host gpu-cluster
  User root
  IdentityFile {self.client_key.path}
Host {LOOPBACK}
  User alice
  IdentityFile {self.alice.path}
""" + ssh_defaults(self.relay.known_hosts, 20))
        return path

    def start_agent(self, key: KeyPair, *args: str, name: str,
                    port: int | None = None) -> AgentProcess:
        """An agent process of the pairing's agent version, logging in as lab_pc with
        ``key`` to the relay (at ``port``, a proxy's, if given), with ``args``
        (forwards, options) besides."""
        previous = self.versions.agent_previous
        argv = agent_argv(previous, "-p", str(port or self.relay.port), "-i", str(key.path),
                          "-o", f"UserKnownHostsFile={self.relay.known_hosts}", *args,
                          f"lab_pc@{LOOPBACK}")  # fmt: skip
        return self.start(argv, name=name, env=previous_env(self.tree) if previous else {})


@pytest.fixture(params=list(PAIRINGS))
def pairing(request: pytest.FixtureRequest, previous_tree: Path, client_key: KeyPair,
            start_process: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
            targets: Targets, tmp_path: Path) -> Pairing:
    versions = PAIRINGS[request.param]
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    gpu = sshd_factory("gpu_cluster")
    web = targets.echo(greeting=b"web\n")
    # max_connections_per_user is this relay's (round 13): the previous one refuses it.
    cap = "" if versions.relay_previous else "max_connections_per_user = 2\n"
    config = write_relay_dir(
        tmp_path / "relay",
        agents=[f'permitlisten="gpu-cluster:22",permitlisten="web:8080" '
                f"{lab_pc.public_blob()} lab_pc"],
        users=[f'permitopen="gpu-cluster:22",permitopen="web:8080" {alice.public_blob()} alice'],
        relay_toml='data_port = 0\ndata_bind = "127.0.0.1"\ne2e_services = ["gpu-cluster:22"]\n'
                   f"public_wait = 5\nresume_grace = {GRACE}\n" + cap)
    proc = start_process(relay_argv(versions.relay_previous, config), name="relay",
                         env=previous_env(previous_tree) if versions.relay_previous else {})
    relay = RelayNode(proc, config.parent, admin_port(proc))
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    return Pairing(versions, relay, gpu, web, alice, lab_pc, client_key, tmp_path,
                   start_process, previous_tree, targets.proxy)


class Interactive:
    """An echo session through ``ssh -L``, typed into line by line."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port, timeout=30)
        assert recv_exactly(self.sock, 4) == b"web\n"

    def line(self, text: bytes) -> bytes:
        self.sock.sendall(text)
        return recv_exactly(self.sock, len(text))


def _pool_full(relay: RelayNode) -> bool:
    return bool(relay.status()["relay"]["fast_path"]["pools"].get("lab_pc") == POOL)


def _ssh(argv: list[str], data: bytes = b"") -> bytes:
    out = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def _no_traceback(procs: list[AgentProcess]) -> None:
    """Nothing critical (the fixture checks that too), and no traceback anywhere in what
    either side printed, at any level."""
    for proc in procs:
        bad = [e for e in proc.events()
               if e.get("level") == "critical" or "Traceback" in str(e)]
        assert not bad, (proc.name, bad)
        assert "Traceback" not in "\n".join(proc.stderr.lines), (proc.name, proc.stderr.lines)


def _agent_version_shown(relay: RelayNode, v: Versions) -> None:
    """Which version the agent lab_pc runs, where the relay's operator looks: this
    relay names it in its relay_connected and relay_service_registered lines, in
    ``labrelay status`` (JSON and text) and in ``labrelay_relay_agent_connections``; the
    previous agent names none (its line is the bare ``SSH-2.0-labrelay``), so it shows
    as ``unknown (before 0.2.0.dev0)``.  The previous relay takes this agent's line as
    labrelay's (everything above depends on it) and shows no version; this version's
    ``labrelay status`` against it says ``?``."""
    shown = OLD_AGENT if v.agent_previous else __version__
    connected = relay.wait_for("relay_connected", since=0, advance=False, name="lab_pc")
    registered = relay.wait_for("relay_service_registered", since=0, advance=False,
                                agent="lab_pc")
    agents = relay.status()["relay"]["agents"]
    if v.relay_previous:
        assert "version" not in connected and "version" not in registered
        assert all("version" not in a for a in agents), agents
        shown = "?"
    else:
        # and its own, as every labrelay process says it
        assert relay.wait_for("agent_started", since=0, advance=False)["version"] == __version__
        assert connected["version"] == registered["version"] == shown, (connected, registered)
        assert f", version {shown}" in connected["text"], connected
        assert f"(agent version {shown})" in registered["text"], registered
        assert {a["version"] for a in agents if a["name"] == "lab_pc"} == {shown}, agents
        assert {a["software"] for a in agents} == {
            "labrelay" if v.agent_previous else f"labrelay_{__version__}"}, agents
        samples = [s for f in text_string_to_metric_families(relay.metrics())
                   if f.name == "labrelay_relay_agent_connections" for s in f.samples]
        assert [(s.labels, s.value) for s in samples] == [
            ({"agent": "lab_pc", "version": shown}, 1.0)], samples
    table = subprocess.run([sys.executable, "-m", "relay", "status", "--admin", relay.admin],
                           capture_output=True, timeout=60, env={**os.environ, **child_env()},
                           cwd=REPO_ROOT)
    assert table.returncode == 0, table.stderr.decode()
    lines = table.stdout.decode().splitlines()
    assert lines[0].startswith(f"labrelay {__version__ if not v.relay_previous else '0.1.0'} ")
    assert next(x for x in lines if x.startswith("AGENT")).split()[:3] == [
        "AGENT", "FROM", "VERSION"], lines
    row = next(x for x in lines if x.startswith("lab_pc "))
    assert f" {shown} " in row, row


def test_mixed_versions_serve_stock_ssh_and_degrade_to_the_older_side(
        pairing: Pairing, start_ssh: Callable[..., SshProcess]) -> None:
    """One pairing (see the module's docstring): stock ssh's paths byte-exact, then
    each of this round's additions as the older side allows, then the agent stopped."""
    p, v = pairing, pairing.versions
    # The agent registers gpu-cluster:22 (e2e) and web:8080; denied:7000 is not in
    # lab_pc's grant, so the relay refuses that forward.
    # Its link goes through a proxy, to be cut; the data connections go straight.
    link = p.proxy((LOOPBACK, p.relay.port))
    p.relay.trust(known_hosts_line(p.relay.host_key_blob, link.port))
    agent = p.start_agent(
        p.lab_pc, "--admin", "127.0.0.1:0", "--fast-path-pool", str(POOL),
        "--backoff-initial", "0.2", "--backoff-max", "1",
        "-R", f"gpu-cluster:22:127.0.0.1:{p.gpu.port}", "-R", f"web:8080:127.0.0.1:{p.web.port}",
        "-R", f"denied:7000:127.0.0.1:{p.web.port}", name="agent", port=link.port)  # fmt: skip
    agent_admin = admin_port(agent)
    for bind in ("gpu-cluster", "web"):
        agent.wait_for("forward_ready", timeout=20, since=0, bind=bind)
    assert agent.wait_for("fast_path_ready", timeout=20, since=0)["services"] == "gpu-cluster:22"
    wait_until(lambda: admin_status(agent_admin)["links"][0]["fast_path"]["idle"] == POOL
               and p.relay.status()["relay"]["fast_path"]["pools"].get("lab_pc") == POOL,
               "the agent's pool to fill", timeout=30)
    _agent_version_shown(p.relay, v)
    ssh = find_program("ssh") or "ssh"
    cfg = p.config()
    jump = f"alice@{LOOPBACK}:{p.relay.port}"

    # ssh -J to the e2e service, 4 MiB up and back, on the pooled data route.
    stream = DataStream(14, SIZE)
    there = p.tmp / "there.bin"
    _ssh([ssh, "-F", str(cfg), "-J", jump, "gpu-cluster", f"cat > {there}"], stream.bytes())
    assert hashlib.sha256(there.read_bytes()).hexdigest() == stream.sha256
    back = _ssh([ssh, "-F", str(cfg), "-J", jump, "gpu-cluster", f"cat {there}"])
    assert len(back) == SIZE and hashlib.sha256(back).hexdigest() == stream.sha256
    fast = p.relay.status()["relay"]["fast_path"]
    assert fast["pooled"] == 2, fast  # both sessions rode a data connection of the pool

    # labrelay connect of the agent's version (data-token-v2): 1 MiB through the fast
    # path, a data connection paired with one of the agent's; it says nothing there.
    stream = DataStream(16, MiB)
    got = _ssh([ssh, "-F", str(cfg), "gpu-fast", "cat"], stream.bytes())
    assert hashlib.sha256(got).hexdigest() == stream.sha256
    fast = p.relay.status()["relay"]["fast_path"]
    assert (fast["paired"], fast["pooled"]) == (1, 2), fast
    assert (p.tmp / "connect.err").read_text() == ""

    # ssh -L to the plain service, 4 MiB echoed, on the link.
    _, port = stock_local_forward(start_ssh, lambda port: [
        ssh, "-v", "-F", str(cfg), "-N", "-o", "ExitOnForwardFailure=yes",
        "-p", str(p.relay.port), "-L", f"127.0.0.1:{port}:web:8080", LOOPBACK])
    payload = DataStream(15, SIZE).bytes()
    got = echo_roundtrip(port, payload, greeting=b"web\n", timeout=60)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert p.relay.status()["relay"]["fast_path"]["pooled"] == 2  # not pooled: not e2e

    # The link cut (both ends reset) with a session open on it: held at both ends,
    # resumed byte-exact once the agent is back (resume@labrelay, forwarded-resumable).
    session = Interactive(port)
    assert session.line(b"before") == b"before"
    mark, rmark = agent.mark(), p.relay.mark()
    link.kill_all()
    # (>= 1: the -L bulk session's channel may not have finished closing yet)
    assert agent.wait_for("link_lost", timeout=10, since=mark)["held"] >= 1
    agent.wait_for("link_connected", timeout=20, since=mark)
    agent.wait_for("session_resumed", timeout=20, since=mark)
    p.relay.wait_for("session_resumed", timeout=20, since=rmark)
    assert session.line(b"after") == b"after"
    session.sock.close()

    # request-refused@labrelay: the relay's reason reaches only a new agent from a new
    # relay; here the agent says the generic reason (the previous agent ignores the
    # note it is sent; the previous relay sends none).
    refused = agent.wait_for("forward_refused", timeout=20, since=0, bind="denied")
    if v.both_new:
        assert refused["reason"] == ("refused by the relay: service denied:7000 is not "
                                     "granted to agent lab_pc"), refused
    else:
        assert refused["reason"] == GENERIC_REFUSAL, refused
    p.relay.wait_for("relay_request_refused", since=0)

    if not v.relay_previous:
        # max_connections_per_user = 2: lab_pc's link and a standby (no forwards) fill
        # it; a third agent with the key is told why, nothing else.
        standby = p.start_agent(p.lab_pc, "--fast-path-pool", "0", "-N", name="standby")
        standby.wait_for("link_connected", timeout=20)
        third = p.start_agent(p.lab_pc, "--fast-path-pool", "0", "-N", name="third")
        failed = third.wait_for("link_failed", timeout=20)
        assert "max_connections_per_user = 2" in failed["reason"], failed
        third.wait_for("link_retry")  # and it tries again later, on its backoff
        p.relay.wait_for("relay_connection_cap", since=0, name="lab_pc")
        # no penalty for its address: the key was valid (nothing else failed a login yet)
        penalties = p.relay.status()["relay"]["admission"]["penalties"]
        assert sum(penalties.values()) == 0, penalties
        third.stop()
        standby.stop()
        # the first agent's link is untouched: its services still answer
        assert echo_roundtrip(port, b"still here", greeting=b"web\n") == b"still here"

    # The keys-refused back-off is the agent's own: this agent waits 10 s after any relay
    # (the previous one too) refused its keys; the previous agent retries on its
    # backoff (0.5 s here), whichever relay it meets.
    stranger = make_key(p.tmp / "stranger", comment="stranger")
    refused_agent = p.start_agent(stranger, "--fast-path-pool", "0", "--backoff-initial", "0.5",
                                  "-N", name="refused-agent")
    auth = refused_agent.wait_for("auth_failed", timeout=20)
    if not v.agent_previous:  # the previous relay is a labrelay relay all the same
        assert "the relay's agents file" in auth["reason"], auth
    retry = refused_agent.wait_for("link_retry", timeout=20)
    if v.agent_previous:
        assert retry["delay"] < KEYS_REFUSED_RETRY and "keys_refused" not in retry, retry
    else:
        assert retry["delay"] >= KEYS_REFUSED_RETRY and retry["keys_refused"] is True, retry
    refused_agent.stop()

    # The agent stopped (SIGTERM) with a session open on the link: it says goodbye (the
    # previous agent did too); this relay ends what it held for it at once, the
    # previous relay holds it for resume_grace, then ends it.
    held = Interactive(port)
    assert held.line(b"held") == b"held"
    session = held.sock
    rmark, started = p.relay.mark(), time.monotonic()
    assert agent.stop() == 0
    gone = p.relay.wait_for("relay_disconnected", timeout=10, since=rmark, kind="agent")
    # (this relay: none held; the previous one: this session, and perhaps the resumed
    # one, closed just before, whose channel may not have finished closing)
    assert (gone["held"] >= 1) if v.relay_previous else (gone["held"] == 0), gone
    session.settimeout(GRACE + 15)
    try:
        tail = session.recv(1)
    except TimeoutError:
        raise AssertionError(f"the session is still open, silent, after {GRACE + 15}s") from None
    except OSError:
        tail = b""  # a reset
    assert tail == b"", tail  # an end, not more bytes
    ended = time.monotonic() - started
    session.close()
    if not v.relay_previous:
        assert ended < 5, ended
        refused_resume = p.relay.wait_for("session_resume_refused", since=rmark)
        assert refused_resume["why"] == "its agent stopped", refused_resume
    else:
        assert ended >= GRACE - 1, ended
    if not v.agent_previous:  # this agent says what became of them; the previous did not
        agent.wait_for("link_resume_impossible", since=0, why="the link was stopped")
    _no_traceback([p.relay.proc, agent])


# --- over the TLS transport (SSH inside TLS, port 443) -----------------------------------


@pytest.fixture(scope="module")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("tls-ca"))


# test_tls.py runs this version on both sides; these are the two mixed ones.
TLS_PAIRINGS = {name: v for name, v in PAIRINGS.items() if not v.both_new}


@pytest.mark.parametrize("name", list(TLS_PAIRINGS))
def test_mixed_versions_over_the_tls_link(
        name: str, previous_tree: Path, client_key: KeyPair,
        start_process: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
        targets: Targets, tls_ca: CA, start_ssh: Callable[..., SshProcess],
        tmp_path: Path) -> None:
    """The previous version has the TLS transport (its relay's ``tls_listen``, its
    agent's ``transport = "tls"``; round 13 changed only the TLS port's gate at accept
    and the client's messages), so each mixed pairing runs over it: the agent's link
    goes to the relay's TLS port (CA file, SNI), through a proxy; the relay shows the
    agent's version as over plain SSH; stock ``ssh`` with ``openssl s_client`` as the
    ProxyCommand to the relay's TLS port moves 4 MiB up and back to gpu-cluster by
    ``-J`` (both hops in TLS), ``ssh -L`` on the SSH port echoes 4 MiB to web; the link
    is cut with a session open and the session resumes; no TLS handshake failed, and
    nothing critical and no traceback on either side."""
    v = TLS_PAIRINGS[name]
    old_env = previous_env(previous_tree)
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    gpu = sshd_factory("gpu_cluster")
    web = targets.echo(greeting=b"web\n")
    cert = tls_ca.issue("relay", (RELAY_NAME,))
    config = write_relay_dir(
        tmp_path / "relay",
        agents=[f'permitlisten="gpu-cluster:22",permitlisten="web:8080" '
                f"{lab_pc.public_blob()} lab_pc"],
        users=[f'permitopen="gpu-cluster:22",permitopen="web:8080" {alice.public_blob()} alice'],
        relay_toml=f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n'
                   f'tls_listen = "127.0.0.1:0"\ntls_handshake_timeout = 5\n'
                   f"resume_grace = {GRACE}\n")
    proc = start_process(relay_argv(v.relay_previous, config), name="relay",
                         env=old_env if v.relay_previous else {})
    relay = RelayNode(proc, config.parent, admin_port(proc))
    tls_port = proc.wait_for("relay_tls_listening", since=0, advance=False)["port"]
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    relay.trust(f"{RELAY_NAME} {relay.host_key_blob}")  # ssh through s_client: by name

    # The agent's link: TLS to the relay's TLS port, through a proxy (to be cut);
    # -p: the SSH port names the relay in known_hosts whichever way it is reached.
    link = targets.proxy((LOOPBACK, tls_port))
    agent = start_process(agent_argv(
        v.agent_previous, "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "Transport=tls",
        "-o", f"TLSPort={link.port}", "-o", f"TLSServerName={RELAY_NAME}",
        "-o", f"TLSCAFile={tls_ca.pem_path}", "--fast-path-pool", "0",
        "--backoff-initial", "0.2", "--backoff-max", "1",
        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "-R", f"web:8080:127.0.0.1:{web.port}",
        f"lab_pc@{LOOPBACK}"), name="agent", env=old_env if v.agent_previous else {})  # fmt: skip
    connected = agent.wait_for("link_connected", timeout=30, since=0, advance=False)
    assert connected["route"] == f"tls {LOOPBACK}:{link.port}", connected
    for bind in ("gpu-cluster", "web"):
        agent.wait_for("forward_ready", timeout=20, since=0, advance=False, bind=bind)
    _agent_version_shown(relay, v)

    ssh = find_program("ssh") or "ssh"
    cfg = tmp_path / "ssh_config"
    proxy_command = tls_proxy_command(RELAY_NAME, tls_port, ca_file=str(tls_ca.pem_path),
                                      connect=LOOPBACK)
    cfg.write_text(f"""\
Host relay-tls
  HostName {RELAY_NAME}
  User alice
  IdentityFile {alice.path}
  ProxyCommand {proxy_command}
Host gpu-cluster
  User root
  IdentityFile {client_key.path}
  ProxyJump relay-tls
Host {LOOPBACK}
  User alice
  IdentityFile {alice.path}
""" + ssh_defaults(relay.known_hosts))
    handshakes = relay.status()["relay"]["tls"]["handshakes"]

    # ssh -J through the relay's TLS port to gpu-cluster (over the agent's TLS link).
    stream = DataStream(24, SIZE)
    there = tmp_path / "there.bin"
    _ssh([ssh, "-F", str(cfg), "gpu-cluster", f"cat > {there}"], stream.bytes())
    assert hashlib.sha256(there.read_bytes()).hexdigest() == stream.sha256
    back = _ssh([ssh, "-F", str(cfg), "gpu-cluster", f"cat {there}"])
    assert len(back) == SIZE and hashlib.sha256(back).hexdigest() == stream.sha256

    # ssh -L on the relay's SSH port to web, 4 MiB echoed over the agent's TLS link.
    _, port = stock_local_forward(start_ssh, lambda port: [
        ssh, "-v", "-F", str(cfg), "-N", "-o", "ExitOnForwardFailure=yes",
        "-p", str(relay.port), "-L", f"127.0.0.1:{port}:web:8080", LOOPBACK])
    payload = DataStream(25, SIZE).bytes()
    got = echo_roundtrip(port, payload, greeting=b"web\n", timeout=60)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    # The TLS link cut (both ends reset) with a session open: resumed over a new one.
    session = Interactive(port)
    assert session.line(b"before") == b"before"
    mark, rmark = agent.mark(), relay.mark()
    link.kill_all()
    agent.wait_for("link_lost", timeout=10, since=mark)
    again = agent.wait_for("link_connected", timeout=20, since=mark)
    assert again["route"] == f"tls {LOOPBACK}:{link.port}", again
    agent.wait_for("session_resumed", timeout=20, since=mark)
    relay.wait_for("session_resumed", timeout=20, since=rmark)
    assert session.line(b"after") == b"after"
    session.sock.close()

    tls = relay.status()["relay"]["tls"]
    # the agent's two links and the two ssh -J hops, at least; none failed
    assert tls["handshakes"] >= handshakes + 3 and tls["handshake_failed"] == 0, tls
    assert agent.stop() == 0
    _no_traceback([relay.proc, agent])


def test_the_previous_relay_refuses_a_config_with_max_connections_per_user(
        previous_tree: Path, start_process: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """A downgrade keeps no key the previous relay does not know: it refuses to start,
    naming the key, rather than ignore a limit the operator set."""
    config = write_relay_dir(tmp_path / "relay", [], [], "max_connections_per_user = 8\n")
    proc = start_process(relay_argv(True, config), name="previous-relay",
                         env=previous_env(previous_tree))
    assert proc.wait_exit(timeout=30) == 2  # a config problem, as for any other
    said = "\n".join(proc.stderr.lines) + "\n".join(str(e) for e in proc.events())
    assert "max_connections_per_user" in said, said


def test_the_relay_upgraded_in_place_then_rolled_back_keeps_the_previous_agent(
        previous_tree: Path, client_key: KeyPair, start_process: Callable[..., AgentProcess],
        sshd_factory: Callable[[str], Sshd], tmp_path: Path) -> None:
    """The relay-first upgrade as an admin does it, and its rollback: the previous relay
    runs with the previous agent connected; it is stopped and this version started on
    the same config, port and state_dir (so the same host key), then the previous one
    again.  Each time the agent comes back by itself (the key it knows, no
    hostkey_refused), registers its service again with its pool, and stock ``ssh -J``
    reaches the e2e service on the pooled route, byte-exact."""
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    gpu = sshd_factory("gpu_cluster")
    config = write_relay_dir(
        tmp_path / "relay", listen=f"127.0.0.1:{free_port()}",
        agents=[f'permitlisten="gpu-cluster:22" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {alice.public_blob()} alice'],
        relay_toml='data_port = 0\ndata_bind = "127.0.0.1"\ne2e_services = ["gpu-cluster:22"]\n')
    old_env = previous_env(previous_tree)

    def start_relay(previous: bool) -> RelayNode:
        proc = start_process(relay_argv(previous, config), name="relay-previous" if previous
                             else "relay-this", env=old_env if previous else {})
        relay = RelayNode(proc, config.parent, admin_port(proc))
        relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
        return relay

    relays = [start_relay(previous=True)]
    # The agent's own known_hosts, written once: the relay's host key must not change.
    agent_known = write_known_hosts(tmp_path / "agent_known_hosts",
                                    known_hosts_line(relays[0].host_key_blob, relays[0].port))
    agent = start_process(agent_argv(
        True, "-p", str(relays[0].port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={agent_known}", "--fast-path-pool", str(POOL),
        "--backoff-initial", "0.2", "--backoff-max", "0.5",
        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", f"lab_pc@{LOOPBACK}"),
        name="agent-previous", env=old_env)  # fmt: skip
    ssh = find_program("ssh") or "ssh"
    mark = 0
    for n, previous in enumerate((True, False, True)):
        if n:
            assert relays[-1].proc.stop() == 0
            mark = agent.mark()
            relays.append(start_relay(previous))
        relay = relays[-1]
        assert relay.host_key_blob == relays[0].host_key_blob  # the same state_dir
        agent.wait_for("link_connected", timeout=30, since=mark)
        agent.wait_for("forward_ready", timeout=20, since=mark, bind="gpu-cluster")
        wait_until(partial(_pool_full, relay), "the agent's pool to fill", timeout=30)
        cfg = tmp_path / "ssh_config"
        cfg.write_text(f"Host gpu-cluster\n  User root\n  IdentityFile {client_key.path}\n"
                       f"Host {LOOPBACK}\n  User alice\n  IdentityFile {alice.path}\n"
                       f"Host *\n  IdentitiesOnly yes\n  BatchMode yes\n"
                       f"  UserKnownHostsFile {relay.known_hosts}\n"
                       "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n")
        stream = DataStream(40 + n, MiB)
        got = _ssh([ssh, "-F", str(cfg), "-J", f"alice@{LOOPBACK}:{relay.port}", "gpu-cluster",
                    "cat"], stream.bytes())
        assert hashlib.sha256(got).hexdigest() == stream.sha256
        assert relay.status()["relay"]["fast_path"]["pooled"] == 1
    assert len(agent.events("link_connected")) == 3, agent.events("link_connected")
    agent.assert_no_event("hostkey_refused")
    _no_traceback([*(r.proc for r in relays), agent])


def test_without_the_history_the_tests_fail_saying_how_to_get_it(tmp_path: Path) -> None:
    """A shallow clone (CI with --depth) or an sdist must fail with the fix, never
    skip: a two-commit repository, its --depth 1 clone, and a plain directory."""
    full, shallow, plain = tmp_path / "full", tmp_path / "shallow", tmp_path / "plain"
    plain.mkdir()
    full.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "one"],
                 ["commit", "-q", "--allow-empty", "-m", "two"]):
        subprocess.run(["git", "-C", str(full), *args], check=True, env=env, timeout=30)
    first = _git(full, "rev-parse", "HEAD~1").stdout.decode().strip()
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{full}", str(shallow)],
                   check=True, timeout=30)
    assert why_missing(full, first) is None
    assert "git fetch --unshallow" in (why_missing(shallow, first) or "")
    assert "full `git clone`" in (why_missing(plain, first) or "")


def test_a_host_key_rotation_told_to_the_previous_agent_changes_nothing_for_it(
        previous_tree: Path, client_key: KeyPair, start_process: Callable[..., AgentProcess],
        start_ssh: Callable[..., SshProcess], targets: Targets, tmp_path: Path) -> None:
    """Round 18's ``hostkeys-again@labrelay`` reaches an agent that predates it.

    This relay tells its connected labrelay agents its keys again when a reload sets
    ``next_host_key`` (docs/operations.md, rotating the host key), and it picks them by
    their version line: the previous agent's bare ``SSH-2.0-labrelay`` is labrelay's,
    so it is told too, and must drop the request it does not know (a global request
    that wants no reply).  Shown here, not assumed: the relay counts it as told; the
    agent keeps its link (no reconnect, at either end), a session open across the
    reload echoes, a new channel opened after the request (in order on the same link,
    so the agent has read the request first) echoes, nothing critical or a traceback
    on either side, and the agent's known_hosts is untouched.

    Then the swap (step 4 of the rotation): an agent from before round 17 learns keys
    neither now nor at its next reconnect (it has no ``UpdateHostKeys``), so it is
    refused (``hostkey_refused``) until the operator adds the new key's line to its
    known_hosts by hand, as docs/operations.md says; then it comes back by itself."""
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    web = targets.echo(greeting=b"web\n")
    config = write_relay_dir(
        tmp_path / "relay",
        agents=[f'permitlisten="web:8080" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {alice.public_blob()} alice'], relay_toml="",
        listen=f"127.0.0.1:{free_port()}")  # the same port after the swap
    proc = start_process(relay_argv(False, config), name="relay")
    relay = RelayNode(proc, config.parent, admin_port(proc))
    agent_known = write_known_hosts(tmp_path / "agent_known_hosts",
                                    known_hosts_line(relay.host_key_blob, relay.port))
    known_before = agent_known.read_text()
    agent = start_process(agent_argv(
        True, "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={agent_known}", "--backoff-initial", "0.2",
        "--backoff-max", "1", "-R", f"web:8080:127.0.0.1:{web.port}", f"lab_pc@{LOOPBACK}"),
        name="agent-previous", env=previous_env(previous_tree))  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, since=0, bind="web")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host {LOOPBACK}\n  User alice\n  IdentityFile {alice.path}\n"
                   + ssh_defaults(relay.known_hosts))
    ssh = find_program("ssh") or "ssh"
    _, port = stock_local_forward(start_ssh, lambda port: [
        ssh, "-v", "-F", str(cfg), "-N", "-o", "ExitOnForwardFailure=yes",
        "-p", str(relay.port), "-L", f"127.0.0.1:{port}:web:8080", LOOPBACK])
    held = Interactive(port)
    assert held.line(b"before the reload") == b"before the reload"

    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key", "labrelay-relay-host-key")
    config.write_text(config.read_text() + f'next_host_key = "{nxt.path}"\n')
    mark, agent_mark = relay.mark(), agent.mark()
    os.kill(relay.proc.pid, signal.SIGHUP)
    change = relay.wait_for("reload_change", since=mark,
                            change=lambda c: nxt.fingerprint() in c)
    assert "told again to 1 connected labrelay agent" in change["change"], change

    fresh = Interactive(port)  # a channel the relay opens on the link after its request
    assert fresh.line(b"a new session") == b"a new session"
    assert held.line(b"after the reload") == b"after the reload"
    held.sock.close()
    fresh.sock.close()
    assert not relay.proc.events("relay_connected", since=mark), "the agent reconnected"
    assert not agent.events("link_lost", since=agent_mark)
    assert not agent.events("link_connected", since=agent_mark)
    assert agent_known.read_text() == known_before
    _no_traceback([relay.proc, agent])

    # The swap: the next pair becomes the relay's key, next_host_key goes; same port.
    assert relay.proc.stop() == 0
    state_key = config.parent / "state" / "ssh_host_ed25519_key"
    state_key.write_bytes(nxt.path.read_bytes())
    state_key.chmod(0o600)
    state_key.with_name(state_key.name + ".pub").write_text(nxt.public + "\n")
    config.write_text(config.read_text().replace(f'next_host_key = "{nxt.path}"\n', ""))
    agent_mark = agent.mark()
    swapped = RelayNode(start_process(relay_argv(False, config), name="relay-swapped"),
                        config.parent, 0)
    assert swapped.host_key_blob == nxt.public_blob()
    agent.wait_for("hostkey_refused", timeout=30, since=agent_mark)
    assert agent_known.read_text() == known_before  # it learned nothing on reconnecting
    # The operator adds the new key's line (the new .pub) beside the old one.
    mark = swapped.proc.mark()
    with open(agent_known, "a") as f:
        f.write(known_hosts_line(nxt.public_blob(), swapped.port) + "\n")
    swapped.proc.wait_for("relay_service_registered", timeout=30, since=mark, agent="lab_pc")
    _no_traceback([swapped.proc, agent])
