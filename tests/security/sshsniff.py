"""What two SSH peers offered each other and what they must have agreed on, read off
the wire by a pass-through TCP proxy.

Every client in the interop matrix reports its negotiation differently (OpenSSH's
``-v``, paramiko's attributes, PuTTY's prose, Dropbear nothing at all), and a tool
that fails to connect usually reports nothing useful.  The identification lines and
the first ``KEXINIT`` of each side cross in the clear, so a proxy that reads them
learns, for any pair of implementations, exactly what each offered and -- by
RFC 4253 §7.1, "the first algorithm on the client's list that is also on the
server's" -- what they agreed on, or in which category they had nothing in common.
It keeps reading the plaintext packets of each direction until ``NEWKEYS`` (so it
also sees a ``DISCONNECT`` sent before encryption, with its reason) and then just
copies bytes.

``Direction`` and ``negotiate`` are sans-IO; ``SniffingProxy`` is the threaded proxy
around them.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"

MSG_DISCONNECT = 1
MSG_KEXINIT = 20
MSG_NEWKEYS = 21

#: Ciphers whose tag replaces the MAC (the MAC name is then ignored by both ends).
AEAD_CIPHERS = frozenset(
    {"aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"}
)
STRICT_KEX_CLIENT = "kex-strict-c-v00@openssh.com"
STRICT_KEX_SERVER = "kex-strict-s-v00@openssh.com"
#: Names in the kex list that signal a feature rather than name an algorithm.
PSEUDO_KEX_PREFIXES = ("ext-info-", "kex-strict-")

#: A plaintext packet longer than this is not SSH (RFC 4253 §6.1 asks for 35000).
MAX_PLAINTEXT_PACKET = 256 * 1024
MAX_BANNER_BYTES = 8192


class SniffError(Exception):
    """The bytes of one direction are not the start of an SSH connection."""


@dataclass(frozen=True)
class Kexinit:
    """The name-lists of one ``SSH_MSG_KEXINIT`` (RFC 4253 §7.1), in the sender's order."""

    kex: tuple[str, ...]
    host_key: tuple[str, ...]
    cipher_cs: tuple[str, ...]
    cipher_sc: tuple[str, ...]
    mac_cs: tuple[str, ...]
    mac_sc: tuple[str, ...]
    compression_cs: tuple[str, ...]
    compression_sc: tuple[str, ...]
    first_kex_packet_follows: bool

    @classmethod
    def parse(cls, payload: bytes) -> Kexinit:
        """``payload`` starts with the message number 20 and the 16-byte cookie."""
        if len(payload) < 17 or payload[0] != MSG_KEXINIT:
            raise SniffError(f"not a KEXINIT: {payload[:17].hex()}")
        off = 17
        lists: list[tuple[str, ...]] = []
        for _ in range(10):
            if off + 4 > len(payload):
                raise SniffError("KEXINIT truncated in its name-lists")
            (n,) = struct.unpack_from(">I", payload, off)
            off += 4
            raw = payload[off : off + n]
            if len(raw) != n:
                raise SniffError("KEXINIT name-list runs past the packet")
            off += n
            lists.append(tuple(raw.decode("ascii", "replace").split(",")) if raw else ())
        if off >= len(payload):
            raise SniffError("KEXINIT has no first_kex_packet_follows byte")
        return cls(*lists[:8], first_kex_packet_follows=bool(payload[off]))

    def algorithms(self) -> dict[str, list[str]]:
        return {
            "kex": list(self.kex),
            "host_key": list(self.host_key),
            "cipher_cs": list(self.cipher_cs),
            "cipher_sc": list(self.cipher_sc),
            "mac_cs": list(self.mac_cs),
            "mac_sc": list(self.mac_sc),
            "compression_cs": list(self.compression_cs),
            "compression_sc": list(self.compression_sc),
        }


