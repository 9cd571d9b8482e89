"""One plain TCP hop (``[[forward]]``) with each data-path backend, against socat
and a direct connection, side by side in one run.

Paths, each carrying the same stream from a source process to a sink process:

* ``direct``     the source straight to the sink: what loopback can do;
* ``socat``      ``socat -b 131072 TCP-LISTEN:... TCP:sink`` (one process per transfer);
* ``c``          ``python -m relay run`` with a ``[[forward]]``, ``LABRELAY_DATAPATH=c``;
* ``python``     the same with ``LABRELAY_DATAPATH=python``.

With ``--design``, in-process relays (this file re-run as ``--worker relay``) add the
variants docs/datapath.md compares: the C pump with other pipe sizes, with
read/write instead of splice, without short-read waits, ``lr_move`` called once per
wakeup from the Twisted loop (``c-reactor``), Python read/write, and a pure Twisted
relay (``relay.datapath.bridge``, producers both ways).

Two workloads: ``bulk`` (the source sends as fast as it can, 1 MiB ``sendall``s) and
``paced`` (32 KiB bursts at about 400 MB/s: the wakeup pattern of an ssh session,
where per-wakeup cost, not per-byte cost, decides); ``--design`` adds ``small``
(2 KiB writes, paced, on 1/16 of the size: where read/write might beat splice).
Each path is measured in turn within every run, so machine noise hits all alike;
the table shows medians: MB/s (10^6 bytes) at the sink, and CPU seconds per GiB of
the relaying process (from /proc, or wait4 for socat), plus the C pump's wakeups
per GiB.

Run from the repository root with the venv's Python::

    python -m bench.plain_hop                # 1 GiB x 5 runs, bulk and paced
    python -m bench.plain_hop --design       # also the design variants
    python -m bench.plain_hop --quick        # 256 MiB x 3 runs

Results: a table on stdout, ``bench/results/plain_hop-latest.md`` and
``bench/results/plain_hop-latest.json`` (overwritten), and a line in
``bench/results/history.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.history import HISTORY, write_latest
from bench.meter import proc_cpu
from bench.plain_hop_report import LABELS, Sample, Series, fmt_or_dash, render
from bench.procs import free_port
from bench.report import cpu_model
from bench.sessions import LOOPBACK, REPO, RESULTS_DIR, GiB, KiB, MiB, connect_retry

TIMEOUT = 300.0

PATHS = ("direct", "socat", "c", "python")
DESIGN = ("c-64k", "c-256k", "c-copy", "c-noshort", "c-reactor", "python-copy", "twisted")
WORKLOADS = {"bulk": (MiB, 0.0), "paced": (32 * KiB, 400e6), "small": (2 * KiB, 50e6)}
SIZE_SHARE = {"small": 16}  # the small-write workload moves size/16 (it is slow by design)


# --- workers (separate processes) ------------------------------------------------


def worker_sink() -> None:
    """Accept connections one after another; for each, read to EOF and report."""
    listener = socket.create_server((LOOPBACK, 0), backlog=64)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    buf = bytearray(MiB)
    while True:
        conn, _ = listener.accept()
        start = time.perf_counter()
        total = 0
        with conn:
            while n := conn.recv_into(buf):
                total += n
        print(json.dumps({"bytes": total, "seconds": time.perf_counter() - start}), flush=True)


def worker_source(port: int, size: int, burst: int, rate: float) -> None:
    """Send ``size`` bytes in ``burst``-byte writes, paced to ``rate`` bytes/s if > 0."""
    sock = connect_retry(port, 30)
    block = memoryview(os.urandom(burst))
    sent = 0
    start = time.perf_counter()
    while sent < size:
        n = min(burst, size - sent)
        sock.sendall(block[:n])
        sent += n
        if rate:
            ahead = start + sent / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    sock.close()


def worker_relay(variant: str, target_port: int) -> None:
    """An in-process relay for one design variant; prints its port, answers
    ``stats`` lines on stdin with the data path's status."""
    from twisted.internet import reactor, stdio
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    from bench.reactor_native import NativeReactorDataPath
    from relay.agent.plainhop import PlainForward
    from relay.config.schema import HostPort, PlainForwardConfig
    from relay.datapath.bridge import Bridge, TCPSide
    from relay.datapath.splicing import Backend, DataPath

    status: Any = lambda: {}  # noqa: E731
    if variant == "twisted":
        class Front(TCPSide):
            def connectionMade(self) -> None:
                super().connectionMade()
                back = TCPSide()
                endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, target_port)
                endpoint.connect(Factory.forProtocol(lambda: back)).addCallback(
                    lambda _: Bridge(self, back))

        def listening(port: Any) -> None:
            print(json.dumps({"port": port.getHost().port}), flush=True)

        TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(
            Factory.forProtocol(Front)).addCallback(listening)
    else:
        variants: dict[str, dict[str, Any]] = {
            "c-64k": {"pipe_size": 64 * KiB}, "c-256k": {"pipe_size": 256 * KiB},
            "c-copy": {"copy": True}, "c-noshort": {"short_waits": False},
            "python-copy": {"copy": True},
        }
        options = variants.get(variant, {})
        backend = "python" if variant.startswith("python") else "c"
        path = NativeReactorDataPath if variant == "c-reactor" else DataPath
        dp = path(reactor, Backend(backend, f"bench variant {variant}"), **options)
        forward = PlainForward(PlainForwardConfig(LOOPBACK, 0, HostPort(LOOPBACK, target_port),
                                                  variant), reactor, data_path=dp)
        forward.startService()
        print(json.dumps({"port": forward.bound_port}), flush=True)
        status = dp.status

    class Stats(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            self.sendLine(json.dumps(status()).encode())

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    stdio.StandardIO(Stats())
    reactor.run()  # type: ignore[attr-defined]


# --- the harness --------------------------------------------------------------------


def _cpu(pid: int) -> float:
    cpu = proc_cpu(pid)
    if cpu is None:
        raise RuntimeError(f"process {pid} is gone: no CPU time to read")
    return cpu


_pending: dict[int, bytes] = {}  # bytes read past the last line, per child stdout fd


def _read_json(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> dict[str, Any]:
    """The child's next JSON line.  Read with os.read, not ``readline`` after ``select``:
    a buffered ``readline`` may swallow several lines, and ``select`` then waits for
    data that was already read (the relay logs its start-up events in one burst)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = _pending.pop(fd, b"")
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            _pending[fd] = buf
            raise TimeoutError(f"no answer from {proc.args!r} within {timeout}s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"{proc.args!r} exited with {proc.wait()}")
        buf += chunk
    line, _, _pending[fd] = buf.partition(b"\n")
    result: dict[str, Any] = json.loads(line)
    return result


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.plain_hop", "--worker", *args], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})


class Relay:
    """A long-lived relaying process and how to read its counters."""

    def __init__(self, name: str, sink_port: int, tmp: Path) -> None:
        self.name = name
        self.admin: str | None = None
        if name in ("c", "python"):
            config = tmp / f"{name}.toml"
            config.write_text(f'[admin]\nlisten = "{LOOPBACK}:0"\n\n[[forward]]\n'
                              f'listen = "{LOOPBACK}:0"\nconnect = "{LOOPBACK}:{sink_port}"\n')
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run", str(config), "--log-format", "json"],
                cwd=REPO, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                env={**os.environ, "LABRELAY_DATAPATH": name})
        else:
            self.proc = _spawn("relay", name, str(sink_port))
        try:  # not yet in the caller's list: a failed start must not leave it running
            if name in ("c", "python"):
                # Both listeners bind port 0; each says where, in either order.
                seen: dict[str, int] = {}
                while len(seen) < 2:
                    event = _read_json(self.proc, 30)
                    if event.get("event") in ("plain_forward_ready", "admin_listening"):
                        seen[event["event"]] = int(event["port"])
                self.port = seen["plain_forward_ready"]
                self.admin = f"{LOOPBACK}:{seen['admin_listening']}"
            else:
                self.port = int(_read_json(self.proc, 30)["port"])
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def stats(self) -> dict[str, Any]:
        if self.admin is not None:
            from relay.ops.status import fetch

            result: dict[str, Any] = fetch(self.admin).get("datapath") or {}
            return result
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return _read_json(self.proc, 30)

    def cpu(self) -> float:
        return _cpu(self.proc.pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(10)


def _socat_transfer(sink_port: int, size: int, burst: int, rate: float,
                    sink: subprocess.Popen[str]) -> tuple[dict[str, Any], float]:
    port = free_port()
    proc = subprocess.Popen(["socat", "-b", "131072", f"TCP-LISTEN:{port},bind={LOOPBACK},"
                             "reuseaddr", f"TCP:{LOOPBACK}:{sink_port}"])
    source = _spawn("source", str(port), str(size), str(burst), str(rate))
    result = _read_json(sink)
    source.wait(TIMEOUT)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return result, usage.ru_utime + usage.ru_stime


def measure(path: str, relays: dict[str, Relay], sink: subprocess.Popen[str], sink_port: int,
            size: int, workload: str) -> Sample:
    burst, rate = WORKLOADS[workload]
    size //= SIZE_SHARE.get(workload, 1)
    if path == "socat":
        result, cpu = _socat_transfer(sink_port, size, burst, rate, sink)
        return Sample(result["bytes"] / result["seconds"] / 1e6, cpu * GiB / result["bytes"])
    relay = relays.get(path)
    port = sink_port if relay is None else relay.port
    before = relay.stats() if relay is not None else {}
    cpu0 = relay.cpu() if relay is not None else 0.0
    source = _spawn("source", str(port), str(size), str(burst), str(rate))
    result = _read_json(sink)
    source.wait(TIMEOUT)
    if result["bytes"] != size:
        raise RuntimeError(f"{path}: the sink got {result['bytes']} of {size} bytes")
    mbps = result["bytes"] / result["seconds"] / 1e6
    if relay is None:
        return Sample(mbps, None)
    cpu = relay.cpu() - cpu0
    after = relay.stats()
    per_gib = GiB / result["bytes"]
    sample = Sample(mbps, cpu * per_gib)
    if "wakeups" in after and "wakeups" in before:
        sample.wakeups_per_gib = (after["wakeups"] - before["wakeups"]) * per_gib
        sample.syscalls_per_gib = (after["syscalls"] - before["syscalls"]) * per_gib
    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_hop",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=GiB, help="bytes per transfer (1 GiB)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="256 MiB x 3 runs")
    parser.add_argument("--design", action="store_true", help="also the design variants")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated: bulk, paced, small (default bulk,paced; "
                        "with --design all three)")
    parser.add_argument("--paths", default=None, help="comma-separated subset of paths")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the .md and .json go (default bench/results)")
    parser.add_argument("--output", default="plain_hop-latest",
                        help="results go to OUTPUT.json and OUTPUT.md (OUTPUT ends in "
                        "-latest; the committed --design run is plain_hop-design-latest) and "
                        "a line in history.jsonl")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        kind, *rest = ns.worker
        if kind == "sink":
            worker_sink()
        elif kind == "source":
            worker_source(int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3]))
        elif kind == "relay":
            worker_relay(rest[0], int(rest[1]))
        return 0
    if ns.quick:
        ns.size, ns.runs = 256 * MiB, 3
    paths = list(PATHS) + (list(DESIGN) if ns.design else [])
    if ns.paths:
        paths = [p for p in ns.paths.split(",") if p]
    if shutil.which("socat") is None and "socat" in paths:
        print("socat not installed: skipping it", file=sys.stderr)
        paths.remove("socat")
    default = "bulk,paced,small" if ns.design else "bulk,paced"
    workloads = [w for w in (ns.workloads or default).split(",") if w]

    load_before = Path("/proc/loadavg").read_text().split()[0]
    sink = _spawn("sink")
    sink_port = int(_read_json(sink, 30)["port"])
    relays: dict[str, Relay] = {}
    series = {(p, w): Series(p, w) for w in workloads for p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for path in paths:
                if path not in ("direct", "socat"):
                    relays[path] = Relay(path, sink_port, Path(tmp))
            for run in range(ns.runs):
                for workload in workloads:
                    for path in paths:
                        sample = measure(path, relays, sink, sink_port, ns.size, workload)
                        series[(path, workload)].samples.append(sample)
                        print(f"run {run + 1}/{ns.runs} {workload:5} {path:12} "
                              f"{sample.mbps:8.0f} MB/s  cpu/GiB "
                              f"{fmt_or_dash(sample.cpu_per_gib, '.3f')}  wakeups/GiB "
                              f"{fmt_or_dash(sample.wakeups_per_gib, ',.0f')}", flush=True)
        finally:
            for relay in relays.values():
                relay.close()
            sink.kill()
            sink.wait(10)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True).stdout.strip() or "unknown"
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                      text=True, capture_output=True).stdout.strip():
        commit += "+changes"
    meta = {
        "argv": argv if argv is not None else sys.argv[1:],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit, "cpus": os.cpu_count(), "cpu_model": cpu_model(),
        "kernel": platform.release(), "python": platform.python_version(),
        "size": ns.size, "runs": ns.runs,
        "loadavg": [load_before, Path("/proc/loadavg").read_text().split()[0]],
    }
    ordered = [series[(p, w)] for w in workloads for p in paths]
    text = render(ordered, meta)
    print("\n" + text)
    stem = ns.output.removesuffix("-latest")
    js = write_latest(ns.results_dir, stem, {
        "meta": meta,
        "series": [{"path": s.path, "label": LABELS[s.path], "workload": s.workload,
                    "median": {k: s.median(k) for k in ("mbps", "cpu_per_gib",
                                                         "wakeups_per_gib",
                                                         "syscalls_per_gib")},
                    "ratio_to_direct": s.ratio(next(
                        (d for d in ordered if d.path == "direct" and d.workload == s.workload),
                        None)),
                    "samples": [vars(x) for x in s.samples]} for s in ordered],
    }, text)
    print(f"wrote {js}, {js.with_suffix('.md')} and a line in {js.parent / HISTORY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
