"""AES-GCM framing of :mod:`relay.ssh.aead`, against ``cryptography``'s AESGCM directly.

Known-answer tests build or open packets by hand from RFC 5647 / OpenSSH's
PROTOCOL rules (clear length as AAD, nonce = fixed IV part + 64-bit counter,
padding to 16, 16-byte tag) and compare with what the mixin sends or accepts.
A full Conch client and server, both with the mixin, then negotiate GCM over an
in-memory connection, exchange packets, rekey, and fall back to AES-CTR.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh import common
from twisted.conch.ssh.transport import (
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MSG_IGNORE,
    SSHCiphers,
)
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from relay.ssh.aead import AEADTransportMixin
from relay.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    MSG_CHANNEL_DATA,
    GCMDirection,
    PacketCiphers,
    gcm_padding,
)
from relay.testing import BareSSHTransport as Bare
from relay.testing import (
    IgnoreRecorder,
    PlainSSHServer,
    connect_in_memory,
    ssh_server,
)
from relay.testing import TrustingSSHClient as Client

KEY16 = bytes(range(16))
KEY32 = bytes(range(100, 132))
IV = bytes.fromhex("000102030405060708090a0b") + b"extra key material ignored"
IV_IN = bytes.fromhex("a0a1a2a3ffffffffffffffff")  # counter wraps after one packet


def gcm_transport(cipher: bytes = AES128_GCM, key: bytes = KEY16) -> Bare:
    t = Bare()
    t.transport = StringTransport()
    t.gotVersion = True
    enc = PacketCiphers(cipher, cipher, b"hmac-sha2-256", b"hmac-sha2-256")
    enc.setKeys(IV, key + b"unused", IV_IN, key + b"unused", b"", b"")
    t.currentEncryptions = enc
    t._padding = lambda n: b"\x00" * n  # type: ignore[method-assign]
    return t


def seal(key: bytes, nonce: bytes, msg: int, payload: bytes, pad: int | None = None) -> bytes:
    """One packet the way OpenSSH builds it (zero padding, so it is reproducible)."""
    if pad is None:
        pad = 16 - (2 + len(payload)) % 16
        pad += 16 if pad < 4 else 0
    plain = bytes((pad, msg)) + payload + b"\x00" * pad
    length = struct.pack(">L", len(plain))
    return length + AESGCM(key).encrypt(nonce, plain, length)


def open_packet(key: bytes, nonce: bytes, wire: bytes) -> tuple[int, int, bytes, bytes]:
    """(packet_length, message number, payload, padding) of one sealed packet."""
    (length,) = struct.unpack(">L", wire[:4])
    assert len(wire) == 4 + length + 16
    plain = AESGCM(key).decrypt(nonce, wire[4:], wire[:4])
    pad = plain[0]
    return length, plain[1], plain[2 : length - pad], plain[length - pad :]


def nonce(iv: bytes, k: int) -> bytes:
    fixed, counter = struct.unpack(">LQ", iv[:12])
    return struct.pack(">LQ", fixed, (counter + k) % 2**64)


# -- framing, known answers


def test_padding_rule() -> None:
    for n in range(1, 200):
        pad = gcm_padding(n)
        assert 4 <= pad < 4 + 16 and (1 + n + pad) % 16 == 0


@pytest.mark.parametrize(("cipher", "key"), [(AES128_GCM, KEY16), (AES256_GCM, KEY32)])
def test_sent_packets_open_with_aesgcm_and_nonce_increments(cipher: bytes, key: bytes) -> None:
    t = gcm_transport(cipher, key)
    payloads = [b"", b"x", b"hello" * 3, bytes(range(256)) * 130]
    for p in payloads:
        t.sendPacket(MSG_IGNORE, p)
    wire = t.transport.value()
    for k, p in enumerate(payloads):
        (length,) = struct.unpack(">L", wire[:4])
        packet, wire = wire[: 4 + length + 16], wire[4 + length + 16 :]
        got_len, msg, payload, padding = open_packet(key, nonce(IV, k), packet)
        assert (msg, payload) == (MSG_IGNORE, p)
        assert got_len % 16 == 0 and 4 <= len(padding) < 20
        # The exact bytes OpenSSH would send for this packet with this padding.
        assert packet == seal(key, nonce(IV, k), MSG_IGNORE, p, pad=len(padding))
    assert wire == b""
    assert t.outgoingPacketSequence == len(payloads)


def test_known_answer_vector() -> None:
    """A fixed vector: one IGNORE packet, key 00..0f, IV 00..0b, zero padding."""
    t = gcm_transport()
    t.sendPacket(MSG_IGNORE, b"labrelay")
    assert t.transport.value().hex() == seal(KEY16, IV[:12], MSG_IGNORE, b"labrelay").hex()
    assert t.transport.value()[:4] == b"\x00\x00\x00\x10"  # 1 + 1 + 8 + 6 padding


def test_channel_data_same_bytes_as_send_packet() -> None:
    a, b, c = gcm_transport(), gcm_transport(), gcm_transport()
    data = bytes(range(200)) * 7
    a.sendChannelData(7, data)
    b.sendPacket(MSG_CHANNEL_DATA, struct.pack(">2L", 7, len(data)) + data)
    c.sendChannelData(7, memoryview(b"xx" + data)[2:])  # any bytes-like: no copy needed
    assert a.transport.value() == b.transport.value() == c.transport.value()


def test_received_packets_from_aesgcm_are_dispatched() -> None:
    t = gcm_transport()
    wire = b"".join(seal(KEY16, nonce(IV_IN, k), 90 + k, bytes([k]) * (k * 1000)) for k in range(5))
    # byte by byte, then all at once: the framing does not depend on read sizes
    for i in range(len(wire)):
        t.dataReceived(wire[i : i + 1])
    assert t.dispatched == [(90 + k, bytes([k]) * (k * 1000)) for k in range(5)]
    assert t.incomingPacketSequence == 5
    assert t.disconnects == []
    t2 = gcm_transport()
    t2.dataReceived(wire)
    assert t2.dispatched == t.dispatched


@pytest.mark.parametrize("cipher", [AES128_GCM, b"aes128-ctr"])
def test_any_read_sizes(cipher: bytes) -> None:
    """Packets split at random points across reads (some reads holding many
    packets, some a few bytes) parse the same, GCM and Conch's CTR alike."""
    rng = random.Random(5)

    def pair() -> tuple[Bare, Bare]:
        ends = []
        iv1, iv2 = IV, IV_IN + b"\x00" * 20  # CTR takes 16 bytes of IV, GCM 12
        for outIV, inIV in ((iv1, iv2), (iv2, iv1)):
            t = Bare()
            t.transport = StringTransport()
            t.gotVersion = True
            enc = PacketCiphers(cipher, cipher, b"hmac-sha2-256", b"hmac-sha2-256")
            enc.setKeys(outIV, KEY16, inIV, KEY16, b"m" * 32, b"m" * 32)
            t.currentEncryptions = enc
            ends.append(t)
        return ends[0], ends[1]

    sender, receiver = pair()
    sent = [
        (90 + k % 5, rng.randbytes(rng.choice([0, 1, 15, 16, 17, 4000, 32768]))) for k in range(300)
    ]
    for msg, payload in sent:
        sender.sendPacket(msg, payload)
    wire = sender.transport.value()
    pos = 0
    while pos < len(wire):
        n = rng.choice([1, 3, 4, 5, 17, 100, 32 * 1024, 70000, 1 << 20])
        receiver.dataReceived(wire[pos : pos + n])
        pos += n
    assert receiver.disconnects == []
    assert receiver.dispatched == sent
    assert not receiver._rbuf


