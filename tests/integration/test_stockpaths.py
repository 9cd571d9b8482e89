"""Stock OpenSSH users' paths through the relay (issue 13): ``ssh -J`` and ``ssh -L`` to
an end-to-end encrypted service ride the agent's pooled data connections; a service that
is not declared end-to-end encrypted stays on the encrypted link and never touches a data
connection.

Real processes: a ``labrelay relay`` with a data port, the labrelay agent keeping its
pool, a real target sshd (``gpu-cluster:22``, declared e2e) and an echo service
(``web:8080``, not e2e), stock ``ssh``/``scp`` as the user.  The agent reaches the relay
through a recording box on ``127.0.0.3`` (as in tests/security/test_onpath.py): the SSH
port is passed through untouched, and the box *is* the data port the agent dials, so
every byte that crosses any of the agent's data connections passes through it.  The
box counts them and looks for a marker only the non-e2e session's payload contains.
"""

from __future__ import annotations

import os
import socket
import struct
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
    KeyPair,
    MiB,
    RelayNode,
    Sshd,
    SshProcess,
    close_woken,
    find_program,
    known_hosts_line,
    make_key,
    read_to_eof,
    sha256_hex,
)
from relay_fixtures import admin_port, admin_status, jump_config, stock_local_forward, wait_until

from relay.ssh.gcmrun import native_enabled

pytestmark = pytest.mark.integration

BOX = "127.0.0.3"  # where the agent believes the relay is
POOL = 4
BULK = 128 * MiB
MARKER = b"labrelay-non-e2e-marker-" + os.urandom(8).hex().encode()


class RecordingBox:
    """A pass-through of the relay's SSH port and its data port that counts every byte
    of the data connections and notes whether ``MARKER`` ever crossed one."""

    def __init__(self, relay_ssh_port: int, data_port: int) -> None:
        self.ssh = socket.create_server((BOX, 0))
        self.ssh_port = self.ssh.getsockname()[1]
        self.data = socket.create_server((BOX, data_port))
        self.lock = threading.Lock()
        self.data_bytes = 0  # both ways, every data connection
        self.data_connections = 0
        self.marker_seen = False
        self.socks: list[socket.socket] = [self.ssh, self.data]
        self.link: list[socket.socket] = []  # the SSH pass-through's sockets
        self.datas: list[socket.socket] = []  # the data connections' sockets
        self.cut: set[socket.socket] = set()  # reset by cut_*: their pumps just leave
        self.accepting = [threading.Thread(target=self._accept, args=(listener, up, record),
                                           daemon=True)
                          for listener, up, record in ((self.ssh, relay_ssh_port, False),
                                                       (self.data, data_port, True))]
        for thread in self.accepting:
            thread.start()

    def close(self) -> None:
        """Close everything, waking the accept and pump threads (they end)."""
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            close_woken(s)
        for thread in self.accepting:  # none may outlive the test (close_woken says why)
            thread.join(5)
            assert not thread.is_alive(), "the box's accept thread outlived close()"

    def cut_link(self) -> None:
        """Reset the agent's SSH link (only it: the data connections stay up)."""
        with self.lock:
            link, self.link = self.link, []
            self.cut.update(link)
        self._reset(link)

    def cut_data(self) -> None:
        """Reset every data connection (the agent's pool, and the sessions on it)."""
        with self.lock:
            datas, self.datas = self.datas, []
            self.cut.update(datas)
        self._reset(datas)

    @staticmethod
    def _reset(socks: list[socket.socket]) -> None:
        """Reset ``socks`` (an RST to both peers), also those a pump thread is blocked on.

        ``close()`` alone does not: while another thread waits in ``recv()`` on a
        socket, the kernel keeps it open until that call returns, so a quiet peer would
        see neither an RST nor a FIN (the connection simply went silent: a flaky
        test_a_reset_data_connection_ends_the_session_mid_bulk).  ``shutdown(SHUT_RD)``
        sends nothing and wakes the reader; the pump then sees its socket in ``cut`` and
        leaves without a FIN; the last ``close()`` sends the RST (``SO_LINGER`` 0)."""
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for s in socks:
            s.close()

    def _accept(self, listener: socket.socket, port: int, record: bool) -> None:
        while True:
            try:
                down, _ = listener.accept()
            except OSError:
                return
            up = socket.create_connection((LOOPBACK, port))
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.socks += [down, up]
                if record:
                    self.data_connections += 1
                    self.datas += [down, up]
                else:
                    self.link += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst, record),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        tail = b""
        while True:
            try:
                chunk = src.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self.lock:
                    if src in self.cut or dst in self.cut:
                        return  # reset, not ended: no FIN (_reset)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if record:
                seen = MARKER in tail + chunk
                tail = chunk[-(len(MARKER) - 1):]
                with self.lock:
                    self.data_bytes += len(chunk)
                    self.marker_seen |= seen
            try:
                dst.sendall(chunk)
            except OSError:
                return


