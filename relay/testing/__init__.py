"""Test doubles for labrelay's pieces: what unit tests would otherwise build by hand.

Public, like ``treq.testing``: labrelay's own unit tests use these, and so may tests
of code built on labrelay.  Nothing here opens a socket, starts a thread or reads a
clock; time comes from a ``task.Clock`` or ``MemoryReactorClock`` the test owns.  Two
real protocols talk in memory over ``twisted.test.iosim`` (:func:`connect_in_memory`);
the other doubles stand in for *one* side where the test scripts the other.

What is here, by what it stands in for:

- keys and grants: :func:`new_key`, :class:`KeyRing` (keys by name, and the
  ``PrincipalConfig`` entries of a ``RelayConfig`` that grant them services);
- transports: :class:`FakeTCPTransport` (a TCP socket whose write buffer pushes back
  like Twisted's ``FileDescriptor``), :class:`FakeSSHTransport` (what a Conch connection
  service sends, recorded and decoded), :class:`FakeSSHConnection` (what a channel or
  the agent's resume hello asks of its connection, recorded), :class:`BareSSHTransport`
  (a transport past key exchange, recording what it dispatches); in
  :mod:`relay.testing.ssh`;
- SSH transport pairs: :class:`TrustingSSHClient` and :class:`PlainSSHServer` (Conch's
  transports with labrelay's AEAD ciphers and algorithm policy), :func:`ssh_server`
  (a server transport with a fresh host key), :func:`connect_in_memory` (a client and
  a server over ``iosim``, key exchange done), :class:`IgnoreRecorder`;
- bridge sides: :class:`FakeSide` (one side of a ``Bridge``, scripted);
- the relay's SSH sessions: :class:`FakeIdentity` and :class:`FakeRelayConnection`
  (what ``RelayCore``, ``DataPort`` and the registry ask of a ``RelayConnection``);
- the agent's forwards: :class:`FakeLink` and :class:`FakeLinkConnection` (what a
  ``RemoteForwardRunner`` asks of its link and of the link's connection);
- the data path: :class:`FakeDataPath` and :class:`FakePair` (the splice, which needs
  real sockets, recorded instead);
- small verbs: :func:`result_of` (a fired Deferred's result), :func:`connection_lost`
  (what the reactor does after a close), :func:`feed_bytewise` (one byte at a time).

The top layer of ``pyproject.toml``'s import-linter contract: nothing imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.conch.ssh import factory, keys, transport
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, ITCPTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from relay.datapath.bridge import Bridge
from relay.datapath.splicing import PairResult
from relay.ssh.aead import AEADTransportMixin
from relay.ssh.peersoftware import PeerSoftware, read_version_line
from relay.testing.keys import KeyRing, TestKey, new_key
from relay.testing.ssh import BareSSHTransport, FakeSSHConnection, FakeSSHTransport

__all__ = [
    "BareSSHTransport",
    "FakeDataPath",
    "FakeIdentity",
    "FakeLink",
    "FakeLinkConnection",
    "FakePair",
    "FakeRelayConnection",
    "FakeSSHConnection",
    "FakeSSHTransport",
    "FakeSide",
    "FakeTCPTransport",
    "IgnoreRecorder",
    "KeyRing",
    "PlainSSHServer",
    "TestKey",
    "TrustingSSHClient",
    "connect_in_memory",
    "connection_lost",
    "feed_bytewise",
    "new_key",
    "result_of",
    "ssh_server",
]


# --- transports ----------------------------------------------------------------------


@implementer(ITCPTransport)
class FakeTCPTransport(StringTransport):
    """A TCP transport in memory whose write buffer pushes back.

    As a consumer it behaves like Twisted's ``FileDescriptor``: every write while more
    than ``highWater`` bytes are unsent calls the registered streaming producer's
    ``pauseProducing``; once :meth:`drain` empties the buffer, a paused producer is
    resumed.  With ``highWater=None`` nothing pushes back.  As a producer (reading
    the socket) its state is StringTransport's ``producerState``.  It is lenient, as
    real transports are, about pause/resume while closing.
    """

    def __init__(self, highWater: int | None = None, **kw: Any) -> None:
        super().__init__(lenient=True, **kw)
        self.highWater = highWater
        self.unsent = bytearray()
        self.producerPaused = False
        self.noDelay = False
        self.keepAlive = False
        self.writeClosed = False

    def write(self, data: bytes) -> None:
        assert not self.writeClosed, "write after loseWriteConnection"
        assert not self.disconnecting, "write after loseConnection"
        super().write(data)
        if self.highWater is None:
            return
        self.unsent += data
        if self.producer is not None and self.streaming and len(self.unsent) > self.highWater:
            self.producerPaused = True
            self.producer.pauseProducing()

    def drain(self, nbytes: int | None = None) -> bytes:
        """The kernel took ``nbytes`` (default: all) of the unsent bytes; returns them."""
        n = len(self.unsent) if nbytes is None else nbytes
        out, self.unsent = bytes(self.unsent[:n]), self.unsent[n:]
        if not self.unsent and self.producerPaused and self.producer is not None:
            self.producerPaused = False
            self.producer.resumeProducing()
        return out

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.noDelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepAlive = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepAlive

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


# --- SSH transport pairs -------------------------------------------------------------


class TrustingSSHClient(AEADTransportMixin, transport.SSHClientTransport):
    """A Conch client transport with labrelay's ciphers that trusts any host key and
    counts ``connectionSecure`` calls in ``secure`` (once, not again at each rekey)."""

    secure = 0

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.secure += 1


class PlainSSHServer(AEADTransportMixin, transport.SSHServerTransport):
    """A Conch server transport with labrelay's ciphers and nothing else of the relay."""


