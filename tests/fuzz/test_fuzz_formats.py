"""Property tests (Hypothesis, a bounded number of examples each) for the formats of
:mod:`formattargets`: KRLs built from real sections with hostile sizes, proxy answers
fed in pieces, resume offers against a stream's real counts, ``share@labrelay``
payloads.  Each checks what the parser must make of a well-formed input, then calls
the fuzz target (the invariants) on it and on hostile variations.
"""

from __future__ import annotations

import struct

import formattargets as ft
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core import httpconnect as hc
from relay.core import krl as k
from relay.core import resume as rs
from relay.ssh import wire

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u64 = st.integers(0, 2**64 - 1)


# --- KRL ---------------------------------------------------------------------------------


def _bitmap(offset: int, serials: set[int]) -> bytes:
    value = sum(1 << (s - offset) for s in serials)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big")  # a leading 0: positive
    return struct.pack(">Q", offset) + ft._s(raw)


@FAST
@given(st.lists(u64, max_size=8), st.lists(st.tuples(u64, u64), max_size=3),
       st.integers(0, 2**63), st.sets(st.integers(0, 4000), max_size=40),
       st.lists(st.binary(max_size=20), max_size=4), st.binary(max_size=40))
def test_a_krl_revokes_exactly_what_its_sections_list(
        listed: list[int], ranges: list[tuple[int, int]], offset: int, bits: set[int],
        key_ids: list[bytes], ca: bytes) -> None:
    ranges = [(min(a, b), max(a, b)) for a, b in ranges]
    subs = [(k.CERT_SERIAL_LIST, b"".join(struct.pack(">Q", s) for s in listed)),
            (k.CERT_SERIAL_BITMAP, _bitmap(offset, {offset + b for b in bits})),
            (k.CERT_KEY_ID, b"".join(ft._s(i) for i in key_ids))]
    subs += [(k.CERT_SERIAL_RANGE, struct.pack(">QQ", lo, hi)) for lo, hi in ranges]
    data = ft.krl_file(ft.cert_section(ca, *subs))
    parsed = k.parse_krl(data)
    ft.krl(data)

    def revoked(serial: int, key_id: bytes = b"\xff" * 21) -> bool:
        return parsed.revoked_cert(ca, serial, key_id, b"") is not None

    for serial in listed:
        assert revoked(serial)
    for b in bits:
        assert revoked(offset + b)
    for lo, hi in ranges:
        assert revoked(lo) and revoked(hi)
    for key_id in key_ids:
        assert parsed.revoked_cert(ca, 0, key_id, b"") is not None
    probes = {offset + b + 1 for b in bits} | {offset - 1, 12345} | {hi + 1 for _, hi in ranges}
    for serial in probes:
        expected = (serial in listed or serial - offset in bits
                    or any(lo <= serial <= hi for lo, hi in ranges))
        assert revoked(serial) == expected, serial


@FAST
@given(st.binary(max_size=600), st.integers(0, 600), st.binary(max_size=8))
def test_krl_target_on_cut_and_spliced_files(tail: bytes, cut: int, junk: bytes) -> None:
    for seed in ft.krl_seeds().values():
        ft.krl(seed[:cut] + junk)
        ft.krl(seed + tail)


# --- HTTP CONNECT ------------------------------------------------------------------------

header = st.tuples(st.from_regex(r"[A-Za-z-]{1,20}", fullmatch=True),
                   st.from_regex(r"[ -~]{0,60}", fullmatch=True))


@FAST
@given(st.integers(100, 999), st.lists(header, max_size=6), st.binary(max_size=100),
       st.integers(1, 40), st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
def test_a_proxy_answer_in_pieces(status: int, headers: list[tuple[str, str]], rest: bytes,
                                  piece: int, version: bytes) -> None:
    head = version + b" %d Reason\r\n" % status + b"".join(
        f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n"
    answer = head + rest
    result: hc.Tunnel | None = None
    with pytest.raises(hc.ProxyError) if not 200 <= status < 300 else _nothing():
        for end in range(piece, len(answer) + piece, piece):
            result = hc.parse_response(answer[:end])
            if result is not None:
                break
    if 200 <= status < 300:
        assert result is not None and result.status == status
        assert result.rest == answer[len(head):end]
    ft.http_connect(bytes((piece,)) + answer)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@FAST
@given(st.integers(0, 3 * hc.MAX_RESPONSE), st.sampled_from([b"HTTP/1.1 200 OK\r\nX: ", b""]))
def test_an_endless_header_is_refused_past_the_limit(size: int, start: bytes) -> None:
    data = start + b"a" * size
    try:
        assert hc.parse_response(data) is None
        assert len(data) <= hc.MAX_RESPONSE and (start or size == 0)
    except hc.ProxyError as e:
        assert len(data) > hc.MAX_RESPONSE or not start, e


# --- resume ------------------------------------------------------------------------------


@FAST
@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 6000), st.booleans(),
       st.booleans(), st.booleans())
def test_an_offer_resumes_exactly_the_missing_bytes_or_is_refused(
        sent: int, acked: int, received: int, eof_sent: bool, peer_eof: bool,
        held: bool) -> None:
    acked = min(acked, sent)
    written = bytes(i % 251 for i in range(sent))
    stream = rs.Stream(b"s" * rs.SID_LEN)
    stream.wrote(written)
    stream.ack(acked)
    if eof_sent:
        stream.wrote_eof()
    if held:
        stream.lost(0.0, 10.0)
    offer = rs.unpack_offer(rs.pack_offer(rs.Offer(b"s" * rs.SID_LEN, received, peer_eof)))
    ok = acked <= received <= sent and (not peer_eof or (eof_sent and received == sent))
    try:
        plan = stream.resume(offer, 1.0)
    except rs.ResumeRefused:
        assert not ok and stream.state is rs.StreamState.ENDED
        return
    assert ok
    assert b"".join(plan.retransmit) == written[received:]
    assert plan.resend_eof == (eof_sent and not peer_eof)


@FAST
@given(st.binary(max_size=120))
def test_resume_target(data: bytes) -> None:
    ft.resume_wire(data)
    for seed in ft.resume_seeds().values():
        ft.resume_wire(seed[: len(data)] + data[: len(seed)])


# --- share@labrelay ----------------------------------------------------------------------


@FAST
@given(st.text(max_size=150), st.floats(allow_nan=False, allow_infinity=False,
                                        min_value=-1e300, max_value=1e300))
def test_share_round_trip_is_clamped(user: str, weight: float) -> None:
    got_user, got_weight = wire.unpack_share(wire.pack_share(user, weight))
    assert 0.01 <= got_weight <= 100.0 and len(got_user) <= 100
    ft.share_request(wire.pack_share(user, weight))


@FAST
@given(st.binary(max_size=40), st.sampled_from(
    [b"1", b"-5", b"inf", b"-inf", b"nan", b"1e999", b"0x10", b" 2 ", b"1_0", b"\xff", b""]))
def test_share_request_with_hostile_fields(user: bytes, weight: bytes) -> None:
    ft.share_request(ft._s(user) + ft._s(weight))
    ft.share_request(ft._s(user))
