"""Time, as the sans-IO core is given it.

The core never imports the reactor: whoever builds a core object passes its clock in
(the reactor in production, ``twisted.internet.task.Clock`` in tests).  These are the
only parts of ``IReactorTime`` and ``IDelayedCall`` the core uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Timer(Protocol):
    """A pending call (``IDelayedCall``)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The current time and delayed calls (``IReactorTime``)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> Any: ...
