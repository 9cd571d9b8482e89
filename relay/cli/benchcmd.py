"""``labrelay bench``: run the benchmark suite of a labrelay checkout (bench/suite.py).

The ``bench`` package is not installed with labrelay; it is found in the current
directory or in the checkout the running ``relay`` package was imported from.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import relay


def locate_bench(cwd: Path | None = None) -> Path | None:
    """The checkout root holding ``bench/suite.py``, or None."""
    candidates = [(cwd or Path.cwd()), Path(relay.__file__).resolve().parents[1]]
    for root in candidates:
        if (root / "bench" / "__init__.py").is_file() and (root / "bench" / "suite.py").is_file():
            return root.resolve()
    return None


def main(args: list[str]) -> int:
    root = locate_bench()
    if root is None:
        print("labrelay bench: the benchmarks are not installed with labrelay; "
              "run from a labrelay checkout (the directory holding bench/)", file=sys.stderr)
        return 1
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = importlib.import_module("bench.suite")
    return int(suite.main(args, prog="labrelay bench"))
