"""Retry delays for links and refused forwards: capped exponential backoff with jitter.

The policy has the signature ``ClientService``'s ``retryPolicy`` expects (the
number of failed attempts in a row, from 1, to seconds), so the link and every
forward retry on the same schedule.  It never gives up: a lab link that cannot
reach its relay at boot keeps trying until it can.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from relay.config.schema import Backoff


def retry_policy(
    backoff: Backoff, rand: Callable[[], float] = random.random
) -> Callable[[int], float]:
    """Delay before attempt ``n + 1`` after ``n`` failures in a row.

    ``initial * factor**(n-1)``, capped at ``maximum``, plus up to ``jitter`` of
    itself so many agents restarted together do not reconnect in lockstep.
    """

    def policy(failures: int) -> float:
        exponent = max(failures - 1, 0)
        try:
            grown = backoff.initial * backoff.factor**exponent
        except OverflowError:  # far past the cap: a float power overflows, not saturates
            grown = backoff.maximum
        delay = min(grown, backoff.maximum)
        return delay + delay * backoff.jitter * rand()

    return policy
