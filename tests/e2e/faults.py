"""Sessions kept in flight while a fault is injected, and how each of them ended.

A fault on the lab_pc<->cloud link must end every session that crossed it with an
*error*, never with data that silently stops short. The kinds of session, all started
by users on mac:

``ssh``              ``ssh gpu-cluster`` (by name, through the relay) running a paced
                     counter; it must exit non-zero.
``scp``              a 1 GiB scp upload to gpu_cluster by name; it must exit non-zero
                     (or, had it finished, have copied every byte).
``download-L``       raw TCP from the data service through carol's stock ``ssh -L``.
``upload-L``         raw TCP to the data service, the same way.
``download-public``  raw TCP from the data service through public port 2202.
``upload-public``    raw TCP to the data service through public port 2202.

For the raw TCP sessions an end is *silent* when the endpoint saw a clean FIN with
bytes missing (the data service, for an upload it never saw complete; the client on
mac, for a download short of what it asked for) and an *error* when it saw a reset.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from harness import DataStream, HarnessError, SshProcess
from nodes import CLOUD, DATA_PORT, DATA_PUBLIC_PORT, Download, MiB, Site, UploadEnd, download

BIG = 1024 * MiB
CAROL_PORT = 19000


@dataclass
class Outcome:
    kind: str
    expected: int  # bytes the session would have moved had it not been cut
    moved: int  # bytes that arrived at the far end
    ended: str  # "error" | "complete" | "silent"
    detail: str = ""
    lost: int = 0  # bytes handed to the sender's kernel that never arrived, in a silent end

    @property
    def silently_wrong(self) -> bool:
        return self.ended == "silent"


class Upload:
    """mac -> data service (ModeServer "U"): sends a big stream until the path breaks."""

    def __init__(self, site: Site, host: str, port: int, stream: DataStream) -> None:
        self.stream = stream
        self.sent = 0
        self.error = ""
        self.progress = threading.Event()
        self.done = threading.Event()
        with site.topo.inside("mac"):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect((host, port))
        threading.Thread(target=self._run, daemon=True, name="upload").start()

    def _run(self) -> None:
        try:
            self.sock.sendall(b"U")
            for chunk in self.stream.chunks():
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                if self.sent >= MiB:
                    self.progress.set()
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.progress.set()
            self.sock.close()
            self.done.set()


RAW_KINDS = ("download-L", "upload-L", "download-public", "upload-public")


@dataclass
class InFlight:
    """Starts the sessions ``kinds`` (see the module docstring) and judges their ends.

    ``ssh`` and ``scp`` run inside SSH end to end; ``download-L``/``upload-L`` go
    through carol's stock ``ssh -L``; ``download-public``/``upload-public`` through
    the public port 2202, whose TCP connections the relay itself holds.
    """

    site: Site
    trial: int
    kinds: tuple[str, ...] = ("ssh", "scp")
    procs: dict[str, SshProcess] = field(default_factory=dict)
    downloads: dict[str, Download] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    scp_dst: str = ""
    _done: dict[str, threading.Event] = field(default_factory=dict)

    def _raw_address(self, kind: str) -> tuple[str, int]:
        return ("127.0.0.1", CAROL_PORT) if kind.endswith("-L") else (CLOUD, DATA_PUBLIC_PORT)

    def start(self) -> InFlight:
        site = self.site
        gpu = site.gpu
        assert gpu is not None and site.data is not None
        while not site.data.uploads.empty():  # what earlier trials left
            site.data.uploads.get_nowait()
        cfg = site.user_config("alice")
        if "ssh" in self.kinds:
            counter = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.02; done"
            self.procs["ssh"] = site.ssh_process(
                [site.ssh_bin, "-F", str(cfg), "gpu-cluster", counter], name=f"ssh-{self.trial}")
        if "scp" in self.kinds:
            src = site.dir / "sparse-1GiB.bin"
            if not src.exists():
                with open(src, "wb") as f:
                    f.truncate(BIG)
            self.scp_dst = str(site.dir / f"scp-{self.trial}.bin")
            mark = gpu.log.mark()
            self.procs["scp"] = site.ssh_process(
                [site.scp_bin, "-q", "-F", str(cfg), str(src), f"gpu-cluster:{self.scp_dst}"],
                name=f"scp-{self.trial}")
        started: list[threading.Event] = []
        for i, kind in enumerate(k for k in self.kinds if k in RAW_KINDS):
            host, port = self._raw_address(kind)
            if kind.startswith("download"):
                progress = threading.Event()
                done = threading.Event()
                self._done[kind] = done
                t = threading.Thread(target=self._fetch, daemon=True, name=kind,
                                     args=(kind, host, port, progress, done,
                                           DataStream(7000 + 10 * self.trial + i, BIG)))
                t.start()
                started.append(progress)
            else:
                up = Upload(site, host, port, DataStream(8000 + 10 * self.trial + i, BIG))
                self.uploads[kind] = up
                started.append(up.progress)
        # Everything is moving before the fault.
        if "ssh" in self.procs:
            self.procs["ssh"].stdout.wait_for(r"^\d+$", 20, what="ssh counter")
        if "scp" in self.procs:
            # 1 GiB cannot be through before the fault, a few ms after the sftp session starts.
            gpu.wait_log(r"Starting session: subsystem 'sftp'", timeout=20, since=mark)
        for event in started:
            if not event.wait(20):
                raise HarnessError("raw TCP sessions did not start moving within 20 s")
        return self

    def _fetch(self, kind: str, host: str, port: int, progress: threading.Event,
               done: threading.Event, stream: DataStream) -> None:
        try:
            with self.site.mac_socket(port, host=host, timeout=60) as sock:
                self.downloads[kind] = download(sock, stream, progress)
        finally:
            progress.set()
            done.set()

    def finish(self, timeout: float = 30.0) -> list[Outcome]:
        """Wait for every session to end (bounded) and judge how each ended."""
        site = self.site
        outcomes = []
        if "ssh" in self.procs:
            rc = self.procs["ssh"].wait_exit(timeout)
            lines = self.procs["ssh"].stdout.lines
            outcomes.append(Outcome("ssh", 0, len(lines), "error" if rc != 0 else "silent",
                                    f"exit {rc} after {len(lines)} lines"))
        if "scp" in self.procs:
            rc = self.procs["scp"].wait_exit(timeout)
            size = os.path.getsize(self.scp_dst) if os.path.exists(self.scp_dst) else 0
            if rc != 0:
                ended = "error"
            else:
                ended = "complete" if size == BIG and _zeros(self.scp_dst) else "silent"
            outcomes.append(Outcome("scp", BIG, size, ended, f"exit {rc}, {size} bytes arrived"))
            with contextlib.suppress(OSError):
                os.unlink(self.scp_dst)
        for kind, done in self._done.items():
            if not done.wait(timeout):
                raise HarnessError(f"{kind} still running {timeout}s after the fault")
            d = self.downloads[kind]
            if d.complete:
                ended = "complete"
            else:
                ended = "silent" if d.ended == "eof" else "error"
            outcomes.append(Outcome(kind, d.expected, d.received, ended,
                                    f"the client on mac saw {d.ended}"))
        assert site.data is not None
        for up in self.uploads.values():
            if not up.done.wait(timeout):
                raise HarnessError(f"raw upload still sending {timeout}s after the fault")
        arrived: list[UploadEnd] = []
        for _ in self.uploads:
            try:
                arrived.append(site.data.uploads.get(timeout=timeout))
            except queue.Empty:
                raise HarnessError(f"the data service saw no end of an upload within "
                                   f"{timeout}s") from None
        for kind, up in self.uploads.items():
            # What arrived is a prefix of one sender's stream: match it by its sha256.
            match = next((r for r in arrived if _prefix_sha256(up.stream, r.nbytes) == r.sha256),
                         None)
            assert match is not None, (kind, arrived)
            arrived.remove(match)
            if match.nbytes == up.stream.size and match.ended == "eof":
                ended = "complete"
            else:
                ended = "silent" if match.ended == "eof" else "error"
            outcomes.append(Outcome(kind, up.stream.size, match.nbytes, ended,
                                    f"the data service saw {match.ended} after {match.nbytes} "
                                    f"bytes (client: {up.error or 'ok'})",
                                    lost=up.sent - match.nbytes if ended == "silent" else 0))
        return outcomes


def _prefix_sha256(stream: DataStream, n: int) -> str:
    h = hashlib.sha256()
    for chunk in stream.chunks():
        if n <= 0:
            break
        h.update(chunk[:n])
        n -= len(chunk)
    return h.hexdigest()


def _zeros(path: str) -> bool:
    zero = hashlib.sha256(bytes(MiB)).digest()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            if len(chunk) != MiB or hashlib.sha256(chunk).digest() != zero:
                return chunk == bytes(len(chunk))
    return True


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "sessions": len(outcomes),
        "ended_with_error": sum(o.ended == "error" for o in outcomes),
        "completed": sum(o.ended == "complete" for o in outcomes),
        "silently_wrong": sum(o.silently_wrong for o in outcomes),
        "bytes_received": sum(max(o.moved, 0) for o in outcomes if o.kind != "ssh"),
        "bytes_lost": sum(o.lost for o in outcomes),
        "silently_wrong_kinds": sorted({o.kind for o in outcomes if o.silently_wrong}),
    }


__all__ = ["CAROL_PORT", "DATA_PORT", "RAW_KINDS", "InFlight", "Outcome", "summarize"]
