"""relay.core.tokens: the data port's one-time tickets and the throttle on guessing them.

A presenter proves a ticket by an HMAC of its secret over the connection's nonce
(``_redeem`` plays an honest holder, or one holding a wrong secret); the secret
itself is never presented.  Time is a twisted.internet.task.Clock: nothing sleeps.
"""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from twisted.internet.task import Clock

import relay.core.tokens
from relay.core.fastwire import (
    MAC_LEN,
    NONCE_LEN,
    ROLE_AGENT,
    ROLE_USER,
    TOKEN_ID_LEN,
    TOKEN_LEN,
    hello_proof,
)
from relay.core.tokens import Refusal, TokenBook, TokenRefused, TooManyTokens

SVC = ("gpu-cluster", 22)
NONCE = b"\x07" * NONCE_LEN


def _redeem(book: TokenBook, role: bytes, token: bytes, alive: Any = None,
            service: tuple[str, int] | None = None, nonce: bytes = NONCE) -> Any:
    """Present ``token`` as its holder would: its id and the proof over ``nonce``."""
    token_id, secret = token[:TOKEN_ID_LEN], token[TOKEN_ID_LEN:]
    return book.redeem(role, token_id, nonce, hello_proof(secret, role, token_id, nonce, service),
                       alive, service)


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
        _redeem(book, role, token, alive, service)
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
    ticket = _redeem(book, ROLE_USER, token, lambda sess: sess is s, SVC)
    assert (ticket.role, ticket.principal, ticket.session, ticket.service) == (
        ROLE_USER, "alice", s, SVC)
    assert ticket.expires == 110.0
    assert len(book) == 0
    # single use: a replay finds nothing
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.UNKNOWN


def test_agent_token_has_no_service(book: TokenBook) -> None:
    s = Session()
    token = book.issue(ROLE_AGENT, "lab_pc", s)
    ticket = _redeem(book, ROLE_AGENT, token)
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

    monkeypatch.setattr(relay.core.tokens.hmac, "compare_digest", spy)
    good = book.issue(ROLE_USER, "alice", Session(), SVC)
    bad = book.issue(ROLE_USER, "alice", Session(), SVC)
    _redeem(book, ROLE_USER, good, None, SVC)
    proof = hello_proof(good[TOKEN_ID_LEN:], ROLE_USER, good[:TOKEN_ID_LEN], NONCE, SVC)
    assert calls == [(proof, proof)]
    assert _refusal(book, ROLE_USER, _flip_last(bad), None, SVC) is Refusal.WRONG
    forged = hello_proof(_flip_last(bad)[TOKEN_ID_LEN:], ROLE_USER, bad[:TOKEN_ID_LEN], NONCE, SVC)
    assert len(calls) == 2 and calls[1][1] == forged and calls[1][0] != forged


