"""A greedy lab mate (a valid key, a grant) against the shared relay.

alice, with paramiko, opens a channel to a service she is granted and then sends
``CHANNEL_DATA`` past what the relay allows (packets larger than the relay's maximum
packet, as fast as she can write them).  The relay closes that channel at the first
one.  Before, it logged one ``protocol_error`` warning and sent one more CLOSE for
*every* later packet until her CLOSE came back: a log line per packet of hers (76 for
300 packets with paramiko, which answers the CLOSE; without end for a client that
never does), the log flood docs/security.md rules out.
Now the second overrun on a channel already closed for one is a protocol-error
disconnect: two lines in all.  bob's session through the same agent echoes meanwhile.

alice also asks, in a loop, for a service she is not granted: each open is refused,
and each was one ``relay_session_refused`` warning (2 600 a second from one paramiko
client, for as long as she liked).  Now the first 32 of each 10 s per user are logged
one by one and the rest as one count line per window; every refusal is still counted
(``sessions_refused``), and bob's refusal is logged as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode, make_key
from paramiko.common import cMSG_CHANNEL_DATA
from paramiko.message import Message
from relay_fixtures import burst_total, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.security]

PACKETS = 300
TOO_BIG = 40_000  # past the relay's max_packet (32 KiB) for users


def _login(relay: RelayNode, key: object, user: str) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", relay.port))
    t.connect(username=user, pkey=paramiko.Ed25519Key.from_private_key_file(
        str(key.path)))  # type: ignore[attr-defined]
    assert t.is_authenticated()
    return t


def _echo(t: paramiko.Transport, payload: bytes) -> bytes:
    ch = t.open_channel("direct-tcpip", ("web", 8080), ("127.0.0.1", 1), timeout=20)
    ch.settimeout(20)
    ch.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += ch.recv(len(payload) - len(got))
    ch.close()
    return got


def _world(start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
           targets: Targets, tmp_path: Path, relay_toml: str = "",
           ) -> tuple[RelayNode, dict[str, Any]]:
    """The relay, lab_pc's agent serving web:8080 (an echo server), alice and bob
    granted it."""
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice", "bob")}
    relay = start_relay(
        agents=[f'permitlisten="web:8080" {keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="web:8080" {keys[u].public_blob()} {u}' for u in ("alice", "bob")],
        relay_toml=relay_toml,
    )
    echo = targets.echo()
    agent = start_agent(
        "-p", str(relay.port), "-i", str(keys["lab_pc"].path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-R", f"web:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1", name="agent",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, since=0, forward="R:web:8080")
    return relay, keys


def test_data_past_the_window_costs_two_log_lines_then_the_connection(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    bob = _login(relay, keys["bob"], "bob")
    assert _echo(bob, b"before") == b"before"

    alice = _login(relay, keys["alice"], "alice")
    ch = alice.open_channel("direct-tcpip", ("web", 8080), ("127.0.0.1", 1), timeout=20)
    mark = relay.mark()
    start = time.time()
    for _ in range(PACKETS):
        m = Message()
        m.add_byte(cMSG_CHANNEL_DATA)
        m.add_int(ch.remote_chanid)
        m.add_string(b"z" * TOO_BIG)
        try:
            alice._send_user_message(m)  # what paramiko's Channel.send would refuse
        except (EOFError, OSError):
            break  # the relay is done with her
    gone = relay.wait_for("relay_disconnected", since=mark, name="alice")
    errors = relay.events("protocol_error", since=mark)
    print(f"\n{PACKETS} packets of {TOO_BIG} bytes: {len(errors)} protocol_error lines, "
          f"disconnected after {gone['time'] - start:.3f}s of wall time")
    assert [e["text"] for e in errors][:1] == ["peer overran channel 0 window; closing it"]
    assert len(errors) == 2, [e["text"] for e in errors]
    assert "past channel 0's window" in errors[1]["why"], errors[1]
    assert _echo(bob, b"after") == b"after"


REFUSALS = 600


def test_opens_refused_in_a_loop_cost_a_bounded_number_of_log_lines(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    alice = _login(relay, keys["alice"], "alice")
    bob = _login(relay, keys["bob"], "bob")
    mark = relay.mark()
    start = time.monotonic()
    for _ in range(REFUSALS):
        with pytest.raises(paramiko.ChannelException):
            alice.open_channel("direct-tcpip", ("nothere", 1), ("127.0.0.1", 1), timeout=10)
    took = time.monotonic() - start
    with pytest.raises(paramiko.ChannelException):
        bob.open_channel("direct-tcpip", ("nothere", 1), ("127.0.0.1", 1), timeout=10)
    assert _echo(bob, b"bob") == b"bob"
    assert relay.events("relay_session_refused", since=mark, name="bob") != []
    # the window (10 s) ends: one line says how many more
    summary = relay.wait_for("relay_session_refused", since=mark, name="alice", timeout=20,
                             count=lambda n: n is not None)

    # a loop stretched past one window (a loaded box) ends with a later count line than
    # the first: await them all (test_channel_requests' twin, d0373d3)
    wait_until(lambda: burst_total(relay.events("relay_session_refused", since=mark,
                                                name="alice")) >= REFUSALS,
               "every refused open logged or counted", timeout=30)
    lines = relay.events("relay_session_refused", since=mark, name="alice")
    print(f"\n{REFUSALS} refused opens in {took:.2f}s: {len(lines)} log lines; {summary['text']}")
    assert len(lines) <= 33 * (1 + int(took // 10) + 1), len(lines)
    assert burst_total(lines) == REFUSALS, lines[-1]
    assert "is not granted to user alice" in summary["why"], summary
    assert relay.status()["relay"]["counters"]["sessions_refused"] == REFUSALS + 1


def test_one_holder_of_a_shared_account_refused_in_a_loop_does_not_silence_another(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    """The shared lab account ``lab`` is logged in with two keys: mallory's and
    alice's.  The log's allowance of refusals (32 a window in full) was per name, so
    mallory, refused in a loop, used up alice's too: alice's refusal was not logged,
    only counted in a line under mallory's last reason.  The allowance is per key, and
    each line names the key (``ssh-keygen -lf``)."""
    keys = {n: make_key(tmp_path / n, comment=n) for n in ("mallory", "alice")}
    relay = start_relay(users=[f'permitopen="web:8080" {keys[n].public_blob()} lab'
                               for n in ("mallory", "alice")])
    mallory = _login(relay, keys["mallory"], "lab")
    alice = _login(relay, keys["alice"], "lab")
    mark = relay.mark()
    for _ in range(100):
        with pytest.raises(paramiko.ChannelException):
            mallory.open_channel("direct-tcpip", ("nothere", 1), ("127.0.0.1", 1), timeout=10)
    with pytest.raises(paramiko.ChannelException):
        alice.open_channel("direct-tcpip", ("alsonot", 2), ("127.0.0.1", 1), timeout=10)
    line = relay.wait_for("relay_session_refused", since=mark, service="alsonot:2", timeout=5)
    assert line["key"] == keys["alice"].fingerprint(), line
    full = relay.events("relay_session_refused", since=mark, service="nothere:1")
    assert len(full) == 32 and {e["key"] for e in full} == {keys["mallory"].fingerprint()}


FLOOD = 400_000
NOREAD = """
import sys, time, paramiko
from paramiko.common import cMSG_GLOBAL_REQUEST
from paramiko.message import Message
port, keyfile, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
t = paramiko.Transport(("127.0.0.1", port))
t.connect(username="alice", pkey=paramiko.Ed25519Key.from_private_key_file(keyfile))
t.packetizer.read_message = lambda: time.sleep(1e9)  # reads nothing from now on
t.global_request("wake@x", wait=False)
print("ready", flush=True)
m = Message(); m.add_byte(cMSG_GLOBAL_REQUEST); m.add_string("foo@bar"); m.add_boolean(True)
for i in range(n):
    t.packetizer.send_message(m)
