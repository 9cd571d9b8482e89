"""The benchmarks' command line, signal handling and :func:`run_bench`, which sets one
up, runs it, writes its results and cleans up."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench.procs import BenchError
from bench.report import write_results
from bench.sessions import RESULTS_DIR, GiB, KiB, MiB


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 256MiB, 1000000)")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    value = int(float(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[unit])
    if value < 1 * MiB:
        raise argparse.ArgumentTypeError("use at least 1 MiB")
    return value


def bench_parser(prog: str, description: str, runs_help: str) -> argparse.ArgumentParser:
    """A parser with ``--bytes`` and ``--runs`` (see ``quick_defaults``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--bytes", type=parse_bytes, default=None,
                   help="bytes per transfer, e.g. 1GiB (default), 256MiB")
    p.add_argument("--runs", type=int, default=None, help=runs_help)
    return p


def add_session_options(p: argparse.ArgumentParser, sessions_help: str, gap_sessions: int,
                        gap_ms_help: str) -> None:
    """``--sessions``, ``--gap-sessions`` and ``--gap-ms``: the set-up latency sessions."""
    p.add_argument("--sessions", type=int, default=200, help=sessions_help)
    p.add_argument("--gap-sessions", type=int, default=gap_sessions,
                   help="also time this many sessions per path per run with the link idle "
                   f"before each (default {gap_sessions}; 0 skips it)")
    p.add_argument("--gap-ms", type=float, default=50.0, help=gap_ms_help)


def add_run_options(p: argparse.ArgumentParser, what: str, reverse: bool = True) -> None:
    """``--quick``, ``--no-reverse`` (if ``reverse``) and ``--keep-going``."""
    p.add_argument("--quick", action="store_true", help="256 MiB and 3 runs")
    if reverse:
        p.add_argument("--no-reverse", action="store_true",
                       help="skip the pull direction (target -> client)")
    p.add_argument("--keep-going", action="store_true",
                   help=f"keep measuring a {what} after it failed once")


def add_python_and_results(p: argparse.ArgumentParser, python_help: str) -> None:
    p.add_argument("--python", default=sys.executable, help=python_help)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def quick_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``--bytes`` and ``--runs`` not given: 1 GiB x 5 runs, or 256 MiB x 3 with --quick."""
    if args.bytes is None:
        args.bytes = 256 * MiB if args.quick else GiB
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    return args


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP interrupt the harness like Ctrl-C, so everything is stopped."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT explicitly too: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)


class Harness(Protocol):
    def setup(self) -> None: ...

    def run(self) -> dict[str, Any]: ...

    def cleanup(self) -> list[str]: ...


H = TypeVar("H", bound=Harness)


def run_bench(prefix: str, make: Callable[[Path], H], announce: Callable[[H], None],
              markdown: Callable[[dict[str, Any]], str],
              print_table: Callable[[dict[str, Any]], None], results_dir: Path) -> int:
    """Set up ``make(workdir)`` in a new temporary directory, ``announce`` it, run it, write
    its result and report (``write_results``) and print its table; everything is stopped at
    the end. The exit status: 0 clean, 3 with anomalies, 1 set-up failed, 130 interrupted."""
    install_signal_handlers()
    code = 1
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the privilege-separated sshd reads its files
        bench = make(workdir)
        try:
            print(f"setting up in {workdir} ...", flush=True)
            bench.setup()
            announce(bench)
            res = bench.run()
            write_results(results_dir, res, markdown(res))
            print_table(res)
            code = 0 if not res["anomalies"] else 3
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping everything", file=sys.stderr)
            code = 130
        finally:
            for note in bench.cleanup():
                print(f"bench: cleanup: {note}", file=sys.stderr)
    return code