def test_secret_is_not_compared_with_eq(book: TokenBook,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Belt and braces for the spy above: a bytes == on the secret would bypass
    # compare_digest, so make compare_digest the only thing that can say "equal".
    monkeypatch.setattr(relay.core.tokens.hmac, "compare_digest", lambda a, b: False)
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.WRONG


def test_expired(book: TokenBook, clock: Clock) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    clock.advance(10.0)  # still valid at exactly the lifetime
    early = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert _redeem(book, ROLE_USER, early, None, SVC)
    clock.advance(0.001)
    assert _refusal(book, ROLE_USER, token, None, SVC) is Refusal.EXPIRED
    assert len(book) == 0


def test_expiry_boundary(book: TokenBook, clock: Clock) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    clock.advance(10.0)
    assert _redeem(book, ROLE_USER, token, None, SVC).principal == "alice"


def test_per_issue_lifetime(book: TokenBook, clock: Clock) -> None:
    short = book.issue(ROLE_USER, "alice", Session(), SVC, lifetime=1.0)
    long = book.issue(ROLE_AGENT, "lab_pc", Session(), lifetime=30.0)
    clock.advance(2.0)
    assert _refusal(book, ROLE_USER, short, None, SVC) is Refusal.EXPIRED
    clock.advance(20.0)  # past the book's 10 s, within its own 30 s
    assert _redeem(book, ROLE_AGENT, long).expires == 30.0


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


@pytest.mark.parametrize(("id_len", "proof_len"), [(0, MAC_LEN), (TOKEN_ID_LEN - 1, MAC_LEN),
                                                   (TOKEN_ID_LEN + 1, MAC_LEN),
                                                   (TOKEN_ID_LEN, 0), (TOKEN_ID_LEN, MAC_LEN - 1),
                                                   (TOKEN_ID_LEN, MAC_LEN + 1)])
def test_malformed_length(book: TokenBook, id_len: int, proof_len: int) -> None:
    token = book.issue(ROLE_USER, "alice", Session(), SVC)
    with pytest.raises(TokenRefused) as info:
        book.redeem(ROLE_USER, (token * 2)[:id_len], NONCE, b"\x00" * proof_len, None, SVC)
    assert info.value.why is Refusal.MALFORMED
    assert len(book) == 1  # nothing was looked up, nothing burnt
    assert _redeem(book, ROLE_USER, token, None, SVC)


def test_a_proof_for_another_nonce_is_wrong_and_burns_the_ticket(book: TokenBook) -> None:
    """A hello read on the wire (or captured by whoever owned the data port the holder
    dialled) and presented on another connection meets another nonce."""
    token = book.issue(ROLE_AGENT, "lab_pc", Session())
    token_id, secret = token[:TOKEN_ID_LEN], token[TOKEN_ID_LEN:]
    captured = hello_proof(secret, ROLE_AGENT, token_id, b"\x01" * NONCE_LEN)
    with pytest.raises(TokenRefused) as info:
        book.redeem(ROLE_AGENT, token_id, b"\x02" * NONCE_LEN, captured)
    assert info.value.why is Refusal.WRONG
    assert _refusal(book, ROLE_AGENT, token) is Refusal.UNKNOWN


def test_ticket_keeps_its_secret_for_the_dispatch_mac(book: TokenBook) -> None:
    token = book.issue(ROLE_AGENT, "lab_pc", Session())
    ticket = _redeem(book, ROLE_AGENT, token)
    assert ticket.token_id + ticket.secret == token


# --- caps and the sweep ---------------------------------------------------------------


def test_tokens_are_capped_per_session(clock: Clock) -> None:
    book = TokenBook(clock, 10.0, max_per_session=3, max_per_principal=100)
    s, other = Session(), Session()
    held = [book.issue(ROLE_USER, "alice", s, SVC) for _ in range(3)]
    assert book.room("alice", s) == 0
    with pytest.raises(TooManyTokens, match="max_tokens_per_session"):
        book.issue(ROLE_USER, "alice", s, SVC)
    assert book.capped == 1
    book.issue(ROLE_USER, "alice", other, SVC)  # another session of hers is not capped
    _redeem(book, ROLE_USER, held[0], None, SVC)  # one used: room for one more
    assert book.room("alice", s) == 1
    book.issue(ROLE_USER, "alice", s, SVC)
    assert book.drop_session(s) == 3 and book.room("alice", s) == 3


def test_tokens_are_capped_per_principal(clock: Clock) -> None:
    book = TokenBook(clock, 10.0, max_per_session=100, max_per_principal=4)
    for _ in range(4):
        book.issue(ROLE_USER, "alice", Session(), SVC)
    with pytest.raises(TooManyTokens, match="max_tokens_per_user"):
        book.issue(ROLE_USER, "alice", Session(), SVC)
    book.issue(ROLE_USER, "bob", Session(), SVC)  # others are not
    clock.advance(10.5)
    assert book.sweep() == 5
    assert book.room("alice", Session()) == 4  # expired tickets free the room


def test_a_refused_presentation_frees_the_room(clock: Clock) -> None:
    book = TokenBook(clock, 10.0, max_per_session=1, max_per_principal=1)
    s = Session()
    token = book.issue(ROLE_USER, "alice", s, SVC)
    _refusal(book, ROLE_USER, _flip_last(token), None, SVC)
    assert book.room("alice", s) == 1


def test_expired_tickets_are_swept_on_the_clock(clock: Clock) -> None:
    book = TokenBook(clock, 10.0)
    book.start()
    long = book.issue(ROLE_AGENT, "lab_pc", Session(), lifetime=30.0)
    for _ in range(5):
        book.issue(ROLE_USER, "alice", Session(), SVC, lifetime=1.0)  # behind a longer one
    assert len(book) == 6
    clock.advance(5.0)  # one sweep interval (min(lifetime, 5 s)); no issue meanwhile
    assert len(book) == 1 and book.swept == 5
    clock.advance(30.0)
    assert len(book) == 0
    book.stop()
    book.issue(ROLE_AGENT, "lab_pc", Session(), lifetime=1.0)
    clock.advance(60.0)
    assert len(book) == 1  # stopped: no timer left behind
    assert not clock.getDelayedCalls()
    assert _refusal(book, ROLE_AGENT, long) is Refusal.UNKNOWN


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
    assert _redeem(book, ROLE_USER, k, None, SVC).session is kept


def test_expired_tickets_are_forgotten_on_a_later_issue(book: TokenBook, clock: Clock) -> None:
    old = [book.issue(ROLE_USER, "alice", Session(), SVC) for _ in range(5)]
    clock.advance(5)
    newer = book.issue(ROLE_USER, "alice", Session(), SVC)
    assert len(book) == 6
    clock.advance(5.5)  # the first five expired, the newer one not
    assert len(book) == 6  # nothing is forgotten without an issue
    book.issue(ROLE_USER, "alice", Session(), SVC)
    assert len(book) == 2
    # forgotten, but its id is remembered as lapsed: told why, once
    assert _refusal(book, ROLE_USER, old[0], None, SVC) is Refusal.EXPIRED
    assert _refusal(book, ROLE_USER, old[0], None, SVC) is Refusal.UNKNOWN
    assert _redeem(book, ROLE_USER, newer, None, SVC)
    clock.advance(10.1)  # one more lifetime: the lapsed ids are forgotten too
    assert _refusal(book, ROLE_USER, old[1], None, SVC) is Refusal.UNKNOWN


def test_a_ticket_swept_a_moment_before_it_is_presented_is_told_expired(clock: Clock) -> None:
    """The sweep's phase must not decide what the user is told: a ticket presented
    just after it expired says ``expired`` whether or not the sweep ran in between
    (it ran at 8.0 here, the ticket expired at 7.9), for one more lifetime."""
    book = TokenBook(clock, 4.0)
    clock.advance(3.9)
    book.start()  # sweeps at 7.9 + 0.1 = 8.0, 12.0, ...
    late = book.issue(ROLE_USER, "alice", Session(), SVC)  # expires at 7.9
    later = book.issue(ROLE_USER, "alice", Session(), SVC)
    clock.advance(4.1)
    assert len(book) == 0 and book.swept == 2
    assert _refusal(book, ROLE_USER, late, None, SVC) is Refusal.EXPIRED
    # a swept ticket is "expired" only with its secret's proof: a wrong one is a guess
    assert _refusal(book, ROLE_USER, _flip_last(later), None, SVC) is Refusal.WRONG
    later = book.issue(ROLE_USER, "alice", Session(), SVC)  # expires at 12.0
    clock.advance(8.1)  # expired at 12.0, swept at 16.0, remembered until 20.0
    assert len(book) == 0
    assert _refusal(book, ROLE_USER, later, None, SVC) is Refusal.EXPIRED
    book.stop()


def test_lapsed_ids_are_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.core.tokens, "LAPSED_MAX", 3)
    book = TokenBook(clock, 1.0, max_per_session=100, max_per_principal=100)
    tokens = [book.issue(ROLE_USER, "alice", Session(), SVC) for _ in range(5)]
    clock.advance(1.5)
    assert book.sweep() == 5
    assert len(book._lapsed) == 3  # the oldest two dropped first
    assert [_refusal(book, ROLE_USER, t, None, SVC) for t in tokens] == [
        Refusal.UNKNOWN, Refusal.UNKNOWN, Refusal.EXPIRED, Refusal.EXPIRED, Refusal.EXPIRED]
    assert not book._lapsed


