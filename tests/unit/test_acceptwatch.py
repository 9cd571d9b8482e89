"""relay.server.acceptwatch: Twisted's accept-failure events become one
``relay_accept_failed`` per burst, with a count, and ``accept_failed`` counts them."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from relay.config.loader import parse_config
from relay.ops.service import make_node_service
from relay.server.acceptwatch import (
    LISTENERS,
    AcceptWatch,
    accept_failure,
    describe,
    name_listener,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tlscerts import CA


def _twisted(fmt: str, **fields: Any) -> dict[str, Any]:
    return {"log_namespace": "twisted.internet.tcp.Port", "log_format": fmt, **fields}


COULD_NOT = "Could not accept new connection ({acceptError})"
CLOSED = "EMFILE recovery: Closed socket from {address}"


def test_twisteds_accept_failures_are_recognised() -> None:
    assert accept_failure(_twisted(CLOSED, address=("127.0.0.1", 5))) == "EMFILE"
    assert accept_failure(_twisted(COULD_NOT, acceptError="ENFILE")) == "ENFILE"
    assert accept_failure(_twisted(COULD_NOT, acceptError="EMFILE")) == "EMFILE"
    # a client that reset before its accept: nothing to tell the operator
    assert accept_failure(_twisted(COULD_NOT, acceptError="ECONNABORTED")) is None
    # Twisted's other EMFILE lines are not a lost connection each
    releasing = "EMFILE encountered; releasing reserved file descriptor."
    assert accept_failure(_twisted(releasing)) is None
    assert accept_failure(_twisted("Re-reserving EMFILE recovery file descriptor.")) is None
    # the same words from anyone but Twisted
    assert accept_failure({"log_namespace": "relay.x", "log_format": CLOSED}) is None


def test_describe_gives_the_words() -> None:
    assert describe("EMFILE") == "Too many open files (EMFILE)"
    assert describe("ENFILE").endswith("(ENFILE)")
    assert describe("ENOSUCH") == "accept failed (ENOSUCH)"


@pytest.fixture
def said() -> Iterator[list[dict[str, Any]]]:
    """The ``relay_accept_failed`` events logged while a test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "relay_accept_failed":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_one_line_per_burst_then_the_count(said: list[dict[str, Any]]) -> None:
    clock = Clock()
    counters = {"accept_failed": 0}
    watch = AcceptWatch(clock, counters, window=10.0)
    for _ in range(5):
        watch(_twisted(CLOSED, address=("127.0.0.1", 1)))
    watch({"log_namespace": "relay.x", "log_format": "unrelated"})
    assert counters["accept_failed"] == 5
    assert len(said) == 1
    assert said[0]["errno"] == "EMFILE" and said[0]["count"] == 1
    assert "Too many open files" in said[0]["why"]
    assert "LimitNOFILE" in said[0]["log_format"]
    clock.advance(10.0)
    assert [e["count"] for e in said] == [1, 4]
    # a later failure starts a new burst at once
    watch(_twisted(COULD_NOT, acceptError="ENFILE"))
    assert [e["errno"] for e in said] == ["EMFILE", "EMFILE", "ENFILE"]
    watch(_twisted(COULD_NOT, acceptError="ENFILE"))
    watch.stop()  # says the rest now, leaves no timer
    assert [e["count"] for e in said] == [1, 4, 1, 1]
    assert clock.getDelayedCalls() == []


class _Refusing:
    """A listening socket whose ``accept()`` fails as at the system's file limit."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def accept(self) -> Any:
        raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("kind", LISTENERS)
def test_the_line_names_the_listener_that_failed(said: list[dict[str, Any]], kind: str) -> None:
    """A real Twisted TCP port, named as the relay names its listeners, whose accept
    fails: the line says which listener and port (it did not: an operator could not
    tell a public port's clients from users on the SSH port).  Fails if Twisted's
    accept loop stops logging through the port's ``_logger``."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    port: Any = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    watch = AcceptWatch(Clock(), {"accept_failed": 0})
    globalLogPublisher.addObserver(watch)
    try:
        assert name_listener(port, kind)
        number = port.getHost().port
        real, port.socket = port.socket, _Refusing(port.socket)
        try:
            port.doRead()
        finally:
            port.socket = real
    finally:
        globalLogPublisher.removeObserver(watch)
        watch.stop()
        port.stopListening()
    assert [(e["listener"], e["listener_port"], e["errno"]) for e in said] == [
        (kind, number, "ENFILE")]
    assert f"cannot accept connections on the {kind} port {number}: " in formatEvent(said[0])


def test_an_unnamed_listener_is_said_so(said: list[dict[str, Any]]) -> None:
    watch = AcceptWatch(Clock(), {"accept_failed": 0})
    watch(_twisted(COULD_NOT, acceptError="ENFILE"))
    assert said[0]["listener"] is None
    assert "cannot accept connections on an unnamed listener: " in formatEvent(said[0])
    assert not name_listener(object(), "SSH")  # nothing to name: no harm done


def test_every_listener_of_a_relay_node_is_named(said: list[dict[str, Any]],
                                                 tmp_path: Path) -> None:
    """A relay node with every kind of listener (SSH, TLS, data port, a public port,
    admin) on a private reactor: an accept failing on each one's real port is said with
    that listener's kind and port.  Fails if one of them is not named where it starts
    listening (relay.server.service, tlsport, dataport, public; relay.ops.service)."""
    cert = CA(tmp_path / "ca").issue("relay")
    alice = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    config = parse_config(f"""\
[admin]
listen = "127.0.0.1:0"

[relay]
listen = "127.0.0.1:0"
state_dir = "{tmp_path / "state"}"
public_bind = "127.0.0.1"
data_port = 0
data_bind = "127.0.0.1"
tls_listen = "127.0.0.1:0"
tls_cert = "{cert.cert}"
tls_key = "{cert.key}"

[[relay.user]]
name = "alice"
keys = ["{alice} alice"]
services = ["web:8080"]
""", str(tmp_path / "node.toml"))
    reactor = EPollReactor()
    node = make_node_service(config, reactor)
    node.startService()
    try:
        relay = node.relay
        assert relay.core.publicPorts.listen(0)
        ports = {"SSH": relay.server._port, "TLS": relay.tls.listener,
                 "data": relay.core.dataport.listener,
                 "public": relay.core.publicPorts.listeners[0],
                 "admin": node.getServiceNamed("admin")._port}
        assert set(ports) == set(LISTENERS)
        for port in ports.values():
            real, port.socket = port.socket, _Refusing(port.socket)
            try:
                port.doRead()
            finally:
                port.socket = real
            relay.accept_watch.stop()  # the next failure starts a burst: a line of its own
        got = [(e["listener"], e["listener_port"]) for e in said]
        assert got == [(kind, port.getHost().port) for kind, port in ports.items()]
    finally:
        node.stopService()
        reactor.removeAll()
