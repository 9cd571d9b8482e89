"""The data path's pumps behind :class:`relay.datapath.splicing.DataPath`, on real sockets
with a private reactor: both directions, half-close each way, resets, cancel,
bytes Twisted had not sent yet, pipes and files as ends, status, and the backend
choice.  The backend under test is ``LABRELAY_DATAPATH``'s (CI runs both).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_splice import selected_backend, tcp_pair
from twisted.internet import defer, protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from relay.datapath import _splice
from relay.datapath import splicing as datapath
from relay.datapath.splicing import (
    Backend,
    DataPath,
    DatapathError,
    End,
    PairAborted,
    PairError,
    PairResult,
)

MiB = 1024 * 1024


@pytest.fixture
def backend() -> str:
    return selected_backend()


@pytest.fixture
def reactor() -> Iterator[Any]:
    r = EPollReactor()
    yield r
    r.removeAll()


@pytest.fixture
def dp(reactor: Any, backend: str) -> Iterator[DataPath]:
    path = DataPath(reactor, Backend(backend, "test"), pipe_size=64 * 1024, max_idle_pipes=4)
    yield path
    path.close()


def wait(reactor: Any, d: defer.Deferred[Any], timeout: float = 30.0) -> Any:
    """Run ``reactor`` until ``d`` fires; return its result (a Failure stays one)."""
    box: list[Any] = []
    d.addBoth(box.append)
    deadline = time.monotonic() + timeout
    while not box:
        assert time.monotonic() < deadline, "the pair did not end"
        reactor.iterate(0.05)
    return box[0]


def open_fds(kind: str) -> int:
    """Open fds of this process whose link starts with ``kind`` (``socket``, ``pipe``)."""
    gc.collect()  # earlier tests' garbage must not close fds in the middle of a count
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith(kind + ":")
        except OSError:
            pass
    return count


class Peer:
    """A blocking socket on a thread: sends ``data`` (then shuts its write side),
    reads until EOF or an error, and records what happened."""

    def __init__(self, sock: socket.socket, data: bytes = b"", *, shut: bool = True,
                 wait_eof_first: bool = False) -> None:
        self.sock = sock
        self.data = data
        self.shut = shut
        self.wait_eof_first = wait_eof_first
        self.received = bytearray()
        self.error: OSError | None = None
        self.eof = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _send(self) -> None:
        self.sock.sendall(self.data)
        if self.shut:
            self.sock.shutdown(socket.SHUT_WR)

    def _run(self) -> None:
        try:
            if not self.wait_eof_first:
                sender = threading.Thread(target=self._send_quietly, daemon=True)
                sender.start()
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    self.eof = True
                    break
                self.received += chunk
            if self.wait_eof_first:
                self._send()
            else:
                sender.join(30)
        except OSError as e:
            self.error = e

    def _send_quietly(self) -> None:
        try:
            self._send()
        except OSError as e:
            self.error = self.error or e

    def join(self, timeout: float = 30.0) -> Peer:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "peer thread stuck"
        return self


def pair_of_hops(sockets: list[socket.socket]) -> tuple[socket.socket, End, End, socket.socket]:
    """``(peer_a, end_a, end_b, peer_b)``: the ends are the relay's sockets, given away."""
    peer_a, relay_a = tcp_pair()
    relay_b, peer_b = tcp_pair()
    sockets.extend((peer_a, peer_b))
    fa, fb = relay_a.detach(), relay_b.detach()
    return peer_a, End(fa, fa), End(fb, fb), peer_b


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def test_both_directions_at_once(reactor: Any, dp: DataPath,
                                 sockets: list[socket.socket]) -> None:
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    up, down = os.urandom(8 * MiB), os.urandom(4 * MiB + 5)
    pa, pb = Peer(peer_a, up), Peer(peer_b, down)
    pair = dp.splice(a, b)
    result = wait(reactor, pair.done)
    assert result == PairResult(len(up), len(down))
    pa.join()
    pb.join()
    assert sha(pb.received) == sha(up) and pb.eof
    assert sha(pa.received) == sha(down) and pa.eof
    assert pair.bytes() == result


