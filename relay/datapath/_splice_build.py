"""cffi builder for ``relay.datapath._splice_c``, the native data path (``csrc/``).

Wiring only: the header ``csrc/relay_splice.h`` is the ``cdef`` as it stands, and
``csrc/*.c`` (pool, mover, pump thread, pump API; they share the private
``csrc/lr_internal.h``, which cffi never reads; and ``sshopen.c``, the SSH receive
loop, whose cdef is ``csrc/relay_sshopen.h``) are compiled into the extension
(API mode, out-of-line).  setup.py
names this file in ``cffi_modules``, so ``pip install .`` builds the module and a
compiler error fails the install.  Run it directly to build in place::

    python relay/datapath/_splice_build.py
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HEADER = CSRC / "relay_splice.h"
SSHOPEN = CSRC / "relay_sshopen.h"  # the SSH receive loop (sshopen.c)


def _rel(path: Path) -> str:
    """setuptools wants source paths relative to the project root (its cwd)."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (not on Linux, but be exact)
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef(HEADER.read_text())
ffibuilder.cdef(SSHOPEN.read_text())
ffibuilder.set_source(
    "relay.datapath._splice_c",
    '#include <stddef.h>\n#include <stdint.h>\n#include "relay_splice.h"\n'
    '#include "relay_sshopen.h"\n',
    sources=[_rel(p) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[_rel(CSRC)],
    # rebuilt when a header changes, and shipped in the sdist
    depends=[_rel(p) for p in sorted(CSRC.glob("*.h"))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Werror=implicit-function-declaration"],
    libraries=["pthread", "dl"],  # dl: sshopen.c loads libcrypto with dlopen
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)
