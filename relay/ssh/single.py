"""The owner of one SSH connection that is not kept up (``labrelay connect``).

Part of :mod:`relay.ssh.client`: :class:`SingleConnection` is a
:class:`~relay.ssh.client.LinkOwner` with the link's settings, host-key check and
identities, and no reconnecting service, reverse forwards or relay of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.config.schema import LinkConfig
from relay.core.sessioncap import SessionSlot
from relay.datapath.bridge import Bridge
from relay.ssh.channels import BridgedChannel
from relay.ssh.client import LinkSetupError, LinkTransport, ReverseForward
from relay.ssh.clientauth import Identity
from relay.ssh.hostkeys import HostKeyVerifier
from relay.ssh.resumable import ResumableSessions


class SingleConnection:
    """The owner of one connection that is neither kept up nor forwards anything
    (``labrelay connect``): the link's settings, host-key check and identities without
    its reconnecting service."""

    _log = Logger()
    #: ``labrelay connect`` never writes an announced key into the user's known_hosts
    #: (a short-lived ProxyCommand the user did not ask to keep anything).
    learnHostKeys = False

    auth_hint = ("is your public key in the relay's grants for that user? "
                 "(ask the relay's admin; `ssh-add -L` lists the keys of your ssh-agent)")

    def __init__(self, config: LinkConfig, reactor: Any, identities: Sequence[Identity]) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.identities = identities
        self.verifier = HostKeyVerifier(config.host_key, config.host, config.port)
        self.resume: ResumableSessions | None = None

    def linkLost(self, transport: LinkTransport, why: str) -> None:
        """Nothing to reconnect: whoever holds the connection sees it close."""

    def grantRevoked(self, bind: str, port: int, why: str) -> None:
        self._log.warn(
            "link {link}: the relay revoked {bind}:{port}, which we do not hold: {reason}",
            event="forward_revoked", link=self.name, forward=None, bind=bind, port=port,
            reason=why,
        )

    def remoteForwardFor(self, host: str, port: int) -> ReverseForward | None:
        return None  # no reverse forwards: every forwarded-tcpip is refused

    def sessionStarted(self, forward: Any, side: Any, channel: BridgedChannel,
                       origin: str, slot: SessionSlot | None = None) -> Bridge:
        return Bridge(side, channel)

    def admitSession(self, forward: str) -> SessionSlot | str:
        return "this connection opens no sessions for its peer"  # (no forwards either)

    def targetUnreachable(self, forward: str, target: str, reason: str) -> None:
        pass  # never called: admitSession admits nothing

    def openRelayService(self, name: str, port: int,
                         origin: str) -> defer.Deferred[BridgedChannel]:
        return defer.fail(LinkSetupError(f"{name}:{port} is a relay service, but this "
                                         "connection has no relay of its own"))
