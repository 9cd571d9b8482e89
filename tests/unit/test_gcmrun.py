"""The native run opener (``csrc/sshopen.c`` through :mod:`relay.ssh.gcmrun`), which the
open-and-forward thread (tests/unit/test_gcmpump.py) runs: against the Python code's own
sealing, for the same keys, nonces and sequence numbers.

The opener may only ever do what the per-packet Python path would have done, faster: it
takes whole ``CHANNEL_DATA`` packets of the one channel it is given, within the window
and maximum packet, and stops *before* anything else with the nonce counter handed back
exactly, so the per-packet code reads the next packet as if it had read the run itself.
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.exceptions import InvalidTag

from relay.ssh import gcmrun as sshopen
from relay.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    MAX_PACKET_LENGTH,
    MSG_CHANNEL_DATA,
    GCMDirection,
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
    return GCMDirection(key, IV)


def packet(tx: GCMDirection, msg: int, payload: bytes, pad: int | None = None) -> bytes:
    """One packet sealed by the Python code (``GCMDirection.seal``, random padding)."""
    pad = gcm_padding(1 + len(payload)) if pad is None else pad
    plain = bytes((pad, msg)) + payload + os.urandom(pad)
    return b"".join(tx.seal(0, plain))


def data(tx: GCMDirection, chunk: bytes, channel: int = CHANNEL) -> bytes:
    return packet(tx, MSG_CHANNEL_DATA, struct.pack(">2L", channel, len(chunk)) + chunk)


def open_all(rx: GCMDirection, wire: bytes, pos: int = 0, window: int = BIG,
             max_data: int = 1 << 20, channel: int = CHANNEL) -> tuple[sshopen.Opened, int]:
    got = sshopen.GCMRun(rx.key).open(wire, pos, rx.fixed, rx.counter, channel, window, max_data,
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


# -- the backends

def test_python_and_portable_backends_keep_the_python_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``LABRELAY_DATAPATH=python`` or ``portable``: no native opener and no native
    forwarding thread (relay.ssh.nativeforward asks ``native_enabled``), nothing changes."""
    for backend in ("python", "portable"):
        monkeypatch.setenv("LABRELAY_DATAPATH", backend)
        assert not sshopen.native_enabled()
    monkeypatch.setenv("LABRELAY_DATAPATH", "auto")
    assert sshopen.native_enabled()


def test_the_module_exports_no_libcrypto_symbol() -> None:
    """docs/fastpath.md: a bundled libcrypto is linked in with its symbols hidden (and a
    build that dlopens the host's links none), so the module can never interpose on the
    process's own libcrypto (Python's ssl and hashlib): looked up through the module's
    own handle (itself and what it links), no OpenSSL symbol resolves, while its AES-GCM
    runs on the library it names."""
    import ctypes

    from relay.datapath import _splice, _splice_c  # type: ignore[attr-defined]

    module = ctypes.CDLL(_splice_c.__file__)
    assert module.lr_gcm_available() == 1
    for name in ("EVP_CIPHER_CTX_new", "EVP_DecryptUpdate", "OpenSSL_version",
                 "OPENSSL_init_crypto"):
        with pytest.raises(AttributeError):
            getattr(module, name)
    assert _splice.aead_library().startswith("OpenSSL ")
