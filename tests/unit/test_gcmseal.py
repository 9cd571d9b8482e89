"""The sealing direction of the open-and-forward thread (``csrc/gpump.c`` with
``lr_gpump_seal``, through :class:`relay.ssh.gcmrun.Pump`): on socketpairs, against the
Python code's own opening (``GCMDirection``).

What must hold: the user gets exactly the agent's bytes, in order, as ``CHANNEL_DATA``
packets for the user's channel id, none longer than the user's maximum packet, never past
the user's window (which the user's own ``WINDOW_ADJUST`` opens, taken in the thread); the
relay's grants reach the user as ``WINDOW_ADJUST`` packets in the same stream; the
outgoing nonce counter and sequence number handed back are past exactly the packets it
sealed, and what it sealed and did not write, and what it read and did not seal, are
handed back so that Python's next packet follows on the wire as if Python had done it all.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_gcmpump import MAX_DATA, Channel, Pair, Recorder, wait_end
from test_gcmrun import CHANNEL, IV, KEYS, data, packet

from relay.ssh import gcmrun, nativeforward
from relay.ssh.ciphers import AES128_GCM, AES256_GCM, MAX_PACKET_LENGTH, GCMDirection

pytestmark = pytest.mark.skipif(
    not gcmrun.native_enabled() and os.environ.get("CI") != "true",
    reason="the native module or libcrypto is not available here")

RCHANNEL = 3  # the user's id for the channel (the relay's is CHANNEL)
RMAX = 32768  # the user's maximum packet (OpenSSH's for a -W channel)
OUT_IV = bytes.fromhex("b0b1b2b3fffffffffffffffd")  # the outgoing counter wraps too
FIXED = struct.unpack(">L", IV[:4])[0]


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def start(pair: Pair, key: bytes, rwindow: int, window: int = 1 << 30,
          rmax: int = RMAX, report: int = 1 << 16) -> tuple[gcmrun.Pump, GCMDirection]:
    """A sealing thread; the user's receiver for what it seals."""
    out = GCMDirection(key, OUT_IV)
    seal = gcmrun.Seal(key, out.fixed, out.counter, RCHANNEL, rwindow, rmax)
    pump = gcmrun.Pump(key, FIXED, GCMDirection(key, IV).counter, CHANNEL, window, MAX_DATA,
                       MAX_PACKET_LENGTH, pair.relay_user.fileno(), pair.relay_data.fileno(),
                       b"", report, seal)
    return pump, GCMDirection(key, OUT_IV)


class UserReader:
    """Opens the thread's stream as the user's ssh would: packet by packet, with the
    Python code, checking each one's sequence of nonces."""

    def __init__(self, rx: GCMDirection) -> None:
        self.rx = rx
        self.buf = b""
        self.data = b""
        self.adjusts: list[int] = []
        self.packets = 0

    def feed(self, wire: bytes) -> None:
        self.buf += wire
        while len(self.buf) >= 4:
            (length,) = struct.unpack(">L", self.buf[:4])
            assert length % 16 == 0 and 16 <= length <= MAX_PACKET_LENGTH
            if len(self.buf) < 4 + length + 16:
                return
            plain = self.rx.aead.decrypt(self.rx.nonce(), self.buf[4 : 4 + length + 16],
                                         self.buf[:4])
            self.buf = self.buf[4 + length + 16 :]
            self.packets += 1
            pad, msg = plain[0], plain[1]
            assert 4 <= pad and (len(plain)) % 16 == 0
            payload = plain[2 : len(plain) - pad]
            recipient = struct.unpack(">L", payload[:4])[0]
            assert recipient == RCHANNEL
            if msg == 94:
                (n,) = struct.unpack(">L", payload[4:8])
                assert n == len(payload) - 8 and 0 < n <= RMAX
                self.data += payload[8:]
            else:
                assert msg == 93 and len(payload) == 8
                self.adjusts.append(struct.unpack(">L", payload[4:8])[0])

    def read(self, sock: socket.socket, until: int, timeout: float = 10.0) -> None:
        """Read the user's socket until ``until`` channel bytes were opened."""
        deadline = time.monotonic() + timeout
        while len(self.data) < until:
            left = deadline - time.monotonic()
            assert left > 0, f"got {len(self.data)} of {until} bytes"
            ready, _, _ = select.select([sock], [], [], left)
            if ready:
                chunk = sock.recv(1 << 20)
                assert chunk, "the user's connection closed"
                self.feed(chunk)

    def quiet(self, sock: socket.socket, wait: float = 0.3) -> None:
        """Nothing arrives for ``wait`` seconds."""
        ready, _, _ = select.select([sock], [], [], wait)
        assert not ready, "the thread sent past the user's window"


