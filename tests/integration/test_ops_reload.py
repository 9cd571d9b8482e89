"""Issue 14, reload and check: a real relay and a real agent change their config under
a 256 MiB scp in flight (SIGHUP), and a broken config changes nothing.

The relay's grants are ``[[relay.agent]]``/``[[relay.user]]`` tables of its node
config (what needed a restart before); the agent's forwards are ``[[link.remote]]``
tables of its own config.  ``labrelay check`` and ``labrelay reload`` are run as an
operator (or systemd's ExecStartPre=/ExecReload=) would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import (
    AgentProcess,
    DataStream,
    KeyPair,
    MiB,
    RelayNode,
    Sshd,
    SshProcess,
    connect,
    echo_roundtrip,
    find_program,
    free_port,
    known_hosts_line,
    make_key,
    sha256_hex,
    ssh_argv,
)
from relay_fixtures import jump_config

pytestmark = pytest.mark.integration

SIZE = 256 * MiB


def labrelay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=REPO_ROOT,
                          env={**os.environ, **child_env()}, capture_output=True, text=True,
                          timeout=timeout)


def relay_toml(admin_port: int, state: Path, principals: str, extra: str = "") -> str:
    return f"""\
[admin]
listen = "127.0.0.1:{admin_port}"

[relay]
listen = "127.0.0.1:0"
state_dir = "{state}"
public_wait = 5
penalty_exempt = ["127.0.0.1"]
{extra}
{principals}
"""


def principal(kind: str, name: str, key: KeyPair, *services: str) -> str:
    listed = ", ".join(f'"{s}"' for s in services)
    return (f'[[relay.{kind}]]\nname = "{name}"\nkeys = ["{key.public_blob()} {name}"]\n'
            f"services = [{listed}]\n")


def agent_toml(relay: RelayNode, key: KeyPair, forwards: dict[str, str]) -> str:
    text = f"""\