def test_counters(book: TokenBook, clock: Clock) -> None:
    s = Session()
    assert book.issued == {"user": 0, "agent": 0}
    assert book.redeemed == {"user": 0, "agent": 0}
    assert set(book.refused) == {r.value for r in Refusal}
    assert not any(book.refused.values())

    u1, u2, u3 = (book.issue(ROLE_USER, "alice", s, SVC) for _ in range(3))
    a1, a2 = (book.issue(ROLE_AGENT, "lab_pc", s) for _ in range(2))
    assert book.issued == {"user": 3, "agent": 2}

    _redeem(book, ROLE_USER, u1, None, SVC)
    _redeem(book, ROLE_AGENT, a1)
    for token, role, service in [(u1, ROLE_USER, SVC), (b"short", ROLE_USER, SVC),
                                 (_flip_last(u2), ROLE_USER, SVC), (a2, ROLE_USER, SVC),
                                 (u3, ROLE_USER, ("other", 1))]:
        with pytest.raises(TokenRefused):
            _redeem(book, role, token, None, service)
    assert book.redeemed == {"user": 1, "agent": 1}
    assert {k: v for k, v in book.refused.items() if v} == {
        "unknown": 1, "malformed": 1, "wrong proof": 1, "wrong role": 1,
        "issued for another service": 1}

    e = book.issue(ROLE_USER, "alice", s, SVC)
    g = book.issue(ROLE_USER, "alice", s, SVC)
    with pytest.raises(TokenRefused):
        _redeem(book, ROLE_USER, g, lambda _: False, SVC)
    clock.advance(11)
    with pytest.raises(TokenRefused):
        _redeem(book, ROLE_USER, e, None, SVC)
    assert book.refused["expired"] == 1 and book.refused["its SSH session ended"] == 1


def test_refusal_carries_its_reason() -> None:
    e = TokenRefused(Refusal.EXPIRED)
    assert e.why is Refusal.EXPIRED and str(e) == "expired"
