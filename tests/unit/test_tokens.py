"""relay.tokens: the data port's one-time tokens and the throttle on guessing them.

Time is a twisted.internet.task.Clock: nothing sleeps.
"""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from twisted.internet.task import Clock

import relay.tokens
from relay.fastwire import ROLE_AGENT, ROLE_USER, TOKEN_ID_LEN, TOKEN_LEN
from relay.tokens import Refusal, Throttle, TokenBook, TokenRefused

SVC = ("gpu-cluster", 22)


class Session:
    """Stands for the SSH connection that asked for a token."""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> TokenBook:
    return TokenBook(clock, lifetime=10.0)


def _refusal(book: TokenBook, role: bytes, token: bytes, alive: Any = None,
             service: tuple[str, int] | None = None) -> Refusal:
    with pytest.raises(TokenRefused) as info:
        book.redeem(role, token, alive, service)
    assert str(info.value) == info.value.why.value
    return info.value.why


def _flip_last(token: bytes) -> bytes:
    return token[:-1] + bytes([token[-1] ^ 1])


# --- TokenBook ----------------------------------------------------------------------


def test_token_is_32_bytes_and_every_one_differs(book: TokenBook) -> None:
    s = Session()
    tokens = [book.issue(ROLE_USER, "alice", s, SVC) for _ in range(50)]
    assert all(len(t) == TOKEN_LEN == 32 for t in tokens)
    assert len({t[:TOKEN_ID_LEN] for t in tokens}) == 50  # ids
    assert len({t[TOKEN_ID_LEN:] for t in tokens}) == 50  # secrets
    assert len(book) == 50


def test_redeem_returns_the_ticket_once(book: TokenBook, clock: Clock) -> None:
    s = Session()
    clock.advance(100)
    token = book.issue(ROLE_USER, "alice", s, SVC)
    ticket = book.redeem(ROLE_USER, token, lambda sess: sess is s, SVC)
    assert (ticket.role, ticket.principal, ticket.session, ticket.service) == (
        ROLE_USER, "alice", s, SVC)
    assert ticket.expires == 110.0
    assert len(book) == 0
    # single use: a replay finds nothing
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.UNKNOWN


def test_agent_token_has_no_service(book: TokenBook) -> None:
    s = Session()
    token = book.issue(ROLE_AGENT, "lab_pc", s)
    ticket = book.redeem(ROLE_AGENT, token)
    assert ticket.service is None and ticket.principal == "lab_pc"


def test_never_issued_is_unknown(book: TokenBook) -> None:
    assert _refusal(book, ROLE_USER, b"\x00" * TOKEN_LEN, None, SVC) is Refusal.UNKNOWN


def test_wrong_secret_burns_the_ticket(book: TokenBook) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert _refusal(book, ROLE_USER, _flip_last(token), None, SVC) is Refusal.WRONG
    assert len(book) == 0
    # its id leaked: the right token is gone too
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.UNKNOWN


