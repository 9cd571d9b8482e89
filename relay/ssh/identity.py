"""Loading the agent's private key (its identity) from an OpenSSH key file.

Accepted: the OpenSSH format (``-----BEGIN OPENSSH PRIVATE KEY-----``, ssh-keygen's
default: ed25519, ecdsa-256/384/521, rsa) and PEM files (``RSA``/``EC PRIVATE KEY``
and unencrypted PKCS#8 ``PRIVATE KEY``).  Refused, each with its own message: a
missing or non-regular file, a file group or others may access (as OpenSSH refuses
it), a public key, a passphrase-protected key (the agent runs unattended and has no
one to ask) and anything that is not a key.
"""

from __future__ import annotations

import base64
import os
import shlex
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_public_identity,
)
from twisted.conch.ssh.keys import EncryptedKeyError, Key

from relay.config.errors import ConfigError
from relay.config.schema import LinkConfig, NodeConfig

_MAX_KEY_FILE = 1024 * 1024  # the largest RSA key file is ~20 KiB
_DEFAULT_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")
_PUBLIC_PREFIXES = (b"ssh-", b"ecdsa-", b"sk-", b"---- BEGIN SSH2 PUBLIC KEY")


class IdentityError(Exception):
    """An identity file that cannot be used: ``str(err)`` names the file, what is
    wrong with it and how to fix it."""

    def __init__(self, path: Path, problem: str, hint: str = "") -> None:
        self.path = path
        self.problem = problem
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"identity file '{self.path}': {self.problem}"
        return text + (f"; {self.hint}" if self.hint else "")


def default_identity_paths(home: Path | None = None) -> list[Path]:
    """``~/.ssh/id_ed25519``, ``id_ecdsa`` and ``id_rsa``, in that order, those that exist."""
    ssh_dir = (home if home is not None else Path.home()) / ".ssh"
    return [ssh_dir / name for name in _DEFAULT_NAMES if (ssh_dir / name).is_file()]


class CertifiedKey(Key):
    """A private key with the OpenSSH certificate found beside it (``KEY-cert.pub``, as
    ssh(1) loads it): the link offers the certificate first, then the plain key.

    :attr:`certificate` reads that file again each time (each login the link makes), as
    each new ssh(1) process does: a certificate renewed on disk before the old one
    expires (a job running ``ssh-keygen -s``, ``step ssh renew``) is what the agent
    offers when the relay ends the expired one's connection and the link comes back,
    not the expired one it started with until someone restarts it.  A file that is
    missing, unreadable or for another key means the plain key only."""

    def __init__(self, keyObject: Any, path: Path) -> None:
        super().__init__(keyObject)
        self.path = path  # the private key's file; its certificate is PATH-cert.pub

    @property
    def certificate(self) -> bytes:
        """The certificate's SSH wire blob, read now (empty if there is none)."""
        return _certificate_beside(self.path, self)


def load_identity(path: Path) -> Key:
    """The private key in ``path``, or :class:`IdentityError`; a :class:`CertifiedKey`
    when ``path-cert.pub`` holds an OpenSSH certificate of that key (Ed25519, ECDSA or
    RSA; an RSA one is offered with SHA-2 signatures, :mod:`relay.ssh.clientauth`).

    The file must be a regular file that neither group nor others can read or
    write (``mode & 0o077 == 0``), like OpenSSH requires.
    """
    path = path.expanduser()
    data = _read_private_file(path)
    key = _parse(path, data)
    if key.isPublic():
        raise _public_key_error(path)
    # Always a CertifiedKey: a certificate put beside the key later is offered too.
    return CertifiedKey(key._keyObject, path)


def _certificate_beside(path: Path, key: Key) -> bytes:
    """The blob of ``path``-cert.pub if it certifies ``key``; else empty (a stale or
    unrelated certificate file is ignored, as ssh ignores it)."""
    cert_path = path.with_name(path.name + "-cert.pub")
    if not cert_path.is_file():
        return b""
    try:
        fields = cert_path.read_text().split()
        blob = base64.b64decode(fields[1])
        cert = load_ssh_public_identity(f"{fields[0]} {fields[1]}".encode())
        signed = Key(cert.public_key()).blob()  # type: ignore[union-attr]
    except Exception:  # unreadable or not a certificate: the plain key is still used
        return b""
    return blob if signed == key.public().blob() else b""


def read_key_file(path: Path) -> bytes:
    """The bytes of private key file ``path``, checked as :func:`load_identity` checks
    it (a regular file, mode 600, not a public key), or :class:`IdentityError`."""
    return _read_private_file(path.expanduser())


def parse_key(path: Path, data: bytes, passphrase: bytes | None = None) -> Key:
    """The private key in ``data`` (read from ``path``), unlocked by ``passphrase``;
    :class:`EncryptedKeyError` when it needs one (or a different one)."""
    if passphrase is None:
        try:
            return _parse(path, data)
        except IdentityError as e:
            if e.problem.startswith("is protected by a passphrase"):
                raise EncryptedKeyError(str(e)) from None
            raise
    if data.lstrip().startswith((b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
                                 b"-----BEGIN PRIVATE KEY-----")):
        try:
            return Key(load_pem_private_key(data, password=passphrase))
        except (TypeError, ValueError):
            raise EncryptedKeyError(f"'{path}': wrong passphrase") from None
    try:
        return Key.fromString(data, passphrase=passphrase)
    except Exception:  # Conch: BadKeyError ("check ints"), ValueError, ...
        raise EncryptedKeyError(f"'{path}': wrong passphrase") from None


