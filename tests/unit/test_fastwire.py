"""relay.core.fastwire: the fast path's SSH extension payloads and data-port framing.

Pure encoding: round trips, incremental parsing (one byte at a time, ``None`` until
a frame is whole) and WireError on every kind of malformed input.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from twisted.conch.ssh import common

from relay.core import fastwire as fw
from relay.core.fastwire import Status, WireError

TOKEN = bytes(range(fw.TOKEN_LEN))


# --- SSH extension payloads ---------------------------------------------------------


@pytest.mark.parametrize(("name", "port"), [("gpu-cluster", 22), ("a", 1), ("x" * 255, 65535)])
def test_token_request_round_trip(name: str, port: int) -> None:
    assert fw.unpack_token_request(fw.pack_token_request(name, port)) == (name, port)


def test_token_request_keeps_the_case_it_was_sent_with() -> None:
    # Lower-casing is the relay's job (DataPort.tokenRequest), not the wire's.
    assert fw.unpack_token_request(fw.pack_token_request("GPU", 22)) == ("GPU", 22)


def test_token_request_rejects_a_non_ascii_name() -> None:
    data = common.NS("gpü".encode()) + struct.pack(">L", 22)
    with pytest.raises(WireError, match="ASCII"):
        fw.unpack_token_request(data)


@pytest.mark.parametrize("status", list(Status))
def test_token_reply_round_trip(status: Status) -> None:
    data = fw.pack_token_reply(status, "why not ✓", 2222, TOKEN, 5.25)
    assert fw.unpack_token_reply(data) == (status, "why not ✓", 2222, TOKEN, 5.25)


def test_token_reply_defaults() -> None:
    assert fw.unpack_token_reply(fw.pack_token_reply(Status.REFUSED, "no")) == (
        Status.REFUSED, "no", 0, b"", 0.0)


def test_token_reply_lifetime_is_whole_milliseconds() -> None:
    assert fw.unpack_token_reply(fw.pack_token_reply(Status.OK, "", 1, TOKEN, 0.0019))[4] == 0.001


@pytest.mark.parametrize("services", [[], [("gpu-cluster", 22)], [("a", 1), ("b-c.d", 65535)]])
def test_pool_request_round_trip(services: list[tuple[str, int]]) -> None:
    assert fw.unpack_pool_request(fw.pack_pool_request(4, services)) == (4, services)


def test_pool_request_lower_cases_names_and_splits_at_the_last_colon() -> None:
    data = struct.pack(">LL", 1, 2) + common.NS(b"GPU:22") + common.NS(b"fe80::1:80")
    assert fw.unpack_pool_request(data) == (1, [("gpu", 22), ("fe80::1", 80)])


@pytest.mark.parametrize("raw", [b"gpu", b":22", b"gpu:", b"gpu:x2", b"gpu:-1"])
def test_pool_request_rejects_a_bad_service(raw: bytes) -> None:
    with pytest.raises(WireError, match="bad service"):
        fw.unpack_pool_request(struct.pack(">LL", 1, 1) + common.NS(raw))


def test_pool_request_caps_the_number_of_services() -> None:
    with pytest.raises(WireError, match="4097 services"):
        fw.unpack_pool_request(struct.pack(">LL", 1, 4097))


@pytest.mark.parametrize("tokens", [[], [TOKEN], [TOKEN, b"\xff" * fw.TOKEN_LEN]])
@pytest.mark.parametrize("status", list(Status))
def test_pool_reply_round_trip(status: Status, tokens: list[bytes]) -> None:
    services = [("gpu-cluster", 22), ("b", 65535)]
    data = fw.pack_pool_reply(status, "msg", 7000, tokens, 30.0, services)
    assert fw.unpack_pool_reply(data) == fw.PoolReply(status, "msg", 7000, tuple(tokens), 30.0,
                                                      frozenset(services))


def test_pool_reply_defaults() -> None:
    assert fw.unpack_pool_reply(fw.pack_pool_reply(Status.UNAVAILABLE, "off")) == fw.PoolReply(
        Status.UNAVAILABLE, "off")


@pytest.mark.parametrize("raw", [b"gpu", b"gpu:0", b"gpu:65536", b":22"])
def test_pool_reply_rejects_a_bad_service(raw: bytes) -> None:
    data = (fw.pack_pool_reply(Status.OK, "", 1, [], 1.0)[:-4] + struct.pack(">L", 1)
            + common.NS(raw))
    with pytest.raises(WireError, match="bad service"):
        fw.unpack_pool_reply(data)


def test_extension_names_carry_the_version() -> None:
    # Version 1 (a bearer token in the clear) is refused by name: old and new never
    # half-speak.
    assert fw.TOKEN_REQUEST == b"data-token-v2@labrelay"
    assert fw.POOL_REQUEST == b"data-pool-v2@labrelay"
    assert fw.MAGIC == b"LRD2"


def test_replies_reject_an_unknown_status() -> None:
    with pytest.raises(WireError, match="unknown status 7"):
        fw.unpack_token_reply(struct.pack(">L", 7) + fw.pack_token_reply(Status.OK, "")[4:])
    with pytest.raises(WireError, match="unknown status 3"):
        fw.unpack_pool_reply(struct.pack(">L", 3) + fw.pack_pool_reply(Status.OK, "")[4:])


# Every strict prefix of a whole payload is truncated and must raise.  (The pool
# request, whose last field is a string, is tested on its own below.)
_PAYLOADS = {
    "token_request": (fw.pack_token_request("gpu-cluster", 22), fw.unpack_token_request),
    "token_reply": (fw.pack_token_reply(Status.OK, "hi", 2222, TOKEN, 5.0),
                    fw.unpack_token_reply),
    "pool_reply": (fw.pack_pool_reply(Status.OK, "hi", 2222, [TOKEN, TOKEN], 30.0,
                                      [("gpu", 22)]), fw.unpack_pool_reply),
    "pool_request_no_services": (fw.pack_pool_request(3, []), fw.unpack_pool_request),
}


@pytest.mark.parametrize("kind", sorted(_PAYLOADS))
def test_truncated_payloads_raise(kind: str) -> None:
    data, unpack = _PAYLOADS[kind]
    unpack(data)  # whole: fine
    for cut in range(len(data)):
        with pytest.raises(WireError):
            unpack(data[:cut])


def test_truncated_pool_request_raises_before_its_last_string() -> None:
    data = fw.pack_pool_request(1, [("gpu-cluster", 22)])
    for cut in range(len(data) - len("gpu-cluster:22")):
        with pytest.raises(WireError):
            fw.unpack_pool_request(data[:cut])


def test_truncated_pool_request_raises_inside_its_last_string() -> None:
    data = fw.pack_pool_request(1, [("gpu-cluster", 22)])
    with pytest.raises(WireError):
        fw.unpack_pool_request(data[:-1])  # today: (1, [("gpu-cluster", 2)])


# --- challenge and hellos -----------------------------------------------------------------

NONCE = bytes(range(100, 100 + fw.NONCE_LEN))
TOKEN_ID, SECRET = TOKEN[:fw.TOKEN_ID_LEN], TOKEN[fw.TOKEN_ID_LEN:]


def _length_fed_byte_by_byte(hello: bytes) -> list[int | None]:
    return [fw.hello_length(hello[:i]) for i in range(len(hello) + 1)]


def test_challenge_incremental() -> None:
    data = fw.challenge(NONCE)
    assert data == b"LRD2" + NONCE and len(data) == fw.CHALLENGE_LEN
    for i in range(len(data)):
        assert fw.parse_challenge(data[:i]) is None
    assert fw.parse_challenge(data + b"x") == (NONCE, b"x")


@pytest.mark.parametrize("bad", [b"X", b"LRD1", b"LRGO", b"SSH-2.0-"])
def test_parse_challenge_rejects_an_old_or_foreign_port(bad: bytes) -> None:
    with pytest.raises(WireError, match="not a labrelay v2 data port"):
        fw.parse_challenge(bad)


def test_challenge_wants_a_whole_nonce() -> None:
    with pytest.raises(WireError):
        fw.challenge(NONCE[:-1])


def test_agent_hello_layout_and_length() -> None:
    hello = fw.agent_hello(TOKEN, NONCE)
    proof = hmac.new(SECRET, b"labrelay-fastpath-v2 hello\x00A" + TOKEN_ID + NONCE,
                     hashlib.sha256).digest()
    assert hello == b"LRD2A" + TOKEN_ID + proof
    assert SECRET not in hello  # the secret never crosses the data port
    assert len(hello) == fw.HELLO_LEN == 45
    lengths = _length_fed_byte_by_byte(hello)
    assert lengths[:5] == [None] * 5  # the role byte decides
    assert lengths[5:] == [fw.HELLO_LEN] * (len(hello) - 4)
    assert fw.parse_hello(hello) == fw.Hello(fw.ROLE_AGENT, TOKEN_ID, proof, None)


def test_user_hello_layout_and_length() -> None:
    hello = fw.user_hello(TOKEN, NONCE, "gpu-cluster", 2222)
    proof = fw.hello_proof(SECRET, fw.ROLE_USER, TOKEN_ID, NONCE, ("gpu-cluster", 2222))
    assert hello == (b"LRD2U" + TOKEN_ID + proof + b"\x0bgpu-cluster"
                     + struct.pack(">H", 2222))
    assert SECRET not in hello
    lengths = _length_fed_byte_by_byte(hello)
    # Unknown until the name's length byte arrives, then exact (and never changes).
    assert lengths[:fw.HELLO_LEN + 1] == [None] * (fw.HELLO_LEN + 1)
    assert lengths[fw.HELLO_LEN + 1:] == [len(hello)] * (len(hello) - fw.HELLO_LEN)
    assert fw.parse_hello(hello) == fw.Hello(fw.ROLE_USER, TOKEN_ID, proof, ("gpu-cluster", 2222))


def test_the_proof_covers_nonce_role_id_and_service() -> None:
    base = fw.hello_proof(SECRET, fw.ROLE_USER, TOKEN_ID, NONCE, ("svc", 22))
    others = [
        fw.hello_proof(SECRET, fw.ROLE_USER, TOKEN_ID, bytes(fw.NONCE_LEN), ("svc", 22)),
        fw.hello_proof(SECRET, fw.ROLE_AGENT, TOKEN_ID, NONCE, ("svc", 22)),
        fw.hello_proof(SECRET, fw.ROLE_USER, bytes(8), NONCE, ("svc", 22)),
        fw.hello_proof(SECRET, fw.ROLE_USER, TOKEN_ID, NONCE, ("svc", 23)),
        fw.hello_proof(SECRET, fw.ROLE_USER, TOKEN_ID, NONCE, ("svd", 22)),
        fw.hello_proof(bytes(24), fw.ROLE_USER, TOKEN_ID, NONCE, ("svc", 22)),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_hello_length_ignores_what_follows() -> None:
    hello = fw.user_hello(TOKEN, NONCE, "svc", 22)
    assert fw.hello_length(hello + b"SSH-2.0-stream") == len(hello)
    assert fw.hello_length(fw.agent_hello(TOKEN, NONCE) + b"x") == fw.HELLO_LEN


def test_longest_user_hello() -> None:
    hello = fw.user_hello(TOKEN, NONCE, "n" * 255, 65535)
    assert len(hello) == fw.MAX_HELLO_LEN == fw.hello_length(hello)


def test_parse_hello_lower_cases_the_user_service() -> None:
    hello = fw.user_hello(TOKEN, NONCE, "GPU-Cluster", 22)
    assert fw.parse_hello(hello).service == ("gpu-cluster", 22)


@pytest.mark.parametrize("bad", [b"X", b"LX", b"LRX", b"LRD1", b"lrd2", b"SSH-2.0-OpenSSH",
                                 b"\x00" * 40, b"LRGO"])
def test_hello_length_rejects_a_wrong_magic_at_any_prefix(bad: bytes) -> None:
    for i in range(1, len(bad) + 1):
        if fw.MAGIC.startswith(bad[:i]):
            continue  # still a possible hello
        with pytest.raises(WireError, match="not a labrelay v2 data connection"):
            fw.hello_length(bad[:i])


def test_hello_length_empty_is_unknown() -> None:
    assert fw.hello_length(b"") is None


@pytest.mark.parametrize("role", [b"X", b"u", b"a", b"\x00"])
def test_hello_length_rejects_an_unknown_role(role: bytes) -> None:
    with pytest.raises(WireError, match="unknown role"):
        fw.hello_length(fw.MAGIC + role)
    with pytest.raises(WireError, match="unknown role"):
        fw.parse_hello(fw.MAGIC + role + TOKEN_ID + bytes(fw.MAC_LEN))


def test_parse_hello_wants_exactly_one_hello() -> None:
    hello = fw.user_hello(TOKEN, NONCE, "svc", 22)
    with pytest.raises(WireError, match="not one whole hello"):
        fw.parse_hello(hello[:-1])
    with pytest.raises(WireError, match="not one whole hello"):
        fw.parse_hello(hello + b"x")
    with pytest.raises(WireError, match="not one whole hello"):
        fw.parse_hello(fw.agent_hello(TOKEN, NONCE)[:-1])
    with pytest.raises(WireError):
        fw.parse_hello(b"nonsense")


@pytest.mark.parametrize("token", [b"", TOKEN[:-1], TOKEN + b"x"])
def test_hellos_reject_a_bad_token_length(token: bytes) -> None:
    with pytest.raises(WireError):
        fw.agent_hello(token, NONCE)
    with pytest.raises(WireError):
        fw.user_hello(token, NONCE, "svc", 22)


@pytest.mark.parametrize(("name", "port"), [("n" * 256, 22), ("svc", 0), ("svc", 65536),
                                            ("svc", -1)])
def test_user_hello_rejects_a_bad_service(name: str, port: int) -> None:
    with pytest.raises(WireError):
        fw.user_hello(TOKEN, NONCE, name, port)


def test_user_hello_rejects_a_non_ascii_name() -> None:
    with pytest.raises(UnicodeEncodeError):
        fw.user_hello(TOKEN, NONCE, "gpü", 22)


# --- GO ---------------------------------------------------------------------------------

MAC = bytes(range(200, 200 + fw.MAC_LEN))


@pytest.mark.parametrize(("name", "port"), [("gpu-cluster", 22), ("", 1), ("n" * 255, 65535)])
def test_go_incremental(name: str, port: int) -> None:
    go = fw.pack_go(name, port, MAC)
    assert go == b"LRGO" + struct.pack(">HB", port, len(name)) + name.encode() + MAC
    for i in range(len(go)):
        assert fw.parse_go(go[:i]) is None
    assert fw.parse_go(go) == ((name, port), MAC, b"")
    assert fw.parse_go(go + b"K-and-more") == ((name, port), MAC, b"K-and-more")


def test_go_mac_binds_connection_service_and_counter() -> None:
    mac = fw.go_mac(SECRET, TOKEN_ID, NONCE, "gpu-cluster", 22)
    assert fw.go_valid(SECRET, TOKEN_ID, NONCE, "gpu-cluster", 22, mac)
    assert not fw.go_valid(SECRET, TOKEN_ID, NONCE, "gpu-cluster", 23, mac)  # another port
    assert not fw.go_valid(SECRET, TOKEN_ID, NONCE, "jupyter", 22, mac)  # another name
    assert not fw.go_valid(SECRET, bytes(8), NONCE, "gpu-cluster", 22, mac)  # another ticket
    assert not fw.go_valid(SECRET, TOKEN_ID, bytes(32), "gpu-cluster", 22, mac)  # another nonce
    assert not fw.go_valid(bytes(24), TOKEN_ID, NONCE, "gpu-cluster", 22, mac)  # another key
    assert not fw.go_valid(SECRET, TOKEN_ID, NONCE, "gpu-cluster", 22, mac, counter=1)
    # Not the hello's proof either: the labels differ (no reflection).
    assert mac != fw.hello_proof(SECRET, fw.ROLE_AGENT, TOKEN_ID, NONCE)


@pytest.mark.parametrize("bad", [b"X", b"LRD1", b"LRG0", b"LRGX\x00\x16\x00", b"lrgo\x00\x16\x00"])
def test_parse_go_rejects_a_wrong_magic_at_any_prefix(bad: bytes) -> None:
    for i in range(1, len(bad) + 1):
        if fw.GO_MAGIC.startswith(bad[:i]):
            continue  # still a possible GO
        with pytest.raises(WireError, match="not a dispatch"):
            fw.parse_go(bad[:i])


def test_pack_go_rejects_a_long_name_or_a_bad_mac() -> None:
    with pytest.raises(WireError):
        fw.pack_go("n" * 256, 22, MAC)
    with pytest.raises(WireError):
        fw.pack_go("svc", 22, MAC[:-1])


# --- replies (agent's K/E, relay's 00/01) ---------------------------------------------------

_MARKERS = [("agent", fw.AGENT_OK, fw.AGENT_ERROR), ("user", fw.USER_OK, fw.USER_ERROR)]


@pytest.mark.parametrize(("who", "ok", "err"), _MARKERS)
def test_ok_reply(who: str, ok: bytes, err: bytes) -> None:
    assert fw.parse_reply(b"", ok, err) is None
    assert fw.parse_reply(ok, ok, err) == (True, "", b"")
    assert fw.parse_reply(ok + b"stream", ok, err) == (True, "", b"stream")


@pytest.mark.parametrize("message", ["", "connection refused", "ünïcödé ✓"])
@pytest.mark.parametrize(("who", "ok", "err"), _MARKERS)
def test_error_reply_incremental(who: str, ok: bytes, err: bytes, message: str) -> None:
    reply = fw.pack_error(err, message)
    assert reply == err + bytes([len(message.encode())]) + message.encode()
    for i in range(len(reply)):
        assert fw.parse_reply(reply[:i], ok, err) is None
    assert fw.parse_reply(reply, ok, err) == (False, message, b"")
    assert fw.parse_reply(reply + b"rest", ok, err) == (False, message, b"rest")


def test_error_message_is_cut_at_255_bytes() -> None:
    reply = fw.pack_error(fw.USER_ERROR, "x" * 300)
    assert len(reply) == 2 + 255
    assert fw.parse_reply(reply, fw.USER_OK, fw.USER_ERROR) == (False, "x" * 255, b"")


@pytest.mark.parametrize(("who", "ok", "err"), _MARKERS)
def test_unexpected_reply_byte(who: str, ok: bytes, err: bytes) -> None:
    for bad in (b"?", b"\x02", b"k", b"LRGO"):
        with pytest.raises(WireError, match="unexpected reply byte"):
            fw.parse_reply(bad, ok, err)


def test_markers_are_not_interchangeable() -> None:
    with pytest.raises(WireError):
        fw.parse_reply(fw.USER_OK, fw.AGENT_OK, fw.AGENT_ERROR)
    with pytest.raises(WireError):
        fw.parse_reply(fw.AGENT_OK, fw.USER_OK, fw.USER_ERROR)
