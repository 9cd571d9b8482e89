"""Time, as the sans-IO core is given it.

The core never imports the reactor: whoever builds a core object passes its clock in
(the reactor in production, ``twisted.internet.task.Clock`` in tests).  These are the
only parts of ``IReactorTime`` and ``IDelayedCall`` the core uses.  :func:`expire` is
the one timeout of a wait that the I/O shells around the core share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar


class Timer(Protocol):
    """A pending call (``IDelayedCall``)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The current time and delayed calls (``IReactorTime``)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> Any: ...


E = TypeVar("E", bound="Expirable")


class Expirable(Protocol):
    """A ``Deferred``, as far as :func:`expire` uses it."""

    def addTimeout(self, timeout: float, clock: Any,
                   onTimeoutCancel: Callable[[Any, float], Any] | None = None) -> Any: ...


def _still_cancelled(result: Any, timeout: float) -> Any:
    return result


def expire(d: E, seconds: float, clock: Clock) -> E:
    """``d.addTimeout(seconds, clock)``, except that a timed-out ``d`` fails with the
    ``CancelledError`` of its cancellation, not ``TimeoutError``: the callers of the
    relay's waits (a service coming back, a free data connection, an agent's answer)
    tell "it ran out of time" by ``CancelledError``.  The timer is cancelled as soon as
    ``d`` fires, however it fires."""
    d.addTimeout(seconds, clock, onTimeoutCancel=_still_cancelled)
    return d
