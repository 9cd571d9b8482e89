"""One-time tickets for the fast path's data port.

No I/O but the sweep timer: the relay's data port asks :meth:`TokenBook.redeem`
with the ticket id, the nonce it sent and the proof the connection answered.  The
rules are DESIGN §7's and docs/fastpath.md's:

- a ticket is an 8-byte id and a 24-byte secret, both from
  :func:`secrets.token_bytes` (192 bits nobody can guess; the id only finds it);
  the whole ticket crosses only the SSH connection that asked for it;
- the data port never carries the secret: the presenter proves it with
  HMAC-SHA256(secret, transcript incl. the relay's fresh nonce)
  (:func:`relay.core.fastwire.hello_proof`), compared with :func:`hmac.compare_digest`;
  a wrong proof burns the ticket (its id leaked); a hello replayed on another
  connection meets another nonce and is a wrong proof;
- single use: redeeming removes the ticket, whatever the outcome;
- it expires ``lifetime`` seconds after issue, and expired tickets are swept on a
  timer (:meth:`TokenBook.start`), not only when a new one is issued; the id of a
  ticket forgotten that way is remembered with its secret for one more lifetime (at
  most :data:`LAPSED_MAX`), so that a late presentation with the right proof is
  refused as ``expired`` whatever the sweep's phase, not as ``unknown`` (the user's
  ``labrelay connect`` says which), and a wrong proof stays a guess;
- it is bound to one principal, one service and one SSH session: the caller gets
  the ticket back and checks that session is still alive;
- outstanding tickets are capped per SSH session and per principal, so a user
  cannot grow the relay's memory by asking;
- guessing is not throttled here: a refused proof earns its source a penalty in
  :mod:`relay.core.admission`, shared with the SSH port.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any

from relay.core.clock import Clock, Timer
from relay.core.fastwire import MAC_LEN, ROLE_AGENT, ROLE_USER, TOKEN_ID_LEN, TOKEN_LEN, hello_proof

_ROLE_NAMES = {ROLE_USER: "user", ROLE_AGENT: "agent"}

LAPSED_MAX = 4096
"""How many expired, forgotten tickets are remembered at most (id and secret; oldest
dropped first): about 1 MiB, and only tickets the caps let be issued ever get there."""


class Refusal(Enum):
    MALFORMED = "malformed"
    UNKNOWN = "unknown"  # never issued, already used, or expired over a lifetime ago
    WRONG = "wrong proof"
    EXPIRED = "expired"
    SESSION_GONE = "its SSH session ended"
    WRONG_ROLE = "wrong role"
    OTHER_SERVICE = "issued for another service"


class TokenRefused(Exception):
    def __init__(self, why: Refusal) -> None:
        super().__init__(why.value)
        self.why = why


class TooManyTokens(Exception):
    """A session or principal holds as many unused tickets as it may; ``str()`` says
    which cap."""


@dataclass(eq=False)
class Ticket:
    """What a token stands for."""

    role: bytes  # fastwire.ROLE_USER / ROLE_AGENT
    principal: str
    session: Any  # the SSH connection that asked
    service: tuple[str, int] | None  # users only
    expires: float
    token_id: bytes = b""
    secret: bytes = b""  # keys the dispatch MAC of an agent's pooled connection


class TokenBook:
    """Issued tickets, by id.  ``clock`` is an ``IReactorTime`` (:class:`Clock`).

    ``max_per_session`` and ``max_per_principal`` cap the unused tickets one SSH
    session and one principal (user or agent name) may hold at once."""

    def __init__(self, clock: Clock, lifetime: float, max_per_session: int = 64,
                 max_per_principal: int = 256) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.max_per_session = max_per_session
        self.max_per_principal = max_per_principal
        self._tickets: OrderedDict[bytes, Ticket] = OrderedDict()
        self._per_session: dict[Any, int] = {}
        self._per_principal: dict[str, int] = {}
        # id -> (remembered until, its secret): an expired refusal still needs the proof
        self._lapsed: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._sweeper: Timer | None = None
        self._sweep_every = 0.0
        self.issued = {"user": 0, "agent": 0}
        self.redeemed = {"user": 0, "agent": 0}
        self.refused: dict[str, int] = {r.value: 0 for r in Refusal}
        self.capped = 0
        self.swept = 0

    def __len__(self) -> int:
        return len(self._tickets)

    def outstanding(self) -> dict[str, int]:
        """Unused tickets by role."""
        counts = {"user": 0, "agent": 0}
        for ticket in self._tickets.values():
            counts[_ROLE_NAMES.get(ticket.role, "user")] += 1
        return counts

    # the sweep

    def start(self, interval: float | None = None) -> None:
        """Sweep expired tickets every ``interval`` seconds (default: the lifetime,
        at most 5 s): an expired ticket lives at most that much longer."""
        if self._sweeper is not None:
            return
        self._sweep_every = interval if interval is not None else min(self.lifetime, 5.0)
        self._sweeper = self.clock.callLater(self._sweep_every, self._sweepTick)

    def _sweepTick(self) -> None:
        self._sweeper = self.clock.callLater(self._sweep_every, self._sweepTick)
        self.sweep()

    def stop(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.active():
            sweeper.cancel()

    def sweep(self) -> int:
        """Forget every expired ticket; how many."""
        now = self.clock.seconds()
        gone = [k for k, t in self._tickets.items() if t.expires < now]
        for k in gone:
            self._lapse(k, now)
        self.swept += len(gone)
        return len(gone)

    def _lapse(self, token_id: bytes, now: float) -> None:
        """Forget an expired ticket but remember its id (and secret, to check a late
        proof) for one more lifetime."""
        ticket = self._remove(token_id)
        if ticket is None:
            return
        lapsed = self._lapsed
        lapsed[token_id] = (now + self.lifetime, ticket.secret)
        while lapsed and (len(lapsed) > LAPSED_MAX or next(iter(lapsed.values()))[0] < now):
            lapsed.popitem(last=False)

    # issue and redeem

    def room(self, principal: str, session: Any) -> int:
        """How many more tickets ``principal`` may be issued on ``session`` now."""
        return max(0, min(self.max_per_session - self._per_session.get(session, 0),
                          self.max_per_principal - self._per_principal.get(principal, 0)))

    def issue(self, role: bytes, principal: str, session: Any,
              service: tuple[str, int] | None = None,
              lifetime: float | None = None) -> bytes:
        """A new ticket (id + secret); :class:`TooManyTokens` over a cap."""
        self._forget_expired()
        if self._per_session.get(session, 0) >= self.max_per_session:
            self.capped += 1
            raise TooManyTokens(f"{self.max_per_session} unused fast-path tokens on this "
                                "SSH session (max_tokens_per_session)")
        if self._per_principal.get(principal, 0) >= self.max_per_principal:
            self.capped += 1
            raise TooManyTokens(f"{self.max_per_principal} unused fast-path tokens for "
                                f"{principal} (max_tokens_per_user)")
        token_id = secrets.token_bytes(TOKEN_ID_LEN)
        while token_id in self._tickets:  # pragma: no cover - 1 in 2**64
            token_id = secrets.token_bytes(TOKEN_ID_LEN)
        secret = secrets.token_bytes(TOKEN_LEN - TOKEN_ID_LEN)
        life = self.lifetime if lifetime is None else lifetime
        self._tickets[token_id] = Ticket(role, principal, session, service,
                                         self.clock.seconds() + life, token_id, secret)
        self._per_session[session] = self._per_session.get(session, 0) + 1
        self._per_principal[principal] = self._per_principal.get(principal, 0) + 1
        self.issued[_ROLE_NAMES.get(role, "user")] += 1
        return token_id + secret

    def redeem(self, role: bytes, token_id: bytes, nonce: bytes, proof: bytes,
               alive: Any = None, service: tuple[str, int] | None = None) -> Ticket:
        """The ticket ``token_id`` names, removed, if ``proof`` is the HMAC of its
        secret over this connection's ``nonce`` (:func:`relay.core.fastwire.hello_proof`);
        or :class:`TokenRefused`.

        ``alive(session)`` says whether the session that asked still exists;
        ``service`` is the one the presenter expects (it must be the ticket's)."""
        if len(token_id) != TOKEN_ID_LEN or len(proof) != MAC_LEN:
            return self._refuse(Refusal.MALFORMED)
        ticket = self._remove(token_id)
        if ticket is None:
            lapsed = self._lapsed.pop(token_id, None)
            if lapsed is None or self.clock.seconds() > lapsed[0]:
                return self._refuse(Refusal.UNKNOWN)
            # swept a moment before: "expired" only to whoever holds its secret, as for
            # a ticket not yet swept (an expired refusal costs its source no penalty)
            late = hello_proof(lapsed[1], role, token_id, nonce, service)
            if not hmac.compare_digest(late, proof):
                return self._refuse(Refusal.WRONG)
            return self._refuse(Refusal.EXPIRED)
        expected = hello_proof(ticket.secret, role, token_id, nonce, service)
        if not hmac.compare_digest(expected, proof):
            return self._refuse(Refusal.WRONG)
        if self.clock.seconds() > ticket.expires:
            return self._refuse(Refusal.EXPIRED)
        if ticket.role != role:
            return self._refuse(Refusal.WRONG_ROLE)
        if ticket.service != service:
            return self._refuse(Refusal.OTHER_SERVICE)
        if alive is not None and not alive(ticket.session):
            return self._refuse(Refusal.SESSION_GONE)
        self.redeemed[_ROLE_NAMES.get(role, "user")] += 1
        return ticket

    def _refuse(self, why: Refusal) -> Ticket:
        self.refused[why.value] += 1
        raise TokenRefused(why)

    def _remove(self, token_id: bytes) -> Ticket | None:
        ticket = self._tickets.pop(token_id, None)
        if ticket is not None:
            for counts, key in ((self._per_session, ticket.session),
                                (self._per_principal, ticket.principal)):
                left = counts.get(key, 0) - 1
                if left > 0:
                    counts[key] = left
                else:
                    counts.pop(key, None)
        return ticket

    def drop_session(self, session: Any) -> int:
        """Forget every ticket ``session`` asked for (it ended)."""
        gone = [k for k, t in self._tickets.items() if t.session is session]
        for k in gone:
            self._remove(k)
        return len(gone)

    def _forget_expired(self) -> None:
        # Tickets of one lifetime expire in issue order; with two lifetimes a long one
        # may shelter shorter ones behind it until the sweep finds them.
        now = self.clock.seconds()
        while self._tickets:
            token_id, ticket = next(iter(self._tickets.items()))
            if ticket.expires >= now:
                break
            self._lapse(token_id, now)

