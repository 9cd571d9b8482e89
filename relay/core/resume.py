"""Resumable sessions between a labrelay agent and a labrelay relay (no I/O).

A session that crosses the agent's link is one byte stream each way.  When the link
breaks, both ends keep what they need to carry on over the next link: the user's
TCP connection at the relay and the target's at the agent stay open, reads paused,
and each end keeps the bytes it sent that the peer has not acknowledged as delivered
downstream.  When the agent is back, each end says how much it received, each sends
the rest again, and the bridge continues.  Past the grace period a held session ends
as any broken session does: with a reset, never a silent truncation.

:class:`Stream` is one session's half of that, on either end; :class:`ResumeTable` is
an end's streams by session id.  Counts are totals since the session opened, so an
acknowledgement or an offer repeated, or arriving late, says nothing new and is
ignored; a count beyond what was sent is a lie and refuses the resume.

Why the replay buffer costs no new memory bound: the peer acknowledges bytes with the
SSH window (a ``WINDOW_ADJUST`` is sent only for bytes handed on downstream, DESIGN
§4), so bytes sent and not yet acknowledged are at most the peer's window; a source
feeding a stream is paused when that window is spent, so what is written and not yet
acknowledged is at most one window: the source is paused while less than one read
(:data:`SOURCE_READ`) is left of it, so no read lands past it.  Bytes a receiver
got are already in its downstream (the TCP connection it
holds), so what it received is what it delivered.

The wire formats (``resume@labrelay`` hello, the ``forwarded-resumable@labrelay``
channel that opens a resumable session, the ``resume-session@labrelay`` channel that
resumes one) are here too; docs/resilience.md describes the exchange.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from relay.core.certs import certified_key
from relay.core.replay import ReplayBuffer

HELLO = b"resume@labrelay"
"""Global request from the agent, first on every link: "I can resume sessions".
Payload: uint32 version.  A labrelay relay answers with :func:`pack_hello_reply`; a
stock server fails it, and nothing is resumable on that link."""
OPEN_RESUMABLE = b"forwarded-resumable@labrelay"
"""Channel the relay opens instead of ``forwarded-tcpip`` to an agent that said hello:
the ``forwarded-tcpip`` fields, then string session id."""
RESUME_CHANNEL = b"resume-session@labrelay"
"""Channel the agent opens to resume a held session: :func:`pack_offer`.  The relay
confirms with its own offer's counts as the confirmation's data, or refuses with why."""
VERSION = 1
SID_LEN = 16
REPLAY_LIMIT = 16 * 1024 * 1024
"""Bytes a stream keeps for a replay, at most: what it sends beyond the peer's credit.
The peer's window would bound it, but the peer chooses its window (up to 4 GiB, and it
need never re-open it); 16 MiB is the largest window a labrelay end can be configured
with, so an honest peer's half-window ``WINDOW_ADJUST`` always comes."""
SOURCE_READ = 64 * 1024
"""The most a bridge's source hands over at once (a Twisted TCP transport reads up to
64 KiB; an SSH channel delivers a packet, at most 32 KiB by default).  A resumable
session's channel stops its source while less than this is left of the window
(``BridgedChannel.capWindow``), so its replay buffer never holds more than the window:
the read that would not fit is never made."""
MAX_COUNT = 2**63 - 1


class StreamState(Enum):
    OPEN = "open"  # carried by a live channel
    HELD = "held"  # its link is gone; waiting for the next one until ``deadline``
    ENDED = "ended"


class Refusal(Enum):
    """Why a resume is refused; each ends the session (its sides are reset)."""

    UNKNOWN = "unknown or ended session"
    NOT_YOURS = "session of another key"
    BEYOND = "peer claims more bytes than were sent"
    BEHIND = "peer claims fewer bytes than it acknowledged"
    EXPIRED = "held past its grace period"
    NOT_GRANTED = "its service is not granted to the agent now"
    MALFORMED = "malformed resume offer"


class ResumeOwner(NamedTuple):
    """Who may resume a session at the relay: the agent's key blob as it logged in (a
    certificate's own blob), its process (the hello's instance id) and, for a
    certificate, the login it made ("" for a plain key)."""

    key: bytes
    instance: bytes
    login: str

    def same_agent(self, other: ResumeOwner) -> bool:
        """Whether ``other`` is the same login with the same key, in any process: the
        same key blob, or another certificate of the same public key (a renewal: see
        :func:`may_resume`).  A plain key renews nothing: another blob is another key."""
        if self.login != other.login:
            return False
        if self.key == other.key:
            return True
        key = certified_key(self.key)
        return key is not None and key == certified_key(other.key)


