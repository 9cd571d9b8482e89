"""Run the fuzz targets of tests/fuzz: coverage-guided with atheris, or replay a corpus.

    python tests/fuzz/fuzzrun.py --seconds 60 [TARGET ...]    # or: scripts/fuzz ...
    python tests/fuzz/fuzzrun.py --replay [TARGET ...]

Each target runs in a child process of its own under libFuzzer (atheris), for
``--seconds`` with a per-input time limit (``--timeout``) and a memory limit
(``--rss-mb``), starting from its committed seed corpus ``corpus/<target>/``.  New
inputs libFuzzer finds go to a scratch directory (``--work``, a temporary one by
default), never into the committed corpus.  A crash, a timeout or the memory limit
leaves the input in ``--artifacts`` (``crash-*``, ``timeout-*``, ``oom-*``) and makes
the run exit non-zero; replay it with ``--replay --input FILE TARGET``.  See
docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
#: What atheris instruments for coverage: the code under test and the Conch code
#: in front of it (not the whole of Twisted or the cryptography bindings).
INSTRUMENT = ["relay", "twisted.conch", "fuzztargets", "fuzzworld", "resumetargets"]
PLAIN = [
    "twisted.internet.defer", "twisted.internet.testing", "twisted.internet.protocol",
    "twisted.internet.task", "twisted.internet.tcp", "twisted.internet.endpoints",
    "twisted.logger", "twisted.python.failure", "twisted.python.log", "twisted.cred.portal",
    "twisted.cred.checkers", "twisted.application.internet", "twisted.application.service",
    "twisted.protocols.basic", "twisted.test.iosim", "cryptography.hazmat.primitives.ciphers",
]


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


def child(name: str, libfuzzer_args: list[str]) -> None:
    """The atheris side: instrument, then hand the target to libFuzzer (never returns)."""
    import atheris

    sys.path.insert(0, str(HERE))
    # Imported first, so not instrumented: the Twisted machinery around the code under
    # test (instrumenting it costs seconds at start-up and adds no useful coverage).
    for module in PLAIN:
        importlib.import_module(module)
    with atheris.instrument_imports(include=INSTRUMENT):
        import fuzztargets
    # Until logging begins, Twisted's global log keeps the last 65536 events, and with
    # them what they reference (the relay core, connections, transports of old
    # inputs): 300-400 MiB of peak RSS that is not the code under test's, and would
    # hide a real leak from -rss_limit_mb.  Begin logging to nothing but the
    # observers the targets add (fuzzworld.FAILURES).
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    target = fuzztargets.TARGETS[name]
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


def run(name: str, args: argparse.Namespace, work: Path) -> int:
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--", *libfuzzer]
    started = time.monotonic()
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        # The wall-clock bound covers libFuzzer's own start-up and a final slow input.
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                timeout=args.seconds + args.timeout + 60).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    text = log.read_text(errors="replace")
    stats = [line for line in text.splitlines() if line.startswith("stat::number_of_executed_units")
             or line.startswith("stat::peak_rss_mb")]
    took = time.monotonic() - started
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    print(f"{name}: {status} in {took:.0f}s; {', '.join(s.split('::')[1] for s in stats)}",
          flush=True)
    if rc != 0:
        tail = "\n".join(text.splitlines()[-60:])
        print(f"--- {name}: last lines of {log}\n{tail}\n---", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        rest = argv[2:]
        child(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--timeout", type=int, default=5,
                        help="seconds one input may take (default 5)")
    parser.add_argument("--rss-mb", type=int, default=1024,
                        help="memory limit per target process (default 1024 MiB)")
    parser.add_argument("--max-len", type=int, default=16384, help="largest input (bytes)")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"),
                        help="where crashing inputs are saved (default ./fuzz-artifacts)")
    parser.add_argument("--work", type=Path,
                        help="keep the inputs libFuzzer finds here (default: a temp dir)")
    parser.add_argument("--replay", action="store_true",
                        help="no fuzzing: run the committed corpus (or --input) once")
    parser.add_argument("--input", type=Path, action="append", default=[],
                        help="with --replay: these files instead of the corpus")
    args = parser.parse_args(argv)
    names = args.targets or target_names()
    unknown = set(names) - set(target_names())
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {target_names()}")
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
        codes = [run(name, args, work) for name in names]
    bad = [n for n, rc in zip(names, codes, strict=True) if rc != 0]
    if bad:
        print(f"fuzz: {len(bad)} target(s) failed: {' '.join(bad)}; inputs in {args.artifacts}")
        return 1
    print(f"fuzz: {len(names)} target(s), nothing found")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
