"""Who may open a connection: per-source limits and penalties (no I/O).

One abusive host must not lock everyone else out (DESIGN §7).  The relay's SSH port
and its data port each ask a :class:`Gate` at accept time, before a byte is read;
a refused connection is closed at once, which costs the relay one accept and one
close.  Modelled on OpenSSH sshd 9.8+ (``MaxStartups``, ``PerSourceMaxStartups``,
``PerSourceNetBlockSize``, ``PerSourcePenalties``, ``PerSourcePenaltyExemptList``):

- a *source* is the peer's address masked to a network: IPv4 /32 and IPv6 /64 by
  default (one IPv6 host usually owns a whole /64); IPv4-mapped IPv6 addresses count
  as IPv4;
- each gate lets a source hold at most ``per_source_max_unauthenticated``
  connections that have not authenticated (SSH) or sent their hello (data port), and
  everyone together ``max_unauthenticated`` (the last line; checked, as sshd does,
  after the penalty and before the per-source cap, which only changes the reason);
- a connection that ends badly earns its source a penalty (:class:`Offence`); the
  seconds add up, capped at ``max``; once a source's penalty left exceeds ``min`` it
  is *active* and every new connection from that source is refused until it runs
  out.  Penalties are shared by both ports: a host that guesses tokens at the data
  port is also refused at the SSH port;
- when the global cap is full, a connection from a source that would hold, with it,
  *fewer* places than the source holding the most is not refused: the oldest
  unauthenticated connection of the source holding the most places (ties: the one
  whose oldest connection is oldest) is *evicted* to make room (the gate picks it,
  :attr:`Ticket.displaced`; the server closes it; it earns no penalty).  A few hosts
  holding every place (7 x 10 idle sockets) no longer lock a new source out until
  ``login_grace``; a source holding the most (or one less) evicts nobody, so a crowd
  cannot trade places among itself for ever (:meth:`Gate._victim`).  sshd has no such
  rule (its MaxStartups drops the newcomer); an attacker with as many sources as
  places, one each, still keeps others out;
- when the global cap is full and no source nor neighbourhood (below) holds more
  than the newcomer's would, *progress* decides (:meth:`Gate._stalled`,
  ``[relay.crowding]``): every connection is at a :class:`Stage` (``silent``:
  nothing received; ``handshake``: its version line, hello or ClientHello begun, key
  exchange unfinished; ``auth``: keyed, authenticating), and the one at the lowest
  stage that has held its place longest gives way, once it has held it past that
  stage's seconds (``silent`` 2 s, ``handshake`` 10 s, ``auth`` 20 s from accept).
  Its source is charged ``grace-exceeded``: under pressure the login grace shrinks by
  progress, and outliving the shortened grace is the offence it always was.  An attacker with a
  place per source (64 or more sources, an IPv6 /56) no longer keeps newcomers out
  until ``login_grace`` with idle sockets: each would have to finish a key exchange
  (a curve25519 of its own per connection) and start over every ``auth`` seconds,
  and each of its stalled connections that is evicted blocks its source for
  ``grace_exceeded``;
- before progress, when no source holds more than the newcomer's would,
  *neighbourhoods* decide (:meth:`Gate._neighbour`, ``[relay.crowding]
  netblock4/netblock6``: an IPv4 /24 and an IPv6 /48 by default): a newcomer whose
  neighbourhood would, with it, hold fewer places than the neighbourhood holding the
  most takes the place of that neighbourhood's connection at the lowest stage that was
  admitted first, fresh or not.  Unpenalised unless that one was also stalled past its
  stage's seconds (then ``grace-exceeded``, as above): its source did nothing wrong on
  its own, it only shares a network with many others.  An attacker with one place per
  source who *recycles* each place before it stalls (reconnects every < 2 s, or a
  version line every < 10 s), from one IPv6 /56 or one IPv4 /24, filled every place
  for good; now it holds at most a neighbourhood's fair share and needs as many
  neighbourhoods as places.  Counting the newcomer ends churn as for sources;
- exempt networks are never penalised nor refused for a penalty (the per-source cap,
  the global cap and eviction apply to them as to any source: exemption is about
  penalties, not priority);
- the penalty table holds at most ``max_sources`` sources.  ``permissive`` (the
  default) forgets the penalties that would expire soonest to make room: a flood of
  addresses can shorten other sources' penalties but never locks anyone out.
  ``deny-all`` refuses every source that is not exempt while the table is full.
  Expired penalties are dropped, soonest first, whenever a connection is admitted
  or penalised (a heap by expiry: amortised O(log n), no timer); the table of
  unauthenticated counts only holds sources with a live connection, so it is
  bounded by the global cap.

``clock`` is an ``IReactorTime``: unit tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import heapq
import ipaddress
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from twisted.logger import Logger

from relay.config.schema import CrowdingConfig, PenaltyConfig, RelayConfig


class Offence(Enum):
    """How a connection ended badly (sshd's penalty classes, plus ``protocol``)."""

    AUTHFAIL = "authfail"  # failed authentication; at the data port, a guessed token
    NOAUTH = "noauth"  # closed before authenticating / before its hello
    GRACE = "grace-exceeded"  # still unauthenticated (or without hello) at the deadline
    PROTOCOL = "protocol"  # sent something that is not the protocol


_SEVERITY = (Offence.NOAUTH, Offence.AUTHFAIL, Offence.PROTOCOL, Offence.GRACE)


def eviction_reason(victim: Ticket) -> str:
    """Why ``victim`` was evicted, for the servers' log lines."""
    crowd = (f" in {victim.neighbourhood}, the neighbourhood holding the most places"
             if victim.crowded else "")
    if victim.stalled is not None:
        return (f"stalled at {victim.stalled.name.lower()} past its seconds{crowd} "
                "([relay.crowding])")
    if victim.crowded:
        return f"the oldest at the lowest stage{crowd} ([relay.crowding])"
    return "the source holding the most places"


def worst(a: Offence | None, b: Offence) -> Offence:
    """The worse of two offences of one connection (only one is penalised)."""
    return b if a is None or _SEVERITY.index(b) > _SEVERITY.index(a) else a


class Stage(IntEnum):
    """How far an unauthenticated connection has got (:meth:`Gate.advance`); the lower,
    the sooner it gives way at the full cap (:meth:`Gate._stalled`)."""

    SILENT = 0  # nothing received yet
    HANDSHAKE = 1  # its version line (hello, ClientHello) begun; key exchange unfinished
    AUTH = 2  # key exchange done: authenticating (a passphrase typed, a key touched)


class Refusal(Enum):
    """Why a connection was refused at accept."""

    PENALTY = "penalty"  # its source is penalised
    PER_SOURCE = "per_source_cap"  # its source holds per_source_max_unauthenticated already
    GLOBAL = "global_cap"  # max_unauthenticated connections are authenticating already
    OVERFLOW = "penalty_table_full"  # deny-all and the penalty table is full


@dataclass(eq=False)
class _Penalty:
    expiry: float
    active: bool
    offence: Offence


class Penalties:
    """The penalty table: source -> seconds of penalty left, bounded and expiring."""

    _log = Logger()

    def __init__(self, config: PenaltyConfig, clock: Any) -> None:
        self.config = config
        self.clock = clock
        self._table: dict[str, _Penalty] = {}
        self._heap: list[tuple[float, int, str]] = []  # (expiry, seq, source); stale ok
        self._seq = 0
        self.penalised = {o.value: 0 for o in Offence}  # offences counted, by kind
        self.activated = 0  # times a source's penalty became active
        self.forgotten = 0  # penalties dropped early because the table was full

    def __len__(self) -> int:
        return len(self._table)

    def seconds(self, offence: Offence) -> float:
        return {
            Offence.AUTHFAIL: self.config.authfail,
            Offence.NOAUTH: self.config.noauth,
            Offence.GRACE: self.config.grace_exceeded,
            Offence.PROTOCOL: self.config.protocol,
        }[offence]

    def full(self) -> bool:
        self._expire()
        return len(self._table) >= self.config.max_sources

    def active(self, source: str) -> _Penalty | None:
        """The source's penalty if it is active now (its connections are refused)."""
        self._expire()
        entry = self._table.get(source)
        return entry if entry is not None and entry.active else None

    def left(self, source: str) -> float:
        """Seconds of penalty ``source`` has left (0 if none), active or not."""
        entry = self._table.get(source)
        return max(0.0, entry.expiry - self.clock.seconds()) if entry is not None else 0.0

    def active_count(self) -> int:
        now = self.clock.seconds()
        return sum(1 for p in self._table.values() if p.active and p.expiry > now)

    def penalise(self, source: str, offence: Offence) -> None:
        """Add ``offence``'s seconds to ``source``'s penalty (srclimit_penalise)."""
        secs = self.seconds(offence)
        if not self.config.enabled or secs <= 0:
            return
        self.penalised[offence.value] += 1
        now = self.clock.seconds()
        self._expire()
        entry = self._table.get(source)
        if entry is None:
            if len(self._table) >= self.config.max_sources and self.config.overflow == "deny-all":
                self._log.warn("penalty table full ({n} sources): cannot penalise {source} "
                               "for {offence}", event="relay_penalty_overflow",
                               n=len(self._table), source=source, offence=offence.value)
                return
            entry = self._table[source] = _Penalty(now + min(secs, self.config.max),
                                                   False, offence)
            self._push(source, entry)
            while len(self._table) > self.config.max_sources:  # permissive: as sshd,
                self._forgetSoonest()  # forget whichever expires soonest, maybe this one
            if source not in self._table:
                return
        else:
            entry.expiry = min(entry.expiry + secs, now + self.config.max)
            entry.offence = offence
            self._push(source, entry)
        if not entry.active and entry.expiry - now > self.config.min:
            entry.active = True
            self.activated += 1
            self._log.info("penalising {source} for {seconds:.0f}s (last offence: {offence}); "
                           "its connections are refused until then",
                           event="relay_source_penalised", source=source,
                           seconds=entry.expiry - now, offence=offence.value)

    def _push(self, source: str, entry: _Penalty) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (entry.expiry, self._seq, source))
        if len(self._heap) > 2 * len(self._table) + 64:  # stale entries: rebuild
            self._heap = [(p.expiry, i, s) for i, (s, p) in enumerate(self._table.items())]
            heapq.heapify(self._heap)

    def _pop(self) -> tuple[str, _Penalty] | None:
        """The live entry expiring soonest, without removing it from the table."""
        while self._heap:
            expiry, _, source = self._heap[0]
            entry = self._table.get(source)
            if entry is not None and entry.expiry == expiry:
                return source, entry
            heapq.heappop(self._heap)  # stale: the source was dropped or re-penalised
        return None

    def _forgetSoonest(self) -> None:
        head = self._pop()
        assert head is not None
        heapq.heappop(self._heap)
        del self._table[head[0]]
        self.forgotten += 1

    def _expire(self) -> None:
        now = self.clock.seconds()
        while (head := self._pop()) is not None and head[1].expiry <= now:
            heapq.heappop(self._heap)
            del self._table[head[0]]
        if not self._table:
            self._heap.clear()


