"""Who else could rewrite a file that grants access: the relay's version of sshd's
``StrictModes``.

A grant file (``agents_file``, ``users_file``) or the revoked-keys list decides who
reaches the lab's private network, so a file that anyone on the relay's host may
change is refused (it grants nothing; a revocation list keeps the version in force).
Checking the file's own mode is not enough: whoever may write a directory on its path
can rename a file of their own over it, or a directory of their own over a directory
above it, without touching the file.  So each directory from the file up to ``/``,
along the path as written and along the path with its symbolic links resolved, is
checked too.

What counts as "anyone": the write bit for others.  A directory that others may write
is safe only with the sticky bit (``/tmp``) *and* the entry below it owned by root or
the relay's own user (in a sticky directory only an entry's owner, the directory's
owner and root may rename or remove it).  The group write bit is left to the operator:
a lab whose admins share a group that edits the grants chose that; sshd refuses it for
authorized_keys, where the group is usually everyone's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _trusted_owners() -> frozenset[int]:
    """root and the user the relay runs as (no uids where the platform has none)."""
    geteuid = getattr(os, "geteuid", None)
    return frozenset({0} | ({geteuid()} if geteuid is not None else set()))


def _chain(path: Path) -> list[tuple[Path, Path]]:
    """(directory, the entry below it) pairs from the file up to the root."""
    pairs = []
    child = path
    for parent in path.parents:
        pairs.append((parent, child))
        child = parent
    return pairs


def open_to_anyone(path: Path) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) if someone other than root, the relay's user and
    the groups the operator chose could rewrite or replace ``path``; None if not.

    Called after the file was read, so its directories exist; one that cannot be
    examined (a race with a rename) is reported as such rather than passed."""
    trusted = _trusted_owners()
    literal = Path(os.path.abspath(path))
    resolved = Path(os.path.realpath(path))
    seen: set[tuple[Path, Path]] = set()
    try:
        st = os.stat(resolved)
        if st.st_mode & stat.S_IWOTH:
            return ("the file is writable by anyone", f"chmod o-w {path}")
        for directory, entry in _chain(literal) + _chain(resolved):
            if (directory, entry) in seen:
                continue
            seen.add((directory, entry))
            dst = os.stat(directory)
            if not dst.st_mode & stat.S_IWOTH:
                continue
            if not dst.st_mode & stat.S_ISVTX:
                return (f"the directory {directory} above it is writable by anyone, who "
                        "could put a file of their own in its place",
                        f"chmod o-w {directory}, or move the file to a directory only "
                        "root or the relay's user may write")
            owner = os.lstat(entry).st_uid
            if owner not in trusted:
                return (f"{entry} sits in {directory}, which anyone may write (sticky), "
                        f"and belongs to uid {owner}, who could replace it",
                        f"chown root {entry}, or move the file out of {directory}")
    except OSError as e:
        return (f"cannot check who may change it: {e.strerror or e}",
                "make the file and the directories above it readable by the relay's user")
    return None
