"""The user's outgoing stream stays in seal order when the native thread
(relay.ssh.nativeforward, csrc/gpump.c) takes it over from Python and gives it back.

AES-GCM's nonce is the packet's position in the stream: a packet that reaches the user
before one sealed ahead of it fails her MAC check ("message authentication code
incorrect", her ssh drops the session).  Round 17 saw that once on the pooled route
(``scp -J`` with rekeys); fa3e037 closed the hole it came through: the thread was armed
at the end of a read while packets Python had sealed in that read still waited in the
transport's cork (relay.ssh.aead.CorkGroup, written at the read's end), so the thread's
packets, sealed after them, could be written first.

End to end that is a race of microseconds between the thread's first ``send`` and the
cork's write, lost once in 17 runs.  Here it is driven to the exact interleaving instead:
the real transport (``AEADTransportMixin``, its ``CorkGroup``), the real connection
service, channel and bridge, Twisted's real TCP connections on real loopback sockets,
and the real thread; the relay's Python is held just after arming (what a busy machine
does to it) until the thread has written, and the user's side opens every packet in
order with its own keys.  The reactor is a memory one: the test turns it by hand
(``doRead``), so nothing is written at a time the test did not choose.

The invariant (docs/fastpath.md, "Ordering of the outgoing stream"): every packet sealed
for the user is written to her socket after every packet sealed before it, whoever sealed
it; in particular the thread is never armed while anything Python sealed waits unwritten
(in the cork or in Twisted's buffer), and Python never seals while the thread owns the
stream (it takes it back first, and writes what the thread sealed and had not written
before its own packet).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_GLOBAL_REQUEST,
)
from twisted.conch.ssh.transport import MSG_IGNORE, MSG_KEXINIT
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.datapath.bridge import Bridge, TCPSide
from relay.ssh import gcmrun, nativeforward
from relay.ssh.aead import CorkGroup
from relay.ssh.channels import BridgedChannel
from relay.ssh.ciphers import AES128_GCM, PacketCiphers
from relay.ssh.connection import FlowConnection
from relay.testing import BareSSHTransport

pytestmark = pytest.mark.skipif(
    not gcmrun.native_enabled() and os.environ.get("CI") != "true",
    reason="the native module or libcrypto is not available here")

KEY = bytes(range(16))
IV_RELAY = bytes.fromhex("000102030405060708090a0b")  # the relay -> user direction
IV_USER = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")  # the user -> relay direction
REMOTE = 7  # the user's id for the channel
FIRST = 1000  # the user's window at the start: what Python sends before it is spent


def _ciphers(out_iv: bytes, in_iv: bytes) -> PacketCiphers:
    enc = PacketCiphers(AES128_GCM, AES128_GCM, b"hmac-sha2-256", b"hmac-sha2-256")
    enc.setKeys(out_iv, KEY, in_iv, KEY, b"", b"")
    return enc


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (Twisted's TCP transport sets TCP options
    a socketpair would refuse)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


class _TCP(tcp.Connection):
    """Twisted's TCP connection on a socket the test made (its addresses as a server's)."""

    def __init__(self, skt: socket.socket, reactor: Any) -> None:
        super().__init__(skt, None, reactor)
        self.connected = True

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", *self.socket.getpeername())

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", *self.socket.getsockname())


class _Relay(BareSSHTransport):
    """The relay's transport for the user: dispatches to its connection service, armable
    as the relay's user connections are."""

    nativeArmable = True
    isClient = False

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        transport_base = super(BareSSHTransport, self)
        transport_base.dispatchMessage(messageNum, payload)  # type: ignore[misc]


class _User(BareSSHTransport):
    """The user's end: opens what the relay sent, in order, with her own keys (a bad tag
    is a MAC error: ``disconnects``), and seals what she sends."""

    def __init__(self) -> None:
        super().__init__()
        self.transport = StringTransport()
        self.gotVersion = True
        self.currentEncryptions = _ciphers(IV_USER, IV_RELAY)

    def wire(self) -> bytes:
        out: bytes = self.transport.value()
        self.transport.clear()
        return out

    def data(self) -> bytes:
        return b"".join(p[8:] for n, p in self.dispatched if n == MSG_CHANNEL_DATA)