def test_flow_connection_sends_channel_data_through_the_transport() -> None:
    """FlowConnection.sendData uses sendChannelData: the same bytes as Conch's path."""
    from relay.ssh.connection import FlowConnection

    class Channel:
        localClosed = False

    a, b = gcm_transport(), gcm_transport()
    conn = FlowConnection()
    conn.transport = a
    channel = Channel()
    conn.channelsToRemoteChannel[channel] = 42  # type: ignore[index]
    conn.sendData(channel, b"payload" * 1000)
    b.sendPacket(MSG_CHANNEL_DATA, struct.pack(">L", 42) + common.NS(b"payload" * 1000))
    assert a.transport.value() == b.transport.value()


def test_counter_wraps_in_its_64_bits_only() -> None:
    d = GCMDirection(KEY16, IV_IN)
    assert d.nonce() == bytes.fromhex("a0a1a2a3ffffffffffffffff")
    assert d.nonce() == bytes.fromhex("a0a1a2a30000000000000000")
    assert d.nonce() == bytes.fromhex("a0a1a2a30000000000000001")


def test_wrong_nonce_is_a_mac_error() -> None:
    t = gcm_transport()
    t.dataReceived(seal(KEY16, nonce(IV_IN, 1), MSG_IGNORE, b"skipped one"))
    assert t.dispatched == []
    assert t.disconnects == [(DISCONNECT_MAC_ERROR, b"bad MAC")]


