"""The native SSH receive loop (``csrc/sshopen.c``, built into the data path's C module
``relay.datapath._splice_c``): a run of AES-GCM ``CHANNEL_DATA`` packets of one channel
opened in one call, for :mod:`relay.ssh.aead`.

A stock ``ssh -J`` pushes a bulk stream through the relay as 32 KiB packets; opening
them one at a time in Python (parse, decrypt call, dispatch, copy out of the packet)
was most of the relay's CPU on that path (docs/benchmarks.md, issue 13).  Here one
call opens every consecutive packet of a read that belongs to the one channel the
caller names, within its window, into one buffer; it stops before the first packet it
does not take whole, which the caller's per-packet code then handles with the state
handed back (the nonce counter and the packet count).  The cipher is OpenSSL's EVP
AES-GCM from libcrypto, loaded by the C code with ``dlopen`` (so the wheel links no
libcrypto); chacha20-poly1305 and every other message stay on the Python path.

:func:`opener` is the one entry: a :class:`GCMRun` for a key, or None when the native
path is not to be used (the C module was not built, libcrypto could not be loaded, or
``LABRELAY_DATAPATH`` asks for the ``python``/``portable`` backend, which keeps the
pure-Python packet path too).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from relay.datapath import _splice
from relay.datapath.splicing import DatapathError, choose_backend


class Opened(NamedTuple):
    """What one run took: wire bytes, packets, and the channel's bytes (a memoryview of
    a buffer of its own, never reused)."""

    consumed: int
    packets: int
    data: memoryview


def native_enabled() -> bool:
    """Whether this process opens GCM packets natively (see the module docstring)."""
    if not _splice.AVAILABLE:
        return False
    try:
        if choose_backend().name != "c":
            return False
    except DatapathError:
        return False  # reported where the backend is chosen for the data path
    # a module built from older C sources (a stale in-place build) lacks the sealing
    # thread: the Python path then, never an AttributeError mid-session
    return hasattr(_splice.lib, "lr_gpump_seal") and bool(_splice.lib.lr_gcm_available())


class GCMRun:
    """``lr_gcm_open_run`` for one AES-GCM key (one direction of one transport)."""

    __slots__ = ("_ctx", "_run")

    def __init__(self, key: bytes) -> None:
        ffi, lib = _splice.ffi, _splice.lib
        ctx = lib.lr_gcm_new(key, len(key))
        if ctx == ffi.NULL:
            raise ValueError("libcrypto refused the AES-GCM key")
        self._ctx: Any = ffi.gc(ctx, lib.lr_gcm_free)
        self._run: Any = ffi.new("struct lr_gcm_run *")

    def open(self, data: bytes, pos: int, fixed: int, counter: int, channel: int,
             window: int, max_data: int, max_packet_length: int) -> tuple[Opened, int] | None:
        """Open the run at ``data[pos:]`` with the nonce ``(fixed, counter)``: the
        result and the counter after it, or None if OpenSSL failed (then the caller's
        own code opens the packets)."""
        ffi, lib = _splice.ffi, _splice.lib
        run = self._run
        run.counter = counter
        run.fixed = fixed
        run.channel = channel
        run.window = window
        run.max_data = max_data
        run.max_packet_length = max_packet_length
        size = len(data) - pos
        out = _ALLOC("unsigned char[]", size)
        src = ffi.from_buffer(data)
        if lib.lr_gcm_open_run(self._ctx, run, src + pos, size, out, size) != 0:
            return None
        view = memoryview(ffi.buffer(out, run.produced))  # keeps `out` alive
        return Opened(run.consumed, run.packets, view), int(run.counter)


_ALLOC: Any = (_splice.ffi.new_allocator(should_clear_after_alloc=False)
               if _splice.AVAILABLE else None)


class PumpState(NamedTuple):
    """The open-and-forward thread's counters (``struct lr_gpump_state``); the last
    eight are the reverse direction's (0 for a thread that only forwards)."""

    reason: int  # REASONS' key; RUNNING while it runs
    counter: int
    packets: int
    consumed: int
    written: int
    reads: int
    err: int
    ocounter: int = 0  # the outgoing nonce's invocation counter
    opackets: int = 0  # packets sealed (CHANNEL_DATA and the grants' WINDOW_ADJUST)
    oplain: int = 0  # their plaintext bytes
    sealed: int = 0  # channel bytes sealed for the user
    uwritten: int = 0  # sealed bytes written to the user
    adjusted: int = 0  # bytes the user's WINDOW_ADJUSTs credited
    granted: int = 0  # bytes of the grants it sealed
    dreads: int = 0  # reads of the data connection
    sgranted: int = 0  # bytes it granted by the channel's rule (``Seal.window_size``)
    credit: int = 0  # after it stopped: bytes written and not yet granted
    batched: int = 0  # times it turned SCHED_BATCH for bulk (csrc/gpump.c, BULK_BYTES)


class Seal(NamedTuple):
    """The reverse direction of a thread (``lr_gpump_seal``): the outgoing AES-GCM key
    and nonce, the user's channel id, what its window takes now and its maximum data
    per packet."""

    key: bytes
    fixed: int
    counter: int
    channel: int
    window: int
    max_data: int
    #: > 0: the thread grants the user's window itself by the channel's rule (once less
    #: than half of ``window_size`` is left, the bytes written since), starting with
    #: ``credit`` bytes not yet granted; 0: only Python's grants (``grant_send``)
    window_size: int = 0
    credit: int = 0


