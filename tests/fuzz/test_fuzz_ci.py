"""The fuzz targets in the normal test run: the committed corpus replayed, then each
target under atheris for a short bounded time (docs/fuzzing.md).

The replay needs nothing but the targets; the atheris run needs atheris (in the test
extra, Linux and Python <= 3.12) and fails -- not skips -- under ``CI=true`` without it.
``LABRELAY_FUZZ_SECONDS`` sets the time per target (default 8; 0 skips the atheris
run); a crash fails the test and leaves the input in the pytest temp directory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import fuzzrun
import fuzztargets
import pytest

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("LABRELAY_FUZZ_SECONDS", "8"))


@pytest.mark.parametrize("target", sorted(fuzztargets.TARGETS))
def test_corpus_replays_clean(target: str) -> None:
    files = fuzzrun.corpus_files(target)
    assert len(files) >= 5, f"the seed corpus of {target} is missing"
    assert sum(f.stat().st_size for f in files) < 64 * 1024
    failed = fuzzrun.replay(target, files)
    assert not failed, "\n".join(f"{path}:\n{trace}" for path, trace in failed)


def test_every_target_has_a_seed_generator() -> None:
    import make_corpus

    assert set(make_corpus.SEEDS) == set(fuzztargets.TARGETS)


@pytest.mark.timeout(len(fuzztargets.TARGETS) * (SECONDS + 20) + 60)
def test_atheris_finds_nothing(tmp_path: Path) -> None:
    if SECONDS <= 0:
        pytest.skip("LABRELAY_FUZZ_SECONDS=0")
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is missing (pip install -e '.[test]' on Linux, Python <= 3.12)")
        pytest.skip("atheris is not installed")
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzzrun.py"), "--seconds", str(SECONDS),
         "--timeout", "5", "--rss-mb", "1024", "--artifacts", str(tmp_path / "artifacts"),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=len(fuzztargets.TARGETS) * (SECONDS + 20) + 30,
    )
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    # Every target ran and executed inputs (a target that cannot start is a failure too).
    for name in fuzztargets.TARGETS:
        assert f"{name}: ok" in proc.stdout, proc.stdout
