"""The link's user authentication: public keys, certificates first, and signers.

Part of :mod:`relay.ssh.client`: :class:`LinkUserAuth` offers the link's identities
(a key here, or a :class:`Signer` whose private half is elsewhere: an ssh-agent, a
key still locked by its passphrase), an OpenSSH certificate before its plain key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.conch.ssh import common, keys, service, userauth
from twisted.internet import defer

from relay.config.schema import LinkConfig


class Signer(Protocol):
    """A key whose private half is not here: held by an ssh-agent, or still locked by
    a passphrase that is asked for only when a server accepts the public half (as
    ssh does).  ``sign`` fails when it cannot sign; the next identity is tried."""

    def public(self) -> keys.Key: ...

    def sign(self, data: bytes) -> defer.Deferred[bytes]: ...


Identity = keys.Key | Signer


class AuthOwner(Protocol):
    """What authentication needs of the link's owner (a :class:`relay.ssh.client.LinkOwner`,
    declared there; this module does not import it, so that the two make no cycle)."""

    @property
    def config(self) -> LinkConfig: ...

    @property
    def identities(self) -> Sequence[Identity]: ...


class _Certificate(keys.Key):
    """The public key Conch's client userauth offers, for an OpenSSH certificate: the
    certificate's algorithm name and blob are sent, and the signature is the certified
    key's own (PROTOCOL.certkeys)."""

    def __init__(self, key: keys.Key, blob: bytes) -> None:
        super().__init__(key.public()._keyObject)
        self._key = key
        self._blob = blob

    def sshType(self) -> bytes:
        return common.getNS(self._blob)[0]

    def blob(self) -> bytes:
        return self._blob


class LinkUserAuth(userauth.SSHUserAuthClient):
    """Public-key authentication with the link's identities, nothing else; an identity
    with a certificate beside it (:class:`relay.ssh.identity.CertifiedKey`) offers the
    certificate first, then the plain key, as ssh(1) does."""

    preferredOrder = [b"publickey"]

    def __init__(self, link: AuthOwner, conn: service.SSHService) -> None:
        super().__init__(link.config.user.encode(), conn)
        self._keys: list[tuple[Identity, bytes]] = []
        for key in link.identities:
            certificate = getattr(key, "certificate", b"")
            if certificate:
                self._keys.append((key, certificate))
            self._keys.append((key, b""))
        self._current: Identity | None = None

    def getPublicKey(self) -> Any:
        if not self._keys:
            return None
        self._current, certificate = self._keys.pop(0)
        if certificate and isinstance(self._current, keys.Key):
            return _Certificate(self._current, certificate)
        return self._current.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        assert isinstance(self._current, keys.Key)
        return defer.succeed(self._current)

    def signData(self, publicKey: keys.Key, signData: bytes) -> defer.Deferred[bytes] | None:
        """A key here signs itself; a :class:`Signer` (an ssh-agent's key, a locked
        one) is asked to."""
        if isinstance(self._current, keys.Key):
            return super().signData(publicKey, signData)
        assert self._current is not None
        return self._current.sign(signData)

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        methods = common.getNS(packet)[0]
        if (not self._keys and self.lastAuth == b"publickey") or b"publickey" not in methods:
            transport: Any = self.transport  # a relay.ssh.client.LinkTransport
            transport.why = (
                f"authentication failed for user {self.user.decode()!r}: the server "
                f"accepted none of our {len(transport.link.identities)} key(s)"
                f" (it offers: {methods.decode() or 'nothing'}); "
                + getattr(transport.link, "auth_hint",
                          "add the agent's public key to that user's authorized_keys")
            )
        return super().ssh_USERAUTH_FAILURE(packet)
