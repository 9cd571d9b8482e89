"""relay.ops.leanepoll and relay.ops.reactor: labrelay's epoll reactor, on real sockets.

Each test drives its own, uninstalled reactor instance turn by turn (the test process's
global reactor is not touched); ``install`` is checked in fresh interpreters."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux's")


@pytest.fixture
def reactor() -> Any:
    from relay.ops.leanepoll import LeanEPollReactor

    r = LeanEPollReactor()
    yield r
    for selectable in list(r.getReaders()) + list(r.getWriters()):
        r.removeReader(selectable)
        r.removeWriter(selectable)
    r._poller.close()


def turn_until(reactor: Any, done: Callable[[], bool], seconds: float = 10.0) -> None:
    """Run the reactor's turns (timers, then one poll) until ``done()``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the reactor never got there"
        reactor.runUntilCurrent()
        due = reactor.timeout()
        reactor.doIteration(0.1 if due is None else min(due, 0.1))


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(protocol.Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.got = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.got += data


def test_it_carries_tcp_both_ways_and_runs_timers(reactor: Any) -> None:
    """A listening port, a client, 4 MiB echoed back byte-exact (reads, writes and
    their flow control, as Twisted's epoll reactor does them), and a timer fired."""
    server = protocol.ServerFactory.forProtocol(Echo)
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    payload = bytes(range(256)) * (16 * 1024)
    client = Collect(payload)
    reactor.connectTCP("127.0.0.1", port.getHost().port,
                       protocol.ClientFactory.forProtocol(lambda: client))
    fired: list[str] = []
    reactor.callLater(0.01, fired.append, "timer")
    turn_until(reactor, lambda: len(client.got) >= len(payload) and bool(fired))
    assert bytes(client.got) == payload
    assert fired == ["timer"]
    turns = reactor.turns
    assert turns > 0
    reactor.doIteration(0)  # nothing ready: still a turn (TurnBudget's budget restarts)
    assert reactor.turns == turns + 1
    client.transport.loseConnection()
    port.stopListening()
    turn_until(reactor, lambda: not client.transport.connected)


class Reader:
    """A bare selectable on one end of a socketpair: ``doRead`` reads; ``lose``
    makes it report its connection done and then fail in ``connectionLost``."""

    def __init__(self, sock: socket.socket, lose: bool) -> None:
        self.sock = sock
        self.lose = lose
        self.read = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> Any:
        self.read += self.sock.recv(100)
        return ConnectionDone() if self.lose else None

    def connectionLost(self, reason: Failure) -> None:
        raise RuntimeError("connectionLost failed")


def test_an_exception_escaping_one_event_is_logged_and_the_next_event_is_handled(
    reactor: Any,
) -> None:
    """Twisted's doPoll caught what escaped an event's handling (its callWithLogger);
    without that, one protocol failing in ``connectionLost`` would end the turn and
    leave the other ready descriptors of the same poll unhandled."""
    a_here, a_there = socket.socketpair()
    b_here, b_there = socket.socketpair()
    failing, healthy = Reader(a_here, lose=True), Reader(b_here, lose=False)
    reactor.addReader(failing)
    reactor.addReader(healthy)
    a_there.send(b"a")  # ready first, so handled first
    b_there.send(b"b")
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        reactor.doIteration(1.0)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert (failing.read, healthy.read) == (b"a", b"b")
    failures = [e for e in seen if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["log_namespace"] == "relay.ops.leanepoll"
    assert healthy in reactor.getReaders() and failing not in reactor.getReaders()
    reactor.removeReader(healthy)
    for s in (a_here, a_there, b_here, b_there):
        s.close()


NOLINUX = Path(__file__).resolve().parent.parent / "nolinux"


def run_fresh(code: str, nolinux: bool = False) -> str:
    """``code``'s stdout in a fresh interpreter; ``nolinux``: one that looks like a Mac
    (tests/nolinux: no epoll, no splice, no native module)."""
    env = dict(os.environ)
    if nolinux:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(NOLINUX),
                                                        env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, env=env)
    return out.stdout.strip()


def test_install_chooses_it_when_no_reactor_is_installed_yet() -> None:
    assert run_fresh(
        "from relay.ops.reactor import install\n"
        "name = install()\n"
        "from twisted.internet import reactor\n"
        "print(name, type(reactor).__name__)\n") == "LeanEPollReactor LeanEPollReactor"


def test_install_keeps_a_reactor_already_installed() -> None:
    """``twistd --reactor=...`` or a program embedding labrelay chose first: kept."""
    assert run_fresh(
        "from twisted.internet import pollreactor\n"
        "pollreactor.install()\n"
        "from relay.ops.reactor import install\n"
        "name = install()\n"
        "from twisted.internet import reactor\n"
        "print(name, type(reactor).__name__)\n") == "PollReactor PollReactor"


def test_without_epoll_install_leaves_twisteds_choice() -> None:
    """A Mac: Twisted's epoll module cannot be imported at all, so install() must not
    import it; Twisted then picks its poll reactor, as it would without labrelay."""
    assert run_fresh(
        "from relay.ops.reactor import install\n"
        "name = install()\n"
        "from twisted.internet import reactor\n"
        "print(name, type(reactor).__name__)\n", nolinux=True) == "default PollReactor"


@pytest.mark.parametrize("argv", [
    ["relay", "--listen", "127.0.0.1:0"],  # refused (nobody may use it): after the choice
    ["agent", "-R", "web:80:127.0.0.1:80", "lab@127.0.0.1"],
    ["connect", "-p", "1", "alice@127.0.0.1", "gpu:22"],
    ["demo", "--once"],
])
@pytest.mark.parametrize("nolinux", [False, True], ids=["linux", "nolinux"])
def test_the_commands_that_run_a_reactor_choose_it_before_conch_is_imported(
    argv: list[str], nolinux: bool,
) -> None:
    """Building the parser imports Conch, which imports the global reactor: a choice
    made any later would find Twisted's default installed.  Without epoll (a Mac) each
    command runs on Twisted's choice and does not fail.  (The reactor's ``run`` is
    stopped at once here: only the choice is looked at.)"""
    expected = "PollReactor" if nolinux else "LeanEPollReactor"
    assert run_fresh(
        "import sys\n"
        "from twisted.internet import base\n"
        "def run(self, *a, **k):\n"
        "    raise SystemExit(0)\n"
        "base.ReactorBase.run = run\n"
        "from relay.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(type(sys.modules['twisted.internet.reactor']).__name__)\n",
        nolinux=nolinux,
    ).splitlines()[-1] == expected
