"""SIGHUP before the node's service exists: noted, not fatal.

Why: SIGHUP's default action ends the process.  The node installs its reload handler
when its service is built (:class:`relay.ops.service.NodeService`), but a process spends
its first fraction of a second importing Twisted and reading its config, and ``kill
-HUP`` from logrotate, a deploy script or an operator who just edited the grants may come
then: it used to end a relay that had printed nothing yet, or, under ``labrelay``, one
that had already logged "started" but whose service was not up.  This handler, installed
first thing by ``labrelay agent|relay|run`` and ``twistd labrelay``, only notes the
signal; the node takes over the signal when it is built and, if one came, reloads once
its reactor runs (the config it read may be older than the change the signal was for).
"""

from __future__ import annotations

import signal
from typing import Any


class HangupBeforeStart:
    """Notes a SIGHUP that arrives before the node's own handler is installed."""

    def __init__(self) -> None:
        self.pending = False

    def install(self) -> None:
        """Take SIGHUP now (the main thread only, as for every Python signal handler)."""
        signal.signal(signal.SIGHUP, self._noted)

    def _noted(self, signum: int, frame: Any) -> None:
        self.pending = True
