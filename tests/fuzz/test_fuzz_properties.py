"""Property tests (Hypothesis) for the parsers the fuzz targets cover, with structured
strategies where random bytes rarely get far: well-formed messages with hostile
fields, grant lines built from real options and keys, ``-o`` options with their real
names.  They run in the normal test run; each calls the target of tests/fuzz that
states the invariant, or checks a round trip.
"""

from __future__ import annotations

import struct
import time

import fuzztargets as ft
import fuzzworld as world
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import common

from relay.core import fastwire as fw
from relay.ssh import wire

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.one_of(st.sampled_from([0, 1, 22, 65535, 65536, 2**31, 2**32 - 1]),
                st.integers(0, 2**32 - 1))
names = st.one_of(st.sampled_from(["gpu-cluster", "jupyter", "", "*", "a" * 255]),
                  st.text(max_size=40))
tokens = st.binary(min_size=fw.TOKEN_LEN, max_size=fw.TOKEN_LEN)
nonces = st.binary(min_size=fw.NONCE_LEN, max_size=fw.NONCE_LEN)
pool_services = st.lists(st.tuples(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
                                   st.integers(1, 65535)), max_size=4)


def rec(sel: int, payload: bytes) -> bytes:
    return bytes((sel,)) + struct.pack(">H", len(payload)) + payload


# --- fastwire: round trips, then the targets on hostile variations -------------


@FAST
@given(tokens, nonces, st.text(st.characters(max_codepoint=127), min_size=1, max_size=255),
       st.integers(1, 65535), st.binary(max_size=40))
def test_user_hello_round_trip(token: bytes, nonce: bytes, name: str, port: int,
                               extra: bytes) -> None:
    """A v2 user hello parses back to its ticket id and service, and its proof is the
    HMAC of the ticket's secret over this nonce and service only."""
    token_id, secret = fw.split_ticket(token)
    hello = fw.user_hello(token, nonce, name, port)
    assert fw.hello_length(hello + extra) == len(hello)
    got = fw.parse_hello(hello)
    assert (got.role, got.token_id, got.service) == (fw.ROLE_USER, token_id, (name.lower(), port))
    assert got.proof == fw.hello_proof(secret, fw.ROLE_USER, token_id, nonce, got.service)
    assert got.proof != fw.hello_proof(secret, fw.ROLE_USER, token_id, nonce[::-1] + b"x",
                                       got.service)
    assert got.proof != fw.hello_proof(secret, fw.ROLE_USER, token_id, nonce,
                                       (name.lower(), port % 65535 + 1))
    ft.fastwire_hello(hello + extra)
    ft.fastwire_hello(fw.challenge(nonce) + extra)


@FAST
@given(tokens, nonces, st.binary(max_size=40))
def test_agent_hello_round_trip(token: bytes, nonce: bytes, extra: bytes) -> None:
    token_id, secret = fw.split_ticket(token)
    hello = fw.agent_hello(token, nonce)
    assert fw.hello_length(hello + extra) == len(hello) == fw.HELLO_LEN
    got = fw.parse_hello(hello)
    assert (got.role, got.token_id, got.service) == (fw.ROLE_AGENT, token_id, None)
    assert got.proof == fw.hello_proof(secret, fw.ROLE_AGENT, token_id, nonce)
    ft.fastwire_hello(hello + extra)


@FAST
@given(tokens, nonces, st.text(st.characters(max_codepoint=127), max_size=255),
       st.integers(0, 65535), st.binary(max_size=40))
def test_go_round_trip(token: bytes, nonce: bytes, name: str, port: int, rest: bytes) -> None:
    """A v2 GO parses back to its service and MAC, the MAC verifies for this ticket and
    connection only, and every prefix is "need more"."""
    token_id, secret = fw.split_ticket(token)
    mac = fw.go_mac(secret, token_id, nonce, name, port)
    go = fw.pack_go(name, port, mac)
    assert fw.parse_go(go + rest) == ((name, port), mac, rest)
    assert fw.go_valid(secret, token_id, nonce, name, port, mac)
    assert not fw.go_valid(secret, token_id, nonce[::-1] + b"x", name, port, mac)
    assert not fw.go_valid(secret, token_id, nonce, name, port, mac, counter=1)
    for cut in range(len(go)):
        assert fw.parse_go(go[:cut]) is None
    ft.fastwire_dispatch(go + rest)