class Site:
    """The relay's end of one pooled ``ssh -J`` session, its reactor turned by hand."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.user_peer, relay_user = _tcp_pair()  # the user's ssh, the relay's socket
        relay_data, self.agent = _tcp_pair()  # the relay's data connection, the agent
        for s in (self.user_peer, self.agent):
            s.settimeout(10)
        self.utcp = _TCP(relay_user, self.reactor)
        t = self.t = _Relay()
        t.transport = self.utcp
        self.utcp.protocol = t
        t.gotVersion = True
        t.buf = b""
        t.sessionID = b"session"
        t.currentEncryptions = _ciphers(IV_RELAY, IV_USER)
        t.corkGroup = CorkGroup()
        t.kexGuard.newkeys_received()  # past the first key exchange
        conn = self.conn = FlowConnection()
        conn.transport = t
        t.service = conn
        conn.serviceStarted()
        channel = self.channel = BridgedChannel(b"direct-tcpip", remoteWindow=FIRST,
                                                remoteMaxPacket=32768, conn=conn)
        channel.id = 0
        conn.channels[0] = channel
        conn.channelsToRemoteChannel[channel] = REMOTE
        conn.localToRemoteChannel[0] = REMOTE
        self.dtcp = _TCP(relay_data, self.reactor)
        side = self.side = TCPSide.adopt(self.dtcp)
        side.nativeStats = {}
        self.bridge = Bridge(channel, side)
        self.user = _User()
        self.got = b""  # what the user's socket delivered, not yet opened

    def close(self) -> None:
        forward = self.t.nativeForward
        if forward is not None:
            forward.handback("test over")
        for s in (self.user_peer, self.agent, self.utcp.socket, self.dtcp.socket):
            s.close()

    # the agent's side

    def agent_sends(self, data: bytes) -> None:
        self.agent.sendall(data)

    def relay_reads_agent(self, n: int) -> None:
        """One reactor turn's read of the data connection, ``n`` bytes waiting in it."""
        got = 0
        while got < n:
            select.select([self.dtcp.socket], [], [], 5)
            before = self.bridge.bytesBtoA
            self.dtcp.doRead()
            got += self.bridge.bytesBtoA - before

    def agent_reads(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            if self.t.nativeForward is None:
                self.dtcp.doWrite()
            chunk = self.agent.recv(n - len(got))
            assert chunk, "the relay closed the data connection"
            got += chunk
        return got

    # the user's side

    def user_sends(self, *packets: tuple[int, bytes]) -> None:
        """One read at the relay of the user's ``packets`` (sealed by her, in order)."""
        for kind, payload in packets:
            self.user.sendPacket(kind, payload)
        self.t.dataReceived(self.user.wire())

    def python_turn(self) -> None:
        """What a reactor turn does on the Python path: read the data connection if it
        has bytes, write Twisted's buffers out."""
        self.reactor.advance(0)
        ready, _, _ = select.select([self.dtcp.socket], [], [], 0)
        if ready and self.side.bridge is not None and not self.side._pauses:
            self.dtcp.doRead()
        self.utcp.doWrite()

    def user_reads(self, payload: int, timeout: float = 10.0) -> None:
        """Read the user's socket and open every packet in order until ``payload``
        channel bytes arrived, or a packet fails (a MAC error ends it)."""
        self.user_reads_until(lambda: len(self.user.data()) >= payload, timeout)

    def user_reads_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        self.user_peer.settimeout(timeout)
        while not done() and not self.user.disconnects:
            if self.t.nativeForward is None:
                self.python_turn()
            try:
                chunk = self.user_peer.recv(1 << 20)
            except TimeoutError:
                break
            assert chunk, "the relay's end closed"
            self.user.dataReceived(chunk)


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


def _adjust(n: int) -> tuple[int, bytes]:
    return MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 0, n)


def _data(payload: bytes) -> tuple[int, bytes]:
    return MSG_CHANNEL_DATA, struct.pack(">2L", 0, len(payload)) + payload


@pytest.fixture
def python_held_after_arming(monkeypatch: pytest.MonkeyPatch, site: Site) -> list[Any]:
    """Hold the relay's Python just after ``maybe_arm`` started a thread, until the
    thread has written to the user's socket (or 2 s): the interleaving a busy machine
    makes at random.  Returns the threads armed."""
    armed: list[Any] = []
    real = nativeforward.maybe_arm

    def held(transport: Any) -> Any:
        forward = real(transport)
        if forward is not None:
            armed.append(forward)
            select.select([site.user_peer], [], [], 2.0)
        return forward

    monkeypatch.setattr(nativeforward, "maybe_arm", held)
    return armed


