"""The native run opener (``csrc/sshopen.c`` through :mod:`relay.ssh.gcmrun`) and
its use by :mod:`relay.ssh.aead`: against the Python code's own sealing, for the same
keys, nonces and sequence numbers.

The opener may only ever do what the per-packet Python path would have done, faster: it
takes whole ``CHANNEL_DATA`` packets of the one channel it is given, within the window
and maximum packet, and stops *before* anything else with the nonce counter handed back
exactly, so the per-packet code reads the next packet as if it had read the run itself.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from twisted.conch.ssh import transport
from twisted.conch.ssh.transport import DISCONNECT_MAC_ERROR, DISCONNECT_PROTOCOL_ERROR
from twisted.internet.testing import StringTransport

from relay.ssh import gcmrun as sshopen
from relay.ssh.aead import AEADTransportMixin
from relay.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    MAX_PACKET_LENGTH,
    MSG_CHANNEL_DATA,
    GCMDirection,
    PacketCiphers,
    gcm_padding,
)

pytestmark = pytest.mark.skipif(
    not sshopen.native_enabled() and os.environ.get("CI") != "true",
    reason="the native module or libcrypto is not available here")

KEYS = {AES128_GCM: bytes(range(16)), AES256_GCM: bytes(range(100, 132))}
IV = bytes.fromhex("a0a1a2a3fffffffffffffffe")  # the counter wraps inside the stream
CHANNEL = 7
BIG = 1 << 40


def test_native_runs_are_on_in_ci() -> None:
    """CI builds the C module and has libcrypto: the opener must really be tested there
    (a missing one fails here instead of skipping the rest)."""
    assert sshopen.native_enabled()


def sealer(key: bytes) -> GCMDirection:
    return GCMDirection(key, IV)


def receiver(key: bytes) -> GCMDirection:
    rx = GCMDirection(key, IV, receiving=True)
    assert rx.run is not None
    return rx


def packet(tx: GCMDirection, msg: int, payload: bytes, pad: int | None = None) -> bytes:
    """One packet sealed by the Python code (``GCMDirection.seal``, random padding)."""
    pad = gcm_padding(1 + len(payload)) if pad is None else pad
    plain = bytes((pad, msg)) + payload + os.urandom(pad)
    return b"".join(tx.seal(0, plain))


def data(tx: GCMDirection, chunk: bytes, channel: int = CHANNEL) -> bytes:
    return packet(tx, MSG_CHANNEL_DATA, struct.pack(">2L", channel, len(chunk)) + chunk)


def open_all(rx: GCMDirection, wire: bytes, pos: int = 0, window: int = BIG,
             max_data: int = 1 << 20, channel: int = CHANNEL) -> tuple[sshopen.Opened, int]:
    assert rx.run is not None
    got = rx.run.open(wire, pos, rx.fixed, rx.counter, channel, window, max_data,
                      MAX_PACKET_LENGTH)
    assert got is not None
    return got


SIZES = [0, 1, 5, 6, 7, 10, 15, 16, 17, 31, 32, 33, 1000, 16384, 32768, 65536]


@pytest.mark.parametrize("cipher", [AES128_GCM, AES256_GCM])
def test_a_run_opens_exactly_what_python_sealed(cipher: bytes) -> None:
    key = KEYS[cipher]
    tx, rx = sealer(key), receiver(key)
    chunks = [os.urandom(n) for n in SIZES]
    wire = b"".join(data(tx, c) for c in chunks)
    opened, counter = open_all(rx, wire)
    assert opened.packets == len(chunks) and opened.consumed == len(wire)
    assert bytes(opened.data) == b"".join(chunks)
    assert counter == tx.counter  # the nonce counter handed back, wrapped in 64 bits
    assert counter == (int.from_bytes(IV[4:12], "big") + len(chunks)) % 2**64


@pytest.mark.parametrize("stop", ["window-adjust", "kexinit", "other-channel", "window",
                                  "max-data", "tag", "padding", "trailing", "length"])
def test_a_run_stops_before_a_packet_it_does_not_take(stop: str) -> None:
    """Whatever the reason, the run ends before that packet, and the counter it hands
    back opens that packet with the Python code (so nothing is skipped or re-used)."""
    key = KEYS[AES128_GCM]
    tx, rx = sealer(key), receiver(key)
    head = [os.urandom(n) for n in (100, 32768, 5)]
    wire = b"".join(data(tx, c) for c in head)
    window, max_data = BIG, 1 << 20
    odd = os.urandom(64)
    if stop == "window-adjust":
        wire += packet(tx, 93, struct.pack(">2L", CHANNEL, 1 << 20))
    elif stop == "kexinit":
        wire += packet(tx, 20, os.urandom(200))
    elif stop == "other-channel":
        wire += data(tx, odd, channel=CHANNEL + 1)
    elif stop == "window":
        window = sum(map(len, head)) + len(odd) - 1
        wire += data(tx, odd)
    elif stop == "max-data":
        max_data = 32768
        wire += data(tx, os.urandom(max_data + 1))
    elif stop == "tag":
        bad = bytearray(data(tx, odd))
        bad[-1] ^= 1
        wire += bytes(bad)
    elif stop == "padding":  # fewer than 4 bytes of padding: the Python code refuses it
        wire += packet(tx, MSG_CHANNEL_DATA, struct.pack(">2L", CHANNEL, 12) + odd[:12], pad=2)
    elif stop == "trailing":  # the data length is shorter than the message
        wire += packet(tx, MSG_CHANNEL_DATA, struct.pack(">2L", CHANNEL, 10) + odd)
    elif stop == "length":  # a packet_length that is not a multiple of 16
        wire += struct.pack(">L", 40) + os.urandom(56)
    stopped_at = len(wire) - (60 if stop == "length" else 0)
    wire += data(tx, b"after")
    opened, counter = open_all(rx, wire, window=window, max_data=max_data)
    assert opened.packets == len(head) and bytes(opened.data) == b"".join(head)
    rest = wire[opened.consumed:]
    if stop == "length":
        assert opened.consumed == stopped_at
        return
    # The packet it stopped at opens with the Python code at the handed-back counter
    # (all but the tampered one, which fails there too).
    rx.counter = counter
    (length,) = struct.unpack(">L", rest[:4])
    sealed = rest[4 : 4 + length + 16]
    if stop == "tag":
        with pytest.raises(InvalidTag):
            rx.aead.decrypt(rx.nonce(), sealed, rest[:4])
        return
    plain = rx.aead.decrypt(rx.nonce(), sealed, rest[:4])
    assert plain[1] in (93, 20, MSG_CHANNEL_DATA)


def test_incomplete_packets_are_left_whole() -> None:
    """Cut at every byte of the last packet: the run takes the whole ones only."""
    key = KEYS[AES128_GCM]
    tx, rx = sealer(key), receiver(key)
    first, last = data(tx, b"a" * 40), data(tx, b"b" * 40)
    for cut in range(len(last)):
        opened, counter = open_all(rx, first + last[:cut])
        assert (opened.packets, opened.consumed, bytes(opened.data)) == (1, len(first), b"a" * 40)
        assert counter == rx.counter + 1


# -- in the transport: runs and the per-packet path interleaved, at every split


class Runs:
    """What ``FlowConnection`` offers the transport (``runTarget``/``runData``), with
    the per-packet handler, recording everything in arrival order."""

    def __init__(self, window: int = BIG) -> None:
        self.window = window
        self.got: list[tuple[str, bytes]] = []
        self.known = False  # like FlowConnection: a run target only after one packet

    def runTarget(self) -> tuple[int, int, int] | None:
        return (CHANNEL, self.window, 1 << 20) if self.known else None

    def runData(self, channel: int, view: memoryview) -> None:
        assert channel == CHANNEL
        self.window -= len(view)
        self.got.append(("run", bytes(view)))

    def packet(self, payload: Any) -> None:
        (channel, n) = struct.unpack(">2L", bytes(payload[:8]))
        self.known = channel == CHANNEL
        self.window -= n
        self.got.append(("packet", bytes(payload[8 : 8 + n])))


class Bare(AEADTransportMixin, transport.SSHTransportBase):
    def __init__(self) -> None:
        self.dispatched: list[tuple[int, bytes]] = []
        self.disconnects: list[tuple[int, bytes]] = []

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        self.dispatched.append((messageNum, payload))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self.disconnects.append((reason, desc))
        super().sendDisconnect(reason, desc)


def receiving_transport(runs: Runs, native: bool = True) -> Bare:
    t = Bare()
    t.transport = StringTransport()
    t.gotVersion = True
    enc = PacketCiphers(AES128_GCM, AES128_GCM, b"hmac-sha2-256", b"hmac-sha2-256")
    enc.setKeys(IV, KEYS[AES128_GCM], IV, KEYS[AES128_GCM], b"", b"")
    if not native:
        assert isinstance(enc.inAEAD, GCMDirection)
        enc.inAEAD.run = None
    t.currentEncryptions = enc
    t.channelDataHandler = runs.packet
    t.channelRuns = runs
    return t


def stream(tx: GCMDirection) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
    """Channel data with a window adjust and an IGNORE in the middle."""
    chunks = [os.urandom(n) for n in (0, 7, 300, 17, 2000, 33)]
    wire = b"".join(data(tx, c) for c in chunks[:3])
    others = [(93, struct.pack(">2L", CHANNEL, 4096)), (2, b"\x00\x00\x00\x03abc")]
    wire += b"".join(packet(tx, m, p) for m, p in others)
    wire += b"".join(data(tx, c) for c in chunks[3:])
    return wire, b"".join(chunks), others


def test_every_split_of_the_stream_delivers_the_same() -> None:
    """Two reads, split at every byte: the channel's bytes, in order, the other
    messages dispatched, the sequence number and counter as the Python path leaves
    them, and some of it opened in runs."""
    tx = sealer(KEYS[AES128_GCM])
    wire, expect, others = stream(tx)
    ran = 0
    for cut in range(len(wire) + 1):
        runs = Runs()
        t = receiving_transport(runs)
        t.dataReceived(wire[:cut])
        t.dataReceived(wire[cut:])
        assert t.disconnects == []
        assert b"".join(d for _, d in runs.got) == expect, cut
        assert t.dispatched == others
        assert t.incomingPacketSequence == 8
        gcm = t.currentEncryptions.inAEAD
        assert isinstance(gcm, GCMDirection) and gcm.counter == tx.counter
        ran += any(kind == "run" for kind, _ in runs.got)
    assert ran > len(wire) // 2


def test_random_reads_match_the_python_path() -> None:
    rng = random.Random(13)
    tx = sealer(KEYS[AES128_GCM])
    chunks = [rng.randbytes(rng.choice([0, 1, 16, 1000, 16384, 32768])) for _ in range(200)]
    wire = b"".join(data(tx, c) for c in chunks)
    results = []
    for native in (True, False):
        runs = Runs()
        t = receiving_transport(runs, native)
        pos = 0
        while pos < len(wire):
            n = rng.choice([1, 5, 100, 4096, 70000, 1 << 20])
            t.dataReceived(wire[pos : pos + n])
            pos += n
        assert t.disconnects == []
        results.append((b"".join(d for _, d in runs.got), t.incomingPacketSequence))
        if native:
            assert sum(kind == "run" for kind, _ in runs.got) >= 5
        else:
            assert all(kind == "packet" for kind, _ in runs.got)
    assert results[0] == results[1] == (b"".join(chunks), 200)


def test_a_run_keeps_within_the_window_and_the_rest_goes_per_packet() -> None:
    """Past the window, the per-packet path sees the packet (FlowConnection closes the
    channel there); the run never delivers a byte beyond it."""
    tx = sealer(KEYS[AES128_GCM])
    wire = b"".join(data(tx, bytes([k]) * 1000) for k in range(6))
    runs = Runs(window=3500)
    t = receiving_transport(runs)
    t.dataReceived(wire)
    kinds = [(kind, len(d)) for kind, d in runs.got]
    assert kinds[0] == ("packet", 1000)
    assert ("run", 2000) in kinds  # packets 2 and 3; the 4th would pass the window
    delivered_by_runs = sum(n for kind, n in kinds if kind == "run")
    assert delivered_by_runs <= 3500 - 1000


@pytest.mark.parametrize("where", ["tag", "length"])
def test_bad_packets_after_a_run_are_refused_by_the_python_path(where: str) -> None:
    tx = sealer(KEYS[AES128_GCM])
    wire = b"".join(data(tx, b"x" * 100) for _ in range(3))
    if where == "tag":
        bad = bytearray(data(tx, b"y" * 100))
        bad[30] ^= 1
        wire += bytes(bad)
        expect = DISCONNECT_MAC_ERROR
    else:
        wire += struct.pack(">L", 40) + bytes(56)
        expect = DISCONNECT_PROTOCOL_ERROR
    runs = Runs()
    t = receiving_transport(runs)
    t.dataReceived(wire)
    assert b"".join(d for _, d in runs.got) == b"x" * 300
    assert [reason for reason, _ in t.disconnects] == [expect]


def test_python_and_portable_backends_keep_the_python_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``LABRELAY_DATAPATH=python`` or ``portable``: no native opener, nothing changes."""
    for backend in ("python", "portable"):
        monkeypatch.setenv("LABRELAY_DATAPATH", backend)
        assert not sshopen.native_enabled()
        assert GCMDirection(KEYS[AES128_GCM], IV, receiving=True).run is None
    monkeypatch.setenv("LABRELAY_DATAPATH", "auto")
    assert GCMDirection(KEYS[AES128_GCM], IV, receiving=True).run is not None
    assert GCMDirection(KEYS[AES128_GCM], IV).run is None  # sending: never