@FAST
@given(st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
                          st.integers(1, 65535)), max_size=8))
def test_pool_request_round_trip(count: int, services: list[tuple[str, int]]) -> None:
    assert fw.unpack_pool_request(fw.pack_pool_request(count, services)) == (count, services)


@pytest.mark.parametrize("port", [0, 65536])
def test_pool_request_port_outside_1_65535_is_a_wire_error(port: int) -> None:
    """v2 services are TCP ports 1..65535 (version 1 accepted port 0)."""
    with pytest.raises(fw.WireError):
        fw.unpack_pool_request(fw.pack_pool_request(1, [("gpu-cluster", port)]))


@FAST
@given(st.integers(0, 2**32 - 1), st.lists(st.one_of(
    st.from_regex(r"[a-z]{1,8}:[0-9]{1,12}", fullmatch=True),
    st.integers(4300, 4400).map(lambda n: "a:" + "9" * n),
    st.from_regex(r"[a-z]{0,8}:?[0-9²³¹٣]{0,8}", fullmatch=True),
    st.text(max_size=20)), max_size=6))
def test_pool_request_hostile_services(count: int, services: list[str]) -> None:
    """Ports past 65535, 4300-digit ports, Unicode digits: WireError, nothing else."""
    body = struct.pack(">LL", count, len(services)) + b"".join(
        common.NS(s.encode()) for s in services)
    ft.fastwire_ssh(b"\x02" + body)


@FAST
@given(st.sampled_from(list(fw.Status)), names, u32, st.lists(st.binary(max_size=40),
                                                              max_size=5), st.integers(0, 10**6),
       pool_services)
def test_replies_round_trip(status: fw.Status, message: str, port: int, toks: list[bytes],
                            lifetime_ms: int, services: list[tuple[str, int]]) -> None:
    reply = fw.pack_pool_reply(status, message, port, toks, lifetime_ms / 1000, services)
    got = fw.unpack_pool_reply(reply)
    assert got.status is status and got.data_port == port and got.tokens == tuple(toks)
    assert got.services == frozenset(services)
    # Milliseconds on the wire, truncated (int()): never longer than packed, < 1 ms shorter.
    assert lifetime_ms - 1 <= round(got.lifetime * 1000, 6) <= lifetime_ms
    one = fw.pack_token_reply(status, message, port, toks[0] if toks else b"", lifetime_ms / 1000)
    assert fw.unpack_token_reply(one)[0] is status
    for cut in range(0, len(reply), 3):
        ft.fastwire_ssh(b"\x03" + reply[:cut])
        ft.fastwire_ssh(b"\x01" + one[:cut])


@FAST
@given(st.binary(max_size=600))
def test_fastwire_targets_on_bytes(data: bytes) -> None:
    ft.fastwire_hello(data)
    ft.fastwire_dispatch(data)
    ft.fastwire_ssh(data)
    ft.ssh_wire(data)


@FAST
@given(names, u32, names, u32, st.integers(0, 30))
def test_ssh_wire_round_trip_and_cuts(host: str, port: int, orig: str, orig_port: int,
                                      cut: int) -> None:
    data = wire.pack_endpoints(host, port, orig, orig_port)
    assert wire.unpack_endpoints(data) == (host, port, orig, orig_port)
    forward = wire.pack_forward(host, port)
    assert wire.unpack_forward(forward) == (host, port)
    ft.ssh_wire(data[:cut])
    ft.ssh_wire(forward[:-cut or None])


# --- the relay: global requests and the connection layer ------------------------

requests = st.tuples(
    st.integers(0, 255),
    st.one_of(
        st.builds(wire.pack_forward, names, u32),
        st.builds(fw.pack_token_request, st.sampled_from(["gpu-cluster", "jupyter", "x"]),
                  st.integers(0, 70000)),
        st.builds(lambda c, s: struct.pack(">LL", c, len(s)) + b"".join(common.NS(x) for x in s),
                  u32, st.lists(st.binary(max_size=30), max_size=4)),
        st.binary(max_size=60),
    ),
)


@SLOW
@given(st.lists(requests, max_size=8))
def test_global_requests(reqs: list[tuple[int, bytes]]) -> None:
    ft.global_request(b"".join(rec(sel, payload) for sel, payload in reqs))


def _u(n: int) -> bytes:
    return struct.pack(">L", n)


