"""sd_notify: tell systemd when labrelay is ready, reloading, and still alive.

With ``Type=notify`` systemd waits for ``READY=1`` before it counts the service as
started (and starts what is ordered after it); ``RELOADING=1`` (with
``MONOTONIC_USEC``, as systemd 253's ``Type=notify-reload`` wants) then ``READY=1``
bracket a reload; ``WATCHDOG=1`` every half ``WatchdogSec=`` proves the reactor still
turns.  ``STATUS=`` is what ``systemctl status`` shows.  Without ``$NOTIFY_SOCKET``
(not under systemd) every call does nothing.

The protocol is one datagram per message on the AF_UNIX socket systemd names (a
leading ``@`` is the abstract namespace); no library needed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger(namespace="labrelay.notify")


class SystemdNotifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; a no-op without it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if watchdog else None
        self._watchdog: LoopingCall | None = None
        self.sent: list[str] = []

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), self.address)
        except OSError as e:
            _log.warn("sd_notify to {address} failed: {why}", event="notify_failed",
                      address=self.address, why=str(e))
            return
        self.sent.append(message)

    def ready(self, status: str = "running") -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    def start_watchdog(self, clock: Any) -> None:
        """Ping every half ``WatchdogSec=`` on ``clock`` while the reactor runs."""
        if self.watchdog_interval is None or not self.address or self._watchdog is not None:
            return
        self._watchdog = LoopingCall(self.send, "WATCHDOG=1")
        self._watchdog.clock = clock
        self._watchdog.start(self.watchdog_interval, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
