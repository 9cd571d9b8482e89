"""The relay's sharing shell (relay.server.sharing) with task.Clock: a rate-limited
user's sources are paused for as long as its bucket's debt, bridges and spliced pairs
alike, and shares and limits follow the grants on refresh."""

from __future__ import annotations

from twisted.internet import task

from relay.core.grants import USER, Principal
from relay.server.sharing import RATE, SPLICE_POLL, Sharing


class Grants:
    def __init__(self, *principals: Principal) -> None:
        self.list = list(principals)

    def principals(self) -> list[Principal]:
        return self.list


def user(name: str, **kw: object) -> Principal:
    return Principal(USER, name, (), frozenset(), 10, **kw)  # type: ignore[arg-type]


class Source:
    def __init__(self) -> None:
        self.paused: set[str] = set()

    def pauseReading(self, reason: str) -> None:
        self.paused.add(reason)

    def resumeReading(self, reason: str) -> None:
        self.paused.discard(reason)


def test_a_bridge_source_pauses_for_the_debt_then_resumes() -> None:
    clock = task.Clock()
    sharing = Sharing(Grants(user("alice", rate_limit=1000, rate_burst=1000)), clock)
    src, other = Source(), Source()
    limiter = sharing.limiter("alice", src)
    assert limiter is not None and sharing.limiter("bob", src) is None
    limiter(src, 1000)  # the burst: no pause
    assert src.paused == set()
    limiter(src, 500)  # 0.5 s of debt
    assert src.paused == {RATE}
    clock.advance(0.49)
    assert src.paused == {RATE}
    clock.advance(0.02)
    assert src.paused == set()
    limiter(other, 2000)  # the other direction has its own bucket: 1 s of debt
    assert other.paused == {RATE}
    limiter.release()  # type: ignore[attr-defined]
    assert clock.getDelayedCalls() == []


def test_a_spliced_pair_pauses_the_direction_in_debt() -> None:
    clock = task.Clock()
    sharing = Sharing(Grants(user("alice", rate_limit=1_000_000, rate_burst=100_000)), clock)
    counts = [0, 0]
    pauses: list[tuple[bool, bool]] = []
    stop = sharing.limitSpliced("alice", lambda: (counts[0], counts[1]),
                                lambda up, down: pauses.append((up, down)))
    assert stop is not None
    counts[0] = 600_000  # 0.5 s of debt to the service
    clock.advance(SPLICE_POLL)
    assert pauses == [(True, False)]
    clock.advance(0.5)
    assert pauses == [(True, False), (False, False)]
    stop()
    assert clock.getDelayedCalls() == []


def test_refresh_follows_the_grants() -> None:
    clock = task.Clock()
    grants = Grants(user("alice", share=2.0), user("bob", rate_limit=5000))
    sharing = Sharing(grants, clock)
    assert sharing.weight("alice") == 2.0 and sharing.weight("bob") == 1.0
    assert sharing.status()["rate_limits"]["bob"]["rate"] == 5000
    grants.list = [user("alice"), user("bob")]
    sharing.refresh()
    assert sharing.weight("alice") == 1.0
    assert sharing.status() == {"shares": {}, "rate_limits": {}}