@pytest.mark.parametrize("where", ["tag", "ciphertext", "length"])
def test_tampering_disconnects_with_mac_error(where: str) -> None:
    t = gcm_transport()
    good = seal(KEY16, nonce(IV_IN, 0), MSG_IGNORE, b"first")
    bad = bytearray(seal(KEY16, nonce(IV_IN, 1), MSG_IGNORE, b"second, tampered"))
    if where == "tag":
        bad[-1] ^= 1
    elif where == "ciphertext":
        bad[6] ^= 0x80
    else:  # still a multiple of 16, so it is the tag that fails
        bad[3] ^= 0x10
        bad += b"\x00" * 32
    after = seal(KEY16, nonce(IV_IN, 2), MSG_IGNORE, b"never parsed")
    t.dataReceived(good + bytes(bad) + after)
    assert t.dispatched == [(MSG_IGNORE, b"first")]
    assert t.disconnects == [(DISCONNECT_MAC_ERROR, b"bad MAC")]
    assert t.transport.disconnecting
    t.dataReceived(after)  # nothing more is parsed
    assert t.dispatched == [(MSG_IGNORE, b"first")]


@pytest.mark.parametrize(
    ("length", "why"),
    [(12, b"bad packet length 12"), (40, b"bad packet mod"), (2**21, b"bad packet length")],
)
def test_bad_lengths_are_protocol_errors(length: int, why: bytes) -> None:
    t = gcm_transport()
    t.dataReceived(struct.pack(">L", length) + b"\x00" * 64)
    assert len(t.disconnects) == 1
    assert t.disconnects[0][0] == DISCONNECT_PROTOCOL_ERROR
    assert t.disconnects[0][1].startswith(why)


def test_short_padding_is_a_protocol_error() -> None:
    t = gcm_transport()
    t.dataReceived(seal(KEY16, nonce(IV_IN, 0), MSG_IGNORE, b"x" * 12, pad=2))
    assert t.dispatched == []
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"bad padding length 2")]


def test_padding_pool_is_random_and_refilled() -> None:
    t = Bare()
    seen = b"".join(t._padding(19) for _ in range(2000))
    assert len(seen) == 38000 and len(set(seen)) > 200


# -- key setup: GCM per direction, Conch's ciphers otherwise


def test_key_lengths_and_mixed_directions() -> None:
    enc = PacketCiphers(AES256_GCM, b"aes128-ctr", b"hmac-sha2-512", b"hmac-sha2-256")
    enc.setKeys(IV, KEY32 + b"more", IV, KEY16 + b"more", b"o" * 64, b"i" * 64)
    assert enc.outGCM is not None and enc.inGCM is None
    assert enc.encBlockSize == 16 and enc.outMAC[0] is None  # implicit
    assert enc.decBlockSize == 16 and enc.verifyDigestSize == 32  # Conch's CTR + HMAC
    plain = b"p" * 32
    assert enc.outGCM.aead.encrypt(b"\x00" * 12, plain, None) == AESGCM(KEY32).encrypt(
        b"\x00" * 12, plain, None
    )


