"""What one AES-GCM call costs when its code is cold (issue 13 item 5, round 13).

Set-up after a 50 ms idle gap costs each labrelay process about twice the CPU of the
same work back to back (``bench/setup_ab.py --gap-ms 0`` against ``--gap-ms 50``), and
round 11's stamps found every Python step 2.5-4x slower cold.  One way on that the
notes named is to move the open path into C.  This asks how much of a cold call C
saves, on the one step both would share: one packet's AES-GCM.  Each trial writes
``--evict-mib`` of other memory and sleeps ``--gap-ms`` (as a new session after an idle
gap finds its caches), then times the first call and, at once, a second one, for:

* ``cryptography``: ``AESGCM.encrypt`` and ``AESGCM.decrypt`` (what relay.ssh.aead uses);
* ``native``: the C module's ``lr_gcm_seal`` with its context made once (the -J thread's).

Run from the repository root with the venv's Python::

    python bench/cold_aead.py --trials 200

Results and what they say: docs/benchmarks.md, "Round 13"; not run by ``labrelay bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def calls(size: int) -> dict[str, Callable[[int], object]]:
    """One call per implementation on a ``size``-byte packet, given the nonce counter."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = os.urandom(16)
    aead = AESGCM(key)
    head = bytes([8]) + bytes(7)  # padding_length, then a message's first bytes
    data = os.urandom(size - 16)
    pad = bytes(8)
    plain = head + data + pad
    aad = struct.pack(">I", len(plain))
    sealed = aead.encrypt(struct.pack(">IQ", 1, 0), plain, aad)
    out: dict[str, Callable[[int], object]] = {
        "cryptography encrypt": lambda n: aead.encrypt(struct.pack(">IQ", 1, n), plain, aad),
        "cryptography decrypt": lambda n: aead.decrypt(struct.pack(">IQ", 1, 0), sealed, aad),
    }
    try:
        from relay.datapath import _splice
    except ImportError:
        return out  # no native module: the Python figures only
    ffi, lib = _splice.ffi, _splice.lib
    if not lib.lr_gcm_available():
        return out
    sealer = ffi.gc(lib.lr_gcm_new_sealer(key, len(key)), lib.lr_gcm_free)
    buf = ffi.new("unsigned char[]", 4 + len(plain) + 16)
    out["native lr_gcm_seal"] = lambda n: lib.lr_gcm_seal(
        sealer, 1, n, head, len(head), data, len(data), pad, len(pad), buf)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200, help="cold calls per implementation")
    p.add_argument("--gap-ms", type=float, default=50.0)
    p.add_argument("--evict-mib", type=int, default=64)
    p.add_argument("--size", type=int, default=112, help="plaintext bytes (a channel open)")
    args = p.parse_args()
    junk = bytearray(args.evict_mib << 20)
    todo = calls(args.size)
    cold: dict[str, list[int]] = {name: [] for name in todo}
    warm: dict[str, list[int]] = {name: [] for name in todo}
    for trial in range(args.trials):
        for name, call in todo.items():  # the implementations take turns
            for i in range(0, len(junk), 64):
                junk[i] = trial & 0xFF
            time.sleep(args.gap_ms / 1000)
            t0 = time.perf_counter_ns()
            call(2 * trial)
            t1 = time.perf_counter_ns()
            call(2 * trial + 1)
            t2 = time.perf_counter_ns()
            cold[name].append(t1 - t0)
            warm[name].append(t2 - t1)
    print(f"{args.trials} trials, {args.size}-byte packet, {args.evict_mib} MiB evicted, "
          f"{args.gap_ms:g} ms gap; microseconds, p50 (p90)")
    for name in todo:
        c, w = sorted(cold[name]), sorted(warm[name])
        print(f"  {name:22s} cold {statistics.median(c) / 1000:7.1f} "
              f"({c[len(c) * 9 // 10] / 1000:.1f})   next call {statistics.median(w) / 1000:5.1f} "
              f"({w[len(w) * 9 // 10] / 1000:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