@dataclass
class Direction:
    """The plaintext start of one direction of an SSH connection (sans-IO).

    ``feed`` bytes in the order they crossed; it parses the identification line, then
    binary packets up to and including ``NEWKEYS``, after which it ignores what follows
    (encrypted).  It keeps the first ``KEXINIT`` and any ``DISCONNECT``.
    """

    banner: str | None = None
    kexinit: Kexinit | None = None
    newkeys: bool = False
    disconnect: tuple[int, str] | None = None
    message_types: list[int] = field(default_factory=list)
    error: str | None = None
    nbytes: int = 0
    _buf: bytearray = field(default_factory=bytearray)

    @property
    def done(self) -> bool:
        """Nothing more to learn from this direction."""
        return self.newkeys or self.error is not None or self.disconnect is not None

    def feed(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.done:
            return
        self._buf += data
        try:
            self._parse()
        except SniffError as e:
            self.error = str(e)
            self._buf.clear()

    def _parse(self) -> None:
        while self.banner is None:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_BANNER_BYTES:
                    raise SniffError("no SSH identification line in the first 8 KiB")
                return
            line = bytes(self._buf[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buf[: end + 1]
            if line.startswith("SSH-"):
                self.banner = line
        while not self.done and len(self._buf) >= 5:
            length, padding = struct.unpack_from(">IB", self._buf)
            if not 5 <= length <= MAX_PLAINTEXT_PACKET or padding >= length:
                raise SniffError(f"implausible plaintext packet (length {length})")
            if len(self._buf) < 4 + length:
                return
            payload = bytes(self._buf[5 : 4 + length - padding])
            del self._buf[: 4 + length]
            self._packet(payload)

    def _packet(self, payload: bytes) -> None:
        if not payload:
            raise SniffError("empty packet payload")
        kind = payload[0]
        self.message_types.append(kind)
        if kind == MSG_KEXINIT and self.kexinit is None:
            self.kexinit = Kexinit.parse(payload)
        elif kind == MSG_NEWKEYS:
            self.newkeys = True
        elif kind == MSG_DISCONNECT and len(payload) >= 9:
            (reason, n) = struct.unpack_from(">II", payload, 1)
            text = payload[9 : 9 + n].decode("utf-8", "replace")
            self.disconnect = (reason, text)


def _first_common(client: tuple[str, ...], server: tuple[str, ...]) -> str | None:
    for name in client:
        if name in server:
            return name
    return None


def negotiate(client: Kexinit, server: Kexinit) -> dict[str, Any]:
    """What RFC 4253 §7.1 makes two peers agree on (``None`` where nothing is common).

    Pseudo-algorithms (``ext-info-c``, ``kex-strict-*``) never match: each side lists
    its own variant.  The MAC of an AEAD cipher is ``<implicit>`` as OpenSSH prints it.
    ``strict_kex`` is whether both sides announced strict KEX (Terrapin's fix).
    """
    kex_client = tuple(k for k in client.kex if not k.startswith(PSEUDO_KEX_PREFIXES))
    agreed: dict[str, Any] = {
        "kex": _first_common(kex_client, server.kex),
        "host_key": _first_common(client.host_key, server.host_key),
    }
    for way in ("cs", "sc"):
        cipher = _first_common(getattr(client, f"cipher_{way}"), getattr(server, f"cipher_{way}"))
        agreed[f"cipher_{way}"] = cipher
        if cipher in AEAD_CIPHERS:
            agreed[f"mac_{way}"] = "<implicit>"
        else:
            agreed[f"mac_{way}"] = _first_common(
                getattr(client, f"mac_{way}"), getattr(server, f"mac_{way}")
            )
        agreed[f"compression_{way}"] = _first_common(
            getattr(client, f"compression_{way}"), getattr(server, f"compression_{way}")
        )
    agreed["strict_kex"] = STRICT_KEX_CLIENT in client.kex and STRICT_KEX_SERVER in server.kex
    return agreed


def describe_refusal(client: Kexinit, server: Kexinit) -> list[str]:
    """One line per category where the two offers have nothing in common."""
    agreed = negotiate(client, server)
    lines = []
    c_lists, s_lists = client.algorithms(), server.algorithms()
    for category, value in agreed.items():
        if value is None:
            lines.append(
                f"no common {category}: client offers {','.join(c_lists[category])}; "
                f"server offers {','.join(s_lists[category])}"
            )
    return lines


@dataclass
class SniffedConnection:
    """One connection through the proxy: what crossed each way before encryption."""

    client: Direction = field(default_factory=Direction)
    server: Direction = field(default_factory=Direction)
    closed: threading.Event = field(default_factory=threading.Event)
    upstream_error: str | None = None

    def negotiated(self) -> dict[str, Any] | None:
        if self.client.kexinit is None or self.server.kexinit is None:
            return None
        return negotiate(self.client.kexinit, self.server.kexinit)

    def report(self) -> dict[str, Any]:
        """Banners, what was agreed, and whether each side reached encryption."""
        out: dict[str, Any] = {
            "client_banner": self.client.banner,
            "server_banner": self.server.banner,
            "negotiated": self.negotiated(),
            "newkeys_client": self.client.newkeys,
            "newkeys_server": self.server.newkeys,
            "bytes_client_to_server": self.client.nbytes,
            "bytes_server_to_client": self.server.nbytes,
        }
        for side in ("client", "server"):
            d: Direction = getattr(self, side)
            if d.kexinit is not None:
                out[f"{side}_offers"] = d.kexinit.algorithms()
            if d.disconnect is not None:
                out[f"disconnect_by_{side}"] = {"reason": d.disconnect[0], "text": d.disconnect[1]}
            if d.error is not None:
                out[f"unparsed_{side}"] = d.error
        if self.upstream_error:
            out["upstream_error"] = self.upstream_error
        return out

    def explain(self) -> str:
        """Several lines a failing test prints: offers, agreement or refusal, disconnects."""
        lines = [
            f"client {self.client.banner!r} -> server {self.server.banner!r}",
            f"bytes client->server {self.client.nbytes}, server->client {self.server.nbytes}",
        ]
        if self.upstream_error:
            lines.append(f"proxy could not reach the server: {self.upstream_error}")
        c, s = self.client.kexinit, self.server.kexinit
        if c is None or s is None:
            missing = [n for n, k in (("client", c), ("server", s)) if k is None]
            lines.append(f"no KEXINIT seen from the {' and '.join(missing)}")
        else:
            agreed = negotiate(c, s)
            lines.append("agreed: " + format_negotiated(agreed))
            lines.extend(describe_refusal(c, s))
            lines.append("client offers: " + _offers(c))
            lines.append("server offers: " + _offers(s))
        lines.append(
            f"NEWKEYS sent: client {self.client.newkeys}, server {self.server.newkeys}; "
            f"plaintext messages client {self.client.message_types}, "
            f"server {self.server.message_types}"
        )
        for side in ("client", "server"):
            d = getattr(self, side)
            if d.disconnect is not None:
                lines.append(f"DISCONNECT from {side}: reason {d.disconnect[0]}: {d.disconnect[1]}")
            if d.error is not None:
                lines.append(f"{side} bytes not parsed: {d.error}")
        return "\n".join(lines)


def _offers(k: Kexinit) -> str:
    return "; ".join(f"{name}={','.join(v)}" for name, v in k.algorithms().items())


def format_negotiated(agreed: dict[str, Any]) -> str:
    """``kex=... host_key=... cipher=... mac=... compression=... strict_kex=...`` with
    the two directions merged when they agree."""
    parts = [f"kex={agreed['kex']}", f"host_key={agreed['host_key']}"]
    for what in ("cipher", "mac", "compression"):
        cs, sc = agreed[f"{what}_cs"], agreed[f"{what}_sc"]
        parts.append(f"{what}={cs}" if cs == sc else f"{what}={cs}(c>s)/{sc}(s>c)")
    parts.append(f"strict_kex={agreed['strict_kex']}")
    return " ".join(parts)


class SniffingProxy:
    """A TCP proxy on 127.0.0.1 port 0 to ``upstream`` that records each connection's
    negotiation (``connections``) and otherwise copies bytes untouched, two threads
    per connection.  ``close()`` resets everything still open."""

    def __init__(self, upstream: tuple[str, int], name: str = "sniffer") -> None:
        self.upstream = upstream
        self.name = name
        self._lsock = socket.create_server((LOOPBACK, 0))
        self.port: int = self._lsock.getsockname()[1]
        self.connections: list[SniffedConnection] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            conn = SniffedConnection()
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError as e:
                conn.upstream_error = repr(e)
                client.close()
                conn.closed.set()
                with self._lock:
                    self.connections.append(conn)
                    self._lock.notify_all()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.connections.append(conn)
                self._socks += [client, server]
                self._lock.notify_all()
            done = [threading.Event(), threading.Event()]
            for src, dst, d, ev in (
                (client, server, conn.client, done[0]),
                (server, client, conn.server, done[1]),
            ):
                threading.Thread(
                    target=self._pump, args=(src, dst, d, ev, done, conn),
                    name=f"{self.name}-pump", daemon=True,
                ).start()  # fmt: skip

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        direction: Direction,
        finished: threading.Event,
        both: list[threading.Event],
        conn: SniffedConnection,
    ) -> None:
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                direction.feed(data)
                dst.sendall(data)
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            finished.set()
            if all(e.is_set() for e in both):
                src.close()
                dst.close()
                conn.closed.set()
                with self._lock:
                    self._lock.notify_all()

    def wait_connection(self, index: int = 0, timeout: float = 15.0) -> SniffedConnection:
        """The ``index``-th connection, once both directions are past their key
        exchange (or it ended)."""

        def ready() -> bool:
            if len(self.connections) <= index:
                return False
            c = self.connections[index]
            return (c.client.done and c.server.done) or c.closed.is_set()

        with self._lock:
            if not self._lock.wait_for(ready, timeout):
                have = len(self.connections)
                detail = self.connections[index].explain() if have > index else "none yet"
                raise AssertionError(
                    f"{self.name}: connection #{index} did not get past its key exchange "
                    f"within {timeout}s ({have} connections):\n{detail}"
                )
            return self.connections[index]

    def explain(self) -> str:
        if not self.connections:
            return f"{self.name} (port {self.port} -> {self.upstream[1]}): no connection arrived"
        return "\n".join(
            f"{self.name} connection #{i}:\n{c.explain()}" for i, c in enumerate(self.connections)
        )

    def diagnostics(self) -> str:
        return self.explain()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        with contextlib.suppress(OSError):
            self._lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._lsock.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._thread.join(5)
