"""The relay's TLS port: SSH inside TLS, for networks that let nothing out but 443.

One listener (``[relay] tls_cert``, port 443 unless ``tls_listen`` says otherwise).
Each accepted connection asks the ``tls`` admission gate first (per-source caps and
penalties, shared with the SSH port: relay.core.admission), before a byte of TLS is
read.  The handshake must finish within ``tls_handshake_timeout``; garbage, a refused
SNI name or a client that offers only ALPN protocols the relay does not speak end it
with a ``protocol`` penalty for the source, a stalled one with ``grace-exceeded``.
The SSH server's gate is asked at accept too (without counting): a source it would
refuse after the handshake is refused before it.  Once the handshake is done the
connection leaves the TLS gate and ALPN chooses what
runs inside: ``labrelay-ssh/1`` (or no ALPN, as ``openssl s_client`` without
``-alpn`` sends) is the relay's own SSH server, built by the same factory as the SSH
port's, so the SSH gate, grants and limits apply to it unchanged.

The certificate comes from :class:`relay.transport.tlsserver.CertificateSource`, which
re-reads its files when they change (at the next handshake, or on ``reload()``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config.schema import ALPN_SSH, TLSListenConfig
from relay.core.admission import Admission, Gate, Offence, Refusal, Stage, Ticket, eviction_reason
from relay.core.burstlog import BurstLog
from relay.datapath.net import LISTEN_BACKLOG
from relay.server.acceptwatch import name_listener
from relay.server.dataport import CAP_LOG_WINDOW
from relay.transport.tlsserver import CertificateSource, WrongServerName

ALPN_OFFERED = [ALPN_SSH.encode()]


class InsideState(StrEnum):
    """``handshake`` (holding a ``tls`` gate ticket) -> ``inside`` (the handshake is done:
    the gate is left, the SSH server runs inside) or ``refused`` (the SSH port's own
    admission said no); any -> ``closed``."""

    HANDSHAKE = "handshake"
    INSIDE = "inside"
    REFUSED = "refused"
    CLOSED = "closed"


@implementer(IHandshakeListener)
class _Inside(Protocol):
    """One TLS connection until its handshake is done, then a pipe to what runs inside."""

    transport: Any

    def __init__(self, port: TLSPort, addr: Any, ticket: Ticket) -> None:
        self.port = port
        self.addr = addr
        self.ticket = ticket
        self.state = InsideState.HANDSHAKE
        self.inner: Any = None  # the SSH transport, from INSIDE on
        self.offence: Offence | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self.port.clock.callLater(self.port.config.handshake_timeout,
                                                self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        self.offence = Offence.GRACE
        self.port.counters["handshake_timeout"] += 1
        self.transport.abortConnection()

    def evict(self) -> None:
        """The ``tls`` gate dropped this connection, mid-handshake, to make room for a
        source holding fewer places (relay.core.admission; counted and logged by the
        port, no penalty): closed at once."""
        if self.state is not InsideState.HANDSHAKE:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.port.counters["handshakes"] += 1
        self.port.gate.passed(self.ticket)
        inner = self.port.ssh_factory.buildProtocol(self.addr)
        if inner is None:  # the SSH port's own admission refused it
            self.state = InsideState.REFUSED
            self.transport.abortConnection()
            return
        self.state = InsideState.INSIDE
        self.inner = inner
        inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.state is InsideState.INSIDE:
            self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        was, self.state = self.state, InsideState.CLOSED
        if was is InsideState.INSIDE:
            self.inner.connectionLost(reason)
            return
        if was is not InsideState.HANDSHAKE:
            return
        offence = self.offence
        if offence is None:
            bad = reason is not None and reason.check(SSL.Error, WrongServerName) is not None
            offence = Offence.PROTOCOL if bad else Offence.NOAUTH
            if bad:
                self.port.counters["handshake_failed"] += 1
                self.port.log.info(
                    "TLS port: handshake with {peer} failed: {why}", event="tls_refused",
                    peer=self.ticket.source, why=_reason(reason))
        self.port.gate.closed(self.ticket, offence)


def _reason(reason: Failure | None) -> str:
    if reason is None:
        return "closed"
    text = reason.getErrorMessage()
    return text[:300]


class _ProgressTLS(TLSMemoryBIOProtocol):
    """TLSMemoryBIOProtocol that tells the ``tls`` gate when the ClientHello begins: a
    handshake under way keeps its place at the full cap for ``[relay.crowding]
    handshake`` seconds, a silent socket only ``silent``."""

    def dataReceived(self, data: bytes) -> None:
        inside = self.wrappedProtocol
        if data and isinstance(inside, _Inside) and inside.state is InsideState.HANDSHAKE:
            inside.port.gate.advance(inside.ticket, Stage.HANDSHAKE)
        super().dataReceived(data)


class _AdmittingTLSFactory(TLSMemoryBIOFactory):
    """TLSMemoryBIOFactory that asks the gate before it builds anything."""

    protocol = _ProgressTLS

    def __init__(self, port: TLSPort) -> None:
        self.port = port
        super().__init__(port.source, False, Factory())
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        host = str(getattr(addr, "host", "?"))
        # The SSH server's gate first: a source that holds its share of unauthenticated
        # SSH connections (through either door) would be refused right after the
        # handshake, and the relay would have paid ~1 ms of CPU for it, without end and
        # without a penalty (a refused connection earns none).
        inner = self.port.inner_gate
        refused = inner.refuses(host) if inner is not None else None
        if refused is not None:
            self.port.gate.refused[refused.value] += 1
            verdict: Ticket | Refusal = refused
        else:
            verdict = self.port.gate.admit(host)
        if not isinstance(verdict, Ticket):
            self.port.counters["refused_at_accept"] += 1
            return None  # closed at once
        inside = verdict.owner = _Inside(self.port, addr, verdict)
        victim = verdict.take_displaced()
        if victim is not None:  # the cap was full: a source holding more gives way
            self.port.evicted(victim, host)
        return self.protocol(self, inside)


class TLSPort:
    """The TLS listener of one relay."""

    log = Logger()

    def __init__(self, config: TLSListenConfig, ssh_factory: Any, admission: Admission,
                 max_unauthenticated: int, reactor: Any, inner_gate: Gate | None = None) -> None:
        self.config = config
        self.ssh_factory = ssh_factory
        self.inner_gate = inner_gate  # the SSH server's, asked at accept too
        self.clock = reactor
        self.reactor = reactor
        self.gate = admission.gate("tls", max_unauthenticated)
        self.source = CertificateSource(config.cert, config.key, names=config.names,
                                        alpn=ALPN_OFFERED)
        self.listener: IListeningPort | None = None
        self.counters = {"handshakes": 0, "handshake_failed": 0, "handshake_timeout": 0,
                         "refused_at_accept": 0, "evicted": 0}
        # tls_evicted: handshakes closed at the full cap to admit a source holding
        # fewer places, the first of a burst in full, then a count (as relay_unauth_evicted)
        self.evictLog = BurstLog(reactor, CAP_LOG_WINDOW, self._firstEviction,
                                 self._moreEvictions)

    def evicted(self, victim: Ticket, peer: str) -> None:
        self.counters["evicted"] += 1
        self.evictLog.failed(f"{victim.source} {peer} {eviction_reason(victim)}")
        if isinstance(victim.owner, _Inside):
            victim.owner.evict()

    def _firstEviction(self, what: str) -> None:
        source, peer, why = what.split(" ", 2)
        self.log.warn("TLS port: closed a handshake of {source}, {why}, to admit {peer}: "
                      "{n} handshakes under way (max_unauthenticated)", event="tls_evicted",
                      source=source, peer=peer, why=why, n=self.gate.total, count=1)

    def _moreEvictions(self, count: int, what: str) -> None:
        source, peer, why = what.split(" ", 2)
        self.log.warn("TLS port: closed {count} more handshakes in the last {window:.0f}s to "
                      "admit others, the last of {source}, {why}, for {peer} "
                      "(max_unauthenticated)", event="tls_evicted", source=source, peer=peer,
                      why=why, n=self.gate.total, count=count, window=self.evictLog.window)

    def start(self) -> None:
        self.listener = self.reactor.listenTCP(
            self.config.listen.port, _AdmittingTLSFactory(self), backlog=LISTEN_BACKLOG,
            interface=self.config.listen.host)
        name_listener(self.listener, "TLS")
        self.log.info("TLS port {port} on {bind} (ALPN {alpn}; certificate sha256 "
                      "{fingerprint} for {names}, not after {not_after})",
                      event="relay_tls_listening", port=self.bound_port,
                      bind=self.config.listen.host, alpn=ALPN_SSH,
                      fingerprint=self.source.fingerprint, names=",".join(self.source.names),
                      not_after=self.source.not_after)

    @property
    def bound_port(self) -> int:
        if self.listener is None:
            return 0
        return int(self.listener.getHost().port)  # type: ignore[attr-defined]

    def reload(self) -> bool:
        """Read the certificate files again if they changed (see CertificateSource)."""
        return self.source.reload()

    def stop(self) -> Any:
        self.evictLog.stop()
        listener, self.listener = self.listener, None
        if listener is not None:
            return listener.stopListening()
        return None

    def status(self) -> dict[str, Any]:
        return {"port": self.bound_port, "certificate": self.source.status(),
                "gate": self.gate.status(), **self.counters}
