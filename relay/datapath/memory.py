"""Giving freed memory back to the system after a burst (glibc's ``malloc_trim``).

When a link dies under load, what was in flight on it (the packets queued per
channel for the congested link, its transport's write buffer, the reads on their way)
is freed at once, while the held sessions' replay buffers stay.  glibc keeps freed
heap memory mapped for reuse and returns only the top of the heap, so without a trim
the process would stay as large as that burst for the whole outage, above the one
window per session that held sessions are promised to cost (docs/resilience.md;
measured: 0.3-0.6 windows per session more with 100 held at a 1 MiB window).
``malloc_trim(0)`` returns every free page in the heap, wherever it is.  Elsewhere
(musl, macOS) there is no such call and only the collection below is done.

Much of a dead link is not even freed yet: its connection and transport refer to each
other, and each channel to itself through its ``opened`` Deferred, so they wait for
the cyclic garbage collector, with the packets still queued in them.  A full
collection first frees those (measured: 0.1-0.2 windows per session of the 100).
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable


def _find_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_freed_memory() -> bool:
    """Free what only reference cycles keep, then return the heap's free pages to the
    system; whether any were (False where the C library cannot)."""
    gc.collect()
    trim = _find_trim()
    return bool(trim(0)) if trim is not None else False