@dataclass(eq=False)
class Ticket:
    """One admitted connection: its source and whether it still counts as
    unauthenticated at its gate."""

    source: str
    exempt: bool
    pending: bool = True
    neighbourhood: str = ""  # its source's wider network ([relay.crowding] netblock4/6)
    seq: int = 0  # admission order at its gate: the oldest of a source is evicted first
    owner: Any = None  # the server's connection: what it closes if this ticket is evicted
    # Set on a new ticket: the connection the gate evicted to make room for it (already
    # released; the server closes its ``owner``).  Set on that one: True.
    displaced: Ticket | None = None
    evicted: bool = False
    stage: Stage = Stage.SILENT
    admitted: float = 0.0  # clock time of its admission: its stage's seconds run from it
    # Set on an evicted ticket: the stage it stalled at (:meth:`Gate._stalled`), or None
    # when it gave way to a source holding fewer places (:meth:`Gate._victim`).
    stalled: Stage | None = None
    # Set on an evicted ticket: it gave way to a neighbourhood holding fewer places
    # (:meth:`Gate._neighbour`); ``stalled`` says whether it was also stalled.
    crowded: bool = False

    def take_displaced(self) -> Ticket | None:
        """The connection evicted to admit this one, once (the reference is dropped:
        a chain of evicted tickets must not keep their connections alive)."""
        victim, self.displaced = self.displaced, None
        return victim


