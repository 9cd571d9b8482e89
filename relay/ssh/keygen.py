"""Creating the agent's key pair: an unencrypted ed25519 key in OpenSSH format.

The private key appears at its final name complete and with mode 0600 or not at
all (it is written to a temporary file in the same directory, then linked or renamed
into place), and an existing key is never replaced unless asked to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh.keys import Key


class KeygenError(Exception):
    """The key pair could not be written; ``str(err)`` names the file and the fix."""


def generate_keypair(path: Path, comment: str, *, overwrite: bool = False) -> str:
    """Write a new ed25519 key pair and return its ``authorized_keys`` line.

    The private key goes to ``path`` (mode 0600; a missing parent directory is
    created 0700), the public key to ``path`` + ``.pub`` (mode 0644), both as
    ``ssh-keygen`` writes them.  Unless ``overwrite``, an existing file at either
    name is left alone and :class:`KeygenError` raised.  The returned line is
    ``ssh-ed25519 AAAA... comment`` without a newline.
    """
    if "\n" in comment or "\r" in comment:
        raise KeygenError(f"the key comment {comment!r} must be a single line")
    path = path.expanduser()
    public_path = path.with_name(path.name + ".pub")
    if not overwrite:
        for existing in (path, public_path):
            if os.path.lexists(existing):
                raise _exists_error(existing, path)

    key = Key(Ed25519PrivateKey.generate())
    private_text = key.toString("openssh", subtype="v1", comment=comment)
    public_line = key.public().toString("openssh", comment=comment or None).decode("utf-8")

    try:
        _ensure_private_dir(path.parent)
    except OSError as e:
        raise KeygenError(f"cannot create directory '{path.parent}': {e.strerror or e}") from None
    _install(path, private_text, 0o600, overwrite=overwrite, for_path=path)
    try:
        public_text = (public_line + "\n").encode("utf-8")
        _install(public_path, public_text, 0o644, overwrite=overwrite, for_path=path)
    except KeygenError:
        if not overwrite:  # we created the private key a moment ago: take it back
            os.unlink(path)
        raise
    return public_line


def _install(target: Path, data: bytes, mode: int, *, overwrite: bool, for_path: Path) -> None:
    """Write ``data`` to a temporary sibling of ``target``, then move it into place:
    ``os.replace`` when overwriting, else ``os.link`` (which fails if ``target``
    appeared meanwhile, so nothing is ever clobbered)."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    except FileExistsError:
        raise _exists_error(target, for_path) from None
    except OSError as e:
        raise KeygenError(f"cannot write '{target}': {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):  # already moved by os.replace, or never made
            os.unlink(tmp)


def _exists_error(existing: Path, path: Path) -> KeygenError:
    return KeygenError(
        f"'{existing}' already exists; refusing to overwrite it (remove it first, "
        f"choose another path than '{path}', or choose to overwrite)"
    )


def _ensure_private_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
