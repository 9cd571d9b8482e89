"""Joining two connections on the data path, and counting what they carry.

:func:`join` is the one place a session's two ends are handed to the splice path:
a plain hop's client and target, the agent's pooled data connection and its
target, the relay's user and agent data connections, and ``labrelay connect``'s
stdin/stdout and its data connection.  An end is either a connection that read its
preface and waits, paused (a :class:`Handed`, usually a
:class:`relay.datapath.handoff.Handoff`: its transport and the bytes it read past
the preface), or a pair of file descriptors (:class:`End`).

Whoever counts the session gives :func:`join` its :class:`PairCounters`: they hear
when the pair starts (to read its live bytes, or abort it) and when it ends (the
final counts, or the failure).  :class:`SessionCounters` is the one per-forward
shape (sessions open, sessions since start, bytes each way, live pairs included);
the relay counts a fast-path session in its ``SessionTable`` row instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.python.failure import Failure

from relay.datapath.handoff import detach_transport
from relay.datapath.pymover import End, _reset_and_close
from relay.datapath.splicing import DataPath, PairResult, SplicedPair


class Handed(Protocol):
    """A connection waiting, paused, for the data path: its Twisted transport and the
    bytes read from it past its preface (they go to the other end first)."""

    @property
    def transport(self) -> Any: ...

    @property
    def extra(self) -> bytes: ...


class PairCounters(Protocol):
    """Who counts a joined pair."""

    def pairStarted(self, pair: SplicedPair) -> None:
        """The pair moves bytes now (``pair.bytes()`` reads them; ``pair.abort()``
        stops it)."""

    def pairEnded(self, pair: SplicedPair, result: PairResult | Failure) -> None:
        """The pair ended: ``pair.bytes()`` is final; ``result`` is how."""


class SessionCounters:
    """Sessions and bytes of one forward (or of the agent's whole pool): the shape
    ``status`` shows per forward.  ``bytes_in`` is toward the target, ``bytes_out`` back.

    Counts bridged sessions (:meth:`opened`/:meth:`closed`) and joined pairs (as
    :class:`PairCounters`; a live pair's bytes are included in :meth:`as_dict`)."""

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.bytes_in = 0  # toward the target
        self.bytes_out = 0  # back to the client
        self.pairs: set[SplicedPair] = set()

    def opened(self) -> None:
        self.active += 1
        self.total += 1

    def closed(self, to_target: int, from_target: int) -> None:
        self.active -= 1
        self.bytes_in += to_target
        self.bytes_out += from_target

    def pairStarted(self, pair: SplicedPair) -> None:
        self.pairs.add(pair)
        self.opened()

    def pairEnded(self, pair: SplicedPair, result: PairResult | Failure) -> None:
        self.pairs.discard(pair)
        moved = pair.bytes()
        self.closed(moved.a_to_b, moved.b_to_a)

    def as_dict(self) -> dict[str, int]:
        live = [p.bytes() for p in list(self.pairs)]
        return {
            "sessions_active": self.active,
            "sessions_total": self.total,
            "bytes_to_target": self.bytes_in + sum(b.a_to_b for b in live),
            "bytes_from_target": self.bytes_out + sum(b.b_to_a for b in live),
        }


class OnEnd:
    """:class:`PairCounters` that only calls ``ended(pair, result)`` (a log line)."""

    def __init__(self, ended: Callable[[SplicedPair, PairResult | Failure], object]) -> None:
        self._ended = ended

    def pairStarted(self, pair: SplicedPair) -> None:
        pass

    def pairEnded(self, pair: SplicedPair, result: PairResult | Failure) -> None:
        self._ended(pair, result)


def join(datapath: DataPath, a: Handed | End, b: Handed | End,
         counters: Iterable[PairCounters] = (), *, to_a: bytes = b"",
         to_b: bytes = b"") -> SplicedPair:
    """Splice ``a`` and ``b``: the data path owns both from here on.

    Bytes go in this order: what ``b``'s transport had not sent yet, then ``to_b``,
    then what was read from ``a`` past its preface (``a.extra``), then the stream;
    likewise the other way.  ``counters`` hear that the pair started and, when it
    ends, how; with any, the outcome of ``pair.done`` is theirs (it is consumed), else
    the caller's.  Raises ``OSError``/``TypeError`` if the ends cannot be taken (the
    transports not yet taken are still the caller's to close)."""
    from_a = to_b + (b"" if isinstance(a, End) else a.extra)
    from_b = to_a + (b"" if isinstance(b, End) else b.extra)
    if isinstance(a, End) or isinstance(b, End):
        pair = _join_ends(datapath, a, b, from_a, from_b)
    else:
        pair = datapath.splice_transports(a.transport, b.transport, from_a=from_a,
                                          from_b=from_b)
    counting = list(counters)
    for c in counting:
        c.pairStarted(pair)
    if counting:

        def ended(result: PairResult | Failure) -> None:
            for c in counting:
                c.pairEnded(pair, result)

        pair.done.addBoth(ended)
    return pair


def _join_ends(datapath: DataPath, a: Handed | End, b: Handed | End, from_a: bytes,
               from_b: bytes) -> SplicedPair:
    """:func:`join` where one end (or both) is file descriptors."""
    if isinstance(a, End) and isinstance(b, End):
        return datapath.splice(a, b, from_a=from_a, from_b=from_b)
    if isinstance(a, End):
        assert not isinstance(b, End)
        fd, unsent = detach_transport(b.transport)
        ends, from_a = (a, End(fd, fd)), unsent + from_a
    else:
        assert isinstance(b, End)
        fd, unsent = detach_transport(a.transport)
        ends, from_b = (End(fd, fd), b), unsent + from_b
    try:
        return datapath.splice(*ends, from_a=from_a, from_b=from_b)
    except BaseException:
        _reset_and_close(fd, True)
        raise
