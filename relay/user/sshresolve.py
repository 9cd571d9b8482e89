"""The relay's address and the user's settings, as the user's own ssh resolves them.

``labrelay connect labrelay gpu-cluster`` should reach what ``ssh labrelay`` reaches:
the ``Host labrelay`` entry of ``~/.ssh/config`` (or of ``-F FILE``) with its
``HostName``, ``Port``, ``User``, ``IdentityFile``, ``UserKnownHostsFile``, ...,
``Match`` blocks, ``Include``s and defaults.  Rather than re-implement ssh_config's
rules, this asks the installed OpenSSH: ``ssh -G`` prints the effective
configuration for a destination without connecting, and the command line's
``-p -l -i -o`` go to it so that they win where ssh says they win.

Without an ``ssh`` program the command line is taken as it is (``-F`` then is an
error: there is nothing to read it with).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

SSH_G_TIMEOUT = 15.0  # a Match exec in the user's config may run a command


class ResolveError(Exception):
    """``ssh -G`` failed; ``str()`` says why, in ssh's words."""


@dataclass(frozen=True)
class Resolved:
    """What ``ssh -G`` says about a destination (only what ``connect`` uses)."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    known_hosts: tuple[str, ...]  # UserKnownHostsFile; () for none
    strict_host_key_checking: str
    connect_timeout: float | None
    identity_agent: str | None
    global_known_hosts: tuple[str, ...] = ()  # GlobalKnownHostsFile, read after known_hosts


def parse(text: str) -> dict[str, list[str]]:
    """``ssh -G``'s output: one ``keyword value`` a line, keywords lower-case; a keyword
    may repeat (``identityfile``)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out.setdefault(key.lower(), []).append(value.strip())
    return out


def from_options(opts: dict[str, list[str]]) -> Resolved:
    def one(key: str, default: str = "") -> str:
        return opts.get(key, [default])[0]

    timeout = one("connecttimeout", "none")
    return Resolved(
        hostname=one("hostname"),
        port=int(one("port", "22")),
        user=one("user"),
        identity_files=tuple(opts.get("identityfile", [])),
        identities_only=one("identitiesonly", "no") == "yes",
        known_hosts=_files(one("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2")),
        strict_host_key_checking=one("stricthostkeychecking", "ask"),
        connect_timeout=None if timeout == "none" else float(timeout),
        identity_agent=one("identityagent") or None,
        global_known_hosts=_files(
            one("globalknownhostsfile", "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2")),
    )


def _files(value: str) -> tuple[str, ...]:
    """A whitespace-separated list of files, as ``ssh -G`` prints it (expanded);
    ``none`` is no file (ssh.c)."""
    files = tuple(value.split())
    return () if len(files) == 1 and files[0].lower() == "none" else files


def resolve(destination: str, *, config_file: str | None = None, port: str | None = None,
            login: str | None = None, identities: Sequence[str] = (),
            options: Sequence[str] = (), ssh: str | None = None) -> Resolved | None:
    """``ssh -G`` for ``destination`` with the command line's options; None if there
    is no ``ssh`` to ask (and no ``-F``); :class:`ResolveError` if it refuses."""
    program = ssh or shutil.which("ssh")
    if program is None:
        if config_file is not None:
            raise ResolveError(f"-F {config_file} needs OpenSSH's ssh to read it, and there "
                               "is no ssh on PATH")
        return None
    argv = [program, "-G"]
    if config_file is not None:
        argv += ["-F", config_file]
    if port is not None:
        argv += ["-p", port]
    if login is not None:
        argv += ["-l", login]
    for path in identities:
        argv += ["-i", path]
    for option in options:
        argv += ["-o", option]
    argv += ["--", destination]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=SSH_G_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ResolveError(f"`ssh -G {destination}` failed: {e}") from e
    if out.returncode != 0:
        why = out.stderr.decode(errors="replace").strip().splitlines()
        raise ResolveError(why[-1] if why else f"`ssh -G {destination}` failed")
    return from_options(parse(out.stdout.decode(errors="replace")))
