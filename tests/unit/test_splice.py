"""The one-direction mover (``lr_move`` in C, ``PyDirection`` in Python) on real
sockets, pipes and files: partial moves, would-block on either side, EOF with
bytes still held, refused splices, the pipe pool, resets, EINTR.

Which implementation runs is chosen like the data path's backend, by
``LABRELAY_DATAPATH`` (``auto``: C when built); CI runs this file once with each.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.datapath import _splice
from relay.datapath._splice import DONE, MOVED, WAIT_IN, WAIT_OUT, MoveError
from relay.datapath.splicing import PyDirection, PyPipePool

MiB = 1024 * 1024


def selected_backend() -> str:
    """``c``, ``python`` or ``portable``, as ``LABRELAY_DATAPATH`` asks (``auto``: C when
    built).  The movers here are the splicing ones: ``portable`` runs them as ``python``
    (its own mover's tests are tests/unit/test_copyloop.py)."""
    value = os.environ.get("LABRELAY_DATAPATH", "").strip().lower() or "auto"
    if value in ("python", "portable"):
        return value
    if value == "c":
        if not _splice.AVAILABLE:
            pytest.fail(f"LABRELAY_DATAPATH=c but relay.datapath._splice_c is missing: "
                        f"{_splice.IMPORT_ERROR}")
        return "c"
    return "c" if _splice.AVAILABLE else "python"


@pytest.fixture
def backend() -> str:
    return selected_backend()


@pytest.fixture
def make_pool(backend: str) -> Iterator[Any]:
    pools: list[Any] = []

    def make(max_total: int = 8, max_idle: int = 4, pipe_size: int = 64 * 1024) -> Any:
        cls = _splice.PipePool if backend == "c" else PyPipePool  # portable: as python
        pool = cls(max_total, max_idle, pipe_size)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def pool(make_pool: Any) -> Any:
    return make_pool()


def direction(backend: str, pool: Any, in_fd: int, out_fd: int, **kw: Any) -> Any:
    cls = _splice.Direction if backend == "c" else PyDirection
    return cls(pool, in_fd, out_fd, **kw)


def tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair ``(connecting side, accepted side)``."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if rcvbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
    return c, s


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def hop(sockets: list[socket.socket], small_out: bool = False) -> tuple[socket.socket, ...]:
    """``client -> relay_in`` and ``relay_out -> target``: returns
    ``(client, relay_in, relay_out, target)``, relay sockets non-blocking."""
    client, relay_in = tcp_pair()
    relay_out, target = tcp_pair(rcvbuf=4096 if small_out else None)
    if small_out:
        relay_out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    relay_in.setblocking(False)
    relay_out.setblocking(False)
    sockets.extend((client, relay_in, relay_out, target))
    return client, relay_in, relay_out, target


def drive(d: Any, in_fd: int, out_fd: int, timeout: float = 30.0) -> int:
    """Call ``move`` until DONE, waiting on the fd it says it waits for."""
    total = 0
    while True:
        rc, n = d.move()
        total += n
        if rc == DONE:
            return total
        if rc == MOVED:
            continue
        fds = ([in_fd], []) if rc == WAIT_IN else ([], [out_fd])
        r, w, _ = select.select(*fds, [], timeout)
        assert r or w, f"stuck waiting ({_splice.RESULT_NAMES[rc]})"


def read_all(sock: socket.socket, into: list[bytes], chunk: int = 65536) -> threading.Thread:
    def run() -> None:
        while True:
            data = sock.recv(chunk)
            if not data:
                return
            into.append(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def send_then_shut(sock: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_moves_everything_through_partial_writes(backend: str, pool: Any,
                                                 sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets, small_out=True)
    data = os.urandom(4 * MiB)
    got: list[bytes] = []
    sender = send_then_shut(client, data)
    reader = read_all(target, got, chunk=1000)  # slow, small reads: many WAIT_OUTs
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    assert drive(d, relay_in.fileno(), relay_out.fileno()) == len(data)
    sender.join(10)
    reader.join(10)
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()
    assert d.flags & _splice.DIR_DONE
    assert d.moved == len(data)


def test_eof_with_bytes_held_delivers_them_then_shuts(backend: str, pool: Any,
                                                      sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets, small_out=True)
    data = os.urandom(MiB)
    sender = send_then_shut(client, data)
    # The target reads nothing yet: the mover fills its pipe, and out blocks.
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    rc, moved = d.move()
    while rc != WAIT_OUT:
        select.select([relay_in], [], [], 10)
        rc, n = d.move()
        moved += n
    assert d.held > 0
    sender.join(10)  # the client's FIN is queued behind the held bytes
    got: list[bytes] = []
    reader = read_all(target, got)
    moved += drive(d, relay_in.fileno(), relay_out.fileno())
    reader.join(10)
    assert b"".join(got) == data
    assert moved == len(data)
    assert d.held == 0 and not d.holds_pipe


def test_prefix_goes_out_first(backend: str, pool: Any, sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets)
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    d.prefix(b"already-read:")
    sender = send_then_shut(client, b"then-the-rest")
    got: list[bytes] = []
    reader = read_all(target, got)
    assert drive(d, relay_in.fileno(), relay_out.fileno()) == len(b"already-read:then-the-rest")
    sender.join(10)
    reader.join(10)
    assert b"".join(got) == b"already-read:then-the-rest"


def test_refused_splice_falls_back_for_this_direction(backend: str, pool: Any, tmp_path: Path,
                                                      sockets: list[socket.socket]) -> None:
    """splice(2) refuses a file opened for append (EINVAL): the direction copies."""
    client, relay_in = tcp_pair()
    sockets.extend((client, relay_in))
    relay_in.setblocking(False)
    out = tmp_path / "out.bin"
    out.write_bytes(b"head:")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)
    data = os.urandom(3 * MiB + 17)
    sender = send_then_shut(client, data)
    d = direction(backend, pool, relay_in.fileno(), fd, out_socket=False, close_out=True)
    assert drive(d, relay_in.fileno(), fd) == len(data)
    sender.join(10)
    assert d.flags & _splice.DIR_FELL_BACK
    with pytest.raises(OSError):
        os.fstat(fd)  # closed at EOF: that is how a non-socket learns of it
    assert out.read_bytes() == b"head:" + data


def test_regular_file_source_is_sent_with_sendfile(backend: str, pool: Any, tmp_path: Path,
                                                   sockets: list[socket.socket]) -> None:
    path = tmp_path / "in.bin"
    data = os.urandom(5 * MiB + 3)
    path.write_bytes(data)
    relay_out, target = tcp_pair()
    sockets.extend((relay_out, target))
    relay_out.setblocking(False)
    got: list[bytes] = []
    reader = read_all(target, got)
    with open(path, "rb") as f:
        d = direction(backend, pool, f.fileno(), relay_out.fileno(), in_file=True)
        assert drive(d, f.fileno(), relay_out.fileno()) == len(data)
    reader.join(10)
    assert b"".join(got) == data
    assert not d.flags & _splice.DIR_FELL_BACK
    assert pool.total == 0  # sendfile needs no pipe


def test_without_free_pipes_it_copies(backend: str, make_pool: Any,
                                      sockets: list[socket.socket]) -> None:
    pool = make_pool(max_total=0)
    client, relay_in, relay_out, target = hop(sockets)
    data = os.urandom(2 * MiB)
    sender = send_then_shut(client, data)
    got: list[bytes] = []
    reader = read_all(target, got)
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    assert drive(d, relay_in.fileno(), relay_out.fileno()) == len(data)
    sender.join(10)
    reader.join(10)
    assert b"".join(got) == data
    assert pool.total == 0
    assert not d.flags & _splice.DIR_FELL_BACK  # a full pool is not a refusal


def test_pipe_goes_back_to_the_pool_when_empty(backend: str, pool: Any,
                                               sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets)
    client.sendall(b"x" * 1000)
    select.select([relay_in], [], [], 10)
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    rc, n = d.move()
    assert (rc, n) == (WAIT_IN, 1000)
    assert not d.holds_pipe
    assert (pool.total, pool.idle) == (1, 1)
    assert target.recv(2000) == b"x" * 1000
    assert d.move() == (WAIT_IN, 0)


def test_budget_bounds_one_call(backend: str, pool: Any, sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets)
    got: list[bytes] = []
    reader = read_all(target, got)
    sender = send_then_shut(client, b"y" * (4 * MiB))
    select.select([relay_in], [], [], 10)
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    rc, n = d.move(budget=4096)
    while rc == WAIT_IN and n == 0:
        select.select([relay_in], [], [], 10)
        rc, n = d.move(budget=4096)
    assert (rc, n) == (MOVED, 4096)
    assert drive(d, relay_in.fileno(), relay_out.fileno()) == 4 * MiB - 4096
    sender.join(10)
    reader.join(10)
    assert len(b"".join(got)) == 4 * MiB


def test_reset_on_the_input_side(backend: str, pool: Any, sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, _ = hop(sockets)
    client.sendall(b"z" * 10000)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    with pytest.raises(MoveError) as caught:
        drive(d, relay_in.fileno(), relay_out.fileno())
    assert caught.value.errno == errno.ECONNRESET
    assert caught.value.side == "in"
    d.release()


def test_reset_on_the_output_side(backend: str, pool: Any, sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets)
    target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    target.close()
    def send() -> None:
        try:
            client.sendall(b"w" * (8 * MiB))
        except OSError:
            pass  # the relay reset this side too, or the test closed it

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    d = direction(backend, pool, relay_in.fileno(), relay_out.fileno())
    with pytest.raises(MoveError) as caught:
        drive(d, relay_in.fileno(), relay_out.fileno())
    assert caught.value.errno in (errno.ECONNRESET, errno.EPIPE)
    assert caught.value.side == "out"
    d.release()
    client.shutdown(socket.SHUT_RDWR)  # wakes the blocked sendall
    sender.join(10)
    assert not sender.is_alive()


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_signals_lose_no_byte(backend: str, pool: Any, copy: bool,
                              sockets: list[socket.socket]) -> None:
    """A timer signal every 100 µs interrupts whatever it can (EINTR is retried)."""
    client, relay_in, relay_out, target = hop(sockets, small_out=True)
    data = os.urandom(16 * MiB)
    got: list[bytes] = []
    ticks = [0]

    def tick(signum: int, frame: Any) -> None:
        ticks[0] += 1

    old = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    try:
        sender = send_then_shut(client, data)
        reader = read_all(target, got, chunk=3000)
        d = direction(backend, pool, relay_in.fileno(), relay_out.fileno(), copy=copy)
        assert drive(d, relay_in.fileno(), relay_out.fileno()) == len(data)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    sender.join(10)
    reader.join(10)
    assert ticks[0] > 0
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()
