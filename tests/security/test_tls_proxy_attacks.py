"""The TLS port and the HTTP proxy path as an attacker would try them, each bounded in
time and memory (round 4's security pass; test_tls_hostile.py has the flood, garbage,
stall and foreign SNI/ALPN cases):

* a **slowloris** ClientHello, one byte every 0.1 s, so that bytes keep coming: closed at
  ``tls_handshake_timeout`` (2 s here) all the same, a deadline, not an idle timer;
* a client that sends **no SNI**: let in (docs: "one naming none is let in"), SSH
  answers; an SNI of 255 bytes of markup and control characters: refused;
* a **huge ClientHello**: a handshake message announcing 16 MiB, then 4 MiB of records:
  closed after the first record, the relay's RSS does not follow;
* a **hostile proxy** in front of ``labrelay connect``: an answer header that never ends
  (at full speed), one that trickles a byte every 0.2 s, and a proxy that never
  answers: each ends in an error naming the proxy, within the limit (16 KiB) or the
  ``ConnectTimeout``.

The attacker on the TLS port is 127.0.0.2 (its penalties do not touch alice, who
reaches gpu_cluster through the TLS port before and after, 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env
from harness import LOOPBACK, close_woken, free_port, make_key
from OpenSSL import SSL
from relay_fixtures import wait_until
from test_admission import _dial
from test_tls_hostile import Site, _client_hello, _recv_all, site  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.security]


# --- the TLS port -----------------------------------------------------------------------


def test_a_slowloris_handshake_is_closed_at_the_deadline_though_bytes_keep_coming(
        site: Site) -> None:  # noqa: F811
    hello = _client_hello()
    s = _dial(site.tls_port)
    assert s is not None
    sent, closed_after = 0, None
    start = time.monotonic()
    with s:
        s.settimeout(0.1)  # the pace: a byte, then 0.1 s listening for the close
        while time.monotonic() - start < 20 and sent < len(hello):
            try:
                s.sendall(hello[sent:sent + 1])
                sent += 1
                if s.recv(4096) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
    print(f"\nslowloris ClientHello: closed after {closed_after}s, {sent} of "
          f"{len(hello)} bytes sent (tls_handshake_timeout 2 s)")
    assert closed_after is not None and closed_after < 4.0 and sent < len(hello)
    wait_until(lambda: site.tls()["handshake_timeout"] == 1, "the handshake timeout")
    assert site.admission()["penalties"]["grace-exceeded"] == 1
    site.alice()


def test_no_sni_is_let_in_and_a_hostile_sni_is_refused(site: Site) -> None:  # noqa: F811
    ctx = ssl.create_default_context(cafile=str(site.ca.pem_path))
    ctx.check_hostname = False  # no name to check: the certificate chain still is
    ctx.set_alpn_protocols(["labrelay-ssh/1"])
    raw = socket.create_connection((LOOPBACK, site.tls_port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=None) as tls:
        tls.settimeout(10)
        assert tls.recv(8) == b"SSH-2.0-"
    assert site.tls()["handshakes"] == 1

    # Python's ssl would IDNA-encode the name; pyOpenSSL sends the bytes as they are.
    hostile = b"<script>\x1b[2J" + b"a" * 200 + b".evil.example"
    raw = _dial(site.tls_port)
    assert raw is not None
    mark = site.relay.mark()
    with raw:
        conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), raw)
        conn.set_tlsext_host_name(hostile)
        conn.set_connect_state()
        with pytest.raises((SSL.Error, OSError)):
            conn.do_handshake()
            assert b"SSH-" not in conn.recv(64)
    refused = site.relay.wait_for("tls_refused", since=mark)
    line = str(refused.get("why", "")) + str(refused.get("text", ""))
    assert "\x1b" not in line and len(line) < 1000, line
    assert site.tls()["handshakes"] == 1 and site.tls()["handshake_failed"] == 1
    site.alice()


def test_a_huge_client_hello_is_refused_at_its_header(site: Site) -> None:  # noqa: F811
    """A handshake message announcing 16 MiB (type 1, ClientHello), then 4 MiB of records
    as fast as the relay reads: OpenSSL refuses a ClientHello over its limit (about
    128 KiB) from the header on; the relay closes, RSS does not grow by the flood."""
    before = site.relay.rss_kb()
    s = _dial(site.tls_port)
    assert s is not None
    body = b"\x01" + (2**24 - 1).to_bytes(3, "big") + b"\x03\x03" + os.urandom(32)
    record = b"\x16\x03\x01" + struct.pack(">H", 16384)
    pushed, start = 0, time.monotonic()
    with s:
        s.settimeout(5)
        try:
            s.sendall(b"\x16\x03\x01" + struct.pack(">H", len(body)) + body)
            while pushed < 4 * 1024 * 1024:
                s.sendall(record + bytes(16384))
                pushed += 16384
        except OSError:
            pass
        data, _ = _recv_all(s, 10)
    took = time.monotonic() - start
    after = site.relay.rss_kb()
    print(f"\nhuge ClientHello: closed after {pushed} bytes pushed in {took:.2f}s, "
          f"{len(data)} bytes back; relay RSS {before} -> {after} KiB")
    assert b"SSH-" not in data and len(data) < 64
    assert pushed < 4 * 1024 * 1024, "the relay read the whole flood"
    assert after - before < 4096
    wait_until(lambda: site.tls()["handshake_failed"] == 1, "the refused handshake")
    site.alice()


# --- a hostile HTTP proxy in front of labrelay connect ----------------------------------


class HostileProxy:
    """Accepts every connection, reads the CONNECT request, then plays ``answer(conn)``
    in a thread of its own; counts what it managed to send."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.port = free_port()
        self.listener = socket.create_server((LOOPBACK, self.port))
        self.answer = answer
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                self.requests.append(request)
                try:
                    self.answer(conn)
                except OSError:
                    pass

    def close(self) -> None:
        close_woken(self.listener)  # its accept thread ends


