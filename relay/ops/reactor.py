"""Which reactor a process labrelay owns runs: :class:`relay.ops.leanepoll.LeanEPollReactor`
where it can still be chosen and the system has epoll, otherwise the one already
installed or Twisted's default.

Only the entry points of processes labrelay owns call :func:`install` (``labrelay
relay|agent|run|demo|connect``, ``twistd labrelay``), before anything imports
``twisted.internet.reactor``.  This module imports nothing of epoll itself: on a Mac
(``labrelay connect`` on the user's laptop) Twisted's epoll module cannot even be
imported, and the user's end must run there unchanged.
"""

from __future__ import annotations

import select
import sys

REACTOR_MODULE = "twisted.internet.reactor"


def install() -> str:
    """Make :class:`LeanEPollReactor` the process's reactor if it can still be chosen.

    Returns the class name of the reactor the process will run, for its start-up
    event: ``LeanEPollReactor`` when installed here, otherwise the reactor already
    installed, or ``"default"`` when there is no epoll and Twisted will choose."""
    installed = sys.modules.get(REACTOR_MODULE)
    if installed is not None:
        return type(installed).__name__
    if not hasattr(select, "epoll"):
        return "default"
    from twisted.internet.main import installReactor

    from relay.ops.leanepoll import LeanEPollReactor

    installReactor(LeanEPollReactor())
    return LeanEPollReactor.__name__