@dataclass
class Site:
    relay: RelayNode
    agent: AgentProcess
    gpu: Sshd
    web: Any
    bulk: Any  # bulk:9000, declared e2e: a CountingSource
    box: RecordingBox
    alice: KeyPair
    client_key: KeyPair
    admin: int
    tmp: Path

    def config(self) -> Path:
        """An ssh_config for ``ssh -J alice@relay root@gpu-cluster`` (and scp, ``-L``)."""
        return jump_config(self.tmp / "ssh_config", self.relay, self.alice, self.client_key,
                           connect_timeout=20)

    @property
    def jump(self) -> str:
        return f"alice@{LOOPBACK}:{self.relay.port}"

    def fast(self) -> dict[str, Any]:
        return dict(self.relay.status()["relay"]["fast_path"])

    def pool(self) -> dict[str, Any]:
        return dict(admin_status(self.admin)["links"][0]["fast_path"])

    def sessions(self) -> list[dict[str, Any]]:
        return list(self.relay.status()["relay"]["sessions"])


@pytest.fixture
def site(request: pytest.FixtureRequest, openssh: None, client_key: KeyPair,
         start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
         sshd_factory: Callable[[str], Sshd], targets: Targets,
         tmp_path: Path) -> Iterator[Site]:
    extra = "".join(f"{k} = {v}\n" for k, v in getattr(request, "param", {}).items())
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    alice = make_key(tmp_path / "alice", comment="alice")
    gpu = sshd_factory("gpu_cluster")
    web = targets.echo(greeting=b"web\n")
    bulk = targets.counting_source(DataStream(77, BULK), stall_after=2.0)
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22",permitlisten="web:8080",'
                f'permitlisten="bulk:9000" {lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22",permitopen="web:8080",permitopen="bulk:9000" '
               f"{alice.public_blob()} alice"],
        relay_toml='data_port = 0\ndata_bind = "127.0.0.1"\n'
                   'e2e_services = ["gpu-cluster:22", "bulk:9000"]\npublic_wait = 5\n' + extra)
    data_port = relay.wait_for("relay_data_port", since=0)["port"]
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    box = RecordingBox(relay.port, data_port)
    relay.trust(known_hosts_line(relay.host_key_blob, box.ssh_port, host=BOX))
    agent = start_agent(
        "-p", str(box.ssh_port), "-i", str(lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "--admin", "127.0.0.1:0",
        "--fast-path-pool", str(POOL),
        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "-R", f"web:8080:127.0.0.1:{web.port}",
        "-R", f"bulk:9000:127.0.0.1:{bulk.port}", f"lab_pc@{BOX}", name="agent")  # fmt: skip
    admin = admin_port(agent)
    ready = agent.wait_for("fast_path_ready", timeout=20)
    assert ready["host"] == BOX
    assert ready["services"] == "bulk:9000 gpu-cluster:22"  # web: not e2e
    for bind in ("gpu-cluster", "web", "bulk"):
        agent.wait_for("forward_ready", timeout=20, since=0, bind=bind)
    s = Site(relay, agent, gpu, web, bulk, box, alice, client_key, admin, tmp_path)
    wait_until(lambda: s.pool()["idle"] == POOL and s.fast()["pools"].get("lab_pc") == POOL,
          "the agent's pool to fill (through the box)", timeout=30)
    try:
        yield s
    finally:
        box.close()


def _run(argv: list[str], timeout: float = 180.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **child_env()}, cwd=REPO_ROOT)


def _local_forward(site: Site, start_ssh: Callable[..., SshProcess], service: str) -> int:
    """A stock ``ssh -N -L PORT:service alice@relay``; PORT once it listens (from its
    ``-v`` lines: a probe connection would itself open a session)."""
    ssh = find_program("ssh") or "ssh"
    _, port = stock_local_forward(
        start_ssh, lambda port: [ssh, "-v", "-F", str(site.config()), "-N", "-o",
                                 "ExitOnForwardFailure=yes", "-p", str(site.relay.port),
                                 "-L", f"127.0.0.1:{port}:{service}", f"alice@{LOOPBACK}"],
        name=f"ssh-L-{service}")
    return port