def test_a_release_python_sealed_in_the_arming_read_reaches_the_user_first(
        site: Site, python_held_after_arming: list[Any]) -> None:
    """fa3e037's hole, forced.  The agent sends more than the user's window: Python sends
    what fits and queues the rest; more of the agent's bytes wait in the data socket.  One
    read of the user then carries her ``WINDOW_ADJUST`` (Python seals the queued bytes: a
    small packet, so it waits in the cork until the read's end) and a little channel data
    of hers (which makes the channel the thread's candidate at the read's end).  A thread
    armed then would seal the waiting agent bytes after Python's packet and write them
    before it: her first packet would fail the MAC check.  Every byte must reach her
    exact, in order, every packet opening at its place, and the thread must carry the
    rest once armed."""
    stream = os.urandom(FIRST + 2000 + 50_000)
    site.agent_sends(stream[: FIRST + 2000])
    site.relay_reads_agent(FIRST + 2000)
    assert site.channel.remoteWindowLeft == 0 and site.channel._queued  # 2000 held
    site.user_reads(FIRST)
    assert site.user.data() == stream[:FIRST]
    site.agent_sends(stream[FIRST + 2000 :])  # in the data socket: the thread's at once
    hers = b"her keystrokes"
    site.user_sends(_adjust(1 << 20), _data(hers))
    if not python_held_after_arming:
        # not armed in that read (fa3e037): her next data arms it
        site.user_sends(_data(b" and more"))
        hers += b" and more"
    assert python_held_after_arming, "the thread must carry the rest"
    assert site.t.nativeForward is not None and site.t.nativeForward.sealing
    site.user_reads(len(stream))
    assert site.user.disconnects == [], "a packet reached the user out of its sealed order"
    assert site.user.data() == stream
    assert site.agent_reads(len(hers)) == hers


def test_python_writes_while_the_thread_seals_go_after_what_it_sealed(site: Site) -> None:
    """The other direction of the handover: the thread owns the stream and holds sealed
    bytes the user has not read yet (her socket is full); Python then seals a packet of
    its own (an ``IGNORE`` here: a keepalive, the host-key announce, a relay KEXINIT and a
    grant at a handback all take this path, ``AEADTransportMixin._sealAndWrite``).  The
    thread hands back first, what it sealed leaves before Python's packet, and Python's
    packet takes the next nonce: every packet opens in order, the bytes exact."""
    for s, opt in ((site.utcp.socket, socket.SO_SNDBUF), (site.user_peer, socket.SO_RCVBUF)):
        s.setsockopt(socket.SOL_SOCKET, opt, 16 * 1024)
    site.user_sends(_adjust(8 << 20), _data(b"go"))
    forward = site.t.nativeForward
    assert forward is not None and forward.sealing
    bulk = os.urandom(1 << 20)
    sender = threading.Thread(target=site.agent.sendall, args=(bulk,))
    sender.start()
    try:
        # until the thread holds sealed bytes it could not write (it reports once the
        # bytes pause: her socket is full)
        while True:
            assert select.select([forward.pump.fileno()], [], [], 10)[0], "no report"
            st = forward.pump.poll()
            assert st.reason == gcmrun.RUNNING, gcmrun.REASONS[st.reason]
            if st.oplain + 20 * st.opackets > st.uwritten:  # 4 + plain + 16 per packet
                break
        ping = struct.pack(">L", 4) + b"ping"
        site.t.sendPacket(MSG_IGNORE, ping)
        assert forward.done and site.t.nativeForward is None
        site.user_reads(len(bulk))
    finally:
        sender.join(10)
    assert site.user.disconnects == [], "a packet reached the user out of its sealed order"
    assert site.user.data() == bulk
    kinds = [n for n, _ in site.user.dispatched]
    at = site.user.dispatched.index((MSG_IGNORE, ping))
    assert MSG_CHANNEL_DATA in kinds[:at], "the thread's sealed bytes went first"


def _thread_sealed(site: Site, nbytes: int) -> Any:
    """Arm the thread on her data and have it seal ``nbytes`` of the agent's for her (she
    read them): the thread's, still running."""
    site.user_sends(_adjust(8 << 20), _data(b"go"))
    forward = site.t.nativeForward
    assert forward is not None and forward.sealing
    bulk = os.urandom(nbytes)
    site.agent_sends(bulk)
    site.user_reads(len(bulk))
    assert site.user.data() == bulk and site.t.nativeForward is forward
    return forward


def _marked(site: Site) -> list[int]:
    """An ``IGNORE`` (sent at any time, key exchange or not) after whatever Python sent,
    read by her: the message numbers she got, in order."""
    mark = (MSG_IGNORE, NS(b"mark"))
    site.t.sendPacket(*mark)
    site.user_reads_until(lambda: mark in site.user.dispatched)
    assert site.user.disconnects == [], "a packet reached the user out of its sealed order"
    return [n for n, _ in site.user.dispatched]


