"""The seed's four hosts as network namespaces on one machine (issue 5 §1).

::

    gpu_cluster 10.201.0.20 ──lan── 10.201.0.10 lab_pc 10.201.1.2 ──wan── 10.201.1.1 ┐
                                                                                     internet
    mac         10.201.2.2 ──────────────────────────────────wan── 10.201.2.1 ┤  (a router)
    cloud       203.0.113.10 ─────────────────────────────────eth── 203.0.113.1 ┘

* ``gpu_cluster`` has no default route: it reaches the lab LAN and nothing else.
* ``lab_pc`` does not forward (``ip_forward=0``): the LAN ends there.
* ``internet`` routes between lab_pc, mac and cloud. Like the NAT boxes in front of a
  lab and a café, it lets lab_pc and mac dial out but drops every TCP SYN towards
  them, and it never forwards between the two of them. The filter is stateless (no
  conntrack), so packets that pass the router twice through the impairment wire
  (below) meet the same rules on their way out. Only ``cloud`` has a "public"
  address (TEST-NET-3); everything else is 10.201.0.0/16. Nothing leaves the machine:
  no interface of the root namespace is touched.

Faults on the lab_pc↔cloud path (the link the agent keeps up):

* ``link_down()``/``link_up()``: ``ip link set wan0 down|up`` on lab_pc (its default
  route is put back on ``up``, as a DHCP client would);
* ``blackhole()``/``restore()``: iptables DROP in the router, both directions: no RST,
  no ICMP, silence;
* ``impair(...)``: delay ± jitter, loss, reorder, duplicate, with netem's semantics.
  This kernel has no ``sch_netem`` (only HTB/TBF), so when ``tc qdisc ... netem`` is
  refused the router steers lab_pc↔cloud packets through two TUN devices joined by
  ``wire.py``, a userspace process that applies the same impairments; when netem
  exists it is used instead (``impairment_backend``): on the router's ``lab0`` (towards
  lab_pc) and, behind an HTB class that only lab_pc's packets enter, on ``cloud0``.

Every namespace is named ``lr<pid>-<host>`` so parallel runs never meet. ``down()``
kills whatever still runs in them, deletes them (their veths go with them) and
``leftovers()`` proves nothing stayed behind.

Run by hand (``scripts/topology up|down|shell HOST|status``)::

    scripts/topology up            # builds it, prints the namespaces and addresses
    scripts/topology shell mac     # a shell "in the café"
    scripts/topology down
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
WIRE = HERE / "wire.py"
STATE_FILE = Path("/run/labrelay-e2e-topology.json")  # for scripts/topology only

HOSTS = ("gpu_cluster", "lab_pc", "cloud", "mac")
ROUTER = "internet"

# The addresses each host has (the first is "its" address).
ADDR = {
    "gpu_cluster": "10.201.0.20",
    "lab_pc": "10.201.0.10",
    "lab_pc_wan": "10.201.1.2",
    "mac": "10.201.2.2",
    "cloud": "203.0.113.10",
}
LAB_GW, MAC_GW, CLOUD_GW = "10.201.1.1", "10.201.2.1", "203.0.113.1"
LAB_WAN_NET, CLOUD_NET = "10.201.1.0/30", "203.0.113.0/24"

# Who may open a TCP connection to whom (issue 5 §1); everything else must fail.
REACHABLE = {
    ("gpu_cluster", "lab_pc"),
    ("lab_pc", "gpu_cluster"),
    ("lab_pc", "cloud"),
    ("mac", "cloud"),
}

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class TopologyError(RuntimeError):
    pass


def run(argv: Sequence[str], check: bool = True, timeout: float = 30.0,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout,
        input=input.decode() if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and out.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


def netns_names() -> set[str]:
    out = run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here, or None if they can."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    for prog in ("ip", "iptables"):
        if subprocess.run(["sh", "-c", f"command -v {prog}"], capture_output=True).returncode:
            return f"`{prog}` not installed"
    probe = f"lr{os.getpid()}-probe"
    out = run(["ip", "netns", "add", probe], check=False)
    if out.returncode != 0:
        return f"`ip netns add` failed: {out.stderr.strip()}"
    try:
        veth = run(["ip", "-n", probe, "link", "add", "name", "p0", "type", "veth",
                    "peer", "name", "p1"], check=False)
        if veth.returncode != 0:
            return f"veth pairs not available: {veth.stderr.strip()}"
        ipt = run(["ip", "netns", "exec", probe, "iptables", "-L", "-n"], check=False)
        if ipt.returncode != 0:
            return f"iptables does not work in a namespace: {ipt.stderr.strip()}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Impairment:
    """netem's parameters (one direction; the wire applies them to both)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # fraction, 0.01 = 1 %
    reorder: float = 0.0  # fraction sent at once, the rest wait delay_ms
    duplicate: float = 0.0
    limit: int = 10000  # packets queued per direction (netem's default is 1000)

    def label(self) -> str:
        parts = []
        if self.delay_ms:
            parts.append(f"delay {self.delay_ms:g}ms"
                         + (f" ±{self.jitter_ms:g}ms" if self.jitter_ms else ""))
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.reorder:
            parts.append(f"reorder {self.reorder * 100:g}%")
        if self.duplicate:
            parts.append(f"duplicate {self.duplicate * 100:g}%")
        return ", ".join(parts) or "none"

    def netem_args(self) -> list[str]:
        args = ["limit", str(self.limit)]
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms:g}ms"]
            if self.jitter_ms:
                args.append(f"{self.jitter_ms:g}ms")
        if self.loss:
            args += ["loss", f"{self.loss * 100:g}%"]
        if self.reorder:
            args += ["reorder", f"{self.reorder * 100:g}%"]
        if self.duplicate:
            args += ["duplicate", f"{self.duplicate * 100:g}%"]
        return args

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: f"lr{os.getpid()}")
    built: bool = False
    _ns_inodes: dict[str, int] = field(default_factory=dict)
    _veths_before: set[str] = field(default_factory=set)
    _wire: subprocess.Popen[bytes] | None = None
    _wire_lines: list[str] = field(default_factory=list)
    _wire_cond: threading.Condition = field(default_factory=threading.Condition)
    impairment_backend: str | None = None  # "netem" or "wire", once impair() ran
    _netem_cloud_classes: bool = False

    # -- names

    def ns(self, host: str) -> str:
        if host not in (*HOSTS, ROUTER):
            raise TopologyError(f"no host {host!r} (hosts: {', '.join((*HOSTS, ROUTER))})")
        return f"{self.prefix}-{host}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in (*HOSTS, ROUTER)]

    @staticmethod
    def address(host: str) -> str:
        return ADDR[host]

    def argv(self, host: str, *argv: str | os.PathLike[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host), *map(str, argv)]

    def sh(self, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.argv(host, *argv), check=check)

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Run the body (this thread only) in ``host``'s network namespace.

        Sockets made inside stay in that namespace after the block, so the test
        process itself can be a client or a server on any host.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.ns(host)}): {os.strerror(err)}")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns back: {os.strerror(err)}")
        finally:
            os.close(own)
            os.close(target)

    def sysctl(self, host: str, key: str) -> str:
        """A sysctl of ``host``'s namespace (read through /proc/sys, no sysctl(8))."""
        with self.inside(host), open(f"/proc/sys/{key.replace('.', '/')}") as f:
            return f.read().strip()

    def set_sysctl(self, host: str, key: str, value: str) -> None:
        with self.inside(host), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
            f.write(value)

    # -- building

    def up(self) -> Topology:
        """Build everything; on any failure tear down what was built and raise."""
        clash = set(self.namespaces) & netns_names()
        if clash:
            raise TopologyError(f"namespaces already exist: {sorted(clash)}")
        self._veths_before = root_veths()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self.built = True
        return self

    def _build(self) -> None:
        for name in self.namespaces:
            run(["ip", "netns", "add", name])
            self._ns_inodes[name] = os.stat(f"/run/netns/{name}").st_ino
            ns = ["ip", "-n", name]
            run([*ns, "link", "set", "lo", "up"])
        for host in (*HOSTS, ROUTER):
            for key, value in (("net.ipv6.conf.all.disable_ipv6", "1"),
                               ("net.ipv6.conf.default.disable_ipv6", "1"),
                               ("net.ipv4.ip_forward", "0")):
                try:
                    self.set_sysctl(host, key, value)
                except FileNotFoundError:
                    if "ipv6" not in key:  # a kernel without IPv6 has nothing to turn off
                        raise

        def veth(a: str, a_if: str, a_addr: str, b: str, b_if: str, b_addr: str) -> None:
            run(["ip", "link", "add", "name", a_if, "netns", self.ns(a), "type", "veth",
                 "peer", "name", b_if, "netns", self.ns(b)])
            for host, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
                run(["ip", "-n", self.ns(host), "addr", "add", addr, "dev", ifname])
                run(["ip", "-n", self.ns(host), "link", "set", ifname, "up"])

        veth("gpu_cluster", "lan0", f"{ADDR['gpu_cluster']}/24",
             "lab_pc", "lan0", f"{ADDR['lab_pc']}/24")
        veth("lab_pc", "wan0", f"{ADDR['lab_pc_wan']}/30", ROUTER, "lab0", f"{LAB_GW}/30")
        veth("mac", "wan0", f"{ADDR['mac']}/30", ROUTER, "mac0", f"{MAC_GW}/30")
        veth("cloud", "eth0", f"{ADDR['cloud']}/24", ROUTER, "cloud0", f"{CLOUD_GW}/24")
        run(["ip", "-n", self.ns("lab_pc"), "route", "add", "default", "via", LAB_GW])
        run(["ip", "-n", self.ns("mac"), "route", "add", "default", "via", MAC_GW])
        run(["ip", "-n", self.ns("cloud"), "route", "add", "default", "via", CLOUD_GW])

        r = self.ns(ROUTER)
        for key in ("net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter",
                    "net.ipv4.conf.default.rp_filter"):
            self.set_sysctl(ROUTER, key, "1" if key.endswith("forward") else "0")
        ipt = ["ip", "netns", "exec", r, "iptables", "-w"]
        run([*ipt, "-N", "lr-blackhole"])
        run([*ipt, "-A", "FORWARD", "-j", "lr-blackhole"])
        # The NAT boxes' rule without the NAT: lab_pc and mac only dial out.
        for ifname in ("lab0", "mac0"):
            run([*ipt, "-A", "FORWARD", "-o", ifname, "-p", "tcp", "--syn", "-j", "DROP"])
        run([*ipt, "-A", "FORWARD", "-i", "lab0", "-o", "mac0", "-j", "DROP"])
        run([*ipt, "-A", "FORWARD", "-i", "mac0", "-o", "lab0", "-j", "DROP"])

    # -- tearing down

    def processes(self) -> list[int]:
        """PIDs of every process living in one of this topology's namespaces."""
        inodes = set(self._ns_inodes.values())
        if not inodes:
            for name in self.namespaces:
                with contextlib.suppress(OSError):
                    inodes.add(os.stat(f"/run/netns/{name}").st_ino)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def reap(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` for the processes inside to exit; kill the rest.

        Returns the PIDs that had to be killed.
        """
        pids = self.processes()
        _wait_gone(pids, timeout)
        stray = [pid for pid in pids if _alive(pid)]
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(stray, 10.0)
        return stray

    def down(self) -> list[int]:
        """Kill what runs inside, delete the namespaces (and so their veths).

        Returns the PIDs that were still running (the caller decides whether
        that is a failure: the tests' own fixtures should have stopped them).
        """
        self.stop_wire()
        stray = self.processes()
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(stray, 10.0)
        existing = netns_names()
        for name in self.namespaces:
            if name in existing:
                run(["ip", "netns", "del", name], check=False)
        self.built = False
        return stray

    def leftovers(self) -> dict[str, list[Any]]:
        """What of this topology still exists: namespaces, veths, processes."""
        mine = [n for n in netns_names() if n.startswith(f"{self.prefix}-")]
        veths = sorted(root_veths() - self._veths_before)
        procs = [pid for pid in self.processes() if _alive(pid)]
        return {"namespaces": mine, "veths": veths, "processes": procs}

    # -- reachability (issue 5 §1: asserted before anything else)

    def reachability(self, port: int = 7, timeout: float = 1.0) -> dict[tuple[str, str], bool]:
        """Try a TCP connect from every host to every other host's address.

        A listener on ``port`` runs on each host; all attempts run at once, each
        bounded by ``timeout`` (a dropped SYN is a timeout; no route is at once).
        """
        listeners = []
        for host in HOSTS:
            with self.inside(host):
                listeners.append(socket.create_server((ADDR[host], port), backlog=64))
        attempts: dict[tuple[str, str], socket.socket] = {}
        results: dict[tuple[str, str], bool] = {}
        try:
            for src in HOSTS:
                for dst in HOSTS:
                    if src == dst:
                        continue
                    with self.inside(src):
                        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    err = s.connect_ex((ADDR[dst], port))
                    if err in (0, 115):  # connected, EINPROGRESS
                        attempts[(src, dst)] = s
                    else:
                        results[(src, dst)] = False
                        s.close()
            deadline = time.monotonic() + timeout
            pending = dict(attempts)
            while pending and (left := deadline - time.monotonic()) > 0:
                _, writable, _ = select.select([], list(pending.values()), [], left)
                for key, s in list(pending.items()):
                    if s in writable:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        results[key] = err == 0
                        del pending[key]
            for key in pending:
                results[key] = False
        finally:
            for s in [*attempts.values(), *listeners]:
                s.close()
        return results

    def assert_seed_reachability(self) -> dict[tuple[str, str], bool]:
        got = self.reachability()
        wrong = {k: v for k, v in got.items() if v != (k in REACHABLE)}
        if wrong:
            raise TopologyError(
                "reachability is not the seed's: "
                + ", ".join(f"{a}->{b} {'connected' if v else 'failed'}"
                            for (a, b), v in sorted(wrong.items()))
            )
        return got

    # -- faults on the lab_pc <-> cloud path

    def link_down(self) -> None:
        run(["ip", "-n", self.ns("lab_pc"), "link", "set", "wan0", "down"])

    def link_up(self) -> None:
        ns = ["ip", "-n", self.ns("lab_pc")]
        run([*ns, "link", "set", "wan0", "up"])
        run([*ns, "route", "replace", "default", "via", LAB_GW, "dev", "wan0", "onlink"])

    def blackhole(self) -> None:
        ipt = ["ip", "netns", "exec", self.ns(ROUTER), "iptables", "-w"]
        run([*ipt, "-A", "lr-blackhole", "-i", "lab0", "-j", "DROP"])
        run([*ipt, "-A", "lr-blackhole", "-o", "lab0", "-j", "DROP"])

    def restore(self) -> None:
        run(["ip", "netns", "exec", self.ns(ROUTER), "iptables", "-w", "-F", "lr-blackhole"])

    def blackhole_drops(self) -> int:
        out = run(["ip", "netns", "exec", self.ns(ROUTER), "iptables", "-w", "-L",
                   "lr-blackhole", "-n", "-v", "-x"]).stdout
        return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())

    # -- impairment (netem when the kernel has it, else the TUN wire)

    def netem_available(self) -> bool:
        r = self.ns(ROUTER)
        probe = run(["ip", "netns", "exec", r, "tc", "qdisc", "add", "dev", "lo", "root",
                     "netem", "delay", "0ms"], check=False)
        if probe.returncode == 0:
            run(["ip", "netns", "exec", r, "tc", "qdisc", "del", "dev", "lo", "root"],
                check=False)
            return True
        return False

    def impair(self, imp: Impairment, backend: str | None = None) -> str:
        """Apply ``imp`` to both directions of lab_pc<->cloud; returns the backend."""
        if backend is None:
            backend = self.impairment_backend or ("netem" if self.netem_available() else "wire")
        self.impairment_backend = backend
        r = self.ns(ROUTER)
        if backend == "netem":
            tc = ["ip", "netns", "exec", r, "tc"]
            # Towards lab_pc: everything leaving lab0 is lab_pc's.
            run([*tc, "qdisc", "replace", "dev", "lab0", "root", "netem", *imp.netem_args()])
            # Towards cloud: only what lab_pc sent (mac's packets leave cloud0 too).
            if not self._netem_cloud_classes:
                run([*tc, "qdisc", "replace", "dev", "cloud0", "root", "handle", "1:", "htb",
                     "default", "20"])
                for classid in ("1:10", "1:20"):
                    run([*tc, "class", "add", "dev", "cloud0", "parent", "1:", "classid",
                         classid, "htb", "rate", "10gbit"])
                run([*tc, "filter", "add", "dev", "cloud0", "parent", "1:", "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", "src", LAB_WAN_NET, "flowid", "1:10"])
                self._netem_cloud_classes = True
            run([*tc, "qdisc", "replace", "dev", "cloud0", "parent", "1:10", "handle", "10:",
                 "netem", *imp.netem_args()])
            return backend
        if self._wire is None:
            self._start_wire()
        self._wire_command({"set": imp.as_dict()})
        return backend

    def clear_impairment(self) -> dict[str, Any] | None:
        """Back to a clean path; returns the wire's counters (None for netem)."""
        r = self.ns(ROUTER)
        if self.impairment_backend == "netem":
            for ifname in ("lab0", "cloud0"):
                run(["ip", "netns", "exec", r, "tc", "qdisc", "del", "dev", ifname, "root"],
                    check=False)
            self._netem_cloud_classes = False
            return None
        if self._wire is not None:
            return self._wire_command({"set": Impairment().as_dict()})
        return None

    def wire_stats(self) -> dict[str, Any] | None:
        if self._wire is None:
            return None
        return self._wire_command({"stats": True})

    def _start_wire(self) -> None:
        r = self.ns(ROUTER)
        with self._wire_cond:  # a wire started before this one said "ready" too
            since = len(self._wire_lines)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", r, sys.executable, str(WIRE), "--lab", "wl", "--cloud", "wc"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wire = proc
        assert proc.stdout is not None
        threading.Thread(target=self._wire_pump, args=(proc.stdout,), daemon=True,
                         name="wire-stdout").start()
        self._wire_wait(lambda msg: msg.get("ready") is True, 15.0, since)
        ip = ["ip", "-n", r]
        # Steer lab_pc<->cloud through the wire: in from lab0 -> wl -> (wire) -> wc -> out.
        run([*ip, "route", "replace", "default", "dev", "wl", "table", "101"])
        run([*ip, "route", "replace", "default", "dev", "wc", "table", "102"])
        run([*ip, "rule", "add", "pref", "101", "iif", "lab0", "to", CLOUD_NET, "lookup", "101"])
        run([*ip, "rule", "add", "pref", "102", "iif", "cloud0", "to", LAB_WAN_NET,
             "lookup", "102"])

    def _wire_pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._wire_cond:
                self._wire_lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._wire_cond.notify_all()
        with self._wire_cond:
            self._wire_lines.append("")  # EOF marker
            self._wire_cond.notify_all()

    def _wire_wait(self, pred: Any, timeout: float, since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        index = since
        with self._wire_cond:
            while True:
                while index < len(self._wire_lines):
                    line = self._wire_lines[index]
                    index += 1
                    if line == "" and index == len(self._wire_lines) and self._wire is not None \
                            and self._wire.poll() is not None:
                        raise TopologyError("wire exited:\n" + "\n".join(self._wire_lines))
                    with contextlib.suppress(ValueError):
                        msg = json.loads(line)
                        if isinstance(msg, dict) and pred(msg):
                            return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TopologyError(f"wire: no answer within {timeout}s:\n"
                                        + "\n".join(self._wire_lines[-20:]))
                self._wire_cond.wait(left)

    def _wire_command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self._wire is not None and self._wire.stdin is not None
        with self._wire_cond:
            since = len(self._wire_lines)
        self._wire.stdin.write((json.dumps(cmd) + "\n").encode())
        self._wire.stdin.flush()
        return self._wire_wait(lambda msg: "stats" in msg, 10.0, since)["stats"]

    def stop_wire(self) -> None:
        proc, self._wire = self._wire, None
        if proc is None:
            return
        r = self.ns(ROUTER)
        for pref in ("101", "102"):
            run(["ip", "-n", r, "rule", "del", "pref", pref], check=False)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    # -- for people

    def describe(self) -> str:
        lines = [f"namespaces ({self.prefix}-*):"]
        for host in (*HOSTS, ROUTER):
            addrs = run(["ip", "-n", self.ns(host), "-o", "-4", "addr", "show"],
                        check=False).stdout
            found = re.findall(r"inet (\S+)", addrs)
            lines.append(f"  {host:12} {self.ns(host):24} "
                         + " ".join(a for a in found if not a.startswith("127.")))
        lines.append("reachable (TCP): " + ", ".join(f"{a}->{b}" for a, b in sorted(REACHABLE)))
        return "\n".join(lines)


def root_veths() -> set[str]:
    """Names of the veth interfaces in the root namespace."""
    out = run(["ip", "-o", "link", "show", "type", "veth"], check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def _wait_gone(pids: list[int], timeout: float) -> None:
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, OSError):
            fds.append(os.pidfd_open(pid))
    try:
        deadline = time.monotonic() + timeout
        pending = list(fds)
        while pending and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(pending, [], [], left)
            pending = [fd for fd in pending if fd not in ready]
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------
# scripts/topology


def _load_state() -> Topology:
    try:
        state = json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        raise SystemExit("no topology is up (scripts/topology up)") from None
    return Topology(prefix=state["prefix"], built=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/topology",
        description="The seed's hosts as network namespaces: gpu_cluster, lab_pc, cloud, "
                    "mac, joined by a router (internet). See docs/e2e.md.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="build it (and assert who reaches whom)")
    sub.add_parser("down", help="kill what runs inside and delete it")
    sub.add_parser("status", help="show the namespaces and addresses")
    shell = sub.add_parser("shell", help="a shell (or COMMAND) inside HOST")
    shell.add_argument("host", choices=(*HOSTS, ROUTER))
    shell.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.cmd == "up":
        if STATE_FILE.exists():
            raise SystemExit(f"a topology is already up ({STATE_FILE}); scripts/topology down")
        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"cannot build namespaces here: {reason}")
        topo = Topology(prefix=f"lrt{os.getpid()}").up()
        STATE_FILE.write_text(json.dumps({"prefix": topo.prefix}))
        try:
            topo.assert_seed_reachability()
        except TopologyError:
            topo.down()
            STATE_FILE.unlink()
            raise
        print(topo.describe())
        print("\nscripts/topology shell HOST   (e.g. mac: ssh -p 2222 … 203.0.113.10)")
        return 0
    topo = _load_state()
    if args.cmd == "down":
        stray = topo.down()
        STATE_FILE.unlink(missing_ok=True)
        left = topo.leftovers()
        print(f"down ({len(stray)} process(es) killed); left: {left}")
        return 1 if any(left.values()) else 0
    if args.cmd == "status":
        print(topo.describe())
        return 0
    command = args.command or [os.environ.get("SHELL", "/bin/bash")]
    env = {**os.environ, "PS1": f"[{args.host}] \\w\\$ "}
    os.execvpe("ip", ["ip", "netns", "exec", topo.ns(args.host), *command], env)
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
