"""Build script: metadata lives in pyproject.toml; this file exists for the cffi build.

The native splice/sendfile module (``csrc/``) is compiled by cffi's setuptools
integration.  Until its builder exists the build is pure Python, so the same
``pip install .`` works before and after the module lands.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
BUILDER = HERE / "relay" / "datapath" / "_splice_build.py"

setup(
    cffi_modules=["relay/datapath/_splice_build.py:ffibuilder"] if BUILDER.exists() else [],
)
