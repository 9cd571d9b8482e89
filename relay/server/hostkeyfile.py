"""The relay's host key file in its state directory: generated on first start, read
and checked after, with problems an operator can act on.

A host key is met by an operator after a restore from backup (owner or mode lost), a
disk that filled during first start (an empty file), or a rotation half done (the
private key moved away, its ``.pub`` left).  Each used to end the relay with a Python
traceback, and a damaged file's bytes — the private key — in Conch's message.  Now
each is a :class:`ConfigError` (exit status 2, the file and the fix), `labrelay
check` finds the same problems without starting anything, and a key file that group
or others may read is refused as sshd refuses it ("UNPROTECTED PRIVATE KEY FILE"):
the relay's identity must not be readable by whoever can read its state directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.conch.ssh import keys

from relay.config.errors import ConfigError
from relay.ssh.identity import IdentityError, parse_key, read_key_file
from relay.ssh.keygen import generate_keypair

HOST_KEY_NAME = "ssh_host_ed25519_key"
_KEYPATH = "relay.state_dir"
_NEXT_KEYPATH = "relay.next_host_key"


def host_key_path(state_dir: Path) -> Path:
    """Where the relay's ed25519 host key lives (its public half beside, ``.pub``)."""
    return state_dir / HOST_KEY_NAME


def read_host_key(state_dir: Path) -> keys.Key | None:
    """The host key in ``state_dir``; None when there is none yet (start-up makes it).

    Raises :class:`ConfigError` for a file that exists but cannot be the relay's key:
    unreadable by this user, readable by group or others, empty, damaged, a public key.
    Its message never quotes the file's bytes."""
    path = host_key_path(state_dir)
    if not os.path.lexists(path):
        return None
    return _read_private(path, _KEYPATH, "host key", _fix, "")


def _read_private(path: Path, keypath: str, what: str, fix: Callable[[Path, str], str],
                  public_hint: str) -> keys.Key:
    """The private key at ``path`` (the current or the next host key), or ConfigError
    under ``keypath`` naming the relay's ``what``, ``fix(path, hint)`` for its fix; the
    message never quotes the file's bytes."""
    try:
        key = parse_key(path, read_key_file(path))
    except IdentityError as e:
        raise ConfigError(str(path), keypath, f"the relay's {what} {e.problem}",
                          fix(path, e.hint)) from None
    if key.isPublic():
        raise ConfigError(str(path), keypath, f"the relay's {what} file holds a public key",
                          fix(path, public_hint))
    return key


def read_next_host_key(path: Path) -> keys.Key:
    """The key ``[relay] next_host_key`` names, announced to clients beside the current
    one (relay.ssh.hostkeyupdate).  It is checked as the current key is (this user's,
    nobody else's, a whole private key), and it must exist: it is never generated, as
    clients are to learn a key the operator has and will install.  The message never
    quotes the file's bytes."""
    if not os.path.lexists(path):
        raise ConfigError(
            str(path), _NEXT_KEYPATH, "the relay's next host key does not exist",
            f"make it as the relay's user: ssh-keygen -t ed25519 -N '' -C "
            f"labrelay-relay-host-key -f {path}; or remove next_host_key")
    return _read_private(path, _NEXT_KEYPATH, "next host key", _next_fix,
                         "next_host_key names the private key, not its .pub")


def host_key_problems(state_dir: Path, next_host_key: Path | None = None) -> list[ConfigError]:
    """What :func:`load_host_keys` and :func:`read_next_host_key` would refuse, found
    without creating anything."""
    problems = []
    try:
        read_host_key(state_dir)
    except ConfigError as e:
        problems.append(e)
    if next_host_key is not None:
        try:
            read_next_host_key(next_host_key)
        except ConfigError as e:
            problems.append(e)
    return problems


def load_host_keys(state_dir: Path) -> dict[bytes, keys.Key]:
    """The relay's host keys, generated into ``state_dir`` on first start."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(str(state_dir), _KEYPATH, f"cannot create it: {e}",
                          "choose a writable directory with --state-dir") from e
    key = read_host_key(state_dir)
    if key is None:
        path = host_key_path(state_dir)
        try:
            # A .pub left without its private key (a rotation that moved only the
            # private half) describes no key any more: it is replaced.
            generate_keypair(path, "labrelay-relay-host-key", overwrite=True)
        except Exception as e:  # KeygenError, OSError: a read-only or full directory
            raise ConfigError(str(path), _KEYPATH, f"cannot write a new host key: {e}",
                              "make the state directory writable by the relay's user") from None
        key = read_host_key(state_dir)
        assert key is not None
    return {key.sshType(): key}


def _next_fix(path: Path, hint: str) -> str:
    own = f"{hint}; " if hint else ""
    return (f"{own}the next key must be owned by the relay's user with mode 600: "
            f"install -o USER -m 600 KEY {path}")


def _fix(path: Path, hint: str) -> str:
    own = f"{hint}; " if hint else ""
    return (f"{own}a key restored from a backup must keep its owner (the relay's user) and "
            f"mode 600: install -o USER -m 600 BACKUP {path}; or move the file away and a "
            "new key is generated at the next start, which every agent and user then sees "
            "as a changed host key (docs/operations.md, rotating the host key)")
