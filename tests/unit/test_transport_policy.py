"""The SSH algorithm policy, chacha20-poly1305 framing, strict KEX and the key exchange
bounds of :mod:`relay.ssh.policy` and :mod:`relay.ssh.aead`, with Conch transports in
memory (``iosim``) and ``task.Clock``.

chacha20-poly1305 is checked against asyncssh's implementation (an independent one,
also built on ``cryptography``); interoperation with OpenSSH and Dropbear is in
tests/security/test_transport.py.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from asyncssh.crypto.chacha import ChachaCipher
from twisted.conch.ssh.transport import MSG_IGNORE, MSG_KEXINIT, MSG_NEWKEYS
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from relay.ssh import kex, policy
from relay.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    ChaChaDirection,
    PacketCiphers,
    chacha_padding,
)
from relay.ssh.connection import LINK_BUFFER, FlowConnection
from relay.testing import BareSSHTransport as Bare
from relay.testing import IgnoreRecorder, connect_in_memory, ssh_server
from relay.testing import PlainSSHServer as Server
from relay.testing import TrustingSSHClient as Client

KEY64 = bytes(range(64))


def asyncssh_seal(key: bytes, seqnr: int, plain: bytes) -> bytes:
    """The packet asyncssh's chacha20-poly1305 makes of ``plain`` at ``seqnr``."""
    sealed, tag = ChachaCipher(key).encrypt_and_sign(
        struct.pack(">L", len(plain)), plain, struct.pack(">Q", seqnr)
    )
    return sealed + tag


# -- chacha20-poly1305 against asyncssh


@pytest.mark.parametrize("seqnr", [0, 1, 7, 0xFFFFFFFF])
@pytest.mark.parametrize("size", [8, 16, 64, 4096, 32 * 1024 + 8])
def test_chacha_seal_is_asyncssh_byte_for_byte(seqnr: int, size: int) -> None:
    rng = random.Random(seqnr * 1000 + size)
    key = rng.randbytes(64)
    plain = rng.randbytes(size)
    ours = b"".join(ChaChaDirection(key).seal(seqnr, plain))
    assert ours == asyncssh_seal(key, seqnr, plain)


def test_chacha_opens_what_asyncssh_sealed_and_refuses_tampering() -> None:
    key, seqnr = os.urandom(64), 42
    plain = os.urandom(1000)
    wire = asyncssh_seal(key, seqnr, plain)
    d = ChaChaDirection(key)
    assert d.length(seqnr, wire[:4]) == len(plain)
    view = memoryview(wire)
    assert d.open(seqnr, view[:-16], view[-16:]) == plain
    assert d.open(seqnr + 1, view[:-16], view[-16:]) is None  # another nonce
    for at in (0, 3, 4, 500, len(wire) - 17, len(wire) - 1):
        bad = bytearray(wire)
        bad[at] ^= 1
        v = memoryview(bytes(bad))
        assert d.open(seqnr, v[:-16], v[-16:]) is None, at
    # The first 32 bytes of key are the main key; the last 32 only the length's.
    assert ChaChaDirection(key[:32] + bytes(32)).open(seqnr, view[:-16], view[-16:]) == plain


def test_chacha_padding_rule() -> None:
    for n in range(1, 100):
        pad = chacha_padding(n)
        assert 4 <= pad < 12 and (1 + n + pad) % 8 == 0


def chacha_pair() -> tuple[Bare, Bare]:
    ends = []
    for outKey, inKey in ((KEY64, KEY64[::-1]), (KEY64[::-1], KEY64)):
        t = Bare()
        t.transport = StringTransport()
        t.gotVersion = True
        enc = PacketCiphers(CHACHA20_POLY1305, CHACHA20_POLY1305, b"x", b"x")
        enc.setKeys(b"", outKey, b"", inKey, b"", b"")
        t.currentEncryptions = enc
        ends.append(t)
    return ends[0], ends[1]


