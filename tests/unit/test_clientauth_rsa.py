"""Which RSA signature the link's userauth uses (relay.ssh.clientauth): SHA-2 always,
the server's preference among ours when it sent ``server-sig-algs``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.conch.ssh import common, keys
from twisted.internet import defer

from relay.ssh.clientauth import LinkUserAuth, _Offer, rsa_signature


def test_the_first_of_ours_the_server_names() -> None:
    assert rsa_signature(b"ssh-ed25519,rsa-sha2-256,rsa-sha2-512") == b"rsa-sha2-512"
    assert rsa_signature(b"ssh-ed25519,rsa-sha2-256,ssh-rsa") == b"rsa-sha2-256"


def test_sha2_without_server_sig_algs_and_never_sha1() -> None:
    assert rsa_signature(None) == b"rsa-sha2-512"
    assert rsa_signature(b"ssh-rsa") == b"rsa-sha2-512"


def test_a_plain_rsa_key_is_offered_and_signs_with_sha2() -> None:
    key = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    offer = _Offer(key, b"", b"rsa-sha2-256")
    assert offer.sshType() == b"rsa-sha2-256" and offer.blob() == key.public().blob()
    signature = key.sign(b"data", signatureType=offer.signature)
    assert common.getNS(signature)[0] == b"rsa-sha2-256"
    assert key.public().verify(signature, b"data")


def test_an_rsa_certificate_is_offered_under_its_sha2_name() -> None:
    key = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    blob = common.NS(b"ssh-rsa-cert-v01@openssh.com") + b"rest of the certificate"
    offer = _Offer(key, blob, b"rsa-sha2-512")
    assert offer.sshType() == b"rsa-sha2-512-cert-v01@openssh.com"
    assert offer.blob() == blob and offer.signature == b"rsa-sha2-512"


class _AgentHeld:
    """A :class:`relay.ssh.clientauth.Signer` as an ssh-agent's key is: the private half
    is elsewhere (here: a key the test holds), the algorithm asked is recorded."""

    def __init__(self, key: keys.Key) -> None:
        self.key, self.asked = key, []  # type: ignore[var-annotated]

    def public(self) -> keys.Key:
        return self.key.public()

    def sign(self, data: bytes, signature: bytes | None = None) -> Any:
        self.asked.append(signature)
        return defer.succeed(self.key.sign(data, signatureType=signature))


def test_an_rsa_key_held_elsewhere_is_offered_and_signed_under_sha2() -> None:
    """A Signer's RSA key (ssh-agent) is offered as rsa-sha2-*, and asked to sign so."""
    key = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    held = _AgentHeld(key)
    owner = SimpleNamespace(config=SimpleNamespace(user="alice"), identities=[held])
    auth = LinkUserAuth(owner, None)  # type: ignore[arg-type]
    auth.transport = SimpleNamespace(peerExtensions={b"server-sig-algs": b"rsa-sha2-256"})
    offered = auth.getPublicKey()
    assert offered.sshType() == b"rsa-sha2-256" and offered.blob() == key.public().blob()
    signed: list[bytes] = []
    auth.signData(offered, b"data").addCallback(signed.append)
    assert held.asked == [b"rsa-sha2-256"]
    assert common.getNS(signed[0])[0] == b"rsa-sha2-256" and key.public().verify(signed[0], b"data")