@pytest.mark.parametrize("cipher", [AES128_GCM, AES256_GCM])
def test_it_seals_the_agents_bytes_within_the_users_window(pair: Pair, cipher: bytes) -> None:
    """The user's window at 0: nothing is sent; each WINDOW_ADJUST the user sends (in
    the stream the thread opens) lets exactly that many bytes go, in packets of at most
    the user's maximum, in order, with the nonce counter wrapping on the way."""
    key = KEYS[cipher]
    tx = GCMDirection(key, IV)  # the user's sealing of what it sends
    pump, rx = start(pair, key, rwindow=0)
    start_counter = rx.counter
    stream = os.urandom(300_000)
    pair.agent.sendall(stream)
    user = UserReader(rx)
    user.quiet(pair.user)
    pair.user.sendall(packet(tx, 93, struct.pack(">2L", CHANNEL, 100_000)))
    user.read(pair.user, 100_000)
    user.quiet(pair.user)
    assert user.data == stream[:100_000]
    pair.user.sendall(packet(tx, 93, struct.pack(">2L", CHANNEL, 250_000)))
    user.read(pair.user, len(stream))
    assert user.data == stream
    final, left, pending, unsealed, unsent = pump.stop()
    assert gcmrun.REASONS[final.reason] == "stopped"
    assert (left, pending, unsealed, unsent) == (b"", b"", b"", b"")
    assert final.sealed == len(stream) and final.adjusted == 350_000
    assert final.packets == 2 and final.counter == tx.counter  # the adjusts were opened
    assert final.opackets == user.packets and final.ocounter == rx.counter
    assert (final.ocounter - start_counter) % (1 << 64) == user.packets
    assert final.uwritten == sum(4 + 16 for _ in range(user.packets)) + (
        final.oplain)  # every sealed byte was written: length, plaintext, tag