class _Tally:
    """How many places each key (a source, a neighbourhood) holds, the keys grouped by
    that count, and the most any holds: each change and :meth:`busiest` are O(1), so
    the full cap never scans its places to find who holds the most."""

    def __init__(self, count: dict[str, int]) -> None:
        self.count = count  # key -> places held (> 0); shared with its gate's ``pending``
        self._by: dict[int, dict[str, None]] = {}  # count -> keys, by when they got there
        self.most = 0

    def add(self, key: str) -> None:
        n = self.count.get(key, 0)
        if n:
            self._out(key, n)
        self.count[key] = n + 1
        self._by.setdefault(n + 1, {})[key] = None
        self.most = max(self.most, n + 1)

    def remove(self, key: str) -> None:
        n = self.count[key]
        self._out(key, n)
        if n > 1:
            self.count[key] = n - 1
            self._by.setdefault(n - 1, {})[key] = None
        else:
            del self.count[key]
        if n == self.most and n not in self._by:  # it was the last at the most:
            self.most = n - 1  # it holds n - 1 now (or, at 1, nobody holds any)

    def busiest(self) -> dict[str, None]:
        """The keys holding the most places, the first to get there first."""
        return self._by.get(self.most, {})

    def _out(self, key: str, n: int) -> None:
        keys = self._by[n]
        del keys[key]
        if not keys:
            del self._by[n]


