"""Public-key authentication on the relay's SSH server: the principal a verified key
belongs to (:class:`GrantChecker`, :class:`Identity`) and Conch's userauth with the
relay's grace time, attempt cap and limits on what a peer may make it keep or log
before authentication (:class:`RelayUserAuth`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.conch import error
from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common, keys, userauth
from twisted.conch.ssh.transport import DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config.schema import RelayConfig
from relay.core.admission import Offence
from relay.core.certs import CertVerdict, is_certificate, key_fingerprint, parse_certificate
from relay.core.grants import Principal
from relay.ssh import policy

USER_NAME_LIMIT = 256
"""Bytes of a user name the relay keeps (identity comes from the key; the name is only
logged).  A longer name fails that attempt, so no peer string of up to a packet's size
is held or logged before authentication (the log shows at most 200 characters)."""
NAME_LIMIT = 64
"""Bytes of an authentication method or service name kept before authentication."""

class PrincipalLookup(Protocol):
    """The grants, as far as authentication needs them."""

    def principal_for(self, key_blob: bytes, login: str | None = None) -> Principal | None:
        """The principal a public key (SSH wire blob) belongs to, if granted (a
        certificate: as it logged in as ``login``)."""

    def authenticate(self, key_blob: bytes, login: str, address: str) -> CertVerdict:
        """Whether a key or certificate may log in now as ``login`` from ``address``:
        its principal, or the reason it may not (``expiry-time``, ``from=``, a
        certificate's checks, the KRL)."""

    def remember(self, key_blob: bytes, login: str, address: str) -> None:
        """The key or certificate logged in: its signature verified."""


class AuthHandler(Protocol):
    """What authentication needs of the relay: its settings, clock and grants (the
    first part of :class:`relay.ssh.server.RelayHandler`)."""

    @property
    def config(self) -> RelayConfig: ...

    @property
    def reactor(self) -> Any: ...

    @property
    def grants(self) -> PrincipalLookup: ...

    def connectionRefusal(self, identity: Identity) -> str | None:
        """Why a connection that just authenticated as ``identity`` may not start now
        (``max_connections_per_user``), or None."""


@dataclass(frozen=True)
class Identity:
    """Who a connection authenticated as: the verified key, its principal and the login
    name it gave (a certificate's grants depend on it, and one certificate may be logged
    in under two names at once: each connection is checked as its own)."""

    key_blob: bytes
    principal: Principal
    login: str = ""
    address: str = ""  # the peer's address the login was checked from (from=, source-address)

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def kind(self) -> str:
        return self.principal.kind


@implementer(ICredentialsChecker)
class GrantChecker:
    """Public keys only; a key maps to a principal through the grants."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, core: AuthHandler) -> None:
        self.core = core

    def requestAvatarId(self, credentials: Any) -> Any:
        login = (credentials.username or b"").decode("utf-8", "replace")
        verdict = self.core.grants.authenticate(credentials.blob, login,
                                                getattr(credentials, "peer", ""))
        principal = verdict.principal
        if principal is None:
            return defer.fail(UnauthorizedLogin(verdict.reason or "key not granted"))
        if not credentials.signature:
            return defer.fail(error.ValidPublicKey())
        try:
            # Only the algorithms server-sig-algs names: a client that signs with
            # SHA-1 ``ssh-rsa`` anyway (OpenSSH refuses it since 8.8) is refused.
            signed_with = common.getNS(credentials.signature)[0]
            if signed_with not in policy.USER_KEY_ALGORITHMS:
                return defer.fail(UnauthorizedLogin(
                    f"signature algorithm {signed_with[:40]!r} is not accepted "
                    f"(use one of {b','.join(policy.USER_KEY_ALGORITHMS).decode()})"))
            if is_certificate(credentials.blob):
                key = keys.Key(parse_certificate(credentials.blob).public_key())
            else:
                key = keys.Key.fromString(credentials.blob)
            if key.verify(credentials.signature, credentials.sigData):
                self.core.grants.remember(credentials.blob, login,
                                          getattr(credentials, "peer", ""))
                return defer.succeed(Identity(credentials.blob, principal, login,
                                              getattr(credentials, "peer", "")))
        except Exception:  # a malformed key or signature is a failed login
            pass
        return defer.fail(UnauthorizedLogin("bad signature"))


class RelayAvatar(ConchUser):
    """Carries the identity to the connection; Conch's channel lookup is unused."""

    def __init__(self, identity: Identity) -> None:
        super().__init__()
        self.identity = identity


class _PeerPortal:
    """The factory's portal, adding the peer's address to every credential: ``from=``
    and a certificate's ``source-address`` are decided with it."""

    def __init__(self, portal: Any, address: str) -> None:
        self._portal = portal
        self._address = address

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Any:
        credentials.peer = self._address
        return self._portal.login(credentials, mind, *interfaces)


class RelayUserAuth(userauth.SSHUserAuthServer):
    """Conch's userauth with the relay's grace time and attempt cap, and OpenSSH user
    certificates (which Conch cannot parse) accepted by the grants."""

    _noneAnswered = False  # the connection's first ``none`` was answered (it is free)
    _exhausted = False  # max_auth_tries used up: charged and logged once

    def serviceStarted(self) -> None:
        core: AuthHandler = self.transport.factory.core  # type: ignore[union-attr]
        self.loginTimeout = core.config.login_grace  # type: ignore[assignment]
        # Conch disconnects once its count *exceeds* this, so it would check one key
        # more than max_auth_tries; sshd's MaxAuthTries ends at the last failure.
        self.attemptsBeforeDisconnect = core.config.max_auth_tries - 1
        self.clock = core.reactor
        super().serviceStarted()
        self.supportedAuthentications = [b"publickey"]
        peer = self.transport.transport.getPeer()  # type: ignore[union-attr]
        self.portal = _PeerPortal(self.portal, str(getattr(peer, "host", "")))

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
        """Conch's, except that an overlong user name, service or method fails the
        attempt at once (counted against ``max_auth_tries``) and only its first bytes
        are kept."""
        user, next_service, method, _ = common.getNS(packet, 3)
        if (len(user) <= USER_NAME_LIMIT and len(next_service) <= NAME_LIMIT
                and len(method) <= NAME_LIMIT):
            return super().ssh_USERAUTH_REQUEST(packet)
        self.authenticatedWith = []
        self.user, self.nextService = user[:USER_NAME_LIMIT], next_service[:NAME_LIMIT]
        self.method = method[:NAME_LIMIT]
        why = (f"user name, service or method too long ({len(user)}, {len(next_service)} "
               f"and {len(method)} bytes; at most {USER_NAME_LIMIT}, {NAME_LIMIT}, "
               f"{NAME_LIMIT})")
        if self.method != b"publickey":
            # _ebBadAuth logs only a refused key; an overlong name is refused whatever the
            # method, and operations.md says it is logged as such.
            self._log.info(
                "auth refused for user {user} from {peer} (key {key}): {why}",
                event="relay_auth_refused", user=self.user.decode("utf-8", "replace"),
                why=why, peer=self.transport.peerName(),  # type: ignore[union-attr]
                key=key_fingerprint(None),
            )  # fmt: skip
        self._ebBadAuth(Failure(UnauthorizedLogin(why)))
        return None

    def auth_publickey(self, packet: bytes) -> Any:
        """Conch's, after refusing a key blob Conch cannot parse as an SSH wire blob:
        Conch would log the peer's algorithm name as part of a log *format*
        (``str.format`` of peer bytes), which lets a peer inject ``{...}`` fields, and
        crash on non-ASCII; and it guesses the blob's format (``Key.fromString`` without
        a type), so a blob that looks like an LSH key reached an ``assert`` in its
        s-expression parser before authentication (found by tests/fuzz ``userauth``)."""
        self._offered: bytes | None = None  # named in relay_auth_refused if it fails
        try:
            algorithm, blob, rest = common.getNS(packet[1:], 2)
            self._offered = blob
            if is_certificate(blob):
                return self._authCertificate(packet, algorithm, blob, rest)
            keys.Key.fromString(blob, type="blob")
        except Exception:  # a key Conch cannot parse is a failed login, nothing more
            return defer.fail(UnauthorizedLogin("unsupported key type or malformed key"))
        return super().auth_publickey(packet)

    def _authCertificate(self, packet: bytes, algorithm: bytes, blob: bytes,
                         rest: bytes) -> Any:
        """Conch's ``auth_publickey`` for a certificate: the same signed data (RFC 4252
        §7, with the certificate as the key blob), checked by :class:`GrantChecker`."""
        hasSig = packet[0]
        if not hasSig:
            c = SSHPrivateKey(self.user, algorithm, blob, None, None)
            return self.portal.login(c, None, IConchUser).addErrback(
                self._ebCheckKey, packet[1:])
        signature = common.getNS(rest)[0]
        transport: Any = self.transport
        user: bytes = self.user or b""
        service: bytes = self.nextService or b""
        signed = (common.NS(transport.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,))
                  + common.NS(user) + common.NS(service)
                  + common.NS(b"publickey") + bytes((hasSig,)) + common.NS(algorithm)
                  + common.NS(blob))
        c = SSHPrivateKey(self.user, algorithm, blob, signed, signature)
        return self.portal.login(c, None, IConchUser)

    def _cbFinishedAuth(self, result: Any) -> None:
        """Conch's, unless the principal already holds ``max_connections_per_user``
        connections: then the client is told so (``DISCONNECT_TOO_MANY_CONNECTIONS``,
        which OpenSSH prints) and the connection ends.  The key was valid, so this is
        no offence of its source's (behind a NAT, others share that source)."""
        _interface, avatar, logout = result
        core: AuthHandler = self.transport.factory.core  # type: ignore[union-attr]
        why = core.connectionRefusal(avatar.identity)
        if why is None:
            super()._cbFinishedAuth(result)
            return
        logout()
        relay: Any = self.transport
        relay.refuseAuthenticated(why)

    def _ebBadAuth(self, reason: Failure) -> None:
        """Conch's, with the relay's accounting: a failed ``publickey`` attempt is
        logged and is an ``authfail`` offence of the source; every ``none`` after the
        connection's first counts against ``max_auth_tries`` (Conch never counted
        one); and the attempt past ``max_auth_tries``, whatever its methods, is an
        ``authfail`` offence too (sshd charges MaxAuthTries exceeded so)."""
        if self.method == b"none" and not reason.check(error.IgnoreAuthentication):
            if self._noneAnswered and self._countNone():
                return
            self._noneAnswered = True
        elif self.method == b"publickey" and reason.check(UnauthorizedLogin):
            relay: Any = self.transport
            relay.offended(Offence.AUTHFAIL)
            self._log.info(
                "auth refused for user {user} from {peer} (key {key}): {why}",
                event="relay_auth_refused",
                user=(self.user or b"").decode("utf-8", "replace"),
                why=reason.getErrorMessage(),
                peer=relay.peerName(),  # host:port, as every other event has it
                key=key_fingerprint(getattr(self, "_offered", None)),
            )
        super()._ebBadAuth(reason)
        if self.loginAttempts > self.attemptsBeforeDisconnect:  # Conch disconnected
            self._triesExhausted()

    def _countNone(self) -> bool:
        """Count a ``none`` request that is not the connection's first as a failed
        attempt, as sshd does (auth2.c ``userauth_finish``: only an initial ``none``
        is free).  Every client sends one ``none`` to learn the methods; Conch
        answered any number of them without counting, so one connection could keep
        asking until ``login_grace``.  True if this one exhausted ``max_auth_tries``
        (the connection is closing)."""
        self.loginAttempts += 1
        if self.loginAttempts <= self.attemptsBeforeDisconnect:
            return False
        self._triesExhausted()
        self.transport.sendDisconnect(  # type: ignore[union-attr]
            DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many bad auths")
        return True

    def _triesExhausted(self) -> None:
        """The connection used its ``max_auth_tries``: an ``authfail`` offence (sshd's
        PerSourcePenalties charge ``authfail`` for MaxAuthTries exceeded), logged."""
        if self._exhausted:  # a check that finished after the disconnect
            return
        self._exhausted = True
        relay: Any = self.transport
        relay.offended(Offence.AUTHFAIL)
        core: AuthHandler = relay.factory.core
        self._log.info(
            "closing {peer}: {tries} failed authentication attempts (max_auth_tries)",
            event="relay_auth_tries_exceeded", peer=relay.peerName(),
            tries=core.config.max_auth_tries)