def test_secret_is_compared_in_constant_time(book: TokenBook,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(relay.tokens.hmac, "compare_digest", spy)
    good = book.issue(ROLE_USER, "alice", Session(), SVC)
    bad = book.issue(ROLE_USER, "alice", Session(), SVC)
    book.redeem(ROLE_USER, good, None, SVC)
    assert calls == [(good[TOKEN_ID_LEN:], good[TOKEN_ID_LEN:])]
    assert _refusal(book, ROLE_USER, _flip_last(bad), None, SVC) is Refusal.WRONG
    assert len(calls) == 2 and calls[1] == (bad[TOKEN_ID_LEN:], _flip_last(bad)[TOKEN_ID_LEN:])


def test_secret_is_not_compared_with_eq(book: TokenBook,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Belt and braces for the spy above: a bytes == on the secret would bypass
    # compare_digest, so make compare_digest the only thing that can say "equal".
    monkeypatch.setattr(relay.tokens.hmac, "compare_digest", lambda a, b: False)
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.WRONG


def test_expired(book: TokenBook, clock: Clock) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    clock.advance(10.0)  # still valid at exactly the lifetime
    early = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert book.redeem(ROLE_USER, early, None, SVC)
    clock.advance(0.001)
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.EXPIRED
    assert len(book) == 0


def test_expiry_boundary(book: TokenBook, clock: Clock) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    clock.advance(10.0)
    assert book.redeem(ROLE_USER, token, None, SVC).principal == "alice"


def test_per_issue_lifetime(book: TokenBook, clock: Clock) -> None:
    short = book.issue(ROLE_USER, "alice", Session(), SVC, lifetime=1.0)
    long = book.issue(ROLE_AGENT, "lab_pc", Session(), lifetime=30.0)
    clock.advance(2.0)
    assert _refusal(book, ROLE_USER, short, None, SVC) is Refusal.EXPIRED
    clock.advance(20.0)  # past the book's 10 s, within its own 30 s
    assert book.redeem(ROLE_AGENT, long).expires == 30.0


def test_wrong_role(book: TokenBook) -> None:
    user = book.issue(ROLE_USER, "alice", Session(), SVC)
    agent = book.issue(ROLE_AGENT, "lab_pc", Session())
    assert _refusal(book, ROLE_AGENT, user, None, None) is Refusal.WRONG_ROLE
    assert _refusal(book, ROLE_USER, agent, None, SVC) is Refusal.WRONG_ROLE
    assert len(book) == 0  # used up all the same


@pytest.mark.parametrize("other", [("gpu-cluster", 2222), ("other", 22), None])
def test_other_service(book: TokenBook, other: tuple[str, int] | None) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert _refusal(book, ROLE_USER, token, None, other) is Refusal.OTHER_SERVICE
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.UNKNOWN


def test_session_gone(book: TokenBook) -> None:
    s = Session()
    asked: list[Any] = []
    token = book.issue(ROLE_USER, "alice", s, SVC)

    def alive(sess: Any) -> bool:
        asked.append(sess)
        return False

    assert _refusal(book, ROLE_USER, token, alive, SVC) is Refusal.SESSION_GONE
    assert asked == [s]
    assert _refusal(book, ROLE_USER, token, lambda _: True, SVC) is Refusal.UNKNOWN


@pytest.mark.parametrize("length", [0, 1, TOKEN_ID_LEN, TOKEN_LEN - 1, TOKEN_LEN + 1, 64])
def test_malformed_length(book: TokenBook, length: int) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert _refusal(book, ROLE_USER, (token * 3)[:length], None, SVC) is Refusal.MALFORMED
    assert len(book) == 1  # nothing was looked up, nothing burnt
    assert book.redeem(ROLE_USER, token, None, SVC)


def test_drop_session_forgets_only_that_sessions_tickets(book: TokenBook) -> None:
    gone, kept = Session(), Session()
    g1 = book.issue(ROLE_USER, "alice", gone, SVC)
    g2 = book.issue(ROLE_AGENT, "lab_pc", gone)
    k = book.issue(ROLE_USER, "alice", kept, SVC)
    assert book.drop_session(gone) == 2
    assert book.drop_session(gone) == 0
    assert len(book) == 1
    assert _refusal(book, ROLE_USER, g1, None, SVC) is Refusal.UNKNOWN
    assert _refusal(book, ROLE_AGENT, g2) is Refusal.UNKNOWN
    assert book.redeem(ROLE_USER, k, None, SVC).session is kept


def test_expired_tickets_are_forgotten_on_a_later_issue(book: TokenBook, clock: Clock) -> None:
    old = [book.issue(ROLE_USER, "alice", Session(), SVC) for _ in range(5)]
    clock.advance(5)
    newer = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert len(book) == 6
    clock.advance(5.5)  # the first five expired, the newer one not
    assert len(book) == 6  # nothing is forgotten without an issue
    book.issue(ROLE_USER, "alice", Session(), SVC)
    assert len(book) == 2
    assert _refusal(book, ROLE_USER, old[0], None, SVC) is Refusal.UNKNOWN  # not EXPIRED
    assert book.redeem(ROLE_USER, newer, None, SVC)


def test_counters(book: TokenBook, clock: Clock) -> None:
    s = Session()
    assert book.issued == {"user": 0, "agent": 0}
    assert book.redeemed == {"user": 0, "agent": 0}
    assert set(book.refused) == {r.value for r in Refusal}
    assert not any(book.refused.values())

    u1, u2, u3 = (book.issue(ROLE_USER, "alice", s, SVC) for _ in range(3))
    a1, a2 = (book.issue(ROLE_AGENT, "lab_pc", s) for _ in range(2))
    assert book.issued == {"user": 3, "agent": 2}

    book.redeem(ROLE_USER, u1, None, SVC)
    book.redeem(ROLE_AGENT, a1)
    for token, role, service in [(u1, ROLE_USER, SVC), (b"short", ROLE_USER, SVC),
                                 (_flip_last(u2), ROLE_USER, SVC), (a2, ROLE_USER, SVC),
                                 (u3, ROLE_USER, ("other", 1))]:
        with pytest.raises(TokenRefused):
            book.redeem(role, token, None, service)
    assert book.redeemed == {"user": 1, "agent": 1}
    assert {k: v for k, v in book.refused.items() if v} == {
        "unknown": 1, "malformed": 1, "wrong secret": 1, "wrong role": 1,
        "issued for another service": 1}

    e = book.issue(ROLE_USER, "alice", s, SVC)
    g = book.issue(ROLE_USER, "alice", s, SVC)
    with pytest.raises(TokenRefused):
        book.redeem(ROLE_USER, g, lambda _: False, SVC)
    clock.advance(11)
    with pytest.raises(TokenRefused):
        book.redeem(ROLE_USER, e, None, SVC)
    assert book.refused["expired"] == 1 and book.refused["its SSH session ended"] == 1
    assert book.refused["throttled"] == 0  # the throttle counts its own


def test_refusal_carries_its_reason() -> None:
    e = TokenRefused(Refusal.EXPIRED)
    assert e.why is Refusal.EXPIRED and str(e) == "expired"


# --- Throttle --------------------------------------------------------------------------


def test_throttle_blocks_after_limit_failures_in_the_window(clock: Clock) -> None:
    t = Throttle(clock, limit=3, window=60.0)
    assert not t.blocked("10.0.0.1")
    for _ in range(2):
        t.failed("10.0.0.1")
        clock.advance(1)
    assert not t.blocked("10.0.0.1")
    t.failed("10.0.0.1")
    assert t.blocked("10.0.0.1")
    assert t.turned_away == 1


def test_throttle_unblocks_once_the_window_passes(clock: Clock) -> None:
    t = Throttle(clock, limit=3, window=60.0)
    for _ in range(3):
        t.failed("10.0.0.1")
        clock.advance(10)
    # failures at 0, 10, 20; now 30
    assert t.blocked("10.0.0.1")
    clock.advance(30)  # 60: the one at 0 is exactly at the horizon, still counted
    assert t.blocked("10.0.0.1")
    clock.advance(0.5)  # it slid out
    assert not t.blocked("10.0.0.1")
    assert t.turned_away == 2
    t.failed("10.0.0.1")
    assert t.blocked("10.0.0.1")


def test_throttle_failures_spread_out_never_block(clock: Clock) -> None:
    t = Throttle(clock, limit=3, window=10.0)
    for _ in range(20):
        t.failed("10.0.0.1")
        clock.advance(6)
        assert not t.blocked("10.0.0.1")
    assert t.turned_away == 0


def test_throttle_sources_are_independent(clock: Clock) -> None:
    t = Throttle(clock, limit=2, window=60.0)
    t.failed("10.0.0.1")
    t.failed("10.0.0.1")
    t.failed("10.0.0.2")
    assert t.blocked("10.0.0.1")
    assert not t.blocked("10.0.0.2")
    assert not t.blocked("10.0.0.3")
    assert t.turned_away == 1


def test_throttle_caps_the_sources_it_remembers(clock: Clock) -> None:
    t = Throttle(clock, limit=1, window=60.0, max_sources=3)
    for host in ("a", "b", "c"):
        t.failed(host)
        clock.advance(1)
    assert all(t.blocked(h) for h in ("a", "b", "c"))
    t.failed("a")  # a failed again: now the most recent
    t.failed("d")  # evicts the oldest: b
    assert not t.blocked("b")
    assert t.blocked("a") and t.blocked("c") and t.blocked("d")
    t.failed("e")  # evicts c
    assert not t.blocked("c")
    assert t.turned_away == 3 + 3


def test_throttle_defaults(clock: Clock) -> None:
    t = Throttle(clock)
    for _ in range(19):
        t.failed("x")
    assert not t.blocked("x")
    t.failed("x")
    assert t.blocked("x")
