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
import os
import selectors
import signal
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
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_GLOBAL_REQUEST,
    cMSG_CHANNEL_OPEN,
    cMSG_CHANNEL_REQUEST,
    cMSG_GLOBAL_REQUEST,
    cMSG_REQUEST_FAILURE,
    cMSG_REQUEST_SUCCESS,
)
from paramiko.message import Message
from relay_fixtures import burst_total, burst_windows, wait_until
from twisted.conch.ssh import common

from relay.ssh.connection import OPEN_CONNECT_FAILED, OPEN_RESOURCE_SHORTAGE
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



def _refuse_proofs(t: paramiko.Transport) -> threading.Event:
    """Make the taken-over relay ``t`` refuse every ``hostkeys-prove-00`` the agent asks
    (other global requests go to paramiko as before); the event is set at each refusal."""
    asked = threading.Event()
    handler = t._handler_table[MSG_GLOBAL_REQUEST]

    def global_request(m: Message) -> None:
        at = m.packet.tell()
        if m.get_string() == b"hostkeys-prove-00@openssh.com":
            r = Message()
            r.add_byte(cMSG_REQUEST_FAILURE)
            t._send_user_message(r)
            asked.set()
            return
        m.packet.seek(at)
        handler(m)

    t._handler_table[MSG_GLOBAL_REQUEST] = global_request
    return asked

def _taken_over(start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path,
                held_target: int | None = None, link_toml: str | None = None,
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
    if link_toml is None:
        agent = start_agent(
            "-p", str(port), "-i", str(lab_pc.path), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-R", f"web:8080:127.0.0.1:{declared.port}",
            "lab_pc@127.0.0.1", name="agent",
        )  # fmt: skip
    else:  # a config file (the cap's keys; a SIGHUP reloads it)
        held = ("" if held_target is None else
                f'[[link.remote]]\nlisten = "held:2222"\nconnect = "127.0.0.1:{held_target}"\n')
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[[link]]\nname = "relay"\nhost = "127.0.0.1"\nport = {port}\nuser = "lab_pc"\n'
            f'identity = "{lab_pc.path}"\nknown_hosts = "{known_hosts}"\n{link_toml}\n'
            f'[[link.remote]]\nlisten = "web:8080"\nconnect = "127.0.0.1:{declared.port}"\n'
            f"{held}")
        agent = start_agent("--config", str(config), name="agent")
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


class _HoldingTarget:
    """A lab host that accepts every connection and holds it (a GPU cluster's sshd
    waiting for a client's version line): counts what is open now and at most."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0), backlog=4096)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.peak = 0
        self._changed = threading.Condition()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    with self._changed:
                        self.conns.append(conn)
                        self.peak = max(self.peak, self.open)
                        self._changed.notify_all()
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    self._sel.unregister(conn)
                    with self._changed:
                        self.conns.remove(conn)  # type: ignore[arg-type]
                        self._changed.notify_all()
                    conn.close()  # type: ignore[union-attr]

    @property
    def open(self) -> int:
        return len(self.conns)

    def wait_open(self, ok: Callable[[int], bool], timeout: float = 20) -> bool:
        """Whether the number of connections held came to satisfy ``ok`` in time."""
        with self._changed:
            return self._changed.wait_for(lambda: ok(self.open), timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.conns:
            conn.close()
        self.listener.close()
        self._sel.close()


def _record_refusals(t: paramiko.Transport) -> dict[int, tuple[int, str]]:
    """Every ``CHANNEL_OPEN_FAILURE`` the agent sends on ``t``, by channel id: (reason
    code, text), filled as they arrive; paramiko's own handler still runs after."""
    refused: dict[int, tuple[int, str]] = {}
    failure = t._handler_table[MSG_CHANNEL_OPEN_FAILURE]

    def record(m: Message) -> None:
        at = m.packet.tell()
        chanid, code, text = m.get_int(), m.get_int(), m.get_text()
        refused[chanid] = (code, text)
        m.packet.seek(at)
        failure(m)

    t._handler_table[MSG_CHANNEL_OPEN_FAILURE] = record
    return refused


