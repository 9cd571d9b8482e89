"""The fast path's wire format: two SSH extensions and the data port's framing.

Pure encoding, no I/O (DESIGN §2.3, docs/fastpath.md).  Control travels over SSH
as labrelay extensions (RFC 4251 §6 private names, so a stock peer answers
``REQUEST_FAILURE`` and the caller falls back to a channel):

``data-token@labrelay`` (user -> relay)
    request: ``string name, uint32 port``; reply (``REQUEST_SUCCESS``):
    ``uint32 status, string message, uint32 data_port, string token,
    uint32 lifetime_ms``.
``data-pool@labrelay`` (agent -> relay)
    request: ``uint32 count, uint32 n, n x string "name:port"`` (the services
    this agent can splice to a target itself); reply: ``uint32 status,
    string message, uint32 data_port, uint32 n, n x string token,
    uint32 lifetime_ms``.

The data port speaks a few fixed bytes before it becomes a plain byte pipe:

- every data connection opens with a hello: ``b"LRD1"``, a role byte (``U``
  user, ``A`` agent pool) and a 32-byte token; a user's goes on with the service
  it expects, ``uint8 len name uint16 port`` (a token only opens its own service);
- the relay dispatches an idle agent connection with ``b"LRGO" uint16 port
  uint8 len name``; the agent answers ``b"K"`` once its target is connected, or
  ``b"E" uint8 len message`` and closes;
- the relay answers a user ``b"\\x00"`` once paired (the stream follows), or
  ``b"\\x01" uint8 len message`` and closes.

Nothing else is ever framed: after those bytes both ends are spliced.
"""

from __future__ import annotations

import re
import struct
from enum import IntEnum

from twisted.conch.ssh import common

TOKEN_REQUEST = b"data-token@labrelay"
POOL_REQUEST = b"data-pool@labrelay"

MAGIC = b"LRD1"
ROLE_USER = b"U"
ROLE_AGENT = b"A"
TOKEN_ID_LEN = 8
TOKEN_SECRET_LEN = 24  # 192 random bits; the id is 64 more
TOKEN_LEN = TOKEN_ID_LEN + TOKEN_SECRET_LEN
HELLO_LEN = len(MAGIC) + 1 + TOKEN_LEN

_PORT_TEXT = re.compile(r"[0-9]{1,5}")

GO_MAGIC = b"LRGO"
AGENT_OK = b"K"
AGENT_ERROR = b"E"
USER_OK = b"\x00"
USER_ERROR = b"\x01"


class Status(IntEnum):
    OK = 0
    REFUSED = 1  # not granted: the channel would be refused too
    UNAVAILABLE = 2  # no fast path for this service now: use a channel


class WireError(ValueError):
    """Malformed fast-path bytes; ``str()`` says what was wrong."""


def _u32(data: bytes, at: int) -> tuple[int, int]:
    if len(data) < at + 4:
        raise WireError("truncated uint32")
    return struct.unpack_from(">L", data, at)[0], at + 4


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    # Conch's getNS slices without checking the declared length is there.
    if len(data) < at + 4:
        raise WireError("truncated string length")
    (n,) = struct.unpack_from(">L", data, at)
    if len(data) < at + 4 + n:
        raise WireError(f"truncated string: {n} bytes declared, {len(data) - at - 4} present")
    return data[at + 4:at + 4 + n], at + 4 + n


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError as e:
        raise WireError(f"unknown status {value}") from e


# --- SSH extension payloads ---------------------------------------------------


def pack_token_request(name: str, port: int) -> bytes:
    return common.NS(name.encode()) + struct.pack(">L", port)


def unpack_token_request(data: bytes) -> tuple[str, int]:
    name, at = _string(data, 0)
    port, _ = _u32(data, at)
    try:
        return name.decode("ascii"), port
    except UnicodeDecodeError as e:
        raise WireError("service name is not ASCII") from e


def pack_token_reply(status: Status, message: str, data_port: int = 0, token: bytes = b"",
                     lifetime: float = 0.0) -> bytes:
    return (struct.pack(">L", status) + common.NS(message.encode()) + struct.pack(">L", data_port)
            + common.NS(token) + struct.pack(">L", int(lifetime * 1000)))


def unpack_token_reply(data: bytes) -> tuple[Status, str, int, bytes, float]:
    status, at = _u32(data, 0)
    message, at = _string(data, at)
    data_port, at = _u32(data, at)
    token, at = _string(data, at)
    lifetime_ms, _ = _u32(data, at)
    return _status(status), message.decode("utf-8", "replace"), data_port, token, lifetime_ms / 1000


def pack_pool_request(count: int, services: list[tuple[str, int]]) -> bytes:
    return struct.pack(">LL", count, len(services)) + b"".join(
        common.NS(f"{name}:{port}".encode()) for name, port in services)


