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


PLANTED = """
import sys
sys.path.insert(0, {here!r})
import fuzzrun

instrumented = fuzzrun.instrumented_targets


def with_a_crasher():
    targets = instrumented()

    def crash(data):
        if data:
            raise RuntimeError("planted crash")

    targets["krl"] = crash
    return targets


fuzzrun.instrumented_targets = with_a_crasher
sys.exit(fuzzrun.main(sys.argv[1:]))
"""


@pytest.mark.timeout(180)
def test_a_crash_among_concurrent_targets_is_reported_whole(tmp_path: Path) -> None:
    """``--jobs 2``: a target that crashes (``krl``, replaced by one that raises) while
    another runs beside it fails the run, named, with its own log's tail in one piece
    and its input saved; the other target's result is its own."""
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is missing (pip install -e '.[test]' on Linux, Python <= 3.12)")
        pytest.skip("atheris is not installed")
    script = tmp_path / "planted.py"
    script.write_text(PLANTED.format(here=str(HERE)))
    artifacts = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, str(script), "--seconds", "3", "--jobs", "2",
         "--artifacts", str(artifacts), "--work", str(tmp_path / "work"),
         "krl", "ssh_wire"],
        capture_output=True, text=True, timeout=150,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr[-5000:]
    assert "fuzz: 1 target(s) failed: krl;" in out, out
    assert out.count("ssh_wire: ok") == 1, out
    # The crasher's report: its status line, then its own log's tail up to the closing
    # line, with no other target's output inside.
    block = re.search(r"^krl: FAILED \(exit \d+\).*?\n--- krl: last lines of .*?\n---$", out,
                      re.S | re.M)
    assert block, out
    assert "planted crash" in block.group(0), out
    assert "ssh_wire" not in block.group(0), out
    assert list(artifacts.glob("krl-crash-*")), sorted(artifacts.iterdir())