def test_chacha_transport_packets_in_any_read_sizes() -> None:
    """The sequence number is the nonce: packets sent at seqnr 5.. open at 5..; split
    at random points across reads they parse the same."""
    sender, receiver = chacha_pair()
    sender.outgoingPacketSequence = receiver.incomingPacketSequence = 5
    rng = random.Random(3)
    sent = [
        (90 + k % 5, rng.randbytes(rng.choice([0, 1, 7, 8, 9, 4000, 32768]))) for k in range(200)
    ]
    for msg, payload in sent:
        sender.sendPacket(msg, payload)
    sender.sendChannelData(9, b"via sendChannelData")
    wire = sender.transport.value()
    # The first packet is what asyncssh makes of the same plaintext at seqnr 5.
    first = ChaChaDirection(KEY64)
    length = first.length(5, wire[:4])
    assert wire[: 4 + length + 16] == asyncssh_seal(
        KEY64,
        5,
        first.open(5, memoryview(wire)[: 4 + length], memoryview(wire)[4 + length :][:16]) or b"",
    )
    pos = 0
    while pos < len(wire):
        n = rng.choice([1, 3, 4, 5, 17, 100, 32 * 1024, 70000])
        receiver.dataReceived(wire[pos : pos + n])
        pos += n
    assert receiver.disconnects == []
    assert receiver.dispatched[:-1] == sent
    assert receiver.dispatched[-1] == (94, struct.pack(">2L", 9, 19) + b"via sendChannelData")
    assert receiver.incomingPacketSequence == 5 + 201


@pytest.mark.parametrize(
    ("length", "why"),
    [(4, b"bad packet length 4"), (1048577 + 7, b"bad packet length"), (20, b"bad packet mod")],
)
def test_chacha_bad_lengths_are_protocol_errors(length: int, why: bytes) -> None:
    _, receiver = chacha_pair()
    header = ChaChaDirection(KEY64)._stream(KEY64[32:], 0).update(struct.pack(">L", length))
    receiver.dataReceived(header + bytes(40))
    assert receiver.disconnects and receiver.disconnects[0][0] == 2
    assert receiver.disconnects[0][1].startswith(why), receiver.disconnects


def test_chacha_wrong_sequence_number_is_a_mac_error() -> None:
    sender, receiver = chacha_pair()
    sender.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x01x")
    receiver.incomingPacketSequence = 1
    receiver.dataReceived(sender.transport.value() + bytes(64))
    # The length decrypts to garbage (bad length) or, if plausible, the tag fails.
    assert receiver.disconnects[0][0] in (2, 5), receiver.disconnects  # PROTOCOL, MAC
    assert receiver.dispatched == []
    sender, receiver = chacha_pair()
    sender.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x01x")
    wire = bytearray(sender.transport.value())
    wire[-1] ^= 0x80
    receiver.dataReceived(bytes(wire))
    assert receiver.disconnects == [(5, b"bad MAC")] and receiver.dispatched == []


# -- Conch pairs in memory


class NonStrictClient(Client):
    """A client that does not offer strict KEX (the Terrapin-vulnerable kind)."""

    def connectionMade(self) -> None:
        super().connectionMade()

    def sendKexInit(self) -> None:
        self.supportedKeyExchanges = [
            k for k in self.supportedKeyExchanges if k != policy.STRICT_KEX_CLIENT
        ]
        super().sendKexInit()


class Service:
    """Stands in for the ssh-connection service: records backlog signals."""

    name = b"ssh-connection"

    def __init__(self) -> None:
        self.backlog: list[bool] = []

    def keyExchangeBacklog(self, full: bool) -> None:
        self.backlog.append(full)

    def serviceStarted(self) -> None:
        pass

    def serviceStopped(self) -> None:
        pass

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        pass


def make_server(clock: task.Clock | None = None, wait: float = 0.0) -> Server:
    server: Server = ssh_server()
    server.kexClock = clock
    server.kexInitWait = wait
    return server


def pair(
    client: Client | None = None, server: Server | None = None, ciphers: list[bytes] | None = None
) -> tuple[Client, Server, iosim.IOPump]:
    server = server or make_server()
    client = client or Client()
    if ciphers is not None:
        client.supportedCiphers = ciphers
    return client, server, connect_in_memory(server, client)


