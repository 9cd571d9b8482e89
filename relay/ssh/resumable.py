"""Sessions that survive the link: the SSH shell of :mod:`relay.core.resume`.

A :class:`ResumableSide` is the bridge side of one resumable session's channel,
whichever channel carries it now.  The :class:`relay.datapath.bridge.Bridge` sees one
side for the session's whole life; the side is in turn the bridge of its current
:class:`relay.ssh.channels.BridgedChannel`, so the flow control is the channel's own
(DESIGN §4: the window is re-opened only for bytes handed on downstream, and that
``WINDOW_ADJUST`` is the acknowledgement the replay buffer is trimmed by).

When the link goes (the channel closes without the peer's ``CHANNEL_CLOSE``), the side
*holds*: it pauses the bridge's other side (the user's TCP connection or channel at the
relay, the target's connection at the agent), keeps the bytes the peer has not
acknowledged, and waits for the grace period.  :meth:`ResumableSide.resumeOn` puts it
on a new channel: the bytes the peer did not receive are sent again, the paused side
reads again, the bridge never noticed.  Past the grace period it ends as any broken
session does: the other side is aborted (a reset), never closed as if complete.

:class:`ResumableSessions` is one end's table of them (the relay's, or one link's at the
agent), with the timers and the log events of held, resumed and expired sessions.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.conch import error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.core.resume import (
    REPLAY_LIMIT,
    RESUME_CHANNEL,
    SOURCE_READ,
    Offer,
    Refusal,
    ResumeRefused,
    ResumeTable,
    Resumption,
    Stream,
    StreamState,
    may_resume,
    pack_counts,
    pack_offer,
    unpack_counts,
    unpack_offer,
)
from relay.datapath.memory import release_freed_memory
from relay.ssh.channels import BridgedChannel


def refused_by_relay(f: Failure) -> bool:
    """Whether a channel open failed because the peer refused it (an open failure with
    a reason code), not because the connection went."""
    e = f.value
    return isinstance(e, error.ConchError) and isinstance(e.data, int)


HELD = "held"
"""The pause reason a held session puts on the bridge's other side."""
RELEASE_EVERY = 10.0
"""Seconds between two releases of freed memory (a full garbage collection, then a
trim: tens of milliseconds in a large process), however often links are lost."""


