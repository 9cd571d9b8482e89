"""Self-tests of the harness against stock OpenSSH: if these fail, the agent tests mean nothing.

They run the same fixtures the agent tests use, with a stock ``ssh -N -R``/``-L`` in the
agent's place, and check bytes by content.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    DataStream,
    HarnessError,
    LineLog,
    MiB,
    Sshd,
    SshProcess,
    StallingPusher,
    _descendants,
    connect,
    echo_roundtrip,
    free_port,
    receive_stream,
    send_stream,
    unhandled_errors,
)
from relay_fixtures import stock_local_forward

pytestmark = pytest.mark.integration


def stock_reverse(
    start_ssh: Callable[..., SshProcess],
    ssh_command: Callable[..., list[str]],
    sshd: Sshd,
    kh: Path,
    spec: str,
) -> tuple[SshProcess, int]:
    """Run ``ssh -N -R 127.0.0.1:spec`` and return it with the port the server bound.

    The listener is bound on 127.0.0.1 alone: with no address, sshd binds the port it
    allocates on both loopbacks and keeps the forward if one of them is taken, and under
    two test workers another worker's listener held 127.0.0.1:P while this sshd had P on
    ::1 only, so the test's bytes went to the other worker."""
    ssh = start_ssh(
        ssh_command(sshd.port, kh, "-v", "-N", "-o", "ExitOnForwardFailure=yes",
                    "-R", f"127.0.0.1:{spec}")
    )
    listen = spec.split(":")[0]
    if listen == "0":
        m = ssh.wait_stderr(r"Allocated port (\d+) for remote forward")
        return ssh, int(m.group(1))
    ssh.wait_stderr(rf"remote forward success for: listen (?:127\.0\.0\.1:)?{listen}\b")
    return ssh, int(listen)