@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_travels_while_the_other_way_flows(
        reactor: Any, dp: DataPath, sockets: list[socket.socket], first: str) -> None:
    """The side that finishes first shuts its write side; the other keeps
    sending, and only then finishes: both see every byte, then EOF."""
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    request, response = os.urandom(3 * MiB), os.urandom(5 * MiB)
    if first == "a":
        pa = Peer(peer_a, request)
        pb = Peer(peer_b, response, wait_eof_first=True)
    else:
        pb = Peer(peer_b, request)
        pa = Peer(peer_a, response, wait_eof_first=True)
    result = wait(reactor, dp.splice(a, b).done)
    pa.join()
    pb.join()
    if first == "a":
        assert result == PairResult(len(request), len(response))
        assert bytes(pb.received) == request and bytes(pa.received) == response
    else:
        assert result == PairResult(len(response), len(request))
        assert bytes(pa.received) == request and bytes(pb.received) == response
    assert pa.eof and pb.eof and pa.error is None and pb.error is None


@pytest.mark.parametrize("resetting", ["a", "b"])
def test_a_reset_resets_the_other_end_and_releases_fds(
        reactor: Any, dp: DataPath, sockets: list[socket.socket], resetting: str) -> None:
    sockets_before, pipes_before = open_fds("socket"), open_fds("pipe")
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    victim, other = (peer_a, peer_b) if resetting == "a" else (peer_b, peer_a)
    sockets.remove(victim)
    pa, pb = Peer(peer_a, os.urandom(16 * MiB)), Peer(peer_b, os.urandom(16 * MiB))
    pair = dp.splice(a, b)
    watcher = pb if resetting == "a" else pa
    while len(watcher.received) < MiB:  # mid-transfer
        reactor.iterate(0.01)
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    victim.close()
    failure = wait(reactor, pair.done)
    assert isinstance(failure, Failure)
    assert failure.check(PairError) and not failure.check(PairAborted)
    assert failure.value.side == resetting
    assert failure.value.errno in (errno.ECONNRESET, errno.EPIPE)
    survivor = pb if resetting == "a" else pa
    survivor.join()
    assert isinstance(survivor.error, ConnectionResetError)  # not a clean EOF
    other.close()
    sockets.remove(other)
    assert open_fds("socket") == sockets_before
    assert open_fds("pipe") <= pipes_before + 2 * dp.pump.stats()["pipes_idle"]


def test_cancel_resets_both_ends(reactor: Any, dp: DataPath,
                                 sockets: list[socket.socket]) -> None:
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    pa, pb = Peer(peer_a, shut=False), Peer(peer_b, shut=False)
    pair = dp.splice(a, b)
    pair.done.addErrback(lambda f: f.trap(defer.CancelledError))
    pair.done.cancel()
    for peer in (pa, pb):
        peer.join()
        assert isinstance(peer.error, ConnectionResetError)
    reactor.iterate(0)
    assert dp.status()["pairs_active"] == 0 or dp.backend.name == "c"


def test_bytes_already_read_go_first(reactor: Any, dp: DataPath,
                                     sockets: list[socket.socket]) -> None:
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    pa, pb = Peer(peer_a, b"-from-a"), Peer(peer_b, b"-from-b")
    result = wait(reactor, dp.splice(a, b, from_a=b"early-a", from_b=b"early-b").done)
    pa.join()
    pb.join()
    assert bytes(pb.received) == b"early-a-from-a"
    assert bytes(pa.received) == b"early-b-from-b"
    assert result == PairResult(14, 14)