class _ByStage:
    """Unauthenticated tickets by :class:`Stage`, each stage a heap by admission order
    (seq), lazily cleaned: an entry is live while its ticket is pending at that stage.
    The oldest of the lowest stage is found in O(log n) amortised."""

    def __init__(self) -> None:
        self.heaps: tuple[list[tuple[int, Ticket]], ...] = tuple([] for _ in Stage)
        self.live = [0 for _ in Stage]

    def enter(self, ticket: Ticket) -> None:
        """``ticket`` is pending at ``ticket.stage`` now."""
        heap = self.heaps[ticket.stage]
        self.live[ticket.stage] += 1
        heapq.heappush(heap, (ticket.seq, ticket))
        if len(heap) > 2 * self.live[ticket.stage] + 16:  # stale entries: rebuild
            heap[:] = [(t.seq, t) for _, t in heap if t.pending and t.stage is ticket.stage]
            heapq.heapify(heap)

    def leave(self, ticket: Ticket) -> None:
        """``ticket`` leaves its stage (it advanced, or passed): its entry is stale."""
        self.live[ticket.stage] -= 1

    def oldest(self, stage: Stage) -> Ticket | None:
        heap = self.heaps[stage]
        while heap and not (heap[0][1].pending and heap[0][1].stage is stage):
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def lowest(self) -> Ticket | None:
        """The one admitted first of the lowest stage that has any."""
        for stage in Stage:
            if self.live[stage] and (oldest := self.oldest(stage)) is not None:
                return oldest
        return None


