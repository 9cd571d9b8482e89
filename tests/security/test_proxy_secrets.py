"""Proxy credentials (``Proxy=http://user:pass@host:port``, ``https_proxy``) go to the
proxy and nowhere else (round 19).

* A proxy URL refused as malformed was quoted whole (``no host in proxy URL
  'http://alice:hunter2@'``), or urllib's own message was (a password with an unencoded
  ``/``, ``#`` or ``?`` is split so that its first part reads as the port: ``Port could
  not be cast to integer value as 'hunter2'``), on the terminal, the agent's log and
  the journal: now the credentials are ``***`` in every refusal, from the command line,
  the config and the environment.
* With a proxy that asks for them (407), ``labrelay connect -v`` and the agent say
  nothing of them (neither the password nor the Basic token), and ``Transport=auto``
  sends them only in the proxy's ``CONNECT``: not to the relay's SSH or TLS port.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env
from harness import LOOPBACK, AgentProcess, close_woken, free_port, make_key
from test_tls_proxy_attacks import HostileProxy, hostile_proxy  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.security]

SECRET = "hunter2"
TOKEN = base64.b64encode(f"alice:{SECRET}".encode()).decode()


def _connect(tmp_path: Path, *options: str, env: dict[str, str] | None = None,
             port: int = 22) -> subprocess.CompletedProcess[str]:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    key = make_key(tmp_path / "id", "alice")
    argv = [sys.executable, "-m", "relay", "connect", "-v", "-i", str(key.path),
            "-p", str(port), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "ConnectTimeout=5", *options, f"alice@{LOOPBACK}", "gpu-cluster"]
    return subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **child_env(), **(env or {})}, cwd=REPO_ROOT,
                          text=True)


MALFORMED = [
    f"http://alice:{SECRET}@",  # no host
    f"http://alice:{SECRET}/x@proxy.test:3128",  # an unencoded / in the password
    f"http://alice:{SECRET}#1@proxy.test:3128",
    f"http://alice:{SECRET}@proxy.test:99999",
    f"http://alice:{SECRET}@proxy.test:3128/path",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_proxy_url_is_refused_without_its_credentials(
        tmp_path: Path, url: str) -> None:
    """On the command line, in ``https_proxy`` (``Proxy=env``) and given twice."""
    for options, env in ((["-o", "Transport=tls", "-o", f"Proxy={url}"], None),
                         (["-o", "Transport=tls", "-o", "Proxy=env"], {"https_proxy": url}),
                         (["-o", f"Proxy={url}", "-o", f"Proxy={url}x"], None)):
        out = _connect(tmp_path, *options, env=env)
        print(f"\n{options[-1][:40]}: {out.stderr.strip()[:300]}")
        assert out.returncode != 0
        assert "proxy" in out.stderr.lower(), out.stderr  # it says why
        assert SECRET not in out.stderr and SECRET not in out.stdout, out.stderr
        assert "***@" in out.stderr, out.stderr


class _Recorder:
    """A port that records every byte sent to it and closes (the relay's SSH or TLS
    port as an eavesdropper on it would see them)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server((LOOPBACK, self.port))
        self.seen = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    while chunk := conn.recv(4096):
                        self.seen += chunk
                except OSError:
                    pass

    def close(self) -> None:
        close_woken(self.listener)


@pytest.fixture
def recorders() -> Iterator[Callable[[], _Recorder]]:
    made: list[_Recorder] = []

    def make() -> _Recorder:
        made.append(_Recorder())
        return made[-1]

    yield make
    for r in made:
        r.close()


def _needs_credentials(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                 b"Proxy-Authenticate: Basic realm=\"lab\"\r\nContent-Length: 0\r\n\r\n")


def test_credentials_go_to_the_proxy_only_and_are_never_shown(
        hostile_proxy: Callable[..., HostileProxy],  # noqa: F811
        recorders: Callable[[], _Recorder], tmp_path: Path,
        start_process: Callable[..., AgentProcess]) -> None:
    """``Transport=auto`` tries the SSH port, the TLS port, then TLS through the proxy:
    only the proxy's ``CONNECT`` carries ``Proxy-Authorization``; ``labrelay connect -v``
    and the agent's log (``-v``, JSON) show the proxy as ``alice:***@``."""
    proxy = hostile_proxy(_needs_credentials)
    ssh_port, tls_port = recorders(), recorders()
    url = f"http://alice:{SECRET}@{LOOPBACK}:{proxy.port}"
    out = _connect(tmp_path, "-o", "Transport=auto", "-o", f"TLSPort={tls_port.port}",
                   "-o", f"Proxy={url}", port=ssh_port.port)
    print(f"\nlabrelay connect -v: {out.stderr.strip()[-400:]}")
    assert out.returncode != 0
    assert f"Proxy-Authorization: Basic {TOKEN}".encode() in proxy.requests[0]
    key = make_key(tmp_path / "lab", "lab_pc")
    agent = start_process([sys.executable, "-m", "relay", "agent", "-v", "--log-format",
                           "json", "-p", str(ssh_port.port), "-i", str(key.path),
                           "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                           "-o", "Transport=auto", "-o", f"TLSPort={tls_port.port}",
                           "-o", f"Proxy={url}", "-R", "web:8080:127.0.0.1:1",
                           f"lab_pc@{LOOPBACK}"], name="agent")
    failed = agent.wait_for("link_route_failed", timeout=30, reason=lambda r: "407" in r)
    assert "alice:***@" in failed["route"], failed
    agent.stop()
    for where, text in (("connect", out.stderr + out.stdout),
                        ("the agent's log", json.dumps(agent.events()) + agent.stderr_text())):
        assert SECRET not in text and TOKEN not in text, where
    for port in (ssh_port, tls_port):
        assert SECRET.encode() not in port.seen and TOKEN.encode() not in port.seen
    assert len(proxy.requests) >= 2