def _open_without_waiting(t: paramiko.Transport, dest: tuple[str, int],
                          n: int) -> list[tuple[Any, threading.Event]]:
    """``n`` ``forwarded-tcpip`` opens sent back to back, none awaited (paramiko's
    ``open_channel`` less its wait): as fast as the link carries them.  The channels
    are returned with their events (paramiko holds its channels weakly)."""
    opened = []
    for i in range(n):
        with t.lock:
            chanid = t._next_channel()
            m = Message()
            m.add_byte(cMSG_CHANNEL_OPEN)
            m.add_string("forwarded-tcpip")
            m.add_int(chanid)
            m.add_int(2 * 1024 * 1024)
            m.add_int(32768)
            m.add_string(dest[0])
            m.add_int(dest[1])
            m.add_string("203.0.113.9")
            m.add_int(10000 + i % 50000)
            chan = paramiko.Channel(chanid)
            t._channels.put(chanid, chan)
            t.channel_events[chanid] = event = threading.Event()
            t.channels_seen[chanid] = True
            chan._set_transport(t)
            chan._set_window(2 * 1024 * 1024, 32768)
        t._send_user_message(m)
        opened.append((chan, event))
    return opened


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


FLOOD = 3000
CAP = 200


def test_a_compromised_relay_cannot_open_sessions_without_end(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """A taken-over relay opens 3 000 ``forwarded-tcpip`` channels to the agent's
    declared target, back to back, and never closes one: each was a TCP connection
    from the lab PC to a lab host (whose sshd has ``MaxStartups``), a descriptor and
    memory on the lab PC: **3 000 confirmed in 0.9 s, agent fds 10 -> 3 010, the target
    holding 3 000** (one run), without end.  Now the link's ``max_sessions`` (here 200)
    bounds them: the rest are refused with ``OPEN_RESOURCE_SHORTAGE`` and the reason,
    two log lines in all, the honest channel echoes throughout, a session closed gives
    its place back, and a reload raises the cap on the running link."""
    held = _HoldingTarget()
    try:
        agent, t, ch = _taken_over(start_agent, targets, tmp_path, held_target=held.port,
                                   link_toml=f"max_sessions = {CAP}\n")
        try:
            fds0, rss0 = _fds(agent.proc.pid), rss_kb(agent.proc.pid)
            refused = _record_refusals(t)
            began = time.monotonic()
            opens = _open_without_waiting(t, ("held", 2222), FLOOD)
            for _, event in opens:
                assert event.wait(60), "the agent never answered an open"
            took = time.monotonic() - began
            confirmed = [chan for chan, _ in opens if chan.chanid not in refused]
            fds, rss = _fds(agent.proc.pid), rss_kb(agent.proc.pid)
            began = time.monotonic()
            assert _echo(ch, b"honest") == b"honest"
            echo_ms = (time.monotonic() - began) * 1000
            print(f"\n{FLOOD} opens in {took:.1f}s: {len(confirmed)} confirmed, {len(refused)} "
                  f"refused; agent fds {fds0} -> {fds}, RSS +{rss - rss0} KiB; target holds "
                  f"{held.open} (peak {held.peak}); the honest channel echoes in "
                  f"{echo_ms:.0f} ms")
            assert len(confirmed) == CAP - 1  # the honest channel holds one place
            assert held.wait_open(lambda n: n == CAP - 1)
            assert fds - fds0 < CAP + 16, f"the agent holds {fds - fds0} more descriptors"
            reasons = {r for r in refused.values()}
            assert reasons == {(OPEN_RESOURCE_SHORTAGE, "the agent has 200 sessions open on "
                                "this link (max_sessions = 200)")}, reasons
            counted = agent.wait_for("session_cap", timeout=30, count=len(refused) - 1)
            assert "max_sessions = 200" in counted["reason"]
            assert len(agent.events("session_cap")) == 2

            # A session the relay closes gives its place back; honest ones open again.
            for chan in confirmed[:50]:
                chan.close()
            assert held.wait_open(lambda n: n == CAP - 1 - 50)
            again = [t.open_channel("forwarded-tcpip", dest_addr=("web", 8080),
                                    src_addr=("203.0.113.9", 2), timeout=10) for _ in range(50)]
            for c in again:
                c.settimeout(10)
                assert c.recv(64) == b"declared\n"
            refusal = _open(t, "forwarded-tcpip", ("web", 8080))
            assert isinstance(refusal, paramiko.ChannelException)
            assert refusal.code == OPEN_RESOURCE_SHORTAGE

            # A reload raises the cap on the running link (no reconnect).
            config = tmp_path / "agent.toml"
            config.write_text(config.read_text().replace(f"max_sessions = {CAP}",
                                                         f"max_sessions = {CAP + 20}"))
            os.kill(agent.proc.pid, signal.SIGHUP)
            agent.wait_for("link_reconfigured", timeout=20, max_sessions=CAP + 20)
            more = _open_without_waiting(t, ("held", 2222), 30)
            for _, event in more:
                assert event.wait(30)
            assert sum(1 for chan, _ in more if chan.chanid not in refused) == 20
            assert _echo(ch, b"still") == b"still"
            assert agent.events("link_lost") == [] and t.is_active()
        finally:
            t.close()
    finally:
        held.close()


AGAIN = 300


def test_a_compromised_relay_announcing_keys_it_will_not_prove_costs_bounded_log_lines(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """``hostkeys-again@labrelay`` is taken as often as it comes (a reload's new key),
    one proof request out at a time.  A relay that announced a fresh key again and
    again and refused every proof it was asked for made **one warning each** (300 lines
    for 300, at its pace; agent CPU 0.2 s).  Now the first is logged, then one count
    line per 10 s."""
    agent, t, ch = _taken_over(start_agent, targets, tmp_path)
    asked = _refuse_proofs(t)
    relay_key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "relay_host_key"))
    try:
        cpu0 = _cpu_seconds(agent.proc.pid)
        for _ in range(AGAIN):
            asked.clear()
            a = Message()
            a.add_byte(cMSG_GLOBAL_REQUEST)
            a.add_string(b"hostkeys-again@labrelay")
            a.add_boolean(False)
            a.add_string(relay_key.asbytes())
            a.add_string(_fresh_ed25519().asbytes())
            t._send_user_message(a)
            assert asked.wait(10), "the agent did not ask for a proof"
        assert _echo(ch, b"ping") == b"ping"
        cpu = _cpu_seconds(agent.proc.pid) - cpu0
        unproven = agent.events("link_hostkey_unproven")
        print(f"\n{AGAIN} announcements, every proof refused: {len(unproven)} "
              f"link_hostkey_unproven lines, agent CPU {cpu:.2f}s")
        assert len(unproven) == 1, len(unproven)
        assert t.is_active()
    finally:
        t.close()
    counted = agent.wait_for("link_hostkey_unproven", timeout=20, count=AGAIN - 1)
    assert "refused to prove" in counted["reason"]
    assert len(agent.events("link_hostkey_unproven")) == 2


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HUGE = 20


