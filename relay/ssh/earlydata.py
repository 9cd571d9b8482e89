"""A channel's first bytes sent before its open is confirmed (``early-data@labrelay``).

Why: a stock user's ``ssh -L``/``ssh -J`` session is confirmed by the relay before its
agent answered (relay.core.earlyopen), so her first bytes reach the relay while the
agent is still connecting the target.  Without this they wait at the relay for the
agent's confirmation, and then cross the link: one relay turn and one agent wake-up on
every new session's first echo (docs/performance.md, round 9).  An agent that says
``early-data-ok@labrelay`` takes them at once instead, and writes them to the target
as soon as it is connected.

The rules (both ends are labrelay's; a stock peer never sees any of it):

- only the relay sends them, only on a channel it opened, only before it has read the
  agent's answer, and only as a prefix of the channel's stream: once a chunk is not
  sent early, nothing after it is (:class:`EarlySend`);
- they count in the channel's window as if they were ``CHANNEL_DATA``: the agent
  takes them out of the window it confirmed, the relay out of the window it was
  confirmed, when the bridge writes them (``BridgedChannel.write`` skips them then);
- at most :data:`relay.ssh.wire.EARLY_LIMIT` per channel; more is a protocol error;
- for an open the agent has not answered yet they wait at the agent (bounded by that
  limit); for an open it refused, or a channel already closed, they are dropped (the
  relay may send them before it has read the refusal).

:class:`EarlyIntake` is the agent's side of that (no I/O: its connection acts on what
each call returns).
"""

from __future__ import annotations

from typing import Any

from relay.ssh.wire import EARLY_LIMIT


class EarlyError(Exception):
    """The relay broke the rules (more than the limit, or beyond the window)."""


class EarlySend:
    """The relay's side, per channel it opened to an agent that takes early bytes:
    how many went out early, and whether more may (a prefix only)."""

    __slots__ = ("limit", "open", "sent", "skip")

    def __init__(self, limit: int) -> None:
        self.limit = min(limit, EARLY_LIMIT)
        self.sent = 0
        self.skip = 0  # sent early, not yet written by the bridge
        self.open = self.limit > 0

    def take(self, n: int) -> bool:
        """Whether ``n`` more bytes go early (True: count them as sent).  A chunk that
        does not fit closes the early phase for good, so what went early is a prefix."""
        if not self.open:
            return False
        if self.sent + n > self.limit:
            self.open = False
            return False
        self.sent += n
        self.skip += n
        return True

    def skipped(self, n: int) -> int:
        """The bridge writes ``n`` bytes: how many of them, from the start, went early
        already (so are not sent again)."""
        k = min(n, self.skip)
        self.skip -= k
        return k

    def close(self) -> None:
        """The agent answered (or the channel ended): nothing more goes early."""
        self.open = False


class EarlyFeed:
    """The relay's side, per session: her first bytes handed to the agent's channel
    (``BridgedChannel.sendEarly``) as they arrive, until the agent answers or the
    session's bridge takes over, counted in the relay's ``early_data_*`` counters.

    The :class:`relay.datapath.bridge.EarlySink` of her side (her channel's, or a public
    port's connection's) on the link route."""

    __slots__ = ("carried", "channel", "counters", "live")

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        self.channel: Any = None  # the agent's channel, before it answered
        self.carried = False
        self.live = True

    def pending(self, channel: Any, holding: bool) -> None:
        """The agent's channel is open-pending and takes early bytes; ``holding``: some
        of hers are held already, so what would go now is no prefix (none go)."""
        if not holding:
            self.channel = channel

    def offer(self, data: bytes) -> None:
        """Her next bytes: sent on now if the agent's channel still takes them."""
        if self.live and self.channel is not None and self.channel.sendEarly(data):
            if not self.carried:
                self.carried = True
                self.counters["early_data_sessions"] += 1
            self.counters["early_data_bytes"] += len(data)

    def stop(self) -> int:
        """The bridge (or the session's end) takes over: nothing more goes early.
        Returns 0: the bridge writes what went early to the agent's channel again, which
        skips it (``BridgedChannel.write``), so that it counts in that channel's window."""
        self.live = False
        self.channel = None
        return 0


class EarlyIntake:
    """The agent's side: early bytes by the relay's channel id, for opens not yet
    answered (held here) and channels this end confirmed (delivered at once)."""

    __slots__ = ("_channels", "_pending", "limit")

    def __init__(self, limit: int = EARLY_LIMIT) -> None:
        self.limit = min(limit, EARLY_LIMIT)
        self._pending: dict[int, list[bytes]] = {}  # opens being answered
        # confirmed, by the relay's id: [channel, early bytes it took]
        self._channels: dict[int, list[Any]] = {}

    def opening(self, remote: int) -> None:
        """An open from the relay (its channel ``remote``) is being answered."""
        self._pending[remote] = []

    def confirmed(self, remote: int, channel: Any) -> list[bytes]:
        """The open of ``remote`` was confirmed as ``channel``: the early bytes that
        arrived meanwhile, to deliver now (in order)."""
        held = self._pending.pop(remote, None) or []
        self._channels[remote] = [channel, sum(map(len, held))]
        return held

    def refused(self, remote: int) -> None:
        """The open of ``remote`` was refused: what arrived for it is dropped."""
        self._pending.pop(remote, None)

    def closed(self, remote: int | None) -> None:
        if remote is not None:
            self._channels.pop(remote, None)

    def clear(self) -> None:
        self._pending.clear()
        self._channels.clear()

    def received(self, remote: int, data: bytes) -> Any:
        """Early bytes for the relay's channel ``remote``: the confirmed channel to
        deliver them to, or None (held for an open being answered, or dropped: an open
        refused or a channel closed already).  Raises EarlyError past the limit."""
        entry = self._channels.get(remote)
        if entry is not None:
            channel, taken = entry
            if taken + len(data) > self.limit or len(data) > channel.localWindowLeft:
                raise EarlyError(f"early data beyond the limit on channel {channel.id}")
            entry[1] = taken + len(data)
            return channel
        held = self._pending.get(remote)
        if held is not None:
            if sum(map(len, held)) + len(data) > self.limit:
                raise EarlyError("early data beyond the limit for an open being answered")
            held.append(data)
        return None
