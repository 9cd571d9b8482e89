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


class PerKeyLog:
    """Per key (a user): the first ``allowance`` events of each ``window`` seconds are
    logged in full (:meth:`allow` says True), the rest only counted, and ``more``
    says how many there were once the window ends.  A user who asks for what she is
    not granted in a loop (2 600 refused opens a second from one paramiko client)
    costs ``allowance`` + 1 lines per window, not one per request; an honest user's
    few refusals are logged as before.  Memory: one entry per key with events in
    its current window.  Sans-IO but for the timer."""

    def __init__(self, clock: Any, window: float, allowance: int,
                 more: Callable[[str, int, str], None]) -> None:
        self.clock = clock
        self.window = window
        self.allowance = allowance
        self.more = more
        # key -> [events this window, events not logged, the last one's text, timer]
        self._windows: dict[str, list[Any]] = {}

    def allow(self, key: str, why: str) -> bool:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = [0, 0, "", self.clock.callLater(self.window, self._end, key)]
        w[0] += 1
        if w[0] <= self.allowance:
            return True
        w[1] += 1
        w[2] = why
        return False

    def _end(self, key: str) -> None:
        w = self._windows.pop(key, None)
        if w is not None and w[1]:
            self.more(key, w[1], w[2])

    def stop(self) -> None:
        """End every window now (saying how many more each had), cancelling its timer."""
        for key in list(self._windows):
            timer = self._windows[key][3]
            if timer.active():
                timer.cancel()
            self._end(key)
