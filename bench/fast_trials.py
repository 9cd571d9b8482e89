"""The fast-path bench's trials: one session of one variant at a time over the peers of
``bench/fast_setup.py``, with the CPU of every relaying process (see
``bench/fast_path.py``'s docstring for the variants and how each is measured)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.fast_path_report import (
    DIRECT,
    FAST,
    FAST_PORTABLE,
    FAST_SOCK,
    FAST_VARIANTS,
    PIPE_FED,
    RAW,
    REMOTE_COMMAND,
    SEED,
    SEED_FULL,
    SOCAT_PIPE,
    SOCAT_SOCK,
    SSH,
)
from bench.fast_setup import FastPeers
from bench.fast_workers import THIS as WORKERS
from bench.fast_workers import Accounting, Wrapped, avo_env, wait_exit
from bench.procs import BenchError, Lines, find_program, free_port, json_event
from bench.sessions import LOOPBACK, REPO, STALL_SECONDS, START_TIMEOUT


class FastTrials(FastPeers):
    """One trial of one variant at a time over :class:`~bench.fast_setup.FastPeers`."""

    def user_ssh(self, variant: str, rusage_out: Path) -> list[str]:
        argv = [find_program("ssh"), "-F", "/dev/null", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-i", str(self.key),
                "-o", f"UserKnownHostsFile={self.user_known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "UpdateHostKeys=no"]
        if variant == DIRECT:
            return [*argv, "-p", str(self.sshd_port), f"{self.user}@{LOOPBACK}", REMOTE_COMMAND]
        if variant in (SEED, SEED_FULL):
            port = self.pub_port if variant == SEED else self.full_pub
            return [*argv, "-p", str(port), f"{self.user}@{LOOPBACK}", REMOTE_COMMAND]
        connect = self.connect_argv("%h:%p")
        if variant == FAST_PORTABLE:  # only the user's end: relay and agent as inherited
            connect = [find_program("env") or "/usr/bin/env", "LABRELAY_DATAPATH=portable",
                       *connect]
        proxy = " ".join(self.wrapped(rusage_out, connect))
        return [*argv, "-o", f"ProxyCommand={proxy}", f"{self.user}@gpu-cluster",
                REMOTE_COMMAND]

    def groups(self, workload: str, variant: str) -> dict[str, list[int]]:
        """The long-lived relaying processes of a variant, by name (CPU from /proc)."""
        if variant in FAST_VARIANTS:
            assert self.relay is not None and self.agent is not None
            return {"relay": [self.relay.pid], "agent": [self.agent.pid]}
        if variant == SEED:
            assert self.ssh_r.pid is not None
            return {"ssh_R": [self.ssh_r.pid], "cloud_sshd": sorted(self.ssh_r.sshd_pids)}
        if variant == SEED_FULL:
            gpu, detach, auto = self.full_gpu, self.full_detach, self.full_auto
            assert gpu.pid is not None and detach.pid is not None and auto.pid is not None
            return {"full_cloud_sshd": sorted(auto.sshd_pids),
                    "full_autossh_R": [auto.pid, *self.autossh_ssh],
                    "full_ssh_L": [detach.pid], "full_lab_sshd_L": sorted(detach.sshd_pids),
                    "full_lab_sshd_R": sorted(gpu.sshd_pids), "full_gpu_ssh_R": [gpu.pid]}
        return {}

    def drain_logs(self) -> None:
        """Count the relay's and the agent's events so far; warnings are anomalies."""
        for name, log in (("relay", self.relay_log), ("agent", self.agent_log)):
            if log is None:
                continue
            while True:
                try:
                    line = log.queue.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    break
                event = json_event(line)
                if event is None:
                    self.anomalies.append(f"{name} printed a non-JSON line: {line}")
                    continue
                key = f"{name}:{event.get('event')}"
                self.events[key] = self.events.get(key, 0) + 1
                if event.get("event") == "datapath_backend":
                    self.events[f"{name} backend: {event.get('text')}"] = 1
                elif event.get("level") not in ("info", "debug"):
                    self.anomalies.append(f"{name} logged {event.get('level')}: "
                                          f"{event.get('text')}")

    def trial(self, workload: str, variant: str, nbytes: int) -> dict[str, Any] | None:
        self.trials += 1
        out = self.dir / f"rusage-{self.trials}.jsonl"
        self.drain_logs()
        spliced0 = self.events.get("relay:relay_fast_session", 0)
        try:
            if workload == SSH:
                result = self._ssh_trial(variant, nbytes, out)
            else:
                result = self._raw_trial(variant, nbytes, out)
        except BenchError as e:
            result = {"error": str(e)}
        finally:
            self._reap(out)
            self._end_feeders()
        self.drain_logs()
        if "error" not in result and variant in FAST_VARIANTS and \
                self.events.get("relay:relay_fast_session", 0) != spliced0 + 1:
            result["error"] = ("the relay did not log exactly one relay_fast_session: the "
                               "session did not take the fast path")
        return self._recorded(workload, variant, result)

    def _recorded(self, workload: str, variant: str, result: dict[str, Any]
                  ) -> dict[str, Any] | None:
        """``result``, or None once its error is recorded: an anomaly, printed, and the
        variant marked failed (not measured again unless --keep-going)."""
        if "error" in result:
            self.failed.add((workload, variant))
            report = f"{workload} {variant}: {result['error']}"
            self.anomalies.append(report)
            print(f"!! {report}", file=sys.stderr, flush=True)
            return None
        return result

    def _end_feeders(self) -> None:
        """The trial's feeders and raw clients: one that never got "go" ends on EOF."""
        for feeder in self.feeders:
            with contextlib.suppress(OSError, ValueError):
                assert feeder.stdin is not None
                feeder.stdin.close()
            try:
                feeder.wait(10)
            except subprocess.TimeoutExpired:
                feeder.kill()
        self.feeders.clear()

    def _reap(self, out: Path) -> None:
        """A wrapped process left over from a failed trial: ended here."""
        pid = Wrapped(out).wait("pid", 0)
        if pid is None:
            return
        if Wrapped(out).wait("exit", 5.0) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid["pid"]), signal.SIGTERM)
            self.stray.add(int(pid["pid"]))

    def _feeder(self, nbytes: int) -> tuple[subprocess.Popen[bytes], int]:
        """A feeder waiting for "go", and the read end of its pipe (the caller closes it)."""
        r, w = os.pipe()
        feeder = self.children.start("feed", [sys.executable, WORKERS, "--worker", "feed",
                                              str(nbytes)], stdin=subprocess.PIPE, stdout=w)
        os.close(w)
        self.feeders.append(feeder)
        return feeder, r

    @staticmethod
    def _go(feeder: subprocess.Popen[bytes]) -> float:
        assert feeder.stdin is not None
        start = time.perf_counter()
        feeder.stdin.write(b"go\n")
        feeder.stdin.close()
        return start

    def _spawn_user_ssh(self, variant: str, argv: list[str], r: int
                        ) -> tuple[subprocess.Popen[bytes], Lines, Lines, float]:
        """The user's ssh ``argv`` reading the feeder's pipe ``r`` (closed here), once the
        remote side said ``ready``: (ssh, its stdout, its stderr, when it was spawned)."""
        spawned = time.perf_counter()
        ssh = self.children.start(f"ssh {variant}", argv, stdin=r, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=REPO, env=avo_env())
        os.close(r)
        assert ssh.stdout is not None and ssh.stderr is not None
        sout, serr = Lines(ssh.stdout, "ssh-stdout"), Lines(ssh.stderr, "ssh-stderr")
        try:
            sout.wait_for(lambda s: s.strip() == "ready", START_TIMEOUT, "'ready' from ssh")
        except BenchError as e:
            ssh.kill()
            raise BenchError(f"{e}\nssh stderr:\n{serr.text()}") from None
        return ssh, sout, serr, spawned

    @staticmethod
    def _byte_count(sout: Lines) -> int:
        """What ``wc -c`` counted at the remote end (-1 if it said nothing)."""
        try:
            count = sout.wait_for(lambda s: s.strip() if s.strip().isdigit() else None, 10,
                                  "the byte count from wc -c")
        except BenchError:
            count = "-1"
        return int(count)

    def _ssh_trial(self, variant: str, nbytes: int, out: Path) -> dict[str, Any]:
        feeder, r = self._feeder(nbytes)
        argv = self.user_ssh(variant, out)
        acct = Accounting(self.groups(SSH, variant))
        ssh, sout, serr, spawned = self._spawn_user_ssh(variant, argv, r)
        ready = time.perf_counter()
        if variant in (FAST, FAST_PORTABLE):
            entry = Wrapped(out).wait("pid", 5.0)
            if entry is None:
                ssh.kill()
                raise BenchError("the ProxyCommand wrapper wrote no pid")
            acct.own("connect", int(entry["pid"]))
        acct.stream_start()
        start = self._go(feeder)
        if not wait_exit(ssh, nbytes / 1e6 + 2 * STALL_SECONDS + 30):
            ssh.kill()
            raise BenchError(f"ssh did not finish in time:\n{serr.text()}")
        seconds = time.perf_counter() - start
        acct.stream_end()
        result: dict[str, Any] = {"seconds": seconds, "setup_s": ready - spawned}
        if variant in (FAST, FAST_PORTABLE):
            end = Wrapped(out).wait("exit", 30.0)
            if end is None:
                raise BenchError("labrelay connect did not exit within 30 s of ssh")
            if end["exit"] != 0:
                result["error"] = f"labrelay connect exited {end['exit']}"
            result.update(acct.finish(end["cpu_s"]))
        else:
            result.update(acct.finish(None))
        feeder.wait(30)
        count = result["bytes"] = self._byte_count(sout)
        stderr = serr.text()
        if ssh.returncode != 0 or count != nbytes:
            result["error"] = (f"ssh exited {ssh.returncode}, {count} of {nbytes} bytes "
                               f"arrived:\n{stderr}")
        elif stderr:
            self.anomalies.append(f"ssh {variant} said on stderr: {stderr}")
        return result

    def _sink_event(self, conn_event: str, timeout: float, conn: int | None = None
                    ) -> dict[str, Any]:
        """The sink's next ``conn_event`` (of connection ``conn``, if given)."""
        assert self.sink_out is not None

        def match(line: str) -> dict[str, Any] | None:
            event = json.loads(line)
            if conn is not None and event.get("conn") != conn:
                return None  # a connection of an earlier, failed trial
            if event.get("event") == "error":
                raise BenchError(f"sink: {event['error']} after {event['bytes']} bytes")
            return event if event.get("event") == conn_event else None

        result: dict[str, Any] = self.sink_out.wait_for(match, timeout, f"sink {conn_event}")
        return result

    def _source(self, port: int, nbytes: int) -> subprocess.Popen[bytes]:
        """The raw client, connecting to ``port`` and waiting for "go" (``_go``)."""
        client = self.children.start(
            "source", [sys.executable, WORKERS, "--worker", "source", str(port), str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO)
        self.feeders.append(client)  # ended like a feeder if the trial fails
        return client

    def _inetd_accept(self, timeout: float) -> socket.socket:
        assert self.inetd is not None
        self.inetd.settimeout(timeout)
        try:
            conn, _ = self.inetd.accept()
        except TimeoutError:
            raise BenchError(f"the raw client did not connect to the listener in "
                             f"{timeout:g} s") from None
        conn.setblocking(True)
        return conn

    def _raw_trial(self, variant: str, nbytes: int, out: Path) -> dict[str, Any]:
        """One raw transfer; the per-session process (socat, labrelay connect) runs under
        the rusage wrapper. Socket-fed: the client connects (to the sink, socat's listener
        or the harness's inetd-style listener, which starts labrelay connect on the accepted
        socket); pipe-fed: the feeder's pipe is the process's stdin. Either way the bytes
        start on "go", once the sink accepted."""
        timeout = nbytes / 1e6 + 2 * STALL_SECONDS + 30
        acct = Accounting(self.groups(RAW, variant))
        own = {SOCAT_SOCK: "socat", SOCAT_PIPE: "socat"}.get(variant, "connect")
        proc: subprocess.Popen[bytes] | None = None  # the wrapped per-session process
        errs: Lines | None = None
        spawned = time.perf_counter()
        if variant in PIPE_FED:
            gate, r = self._feeder(nbytes)
            argv = ([find_program("socat"), "-b", "131072", "-u", "STDIN",
                     f"TCP:{LOOPBACK}:{self.sink_port}"] if variant == SOCAT_PIPE
                    else self.connect_argv("sink:9000"))
            spawned = time.perf_counter()
            proc = self.children.start(variant, self.wrapped(out, argv), stdin=r,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       cwd=REPO, env=avo_env())
            os.close(r)
        elif variant == SOCAT_SOCK:
            port = free_port()
            argv = [find_program("socat"), "-b", "131072",
                    f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr",
                    f"TCP:{LOOPBACK}:{self.sink_port}"]
            proc = self.children.start(variant, self.wrapped(out, argv),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       cwd=REPO, env=avo_env())
            gate = self._source(port, nbytes)
        elif variant == FAST_SOCK:
            assert self.inetd is not None
            gate = self._source(self.inetd.getsockname()[1], nbytes)
            with self._inetd_accept(START_TIMEOUT) as conn:  # inetd: the socket is stdio
                proc = self.children.start(variant, self.wrapped(
                    out, self.connect_argv("sink:9000")), stdin=conn, stdout=conn,
                    stderr=subprocess.PIPE, cwd=REPO, env=avo_env())
        elif variant == SEED_FULL:  # the full chain's second forward leads to the sink
            gate = self._source(self.full_raw_pub, nbytes)
        else:
            gate = self._source(self.sink_port, nbytes)
        if proc is not None:
            assert proc.stderr is not None
            errs = Lines(proc.stderr, f"{variant}-stderr")
        try:
            conn_n = self._sink_event("accepted", START_TIMEOUT)["conn"]
        except BenchError as e:
            if proc is not None:
                proc.kill()
            raise BenchError(f"{e}\n{errs.text() if errs else ''}") from None
        ready = time.perf_counter()
        if proc is not None:
            entry = Wrapped(out).wait("pid", 5.0)
            if entry is None:
                proc.kill()
                raise BenchError("the rusage wrapper wrote no pid")
            acct.own(own, int(entry["pid"]))
        acct.stream_start()
        self._go(gate)
        done = self._sink_event("done", timeout, conn_n)
        acct.stream_end()
        result: dict[str, Any] = {"seconds": done["seconds"], "bytes": done["bytes"],
                                  "setup_s": ready - spawned}
        for name, p in (("the client or feeder", gate), (variant, proc)):
            if p is not None and not wait_exit(p, 30):
                p.kill()
                raise BenchError(f"{name} did not exit within 30 s of the sink's EOF")
        if proc is not None:
            end = Wrapped(out).wait("exit", 10.0)
            if end is None:
                raise BenchError(f"{variant} did not report its exit")
            result.update(acct.finish(end["cpu_s"]))
        else:
            result.update(acct.finish(None))
        text = errs.text() if errs else ""
        codes = [p.returncode for p in (gate, proc) if p is not None]
        if any(codes) or done["bytes"] != nbytes:
            result["error"] = (f"{variant}: exit statuses (client or feeder, relaying "
                               f"process) {codes}, {done['bytes']} of {nbytes} bytes "
                               f"arrived:\n{text}")
        elif text:
            self.anomalies.append(f"raw {variant} said on stderr: {text}")
        return result
