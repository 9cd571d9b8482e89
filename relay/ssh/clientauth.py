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
from relay.ssh import policy


class Signer(Protocol):
    """A key whose private half is not here: held by an ssh-agent, or still locked by
    a passphrase that is asked for only when a server accepts the public half (as
    ssh does).  ``sign`` fails when it cannot sign; the next identity is tried."""

    def public(self) -> keys.Key: ...

    def sign(self, data: bytes, signature: bytes | None = None) -> defer.Deferred[bytes]:
        """Sign ``data``; ``signature`` names the algorithm for an RSA key
        (``rsa-sha2-512``/``-256``; None: the key's own default)."""
        ...


Identity = keys.Key | Signer


class AuthOwner(Protocol):
    """What authentication needs of the link's owner (a :class:`relay.ssh.client.LinkOwner`,
    declared there; this module does not import it, so that the two make no cycle)."""

    @property
    def config(self) -> LinkConfig: ...

    @property
    def identities(self) -> Sequence[Identity]: ...


RSA_SIGNATURES = (b"rsa-sha2-512", b"rsa-sha2-256")
"""RSA signature algorithms in our order of preference (RFC 8332); never SHA-1
``ssh-rsa``, which the relay and OpenSSH 8.8+ refuse."""
_RSA_CERT = b"ssh-rsa-cert-v01@openssh.com"


def rsa_signature(server_sig_algs: bytes | None) -> bytes:
    """The RSA signature algorithm to use with a server that sent ``server-sig-algs``
    (RFC 8308) with this value, or None when it sent none: the first of ours it names,
    else ``rsa-sha2-512`` (every server since OpenSSH 7.2 takes it; ssh(1) would fall
    back to SHA-1, which the relay refuses anyway)."""
    if server_sig_algs is not None:
        named = server_sig_algs.split(b",")
        for algorithm in RSA_SIGNATURES:
            if algorithm in named:
                return algorithm
    return RSA_SIGNATURES[0]


class _Offer(keys.Key):
    """The public key Conch's client userauth offers, with the algorithm name sent for
    it: an RSA key is offered as ``rsa-sha2-512``/``-256`` (Conch would say ``ssh-rsa``
    and sign with SHA-1), and an OpenSSH certificate with its own name and blob, an RSA
    certificate as ``rsa-sha2-512-cert-v01@openssh.com`` (PROTOCOL.certkeys: the blob
    still says ``ssh-rsa-cert-v01``).  The signature is the key's own, with
    :attr:`signature` as its algorithm."""

    def __init__(self, key: keys.Key, blob: bytes, rsa: bytes) -> None:
        super().__init__(key.public()._keyObject)
        self._blob = blob or key.public().blob()
        kind = common.getNS(self._blob)[0]
        self.signature: bytes | None = None
        self._algorithm = kind
        if kind == b"ssh-rsa":
            self.signature = self._algorithm = rsa
        elif kind == _RSA_CERT:
            self.signature = rsa
            self._algorithm = rsa + b"-cert-v01@openssh.com"

    def sshType(self) -> bytes:
        return self._algorithm

    def blob(self) -> bytes:
        return self._blob


def _agent_hint(transport: Any) -> str:
    """Where an agent's key goes on the server it tried: a labrelay relay's grants
    (its version line says so), or that user's ``authorized_keys`` on a stock sshd."""
    if policy.labrelay_peer(getattr(transport, "otherVersionString", None)):
        return ("add the agent's public key to the relay's agents file (agents_file, or "
                "a [[relay.agent]]'s keys): ask the relay's admin")
    return "add the agent's public key to that user's authorized_keys"


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
        public = (self._current if isinstance(self._current, keys.Key)
                  else self._current.public())
        if certificate or public.type() == "RSA":
            # A key here or a Signer (an ssh-agent's RSA key): both are offered under
            # a SHA-2 name, never as SHA-1 ``ssh-rsa``, which the relay refuses.
            transport: Any = self.transport
            extensions = getattr(transport, "peerExtensions", None) or {}
            return _Offer(public, certificate,
                          rsa_signature(extensions.get(b"server-sig-algs")))
        return public.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        assert isinstance(self._current, keys.Key)
        return defer.succeed(self._current)

    def signData(self, publicKey: keys.Key, signData: bytes) -> defer.Deferred[bytes] | None:
        """A key here signs itself; a :class:`Signer` (an ssh-agent's key, a locked
        one) is asked to."""
        if isinstance(self._current, keys.Key):
            signature = getattr(publicKey, "signature", None)
            return defer.succeed(self._current.sign(signData, signatureType=signature))
        assert self._current is not None
        return self._current.sign(signData, getattr(publicKey, "signature", None))

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        methods = common.getNS(packet)[0]
        if (not self._keys and self.lastAuth == b"publickey") or b"publickey" not in methods:
            transport: Any = self.transport  # a relay.ssh.client.LinkTransport
            transport.keysRefused = True
            transport.why = (
                f"authentication failed for user {self.user.decode()!r}: the server "
                f"accepted none of our {len(transport.link.identities)} key(s)"
                f" (it offers: {methods.decode() or 'nothing'}); "
                + (getattr(transport.link, "auth_hint", None) or _agent_hint(transport))
            )
        return super().ssh_USERAUTH_FAILURE(packet)