def test_the_relays_grants_go_in_the_sealed_stream(pair: Pair) -> None:
    """Python's grant (``grant_send``) opens the thread's window for the user's data and
    reaches the user as a WINDOW_ADJUST for the user's channel id."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pump, rx = start(pair, key, rwindow=1 << 20, window=100)
    user = UserReader(rx)
    pump.grant_send(5000)
    deadline = time.monotonic() + 10
    while not user.adjusts:
        assert time.monotonic() < deadline
        select.select([pair.user], [], [], 1)
        user.feed(pair.user.recv(4096))
    assert user.adjusts == [5000]
    chunk = os.urandom(4000)
    pair.user.sendall(data(tx, chunk))  # over the window it was started with
    assert pair.read_agent(len(chunk)) == chunk
    final, left, *_ = pump.stop()
    assert final.granted == 5000 and final.written == 4000 and left == b""


def test_an_adjust_past_the_largest_window_is_left_to_python(pair: Pair) -> None:
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pump, _ = start(pair, key, rwindow=0xFFFFFFFF - 10)
    bad = packet(tx, 93, struct.pack(">2L", CHANNEL, 11))
    pair.user.sendall(bad)
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "packet"
    final, left, *_ = pump.stop()
    assert left == bad and final.packets == 0 and final.adjusted == 0


def test_the_agents_eof_hands_back_what_was_not_sealed(pair: Pair) -> None:
    """With the user's window shut, the agent's bytes and then its FIN: the thread ends
    (Python reads the data connection again and finds the EOF itself) and hands back the
    bytes it read, exactly."""
    key = KEYS[AES128_GCM]
    pump, _ = start(pair, key, rwindow=0)
    stream = os.urandom(5000)
    pair.agent.sendall(stream)
    pair.agent.shutdown(socket.SHUT_WR)
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "data_eof"
    final, _left, _pending, unsealed, unsent = pump.stop()
    assert unsealed == stream and unsent == b"" and final.sealed == 0


def test_a_user_gone_ends_it(pair: Pair) -> None:
    key = KEYS[AES128_GCM]
    pump, _ = start(pair, key, rwindow=1 << 20)
    pair.user.close()
    pair.agent.sendall(os.urandom(100_000))
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] in ("user_eof", "user_error")
    pump.stop()


# -- the handback through NativeForward, with recording doubles


def _wait_sealing_stops(pump: gcmrun.Pump) -> gcmrun.PumpState:
    """Bounded polling: the thread sealed all it can hold for a user who reads nothing
    (nothing signals that; its counters stop moving)."""
    deadline = time.monotonic() + 10
    last = -1
    while True:
        state = pump.poll()
        if state.sealed == last and state.sealed > 0:
            return state
        assert time.monotonic() < deadline, "the thread kept sealing"
        last = state.sealed
        time.sleep(0.2)


def _forward(pump: gcmrun.Pump, rx_in: GCMDirection,
             out: GCMDirection, channel: Channel, side_stats: dict[str, int]) -> Any:
    bridge = Recorder(bytesAtoB=0, bytesBtoA=0)
    bridge.a = channel
    bridge.dataReceived = bridge.record("dataReceived")
    channel.bridge = bridge
    side_tcp = Recorder(disconnecting=False)
    side_tcp.startReading = side_tcp.record("startReading")
    side = Recorder(nativeStats=side_stats, forwarder=None, _closed=False, _pauses=frozenset(),
                    transport=side_tcp)
    reactor = Recorder()
    reactor.removeReader = reactor.record("removeReader")
    reactor.callLater = reactor.record("callLater")
    tcp = Recorder(reactor=reactor, disconnecting=False, disconnected=False)
    tcp.startReading = tcp.record("startReading")
    tcp.write = tcp.record("write")
    t = Recorder(transport=tcp, service=Recorder(channelsToRemoteChannel={channel: RCHANNEL}),
                 sessionID=b"s", _readDead=False, incomingPacketSequence=0xFFFFFFFF,
                 outgoingPacketSequence=0xFFFFFFFE, nativeForward=None, _rbuf=bytearray(),
                 currentEncryptions=Recorder(outAEAD=out))
    t.fed = []
    t.dataReceived = t.fed.append
    t.counted = []
    t._count = t.counted.append
    t.sendPacket = t.record("sendPacket")
    forward = nativeforward.NativeForward(t, channel, side, rx_in, pump)  # type: ignore[arg-type]
    t.nativeForward = side.forwarder = forward
    return forward


def test_the_handback_through_a_kexinit_leaves_both_streams_exact(pair: Pair) -> None:
    """A user who reads nothing while the agent sends 3 MiB, then the user's KEXINIT:
    the handback sets the outgoing counter and the sequence number (wrapping past 2^32)
    past the packets the thread sealed, writes what it sealed and did not write before
    anything else, gives the bytes it read and did not seal to the bridge, and Python's
    reading of both sockets resumes; the user's stream opens cleanly end to end, and
    with what the data socket still holds it is the agent's stream exactly."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    rx_in = GCMDirection(key, IV)
    out = GCMDirection(key, OUT_IV)
    start_out = out.counter
    pair.relay_data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    seal = gcmrun.Seal(key, out.fixed, out.counter, RCHANNEL, 1 << 30, RMAX)
    channel = Channel(1 << 20)
    channel.remoteWindowLeft = 1 << 30  # type: ignore[attr-defined]
    channel.localClosed = False  # type: ignore[attr-defined]
    pump = gcmrun.Pump(key, FIXED, rx_in.counter, CHANNEL, 1 << 20, MAX_DATA, MAX_PACKET_LENGTH,
                       pair.relay_user.fileno(), pair.relay_data.fileno(), b"", 1 << 18, seal)
    stats = {"native_bytes": 0, "native_sealed": 0}
    forward = _forward(pump, rx_in, out, channel, stats)
    t = forward.transport
    stream = os.urandom(3 << 20)
    pair.agent.setblocking(False)
    sent = 0
    while sent < len(stream):
        try:
            sent += pair.agent.send(stream[sent : sent + 65536])
        except BlockingIOError:
            break
    _wait_sealing_stops(pump)
    before = data(tx, b"before")
    kexinit = packet(tx, 20, os.urandom(200))
    pair.user.sendall(before + kexinit)
    deadline = time.monotonic() + 10
    while not forward.done:
        assert time.monotonic() < deadline
        select.select([pump.fileno()], [], [], 1)
        forward.doRead()
    final = forward._seen
    assert gcmrun.REASONS[final.reason] == "packet"
    # incoming: past the one data packet, the KEXINIT fed back
    assert t.fed == [kexinit] and rx_in.counter == (tx.counter - 1) % (1 << 64)
    assert t.incomingPacketSequence == 0  # 0xFFFFFFFF + 1 wrapped
    assert pair.read_agent(6) == b"before"
    # outgoing: the counter and sequence number past every sealed packet
    assert (out.counter - start_out) % (1 << 64) == final.opackets > 2
    assert t.outgoingPacketSequence == (0xFFFFFFFE + final.opackets) & 0xFFFFFFFF
    writes = [args[0] for name, args in t.transport.calls if name == "write"]
    assert len(writes) == 1 and writes[0]  # the unsent sealed bytes, once
    user = UserReader(GCMDirection(key, OUT_IV))
    pair.user.setblocking(False)
    while True:
        try:
            chunk = pair.user.recv(1 << 20)
        except BlockingIOError:
            break
        user.feed(chunk)
    user.feed(writes[0])
    assert user.buf == b"" and user.packets == final.opackets
    assert len(user.data) == final.sealed == stats["native_sealed"]
    unsealed = b"".join(args[1] for name, args in channel.bridge.calls
                        if name == "dataReceived")
    assert [c for c in t.calls if c[0] == "sendPacket"] == []  # no grant was owed
    rest = b""
    pair.relay_data.setblocking(False)
    while True:
        try:
            chunk = pair.relay_data.recv(1 << 20)
        except BlockingIOError:
            break
        rest += chunk
    assert user.data + unsealed + rest == stream[:sent]
    assert ("startReading", ()) in forward.side.transport.calls
    assert ("startReading", ()) in t.transport.calls
    assert t.nativeForward is None and forward.side.forwarder is None
    assert channel.remoteWindowLeft == (1 << 30) - final.sealed  # type: ignore[attr-defined]
    assert channel.bridge.bytesBtoA == final.sealed


