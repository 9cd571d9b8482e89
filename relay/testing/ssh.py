"""The two SSH layers around a connection service or a channel, faked and recorded:
the transport *under* a connection service (:class:`FakeSSHTransport`), the connection
service *under* a channel (:class:`FakeSSHConnection`), and a bare transport past key
exchange (:class:`BareSSHTransport`), for tests of framing and of what sits above.

Each stood in several places before (the fuzz world's ``FakeLink``, the resume tests'
``Link`` and ``_Conn``, two test files' ``Bare``); one of each is kept here so that a
change in what the code asks of its SSH layers is made once.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import common, transport
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from twisted.internet import defer

from relay.core.fairshare import FairScheduler
from relay.ssh.aead import AEADTransportMixin

MSG_UNIMPLEMENTED = 3


class FakeSSHTransport:
    """The SSH transport under a connection service (its ``transport``, before
    ``serviceStarted``): the packets it sends land in ``packets``, decoded by the
    helpers.  ``tcp`` is the link's TCP transport, if the code under test reaches it;
    ``sendDisconnect`` loses it, as Conch's does.  ``avatar`` is what userauth left
    (a ``RelayConnection`` reads its identity from it); without one there is no
    ``avatar`` attribute at all, as before authentication (Conch looks for one)."""

    avatar: Any

    def __init__(self, tcp: Any = None, avatar: Any = None) -> None:
        self.transport = tcp
        if avatar is not None:
            self.avatar = avatar
        self.packets: list[tuple[int, bytes]] = []
        self.disconnects: list[tuple[int, bytes]] = []
        self.unimplemented = 0

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.packets.append((messageType, payload))

    def sendDisconnect(self, reason: int, description: bytes) -> None:
        self.disconnects.append((reason, description))
        if self.transport is not None:
            self.transport.loseConnection()

    def sendUnimplemented(self) -> None:
        self.unimplemented += 1
        self.packets.append((MSG_UNIMPLEMENTED, b""))

    def logPrefix(self) -> str:
        return "fake-ssh"

    # decoding what was sent to the peer

    def kinds(self) -> list[int]:
        """The message numbers sent, in order."""
        return [kind for kind, _ in self.packets]

    def of(self, kind: int) -> list[bytes]:
        """The payloads of every packet of one kind."""
        return [payload for k, payload in self.packets if k == kind]

    def adjusts(self) -> list[int]:
        """The byte counts of the WINDOW_ADJUSTs sent."""
        return [struct.unpack(">2L", p)[1] for p in self.of(MSG_CHANNEL_WINDOW_ADJUST)]

    def data(self) -> bytes:
        """Every CHANNEL_DATA payload, joined."""
        return b"".join(self.dataPackets())

    def dataPackets(self) -> list[bytes]:
        return [common.getNS(p[4:])[0] for p in self.of(MSG_CHANNEL_DATA)]

    def openFailures(self) -> list[tuple[int, int, bytes]]:
        """``(recipient channel, reason code, description)`` of each OPEN_FAILURE."""
        out = []
        for p in self.of(MSG_CHANNEL_OPEN_FAILURE):
            sender, code = struct.unpack(">2L", p[:8])
            out.append((sender, code, common.getNS(p[8:])[0]))
        return out


class FakeSSHConnection:
    """The connection service under a ``BridgedChannel`` (its ``conn``) and under the
    agent's resume hello: a fair scheduler of its own, and what the code asks of it
    recorded for the test to look at or answer: data sent (``data``, ``sent`` bytes),
    channel requests, global requests (each with the Deferred the test fires), channel
    opens.  ``resumable`` is what the agent's hello sets on a link that may resume."""

    def __init__(self) -> None:
        self.scheduler: FairScheduler[Any] = FairScheduler()
        self.data: list[bytes] = []
        self.channelRequests: list[tuple[Any, bytes, bytes]] = []
        self.globalRequests: list[tuple[bytes, bytes, defer.Deferred[bytes]]] = []
        self.opens: list[tuple[Any, bytes]] = []
        self.eofs: list[Any] = []
        self.closes: list[Any] = []
        self.resumable = False
        self.takesShare = False  # FlowConnection.takesShare: True for an agent's link

    @property
    def sent(self) -> int:
        """CHANNEL_DATA bytes sent, over all channels."""
        return sum(len(d) for d in self.data)

    def sendData(self, channel: Any, data: bytes) -> None:
        self.data.append(bytes(data))

    def sendRequest(self, channel: Any, kind: bytes, data: bytes, wantReply: int = 0) -> None:
        self.channelRequests.append((channel, kind, data))

    def sendGlobalRequest(self, kind: bytes, data: bytes, wantReply: int = 0,
                          ) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.globalRequests.append((kind, data, d))
        return d

    def openChannel(self, channel: Any, extra: bytes = b"") -> None:
        self.opens.append((channel, extra))

    def adjustWindow(self, channel: Any, nbytes: int) -> None:
        pass

    def sendEOF(self, channel: Any) -> None:
        self.eofs.append(channel)

    def sendClose(self, channel: Any) -> None:
        self.closes.append(channel)


class BareSSHTransport(AEADTransportMixin, transport.SSHTransportBase):
    """A transport with labrelay's AEAD ciphers, to be put past key exchange by the
    test (its ciphers set by hand), recording what it dispatches and disconnects."""

    def __init__(self) -> None:
        self.dispatched: list[tuple[int, bytes]] = []
        self.disconnects: list[tuple[int, bytes]] = []

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        self.dispatched.append((messageNum, payload))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self.disconnects.append((reason, desc))
        super().sendDisconnect(reason, desc)
