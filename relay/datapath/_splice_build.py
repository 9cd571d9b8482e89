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


def _bundled_libcrypto() -> dict[str, list]:
    """Build options that link a libcrypto of our own into the module, from the
    OpenSSL install prefix named by ``LABRELAY_OPENSSL`` (``scripts/openssl`` builds one:
    static, position independent, AES-GCM with VAES/AVX-512 where the CPU has it); none
    when it is unset or ``system`` (the module then dlopens the host's libcrypto at run
    time).  Its
    symbols are hidden (``--exclude-libs``), so the process's own libcrypto (Python's
    ``ssl``, ``hashlib``) is never interposed on, and ours serves only the data path."""
    prefix = os.environ.get("LABRELAY_OPENSSL", "").strip()
    if prefix in ("", "system"):
        return {}
    root = Path(prefix)
    archive = next((p for p in (root / "lib64" / "libcrypto.a", root / "lib" / "libcrypto.a",
                                root / "libcrypto.a") if p.is_file()), None)
    if archive is None or not (root / "include" / "openssl" / "evp.h").is_file():
        raise SystemExit(f"LABRELAY_OPENSSL={prefix}: expected an OpenSSL install prefix with "
                         "include/openssl/evp.h and lib/libcrypto.a (or lib64/); build one "
                         "with scripts/openssl, or unset LABRELAY_OPENSSL to use the "
                         "host's libcrypto")
    return {"define_macros": [("LR_LIBCRYPTO_STATIC", "1")],
            "include_dirs": [str(root / "include")],
            "extra_objects": [str(archive)],
            "extra_link_args": ["-Wl,--exclude-libs,ALL"]}


BUNDLED = _bundled_libcrypto()

ffibuilder = FFI()
ffibuilder.cdef(HEADER.read_text())
ffibuilder.cdef(SSHOPEN.read_text())
ffibuilder.set_source(
    "relay.datapath._splice_c",
    '#include <stddef.h>\n#include <stdint.h>\n#include "relay_splice.h"\n'
    '#include "relay_sshopen.h"\n',
    sources=[_rel(p) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[_rel(CSRC), *BUNDLED.get("include_dirs", [])],
    define_macros=BUNDLED.get("define_macros", []),
    extra_objects=BUNDLED.get("extra_objects", []),
    extra_link_args=BUNDLED.get("extra_link_args", []),
    # rebuilt when a header changes, and shipped in the sdist
    depends=[_rel(p) for p in sorted(CSRC.glob("*.h"))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Werror=implicit-function-declaration"],
    libraries=["pthread", "dl"],  # dl: sshopen.c loads the host's libcrypto with dlopen
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)
