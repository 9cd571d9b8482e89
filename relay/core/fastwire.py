"""The fast path's wire format: two SSH extensions and the data port's framing.

Pure encoding and the MACs, no I/O (DESIGN §2.3, docs/fastpath.md "Protocol").
Control travels over SSH as labrelay extensions (RFC 4251 §6 private names, so a
stock peer answers ``REQUEST_FAILURE`` and the caller falls back to a channel).
The names carry the protocol version: version 1 (``data-token@labrelay``, a bearer
token in the clear and an unauthenticated dispatch) is refused by name, so an old
peer and a new one never half-speak — the old one falls back or turns its pool off.

``data-token-v2@labrelay`` (user -> relay)
    request: ``string name, uint32 port``; reply (``REQUEST_SUCCESS``):
    ``uint32 status, string message, uint32 data_port, string ticket,
    uint32 lifetime_ms``.
``data-pool-v2@labrelay`` (agent -> relay)
    request: ``uint32 count, uint32 n, n x string "name:port"`` (the services
    this agent can splice to a target itself); reply: ``uint32 status,
    string message, uint32 data_port, uint32 n, n x string ticket,
    uint32 lifetime_ms, uint32 m, m x string "name:port"`` (of those offered, the
    ones the relay will dispatch: granted to this agent and end-to-end encrypted).

A *ticket* is 32 random bytes: an 8-byte id and a 24-byte secret.  It crosses only
the SSH connection that asked for it.  The secret never crosses the data port: a
data connection proves it holds the ticket by an HMAC-SHA256 keyed with the secret
over a fresh challenge, and the relay's dispatch of an agent's pooled connection is
MAC'd with the same secret, bound to that connection.

On the data port (``LRD2``; a peer speaking ``LRD1`` is refused at its first byte):

1. the relay speaks first: ``b"LRD2"`` and a 32-byte random ``nonce``;
2. the peer answers with its hello: ``b"LRD2"``, a role byte (``U`` user, ``A``
   agent pool), the 8-byte ticket id and ``proof`` = HMAC-SHA256(secret,
   ``"labrelay-fastpath-v2 hello\0" role id nonce [string name uint16 port]``);
   a user's hello goes on with the service it expects, ``uint8 len name uint16
   port`` (a ticket opens only its own service, and the proof covers it);
3. the relay dispatches an idle agent connection with ``b"LRGO" uint16 port uint8
   len name`` and ``mac`` = HMAC-SHA256(secret, ``"labrelay-fastpath-v2 go\0" id
   nonce uint32 counter uint16 port string name``), ``counter`` 0 (a connection is
   dispatched at most once; the agent accepts one GO per connection); the agent
   answers ``b"K"`` once its target is connected, or ``b"E" uint8 len message`` and
   closes;
4. the relay answers a user ``b"\x00"`` once paired (the stream follows), or
   ``b"\x01" uint8 len message`` and closes.

Nothing else is ever framed: after those bytes both ends are spliced.  What this
buys against someone on the path, and what it does not, is in docs/fastpath.md.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from twisted.conch.ssh import common

TOKEN_REQUEST = b"data-token-v2@labrelay"
POOL_REQUEST = b"data-pool-v2@labrelay"

MAGIC = b"LRD2"
ROLE_USER = b"U"
ROLE_AGENT = b"A"
TOKEN_ID_LEN = 8
TOKEN_SECRET_LEN = 24  # 192 random bits; the id is 64 more
TOKEN_LEN = TOKEN_ID_LEN + TOKEN_SECRET_LEN
NONCE_LEN = 32
MAC_LEN = 32  # HMAC-SHA256
CHALLENGE_LEN = len(MAGIC) + NONCE_LEN
HELLO_LEN = len(MAGIC) + 1 + TOKEN_ID_LEN + MAC_LEN
_HELLO_LABEL = b"labrelay-fastpath-v2 hello\x00"
_GO_LABEL = b"labrelay-fastpath-v2 go\x00"

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
        services.append(_service(raw))
    return count, services


def _service(raw: bytes) -> tuple[str, int]:
    """``"name:port"`` as ``(lower-case name, port)``."""
    name, _, port = raw.decode("ascii", "replace").rpartition(":")
    # At most 5 ASCII digits: a TCP port, and never int() of a 1 MiB digit string (a
    # ValueError past 4300 digits) or of "²" (isdigit, but no int): callers catch WireError.
    if not name or not _PORT_TEXT.fullmatch(port) or not 0 < int(port) < 65536:
        raise WireError(f"bad service {raw[:80]!r}")
    return name.lower(), int(port)


def pack_pool_reply(status: Status, message: str, data_port: int = 0,
                    tokens: list[bytes] | None = None, lifetime: float = 0.0,
                    services: list[tuple[str, int]] | None = None) -> bytes:
    tokens = tokens or []
    services = services or []
    return (struct.pack(">L", status) + common.NS(message.encode())
            + struct.pack(">LL", data_port, len(tokens)) + b"".join(common.NS(t) for t in tokens)
            + struct.pack(">LL", int(lifetime * 1000), len(services))
            + b"".join(common.NS(f"{name}:{port}".encode()) for name, port in services))


@dataclass(frozen=True)
class PoolReply:
    status: Status
    message: str
    data_port: int = 0
    tokens: tuple[bytes, ...] = ()
    lifetime: float = 0.0
    services: frozenset[tuple[str, int]] = frozenset()  # what the relay will dispatch


def unpack_pool_reply(data: bytes) -> PoolReply:
    status, at = _u32(data, 0)
    message, at = _string(data, at)
    data_port, at = _u32(data, at)
    n, at = _u32(data, at)
    if n > 4096:
        raise WireError(f"{n} tickets in one reply")
    tokens = []
    for _ in range(n):
        token, at = _string(data, at)
        tokens.append(token)
    lifetime_ms, at = _u32(data, at)
    m, at = _u32(data, at)
    if m > 4096:
        raise WireError(f"{m} services in one reply")
    services = []
    for _ in range(m):
        raw, at = _string(data, at)
        services.append(_service(raw))
    return PoolReply(_status(status), message.decode("utf-8", "replace"), data_port,
                     tuple(tokens), lifetime_ms / 1000, frozenset(services))


# --- the data port ------------------------------------------------------------


def split_ticket(token: bytes) -> tuple[bytes, bytes]:
    """``(id, secret)`` of a 32-byte ticket."""
    if len(token) != TOKEN_LEN:
        raise WireError("bad ticket length")
    return token[:TOKEN_ID_LEN], token[TOKEN_ID_LEN:]


def challenge(nonce: bytes) -> bytes:
    """The relay's first bytes on every data connection."""
    if len(nonce) != NONCE_LEN:
        raise WireError("bad nonce length")
    return MAGIC + nonce


