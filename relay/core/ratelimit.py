"""Per-user rate limits: a token bucket per user and direction (sans-IO, time given in).

A user's bytes each way are limited to ``rate`` bytes per second on average, with
bursts of up to ``burst`` bytes.  The shell that moves the bytes cannot refuse
bytes it has already read, so the bucket is charged *after* the fact and may go
into debt: :meth:`TokenBucket.charge` answers how long the user's sources must
stay paused for the debt to be paid back.  Over any interval the bytes moved are at
most ``burst + rate * seconds`` plus one read's worth, and a source paused exactly
that long keeps the long-run rate at ``rate``.

Every session of a user draws on the same bucket (one per direction), channel and
spliced sessions alike: :class:`UserLimits` hands out the buckets by user name and
keeps them while sessions use them, so a reload that changes a rate applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass

UP = "to_service"
DOWN = "from_service"


class TokenBucket:
    """``rate`` bytes/s with ``burst`` bytes of credit; charged after bytes moved."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(max(burst, 1.0))
        self.tokens = self.burst
        self._at = now
        self.charged = 0  # bytes charged in all (for status)

    def configure(self, rate: float, burst: float, now: float) -> None:
        """A new rate and burst (a reload); the credit kept is capped at the new burst."""
        self._refill(now)
        self.rate = float(rate)
        self.burst = float(max(burst, 1.0))
        self.tokens = min(self.tokens, self.burst)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def charge(self, nbytes: int, now: float) -> float:
        """Take ``nbytes``; the seconds the sources must now wait (0: none)."""
        self._refill(now)
        self.tokens -= nbytes
        self.charged += nbytes
        return self.wait(now)

    def wait(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 if it is not in debt)."""
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def available(self, now: float) -> float:
        """Bytes that may move now without debt."""
        self._refill(now)
        return max(self.tokens, 0.0)


@dataclass(frozen=True)
class Limit:
    """A user's limit: bytes/s each way and the burst (0 burst: one second's worth)."""

    rate: float
    burst: float = 0.0

    @property
    def bucket_size(self) -> float:
        return self.burst if self.burst > 0 else self.rate


class UserLimits:
    """The buckets of every limited user, two each (to and from the service)."""

    def __init__(self) -> None:
        self._limits: dict[str, Limit] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def set_limits(self, limits: dict[str, Limit], now: float) -> None:
        """The limits in force now (from the config; again after a reload).  A user
        whose limit changed keeps its buckets with the new rate; one no longer limited
        loses them."""
        self._limits = dict(limits)
        for (user, direction), bucket in list(self._buckets.items()):
            limit = self._limits.get(user)
            if limit is None:
                del self._buckets[(user, direction)]
            else:
                bucket.configure(limit.rate, limit.bucket_size, now)

    def limit(self, user: str) -> Limit | None:
        return self._limits.get(user)

    def bucket(self, user: str, direction: str, now: float) -> TokenBucket | None:
        """``user``'s bucket for ``direction`` (``UP`` or ``DOWN``), None if unlimited."""
        limit = self._limits.get(user)
        if limit is None:
            return None
        key = (user, direction)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit.rate, limit.bucket_size, now)
        return bucket

    def status(self, now: float) -> dict[str, dict[str, float]]:
        """Per limited user: rate, burst and the credit left each way."""
        out: dict[str, dict[str, float]] = {}
        for user, limit in sorted(self._limits.items()):
            entry = {"rate": limit.rate, "burst": limit.bucket_size}
            for direction in (UP, DOWN):
                bucket = self._buckets.get((user, direction))
                entry[f"credit_{direction}"] = round(
                    bucket.available(now) if bucket is not None else limit.bucket_size)
            out[user] = entry
        return out
