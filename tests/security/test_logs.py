"""Forged log lines: peer-chosen strings reach the relay's log escaped and truncated.

paramiko plays the attacker against a real relay, once with the text log and once
with JSON lines: it logs in under a user name that carries a whole fake log line (and
under a 1 MiB user name), opens a ``direct-tcpip`` to a forged host name and an odd
channel type as a granted user, and asks for a ``tcpip-forward`` of a forged service
name as a granted agent.  Every line the relay writes must parse as one of its own
(a time stamp and a level, or a JSON event), the forged strings must show escaped and
cut, and alice's stock ``ssh -L`` through the relay must work before and after.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from conftest import Targets, twistd_command
from harness import (
    LOOPBACK,
    AgentProcess,
    KeyPair,
    RelayNode,
    SshProcess,
    echo_roundtrip,
    known_hosts_line,
    make_key,
    ssh_argv,
    write_known_hosts,
)
from relay_fixtures import stock_local_forward

pytestmark = [pytest.mark.integration, pytest.mark.security]

FAKE = "2026-01-01 00:00:00 info  user admin connected from 10.0.0.1"
FORGED_USER = "mallory\n" + FAKE
FORGED_HOST = "web\n" + FAKE + "\x1b[2J"
FORGED_SERVICE = "gpu\r\n" + FAKE
FORGED_TYPE = "session\n" + FAKE
BIG_USER = "A" * (1024 * 1024 - 1024)  # a user name as long as a packet allows
LONG_HOST = "h" * 60000
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (debug|info |warn |error|critical) \S")
CONTINUATION = "  | "


@dataclass(frozen=True)
class Keys:
    lab_pc: KeyPair
    alice: KeyPair
    stranger: KeyPair


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(**{n: make_key(tmp_path / "keys" / n, comment=n)
                   for n in Keys.__dataclass_fields__})


def grants(k: Keys) -> tuple[list[str], list[str]]:
    return ([f'permitlisten="web:8080" {k.lab_pc.public_blob()} lab_pc'],
            [f'permitopen="web:8080" {k.alice.public_blob()} alice'])


def relay_config(directory: Path, keys: Keys) -> Path:
    """``directory/node.toml`` for a relay run by hand (not by ``start_relay``: the
    tests here pick its log format or run it under twistd), with :func:`grants`."""
    agents, users = grants(keys)
    (directory / "agents").write_text("\n".join(agents) + "\n")
    (directory / "users").write_text("\n".join(users) + "\n")
    config = directory / "node.toml"
    config.write_text(f"""\
