"""A real HTTP CONNECT proxy for the tests: Debian's ``tinyproxy``, on a port of ours."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness import HarnessError


def tinyproxy_program() -> str:
    found = shutil.which("tinyproxy") or next(
        (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if os.path.exists(p)), None)
    if found is None:
        raise HarnessError("tinyproxy is not installed (scripts/dev setup installs it)")
    return found


class Tinyproxy:
    """``tinyproxy -d`` listening on ``listen:port``; CONNECT only to ``connect_ports``
    (tinyproxy answers 403 to others), with Basic credentials when ``auth`` is given.
    ``argv_prefix`` runs it elsewhere (``ip netns exec NS``)."""

    def __init__(self, directory: Path, port: int, connect_ports: list[int], *,
                 listen: str = "127.0.0.1", allow: str = "127.0.0.0/8",
                 auth: tuple[str, str] | None = None,
                 argv_prefix: list[str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.listen = listen
        self.conf = directory / "tinyproxy.conf"
        self.log = directory / "tinyproxy.log"
        lines = [f"Port {port}", f"Listen {listen}", "Timeout 600", "MaxClients 64",
                 f"Allow {allow}", "LogLevel Info", "User nobody", "Group nogroup",
                 "DisableViaHeader Yes"]
        lines += [f"ConnectPort {p}" for p in connect_ports]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        self.conf.write_text("\n".join(lines) + "\n")
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen([*(argv_prefix or []), tinyproxy_program(), "-d", "-c",
                                      str(self.conf)], stdout=self.logf, stderr=self.logf,
                                     stdin=subprocess.DEVNULL)

    def wait_listening(self, timeout: float = 10.0, connect: bool = True) -> None:
        """Until its port accepts (bounded polling: tinyproxy announces nothing we can
        await); ``connect=False`` when the test process cannot reach it (another netns)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"tinyproxy exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            if not connect and b"accepting connections" in self.log.read_bytes().lower():
                return
            if connect:
                try:
                    socket.create_connection((self.listen, self.port), timeout=1).close()
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise HarnessError(f"tinyproxy did not listen within {timeout}s: "
                                   f"{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def url(self, auth: tuple[str, str] | None = None) -> str:
        who = f"{auth[0]}:{auth[1]}@" if auth else ""
        return f"http://{who}{self.listen}:{self.port}"

    def diagnostics(self) -> str:
        return f"tinyproxy on {self.listen}:{self.port}:\n{self.log.read_text()[-5000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.logf.close()