class Stopped(NamedTuple):
    """A thread's final state and the bytes it held, in stream order each."""

    state: PumpState
    left: bytes  # the user's wire bytes it did not consume
    pending: bytes  # channel bytes it opened and did not write to the data connection
    unsealed: bytes  # the data connection's bytes it read and did not seal
    unsent: bytes  # sealed bytes it did not write to the user


RUNNING = 0
#: Why the thread handed the stream back (``LR_GP_*`` in csrc/relay_sshopen.h).
REASONS = {0: "running", 1: "packet", 2: "user_eof", 3: "user_error", 4: "data_error",
           5: "stopped", 6: "crypto", 7: "congested", 8: "idle", 9: "data_eof",
           10: "data_read_error"}


class Pump:
    """``lr_gpump_*``: one pooled session's open-and-forward thread (csrc/gpump.c).

    It reads ``user_fd`` (a duplicate of it: Python may close its own at any time),
    opens the run of channel ``channel``'s ``CHANNEL_DATA`` packets and writes their
    bytes to (a duplicate of) ``data_fd``; :meth:`fileno` is an eventfd that becomes
    readable when there is news (:meth:`poll`).  :meth:`stop` ends it and hands back
    the bytes it had not consumed or written."""

    __slots__ = ("_p", "_st", "freed", "sealing", "self_grants")

    def __init__(self, key: bytes, fixed: int, counter: int, channel: int, window: int,
                 max_data: int, max_packet_length: int, user_fd: int, data_fd: int,
                 initial: bytes, report: int, seal: Seal | None = None) -> None:
        ffi, lib = _splice.ffi, _splice.lib
        p = lib.lr_gpump_start(key, len(key), fixed, counter, channel, window, max_data,
                               max_packet_length, user_fd, data_fd, initial, len(initial),
                               report)
        if p == ffi.NULL:
            raise OSError(ffi.errno, "the open-and-forward thread did not start")
        if seal is not None and lib.lr_gpump_seal(
                p, seal.key, len(seal.key), seal.fixed, seal.counter, seal.channel,
                seal.window, seal.max_data, seal.window_size, seal.credit) != 0:
            errno = ffi.errno
            lib.lr_gpump_free(p)
            raise OSError(errno, "the sealing direction could not be set up")
        if lib.lr_gpump_run(p) != 0:
            errno = ffi.errno
            lib.lr_gpump_free(p)
            raise OSError(errno, "the open-and-forward thread did not start")
        self.sealing = seal is not None
        self.self_grants = seal is not None and seal.window_size > 0
        self._p: Any = p
        self._st: Any = ffi.new("struct lr_gpump_state *")
        self.freed = False

    def fileno(self) -> int:
        return int(_splice.lib.lr_gpump_fd(self._p))

    def _state(self) -> PumpState:
        st = self._st
        return PumpState(int(st.reason), int(st.counter), int(st.packets), int(st.consumed),
                         int(st.written), int(st.reads), int(st.err), int(st.ocounter),
                         int(st.opackets), int(st.oplain), int(st.sealed), int(st.uwritten),
                         int(st.adjusted), int(st.granted), int(st.dreads), int(st.sgranted),
                         int(st.credit), int(st.batched))

    def poll(self) -> PumpState:
        """Clear the eventfd and read the counters (``reason`` is RUNNING while it runs)."""
        _splice.lib.lr_gpump_poll(self._p, self._st)
        return self._state()

    def grant(self, nbytes: int) -> None:
        """The channel's window towards the user grew by ``nbytes`` (Python told the
        user itself)."""
        _splice.lib.lr_gpump_grant(self._p, nbytes)

    def grant_send(self, nbytes: int) -> None:
        """The channel's window towards the user grows by ``nbytes`` and the thread
        seals the ``WINDOW_ADJUST`` (a sealing thread owns the outgoing stream)."""
        _splice.lib.lr_gpump_grant_send(self._p, nbytes)

    def stop(self) -> Stopped:
        """Stop the thread (it only ever waits in poll(), so this is short) and free it:
        its final state and the bytes it held (:class:`Stopped`)."""
        ffi, lib = _splice.ffi, _splice.lib
        st = self._st
        lib.lr_gpump_stop(self._p, st)
        left = ffi.new("unsigned char[]", max(1, st.left))
        pending = ffi.new("unsigned char[]", max(1, st.pending))
        lib.lr_gpump_take(self._p, left, pending)
        unsealed = ffi.new("unsigned char[]", max(1, st.unsealed))
        unsent = ffi.new("unsigned char[]", max(1, st.unsent))
        lib.lr_gpump_take_rev(self._p, unsealed, unsent)
        got = Stopped(self._state(), ffi.buffer(left, st.left)[:],
                      ffi.buffer(pending, st.pending)[:], ffi.buffer(unsealed, st.unsealed)[:],
                      ffi.buffer(unsent, st.unsent)[:])
        lib.lr_gpump_free(self._p)
        self.freed = True
        return got
