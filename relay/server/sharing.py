"""The relay's side of sharing: whose bytes a channel carries, weights, rate limits.

Scheduling itself happens in every :class:`relay.ssh.connection.FlowConnection`
(its :class:`relay.core.fairshare.FairScheduler`); this module tells it what it
needs: each bridged channel's user (``shareUser``) and the users' weights
(``share``), and, on an agent's ``forwarded-tcpip`` channel, sends the agent the
same through ``share@labrelay`` so the agent schedules its direction of the link by
user too.  Rate limits (``rate_limit``, ``rate_burst``) are token buckets per user
and direction (:mod:`relay.core.ratelimit`), charged as a bridge moves bytes; a
user in debt has the source that read the bytes paused (``pauseReading("rate")``,
the bridge's one pause mechanism) until the debt is paid.  Spliced sessions are
charged from their byte counts and paused the same way through their pump.

Settings come from the grants (config tables and users file), so a reload of
either changes shares and limits at once (:meth:`Sharing.refresh`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from relay.core.grants import USER, Principal
from relay.core.ratelimit import DOWN, UP, Limit, TokenBucket, UserLimits
from relay.ssh.wire import SHARE, pack_share

RATE = "rate"
"""The pause reason of a source whose user is over its rate limit."""
SPLICE_POLL = 0.01
"""Seconds between two readings of a rate-limited spliced pair's byte counts: a pump
not paused may move at full speed until the next reading, so this bounds how far past
its credit a user gets (at 600 MB/s, 6 MB) before its pause; the debt is then waited
out, so the average rate holds."""


class PrincipalSource(Protocol):
    def principals(self) -> list[Principal]: ...


class Pausable(Protocol):
    def pauseReading(self, reason: str) -> None: ...

    def resumeReading(self, reason: str) -> None: ...


class Sharing:
    """Users' weights and rate limits for one relay."""

    _log = Logger()

    def __init__(self, grants: PrincipalSource, reactor: Any) -> None:
        self._grants = grants
        self.reactor = reactor
        self.limits = UserLimits()
        self._weights: dict[str, float] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read shares and limits from the grants in force (at start and on reload)."""
        weights: dict[str, float] = {}
        limits: dict[str, Limit] = {}
        for p in self._grants.principals():
            if p.kind != USER:
                continue
            if p.share != 1.0:
                weights[p.name] = p.share
            if p.rate_limit is not None:
                limits[p.name] = Limit(p.rate_limit, p.rate_burst or 0)
        self._weights = weights
        self.limits.set_limits(limits, self.reactor.seconds())

    def weight(self, user: str) -> float:
        return self._weights.get(user, 1.0)

    # --- fair share -------------------------------------------------------

    def tag(self, channel: Any, user: str) -> None:
        """``channel`` carries ``user``'s bytes on its connection's link."""
        channel.tagShare(user, self.weight(user))

    def tagAgentChannel(self, side: Any, user: str) -> Any:
        """Tag an agent's ``forwarded-tcpip`` channel here and at the agent; returns
        ``side`` (a Deferred's callback).  ``side`` is the channel, or a resumable
        session's side (relay.ssh.resumable) whose ``channel`` carries it now: the relay
        calls this again when such a session is resumed on a new channel (with the
        user's weight in force then), and the agent's side re-tags its new channel from
        what it knew meanwhile."""
        channel = getattr(side, "channel", side)
        if channel is None or getattr(channel, "conn", None) is None:
            return side
        self.tag(channel, user)
        # With the channel's first packet, not in one of its own (BridgedChannel.announce).
        announce = getattr(channel, "announce", None)
        if announce is not None:
            announce(SHARE, pack_share(user, self.weight(user)))
        else:
            channel.conn.sendRequest(channel, SHARE, pack_share(user, self.weight(user)))
        return side

    # --- rate limits ------------------------------------------------------

    def limiter(self, user: str, user_side: Pausable) -> Callable[[Any, int], None] | None:
        """A bridge's byte hook that charges ``user``'s buckets (None: not limited).
        Bytes read from ``user_side`` go to the service; the others come from it."""
        if self.limits.limit(user) is None:
            return None
        held = _Held(self.reactor)

        def moved(src: Any, nbytes: int) -> None:
            bucket = self.limits.bucket(user, UP if src is user_side else DOWN,
                                        self.reactor.seconds())
            if bucket is not None:
                held.charge(src, bucket, nbytes)

        moved.release = held.release  # type: ignore[attr-defined]
        return moved

    def limitSpliced(self, user: str, counts: Callable[[], tuple[int, int]],
                     pause: Callable[[bool, bool], None]) -> Callable[[], None] | None:
        """Charge a spliced pair's bytes (``counts()``: to and from the service) to
        ``user`` every ``SPLICE_POLL`` seconds and pause each direction of its pump
        (``pause(to_service, from_service)``) while the user is in debt that way; the
        function that stops it (None: not limited)."""
        if self.limits.limit(user) is None:
            return None
        moved = [0, 0]
        paused = [False, False]
        timer: list[IDelayedCall] = []

        def tick() -> None:
            now = self.reactor.seconds()
            waits = [0.0, 0.0]
            for i, (direction, value) in enumerate(zip((UP, DOWN), counts(), strict=True)):
                bucket = self.limits.bucket(user, direction, now)
                if bucket is not None:
                    waits[i] = bucket.charge(value - moved[i], now)
                moved[i] = value
            want = [w > 0 for w in waits]
            if want != paused:
                paused[:] = want
                pause(*want)
            wait = max(waits)
            timer[:] = [self.reactor.callLater(
                max(min(wait, 1.0), SPLICE_POLL) if wait > 0 else SPLICE_POLL, tick)]

        def stop() -> None:
            for t in timer:
                if t.active():
                    t.cancel()
            timer.clear()

        timer.append(self.reactor.callLater(SPLICE_POLL, tick))
        return stop

    def status(self, connections: Iterable[Any] = ()) -> dict[str, Any]:
        """Weights and limits in force, with each limited user's credit left, and the
        bytes waiting per user on each congested agent link of ``connections``."""
        now = self.reactor.seconds()
        out: dict[str, Any] = {"shares": dict(sorted(self._weights.items())),
                               "rate_limits": self.limits.status(now)}
        if connections:
            out["queued"] = {c.principal_name: c.queueStatus() for c in connections
                             if c.identity.kind == "agent" and c.queueStatus()}
        return out


class _Held:
    """The sources of one bridge paused for a rate limit, and their timers."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._timers: dict[int, tuple[Any, IDelayedCall]] = {}

    def charge(self, src: Any, bucket: TokenBucket, nbytes: int) -> None:
        wait = bucket.charge(nbytes, self.reactor.seconds())
        if wait > 0 and id(src) not in self._timers:
            src.pauseReading(RATE)
            self._timers[id(src)] = (src, self.reactor.callLater(
                wait, self._due, src, bucket))

    def _due(self, src: Any, bucket: TokenBucket) -> None:
        wait = bucket.wait(self.reactor.seconds())
        if wait > 0:  # other sessions of the user spent the credit meanwhile
            self._timers[id(src)] = (src, self.reactor.callLater(wait, self._due, src, bucket))
            return
        del self._timers[id(src)]
        src.resumeReading(RATE)

    def release(self) -> None:
        """The bridge ended: cancel the timers."""
        for _src, timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
