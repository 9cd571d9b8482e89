"""The replay buffer (relay.core.replay): the bytes kept for a resume, in blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.replay import BLOCK, ReplayBuffer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3 * BLOCK)), max_size=40))
def test_it_holds_exactly_what_was_appended_and_not_dropped(ops: list[tuple[bool, int]]) -> None:
    """Against a plain bytearray: same bytes, same length, and never more than two
    blocks beyond what it holds allocated (the slack the RSS bound allows for)."""
    buf, model, counter = ReplayBuffer(), bytearray(), 0
    for is_append, n in ops:
        if is_append:
            data = bytes((counter + i) % 251 for i in range(n))
            counter += n
            buf.append(data)
            model += data
        else:
            buf.drop(n)
            del model[:n]
        assert len(buf) == len(model)
        assert b"".join(buf.chunks()) == bytes(model)
        assert len(buf._blocks) * BLOCK < len(model) + 2 * BLOCK
    buf.clear()
    assert len(buf) == 0 and buf.chunks() == [] and not buf


def test_blocks_are_freed_as_soon_as_every_byte_in_them_is_dropped() -> None:
    buf = ReplayBuffer()
    buf.append(b"x" * (BLOCK * 2 + 10))
    assert len(buf._blocks) == 3
    buf.drop(BLOCK - 1)
    assert len(buf._blocks) == 3
    buf.drop(1)
    assert len(buf._blocks) == 2
    buf.drop(BLOCK + 10)
    assert len(buf._blocks) == 0 and len(buf) == 0
    buf.drop(5)  # more than held: nothing to drop
    buf.append(b"abc")
    assert buf.chunks() == [b"abc"]
