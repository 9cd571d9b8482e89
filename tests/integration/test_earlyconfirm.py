"""Early confirmation (``[relay] early_confirm``, docs/relay.md): a user's ``direct-tcpip``
to a healthy service is confirmed at once, her first bytes held in the channel's window
until the agent's side is open; on both routes (a channel on the agent's link, a pooled
data connection to an end-to-end encrypted service), with stock ``ssh -L`` and
``ssh -W`` (what ``ssh -J`` runs).

Real processes: a ``labrelay relay`` with a data port, the labrelay agent keeping a pool,
two echo targets (``web:8080`` on the link; ``gpu:7000``, declared end-to-end encrypted,
pooled), stock ``ssh`` as the user.  An agent that has not answered yet is made by
stopping the agent process (SIGSTOP): the relay has confirmed, the agent's open waits.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import (
    LOOPBACK,
    AgentProcess,
    DataStream,
    EchoServer,
    KeyPair,
    MiB,
    RelayNode,
    SshProcess,
    connect,
    echo_roundtrip,
    find_program,
    free_port,
    make_key,
    mode_download,
    recv_exactly,
)
from relay_fixtures import (
    admin_port,
    admin_status,
    ssh_defaults,
    stock_local_forward,
    wait_until,
)

pytestmark = pytest.mark.integration

POOL = 4
WINDOW = 64 * 1024
WEB, GPU = "web:8080", "gpu:7000"  # the link route; the pooled route (e2e)
GREETING = {WEB: b"web\n", GPU: b"gpu\n"}
DL = "dl:9000"  # the pooled route too (e2e), to a ModeServer: a download on one request


@dataclass
class Site:
    relay: RelayNode
    agent: AgentProcess
    echoes: dict[str, EchoServer]
    alice: KeyPair
    tmp: Path
    start_ssh: Callable[..., SshProcess]
    forwards: dict[str, tuple[SshProcess, int]]
    mode_port: int = 0

    def config(self) -> Path:
        path = self.tmp / "ssh_config"
        path.write_text(f"Host {LOOPBACK}\n  IdentityFile {self.alice.path}\n"
                        + ssh_defaults(self.relay.known_hosts))
        return path

    def forward(self, service: str) -> tuple[SshProcess, int]:
        """A stock ``ssh -v -N -L PORT:service alice@relay`` (one per service)."""
        if service not in self.forwards:
            ssh = find_program("ssh") or "ssh"
            self.forwards[service] = stock_local_forward(
                self.start_ssh, lambda port: [
                    ssh, "-v", "-F", str(self.config()), "-N", "-o",
                    "ExitOnForwardFailure=yes", "-p", str(self.relay.port),
                    "-L", f"127.0.0.1:{port}:{service}", f"alice@{LOOPBACK}"],
                name=f"ssh-L-{service}")
        return self.forwards[service]

    def echo_through(self, service: str, payload: bytes) -> None:
        """One connection to ``service``'s ``-L`` port: its greeting, then ``payload``
        echoed exactly; returns once the relay has logged that session's close, so that
        a test's next ``mark()`` never sees it (a ``session_close`` after the mark was
        taken for the early session's once in CI's parallel run)."""
        _, port = self.forward(service)
        with connect(port) as s:
            host, local = s.getsockname()[:2]
            s.sendall(payload)
            got = recv_exactly(s, len(GREETING[service]) + len(payload))
        assert got == GREETING[service] + payload
        self.relay.wait_for("session_close", since=0, advance=False, service=service,
                            origin=f"{host}:{local}")

    def opens(self, service: str, since: int = 0, count: int = 1) -> list[dict[str, Any]]:
        """The relay's ``session_open`` events for ``service`` since ``since``, once
        ``count`` were written (each just after its session's set-up: audit.SetupLog)."""
        return self.relay.events_at_least("session_open", count, since=since, service=service)


@pytest.fixture
def site(request: pytest.FixtureRequest, openssh: None,
         start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
         start_ssh: Callable[..., SshProcess], targets: Targets,
         tmp_path: Path) -> Iterator[Site]:
    extra = "".join(f"{k} = {v}\n" for k, v in getattr(request, "param", {}).items())
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    echoes = {WEB: targets.echo(greeting=GREETING[WEB]), GPU: targets.echo(greeting=GREETING[GPU])}
    mode = targets.mode()
    relay = start_relay(
        agents=[f'permitlisten="web:8080",permitlisten="gpu:7000",permitlisten="dl:9000" '
                f'{lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="web:8080",permitopen="gpu:7000",permitopen="dl:9000" '
               f'{alice.public_blob()} alice'],
        relay_toml=f'data_port = 0\ndata_bind = "127.0.0.1"\ne2e_services = ["{GPU}", "{DL}"]\n'
                   f"public_wait = 5\nwindow = {WINDOW}\nmax_packet = 32768\n" + extra)
    agent = start_agent(
        "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "--admin", "127.0.0.1:0",
        "--fast-path-pool", str(POOL),
        "-R", f"{WEB}:127.0.0.1:{echoes[WEB].port}", "-R", f"{GPU}:127.0.0.1:{echoes[GPU].port}",
        "-R", f"{DL}:127.0.0.1:{mode.port}",
        f"lab_pc@{LOOPBACK}", name="agent")  # fmt: skip
    admin = admin_port(agent)
    agent.wait_for("fast_path_ready", timeout=20)
    for bind in ("web", "gpu", "dl"):
        agent.wait_for("forward_ready", timeout=20, since=0, bind=bind)
    wait_until(lambda: admin_status(admin)["links"][0]["fast_path"]["idle"] == POOL,
               "the agent's pool to fill", timeout=30)
    site = Site(relay, agent, echoes, alice, tmp_path, start_ssh, {}, mode.port)
    try:
        yield site
    finally:
        if agent.returncode is None:
            agent.sigcont()  # a test that failed while it was stopped


def _closed_without_data(port: int, timeout: float) -> None:
    """A connection to ``port`` that sends a byte is closed with nothing read (an EOF,
    or a reset: ssh closes a refused forward's socket with the byte unread)."""
    with connect(port) as s:
        s.settimeout(timeout)
        s.sendall(b"x")
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b"", "the user's connection was not closed empty"


@pytest.mark.parametrize("service", [WEB, GPU])
def test_L_and_W_to_a_healthy_service_are_confirmed_early_and_exact(
        site: Site, service: str) -> None:
    mark = site.relay.mark()
    site.echo_through(service, b"first")  # a fresh registration: after the agent
    for size in (1, 65536, 3 * MiB):  # a session's bytes, also well beyond the window
        site.echo_through(service, os.urandom(size))
    opens = site.opens(service, since=mark, count=4)
    assert [o["early"] for o in opens] == [False, True, True, True]
    if service == GPU:  # (a session finding no idle pooled connection takes the link)
        assert [o for o in opens if o["early"] and o["path"] == "pooled"], opens
    # ssh -W, as ssh -J runs it: stdin to the service, the service to stdout
    ssh = find_program("ssh") or "ssh"
    payload = os.urandom(256 * 1024)
    done = subprocess.run(
        [ssh, "-F", str(site.config()), "-p", str(site.relay.port), "-W", service,
         f"alice@{LOOPBACK}"], input=payload, capture_output=True, timeout=60,
        env={**os.environ, **child_env()}, cwd=REPO_ROOT)
    assert done.stdout == GREETING[service] + payload, done.stderr.decode()[-2000:]
    assert site.opens(service, since=mark, count=5)[-1]["early"] is True


def _sent_early_then_exact(relay: RelayNode, agent: AgentProcess, port: int,
                           greeting: bytes, first: bytes, rest: bytes) -> None:
    """Her ``first`` bytes, sent to ``port`` (an echo service) while the agent is stopped
    (SIGSTOP: the relay's open to it cannot be answered), are counted by the relay as
    sent early (``early_data_bytes``, early-data@labrelay) before the agent runs again;
    then ``rest`` follows, and the service's ``greeting``, ``first`` and ``rest`` come
    back exactly, once and in order, with nothing more counted early."""

    def early_bytes() -> int:
        return int(relay.status()["relay"]["counters"]["early_data_bytes"])

    before = early_bytes()
    agent.sigstop()
    try:
        sock = connect(port)
        sock.sendall(first)
        wait_until(lambda: early_bytes() >= before + len(first),
                   "the relay to send her first bytes before the agent answered", timeout=20)
    finally:
        agent.sigcont()
    with sock:
        sock.settimeout(30)
        sock.sendall(rest)
        got = recv_exactly(sock, len(greeting) + len(first) + len(rest))
    assert got == greeting + first + rest
    assert early_bytes() == before + len(first), "only her bytes before the answer"


def test_her_first_bytes_go_to_the_agent_before_it_answers_and_arrive_exact(
        site: Site) -> None:
    """The link route to a labrelay agent (it says early-data-ok@labrelay): with the
    agent stopped, the relay confirms her channel and sends her first bytes on the link
    at once (early-data@labrelay), not after the agent's answer; once the agent runs,
    the service gets them, then the rest, exactly once and in order."""
    site.echo_through(WEB, b"healthy")
    _, port = site.forward(WEB)
    _sent_early_then_exact(site.relay, site.agent, port, GREETING[WEB],
                           os.urandom(1000), os.urandom(300_000))


def test_a_public_ports_first_read_goes_to_the_agent_before_it_answers(
        start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
        targets: Targets, tmp_path: Path) -> None:
    """A public port (no SSH on the user's side): the relay reads her first bytes while
    the agent connects and sends them on the link before its answer
    (early-data@labrelay); with the agent stopped they are counted as sent early, and
    once it runs the service gets them, then the rest, exactly."""
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    public = free_port()
    relay = start_relay(
        agents=[f'permitlisten="{public}" {lab_pc.public_blob()} lab_pc'], users=[],
        relay_toml='public_bind = "127.0.0.1"\npenalty_exempt = ["127.0.0.1"]\n')
    echo = targets.echo()
    agent = start_agent(
        "-p", str(relay.port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}",
        "-R", f"0.0.0.0:{public}:127.0.0.1:{echo.port}", f"lab_pc@{LOOPBACK}",
        name="agent")  # fmt: skip
    agent.wait_for("forward_ready", timeout=20)

    assert echo_roundtrip(public, b"healthy") == b"healthy"
    _sent_early_then_exact(relay, agent, public, b"", os.urandom(2000), os.urandom(200_000))


@pytest.mark.parametrize("service", [WEB, GPU])
def test_a_target_that_went_down_closes_the_users_connection_then_open_fails(
        site: Site, service: str) -> None:
    site.echo_through(service, b"healthy")
    proc, port = site.forward(service)
    site.echoes[service].close()  # its port now refuses
    mark = site.relay.mark()
    _closed_without_data(port, timeout=20)
    refused = site.relay.wait_for("relay_session_refused", since=mark, service=service)
    assert refused["early"] is True and "could not connect it" in refused["why"]
    closed = site.relay.wait_for("session_close", since=mark, service=service,
                                 why=lambda why: "could not connect it" in why)
    assert closed["bytes_to_service"] == 0
    # its last open failed: the next one is confirmed only after the agent's answer
    mark = site.relay.mark()
    _closed_without_data(port, timeout=20)
    proc.wait_stderr(r"open failed: connect failed: .*could not connect it")
    refused = site.relay.wait_for("relay_session_refused", since=mark, service=service)
    assert refused["early"] is False
    assert site.opens(service, since=mark)[0]["early"] is False


@pytest.mark.parametrize("service", [WEB, GPU])
def test_more_than_the_window_before_the_agent_answers_is_held_by_it(
        site: Site, service: str) -> None:
    """The agent stopped: the relay confirmed, the user sends 24 MiB; the relay takes
    at most its window of them (its memory does not grow by the rest), and once the
    agent runs again every byte reaches the service and comes back, in order."""
    site.echo_through(service, b"healthy")
    _, port = site.forward(service)
    payload = os.urandom(24 * MiB)
    site.agent.sigstop()
    before = site.relay.rss_kb()
    sock = connect(port)
    sent = [0]

    def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), 64 * 1024):
            sock.sendall(view[offset:offset + 64 * 1024])
            sent[0] = offset + 64 * 1024

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # Nothing to await: the sender blocks once every buffer on the way is full.
    history: list[int] = []

    def held() -> bool:
        history.append(sent[0])
        return len(history) >= 20 and history[-1] > 0 and len(set(history[-20:])) == 1

    wait_until(held, "the user's sender to be held", timeout=30)
    assert sent[0] < len(payload), "nothing held the user: all 24 MiB were taken"
    grown = site.relay.rss_kb() - before
    assert grown < 8 * 1024, f"the relay grew by {grown} KiB while holding the user"
    got = hashlib.sha256()
    received = [0]

    def receive() -> None:
        want = len(GREETING[service]) + len(payload)
        head = recv_exactly(sock, len(GREETING[service]))
        assert head == GREETING[service]
        received[0] = len(head)
        while received[0] < want:
            chunk = sock.recv(min(1 << 20, want - received[0]))
            if not chunk:
                return
            got.update(chunk)
            received[0] += len(chunk)

    sock.settimeout(60)
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    site.agent.sigcont()
    sender.join(60)
    receiver.join(60)
    sock.close()
    assert received[0] == len(GREETING[service]) + len(payload)
    assert got.hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("site", [{"keepalive_interval": 1, "keepalive_count": 2}],
                         indirect=True)
