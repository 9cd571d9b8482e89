"""A scripted SSH client that sends raw connection-layer packets after authentication.

Stock ``ssh`` never sends a bad ``WINDOW_ADJUST`` or data for a channel that does not
exist, so the bad-input tests drive the relay with this instead: Twisted Conch's
``SSHClientTransport`` for key exchange and public-key authentication, then a
connection service that writes packets by hand and records every answer.

Run as a separate process (its own reactor) and read one JSON object from stdout::

    python rawssh.py --port PORT --key KEY --host-key HOSTKEY.pub --service web:8080 SCENARIO

Scenarios (each on one fresh connection):

``echo``                  open a ``direct-tcpip`` channel to SERVICE, echo some bytes.
``window-overflow``       open a channel, then ``WINDOW_ADJUST`` it by 2^32-1.
``max-packet-zero``       ``CHANNEL_OPEN`` declaring a maximum packet of 0, then ``echo``.
``unknown-channel:KIND``  a KIND (data, window, eof, close, request) packet for channel
                          id 4242, which was never opened.
``many-opens:N``          N ``CHANNEL_OPEN`` at once; count the answers by kind; close the
                          confirmed ones, then ``echo`` (to ECHO_SERVICE) on the same
                          connection.
``malformed:KIND``        a packet cut short: a CHANNEL_OPEN (open), a GLOBAL_REQUEST
                          (global), a ``tcpip-forward`` (forward), a ``direct-tcpip``
                          open (direct).
``garbage``               64 KiB of random bytes on the encrypted transport.
``hang-kex``              open a ``direct-tcpip`` channel to SERVICE (a source that
                          streams), read 1 MiB, then send a KEXINIT and never finish
                          the key exchange, topping the window up to 80 MiB every
                          0.1 s; report how much arrived after the KEXINIT and how
                          long the relay kept the connection.

The transport is Conch's client with labrelay's AEAD mixin (``relay.ssh.aead``): the
relay offers AEAD ciphers only, which stock Conch lacks.

The outcome says whether the relay disconnected (``disconnect``: reason code and text
of its ``SSH_MSG_DISCONNECT``; ``lost``: the TCP connection closed) and what each
step got back.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import time
from collections import Counter
from typing import Any

from twisted.conch.ssh import common, connection, keys, transport, userauth
from twisted.internet import defer, protocol, reactor, task
from twisted.python.failure import Failure

from relay.ssh.aead import AEADTransportMixin

MSG = connection.messages  # number -> name
OPEN_CONFIRMATION = connection.MSG_CHANNEL_OPEN_CONFIRMATION
OPEN_FAILURE = connection.MSG_CHANNEL_OPEN_FAILURE
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 32 * 1024
STEP_TIMEOUT = 30.0
RESOURCE_SHORTAGE = 4


class Client:
    """What one connection saw; the scenarios read and wait on it."""

    def __init__(self) -> None:
        self.ready: defer.Deferred[RawConnection] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.disconnect: dict[str, Any] | None = None
        self.auth_failed = False


class RawTransport(AEADTransportMixin, transport.SSHClientTransport):
    def __init__(self, client: Client, opts: argparse.Namespace) -> None:
        self.client = client
        self.opts = opts
        self.hanging = False  # a KEXINIT was sent by hand: ignore the relay's answer
        self.relayKexInit: float | None = None

    def ssh_KEXINIT(self, packet: bytes) -> None:
        if self.hanging:
            self.relayKexInit = time.monotonic()
            return
        super().ssh_KEXINIT(packet)

    def sendRawKexInit(self) -> None:
        """A KEXINIT outside Conch's key exchange state: our own packets keep flowing
        and the key exchange is never finished."""
        self.hanging = True
        lists = [
            b",".join(self.supportedKeyExchanges), b",".join(self.supportedPublicKeys),
            *[b",".join(self.supportedCiphers)] * 2, *[b",".join(self.supportedMACs)] * 2,
            b"none", b"none", b"", b"",
        ]  # fmt: skip
        payload = random.randbytes(16) + b"".join(common.NS(x) for x in lists) + bytes(5)
        self.sendPacket(transport.MSG_KEXINIT, payload)

    def verifyHostKey(self, pubKey: bytes, fingerprint: bytes) -> defer.Deferred[Any]:
        if keys.Key.fromString(pubKey) != self.opts.host_key:
            return defer.fail(Exception("host key mismatch"))
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        conn = RawConnection(self.client)
        self.requestService(RawAuth(self.opts.user.encode(), conn, self.opts.key, self.client))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.client.disconnect = {"code": reasonCode, "why": description.decode("utf-8", "replace")}

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.client.lost.called:
            self.client.lost.callback(None)
        if not self.client.ready.called:
            self.client.ready.errback(Exception(f"connection lost before auth: {reason}"))


class RawAuth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, conn: RawConnection, key: keys.Key, client: Client) -> None:
        super().__init__(user, conn)
        self.key = key
        self.client = client
        self.offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self.offered:
            self.client.auth_failed = True
            return None
        self.offered = True
        return self.key.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self.key)

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None


class RawConnection(connection.SSHConnection):
    """Answers what it must (global requests, channel close) and records the rest."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.answers: dict[int, tuple[str, Any]] = {}  # our channel id -> answer
        self.remote: dict[int, int] = {}  # our channel id -> relay's channel id
        self.data: dict[int, bytearray] = {}
        self.counted: dict[int, int] = {}  # channels whose data is only counted
        self.closed: set[int] = set()
        self.counts: Counter[str] = Counter()
        self._waiters: list[tuple[Any, defer.Deferred[None]]] = []

    def serviceStarted(self) -> None:
        self.client.ready.callback(self)

    def _changed(self) -> None:
        for cond, d in list(self._waiters):
            if cond():
                self._waiters.remove((cond, d))
                d.callback(None)

    def until(self, cond: Any, timeout: float = STEP_TIMEOUT) -> defer.Deferred[None]:
        """Fires when ``cond()`` is true, or when the connection is lost (then False)."""
        if cond():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((cond, d))
        d.addTimeout(timeout, reactor)
        return d

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.counts[MSG.get(messageNum, str(messageNum))] += 1
        if messageNum == connection.MSG_GLOBAL_REQUEST:
            _, rest = common.getNS(packet)
            if rest[:1] != b"\x00":
                self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")
        elif messageNum == OPEN_CONFIRMATION:
            ours, theirs = struct.unpack(">2L", packet[:8])
            self.remote[ours] = theirs
            self.answers[ours] = ("open", None)
        elif messageNum == OPEN_FAILURE:
            ours, code = struct.unpack(">2L", packet[:8])
            why = common.getNS(packet[8:])[0].decode("utf-8", "replace")
            self.answers[ours] = ("refused", {"code": code, "why": why})
        elif messageNum == connection.MSG_CHANNEL_DATA:
            (ours,) = struct.unpack(">L", packet[:4])
            if ours in self.counted:
                self.counted[ours] += struct.unpack(">L", packet[4:8])[0]
            else:
                self.data.setdefault(ours, bytearray()).extend(common.getNS(packet[4:])[0])
        elif messageNum == connection.MSG_CHANNEL_CLOSE:
            (ours,) = struct.unpack(">L", packet[:4])
            if ours not in self.closed:
                self.closed.add(ours)
                self.send(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", self.remote[ours]))
        elif messageNum == connection.MSG_CHANNEL_REQUEST:
            (ours,) = struct.unpack(">L", packet[:4])
            _, rest = common.getNS(packet[4:])
            if rest[:1] != b"\x00":
                self.send(connection.MSG_CHANNEL_FAILURE, struct.pack(">L", self.remote[ours]))
        self._changed()

    def serviceStopped(self) -> None:
        for _, d in self._waiters:
            d.errback(Exception("connection lost"))
        self._waiters = []

    # sending

    def send(self, messageNum: int, payload: bytes) -> None:
        if self.transport is not None and self.transport.transport is not None:
            self.transport.sendPacket(messageNum, payload)

    def open(self, ours: int, service: str, maxPacket: int = MAX_PACKET) -> None:
        host, _, port = service.rpartition(":")
        self.send(
            connection.MSG_CHANNEL_OPEN,
            common.NS(b"direct-tcpip")
            + struct.pack(">3L", ours, WINDOW, maxPacket)
            + common.NS(host.encode())
            + struct.pack(">L", int(port))
            + common.NS(b"127.0.0.1")
            + struct.pack(">L", 40000 + ours % 20000),
        )

    def channel_data(self, remote: int, data: bytes) -> None:
        self.send(connection.MSG_CHANNEL_DATA, struct.pack(">L", remote) + common.NS(data))


# scenarios


async def echo(conn: RawConnection, service: str, ours: int = 1) -> dict[str, Any]:
    conn.open(ours, service)
    await conn.until(lambda: ours in conn.answers)
    kind, detail = conn.answers[ours]
    if kind != "open":
        return {"echo": False, "open": detail}
    payload = random.Random(ours).randbytes(100_000)
    for i in range(0, len(payload), MAX_PACKET):
        conn.channel_data(conn.remote[ours], payload[i : i + MAX_PACKET])
    await conn.until(lambda: len(conn.data.get(ours, b"")) >= len(payload))
    ok = bytes(conn.data[ours]) == payload
    conn.closed.add(ours)
    conn.send(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", conn.remote[ours]))
    return {"echo": ok}


async def window_overflow(conn: RawConnection, service: str) -> dict[str, Any]:
    conn.open(7, service)
    await conn.until(lambda: 7 in conn.answers)
    result: dict[str, Any] = {"open": conn.answers[7][0]}
    conn.send(connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", conn.remote[7], 0xFFFFFFFF))
    return result


async def max_packet_zero(conn: RawConnection, service: str) -> dict[str, Any]:
    conn.open(3, service, maxPacket=0)
    await conn.until(lambda: 3 in conn.answers)
    kind, detail = conn.answers[3]
    return {"open": kind, "refusal": detail, **(await echo(conn, service, ours=4))}


UNKNOWN = 4242


async def unknown_channel(conn: RawConnection, kind: str) -> dict[str, Any]:
    head = struct.pack(">L", UNKNOWN)
    packets = {
        "data": (connection.MSG_CHANNEL_DATA, head + common.NS(b"hello")),
        "window": (connection.MSG_CHANNEL_WINDOW_ADJUST, head + struct.pack(">L", 1024)),
        "eof": (connection.MSG_CHANNEL_EOF, head),
        "close": (connection.MSG_CHANNEL_CLOSE, head),
        "request": (connection.MSG_CHANNEL_REQUEST, head + common.NS(b"exec") + b"\x01"),
    }
    conn.send(*packets[kind])
    return {}


async def malformed(conn: RawConnection, kind: str) -> dict[str, Any]:
    """A packet cut short inside its fixed fields."""
    packets = {
        "open": (connection.MSG_CHANNEL_OPEN, common.NS(b"direct-tcpip") + b"\x00\x00"),
        "global": (connection.MSG_GLOBAL_REQUEST, b"\x00\x00\x00\x40tcpip"),
        "forward": (
            connection.MSG_GLOBAL_REQUEST,
            common.NS(b"tcpip-forward") + b"\x01" + common.NS(b"web")[:5],
        ),
        "direct": (
            connection.MSG_CHANNEL_OPEN,
            common.NS(b"direct-tcpip") + struct.pack(">3L", 9, WINDOW, MAX_PACKET) + b"\x00",
        ),
    }
    conn.send(*packets[kind])
    if kind == "forward":
        replies = ("MSG_REQUEST_SUCCESS", "MSG_REQUEST_FAILURE")
        await conn.until(lambda: any(conn.counts[r] for r in replies))
    elif kind == "direct":
        await conn.until(lambda: 9 in conn.answers)
    return {}


async def many_opens(
    conn: RawConnection, service: str, n: int, echo_service: str
) -> dict[str, Any]:
    for ours in range(100, 100 + n):
        conn.open(ours, service)
    await conn.until(lambda: len(conn.answers) >= n, timeout=120)
    kinds = Counter(kind for kind, _ in conn.answers.values())
    refusals = Counter(
        f"{d['code']}: {d['why']}" for kind, d in conn.answers.values() if kind == "refused"
    )
    opened = [ours for ours, (kind, _) in conn.answers.items() if kind == "open"]
    for ours in opened:
        conn.closed.add(ours)
        conn.send(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", conn.remote[ours]))
    # The relay answers each CLOSE with its own; then the sessions are gone.
    await conn.until(lambda: conn.counts["MSG_CHANNEL_CLOSE"] >= len(opened), timeout=60)
    result = {
        "answered": len(conn.answers),
        "opened": kinds["open"],
        "refused": kinds["refused"],
        "refusals": dict(refusals.most_common(5)),
    }
    # The relay counts a session as ended once the agent's side has closed too, which
    # may be just after our CLOSEs were answered: retry briefly while at the cap.
    for attempt in range(1, 101):
        outcome = await echo(conn, echo_service, ours=100 + n + attempt)
        if outcome["echo"] or outcome["open"]["code"] != RESOURCE_SHORTAGE:
            return {**result, **outcome, "echo_attempts": attempt}
        await task.deferLater(reactor, 0.05)
    return {**result, **outcome, "echo_attempts": attempt}


async def garbage(conn: RawConnection) -> dict[str, Any]:
    conn.transport.transport.write(random.Random(4).randbytes(64 * 1024))
    return {}


async def hang_kex(conn: RawConnection, service: str) -> dict[str, Any]:
    ours = 5
    conn.counted[ours] = 0
    conn.open(ours, service)
    await conn.until(lambda: ours in conn.answers)
    if conn.answers[ours][0] != "open":
        return {"open": conn.answers[ours][1]}
    await conn.until(lambda: conn.counted[ours] >= MiB)
    raw: Any = conn.transport
    before = conn.counted[ours]
    granted = WINDOW
    started = time.monotonic()
    raw.sendRawKexInit()
    lost = False
    # Keep 80 MiB of window open, topped up every 0.1 s (up to 3 GiB granted in all).
    while not conn.client.lost.called and time.monotonic() - started < STEP_TIMEOUT:
        more = conn.counted[ours] + WINDOW - granted + 64 * MiB
        if granted + more < 3 << 30:
            conn.send(
                connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", conn.remote[ours], more)
            )
            granted += more
        await task.deferLater(reactor, 0.1, lambda: None)
    lost = conn.client.lost.called
    return {
        "open": "open",
        "before_kexinit": before,
        "after_kexinit": conn.counted[ours] - before,
        "window_granted": granted,
        "relay_kexinit": raw.relayKexInit is not None,
        "dropped_after": round(time.monotonic() - started, 2) if lost else None,
    }


MiB = 1 << 20


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    client = Client()
    factory = protocol.ClientFactory()
    factory.protocol = lambda: RawTransport(client, opts)  # type: ignore[assignment]
    reactor.connectTCP("127.0.0.1", opts.port, factory, timeout=10)  # type: ignore[attr-defined]
    conn = await client.ready
    if client.auth_failed:
        return {"auth": False}
    name, _, arg = opts.scenario.partition(":")
    outcome: dict[str, Any] = {"auth": True}
    try:
        if name == "echo":
            outcome.update(await echo(conn, opts.service))
        elif name == "window-overflow":
            outcome.update(await window_overflow(conn, opts.service))
        elif name == "max-packet-zero":
            outcome.update(await max_packet_zero(conn, opts.service))
        elif name == "unknown-channel":
            outcome.update(await unknown_channel(conn, arg))
        elif name == "malformed":
            outcome.update(await malformed(conn, arg))
        elif name == "many-opens":
            outcome.update(
                await many_opens(conn, opts.service, int(arg), opts.echo_service or opts.service)
            )
        elif name == "garbage":
            outcome.update(await garbage(conn))
        elif name == "hang-kex":
            outcome.update(await hang_kex(conn, opts.service))
        else:
            raise SystemExit(f"unknown scenario {opts.scenario}")
    except Exception as e:
        outcome["error"] = f"{type(e).__name__}: {e}"
    if opts.expect_disconnect:
        lost = defer.Deferred.fromCoroutine(_wait(client.lost, 15))
        outcome["lost"] = await lost
    else:
        outcome["lost"] = client.lost.called
        if not client.lost.called:
            conn.transport.loseConnection()
    outcome["disconnect"] = client.disconnect
    outcome["received"] = dict(conn.counts)
    return outcome


async def _wait(d: defer.Deferred[None], timeout: float) -> bool:
    try:
        await d.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--host-key", required=True, help="the relay's public host key file")
    parser.add_argument("--user", default="raw")
    parser.add_argument("--service", default="web:8080")
    parser.add_argument("--echo-service", help="for the echo after many-opens (default SERVICE)")
    parser.add_argument("--expect-disconnect", action="store_true")
    parser.add_argument("scenario")
    opts = parser.parse_args()
    opts.key = keys.Key.fromFile(opts.key)
    opts.host_key = keys.Key.fromFile(opts.host_key)

    def done(outcome: Any) -> None:
        print(json.dumps(outcome), flush=True)

    def failed(f: Failure) -> None:
        print(json.dumps({"error": f.getErrorMessage()}), flush=True)

    def go() -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(run(opts)).addCallbacks(done, failed)

    task.react(lambda _reactor: go())


if __name__ == "__main__":
    main()