[relay]
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
agents_file = "agents"
users_file = "users"
""")
    return config


class FormatKey(paramiko.PKey):
    """A "key" whose algorithm name is a log format reaching into the relay's objects
    and whose blob no SSH library parses: Conch used to log that name *as* a format,
    and before the fix this one wrote the relay's private host key (its ``repr``,
    with the secret) into the log, from an unauthenticated connection."""

    def __init__(self) -> None:
        pass

    def get_name(self) -> str:
        return "{log_source.transport.factory.privateKeys}"

    def asbytes(self) -> bytes:
        return b"\x00\x00\x00\x03bad"

    def can_sign(self) -> bool:
        return True

    def sign_ssh_data(self, data: bytes, algorithm: str | None = None) -> paramiko.Message:
        m = paramiko.Message()
        m.add_string("x")
        m.add_string(b"sig")
        return m


@contextmanager
def paramiko_transport(port: int) -> Iterator[paramiko.Transport]:
    transport = paramiko.Transport((LOOPBACK, port))
    transport.banner_timeout = transport.auth_timeout = 30
    try:
        transport.start_client(timeout=30)
        yield transport
    finally:
        transport.close()


def hostile_logins(port: int, k: Keys) -> None:
    """Logins as a forged, an overlong and a format-string user name: each refused."""
    key = paramiko.Ed25519Key.from_private_key_file
    for user in (FORGED_USER, BIG_USER):
        with paramiko_transport(port) as t, pytest.raises(paramiko.AuthenticationException):
            t.auth_publickey(user, key(str(k.stranger.path)))
    with paramiko_transport(port) as t, pytest.raises(paramiko.AuthenticationException):
        t.auth_publickey("format", FormatKey())


def attack(port: int, k: Keys) -> None:
    """The hostile sessions; each request is refused (and logged) by the relay."""
    hostile_logins(port, k)
    key = paramiko.Ed25519Key.from_private_key_file
    with paramiko_transport(port) as t:
        t.auth_publickey("alice", key(str(k.alice.path)))
        for host in (FORGED_HOST, LONG_HOST):
            with pytest.raises(paramiko.ChannelException):
                t.open_channel("direct-tcpip", (host, 8080), ("127.0.0.1", 1), timeout=15)
        with pytest.raises(paramiko.ChannelException):
            t.open_channel(FORGED_TYPE, timeout=15)
    with paramiko_transport(port) as t:
        t.auth_publickey("lab_pc", key(str(k.lab_pc.path)))
        with pytest.raises(paramiko.SSHException):
            t.request_port_forward(FORGED_SERVICE, 22)


def alice_session(start_ssh: Callable[..., SshProcess], relay_port: int, known_hosts: Path,
                  k: Keys, targets: Targets) -> int:
    """A stock agent registering web:8080 and alice's stock ``ssh -L`` to it; returns
    alice's local port once one round trip went through."""
    web = targets.echo(greeting=b"WEB ")
    agent = start_ssh(ssh_argv(relay_port, k.lab_pc.path, known_hosts, "-v", "-N",
                               "-o", "ExitOnForwardFailure=yes",
                               "-R", f"web:8080:127.0.0.1:{web.port}", user="lab_pc"),
                      name="stock-agent")  # fmt: skip
    agent.wait_stderr(r"remote forward success for: listen web:8080,")
    _alice, local = stock_local_forward(
        start_ssh,
        lambda port: ssh_argv(relay_port, k.alice.path, known_hosts, "-v", "-N",
                              "-o", "ExitOnForwardFailure=yes",
                              "-L", f"127.0.0.1:{port}:web:8080", user="alice"),
        name="alice")  # fmt: skip
    assert echo_roundtrip(local, b"before", greeting=b"WEB ") == b"before"
    return local


def escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n").replace(
        "\x1b", "\\x1b")


