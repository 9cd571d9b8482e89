"""The relay as a service: its SSH listener around a :class:`RelayCore`, and the host
keys it presents (generated into the state directory on first start)."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger, globalLogPublisher

from relay.config.errors import ConfigError
from relay.config.schema import HostPort, RelayConfig
from relay.server.acceptwatch import AcceptWatch, name_listener
from relay.server.grants import Grants
from relay.server.hostkeyfile import load_host_keys, read_next_host_key
from relay.server.relay import RelayCore
from relay.server.tlsport import TLSPort
from relay.ssh.hostkeys import fingerprint_sha256
from relay.ssh.server import RelayFactory
from relay.transport.tlsserver import CertificateError


class RelayService(MultiService):
    """The relay's listener plus its core, as a service."""

    _log = Logger()

    def __init__(self, config: RelayConfig, grants: Grants, reactor: Any,
                 log_publisher: Any = None) -> None:
        super().__init__()
        self.setName("relay")
        self.core = RelayCore(config, grants, reactor)
        # Twisted logs a listener's failed accept (EMFILE …) only as library chatter;
        # the watch turns it into relay_accept_failed while the relay runs.
        self.accept_watch = AcceptWatch(reactor, self.core.counters)
        self._publisher = globalLogPublisher if log_publisher is None else log_publisher
        host_keys = load_host_keys(config.state_dir)
        next_keys = ([] if config.next_host_key is None
                     else [read_next_host_key(config.next_host_key)])
        self.factory = RelayFactory(self.core, host_keys, next_keys)
        self.fingerprints = [fingerprint_sha256(k.public()) for k in host_keys.values()]
        self.next_fingerprints = [fingerprint_sha256(k.public()) for k in next_keys]
        self.server = TCPServer(config.listen.port, self.factory,
                                interface=config.listen.host, reactor=reactor)
        self.server.setServiceParent(self)
        self.tls: TLSPort | None = None
        if config.tls is not None:
            try:
                self.tls = TLSPort(config.tls, self.factory, self.core.admission,
                                   config.max_unauthenticated, reactor,
                                   inner_gate=self.core.ssh_gate)
            except CertificateError as e:
                raise ConfigError(str(config.tls.cert), "relay.tls_cert", str(e),
                                  "tls_cert and tls_key are PEM files, e.g. certbot's "
                                  "fullchain.pem and privkey.pem") from None
            self.core.extra_status["tls"] = self.tls.status

    def startService(self) -> None:
        self._publisher.addObserver(self.accept_watch)
        super().startService()
        self.core.start()
        if self.tls is not None:
            self.tls.start()
        port = self.server._port  # type: ignore[attr-defined]
        bound = port.getHost().port if port is not None else self.core.config.listen.port
        if port is not None:
            name_listener(port, "SSH")
        self.core.bound = HostPort(self.core.config.listen.host, bound)
        self._log.info(
            "relay listening on {host}:{port}; host key {fingerprints}{announced}",
            event="relay_listening", host=self.core.config.listen.host, port=bound,
            fingerprints=" ".join(self.fingerprints),
            next_host_keys=" ".join(self.next_fingerprints),
            announced="".join(f"; next host key {fp} (announced to clients)"
                              for fp in self.next_fingerprints),
        )

    def setNextHostKey(self, path: Any) -> str:
        """Announce ``path``'s key (or none) to the clients that log in from now on,
        beside the current key (a reload of ``[relay] next_host_key``), and again to the
        labrelay agents connected now.  A key that
        cannot be read now (it changed since the reload's check) keeps the running one,
        and says so."""
        from relay.server.hostkeyfile import read_next_host_key
        from relay.ssh.hostkeyupdate import HostKeyProver

        try:
            next_keys = [] if path is None else [read_next_host_key(path)]
        except ConfigError as e:
            self._log.warn("reload: {error}; the running next host key stays",
                           event="reload_next_host_key_failed", error=str(e))
            return "relay: next_host_key not changed (unreadable)"
        self.factory.hostKeyProver = HostKeyProver(
            [*self.factory.privateKeys.values(), *next_keys])
        self.next_fingerprints = [fingerprint_sha256(k.public()) for k in next_keys]
        # Logins from now on are told at login; labrelay agents already connected are
        # told again now (hostkeys-again@labrelay), so that they need not reconnect
        # before the swap.  Stock clients connected now learn it at their next login.
        told = sum(1 for conn in list(self.core.connections) if conn.reannounceHostKeys())
        if not next_keys:
            return "relay: no next host key"
        return ("relay: next host key " + " ".join(self.next_fingerprints)
                + f" announced to clients (told again to {told} connected labrelay "
                + ("agent)" if told == 1 else "agents)"))

    def reloadCertificates(self) -> bool:
        """Read the TLS certificate files again if they changed (a reload signal may
        call this; new handshakes also check by themselves).  True if it changed."""
        return self.tls.reload() if self.tls is not None else False

    def stopService(self) -> defer.Deferred[Any]:
        self._publisher.removeObserver(self.accept_watch)
        self.accept_watch.stop()
        if self.tls is not None:
            self.tls.stop()
        for conn in list(self.core.connections):
            conn.disconnect("relay shutting down")
        d: defer.Deferred[Any] = self.core.stop()
        return d.addCallback(lambda _: MultiService.stopService(self))