def may_resume(held: object, offering: object) -> bool:
    """Whether ``offering`` may resume a session whose owner is ``held``: the same
    owner, or, between two :class:`ResumeOwner`, the same process and login with another
    certificate of the same public key.  A lab renews short-lived certificates often
    and the agent reads its certificate at every login, so a renewal that lands while
    the link is down must not make the agent a stranger to its own sessions.  What the
    blob adds to the key (validity, serial, CA) was checked at that login, as the login
    it made (a CA trusted for it, valid now, not revoked); the key and the instance say
    it is the same agent process.  The CA need not be the same: a lab rotating its CA
    trusts the old and the new one for the agent's name meanwhile, and the first renewal
    by the new one may land during a cut.  Requiring the same CA would add nothing an
    attacker lacks: the login was already granted by a line for *that* login name
    (relay.core.certs: since round 16 never by another name's line), the resume needs
    the agent's private key and its process's instance id, and the renewal's grants
    are checked for each session it resumes (relay.server.resumes)."""
    if held == offering:
        return True
    return (isinstance(held, ResumeOwner) and isinstance(offering, ResumeOwner)
            and held.instance == offering.instance and held.same_agent(offering))


class ResumeRefused(Exception):
    def __init__(self, why: Refusal, detail: str = "") -> None:
        super().__init__(why.value + (f": {detail}" if detail else ""))
        self.why = why


@dataclass(frozen=True)
class Offer:
    """What one end received of a session: ``received`` bytes, and whether the
    peer's EOF came (then nothing of it is missing)."""

    sid: bytes
    received: int
    eof: bool


@dataclass(frozen=True)
class Resumption:
    """What to do to resume: send ``retransmit`` (in order) on the new channel, then
    EOF again if ``resend_eof``; ``outage`` seconds passed since the link was lost."""

    retransmit: list[bytes]
    resend_eof: bool
    outage: float

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.retransmit)


