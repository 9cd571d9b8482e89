"""How fast the agent redials its fast-path pool: :class:`RefillBudget` (a token
bucket) and :class:`BurstLog` (one log line per burst of failures), so that someone
who closes or garbles the agent's data connections costs a bounded rate of dials and
log lines (docs/fastpath.md)."""

from __future__ import annotations

from typing import Any

from relay.core.burstlog import BurstLog

__all__ = ["REFILL_WINDOW", "BurstLog", "RefillBudget"]

REFILL_WINDOW = 5.0  # failed pool connections are replaced at most pool-size per window


class RefillBudget:
    """A token bucket for dialling pool connections: ``capacity`` dials at once, then
    ``capacity`` per ``window`` seconds.  Dials that replace a connection the relay
    validly dispatched do not spend from it (a burst of real sessions refills at
    once); every other dial does, so someone who closes or garbles the agent's data
    connections makes it redial at a bounded rate, not in a loop.  Sans-IO."""

    def __init__(self, clock: Any, capacity: int, window: float = REFILL_WINDOW) -> None:
        self.clock = clock
        self.capacity = float(max(1, capacity))
        self.rate = self.capacity / window
        self.tokens = self.capacity
        self._at = clock.seconds()

    def _update(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Spend one dial if there is one."""
        self._update()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next dial may be spent."""
        self._update()
        return max(0.0, (1.0 - self.tokens) / self.rate)
