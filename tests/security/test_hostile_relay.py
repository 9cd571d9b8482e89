"""The agent as a target: a relay that is not what it should be.

A relay whose host or address was taken over is trusted by the agent for what the
relay does (it says which sessions to open), but the agent must not become a way into
the rest of the lab: it connects only the targets its own ``-R`` forwards declare,
whatever the relay asks (docs/security.md, "The agent against a relay it trusted").
A paramiko server holding the relay's host key (a compromised relay) accepts the
labrelay agent's login and its ``tcpip-forward``, then asks the agent to open
``forwarded-tcpip`` channels to hosts and ports it never declared (another lab host,
the agent's own loopback services), and ``direct-tcpip``, ``session``, ``x11`` and
``auth-agent@openssh.com`` channels.  The agent refuses every one of them, connects
nothing but its declared target, and the declared forward still works.

What such a relay *says* is bounded too (round 18): the ``share@labrelay`` names it
tags channels with, requests the agent warns about in a loop, and host keys it
announces and proves at every reconnect, each of which grew the agent (memory, log,
known_hosts) without end.

The other half, a relay at the right address without the host key (an on-path box),
is refused before authentication: ``tests/integration/test_relay.py`` (a rotated
host key) and ``test_onpath.py``.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import Targets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from harness import (
    LOOPBACK,
    AgentProcess,
    known_hosts_line,
    make_key,
    rss_kb,
    write_known_hosts,
)
from paramiko.common import (
    MSG_GLOBAL_REQUEST,
    cMSG_CHANNEL_REQUEST,
    cMSG_GLOBAL_REQUEST,
    cMSG_REQUEST_FAILURE,
    cMSG_REQUEST_SUCCESS,
)
from paramiko.message import Message
from relay_fixtures import burst_total, burst_windows, wait_until

from relay.ssh.hostkeyupdate import prove_signed_data
from relay.ssh.wire import pack_grant_revoked

pytestmark = [pytest.mark.integration, pytest.mark.security]


class _CompromisedRelay(paramiko.ServerInterface):
    """Lets the agent in and grants its forwards; records what it asked."""

    def __init__(self) -> None:
        self.forwards: list[tuple[str, int]] = []
        self.forwarded = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_port_forward_request(self, address: str, port: int) -> int:
        self.forwards.append((address, port))
        self.forwarded.set()
        return port

    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        return False


def _open(t: paramiko.Transport, kind: str, dest: tuple[str, int] | None = None,
          src: tuple[str, int] = ("203.0.113.9", 4000)) -> Any:
    """The agent's answer to one channel the relay opens: the channel, or the error."""
    try:
        return t.open_channel(kind, dest_addr=dest, src_addr=src if dest else None, timeout=10)
    except paramiko.ChannelException as e:
        return e


def test_a_compromised_relay_reaches_only_the_declared_targets(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    host_key = make_key(tmp_path / "relay_host_key", comment="relay")
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    declared = targets.echo(greeting=b"declared\n")
    other = targets.echo(greeting=b"other lab host\n")  # reachable from the agent, not declared

    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]
    known_hosts = write_known_hosts(tmp_path / "known_hosts",
                                    known_hosts_line(host_key.public_blob(), port))
    agent = start_agent(
        "-p", str(port), "-i", str(lab_pc.path), "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-R", f"web:8080:127.0.0.1:{declared.port}",
        "lab_pc@127.0.0.1", name="agent",
    )  # fmt: skip
    listener.settimeout(30)
    sock, _ = listener.accept()
    listener.close()
    t = paramiko.Transport(sock)
    t.add_server_key(paramiko.Ed25519Key.from_private_key_file(str(host_key.path)))
    server = _CompromisedRelay()
    t.start_server(server=server)
    try:
        assert server.forwarded.wait(30), "the agent never asked for its forward"
        assert server.forwards == [("web", 8080)]

        answers = {
            "another lab host": _open(t, "forwarded-tcpip", ("10.20.30.40", 22)),
            "an undeclared port": _open(t, "forwarded-tcpip", ("web", other.port)),
            "the undeclared target's port": _open(t, "forwarded-tcpip",
                                                  ("127.0.0.1", other.port)),
            "direct-tcpip": _open(t, "direct-tcpip", ("127.0.0.1", other.port)),
            "session": _open(t, "session"),
            "x11": _open(t, "x11", ("127.0.0.1", 6000)),
            "auth-agent": _open(t, "auth-agent@openssh.com"),
        }
        print()
        for what, answer in answers.items():
            print(f"{what}: {answer!r}")
        opened = {w: a for w, a in answers.items() if not isinstance(a, paramiko.ChannelException)}
        assert not opened, f"the agent opened {sorted(opened)}"
        assert other.accepted == 0 and declared.accepted == 0

        # The declared forward, asked under another name for its port, reaches only
        # the declared target (the agent matches its forwards by port).
        for dest in (("web", 8080), ("10.20.30.40", 8080)):
            ch = t.open_channel("forwarded-tcpip", dest_addr=dest, src_addr=("203.0.113.9", 1),
                                timeout=10)
            ch.settimeout(10)
            got = b""
            while len(got) < len(b"declared\n"):
                got += ch.recv(64)
            assert got == b"declared\n"
            ch.sendall(b"ping")
            echoed = b""
            while len(echoed) < 4:
                echoed += ch.recv(4 - len(echoed))
            assert echoed == b"ping"
            ch.close()
        assert other.accepted == 0 and declared.accepted == 2
        assert t.is_active()  # refusals, not a dropped link
    finally:
        t.close()
    assert agent.events("target_unreachable") == []


