"""One fuzz target per parser that a peer's bytes reach (docs/fuzzing.md).

Each target is a function of one ``bytes`` input.  It returns normally when the code
under test kept its contract and raises otherwise (an ``AssertionError`` that names
the broken invariant, or the unexpected exception itself): atheris reports either as
a crash and saves the input, and the corpus replay and Hypothesis tests call the same
functions.  The contract, per target, is in its docstring; in short a parser returns
a well-formed, bounded result or raises the error its callers handle (``WireError``,
``ValueError``, ``ConfigError``), and the SSH layers answer garbage with a disconnect,
never with an exception that escapes to the reactor ("Unhandled Error").

The targets only call what a peer reaches (public parse functions, ``dataReceived``,
``packetReceived``, ``RelayCore.globalRequest``), so they keep working when the
formats behind them change.
"""

from __future__ import annotations

import itertools
import random
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import formattargets
import fuzzworld as world
import resumetargets
from twisted.conch.ssh import common
from twisted.conch.ssh import transport as ssh_transport
from twisted.conch.ssh.transport import SSHCiphers
from twisted.internet import defer
from twisted.python.failure import Failure

from relay.config.errors import ConfigError
from relay.config.schema import HostKeyPolicy
from relay.config.sshoptions import _Flags, _option
from relay.core import fastwire as fw
from relay.server.grantfile import parse_grant_file
from relay.ssh import wire
from relay.ssh.aead import AEADTransportMixin
from relay.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    MAX_PACKET_LENGTH,
    PacketCiphers,
)
from relay.ssh.hostkeys import HostKeyError, HostKeyVerifier, parse_fingerprint
from relay.ssh.policy import STRICT_KEX_CLIENT
from relay.ssh.server import RefusedRequest

Target = Callable[[bytes], None]
MAX_BUFFERED = 4 + MAX_PACKET_LENGTH + 64  # one whole packet and its tag/MAC


_no_failures_logged = world.no_failures_logged
_records = world.records


