"""Run the fuzz targets of tests/fuzz: coverage-guided with atheris, or replay a corpus.

    python tests/fuzz/fuzzrun.py --seconds 60 [--jobs N] [TARGET ...]   # or: scripts/fuzz ...
    python tests/fuzz/fuzzrun.py --replay [TARGET ...]

Each target runs in a child process of its own under libFuzzer (atheris), for
``--seconds`` with a per-input time limit (``--timeout``) and a memory limit
(``--rss-mb``), starting from its committed seed corpus ``corpus/<target>/``;
``--jobs N`` runs N of them at once (default 1), each with its own log, printed whole
when it ends.  The code under test is imported and instrumented once, in this
process, and each child is forked from it: instrumenting costs seconds, fuzzing a
target in CI only eight.  New inputs libFuzzer finds go to a scratch directory
(``--work``, a temporary one by default), never into the committed corpus.  A crash,
a timeout or the memory limit leaves the input in ``--artifacts`` (``crash-*``,
``timeout-*``, ``oom-*``) and makes the run exit non-zero; replay it with
``--replay --input FILE TARGET``.  See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
#: What atheris instruments for coverage: the code under test and the Conch code
#: in front of it (not the rest of Twisted or the cryptography bindings).
INSTRUMENT = ["relay", "twisted.conch", "fuzztargets", "fuzzworld", "resumetargets"]


def _not_instrumented(package: str, keep: list[str]) -> list[str]:
    """Every module of ``package`` outside ``keep``: atheris's ``include`` takes whole
    top-level packages (``twisted.conch`` instruments all of ``twisted`` that gets
    imported), and instrumenting the reactor around the code under test costs start-up
    time and adds coverage that only guides libFuzzer away from the parsers."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    names = []
    for root in spec.submodule_search_locations:
        for path in Path(root).rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not any(name == k or name.startswith(k + ".") for k in keep):
                names.append(name)
    return names


def target_names() -> list[str]:
    sys.path.insert(0, str(HERE))
    import fuzztargets

    return list(fuzztargets.TARGETS)


def replay(name: str, files: list[Path]) -> list[tuple[Path, str]]:
    """Run each file through target ``name`` in this process; the failures."""
    sys.path.insert(0, str(HERE))
    import traceback

    import fuzztargets
    import fuzzworld

    target = fuzztargets.TARGETS[name]
    failed = []
    for path in files:
        # Only this input's failures: the same process may have run other tests that
        # logged some (tests/unit and tests/fuzz in one pytest run).
        fuzzworld.FAILURES.take()
        try:
            target(path.read_bytes())
        except Exception:
            failed.append((path, traceback.format_exc()))
    return failed


def corpus_files(name: str) -> list[Path]:
    directory = CORPUS / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def instrumented_targets() -> dict[str, Callable[[bytes], None]]:
    """Import the targets under atheris's instrumentation, once, in this process; every
    target's child is forked from it and so starts fuzzing at once."""
    import atheris

    sys.path.insert(0, str(HERE))
    # A module imported before this point would not be instrumented, and libFuzzer
    # would fuzz it blind.
    early = sorted(m for m in sys.modules if m.split(".")[0] in {"relay", *INSTRUMENT})
    if early:
        raise RuntimeError(f"imported before instrumenting: {early}")
    exclude = [m for p in {i.split(".")[0] for i in INSTRUMENT}
               for m in _not_instrumented(p, INSTRUMENT)]
    with atheris.instrument_imports(include=INSTRUMENT, exclude=exclude):
        import fuzztargets
    # Until logging begins, Twisted's global log keeps the last 65536 events, and with
    # them what they reference (the relay core, connections, transports of old
    # inputs): 300-400 MiB of peak RSS that is not the code under test's, and would
    # hide a real leak from -rss_limit_mb.  Begin logging to nothing but the
    # observers the targets add (fuzzworld.FAILURES).
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    return dict(fuzztargets.TARGETS)


@dataclass
class Running:
    """One target's child process: forked, fuzzing, writing ``log``."""

    name: str
    pid: int
    pidfd: int
    started: float
    deadline: float
    log: Path