channel_ids = st.one_of(st.integers(0, 3), u32)
messages = st.one_of(
    st.builds(lambda c, w, m: (10, common.NS(b"direct-tcpip") + _u(c) + _u(w) + _u(m)
                               + wire.pack_endpoints("gpu-cluster", 22, "h", 1)),
              channel_ids, u32, u32),
    st.builds(lambda r, s, w, m: (11, _u(r) + _u(s) + _u(w) + _u(m)), channel_ids, u32, u32, u32),
    st.builds(lambda r, c: (12, _u(r) + _u(c) + common.NS(b"no") + common.NS(b"")), channel_ids,
              u32),
    st.builds(lambda r, n: (13, _u(r) + _u(n)), channel_ids, u32),
    st.builds(lambda r, d: (14, _u(r) + common.NS(d)), channel_ids, st.binary(max_size=200)),
    st.builds(lambda r, n, d: (14, _u(r) + _u(n) + d), channel_ids, u32, st.binary(max_size=50)),
    st.builds(lambda r, t, d: (15, _u(r) + _u(t) + common.NS(d)), channel_ids, u32,
              st.binary(max_size=50)),
    st.builds(lambda n, r: (n, _u(r)), st.sampled_from([16, 17, 19, 20]), channel_ids),
    st.builds(lambda r, t, w: (18, _u(r) + common.NS(t) + w), channel_ids,
              st.sampled_from([b"exec", b"pty-req", b"eow@openssh.com", b""]),
              st.binary(max_size=20)),
    st.builds(lambda t, w, d: (0, common.NS(t) + w + d),
              st.sampled_from([b"tcpip-forward", b"keepalive@openssh.com",
                               fw.TOKEN_REQUEST, fw.POOL_REQUEST]),
              st.sampled_from([b"\x00", b"\x01", b""]), st.binary(max_size=30)),
    st.builds(lambda n, p: (n, p), st.integers(0, 20), st.binary(max_size=40)),
)


@SLOW
@given(st.lists(st.tuples(st.booleans(), messages), max_size=24))
def test_connection_messages(msgs: list[tuple[bool, tuple[int, bytes]]]) -> None:
    """An agent and a user sending well-formed-looking connection messages with any ids,
    windows, packet sizes and lengths: FlowConnection's invariants hold."""
    ft.connection(b"".join(rec((0x80 if agent else 0) | num, payload)
                           for agent, (num, payload) in msgs))


# --- the SSH transport ---------------------------------------------------------

transport_messages = st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 20, 21, 30, 31, 50, 80, 90, 255]),
    st.one_of(st.binary(max_size=80), st.builds(lambda: ft_kexinit())),
)


def ft_kexinit() -> bytes:
    import make_corpus

    return make_corpus.KEXINIT[1:]


@SLOW
@given(st.lists(transport_messages, max_size=8), st.integers(0, 127))
def test_transport_framed_messages(msgs: list[tuple[int, bytes]], cut: int) -> None:
    ft.transport_packets(bytes((cut << 1 | 1,)) + b"".join(rec(n, p) for n, p in msgs))


@SLOW
@given(st.lists(st.one_of(st.just(world.CLIENT_VERSION), st.text(max_size=30).map(str.encode),
                          st.sampled_from([b"\n", b"\r\n", b"SSH-", b"SSH-2.0-", b"SSH-1.99-x\n"]),
                          st.binary(max_size=30)), max_size=8), st.integers(0, 255))
def test_banner(parts: list[bytes], cut: int) -> None:
    ft.transport_banner(bytes((cut,)) + b"".join(parts))


@SLOW
@given(st.integers(0, 3), st.booleans(),
       st.lists(st.tuples(st.integers(0, 255),
                          st.sampled_from([2, 21, 94, 255]) | st.integers(0, 255),
                          st.binary(max_size=70)), max_size=6),
       st.integers(0, 15))
def test_aead_sealed_records(mode: int, strict: bool, records: list[tuple[int, int, bytes]],
                             cut: int) -> None:
    """Packets sealed with the right keys (none, AES-128/256-GCM, chacha20-poly1305)
    whose padding length, message number (NEWKEYS too: strict KEX restarts the sequence
    numbers) and size are anything: read back exactly as sealed up to the first bad
    padding, the same however the reads are cut."""
    body = b"".join(rec(0, bytes((pad, msg)) + payload) for pad, msg, payload in records)
    ft.aead_framing(bytes((mode | 4 | (8 if strict else 0) | cut << 4,)) + body)


# --- grant files and -o --------------------------------------------------------