def parse_challenge(data: bytes) -> tuple[bytes, bytes] | None:
    """``(nonce, rest)`` once ``data`` holds the whole challenge, else None; WireError
    if it is not one (an old relay, or something else listening there)."""
    n = min(len(data), len(MAGIC))
    if data[:n] != MAGIC[:n]:
        raise WireError("not a labrelay v2 data port")
    if len(data) < CHALLENGE_LEN:
        return None
    return data[len(MAGIC):CHALLENGE_LEN], data[CHALLENGE_LEN:]


def _service_bytes(service: tuple[str, int] | None) -> bytes:
    if service is None:
        return b""
    name, port = service
    return common.NS(name.encode("ascii", "replace")) + struct.pack(">H", port)


def hello_proof(secret: bytes, role: bytes, token_id: bytes, nonce: bytes,
                service: tuple[str, int] | None = None) -> bytes:
    """HMAC-SHA256 over the hello's transcript: proves the ticket's secret without
    sending it, for this connection's nonce only (a replayed hello is useless)."""
    msg = _HELLO_LABEL + role + token_id + nonce + _service_bytes(service)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def agent_hello(token: bytes, nonce: bytes) -> bytes:
    token_id, secret = split_ticket(token)
    return MAGIC + ROLE_AGENT + token_id + hello_proof(secret, ROLE_AGENT, token_id, nonce)


