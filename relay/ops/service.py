"""Builds the service tree a node config describes.

Everything that can be wrong with the configuration on disk — unreadable or
too-open key files, no identity at all — is checked here, before any service
starts, and reported as a :class:`~relay.config.errors.ConfigError`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.server import Site

from relay.agent.link import Link
from relay.config.errors import ConfigError
from relay.config.schema import LinkConfig, NodeConfig, PlainForwardConfig
from relay.ops.admincap import IDLE_TIMEOUT, capped_site, request_factory
from relay.ops.check import node_problems
from relay.ops.gcpace import CollectorPacing
from relay.ops.hangup import HangupBeforeStart
from relay.ops.metrics import MetricsRegistry
from relay.ops.notify import SystemdNotifier
from relay.ops.parts import default_parts
from relay.ops.reload import Reloader
from relay.ops.status import (
    AdminGate,
    TokenError,
    TokenFile,
    admin_resource,
    base_snapshot,
    read_token,
)
from relay.server.acceptwatch import name_listener
from relay.ssh.identity import load_identities


class AdminServer(TCPServer):
    """The admin endpoint's listener; says where it listens once it does.

    A port it cannot bind (another labrelay holds it) is a fatal error of the node,
    told in one line through ``on_fatal``: Twisted raised ``CannotListenError`` out of
    ``startService``, which under twistd logged a traceback and under ``labrelay``
    left the node running without its admin endpoint (and without telling systemd
    it was ready: the services after it never started)."""

    _log = Logger()
    on_fatal: Callable[[str], object] | None = None
    _cannot_listen = False

    def _getPort(self) -> Any:
        if self._cannot_listen:
            return None
        try:
            return super()._getPort()  # type: ignore[misc]
        except CannotListenError as e:
            if self.on_fatal is None:
                raise
            self._cannot_listen = True
            why = getattr(e.socketError, "strerror", None) or str(e.socketError)
            host, port = e.interface or "0.0.0.0", e.port
            self.on_fatal(f"admin endpoint cannot listen on {host}:{port}: {why} (is another "
                          "labrelay running? change [admin] listen, or stop what holds the port)")
            return None

    def startService(self) -> None:
        super().startService()
        port: Any = self._port  # type: ignore[attr-defined]
        if port is None:
            return
        bound = port.getHost()
        name_listener(port, "admin")
        self._log.info("admin endpoint listening on {host}:{port}", event="admin_listening",
                       host=bound.host, port=bound.port)


class NodeService(MultiService):
    """The root service of one labrelay process.

    With ``load`` (how to read the config again) it can reload: a :class:`Reloader`
    with the default parts (:mod:`relay.ops.parts`) is :attr:`reloader`, reached by
    SIGHUP (``handle_sighup``, set by the command line and twistd, never by tests
    that build a node in-process) and by ``POST /reload`` on the admin endpoint.

    ``pace_gc`` (also the command line's and twistd's only: the collector is the
    process's) collects cyclic garbage at a steady pace between sessions' turns
    (:mod:`relay.ops.gcpace`).

    ``session_debug`` false (``labrelay`` without ``-v``) tells its links not to emit
    their per-session debug events (:class:`relay.agent.link.Link`)."""

    _log = Logger()

    def __init__(self, config: NodeConfig, reactor: Any,
                 on_fatal: Callable[[str], object] | None = None, *,
                 load: Callable[[], NodeConfig] | None = None,
                 notifier: SystemdNotifier | None = None,
                 handle_sighup: bool = False, pace_gc: bool = False,
                 session_debug: bool = True, hangup: HangupBeforeStart | None = None) -> None:
        super().__init__()
        self.config = config
        self.session_debug = session_debug
        self.reactor = reactor
        self._on_fatal = on_fatal
        self._started = reactor.seconds()
        self.notifier = notifier
        self._handle_sighup = handle_sighup
        # Run at each SIGHUP before the reload: twistd's --logfile is reopened here
        # (relay.ops.tap), so logrotate's move-then-HUP starts a new file.
        self.on_hangup: list[Callable[[], object]] = []
        self.links: list[Link] = []
        self.relay: Any = None
        if config.relay is not None:
            from relay.server.grants import Grants
            from relay.server.service import RelayService

            self.relay = RelayService(config.relay, Grants(config.relay, config.source), reactor)
            self.relay.setServiceParent(self)
        for link_config in config.links:
            self.links.append(self.startLink(config, link_config))
        self.plain_forwards: list[Any] = []
        for fwd in config.forwards:
            self.plain_forwards.append(self.startPlain(fwd))
        self.reloader: Reloader | None = None
        if load is not None:
            self.reloader = Reloader(config, load, default_parts(self), reactor,
                                     check=node_problems, notifier=notifier)
        if handle_sighup and self.reloader is not None:
            # Now, not at startService: the reactor starts later (twistd's, or
            # labrelay's after its "started" line), and a SIGHUP meanwhile must reload,
            # not end the process (relay.ops.hangup).  callFromThread queues the reload
            # until the reactor runs, after startService.
            signal.signal(signal.SIGHUP, self._sighup)
            if hangup is not None and hangup.pending:
                hangup.pending = False
                self._log.info("SIGHUP came while the process was starting: reloading "
                               "once running", event="reload_requested_at_start")
                reactor.callFromThread(self.reloadNow)
        if config.admin is not None:
            listen = config.admin.listen
            token_file = None
            if config.admin.token_file is not None:
                try:
                    token_file = TokenFile(config.admin.token_file,
                                           read_token(config.admin.token_file))
                except TokenError as e:
                    raise ConfigError(config.source, "admin.token_file", str(e)) from e
            metrics = MetricsRegistry(self.status)
            reload = self.reloadNow if self.reloader is not None else None
            gate = AdminGate(listen.host, token_file=token_file)
            site = Site(admin_resource(self.status, gate,
                                       metrics=metrics.exposition, reload=reload),
                        requestFactory=request_factory(config.admin.max_body),
                        timeout=IDLE_TIMEOUT,
                        reactor=reactor)
            site.noisy = False
            # Bounded: every admin connection is a descriptor the SSH port needs too.
            admin = AdminServer(listen.port, capped_site(site, reactor, config.admin),
                                interface=listen.host, reactor=reactor)
            admin.on_fatal = on_fatal
            admin.setName("admin")
            admin.setServiceParent(self)
        self.gc_pacing: CollectorPacing | None = None
        if pace_gc:  # last: the start-up heap it freezes includes the parts above
            self.gc_pacing = CollectorPacing(reactor)
            self.gc_pacing.setServiceParent(self)

    # parts that a reload starts and stops (relay.ops.parts)

    def startLink(self, config: NodeConfig, link_config: LinkConfig) -> Link:
        index = config.links.index(link_config)
        identities = load_identities(config, link_config, index)
        link = Link(link_config, self.reactor, identities, on_fatal=self._fatalFor(),
                    local_relay=self.relay.core if self.relay is not None else None,
                    session_debug=self.session_debug)
        link.setServiceParent(self)
        return link

    def _fatalFor(self) -> Callable[[str], object] | None:
        """A part built at start-up stops the process when it cannot run (a port that
        cannot be bound); one a reload added only logs it: the node runs on."""
        return self._on_fatal if not self.running else self._lateFailure

    def _lateFailure(self, why: str) -> None:
        self._log.error("a part added by a reload cannot run: {why}",
                        event="reload_start_failed", why=why)

    def stopLink(self, link: Link) -> Any:
        return link.disownServiceParent()

    def startPlain(self, fwd: PlainForwardConfig) -> Any:
        from relay.agent.plainhop import PlainForward
        from relay.datapath.splicing import DatapathError

        try:
            plain = PlainForward(fwd, self.reactor, on_fatal=self._fatalFor())
        except DatapathError as e:
            raise ConfigError("environment", "LABRELAY_DATAPATH", str(e)) from e
        plain.setServiceParent(self)
        return plain

    def stopPlain(self, plain: Any) -> Any:
        return plain.disownServiceParent()

    # reload

    def reloadNow(self) -> dict[str, Any]:
        """Reload the config (SIGHUP, ``POST /reload``); what it did, as JSON data."""
        assert self.reloader is not None
        return self.reloader.reload().as_dict()

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._hangup)

    def _hangup(self) -> Any:
        for hook in self.on_hangup:
            try:
                hook()
            except Exception:
                self._log.failure("SIGHUP: {hook!r} failed", hook=hook)
        return self.reloadNow()

    def startService(self) -> None:
        super().startService()
        if self._handle_sighup and self.reloader is not None:
            signal.signal(signal.SIGHUP, self._sighup)
        if self.notifier is not None:
            self.notifier.ready("running: " + self._summary())
            self.notifier.start_watchdog(self.reactor)

    def stopService(self) -> Any:
        if self.notifier is not None:
            self.notifier.stopping()
            self.notifier.stop_watchdog()
        if self._handle_sighup and self.reloader is not None:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        return super().stopService()

    def _summary(self) -> str:
        parts = [f"{len(self.links)} link(s)"]
        if self.relay is not None:
            parts.append(f"relay on {self.relay.core.config.listen}")
        if self.plain_forwards:
            parts.append(f"{len(self.plain_forwards)} plain forward(s)")
        return ", ".join(parts)

    def status(self) -> dict[str, Any]:
        snapshot = {**base_snapshot(os.getpid(), self._started),
                    "links": [link.status() for link in self.links]}
        if self.relay is not None:
            snapshot["relay"] = self.relay.core.status()
        if self.plain_forwards:
            snapshot["forwards"] = [f.status() for f in self.plain_forwards]
        from relay.datapath import splicing

        datapath = splicing.status(self.reactor)
        if datapath is not None:
            snapshot["datapath"] = datapath
        elif self.plain_forwards:
            snapshot["datapath"] = self.plain_forwards[0].datapath.status()
        else:
            snapshot["datapath"] = splicing.describe(self.reactor)
        if self.reloader is not None:
            snapshot["reload"] = self.reloader.status()
        if self.gc_pacing is not None:
            snapshot["gc"] = self.gc_pacing.status()
        return snapshot


def make_node_service(config: NodeConfig, reactor: Any,
                      on_fatal: Callable[[str], object] | None = None, *,
                      load: Callable[[], NodeConfig] | None = None,
                      notifier: SystemdNotifier | None = None,
                      handle_sighup: bool = False, pace_gc: bool = False,
                      session_debug: bool = True,
                      hangup: HangupBeforeStart | None = None) -> NodeService:
    if not config.links and config.relay is None and not getattr(config, "forwards", ()):
        raise ConfigError(config.source, "link", "nothing to run: no [[link]], [relay] or "
                          "[[forward]] configured",
                          "add a [[link]] table, or give [user@]host on the command line")
    return NodeService(config, reactor, on_fatal=on_fatal, load=load, notifier=notifier,
                       handle_sighup=handle_sighup, pace_gc=pace_gc,
                       session_debug=session_debug, hangup=hangup)