def test_conch_pair_on_chacha_with_strict_kex_moves_packets_across_rekeys() -> None:
    client, server, pump = pair(ciphers=[CHACHA20_POLY1305])
    assert client.secure == 1
    for t in (client, server):
        assert t.kexGuard.strict
        assert t.currentEncryptions.outCipType == CHACHA20_POLY1305
        assert isinstance(t.currentEncryptions.outAEAD, ChaChaDirection)  # type: ignore[attr-defined]
    at_server, at_client = IgnoreRecorder(server), IgnoreRecorder(client)
    for rekey in range(3):
        for i in range(20):
            client.sendPacket(MSG_IGNORE, struct.pack(">L", i) + b"c" * i)
            server.sendPacket(MSG_IGNORE, struct.pack(">L", i) + b"s" * i)
        (client if rekey % 2 else server).sendKexInit()
        client.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x06queued")
        pump.flush()
    assert len(at_server.got) == 63 and len(at_client.got) == 60
    assert client.keyExchanges == server.keyExchanges == 4
    assert not client.transport.disconnecting and not server.transport.disconnecting


def test_chacha_without_strict_kex_is_refused() -> None:
    server = make_server()
    said: list[bytes] = []
    server.sendDisconnect = lambda code, why: said.append(why)  # type: ignore[method-assign]
    client, _, _ = pair(client=NonStrictClient(), server=server, ciphers=[CHACHA20_POLY1305])
    assert not client.secure
    assert said and b"needs strict key exchange" in said[0] and b"CVE-2023-48795" in said[0]



def test_a_compressor_set_anyhow_disconnects_at_newkeys() -> None:
    """docs/security.md: the relay "disconnects if a compressor were ever set".  No peer
    can get one set (the policy refuses any KEXINIT asking for zlib, the test above),
    so this stands in for a future Conch or policy change that let one through: the
    negotiated types are forced to zlib after the relay's KEXINIT checks; at NEWKEYS,
    where Conch builds its compressors, the relay disconnects before any packet is
    inflated.  Fails if the check after Conch's _newKeys goes."""
    server = make_server()
    said: list[bytes] = []
    server.sendDisconnect = lambda code, why: said.append(why)  # type: ignore[method-assign]
    checked = server.ssh_KEXINIT

    def widened(packet: bytes) -> None:
        checked(packet)
        server.outgoingCompressionType = server.incomingCompressionType = b"zlib"

    server.ssh_KEXINIT = widened  # type: ignore[method-assign]
    pair(server=server)
    assert server.incomingCompression is not None  # Conch did build its inflater
    assert said == [b"compression is not supported"], said
    assert server.keyExchanges == 0  # the keys were never taken as in force


def test_gcm_without_strict_kex_is_allowed_and_sequence_numbers_run_on() -> None:
    """AES-GCM is not open to Terrapin: a peer without strict KEX keeps it; then the
    sequence numbers are not reset at NEWKEYS (RFC 4253)."""
    client, server, _ = pair(client=NonStrictClient())
    assert client.secure == 1 and not server.kexGuard.strict
    assert server.currentEncryptions.outCipType == AES128_GCM
    _, strict, _ = pair()
    assert strict.kexGuard.strict
    # KEXINIT, ECDH init and NEWKEYS are counted on, not forgotten at NEWKEYS
    assert server.incomingPacketSequence == strict.incomingPacketSequence + 3
    assert server.outgoingPacketSequence == strict.outgoingPacketSequence + 3


def test_strict_kex_restarts_sequence_numbers_at_each_newkeys() -> None:
    client, server, pump = pair()
    seen: list[tuple[str, int, int]] = []
    for name, t in (("client", client), ("server", server)):
        send = t.sendPacket

        def recording(
            msg: int, payload: bytes, send: Any = send, name: str = name, t: Any = t
        ) -> None:
            send(msg, payload)
            if msg == MSG_NEWKEYS:
                seen.append((name, t.outgoingPacketSequence, t.incomingPacketSequence))

        t.sendPacket = recording  # type: ignore[method-assign]
    client.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x00")
    client.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x00")
    pump.flush()
    before = server.incomingPacketSequence
    client.sendKexInit()
    pump.flush()
    assert [s[:2] for s in seen] == [("server", 0), ("client", 0)] or [s[:2] for s in seen] == [
        ("client", 0),
        ("server", 0),
    ]
    assert before >= 2
    # after the rekey each side counts from 0 again (nothing sent since but NEWKEYS)
    assert client.outgoingPacketSequence == server.incomingPacketSequence == 0
    assert server.outgoingPacketSequence == client.incomingPacketSequence == 0
    at_server = IgnoreRecorder(server)
    client.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x01z")
    pump.flush()
    assert at_server.got == [b"\x00\x00\x00\x01z"] and server.incomingPacketSequence == 1