class _Hold(protocol.Protocol):
    """Writes a greeting that is still in Twisted's buffer when the pair starts."""

    def __init__(self, made: defer.Deferred[Any], greeting: bytes) -> None:
        self.made = made
        self.greeting = greeting
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)  # type: ignore[union-attr]
        self.made.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def test_twisted_transports_are_detached_with_their_unsent_bytes(
        reactor: Any, backend: str, sockets: list[socket.socket]) -> None:
    accepted: defer.Deferred[Any] = defer.Deferred()
    connected: defer.Deferred[Any] = defer.Deferred()
    front = reactor.listenTCP(0, protocol.Factory.forProtocol(
        lambda: _Hold(accepted, b"greeting-to-client;")), interface="127.0.0.1")
    target = socket.create_server(("127.0.0.1", 0))
    sockets.append(target)
    reactor.connectTCP("127.0.0.1", target.getsockname()[1], protocol.ClientFactory.forProtocol(
        lambda: _Hold(connected, b"greeting-to-target;")))
    client = socket.create_connection(("127.0.0.1", front.getHost().port))
    sockets.append(client)
    server_proto = wait(reactor, accepted)
    client_proto = wait(reactor, connected)
    target_conn, _ = target.accept()
    sockets.append(target_conn)
    front.stopListening()

    d = datapath.DataPath(reactor, Backend(backend, "test"))
    try:
        pair = d.splice_transports(server_proto.transport, client_proto.transport)
        assert server_proto.lost is not None and server_proto.lost.check(ConnectionDone)
        assert client_proto.lost is not None and client_proto.lost.check(ConnectionDone)
        pc, pt = Peer(client, b"hello target"), Peer(target_conn, b"hello client")
        result = wait(reactor, pair.done)
        pc.join()
        pt.join()
    finally:
        d.close()
    assert bytes(pc.received) == b"greeting-to-client;hello client"
    assert bytes(pt.received) == b"greeting-to-target;hello target"
    assert result == PairResult(len(b"greeting-to-target;hello target"),
                                len(b"greeting-to-client;hello client"))


