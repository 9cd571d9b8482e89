"""Bad input from the internet (issue 5 §3): from mac toward cloud, across the routed
link, while legitimate users keep working.

* the bad-input classes of the relay's own tests, now from another host: a 1 MiB
  version line, garbage after a good banner, and (with ``tests/integration/rawssh.py``,
  a scripted client sending what stock ssh never sends) window overflows, a maximum
  packet of 0, packets for channels that do not exist, packets cut short, random bytes
  on the encrypted transport, 2000 channel opens at once; ``direct-tcpip`` to
  addresses; an unknown key;
* 2000 connections that send nothing (half-open logins) on the relay's public SSH
  port: ``max_unauthenticated = 32`` holds;
* silent connections and a slowloris (a banner trickled one byte a second): each must
  be closed after ``login_grace = 3`` s, as OpenSSH's LoginGraceTime does.

Meanwhile alice's ssh session and carol's echo through ``ssh -L`` (opened before) keep
working; afterwards a new login works; the relay connected nowhere, and nothing of the
abuse reached gpu_cluster.
"""

from __future__ import annotations

import json
import os
import random
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harness import MiB, recv_exactly, rss_kb
from nodes import CLOUD, DATA_PORT, ECHO_PORT, GPU, INTEGRATION, RELAY_PORT, Site, child_env

Record = Callable[..., dict[str, Any]]
LOGIN_GRACE = 3.0
MAX_UNAUTH = 32
HALF_OPEN = 2000
SLOWLORIS = 20

# rawssh.py dials 127.0.0.1; from mac it must dial cloud.
RAWSSH_FROM_MAC = f"""\
import sys
sys.path.insert(0, {str(INTEGRATION)!r})
import rawssh
_connect = rawssh.reactor.connectTCP
rawssh.reactor.connectTCP = lambda host, port, factory, **kw: _connect({CLOUD!r}, port, factory,
                                                                      **kw)
sys.argv[0] = "rawssh"
rawssh.main()
"""


