"""Sessions waiting for a service whose agent is away, and handing them its registration.

A user's session or a public port's connection that arrives while its agent is away
waits up to ``public_wait`` seconds (a waiter of :class:`relay.core.router.Router`).
When the agent registers again, the waiters are handed the registration only once the
reply to its ``tcpip-forward`` was sent (:meth:`relay.ssh.server.RelayConnection.whenReplied`):
a ``forwarded-tcpip`` that overtook the reply was refused by the labrelay agent as "no
such forward", since it did not hold the forward as registered yet.  If the agent goes
again before its reply, they wait on for the next registration.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from relay.core.clock import expire
from relay.core.router import Router, Waiter, label_of
from relay.core.routing import Registration, ServiceRegistry


class Waiting:
    """The relay's waiters for absent agents (its shell over the router's waiters)."""

    _log = Logger()

    def __init__(self, registry: ServiceRegistry, router: Router, reactor: Any) -> None:
        self.registry = registry
        self.router = router
        self.reactor = reactor
        # Registrations whose tcpip-forward reply is not sent yet: not handed out.
        self._announcing: dict[tuple[str, int], Registration] = {}
        # The session rows waiting now, with what for: a grants reload that takes the
        # service away (or the user's grant) ends their wait at once (cancel).
        self._rows: dict[object, tuple[str, int, defer.Deferred[Registration]]] = {}

    def ready(self, name: str, port: int) -> Registration | None:
        """``name:port``'s registration if :meth:`whenRegistered` would hand it out now
        (its agent holds it and knows it does), else None."""
        reg = self.registry.lookup(name, port)
        return reg if reg is not None and (name, port) not in self._announcing else None

    def whenRegistered(self, name: str, port: int, timeout: float,
                       row: object = None) -> defer.Deferred[Registration]:
        """``name:port``'s registration once its agent knows it holds it, waiting up to
        ``timeout`` seconds for its agent (CancelledError after that, or when
        :meth:`cancel` is called for ``row``)."""
        reg = self.registry.lookup(name, port)
        if reg is not None and (name, port) not in self._announcing:
            return defer.succeed(reg)
        d: defer.Deferred[Registration] = defer.Deferred()
        waiter = self.router.wait(name, port, d, self.reactor.seconds(), timeout)
        self._log.info("a session waits up to {timeout:g}s for {service}: its agent is away",
                       event="relay_session_waiting", service=label_of(name, port),
                       timeout=timeout)
        def done(result: Any) -> Any:
            self.router.unwait(waiter)
            if row is not None and self._rows.get(row, (None, None, None))[2] is d:
                del self._rows[row]
            return result

        if row is not None:
            self._rows[row] = (name, port, d)
        return expire(d, timeout, self.reactor).addBoth(done)

    def waits(self) -> list[tuple[Any, str, int]]:
        """``(row, name, port)`` of every session row waiting now."""
        return [(row, name, port) for row, (name, port, _) in self._rows.items()]

    def cancel(self, row: object) -> bool:
        """End ``row``'s wait now (it fails with CancelledError); False if it waits not."""
        entry = self._rows.pop(row, None)
        if entry is None:
            return False
        entry[2].cancel()
        return True

    def registered(self, reg: Registration, woken: list[Waiter],
                   replied: defer.Deferred[None]) -> None:
        """``reg`` was granted; ``woken`` waited for it; ``replied`` fires once the
        agent was told (fails if its connection stopped first)."""
        if not replied.called:
            key = (reg.name, reg.port)
            self._announcing[key] = reg

            def announced(result: object) -> object:
                if self._announcing.get(key) is reg:
                    del self._announcing[key]
                return result

            replied.addBoth(announced)
        replied.addCallbacks(lambda _: self._wake(reg, woken), lambda _: self._waitAgain(woken))

    def _wake(self, reg: Registration, woken: list[Waiter]) -> None:
        """Hand ``reg`` to the sessions that waited for it, now that its agent knows it
        holds it; if it went meanwhile (its agent left again), they wait on."""
        if self.registry.lookup(reg.name, reg.port) is not reg:
            self._waitAgain(woken)
            return
        # and those that came while the reply was on its way
        for waiter in woken + self.router.waiting(reg.name, reg.port):
            d: Any = waiter.who
            if not d.called:
                d.callback(reg)

    def _waitAgain(self, woken: list[Waiter]) -> None:
        """The registration that woke ``woken`` is gone before they were served: they
        wait for the next one, until their own time runs out."""
        for waiter in woken:
            d: Any = waiter.who
            if not d.called:
                self.router.requeue(waiter)