def user_hello(token: bytes, nonce: bytes, name: str, port: int) -> bytes:
    raw = name.encode("ascii")
    if len(token) != TOKEN_LEN or len(raw) > 255 or not 0 < port < 65536:
        raise WireError("bad ticket, service name or port")
    token_id, secret = split_ticket(token)
    proof = hello_proof(secret, ROLE_USER, token_id, nonce, (name.lower(), port))
    return (MAGIC + ROLE_USER + token_id + proof + bytes([len(raw)]) + raw
            + struct.pack(">H", port))


MAX_HELLO_LEN = HELLO_LEN + 1 + 255 + 2


def hello_length(data: bytes) -> int | None:
    """The length of the hello ``data`` begins with, once known; WireError if it is
    not one."""
    n = min(len(data), len(MAGIC))
    if data[:n] != MAGIC[:n]:
        raise WireError("not a labrelay v2 data connection")
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


@dataclass(frozen=True)
class Hello:
    role: bytes
    token_id: bytes
    proof: bytes
    service: tuple[str, int] | None  # users only, lower-cased


def parse_hello(data: bytes) -> Hello:
    """One whole hello (``service`` for users)."""
    if hello_length(data) != len(data):
        raise WireError("not one whole hello")
    role = data[4:5]
    at = 5 + TOKEN_ID_LEN
    token_id, proof = data[5:at], data[at:HELLO_LEN]
    if role == ROLE_AGENT:
        return Hello(role, token_id, proof, None)
    n = data[HELLO_LEN]
    name = data[HELLO_LEN + 1:HELLO_LEN + 1 + n].decode("ascii", "replace").lower()
    (port,) = struct.unpack(">H", data[-2:])
    return Hello(role, token_id, proof, (name, port))


def go_mac(secret: bytes, token_id: bytes, nonce: bytes, name: str, port: int,
           counter: int = 0) -> bytes:
    """The MAC on a dispatch: keyed with the pooled connection's ticket secret (which
    crossed only the agent's SSH link) and bound to that connection's ticket id and
    nonce, so a GO cannot be forged, altered or moved onto another connection."""
    msg = (_GO_LABEL + token_id + nonce + struct.pack(">LH", counter, port)
           + common.NS(name.encode("ascii", "replace")))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def go_valid(secret: bytes, token_id: bytes, nonce: bytes, name: str, port: int,
             mac: bytes, counter: int = 0) -> bool:
    """Constant-time check of a dispatch's MAC."""
    return hmac.compare_digest(go_mac(secret, token_id, nonce, name, port, counter), mac)


def pack_go(name: str, port: int, mac: bytes) -> bytes:
    raw = name.encode("ascii")
    if len(raw) > 255:
        raise WireError("service name longer than 255 bytes")
    if len(mac) != MAC_LEN:
        raise WireError("bad MAC length")
    return GO_MAGIC + struct.pack(">HB", port, len(raw)) + raw + mac


def parse_go(data: bytes) -> tuple[tuple[str, int], bytes, bytes] | None:
    """``((name, port), mac, rest)`` once ``data`` holds a whole GO, else None."""
    if len(data) < 7:
        if not GO_MAGIC.startswith(data[:4]):
            raise WireError("not a dispatch")
        return None
    if not data.startswith(GO_MAGIC):
        raise WireError("not a dispatch")
    port, n = struct.unpack_from(">HB", data, 4)
    end = 7 + n + MAC_LEN
    if len(data) < end:
        return None
    return (data[7:7 + n].decode("ascii", "replace"), port), data[7 + n:end], data[end:]


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
