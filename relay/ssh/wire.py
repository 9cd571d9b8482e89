"""The request and channel-open payloads labrelay sends and parses (RFC 4254 §7).

One place encodes and decodes them, for the agent's and the relay's side alike;
a malformed payload raises :class:`ValueError`.
"""

from __future__ import annotations

import struct

from twisted.conch.ssh import common


def pack_forward(bind: str, port: int) -> bytes:
    """``tcpip-forward``/``cancel-tcpip-forward``: address to bind, port to bind."""
    return common.NS(bind.encode()) + struct.pack(">L", port)


def unpack_forward(data: bytes) -> tuple[str, int]:
    try:
        bind, rest = common.getNS(data)
        (port,) = struct.unpack(">L", rest[:4])
        return bind.decode("utf-8"), port
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise ValueError(f"malformed forward request: {e}") from e


def pack_endpoints(host: str, port: int, orig_host: str, orig_port: int) -> bytes:
    """``direct-tcpip``/``forwarded-tcpip`` open data: target (or the address that
    was connected) and originator."""
    return (common.NS(host.encode()) + struct.pack(">L", port)
            + common.NS(orig_host.encode()) + struct.pack(">L", orig_port))


def unpack_endpoints(data: bytes) -> tuple[str, int, str, int]:
    try:
        host, rest = common.getNS(data)
        (port,) = struct.unpack(">L", rest[:4])
        orig, rest = common.getNS(rest[4:])
        (orig_port,) = struct.unpack(">L", rest[:4])
    except (struct.error, IndexError) as e:
        raise ValueError(f"malformed channel address: {e}") from e
    return (host.decode("utf-8", "replace"), port, orig.decode("utf-8", "replace"), orig_port)


GRANT_REVOKED = b"grant-revoked@labrelay"
"""Relay -> agent global request, no reply wanted (a stock ssh ignores it): the
registration ``bind:port`` was dropped because the agent's key lost its grant."""

_MAX_REASON = 1024


def pack_grant_revoked(bind: str, port: int, why: str) -> bytes:
    """``grant-revoked@labrelay``: the bind string and port the agent registered, and
    why the relay dropped them (UTF-8, at most 1 KiB)."""
    reason = why.encode("utf-8")[:_MAX_REASON].decode("utf-8", "ignore")
    return pack_forward(bind, port) + common.NS(reason.encode("utf-8"))


def unpack_grant_revoked(data: bytes) -> tuple[str, int, str]:
    try:
        bind, rest = common.getNS(data)
        (port,) = struct.unpack(">L", rest[:4])
        why, _ = common.getNS(rest[4:])
        return (bind.decode("utf-8", "replace"), port,
                why[:_MAX_REASON].decode("utf-8", "replace"))
    except (struct.error, IndexError) as e:
        raise ValueError(f"malformed grant-revoked request: {e}") from e


SHARE = b"share@labrelay"
"""Relay -> agent channel request on a ``forwarded-tcpip`` channel, no reply wanted (a
stock ssh ignores it): the user the session belongs to and that user's weight, so the
agent schedules its side of a congested link per user too (docs/sharing.md)."""

_MAX_USER = 100
_MAX_WEIGHT = 100.0


def pack_share(user: str, weight: float) -> bytes:
    """``share@labrelay``: the user's name (UTF-8) and weight (a decimal string)."""
    return common.NS(user.encode("utf-8")[:4 * _MAX_USER]) + common.NS(f"{weight:g}".encode())


def unpack_share(data: bytes) -> tuple[str, float]:
    """The user and weight; a weight outside 0.01..100 is clamped into it."""
    try:
        user, rest = common.getNS(data)
        weight_text, _ = common.getNS(rest)
        weight = float(weight_text.decode("ascii"))
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"malformed share request: {e}") from e
    if weight != weight:  # NaN
        raise ValueError("malformed share request: weight is not a number")
    name = user.decode("utf-8", "replace")[:_MAX_USER]
    return name, min(max(weight, 0.01), _MAX_WEIGHT)