def unpack_pool_request(data: bytes) -> tuple[int, list[tuple[str, int]]]:
    count, at = _u32(data, 0)
    n, at = _u32(data, at)
    if n > 4096:
        raise WireError(f"{n} services in one request")
    services = []
    for _ in range(n):
        raw, at = _string(data, at)
        name, _, port = raw.decode("ascii", "replace").rpartition(":")
        # At most 5 ASCII digits: a TCP port, and never int() of a 1 MiB digit string
        # (a ValueError past 4300 digits, which callers catching WireError would miss).
        if not name or not _PORT_TEXT.fullmatch(port) or int(port) > 65535:
            raise WireError(f"bad service {raw[:300]!r}")
        services.append((name.lower(), int(port)))
    return count, services


def pack_pool_reply(status: Status, message: str, data_port: int = 0,
                    tokens: list[bytes] | None = None, lifetime: float = 0.0) -> bytes:
    tokens = tokens or []
    return (struct.pack(">L", status) + common.NS(message.encode())
            + struct.pack(">LL", data_port, len(tokens)) + b"".join(common.NS(t) for t in tokens)
            + struct.pack(">L", int(lifetime * 1000)))


def unpack_pool_reply(data: bytes) -> tuple[Status, str, int, list[bytes], float]:
    status, at = _u32(data, 0)
    message, at = _string(data, at)
    data_port, at = _u32(data, at)
    n, at = _u32(data, at)
    tokens = []
    for _ in range(min(n, 4096)):
        token, at = _string(data, at)
        tokens.append(token)
    lifetime_ms, _ = _u32(data, at)
    return (_status(status), message.decode("utf-8", "replace"), data_port, tokens,
            lifetime_ms / 1000)


# --- the data port ------------------------------------------------------------


def agent_hello(token: bytes) -> bytes:
    if len(token) != TOKEN_LEN:
        raise WireError("bad token length")
    return MAGIC + ROLE_AGENT + token


def user_hello(token: bytes, name: str, port: int) -> bytes:
    raw = name.encode("ascii")
    if len(token) != TOKEN_LEN or len(raw) > 255 or not 0 < port < 65536:
        raise WireError("bad token, service name or port")
    return MAGIC + ROLE_USER + token + bytes([len(raw)]) + raw + struct.pack(">H", port)


MAX_HELLO_LEN = HELLO_LEN + 1 + 255 + 2


def hello_length(data: bytes) -> int | None:
    """The length of the hello ``data`` begins with, once known; WireError if it is
    not one."""
    n = min(len(data), len(MAGIC))
    if data[:n] != MAGIC[:n]:
        raise WireError("not a labrelay data connection")
    if len(data) < 5:
        return None
    role = data[4:5]
    if role == ROLE_AGENT:
        return HELLO_LEN
    if role != ROLE_USER:
        raise WireError(f"unknown role {role!r}")
    if len(data) <= HELLO_LEN:
        return None
    return HELLO_LEN + 1 + data[HELLO_LEN] + 2


def parse_hello(data: bytes) -> tuple[bytes, bytes, tuple[str, int] | None]:
    """``(role, token, service)`` from exactly one hello (``service`` for users)."""
    if hello_length(data) != len(data):
        raise WireError("not one whole hello")
    role, token = data[4:5], data[5:HELLO_LEN]
    if role == ROLE_AGENT:
        return role, token, None
    n = data[HELLO_LEN]
    name = data[HELLO_LEN + 1:HELLO_LEN + 1 + n].decode("ascii", "replace").lower()
    (port,) = struct.unpack(">H", data[-2:])
    return role, token, (name, port)


def pack_go(name: str, port: int) -> bytes:
    raw = name.encode("ascii")
    if len(raw) > 255:
        raise WireError("service name longer than 255 bytes")
    return GO_MAGIC + struct.pack(">HB", port, len(raw)) + raw


def parse_go(data: bytes) -> tuple[tuple[str, int], bytes] | None:
    """``((name, port), rest)`` once ``data`` holds a whole GO, else None."""
    if len(data) < 7:
        if not GO_MAGIC.startswith(data[:4]):
            raise WireError("not a dispatch")
        return None
    if not data.startswith(GO_MAGIC):
        raise WireError("not a dispatch")
    port, n = struct.unpack_from(">HB", data, 4)
    if len(data) < 7 + n:
        return None
    return (data[7:7 + n].decode("ascii", "replace"), port), data[7 + n:]


def pack_error(marker: bytes, message: str) -> bytes:
    raw = message.encode("utf-8")[:255]
    return marker + bytes([len(raw)]) + raw


def parse_reply(data: bytes, ok: bytes, err: bytes) -> tuple[bool, str, bytes] | None:
    """``(ok, message, rest)`` once ``data`` holds a whole reply byte (and message), else
    None.  Used for the agent's answer to GO and the relay's answer to a user."""
    if not data:
        return None
    if data[:1] == ok:
        return True, "", data[1:]
    if data[:1] != err:
        raise WireError(f"unexpected reply byte {data[:1]!r}")
    if len(data) < 2 or len(data) < 2 + data[1]:
        return None
    n = data[1]
    return False, data[2:2 + n].decode("utf-8", "replace"), data[2 + n:]