def test_server_waits_for_the_client_kexinit_and_keeps_gcm_clients_off_chacha() -> None:
    clock = task.Clock()
    client, server, _ = pair(server=make_server(clock, wait=1.0),
                             ciphers=[CHACHA20_POLY1305, AES128_GCM])  # fmt: skip
    offer = policy.KexInit.parse(server.ourKexInitPayload[1:])
    assert CHACHA20_POLY1305 not in offer.ciphers_sc, offer
    assert server.currentEncryptions.outCipType == AES128_GCM and client.secure == 1

    client, server, _ = pair(server=make_server(clock, wait=1.0), ciphers=[CHACHA20_POLY1305])
    offer = policy.KexInit.parse(server.ourKexInitPayload[1:])
    assert CHACHA20_POLY1305 in offer.ciphers_sc
    assert server.currentEncryptions.outCipType == CHACHA20_POLY1305 and client.secure == 1


def test_server_sends_its_kexinit_after_the_wait_to_a_client_that_waits_too() -> None:
    clock = task.Clock()
    server = make_server(clock, wait=1.0)
    server.makeConnection(StringTransport())
    assert server.transport.value().count(b"\r\n") == 1  # the version line only
    clock.advance(1.0)
    wire = server.transport.value()
    assert b"chacha20-poly1305@openssh.com" in wire and b"kex-strict-s-v00" in wire


# -- the guard before the first NEWKEYS


def test_guard_rules() -> None:
    g = policy.KexGuard(is_client=False)
    assert g.check(MSG_IGNORE) is None  # strictness unknown yet
    assert g.kexinit_received([b"curve25519-sha256", policy.STRICT_KEX_CLIENT], 1) is not None
    g = policy.KexGuard(is_client=False)
    assert g.kexinit_received([b"curve25519-sha256", policy.STRICT_KEX_CLIENT], 0) is None
    assert g.strict
    for allowed in (1, 20, 21, 30, 31, 49):
        assert g.check(allowed) is None, allowed
    for refused in (2, 3, 4, 5, 6, 7, 50, 80, 94):
        assert g.check(refused) is not None, refused
    g.newkeys_received()
    assert all(g.check(m) is None for m in (2, 5, 50, 94))
    assert g.kexinit_received([], 7) is None and g.strict  # later KEXINITs do not count
    g = policy.KexGuard(is_client=True)
    assert g.kexinit_received([policy.STRICT_KEX_CLIENT], 0) is None
    assert not g.strict  # a client needs the server's marker
    assert g.check(MSG_IGNORE) is None and g.check(5) is not None


def test_strict_peer_sending_ignore_during_the_initial_kex_is_dropped() -> None:
    server = make_server()
    said: list[bytes] = []
    server.sendDisconnect = lambda code, why: said.append(why)  # type: ignore[method-assign]

    class Noisy(Client):
        def ssh_KEXINIT(self, packet: bytes) -> None:
            super().ssh_KEXINIT(packet)
            self.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x00")  # before NEWKEYS

    pair(client=Noisy(), server=server)
    assert said and b"strict KEX violation: message 2" in said[0], said
    assert server._readDead  # nothing after it is parsed


def test_kexinit_not_first_under_strict_kex_is_dropped() -> None:
    server = make_server()
    said: list[bytes] = []
    server.sendDisconnect = lambda code, why: said.append(why)  # type: ignore[method-assign]

    class Early(Client):
        def sendKexInit(self) -> None:
            if self.sessionID is None and not getattr(self, "_sentEarly", False):
                self._sentEarly = True
                self.sendPacket(MSG_IGNORE, b"\x00\x00\x00\x00")  # packet 0
            super().sendKexInit()

    pair(client=Early(), server=server)
    assert said and b"KEXINIT was packet 1, not the first" in said[0], said