def test_a_python_write_hands_back_and_parses_the_rest_later(pair: Pair) -> None:
    """Python is about to write a packet to the user (a keepalive, its own KEXINIT):
    the user's bytes the thread had not consumed are parsed in a later reactor turn,
    not inside that write; grants Python asked for and the thread had not sealed are
    sent by Python, after what the thread wrote."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    rx_in = GCMDirection(key, IV)
    out = GCMDirection(key, OUT_IV)
    seal = gcmrun.Seal(key, out.fixed, out.counter, RCHANNEL, 1 << 20, RMAX)
    channel = Channel(1 << 20)
    channel.remoteWindowLeft = 1 << 20  # type: ignore[attr-defined]
    channel.localClosed = False  # type: ignore[attr-defined]
    pump = gcmrun.Pump(key, FIXED, rx_in.counter, CHANNEL, 1 << 20, MAX_DATA, MAX_PACKET_LENGTH,
                       pair.relay_user.fileno(), pair.relay_data.fileno(), b"", 1 << 18, seal)
    forward = _forward(pump, rx_in, out, channel, {"native_bytes": 0})
    t = forward.transport
    partial = data(tx, b"x" * 1000)[:500]
    pair.user.sendall(partial)
    deadline = time.monotonic() + 10
    while pump.poll().reads == 0:  # bounded polling: the thread has read it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    forward._asked = 7  # a grant the thread never got to seal (as if just asked)
    forward.handback("python write", later=True)
    assert t.fed == [] and bytes(t._rbuf) == partial
    assert ("callLater", (0, forward._feed)) in t.transport.reactor.calls
    sends = [args for name, args in t.calls if name == "sendPacket"]
    assert sends == [(93, struct.pack(">2L", RCHANNEL, 7))]
    forward._feed()
    assert t.fed == [b""]  # the transport's own parse of its buffer


def test_the_thread_grants_by_the_channels_rule(pair: Pair) -> None:
    """With the channel's window size given, the thread tops the user's window up itself
    once less than half of it is left, by the bytes written since (as
    ``BridgedChannel._grant`` does), starting from the credit Python had not granted: the
    user sends far past the first window and every byte arrives."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    out = GCMDirection(key, OUT_IV)
    size = 64 * 1024
    seal = gcmrun.Seal(key, out.fixed, out.counter, RCHANNEL, 1 << 20, RMAX, size, 100)
    pump = gcmrun.Pump(key, FIXED, tx.counter, CHANNEL, size, MAX_DATA, MAX_PACKET_LENGTH,
                       pair.relay_user.fileno(), pair.relay_data.fileno(), b"", 1 << 30, seal)
    user = UserReader(GCMDirection(key, OUT_IV))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pair.read_agent(400_000)))
    reader.start()
    sent = b""
    window = size
    while len(sent) < 400_000:
        while window < 20_000:  # what a client does: wait for the relay's adjust
            ready, _, _ = select.select([pair.user], [], [], 10)
            assert ready, f"no WINDOW_ADJUST after {len(sent)} bytes"
            before = len(user.adjusts)
            user.feed(pair.user.recv(1 << 16))
            window += sum(user.adjusts[before:])
        chunk = os.urandom(min(window, 16_000, 400_000 - len(sent)))
        pair.user.sendall(data(tx, chunk))
        sent += chunk
        window -= len(chunk)
    reader.join(10)
    assert got == [sent]
    final, left, *_ = pump.stop()
    assert left == b"" and final.written == len(sent)
    assert final.sgranted == final.granted >= sum(user.adjusts) > 0
    # every grant is the credit written since the last one (the first with Python's 100)
    assert final.sgranted + final.credit == len(sent) + 100


