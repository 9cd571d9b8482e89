"""The grant files polled on the reactor's clock (part of :mod:`relay.server.grants`)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relay.server.grants import Grants

_log = Logger()


class GrantsWatcher:
    """Polls the grant files on the reactor's clock, so a change takes effect without
    waiting for a lookup: within two intervals of the file settling (one to notice,
    one to see it stayed the same).  Polling rather than inotify: two ``stat`` calls
    per interval cost nothing, and it sees every way a file can change (rename over
    it, a bind mount, NFS, a config-management tool) the same way."""

    def __init__(self, grants: Grants, clock: Any, interval: float) -> None:
        self.grants = grants
        self.interval = interval
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock

    def start(self) -> None:
        if self.grants.watched and not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _poll(self) -> None:
        try:
            self.grants.poll()
        except Exception:  # a LoopingCall that raises stops: keep watching
            _log.failure("polling the grant files", event="grants_poll_failed")