def test_conch_ciphers_untouched_when_no_gcm() -> None:
    ours = PacketCiphers(b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256")
    conch = SSHCiphers(b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256")
    for c in (ours, conch):
        c.setKeys(IV, KEY16, IV, KEY16, b"k" * 32, b"k" * 32)
    block = b"b" * 48
    assert ours.encrypt(block) == conch.encrypt(block)
    assert ours.makeMAC(5, block) == conch.makeMAC(5, block)
    assert ours.outGCM is None and ours.inGCM is None


# -- a whole Conch client and server, both with the mixin, in memory


def connected(client_ciphers: list[bytes] | None = None
              ) -> tuple[Client, PlainSSHServer, iosim.IOPump]:
    server = ssh_server()
    client = Client()
    if client_ciphers is not None:
        client.supportedCiphers = client_ciphers
    pump = connect_in_memory(server, client)
    assert client.secure
    return client, server, pump


@pytest.mark.parametrize("cipher", [AES128_GCM, AES256_GCM])
def test_conch_pair_negotiates_gcm_moves_packets_and_rekeys(cipher: bytes) -> None:
    client, server, pump = connected([cipher, b"aes128-ctr"])
    for t in (client, server):
        assert (t.currentEncryptions.outCipType, t.currentEncryptions.inCipType) == (
            cipher,
            cipher,
        )
        assert t.currentEncryptions.outGCM is not None  # type: ignore[attr-defined]
        assert t.keyExchanges == 1
    at_server, at_client = IgnoreRecorder(server), IgnoreRecorder(client)
    big = bytes(range(256)) * 1024
    for i in range(20):
        client.sendPacket(MSG_IGNORE, struct.pack(">L", len(big)) + big[: i * 997])
        server.sendPacket(MSG_IGNORE, struct.pack(">L", i) + b"s" * i)
    pump.flush()
    assert len(at_server.got) == 20 and len(at_client.got) == 20

    # Rekey (started by the client; packets queued meanwhile go out under new keys).
    client.sendKexInit()
    client.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x05queue")
    old = client.currentEncryptions
    pump.flush()
    assert client.currentEncryptions is not old
    assert client.keyExchanges == server.keyExchanges == 2
    assert at_server.got[-1] == b"\x00\x00\x00\x05queue"
    server.sendKexInit()  # and once more, started by the server
    pump.flush()
    assert client.keyExchanges == server.keyExchanges == 3
    server.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x05after")
    pump.flush()
    assert at_client.got[-1] == b"\x00\x00\x00\x05after"
    assert client.secure == 1
    assert not client.transport.disconnecting and not server.transport.disconnecting


def test_conch_pair_refuses_ctr() -> None:
    """AEAD only (relay.ssh.policy): a peer offering nothing but CTR is refused with a
    reason that says what is allowed."""
    server = ssh_server()
    said: list[bytes] = []
    server.sendDisconnect = lambda code, why: said.append(why)
    client = Client()
    client.supportedCiphers = [b"aes128-ctr"]
    connect_in_memory(server, client)
    assert not client.secure
    assert said and b"only AEAD ciphers" in said[0] and b"aes128-gcm" in said[0], said


def test_policy_is_the_offer() -> None:
    """Both transports offer the policy's lists: AEAD ciphers, ETM MAC names, no
    compression; no CBC/CTR, non-ETM MAC, SHA-1 or NIST key exchange."""
    assert AEADTransportMixin.supportedCiphers == [AES128_GCM, AES256_GCM, CHACHA20_POLY1305]
    assert AEADTransportMixin.supportedCompressions == [b"none"]
    for name in AEADTransportMixin.supportedMACs:
        assert name.endswith(b"-etm@openssh.com")
    from relay.ssh.client import LinkTransport
    from relay.ssh.server import RelayTransport

    assert LinkTransport.supportedCiphers == RelayTransport.supportedCiphers
    client, server, _pump = connected()
    assert server.supportedKeyExchanges == [
        b"mlkem768x25519-sha256", b"curve25519-sha256", b"curve25519-sha256@libssh.org",
        b"kex-strict-s-v00@openssh.com",
    ]  # fmt: skip
    assert client.supportedKeyExchanges == [
        b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"kex-strict-c-v00@openssh.com",
    ]  # fmt: skip
    assert server.supportedPublicKeys == [b"ssh-ed25519"]
    assert b"ssh-rsa" not in client.supportedPublicKeys
    assert b"ssh-dss" not in client.supportedPublicKeys
    for t in (client, server):
        assert t.kexGuard.strict and t.currentEncryptions.outCipType == AES128_GCM


def test_rekeys_by_itself_after_rekey_after_bytes() -> None:
    """Two labrelay ends rekey on their own (Conch never does): each side counts
    the bytes both ways, so both may start one at once, which SSH allows."""
    client, server, pump = connected()
    client.rekeyAfterBytes = server.rekeyAfterBytes = 100_000
    at_server, at_client = IgnoreRecorder(server), IgnoreRecorder(client)
    chunk = struct.pack(">L", 30_000) + b"c" * 30_000
    for _ in range(40):  # 1.2 MB each way, in steps the pump interleaves
        client.sendPacket(MSG_IGNORE, chunk)
        server.sendPacket(MSG_IGNORE, chunk)
        pump.flush()
    assert len(at_server.got) == len(at_client.got) == 40
    assert client.keyExchanges == server.keyExchanges
    assert 8 <= client.keyExchanges <= 40, client.keyExchanges
    assert client.secure == 1
    assert not client.transport.disconnecting and not server.transport.disconnecting


class CountingTransport(StringTransport):
    """Counts the writes the SSH transport makes (each one a send to the peer)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.writes += 1
        super().write(b"".join(seq))


def test_corked_packets_leave_in_one_write_with_the_same_bytes() -> None:
    """``corked()``: what is sealed inside leaves at the end in one write (a channel's
    announced request and its first data: one send, one wake-up of the peer), the
    same bytes in the same order with the same sequence numbers as uncorked."""
    plain, held = gcm_transport(), gcm_transport()
    plain.transport = CountingTransport()
    held.transport = CountingTransport()
    for t in (plain, held):
        t.sendPacket(MSG_IGNORE, b"before")
    with held.corked():
        held.sendPacket(MSG_IGNORE, b"the request")
        with held.corked():  # nested: the outer one writes
            held.sendChannelData(7, b"x")
        assert held.transport.writes == 1  # only the packet before the cork
    plain.sendPacket(MSG_IGNORE, b"the request")
    plain.sendChannelData(7, b"x")
    assert held.transport.writes == 2 and plain.transport.writes == 3
    assert held.transport.value() == plain.transport.value()
    assert held.outgoingPacketSequence == plain.outgoingPacketSequence == 3
    held.sendPacket(MSG_IGNORE, b"after")  # uncorked again: written at once
    assert held.transport.writes == 3


def test_a_client_reads_a_servers_lines_before_its_version_line_as_ssh_does() -> None:
    """RFC 4253 §4.2: a server may send lines before its version line.  The agent's
    link takes them as OpenSSH's client does (1024 lines, each at most 8192 bytes),
    also when they share a read with the version line and the first packet."""
    from relay.testing import FakeTCPTransport

    client = Client()
    tcp = FakeTCPTransport()
    client.makeConnection(tcp)
    client.dataReceived(b"Welcome\r\n" * 3 + b"SSH-2.0-OpenSSH_9.6\r\n")
    assert client.gotVersion and client.otherVersionString == b"SSH-2.0-OpenSSH_9.6"
    assert not tcp.disconnecting
    client = Client()
    tcp = FakeTCPTransport()
    client.makeConnection(tcp)
    sent = 0
    while not tcp.disconnecting and sent < 1100:
        client.dataReceived(b"x\n")
        sent += 1
    assert sent == 1024 and not client.gotVersion
    assert b"no SSH version line in the first 1024 lines" in tcp.value()
