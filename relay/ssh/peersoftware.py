"""Which software, and which labrelay version, an SSH peer runs: read from its version line.

An operator of a shared relay must be able to see which labs still run old agents
(docs/operations.md, "Which version each agent runs").  The one place an SSH client
names its software is its version line (RFC 4253 §4.2, ``SSH-2.0-softwareversion
comments``), sent before anything else on every connection, as OpenSSH's ssh sends
``SSH-2.0-OpenSSH_9.2p1``.  So a labrelay client (the agent's link, ``labrelay
connect``) sends ``SSH-2.0-labrelay_<version>`` (:func:`client_version_string`); no new
message or field is needed, and both ends of every version recognise it: since
:func:`relay.ssh.policy.labrelay_peer` was written it takes ``SSH-2.0-labrelay`` with
anything after a ``_`` as labrelay's.  Versions before :data:`FIRST_SENT` sent the bare
``SSH-2.0-labrelay``: the relay shows them as ``unknown (before 0.2.0.dev0)``.

The relay's own version line stays the bare ``SSH-2.0-labrelay``: it answers anyone
who connects, before any authentication, and a scanner should not learn which
version to aim at.  Its version is in its own status, metrics and start line.

The line is the peer's: up to 4 KiB of any bytes but a newline
(:data:`relay.ssh.guard.VERSION_LINE_LIMIT`), before any authentication.  What is kept
of it is the software field only, at most :data:`SOFTWARE_LIMIT` characters, every
byte that is not printable ASCII (nor a space) replaced by ``?``: what status, metrics
and logs show is one short printable token, whatever was sent (and the log escapes
and cuts it again, as every peer string).  Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.ssh.policy import VERSION_STRING, labrelay_peer

FIRST_SENT = "0.2.0.dev0"
"""The first labrelay version whose clients name their version in their version line."""
SOFTWARE_LIMIT = 64
"""Characters of a peer's software field kept (OpenSSH's own are about 20)."""
CUT = "[...]"
"""Marks a software field cut at :data:`SOFTWARE_LIMIT` (no version holds brackets)."""
_PREFIX = VERSION_STRING.split(b"-", 2)[2] + b"_"  # b"labrelay_"


def client_version_string(version: str) -> bytes:
    """The version line of a labrelay client of ``version``: ``SSH-2.0-labrelay_0.2.0``.

    RFC 4253 §4.2: the software version is printable US-ASCII without spaces or
    minus signs; a version that is not would make a line a peer cannot parse."""
    ok = version and all(0x21 <= ord(c) <= 0x7E and c != "-" for c in version)
    if not ok:
        raise ValueError(f"not usable in an SSH version line: {version!r}")
    return VERSION_STRING + b"_" + version.encode("ascii")


@dataclass(frozen=True)
class PeerSoftware:
    """What a peer's version line says of its software.

    ``software``: its software field, made safe (``labrelay_0.2.0.dev0``,
    ``labrelay``, ``OpenSSH_9.2p1``; empty if the line had none); ``labrelay``: whether
    it is a labrelay end; ``version``: the labrelay version it named, if it did."""

    software: str
    labrelay: bool
    version: str | None

    @property
    def shown(self) -> str:
        """What an operator reads: ``0.2.0.dev0``; ``unknown (before 0.2.0.dev0)`` for a
        labrelay end that named none; ``not labrelay: OpenSSH_9.2p1`` otherwise (an
        agent may be a stock ``ssh -R``)."""
        if self.labrelay:
            return self.version or f"unknown (before {FIRST_SENT})"
        return f"not labrelay: {self.software or '(no software named)'}"


def _safe(raw: bytes, limit: int) -> str:
    cut = len(raw) > limit
    text = "".join(chr(b) if 0x21 <= b <= 0x7E else "?" for b in raw[:limit])
    return text + (CUT if cut else "")


def read_version_line(line: bytes | None) -> PeerSoftware:
    """The peer's software, from its version line as Conch keeps it
    (``otherVersionString``: the line without its CR LF), or from None (not known)."""
    if not line:
        return PeerSoftware("", False, None)
    parts = line.split(b"-", 2)  # SSH, protoversion, "softwareversion comments"
    field = parts[2].split(b" ", 1)[0] if len(parts) == 3 else b""
    labrelay = labrelay_peer(line)
    version = None
    if labrelay and field.startswith(_PREFIX) and len(field) > len(_PREFIX):
        version = _safe(field[len(_PREFIX):], SOFTWARE_LIMIT - len(_PREFIX))
    return PeerSoftware(_safe(field, SOFTWARE_LIMIT), labrelay, version)