class ResumableSide:
    """One resumable session's end of a bridge (see the module docstring)."""

    __slots__ = (
        "_closeAfter",
        "_endedUnattached",
        "_pauses",
        "_share",
        "_timer",
        "bridge",
        "channel",
        "label",
        "row",
        "sessions",
        "stream",
    )

    def __init__(self, sessions: ResumableSessions, stream: Stream,
                 channel: BridgedChannel, label: str) -> None:
        self.sessions = sessions
        self.stream = stream
        self.label = label  # what logs and status call it: "SERVICE from ORIGIN"
        self.channel: BridgedChannel | None = channel
        self.bridge: Any = None
        self.row: Any = None  # the relay's session row, for its owner to update
        self._pauses: frozenset[str] = frozenset()  # a new set only when one is paused
        self._closeAfter = False  # the bridge asked close(): again after a resume
        # Ended (aborted) before a bridge attached it: how, told to the bridge at attach
        # as every Side does (a bridge built with its other side already closed aborts
        # this one while making itself).
        self._endedUnattached: bool | None = None
        self._timer: IDelayedCall | None = None
        # Whose bytes these are on a congested link and their weight (the channel's
        # share tag, relay.ssh.connection): kept across a hold for the next channel.
        self._share = ("", 1.0)
        channel.onCredit = self._credited
        channel.capWindow(REPLAY_LIMIT, SOURCE_READ)

    @property
    def sid(self) -> bytes:
        return self.stream.sid

    @property
    def held(self) -> bool:
        return self.stream.state is StreamState.HELD

    # Side (what the bridge calls)

    def attach(self, bridge: Any) -> None:
        self.bridge = bridge
        if self.channel is not None:
            self.channel.attach(self)  # type: ignore[arg-type]  # we are its bridge
        elif self._endedUnattached is not None:
            self._closed(self._endedUnattached)

    def write(self, data: bytes) -> None:
        if self.stream.state is StreamState.ENDED:
            return
        self.stream.wrote(data)
        if self.channel is not None:
            self.channel.write(data)

    def consumed(self, nbytes: int) -> None:
        if self.channel is not None:
            self.channel.consumed(nbytes)

    def pauseReading(self, reason: str) -> None:
        self._pauses = self._pauses | {reason}
        if self.channel is not None:
            self.channel.pauseReading(reason)

    def resumeReading(self, reason: str) -> None:
        self._pauses = self._pauses - {reason}
        if self.channel is not None:
            self.channel.resumeReading(reason)

    def writeEOF(self) -> None:
        self.stream.wrote_eof()
        if self.channel is not None:
            self.channel.writeEOF()

    def close(self) -> None:
        self._closeAfter = True  # if held: once the rest and the EOF were delivered
        if self.channel is not None:
            self.channel.close()

    def abort(self) -> None:
        channel, self.channel = self.channel, None
        self._end("aborted")
        if channel is not None:
            channel.abort()
        self._closed(clean=False)

    # the channel's events (we are its bridge)

    def dataReceived(self, src: BridgedChannel, data: bytes) -> None:
        if src is not self.channel or self.bridge is None:
            return  # an abandoned channel of a link that is gone
        self.stream.got(len(data))
        self.bridge.dataReceived(self, data)

    def eofReceived(self, src: BridgedChannel) -> None:
        if src is self.channel and self.bridge is not None:
            self.stream.got_eof()
            self.bridge.eofReceived(self)

    def sinkFull(self, dst: BridgedChannel) -> None:
        if dst is self.channel and self.bridge is not None:
            self.bridge.sinkFull(self)

    def sinkDrained(self, dst: BridgedChannel) -> None:
        if dst is self.channel and self.bridge is not None:
            self.bridge.sinkDrained(self)

    def sideClosed(self, side: BridgedChannel, clean: bool = True) -> None:
        if side is not self.channel:
            return
        if side.peerClosed:  # the peer closed it: the session is over
            self.channel = None
            self._end("closed")
            self._closed(clean)
            return
        self._hold(side)  # the connection under it went

    def _credited(self, nbytes: int) -> None:
        try:
            self.stream.credited(nbytes)
        except ResumeRefused:
            self.sessions.log.warn(
                "{label}: the peer acknowledged bytes never sent; resetting the session",
                event="session_resume_refused", label=self.label, why=Refusal.BEYOND.value)
            self.abort()

    # holding and resuming

    def _keepShare(self, channel: BridgedChannel) -> None:
        if channel.shareUser:
            self._share = (channel.shareUser, channel.shareWeight)

    def _hold(self, old: BridgedChannel) -> None:
        self._keepShare(old)
        self.channel = None
        if not self.stream.lost(self.sessions.clock.seconds(), self.sessions.grace):
            return
        if self.bridge is not None:
            self.bridge.peer(self).pauseReading(HELD)
        self._timer = self.sessions.clock.callLater(self.sessions.grace, self._expire)
        self.sessions.held(self)

    def detach(self) -> None:
        """The peer resumes it on a new link while this end still had the old channel
        (it had not noticed that link die): abandon that channel, as if lost."""
        old, self.channel = self.channel, None
        if old is None:
            return
        old.onCredit = None
        self._keepShare(old)
        self.stream.lost(self.sessions.clock.seconds(), self.sessions.grace)
        if self.bridge is not None:
            self.bridge.peer(self).pauseReading(HELD)

    def resumeOn(self, channel: BridgedChannel, plan: Resumption) -> None:
        """Carry on over ``channel``: send again what the peer did not receive (and the
        EOF, and the close, if they were sent or asked for), read again."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.channel = channel
        channel.onCredit = self._credited
        channel.capWindow(REPLAY_LIMIT, SOURCE_READ)
        if self._share[0]:  # scheduled as its user's again on the new link
            channel.tagShare(*self._share)
        if self.bridge is not None:
            self.bridge.sinkDrained(self)  # the old channel's congestion went with it
        channel.attach(self)  # type: ignore[arg-type]  # says so if this one is congested
        for reason in self._pauses:
            channel.pauseReading(reason)
        for chunk in plan.retransmit:
            channel.write(chunk)
        if plan.resend_eof:
            channel.writeEOF()
        if self._closeAfter:
            channel.close()
        if self.bridge is not None:
            self.bridge.peer(self).resumeReading(HELD)
        self.sessions.resumed(self, plan)

    def refused(self, why: str) -> None:
        """The resume was refused: a session this end had closed already is done; any
        other ends with a reset."""
        clean = self._closeAfter and self.stream.eof_received
        self._end(why)
        self._closed(clean=clean)

    def _expire(self) -> None:
        self._timer = None
        if self.stream.expired(self.sessions.clock.seconds()):
            self.sessions.expired(self)
            self._closed(clean=False)

    def _end(self, why: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.stream.end(why)
        self.sessions.forget(self)

    def _closed(self, clean: bool) -> None:
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            self._endedUnattached = None
            bridge.peer(self).resumeReading(HELD)
            bridge.sideClosed(self, clean=clean)
        else:
            self._endedUnattached = clean


class ResumableSessions:
    """One end's resumable sessions (the relay's, or one agent link's): the
    :class:`relay.core.resume.ResumeTable` and the sides that carry its streams."""

    log = Logger()

    def __init__(self, clock: IReactorTime, grace: float, where: str,
                 on_resumed: Callable[[ResumableSide], object] | None = None,
                 release: Callable[[], bool] = release_freed_memory,
                 vet: Callable[[ResumableSide, object], str | None] | None = None) -> None:
        self.clock = clock
        self.grace = grace
        self.where = where  # "relay" or "link NAME": the events' prefix
        self.table = ResumeTable()
        self.sides: dict[bytes, ResumableSide] = {}
        self._on_resumed = on_resumed
        # Whether the peer (its owner) may have the session back now: why not, or None.
        self._vet = vet
        self.opening = 0  # resumable channels asked for, not yet confirmed or refused
        self._opening_of: dict[object, int] = {}  # the same per owner key
        self._release = release
        self._settle: IDelayedCall | None = None
        self._released_at: float | None = None

    @property
    def count(self) -> int:
        """Resumable sessions open, held or being opened (what a cap counts)."""
        return len(self.table) + self.opening

    def count_of(self, key: object) -> int:
        """The same for the sessions whose owner is ``key``'s (an owner is ``(key,
        instance, login)`` at the relay): a cap per agent key, whatever its login."""
        return self._opening_of.get(key, 0) + sum(
            1 for s in self.sides.values()
            if isinstance(s.stream.owner, tuple) and s.stream.owner[0] == key)

    def reserve(self, key: object) -> None:
        """A resumable channel for ``key``'s agent is being opened: counted already."""
        self.opening += 1
        self._opening_of[key] = self._opening_of.get(key, 0) + 1

    def unreserve(self, key: object) -> None:
        """That channel was confirmed (then :meth:`open` counts it) or refused."""
        self.opening -= 1
        left = self._opening_of.get(key, 0) - 1
        if left > 0:
            self._opening_of[key] = left
        else:
            self._opening_of.pop(key, None)

    @property
    def enabled(self) -> bool:
        return self.grace > 0

    def new_sid(self) -> bytes:
        while True:
            sid = secrets.token_bytes(16)
            if sid not in self.table:
                return sid

    def open(self, sid: bytes, owner: object, channel: BridgedChannel,
             label: str) -> ResumableSide:
        side = ResumableSide(self, self.table.open(sid, owner), channel, label)
        self.sides[sid] = side
        return side

    def offered(self, offer: Offer, owner: object) -> tuple[ResumableSide, Resumption]:
        """The peer offers to resume ``offer.sid``: the side and what to send again, or
        :class:`ResumeRefused` (and the session ended, unless it is another key's)."""
        side = self.sides.get(offer.sid)
        if side is not None and may_resume(side.stream.owner, owner):
            side.detach()
            why = self._vet(side, owner) if self._vet is not None else None
            if why is not None:
                side.refused(why)
                raise ResumeRefused(Refusal.NOT_GRANTED, why)
        try:
            stream, plan = self.table.offered(offer, owner, self.clock.seconds())
        except ResumeRefused as e:
            if side is not None and e.why is not Refusal.NOT_YOURS:
                side.refused(str(e))
            raise
        return self.sides[stream.sid], plan

    # the agent's end: offer each held session on a new connection

    def resumeOver(self, conn: Any, window: int, max_packet: int) -> None:
        """Offer every held session on ``conn`` (a new link to the same relay): one
        ``resume-session@labrelay`` channel each, whose confirmation carries the
        relay's counts."""
        for side in self.held_sides():
            self._offer(side, conn, window, max_packet)

    def _offer(self, side: ResumableSide, conn: Any, window: int, max_packet: int) -> None:
        channel = BridgedChannel(RESUME_CHANNEL, window=window, maxPacket=max_packet, conn=conn)
        conn.openChannel(channel, pack_offer(side.stream.offer()))

        def opened(ch: BridgedChannel) -> None:
            try:
                received, eof = unpack_counts(ch.openData)
                plan = side.stream.resume(Offer(side.sid, received, eof), self.clock.seconds())
            except (ValueError, ResumeRefused) as e:
                ch.abort()
                self.log.warn("{where}: session {label} cannot be resumed: {why}",
                              event="session_resume_refused", where=self.where,
                              label=side.label, sid=side.sid.hex()[:8], why=str(e))
                side.refused(str(e))
                return
            side.resumeOn(ch, plan)

        def failed(f: Failure) -> None:
            if not refused_by_relay(f):
                return  # the new link went too: still held, offered on the next one
            desc: Any = getattr(f.value, "value", "")
            why = desc.decode("utf-8", "replace") if isinstance(desc, bytes) else str(desc)
            self.log.warn("{where}: session {label} cannot be resumed: the relay refused: "
                          "{why}", event="session_resume_refused", where=self.where,
                          label=side.label, sid=side.sid.hex()[:8], why=why)
            side.refused(why)

        channel.opened.addCallbacks(opened, failed)

    # the relay's end: the agent offers one

    def accept(self, conn: Any, owner: object, window: int, max_packet: int,
               remote_window: int, remote_max_packet: int, data: bytes) -> BridgedChannel:
        """The agent opened ``resume-session@labrelay`` with ``data``: the channel to
        confirm (its data is this end's counts), or :class:`ResumeRefused`."""
        try:
            offer = unpack_offer(data)
        except ValueError as e:
            raise ResumeRefused(Refusal.MALFORMED) from e
        side, plan = self.offered(offer, owner)
        channel = BridgedChannel(RESUME_CHANNEL, window=window, maxPacket=max_packet,
                                 remoteWindow=remote_window, remoteMaxPacket=remote_max_packet,
                                 conn=conn)
        channel.specificData = pack_counts(side.stream.received, side.stream.eof_received)
        channel.opened.addCallback(lambda ch: side.resumeOn(ch, plan))
        return channel

    def held_sides(self) -> list[ResumableSide]:
        return [s for s in self.sides.values() if s.held]

    def status(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        return [{"session": s.label, "id": s.sid.hex()[:8], "age": round(s.stream.age(now), 3),
                 "unacked_bytes": s.stream.unacked, "expires_in":
                 round((s.stream.deadline or now) - now, 3)} for s in self.held_sides()]

    # events from the sides

    def held(self, side: ResumableSide) -> None:
        self.log.info("{where}: session {label} held for {grace:g}s: its link is gone",
                      event="session_held", where=self.where, label=side.label,
                      sid=side.sid.hex()[:8], grace=self.grace, unacked=side.stream.unacked)
        if self._settle is None:  # once per link lost: its sessions are held together
            self._settle = self.clock.callLater(0, self._settled)

    def _settled(self) -> None:
        """The sessions of a link just lost are held: what was in flight on that link is
        freed now, and given back (relay.datapath.memory), so that a held session costs
        what it keeps; then one event says what that is."""
        self._settle = None
        now = self.clock.seconds()
        released = False
        if self._released_at is None or now - self._released_at >= RELEASE_EVERY:
            self._released_at = now
            released = self._release()
        held = self.held_sides()
        self.log.info("{where}: {n} session(s) held, {replay} bytes kept to send again",
                      event="sessions_held_total", where=self.where, n=len(held),
                      replay=sum(s.stream.unacked for s in held), released=released)

    def resumed(self, side: ResumableSide, plan: Resumption) -> None:
        if self._on_resumed is not None:
            self._on_resumed(side)
        user = side.channel.shareUser if side.channel is not None else ""
        self.log.info("{where}: session {label} resumed after {outage:.1f}s "
                      "({resent} bytes sent again)", event="session_resumed",
                      where=self.where, label=side.label, sid=side.sid.hex()[:8],
                      outage=plan.outage, resent=plan.size, resend_eof=plan.resend_eof,
                      user=user)

    def expired(self, side: ResumableSide) -> None:
        self.log.warn("{where}: session {label} not resumed within {grace:g}s; resetting it",
                      event="session_hold_expired", where=self.where, label=side.label,
                      sid=side.sid.hex()[:8], grace=self.grace)
        self.forget(side)

    def forget(self, side: ResumableSide) -> None:
        if self.sides.get(side.sid) is side:
            del self.sides[side.sid]
        self.table.forget(side.stream)

    def end_all(self, why: str) -> int:
        """End every held session (the peer cannot resume them): reset each."""
        held = self.held_sides()
        for side in held:
            self.log.warn("{where}: session {label} cannot be resumed: {why}",
                          event="session_resume_refused", where=self.where, label=side.label,
                          sid=side.sid.hex()[:8], why=why)
            side.refused(why)
        return len(held)
