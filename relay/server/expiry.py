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

SLACK = 0.05
"""Seconds after the expiry time the timer fires: the check must see it expired."""


class KeyHolder(Protocol):
    """What the relay provides (:class:`relay.server.relay.RelayCore`)."""

    reactor: Any
    grants: Any
    connections: Any
    sessions: Any
    resumes: Any  # relay.server.resumes.RelayResumes: sessions held for an agent key

    def endKey(self, key_blob: bytes, why: str) -> None:
        """Close every session and connection of ``key_blob``."""


class KeyExpiry:
    def __init__(self, relay: KeyHolder) -> None:
        self.relay = relay
        self._timers: dict[bytes, IDelayedCall] = {}

    def watch(self, key_blob: bytes) -> None:
        """``key_blob`` is in use: end its sessions when it expires, if it does."""
        when = self.relay.grants.expires(key_blob)
        old = self._timers.pop(key_blob, None)
        if old is not None and old.active():
            old.cancel()
        if when is None:
            return
        delay = max(0.0, when - self.relay.grants.trust.now()) + SLACK
        self._timers[key_blob] = self.relay.reactor.callLater(delay, self._due, key_blob)

    def _due(self, key_blob: bytes) -> None:
        self._timers.pop(key_blob, None)
        why = self.relay.grants.refusal(key_blob)
        if why is not None:
            self.relay.endKey(key_blob, f"its key is no longer usable: {why}")
        elif self._inUse(key_blob):
            self.watch(key_blob)  # extended by a reload meanwhile

    def _inUse(self, key_blob: bytes) -> bool:
        return (any(c.identity.key_blob == key_blob for c in self.relay.connections)
                or any(r.key == key_blob for r in self.relay.sessions.rows())
                or key_blob in self.relay.resumes.held_keys())

    def keys_in_use(self) -> set[bytes]:
        """Every key blob with a connection, a session or a held session."""
        blobs = {c.identity.key_blob for c in self.relay.connections}
        blobs.update(r.key for r in self.relay.sessions.rows() if r.key is not None)
        # An agent whose link is down has no connection, but the sessions held for it
        # are its key's: revoked, that key can never resume them (they end now).
        blobs.update(self.relay.resumes.held_keys())
        return blobs

    def recheck(self, skip: Collection[bytes] = ()) -> None:
        """After a reload: end what is no longer usable, re-arm the timers of the rest.
        ``skip``: keys the reload's diff already took care of."""
        blobs = self.keys_in_use()
        for blob in sorted(blobs - set(skip)):
            why = self.relay.grants.refusal(blob)
            if why is not None:  # the reason itself: expired, which KRL entry, which CA
                self.relay.endKey(blob, f"its key is no longer usable: {why}")
            else:
                self.watch(blob)

    def stop(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