@pytest.fixture
def hostile_proxy() -> Iterator[Callable[[Callable[[socket.socket], None]], HostileProxy]]:
    made: list[HostileProxy] = []

    def make(answer: Callable[[socket.socket], None]) -> HostileProxy:
        made.append(HostileProxy(answer))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _endless_at_full_speed(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn.sendall(b"X-Padding: " + b"a" * 8000 + b"\r\n")


def _trickle(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX: ")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn.sendall(b"a")
        time.sleep(0.2)  # the attacker's pace, not a wait for the code under test


def _silent(conn: socket.socket) -> None:
    conn.settimeout(30)
    conn.recv(1)  # until the client gives up


def _tunnel_to_nowhere(conn: socket.socket) -> None:
    """200, then nothing: the proxy's own way out to the relay is blocked or black-holed,
    so the TLS handshake inside the tunnel never gets an answer."""
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    conn.settimeout(30)
    with contextlib.suppress(OSError):
        while conn.recv(4096):  # the ClientHello, swallowed, until the client gives up
            pass


@pytest.mark.parametrize("answer,expect", [
    (_endless_at_full_speed, "longer than 16384 bytes"),
    (_trickle, "within 3s"),
    (_silent, "within 3s"),
    (_tunnel_to_nowhere, "no TLS handshake (or no SSH version after it) within 3s over tls "),
], ids=["endless header", "trickled header", "no answer", "tunnel to nowhere"])
def test_a_hostile_proxy_answer_is_bounded(
        hostile_proxy: Callable[..., HostileProxy], tmp_path: Path,
        answer: Callable[[socket.socket], None], expect: str) -> None:
    proxy = hostile_proxy(answer)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    key = make_key(tmp_path / "id", "alice")
    argv = [sys.executable, "-m", "relay", "connect", "-i", str(key.path),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "Transport=tls",
            "-o", "TLSPort=443", "-o", "TLSServerName=relay.test", "-o", "ConnectTimeout=3",
            "-o", f"Proxy=http://{LOOPBACK}:{proxy.port}", f"alice@{LOOPBACK}", "gpu-cluster"]
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                         env={**os.environ, **child_env()}, cwd=REPO_ROOT)
    took = time.monotonic() - start
    err = out.stderr.decode()
    print(f"\nhostile proxy: labrelay connect ended in {took:.2f}s: {err.strip()[-200:]}")
    assert out.returncode != 0 and expect in err, err
    assert f"{LOOPBACK}:{proxy.port}" in err, err  # the proxy is named
    assert len(err) < 4000, len(err)  # the answer is not echoed whole
    assert took < 15, took
    assert proxy.requests and proxy.requests[0].startswith(b"CONNECT 127.0.0.1:443 HTTP/1.1")