SHARE_NAMES = 300_000
LOOPS = 2000


def _taken_over(start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path,
                ) -> tuple[AgentProcess, paramiko.Transport, Any]:
    """The labrelay agent (``-R web:8080`` to an echo) logged in to a compromised relay
    (a paramiko server with the relay's host key), and one ``forwarded-tcpip`` channel
    the relay opened to its declared target, the greeting read."""
    host_key = make_key(tmp_path / "relay_host_key", comment="relay")
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    declared = targets.echo(greeting=b"declared\n")
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]
    known_hosts = write_known_hosts(tmp_path / "known_hosts",
                                    known_hosts_line(host_key.public_blob(), port))
    agent = start_agent(
        "-p", str(port), "-i", str(lab_pc.path), "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-R", f"web:8080:127.0.0.1:{declared.port}",
        "lab_pc@127.0.0.1", name="agent",
    )  # fmt: skip
    listener.settimeout(30)
    sock, _ = listener.accept()
    listener.close()
    t = paramiko.Transport(sock)
    t.add_server_key(paramiko.Ed25519Key.from_private_key_file(str(host_key.path)))
    server = _CompromisedRelay()
    t.start_server(server=server)
    assert server.forwarded.wait(30), "the agent never asked for its forward"
    ch = t.open_channel("forwarded-tcpip", dest_addr=("web", 8080),
                        src_addr=("203.0.113.9", 1), timeout=10)
    ch.settimeout(20)
    got = b""
    while len(got) < len(b"declared\n"):
        got += ch.recv(64)
    return agent, t, ch


def _echo(ch: Any, data: bytes) -> bytes:
    ch.sendall(data)
    got = b""
    while len(got) < len(data):
        got += ch.recv(len(data) - len(got))
    return got


def _share(t: paramiko.Transport, ch: Any, name: bytes, weight: bytes | None) -> None:
    """``share@labrelay`` on ``ch``, no reply wanted; ``weight`` None: malformed."""
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(ch.remote_chanid)
    m.add_string(b"share@labrelay")
    m.add_boolean(False)
    m.add_string(name)
    if weight is not None:
        m.add_string(weight)
    t._send_user_message(m)