option_values = st.one_of(
    st.sampled_from(["gpu-cluster:22", "2201", "*:2203", "[::]:2204", "jupyter:*", "*", "10",
                     "²", "٣", "0", "65536", "1" * 5000, "a:" + "0" * 5000 + "22",
                     'a\\"b:22', "127.0.0.1:22", ""]),
    st.text(max_size=20))
option_names = st.sampled_from(["permitopen", "permitlisten", "max-sessions", "restrict",
                                "no-pty", "from", "command", "port-forwarding",
                                "no-port-forwarding", "X", "PermitOpen"])


def _option_text(name: str, value: str | None) -> str:
    return name if value is None else f'{name}="{value}"'


@FAST
@given(st.booleans(), st.lists(st.tuples(
    st.lists(st.tuples(option_names, st.none() | option_values), max_size=4),
    st.sampled_from([10, 11, 12]),
    st.sampled_from(["lab_pc", "alice", "x" * 101, "", "a b"])), max_size=4))
def test_grant_lines(agents: bool, lines: list[tuple[list[tuple[str, str | None]], int, str]]
                     ) -> None:
    text = "\n".join(
        (",".join(_option_text(n, v) for n, v in opts) + " " if opts else "")
        + world.key_line(seed, name)
        for opts, seed, name in lines)
    ft.grant_file((b"\x00" if agents else b"\x01") + text.encode())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ServerAliveInterval", "ConnectTimeout", "ServerAliveCountMax", "Port",
                        "User", "IdentityFile", "StrictHostKeyChecking", "Nope"]),
       st.sampled_from(["=", " ", " = "]),
       st.one_of(st.from_regex(r"[0-9smhdw]{0,60}[x ]?", fullmatch=True),
                 st.just("9" * 5000), st.text(max_size=30)))
def test_agent_option(name: str, sep: str, value: str) -> None:
    started = time.process_time()
    ft.agent_option(f"{name}{sep}{value}".encode())
    assert time.process_time() - started < 0.5, "an option took too long to parse"


# --- user authentication and the agent's known_hosts -------------------------

auth_fields = st.tuples(
    st.sampled_from([b"alice", b"lab_pc", b"", b"\xff" * 3]),
    st.sampled_from([b"ssh-connection", b"ssh-userauth", b"x"]),
    st.sampled_from([b"publickey", b"none", b"password", b"keyboard-interactive", b""]),
    st.sampled_from([b"\x00", b"\x01", b""]),
    st.sampled_from([b"ssh-ed25519", b"rsa-sha2-256", b"ssh-rsa", b""]),
    st.one_of(st.just(world.USER_KEY.public().blob()), st.just(world.AGENT_KEY.public().blob()),
              st.binary(max_size=60)),
    st.one_of(st.none(), st.binary(max_size=90)),
)


@SLOW
@given(st.lists(auth_fields, max_size=5), st.booleans())
def test_userauth_requests(requests: list[tuple[bytes, ...]], signed_first: bool) -> None:
    """USERAUTH_REQUESTs with any user, service, method, key and signature (optionally
    after a correctly signed one): refusals or success, never an exception."""
    body = rec(0, ft.signed_userauth("user")) if signed_first else b""
    for user, service, method, flag, alg, blob, sig in requests:
        payload = (common.NS(user) + common.NS(service) + common.NS(method) + flag
                   + common.NS(alg) + common.NS(blob) + (b"" if sig is None else common.NS(sig)))
        body += rec(0, payload)
    ft.userauth(body)


@FAST
@given(st.lists(st.tuples(
    st.sampled_from(["", "@revoked ", "@cert-authority ", "@other "]),
    st.sampled_from(["cloud.example.org", "[cloud.example.org]:2222", "*", "!cloud*,*",
                     "|1|AAAA|BBBB", "|1|é|x", "*.org", ""]),
    st.sampled_from(["ssh-ed25519", "ssh-rsa", ""]),
    st.one_of(st.just(world.HOST_KEY.public().toString("OPENSSH").decode().split()[1]),
              st.text(max_size=30))), max_size=5), st.booleans())
def test_known_hosts_lines(lines: list[tuple[str, str, str, str]], other_port: bool) -> None:
    text = "\n".join(f"{marker}{hosts} {kind} {data}" for marker, hosts, kind, data in lines)
    ft.known_hosts((b"\x01" if other_port else b"\x00") + text.encode())
