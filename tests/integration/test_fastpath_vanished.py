"""A fast-path user who vanishes without a word (a laptop closed or off the network: no
FIN, no RST) does not leave the session spliced for good.

Once spliced, no SSH keepalive watches the user's hop: the relay's side of it is a bare
TCP connection, and an idle interactive session sends nothing.  Until round 14 the
relay armed TCP keepalive probes on the agent's pooled connections only, so such a
session stayed spliced at the relay, the agent and the target (the user's shell still
logged in) until someone restarted something.  The user's data connection now carries
the same probes (after 30 s idle, every 10 s, three unanswered); the test shortens the
probes the relay armed on its socket (the socket itself, taken with ``pidfd_getfd``:
without the relay's ``SO_KEEPALIVE`` the timings do nothing) and drops the user's
packets both ways.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest
import test_fastpath
from conftest import REPO_ROOT, child_env
from harness import find_program, tcp_sockets
from relay_fixtures import wait_until
from test_fastpath import Site

pytestmark = pytest.mark.integration
keys, site = test_fastpath.keys, test_fastpath.site  # the fast-path site: relay, agent, sshd

SYS_PIDFD_GETFD = 438


def _socket_of(pid: int, local_port: int, remote_port: int) -> int:
    """The descriptor number in ``pid`` of its TCP socket local_port -> remote_port."""
    inodes: dict[int, int] = {}
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)) == (
                    local_port, remote_port):
                inodes[int(fields[9])] = 1
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                return int(fd)
    raise AssertionError(f"pid {pid} has no socket {local_port} -> {remote_port}")


def _borrow(pid: int, fd: int) -> socket.socket:
    """A duplicate, in this process, of descriptor ``fd`` of process ``pid``: the same
    socket, so options set on it are the relay's."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if mine < 0:
            err = ctypes.get_errno()
            pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=mine)


@contextlib.contextmanager
def _dropped(port: int) -> Iterator[None]:
    """Every packet to or from local port ``port`` on loopback silently dropped."""
    iptables = find_program("iptables")
    rules = [["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
             ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"]]
    added = []
    try:
        for rule in rules:
            subprocess.run([iptables, "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run([iptables, "-D", *rule], check=False, capture_output=True)


@dataclasses.dataclass
class IdleSession:
    """An interactive fast-path session that sends nothing once it is up."""

    user: subprocess.Popen[bytes]  # ssh gpu-cluster, labrelay connect its ProxyCommand
    connect_pid: int  # that labrelay connect
    port: int  # the local port of its data connection to the relay


@contextlib.contextmanager
def _idle_spliced_session(site: Site, stderr: int | None = None) -> Iterator[IdleSession]:
    """``ssh gpu-cluster`` by the fast path, its session up, idle and spliced at the relay
    (checked); ssh is killed on the way out if it is still running."""
    ssh = find_program("ssh") or "ssh"
    user = subprocess.Popen([ssh, "-F", str(site.ssh_config()), "gpu-cluster",
                             "echo ready; cat >/dev/null"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                            env={**os.environ, **child_env()}, cwd=REPO_ROOT)
    try:
        assert user.stdout is not None and user.stdout.readline() == b"ready\n"
        [row] = site.relay.status()["relay"]["sessions"]
        assert row["path"] == "spliced", row
        # labrelay connect (ssh's ProxyCommand, its child) and its data connection
        connect_pid = int(subprocess.run(["pgrep", "-P", str(user.pid)], capture_output=True,
                                         text=True, check=True).stdout.split()[0])
        [mine] = [s for s in tcp_sockets(connect_pid) if s.remote[1] == site.data_port]
        yield IdleSession(user, connect_pid, mine.local[1])
    finally:
        if user.poll() is None:
            user.kill()
            user.wait(10)


def test_a_spliced_session_whose_user_vanished_is_ended(site: Site) -> None:
    if os.geteuid() != 0 or find_program("iptables") is None:
        pytest.skip("needs root and iptables (drops one loopback port's packets)")
    with _idle_spliced_session(site) as session:
        user, connect_pid, port = session.user, session.connect_pid, session.port
        borrowed = _borrow(site.relay.pid, _socket_of(site.relay.pid, site.data_port, port))
        with borrowed:
            assert borrowed.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1, (
                "the relay armed no keepalive on the user's data connection")
            # resilience.md: "about a minute": 30 s idle, then a probe every 10 s, dead
            # after three unanswered (the same as connect's, test_fastpath_relay_vanished)
            assert [borrowed.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")] == [30, 10, 3]
            for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2)):
                borrowed.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        mark = site.relay.mark()
        with _dropped(port):
            for pid in (connect_pid, user.pid):  # the laptop is gone: nothing more is said
                os.kill(pid, signal.SIGKILL)
            user.wait(10)
            closed = site.relay.wait_for("session_close", timeout=20, since=mark)
            assert closed["path"] == "spliced" and closed["user"] == "alice", closed
            assert site.relay.status()["relay"]["sessions"] == []
            wait_until(lambda: site.pool()["sessions_active"] == 0,
                       "the agent to end the session's target side")


def test_the_pools_idle_data_connections_carry_the_probes_at_both_ends(site: Site) -> None:
    """resilience.md/fastpath.md: the agent's pooled data connections carry nothing until
    a user needs one, so TCP keepalives (30 s idle, every 10 s, 3 unanswered) keep NAT
    mappings alive and find a dead one before a user is paired with it; the agent
    (relay/agent/datapool.py) and the relay (its data port, for an idle pooled
    connection) each arm them.  Only connect's and the relay's user side were checked."""
    def pooled(pid: int, remote: int | None, local: int | None) -> list[tuple[int, int]]:
        return [(s.local[1], s.remote[1]) for s in tcp_sockets(pid) if s.state == "ESTABLISHED"
                and (remote is None or s.remote[1] == remote)
                and (local is None or s.local[1] == local)]
    wait_until(lambda: bool(pooled(site.agent.pid, site.data_port, None)),
               "the agent's pool has a data connection", timeout=20)
    ends = [(site.agent.pid, *end) for end in pooled(site.agent.pid, site.data_port, None)]
    ends += [(site.relay.pid, *end) for end in pooled(site.relay.pid, None, site.data_port)
             if end[1] in {local for _, local, _ in ends}]
    assert {pid for pid, _, _ in ends} == {site.agent.pid, site.relay.pid}, ends
    for pid, local, remote in ends:
        with _borrow(pid, _socket_of(pid, local, remote)) as sock:
            armed = [sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] + [
                sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")]
            who = "agent" if pid == site.agent.pid else "relay"
            assert armed == [1, 30, 10, 3], (who, local, remote, armed)
