"""Builds the service tree a node config describes.

Everything that can be wrong with the configuration on disk — unreadable or
too-open key files, no identity at all — is checked here, before any service
starts, and reported as a :class:`~relay.config.errors.ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.web.server import Site

from relay.agent.link import Link
from relay.config.errors import ConfigError
from relay.config.schema import NodeConfig
from relay.ops.status import AdminGate, TokenError, admin_resource, base_snapshot, read_token
from relay.ssh.identity import load_identities


class AdminServer(TCPServer):
    """The admin endpoint's listener; says where it listens once it does."""

    _log = Logger()

    def startService(self) -> None:
        super().startService()
        port: Any = self._port  # type: ignore[attr-defined]
        bound = port.getHost()
        self._log.info("admin endpoint listening on {host}:{port}", event="admin_listening",
                       host=bound.host, port=bound.port)


class NodeService(MultiService):
    """The root service of one labrelay process."""

    def __init__(self, config: NodeConfig, reactor: Any,
                 on_fatal: Callable[[str], object] | None = None) -> None:
        super().__init__()
        self.config = config
        self._started = reactor.seconds()
        self.links: list[Link] = []
        self.relay: Any = None
        if config.relay is not None:
            from relay.server.grants import Grants
            from relay.server.service import RelayService

            self.relay = RelayService(config.relay, Grants(config.relay, config.source), reactor)
            self.relay.setServiceParent(self)
        for index, link_config in enumerate(config.links):
            identities = load_identities(config, link_config, index)
            link = Link(link_config, reactor, identities, on_fatal=on_fatal,
                        local_relay=self.relay.core if self.relay is not None else None)
            link.setServiceParent(self)
            self.links.append(link)
        self.plain_forwards: list[Any] = []
        if config.forwards:
            from relay.agent.plainhop import PlainForward
            from relay.datapath.splicing import DatapathError

            for fwd in config.forwards:
                try:
                    plain = PlainForward(fwd, reactor, on_fatal=on_fatal)
                except DatapathError as e:
                    raise ConfigError("environment", "LABRELAY_DATAPATH", str(e)) from e
                plain.setServiceParent(self)
                self.plain_forwards.append(plain)
        if config.admin is not None:
            listen = config.admin.listen
            token = None
            if config.admin.token_file is not None:
                try:
                    token = read_token(config.admin.token_file)
                except TokenError as e:
                    raise ConfigError(config.source, "admin.token_file", str(e)) from e
            site = Site(admin_resource(self.status, AdminGate(listen.host, token)))
            site.noisy = False
            admin = AdminServer(listen.port, site, interface=listen.host, reactor=reactor)
            admin.setName("admin")
            admin.setServiceParent(self)

    def status(self) -> dict[str, Any]:
        snapshot = {**base_snapshot(os.getpid(), self._started),
                    "links": [link.status() for link in self.links]}
        if self.relay is not None:
            snapshot["relay"] = self.relay.core.status()
        if self.plain_forwards:
            snapshot["forwards"] = [f.status() for f in self.plain_forwards]
            snapshot["datapath"] = self.plain_forwards[0].datapath.status()
        return snapshot


def make_node_service(config: NodeConfig, reactor: Any,
                      on_fatal: Callable[[str], object] | None = None) -> NodeService:
    if not config.links and config.relay is None and not getattr(config, "forwards", ()):
        raise ConfigError(config.source, "link", "nothing to run: no [[link]], [relay] or "
                          "[[forward]] configured",
                          "add a [[link]] table, or give [user@]host on the command line")
    return NodeService(config, reactor, on_fatal=on_fatal)