def test_a_detached_transport_ignores_events_polled_before_the_detach(
        reactor: Any, sockets: list[socket.socket]) -> None:
    """A read that detaches its own transport on an event that also says "writable" is
    followed, in the same reactor step, by ``doWrite``: it must be a no-op, not an
    Unhandled Error on a transport whose socket is gone."""
    accepted: defer.Deferred[Any] = defer.Deferred()
    front = reactor.listenTCP(0, protocol.Factory.forProtocol(
        lambda: _Hold(accepted, b"")), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", front.getHost().port))
    sockets.append(client)
    transport = wait(reactor, accepted).transport
    front.stopListening()
    transport.write(b"unsent")
    fd, unsent = datapath.detach_transport(transport)
    try:
        assert unsent == b"unsent"
        assert transport.doWrite() is None and transport.doRead() is None
    finally:
        os.close(fd)


def test_a_transport_without_an_fd_is_refused(reactor: Any, dp: DataPath) -> None:
    from twisted.internet.testing import StringTransport

    with pytest.raises(TypeError):
        dp.splice_transports(StringTransport(), StringTransport())


def test_pipes_and_files_as_ends(reactor: Any, dp: DataPath, tmp_path: Path,
                                 sockets: list[socket.socket]) -> None:
    """Side a reads a regular file (sendfile, never "ready" for epoll) and writes a
    pipe, as ``labrelay connect`` does with stdin/stdout; at EOF the pipe is closed."""
    upload = os.urandom(3 * MiB + 1)
    source = tmp_path / "upload.bin"
    source.write_bytes(upload)
    file_fd = os.open(source, os.O_RDONLY)
    out_r, out_w = os.pipe()
    relay_b, peer_b = tcp_pair()
    sockets.append(peer_b)
    fb = relay_b.detach()
    download = os.urandom(2 * MiB)
    pb = Peer(peer_b, download)
    got = bytearray()

    def read_pipe() -> None:
        while chunk := os.read(out_r, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read_pipe, daemon=True)
    reader.start()
    result = wait(reactor, dp.splice(End(file_fd, out_w), End(fb, fb)).done)
    pb.join()
    reader.join(30)
    os.close(out_r)
    assert result == PairResult(len(upload), len(download))
    assert bytes(pb.received) == upload
    assert bytes(got) == download  # and the reader saw EOF: the pipe was closed


def test_pipe_in_and_pipe_out_as_labrelay_connect_uses_them(
        reactor: Any, dp: DataPath, sockets: list[socket.socket]) -> None:
    """Side a is a pair of pipes (ssh's ProxyCommand stdin/stdout): the C pump splices
    pipe -> socket and socket -> pipe straight across.  A writer that pauses and a slow
    reader make both directions wait on each side; prefixes go first; EOF on the
    input pipe half-closes the socket, EOF on the socket closes the output pipe."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    relay_b, peer_b = tcp_pair()
    sockets.append(peer_b)
    fb = relay_b.detach()
    upload = os.urandom(8 * MiB + 3)
    download = os.urandom(6 * MiB + 5)
    pb = Peer(peer_b, download)
    got = bytearray()

    def write_pipe() -> None:
        for i in range(0, len(upload), 1 << 20):
            _write_all(in_w, upload[i:i + (1 << 20)])
            time.sleep(0.01)  # a writer that pauses: the pump waits on an empty pipe
        os.close(in_w)

    def read_pipe() -> None:
        while chunk := os.read(out_r, 4096):  # a slow reader: the pump waits on a full pipe
            got.extend(chunk)

    threads = [threading.Thread(target=f, daemon=True) for f in (write_pipe, read_pipe)]
    for t in threads:
        t.start()
    pair = dp.splice(End(in_r, out_w), End(fb, fb), from_a=b"first:", from_b=b"hello:")
    result = wait(reactor, pair.done, timeout=60)
    pb.join()
    for t in threads:
        t.join(30)
    os.close(out_r)
    assert result == PairResult(len(upload) + 6, len(download) + 6)
    assert bytes(pb.received) == b"first:" + upload
    assert bytes(got) == b"hello:" + download


def test_an_output_pipe_closed_early_is_no_error_while_nothing_comes(
        reactor: Any, dp: DataPath, sockets: list[socket.socket]) -> None:
    """ssh closes its ProxyCommand's pipes when it exits; if the other end has nothing
    more to say, the pair ends cleanly (splice into a reader-less pipe fails at once,
    even with nothing to move: that must not count as an error)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # the reader is gone before anything moved
    relay_b, peer_b = tcp_pair()
    sockets.append(peer_b)
    fb = relay_b.detach()
    _write_all(in_w, b"bye")
    os.close(in_w)
    pb = Peer(peer_b, b"", wait_eof_first=True)  # the far end has nothing more to say
    assert wait(reactor, dp.splice(End(in_r, out_w), End(fb, fb)).done) == PairResult(3, 0)
    pb.join()
    assert bytes(pb.received) == b"bye" and pb.error is None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_status_shows_backend_and_counts(reactor: Any, dp: DataPath, backend: str,
                                         sockets: list[socket.socket]) -> None:
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    pa, pb = Peer(peer_a, b"x" * 1000), Peer(peer_b, b"y" * 10)
    wait(reactor, dp.splice(a, b).done)
    pa.join()
    pb.join()
    status = dp.status()
    assert status["backend"] == backend
    assert status["pairs_total"] == 1
    assert status["pairs_active"] == 0
    assert status["pairs_failed"] == 0
    assert status["bytes"] == 1010
    if backend == "portable":  # no pipes: one copy buffer per direction
        assert status["pipes_total"] == 0 and status["copy_buffer"] > 0
    else:
        assert status["pipe_size"] >= 64 * 1024


def test_a_closed_data_path_refuses_pairs(reactor: Any, backend: str,
                                          sockets: list[socket.socket]) -> None:
    d = DataPath(reactor, Backend(backend, "test"))
    d.close()
    _, a, b, _ = pair_of_hops(sockets)
    with pytest.raises(ConnectionError):
        d.splice(a, b)
    os.close(a.rfd)
    os.close(b.rfd)


def test_closing_resets_running_pairs(reactor: Any, backend: str,
                                      sockets: list[socket.socket]) -> None:
    d = DataPath(reactor, Backend(backend, "test"))
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    pa, pb = Peer(peer_a, shut=False), Peer(peer_b, shut=False)
    pair = d.splice(a, b)
    d.close()
    failure = wait(reactor, pair.done)
    assert failure.check(PairAborted)
    for peer in (pa, pb):
        peer.join()
        assert isinstance(peer.error, ConnectionResetError)


# --- the backend choice -----------------------------------------------------------


def test_choice_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert datapath.choose_backend("python").name == "python"
    with pytest.raises(DatapathError, match="not one of auto, c, python"):
        datapath.choose_backend("fast")
    monkeypatch.setattr(_splice, "AVAILABLE", False)
    monkeypatch.setattr(_splice, "IMPORT_ERROR", "no module named relay.datapath._splice_c")
    with pytest.raises(DatapathError, match="native module is not available"):
        datapath.choose_backend("c")
    auto = datapath.choose_backend("auto")
    assert auto.name == "python" and "not available" in auto.reason
    monkeypatch.setattr(_splice, "AVAILABLE", True)
    assert datapath.choose_backend("").name == "c"
    monkeypatch.setenv("LABRELAY_DATAPATH", "python")
    assert datapath.choose_backend().name == "python"


def test_the_choice_is_logged_once(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setenv("LABRELAY_DATAPATH", backend)
    monkeypatch.setattr(datapath, "_logged", set())
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    reactors = [EPollReactor(), EPollReactor()]
    try:
        first = datapath.get(reactors[0])
        assert datapath.get(reactors[0]) is first
        second = datapath.get(reactors[1])
        assert second is not first
    finally:
        globalLogPublisher.removeObserver(events.append)
        for r in reactors:
            datapath.get(r).close()
            r.removeAll()
    chosen = [e for e in events if e.get("event") == "datapath_backend"]
    assert len(chosen) == 1
    assert chosen[0]["backend"] == backend
    # which libcrypto the pooled -J thread opens AES-GCM with (none without the C backend)
    expected = (backend == "c" and _splice.aead_library()) or "none"
    assert chosen[0]["aead"] == expected and (backend != "c" or "OpenSSL" in expected)
    assert datapath.status(reactors[0])["backend"] == backend  # type: ignore[index]


def test_the_pump_starts_with_the_reactor_not_before(monkeypatch: pytest.MonkeyPatch,
                                                     backend: str) -> None:
    """twistd builds the service tree, then forks into the background: a pump thread
    started while building would not exist in the daemon."""
    monkeypatch.setenv("LABRELAY_DATAPATH", backend)
    r = EPollReactor()
    dp = datapath.get(r)
    try:
        threads = threading.active_count()
        assert dp._pump is None
        assert dp.status()["backend"] == backend and "pipes_total" not in dp.status()
        r.startRunning()
        assert dp._pump is not None
        assert dp.status()["pipes_total"] == 0
        assert threading.active_count() == threads  # the C thread is not a Python thread
    finally:
        dp.close()
        if r.threadpool is not None:
            r.threadpool.stop()
        r.removeAll()


def test_a_paused_direction_moves_nothing_until_resumed(
        reactor: Any, dp: DataPath, sockets: list[socket.socket]) -> None:
    """``SplicedPair.pause`` (a rate limit): the paused direction reads no more while
    the other keeps flowing; resumed, everything arrives."""
    peer_a, a, b, peer_b = pair_of_hops(sockets)
    pair = dp.splice(a, b)
    pair.pause(True, False)

    def receive(sock: socket.socket, n: int) -> bytes:
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < n:
            assert time.monotonic() < deadline, got
            reactor.iterate(0.01)
            try:
                got += sock.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
        return got

    peer_b.sendall(b"flows")
    assert receive(peer_a, 5) == b"flows"  # the pause reached the pump before this
    peer_a.sendall(b"held back")
    # Bounded: nothing can be awaited to show that no byte came.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        reactor.iterate(0.02)
    assert pair.bytes().a_to_b == 0
    pair.pause(False, False)
    assert receive(peer_b, 9) == b"held back"
    pair.abort()
    wait(reactor, pair.done)


def _pump_thread() -> int:
    tids = [int(t) for t in os.listdir("/proc/self/task")
            if open(f"/proc/self/task/{t}/comm").read().strip() == "lr-pump"]
    assert len(tids) == 1, tids
    return tids[0]


def _exchange(peer_a: socket.socket, peer_b: socket.socket, i: int) -> None:
    """One small write through a pair, awaited at the other end (a keystroke)."""
    peer_a.sendall(bytes([i % 256]) * 10)
    got = b""
    while len(got) < 10:
        got += peer_b.recv(10 - len(got))
    assert got == bytes([i % 256]) * 10


def _bulk_round(peer_a: socket.socket, peer_b: socket.socket, chunk: bytes) -> None:
    """64 x ``chunk`` through a pair, exact."""
    sender = threading.Thread(target=lambda: [peer_a.sendall(chunk) for _ in range(64)])
    sender.start()
    got = bytearray()
    while len(got) < 64 * len(chunk):
        data = peer_b.recv(1 << 20)
        assert data, "the pair ended"
        got += data
    sender.join()
    assert got == chunk * 64


def test_the_pump_thread_runs_sched_batch_during_bulk_and_not_after(
        reactor: Any, sockets: list[socket.socket]) -> None:
    """The native pump's thread is SCHED_BATCH while its pairs move bulk (csrc/lr_bulk.h:
    several of the sender's writes per wake-up, fewer wake-ups per GiB), never for small
    exchanges one at a time, and SCHED_OTHER again once the bytes pause, so a keystroke
    after a transfer wakes it as before.  The bytes stay exact."""
    path = DataPath(reactor, Backend("c", "test"), pipe_size=64 * 1024, max_idle_pipes=4)
    try:
        peer_a, a, b, peer_b = pair_of_hops(sockets)
        pair = path.splice(a, b)
        tid = _pump_thread()
        for i in range(50):  # interactive: each small write awaited at the other end
            _exchange(peer_a, peer_b, i)
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        assert path.status()["batched"] == 0
        chunk = os.urandom(MiB)
        rounds = 0
        # Bulk is >= 1 MiB per 20 ms (lr_bulk.h), and not within LR_INTERACTIVE_MS (1 s)
        # of an interactive exchange (the pair's own, above): rounds of 64 MiB, each
        # exact, until the thread turned (a busy machine may also move a round slower).
        deadline = time.monotonic() + 20.0
        while rounds == 0 or path.status()["batched"] == 0:
            assert time.monotonic() < deadline, f"never SCHED_BATCH: {path.status()}"
            rounds += 1
            _bulk_round(peer_a, peer_b, chunk)
        deadline = time.monotonic() + 5.0
        while os.sched_getscheduler(tid) != os.SCHED_OTHER:  # no event says so: poll
            assert time.monotonic() < deadline, "still SCHED_BATCH after the bytes paused"
            time.sleep(0.01)
        peer_a.sendall(b"k")  # a keystroke after the transfer
        assert peer_b.recv(1) == b"k"
        peer_a.shutdown(socket.SHUT_WR)
        peer_b.shutdown(socket.SHUT_WR)
        result = wait(reactor, pair.done)
        assert result == PairResult(500 + rounds * 64 * MiB + 1, 0)
    finally:
        path.close()


def test_the_pump_thread_stays_sched_other_while_it_serves_a_keystroke_beside_bulk(
        reactor: Any, sockets: list[socket.socket]) -> None:
    """One thread serves every spliced pair, and a woken SCHED_BATCH thread does not
    preempt the running task: beside another user's bulk, a user's keystrokes would wait
    for a CPU slice (bench/jecho.py).  So while it serves an interactive pair the
    thread stays SCHED_OTHER whatever the others move, and once that pair has been quiet
    for LR_INTERACTIVE_MS the bulk pair alone turns it SCHED_BATCH."""
    path = DataPath(reactor, Backend("c", "test"), pipe_size=64 * 1024, max_idle_pipes=4)
    try:
        typist_a, ta, tb, typist_b = pair_of_hops(sockets)
        bulk_a, ba, bb, bulk_b = pair_of_hops(sockets)
        typing = path.splice(ta, tb)
        bulk = path.splice(ba, bb)
        tid = _pump_thread()
        chunk = os.urandom(MiB)
        stop = threading.Event()
        moved: list[int] = []

        def push() -> None:  # bulk, exact, until told to stop
            n = 0
            while not stop.is_set():
                _bulk_round(bulk_a, bulk_b, chunk)
                n += 1
            moved.append(n)

        pusher = threading.Thread(target=push)
        pusher.start()
        policies = set()
        keys = 0
        try:
            while path.status()["bytes"] < 256 * MiB:  # 4 bulk rounds, keystrokes all along
                _exchange(typist_a, typist_b, keys)
                keys += 1
                policies.add(os.sched_getscheduler(tid))
        finally:
            stop.set()
            pusher.join()
        assert policies == {os.SCHED_OTHER}
        assert path.status()["batched"] == 0, path.status()
        # The typist stops: the bulk pair alone turns the thread SCHED_BATCH.
        stop.clear()
        pusher = threading.Thread(target=push)
        pusher.start()
        try:
            deadline = time.monotonic() + 20.0
            while os.sched_getscheduler(tid) != os.SCHED_BATCH:  # no event says so: poll
                assert time.monotonic() < deadline, f"never SCHED_BATCH alone: {path.status()}"
                time.sleep(0.01)
            # A keystroke while the bulk still flows turns it SCHED_OTHER at once (it would
            # stay SCHED_BATCH for as long as the bulk flows otherwise).
            _exchange(typist_a, typist_b, keys)
            keys += 1
            deadline = time.monotonic() + 1.0
            while os.sched_getscheduler(tid) != os.SCHED_OTHER:
                assert time.monotonic() < deadline, "still SCHED_BATCH after a keystroke"
                time.sleep(0.001)
            assert pusher.is_alive(), "the bulk ended before the keystroke was judged"
        finally:
            stop.set()
            pusher.join()
        for s in (typist_a, typist_b, bulk_a, bulk_b):
            s.shutdown(socket.SHUT_WR)
        assert wait(reactor, typing.done) == PairResult(10 * keys, 0)
        assert wait(reactor, bulk.done) == PairResult(sum(moved) * 64 * MiB, 0)
    finally:
        path.close()


def test_the_data_path_lifts_the_soft_fd_limit_to_the_hard_one() -> None:
    """docs/datapath.md: the soft ``RLIMIT_NOFILE`` is raised to the hard limit when the
    data path starts; a pair holds two sockets and up to two pipes, so a soft limit of
    1024 (many distributions' default) would cap a relay at a few hundred sessions."""
    import resource

    from twisted.internet.testing import MemoryReactorClock

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(hard, 256)
    if low == hard:
        pytest.skip(f"the hard fd limit ({hard}) leaves nothing to lift")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        dp = DataPath(MemoryReactorClock(), datapath.choose_backend("portable"))
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        dp.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
