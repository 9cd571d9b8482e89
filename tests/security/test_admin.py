"""DNS rebinding and scrapers on the admin endpoint of a real relay.

A web page at ``http://evil.example:PORT/`` whose name the attacker re-points at
127.0.0.1 makes the operator's browser send ``GET /status.json`` with ``Host:
evil.example:PORT`` to the relay's admin port; before the fix the relay answered with
who is connected from where.  Raw HTTP over a socket plays that browser: the relay
must refuse it with no JSON, answer requests addressed to itself, require the bearer
token when one is configured, and ``labrelay status`` must keep working.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Targets, child_env, relay_command
from harness import (
    LOOPBACK,
    AgentProcess,
    RelayNode,
    SshProcess,
    echo_roundtrip,
    make_key,
    ssh_argv,
)
from relay_fixtures import admin_port, stock_local_forward

pytestmark = [pytest.mark.integration, pytest.mark.security]

TOKEN = "3f1c2a9b8d7e6f5a4b3c2d1e0f9a8b7c"


def http_get(port: int, host: str | None, path: str = "/status.json",
             authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request; the status code, headers and body."""
    lines = [f"GET {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    lines += ["Connection: close", "", ""]
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status.split()[1]), headers, body


def labrelay_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "status", *args], cwd=REPO_ROOT,
                          env={**os.environ, **child_env()}, capture_output=True, text=True,
                          timeout=60)


def test_dns_rebinding_is_refused_and_status_still_works(
    start_relay: Callable[..., RelayNode], start_ssh: Callable[..., SshProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    lab_pc, alice = make_key(tmp_path / "lab_pc", "lab_pc"), make_key(tmp_path / "alice", "alice")
    relay = start_relay(agents=[f'permitlisten="web:8080" {lab_pc.public_blob()} lab_pc'],
                        users=[f'permitopen="web:8080" {alice.public_blob()} alice'])
    web = targets.echo(greeting=b"WEB ")
    agent = start_ssh(ssh_argv(relay.port, lab_pc.path, relay.known_hosts, "-v", "-N",
                               "-o", "ExitOnForwardFailure=yes",
                               "-R", f"web:8080:127.0.0.1:{web.port}", user="lab_pc"),
                      name="stock-agent")  # fmt: skip
    agent.wait_stderr(r"remote forward success for: listen web:8080,")
    _ssh, local = stock_local_forward(
        start_ssh,
        lambda port: ssh_argv(relay.port, alice.path, relay.known_hosts, "-v", "-N",
                              "-o", "ExitOnForwardFailure=yes",
                              "-L", f"127.0.0.1:{port}:web:8080", user="alice"),
        name="alice")  # fmt: skip
    relay.wait_for("relay_connected", name="alice")
    port = relay.admin_port
    relay.wait_for("admin_listening", since=0, port=port)

    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}",
                 "127.0.0.1", f"127.0.0.1:{port + 1}", None):
        for path in ("/status.json", "/metrics", "/"):
            code, _, body = http_get(port, host, path)
            assert code == 421, (host, path, code, body)
            assert b"{" not in body and b"alice" not in body and b"labrelay_" not in body

    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        code, headers, body = http_get(port, host)
        assert code == 200 and headers["content-type"] == "application/json", (host, code)
        users = json.loads(body)["relay"]["users"]
        assert any(u.get("name") == "alice" for u in users), users
    code, _, body = http_get(port, f"localhost:{port}", "/metrics")
    assert code == 200 and b"labrelay_relay_users_connected 1.0" in body

    done = labrelay_status("--admin", relay.admin)
    assert done.returncode == 0, done.stderr
    assert "1 agent(s), 1 user connection(s)" in done.stdout
    assert echo_roundtrip(local, b"still here", greeting=b"WEB ") == b"still here"


def start_relay_with_token(start_process: Callable[..., AgentProcess], directory: Path,
                           token_mode: int = 0o600) -> tuple[RelayNode, Path]:
    directory.mkdir()
    key = make_key(directory / "alice", "alice")
    (directory / "agents").write_text("")
    (directory / "users").write_text(f'permitopen="web:8080" {key.public_blob()} alice\n')
    token_file = directory / "admin.token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, token_mode)
    config = directory / "node.toml"
    config.write_text(f"""\
[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"

[relay]
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
agents_file = "agents"
users_file = "users"
""")
    proc = start_process(relay_command("--config", str(config)), name="relay-token")
    return RelayNode(proc, directory, admin_port(proc)), token_file