def _read_private_file(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            path,
            "no such file",
            f"fix the path, or create a key with: ssh-keygen -t ed25519 -N '' -f {_quote(path)}",
        ) from None
    except OSError as e:
        raise IdentityError(path, f"cannot be examined: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IdentityError(
            path, "is a directory, not a private key file", "name the key file itself"
        )
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(path, "is not a regular file", "name the private key file itself")
    if st.st_size > _MAX_KEY_FILE:
        raise IdentityError(
            path, f"is {st.st_size} bytes, too large to be a private key", "name the key file"
        )
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except OSError as e:
        raise IdentityError(
            path,
            f"cannot be read: {e.strerror or e}",
            "make it readable by the user running labrelay (mode 600, owned by that user)",
        ) from None
    if _looks_public(data):
        # Before the mode check: "chmod 600" would be the wrong advice for a .pub file.
        raise _public_key_error(path)
    if mode & 0o077:
        raise IdentityError(
            path,
            f"Permissions {mode:04o} for '{path}' are too open: a private key must not be "
            "accessible by group or others, so it is ignored",
            f"run: chmod 600 {_quote(path)}",
        )
    return data


def _parse(path: Path, data: bytes) -> Key:
    text = data.lstrip()
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in text:
        raise _encrypted_key_error(path)
    if text.startswith(b"-----BEGIN PRIVATE KEY-----"):
        return _parse_pkcs8(path, data)
    try:
        return Key.fromString(data)
    except EncryptedKeyError:
        raise _encrypted_key_error(path) from None
    except Exception:  # Conch raises many kinds on malformed input
        # Never Conch's own message: "cannot guess the type of b'...'" quotes the whole
        # file, so a private key with a damaged first line went into the log, the
        # journal (ExecStartPre's check) and `labrelay check`'s output.  Only what the
        # file's shape says, which holds nothing secret.
        raise IdentityError(
            path,
            f"is not a supported private key ({_shape(data)})",
            "use an OpenSSH private key file (ed25519, ecdsa or rsa), e.g. one made with: "
            f"ssh-keygen -t ed25519 -N '' -f {_quote(path)}",
        ) from None


def _shape(data: bytes) -> str:
    """Why a key file could not be parsed, in words that quote none of its bytes."""
    first = data.lstrip().split(b"\n", 1)[0].strip()
    if not first:
        return "the file is empty"
    if first in _KNOWN_HEADERS:
        return f"{first.decode()} found, but what follows is damaged or cut short"
    return ("its first line is not a private key header such as "
            "-----BEGIN OPENSSH PRIVATE KEY-----; its contents are not shown")


_KNOWN_HEADERS = frozenset({
    b"-----BEGIN OPENSSH PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY-----",
})


def _parse_pkcs8(path: Path, data: bytes) -> Key:
    try:
        private = load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise _encrypted_key_error(path) from None
    except ValueError as e:
        raise IdentityError(path, f"is not a valid PKCS#8 private key ({e})") from None
    if not isinstance(
        private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise IdentityError(
            path,
            f"holds an unsupported key type ({type(private).__name__})",
            "use an ed25519, ecdsa or rsa key",
        )
    return Key(private)


def _looks_public(data: bytes) -> bool:
    text = data.lstrip()
    return text.startswith(_PUBLIC_PREFIXES) or b"PUBLIC KEY-----" in text[:100]


def _encrypted_key_error(path: Path) -> IdentityError:
    return IdentityError(
        path,
        "is protected by a passphrase; passphrase-protected keys are not supported yet "
        "(the agent runs unattended)",
        "give the agent its own unencrypted key, readable only by the user running it: "
        "ssh-keygen -t ed25519 -N '' -f KEYFILE && chmod 600 KEYFILE, "
        "and authorize KEYFILE.pub on the server",
    )


def _public_key_error(path: Path) -> IdentityError:
    private = path.with_suffix("") if path.suffix == ".pub" else None
    hint = (
        f"name the private key instead: {private}"
        if private is not None and private.exists()
        else "name the private key file (the one without .pub)"
    )
    return IdentityError(path, "is a public key, not a private key", hint)


def _quote(path: Path) -> str:
    return shlex.quote(str(path))


def load_identities(config: NodeConfig, link: LinkConfig, index: int) -> list[Key]:
    """The link's identities (its ``identity`` files, else the default ones), loaded;
    a problem is a :class:`ConfigError` naming the config key."""
    paths = list(link.identities) or default_identity_paths()
    if not paths:
        raise ConfigError(
            config.source, f"link[{index}].identity",
            "no identity (private key) given and none of ~/.ssh/id_ed25519, id_ecdsa, "
            "id_rsa exists",
            "give -i KEYFILE, set identity = \"/path/key\", or create one with "
            "`labrelay keygen KEYFILE`",
        )
    loaded = []
    for path in paths:
        try:
            loaded.append(load_identity(path))
        except IdentityError as e:
            raise ConfigError(config.source, f"link[{index}].identity", str(e)) from e
    return loaded