def _chunks(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut at positions chosen by ``seed`` (seed 0: one read)."""
    if seed == 0:
        return [data]
    rng = random.Random(seed)
    out, at = [], 0
    while at < len(data):
        n = rng.choice((1, 1, 2, 3, 5, 16, 17, 64, 1000))
        out.append(data[at : at + n])
        at += n
    return out


# --- the data port and the fast path's SSH extensions (relay/core/fastwire.py) --------


def fastwire_hello(data: bytes) -> None:
    """The data port's version 2 framing as both ends read it: ``parse_challenge`` (the
    client reading the relay's ``LRD2`` + nonce) and ``hello_length``/``parse_hello``
    (DataConnection reading a hello).

    ``parse_challenge``: None only on a prefix of ``LRD2`` shorter than the challenge,
    else a 32-byte nonce and the exact unread tail, or WireError.  ``hello_length``
    returns None (need more), a length in HELLO_LEN..MAX_HELLO_LEN, or raises
    WireError; its verdict never changes as bytes are added (a prefix it refused stays
    refused, a length once known stays the same); once that many bytes are there,
    ``parse_hello`` of them succeeds with an 8-byte ticket id, a 32-byte proof, a known
    role, and for users (only) a lower-case name of at most 255 characters and a 16-bit
    port; checking the proof against any secret and nonce is a bool, never an error."""
    try:
        got = fw.parse_challenge(data)
    except fw.WireError:
        assert not data.startswith(fw.MAGIC[: len(data)]), "a prefix of LRD2 refused"
    else:
        if got is None:
            assert len(data) < fw.CHALLENGE_LEN and fw.MAGIC.startswith(data[:4])
        else:
            nonce, rest = got
            assert len(nonce) == fw.NONCE_LEN and data == fw.MAGIC + nonce + rest
    verdicts: list[Any] = []
    for k in range(min(len(data), fw.MAX_HELLO_LEN + 1) + 1):
        try:
            verdicts.append(fw.hello_length(data[:k]))
        except fw.WireError:
            verdicts.append("refused")
    for before, after in itertools.pairwise(verdicts):
        if before == "refused" or isinstance(before, int):
            assert after == before, f"hello_length changed its mind: {before} -> {after}"
    length = verdicts[-1]
    if isinstance(length, int):
        assert fw.HELLO_LEN <= length <= fw.MAX_HELLO_LEN, length
        if len(data) >= length:
            hello = fw.parse_hello(data[:length])
            assert hello.role in (fw.ROLE_USER, fw.ROLE_AGENT)
            assert len(hello.token_id) == fw.TOKEN_ID_LEN and len(hello.proof) == fw.MAC_LEN
            assert (hello.service is None) == (hello.role == fw.ROLE_AGENT)
            if hello.service is not None:
                name, port = hello.service
                assert len(name) <= 255 and name == name.lower() and 0 <= port <= 0xFFFF
            proof = fw.hello_proof(_SECRET, hello.role, hello.token_id, _NONCE, hello.service)
            assert len(proof) == fw.MAC_LEN
    elif length is None:
        assert len(data) < fw.MAX_HELLO_LEN
    try:
        fw.parse_hello(data)
    except fw.WireError:
        pass


_SECRET = bytes(range(fw.TOKEN_SECRET_LEN))
_NONCE = bytes(range(100, 100 + fw.NONCE_LEN))


def fastwire_dispatch(data: bytes) -> None:
    """``parse_go`` (the agent reading a dispatch) and ``parse_reply`` (the relay reading
    an agent's answer, the user's client reading the relay's): None only while the
    message can still complete (under 7 + 255 + 32 or 2 + 255 bytes), else a bounded
    message and ``rest``, the exact unread tail; a GO's MAC is 32 bytes and checking
    it (``go_valid``) is a bool, never an error; WireError for anything else."""
    try:
        go = fw.parse_go(data)
    except fw.WireError:
        go = None
    else:
        if go is None:
            assert len(data) < 7 + 255 + fw.MAC_LEN
        else:
            (name, port), mac, rest = go
            assert len(name) <= 255 and 0 <= port <= 0xFFFF and len(mac) == fw.MAC_LEN
            n = data[6]
            assert data == data[: 7 + n] + mac + rest, "mac and rest are not the tail"
            assert isinstance(fw.go_valid(_SECRET, bytes(8), _NONCE, name, port, mac), bool)
    for ok, err in ((fw.AGENT_OK, fw.AGENT_ERROR), (fw.USER_OK, fw.USER_ERROR)):
        try:
            reply = fw.parse_reply(data, ok, err)
        except fw.WireError:
            continue
        if reply is None:
            assert len(data) < 2 + 255
            continue
        good, message, rest = reply
        assert len(message) <= 255 and data.endswith(rest) and len(rest) < len(data)
        assert good == (data[:1] == ok)


def fastwire_ssh(data: bytes) -> None:
    """The payloads of ``data-token-v2@labrelay`` and ``data-pool-v2@labrelay`` (requests
    as the relay reads them, replies as the user's and the agent's ends read them): a
    result whose ports fit their fields, whose services are ``(name, 1..65535)`` and
    whose lists are bounded, or WireError (the only error the callers catch) -- never
    another ValueError."""
    if not data:
        return
    which, body = data[0] % 4, data[1:]
    try:
        if which == 0:
            name, port = fw.unpack_token_request(body)
            assert len(name) < len(body) and 0 <= port <= 0xFFFFFFFF
        elif which == 1:
            _status, _message, _port, token, lifetime = fw.unpack_token_reply(body)
            assert len(token) < len(body) and lifetime >= 0
        elif which == 2:
            _count, services = fw.unpack_pool_request(body)
            assert len(services) <= 4096
            for name, port in services:
                assert name and 0 < port <= 0xFFFF, (name, port)
        else:
            reply = fw.unpack_pool_reply(body)
            assert len(reply.tokens) <= 4096 and reply.lifetime >= 0
            assert 0 <= reply.data_port <= 0xFFFFFFFF and len(reply.services) <= 4096
            for name, port in reply.services:
                assert name and 0 < port <= 0xFFFF, (name, port)
    except fw.WireError:
        pass


# --- global-request and channel-open payloads (relay/ssh/wire.py) -------------


def ssh_wire(data: bytes) -> None:
    """``unpack_forward`` (tcpip-forward, cancel-tcpip-forward) and ``unpack_endpoints``
    (direct-tcpip, forwarded-tcpip): a result with 32-bit ports, or ValueError."""
    try:
        bind, port = wire.unpack_forward(data)
        assert 0 <= port <= 0xFFFFFFFF and len(bind) <= len(data)
    except ValueError:
        pass
    try:
        _host, port, _orig, orig_port = wire.unpack_endpoints(data)
        assert 0 <= port <= 0xFFFFFFFF and 0 <= orig_port <= 0xFFFFFFFF
    except ValueError:
        pass


_REQUEST_TYPES = (
    b"tcpip-forward",
    b"cancel-tcpip-forward",
    fw.TOKEN_REQUEST,
    fw.POOL_REQUEST,
    b"keepalive@openssh.com",
)


def global_request(data: bytes) -> None:
    """``RelayCore.globalRequest`` with any payload, from an agent or a user, in any
    order: every request is answered (after the takeover probe's window at most) with
    a bool, ``(bool, reply)`` or a refusal with its reason (``RefusedRequest``) -- never
    an exception -- and a reply to a fast-path request parses with the matching
    fastwire unpacker."""
    core, clock = world.new_core()
    conns = {
        kind: world.new_connection(core, kind)[0] for kind in ("agent", "user")
    }
    answers: list[Any] = []
    for sel, payload in _records(data)[:32]:
        kind = "agent" if sel & 0x80 else "user"
        index = sel & 0x7F
        if index < len(_REQUEST_TYPES):
            request = _REQUEST_TYPES[index]
        else:  # an arbitrary type: its name is the payload's first bytes
            request, payload = payload[: index % 40], payload[index % 40 :]
        d = defer.maybeDeferred(core.globalRequest, conns[kind], request, payload)
        d.addBoth(answers.append)
        clock.advance(1)  # past the takeover probe
        assert answers, f"{request!r} was not answered"
        answer = answers.pop()
        assert not isinstance(answer, Failure), answer.getTraceback()
        if isinstance(answer, tuple):
            ok, reply = answer
            assert isinstance(ok, bool) and isinstance(reply, bytes)
            if ok and request == fw.TOKEN_REQUEST:
                fw.unpack_token_reply(reply)
            elif ok and request == fw.POOL_REQUEST:
                fw.unpack_pool_reply(reply)
        elif isinstance(answer, RefusedRequest):
            assert isinstance(answer.why, str) and answer.why and not answer, answer
        else:
            assert isinstance(answer, bool), answer
    for conn in conns.values():
        conn.serviceStopped()
    core.dataport.stop()
    _no_failures_logged()


# --- the relay's SSH transport: banner, packets, AEAD framing (relay/ssh/aead.py) ---


def _feed(t: Any, chunks: list[bytes]) -> None:
    """Reads into the relay's transport, as the reactor delivers them: not after the
    transport asked to close (the reactor stops reading then)."""
    for chunk in chunks:
        if t.transport.disconnecting:
            break
        t.dataReceived(chunk)
        buffered = len(t._rbuf or b"") + len(t.buf)
        assert buffered <= MAX_BUFFERED, f"{buffered} bytes buffered"


def _close(t: Any, clock: Any) -> None:
    t.connectionLost(None)
    clock.advance(3600)


def transport_banner(data: bytes) -> None:
    """The version exchange (Conch's ``SSHTransportBase.dataReceived`` behind the
    relay's transport), bytes cut into reads at random (``data[0]`` seeds the cuts):
    no exception escapes, no failure is logged, at most 4 KiB is held before the
    version line (then a disconnect), and nothing is dispatched as an SSH message
    before the peer's version line was read."""
    if not data:
        return
    core, clock = world.new_core()
    t = world.new_transport(core)
    early: list[int] = []
    dispatch = t.dispatchMessage

    def checked(num: int, payload: bytes) -> None:
        if not t.gotVersion:
            early.append(num)
        dispatch(num, payload)

    t.dispatchMessage = checked
    _feed(t, _chunks(data[1:], data[0]))
    assert not early, f"messages {early} dispatched before the version exchange"
    if not t.gotVersion:
        assert len(t.buf) <= 4096 or t.disconnects, f"{len(t.buf)} bytes before a version"
    _close(t, clock)
    _no_failures_logged()


def transport_packets(data: bytes) -> None:
    """The relay's transport after the version line, before any key (the plaintext
    packet path and every pre-auth message handler: KEXINIT, KEX_ECDH_INIT, service
    and userauth requests, ...).  ``data[0]`` even: the rest are raw bytes; odd: the rest
    are ``(message number, payload)`` records framed as valid plaintext packets, so the
    handlers see arbitrary payloads.  Garbage ends in a disconnect: no exception escapes
    ``dataReceived``, no failure is logged, buffers stay within one packet."""
    if not data:
        return
    core, clock = world.new_core()
    t = world.new_transport(core)
    t.dataReceived(world.CLIENT_VERSION)
    body = data[1:]
    if data[0] & 1:
        body = b"".join(world.frame_plain(bytes((sel,)) + payload)
                        for sel, payload in _records(body))
    _feed(t, _chunks(body, data[0] >> 1))
    _close(t, clock)
    _no_failures_logged()


SESSION_ID = world.SESSION_ID


def signed_userauth(kind: str, user: bytes = b"alice") -> bytes:
    """A publickey USERAUTH_REQUEST payload signed for ``SESSION_ID`` by the fixed key
    of ``kind`` (what an honest client sends after the key exchange)."""
    key = world.AGENT_KEY if kind == "agent" else world.USER_KEY
    blob = key.public().blob()
    head = (common.NS(user) + common.NS(b"ssh-connection") + common.NS(b"publickey") + b"\x01"
            + common.NS(b"ssh-ed25519") + common.NS(blob))
    signature = key.sign(common.NS(SESSION_ID) + b"\x32" + head)
    return head + common.NS(signature)


def userauth(data: bytes) -> None:
    """User authentication as the relay runs it (RelayUserAuth, GrantChecker, Conch's
    SSHUserAuthServer) after a completed strict key exchange (``world.after_strict_kex``):
    the client's ``SERVICE_REQUEST ssh-userauth`` is accepted, then records are messages
    50 + (sel % 30) or, with bit 7, connection messages 80..100 once authenticated.
    Pre-auth, reached by anyone who completes a key exchange: nothing escapes
    ``dispatchMessage``, no failure is logged, the connection stops cleanly."""
    core, clock = world.new_core()
    t = world.new_transport(core)
    t.dataReceived(world.CLIENT_VERSION)
    world.after_strict_kex(t)
    t.dispatchMessage(5, common.NS(b"ssh-userauth"))
    assert not t.disconnects, t.disconnects
    for sel, payload in _records(data)[:32]:
        if t.transport.disconnecting:
            break
        num = 80 + (sel & 0x7F) % 21 if sel & 0x80 else 50 + sel % 30
        t.dispatchMessage(num, payload)
        clock.advance(0.01)
    _close(t, clock)
    _no_failures_logged()


class _Recorder(AEADTransportMixin, ssh_transport.SSHTransportBase):
    """The AEAD packet reader with dispatch recorded instead of acted upon."""

    isClient = False

    def __init__(self) -> None:
        self.dispatched: list[tuple[int, bytes]] = []
        self.disconnects: list[int] = []

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        self.dispatched.append((messageNum, payload))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self.disconnects.append(reason)
        super().sendDisconnect(reason, desc)


_KEY = bytes(range(64))  # chacha20-poly1305 takes 64 bytes; GCM the first 16 or 32
_IV_OUT = bytes(range(100, 116))  # the peer's "in", ours "out": unused here
_IV_IN = bytes.fromhex("a0a1a2a3fffffffffffffffe") + b"\x00" * 4  # the counter wraps
_INTEG = bytes(range(64, 128))
#: ``data[0] % 4`` of aead_framing: the ciphers the transport policy allows, and none.
AEAD_MODES = (b"none", AES128_GCM, AES256_GCM, CHACHA20_POLY1305)


def _ciphers(mode: int) -> tuple[SSHCiphers, SSHCiphers | None]:
    """(the reader's ciphers, the peer's matching sender) for ``mode`` (``AEAD_MODES``):
    ``none`` is the pre-key path; the others are set through ``PacketCiphers.setKeys``
    as ``_keySetup`` does after a key exchange (the MAC is implicit)."""
    if mode == 0:
        none = SSHCiphers(b"none", b"none", b"none", b"none")
        none.setKeys(b"", b"", b"", b"", b"", b"")
        return none, None
    cipher, mac = AEAD_MODES[mode], b"hmac-sha2-256-etm@openssh.com"
    reader = PacketCiphers(cipher, cipher, mac, mac)
    reader.setKeys(_IV_OUT, _KEY, _IV_IN, _KEY, _INTEG, _INTEG)
    peer = PacketCiphers(cipher, cipher, mac, mac)
    peer.setKeys(_IV_IN, _KEY, _IV_OUT, _KEY, _INTEG, _INTEG)
    assert reader.inAEAD is not None and peer.outAEAD is not None
    return reader, peer


def _plain(mode: int, rec: bytes) -> bytes:
    """``rec`` (padding length, message number, payload, as the fuzzer chose them) cut
    or zero-filled to the cipher's alignment, so only the fields inside are hostile."""
    if mode == 0:
        return rec + b"\x00" * (-(len(rec) + 4) % 8)
    block = 16 if mode in (1, 2) else 8
    return rec + b"\x00" * max(block - len(rec), -len(rec) % block)


def _seal(mode: int, peer: Any, seq: int, plain: bytes) -> bytes:
    """``plain`` as the peer puts it on the wire as packet ``seq``."""
    if mode == 0:
        return struct.pack(">L", len(plain)) + plain
    return b"".join(peer.outAEAD.seal(seq, plain))


def _sealed_stream(mode: int, strict: bool, records: list[bytes]) -> tuple[bytes, list[bytes]]:
    """The wire bytes of ``records`` sealed in order by the peer (sequence numbers
    restarting after a NEWKEYS under strict KEX, as the reader expects), and their
    plaintexts."""
    _reader, peer = _ciphers(mode)
    out, plains, seq = [], [], 0
    for rec in records:
        plain = _plain(mode, rec)
        out.append(_seal(mode, peer, seq, plain))
        plains.append(plain)
        seq = 0 if strict and plain[1:2] == b"\x15" else (seq + 1) & 0xFFFFFFFF
    return b"".join(out), plains


def _expected(mode: int, plains: list[bytes]) -> tuple[list[tuple[int, bytes]], bool]:
    """What the reader must make of correctly sealed ``plains``: each packet's message
    and payload in order, up to the first whose padding length is impossible (at least
    4 bytes under keys, RFC 4253 6; Conch checks only that it fits in the clear), which
    ends in a disconnect."""
    out = []
    for plain in plains:
        pad = plain[0]
        if len(plain) - pad < 2 or (mode and pad < 4):
            return out, True
        out.append((plain[1], plain[2 : len(plain) - pad]))
    return out, False


def aead_framing(data: bytes) -> None:
    """The AEAD transport's packet reader (``dataReceived``/``getPacket`` of
    ``AEADTransportMixin``) after keys are set through ``PacketCiphers.setKeys``, for
    no cipher, AES-128-GCM, AES-256-GCM and chacha20-poly1305 (the transport policy's
    AEAD ciphers).  ``data[0]``: mode (bits 0-1), raw bytes or sealed records (bit 2),
    strict KEX (bit 3; always for chacha20-poly1305, which the policy allows only with
    it), how reads are cut (bits 4-7).  The same bytes cut into reads differently give
    the same messages and the same disconnect; correctly sealed records come out
    exactly as sealed, in order, up to the first with an impossible padding length
    (then one disconnect); a disconnect stops parsing; at most one packet is
    buffered; never an exception."""
    if not data:
        return
    mode, sealed, cut = data[0] % 4, bool(data[0] & 4), data[0] >> 4
    strict = bool(data[0] & 8) or AEAD_MODES[mode] == CHACHA20_POLY1305
    body = data[1:]
    expected = None
    if sealed:
        body, plains = _sealed_stream(mode, strict, [r for _sel, r in _records(body)])
        expected = _expected(mode, plains)
    outcomes = []
    for seed in (0, cut + 1):
        reader, _peer = _ciphers(mode)
        t = _Recorder()
        t.transport = world.TCP()
        t.gotVersion = True
        t.currentEncryptions = reader
        if strict:  # the state a strict key exchange leaves (world.after_strict_kex)
            t.kexGuard.kexinit_received([STRICT_KEX_CLIENT], 0)
            t.kexGuard.newkeys_received()
        for chunk in _chunks(body, seed):
            t.dataReceived(chunk)
            assert len(t._rbuf or b"") <= MAX_BUFFERED
            if t.disconnects:
                break
        assert len(t.disconnects) <= 1, "disconnected twice"
        outcomes.append((t.dispatched, t.disconnects))
    assert outcomes[0] == outcomes[1], "the result depends on how reads were cut"
    if expected is not None:
        messages, bad = expected
        assert outcomes[0][0] == messages, "sealed records did not come out as sealed"
        assert bool(outcomes[0][1]) == bad, "a disconnect without a bad record, or none"


# --- the connection layer after authentication (relay/ssh/connection.py) --------


def _check_channels(conn: Any) -> None:
    for channel in conn.channels.values():
        assert channel.localWindowLeft >= 0, "negative receive window"
        assert channel.remoteWindowLeft <= 0xFFFFFFFF, "send window past 2^32-1"


def connection(data: bytes) -> None:
    """Connection-layer messages an authenticated peer sends (FlowConnection and the
    relay's handlers, BridgedChannel behind them): an agent ``lab_pc`` with
    gpu-cluster:22 registered and a user ``alice``; records pick the sender (bit 7),
    the message (80 + low bits % 21, i.e. GLOBAL_REQUEST..CHANNEL_FAILURE) and its
    payload.  Nothing escapes ``packetReceived``, no failure is logged, windows stay
    within 0..2^32-1, and both connections stop cleanly."""
    core, clock = world.new_core()
    agent, agent_link = world.new_connection(core, "agent")
    user, user_link = world.new_connection(core, "user")
    agent.packetReceived(80, b"\x00\x00\x00\x0dtcpip-forward\x01"
                         + b"\x00\x00\x00\x0bgpu-cluster\x00\x00\x00\x16")
    assert agent_link.packets[-1][0] == 81, "registration refused"
    for sel, payload in _records(data)[:64]:
        conn, link = (agent, agent_link) if sel & 0x80 else (user, user_link)
        if link.disconnects:
            continue
        conn.packetReceived(80 + (sel & 0x7F) % 21, payload)
        _check_channels(conn)
        clock.advance(0.1)
    for conn in (user, agent):
        conn.serviceStopped()
    clock.advance(3600)
    _no_failures_logged()


# --- grant files and the agent's -o options ------------------------------------


def grant_file(data: bytes) -> None:
    """``parse_grant_file`` (authorized_keys lines with options) on any text, as an
    agents file (``data[0]`` even) or a users file: principals with valid names, ports
    in 1..65535, or ConfigError -- never another exception."""
    if not data:
        return
    kind = "agent" if data[0] % 2 == 0 else "user"
    text = data[1:].decode("utf-8", "replace")
    try:
        sites = parse_grant_file(text, kind, "fuzz")
    except ConfigError:
        return
    for site in sites:
        p = site.principal
        assert p.kind == kind and p.name and p.keys
        assert all(1 <= port <= 65535 for port in p.public_ports)
        assert all(g.port is None or 1 <= g.port <= 65535 for g in p.services)


def agent_option(data: bytes) -> None:
    """One ``labrelay agent -o`` option (OpenSSH's ``Option=Value``): accepted, or
    ConfigError; in linear time (the per-input time limit catches a regex that
    backtracks)."""
    text = data.decode("utf-8", "replace")
    try:
        _option(_Flags(), text)
    except ConfigError:
        pass


_KNOWN_HOSTS = Path(tempfile.mkdtemp(prefix="labrelay-fuzz-kh-")) / "known_hosts"


def known_hosts(data: bytes) -> None:
    """The agent's host-key check (``HostKeyVerifier.verify``) against a known_hosts
    file of any content (``data[1:]``; ``data[0]`` picks the port, 22 or 2222), and
    ``parse_fingerprint`` of its first line: the key is accepted (a str saying why) or
    refused with HostKeyError; a fingerprint parses to 32 bytes or raises ValueError."""
    if not data:
        return
    _KNOWN_HOSTS.write_bytes(data[1:])
    policy = HostKeyPolicy(known_hosts=_KNOWN_HOSTS)
    port = 22 if data[0] % 2 == 0 else 2222
    try:
        why = HostKeyVerifier(policy, "cloud.example.org", port).verify(world.HOST_KEY.public())
        assert isinstance(why, str)
    except HostKeyError:
        pass
    try:
        assert len(parse_fingerprint(data[1:].decode("utf-8", "replace").split("\n")[0])) == 32
    except ValueError:
        pass


TARGETS: dict[str, Target] = {
    "fastwire_hello": fastwire_hello,
    "fastwire_dispatch": fastwire_dispatch,
    "fastwire_ssh": fastwire_ssh,
    "ssh_wire": ssh_wire,
    "global_request": global_request,
    "transport_banner": transport_banner,
    "transport_packets": transport_packets,
    "aead_framing": aead_framing,
    "userauth": userauth,
    "connection": connection,
    "grant_file": grant_file,
    "agent_option": agent_option,
    "known_hosts": known_hosts,
    **formattargets.TARGETS,  # KRL, HTTP CONNECT, resume, share@labrelay
    **resumetargets.TARGETS,  # the resume hello, whole, at each end
}