@pytest.mark.parametrize("service", [WEB, GPU])
def test_an_agent_that_never_answers_closes_the_users_connection(site: Site,
                                                                  service: str) -> None:
    """The agent stops for good after the relay confirmed: the relay's keepalive drops
    its silent link, which fails the open (a pooled open also has the data port's 15 s
    reply timeout), and the user's connection is closed (docs/relay.md promises both)."""
    site.echo_through(service, b"healthy")
    _, port = site.forward(service)
    site.agent.sigstop()
    mark = site.relay.mark()
    _closed_without_data(port, timeout=20)
    refused = site.relay.wait_for("relay_session_refused", since=mark, service=service)
    assert refused["early"] is True
    site.agent.sigcont()


@pytest.mark.parametrize("service", [WEB, GPU])
def test_a_user_who_leaves_before_the_agent_answers_ends_her_session(
        site: Site, service: str) -> None:
    """Her ssh dies (SIGKILL: her connection to the relay drops) while the agent
    (stopped) has not answered: the relay ends her session at once, so it no longer
    counts against her cap, and the agent's late answer is closed, not bridged.  Found
    by the bad-input test in CI: on the link route the late answer bridged a closed
    channel and the session never ended.  (Closing only her local socket is a
    half-close that ssh -L passes on as EOF: her request may still have an answer, so
    that session rightly waits for the agent.)"""
    site.echo_through(service, b"healthy")
    proc, port = site.forward(service)
    wait_until(lambda: not site.relay.status()["relay"]["sessions"],
               "the healthy echo's session to end")
    site.agent.sigstop()
    mark = site.relay.mark()
    with connect(port) as s:
        s.sendall(b"held")
        site.relay.wait_for("session_open", since=mark, service=service, early=True)
        proc.kill()
        del site.forwards[service]
    closed = site.relay.wait_for("session_close", since=mark, service=service, timeout=20)
    assert closed["ended"] == "user reset" and closed["bytes_to_service"] == 0, closed
    assert "before the agent answered" in closed["why"], closed
    assert site.relay.status()["relay"]["per_user"].get("alice", 0) == 0
    site.agent.sigcont()
    site.echo_through(service, b"after the agent answered late")
    wait_until(lambda: not site.relay.status()["relay"]["sessions"],
               "every session at the relay to end")
    assert site.relay.status()["relay"]["per_user"].get("alice", 0) == 0