def test_a_rekey_the_handback_starts_holds_back_the_packet_that_asked_for_it(
        site: Site) -> None:
    """Python's keepalive takes the stream back from the thread; the handback meters what
    the thread carried, and that runs out the key's byte budget: the relay's KEXINIT goes
    out, inside the keepalive's send.  The keepalive must then wait for the new keys, as
    every connection-layer message does after our KEXINIT (RFC 4253 section 7.1), not
    follow the KEXINIT out because its send began before the key exchange did."""
    forward = _thread_sealed(site, 64 * 1024)
    site.t.rekeyAfterBytes = site.t._bytesSinceKex + 1024  # crossed by the thread's bytes
    keepalive = NS(b"keepalive@openssh.com") + b"\x01"
    site.t.sendPacket(MSG_GLOBAL_REQUEST, keepalive)
    assert forward.done
    kinds = _marked(site)
    assert MSG_KEXINIT in kinds, kinds
    after = kinds[kinds.index(MSG_KEXINIT):]
    assert max(after) < 50, f"a connection-layer message after our KEXINIT: {after}"
    assert site.t._blockedByKeyExchange == [(MSG_GLOBAL_REQUEST, keepalive)]


def test_a_rekey_started_while_the_thread_seals_sends_one_kexinit_and_loses_nothing(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay starts a re-key while the thread owns the stream and holds the agent's
    bytes it has not sealed yet (her socket and its seal buffer full); the relay's byte
    budget was metered from the thread's report (``NativeForward._account``).  The
    KEXINIT's send takes the stream back; the handback meters the thread's last bytes,
    which must not start a second key exchange inside the first one's send (two
    KEXINITs in a row fail her key exchange; and Conch's outer KEXINIT, finishing after
    the inner one, would empty the queue of what waits for the new keys that the inner
    one began).  Every byte of the agent's is sent, queued for the new keys, or unread."""
    for s, opt in ((site.utcp.socket, socket.SO_SNDBUF), (site.user_peer, socket.SO_RCVBUF)):
        s.setsockopt(socket.SOL_SOCKET, opt, 16 * 1024)
    stops: list[gcmrun.Stopped] = []
    real_stop = gcmrun.Pump.stop

    def stop(pump: gcmrun.Pump) -> gcmrun.Stopped:
        stops.append(real_stop(pump))
        return stops[-1]

    monkeypatch.setattr(gcmrun.Pump, "stop", stop)
    site.user_sends(_adjust(16 << 20), _data(b"go"))
    forward = site.t.nativeForward
    assert forward is not None
    bulk = os.urandom(3 << 20)
    sender = threading.Thread(target=site.agent.sendall, args=(bulk,))
    sender.start()
    try:
        while True:  # until its seal buffer is nearly full (it reports once bytes pause)
            assert select.select([forward.pump.fileno()], [], [], 10)[0], "no report"
            st = forward.pump.poll()
            assert st.reason == gcmrun.RUNNING, gcmrun.REASONS[st.reason]
            if st.oplain + 20 * st.opackets - st.uwritten > 400 * 1024:
                break
        # as KexMixin._count starts it; the thread's bytes the handback meters cross the
        # budget again (a KEXINIT alone does not)
        site.t.rekeyAfterBytes = 16 * 1024
        site.t._bytesSinceKex = 0
        site.t.sendKexInit()
        assert stops and stops[0].unsealed, "the thread held unsealed bytes"
        kinds = _marked(site)
        unread = b""
        while sender.is_alive() or select.select([site.dtcp.socket], [], [], 0)[0]:
            if select.select([site.dtcp.socket], [], [], 0.5)[0]:
                chunk = site.dtcp.socket.recv(1 << 20)
                assert chunk
                unread += chunk
    finally:
        sender.join(10)
    assert kinds.count(MSG_KEXINIT) == 1, kinds
    assert (MSG_KEXINIT, site.t.ourKexInitPayload[1:]) in site.user.dispatched
    waiting = b"".join(bytes(p[8:]) for n, p in site.t._blockedByKeyExchange
                       if n == MSG_CHANNEL_DATA)
    scheduled = b""  # what waits behind those, in the link's scheduler (congested by them)
    while (item := site.conn.scheduler.pop()) is not None:
        assert isinstance(item[1], bytes)
        scheduled += item[1]
    queued = b"".join(site.channel._queued or ())  # beyond her window (none here)
    assert site.user.data() + waiting + scheduled + queued + unread == bulk


def test_bytes_metered_while_our_kexinit_is_sent_start_no_second_one(site: Site) -> None:
    """What is metered while the relay's KEXINIT is being sent (the handback's bytes
    above, or the KEXINIT's own when the budget is smaller than it) starts no key
    exchange inside that one: one KEXINIT, the one the relay hashes (before, with a
    budget under a KEXINIT's size, each KEXINIT's own metering started the next one,
    without end)."""
    site.t.rekeyAfterBytes = 1
    site.t._count(2)
    kinds = _marked(site)
    assert kinds.count(MSG_KEXINIT) == 1, kinds
    assert (MSG_KEXINIT, site.t.ourKexInitPayload[1:]) in site.user.dispatched
