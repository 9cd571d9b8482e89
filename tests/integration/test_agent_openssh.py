"""The labrelay agent as a real process against real OpenSSH sshd instances.

Each test plays one situation from the seed document or one failure autossh
handles badly, and checks bytes by content (sha256 or exact echo), not by "no
error".  The harness and its self-tests are in ``harness.py``/``test_harness.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import pytest
from conftest import REPO_ROOT, Targets, agent_command, child_env, twistd_command
from harness import (
    AgentProcess,
    DataStream,
    KeyPair,
    MiB,
    Sshd,
    SshProcess,
    StallingPusher,
    connect,
    echo_roundtrip,
    free_port,
    known_hosts_line,
    make_key,
    mode_download,
    mode_upload,
    recv_exactly,
)

pytestmark = pytest.mark.integration

DEST = "root@127.0.0.1"
AUTH_TRACES = ("publickey", "Accepted key")


@pytest.fixture
def run_agent(
    start_agent: Callable[..., AgentProcess],
    client_key: KeyPair,
    known_hosts: Callable[..., Path],
) -> Callable[..., AgentProcess]:
    """``run_agent(sshd, *forward_args, port=, kh=, options=, name=)``.

    Logs in as root with the client key, checks the host key strictly against
    ``kh`` (default: ``sshd``'s key for the port dialled) and retries fast.
    """

    def run(
        sshd: Sshd,
        *forward_args: str,
        port: int | None = None,
        kh: Path | None = None,
        options: tuple[str, ...] = (),
        name: str = "agent",
    ) -> AgentProcess:
        dial = port or sshd.port
        if kh is None:
            kh = known_hosts(sshd.known_hosts_line(port=dial))
        return start_agent(
            "-p", str(dial),
            "-i", str(client_key.path),
            "-o", f"UserKnownHostsFile={kh}",
            "-o", "StrictHostKeyChecking=yes",
            "--backoff-initial", "0.2",
            "--backoff-max", "1",
            *options,
            *forward_args,
            DEST,
            name=name,
        )  # fmt: skip

    return run


def remote_ready(agent: AgentProcess, timeout: float = 20.0, **match: object) -> int:
    """Wait for the link, then for a remote forward; return the port the server bound."""
    agent.wait_for("link_connected", timeout=timeout)
    ready = agent.wait_for("forward_ready", timeout=timeout, kind="remote", **match)
    port = ready["port"]
    assert isinstance(port, int) and port > 0, ready
    return port


# 1 ---------------------------------------------------------------------------


def test_reverse_forward_bulk_both_ways_and_50_sessions(
    sshd: Sshd, run_agent: Callable[..., AgentProcess], targets: Targets
) -> None:
    """Seed §1: the server's port leads to a target behind the agent; bulk data both
    ways is byte-exact and 50 concurrent sessions share the one link."""
    target = targets.mode()
    agent = run_agent(sshd, "-R", f"127.0.0.1:0:127.0.0.1:{target.port}")
    port = remote_ready(agent)

    up = DataStream(101, 64 * MiB)
    mode_upload(port, up)
    got = target.result()
    assert (got.nbytes, got.sha256) == (up.size, up.sha256)

    down = DataStream(102, 64 * MiB)
    got = mode_download(port, down)
    assert (got.nbytes, got.sha256) == (down.size, down.sha256)

    sessions = 50
    barrier = Barrier(sessions)

    def session(i: int) -> bool:
        payload = DataStream(1000 + i, 64 * 1024).bytes()
        with connect(port, timeout=60) as sock:
            barrier.wait(60)  # all 50 open at once before any data moves
            sock.sendall(b"E" + payload)
            return recv_exactly(sock, len(payload)) == payload

    with ThreadPoolExecutor(sessions) as pool:
        results = list(pool.map(session, range(sessions)))
    assert results == [True] * sessions
    assert target.accepted == 2 + sessions
    agent.assert_no_event("link_lost")


# 2 ---------------------------------------------------------------------------


def test_seed_chain_reaches_gpu_cluster_sshd(
    sshd_factory: Callable[[str], Sshd],
    run_agent: Callable[..., AgentProcess],
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
) -> None:
    """Seed §2 without the detach hop: gpu_cluster -R to lab_pc, lab_pc -R that port
    to cloud; a stock ssh to cloud's port lands on gpu_cluster's own sshd."""
    gpu, lab, cloud = (sshd_factory(n) for n in ("gpu_cluster", "lab_pc", "cloud"))

    agent_a = run_agent(lab, "-R", f"127.0.0.1:0:127.0.0.1:{gpu.port}",
                        name="agent-gpu_cluster")
    port_on_lab = remote_ready(agent_a)
    agent_b = run_agent(cloud, "-R", f"127.0.0.1:0:127.0.0.1:{port_on_lab}", name="agent-lab_pc")
    port_on_cloud = remote_ready(agent_b)

    # Only gpu_cluster's key is trusted: a hop answering with its own key would fail.
    kh = known_hosts(gpu.known_hosts_line(port=port_on_cloud), name="known_hosts.gpu_only")
    out = subprocess.run(
        ssh_command(port_on_cloud, kh, command="echo $LABRELAY_TEST_HOST"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu_cluster"
    assert "Accepted publickey for root" in gpu.log_text()


# 3 ---------------------------------------------------------------------------


def test_local_forward(
    sshd: Sshd, run_agent: Callable[..., AgentProcess], targets: Targets
) -> None:
    """``-L 127.0.0.1:0:host:port``: the agent listens; bytes reach a target the server
    can reach, and come back."""
    echo = targets.echo(greeting=b"behind-sshd\n")
    agent = run_agent(sshd, "-L", f"127.0.0.1:0:127.0.0.1:{echo.port}")
    agent.wait_for("link_connected", timeout=20)
    # A local listener may be up before the link is: no order between the two.
    ready = agent.wait_for("forward_ready", timeout=20, since=0, kind="local")
    assert ready["bind"] == "127.0.0.1"
    port = ready["port"]
    assert isinstance(port, int) and port > 0

    payload = DataStream(3, 1 * MiB).bytes()
    assert echo_roundtrip(port, payload, greeting=b"behind-sshd\n") == payload
    assert echo_roundtrip(port, b"second session", greeting=b"behind-sshd\n") == b"second session"
    assert echo.accepted == 2


# 4 ---------------------------------------------------------------------------


def test_reconnects_after_sshd_killed_and_restarted(
    sshd: Sshd, run_agent: Callable[..., AgentProcess], targets: Targets
) -> None:
    """The server dies (SIGKILL, all its processes) and comes back on the same port:
    the agent reconnects and the forward works within 3 s of the server being back."""
    echo = targets.echo()
    fixed = free_port()
    agent = run_agent(sshd, "-R", f"{fixed}:127.0.0.1:{echo.port}")
    assert remote_ready(agent, port=fixed) == fixed
    assert echo_roundtrip(fixed, b"before") == b"before"

    sshd.kill()
    agent.wait_for("link_lost", timeout=15)
    with pytest.raises(ConnectionRefusedError):
        connect(fixed, timeout=5).close()

    sshd.restart()
    back = time.monotonic()
    agent.wait_for("link_connected", timeout=15)
    agent.wait_for("forward_ready", timeout=15, kind="remote", port=fixed)
    assert echo_roundtrip(fixed, b"after restart") == b"after restart"
    elapsed = time.monotonic() - back
    assert elapsed <= 3.0, f"forward usable {elapsed:.2f}s after sshd was back"


# 5 ---------------------------------------------------------------------------


def test_silent_cut_detected_by_keepalive(
    sshd: Sshd, run_agent: Callable[..., AgentProcess], targets: Targets
) -> None:
    """The network goes silent (no FIN, no RST): keepalives declare the link dead in
    about interval x count; when the path is back the agent reconnects."""
    interval, count = 1, 3
    echo = targets.echo()
    proxy = targets.proxy(("127.0.0.1", sshd.port))
    agent = run_agent(
        sshd,
        "-R", f"127.0.0.1:0:127.0.0.1:{echo.port}",
        port=proxy.port,
        options=(
            "-o", f"ServerAliveInterval={interval}",
            "-o", f"ServerAliveCountMax={count}",
            "-o", "ConnectTimeout=5",
        ),
    )  # fmt: skip
    port = remote_ready(agent)
    assert echo_roundtrip(port, b"before the cut") == b"before the cut"

    proxy.blackhole()
    cut = time.monotonic()
    dead = agent.wait_for("link_dead", timeout=interval * count + 10)
    elapsed = time.monotonic() - cut
    assert elapsed <= interval * count + 2, f"link_dead after {elapsed:.2f}s"
    assert isinstance(dead["unanswered"], int) and dead["unanswered"] >= 1, dead
    agent.wait_for("link_lost", timeout=10)

    proxy.restore()
    port = remote_ready(agent, timeout=30)
    assert echo_roundtrip(port, b"after the cut") == b"after the cut"


# 6 ---------------------------------------------------------------------------


def test_port_held_by_old_session_is_retried_without_dropping_link(
    sshd: Sshd,
    run_agent: Callable[..., AgentProcess],
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """A stale session (here a stock ``ssh -N -R``) still holds the port: the agent
    keeps its link, serves its other forward, and retries until the port is free."""
    stock_target = targets.echo(greeting=b"stock\n")
    fixed_target = targets.echo(greeting=b"agent-fixed\n")
    any_target = targets.echo(greeting=b"agent-any\n")
    kh = known_hosts(sshd.known_hosts_line())
    stock = start_ssh(
        ssh_command(sshd.port, kh, "-v", "-N", "-o", "ExitOnForwardFailure=yes",
                    "-R", f"127.0.0.1:0:127.0.0.1:{stock_target.port}"),
        name="stock-ssh",
    )  # fmt: skip
    # sshd picks the port; the agent then asks for that very port.
    fixed = int(stock.wait_stderr(r"Allocated port (\d+) for remote forward").group(1))
    assert echo_roundtrip(fixed, b"x", greeting=b"stock\n") == b"x"

    agent = run_agent(
        sshd,
        "-R", f"127.0.0.1:{fixed}:127.0.0.1:{fixed_target.port}",
        "-R", f"127.0.0.1:0:127.0.0.1:{any_target.port}",
    )  # fmt: skip
    agent.wait_for("link_connected", timeout=20)
    refused = agent.wait_for("forward_refused", timeout=20, since=0)
    # sshd gives no reason (REQUEST_FAILURE has no room for one, and it sends no
    # request-refused@labrelay): the agent says what it can.
    assert refused["reason"] == "refused by the server (port in use or not permitted)", refused
    retry = agent.wait_for(
        "forward_retry", timeout=20, since=refused["_index"] + 1, forward=refused["forward"]
    )
    assert retry["delay"] > 0
    other = agent.wait_for(
        "forward_ready", timeout=20, since=0, kind="remote", port=lambda p: p != fixed
    )
    assert other["forward"] != refused["forward"]
    assert echo_roundtrip(other["port"], b"y", greeting=b"agent-any\n") == b"y"

    stock.stop()
    ready = agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", port=fixed)
    assert ready["forward"] == refused["forward"]
    assert ready["_index"] > refused["_index"]
    payload = DataStream(6, 256 * 1024).bytes()
    assert echo_roundtrip(fixed, payload, greeting=b"agent-fixed\n") == payload
    agent.assert_no_event("link_lost")
    assert len(agent.events("link_connected")) == 1


# 7 ---------------------------------------------------------------------------


def test_wrong_host_key_refused_before_authentication(
    sshd: Sshd,
    run_agent: Callable[..., AgentProcess],
    known_hosts: Callable[..., Path],
    targets: Targets,
    tmp_path: Path,
) -> None:
    """known_hosts holds another key for [127.0.0.1]:PORT: the agent refuses the
    server, and never offers (or signs with) its key to that server."""
    impostor = make_key(tmp_path / "other_host_key", comment="other-host")
    kh = known_hosts(known_hosts_line(impostor.public_blob(), sshd.port))
    echo = targets.echo()
    since = sshd.log.mark()

    agent = run_agent(sshd, "-R", f"127.0.0.1:0:127.0.0.1:{echo.port}", kh=kh)
    refused = agent.wait_for("hostkey_refused", timeout=20)
    assert sshd.fingerprint() in refused["reason"], refused
    agent.stop()

    sentinel = sshd.sync_log(since)
    assert [p for p in sshd.connection_ports(since) if p != sentinel], "agent never connected"
    log = sshd.log_text(since)
    for trace in AUTH_TRACES:
        assert trace not in log, f"{trace!r} in sshd log:\n{log}"
    agent.assert_no_event("link_connected")
    agent.assert_no_event("forward_ready")


# 8 ---------------------------------------------------------------------------


def test_slow_reader_does_not_grow_memory(
    sshd: Sshd, run_agent: Callable[..., AgentProcess], targets: Targets
) -> None:
    """A target that does not read: the pipeline fills and stalls the sender, and the
    agent's memory stays flat; released, every byte arrives intact."""
    lazy = targets.lazy_reader()
    agent = run_agent(sshd, "-R", f"127.0.0.1:0:127.0.0.1:{lazy.port}")
    port = remote_ready(agent)
    before = agent.rss_kb()

    stream = DataStream(8, 256 * MiB)
    pusher = StallingPusher(port, stream, stall_after=2.0)
    stalled_at = pusher.wait_stalled(180)
    at_stall = agent.rss_kb()
    assert lazy.connected.is_set()
    growth_kb = at_stall - before
    assert growth_kb < 32 * 1024, (
        f"agent RSS grew {growth_kb} KiB ({before} -> {at_stall}) "
        f"with {stalled_at / MiB:.1f} MiB in flight"
    )

    lazy.release.set()
    assert pusher.result(300).sent == stream.size
    got = lazy.result(300)
    assert (got.nbytes, got.sha256) == (stream.size, stream.sha256)


# 9 ---------------------------------------------------------------------------


def test_twistd_plugin_serves_config(
    sshd: Sshd,
    start_process: Callable[..., AgentProcess],
    client_key: KeyPair,
    known_hosts: Callable[..., Path],
    targets: Targets,
    tmp_path: Path,
) -> None:
    """``twistd -n labrelay --config F``: the same service from the plugin, a pid file
    while it runs, removed on SIGTERM."""
    echo = targets.echo(greeting=b"twistd\n")
    kh = known_hosts(sshd.known_hosts_line())
    config = tmp_path / "node.toml"
    config.write_text(
        f"""\
[[link]]
name = "cloud"
host = "127.0.0.1"
port = {sshd.port}
user = "root"
identity = "{client_key.path}"
known_hosts = "{kh}"
keepalive_interval = 1
keepalive_count = 3
backoff_initial = 0.2
backoff_max = 1.0

[[link.remote]]
listen = "0"
connect = "127.0.0.1:{echo.port}"
name = "target"
"""
    )
    pidfile = tmp_path / "twistd.pid"
    twistd = start_process(
        twistd_command("-n", "--pidfile", str(pidfile),
                       "labrelay", "--config", str(config), "--log-format", "json"),
        name="twistd",
    )  # fmt: skip
    twistd.wait_for("link_connected", timeout=30, link="cloud")
    ready = twistd.wait_for("forward_ready", timeout=30, kind="remote", forward="target")
    payload = DataStream(9, 512 * 1024).bytes()
    assert echo_roundtrip(ready["port"], payload, greeting=b"twistd\n") == payload
    assert pidfile.read_text().strip() == str(twistd.pid)

    # twistd shuts down cleanly, then exits by re-raising the signal that stopped it.
    assert twistd.stop(timeout=15) in (0, -signal.SIGTERM)
    assert not pidfile.exists()


# 10 --------------------------------------------------------------------------


def test_bad_flags_and_config_exit_2_without_connecting(
    sshd: Sshd, client_key: KeyPair, tmp_path: Path
) -> None:
    """Errors are reported up front with what is wrong, and nothing is dialled."""
    since = sshd.log.mark()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            agent_command(*args),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            env={**os.environ, **child_env()},
        )

    bad_flag = run("-p", str(sshd.port), "-i", str(client_key.path), "-R", "notaspec", DEST)
    assert bad_flag.returncode == 2, bad_flag
    assert "notaspec" in bad_flag.stderr

    config = tmp_path / "bad.toml"
    config.write_text(
        f"""\
[[link]]
name = "cloud"
host = "127.0.0.1"
port = {sshd.port}
user = "root"
identity = "{client_key.path}"

[[link.remote]]
listen = "0"
connect = "127.0.0.1:9"
colour = "blue"
"""
    )
    bad_key = run("--config", str(config))
    assert bad_key.returncode == 2, bad_key
    assert str(config) in bad_key.stderr
    assert "link[0].remote[0]" in bad_key.stderr and "colour" in bad_key.stderr, bad_key.stderr

    sentinel = sshd.sync_log(since)
    assert [p for p in sshd.connection_ports(since) if p != sentinel] == []