def test_a_grant_narrowed_during_the_early_phase_ends_the_session(site: Site) -> None:
    site.echo_through(WEB, b"healthy")
    _, port = site.forward(WEB)
    site.agent.sigstop()
    mark = site.relay.mark()
    with connect(port) as s:
        s.settimeout(20)
        s.sendall(b"held")
        site.relay.wait_for("session_open", since=mark, service=WEB, early=True)
        users = site.relay.dir / "users"
        users.write_text(f'permitopen="gpu:7000" {site.alice.public_blob()} alice\n')
        closed = site.relay.wait_for("session_close", since=mark, service=WEB, timeout=20)
        assert s.recv(100) == b""
    assert closed["bytes_to_service"] == 0
    assert "grant" in closed["why"] or "no longer" in closed["why"], closed["why"]
    site.agent.sigcont()
    site.echo_through(GPU, b"still granted")


def test_early_confirm_follows_a_reload_for_new_sessions(site: Site) -> None:
    """docs/relay.md: "A reload applies it to new sessions": turned off by a SIGHUP, a
    healthy service's next open waits for the agent; turned on again, it is early."""
    config = site.relay.dir / "node.toml"
    original = config.read_text()
    site.echo_through(WEB, b"healthy")  # a fresh registration answers late, then healthy

    def reload_with(extra: str) -> list[bool]:
        config.write_text(original + extra)
        mark = site.relay.mark()
        os.kill(site.relay.pid, signal.SIGHUP)
        site.relay.wait_for("reload_done", since=mark)
        mark = site.relay.mark()
        site.echo_through(WEB, b"after the reload")
        # Its close comes after its open (audit.SetupLog writes a held open first), and
        # the next reload's mark after it: no open of this session is read as the next's.
        site.relay.wait_for("session_close", since=mark, service=WEB)
        return [o["early"] for o in site.relay.events("session_open", since=mark)]

    site.relay.wait_for("session_close", service=WEB)  # the healthy echo's, and its open

    assert reload_with("early_confirm = false\n") == [False]
    assert reload_with("early_confirm = true\n") == [True]