def test_a_compromised_relay_cannot_grow_the_agent_with_share_names(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """The agent takes ``share@labrelay`` (whose bytes a channel carries, and their
    weight) from its relay only, but the names are the relay's to choose.  A
    compromised relay re-tags one open channel 300 000 times, a fresh 100-character
    name each time (no reply wanted): every name stayed in the agent's scheduler
    weights for the link's life, **+63 MiB** of agent memory (one run), without end.
    Now a name's weight lives while a channel tagged so does: the agent grows by
    kilobytes, and the channel still echoes."""
    agent, t, ch = _taken_over(start_agent, targets, tmp_path)
    try:
        assert _echo(ch, b"before") == b"before"  # the agent settled
        before = rss_kb(agent.proc.pid)
        for i in range(SHARE_NAMES):
            _share(t, ch, f"{i:0100d}".encode(), b"2")
        assert _echo(ch, b"after") == b"after"  # every request was read before the echo
        grown = rss_kb(agent.proc.pid) - before
        print(f"\n{SHARE_NAMES} share names: agent RSS +{grown} KiB")
        assert grown < 16 * 1024, f"the agent kept the relay's names: +{grown} KiB"
        assert t.is_active()
    finally:
        t.close()


def test_a_compromised_relays_requests_in_a_loop_cost_a_bounded_number_of_agent_log_lines(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """Requests only a relay sends, each of which the agent logged as a warning: 2 000
    ``grant-revoked@labrelay`` for registrations it never held and 2 000 malformed
    ``share@labrelay`` were **4 000 warnings** in a second, at the relay's pace, on
    the lab PC's disk.  Now the unheld revocations are logged 32 per 10 s then one
    count line, a malformed share once per connection; the channel still echoes."""
    agent, t, ch = _taken_over(start_agent, targets, tmp_path)
    try:
        for i in range(LOOPS):
            m = Message()
            m.add_byte(cMSG_GLOBAL_REQUEST)
            m.add_string(b"grant-revoked@labrelay")
            m.add_boolean(False)
            m.add_bytes(pack_grant_revoked(f"x{i}", 1, "because"))
            t._send_user_message(m)
            _share(t, ch, b"\x00", None)
        assert _echo(ch, b"ping") == b"ping"
        echoed = time.time()  # every request before the echo was handled by now
        # 32 lines then one count line per 10 s window; a loop a loaded box stretched
        # past the first window has more than one: await every count line
        wait_until(lambda: burst_total(agent.events("forward_revoked")) >= LOOPS,
                   "every unheld revocation logged or counted", timeout=30)
        revoked = agent.events("forward_revoked")
        malformed = agent.events("share_malformed")
        windows = burst_windows(revoked[0]["time"], echoed)
        print(f"\n{LOOPS} unheld revocations: {len(revoked)} lines in {windows} window(s) "
              f"({revoked[-1].get('count')} counted last); {LOOPS} malformed shares: "
              f"{len(malformed)} lines")
        assert len(revoked) <= 33 * windows and burst_total(revoked) == LOOPS, revoked[-1]
        assert len(malformed) == 1
        assert t.is_active()
    finally:
        t.close()


RECONNECTS = 5


def _fresh_ed25519() -> paramiko.Ed25519Key:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


def test_a_compromised_relay_cannot_grow_the_agents_known_hosts(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """The agent learns keys its relay announces (``hostkeys-00@openssh.com``) and
    proves (``hostkeys-prove-00``), as ssh's ``UpdateHostKeys``, but only adds: ssh
    drops the keys no longer announced, the agent removes nothing.  A relay holding
    its host key (taken over) announced 15 fresh keys at each connection, proved
    them, and hung up: the agent's known_hosts grew by **15 lines a connection** (225
    lines in 21 s, one run; each connection reads the file again), and each key it
    could not learn was a log line and a remembered blob, without end.  Now a host's
    lines stop at ``MAX_LEARNED_HOST_KEYS`` (4) and the announced keys logged at 16
    per link."""
    host_key = make_key(tmp_path / "relay_host_key", comment="relay")
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    declared = targets.echo()
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]
    known_hosts = write_known_hosts(tmp_path / "known_hosts",
                                    known_hosts_line(host_key.public_blob(), port))
    agent = start_agent(
        "-p", str(port), "-i", str(lab_pc.path), "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-R", f"web:8080:127.0.0.1:{declared.port}",
        "lab_pc@127.0.0.1", name="agent",
    )  # fmt: skip
    listener.settimeout(30)
    relay_key = paramiko.Ed25519Key.from_private_key_file(str(host_key.path))
    proved = 0
    try:
        for _ in range(RECONNECTS):
            sock, _ = listener.accept()
            t = paramiko.Transport(sock)
            t.add_server_key(relay_key)
            fresh = {k.asbytes(): k for k in (_fresh_ed25519() for _ in range(15))}
            forwarded = threading.Event()

            def global_request(m: Message, t: paramiko.Transport = t,
                               fresh: dict[bytes, paramiko.Ed25519Key] = fresh,
                               forwarded: threading.Event = forwarded) -> None:
                nonlocal proved
                kind = m.get_string()
                if not m.get_boolean():
                    return  # no reply wanted (early-data-ok@labrelay)
                r = Message()
                if kind == b"hostkeys-prove-00@openssh.com":
                    r.add_byte(cMSG_REQUEST_SUCCESS)
                    while m.get_remainder():
                        blob = m.get_string()
                        signed = prove_signed_data(t.session_id, blob)
                        r.add_string(fresh[blob].sign_ssh_data(signed).asbytes())
                        proved += 1
                elif kind == b"tcpip-forward":
                    m.get_string()
                    r.add_byte(cMSG_REQUEST_SUCCESS)
                    r.add_int(m.get_int())
                    forwarded.set()
                else:
                    r.add_byte(cMSG_REQUEST_FAILURE)
                t._send_user_message(r)

            t._handler_table[MSG_GLOBAL_REQUEST] = global_request
            t.start_server(server=_CompromisedRelay())
            try:
                assert forwarded.wait(30), "the agent never asked for its forward"
                a = Message()
                a.add_byte(cMSG_GLOBAL_REQUEST)
                a.add_string(b"hostkeys-00@openssh.com")
                a.add_boolean(False)
                a.add_string(relay_key.asbytes())
                for blob in fresh:
                    a.add_string(blob)
                t._send_user_message(a)
                # Answered in order: once these come back, any proof it asked for was
                # answered and read.
                t.global_request("keepalive@openssh.com", wait=True)
                t.global_request("keepalive@openssh.com", wait=True)
            finally:
                t.close()
    finally:
        listener.close()
    lines = [ln for ln in known_hosts.read_text().splitlines() if ln.strip()]
    announced = agent.events("link_hostkey_announced")
    print(f"\n{RECONNECTS} connections announcing 15 fresh keys each: {proved} proofs "
          f"asked, known_hosts {len(lines)} lines, {len(announced)} announced-key lines")
    assert len(lines) <= 4, f"known_hosts grew to {len(lines)} lines"
    assert len(announced) <= 16
    assert len(agent.events("link_hostkey_learned")) == 3