def rawssh(site: Site, scenario: str, expect_disconnect: bool = False, user: str = "eve",
           service: str = f"echo:{ECHO_PORT}") -> dict[str, Any]:
    assert site.relay is not None
    key = getattr(site.keys, user)
    argv = site.topo.argv(
        "mac", sys.executable, "-c", RAWSSH_FROM_MAC,
        "--port", str(site.relay.port), "--key", str(key.path),
        "--host-key", str(site.relay.host_key_path) + ".pub", "--user", user,
        "--service", service, "--echo-service", f"echo:{ECHO_PORT}",
        *(["--expect-disconnect"] if expect_disconnect else []), scenario,
    )  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                         env={**os.environ, **child_env()})
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def closed_within(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return bytes(got)


class Typist:
    """Echoes through a held connection every 20 ms (a person typing) from a thread;
    records each round trip and any failure."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.latencies: list[float] = []
        self.problems: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="typist")
        self.thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                msg = f"keystroke {n}\n".encode()
                started = time.monotonic()
                self.sock.sendall(msg)
                assert recv_exactly(self.sock, len(msg)) == msg
                self.latencies.append(time.monotonic() - started)
                n += 1
                self.stop.wait(0.02)  # a typist's pace
        except BaseException as e:
            self.problems.append(e)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(15)


class Flood:
    """``n`` TCP connections to the relay's SSH port that never send a byte.

    A connection the relay accepted gets its version line at once (``greeted``); one
    it dropped at accept (over ``max_unauthenticated``) is closed without a word.
    """

    def __init__(self, site: Site, n: int) -> None:
        self.sel = selectors.DefaultSelector()  # epoll: 2000 descriptors are beyond select()
        self.greeted: dict[socket.socket, float] = {}
        self.closed_after_greeting: list[float] = []
        self.dropped = 0
        self.never_connected = 0
        with site.topo.inside("mac"):
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((CLOUD, RELAY_PORT))
                self.sel.register(s, selectors.EVENT_READ)

    @property
    def open_greeted(self) -> int:
        return len(self.greeted)

    def pump(self, quiet: float, timeout: float) -> None:
        """Handle what happens until nothing did for ``quiet`` s (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            events = self.sel.select(min(left, quiet))
            if not events:
                return
            for key, _ in events:
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                except OSError:
                    self.never_connected += 1
                    self._close(s)
                    continue
                if data:
                    self.greeted.setdefault(s, time.monotonic())
                    continue
                if s in self.greeted:
                    self.closed_after_greeting.append(time.monotonic() - self.greeted.pop(s))
                else:
                    self.dropped += 1
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        self.sel.unregister(s)
        s.close()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


def slowloris(site: Site, n: int, timeout: float) -> list[float | None]:
    """``n`` connections each sending a banner one byte a second; how long the relay let
    each live after its own version line (None: still open at ``timeout``)."""
    banner = b"SSH-2.0-OpenSSH_9.2 slowloris\r\n"
    alive: dict[socket.socket, float] = {}
    with site.topo.inside("mac"):
        for _ in range(n):
            s = socket.create_connection((CLOUD, RELAY_PORT), timeout=10)
            s.recv(256)  # the relay's version line: accepted
            s.setblocking(False)
            alive[s] = time.monotonic()
    lived: list[float | None] = []
    pace = threading.Event()
    i = 0
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        for s in list(alive):
            try:
                s.send(banner[i % len(banner):i % len(banner) + 1])
            except OSError:
                lived.append(time.monotonic() - alive.pop(s))
                s.close()
        readable, _, _ = select.select(list(alive), [], [], 0)
        for s in readable:
            try:
                if s.recv(65536):
                    continue
            except OSError:
                pass
            lived.append(time.monotonic() - alive.pop(s))
            s.close()
        i += 1
        pace.wait(1.0)  # the attacker's pace: one byte a second
    for s in alive:
        s.close()
        lived.append(None)
    return lived


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Users:
    """alice's ssh session (a paced counter) and carol's echo through ``ssh -L``,
    opened before the abuse; ``check()`` afterwards."""

    def __init__(self, site: Site) -> None:
        self.site = site
        cfg = site.user_config("alice")
        self.counter = site.ssh_process(
            [site.ssh_bin, "-F", str(cfg), "gpu-cluster",
             "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"], name="alice-session")
        self.counter.stdout.wait_for(r"^\d+$", 20, what="alice's session")
        site.local_forward("carol", f"data:{DATA_PORT}", 19000)
        self._carol = site.mac_socket(19000)
        carol = self._carol.__enter__()
        carol.sendall(b"Ehello")
        assert recv_exactly(carol, 5) == b"hello"  # connected through to the data service
        self.typist = Typist(carol)
        self.started = time.monotonic()
        self.lines_before = len(self.counter.stdout.lines)
        gpu, data = site.gpu, site.data
        assert gpu is not None and data is not None
        self.gpu_mark = gpu.log.mark()
        self.data_before = data.accepted

    def check(self) -> dict[str, Any]:
        """They kept working; nothing of the abuse reached gpu_cluster."""
        site, gpu, data = self.site, self.site.gpu, self.site.data
        assert gpu is not None and data is not None
        self.typist.finish()
        self._carol.__exit__(None, None, None)
        took = time.monotonic() - self.started
        lines = len(self.counter.stdout.lines) - self.lines_before
        assert not self.typist.problems, self.typist.problems
        assert self.counter.returncode is None, self.counter.diagnostics()
        assert lines >= took / 0.05 * 0.5, (lines, took)
        lat = sorted(self.typist.latencies)
        assert lat and lat[-1] < 2.0, lat[-5:]
        assert gpu.connections(since=self.gpu_mark) == 0, gpu.log.text(self.gpu_mark)
        assert data.accepted == self.data_before
        site.assert_marker("alice", "gpu-cluster")  # and a new login works
        return {"echoes": len(lat), "p50_ms": round(lat[len(lat) // 2] * 1000, 1),
                "max_ms": round(lat[-1] * 1000), "session_lines": lines}


def start(site: Site) -> tuple[Any, Any]:
    site.start_gpu(echo=True)
    relay = site.start_relay()  # login_grace 3, max_unauthenticated 32 (nodes.RELAY_SETTINGS)
    agent = site.start_agent(f"echo:{ECHO_PORT}:{GPU}:{ECHO_PORT}")
    site.wait_agent_ready(agent)
    relay.wait_for("relay_service_registered", since=0, service=f"echo:{ECHO_PORT}")
    return relay, agent


def assert_relay_clean(relay: Any, rss_before: int) -> int:
    assert relay.connect_attempts() == [] and relay.outbound_sockets() == []
    assert relay.events(level="critical") == []
    growth = rss_kb(relay.pid) - rss_before
    assert growth < 48 * 1024, f"relay RSS grew {growth} KiB"
    return growth


# ---------------------------------------------------------------------------


def test_protocol_abuse_from_the_internet(site: Site, record: Record) -> None:
    """The relay tests' bad-input classes from mac, across the routed link."""
    relay, agent = start(site)
    users = Users(site)
    rss_before = rss_kb(relay.pid)

    # 1. banners
    with site.topo.inside("mac"):
        s1 = socket.create_connection((CLOUD, RELAY_PORT), timeout=10)
        s2 = socket.create_connection((CLOUD, RELAY_PORT), timeout=10)
    with s1:
        try:
            # a version line that never ends (one that does not start "SSH-" is
            # refused at its first byte: test_admission)
            s1.sendall(b"SSH-2.0-" + b"A" * MiB)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = closed_within(s1, 10)
    assert b"Peer version string longer than 4KB" in reply, reply[-200:]
    with s2:
        s2.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + random.Random(1).randbytes(2048))
        assert b"bad packet length" in closed_within(s2, 10)

    # 2. what stock ssh never sends (rawssh.py from mac), in parallel
    disconnecting = {
        **{k: f"unknown-channel:{k}" for k in ("data", "window", "eof", "close", "request")},
        "garbage": "garbage", "window overflow": "window-overflow",
        "cut-short open": "malformed:open",
    }
    answered = {"sanity": "echo", "max packet 0": "max-packet-zero",
                "cut-short forward": "malformed:forward", "cut-short direct": "malformed:direct"}
    with ThreadPoolExecutor(len(disconnecting) + len(answered) + 1) as pool:
        jobs = {
            **{k: pool.submit(rawssh, site, s, True) for k, s in disconnecting.items()},
            **{k: pool.submit(rawssh, site, s) for k, s in answered.items()},
            # 2000 opens to a service eve is not granted: every one refused, then an echo.
            "2000 opens": pool.submit(rawssh, site, "many-opens:2000", False, "eve",
                                      "gpu-cluster:22"),
        }
        results = {k: job.result(240) for k, job in jobs.items()}
    for kind in disconnecting:
        assert results[kind]["lost"], (kind, results[kind])
    for kind in ("data", "window", "eof", "close", "request"):
        assert results[kind]["disconnect"] == {"code": 2, "why": "unknown channel id 4242"}
    assert results["window overflow"]["open"] == "open"
    assert "window adjust overflows" in results["window overflow"]["disconnect"]["why"]
    assert results["cut-short open"]["disconnect"] == {"code": 2, "why": "malformed message 90"}
    assert results["sanity"]["echo"] is True
    assert results["max packet 0"]["open"] == "refused" and results["max packet 0"]["echo"]
    assert results["cut-short forward"]["received"].get("MSG_REQUEST_FAILURE") == 1
    assert results["cut-short direct"]["received"].get("MSG_CHANNEL_OPEN_FAILURE") == 1
    flood = results["2000 opens"]
    assert flood["answered"] == 2000 and flood["opened"] == 0, flood
    assert flood["echo"] is True and not flood["lost"], flood

    # 3. addresses instead of names, and an unknown key: refused to stock ssh.
    eve_cfg = site.user_config("eve")
    for target in (f"{GPU}:22", "127.0.0.1:22", "169.254.169.254:80", "localhost:7022"):
        out = site.mac_run([site.ssh_bin, "-F", str(eve_cfg), "-W", target, "cloud"], input=b"")
        assert out.returncode == 255 and b"stdio forwarding failed" in out.stderr, target
    stranger = site.mac_run([site.ssh_bin, "-F", str(site.user_config("stranger")),
                             "-W", f"echo:{ECHO_PORT}", "cloud"], input=b"")
    assert stranger.returncode == 255 and b"Permission denied" in stranger.stderr

    meanwhile = users.check()
    growth = assert_relay_clean(relay, rss_before)
    agent.assert_no_event("link_lost")
    record("bad input from mac: protocol abuse (banners, rawssh classes, 2000 opens, "
           "addresses, unknown key)", sessions=len(results) + 7, silently_wrong=0,
           relay_outbound_connects=0,
           notes=f"each abusive connection disconnected or refused; nothing reached "
                 f"gpu_cluster; relay RSS +{growth // 1024} MiB; meanwhile alice's session "
                 f"and carol's echo went on ({meanwhile})")


def test_half_open_flood_is_capped(site: Site, record: Record) -> None:
    """2000 connections to the relay's port that never send a byte: the relay holds at
    most ``max_unauthenticated`` of them and drops the rest at accept; established users
    notice nothing; once the flood goes away a new login works."""
    relay, agent = start(site)
    users = Users(site)
    rss_before = rss_kb(relay.pid)
    fds_before = fd_count(relay.pid)
    flood = Flood(site, HALF_OPEN)
    try:
        flood.pump(quiet=2.0, timeout=30)
        held = flood.open_greeted
        capped = relay.events("relay_unauth_cap")
        counters = relay.status()["relay"].get("counters", {})
        fds_flood = fd_count(relay.pid)
    finally:
        flood.close()
    meanwhile = users.check()  # includes a new login, after the flood's sockets closed
    growth = assert_relay_clean(relay, rss_before)
    agent.assert_no_event("link_lost")
    record(f"bad input from mac: {HALF_OPEN} half-open logins (max_unauthenticated "
           f"{MAX_UNAUTH})", sessions=2, silently_wrong=0, relay_outbound_connects=0,
           ok=held <= MAX_UNAUTH,
           notes=f"relay held {held} at once, dropped {flood.dropped} at accept "
                 f"({len(capped)} relay_unauth_cap events), the kernel's backlog the rest; "
                 f"relay fds {fds_before}->{fds_flood}, RSS +{growth // 1024} MiB; counters "
                 f"{counters}; meanwhile {meanwhile}")
    assert capped and all(e["n"] <= MAX_UNAUTH for e in capped)
    assert held <= MAX_UNAUTH, held
    assert fds_flood - fds_before <= MAX_UNAUTH + 8, (fds_before, fds_flood)


def test_silent_and_slowloris_logins_are_closed_after_login_grace(site: Site,
                                                                   record: Record) -> None:
    """Connections that stay silent after the relay's version line, and a slowloris
    trickling a banner one byte a second, are each closed within ``login_grace`` (+1.5 s),
    as OpenSSH's LoginGraceTime closes them, counted from accept."""
    relay, _ = start(site)
    flood = Flood(site, 10)
    try:
        flood.pump(quiet=LOGIN_GRACE + 2, timeout=LOGIN_GRACE + 10)
        silent_open = flood.open_greeted
        silent_lived = flood.closed_after_greeting
    finally:
        flood.close()
    lived = slowloris(site, SLOWLORIS, timeout=LOGIN_GRACE + 5)
    still = sum(1 for t in lived if t is None)
    record("bad input from mac: silent logins and slowloris closed after login_grace",
           sessions=10 + SLOWLORIS, silently_wrong=0, relay_outbound_connects=0,
           notes=f"silent: {10 - silent_open}/10 closed (after {silent_lived}); slowloris: "
                 f"{SLOWLORIS - still}/{SLOWLORIS} closed within {LOGIN_GRACE + 5:g} s "
                 f"(login_grace {LOGIN_GRACE:g} s)")
    assert silent_open == 0 and max(silent_lived) <= LOGIN_GRACE + 1.5, silent_lived
    assert still == 0 and max(t for t in lived if t is not None) <= LOGIN_GRACE + 1.5, lived
    assert relay.connect_attempts() == []