def ssh_server(protocol: type[transport.SSHServerTransport] = PlainSSHServer,
               host_key: keys.Key | None = None) -> Any:
    """A server transport of class ``protocol`` as its factory builds it for one
    connection, with ``host_key`` (default: a fresh ed25519 key) and no DH groups (only
    the curve25519 and ECDH exchanges)."""
    key = host_key if host_key is not None else new_key("host").key
    f = factory.SSHFactory()
    f.publicKeys = {key.sshType(): key.public()}
    f.privateKeys = {key.sshType(): key}
    f.getPrimes = lambda: None  # type: ignore[method-assign]
    f.protocol = protocol
    f.startFactory()
    return f.buildProtocol(None)


def connect_in_memory(server: Any, client: Any) -> iosim.IOPump:
    """Connect two protocols over ``twisted.test.iosim`` and deliver every byte both
    have to say (for SSH transports: version lines, key exchange, NEWKEYS); the pump
    is returned for what the test sends next."""
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
    pump.flush()
    return pump


class IgnoreRecorder:
    """Records the SSH_MSG_IGNORE payloads a transport receives (the packets tests
    exchange to prove a direction works)."""

    def __init__(self, t: Any) -> None:
        self.got: list[bytes] = []
        t.ssh_IGNORE = lambda packet: self.got.append(packet)


# --- bridge sides --------------------------------------------------------------------