def test_sshd_runs_commands_as_named_host(
    sshd_factory: Callable[[str], Sshd],
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
) -> None:
    a, b = sshd_factory("alpha"), sshd_factory("beta")
    assert a.port != b.port
    for s in (a, b):
        kh = known_hosts(s.known_hosts_line())
        out = subprocess.run(
            ssh_command(s.port, kh, command="echo $LABRELAY_TEST_HOST"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == s.name
        assert s.fingerprint().startswith("SHA256:")
        assert "Accepted publickey for root" in s.log_text()


def test_wrong_known_hosts_is_refused_by_stock_ssh(
    sshd_factory: Callable[[str], Sshd],
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
) -> None:
    a, b = sshd_factory("alpha"), sshd_factory("beta")
    kh = known_hosts(b.known_hosts_line(port=a.port))  # b's key under a's address
    out = subprocess.run(
        ssh_command(a.port, kh, command="true"), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in out.stderr


def test_stock_reverse_forward_moves_bytes(
    sshd: Sshd,
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    kh = known_hosts(sshd.known_hosts_line())
    echo = targets.echo(greeting=b"hello\n")
    _, port = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{echo.port}")
    payload = DataStream(1, 4 * MiB).bytes()
    assert echo_roundtrip(port, payload, greeting=b"hello\n") == payload

    sink = targets.sink()
    _, port = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{sink.port}")
    up = DataStream(2, 16 * MiB)
    send_stream(port, up)
    got = sink.result()
    assert (got.nbytes, got.sha256) == (up.size, up.sha256)

    down = DataStream(3, 16 * MiB)
    source = targets.source(down)
    _, port = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{source.port}")
    got = receive_stream(port)
    assert (got.nbytes, got.sha256) == (down.size, down.sha256)


def test_stock_local_forward(
    sshd: Sshd,
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    kh = known_hosts(sshd.known_hosts_line())
    echo = targets.echo()
    _ssh, port = stock_local_forward(
        start_ssh,
        lambda port: ssh_command(sshd.port, kh, "-v", "-N", "-o", "ExitOnForwardFailure=yes",
                                 "-L", f"127.0.0.1:{port}:127.0.0.1:{echo.port}"),
    )
    assert echo_roundtrip(port, b"through -L") == b"through -L"


def test_kill_and_restart_same_port(
    sshd: Sshd,
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    kh = known_hosts(sshd.known_hosts_line())
    echo = targets.echo()
    ssh, fwd = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{echo.port}")
    tree = {sshd.pid} | _descendants(sshd.pid)
    assert len(tree) >= 2  # the listener and at least one session process
    port = sshd.port

    sshd.kill()
    assert not sshd.running
    for pid in tree:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), pid
    assert ssh.wait_exit(30) == 255
    with pytest.raises(ConnectionRefusedError):
        connect(fwd, timeout=5).close()

    sshd.restart()
    assert sshd.port == port
    ssh, fwd = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{echo.port}")
    assert echo_roundtrip(fwd, b"again") == b"again"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def test_stop_sessions_keeps_listener(
    sshd: Sshd,
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    kh = known_hosts(sshd.known_hosts_line())
    echo = targets.echo()
    ssh, _ = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{echo.port}")
    sshd.stop_sessions()
    assert ssh.wait_exit(30) == 255
    assert sshd.running
    _, fwd = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{echo.port}")
    assert echo_roundtrip(fwd, b"still here") == b"still here"


def test_sigstop_all_freezes_server(sshd: Sshd) -> None:
    sshd.sigstop_all()
    try:
        with connect(sshd.port, timeout=5) as sock:
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(100)  # no banner from a frozen sshd
            sshd.sigcont_all()
            sock.settimeout(10)
            assert sock.recv(100).startswith(b"SSH-2.0-OpenSSH")
    finally:
        sshd.sigcont_all()


def test_proxy_blackhole_restore_kill(
    sshd: Sshd,
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    echo = targets.echo()
    proxy = targets.proxy(echo.address)
    payload = DataStream(4, 2 * MiB).bytes()
    assert echo_roundtrip(proxy.port, payload) == payload

    with connect(proxy.port, timeout=10) as sock:
        sock.sendall(b"before")
        assert sock.recv(100) == b"before"
        proxy.blackhole()
        sock.sendall(b"during")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        proxy.restore()
        sock.settimeout(10)
        assert sock.recv(100) == b"during"
        proxy.kill_all()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while sock.recv(100):
                pass

    # A stock ssh through the proxy, then a silent cut: keepalives notice it.
    up = targets.proxy(("127.0.0.1", sshd.port))
    kh = known_hosts(sshd.known_hosts_line(port=up.port))
    ssh = start_ssh(
        ssh_command(
            up.port,
            kh,
            "-N",
            "-o",
            "ServerAliveInterval=1",
            "-o",
            "ServerAliveCountMax=2",
            "-R",
            f"127.0.0.1:0:127.0.0.1:{echo.port}",  # one loopback: ::1 too could collide
        )
    )
    m = ssh.wait_stderr(r"Allocated port (\d+) for remote forward")
    assert echo_roundtrip(int(m.group(1)), b"via proxy") == b"via proxy"
    up.blackhole()
    ssh.wait_stderr(r"Timeout, server .* not responding", timeout=10)
    assert ssh.wait_exit(10) == 255


def test_pipeline_stall_is_detected_and_released(
    sshd: Sshd,
    known_hosts: Callable[..., Path],
    ssh_command: Callable[..., list[str]],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """The memory test's mechanism, with stock ssh as the forwarder."""
    kh = known_hosts(sshd.known_hosts_line())
    lazy = targets.lazy_reader()
    _, port = stock_reverse(start_ssh, ssh_command, sshd, kh, f"0:127.0.0.1:{lazy.port}")
    stream = DataStream(5, 128 * MiB)
    pusher = StallingPusher(port, stream)
    stalled_at = pusher.wait_stalled(120)
    assert lazy.connected.is_set()
    assert 0 < stalled_at < stream.size
    lazy.release.set()
    assert pusher.result(300).sent == stream.size
    got = lazy.result()
    assert (got.nbytes, got.sha256) == (stream.size, stream.sha256)


FAKE_AGENT = textwrap.dedent(
    """
    import json, signal, sys, time
    def emit(event, **fields):
        print(json.dumps({"event": event, "level": "info", "time": time.time(), **fields}),
              flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (emit("agent_stopped"), sys.exit(0)))
    emit("agent_started", pid=0)
    print("not json at all", flush=True)
    print("2024-01-01 [-] " + json.dumps({"event": "prefixed"}), flush=True)
    for i in range(3):
        emit("tick", n=i)
    print("oops", file=sys.stderr, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(3)
    signal.pause()
    """
)


def test_agent_process_events(tmp_path: Path) -> None:
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT)

    agent = AgentProcess([sys.executable, str(script), "wait"], name="fake")
    try:
        agent.wait_for("agent_started")
        assert agent.wait_for("tick", n=lambda n: n >= 1)["n"] == 1
        assert agent.wait_for("tick")["n"] == 2  # the cursor moved past n=1
        assert agent.wait_for("tick", since=0)["n"] == 0
        assert agent.wait_for("prefixed", since=0)["_index"] == 2
        assert any(e["text"] == "not json at all" for e in agent.events("_raw"))
        with pytest.raises(HarnessError, match="no never"):
            agent.wait_for("never", timeout=0.2)
        assert agent.rss_kb() > 0
        agent.stderr.wait_for("oops", 10)
        assert agent.stop() == 0
        assert agent.events("agent_stopped")
    finally:
        agent.kill()

    agent = AgentProcess([sys.executable, str(script), "exit"], name="fake")
    with pytest.raises(HarnessError, match=r"exited \(status 3\)") as info:
        agent.wait_for("never", timeout=30)
    assert "oops" in str(info.value)
    assert agent.wait_exit() == 3


ANSWERING_AGENT = textwrap.dedent(
    """
    import json, signal, sys
    # 2000 lines (many reads of the pipe, lines cut between them), then the line this
    # process logs before it "answers", then the answer on another channel (stderr)
    for i in range(2000):
        sys.stdout.write(json.dumps({"event": "filler", "n": i, "pad": "x" * 50}) + "\\n")
    print(json.dumps({"event": "answered"}), flush=True)
    print("answer", file=sys.stderr, flush=True)
    signal.pause()
    """
)


def test_events_include_every_line_written_before_the_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process that logs an event and then answers: once the answer is seen, the
    event is there, however late the stdout reader thread gets its turn (here it takes
    half a second over that line; under two xdist workers a synchronously logged
    refusal was missing once, test_channel_requests).  ``mark()`` is past it too."""
    script = tmp_path / "answering_agent.py"
    script.write_text(ANSWERING_AGENT)
    parse = AgentProcess._parse

    def slow_parse(line: str) -> dict[str, Any]:
        if "answered" in line:
            time.sleep(0.5)
        return parse(line)

    monkeypatch.setattr(AgentProcess, "_parse", staticmethod(slow_parse))
    for query in ("events", "mark"):
        agent = AgentProcess([sys.executable, str(script)], name="answering")
        try:
            agent.stderr.wait_for("answer", 30)
            if query == "events":
                assert len(agent.events("answered")) == 1
                assert [e["n"] for e in agent.events("filler")] == list(range(2000))
            else:
                assert agent.mark() == 2001
        finally:
            agent.kill()


STDERR_ANSWERING = textwrap.dedent(
    """
    import json, signal, sys
    # as ANSWERING_AGENT, on stderr (sshd's -e log, ssh -v, the relay's connect audit):
    # 2000 lines, the line logged before the answer, then the answer (an event)
    for i in range(2000):
        sys.stderr.write(f"filler {i} " + "x" * 50 + "\\n")
    print("answered", file=sys.stderr, flush=True)
    print(json.dumps({"event": "answer"}), flush=True)
    signal.pause()
    """
)


@pytest.mark.parametrize("query", ["text", "lines", "mark"])
def test_stderr_includes_every_line_written_before_the_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str,
) -> None:
    """The stderr logs (``LineLog``: a process's stderr, sshd's log, ssh's stdout) are
    read by a thread too: once the answer is seen, a line written before it is there,
    however late that thread gets its turn (here half a second over that line).  The
    twin of the stdout case above; both go through ``PipeReader``."""
    script = tmp_path / "stderr_answering.py"
    script.write_text(STDERR_ANSWERING)
    append = LineLog.append

    def slow_append(self: LineLog, line: str) -> None:
        if line == "answered":
            time.sleep(0.5)
        append(self, line)

    monkeypatch.setattr(LineLog, "append", slow_append)
    agent = AgentProcess([sys.executable, str(script)], name="stderr-answering")
    try:
        agent.wait_for("answer", timeout=30)
        if query == "text":
            assert agent.stderr.text().splitlines()[-1] == "answered"
        elif query == "lines":
            lines = agent.stderr.lines
            assert [int(line.split()[1]) for line in lines[:-1]] == list(range(2000))
            assert lines[-1] == "answered"
        else:
            assert agent.stderr.mark() == 2001
    finally:
        agent.kill()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_unhandled_errors_finds_critical_events_and_unhandled_tracebacks() -> None:
    """The teardown check of the integration, security and e2e fixtures: an event at
    level critical or one whose text is Twisted's "Unhandled Error" is found, with the
    process's name; other events and processes without a JSON log are not."""
    lines = [{"event": "a", "level": "critical", "text": "boom"},
             {"event": "b", "level": "error", "text": "Unhandled Error\nTraceback ..."},
             {"event": "c", "level": "error", "text": "a handled failure"}]
    script = "import json\n" + "".join(f"print(json.dumps({e!r}))\n" for e in lines)
    proc = AgentProcess([sys.executable, "-c", script], name="logger")
    assert proc.proc.wait(timeout=30) == 0
    proc.stop()
    ssh = SshProcess([sys.executable, "-c", "print('Unhandled Error')"], name="not-json")
    assert ssh.proc.wait(timeout=30) == 0
    ssh.stop()
    found = unhandled_errors([proc, ssh])
    assert [(name, e["event"]) for name, e in found] == [("logger", "a"), ("logger", "b")]