def test_bearer_token_for_scrapers(
    start_process: Callable[..., AgentProcess], tmp_path: Path,
) -> None:
    relay, token_file = start_relay_with_token(start_process, tmp_path / "relay")
    port = relay.admin_port
    relay.wait_for("admin_listening", since=0, port=port)
    here = f"127.0.0.1:{port}"

    code, headers, body = http_get(port, here)
    assert code == 401 and headers["www-authenticate"].startswith("Bearer") and b"{" not in body
    for wrong in ("Bearer " + TOKEN[:-1] + "0", "Bearer", "Basic " + TOKEN, TOKEN):
        code, _, body = http_get(port, here, authorization=wrong)
        assert code == 401 and b"{" not in body, wrong
    # the right token does not make a misdirected request acceptable
    code, _, body = http_get(port, "evil.example", authorization="Bearer " + TOKEN)
    assert code == 421 and b"{" not in body
    code, _, body = http_get(port, f"localhost:{port}", authorization="Bearer " + TOKEN)
    assert code == 200 and json.loads(body)["relay"]["users"] == []
    code, _, body = http_get(port, here, "/metrics", authorization="Bearer " + TOKEN)
    assert code == 200 and b"labrelay_relay_agents_connected 0.0" in body

    done = labrelay_status("--admin", relay.admin, "--token-file", str(token_file))
    assert done.returncode == 0, done.stderr
    assert "relay on 127.0.0.1" in done.stdout
    refused = labrelay_status("--admin", relay.admin)
    assert refused.returncode == 1 and "401" in refused.stderr and "--token-file" in refused.stderr


def test_a_token_file_readable_by_others_stops_the_relay(tmp_path: Path) -> None:
    directory = tmp_path / "relay"
    directory.mkdir()
    token_file = directory / "admin.token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o644)
    (directory / "users").write_text("")
    config = directory / "node.toml"
    config.write_text(f"""\
[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"

[relay]
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
users_file = "users"
""")
    done = subprocess.run([sys.executable, "-m", "relay", "relay", "--config", str(config)],
                          cwd=REPO_ROOT, env={**os.environ, **child_env()},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "admin.token_file" in done.stderr and "chmod 600" in done.stderr



def post_reload(port: int, token: str) -> tuple[int, bytes]:
    """``POST /reload`` as ``labrelay reload`` sends it, with the bearer token."""
    request = (f"POST /reload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {token}\r\nX-Labrelay-Action: reload\r\n"
               "Content-Length: 0\r\nConnection: close\r\n\r\n")
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_rewritten_token_file_is_in_force_at_the_next_request(
    start_process: Callable[..., AgentProcess], tmp_path: Path,
) -> None:
    """docs/security.md: the token file is read again at the first request after it
    changed (until round 16 it was read at start-up only, and rotating it needed a
    restart).  No reload is needed; a reload changes nothing more; the old token is
    refused from then on, on every path, ``POST /reload`` included; a file opened up to
    others refuses everything, the new token too, until it is fixed."""
    relay, token_file = start_relay_with_token(start_process, tmp_path / "relay")
    new = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"

    def answers(port: int, token: str) -> int:
        return http_get(port, f"127.0.0.1:{port}", authorization="Bearer " + token)[0]

    port = relay.admin_port
    # an answer means startService ran, so SIGHUP is handled (before, it ends the process)
    assert answers(port, TOKEN) == 200
    token_file.write_text(new + "\n")  # still 0600
    assert (answers(port, TOKEN), answers(port, new)) == (401, 200)
    assert relay.wait_for("admin_token_changed")["path"] == str(token_file)
    mark = relay.mark()
    os.kill(relay.pid, signal.SIGHUP)
    assert relay.wait_for("reload_done", since=mark)["changes"] == []
    assert (answers(port, TOKEN), answers(port, new)) == (401, 200)
    assert post_reload(port, TOKEN)[0] == 401
    code, body = post_reload(port, new)
    assert code == 200 and json.loads(body)["ok"] is True, (code, body)

    token_file.chmod(0o644)
    assert (answers(port, TOKEN), answers(port, new)) == (503, 503)
    assert "0644" in relay.wait_for("admin_token_invalid")["problem"]
    token_file.chmod(0o600)
    assert answers(port, new) == 200