def _huge_rsa_blob(nbytes: int) -> bytes:
    """An ``ssh-rsa`` public key blob with an ``nbytes`` modulus (odd, top bit set): it
    parses as a key, no such key exists."""
    n = int.from_bytes(os.urandom(nbytes), "big") | 1 | (1 << (nbytes * 8 - 1))
    return common.NS(b"ssh-rsa") + common.MP(65537) + common.MP(n)


def test_a_compromised_relays_host_key_announcements_cost_the_agent_little(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """What ``hostkeys-again@labrelay`` may carry: 10 000 keys in one, malformed ones
    (a length past the end, bytes left over): ignored whole, no proof asked.  An RSA
    "key" of 1 000 KiB (a random modulus) was parsed twice and asked to be proven, the
    1 MiB blob sent back in the request: 20 of them cost the agent **0.39 s of CPU**
    (~20 ms per MiB; one run).  Now a blob past a host key's size (RSA 16 384 bits is
    2 071 bytes) is not a key: nothing is asked, and the agent's CPU barely moves."""
    agent, t, ch = _taken_over(start_agent, targets, tmp_path)
    asked = _refuse_proofs(t)

    def again(payload: bytes) -> None:
        a = Message()
        a.add_byte(cMSG_GLOBAL_REQUEST)
        a.add_string(b"hostkeys-again@labrelay")
        a.add_boolean(False)
        a.add_bytes(payload)
        t._send_user_message(a)

    relay_blob = paramiko.Ed25519Key.from_private_key_file(
        str(tmp_path / "relay_host_key")).asbytes()
    try:
        rss0 = rss_kb(agent.proc.pid)
        many = b"".join(common.NS(_fresh_ed25519().asbytes()) for _ in range(10_000))
        for payload in (many, common.NS(relay_blob) + b"\x00\x00\x10\x00abc",
                        common.NS(relay_blob) + b"\x01"):
            again(payload)
        t.global_request("keepalive@openssh.com", wait=True)  # read and handled
        assert not asked.is_set(), "the agent asked to prove a malformed announcement"
        cpu0 = _cpu_seconds(agent.proc.pid)
        began = time.monotonic()
        for _ in range(HUGE):
            asked.clear()
            again(common.NS(relay_blob) + common.NS(_huge_rsa_blob(1000 * 1024)))
            t.global_request("keepalive@openssh.com", wait=True)
            assert not asked.is_set(), "the agent asked to prove a 1 MiB key"
        took = time.monotonic() - began
        cpu = _cpu_seconds(agent.proc.pid) - cpu0
        echo0 = time.monotonic()
        assert _echo(ch, b"ping") == b"ping"
        print(f"\n{HUGE} announcements of an RSA blob of 1000 KiB: agent CPU {cpu:.2f}s in "
              f"{took:.2f}s, RSS +{rss_kb(agent.proc.pid) - rss0} KiB, echo "
              f"{(time.monotonic() - echo0) * 1000:.0f} ms")
        assert t.is_active()
    finally:
        t.close()


STUCK_CAP = 16
STUCK_OPENS = 300


def test_connects_to_a_host_that_stopped_answering_are_capped_per_target(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """A lab host whose accept queue is full drops SYNs: each connect the agent makes
    waits for its timeout (10 s).  The relay opens 300 channels to it back to back:
    ``max_connecting`` (here 16) are connecting, the rest refused at once with the
    reason; the sessions to the link's other target are not held up."""
    stuck = socket.socket()
    stuck.bind((LOOPBACK, 0))
    stuck.listen(0)  # nothing accepted: a queue of one, then SYNs are dropped
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(stuck.getsockname())
        fillers.append(f)
    try:
        agent, t, ch = _taken_over(
            start_agent, targets, tmp_path, held_target=stuck.getsockname()[1],
            link_toml=f"max_connecting = {STUCK_CAP}\n")
        try:
            refused = _record_refusals(t)
            opens = _open_without_waiting(t, ("held", 2222), STUCK_OPENS)
            # The refusals come at once; the 16 connecting wait for their timeout.
            assert _echo(ch, b"honest") == b"honest"
            again = t.open_channel("forwarded-tcpip", dest_addr=("web", 8080),
                                   src_addr=("203.0.113.9", 3), timeout=10)
            again.settimeout(10)
            assert again.recv(64) == b"declared\n"
            waiting = [c for c, event in opens if not event.is_set()]
            print(f"\n{STUCK_OPENS} opens to a host that drops SYNs: {len(refused)} refused at "
                  f"once, {len(waiting)} connecting; the other target's new session works")
            assert len(refused) == STUCK_OPENS - STUCK_CAP and len(waiting) == STUCK_CAP
            assert {r for r in refused.values()} == {(
                OPEN_RESOURCE_SHORTAGE, "the agent has 16 sessions still connecting to the "
                "target of R:held:2222 (max_connecting = 16)")}
            for _, event in opens:  # the 16 fail at their connect timeout
                assert event.wait(30)
            assert len(refused) == STUCK_OPENS
            agent.wait_for("session_cap", timeout=30, count=STUCK_OPENS - STUCK_CAP - 1)
            assert len(agent.events("session_cap")) == 2  # the first, then the count
            # The 16 failed connects: one line at the first, the count after.
            counted = agent.wait_for("target_unreachable", timeout=30, count=STUCK_CAP - 1)
            assert counted["forward"] == "R:held:2222"
            assert len(agent.events("target_unreachable")) == 2
        finally:
            t.close()
    finally:
        for f in fillers:
            f.close()
        stuck.close()


UNREACHABLE_OPENS = 200


def test_failed_connects_to_a_declared_target_cost_two_log_lines(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """A taken-over relay (or a busy lab whose host died) opens sessions to a declared
    target that refuses connects.  Each failed connect was **one ``target_unreachable``
    warning** (200 lines for 200 opens, without end at the relay's pace, at most
    ``max_connecting`` per connect timeout for a host that drops SYNs).  Now the first
    is logged with its reason, then one count line per 10 s burst, per target; each
    open is still refused with the reason, and the honest channel echoes throughout."""
    closed = socket.socket()
    closed.bind((LOOPBACK, 0))  # bound, never listening: a connect to it is refused
    try:
        agent, t, ch = _taken_over(start_agent, targets, tmp_path,
                                   held_target=closed.getsockname()[1], link_toml="")
        try:
            refused = _record_refusals(t)
            opens = []
            for _ in range(UNREACHABLE_OPENS // 50):  # in rounds under max_connecting
                batch = _open_without_waiting(t, ("held", 2222), 50)
                for _, event in batch:
                    assert event.wait(30), "the agent never answered an open"
                opens += batch
            assert len(refused) == UNREACHABLE_OPENS
            assert {code for code, _ in refused.values()} == {OPEN_CONNECT_FAILED}
            assert all("connect failed" in text for _, text in refused.values())
            assert _echo(ch, b"honest") == b"honest"
            lines = agent.events("target_unreachable")
            print(f"\n{UNREACHABLE_OPENS} opens to a target that refuses connects: "
                  f"{len(lines)} target_unreachable lines before the window's end")
            assert len(lines) == 1, len(lines)
            assert "refused" in lines[0]["reason"].lower(), lines[0]
            counted = agent.wait_for("target_unreachable", timeout=30,
                                     count=UNREACHABLE_OPENS - 1)
            assert counted["forward"] == "R:held:2222"
            assert len(agent.events("target_unreachable")) == 2
            assert t.is_active()
        finally:
            t.close()
    finally:
        closed.close()


PER_TARGET = 40
TO_ONE_HOST = 300


def test_one_lab_host_receives_at_most_max_sessions_per_target(
    start_agent: Callable[..., AgentProcess], targets: Targets, tmp_path: Path
) -> None:
    """``max_sessions`` is per link: a taken-over relay could put all of it (1 024 by
    default) on one lab host, a Jupyter server at the common soft descriptor limit
    of 1 024, or a GPU node's sshd.  Here 300 opens to one declared target, none
    closed: **all 300 were confirmed and held by the target** before round 20 (the link
    cap is 1 024).  Now that target holds ``max_sessions_per_target`` (here 40), the
    rest are refused with ``OPEN_RESOURCE_SHORTAGE`` and the setting's name, two
    ``session_cap`` lines; the link's other target still opens; ``labrelay status``
    shows the count per target; a reload raises the cap on the running link."""
    import json
    import urllib.request

    from harness import free_port

    held = _HoldingTarget()
    admin = free_port()
    try:
        agent, t, ch = _taken_over(
            start_agent, targets, tmp_path, held_target=held.port,
            link_toml=f'max_sessions_per_target = {PER_TARGET}\n\n'
                      f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
        try:
            refused = _record_refusals(t)
            opens = _open_without_waiting(t, ("held", 2222), TO_ONE_HOST)
            for _, event in opens:
                assert event.wait(60), "the agent never answered an open"
            confirmed = [chan for chan, _ in opens if chan.chanid not in refused]
            print(f"\n{TO_ONE_HOST} opens to one lab host: {len(confirmed)} confirmed, "
                  f"{len(refused)} refused; the host holds {held.open}")
            assert len(confirmed) == PER_TARGET
            assert held.wait_open(lambda n: n == PER_TARGET)
            assert {r for r in refused.values()} == {(
                OPEN_RESOURCE_SHORTAGE, f"the agent has {PER_TARGET} sessions open to the "
                f"target of R:held:2222 (max_sessions_per_target = {PER_TARGET})")}
            # The link's other target is not held up, and the honest channel echoes.
            other = t.open_channel("forwarded-tcpip", dest_addr=("web", 8080),
                                   src_addr=("203.0.113.9", 4), timeout=10)
            other.settimeout(10)
            assert other.recv(64) == b"declared\n"
            assert _echo(ch, b"honest") == b"honest"
            agent.wait_for("session_cap", timeout=30, count=len(refused) - 1)
            assert len(agent.events("session_cap")) == 2

            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status.json",
                                        timeout=10) as r:
                (link,) = json.load(r)["links"]
            assert link["max_sessions_per_target"] == PER_TARGET
            assert link["sessions_by_target"] == {"R:held:2222": PER_TARGET,
                                                  "R:web:8080": 2}
            assert link["sessions_refused_cap"] == TO_ONE_HOST - PER_TARGET

            # A reload raises it on the running link (no reconnect).
            config = tmp_path / "agent.toml"
            config.write_text(config.read_text().replace(
                f"max_sessions_per_target = {PER_TARGET}",
                f"max_sessions_per_target = {PER_TARGET + 10}"))
            os.kill(agent.proc.pid, signal.SIGHUP)
            agent.wait_for("link_reconfigured", timeout=20,
                           max_sessions_per_target=PER_TARGET + 10)
            more = _open_without_waiting(t, ("held", 2222), 30)
            for _, event in more:
                assert event.wait(30)
            assert sum(1 for chan, _ in more if chan.chanid not in refused) == 10
            assert held.wait_open(lambda n: n == PER_TARGET + 10)
            assert agent.events("link_lost") == [] and t.is_active()
        finally:
            t.close()
    finally:
        held.close()
