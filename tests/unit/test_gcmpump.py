"""The open-and-forward thread (``csrc/gpump.c`` through :class:`relay.ssh.gcmrun.Pump`)
on real sockets: socketpairs stand for the user's connection and the data connection,
and the stream is sealed by the Python code (``GCMDirection.seal``).

What must hold: the data connection gets exactly the channel's bytes of the packets the
thread took, in order; it stops *before* the first packet it does not take whole (and at
EOF, an error, a stalled data connection, or when asked) and hands back the nonce
counter, the packet count and the bytes it did not consume or write, so the Python path
reads on as if it had read everything itself; and it is done with its duplicates of the
sockets when it stops, whatever Python did with its own descriptors meanwhile.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from test_gcmrun import BIG, CHANNEL, IV, KEYS, data, packet

from relay.ssh import gcmrun, nativeforward
from relay.ssh.ciphers import AES128_GCM, AES256_GCM, MAX_PACKET_LENGTH, GCMDirection

pytestmark = pytest.mark.skipif(
    not gcmrun.native_enabled() and os.environ.get("CI") != "true",
    reason="the native module or libcrypto is not available here")

MAX_DATA = 1 << 20


def test_the_thread_is_there_in_ci() -> None:
    assert gcmrun.native_enabled()


class Pair:
    """A user socket (``user`` is the peer's end) and a data socket (``agent`` is the
    peer's end), the relay's ends non-blocking as Twisted leaves them."""

    def __init__(self) -> None:
        self.user, self.relay_user = socket.socketpair()
        self.relay_data, self.agent = socket.socketpair()
        for s in (self.relay_user, self.relay_data):
            s.setblocking(False)

    def close(self) -> None:
        for s in (self.user, self.relay_user, self.relay_data, self.agent):
            s.close()

    def start(self, key: bytes, counter: int, window: int = BIG, initial: bytes = b"",
              report: int = 1 << 16) -> gcmrun.Pump:
        fixed = struct.unpack(">L", IV[:4])[0]
        return gcmrun.Pump(key, fixed, counter, CHANNEL, window, MAX_DATA, MAX_PACKET_LENGTH,
                           self.relay_user.fileno(), self.relay_data.fileno(), initial, report)

    def read_agent(self, n: int, timeout: float = 10.0) -> bytes:
        got = b""
        self.agent.settimeout(timeout)
        while len(got) < n:
            chunk = self.agent.recv(n - len(got))
            assert chunk, f"data connection closed after {len(got)} of {n} bytes"
            got += chunk
        return got


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def wait_end(pump: gcmrun.Pump, timeout: float = 10.0) -> gcmrun.PumpState:
    """Wait on the pump's eventfd (as the reactor does) until it reports its end."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the thread did not end"
        ready, _, _ = select.select([pump.fileno()], [], [], left)
        if ready:
            state = pump.poll()
            if state.reason != gcmrun.RUNNING:
                return state


def open_python(tx_counter: int, key: bytes, wire: bytes) -> tuple[int, bytes]:
    """The first packet of ``wire`` opened by the Python code at ``tx_counter``."""
    rx = GCMDirection(key, IV)
    rx.counter = tx_counter
    (length,) = struct.unpack(">L", wire[:4])
    plain = rx.aead.decrypt(rx.nonce(), wire[4 : 4 + length + 16], wire[:4])
    return plain[1], plain


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("cipher", [AES128_GCM, AES256_GCM])
def test_it_forwards_the_run_and_hands_back_at_another_message(pair: Pair, cipher: bytes) -> None:
    key = KEYS[cipher]
    tx = GCMDirection(key, IV)
    start = tx.counter
    chunks = [os.urandom(n) for n in (0, 1, 15, 16, 17, 1000, 32768, 5, 32768)]
    wire = b"".join(data(tx, c) for c in chunks)
    at = tx.counter
    rest = packet(tx, 93, struct.pack(">2L", CHANNEL, 4096)) + data(tx, b"after")
    pump = pair.start(key, start)
    # the user's bytes arrive in odd pieces
    whole = wire + rest
    pos = 0
    for size in (3, 100, 7000, 1, 50000):
        pair.user.sendall(whole[pos : pos + size])
        pos += size
    pair.user.sendall(whole[pos:])
    expect = b"".join(chunks)
    assert pair.read_agent(len(expect)) == expect
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "packet"
    final, left, pending, _, _ = pump.stop()
    assert (final.packets, final.consumed, final.written) == (len(chunks), len(expect),
                                                              len(expect))
    assert final.counter == at and pending == b""
    assert left == rest  # the Python path reads on from exactly here
    assert open_python(final.counter, key, left)[0] == 93


def test_every_split_between_what_python_read_and_the_socket(pair: Pair) -> None:
    """The partial packet Python had buffered is handed to the thread (``initial``): at
    every split of a short stream, the same bytes and the same state."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    start = tx.counter
    chunks = [b"a" * 20, b"", b"b" * 40]
    wire = b"".join(data(tx, c) for c in chunks) + packet(tx, 2, b"\x00\x00\x00\x00")
    before = fd_count()
    for cut in range(0, len(wire) + 1, 3):
        p = Pair()
        try:
            pump = p.start(key, start, initial=wire[:cut])
            p.user.sendall(wire[cut:])
            assert p.read_agent(60) == b"a" * 20 + b"b" * 40
            wait_end(pump)
            state, left, pending, _, _ = pump.stop()
            assert (state.packets, (state.counter - start) % 2**64, len(left), pending) == (
                3, 3, len(wire) - sum(len(data(GCMDirection(key, IV), c)) for c in chunks), b"")
            assert open_python(state.counter, key, left)[0] == 2
        finally:
            p.close()
    assert fd_count() == before  # every thread closed its duplicates and eventfds


def test_the_window_is_granted_by_python(pair: Pair) -> None:
    """It takes no more than the window; a grant lets it go on; a packet over the window
    is handed back whole (the Python path closes the channel, as without the thread)."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    first, second, third = os.urandom(1000), os.urandom(2000), os.urandom(10)
    pump = pair.start(key, tx.counter, window=1000, report=1)
    pair.user.sendall(data(tx, first))
    assert pair.read_agent(1000) == first
    select.select([pump.fileno()], [], [], 10)
    assert pump.poll().written == 1000
    pump.grant(2000)
    pair.user.sendall(data(tx, second))
    assert pair.read_agent(2000) == second
    over = data(tx, third)
    pair.user.sendall(over)
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "packet"
    state, left, _, _, _ = pump.stop()
    assert left == over and state.consumed == 3000


def test_a_bad_tag_is_left_to_python(pair: Pair) -> None:
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    good = data(tx, b"x" * 100)
    bad = bytearray(data(tx, b"y" * 100))
    bad[-1] ^= 1
    pump = pair.start(key, (tx.counter - 2) % 2**64)
    pair.user.sendall(good + bytes(bad))
    assert pair.read_agent(100) == b"x" * 100
    wait_end(pump)
    state, left, _, _, _ = pump.stop()
    assert left == bytes(bad) and state.packets == 1
    with pytest.raises(InvalidTag):
        open_python(state.counter, key, left)


def test_user_eof_and_a_partial_packet(pair: Pair) -> None:
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    whole, cut = data(tx, b"z" * 64), data(tx, b"w" * 64)[:30]
    pump = pair.start(key, (tx.counter - 2) % 2**64)
    pair.user.sendall(whole + cut)
    assert pair.read_agent(64) == b"z" * 64
    pair.user.shutdown(socket.SHUT_WR)
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "user_eof"
    _, left, _, _, _ = pump.stop()
    assert left == cut


def test_a_reset_data_connection_ends_it(pair: Pair) -> None:
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pump = pair.start(key, tx.counter)
    pair.agent.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pair.agent.close()
    for _ in range(4):
        pair.user.sendall(data(tx, os.urandom(30000)))
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "data_error" and state.err != 0
    pump.stop()


def test_a_stalled_data_connection_hands_back_what_it_holds(pair: Pair) -> None:
    """The agent reads nothing: the thread stops within its stall time and hands back
    the bytes it opened and could not write (Python's buffer takes them, as without the
    thread), and consumed = written + pending exactly."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pair.agent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pump = pair.start(key, tx.counter)
    sent = 0
    pair.user.setblocking(False)
    try:
        for _ in range(200):
            pair.user.send(data(tx, os.urandom(32768)))
            sent += 1
    except BlockingIOError:
        pass
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "congested"
    final, _left, pending, _, _ = pump.stop()
    assert pending and final.consumed == final.written + len(pending)


def test_stop_while_idle_and_python_closing_its_descriptors_first(pair: Pair) -> None:
    """Twisted may close its descriptors (an abort, a reset) before it stops the thread:
    the thread's duplicates keep the numbers it uses its own, and stop() closes them, so
    the peer then sees the connection end and no descriptor is left."""
    key = KEYS[AES128_GCM]
    before = fd_count()
    pump = pair.start(key, 0)
    assert fd_count() == before + 4  # two duplicates, two eventfds
    pair.relay_user.close()
    pair.relay_data.close()
    pair.agent.settimeout(0.2)
    with pytest.raises(TimeoutError):
        pair.agent.recv(1)  # still open: the thread's duplicate holds it
    t0 = time.monotonic()
    state, left, pending, _, _ = pump.stop()
    assert time.monotonic() - t0 < 2.0
    assert gcmrun.REASONS[state.reason] == "stopped" and left == pending == b""
    pair.agent.settimeout(5)
    assert pair.agent.recv(1) == b""  # closed now
    assert pair.user.recv(1) == b""
    assert fd_count() == before - 2  # Pair's two relay ends were closed above


def test_an_idle_session_is_handed_back(pair: Pair) -> None:
    """A session that sends nothing for a while goes back to the Python path (the thread
    and its buffers are for bulk); Python arms it again on its next data."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pump = pair.start(key, tx.counter)
    pair.user.sendall(data(tx, b"q" * 10))
    assert pair.read_agent(10) == b"q" * 10
    state = wait_end(pump, timeout=15)
    assert gcmrun.REASONS[state.reason] == "idle"
    final, left, pending, _, _ = pump.stop()
    assert (final.packets, left, pending) == (1, b"", b"")


def pump_thread() -> int:
    """The id of the one open-and-forward thread running in this process."""
    tids = [int(t) for t in os.listdir("/proc/self/task")
            if open(f"/proc/self/task/{t}/comm").read().strip() == "lr-gpump"]
    assert len(tids) == 1, tids
    return tids[0]


def test_bulk_runs_sched_batch_and_a_pause_ends_it(pair: Pair) -> None:
    """While bulk flows the thread is SCHED_BATCH (several packets per wake-up, fewer
    wake-ups per GiB: csrc/gpump.c); small packets one at a time never make it so, and
    once the bytes pause it is SCHED_OTHER again, so a keystroke after a transfer wakes
    it as before.  The bytes stay exact across the multi-packet reads batching makes."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pump = pair.start(key, tx.counter, report=BIG)
    tid = pump_thread()
    for i in range(50):  # interactive: each small packet awaited at the other end
        pair.user.sendall(data(tx, bytes([i]) * 10))
        assert pair.read_agent(10) == bytes([i]) * 10
    assert os.sched_getscheduler(tid) == os.SCHED_OTHER
    assert pump.poll().batched == 0
    chunks = [struct.pack(">L", i) * 8192 for i in range(2048)]  # 64 MiB, 32 KiB packets
    total = 32768 * len(chunks)
    rounds = 0
    # Bulk is >= 1 MiB per 20 ms (gpump.c): a machine busy with other work may move a
    # round slower than that, so up to three rounds, each exact, until the thread turned.
    while rounds < 3 and (rounds == 0 or pump.poll().batched == 0):
        rounds += 1
        wire = memoryview(b"".join(data(tx, c) for c in chunks))
        got, sent, pos = bytearray(total), 0, 0
        view = memoryview(got)
        pair.user.setblocking(False)  # one thread writes and reads: never 50 ms unread
        while pos < total:
            r, w, _ = select.select([pair.agent], [pair.user] if sent < len(wire) else [],
                                    [], 10)
            assert r or w, f"no progress at {pos} bytes: {pump.poll()}"
            if w:
                sent += pair.user.send(wire[sent : sent + (1 << 20)])
            if r:
                n = pair.agent.recv_into(view[pos:])
                assert n, f"data connection closed after {pos} bytes"
                pos += n
        pair.user.setblocking(True)
        assert got[:pos] == b"".join(chunks)
    assert pump.poll().batched >= 1, "never SCHED_BATCH in three rounds of 64 MiB"
    deadline = time.monotonic() + 5.0
    while os.sched_getscheduler(tid) != os.SCHED_OTHER:  # no event says so: poll for it
        assert time.monotonic() < deadline, "still SCHED_BATCH after the bytes paused"
        if select.select([pump.fileno()], [], [], 0.01)[0]:
            pump.poll()
    pair.user.sendall(data(tx, b"k"))  # a keystroke after the transfer
    assert pair.read_agent(1) == b"k"
    final, left, pending, _, _ = pump.stop()
    assert (final.packets, left, pending) == (50 + rounds * len(chunks) + 1, b"", b"")


# -- the reactor's side (relay.ssh.nativeforward.NativeForward), with recording doubles


class Recorder:
    def __init__(self, **attrs: object) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.__dict__.update(attrs)

    def record(self, name: str) -> Callable[..., None]:
        def call(*args: object) -> None:
            self.calls.append((name, args))
        return call


class Channel:
    """A BridgedChannel's window bookkeeping: credit once less than half is left."""

    def __init__(self, window: int) -> None:
        self.localWindowLeft = self.localWindowSize = window
        self.bridge: Any = None
        self.adjusts: list[int] = []
        self._credit = 0

    def consumed(self, n: int) -> None:
        self._credit += n
        if self.localWindowLeft < self.localWindowSize // 2:
            self.adjusts.append(self._credit)
            self.localWindowLeft += self._credit
            self._credit = 0


def test_the_handback_leaves_the_transport_as_the_python_path_would(pair: Pair) -> None:
    """Through a KEXINIT (a rekey): the nonce counter and the incoming sequence number
    (strict KEX counts packets; it wraps here) set past the packets the thread opened,
    the window used and granted, the bytes metered, and the KEXINIT and what follows fed
    to the transport, which reads its socket again."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    rx = GCMDirection(key, IV)
    chunks = [os.urandom(n) for n in (32768, 32768, 32768, 100, 32768)]
    wire = b"".join(data(tx, c) for c in chunks)
    at = tx.counter
    rest = packet(tx, 20, os.urandom(300)) + data(tx, b"under the old keys")
    window = 160 * 1024  # more than the data (a client never sends beyond it)
    channel = Channel(window)
    bridge = Recorder(bytesAtoB=0, bytesBtoA=0)
    bridge.a = channel
    bridge.dataReceived = bridge.record("dataReceived")
    channel.bridge = bridge
    side = Recorder(nativeStats={"native_bytes": 0}, forwarder=None, _closed=False)
    reactor = Recorder()
    reactor.removeReader = reactor.record("removeReader")
    tcp = Recorder(reactor=reactor, disconnecting=False, disconnected=False)
    tcp.startReading = tcp.record("startReading")
    fed: list[bytes] = []
    counted: list[int] = []
    t = Recorder(transport=tcp, service=None, sessionID=b"s", _readDead=False,
                 incomingPacketSequence=0xFFFFFFFE, nativeForward=None)
    t.dataReceived = fed.append
    t._count = counted.append
    fixed = struct.unpack(">L", IV[:4])[0]
    pump = gcmrun.Pump(key, fixed, rx.counter, CHANNEL, window, MAX_DATA, MAX_PACKET_LENGTH,
                       pair.relay_user.fileno(), pair.relay_data.fileno(), b"", window // 4)
    forward = nativeforward.NativeForward(t, channel, side, rx, pump)  # type: ignore[arg-type]
    t.nativeForward = side.forwarder = forward
    expect = b"".join(chunks)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pair.read_agent(len(expect))))
    reader.start()
    pair.user.sendall(wire + rest)
    deadline = time.monotonic() + 10
    while not forward.done:  # the reactor's turns: grants while it runs, then the end
        assert time.monotonic() < deadline
        select.select([pump.fileno()], [], [], 1)
        forward.doRead()
    reader.join(10)
    assert got == [expect]
    assert rx.counter == at
    assert t.incomingPacketSequence == (0xFFFFFFFE + len(chunks)) & 0xFFFFFFFF
    assert fed == [rest] and ("startReading", ()) in tcp.calls
    assert ("removeReader", (forward,)) in reactor.calls
    assert t.nativeForward is None and side.forwarder is None
    assert bridge.bytesAtoB == len(expect) == side.nativeStats["native_bytes"]
    assert bridge.calls == []  # nothing left unwritten
    assert sum(counted) == len(expect) + 8 * len(chunks)
    assert channel.localWindowLeft == window - len(expect) + sum(channel.adjusts)
    assert channel.adjusts  # the window was re-opened as the bytes were written


def test_a_connection_inside_tls_is_never_armed(pair: Pair) -> None:
    """A user's SSH inside the relay's TLS port reaches the transport through a wrapper
    that forwards ``fileno()`` to the socket, which carries TLS records: the thread must
    never read it (nor write a data connection that is wrapped)."""
    from twisted.internet import reactor
    from twisted.internet.tcp import Connection
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    raw = Connection(pair.relay_user, None, reactor)  # type: ignore[arg-type]
    wrapper = ProtocolWrapper(WrappingFactory(None), None)  # type: ignore[arg-type]
    wrapper.transport = raw  # what makeConnection sets
    assert wrapper.fileno() == pair.relay_user.fileno()  # what the thread would take
    t = Recorder(nativeCandidate=object(), nativeForward=None, transport=wrapper)
    assert nativeforward.maybe_arm(t) is None and t.nativeCandidate is None
    assert nativeforward._plain_tcp(raw) and not nativeforward._plain_tcp(wrapper)


def test_never_armed_while_python_holds_sealed_packets_in_the_cork(pair: Pair) -> None:
    """Packets Python sealed during the read wait in the transport's cork until the
    read's end (relay.ssh.aead.CorkGroup); a thread armed meanwhile would write packets
    sealed after them ahead of them, and the user's ssh would fail the MAC check
    ("message authentication code incorrect").  Arming waits for a later read: the
    check comes before anything else is looked at."""
    from twisted.internet import reactor
    from twisted.internet.tcp import Connection

    raw = Connection(pair.relay_user, None, reactor)  # type: ignore[arg-type]
    t = Recorder(nativeCandidate=object(), nativeForward=None, transport=raw,
                 _cork=[b"sealed, not yet written"])
    assert nativeforward.maybe_arm(t) is None and t.nativeCandidate is None
