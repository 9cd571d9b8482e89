"""The ``portable`` backend's mover (:mod:`relay.datapath.copyloop`) on real sockets and
pipes: every byte through partial writes, a slow reader holding the writer at one
buffer, the prefix first, EOF after the buffer drained, errors named by side; and
that the data path imports and chooses it on a system with no Linux extras
(``tests/nolinux``).  The pump-level behaviour (half-close, resets, status) is
tests/unit/test_splice_pump.py's, which CI also runs with ``LABRELAY_DATAPATH=portable``.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import test_splice
from test_splice import drive, hop, read_all, send_then_shut

from relay.datapath._splice import DONE, WAIT_IN, WAIT_OUT, MoveError
from relay.datapath.copyloop import CopyDirection

MiB = 1024 * 1024
sockets = test_splice.sockets  # the fixture
NOLINUX = Path(__file__).resolve().parents[1] / "nolinux"
REPO = Path(__file__).resolve().parents[2]


def test_moves_everything_through_partial_writes(sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets, small_out=True)
    data = os.urandom(8 * MiB + 7)
    got: list[bytes] = []
    reader, writer = read_all(target, got), send_then_shut(client, data)
    d = CopyDirection(relay_in.fileno(), relay_out.fileno(), short_waits=True,
                      buffer_size=64 * 1024)
    assert drive(d, relay_in.fileno(), relay_out.fileno()) == len(data)
    writer.join()
    reader.join()
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()
    assert d.moved == len(data) and d.held == 0


def test_a_slow_reader_holds_the_writer_at_one_buffer(sockets: list[socket.socket]) -> None:
    """Nothing is read while the buffer holds bytes the output refused: the direction
    waits for the output, and the rest stays in the kernel, pushing back on the sender."""
    client, relay_in, relay_out, _target = hop(sockets, small_out=True)
    client.setblocking(False)
    sent = 0
    try:
        while sent < 16 * MiB:
            sent += client.send(b"x" * 65536)
    except BlockingIOError:
        pass
    # What send() took reaches relay_in a little later on a loaded box (the loopback's
    # delivery deferred to ksoftirqd): wait until a whole buffer's worth is readable, or
    # the mover's first read may come short and wait for input instead (failed once
    # under two CPU hogs in round 20).  SO_RCVLOWAT makes select wait for that much.
    relay_in.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 64 * 1024)
    readable, _, _ = select.select([relay_in], [], [], 30)
    assert readable, "loopback did not deliver 64 KiB within 30 s"
    relay_in.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    d = CopyDirection(relay_in.fileno(), relay_out.fileno(), buffer_size=64 * 1024)
    rc, moved = d.move()
    assert rc == WAIT_OUT
    assert 0 < d.held <= 64 * 1024
    # Again: still waiting for the output, nothing more taken in.
    rc, again = d.move()
    assert rc == WAIT_OUT and again == 0
    assert moved + d.held < sent  # the rest is still in the kernel's buffers


def test_prefix_goes_first_then_eof_shuts_the_output(sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets)
    got: list[bytes] = []
    reader = read_all(target, got)
    d = CopyDirection(relay_in.fileno(), relay_out.fileno())
    d.prefix(b"first:")
    client.sendall(b"then")
    rc, _ = d.move()
    assert rc == WAIT_IN
    client.shutdown(socket.SHUT_WR)
    drive(d, relay_in.fileno(), relay_out.fileno())
    reader.join(10)
    assert b"".join(got) == b"first:then"  # and EOF: read_all returned
    assert d.move() == (DONE, 0)


def test_a_pipe_output_is_closed_at_eof(tmp_path: Path, sockets: list[socket.socket]) -> None:
    client, relay_in, _relay_out, _target = hop(sockets)
    r, w = os.pipe()
    os.set_blocking(w, False)
    d = CopyDirection(relay_in.fileno(), w, out_socket=False, close_out=True)
    client.sendall(b"to a pipe")
    client.shutdown(socket.SHUT_WR)
    drive(d, relay_in.fileno(), w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"to a pipe"  # EOF: the write end was closed


def test_errors_name_their_side(sockets: list[socket.socket]) -> None:
    client, relay_in, relay_out, target = hop(sockets)
    target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    target.close()  # a reset, which loopback delivers before close() returns
    sockets.remove(target)
    d = CopyDirection(relay_in.fileno(), relay_out.fileno())
    client.sendall(b"x" * 65536)
    with pytest.raises(MoveError) as err:
        drive(d, relay_in.fileno(), relay_out.fileno(), timeout=5)
    assert err.value.side == "out"


def test_the_data_path_is_portable_where_linux_is_not() -> None:
    """With Linux's extras removed (tests/nolinux), ``labrelay connect``'s modules
    import, ``auto`` chooses the portable backend, and ``python`` and ``c`` are refused
    with a message that names the way out."""
    code = (
        "import os, relay.user.connect, relay.cli.main\n"
        "from relay.datapath import splicing as s, _splice\n"
        "assert not hasattr(os, 'splice') and not _splice.AVAILABLE\n"
        "b = s.choose_backend('auto'); print(b.name, '|', b.reason)\n"
        "for name in ('python', 'c'):\n"
        "    try:\n        s.choose_backend(name)\n"
        "    except s.DatapathError as e:\n        print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(NOLINUX), str(REPO)))}
    env.pop("LABRELAY_DATAPATH", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("portable | no native module and no splice"), lines
    assert "LABRELAY_DATAPATH=portable" in lines[1], lines  # python: no splice here
    assert lines[2].endswith("or set LABRELAY_DATAPATH=portable"), lines  # c: no module
