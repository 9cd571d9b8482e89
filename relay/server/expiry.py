"""Keys and certificates that stop being usable while in use: their sessions end.

A key with ``expiry-time`` or a certificate's ``valid_before`` ends at a known time:
:class:`KeyExpiry` sets one timer per key blob in use (at login) for that time, and
when it fires asks the grants again; if the key is no longer usable its sessions end
(spliced ones too, which outlive the SSH connection) and its connections are closed,
each told why.  A reload of the grants or of the KRL (``revoked_keys``) runs the same
check over every connection at once (:meth:`KeyExpiry.recheck`): a certificate whose
CA line went, or a key now in the KRL, goes like a key removed from a grant file.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall

from relay.core.certs import is_certificate

SLACK = 0.05
"""Seconds after the expiry time the timer fires: the check must see it expired."""


class KeyHolder(Protocol):
    """What the relay provides (:class:`relay.server.relay.RelayCore`)."""

    reactor: Any
    grants: Any
    connections: Any
    sessions: Any
    resumes: Any  # relay.server.resumes.RelayResumes: sessions held for an agent key

    def endKey(self, key_blob: bytes, why: str, login: str | None = None) -> None:
        """Close every session and connection of ``key_blob``, held sessions included
        (for a certificate with ``login``: only those of that login)."""


Holder = tuple[bytes, str]
"""A key blob in use and the login name it is checked as: a certificate's grants depend
on the login (one certificate may be logged in as two names at once, each checked as
its own); "" for a plain key (its grants do not).  Sessions held for an agent whose
link is down are checked as the login that agent made (relay.server.resumes)."""


def holder(key_blob: bytes, login: str) -> Holder:
    return (key_blob, login if is_certificate(key_blob) else "")


PRUNE_FLOOR = 64
"""Timers kept before :meth:`KeyExpiry.watch` first looks for ones no longer in use."""


class KeyExpiry:
    def __init__(self, relay: KeyHolder) -> None:
        self.relay = relay
        self._timers: dict[Holder, IDelayedCall] = {}
        self._pruneAt = PRUNE_FLOOR

    def watch(self, key_blob: bytes, login: str = "") -> None:
        """``key_blob`` is in use (logged in as ``login``): end its sessions when it
        expires, if it does."""
        self._watch(holder(key_blob, login))
        if len(self._timers) > self._pruneAt:
            self._prune()

    def _prune(self) -> None:
        """Cancel the timers of (key, login) pairs no longer in use.  A timer stayed
        until its key expired, one per pair that ever logged in: before round 16 a
        certificate-authority line bound no login name, so one certificate valid for a
        year, logged in under 100 000 names, left 100 000 timers in the reactor for a
        year, all firing at its expiry (now it may log in under as many names as lines
        accept it, and many short-lived certificates still add up).  Run when the
        timers have doubled since the last prune (amortised O(1) a login).  A held
        session's pair is in use as the login its agent made (relay.server.resumes)."""
        in_use = self.holders_in_use()
        for who in [w for w in self._timers if w not in in_use]:
            timer = self._timers.pop(who)
            if timer.active():
                timer.cancel()
        self._pruneAt = max(PRUNE_FLOOR, 2 * len(self._timers))

    def _watch(self, who: Holder) -> None:
        when = self.relay.grants.expires(who[0], who[1] or None)
        old = self._timers.pop(who, None)
        if old is not None and old.active():
            old.cancel()
        if when is None:
            return
        delay = max(0.0, when - self.relay.grants.trust.now()) + SLACK
        self._timers[who] = self.relay.reactor.callLater(delay, self._due, who)

    def _due(self, who: Holder) -> None:
        self._timers.pop(who, None)
        why = self.relay.grants.refusal(who[0], who[1] or None)
        if why is not None:
            self.relay.endKey(who[0], f"its key is no longer usable: {why}", who[1])
        elif who in self.holders_in_use():
            self._watch(who)  # extended by a reload meanwhile

    def keys_in_use(self) -> set[bytes]:
        """Every key blob with a connection, a session or a held session."""
        return {who[0] for who in self.holders_in_use()}

    def holders_in_use(self) -> set[Holder]:
        """Every (key blob, login) with a connection, a session or a held session."""
        out = {holder(c.identity.key_blob, getattr(c.identity, "login", ""))
               for c in self.relay.connections}
        out.update(holder(r.key, r.login) for r in self.relay.sessions.rows()
                   if r.key is not None)
        # An agent whose link is down has no connection, but the sessions held for it
        # are its key's, as the login it made: no longer usable as that login, it can
        # never resume them (they end now), whatever the certificate's other logins.
        out.update(holder(blob, login) for blob, login in self.relay.resumes.held_holders())
        return out

    def recheck(self, skip: Collection[bytes] = ()) -> None:
        """After a reload: end what is no longer usable, re-arm the timers of the rest,
        each (key, login) checked as its own.  ``skip``: keys the reload's diff already
        took care of."""
        for who in sorted(self.holders_in_use()):
            if who[0] in skip:
                continue
            why = self.relay.grants.refusal(who[0], who[1] or None)
            if why is not None:  # the reason itself: expired, which KRL entry, which CA
                self.relay.endKey(who[0], f"its key is no longer usable: {why}", who[1])
            else:
                self._watch(who)

    def stop(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
