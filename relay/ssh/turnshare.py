"""The reactor side of a user's packet budget per turn (relay.core.fairshare.TurnShare).

The relay opens every packet a user sends (~5 µs of Python each, whatever its size),
so a user who floods small ones can make the relay's turns long for everyone, and one
budget per *connection* let her multiply it by opening more connections.  Each user's
connections share one :class:`UserTurns`: in a window of ``TURN_WINDOW`` seconds (a
reactor turn before round 17, which let a user whose every read was small never wait)
they may have at most ``per_turn`` packets handled between them; the rest of a read
waits, in order, its
socket not read meanwhile (TCP pushes back on her; nothing is dropped and nothing more
is buffered than the read already taken in), and one call per user in the next turn
(``callLater(0)``) hands the waiting connections the new turn's budget in turn.

A user alone loses one pass of the reactor's loop per ``per_turn`` packets, and none
at all for bulk (four 32 KiB packets to a read).  The transports' side is in
:class:`relay.ssh.aead.AEADTransportMixin` (``turnShare``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from relay.core.fairshare import TurnShare
from relay.core.ratelimit import TokenBucket
from relay.ssh.kex import user_kex_pacer

TURN_WINDOW = 0.01
"""Seconds over which a user's budget of packets (``PACKETS_PER_TURN``) counts: her
reads within one window add up, however small each is.  128 packets in 10 ms is
~12 800 a second (~6-10 % of a core) before she waits at all; bulk (four 32 KiB
packets a read) waits after 4 MiB in 10 ms, faster than the relay moves it."""


BULK_PACKET = 8 * 1024
"""Bytes a packet, on average over a read, from which the read is bulk and not charged
to her window (relay.ssh.aead.CORK_BELOW draws the same line for writes)."""


class Reader(Protocol):
    """What a transport under a share provides (AEADTransportMixin)."""

    def parseWaiting(self, budget: int) -> int:
        """Handle up to ``budget`` packets of what waits; the packets handled."""

    def stillWaiting(self) -> bool:
        """Whether part of a read still waits for a later turn."""


class UserTurns:
    """One user's budget of packets per window, her connections that wait, and the pace
    of the key exchanges they start."""

    def __init__(self, reactor: Any, per_turn: int,
                 othersActive: Callable[[UserTurns], bool] | None = None,
                 window: float = TURN_WINDOW) -> None:
        self.reactor = reactor
        self.share: TurnShare[Reader] = TurnShare(per_turn)
        self._call: Any = None
        self._othersActive = othersActive
        self.window = window
        self.lastRead = 0.0  # reactor.seconds() of this user's last read
        # The time her packets took in this window, her waiting reads' included: what
        # she yields, while others are active, once past her budget (_nextTurn).
        self.busy = 0.0
        self._busyWindow = -1
        self._readAt = 0.0
        self._kexPacer: TokenBucket | None = None

    @property
    def kexPacer(self) -> TokenBucket:
        """The pace of the key exchanges all her connections start
        (:func:`relay.ssh.kex.user_kex_pacer`; ``KexMixin.kexUserPacer``): kept here
        because this is what lives exactly as long as any connection of hers."""
        if self._kexPacer is None:
            self._kexPacer = user_kex_pacer(self.reactor.seconds())
        return self._kexPacer

    def budget(self) -> int:
        """Packets a read of this user may have handled now: none while any of her
        connections waits (the read waits behind it, its socket paused).

        The budget is per window of ``window`` seconds, not per read nor per reactor
        turn: before (round 16), a user whose reads each stayed under the budget (one
        connection, small writes each flushed) had it whole again at every turn, never
        waited, and so never yielded to anyone.  O(1) a read: the clock, a division."""
        now = self.reactor.seconds()
        self.lastRead = now
        window = int(now / self.window)
        if window != self._busyWindow:
            self._busyWindow = window
            self.busy = 0.0
        self._readAt = time.perf_counter()
        if len(self.share):
            return 0
        return self.share.grant(window)

    def spend(self, packets: int, nbytes: int = 0) -> None:
        """After the read :meth:`budget` was asked for: ``packets`` were handled, in
        ``nbytes`` bytes.  A read of bulk (``BULK_PACKET`` bytes a packet or more) is
        held to the budget left within itself but not charged to the window: a
        transfer at the relay's channel rate (~350 MB/s of OpenSSH's 16 KiB packets,
        ~21 000 a second) would otherwise wait, and while anyone else is active yield
        half its time; so bulk is as it was in round 16, and small reads add up."""
        if packets and nbytes >= packets * BULK_PACKET:
            return
        self.busy += time.perf_counter() - self._readAt
        self.share.spend(packets)

    def wait(self, reader: Reader) -> None:
        """``reader`` holds the rest of a read: it gets its share in a later turn."""
        self.share.wait(reader)
        if self._call is None:
            self._call = self.reactor.callLater(0, self._nextTurn)

    def forget(self, reader: Reader) -> None:
        self.share.forget(reader)
        if not len(self.share) and self._call is not None and self._call.active():
            self._call.cancel()
            self._call = None

    def _nextTurn(self) -> None:
        """The start of a reactor turn (timed calls run before its poll): the waiting
        connections get this turn's budget, in turn, before her new reads do."""
        self._call = None
        # A fresh budget for the current window: the reads that follow within it (her
        # other connections', her next ones) share what is left of it.
        window = int(self.reactor.seconds() / self.window)
        left = self.share.renew(window)
        start = time.perf_counter()
        served = 0
        waiting = len(self.share)
        while left > 0 and served < waiting:
            reader = self.share.next_waiting()
            if reader is None:
                break
            served += 1
            used = reader.parseWaiting(left)
            self.share.spend(used)
            left = self.share.left
            if reader.stillWaiting():
                self.share.wait(reader)  # at the back: the others go first next turn
        spent = time.perf_counter() - start
        if len(self.share) and self._call is None:
            # While others are active, she waits as long as her packets took since her
            # last wait (this turn and the reads of the window before it): at most
            # half of the relay's time is hers, and her peer is pushed back.
            delay = 0.0
            if self._othersActive is not None and self._othersActive(self):
                delay = self.busy + spent
            self._call = self.reactor.callLater(delay, self._nextTurn)
        self.busy = 0.0
        self._busyWindow = window


ACTIVE_WINDOW = 1.0
"""Seconds since another user's last read during which she is held to half the time."""


class UserTurnShares:
    """The relay's :class:`UserTurns`, one per user while any of her connections is
    open (held by the connections; weakly here, so that nothing is kept for a user
    who has gone)."""

    def __init__(self, reactor: Any, per_turn: int) -> None:
        self.reactor = reactor
        self.per_turn = per_turn
        self._shares: weakref.WeakValueDictionary[str, UserTurns] = (
            weakref.WeakValueDictionary())

    def of(self, user: str) -> UserTurns:
        share = self._shares.get(user)
        if share is None:
            share = self._shares[user] = UserTurns(self.reactor, self.per_turn,
                                                   self.othersActive)
        return share

    def othersActive(self, me: UserTurns) -> bool:
        """Whether a user other than ``me`` read anything within ``ACTIVE_WINDOW``."""
        since = self.reactor.seconds() - ACTIVE_WINDOW
        return any(s is not me and s.lastRead >= since for s in self._shares.values())

    def __len__(self) -> int:
        return len(self._shares)
