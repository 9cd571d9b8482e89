"""``retry_policy``: capped exponential delays with bounded jitter that never give up."""

from __future__ import annotations

import pytest

from relay.config.schema import Backoff
from relay.core.backoff import retry_policy


def no_jitter() -> float:
    return 0.0


def full_jitter() -> float:
    return 1.0


def test_delays_grow_by_factor_from_initial() -> None:
    policy = retry_policy(Backoff(initial=1.0, maximum=1000.0, factor=2.0, jitter=0.5), no_jitter)
    assert [policy(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_delays_are_capped_at_maximum() -> None:
    policy = retry_policy(Backoff(initial=1.0, maximum=10.0, factor=3.0, jitter=0.0), no_jitter)
    assert [policy(n) for n in range(1, 6)] == [1.0, 3.0, 9.0, 10.0, 10.0]


def test_defaults_follow_initial_times_factor_power() -> None:
    backoff = Backoff()
    policy = retry_policy(backoff, no_jitter)
    for n in range(1, 40):
        expected = min(backoff.initial * backoff.factor ** (n - 1), backoff.maximum)
        assert policy(n) == pytest.approx(expected)


def test_zero_failures_waits_the_initial_delay() -> None:
    policy = retry_policy(Backoff(initial=0.5, maximum=10.0, factor=2.0, jitter=0.0), no_jitter)
    assert policy(0) == 0.5


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_jitter_adds_at_most_jitter_times_the_delay(n: int) -> None:
    backoff = Backoff(initial=2.0, maximum=60.0, factor=2.0, jitter=0.25)
    base = retry_policy(backoff, no_jitter)(n)
    assert retry_policy(backoff, full_jitter)(n) == pytest.approx(base * 1.25)
    assert retry_policy(backoff, lambda: 0.5)(n) == pytest.approx(base * 1.125)


def test_jitter_uses_one_random_draw_per_delay() -> None:
    draws: list[float] = []

    def rand() -> float:
        draws.append(0.5)
        return 0.5

    policy = retry_policy(Backoff(jitter=0.2), rand)
    policy(1)
    policy(2)
    assert len(draws) == 2


def test_slow_factor_still_reaches_the_cap() -> None:
    """A factor close to 1 needs many attempts to grow; growth must not stall short
    of ``maximum`` (an exponent clamp at 64 once left 1.05**64 = 22.7 s for ever)."""
    policy = retry_policy(Backoff(initial=1.0, maximum=60.0, factor=1.05, jitter=0.0), no_jitter)
    assert policy(80) < 60.0
    assert policy(200) == 60.0


@pytest.mark.parametrize("n", [10**3, 10**6, 10**9, 10**30])
def test_never_gives_up_even_after_huge_failure_counts(n: int) -> None:
    for factor in (1.0, 1.5, 1e5):
        backoff = Backoff(initial=1.0, maximum=60.0, factor=factor, jitter=0.2)
        low = retry_policy(backoff, no_jitter)(n)
        high = retry_policy(backoff, full_jitter)(n)
        assert low == (1.0 if factor == 1.0 else 60.0)
        assert high == pytest.approx(low * 1.2)
