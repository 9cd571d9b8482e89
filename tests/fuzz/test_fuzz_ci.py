"""The fuzz targets in the normal test run: the committed corpus replayed, then each
target under atheris for a short bounded time (docs/fuzzing.md).

The replay needs nothing but the targets; the atheris run needs atheris (in the test
extra, Linux and Python <= 3.12) and fails -- not skips -- under ``CI=true`` without it.
``LABRELAY_FUZZ_SECONDS`` sets the time per target (default 8; 0 skips the atheris
run); a crash fails the test and leaves the input in the pytest temp directory.  The
targets run as many at once as this process may use CPUs (``fuzzrun.py --jobs``), each
in its own process: every target still gets its full time on a core of its own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import fuzzrun
import fuzztargets
import pytest

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("LABRELAY_FUZZ_SECONDS", "8"))
#: One target per CPU this process may run on (a cgroup or taskset may allow fewer
#: than the machine has): more would share cores and fuzz each target for less.
JOBS = max(1, len(os.sched_getaffinity(0)))
#: The rounds of targets, JOBS at a time, each bounded by its time, start-up and a
#: last slow input (fuzzrun's own bound per target: SECONDS + 5 + 60), plus the one
#: instrumented import all targets share.
BOUND = -(-len(fuzztargets.TARGETS) // JOBS) * (SECONDS + 20) + 60


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


@pytest.mark.timeout(BOUND + 30)
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
         "--work", str(tmp_path / "work"), "--jobs", str(JOBS)],
        capture_output=True, text=True, timeout=BOUND,
    )
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    # Every target ran, once, and executed inputs under coverage guidance (a target that
    # cannot start is a failure too; one that libFuzzer saw no instrumented code of
    # would fuzz blind).
    for name in fuzztargets.TARGETS:
        assert proc.stdout.count(f"{name}: ok") == 1, proc.stdout
        log = (tmp_path / "work" / f"{name}.log").read_text()
        assert log.count("stat::number_of_executed_units") == 1, log[-5000:]
        cov = re.search(r"INITED cov: (\d+)", log)
        assert cov and int(cov.group(1)) > 0, log[-5000:]