@dataclass(eq=False)
class Gate:
    """Admission for one listener (the SSH port or the data port)."""

    name: str
    admission: Admission
    global_cap: int
    pending: dict[str, int] = field(default_factory=dict)  # source -> unauthenticated
    total: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in Refusal})
    evicted: int = 0  # connections dropped to make room (for a source holding fewer, or stalled)
    # of which: stalled past their stage's seconds (by stage name)
    stalled: dict[str, int] = field(default_factory=lambda: {s.name.lower(): 0 for s in Stage})
    # of which: given way to a neighbourhood holding fewer places (stalled or not)
    crowded: int = 0
    # source -> its unauthenticated tickets, oldest first (dicts keep insertion order;
    # removing one is O(1)).  Holds the same sources as ``pending``.
    _held: dict[str, dict[Ticket, None]] = field(default_factory=dict, init=False, repr=False)
    _seq: int = field(default=0, init=False, repr=False)
    # every unauthenticated ticket by stage (:meth:`_stalled`)
    _stages: _ByStage = field(default_factory=_ByStage, init=False, repr=False)
    # the places each source holds (``pending``), and each neighbourhood
    _sources: _Tally = field(init=False, repr=False)
    _hoods: _Tally = field(default_factory=lambda: _Tally({}), init=False, repr=False)
    # neighbourhood -> its unauthenticated tickets by stage (:meth:`_neighbour`); only
    # neighbourhoods with a place, so bounded by the global cap
    _crowds: dict[str, _ByStage] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._sources = _Tally(self.pending)

    def admit(self, host: str, owner: Any = None) -> Ticket | Refusal:
        """A ticket for a new connection from ``host``, or why it is refused.

        At the global cap the ticket may come with ``displaced``: a connection released
        here that the server must close: the source holding the most places gives one
        up (:meth:`_victim`), or else the neighbourhood holding the most
        (:meth:`_neighbour`), or else the connection that stalled longest
        (:meth:`_stalled`); a stalled one is charged ``grace-exceeded``.  ``owner`` is
        kept on the ticket for that.  One eviction per accept at most."""
        source, hood, exempt = self.admission.place(host)
        why = self._check(source, exempt)
        choice = self._choose(source, hood) if why is Refusal.GLOBAL else None
        if why is not None and choice is None:
            self.refused[why.value] += 1
            return why
        victim = None
        if choice is not None:
            victim, crowded, stalled = choice
            victim.crowded = crowded
            if stalled:
                victim.stalled = victim.stage
            self.passed(victim)
            victim.evicted = True
            self.evicted += 1
            self.crowded += victim.crowded
            if victim.stalled is not None:
                self.stalled[victim.stalled.name.lower()] += 1
                self.penalise(victim, Offence.GRACE)  # closed() will not: it is evicted
        self._sources.add(source)
        self._hoods.add(hood)
        self.total += 1
        self._seq += 1
        ticket = Ticket(source, exempt, neighbourhood=hood, seq=self._seq, owner=owner,
                        displaced=victim, admitted=self.admission.clock.seconds())
        self._held.setdefault(source, {})[ticket] = None
        self._enter(ticket)
        return ticket

    def _choose(self, source: str, hood: str) -> tuple[Ticket, bool, bool] | None:
        """Whom a newcomer from ``source`` in ``hood`` evicts at the full cap, whether
        for its neighbourhood and whether stalled; None: it is refused.  Marks
        nothing (:meth:`refuses` asks too).

        The order goes from the finest fairness to the coarsest, then to progress: a
        busier source gives way first (a few hosts filling the cap); then a busier
        neighbourhood (a crowd of sources from one network recycling fresh places,
        which no stall rule can see); only when sources and neighbourhoods are even
        does age decide, charging the stalled.  A neighbourhood's stalled connection
        is taken before its fresh ones (:meth:`_neighbour`) and charged too, so an
        idle crowd from one network is still penalised."""
        victim = self._victim(source)
        if victim is not None:
            return victim, False, False
        victim = self._neighbour(source, hood)
        if victim is not None:
            return victim, True, self._overdue(victim)
        victim = self._stalled(source)
        if victim is not None:
            return victim, False, True
        return None

    def advance(self, ticket: Ticket, stage: Stage) -> None:
        """``ticket``'s connection got to ``stage`` (its server says when: the version
        line, the first byte of a hello or ClientHello; the end of the first key
        exchange).  Never backwards; nothing once it passed."""
        if not ticket.pending or stage <= ticket.stage:
            return
        self._stages.leave(ticket)
        self._crowds[ticket.neighbourhood].leave(ticket)
        ticket.stage = stage
        self._enter(ticket)

    def _enter(self, ticket: Ticket) -> None:
        self._stages.enter(ticket)
        crowd = self._crowds.get(ticket.neighbourhood)
        if crowd is None:
            crowd = self._crowds[ticket.neighbourhood] = _ByStage()
        crowd.enter(ticket)

    def _limit(self, stage: Stage) -> float:
        crowding = self.admission.crowding
        return (crowding.silent, crowding.handshake, crowding.auth)[stage]

    def _overdue(self, ticket: Ticket) -> bool:
        """``ticket`` has held its place past its stage's seconds."""
        return self.admission.clock.seconds() - ticket.admitted >= self._limit(ticket.stage)

    def _neighbour(self, source: str, hood: str) -> Ticket | None:
        """The connection to evict for a newcomer from ``source`` in neighbourhood
        ``hood`` at the full cap when no source holds more places than its own would
        (:meth:`_victim` found none): if ``hood``, *counting the newcomer*, would still
        hold fewer places than the neighbourhood holding the most (ties: the first to
        get there), that neighbourhood's connection at the lowest stage admitted
        first; else None (and None if ``[relay.crowding]`` is off, or ``source`` is at
        its per-source cap: this rule never breaks it).

        Lowest stage first, not simply oldest: a neighbourhood shared by an attacker
        and honest users (a campus /24, an office NAT, the lab's agent) loses the
        attacker's cheap places (a connect, a version line) before anyone's that
        finished a key exchange; an honest client reaches ``auth`` in two round trips
        and, unless it stalls there, outlasts every recycled place.  Oldest within a
        stage: the one that had the longest to make progress.  Counting the newcomer
        ends churn as in :meth:`_victim`: a place moves from a neighbourhood holding
        ``n`` to one that then holds at most ``n - 1``, so two neighbourhoods cannot
        trade places, and a busy one keeps at least what every other holds (a NAT'ed
        office keeps a fair share, never none).  O(1) for the busiest (a tally by
        count), O(log n) amortised for its lowest stage's oldest."""
        if not self.admission.crowding.enabled:
            return None
        if self.pending.get(source, 0) >= self.admission.per_source:
            return None
        mine = self._hoods.count.get(hood, 0) + 1  # with the new connection
        if self._hoods.most <= mine:
            return None
        busiest = next(iter(self._hoods.busiest()))
        return self._crowds[busiest].lowest()

    def _stalled(self, source: str) -> Ticket | None:
        """The connection to evict for ``source`` at the full cap when no source nor
        neighbourhood holds more places (:meth:`_victim`, :meth:`_neighbour` found
        none): of the lowest stage that has one, the oldest that has held its place
        past its stage's seconds; None if every connection is within its own, or
        ``[relay.crowding]`` is off.

        It never breaks the per-source cap (a source at it only replaces its own), and
        it ends churn: a connection is evicted only once it held its place for
        ``silent`` seconds at least, so a crowd can evict at most
        ``global_cap / silent`` a second among itself, and each eviction blocks the
        evicted source for ``grace_exceeded``.  O(stages x log n) amortised: the heads
        of three heaps, stale entries popped once."""
        crowding = self.admission.crowding
        if not crowding.enabled:
            return None
        now = self.admission.clock.seconds()
        full = self.pending.get(source, 0) >= self.admission.per_source
        for stage in Stage:
            oldest = self._stages.oldest(stage)
            if oldest is None:
                continue
            if now - oldest.admitted < self._limit(stage):
                continue  # the oldest of this stage is within its seconds: all are
            if full and oldest.source != source:
                return None
            return oldest
        return None

    def refuses(self, host: str) -> Refusal | None:
        """Why a connection from ``host`` would be refused now, without admitting,
        counting or recording anything: a door in front of this gate (the TLS port
        in front of the SSH server) asks before it pays for a handshake.  None when
        :meth:`admit` would evict a connection to let it in."""
        source, hood, exempt = self.admission.place(host)
        why = self._check(source, exempt)
        if why is Refusal.GLOBAL and self._choose(source, hood) is not None:
            return None
        return why

    def _victim(self, source: str) -> Ticket | None:
        """Which connection to evict so that ``source`` gets a place at the full global
        cap, or None: the oldest of the source holding the most places (ties: the
        source whose oldest connection is oldest), if ``source``, *counting the new
        connection*, would still hold fewer.  So a few hosts holding every place
        cannot keep a new one out until ``login_grace``.

        Counting the new connection is what ends churn: had a source holding 9 evicted
        one holding 10, the two would hold 10 and 9 and could trade that place back
        and forth for ever, every connection admitted and none penalised (an evicted
        one earns nothing); 10 000 such connects from two hosts were all admitted.
        Now a place only moves from a source holding ``n`` to one that then holds at
        most ``n - 1``, which lowers the sum of the squares of the counts each time:
        without closing connections (penalised) a crowd can only evict a bounded
        number of times, and a source holding the most (or one less) evicts nobody.
        O(1) when nobody holds more (the tally's most): a crowd of sources holding one
        place each costs no scan; else the sources holding the most are compared."""
        mine = self.pending.get(source, 0) + 1  # with the new connection
        if self._sources.most <= mine:
            return None
        best: Ticket | None = None
        for busy in self._sources.busiest():
            oldest = next(iter(self._held[busy]))
            if best is None or oldest.seq < best.seq:
                best = oldest
        return best

    def _check(self, source: str, exempt: bool) -> Refusal | None:
        penalties = self.admission.penalties
        if not exempt:
            if penalties.config.enabled and penalties.config.overflow == "deny-all" \
                    and penalties.full():
                return Refusal.OVERFLOW
            if penalties.active(source) is not None:
                return Refusal.PENALTY
        if self.total >= self.global_cap:  # sshd's order: penalty, MaxStartups, per source
            return Refusal.GLOBAL
        if self.pending.get(source, 0) >= self.admission.per_source:
            return Refusal.PER_SOURCE
        return None

    def passed(self, ticket: Ticket) -> None:
        """The connection authenticated (or sent its hello): it no longer counts."""
        if not ticket.pending:
            return
        ticket.pending = False
        self.total -= 1
        self._stages.leave(ticket)  # its heap entries are stale now
        crowd = self._crowds[ticket.neighbourhood]
        crowd.leave(ticket)
        self._sources.remove(ticket.source)
        self._hoods.remove(ticket.neighbourhood)
        if ticket.neighbourhood not in self._hoods.count:
            del self._crowds[ticket.neighbourhood]
        held = self._held[ticket.source]
        del held[ticket]
        if not held:
            del self._held[ticket.source]

    def closed(self, ticket: Ticket, offence: Offence | None) -> None:
        """The connection ended; ``offence`` if it ended badly.  An evicted one earns
        no penalty: the relay closed it, and its source (perhaps a NAT full of users)
        only held the most places."""
        self.passed(ticket)
        if offence is not None and not ticket.evicted:
            self.penalise(ticket, offence)

    def penalise(self, ticket: Ticket, offence: Offence) -> None:
        if not ticket.exempt:
            self.admission.penalties.penalise(ticket.source, offence)

    def status(self) -> dict[str, Any]:
        return {"unauthenticated": self.total, "sources": len(self.pending),
                "refused": dict(self.refused), "evicted": self.evicted,
                "stalled_evicted": dict(self.stalled), "neighbourhood_evicted": self.crowded,
                "neighbourhoods": len(self._hoods.count),
                "stages": {s.name.lower(): n
                           for s, n in zip(Stage, self._stages.live, strict=True)}}