def test_text_log_has_no_forged_line(
    start_ssh: Callable[..., SshProcess], keys: Keys, targets: Targets, tmp_path: Path,
) -> None:
    config = relay_config(tmp_path, keys)
    relay = start_ssh([sys.executable, "-m", "relay", "relay", "--log-format", "text",
                       "--config", str(config)], name="relay-text")
    port = int(relay.wait_stderr(r"relay listening on 127\.0\.0\.1:(\d+);", timeout=30)[1])
    blob = " ".join((tmp_path / "state" / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    known_hosts = write_known_hosts(tmp_path / "known_hosts", known_hosts_line(blob, port))
    local = alice_session(start_ssh, port, known_hosts, keys, targets)

    attack(port, keys)
    relay.wait_stderr(r"refused tcpip-forward gpu\\r\\n2026", timeout=15)
    assert echo_roundtrip(local, b"after", greeting=b"WEB ") == b"after"

    lines = relay.stderr.lines[:]
    assert lines, relay.diagnostics()
    strays = [line for line in lines
              if not (TEXT_LINE.match(line) or line.startswith(CONTINUATION))]
    assert not strays, strays
    assert not [line for line in lines if line.startswith(FAKE[:19])]
    text = "\n".join(lines)
    assert f"auth refused for user {escaped(FORGED_USER)} from" in text
    # the 1 MiB name: cut at the source (256 bytes kept) and shown at 200 characters
    assert "A" * 200 + "[... 56 more chars] from" in text
    assert "too long (1047552, 14 and 9 bytes" in text
    assert f"refused session to {escaped(FORGED_HOST.lower())}:8080" in text
    assert "h" * 200 + "[... 59805 more chars]" in text
    assert f"refused {escaped(FORGED_TYPE)} channel" in text
    assert f"refused tcpip-forward {escaped(FORGED_SERVICE)}:22" in text
    assert "auth refused for user format from" in text
    assert "privateKeys" not in text and "Private Key" not in text
    assert max(len(line) for line in lines) < 2500


def test_json_log_fields_are_escaped_and_truncated(
    start_relay: Callable[..., RelayNode], start_ssh: Callable[..., SshProcess],
    keys: Keys, targets: Targets,
) -> None:
    agents, users = grants(keys)
    relay = start_relay(agents=agents, users=users)
    local = alice_session(start_ssh, relay.port, relay.known_hosts, keys, targets)
    mark = relay.mark()

    attack(relay.port, keys)
    relay.wait_for("relay_request_refused", since=mark, name="lab_pc")
    assert echo_roundtrip(local, b"after", greeting=b"WEB ") == b"after"

    assert not relay.events("_raw"), relay.events("_raw")  # every stdout line is JSON
    refused = relay.events("relay_auth_refused", since=mark)
    assert [e["user"] for e in refused] == [escaped(FORGED_USER),
                                            "A" * 200 + "[... 56 more chars]", "format"]
    assert refused[2]["why"] == "unsupported key type or malformed key"
    # the source as every other event writes it (round 13: IPv4Address(type='TCP', ...))
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", e["peer"]) for e in refused), refused
    assert not [e for e in relay.events()
                if "privateKeys" in json.dumps(e) or "Private Key" in json.dumps(e)]
    assert all("\n" not in e["text"] for e in refused)
    sessions = relay.events("relay_session_refused", since=mark, name="alice")
    assert [e["service"] for e in sessions] == [
        escaped(FORGED_HOST.lower()) + ":8080", "h" * 200 + "[... 59805 more chars]"]
    channel = relay.events("relay_channel_refused", since=mark)
    assert [e["type"] for e in channel] == [escaped(FORGED_TYPE)]
    forward = relay.events("relay_request_refused", since=mark, name="lab_pc")
    assert [e["what"] for e in forward] == [f"tcpip-forward {escaped(FORGED_SERVICE)}:22"]
    for event in relay.events(since=mark):
        for value in event.values():
            if isinstance(value, str):
                assert value.isprintable() and len(value) < 2500, event


def test_twistd_log_has_no_forged_line(
    start_process: Callable[..., AgentProcess], keys: Keys, tmp_path: Path,
) -> None:
    """``twistd -n labrelay --config F``: twistd's own log observer (stdout here, the
    ``--logfile`` otherwise) sees the same escaped and truncated fields."""
    config = relay_config(tmp_path, keys)
    twistd = start_process(twistd_command("-n", "--pidfile", "", "labrelay",
                                          "--config", str(config)), name="twistd")
    listening = twistd.wait_for("_raw", timeout=30, text=lambda t: "relay listening on" in t)
    port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+);", listening["text"])[1])

    hostile_logins(port, keys)
    twistd.wait_for("_raw", timeout=15, text=lambda t: "auth refused for user format" in t)

    lines = [e["text"] for e in twistd.events("_raw")]
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
    assert all(stamp.match(line) or line.startswith("\t") for line in lines), lines
    assert not [line for line in lines if line.startswith(FAKE[:19])]
    text = "\n".join(lines)
    assert f"auth refused for user {escaped(FORGED_USER)} from" in text
    assert "A" * 200 + "[... 56 more chars] from" in text
    assert "privateKeys" not in text and "Private Key" not in text
    assert max(len(line) for line in lines) < 2500