class Stream:
    """One end's half of one resumable session.

    Fed by its shell: :meth:`wrote` for every byte written toward the peer (kept until
    acknowledged), :meth:`credited` for every ``WINDOW_ADJUST`` of the current channel,
    :meth:`got` for every byte received, :meth:`wrote_eof`/:meth:`got_eof`; then
    :meth:`lost` when the link goes and :meth:`resume` with the peer's offer."""

    __slots__ = (
        "_replay",
        "acked",
        "deadline",
        "eof_received",
        "eof_sent",
        "held_since",
        "owner",
        "received",
        "resumes",
        "sent",
        "sid",
        "state",
        "why_ended",
    )

    def __init__(self, sid: bytes, owner: object = None) -> None:
        self.sid = sid
        self.owner = owner  # who may resume it (the relay: agent key, process, login)
        self.state = StreamState.OPEN
        self.sent = 0  # bytes written toward the peer, in total
        self.acked = 0  # of which the peer said it delivered downstream
        self.received = 0  # bytes received from the peer (= delivered downstream)
        self.eof_sent = False
        self.eof_received = False
        self.held_since: float | None = None
        self.deadline: float | None = None
        self.resumes = 0
        self.why_ended: str | None = None
        # [acked, sent): what its RSS costs is measured (relay.core.replay)
        self._replay = ReplayBuffer()

    # while open (and, for writes already under way, while held)

    def wrote(self, data: bytes) -> None:
        """``data`` was written toward the peer (sent now, or when the link is back)."""
        if self.state is StreamState.ENDED or not data:
            return
        self._replay.append(data)
        self.sent += len(data)

    def wrote_eof(self) -> None:
        self.eof_sent = True

    def credited(self, nbytes: int) -> None:
        """The peer re-opened the current channel's window by ``nbytes``: that many more
        bytes were delivered downstream.  Raises :class:`ResumeRefused` (BEYOND) if
        that is more than was sent."""
        self.ack(self.acked + nbytes)

    def ack(self, total: int) -> None:
        """The peer delivered ``total`` bytes in all.  An older or repeated count is
        ignored; one beyond what was sent raises :class:`ResumeRefused` (BEYOND)."""
        if total > self.sent:
            raise ResumeRefused(Refusal.BEYOND, f"{total} acknowledged, {self.sent} sent")
        drop = total - self.acked
        if drop <= 0:
            return
        self.acked = total
        self._replay.drop(drop)

    def got(self, nbytes: int) -> None:
        self.received += nbytes

    def got_eof(self) -> None:
        self.eof_received = True

    @property
    def unacked(self) -> int:
        """Bytes kept for a retransmission: written, not yet acknowledged."""
        return self.sent - self.acked

    # the link

    def lost(self, now: float, grace: float) -> bool:
        """The link carrying it went: hold it until ``now + grace``.  False if it
        was not open (already held, or ended)."""
        if self.state is not StreamState.OPEN:
            return False
        self.state = StreamState.HELD
        self.held_since = now
        self.deadline = now + grace
        return True

    def offer(self) -> Offer:
        """What this end tells the peer when resuming."""
        return Offer(self.sid, self.received, self.eof_received)

    def resume(self, peer: Offer, now: float) -> Resumption:
        """The peer's offer: what to send again.  Also for a stream still OPEN here
        (this end had not noticed the old link dying; it is abandoned now).  Raises
        :class:`ResumeRefused` and ends the stream if the offer cannot be true."""
        if self.state is StreamState.ENDED:
            raise ResumeRefused(Refusal.UNKNOWN)
        if self.deadline is not None and self.state is StreamState.HELD and now > self.deadline:
            self.end(Refusal.EXPIRED.value)
            raise ResumeRefused(Refusal.EXPIRED)
        if peer.received > self.sent:
            self.end(Refusal.BEYOND.value)
            raise ResumeRefused(Refusal.BEYOND, f"{peer.received} received, {self.sent} sent")
        if peer.received < self.acked:
            self.end(Refusal.BEHIND.value)
            raise ResumeRefused(Refusal.BEHIND,
                                f"{peer.received} received, {self.acked} acknowledged")
        if peer.eof and (not self.eof_sent or peer.received != self.sent):
            self.end(Refusal.BEYOND.value)
            raise ResumeRefused(Refusal.BEYOND, "peer claims an EOF that was never sent")
        outage = 0.0 if self.held_since is None else now - self.held_since
        self.ack(peer.received)
        self.state = StreamState.OPEN
        self.held_since = self.deadline = None
        self.resumes += 1
        return Resumption(self._pending(), self.eof_sent and not peer.eof, outage)

    def _pending(self) -> list[bytes]:
        """The unacknowledged bytes, in order."""
        return self._replay.chunks()

    def expired(self, now: float) -> bool:
        """Whether it is held past its deadline (then it is ended)."""
        if self.state is StreamState.HELD and self.deadline is not None and now >= self.deadline:
            self.end(Refusal.EXPIRED.value)
            return True
        return False

    def end(self, why: str) -> None:
        if self.state is StreamState.ENDED:
            return
        self.state = StreamState.ENDED
        self.why_ended = why
        self._replay.clear()

    def age(self, now: float) -> float:
        """Seconds it has been held (0 if it is not)."""
        return 0.0 if self.held_since is None else now - self.held_since


