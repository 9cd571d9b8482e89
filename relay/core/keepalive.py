"""Dead-link detection with SSH keepalives (OpenSSH's ServerAliveInterval/CountMax).

While the link is silent, a ``keepalive@openssh.com`` global request (want
reply) goes out every ``interval`` seconds.  Any packet from the peer — a reply
(OpenSSH answers with REQUEST_FAILURE, which counts), data, anything — proves it
alive.  As in OpenSSH, the link is declared dead once ``count_max`` keepalives in
a row went unanswered, each given ``interval`` seconds to be answered: after
``interval × (count_max + 1)`` seconds of silence.  So a silently cut path (no
FIN, no RST) is detected in bounded time instead of after TCP's retransmission
timeout of ~15 minutes, and even ``count_max = 1`` probes before giving up.

Silence counts only the time this process ran.  A process that did not run for a
while (SIGSTOP and SIGCONT, a paused VM, a swapped-out or suspended machine, a clock
stepped forward) finds its timer due long ago when it runs again; the peer could not
have answered a keepalive that was never sent, and what it did send may still be
waiting unread in the socket.  Judging the link by that silence declared every
healthy peer dead at once on waking (a relay frozen for 12 s closed all its users'
connections and the agent's).  So a tick that runs more than an ``interval`` late
(no busy reactor is that late; a stopped process is) does not count its lateness as
the peer's silence: the next keepalive goes out and the peer gets the rest of its
``interval × (count_max + 1)`` in this process's running time, as OpenSSH's count of
unanswered keepalives does.  A dead peer is still found, that much later.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.core.clock import Clock, Timer


class KeepaliveMonitor:
    """Schedules keepalives and declares the link dead; owns no I/O.

    ``send`` sends one keepalive; ``on_dead(silence)`` is called once, with the
    seconds of silence, when the limit is crossed.  Call :meth:`activity` for
    every packet received.
    """

    def __init__(
        self,
        clock: Clock,
        interval: float,
        count_max: int,
        send: Callable[[], object],
        on_dead: Callable[[float], object],
    ) -> None:
        self._clock = clock
        self.interval = interval
        self.count_max = count_max
        self._send = send
        self._on_dead = on_dead
        self.last_activity = clock.seconds()
        self.sent = 0
        self._timer: Timer | None = None
        self._due = 0.0  # when the pending tick should run
        self._dead = False

    @property
    def limit(self) -> float:
        """Seconds of silence after which the link is dead."""
        return self.interval * (self.count_max + 1)

    def start(self) -> None:
        self.stop()
        if self.interval > 0:
            self.last_activity = self._clock.seconds()
            self._schedule(self.interval)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def activity(self) -> None:
        self.last_activity = self._clock.seconds()
        self.sent = 0

    def _schedule(self, delay: float) -> None:
        delay = max(delay, 0.0)
        self._due = self._clock.seconds() + delay
        self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        late = now - self._due
        if late > self.interval:  # this process was not running: not the peer's silence
            self.last_activity = min(now, self.last_activity + late)
        silence = now - self.last_activity
        if silence >= self.limit:
            self._dead = True
            self._on_dead(silence)
            return
        if self.sent < self.count_max and silence >= self.interval * (self.sent + 1) - 1e-9:
            self.sent += 1
            self._send()
        next_keepalive = self.last_activity + self.interval * (self.sent + 1)
        deadline = self.last_activity + self.limit
        self._schedule(min(next_keepalive, deadline) - now)