print("sent", n, flush=True)
time.sleep(1e9)
"""


def test_a_user_who_never_reads_the_answers_is_not_read_and_costs_bounded_memory(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    """alice sends global requests that want a reply and reads none of the replies.
    The relay read every request and kept every answer in Twisted's buffer: 300 000
    requests grew it by 42 MB, without bound.  Now, as OpenSSH takes in more only while
    it has little to write, the relay stops reading her once 1 MiB of its
    answers wait unread (``relay_read_held``): her sends block in her own kernel
    buffers, the relay's memory stays bounded, bob is served meanwhile, and the
    keepalive (whose answers she does not read either) ends her."""
    import subprocess
    import sys

    relay, keys = _world(start_relay, start_agent, targets, tmp_path,
                         relay_toml="keepalive_interval = 1\nkeepalive_count = 2\n")
    bob = _login(relay, keys["bob"], "bob")
    assert _echo(bob, b"before") == b"before"
    script = tmp_path / "noread.py"
    script.write_text(NOREAD)
    before = relay.rss_kb()
    mark = relay.mark()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(relay.port), str(keys["alice"].path), str(FLOOD)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        held = relay.wait_for("relay_read_held", since=mark, timeout=60)
        assert held["waiting"] > 1024 * 1024, held
        assert _echo(bob, b"during") == b"during"
        grown = relay.rss_kb() - before
        print(f"\nheld after {held['waiting']} bytes unread; relay RSS +{grown} KiB; "
              f"the client still sending: {proc.poll() is None}")
        # Unread answers are what the relay holds: a few MiB, not the 50 MB of before.
        assert grown < 24 * 1024, grown
        # Her sender is blocked (it never got to the end of its requests).
        assert proc.poll() is None
        # She reads nothing, so she answers no keepalive either: the relay ends her
        # (1 s x (2 + 1) here), her process still there.
        relay.wait_for("relay_disconnected", since=mark, name="alice", timeout=30)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert _echo(bob, b"after") == b"after"
