"""An attacker on the path between lab_pc and the cloud, against the fast path (issue 10
§3): a real ``labrelay relay``, a real labrelay agent, real targets, stock OpenSSH.

The on-path box is simulated in user space.  The agent is configured to reach the
relay at ``127.0.0.3``, where the box passes the SSH port through untouched to the
real relay on ``127.0.0.1`` (so the agent's host-key check passes and the box can
read or change nothing in SSH).  The relay's data port listens on ``127.0.0.1:P``;
the box listens on ``127.0.0.3:P``, which is where the agent dials it (the port from
the pool reply, the address the link is connected to).  So the box owns every data
connection the agent makes, and can forward it to the real data port or not:

- ``forward``: a pure pass-through, which also records what crossed (the relay's
  challenge, the agent's hello, the relay's GO);
- ``attack``: it plays the data port itself, sends its own challenge, reads the
  agent's hello and then, in turn: a GO for ``jupyter:8888`` (a service *not*
  declared end-to-end encrypted), a GO for the e2e service ``secret:22`` with a
  guessed MAC, a GO recorded on another connection replayed with that connection's
  own nonce, or it takes the agent's hello to the real data port to pass itself off
  as the agent's pooled connection and be handed a user's session.

Before this protocol (v1: bearer token in the clear, unauthenticated GO) the same
box received the target's bytes 11 758 times in 12 s.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Targets, child_env
from harness import (
    LOOPBACK,
    AgentProcess,
    KeyPair,
    RelayNode,
    Sshd,
    close_woken,
    find_program,
    known_hosts_line,
    make_key,
)
from relay_fixtures import (
    admin_port,
    admin_status,
    burst_windows,
    user_ssh_config,
    wait_until,
)

from relay.agent.refill import REFILL_WINDOW
from relay.core import fastwire as fw

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.3"  # the address the agent believes is the relay
POOL = 4
WINDOW = 5.0  # seconds the refill rate is measured over
BEFORE = "11 758 dispatches answered in 12 s"


# --- the on-path box -------------------------------------------------------------------------


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _read_until_closed(s: socket.socket, timeout: float = 10.0) -> bytes | None:
    """What the peer sent until it closed (FIN or RST); None if it kept the connection
    open past ``timeout`` (for the box: accepted, which must never happen)."""
    s.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got
        except TimeoutError:
            return None
        if not chunk:
            return got
        got += chunk


class OnPathBox:
    """The attacker: an SSH pass-through and the data port the agent dials."""

    def __init__(self, relay_ssh_port: int, data_port: int) -> None:
        self.relay_ssh = (LOOPBACK, relay_ssh_port)
        self.real_data = (LOOPBACK, data_port)
        self.ssh = socket.create_server((ATTACKER, 0))
        self.ssh_port = self.ssh.getsockname()[1]
        self.data = socket.create_server((ATTACKER, data_port))
        self.mode = "forward"
        self.lock = threading.Lock()
        self.closed = False
        self.accepted: list[float] = []  # when each agent data connection arrived
        self.forwarded: list[tuple[socket.socket, socket.socket]] = []
        self.captured: dict[str, bytes] = {}  # nonce, hello, go of a forwarded connection
        # What the agent sent after our GO, and what the real data port sent after its
        # challenge to our impersonation, until each closed (None: it did not close).
        self.after_go: list[tuple[str, bytes | None]] = []
        self.impersonated: list[bytes | None] = []
        self.kinds = Counter[str]()
        self._turn = 0
        self._socks: list[socket.socket] = [self.ssh, self.data]
        for target in (self._ssh_loop, self._data_loop):
            threading.Thread(target=target, daemon=True).start()

    def close(self) -> None:
        """Close everything, waking the accept and pump threads (they end)."""
        self.closed = True
        for s in self._socks:
            close_woken(s)

    def _keep(self, s: socket.socket) -> socket.socket:
        with self.lock:
            self._socks.append(s)
        return s

    # the SSH port: passed through untouched

    def _ssh_loop(self) -> None:
        while True:
            try:
                conn, _ = self.ssh.accept()
            except OSError:
                return
            up = self._keep(socket.create_connection(self.relay_ssh))
            self._keep(conn)
            self._pump(conn, up, None)
            self._pump(up, conn, None)

    def _pump(self, src: socket.socket, dst: socket.socket,
              sniff: Callable[[bytes], None] | None) -> None:
        def run() -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if sniff is not None:
                        sniff(data)
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=run, daemon=True).start()

    # the data port the agent dials

    def _data_loop(self) -> None:
        while True:
            try:
                conn, _ = self.data.accept()
            except OSError:
                return
            self._keep(conn)
            with self.lock:
                self.accepted.append(time.monotonic())
            handler = self._forward if self.mode == "forward" else self._attack
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def _forward(self, agent: socket.socket) -> None:
        relay = self._keep(socket.create_connection(self.real_data))
        with self.lock:
            self.forwarded.append((agent, relay))
        down, up = bytearray(), bytearray()

        def from_relay(data: bytes) -> None:
            down.extend(data)
            if "go" not in self.captured and len(down) > fw.CHALLENGE_LEN:
                go = fw.parse_go(bytes(down[fw.CHALLENGE_LEN:]))
                if go is not None:
                    (_name, _port), _mac, rest = go
                    self.captured["nonce"] = bytes(down[4:fw.CHALLENGE_LEN])
                    self.captured["hello"] = bytes(up[:fw.HELLO_LEN])
                    self.captured["go"] = bytes(down[fw.CHALLENGE_LEN:len(down) - len(rest)])

        self._pump(relay, agent, from_relay)
        self._pump(agent, relay, up.extend)

    def drop_forwarded(self, keep: int) -> None:
        """Close the pass-through connections but the newest ``keep`` (idle ones): the
        agent must redial the others."""
        with self.lock:
            victims, self.forwarded = self.forwarded[:-keep], self.forwarded[-keep:]
        for pair in victims:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _attack(self, agent: socket.socket) -> None:
        kinds = ["go_not_e2e", "go_guessed_mac", "go_replayed", "impersonate"]
        with self.lock:
            kind = kinds[self._turn % len(kinds)]
            self._turn += 1
            self.kinds[kind] += 1
        agent.settimeout(10)
        try:
            nonce = self.captured["nonce"] if kind == "go_replayed" else secrets.token_bytes(32)
            agent.sendall(fw.challenge(nonce))
            hello = _recv_exactly(agent, fw.HELLO_LEN)
            if len(hello) != fw.HELLO_LEN:
                return
            if kind == "impersonate":
                # Present the agent's hello at the real data port, as the agent.
                with socket.create_connection(self.real_data, timeout=10) as relay:
                    challenge = _recv_exactly(relay, fw.CHALLENGE_LEN)
                    assert fw.parse_challenge(challenge) is not None
                    relay.sendall(hello)
                    got = _read_until_closed(relay)
                with self.lock:
                    self.impersonated.append(got)
                agent.close()
                return
            if kind == "go_not_e2e":
                go = fw.pack_go("jupyter", 8888, secrets.token_bytes(fw.MAC_LEN))
            elif kind == "go_guessed_mac":
                go = fw.pack_go("secret", 22, secrets.token_bytes(fw.MAC_LEN))
            else:
                go = self.captured["go"]
            agent.sendall(go + b"SSH-2.0-attacker\r\n")
            got = _read_until_closed(agent)
            with self.lock:
                self.after_go.append((kind, got))
        except OSError:
            pass
        finally:
            agent.close()

    def arrivals(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t in self.accepted if start <= t < end)


# --- the site --------------------------------------------------------------------------------


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    wait_until(cond, what, timeout)


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **child_env()}, cwd=REPO_ROOT)


@pytest.fixture
def box_factory() -> Iterator[Callable[[int, int], OnPathBox]]:
    boxes: list[OnPathBox] = []

    def make(ssh_port: int, data_port: int) -> OnPathBox:
        boxes.append(OnPathBox(ssh_port, data_port))
        return boxes[-1]

    yield make
    for b in boxes:
        b.close()


def test_an_on_path_attacker_gets_no_target_byte_and_no_user_session(
        openssh: None, client_key: KeyPair, start_relay: Callable[..., RelayNode],
        start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
        targets: Targets, tmp_path: Path, box_factory: Callable[[int, int], OnPathBox],
) -> None:
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    gpu = sshd_factory("gpu_cluster")
    secret = targets.echo(greeting=b"secret\n")  # e2e-declared; only an attacker would open it
    jupyter = targets.echo(greeting=b"jupyter\n")  # NOT e2e
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22",permitlisten="secret:22",'
                f'permitlisten="jupyter:8888" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {alice.public_blob()} alice'],
        relay_toml='data_port = 0\ndata_bind = "127.0.0.1"\n'
                   'e2e_services = ["gpu-cluster:22", "secret:22"]\npublic_wait = 5\n')
    # The box listens on 127.0.0.3 at the port the relay's data port bound on 127.0.0.1.
    data_port = relay.wait_for("relay_data_port", since=0)["port"]
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    box = box_factory(relay.port, data_port)
    # The box passes SSH through, so the relay's own host key is what the agent sees there.
    relay.trust(known_hosts_line(relay.host_key_blob, box.ssh_port, host=ATTACKER))
    agent = start_agent(
        "-p", str(box.ssh_port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "--admin", "127.0.0.1:0",
        "--fast-path-pool", str(POOL),
        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "-R", f"secret:22:127.0.0.1:{secret.port}",
        "-R", f"jupyter:8888:127.0.0.1:{jupyter.port}", f"lab_pc@{ATTACKER}", name="agent")
    ready = agent.wait_for("fast_path_ready", timeout=20)
    admin = admin_port(agent)
    assert ready["host"] == ATTACKER and ready["port"] == data_port
    assert ready["services"] == "gpu-cluster:22 secret:22"  # jupyter: not e2e
    for bind in ("gpu-cluster", "secret", "jupyter"):
        agent.wait_for("forward_ready", timeout=20, since=0, bind=bind)

    def pool() -> dict[str, Any]:
        return dict(admin_status(admin)["links"][0]["fast_path"])

    def relay_idle() -> int:
        return int(relay.status()["relay"]["fast_path"]["pools"].get("lab_pc", 0))

    _wait(lambda: relay_idle() == POOL, "the pool to fill through the box")

    cfg = user_ssh_config(tmp_path / "ssh_config", relay, client_key, "alice", alice,
                          tmp_path / "connect.err")
    ssh = find_program("ssh") or "ssh"

    def alice_fast() -> None:
        out = _run([ssh, "-F", str(cfg), "gpu-cluster", "echo $LABRELAY_TEST_HOST"])
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().strip() == "gpu_cluster"

    def alice_stock() -> None:
        out = _run([ssh, "-F", str(cfg), "gpu-jump", "echo $LABRELAY_TEST_HOST"])
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().strip() == "gpu_cluster"

    # 1. Honest pass-through: alice's fast path works across the box, which records
    #    a real GO (with its connection's nonce and hello) to replay later.
    alice_fast()
    assert set(box.captured) == {"nonce", "hello", "go"}, box.captured
    assert (connect_err := (tmp_path / "connect.err").read_text()) == "", connect_err
    _wait(lambda: relay_idle() == POOL, "the pool to refill through the box")

    # 2. Attack: every new agent data connection is the box's; it kills all but one of
    #    the forwarded ones so the agent redials into it, for WINDOW seconds.
    mark = agent.mark()
    box.mode = "attack"
    start = time.monotonic()
    box.drop_forwarded(keep=1)
    alice_fast()  # her fast path, on the pooled connection the box left alone
    # Her stock ssh session through the relay, meanwhile: no pooled connection is idle
    # at the relay (the box owns every new one), so the link carries it.
    alice_stock()
    time.sleep(max(0.0, start + WINDOW - time.monotonic()))  # the measurement window
    in_window = box.arrivals(start, start + WINDOW)
    # The replay of a hello that already opened a connection, at the real data port.
    with socket.create_connection(box.real_data, timeout=10) as s:
        _recv_exactly(s, fw.CHALLENGE_LEN)
        s.sendall(box.captured["hello"])
        replayed_hello = _read_until_closed(s)
    attacks = dict(box.kinds)
    rate = in_window / WINDOW
    print(f"\non-path box: {in_window} agent data connections in {WINDOW:g} s "
          f"({rate:.1f}/s, pool {POOL}; before: {BEFORE}); attacks {attacks}")

    # The attack happened, each kind at least once ...
    assert all(attacks.get(k, 0) >= 1 for k in
               ("go_not_e2e", "go_guessed_mac", "go_replayed", "impersonate")), attacks
    # ... and got no byte of any target: the agent answered no GO of the box's (no
    # "K", no "E", no stream), and no target saw a connection because of one.
    assert box.after_go and all(got == b"" for _kind, got in box.after_go), box.after_go
    assert jupyter.accepted == 0 and secret.accepted == 0
    # No user session for the box: its impersonations were closed after the challenge,
    # and so was the replayed hello.
    assert box.impersonated and all(got == b"" for got in box.impersonated), box.impersonated
    assert replayed_hello == b""
    fast = relay.status()["relay"]["fast_path"]
    assert fast["paired"] == 2 and fast["pair_failed"] == 0, fast  # alice's two, no more
    assert fast["tokens_refused"].get("wrong proof", 0) >= len(box.impersonated), fast
    assert fast["tokens_refused"].get("unknown", 0) >= 1, fast
    status = pool()
    assert status["sessions_total"] == 2 and status["failures"] >= 3, status
    # Bounded refill: the first fill and a bucket of POOL, then POOL per 5 s.
    assert in_window <= 3 * POOL, in_window
    # Logged once per burst, not once per connection: a first line opens a burst and
    # the next waits for its window (REFILL_WINDOW, 5 s) to end.  Three lines, or one a
    # window if alice's sessions stretched the attack longer on a slow box.
    logged = agent.events("fast_path_protocol", since=mark)
    assert logged, "the attack's failures were not logged"
    windows = burst_windows(logged[0]["time"], time.time(), REFILL_WINDOW)  # after them
    assert len(logged) <= max(3, windows), (logged, windows)
    assert not agent.events("target_unreachable", since=0)

    # 3. The box goes quiet (forwards again): the pool comes back and alice's fast path
    #    works through it; her stock session still does.
    box.mode = "forward"
    _wait(lambda: relay_idle() >= 1, "the pool to recover", timeout=3 * WINDOW)
    alice_fast()
    alice_stock()
    assert jupyter.accepted == 0 and secret.accepted == 0
    assert (tmp_path / "connect.err").read_text() == ""