class FakeSide:
    """One side of a ``Bridge``, scripted: records what the bridge asks of it, and
    plays its peer's events (:meth:`receive`, :meth:`full`, :meth:`eof`, ...)."""

    def __init__(self) -> None:
        self.bridge: Bridge | None = None
        self.written: list[bytes] = []
        self.consumedBytes = 0
        self.pauses: set[str] = set()
        self.pauseCalls: list[str] = []
        self.resumeCalls: list[str] = []
        self.wroteEOF = False
        self.closeCalls = 0
        self.abortCalls = 0

    # Side
    def attach(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def write(self, data: bytes) -> None:
        assert not self.wroteEOF, "write after writeEOF"
        self.written.append(data)

    def consumed(self, nbytes: int) -> None:
        self.consumedBytes += nbytes

    def pauseReading(self, reason: str) -> None:
        self.pauseCalls.append(reason)
        self.pauses.add(reason)

    def resumeReading(self, reason: str) -> None:
        self.resumeCalls.append(reason)
        self.pauses.discard(reason)

    def writeEOF(self) -> None:
        self.wroteEOF = True

    def close(self) -> None:
        self.closeCalls += 1

    def abort(self) -> None:
        self.abortCalls += 1

    # what the peer of this side does
    def _bridge(self) -> Bridge:
        assert self.bridge is not None, "not attached to a bridge"
        return self.bridge

    def receive(self, data: bytes) -> None:
        self._bridge().dataReceived(self, data)

    def full(self) -> None:
        self._bridge().sinkFull(self)

    def drained(self) -> None:
        self._bridge().sinkDrained(self)

    def eof(self) -> None:
        self._bridge().eofReceived(self)

    def closed(self) -> None:
        self._bridge().sideClosed(self)


# --- the relay's SSH sessions --------------------------------------------------------


@dataclass
class FakeIdentity:
    """What an authenticated ``RelayConnection`` knows of its peer."""

    key_blob: bytes
    name: str
    kind: str
    login: str = ""
    address: str = ""


@dataclass(eq=False)
class FakeRelayConnection:
    """What ``RelayCore``, ``DataPort`` and the registry ask of a ``RelayConnection``.

    ``probe()`` returns a Deferred the test fires (``True``: the holder answered);
    disconnects and revoked grants are recorded.
    """

    identity: FakeIdentity
    peer: str = "127.0.0.1:1"
    probes: list[defer.Deferred[bool]] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    revoked: list[tuple[str, int, str]] = field(default_factory=list)
    leftOnPurpose: bool = False  # the peer said DISCONNECT by application
    # from its version line (relay.ssh.peersoftware): none read, unless a test says
    software: PeerSoftware = field(default_factory=lambda: read_version_line(None))

    @property
    def principal_name(self) -> str:
        return self.identity.name

    def probe(self) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.probes.append(d)
        return d

    def disconnect(self, why: str) -> None:
        self.disconnected.append(why)

    def grantRevoked(self, bind: str, port: int, why: str) -> None:
        self.revoked.append((bind, port, why))

    def whenReplied(self) -> defer.Deferred[None]:
        return defer.succeed(None)  # its replies are sent at once


# --- the agent's forwards ------------------------------------------------------------


class FakeLink:
    """What a ``RemoteForwardRunner`` asks of its agent link: a name, a clock the test
    advances (retries and backoff), and ``forwardReady`` (ignored)."""

    name = "relay"

    def __init__(self) -> None:
        self.clock = task.Clock()

    def forwardReady(self) -> None:
        pass


class FakeLinkConnection:
    """What a ``RemoteForwardRunner`` asks of the link's SSH connection: each global
    request is recorded in ``requests`` and answered by the Deferred the test fires,
    in ``replies``."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []
        self.replies: list[defer.Deferred[bytes]] = []

    def sendGlobalRequest(self, kind: bytes, data: bytes, wantReply: int) -> defer.Deferred[bytes]:
        self.requests.append((kind, data))
        d: defer.Deferred[bytes] = defer.Deferred()
        self.replies.append(d)
        return d


# --- the data path -------------------------------------------------------------------


class FakePair:
    """A spliced pair that moves nothing by itself: the test sets ``moved`` and fires
    ``done``."""

    def __init__(self) -> None:
        self.done: defer.Deferred[PairResult] = defer.Deferred()
        self.moved = PairResult(0, 0)
        self.aborted = False

    def bytes(self) -> PairResult:
        return self.moved

    def abort(self) -> None:
        self.aborted = True


class FakeDataPath:
    """``relay.datapath.splicing.DataPath`` recorded: each ``splice_transports`` call
    is kept with its bytes read ahead and returns a :class:`FakePair` (or raises
    ``fail_with``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, bytes, bytes]] = []
        self.pairs: list[FakePair] = []
        self.fail_with: Exception | None = None

    def splice_transports(self, a: Any, b: Any, *, from_a: bytes = b"",
                          from_b: bytes = b"") -> FakePair:
        self.calls.append((a, b, from_a, from_b))
        if self.fail_with is not None:
            raise self.fail_with
        pair = FakePair()
        self.pairs.append(pair)
        return pair


# --- small verbs ---------------------------------------------------------------------


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result (or ``Failure``) a Deferred has already fired with; fails the test if
    it has not fired.  The Deferred is left with no result (a Failure is consumed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def connection_lost(protocol: IProtocol, reason: BaseException | None = None) -> None:
    """What the reactor does after a close or an abort (ours or the peer's): a
    ``StringTransport`` never calls ``connectionLost`` by itself."""
    protocol.connectionLost(Failure(reason if reason is not None else ConnectionDone()))


def feed_bytewise(protocol: IProtocol, data: bytes) -> None:
    """``data`` delivered one byte per ``dataReceived``: every parser state is a
    boundary once."""
    for i in range(len(data)):
        protocol.dataReceived(data[i:i + 1])
