"""relay.server.acceptwatch: Twisted's accept-failure events become one
``relay_accept_failed`` per burst, with a count, and ``accept_failed`` counts them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from relay.server.acceptwatch import AcceptWatch, accept_failure, describe


def _twisted(fmt: str, **fields: Any) -> dict[str, Any]:
    return {"log_namespace": "twisted.internet.tcp.Port", "log_format": fmt, **fields}


COULD_NOT = "Could not accept new connection ({acceptError})"
CLOSED = "EMFILE recovery: Closed socket from {address}"


def test_twisteds_accept_failures_are_recognised() -> None:
    assert accept_failure(_twisted(CLOSED, address=("127.0.0.1", 5))) == "EMFILE"
    assert accept_failure(_twisted(COULD_NOT, acceptError="ENFILE")) == "ENFILE"
    assert accept_failure(_twisted(COULD_NOT, acceptError="EMFILE")) == "EMFILE"
    # a client that reset before its accept: nothing to tell the operator
    assert accept_failure(_twisted(COULD_NOT, acceptError="ECONNABORTED")) is None
    # Twisted's other EMFILE lines are not a lost connection each
    releasing = "EMFILE encountered; releasing reserved file descriptor."
    assert accept_failure(_twisted(releasing)) is None
    assert accept_failure(_twisted("Re-reserving EMFILE recovery file descriptor.")) is None
    # the same words from anyone but Twisted
    assert accept_failure({"log_namespace": "relay.x", "log_format": CLOSED}) is None


def test_describe_gives_the_words() -> None:
    assert describe("EMFILE") == "Too many open files (EMFILE)"
    assert describe("ENFILE").endswith("(ENFILE)")
    assert describe("ENOSUCH") == "accept failed (ENOSUCH)"


@pytest.fixture
def said() -> Iterator[list[dict[str, Any]]]:
    """The ``relay_accept_failed`` events logged while a test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "relay_accept_failed":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_one_line_per_burst_then_the_count(said: list[dict[str, Any]]) -> None:
    clock = Clock()
    counters = {"accept_failed": 0}
    watch = AcceptWatch(clock, counters, window=10.0)
    for _ in range(5):
        watch(_twisted(CLOSED, address=("127.0.0.1", 1)))
    watch({"log_namespace": "relay.x", "log_format": "unrelated"})
    assert counters["accept_failed"] == 5
    assert len(said) == 1
    assert said[0]["errno"] == "EMFILE" and said[0]["count"] == 1
    assert "Too many open files" in said[0]["why"]
    assert "LimitNOFILE" in said[0]["log_format"]
    clock.advance(10.0)
    assert [e["count"] for e in said] == [1, 4]
    # a later failure starts a new burst at once
    watch(_twisted(COULD_NOT, acceptError="ENFILE"))
    assert [e["errno"] for e in said] == ["EMFILE", "EMFILE", "ENFILE"]
    watch(_twisted(COULD_NOT, acceptError="ENFILE"))
    watch.stop()  # says the rest now, leaves no timer
    assert [e["count"] for e in said] == [1, 4, 1, 1]
    assert clock.getDelayedCalls() == []
