"""The request and channel-open payloads labrelay sends and parses (RFC 4254 §7).

One place encodes and decodes them, for the agent's and the relay's side alike;
a malformed payload raises :class:`ValueError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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


EARLY_DATA_OK = b"early-data-ok@labrelay"
"""Agent -> relay global request, no reply wanted (a stock sshd ignores it), sent as
the link comes up: "I take your channels' first bytes before I confirm them"
(``early-data@labrelay``).  Payload: uint32, the most early bytes per channel it takes."""
EARLY_DATA = b"early-data@labrelay"
"""Relay -> agent global request, no reply wanted, only to an agent that said
``early-data-ok@labrelay``: bytes for a ``forwarded-tcpip`` (or resumable) channel the
relay opened and the agent has not confirmed *to the relay* yet.  Payload: uint32 the
relay's (sender) channel id, string the bytes: the first bytes of that channel's
stream, in order, before any ``CHANNEL_DATA`` of it, and counted in the channel's window
as if they were (docs/relay.md "Early confirmation")."""
EARLY_LIMIT = 32 * 1024
"""The most early bytes per channel either end uses: within the smallest window a
labrelay end can be configured with (32 KiB), so they always fit the agent's window."""


def pack_early_data_ok(limit: int) -> bytes:
    return struct.pack(">L", limit)


def unpack_early_data_ok(data: bytes) -> int:
    """The announced limit, capped at :data:`EARLY_LIMIT`."""
    if len(data) < 4:
        raise ValueError("malformed early-data-ok request")
    (limit,) = struct.unpack(">L", data[:4])
    return min(limit, EARLY_LIMIT)


def pack_early_data(channel: int, data: bytes) -> bytes:
    return struct.pack(">L", channel) + common.NS(data)


def unpack_early_data(data: bytes) -> tuple[int, bytes]:
    if len(data) < 8:
        raise ValueError("malformed early-data request: truncated")
    channel, n = struct.unpack(">2L", data[:8])
    if len(data) != 8 + n:
        raise ValueError("malformed early-data request: its length does not match")
    return channel, data[8:]


REQUEST_REFUSED = b"request-refused@labrelay"
"""Relay -> agent global request, no reply wanted, sent only to a peer whose version
string is labrelay's (:func:`relay.ssh.policy.labrelay_peer`), just before the
``REQUEST_FAILURE`` of a refused ``tcpip-forward`` or ``cancel-tcpip-forward``: SSH's
failure carries no reason, so without it the lab PC's log could not say what to fix.
Payload: string the refused request's name, string its bind address and uint32 its
port as the relay read them (a bind longer than 255 bytes is cut, and then pairs with
nothing), string why (UTF-8, at most 1 KiB).  The agent pairs it with the very next
reply only (:meth:`RefusalNote.answers`); anything else is ignored."""

_MAX_BIND = 255


@dataclass(frozen=True)
class RefusalNote:
    """A ``request-refused@labrelay``: which request the relay refused, and why."""

    request: bytes
    bind: str
    port: int
    why: str

    def answers(self, request: bytes, bind: str, port: int) -> bool:
        """Whether this note is about the request ``request`` for ``bind:port``: a note
        is believed only for the request it names, never for another one it preceded."""
        return (self.request, self.bind, self.port) == (request, bind, port)


def pack_request_refused(request: bytes, bind: str, port: int, why: str) -> bytes:
    reason = why.encode("utf-8")[:_MAX_REASON].decode("utf-8", "ignore")
    return (common.NS(request[:_MAX_BIND]) + common.NS(bind.encode("utf-8")[:_MAX_BIND])
            + struct.pack(">L", port) + common.NS(reason.encode("utf-8")))


def unpack_request_refused(data: bytes) -> RefusalNote:
    try:
        request, rest = common.getNS(data)
        bind, rest = common.getNS(rest)
        (port,) = struct.unpack(">L", rest[:4])
        why, _ = common.getNS(rest[4:])
    except (struct.error, IndexError) as e:
        raise ValueError(f"malformed request-refused request: {e}") from e
    return RefusalNote(request[:_MAX_BIND], bind[:_MAX_BIND].decode("utf-8", "replace"), port,
                       why[:_MAX_REASON].decode("utf-8", "replace"))