def test_service_request_before_keys_is_refused_even_without_strict_kex() -> None:
    server = make_server()
    server.makeConnection(StringTransport())
    said: list[bytes] = []
    server.sendDisconnect = lambda code, why: said.append(why)  # type: ignore[method-assign]
    server.dataReceived(b"SSH-2.0-test\r\n")
    server.dispatchMessage(5, b"\x00\x00\x00\x0cssh-userauth")
    assert said == [b"message 5 before the first key exchange completed"]


# -- key exchange bounds: queue as congestion, timeout


def test_queue_during_a_key_exchange_is_link_congestion_and_is_bounded_in_time() -> None:
    clock = task.Clock()
    client, server, pump = pair(server=make_server(clock))
    server.kexTimeout = 5.0
    service = Service()
    server.service = service
    server.sendKexInit()  # a rekey the client does not answer yet (not pumped)
    chunk = b"\x00\x00\x00\x01" + bytes(32 * 1024)
    for _ in range(LINK_BUFFER // len(chunk) + 2):
        server.sendPacket(94, chunk)
    assert service.backlog == [True]  # said once, past LINK_BUFFER
    at_client: list[bytes] = []
    client.ssh_IGNORE = lambda p: at_client.append(p)  # type: ignore[method-assign]
    pump.flush()  # the exchange finishes: queue sent, congestion over
    assert service.backlog == [True, False] and server.keyExchanges == 2
    clock.advance(10)
    assert not server.transport.disconnecting  # the timer went with the exchange

    server.sendKexInit()
    clock.advance(4.9)
    assert not server.transport.disconnecting
    clock.advance(0.2)
    assert server.transport.disconnecting  # dropped (and aborted)


def test_queue_past_the_hard_limit_drops_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kex, "KEX_BACKLOG_LIMIT", 1 << 20)
    _, server, _ = pair()
    server.service = Service()
    server.sendKexInit()
    for _ in range(100):  # small answers a peer could provoke (1 + overhead each)
        server.sendPacket(82, b"")
    assert not server.transport.disconnecting
    for _ in range(40):
        server.sendPacket(94, bytes(32 * 1024))
    assert server.transport.disconnecting
    assert server._blockedByKeyExchange == []


def test_flow_connection_is_congested_while_either_buffer_is_full() -> None:
    """Congested (what channels send waits in the scheduler) while the TCP buffer or
    the key exchange's queue is full; what waits leaves once both cleared."""
    sent: list[bytes] = []

    class Transport:
        def sendChannelData(self, remote: int, data: bytes) -> None:
            sent.append(data)

    class Channel:
        localClosed = False
        shareUser = "alice"

    conn = FlowConnection()
    conn.transport = Transport()
    channel = Channel()
    conn.channelsToRemoteChannel[channel] = 7
    conn.pauseProducing()
    conn.keyExchangeBacklog(True)
    conn.resumeProducing()
    assert conn.congested
    conn.sendData(channel, b"x")
    assert sent == [] and conn.scheduler.queued(channel) == 1
    conn.keyExchangeBacklog(False)
    assert not conn.congested and sent == [b"x"]
    conn.sendData(channel, b"y")
    assert sent == [b"x", b"y"]


# -- the policy's lists


