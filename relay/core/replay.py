"""A resumable session's replay buffer: bytes sent and not yet acknowledged (no I/O).

Written at the end, cut at the front as the peer acknowledges, read whole only when
a session resumes.  It is kept in fixed-size blocks, each allocated once at its full
size and freed whole once every byte in it was acknowledged, because the memory a
held session costs is what the process keeps *resident*, not what the buffer
holds.  Two simpler layouts measured worse with 100 sessions held at a 1 MiB window
(tests/integration/test_resume.py):

* a chunk per write (the reads of the source, of every size) left the heap
  fragmented between the link's short-lived packet buffers: 1.3 windows per session;
* one ``bytearray`` appended to and cut at the front keeps the pages before its
  front resident until it next grows, and grows by reallocating up to 1/8 more and
  copying, each copy a new large allocation: 1.14-1.28 windows per session.

With blocks, what is resident is the bytes kept plus less than two blocks (the
first one's acknowledged part and the last one's unfilled part), and every block is
the same size, so a freed one is reused as is by the next.
"""

from __future__ import annotations

from collections import deque

BLOCK = 16 * 1024
"""Bytes per block: small against any window (the slack is under two blocks per
session), large enough that a 64 KiB read is four slice copies."""


class ReplayBuffer:
    """Bytes in order; :meth:`append` at the end, :meth:`drop` from the front."""

    __slots__ = ("_blocks", "_fill", "_head", "_size")

    def __init__(self) -> None:
        self._blocks: deque[bytearray] = deque()
        self._head = 0  # bytes of the first block already dropped
        self._fill = BLOCK  # bytes of the last block in use (BLOCK: start a new one)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        n, off = len(view), 0
        blocks = self._blocks
        while off < n:
            if self._fill == BLOCK:
                blocks.append(bytearray(BLOCK))
                self._fill = 0
            take = min(BLOCK - self._fill, n - off)
            blocks[-1][self._fill:self._fill + take] = view[off:off + take]
            self._fill += take
            off += take
        self._size += n

    def drop(self, nbytes: int) -> None:
        """Forget the first ``nbytes`` (acknowledged); at most what is held."""
        nbytes = min(nbytes, self._size)
        self._size -= nbytes
        head = self._head + nbytes
        blocks = self._blocks
        while blocks:
            end = self._fill if len(blocks) == 1 else BLOCK
            if head < end:
                break
            head -= end
            blocks.popleft()
        if not blocks:
            head, self._fill = 0, BLOCK
        self._head = head

    def chunks(self) -> list[bytes]:
        """What is held, in order (for a retransmission)."""
        out = []
        last = len(self._blocks) - 1
        for i, block in enumerate(self._blocks):
            start = self._head if i == 0 else 0
            end = self._fill if i == last else BLOCK
            if end > start:
                out.append(bytes(memoryview(block)[start:end]))
        return out

    def clear(self) -> None:
        self._blocks.clear()
        self._head, self._fill, self._size = 0, BLOCK, 0