def test_scp_64_mib_both_ways_over_J_rides_the_pooled_route(
        site: Site, start_ssh: Callable[..., SshProcess]) -> None:
    """``scp -J alice@relay`` of 64 MiB to gpu-cluster (e2e) and back, byte-exact: each
    session is carried from the relay to the agent on a pooled data connection (status
    path ``pooled``; the box counted the bytes on data connections), not on the link."""
    cfg = site.config()
    scp = find_program("scp") or "scp"
    stream = DataStream(13, 64 * MiB)
    src, there, back = site.tmp / "up.bin", site.tmp / "there.bin", site.tmp / "back.bin"
    with open(src, "wb") as f:
        for chunk in stream.chunks():
            f.write(chunk)
    before = site.box.data_bytes
    out = _run([scp, "-q", "-F", str(cfg), "-J", site.jump, str(src), f"gpu-cluster:{there}"])
    assert out.returncode == 0, out.stderr.decode()
    assert sha256_hex(there.read_bytes()) == stream.sha256
    out = _run([scp, "-q", "-F", str(cfg), "-J", site.jump, f"gpu-cluster:{there}", str(back)])
    assert out.returncode == 0, out.stderr.decode()
    assert back.stat().st_size == stream.size and sha256_hex(back.read_bytes()) == stream.sha256
    # Both transfers crossed the agent's data connections (the box saw them) ...
    assert site.box.data_bytes - before > 2 * stream.size
    fast = site.fast()
    assert fast["pooled"] == 2 and fast["paired"] == 0, fast
    # The upload's bulk direction (user -> agent) and the download's (agent -> user,
    # sealed by the thread) were the native thread's (relay.ssh.nativeforward): much
    # of each (a full data connection hands the stream back to Python for a while),
    # none of them lost.
    if native_enabled():
        assert fast["native_bytes"] > stream.size // 4 and fast["native_runs"] >= 1, fast
        assert fast["native_sealed"] > stream.size // 4, fast
    else:  # LABRELAY_DATAPATH=python|portable: the Python path, the same bytes
        assert fast["native_bytes"] == 0 and fast["native_runs"] == 0, fast
        assert fast["native_sealed"] == 0, fast
    # ... and the relay's table says so for each.
    per = site.relay.status()["relay"]["per_service"]["gpu-cluster:22"]
    assert per["sessions_total"] == 2 and per["bytes_to_service"] > stream.size
    assert per["bytes_from_service"] > stream.size
    # Logged once each user channel was open (relay.server.opening), with its fields.
    pooled = site.relay.events_at_least("relay_pooled_session", 2)  # just after set-up
    assert [(e["user"], e["service"]) for e in pooled] == [("alice", "gpu-cluster:22")] * 2
    assert all(e["origin"] for e in pooled)
    wait_until(lambda: site.pool()["sessions_total"] == 2 and site.pool()["idle"] == POOL,
          "the agent to count both sessions and refill")

    # A session held open shows path "pooled"; so does a stock ``ssh -L`` to the e2e
    # service (its first bytes are the target sshd's banner).
    ssh = find_program("ssh") or "ssh"
    held = subprocess.Popen([ssh, "-F", str(cfg), "-J", site.jump, "gpu-cluster",
                             "echo ready; cat >/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = _local_forward(site, start_ssh, "gpu-cluster:22")
    try:
        assert held.stdout is not None and held.stdout.readline() == b"ready\n"
        with socket.create_connection((LOOPBACK, port), timeout=10) as s:
            assert s.recv(4) == b"SSH-"
            assert [x["path"] for x in site.sessions()] == ["pooled", "pooled"]
    finally:
        assert held.stdin is not None
        held.stdin.close()
        assert held.wait(timeout=30) == 0, held.stderr.read() if held.stderr else b""
    assert site.fast()["pooled"] == 4
    pooled = [line.split()[1] for line in site.relay.metrics().splitlines()
              if line.startswith("labrelay_relay_fast_pooled_total ")]
    assert [float(v) for v in pooled] == [4.0], pooled
    assert site.relay.connect_attempts() == []


def test_scp_J_with_rekeys_mid_transfer_is_exact_on_the_pooled_route(site: Site) -> None:
    """``scp -J`` 64 MiB up and back with the jump session rekeying every 16 MiB
    (``RekeyLimit 16M``, OpenSSH's own rekeys, AES-GCM with the relay): byte-exact both
    ways on the pooled route, and the relay's user sessions took several key exchanges
    mid-transfer (each KEXINIT arrives between channel-data packets the relay is
    decrypting and writing to the agent's data connection)."""
    cfg = site.config()
    jump = f"Host {LOOPBACK}\n"
    cfg.write_text(cfg.read_text().replace(
        jump, f"{jump}  RekeyLimit 16M\n  Ciphers aes128-gcm@openssh.com\n"))
    scp = find_program("scp") or "scp"
    stream = DataStream(29, 64 * MiB)
    src, there, back = site.tmp / "up.bin", site.tmp / "there.bin", site.tmp / "back.bin"
    with open(src, "wb") as f:
        for chunk in stream.chunks():
            f.write(chunk)
    since = len(site.relay.events())
    out = _run([scp, "-q", "-F", str(cfg), "-J", site.jump, str(src), f"gpu-cluster:{there}"])
    assert out.returncode == 0, out.stderr.decode()
    assert sha256_hex(there.read_bytes()) == stream.sha256
    out = _run([scp, "-q", "-F", str(cfg), "-J", site.jump, f"gpu-cluster:{there}", str(back)])
    assert out.returncode == 0, out.stderr.decode()
    assert back.stat().st_size == stream.size and sha256_hex(back.read_bytes()) == stream.sha256
    fast = site.fast()
    assert fast["pooled"] == 2
    # The native thread carried the upload and the download across every rekey: it
    # hands the stream back at each KEXINIT (the user's, or the relay's own, which is a
    # Python write) and is armed again under the new keys.
    if native_enabled():
        assert fast["native_bytes"] > stream.size // 4 and fast["native_runs"] >= 4, fast
        assert fast["native_sealed"] > stream.size // 4, fast
    else:
        assert fast["native_runs"] == 0 and fast["native_sealed"] == 0, fast
    keys = [e for e in site.relay.events("ssh_keys", since=since)
            if e.get("cipher_in") == "aes128-gcm@openssh.com"]
    # 64 MiB at one rekey per 16 MiB: each transfer's jump session had >= 4 key sets
    assert max(int(e["count"]) for e in keys) >= 4, keys


def test_L_to_a_non_e2e_service_stays_on_the_encrypted_link(
        site: Site, start_ssh: Callable[..., SshProcess]) -> None:
    """A stock ``ssh -L`` to ``web:8080`` (not declared end-to-end encrypted): bytes
    arrive exactly both ways, the session's path is ``channel``, no pooled connection is
    dispatched, and not one byte of it crosses a data connection: the box, which sees
    every byte of every data connection, never sees the payload's marker, and moved no
    more than the pool's own hellos meanwhile."""
    connections, moved = site.box.data_connections, site.box.data_bytes
    payload = (MARKER * (2 * MiB // len(MARKER) + 1))[:2 * MiB]
    port = _local_forward(site, start_ssh, "web:8080")
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        got = b""
        while len(got) < 4:
            got += s.recv(4 - len(got))
        assert got == b"web\n"
        assert [x["path"] for x in site.sessions()] == ["channel"]

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        echoed = b""
        while chunk := s.recv(1 << 20):
            echoed += chunk
        sender.join()
    assert echoed == payload
    assert site.web.accepted == 1
    fast = site.fast()
    assert fast["pooled"] == 0 and fast["paired"] == 0, fast
    assert site.pool()["sessions_total"] == 0
    assert not site.box.marker_seen
    assert site.box.data_connections == connections  # not even a redial
    assert site.box.data_bytes == moved
    wait_until(lambda: site.relay.status()["relay"]["per_service"]["web:8080"]["bytes_to_service"]
          == len(payload), "the relay to count the session's bytes")


def test_more_J_sessions_than_pooled_connections_take_the_link(site: Site) -> None:
    """Six ``ssh -J`` sessions at once with a pool of four: a session never waits for the
    pool; those that find no idle pooled connection are carried on the link.  All six
    reach the target."""
    cfg = site.config()
    ssh = find_program("ssh") or "ssh"
    held = [subprocess.Popen([ssh, "-F", str(cfg), "-J", site.jump, "gpu-cluster",
                              "echo $LABRELAY_TEST_HOST; cat >/dev/null"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for _ in range(6)]
    try:
        for p in held:
            assert p.stdout is not None and p.stdout.readline() == b"gpu_cluster\n"
        paths = sorted(x["path"] for x in site.sessions())
        assert len(paths) == 6 and set(paths) <= {"channel", "pooled"}, paths
        assert "pooled" in paths and paths.count("pooled") == site.fast()["pooled"]
    finally:
        for p in held:
            assert p.stdin is not None
            p.stdin.close()
        for p in held:
            assert p.wait(timeout=30) == 0


def test_a_user_who_never_reads_on_the_pooled_route_costs_bounded_memory(
        site: Site, start_ssh: Callable[..., SshProcess]) -> None:
    """A target pushes 128 MiB at a user's ``ssh -L`` to an e2e service on the pooled
    route, and the user never reads: the pipeline fills and stalls the target (the
    channel's window pauses the data connection, whose kernel buffers stop the agent's
    splice) and the relay's RSS grows by less than 32 MiB.  Then the user reads: every
    byte arrives, in order."""
    port = _local_forward(site, start_ssh, "bulk:9000")
    baseline = site.relay.rss_kb()
    with socket.create_connection((LOOPBACK, port), timeout=10) as user:
        assert site.bulk.connected.wait(15)
        stalled_at = site.bulk.wait_stalled(120)
        growth = site.relay.rss_kb() - baseline
        assert [x["path"] for x in site.sessions()] == ["pooled"]
        print(f"never-reader on the pooled route: {stalled_at / MiB:.1f} MiB in flight, "
              f"relay RSS +{growth} KiB")
        assert stalled_at < BULK
        assert growth < 32 * 1024, f"relay RSS grew {growth} KiB with a reader that never reads"
        user.settimeout(120)
        got = read_to_eof(user)
    stream = DataStream(77, BULK)
    assert (got.nbytes, got.sha256) == (stream.size, stream.sha256)
    assert site.fast()["pooled"] == 1


def _held_jump(site: Site) -> subprocess.Popen[bytes]:
    """A stock ``ssh -J`` session to gpu-cluster that reads its stdin until EOF."""
    ssh = find_program("ssh") or "ssh"
    held = subprocess.Popen([ssh, "-F", str(site.config()), "-J", site.jump, "gpu-cluster",
                             "echo ready; wc -c"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert held.stdout is not None and held.stdout.readline() == b"ready\n"
    assert [x["path"] for x in site.sessions()] == ["pooled"]
    return held


def test_a_pooled_session_rides_tcp_across_its_links_cut(site: Site) -> None:
    """Only the agent's SSH link is reset (the box cuts it; the data connections stay
    up) while the relay would resume the link's channels (``resume_grace``, the default):
    the pooled ``ssh -J`` session goes on over its own TCP connection, as a fast-path
    session does, and ends cleanly with every byte."""
    held = _held_jump(site)
    try:
        assert held.stdin is not None
        held.stdin.write(b"x" * MiB)
        held.stdin.flush()
        mark = site.relay.mark()
        site.box.cut_link()
        site.relay.wait_for("relay_disconnected", timeout=20, since=mark, name="lab_pc")
        out, _ = held.communicate(input=b"y" * MiB, timeout=60)
        assert held.returncode == 0 and out.strip() == str(2 * MiB).encode(), out
    finally:
        if held.poll() is None:
            held.kill()
    assert site.relay.events("relay_pooled_session_ended", since=mark) == []


@pytest.mark.parametrize("site", [{"resume_grace": 0}], indirect=True)
def test_without_resume_a_pooled_session_ends_with_its_link(site: Site) -> None:
    """The same cut with ``resume_grace = 0`` (the link's channels end with it): the
    pooled ``ssh -J`` session ends with an error too, not later than a channel would."""
    held = _held_jump(site)
    try:
        mark = site.relay.mark()
        site.box.cut_link()
        site.relay.wait_for("relay_disconnected", timeout=20, since=mark, name="lab_pc")
        assert held.wait(timeout=30) != 0  # ended with an error, not cleanly
    finally:
        if held.poll() is None:
            held.kill()
    closed = site.relay.events("relay_pooled_session_ended", since=mark)
    assert [(e["user"], e["service"]) for e in closed] == [("alice", "gpu-cluster:22")], closed