def test_host_key_algorithms() -> None:
    assert policy.server_host_key_algorithms(
        [b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa", b"ssh-ed25519", b"ecdsa-sha2-nistp256"]
    ) == [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"]
    assert policy.client_host_key_algorithms()[0] == b"ssh-ed25519"
    known = policy.client_host_key_algorithms(["ecdsa-sha2-nistp256", "ssh-rsa", "ssh-dss"])
    assert known[:3] == [b"ecdsa-sha2-nistp256", b"rsa-sha2-512", b"rsa-sha2-256"]
    assert b"ssh-rsa" not in known and b"ssh-dss" not in known
    assert sorted(known) == sorted(policy.CLIENT_HOST_KEY_ALGORITHMS)


def kexinit(
    kex: list[bytes], ciphers: list[bytes], comp: tuple[bytes, ...] = (b"none",)
) -> policy.KexInit:
    lists = [
        kex,
        [b"ssh-ed25519"],
        ciphers,
        ciphers,
        [b"hmac-sha1"],
        [b"hmac-sha1"],
        comp,
        comp,
        [],
        [],
    ]
    payload = bytes(16) + b"".join(
        struct.pack(">L", len(b",".join(x))) + b",".join(x) for x in lists
    )
    return policy.KexInit.parse(payload + bytes(5))


def test_negotiate_refusals_name_what_is_allowed() -> None:
    ours = policy.Offer([*policy.KEX_ALGORITHMS, policy.STRICT_KEX_SERVER],
                        [b"ssh-ed25519"], list(policy.CIPHERS), list(policy.MACS),
                        list(policy.COMPRESSIONS))  # fmt: skip
    ok = policy.negotiate(ours, kexinit([b"curve25519-sha256"], [AES256_GCM]), False, False)
    assert ok.error is None and ok.cipher_cs == AES256_GCM and ok.mac_waived
    marker = kexinit([policy.STRICT_KEX_SERVER, b"curve25519-sha256"], [AES128_GCM])
    assert "no key exchange method" in (policy.negotiate(ours, marker, False, False).error or "")
    nist = kexinit([b"ecdh-sha2-nistp256", b"diffie-hellman-group14-sha1"], [AES128_GCM])
    assert "mlkem768x25519-sha256" in (policy.negotiate(ours, nist, False, False).error or "")
    cbc = kexinit([b"curve25519-sha256"], [b"aes128-cbc", b"3des-cbc"])
    assert "only AEAD" in (policy.negotiate(ours, cbc, False, False).error or "")
    zlib = kexinit([b"curve25519-sha256"], [AES128_GCM], (b"zlib",))
    assert "compression" in (policy.negotiate(ours, zlib, False, False).error or "")
    chacha = kexinit([b"curve25519-sha256"], [CHACHA20_POLY1305])
    assert "strict" in (policy.negotiate(ours, chacha, False, False).error or "")
    assert policy.negotiate(ours, chacha, False, True).error is None


def test_malformed_kexinit_is_a_value_error() -> None:
    for bad in (b"", bytes(16), bytes(16) + b"\x00\x00\x01\x00abc"):
        with pytest.raises(ValueError):
            policy.KexInit.parse(bad)
    t = make_server()
    t.makeConnection(StringTransport())
    t.dataReceived(b"SSH-2.0-x\r\n")
    said: list[bytes] = []
    t.sendDisconnect = lambda code, why: said.append(why)  # type: ignore[method-assign]
    t.ssh_KEXINIT(bytes(16) + b"\xff\xff\xff\xff")
    assert said and b"KEXINIT" in said[0]
    assert MSG_KEXINIT == 20


def test_client_side_key_exchange_timeout() -> None:
    """The agent's link (the client side) has the same bound: a server that leaves a
    re-key hanging is dropped after kexTimeout."""
    clock = task.Clock()
    client = Client()
    client.kexClock = clock
    client, _, _ = pair(client=client)
    assert client.secure == 1
    clock.advance(60)  # the first exchange finished: no timer left behind
    assert not client.transport.disconnecting
    client.sendKexInit()  # never pumped: the server does not answer
    clock.advance(client.kexTimeout + 0.1)
    assert client.transport.disconnecting


# --- larger channel packets between two labrelay ends (issue 13) -------------------------


def test_both_labrelay_ends_announce_a_labrelay_version_string() -> None:
    """The relay's line is bare; the agent's names its version after a ``_``
    (tests/unit/test_peer_software.py): each is labrelay's to the other."""
    from relay.ssh.client import LinkTransport
    from relay.ssh.server import RelayTransport

    assert RelayTransport.ourVersionString == b"SSH-2.0-labrelay"
    assert LinkTransport.ourVersionString.startswith(b"SSH-2.0-labrelay_")
    assert policy.labrelay_peer(RelayTransport.ourVersionString)
    assert policy.labrelay_peer(LinkTransport.ourVersionString)


@pytest.mark.parametrize(("version", "ours"), [
    (b"SSH-2.0-labrelay", True),
    (b"SSH-2.0-labrelay_0.2 comment", True),
    (b"SSH-2.0-labrelay comment", True),
    (b"SSH-2.0-labrelayx", False),
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10", False),
    (b"SSH-2.0-Twisted_26.10.0", False),
    (b"", False),
    (None, False),
])
def test_a_labrelay_peer_is_known_by_its_version_string(version: bytes | None,
                                                        ours: bool) -> None:
    assert policy.labrelay_peer(version) is ours
    window = 2 << 20
    expected = policy.LABRELAY_MAX_PACKET if ours else 32768
    assert policy.channel_max_packet(32768, window, version) == expected
    # never smaller than the configured value, never more than the window
    assert policy.channel_max_packet(1 << 20, window, version) == 1 << 20
    assert policy.channel_max_packet(32768, 65536, version) == (65536 if ours else 32768)


@pytest.mark.parametrize(("version", "rearmed"), [
    (b"SSH-2.0-labrelay", False),
    (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13", True),
    (b"SSH-2.0-dropbear_2022.83", True),
])
def test_the_agent_rearms_quickack_per_read_only_toward_a_server_that_needs_it(
        version: bytes, rearmed: bool) -> None:
    """TCP_QUICKACK after each read of the link is for a server that leaves Nagle on
    (OpenSSH's sshd); a labrelay relay sets TCP_NODELAY, so toward one the per-read
    setsockopt is skipped once its version line is known (LinkTransport.quickAck)."""
    import socket
    from types import SimpleNamespace

    from relay.ssh.client import LinkTransport

    calls: list[tuple[int, int, int]] = []
    sock = SimpleNamespace(setsockopt=lambda *a: calls.append(a))
    link = SimpleNamespace(config=SimpleNamespace(user="lab"), identities=[])
    t = LinkTransport(link)  # type: ignore[arg-type]
    t.transport = SimpleNamespace(socket=sock)  # type: ignore[assignment]
    t.requestService = lambda service: None  # type: ignore[method-assign]
    t.dataReceived(b"")  # before the version line: re-armed, whoever the server is
    assert calls == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]
    t.otherVersionString = version
    t.connectionSecure()
    calls.clear()
    t.dataReceived(b"")
    assert calls == ([(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)] if rearmed else [])


@pytest.mark.parametrize("version_seen", [False, True])
def test_a_server_that_closes_before_its_version_line_is_said_to_refuse_at_accept(
        version_seen: bool) -> None:
    """A labrelay relay (and sshd 9.8+) closes a penalised address's connections at
    accept, before its version line: the agent's reason says so instead of only
    "Connection was closed cleanly" (round 13's operator review)."""
    from types import SimpleNamespace

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from relay.ssh.client import LinkSetupError, LinkTransport

    link = SimpleNamespace(config=SimpleNamespace(user="lab"), identities=[])
    t = LinkTransport(link)  # type: ignore[arg-type]
    t.gotVersion = version_seen
    errors: list[Failure] = []
    t.ready.addErrback(errors.append)
    t.connectionLost(Failure(ConnectionDone()))
    (f,) = errors
    assert isinstance(f.value, LinkSetupError) and not f.value.keys_refused
    said = str(f.value)
    assert ("before its SSH version line" in said and "refused at accept" in said
            and "Connection was closed cleanly" in said) is not version_seen, said
    if not version_seen:
        # penalties are not the only cause: the relay's cap and its descriptor limit
        # too, and its log names which
        assert "max_unauthenticated" in said and "out of file descriptors" in said, said
        assert "relay_accept_failed" in said, said


@pytest.mark.parametrize(("version", "where"), [
    (b"SSH-2.0-labrelay", "the relay's agents file"),
    (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13", "that user's authorized_keys"),
    (None, "that user's authorized_keys"),
])
def test_an_agent_whose_keys_are_refused_is_told_where_its_key_goes(
        version: bytes | None, where: str) -> None:
    from types import SimpleNamespace

    from relay.ssh.clientauth import _agent_hint

    assert where in _agent_hint(SimpleNamespace(otherVersionString=version))