[[link]]
name = "relay"
host = "127.0.0.1"
port = {relay.port}
user = "lab_pc"
identity = "{key.path}"
known_hosts = "{relay.known_hosts}"
keepalive_interval = 1
backoff_initial = 0.2
backoff_max = 1.0
fast_path_pool = 0
"""
    for name, (listen_connect) in forwards.items():
        listen, connect_to = listen_connect.split("=")
        text += (f'\n[[link.remote]]\nname = "{name}"\nlisten = "{listen}"\n'
                 f'connect = "{connect_to}"\n')
    return text


def local_forward(start_ssh: Callable[..., SshProcess], relay: RelayNode, key: KeyPair,
                  service: str, user: str) -> tuple[int, SshProcess]:
    port = free_port()
    proc = start_ssh(ssh_argv(relay.port, key.path, relay.known_hosts, "-v", "-N",
                              "-o", "ExitOnForwardFailure=yes",
                              "-L", f"127.0.0.1:{port}:{service}", user=user),
                     name=f"ssh-L-{user}")  # fmt: skip
    proc.wait_stderr(r"new port-listener")
    return port, proc


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Bounded polling, for what no event announces (bytes moving, a socket closing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def test_sighup_under_a_256mib_scp_adds_a_service_and_a_user_and_revokes_one(
    start_process: Callable[..., AgentProcess],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    sshd_factory: Callable[[str], Sshd],
    client_key: KeyPair,
    targets: Targets,
    tmp_path: Path,
) -> None:
    from conftest import relay_command

    keys = {n: make_key(tmp_path / "keys" / n, n) for n in ("lab_pc", "alice", "bob", "carol")}
    gpu = sshd_factory("gpu_cluster")
    web = targets.echo(greeting=b"web\n")
    directory = tmp_path / "relay"
    directory.mkdir()
    admin_port = free_port()
    config = directory / "node.toml"
    before = (principal("agent", "lab_pc", keys["lab_pc"], "gpu-cluster:22")
              + principal("user", "alice", keys["alice"], "gpu-cluster:22")
              + principal("user", "bob", keys["bob"], "gpu-cluster:22"))
    config.write_text(relay_toml(admin_port, directory / "state", before))
    check = labrelay("check", str(config))
    assert (check.returncode, check.stdout.strip()) == (0, f"{config}: OK"), check.stderr
    relay = RelayNode(start_process(relay_command("--config", str(config)), name="relay"),
                      directory, admin_port)
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))

    agent_config = tmp_path / "agent.toml"
    gpu_fwd = f"gpu-cluster:22=127.0.0.1:{gpu.port}"
    agent_config.write_text(agent_toml(relay, keys["lab_pc"], {"gpu": gpu_fwd}))
    agent = start_agent("--config", str(agent_config), name="agent")
    agent.wait_for("forward_ready", timeout=30, forward="gpu")

    # bob holds a session to gpu-cluster (its sshd banner arrived through the relay).
    bob_port, bob_ssh = local_forward(start_ssh, relay, keys["bob"], "gpu-cluster:22", "bob")
    bob_sock = connect(bob_port)
    assert bob_sock.recv(64).startswith(b"SSH-2.0-")

    # alice's 256 MiB scp, in flight across the reload.
    stream = DataStream(14, SIZE)
    src, dst = tmp_path / "upload.bin", tmp_path / "arrived.bin"
    with open(src, "wb") as f:
        for chunk in stream.chunks():
            f.write(chunk)
    cfg = jump_config(tmp_path / "ssh_config", relay, keys["alice"], client_key)
    scp = subprocess.Popen(
        [find_program("scp") or "scp", "-q", "-F", str(cfg), "-J",
         f"alice@127.0.0.1:{relay.port}", str(src), f"root@gpu-cluster:{dst}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def alice_moved() -> int:
            sessions = relay.status()["relay"]["sessions"]
            return max((s["bytes_to_service"] for s in sessions if s["user"] == "alice"),
                       default=0)

        wait_until("alice's scp moves 8 MiB", lambda: alice_moved() >= 8 * MiB, 60)

        # -- the change: a service (web:8080) for lab_pc, a user (carol), bob revoked.
        after = (principal("agent", "lab_pc", keys["lab_pc"], "gpu-cluster:22", "web:8080")
                 + principal("user", "alice", keys["alice"], "gpu-cluster:22")
                 + principal("user", "carol", keys["carol"], "web:8080"))
        config.write_text(relay_toml(admin_port, directory / "state", after))
        agent_config.write_text(agent_toml(relay, keys["lab_pc"], {
            "gpu": gpu_fwd, "web": f"web:8080=127.0.0.1:{web.port}"}))
        relay_mark, agent_mark = relay.mark(), agent.mark()
        hup = time.time()
        os.kill(relay.pid, signal.SIGHUP)
        os.kill(agent.proc.pid, signal.SIGHUP)
        done = relay.wait_for("reload_done", since=relay_mark)
        assert "user bob" not in json.dumps(done)  # the summary names sections, not keys
        registered = relay.wait_for("relay_service_registered", since=relay_mark,
                                    service="web:8080")
        revoked = relay.wait_for("relay_key_revoked", since=relay_mark, name="bob")
        assert scp.poll() is None, "the scp ended before the reload was applied"
        in_flight = alice_moved()
        agent_done = agent.wait_for("reload_done", since=agent_mark)
        assert "link relay: forward web added" in agent_done["changes"]
        carol_port, _ = local_forward(start_ssh, relay, keys["carol"], "web:8080", "carol")
        assert echo_roundtrip(carol_port, b"carol is in", greeting=b"web\n") == b"carol is in"
        carol_works = time.time()
        took = {"relay reloaded": done["time"] - hup,
                "web:8080 registered": registered["time"] - hup,
                "bob revoked": revoked["time"] - hup,
                "carol's first echo (incl. her ssh login)": carol_works - hup}
        print("\nreload under a 256 MiB scp: " + ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in took.items()))
        print(f"alice's scp had moved {in_flight / MiB:.0f} of 256 MiB when the reload "
              "was applied")
        assert max(took.values()) < 1.0, took
        assert in_flight < SIZE

        # bob is out: his session and his connection closed, and he cannot come back.
        bob_sock.settimeout(10)
        _drained(bob_sock)
        bob_ssh.proc.wait(timeout=10)
        again = subprocess.run(ssh_argv(relay.port, keys["bob"].path, relay.known_hosts,
                                        "-N", user="bob"), capture_output=True, timeout=30)
        assert again.returncode != 0 and b"Permission denied" in again.stderr

        # alice's scp was never touched.
        _, err = scp.communicate(timeout=240)
        assert scp.returncode == 0, err.decode()
    finally:
        if scp.poll() is None:
            scp.kill()
            scp.wait()
    assert dst.stat().st_size == SIZE and sha256_hex(dst.read_bytes()) == stream.sha256
    # the relay logs her session's close when its channel closes, which may come after
    # scp's exit: await it (read at once it could be missing)
    relay.wait_for("session_close", since=0, advance=False, user="alice",
                   bytes_to_service=lambda n: n > SIZE, timeout=30)
    relay.proc.assert_no_event("session_close", since=relay_mark, user="alice",
                               why=lambda w: "revoked" in w or "no longer" in w)

    # -- a broken config on SIGHUP changes nothing and lists every problem.
    broken = after.replace('services = ["web:8080"]', 'services = ["web:8080"]\nmax_sessions = 0')
    config.write_text(relay_toml(admin_port, directory / "state",
                                 broken + '[[relay.user]]\nname = "dave"\nkeys = ["nonsense"]\n',
                                 extra="idle_timeout = -1"))
    mark = relay.mark()
    os.kill(relay.pid, signal.SIGHUP)
    failed = relay.wait_for("reload_failed", since=mark)
    assert failed["n"] == 3, failed["errors"]
    assert any("relay.idle_timeout" in e for e in failed["errors"])
    assert any("relay.user[1].max_sessions" in e for e in failed["errors"])
    assert any("relay.user[2].keys" in e for e in failed["errors"])
    assert echo_roundtrip(carol_port, b"still in", greeting=b"web\n") == b"still in"
    status = relay.status()
    assert status["reload"]["last"]["ok"] is False
    assert status["reload"]["reloads"] == {"success": 1, "failure": 1}
    # `labrelay relay` paces its garbage collection (relay.ops.gcpace), and it ran
    # during the scp and the reloads.
    assert status["gc"]["paced"] is True and sum(status["gc"]["collections"]) > 0, status["gc"]
    # the same problems from `labrelay check` (exit 2) and `labrelay reload` (exit 1)
    check = labrelay("check", str(config))
    assert check.returncode == 2 and check.stderr.count("labrelay: ") == 4, check.stderr
    reload = labrelay("reload", "--config", str(config))
    assert reload.returncode == 1 and "reload refused (3 problem(s))" in reload.stderr

    # fixed again, `labrelay reload` applies it (nothing changed since the good one).
    config.write_text(relay_toml(admin_port, directory / "state", after))
    reload = labrelay("reload", "--admin", relay.admin)
    assert reload.returncode == 0, reload.stderr
    assert relay.status()["reload"]["last"]["ok"] is True
    assert relay.events(level="critical") == []


def _drained(sock: socket.socket) -> None:
    """Reads until EOF or a reset (the relay closed bob's session); a timeout fails."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def test_reload_endpoint_wants_its_header_and_post(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    """``POST /reload`` without ``X-Labrelay-Action: reload`` (what a cross-site form
    would send) is refused with 403 and reloads nothing; ``GET /reload`` is not served."""
    import urllib.error
    import urllib.request

    relay = start_relay()
    relay.wait_for("admin_listening", since=0)
    request = urllib.request.Request(f"http://{relay.admin}/reload", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{relay.admin}/reload", timeout=10)
    assert caught.value.code == 405
    relay.proc.assert_no_event("reload_done")
    ok = labrelay("reload", "--admin", relay.admin)
    assert ok.returncode == 0, ok.stderr
    assert relay.wait_for("reload_done")["changes"] == []
    assert ok.stdout == "reloaded: nothing changed\n"


def test_reload_of_a_file_toml_cannot_parse_is_refused_by_the_relay_and_shown(
    start_process: Callable[..., AgentProcess], tmp_path: Path,
) -> None:
    """``labrelay reload --config F`` (systemd's ExecReload=) with a TOML syntax error
    in F: the CLI finds the admin endpoint in F's ``[admin]`` table alone and asks the
    relay, so the refusal, with the line and column, is in the relay's journal
    (``reload_failed``) and in ``/status.json``, and the CLI exits 1.  Before, the CLI
    stopped at its own parse (exit 2) and the relay, never asked, showed its last
    reload as ok.  A file whose ``[admin]`` itself is broken still exits 2 and says
    the relay was not asked."""
    from conftest import relay_command

    key = make_key(tmp_path / "keys" / "alice", "alice")
    directory = tmp_path / "relay"
    directory.mkdir()
    admin_port = free_port()
    config = directory / "node.toml"
    good = relay_toml(admin_port, directory / "state", principal("user", "alice", key, "web:8080"))
    config.write_text(good)
    relay = RelayNode(start_process(relay_command("--config", str(config)), name="relay"),
                      directory, admin_port)
    relay.wait_for("admin_listening", since=0)
    assert labrelay("reload", "--config", str(config)).returncode == 0
    assert relay.status()["reload"]["last"]["ok"] is True

    config.write_text(good.replace("public_wait = 5", "public_wait = = 5"))
    at = f"line {good.splitlines().index('public_wait = 5') + 1}, column"
    mark = relay.mark()
    out = labrelay("reload", "--config", str(config))
    assert out.returncode == 1, out
    assert "reload refused (1 problem(s))" in out.stderr and at in out.stderr, out.stderr
    failed = relay.wait_for("reload_failed", since=mark)
    assert len(failed["errors"]) == 1 and at in failed["errors"][0], failed
    last = relay.status()["reload"]["last"]
    assert last["ok"] is False and at in last["errors"][0], last

    config.write_text(good.replace("[admin]", "[admin"))
    mark = relay.mark()
    out = labrelay("reload", "--config", str(config))
    assert out.returncode == 2, out
    assert "the running labrelay was not asked to reload" in out.stderr, out.stderr
    assert "--admin ADDR:PORT" in out.stderr, out.stderr
    relay.proc.assert_no_event("reload_failed", since=mark)
    relay.proc.assert_no_event("reload_done", since=mark)
    assert relay.events(level="critical") == []


def test_check_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    """``labrelay check`` (ExecStartPre=): each bad entry, a missing key file and a bad
    grant-file line, all at once; exit 2.  Nothing is created (no state_dir)."""
    users = tmp_path / "users"
    users.write_text('permitopen="web:8080" ssh-ed25519 AAAAnotakey alice\n'
                     'permitopen="bad name!" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBUYQ1BAWDNb'
                     "B+RDfTw+aDhQTjOiUNO9XmXSvMyzu9nZ bob\n")
    config = tmp_path / "node.toml"
    config.write_text(f"""\
[relay]
listen = "127.0.0.1:0"
state_dir = "{tmp_path / "state"}"
users_file = "users"
max_channels = 0

[[link]]
name = "up"
host = "127.0.0.1"
identity = "{tmp_path / "missing_key"}"

[[link]]
name = "bad"
host = "127.0.0.1"
port = 70000
""")
    out = labrelay("check", str(config))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("labrelay: ")]
    assert any("link[1].port" in line for line in lines), out.stderr
    assert any("relay.max_channels" in line for line in lines), out.stderr
    assert lines[-1] == f"labrelay: {config}: {len(lines) - 1} problem(s)"
    assert len(lines) - 1 >= 2
    assert not (tmp_path / "state").exists()
    # with the syntax fixed, the files it names are checked: the key, each grant line
    config.write_text(config.read_text().replace("max_channels = 0", "max_channels = 8")
                      .replace("port = 70000", "port = 22"))
    out = labrelay("check", str(config))
    assert out.returncode == 2
    assert "link[0].identity" in out.stderr and f"{users}:1" in out.stderr \
        and f"{users}:2" in out.stderr, out.stderr
    assert "4 problem(s)" in out.stderr or "3 problem(s)" in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()


def test_a_part_a_reload_adds_that_cannot_run_is_logged_and_the_node_runs_on(
    start_process: Callable[..., AgentProcess], targets: Targets, tmp_path: Path,
) -> None:
    """A ``[[forward]]`` added by a reload on a port already in use: ``reload_done``,
    then ``reload_start_failed`` naming it; the process and its other hop keep running
    (at start-up the same error stops it, exit 1); removing it again is a clean reload."""
    echo = targets.echo(greeting=b"hop\n")
    first = free_port()
    admin = free_port()
    config = tmp_path / "node.toml"
    hop = f'[[forward]]\nname = "first"\nlisten = "127.0.0.1:{first}"\n' \
          f'connect = "127.0.0.1:{echo.port}"\n'
    config.write_text(f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n{hop}')
    node = start_process([sys.executable, "-m", "relay", "run", "--log-format", "json",
                          str(config)], name="node")
    node.wait_for("admin_listening")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config.write_text(config.read_text() + f'\n[[forward]]\nname = "second"\n'
                          f'listen = "127.0.0.1:{taken}"\nconnect = "127.0.0.1:{echo.port}"\n')
        out = labrelay("reload", "--config", str(config))
        assert out.returncode == 0 and out.stdout == "forward second: started\n", out
        failed = node.wait_for("reload_start_failed")
        assert "forward second: cannot listen" in failed["why"]
    assert echo_roundtrip(first, b"still here", greeting=b"hop\n") == b"still here"
    node.assert_no_event("fatal")
    config.write_text(f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n{hop}')
    out = labrelay("reload", "--config", str(config))
    assert out.returncode == 0 and out.stdout == "forward second: stopped\n", out


def test_a_restart_only_key_changed_by_a_reload_is_said_and_the_running_value_stays(
    start_process: Callable[..., AgentProcess], tmp_path: Path,
) -> None:
    """operations.md's reload table: a changed restart-only key (here
    ``per_source_max_unauthenticated``, 10 → 2) is "**not applied**: logged as
    ``reload_needs_restart`` (the running value stays)", while a live key changed with
    it (``public_wait``) is applied; ``labrelay reload`` says which and exits 0.  The
    running value is checked by what it does: four connections from one source still
    each get the relay's version line, where a cap of 2 closes the third at accept.
    (Round 20's audit: only the diff was unit-tested; the event, the CLI's words and
    the running relay were not.)"""
    from conftest import relay_command

    directory = tmp_path / "relay"
    directory.mkdir()
    admin_port = free_port()
    config = directory / "node.toml"
    alice = make_key(tmp_path / "keys" / "alice", "alice")
    good = relay_toml(admin_port, directory / "state", principal("user", "alice", alice,
                                                                  "web:8080"))
    config.write_text(good)
    relay = RelayNode(start_process(relay_command("--config", str(config)), name="relay"),
                      directory, admin_port)
    relay.wait_for("admin_listening", since=0)

    config.write_text(good.replace("public_wait = 5",
                                   "public_wait = 6\nper_source_max_unauthenticated = 2"))
    mark = relay.mark()
    out = labrelay("reload", "--config", str(config))
    assert out.returncode == 0, out
    assert ("relay.per_source_max_unauthenticated: not changed until a restart (bound when "
            "the relay starts)") in out.stdout, out.stdout
    said = relay.wait_for("reload_needs_restart", since=mark)
    assert said["keypath"] == "relay.per_source_max_unauthenticated", said
    done = relay.wait_for("reload_done", since=mark)
    assert any("public_wait" in change for change in done["changes"]), done

    held = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in range(4)]
    try:
        for sock in held:
            assert sock.recv(64).startswith(b"SSH-2.0-labrelay"), "closed at accept"
        assert relay.status()["relay"]["admission"]["per_source_max_unauthenticated"] == 10
    finally:
        for sock in held:
            sock.close()
