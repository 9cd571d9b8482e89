"""Fuzz targets for the wire and file formats of round 3 (docs/fuzzing.md): the KRL
parser, the HTTP CONNECT answer, the resume hello/offer/counts and the
``share@labrelay`` channel request.  Same contract as :mod:`fuzztargets` (which lists
them in its ``TARGETS``): a bounded, well-formed result or the one error the caller
handles; anything else, or a result out of bounds, is a finding.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

from twisted.conch.ssh import common
from twisted.internet import defer

from relay.core import httpconnect as hc
from relay.core import krl as k
from relay.core import resume as rs
from relay.ssh import wire
from relay.ssh.channels import BridgedChannel
from relay.ssh.connection import FlowConnection
from relay.ssh.earlydata import EarlyIntake
from relay.testing.ssh import FakeSSHTransport

Target = Callable[[bytes], None]


# --- KRL (relay/core/krl.py): an operator's file, but one fetched from elsewhere ------


def krl(data: bytes) -> None:
    """``parse_krl`` on any bytes: a :class:`Krl` or ``KrlError``.  What it keeps is no
    larger than the file (no object per bitmap bit: a 2 MiB bitmap once became 16
    million set entries, built in quadratic time), and every lookup answers a reason
    or None."""
    try:
        parsed = k.parse_krl(data)
    except k.KrlError:
        return
    entries = len(parsed.keys) + len(parsed.sha1) + len(parsed.sha256)
    kept = sum(len(b) for b in parsed.keys | parsed.sha1 | parsed.sha256)
    for entry in parsed.certs.values():
        entries += (len(entry.serials) + len(entry.ranges) + len(entry.bitmaps)
                    + len(entry.key_ids))
        kept += sum(len(b.bits) for b in entry.bitmaps) + sum(map(len, entry.key_ids))
    assert entries <= len(data) and kept <= len(data), (entries, kept, len(data))
    probe = data[-32:]
    for why in (parsed.revoked_key(probe), parsed.revoked_key(hashlib.sha256(data).digest()),
                parsed.revoked_cert(probe, len(data), probe, probe),
                parsed.revoked_cert(b"", 2**64 - 1, b"", b"")):
        assert why is None or isinstance(why, str)
    for ca in list(parsed.certs)[:4]:
        for serial in (0, 1, 2**63, 2**64 - 1, len(data)):
            why = parsed.revoked_cert(ca, serial, probe, b"")
            assert why is None or isinstance(why, str)


# --- HTTP CONNECT (relay/core/httpconnect.py): a hostile or broken proxy's answer -----


def http_connect(data: bytes) -> None:
    """``parse_response`` fed as ``relay.transport.proxy`` feeds it (the answer so far,
    after every read; the first byte chooses the reads): None only while the header is
    unfinished and within ``MAX_RESPONSE``; a :class:`Tunnel` only for a 2xx status
    line, handing back exactly the bytes after the blank line; else ``ProxyError``
    whose message is short and printable (it reaches a log and the operator)."""
    if not data:
        return
    answer = data[1:]
    n = max(1, len(answer) // (data[0] % 7 + 1))
    for end in range(n, len(answer) + n, n):
        buf = answer[:end]
        try:
            got = hc.parse_response(buf)
        except hc.ProxyError as e:
            text = str(e)
            assert len(text) < 1000 and text.isprintable(), text  # 200 bytes, escaped
            return
        if got is None:
            assert b"\r\n\r\n" not in buf and len(buf) <= hc.MAX_RESPONSE, len(buf)
            continue
        end = buf.index(b"\r\n\r\n")
        assert end <= hc.MAX_RESPONSE and 200 <= got.status < 300
        status_line = buf[:end].split(b"\r\n", 1)[0]
        assert status_line.split(b" ", 2)[1] == str(got.status).encode()
        assert got.rest == buf[end + 4:]
        return


# --- the resume wire format (relay/core/resume.py, relay/ssh/resumable.py) ------------


def _stream(data: bytes) -> rs.Stream:
    """A stream that sent, had acknowledged and received what ``data``'s first bytes
    say (sizes up to 64 KiB)."""
    head = (data + bytes(6))[:6]
    sent, acked, received = (int.from_bytes(head[i:i + 2], "big") for i in (0, 2, 4))
    stream = rs.Stream(b"s" * rs.SID_LEN)
    stream.wrote(bytes(sent))
    stream.ack(min(acked, sent))
    stream.got(received)
    if head[0] & 1:
        stream.wrote_eof()
    if head[1] & 1:
        stream.lost(0.0, 10.0)
    return stream


def resume_wire(data: bytes) -> None:
    """The resume messages as the peer sends them: the agent's hello (the relay reads
    it), the relay's reply (the agent reads it), an offer (the relay), the counts in a
    confirmation (the agent), a resumable open's trailing id (both).  Each parses to
    bounded values or raises ``ValueError``; a parsed offer or counts fed to a stream
    resumes it with at most what it holds for retransmission, or is refused
    (``ResumeRefused``), never anything else."""
    for parse in (rs.unpack_hello, rs.unpack_hello_reply):
        try:
            a, b = parse(data)  # type: ignore[operator]
        except ValueError:
            continue
        instance = a if isinstance(a, bytes) else b
        assert 1 <= len(instance) <= 64
    try:
        before, sid = rs.split_sid(data)
        assert len(sid) == rs.SID_LEN and before + rs.pack_sid(sid) == data
    except ValueError:
        pass
    offers = []
    try:
        offer = rs.unpack_offer(data)
        assert len(offer.sid) == rs.SID_LEN and 0 <= offer.received <= rs.MAX_COUNT
        assert rs.unpack_offer(rs.pack_offer(offer)) == offer
        offers.append(offer)
    except ValueError:
        pass
    try:
        received, eof = rs.unpack_counts(data)
        assert 0 <= received <= rs.MAX_COUNT
        offers.append(rs.Offer(b"s" * rs.SID_LEN, received, eof))
    except ValueError:
        pass
    for offer in offers:
        stream = _stream(data)
        unacked = stream.unacked
        try:
            plan = stream.resume(offer, 1.0)
        except rs.ResumeRefused:
            assert stream.state is rs.StreamState.ENDED
            continue
        assert plan.size <= unacked and stream.acked == offer.received
        assert plan.size == stream.sent - offer.received


# --- share@labrelay (relay/ssh/wire.py, read by the agent's BridgedChannel) -----------


class _Scheduler:
    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.moved: list[tuple[object, str]] = []

    def set_weight(self, user: str, weight: float) -> None:
        self.weights[user] = weight

    def move(self, flow: object, user: str) -> None:
        self.moved.append((flow, user))


class _Conn:
    def __init__(self) -> None:
        self.scheduler = _Scheduler()


def share_request(data: bytes) -> None:
    """``share@labrelay`` on a forwarded channel, any payload: the channel answers 1
    (a user of at most 100 characters, a weight in 0.01..100 handed to the link's
    scheduler) or 0 (malformed, ignored), never raises."""
    try:
        user, weight = wire.unpack_share(data)
        assert len(user) <= 100 and 0.01 <= weight <= 100.0, (user, weight)
    except ValueError:
        pass
    conn = _Conn()
    channel = BridgedChannel(b"forwarded-tcpip", conn=conn)
    answered = channel.requestReceived(wire.SHARE, data)
    assert answered in (0, 1)
    if answered:
        ((user, weight),) = conn.scheduler.weights.items()
        assert channel.shareUser == user and len(user) <= 100 and 0.01 <= weight <= 100.0
        assert conn.scheduler.moved == [(channel, user)]  # its queued bytes are the user's
    else:
        assert conn.scheduler.weights == {} and conn.scheduler.moved == []


# --- early-data@labrelay (relay/ssh/earlydata.py, read by the agent's connection) -------


class _EarlyAgent(FlowConnection):
    """An agent's connection service that took ``early-data-ok``: opens of channels 1
    (answered at once) and 2 (being answered)."""

    def __init__(self) -> None:
        super().__init__()
        self.transport = FakeSSHTransport()
        self.early = EarlyIntake()
        self.made: list[BridgedChannel] = []
        self.later: list[Any] = []

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int,
                   data: bytes) -> Any:
        channel = BridgedChannel(channelType, window=64 * 1024, remoteWindow=windowSize,
                                 remoteMaxPacket=maxPacket)
        self.made.append(channel)
        if len(self.made) == 1:
            return channel
        d: defer.Deferred[Any] = defer.Deferred()
        self.later.append((d, channel))
        return d


def early_data(data: bytes) -> None:
    """Any sequence of ``early-data@labrelay`` payloads (records cut from ``data``) to an
    agent with one channel confirmed and one open being answered: each is delivered
    (to the channel it names), held (for the open), dropped (an unknown channel), or
    ends the link with a protocol error (malformed, past 32 KiB or the window); never
    an exception, and never more than 32 KiB taken per channel."""
    agent = _EarlyAgent()
    for sender in (1, 2):
        agent.ssh_CHANNEL_OPEN(common.NS(b"forwarded-tcpip")
                               + struct.pack(">3L", sender, 1 << 20, 32768)
                               + common.NS(b"web") + struct.pack(">L", 80)
                               + common.NS(b"10.0.0.1") + struct.pack(">L", 5))
    view = memoryview(data)
    while len(view) >= 2 and not agent.transport.disconnects:
        n = int.from_bytes(view[:2], "big")
        agent.earlyReceived(bytes(view[2:2 + n]))
        view = view[2 + n:]
    d, channel = agent.later[0]
    d.callback(channel)
    for made in agent.made:
        taken = sum(map(len, made._early or []))
        assert taken <= wire.EARLY_LIMIT, taken
        assert made.localWindowLeft == 64 * 1024 - taken


# --- request-refused@labrelay (read by the agent's connection) ---------------------


def request_refused(data: bytes) -> None:
    """``request-refused@labrelay`` with any payload, then the failure of the agent's
    pending ``tcpip-forward`` for ``echo2:7``: a plain refusal, or one whose note is
    bounded (bind <= 255 bytes, reason <= 1 KiB, as characters after decoding) and is
    believed only when it names that very request; never an exception, never a reply."""
    from relay.ssh.client import LinkConnection
    from relay.ssh.openerrors import RefusedWithReason, refusal_reason, refused_by_peer

    conn = LinkConnection(object())  # type: ignore[arg-type]  # nothing here reads it
    link = FakeSSHTransport()
    conn.transport = link  # type: ignore[assignment]
    asked = conn.sendGlobalRequest(b"tcpip-forward", wire.pack_forward("echo2", 7), wantReply=1)
    outcome: list[Any] = []
    asked.addBoth(outcome.append)
    conn.packetReceived(80, common.NS(wire.REQUEST_REFUSED) + b"\x00" + data)
    conn.packetReceived(82, b"")
    (f,) = outcome
    assert refused_by_peer(f) and link.packets[1:] == [] and link.disconnects == []
    why = refusal_reason(f, b"tcpip-forward", "echo2", 7)
    if isinstance(f.value, RefusedWithReason):
        note = f.value.note
        assert len(note.request) <= 255 and len(note.bind) <= 255 and len(note.why) <= 1024
        assert (why is not None) == note.answers(b"tcpip-forward", "echo2", 7)
    else:
        assert why is None


TARGETS: dict[str, Target] = {
    "krl": krl,
    "http_connect": http_connect,
    "resume_wire": resume_wire,
    "share_request": share_request,
    "early_data": early_data,
    "request_refused": request_refused,
}


# --- seeds (make_corpus.py) -----------------------------------------------------------


def _s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def krl_file(*sections: bytes, comment: bytes = b"seed") -> bytes:
    """A KRL: the header, then ``sections`` (type byte + string each)."""
    return k.MAGIC + struct.pack(">IQQQ", 1, 7, 0, 0) + _s(b"") + _s(comment) + b"".join(
        sections)


def cert_section(ca: bytes, *subs: tuple[int, bytes]) -> bytes:
    body = _s(ca) + _s(b"") + b"".join(bytes((kind,)) + _s(sub) for kind, sub in subs)
    return bytes((k.SECTION_CERTIFICATES,)) + _s(body)


def krl_seeds() -> dict[str, bytes]:
    key = _s(b"ssh-ed25519") + _s(bytes(range(32)))
    return {
        "empty": krl_file(),
        "keys": krl_file(bytes((k.SECTION_EXPLICIT_KEY,)) + _s(_s(key) + _s(key[::-1]))),
        "sha256": krl_file(bytes((k.SECTION_FINGERPRINT_SHA256,))
                           + _s(_s(hashlib.sha256(key).digest()))),
        "sha1": krl_file(bytes((k.SECTION_FINGERPRINT_SHA1,)) + _s(_s(hashlib.sha1(key).digest()))),
        "serials": krl_file(cert_section(key, (k.CERT_SERIAL_LIST,
                                               struct.pack(">QQQ", 1, 5, 2**64 - 1)))),
        "range": krl_file(cert_section(b"", (k.CERT_SERIAL_RANGE, struct.pack(">QQ", 10, 99)))),
        "bitmap": krl_file(cert_section(key, (k.CERT_SERIAL_BITMAP,
                                              struct.pack(">Q", 100) + _s(b"\x00\xff\x01\x80")))),
        "key-ids": krl_file(cert_section(key, (k.CERT_KEY_ID, _s(b"alice") + _s(b"")))),
        "signature": krl_file(bytes((k.SECTION_SIGNATURE,)) + _s(b"sig")),
        "truncated": krl_file(cert_section(key, (k.CERT_SERIAL_RANGE, b"\x00" * 9))),
    }


def http_seeds() -> dict[str, bytes]:
    return {name: bytes((sel,)) + text for name, sel, text in (
        ("ok", 0, b"HTTP/1.1 200 Connection established\r\n\r\n"),
        ("ok-rest", 2, b"HTTP/1.0 200 OK\r\nVia: squid\r\n\r\nSSH-2.0-x\r\n"),
        ("auth", 1, b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b"Proxy-Authenticate: Basic realm=x\r\n\r\n"),
        ("forbidden", 3, b"HTTP/1.1 403 Forbidden\r\n\r\n<html>no</html>"),
        ("not-http", 0, b"SSH-2.0-OpenSSH_9.6\r\n"),
        ("bad-status", 4, b"HTTP/1.1 2000 OK\r\n\r\n"),
        ("unfinished", 6, b"HTTP/1.1 200 OK\r\nX: " + b"a" * 300),
        ("control", 5, b"HTTP/1.1 502 \x1b[2J\xff\r\n\r\n"),
    )}


def resume_seeds() -> dict[str, bytes]:
    sid = bytes(range(rs.SID_LEN))
    return {
        "hello": rs.pack_hello(b"instance-id-0001"),
        "hello-reply": rs.pack_hello_reply(b"relay-instance", 60),
        "offer": rs.pack_offer(rs.Offer(sid, 1000, False)),
        "offer-eof": rs.pack_offer(rs.Offer(sid, 0, True)),
        "counts": rs.pack_counts(12, False),
        "counts-huge": rs.pack_counts(2**63 - 1, True),
        "open": b"\x00\x00\x00\x03web" + struct.pack(">L", 8080) + rs.pack_sid(sid),
        "hello-long": struct.pack(">LL", 1, 2**32 - 1) + b"x" * 70,
    }


def share_seeds() -> dict[str, bytes]:
    return {
        "alice": wire.pack_share("alice", 1.0),
        "weight": wire.pack_share("bob", 4.0),
        "tiny": _s(b"carol") + _s(b"0.0000001"),
        "huge": _s(b"dave") + _s(b"1e999"),
        "nan": _s(b"eve") + _s(b"nan"),
        "long-user": _s("\u00e9".encode() * 500) + _s(b"2"),
        "not-ascii": _s(b"x") + _s(b"\xff1"),
        "short": b"\x00\x00\x00\x09abc",
    }


def early_seeds() -> dict[str, bytes]:
    def rec(payload: bytes) -> bytes:
        return struct.pack(">H", len(payload)) + payload

    return {
        "one": rec(wire.pack_early_data(1, b"GET / HTTP/1.1\r\n")),
        "held": rec(wire.pack_early_data(2, b"SSH-2.0-OpenSSH_9.6\r\n"))
        + rec(wire.pack_early_data(2, b"more")),
        "unknown": rec(wire.pack_early_data(7, b"x")),
        "short": rec(b"\x00\x00\x00\x01\x00\x00\x00\x09abc"),
        "limit": rec(wire.pack_early_data(1, b"y" * 30000))
        + rec(wire.pack_early_data(1, b"z" * 3000)),
        "both": rec(wire.pack_early_data(1, b"a")) + rec(wire.pack_early_data(2, b"b")),
    }


def refused_seeds() -> dict[str, bytes]:
    forward = b"tcpip-forward"
    return {
        "granted": wire.pack_request_refused(
            forward, "echo2", 7, "service echo2:7 is not granted to agent lab_pc"),
        "other-port": wire.pack_request_refused(forward, "echo2", 8, "why"),
        "cancel": wire.pack_request_refused(b"cancel-tcpip-forward", "echo2", 7, "why"),
        "long": wire.pack_request_refused(forward, "echo2", 7, "\u00e9" * 2000),
        "bad-utf8": _s(forward) + _s(b"echo2") + struct.pack(">L", 7) + _s(b"\xff\x1b[2J"),
        "short": _s(forward) + _s(b"echo2") + b"\x00\x00",
        "overlong": _s(forward) + _s(b"echo2") + struct.pack(">LL", 7, 2**32 - 1) + b"x",
    }


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "krl": krl_seeds,
    "http_connect": http_seeds,
    "resume_wire": resume_seeds,
    "share_request": share_seeds,
    "early_data": early_seeds,
    "request_refused": refused_seeds,
}