def start(name: str, target: Callable[[bytes], None], args: argparse.Namespace,
          work: Path) -> Running:
    """Fork a child that hands ``target`` to libFuzzer, its output all in its own log."""
    scratch = work / name
    scratch.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    libfuzzer = [
        f"-max_total_time={args.seconds}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={args.artifacts}/{name}-",
        "-print_final_stats=1",
        str(scratch),
        str(CORPUS / name),
    ]
    log = work / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            import atheris

            atheris.Setup([sys.argv[0], *libfuzzer], target)
            atheris.Fuzz()
        except SystemExit as stop:
            # atheris's way out of a target's uncaught exception.
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # The C library's exit, not os._exit: libFuzzer's exit handler is what
            # reports "fuzz target exited" and saves the input as crash-*; and not an
            # exception unwinding into this (the parent's) loop.
            ctypes.CDLL(None).exit(code)
    # The wall-clock bound covers libFuzzer's own start-up and a final slow input.
    return Running(name, pid, os.pidfd_open(pid), started,
                   started + args.seconds + args.timeout + 60, log)


def finish(child: Running, kill: bool) -> int:
    """Reap ``child`` (killed first if it overran its bound), print its result whole."""
    if kill:
        os.kill(child.pid, signal.SIGKILL)
    _, status = os.waitpid(child.pid, 0)
    os.close(child.pidfd)
    rc = -1 if kill else os.waitstatus_to_exitcode(status)
    took = time.monotonic() - child.started
    text = child.log.read_text(errors="replace")
    stats = [line for line in text.splitlines() if line.startswith("stat::number_of_executed_units")
             or line.startswith("stat::peak_rss_mb")]
    status_text = "ok" if rc == 0 else f"FAILED (exit {rc})"
    report = (f"{child.name}: {status_text} in {took:.0f}s; "
              f"{', '.join(s.split('::')[1] for s in stats)}")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-60:])
        report += f"\n--- {child.name}: last lines of {child.log}\n{tail}\n---"
    print(report, flush=True)  # one write: concurrent targets' reports never interleave
    return rc


def fuzz(names: list[str], targets: dict[str, Callable[[bytes], None]],
         args: argparse.Namespace, work: Path) -> dict[str, int]:
    """Fuzz ``names``, ``args.jobs`` at a time; each target's exit code."""
    pending = list(names)
    running: dict[int, Running] = {}
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            child = start(name, targets[name], args, work)
            running[child.pidfd] = child
        wait = max(0.0, min(c.deadline for c in running.values()) - time.monotonic())
        ended, _, _ = select.select(list(running), [], [], wait)
        now = time.monotonic()
        for pidfd in list(running):
            child = running[pidfd]
            if pidfd in ended or now >= child.deadline:
                del running[pidfd]
                codes[child.name] = finish(child, kill=pidfd not in ended)
    return codes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--timeout", type=int, default=5,
                        help="seconds one input may take (default 5)")
    parser.add_argument("--rss-mb", type=int, default=1024,
                        help="memory limit per target process (default 1024 MiB)")
    parser.add_argument("--max-len", type=int, default=16384, help="largest input (bytes)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="targets fuzzed at once, each in its own process (default 1)")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"),
                        help="where crashing inputs are saved (default ./fuzz-artifacts)")
    parser.add_argument("--work", type=Path,
                        help="keep the inputs libFuzzer finds here (default: a temp dir)")
    parser.add_argument("--replay", action="store_true",
                        help="no fuzzing: run the committed corpus (or --input) once")
    parser.add_argument("--input", type=Path, action="append", default=[],
                        help="with --replay: these files instead of the corpus")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    targets = {} if args.replay else instrumented_targets()
    known = list(targets) if targets else target_names()
    names = args.targets or known
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {known}")
    args.artifacts = args.artifacts.resolve()
    if args.replay:
        failed = 0
        for name in names:
            files = args.input or corpus_files(name)
            bad = replay(name, files)
            print(f"{name}: {len(files) - len(bad)}/{len(files)} inputs ok")
            for path, trace in bad:
                print(f"--- {path}\n{trace}")
            failed += len(bad)
        return 1 if failed else 0
    with tempfile.TemporaryDirectory(prefix="labrelay-fuzz-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        codes = fuzz(names, targets, args, work)
    bad = [n for n in names if codes[n] != 0]
    if bad:
        print(f"fuzz: {len(bad)} target(s) failed: {' '.join(bad)}; inputs in {args.artifacts}")
        return 1
    print(f"fuzz: {len(names)} target(s), nothing found")
    return 0


if __name__ == "__main__":
    # The targets run in children forked from this process, so it is this process's
    # hash seed they have: a fixed one (dict and set order alike from run to run).
    if os.environ.get("PYTHONHASHSEED") is None:
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())
