"""Test keys and the config entries that grant them services (part of :mod:`relay.testing`).

:func:`new_key` and :class:`KeyRing`: what tests of grants, authentication and the
relay's registry need of a key, without touching the file system.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh import keys

from relay.config.schema import PrincipalConfig, ServiceGrant


@dataclass(frozen=True)
class TestKey:
    """An ed25519 key pair and the forms tests need of it."""

    __test__ = False  # not a pytest test class, despite its name

    key: keys.Key
    comment: str

    @property
    def public(self) -> str:
        """``ssh-ed25519 AAAA...`` (no comment): what an authorized_keys line starts with."""
        return str(self.key.public().toString("OPENSSH").decode())

    @property
    def line(self) -> str:
        """``ssh-ed25519 AAAA... comment``: a public-key line as configs hold it."""
        return f"{self.public} {self.comment}"

    @property
    def blob(self) -> bytes:
        """The SSH wire form of the public key (what a connection's identity carries)."""
        return bytes(self.key.public().blob())


def new_key(comment: str = "labrelay-test", seed: int | None = None) -> TestKey:
    """A fresh ed25519 key; with ``seed`` (0..255) the same key on every run, for
    inputs that must replay identically (fuzz corpora)."""
    if seed is None:
        private = Ed25519PrivateKey.generate()
    else:
        private = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return TestKey(keys.Key(private), comment)


def _grants(services: tuple[str | ServiceGrant, ...]) -> tuple[ServiceGrant, ...]:
    out = []
    for s in services:
        if isinstance(s, ServiceGrant):
            out.append(s)
        else:
            name, _, port = s.rpartition(":")
            out.append(ServiceGrant(name.lower(), None if port == "*" else int(port)))
    return tuple(out)


class KeyRing:
    """Keys by principal name, made on first use, and the config entries granting them.

    ``ring.agent("lab_pc", "gpu-cluster:22")`` is a ``PrincipalConfig`` for a
    ``RelayConfig``'s ``agents``; ``ring.blob("lab_pc")`` is what that agent's SSH
    connection would authenticate with.  Services are ``"name:port"`` or ``"name:*"``
    strings, or ``ServiceGrant``s.
    """

    def __init__(self) -> None:
        self._keys: dict[str, TestKey] = {}

    def __getitem__(self, name: str) -> TestKey:
        if name not in self._keys:
            self._keys[name] = new_key(name)
        return self._keys[name]

    def line(self, name: str) -> str:
        return self[name].line

    def blob(self, name: str) -> bytes:
        return self[name].blob

    def agent(self, name: str, *services: str | ServiceGrant,
              public_ports: tuple[int, ...] = ()) -> PrincipalConfig:
        return PrincipalConfig("agent", name, (self.line(name),), _grants(services),
                               public_ports=public_ports)

    def user(self, name: str, *services: str | ServiceGrant,
             max_sessions: int | None = None) -> PrincipalConfig:
        return PrincipalConfig("user", name, (self.line(name),), _grants(services),
                               max_sessions=max_sessions)
