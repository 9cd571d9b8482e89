"""The fast path (``labrelay connect`` -> relay data port -> agent data pool, spliced)
against ssh straight to the target and the seed's OpenSSH chain, side by side in one run.

Everything on 127.0.0.1, real processes, from a temporary directory:

* a private OpenSSH ``sshd``, the target ("gpu-cluster");
* a ``labrelay relay`` with ``data_port = 0`` and ``e2e_services = ["gpu-cluster:22",
  "sink:9000"]``, and a ``labrelay agent`` ("lab_pc") registering ``-R gpu-cluster:22:TARGET``
  and ``-R sink:9000:SINK`` that keeps its pool of data connections (``fast_path_ready``);
  both with ``LABRELAY_DATAPATH`` as inherited (default ``auto``: the C pump thread);
* a second private ``sshd``, the seed's "cloud", and ``ssh -N -R 127.0.0.1:PUB:127.0.0.1:TARGET``
  to it (the seed's ``autossh -M 0 -R ...`` from lab_pc is this same ssh): the one-hop chain;
* the seed's full chain: a third private ``sshd``, "lab_pc", and, exactly as the seed's hops,
  gpu_cluster's ``ssh -N -R 127.0.0.1:LABPORT:127.0.0.1:TARGET`` to it, on lab_pc the
  "detach" hop ``ssh -N -L 127.0.0.1:REASSIGN:127.0.0.1:LABPORT`` to lab_pc's own sshd, and
  ``autossh -M 0 -N -R 127.0.0.1:PUBFULL:127.0.0.1:REASSIGN`` to the cloud sshd (plain
  ``ssh -N -R`` when autossh is missing); each hop also carries a second forward, the same
  way, whose innermost target is the sink (for the raw workload: same processes, same
  connections, one more channel);
* a raw TCP sink (``bench/fast_workers.py --worker sink``) that counts what arrives.

Workload ``ssh``: a user's ``ssh ... 'echo ready; wc -c'`` (a sink like ``cat > /dev/null``
that also prints the byte count, which is checked), OpenSSH's default cipher, fed
``--bytes`` on stdin by a feeder process once the session printed ``ready``:

* ``direct``  ssh straight to the target sshd;
* ``fast``    ssh with ``ProxyCommand`` = ``python -m relay connect ... %h:%p`` as alice;
* ``seed``    ssh to the cloud's public port ``-p PUB`` (the seed's public-port way; the
  target's sshd answers through the ``ssh -R`` tunnel);
* ``seed_full`` ssh to the cloud's public port ``-p PUBFULL`` of the seed's full chain
  (cloud sshd -> autossh's ssh -> ssh -L detach -> lab_pc sshd -> gpu_cluster's ssh -R).

Workload ``raw``: the same bytes into the sink. Socket-fed (what the raw goal is judged
on): one Python client (``bench/fast_workers.py --worker source``: bench.plain_hop's source, 1 MiB
``sendall`` of memoryview slices with TCP_NODELAY, but waiting for "go" once connected)
sends to

* ``direct``      the sink itself (direct loopback);
* ``socat_sock``  ``socat -b 131072 TCP-LISTEN:P,bind=127.0.0.1,reuseaddr TCP:SINK``: one
  plain user-space relay hop, for reference;
* ``fast_sock``   labrelay connect as an inetd-style service: the harness listens, accepts
  the client and starts ``python -m relay connect ... sink:9000`` with the accepted socket
  as its stdin and stdout, so its pump splices socket<->socket like the relay and the
  agent (three spliced hops; sink:9000 is declared e2e: raw TCP is not really encrypted);
* ``seed_full``   the seed's full chain raw: the client connects to the cloud's second
  public port, carried like the ssh variant's bytes down to the sink.

Pipe-fed (reported extras, not judged: direct loopback has no pipe in front of it, and a
feeder process writing a pipe adds its own cost; socat with no relay at all gets only
about 0.15x direct from such a pipe, which it leaves at 64 KiB; labrelay connect grows
its pipes to 1 MiB):

* ``socat_pipe``  the feeder's pipe into ``socat -u STDIN TCP:SINK``;
* ``fast_pipe``   the feeder's pipe into ``python -m relay connect ... sink:9000``, stdout
  to /dev/null.

Within each run every variant takes its turn, the order rotated run by run, so machine
noise falls on all alike. Throughput: ssh from "go" to ssh's exit; raw from the sink's
first byte to its EOF. CPU seconds per GiB of every relaying process during the stream:
long-lived processes (relay, agent, ``ssh -R``, cloud sshd sessions, the full chain's
three ssh clients and its lab_pc and cloud sshd sessions) from
``/proc/PID/stat`` (all threads: the C pump is one) before and after; processes that live
for one session (``labrelay connect``, socat) run under a small wrapper (``--worker
rusage``) that reads their exact lifetime total with ``wait4``; the stream share is that
total minus ``/proc/PID/stat`` read when the stream starts.

The code is split by job: ``bench/fast_setup.py`` starts the peers,
``bench/fast_trials.py`` runs one trial, ``bench/fast_workers.py`` holds the workers and
the CPU bookkeeping, ``bench/fast_path_report.py`` sums up and writes the report; this
module is the run (warm-up, rotated runs) and the command line.

Run from the repository root with the venv's Python::

    python -m bench.fast_path             # 1 GiB x 5 runs
    python -m bench.fast_path --quick     # 256 MiB x 3 runs

Results: a table on stdout, ``bench/results/fast_path-latest.json`` and
``bench/results/fast_path-latest.md`` (overwritten), and a line in
``bench/results/history.jsonl``. Also run by ``python -m bench --only fast_path``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make bench importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fast_workers
from bench.cli import (
    add_python_and_results,
    add_run_options,
    bench_parser,
    quick_defaults,
    run_bench,
)
from bench.fast_path_report import VARIANTS, markdown, print_table, summarize
from bench.fast_trials import FastTrials
from bench.meter import MachineMeter, cpu_note
from bench.sessions import MiB


class FastBench(FastTrials):
    """One run: the peers (:class:`~bench.fast_setup.FastPeers`), then every variant's
    trials (:class:`~bench.fast_trials.FastTrials`), warm-up first, the order rotated run
    by run so that machine noise falls on all alike."""

    def run(self) -> dict[str, Any]:  # type: ignore[override]
        args = self.args
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            w: {v: [] for v in vs} for w, vs in VARIANTS.items()}
        warm = min(args.bytes, 64 * MiB)
        print(f"warming up: {warm // MiB} MiB per variant (not recorded)", flush=True)
        for workload, variants in VARIANTS.items():
            for variant in variants:
                self.trial(workload, variant, warm)
        self.failed.clear()  # a warm-up failure is reported, and measured again
        self.check_alive()
        meter = MachineMeter()
        for run in range(1, args.runs + 1):
            for workload, variants in VARIANTS.items():
                k = (run - 1) % len(variants)
                for variant in variants[k:] + variants[:k]:  # rotated run by run
                    if (workload, variant) in self.failed and not args.keep_going:
                        continue
                    r = self.trial(workload, variant, args.bytes)
                    self.check_alive()
                    if r is None:
                        continue
                    r["run"] = run
                    samples[workload][variant].append(r)
                    print(f"run {run}/{args.runs} {workload:3} {variant:10} "
                          f"{args.bytes / r['seconds'] / 1e6:8.1f} MB/s  set-up "
                          f"{r['setup_s'] * 1000:6.0f} ms" + cpu_note(r["cpu"], args.bytes),
                          flush=True)
        res = summarize(self, samples, meter.result())
        if args.note:
            res["conditions"]["note"] = args.note
        return res


# ---------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("python -m bench.fast_path",
                     "labrelay's fast path (labrelay connect -> relay data port -> agent, "
                     "spliced) vs ssh direct and the seed's ssh -R chain, and raw TCP through "
                     "it vs direct loopback; side by side in one run, on loopback.",
                     "runs (default 5; --quick 3)")
    add_run_options(p, "variant", reverse=False)
    p.add_argument("--note", default="", help="a sentence to add to the Markdown report")
    add_python_and_results(p, "the Python that runs relay, agent and labrelay connect")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # the workers' old address: bench/fast_workers.py now
        return fast_workers.main(argv)
    args = quick_defaults(build_parser().parse_args(argv))

    def announce(bench: FastBench) -> None:
        print(f"  target sshd {bench.sshd_port}, relay {bench.relay_port} (data port "
              f"{bench.data_port}), cloud public port {bench.pub_port}, sink "
              f"{bench.sink_port}; the seed's full chain: lab_pc sshd "
              f"{bench.lab.sshd_port if bench.lab else '?'}, ports {bench.full_ports}, "
              f"{bench.autossh}; backend {bench.backend}; {bench.ciphers}", flush=True)

    return run_bench("labrelay-fastpath-bench-", lambda workdir: FastBench(args, workdir),
                     announce, markdown, print_table, args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
