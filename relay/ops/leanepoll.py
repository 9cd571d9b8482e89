"""The reactor labrelay's own processes run: Twisted's epoll reactor, one layer lighter
per event.

Why: Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to
``twisted.python.log.callWithLogger``, which asks the descriptor for its
``logPrefix()``, copies the legacy log context twice and pushes it on a context stack,
so that ``twisted.python.log.msg`` calls made while the event is handled carry a
``system`` field.  labrelay logs with :mod:`twisted.logger`, whose events never read
that context, and its log observers (:mod:`relay.ops.logfmt`) do not print it.  The
wrapping is pure overhead, paid on every turn of the loop, and it is paid cold on a
new session's set-up after the process slept: measured with ``bench/setup_ab.py``
(alternating rounds, 50 ms idle before each session), the set-up p50 through relay and
agent is 3–4 % lower without it and each process spends 4–7 % less CPU per session
(docs/benchmarks.md, "Round 12").

What stays exactly Twisted's: the poller, the registration of readers and writers,
``_doReadOrWrite`` (which already catches and logs a failing ``doRead``/``doWrite``
and disconnects that descriptor), timers, threads, signals and shutdown.  What the
wrapper also did, catching an exception that escapes ``_doReadOrWrite`` (one raised
by a protocol's ``connectionLost`` during the disconnect) so the rest of the poll's
events are still handled, is kept: such an exception is logged with
:mod:`twisted.logger` and the loop goes on to the next descriptor.

:func:`relay.ops.reactor.install` makes it the process's reactor where it can still be
chosen.  This module imports Twisted's epoll reactor, which cannot even be imported
where there is no epoll (macOS, the BSDs): only ``install`` imports it, after checking.
"""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

_log = Logger()


class LeanEPollReactor(EPollReactor):
    """:class:`EPollReactor` whose poll hands each event straight to
    ``_doReadOrWrite``, without the legacy log context (see the module's docstring).

    It also counts its turns (:attr:`turns`, one per return from the poll), so that
    code that budgets per turn (relay.datapath.net.TurnBudget) can tell a new turn
    by reading a number instead of scheduling a ``callLater(0)`` in every turn it
    writes."""

    turns: int = 0
    """Returns from the poll so far: what is done between two of them is one turn."""

    def doPoll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (``None``: until an event) and handle what is
        ready, as ``EPollReactor.doPoll`` does, minus ``callWithLogger``."""
        if timeout is None:
            timeout = -1  # wait until an event
        try:
            # At most as many events as descriptors tracked, as Twisted's does.
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        self.turns += 1
        dispatch = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:  # removed by an earlier event's handler in this poll
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                _log.failure("while handling an event on {selectable!r}",
                             selectable=selectable)

    doIteration = doPoll
