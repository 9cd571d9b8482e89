"""The admin endpoint's caps are the config's ``[admin]`` settings, bound at start.

A relay started with ``max_connections_per_source = 2``, ``connection_lifetime = 2``
and ``max_body = 100`` holds two connections from 127.0.0.1 and closes the third at
accept, closes a connection 2 s after its accept (not 30), and answers ``413`` to a
161-byte body.  A reload that raises the per-source cap is reported as needing a
restart (``[admin]`` is bound when labrelay starts) and changes nothing.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import LOOPBACK, RelayNode

pytestmark = [pytest.mark.integration, pytest.mark.security]

ADMIN = "max_connections_per_source = 2\nconnection_lifetime = 2\nmax_body = 100\n"


def _closed_at_once(port: int) -> bool:
    """Whether a new connection is closed before any request (end of file or reset)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.settimeout(5)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def _reload(relay: RelayNode) -> dict[str, object]:
    request = urllib.request.Request(f"http://{relay.admin}/reload", data=b"", method="POST")
    request.add_header("X-Labrelay-Action", "reload")
    with urllib.request.urlopen(request, timeout=30) as r:
        return dict(json.load(r))


def test_the_admin_caps_are_settings_applied_at_start_only(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    relay = start_relay(admin_toml=ADMIN)
    port = relay.admin_port
    held = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(2)]
    try:
        assert _closed_at_once(port), "a third connection from one address was let in"
        relay.wait_for("admin_connection_refused", timeout=5, since=0)
        started = time.monotonic()
        held[0].settimeout(20)
        try:  # aborted by the relay at its deadline
            assert held[0].recv(1) == b""
        except ConnectionResetError:
            pass
        lifetime = time.monotonic() - started
        print(f"\nheld connection closed after {lifetime:.1f}s (connection_lifetime = 2)")
        assert lifetime < 10
    finally:
        for s in held:
            s.close()

    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 161\r\n"
                  b"\r\n" % port)
        s.settimeout(10)
        assert s.recv(64).startswith(b"HTTP/1.1 413")

    config = relay.dir / "node.toml"
    config.write_text(config.read_text().replace("max_connections_per_source = 2",
                                                 "max_connections_per_source = 4"))
    result = _reload(relay)
    assert result["ok"] is True
    assert "admin: not changed until a restart (the admin endpoint is bound when " \
           "labrelay starts)" in result["changes"], result  # type: ignore[operator]
    held = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(2)]
    try:
        assert _closed_at_once(port), "the reload changed the running cap"
    finally:
        for s in held:
            s.close()