class Admission:
    """Sources, the exempt list and the shared penalty table; one :class:`Gate` per port."""

    def __init__(self, config: RelayConfig, clock: Any) -> None:
        self.config = config
        self.per_source = config.per_source_max_unauthenticated
        self.crowding: CrowdingConfig = config.crowding
        self.clock = clock
        self.penalties = Penalties(config.penalties, clock)
        self.gates: dict[str, Gate] = {}

    def gate(self, name: str, global_cap: int) -> Gate:
        gate = self.gates[name] = Gate(name, self, global_cap)
        return gate

    def source(self, host: str) -> tuple[str, bool]:
        """``host``'s source (its network, as text) and whether it is exempt."""
        source, _, exempt = self.place(host)
        return source, exempt

    def place(self, host: str) -> tuple[str, str, bool]:
        """``host``'s source (its network, as text), its neighbourhood (the wider
        network of ``[relay.crowding] netblock4/netblock6``) and whether it is exempt.
        A host that is not an IP address (a UNIX socket, a test double) is its own
        source and neighbourhood."""
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host, host, False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        v4 = ip.version == 4
        bits = self.config.per_source_netblock4 if v4 else self.config.per_source_netblock6
        wide = self.crowding.netblock4 if v4 else self.crowding.netblock6
        net = ipaddress.ip_network((ip, bits), strict=False)
        hood = ipaddress.ip_network((ip, min(wide, bits)), strict=False)
        exempt = any(ip in n for n in self.config.penalty_exempt)
        return str(net), str(hood), exempt

    def status(self) -> dict[str, Any]:
        p = self.penalties
        return {
            "per_source_max_unauthenticated": self.per_source,
            "penalised_sources": p.active_count(),
            "tracked_sources": len(p),
            "penalties": dict(p.penalised),
            "penalties_activated": p.activated,
            "penalties_forgotten": p.forgotten,
            **{name: g.status() for name, g in self.gates.items()},
        }