@pytest.mark.parametrize("site", [{"early_confirm": "false"}], indirect=True)
def test_with_early_confirm_off_every_open_waits_for_the_agent(site: Site) -> None:
    """``early_confirm = false``: as before it existed.  Healthy sessions are confirmed
    after the agent's answer, and a target that went down is an "open failed" at once."""
    mark = site.relay.mark()
    for service in (WEB, GPU):
        for _ in range(3):
            site.echo_through(service, os.urandom(4096))
    opens = site.relay.events_at_least("session_open", 6, since=mark)
    assert [o["early"] for o in opens] == [False] * 6
    proc, port = site.forward(WEB)
    site.echoes[WEB].close()
    mark = site.relay.mark()
    _closed_without_data(port, timeout=20)
    proc.wait_stderr(r"open failed: connect failed: .*could not connect it")
    assert site.relay.wait_for("relay_session_refused", since=mark, service=WEB)["early"] is False


def test_a_download_begun_by_one_held_request_is_taken_by_the_native_thread(
        site: Site) -> None:
    """A download through an early-confirmed pooled session, begun by one request, is
    carried by the native thread.  Whether the request is held (it reached the relay
    before the agent answered) depends on timing here; when it is, the bridge offers
    the session to the thread as a read would have (FlowConnection.offerNative, pinned
    down in tests/unit/test_earlyopen.py).  Without that the stock-paths bench read
    the relay at 2.1 CPU-s/GiB on an e2e `ssh -L` pull instead of 1.0."""
    if os.environ.get("LABRELAY_DATAPATH", "") in ("python", "portable"):
        pytest.skip("the native thread is off on this data path (LABRELAY_DATAPATH)")
    _, port = site.forward(DL)
    warm = DataStream(1, 64 * 1024)
    first = mode_download(port, warm)  # a fresh registration: late; then healthy
    assert (first.nbytes, first.sha256) == (warm.size, warm.sha256)
    site.opens(DL)  # its open written (just after its set-up), so not read as the next's
    mark = site.relay.mark()
    stream = DataStream(7, 24 * MiB)
    got = mode_download(port, stream)
    assert (got.nbytes, got.sha256) == (stream.size, stream.sha256)
    opened = site.relay.wait_for("session_open", since=mark, service=DL)
    assert opened["early"] is True, "the request was held: the channel was confirmed early"
    closed = site.relay.wait_for("session_close", since=mark, service=DL,
                                 bytes_from_service=stream.size)
    assert closed.get("native_sealed", 0) > stream.size // 2, closed
