"""``[[forward]]`` plain hops: config parsing, the service tree, status, and one
session through a :class:`~relay.agent.plainhop.PlainForward` on a private reactor."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_splice import selected_backend
from twisted.internet.epollreactor import EPollReactor

from relay.agent.plainhop import PlainForward
from relay.config.errors import ConfigError
from relay.config.loader import parse_config
from relay.config.schema import HostPort, NodeConfig, PlainForwardConfig
from relay.datapath import splicing as datapath
from relay.ops.service import make_node_service


def parse(text: str) -> NodeConfig:
    return parse_config(text, "node.toml")


def test_forward_tables() -> None:
    config = parse(
        '[[forward]]\nlisten = "0.0.0.0:2201"\nconnect = "localhost:22"\n\n'
        '[[forward]]\nlisten = "8888"\nconnect = "[::1]:8888"\nname = "jupyter"\n\n'
        '[[forward]]\nlisten = "[::]:0"\nconnect = "10.0.0.5:22"\n'
    )
    assert config.forwards == (
        PlainForwardConfig("0.0.0.0", 2201, HostPort("localhost", 22), "P:0.0.0.0:2201"),
        PlainForwardConfig("127.0.0.1", 8888, HostPort("::1", 8888), "jupyter"),
        PlainForwardConfig("::", 0, HostPort("10.0.0.5", 22), "P:[::]:0"),
    )


def test_a_config_without_forwards_has_none() -> None:
    assert parse("").forwards == ()


@pytest.mark.parametrize(("text", "keypath", "problem"), [
    ('[[forward]]\nconnect = "h:1"', "forward[0].listen", "missing required key 'listen'"),
    ('[[forward]]\nlisten = "1"', "forward[0].connect", "missing required key 'connect'"),
    ('[[forward]]\nlisten = "1"\nconnect = "h"', "forward[0].connect", "'h' has no port"),
    ('[[forward]]\nlisten = "99999"\nconnect = "h:1"', "forward[0].listen", "out of range"),
    ('[[forward]]\nlisten = "1"\nconnect = "h:1"\ntarget = "x"', "forward[0].target",
     "unknown key 'target'"),
    ('[forward]\nlisten = "1"\nconnect = "h:1"', "forward", "expected an array of tables"),
    ('[[forward]]\nlisten = "1"\nconnect = "h:1"\n[[forward]]\nlisten = "127.0.0.1:1"\n'
     'connect = "h:2"', "forward[1].listen", "already used by forward[0].listen"),
    ('[[forward]]\nlisten = "1"\nconnect = "h:1"\nname = "a"\n[[forward]]\nlisten = "2"\n'
     'connect = "h:2"\nname = "a"', "forward[1].name", "duplicate forward name 'a'"),
])
def test_forward_errors_name_the_key(text: str, keypath: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.keypath == keypath
    assert problem in caught.value.problem
    assert caught.value.hint


def test_a_forward_may_not_share_a_local_forwards_listen_address() -> None:
    text = (
        '[[link]]\nhost = "cloud.example.org"\nuser = "lab"\n'
        '[[link.local]]\nlisten = "127.0.0.1:8888"\nconnect = "localhost:8888"\n\n'
        '[[forward]]\nlisten = "8888"\nconnect = "h:1"\n'
    )
    with pytest.raises(ConfigError, match=r"already used by link\[0\]\.local\[0\]\.listen"):
        parse(text)


@pytest.fixture
def reactor(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("LABRELAY_DATAPATH", selected_backend())
    r = EPollReactor()
    yield r
    dp = datapath._datapaths.get(r)
    if dp is not None:
        dp.close()
    if r.threadpool is not None:
        r.threadpool.stop()
    r.removeAll()


def test_a_node_with_only_forwards_runs_them(reactor: Any, tmp_path: Any) -> None:
    config = parse('[[forward]]\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:9"\nname = "hop"\n')
    service = make_node_service(config, reactor)
    assert [f.name for f in service.plain_forwards] == ["hop"]
    service.startService()
    try:
        status = service.status()
        (forward,) = status["forwards"]
        assert forward["state"] == "listening" and forward["bound_port"] > 0
        assert forward["path"] == "spliced"
        assert forward["datapath"] == selected_backend()
        assert status["datapath"]["backend"] == selected_backend()
    finally:
        service.stopService()


def test_a_bad_datapath_choice_is_a_config_error(reactor: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABRELAY_DATAPATH", "turbo")
    config = parse('[[forward]]\nlisten = "0"\nconnect = "127.0.0.1:9"\n')
    with pytest.raises(ConfigError) as caught:
        make_node_service(config, reactor)
    assert caught.value.keypath == "LABRELAY_DATAPATH"


def iterate_until(reactor: Any, done: threading.Event, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done.is_set():
        assert time.monotonic() < deadline, "timed out"
        reactor.iterate(0.02)


def test_one_session_through_a_plain_forward(reactor: Any) -> None:
    """Twisted accepts and connects (names resolve on the reactor's thread pool);
    the data path moves the bytes; the counters see them."""
    reactor.startRunning()  # starts the thread pool HostnameEndpoint resolves with
    target = socket.create_server(("127.0.0.1", 0))
    forward = PlainForward(PlainForwardConfig("127.0.0.1", 0,
                                              HostPort("localhost", target.getsockname()[1]),
                                              "hop"), reactor)
    forward.startService()
    assert forward.bound_port
    result: dict[str, Any] = {}
    done = threading.Event()

    def peers() -> None:
        with socket.create_connection(("127.0.0.1", forward.bound_port)) as client:
            conn, _ = target.accept()
            with conn:
                client.sendall(b"ping" * 1000)
                client.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(65536):
                    got += chunk
                conn.sendall(b"pong")
            result["target_got"] = got
            result["client_got"] = client.recv(100)
            result["client_eof"] = client.recv(100)
        done.set()

    thread = threading.Thread(target=peers, daemon=True)
    thread.start()
    iterate_until(reactor, done)
    thread.join(10)
    target.close()
    assert result == {"target_got": b"ping" * 1000, "client_got": b"pong", "client_eof": b""}
    deadline = time.monotonic() + 30
    while forward.counters.active:
        assert time.monotonic() < deadline
        reactor.iterate(0.02)
    status = forward.status()
    assert (status["sessions_total"], status["bytes_to_target"], status["bytes_from_target"]) \
        == (1, 4000, 4)
    forward.stopService()


def test_a_forward_listens_with_a_1024_backlog_and_connects_within_15_seconds() -> None:
    """docs/datapath.md, "Plain TCP hops": each accepted connection is held unread while
    labrelay connects to ``connect`` (timeout 15 s), and the listen backlog is 1024
    (Twisted's default 50 drops SYNs when 200 sessions arrive at once, a 1 s
    retransmit each).  The reactor is a double: what the forward asks of it is checked."""
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    reactor = MemoryReactorClock()
    config = PlainForwardConfig(bind="127.0.0.1", port=0, connect=HostPort("10.0.0.5", 22),
                                name="gpu-ssh")
    hop = PlainForward(config, reactor,
                       data_path=datapath.DataPath(reactor, datapath.choose_backend("portable")))
    hop.startService()
    [(port, factory, backlog, bind)] = reactor.tcpServers
    assert (port, backlog, bind) == (0, 1024, "127.0.0.1")
    client = factory.buildProtocol(None)
    client.makeConnection(StringTransport())
    reactor.advance(0)
    [(_, to_port, _, timeout, _)] = reactor.tcpClients  # (the double resolves any name
    assert (to_port, timeout) == (22, 15.0)              # to 127.0.0.1)
    assert client.transport.producerState == "paused"  # held unread meanwhile
