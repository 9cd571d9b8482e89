"""One log line per burst of failures (:class:`BurstLog`): the first failure at once,
then how many more there were once the window passed.  The agent's fast-path pool
(relay.agent.refill) and the relay's accept watch (relay.server.acceptwatch) use it,
so that a flood of failures costs a bounded rate of log lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BurstLog:
    """Logs the first failure of a burst, then only how many more there were once
    ``window`` seconds passed: an attacker who kills every data connection costs one
    log line per window, not one per connection.  Sans-IO but for the timer."""

    def __init__(self, clock: Any, window: float, first: Callable[[str], None],
                 more: Callable[[int, str], None]) -> None:
        self.clock = clock
        self.window = window
        self.first = first
        self.more = more
        self.count = 0
        self.last = ""
        self._timer: Any = None  # the clock's IDelayedCall

    def failed(self, why: str) -> None:
        self.last = why
        if self._timer is None:
            self.first(why)
            self.count = 0
            self._timer = self.clock.callLater(self.window, self._end)
        else:
            self.count += 1

    def _end(self) -> None:
        self._timer = None
        if self.count:
            self.more(self.count, self.last)
        self.count = 0

    def stop(self) -> None:
        """End the burst now (saying how many more there were)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._end()
        self._timer = None