def test_a_sealing_thread_stops_after_python_closed_its_descriptors(pair: Pair) -> None:
    """As for the opening-only thread (test_gcmpump): Twisted may close its descriptors
    first; the sealing thread's duplicates keep the sockets until stop(), which closes
    them, and no descriptor is left."""
    key = KEYS[AES128_GCM]
    before = len(os.listdir("/proc/self/fd"))
    pump, _ = start(pair, key, rwindow=1 << 20)
    pair.relay_user.close()
    pair.relay_data.close()
    pair.agent.sendall(b"z" * 1000)  # sealed to the user through the duplicates
    pair.user.settimeout(5)
    assert pair.user.recv(1) != b""
    t0 = time.monotonic()
    state, *_ = pump.stop()
    assert time.monotonic() - t0 < 2.0 and gcmrun.REASONS[state.reason] == "stopped"
    assert state.sealed == 1000
    pair.agent.settimeout(5)
    assert pair.agent.recv(1) == b""  # closed now
    assert len(os.listdir("/proc/self/fd")) == before - 2


def test_a_stalled_data_connection_hands_back_both_directions(pair: Pair) -> None:
    """The agent reads nothing (the data connection congested) while it sends: the
    sealing thread hands back within its stall time with what it opened and did not
    write, and with the agent's bytes it sealed and wrote, exact."""
    key = KEYS[AES128_GCM]
    tx = GCMDirection(key, IV)
    pair.agent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pump, rx = start(pair, key, rwindow=1 << 20)
    back = os.urandom(50_000)
    pair.agent.sendall(back)
    pair.user.setblocking(False)
    try:
        for _ in range(200):
            pair.user.send(data(tx, os.urandom(32768)))
    except BlockingIOError:
        pass
    state = wait_end(pump)
    assert gcmrun.REASONS[state.reason] == "congested"
    final, _left, pending, unsealed, unsent = pump.stop()
    assert pending and final.consumed == final.written + len(pending)
    user = UserReader(rx)
    pair.user.setblocking(True)
    pair.user.settimeout(5)
    wire = b""
    while len(wire) < final.uwritten:  # exactly what the thread wrote to the user
        wire += pair.user.recv(final.uwritten - len(wire))
    user.feed(wire + unsent)
    assert user.buf == b"" and len(user.data) == final.sealed
    assert user.data + unsealed == back[: len(user.data) + len(unsealed)]


def test_a_module_built_from_older_sources_keeps_the_python_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gcmrun.native_enabled: a stale in-place build (a module without the sealing
    thread's entry point) takes the Python path instead of failing when a session arms."""
    from relay.datapath import _splice

    class Stale:
        """The module's lib as an older build had it: everything but lr_gpump_seal."""

        def __getattr__(self, name: str) -> object:
            if name == "lr_gpump_seal":
                raise AttributeError(name)
            return getattr(_splice.lib, name)

    monkeypatch.setattr(_splice, "lib", Stale())
    assert not gcmrun.native_enabled()
