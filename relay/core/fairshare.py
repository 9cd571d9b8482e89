"""Fair share of a congested link: deficit round-robin per user, then per session (sans-IO).

When the link's write side is full, the bytes channels want to send wait here
instead of in one shared FIFO, and leave in an order that divides the link between
*users* first (weighted by each user's ``share``) and between each user's *sessions*
second, whatever the number of streams each user opens.  The scheduler holds
items with a size; it never reads a clock and never touches a transport: the
shell (:class:`relay.ssh.connection.FlowConnection`) pushes what a channel sends
while the link is congested and pops while the link takes more.

Deficit round-robin (Shreedhar and Varghese, 1996) at two levels: each active user
in turn receives ``quantum * weight`` bytes of credit and spends it on its sessions,
which share it by the same rule with equal weights.  A user with one stream and a
user with eight streams each get half of the link.

Interactive sessions: a packet of at most ``sparse_bytes`` for a session that had
nothing queued (a keystroke, its echo, a prompt) is sent before any queued bulk,
its user's bulk included, as fq_codel treats sparse flows.  It is charged to its
user's credit, which may go below zero; a user more than one quantum in debt
queues like bulk until its turns in the round-robin have paid the debt back, so
nobody takes more than its share by sending small packets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_QUANTUM = 32 * 1024
"""Credit per round for a weight of 1: one maximum-size SSH packet (OpenSSH's 32 KiB),
so every visit sends at least one packet."""
DEFAULT_SPARSE_BYTES = 1024
"""The largest packet that skips the queue when its session had nothing queued."""


@dataclass
class _Flow(Generic[T]):
    key: Hashable
    user: _User[T]
    items: deque[tuple[T, int]] = field(default_factory=deque)
    queued: int = 0
    deficit: int = 0
    turn: bool = False  # received this round's quantum already


@dataclass
class _User(Generic[T]):
    name: str
    weight: float
    flows: deque[_Flow[T]] = field(default_factory=deque)  # active (non-empty) flows
    deficit: float = 0.0
    turn: bool = False


class FairScheduler(Generic[T]):
    """Items of any type, each with a size in bytes, keyed by flow (a session) and user.

    Memory is the caller's to bound: the shell stops a flow's source once
    :meth:`queued` for it passes its limit (the same pause every congested channel
    gets), so at most about that many bytes per session wait here."""

    def __init__(self, quantum: int = DEFAULT_QUANTUM,
                 sparse_bytes: int = DEFAULT_SPARSE_BYTES) -> None:
        if quantum < 1:
            raise ValueError("quantum must be at least 1 byte")
        self.quantum = quantum
        self.sparse_bytes = sparse_bytes
        self._users: dict[str, _User[T]] = {}
        self._active: deque[_User[T]] = deque()
        self._flows: dict[Hashable, _Flow[T]] = {}
        self._sparse: deque[tuple[_Flow[T], T, int]] = deque()
        self._weights: dict[str, float] = {}
        self._tags: dict[Hashable, str] = {}  # flow -> the user it was tagged as (tag)
        self._holders: dict[str, int] = {}  # user -> flows tagged as it
        self._bytes = 0

    # --- configuration ------------------------------------------------------

    def set_weight(self, user: str, weight: float) -> None:
        """``user``'s share relative to the others (1 by default; 2 gets twice as much)."""
        if not weight > 0:
            raise ValueError("a weight must be positive")
        self._weights[user] = weight
        if user in self._users:
            self._users[user].weight = weight

    def weight(self, user: str) -> float:
        return self._weights.get(user, 1.0)

    def tag(self, flow: Hashable, user: str, weight: float) -> None:
        """``flow`` carries ``user``'s bytes, whose share is ``weight``: the weight is
        set (:meth:`set_weight`) and the flow moved to the user (:meth:`move`), and
        the weight is kept only while some flow tagged as ``user`` lives
        (:meth:`untag`).  The peer that tags (the relay, ``share@labrelay``) chooses
        the names: kept for good, a relay sending a fresh name per request grew the
        agent by ~215 bytes a name without end (docs/security.md, the agent against a
        relay it trusted)."""
        old = self._tags.get(flow)
        if old != user:
            self._tags[flow] = user
            self._holders[user] = self._holders.get(user, 0) + 1
            if old is not None:
                self._release(old)
        self.set_weight(user, weight)
        self.move(flow, user)

    def untag(self, flow: Hashable) -> None:
        """``flow`` is gone: its user's weight is forgotten once no flow holds it (a
        user with bytes still queued keeps the weight it was scheduled with)."""
        old = self._tags.pop(flow, None)
        if old is not None:
            self._release(old)

    def _release(self, user: str) -> None:
        left = self._holders[user] - 1
        if left:
            self._holders[user] = left
        else:
            del self._holders[user]
            self._weights.pop(user, None)

    # --- queueing -----------------------------------------------------------

    def push(self, flow: Hashable, user: str, item: T, size: int) -> None:
        """Queue ``item`` (``size`` bytes) for session ``flow`` of ``user``."""
        f = self._flows.get(flow)
        if f is None:
            u = self._users.get(user)
            if u is None:
                u = self._users[user] = _User(user, self.weight(user))
            f = self._flows[flow] = _Flow(flow, u)
        self._bytes += size
        if f.queued == 0 and size <= self.sparse_bytes and f.user.deficit > -self.quantum:
            f.queued += size
            self._sparse.append((f, item, size))
            return
        f.queued += size
        f.items.append((item, size))
        if len(f.items) == 1:
            self._activate(f)

    def _activate(self, f: _Flow[T]) -> None:
        u = f.user
        u.flows.append(f)
        if len(u.flows) == 1:
            self._active.append(u)

    def pop(self) -> tuple[Hashable, T] | None:
        """The next item to send, with its flow; None when nothing is queued."""
        if self._sparse:
            f, item, size = self._sparse.popleft()
            f.queued -= size
            f.user.deficit -= size
            self._done(f, size)
            return f.key, item
        while self._active:
            u = self._active[0]
            if not u.turn:
                u.turn = True
                u.deficit += self.quantum * u.weight
            f = self._nextFlow(u)
            size = f.items[0][1]
            if size <= u.deficit:
                item, _ = f.items.popleft()
                f.queued -= size
                f.deficit -= size
                u.deficit -= size
                if not f.items:
                    u.flows.remove(f)
                    f.turn = False
                    f.deficit = 0
                    if not u.flows:
                        self._active.popleft()
                        u.turn = False
                        u.deficit = min(u.deficit, 0.0)  # an idle user keeps no credit
                self._done(f, size)
                return f.key, item
            u.turn = False
            self._active.rotate(-1)
        return None

    def _nextFlow(self, u: _User[T]) -> _Flow[T]:
        """The user's session whose head item its own credit covers (DRR among the
        user's sessions, with equal weights)."""
        while True:
            f = u.flows[0]
            if not f.turn:
                f.turn = True
                f.deficit += self.quantum
            if f.items[0][1] <= f.deficit:
                return f
            f.turn = False
            u.flows.rotate(-1)

    def _done(self, f: _Flow[T], size: int) -> None:
        self._bytes -= size
        if f.queued == 0 and not f.items:
            self._forget(f)

    def _forget(self, f: _Flow[T]) -> None:
        self._flows.pop(f.key, None)
        u = f.user
        if (not u.flows and u.deficit >= 0
                and not any(g.user is u for g in self._flows.values())):
            self._users.pop(u.name, None)  # a user in debt is kept until it paid

    def move(self, flow: Hashable, user: str) -> None:
        """``flow``'s bytes, queued and to come, are ``user``'s from now on.

        A flow belongs to the user it was first pushed under for as long as it has bytes
        waiting, and on a congested link that is for ever.  The agent learns whose a
        session is (``share@labrelay``) only after the relay has the agent's answer; a
        download whose request went ahead as early data has bytes queued before that,
        under no one (user ``""``, weight 1), and without this it stayed there: a user
        with ``share = 2`` got an unweighted half (bench/sharing.py, one run in a few)."""
        f = self._flows.get(flow)
        if f is None or f.user.name == user:
            return
        old = f.user
        if f in old.flows:  # active: leave the old user's round
            old.flows.remove(f)
            if not old.flows and old in self._active:
                self._active.remove(old)
                old.turn = False
                old.deficit = min(old.deficit, 0.0)
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = _User(user, self.weight(user))
        f.user = u
        f.turn = False
        f.deficit = 0
        if f.items:
            self._activate(f)
        if (not old.flows and old.deficit >= 0
                and not any(g.user is old for g in self._flows.values())):
            self._users.pop(old.name, None)

    def drop(self, flow: Hashable) -> int:
        """Forget what ``flow`` has queued (its channel closed); the bytes dropped."""
        f = self._flows.pop(flow, None)
        if f is None:
            return 0
        dropped = f.queued
        self._bytes -= dropped
        if f in f.user.flows:
            f.user.flows.remove(f)
            if not f.user.flows and f.user in self._active:
                self._active.remove(f.user)
                f.user.turn = False
        self._sparse = deque(s for s in self._sparse if s[0] is not f)
        f.items.clear()
        f.queued = 0
        self._forget(f)
        return dropped

    # --- reading ------------------------------------------------------------

    def queued(self, flow: Hashable) -> int:
        """Bytes ``flow`` has waiting."""
        f = self._flows.get(flow)
        return 0 if f is None else f.queued

    def __len__(self) -> int:
        """Bytes waiting, all flows."""
        return self._bytes

    def __bool__(self) -> bool:
        return bool(self._sparse) or bool(self._active)

    def users(self) -> dict[str, int]:
        """Bytes waiting per user (for status)."""
        out: dict[str, int] = {}
        for f in self._flows.values():
            out[f.user.name] = out.get(f.user.name, 0) + f.queued
        return out


def jain_index(shares: list[float]) -> float:
    """Jain's fairness index of ``shares`` (1.0: all equal; 1/n: one takes all)."""
    if not shares:
        return 1.0
    total = sum(shares)
    squares = sum(s * s for s in shares)
    return (total * total) / (len(shares) * squares) if squares else 1.0


class TurnShare(Generic[T]):
    """One user's packets per reactor turn, over all her connections (sans-IO).

    The relay reads a user's connections within this budget: a read that would take
    more waits, whole or in part, until a later turn (relay.ssh.turnshare holds the
    reactor side).  Opening a packet costs the relay the same Python whatever its size
    or kind (a 1-byte ``CHANNEL_DATA``, an ``SSH_MSG_IGNORE``, a keepalive, a window
    adjust), so the budget counts packets, not bytes: the byte-counting share of the
    link (:class:`FairScheduler`) cannot see a flood of small ones.  Per user and not
    per connection, so that five connections of her key get one user's turn, not five.

    ``turn`` is whatever tells reactor turns apart (a number the caller gives); the
    budget is granted afresh at the first :meth:`grant` of a new one.  Connections
    that wait are served in the order they began to wait, and one that waits again
    goes to the back, so each of her connections gets its turn in the round."""

    def __init__(self, per_turn: int) -> None:
        if per_turn < 1:
            raise ValueError("a turn must allow at least one packet")
        self.per_turn = per_turn
        self.left = per_turn
        self._turn: object = None
        self._waiting: deque[T] = deque()

    def grant(self, turn: object) -> int:
        """Packets this user may still have handled in ``turn``."""
        if turn != self._turn:
            self._turn = turn
            self.left = self.per_turn
        return self.left

    def renew(self, turn: object) -> int:
        """A fresh budget for ``turn``, even if it was granted already (the start of a
        turn that the caller knows is new before its number changes)."""
        self._turn = turn
        self.left = self.per_turn
        return self.left

    def spend(self, packets: int) -> None:
        self.left -= packets

    def wait(self, who: T) -> None:
        """``who`` has packets waiting for a later turn (once in the queue)."""
        if who not in self._waiting:
            self._waiting.append(who)

    def forget(self, who: T) -> None:
        """``who`` waits no more (its connection is gone)."""
        try:
            self._waiting.remove(who)
        except ValueError:
            pass

    def next_waiting(self) -> T | None:
        """The connection whose turn it is, out of the queue; None if none waits."""
        return self._waiting.popleft() if self._waiting else None

    def __len__(self) -> int:
        """Connections waiting."""
        return len(self._waiting)
