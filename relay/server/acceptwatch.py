"""Says when the relay's listeners cannot accept connections (out of descriptors).

Twisted's ``tcp.Port.doRead`` handles a failed ``accept()`` itself: on ``EMFILE`` it
frees a reserved descriptor, accepts and closes every waiting connection, and on
``ENFILE``/``ENOBUFS``/``ENOMEM`` it leaves them queued.  Either way it only logs at
info level without an ``event`` field, which the relay's log hides as library
chatter, so a relay at its descriptor limit was silent while its users were told
about login penalties.  Twisted's own log events are the hook (no subclass of
``Port`` at every ``listenTCP``, no patched globals): :class:`AcceptWatch` observes
them for every listener of the process (SSH, data, TLS, public, admin ports), logs
``relay_accept_failed`` once per burst with a count (:class:`BurstLog`), and
counts them (``accept_failed`` in the status, ``labrelay_relay_accept_failed_total``).

Twisted's event does not say which listener failed (its accept loop logs through a
fresh ``Logger`` with no source), and which one it was tells the operator whose
connections were lost: users on the SSH or TLS port, a forwarded public port's
clients, agents' data connections, or a scraper on the admin endpoint.  Each
listener is named once it listens (:func:`name_listener`): its port's ``_logger``
(the one Twisted's ``Port.doRead`` takes the namespace and observer of) becomes one
whose observer adds ``listener`` and ``listener_port`` to the event.  That is a private
attribute of ``twisted.internet.tcp.Port``: where it is missing (another reactor's
port, a later Twisted) the line says ``an unnamed listener`` and nothing else
changes; tests/unit/test_acceptwatch.py fails if a real port stops being named.

:func:`accept_failure` is the sans-IO part: which Twisted events are a lost
connection, and for which errno.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from relay.core.burstlog import BurstLog

BURST_WINDOW = 10.0
"""Seconds one ``relay_accept_failed`` line stands for; the next one says how many more."""

_COULD_NOT_ACCEPT = "Could not accept new connection ({acceptError})"
"""Twisted's event for an accept that failed, connection left queued (ENFILE …)."""
_EMFILE_CLOSED = "EMFILE recovery: Closed socket from {address}"
"""Twisted's event for a connection it accepted on its reserved descriptor and closed."""
_HARMLESS = {"ECONNABORTED"}
"""A client that reset before its accept: nothing the operator can fix."""
UNNAMED = "an unnamed listener"
"""What the line says when the failed accept's port was not named (:func:`name_listener`)."""


@implementer(ILogObserver)
class _NamingObserver:
    """Passes a port's log events on with which listener it is."""

    def __init__(self, observer: Any, listener: str, port: int) -> None:
        self.observer = observer
        self.listener = listener
        self.port = port

    def __call__(self, event: dict[str, Any]) -> None:
        self.observer({**event, "listener": self.listener, "listener_port": self.port})


LISTENERS = ("SSH", "TLS", "public", "data", "admin")
"""The relay process's kinds of listener, as ``relay_accept_failed`` names them."""


def name_listener(port: Any, listener: str) -> bool:
    """Name a listening port (one of :data:`LISTENERS`) so that a failed accept on it
    says so.  False if the port has no Twisted ``_logger`` to name (see the module's
    docstring)."""
    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger):
        return False
    try:
        number = int(port.getHost().port)
    except Exception:
        number = 0
    port._logger = Logger(namespace=logger.namespace, source=port,
                          observer=_NamingObserver(logger.observer, listener, number))
    return True


def where(event: dict[str, Any]) -> str:
    """The listener an event came from in words: ``the public port 8080``."""
    listener = event.get("listener")
    if not listener:
        return UNNAMED
    return f"the {listener} port {event.get('listener_port', '?')}"


def accept_failure(event: dict[str, Any]) -> str | None:
    """The errno name (``EMFILE``) if ``event`` is Twisted's word that a listener
    lost a connection it could not accept, else None."""
    if not str(event.get("log_namespace", "")).startswith("twisted."):
        return None
    fmt = event.get("log_format")
    if fmt == _EMFILE_CLOSED:
        return "EMFILE"
    if fmt == _COULD_NOT_ACCEPT:
        name = str(event.get("acceptError", ""))
        return None if name in _HARMLESS else name
    return None


def describe(name: str) -> str:
    """``EMFILE`` as words: ``Too many open files (EMFILE)``."""
    code = getattr(errno, name, None)
    words = os.strerror(code) if isinstance(code, int) else "accept failed"
    return f"{words} ({name})"


@implementer(ILogObserver)
class AcceptWatch:
    """A log observer for Twisted's accept failures; add it to the log publisher while
    the relay runs (:meth:`RelayService.startService`)."""

    _log = Logger()

    def __init__(self, clock: Any, counters: dict[str, int], window: float = BURST_WINDOW
                 ) -> None:
        self.counters = counters
        self._burst = BurstLog(clock, window, self._first, self._more)

    def __call__(self, event: dict[str, Any]) -> None:
        name = accept_failure(event)
        if name is None:
            return
        self.counters["accept_failed"] = self.counters.get("accept_failed", 0) + 1
        self._where = (str(event.get("listener") or ""), int(event.get("listener_port") or 0))
        self._burst.failed(name)

    _where = ("", 0)
    """The kind and port number of the listener that failed last (``""``: unnamed)."""

    def _fields(self) -> dict[str, Any]:
        kind, port = self._where
        text = where({"listener": kind, "listener_port": port})
        return {"listener": kind or None, "listener_port": port or None, "where": text}

    def _first(self, name: str) -> None:
        self._log.error(
            "cannot accept connections on {where}: {why}; connecting users see their connection "
            "closed before the SSH version line, or unanswered. Raise the descriptor limit "
            "(LimitNOFILE= in the systemd unit, ulimit -n) or look for a descriptor leak "
            "(ls /proc/PID/fd)", event="relay_accept_failed", why=describe(name),
            errno=name, count=1, **self._fields())

    def _more(self, count: int, name: str) -> None:
        self._log.error(
            "cannot accept connections: {count} more failed accepts in the last "
            "{window:.0f}s: {why} (the last on {where})",
            event="relay_accept_failed", why=describe(name), errno=name, count=count,
            window=self._burst.window, **self._fields())

    def stop(self) -> None:
        """Say how many more the current burst had, and stop its timer."""
        self._burst.stop()
