"""One-time tokens for the fast path's data port, and the throttle on guessing them.

No I/O: the relay's data port asks :meth:`TokenBook.redeem` with the 32 bytes a
connection sent.  The rules are DESIGN §7's:

- a token is an 8-byte id and a 24-byte secret, both from :func:`secrets.token_bytes`
  (192 bits nobody can guess; the id only finds the ticket);
- the secret is compared with :func:`hmac.compare_digest`, so timing does not say
  how much of a guess was right, and a wrong secret burns the ticket (its id leaked);
- single use: redeeming removes the ticket, whatever the outcome;
- it expires ``lifetime`` seconds after issue;
- it is bound to one principal, one service and one SSH session: the caller gets
  the ticket back and checks that session is still alive;
- failures are counted per source address; an address with ``limit`` failures in
  ``window`` seconds is turned away before its bytes are even looked at.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .fastwire import ROLE_AGENT, ROLE_USER, TOKEN_ID_LEN, TOKEN_LEN

_ROLE_NAMES = {ROLE_USER: "user", ROLE_AGENT: "agent"}


class Refusal(Enum):
    MALFORMED = "malformed"
    UNKNOWN = "unknown"  # never issued, already used, or expired and forgotten
    WRONG = "wrong secret"
    EXPIRED = "expired"
    SESSION_GONE = "its SSH session ended"
    WRONG_ROLE = "wrong role"
    OTHER_SERVICE = "issued for another service"
    THROTTLED = "throttled"


class TokenRefused(Exception):
    def __init__(self, why: Refusal) -> None:
        super().__init__(why.value)
        self.why = why


@dataclass(eq=False)
class Ticket:
    """What a token stands for."""

    role: bytes  # fastwire.ROLE_USER / ROLE_AGENT
    principal: str
    session: Any  # the SSH connection that asked
    service: tuple[str, int] | None  # users only
    expires: float


class TokenBook:
    """Issued tokens, by id.  ``clock`` is an ``IReactorTime``."""

    def __init__(self, clock: Any, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self._tickets: OrderedDict[bytes, tuple[bytes, Ticket]] = OrderedDict()
        self.issued = {"user": 0, "agent": 0}
        self.redeemed = {"user": 0, "agent": 0}
        self.refused: dict[str, int] = {r.value: 0 for r in Refusal}

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, role: bytes, principal: str, session: Any,
              service: tuple[str, int] | None = None,
              lifetime: float | None = None) -> bytes:
        self._forget_expired()
        token_id = secrets.token_bytes(TOKEN_ID_LEN)
        while token_id in self._tickets:  # pragma: no cover - 1 in 2**64
            token_id = secrets.token_bytes(TOKEN_ID_LEN)
        secret = secrets.token_bytes(TOKEN_LEN - TOKEN_ID_LEN)
        life = self.lifetime if lifetime is None else lifetime
        self._tickets[token_id] = (secret, Ticket(role, principal, session, service,
                                                  self.clock.seconds() + life))
        self.issued[_ROLE_NAMES.get(role, "user")] += 1
        return token_id + secret

    def redeem(self, role: bytes, token: bytes, alive: Any = None,
               service: tuple[str, int] | None = None) -> Ticket:
        """The ticket for ``token``, removed; or :class:`TokenRefused`.

        ``alive(session)`` says whether the session that asked still exists;
        ``service`` is the one the presenter expects (it must be the ticket's)."""
        if len(token) != TOKEN_LEN:
            return self._refuse(Refusal.MALFORMED)
        entry = self._tickets.pop(token[:TOKEN_ID_LEN], None)
        if entry is None:
            return self._refuse(Refusal.UNKNOWN)
        secret, ticket = entry
        if not hmac.compare_digest(secret, token[TOKEN_ID_LEN:]):
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

    def drop_session(self, session: Any) -> int:
        """Forget every ticket ``session`` asked for (it ended)."""
        gone = [k for k, (_, t) in self._tickets.items() if t.session is session]
        for k in gone:
            del self._tickets[k]
        return len(gone)

    def _forget_expired(self) -> None:
        # Tickets of one lifetime expire in issue order; with two lifetimes a long one
        # may shelter shorter ones behind it for a while, which only delays forgetting.
        now = self.clock.seconds()
        while self._tickets:
            token_id, (_, ticket) = next(iter(self._tickets.items()))
            if ticket.expires >= now:
                break
            del self._tickets[token_id]


class Throttle:
    """Failures per source address in a sliding window (guessing is throttled)."""

    def __init__(self, clock: Any, limit: int = 20, window: float = 60.0,
                 max_sources: int = 65536) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_sources = max_sources
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.turned_away = 0

    def blocked(self, source: str) -> bool:
        times = self._failures.get(source)
        if times is None:
            return False
        self._trim(times)
        if len(times) >= self.limit:
            self.turned_away += 1
            return True
        return False

    def failed(self, source: str) -> None:
        times = self._failures.pop(source, None) or deque()
        times.append(self.clock.seconds())
        self._trim(times)
        self._failures[source] = times  # most recent last
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)

    def _trim(self, times: deque[float]) -> None:
        horizon = self.clock.seconds() - self.window
        while times and times[0] < horizon:
            times.popleft()
        while len(times) > self.limit:
            times.popleft()