# 11 --------------------------------------------------------------------------


def test_local_forward_waits_for_the_link_then_refuses_cleanly(
    sshd: Sshd,
    start_agent: Callable[..., AgentProcess],
    client_key: KeyPair,
    known_hosts: Callable[..., Path],
    targets: Targets,
    tmp_path: Path,
) -> None:
    """A local forward keeps listening while the link is down. A connection made then
    is held (not read, not refused) and served once the link is back; one that the
    link does not come back for within ``local_wait`` is closed cleanly."""
    echo = targets.echo()
    kh = known_hosts(sshd.known_hosts_line())
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[[link]]
name = "cloud"
host = "127.0.0.1"
port = {sshd.port}
user = "root"
identity = "{client_key.path}"
known_hosts = "{kh}"
backoff_initial = 0.2
backoff_max = 0.5
local_wait = 2

[[link.local]]
name = "svc"
listen = "127.0.0.1:0"
connect = "127.0.0.1:{echo.port}"
"""
    )
    agent = start_agent("--config", str(config))
    agent.wait_for("link_connected", timeout=20)
    port = agent.wait_for("forward_ready", timeout=20, since=0, forward="svc")["port"]
    assert echo_roundtrip(port, b"link up") == b"link up"

    sshd.kill()
    agent.wait_for("link_lost", timeout=15)

    # Held while the link is down, then served when it is back.
    with connect(port, timeout=20) as held:
        held.sendall(b"sent while the link was down")
        sshd.restart()
        agent.wait_for("link_connected", timeout=15)
        assert recv_exactly(held, 28) == b"sent while the link was down"

    # The link stays down past local_wait: the connection is closed, nothing served.
    sshd.kill()
    agent.wait_for("link_lost", timeout=15)
    accepted_before = echo.accepted
    with connect(port, timeout=20) as refused:
        refused.sendall(b"nobody will answer")
        started = time.monotonic()
        assert refused.recv(100) == b""  # clean close (FIN), after the wait
        waited = time.monotonic() - started
    agent.wait_for("local_refused", timeout=5, forward="svc")
    assert 1.5 <= waited <= 8, f"closed after {waited:.1f}s, local_wait is 2s"
    assert echo.accepted == accepted_before


# 12 --------------------------------------------------------------------------


def test_demo_proves_the_path(start_process: Callable[..., AgentProcess]) -> None:
    """``labrelay demo --once`` (the README's first command) runs the relay, an agent
    and a simulated user in one process, plus a private sshd as the GPU cluster, and
    proves the path: bob's HTTP through the relay, alice's real ``ssh -J`` by name, and
    the same login on the fast path (``labrelay connect`` as ProxyCommand, spliced)."""
    demo = start_process(
        [sys.executable, "-m", "relay", "demo", "--once", "--log-format", "json"], name="demo"
    )
    assert demo.wait_exit(timeout=60) == 0, demo.diagnostics()
    proofs = [e["text"] for e in demo.events("demo_proof")]
    assert any("-> relay -> jupyter:8888 ->" in t and "hello from the lab" in t for t in proofs)
    assert any("ssh -J gpu-cluster -> reached gpu_cluster" in t for t in proofs), proofs
    assert any("(labrelay connect) -> reached gpu_cluster on the fast path" in t
               for t in proofs), proofs
    assert demo.events("relay_fast_session", service="gpu-cluster:22")
    registered = {e["service"] for e in demo.events("relay_service_registered")}
    assert registered == {"jupyter:8888", "gpu-cluster:22"}


# known_hosts files as ssh names them ---------------------------------------------------


def test_agent_reads_the_known_hosts_files_ssh_can_name(
    sshd: Sshd, client_key: KeyPair, known_hosts: Callable[..., Path],
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path,
) -> None:
    """The agent takes what ssh takes: the server's key only in a GlobalKnownHostsFile,
    or only in the second of several UserKnownHostsFile files, is accepted (it took one
    user file and refused GlobalKnownHostsFile).  ``UserKnownHostsFile=none`` is no
    file: a ``none`` planted in the agent's directory with the server's key is not
    trusted, and accept-new refuses the unknown server (no file to record it in) and
    creates nothing."""
    echo = targets.echo()
    kh = known_hosts(sshd.known_hosts_line())
    missing = tmp_path / "absent_known_hosts"
    base = ("-p", str(sshd.port), "-i", str(client_key.path), "--backoff-initial", "0.2",
            "--backoff-max", "1", "-R", f"127.0.0.1:0:127.0.0.1:{echo.port}")
    for files in (("-o", f"UserKnownHostsFile={missing}", "-o", f"GlobalKnownHostsFile={kh}"),
                  ("-o", f"UserKnownHostsFile={missing} {kh}")):
        agent = start_agent(*base, *files, DEST, name="agent-files")
        remote_ready(agent)
        agent.stop()
        assert not missing.exists()

    home = tmp_path / "cwd"
    home.mkdir()
    planted = home / "none"
    planted.write_text(sshd.known_hosts_line() + "\n")
    agent = AgentProcess(agent_command(*base, "-o", "UserKnownHostsFile=none",
                                       "-o", "StrictHostKeyChecking=accept-new", DEST),
                         env=child_env(), cwd=home, name="agent-none")
    try:
        refused = agent.wait_for("hostkey_refused", timeout=20)
        assert "no file to record it in" in refused["reason"], refused
        agent.assert_no_event("link_connected")
    finally:
        agent.stop()
    assert sorted(p.name for p in home.iterdir()) == ["none"]
    assert planted.read_text() == sshd.known_hosts_line() + "\n"
