"""Build script: metadata lives in pyproject.toml; this file is the optional cffi build.

The native data path (``csrc/``, Linux only) is compiled by cffi's setuptools
integration when it can be: on Linux, with a C compiler and Python's headers.
Anywhere else, or when the compiler fails, the install goes on without it, says
so once, and labrelay runs its pure-Python data path (``labrelay status`` and the
``datapath_backend`` log event say which backend runs; docs/datapath.md).
``LABRELAY_BUILD_NATIVE=0`` skips the module on purpose; ``=1`` makes a failed
build an error instead (CI builds the wheel that way).

A built wheel is ``abi3`` (cffi's module uses the limited API), one wheel for every
CPython >= 3.11 on the platform.
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
BUILDER = HERE / "relay" / "datapath" / "_splice_build.py"
WANT = os.environ.get("LABRELAY_BUILD_NATIVE", "auto").strip().lower()
NATIVE = BUILDER.exists() and sys.platform.startswith("linux") and WANT not in ("0", "no")
PURE = "labrelay: building without the native data path ({why}): pure Python"


class OptionalBuildExt(build_ext):
    """``build_ext`` whose failure is not the install's (unless asked to be)."""

    said = False

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no headers: distutils raises many kinds
            self._pure(e)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as e:
            self._pure(e)

    def _pure(self, e: Exception) -> None:
        if WANT in ("1", "yes"):
            raise
        if not OptionalBuildExt.said:
            OptionalBuildExt.said = True
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            why = f"{type(e).__name__}: {why[:100]}{'...' if len(why) > 100 else ''}"
            sys.stderr.write(PURE.format(why=why) + "\n")


if not NATIVE:
    why = ("LABRELAY_BUILD_NATIVE=0" if WANT in ("0", "no") else
           f"it is Linux-only and this is {sys.platform}")
    if BUILDER.exists() and "egg_info" not in sys.argv and "sdist" not in sys.argv:
        sys.stderr.write(PURE.format(why=why) + "\n")

setup(
    cffi_modules=["relay/datapath/_splice_build.py:ffibuilder"] if NATIVE else [],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if NATIVE else {},
)