class ResumeTable:
    """An end's resumable streams by session id; ended ones are forgotten."""

    def __init__(self) -> None:
        self._streams: dict[bytes, Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, sid: object) -> bool:
        return sid in self._streams

    def open(self, sid: bytes, owner: object = None) -> Stream:
        if len(sid) != SID_LEN or sid in self._streams:
            raise ValueError("session ids are 16 bytes and unique")
        stream = Stream(sid, owner)
        self._streams[sid] = stream
        return stream

    def get(self, sid: bytes) -> Stream | None:
        return self._streams.get(sid)

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def lost(self, streams: Iterable[Stream], now: float, grace: float) -> list[Stream]:
        """Hold ``streams`` (a link's open ones): those now held."""
        return [s for s in streams if s.sid in self._streams and s.lost(now, grace)]

    def offered(self, offer: Offer, owner: object, now: float) -> tuple[Stream, Resumption]:
        """A peer (``owner``) offers to resume: the stream and what to resend, or
        :class:`ResumeRefused` (an ended or refused stream is forgotten).  Resumed, the
        stream is ``owner``'s from now on (:func:`may_resume`: a renewed certificate's,
        whose own expiry or revocation ends it, and no longer the old one's)."""
        stream = self._streams.get(offer.sid)
        if stream is None:
            raise ResumeRefused(Refusal.UNKNOWN)
        if not may_resume(stream.owner, owner):
            raise ResumeRefused(Refusal.NOT_YOURS)  # not ended: its owner may still come
        try:
            plan = stream.resume(offer, now)
        finally:
            if stream.state is StreamState.ENDED:
                self.forget(stream)
        stream.owner = owner
        return stream, plan

    def expired(self, now: float) -> list[Stream]:
        """Held streams past their deadline, ended and forgotten."""
        out = [s for s in self._streams.values() if s.expired(now)]
        for s in out:
            self.forget(s)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [s.deadline for s in self._streams.values()
                     if s.state is StreamState.HELD and s.deadline is not None]
        return min(deadlines) if deadlines else None

    def held(self) -> list[Stream]:
        return [s for s in self._streams.values() if s.state is StreamState.HELD]

    def forget(self, stream: Stream) -> None:
        if self._streams.get(stream.sid) is stream:
            del self._streams[stream.sid]
        stream.end(stream.why_ended or "forgotten")


# wire formats


def pack_hello(instance: bytes) -> bytes:
    """The agent's hello: version and its instance id (new at every start: a relay
    holding sessions of the same key for another instance resets them at once, the
    process that could resume them is gone)."""
    return struct.pack(">LL", VERSION, len(instance)) + instance


def unpack_hello(data: bytes) -> tuple[int, bytes]:
    try:
        version, n = struct.unpack(">LL", data[:8])
    except struct.error as e:
        raise ValueError("malformed resume hello") from e
    instance = data[8:8 + n]
    if n == 0 or n > 64 or len(instance) != n:
        raise ValueError("malformed resume hello")
    return int(version), instance


def pack_hello_reply(instance: bytes, grace: float) -> bytes:
    """The relay's answer: its instance id (new at every start: a different one means
    the relay restarted and nothing held can be resumed) and its grace in seconds."""
    return struct.pack(">L", len(instance)) + instance + struct.pack(">L", int(grace))


def unpack_hello_reply(data: bytes) -> tuple[bytes, int]:
    try:
        (n,) = struct.unpack(">L", data[:4])
        instance = data[4:4 + n]
        (grace,) = struct.unpack(">L", data[4 + n:8 + n])
    except struct.error as e:
        raise ValueError(f"malformed resume hello reply: {e}") from e
    if len(instance) != n or n == 0 or n > 64:
        raise ValueError("malformed resume hello reply")
    return instance, int(grace)


def pack_counts(received: int, eof: bool) -> bytes:
    return struct.pack(">QB", received, 1 if eof else 0)


def unpack_counts(data: bytes) -> tuple[int, bool]:
    if len(data) < 9:
        raise ValueError("malformed resume counts")
    received, eof = struct.unpack(">QB", data[:9])
    if received > MAX_COUNT or eof > 1:
        raise ValueError("malformed resume counts")
    return int(received), bool(eof)


def pack_offer(offer: Offer) -> bytes:
    return struct.pack(">L", len(offer.sid)) + offer.sid + pack_counts(offer.received, offer.eof)


def unpack_offer(data: bytes) -> Offer:
    try:
        (n,) = struct.unpack(">L", data[:4])
    except struct.error as e:
        raise ValueError("malformed resume offer") from e
    sid = data[4:4 + n]
    if n != SID_LEN or len(sid) != n:
        raise ValueError("malformed resume offer")
    received, eof = unpack_counts(data[4 + n:])
    return Offer(sid, received, eof)


def pack_sid(sid: bytes) -> bytes:
    return struct.pack(">L", len(sid)) + sid


def split_sid(data: bytes) -> tuple[bytes, bytes]:
    """``(data before the trailing session id, session id)`` of a resumable open: the
    ``forwarded-tcpip`` fields are parsed by the caller from the first part."""
    if len(data) < 4 + SID_LEN:
        raise ValueError("malformed resumable open")
    sid = data[-SID_LEN:]
    (n,) = struct.unpack(">L", data[-SID_LEN - 4:-SID_LEN])
    if n != SID_LEN:
        raise ValueError("malformed resumable open")
    return data[:-SID_LEN - 4], sid
