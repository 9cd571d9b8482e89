"""``labrelay demo``: the seed's whole path on loopback, ready to try.

Stands up, in a temporary directory and on 127.0.0.1 only:

* a private OpenSSH ``sshd`` playing the cloud server (own config, host key and
  authorized keys; nothing of the machine's own sshd is touched), which is also
  the "GPU cluster" sshd the user logs into through the tunnel;
* a small web page playing the lab's Jupyter;
* a labrelay agent (in this process) with reverse forwards for both, a local
  forward, and its admin endpoint;

then proves the path (an HTTP fetch through the server-side port, and a real
``ssh`` session through the tunnel when the ``ssh`` client is installed) and
prints the commands to try while it runs.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from .config import (
    AdminConfig,
    Backoff,
    HostKeyPolicy,
    HostPort,
    Keepalive,
    LinkConfig,
    LocalForward,
    NodeConfig,
    RemoteForward,
)
from .keygen import generate_keypair
from .service import make_node_service

log = Logger(namespace="labrelay.demo")
MARKER = "hello from the lab (labrelay demo)"
SSHD_START_TIMEOUT = 15.0
PROOF_TIMEOUT = 30.0


class DemoError(Exception):
    """The demo could not set up or prove the path; ``str()`` says what to do."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_sshd() -> str | None:
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"{MARKER}\n".encode()


class _SshdProtocol(protocol.ProcessProtocol):
    """Watches a private sshd's stderr for 'Server listening' and its exit."""

    def __init__(self) -> None:
        self.listening: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def errReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-65536:]
        if not self.listening.called and b"Server listening" in self.output:
            self.listening.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(DemoError(
                "the private sshd exited before listening:\n"
                + self.output.decode("utf-8", "replace")
            ))
        self.ended.callback(None)
        reason.trap(ProcessDone, ProcessTerminated)


class _CollectProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.done: defer.Deferred[tuple[int, str, str]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", 0) or 0
        self.done.callback((code, self.out.decode(errors="replace"),
                            self.err.decode(errors="replace")))


class Demo:
    """Everything the demo starts, and how to stop it."""

    def __init__(self, reactor: Any, workdir: Path) -> None:
        self.reactor = reactor
        self.dir = workdir
        self.user = getpass.getuser()
        self.sshd_port = _free_port()
        self.admin_port = _free_port()
        self.sshd: _SshdProtocol | None = None
        self.node: Any = None
        self.web_port: Any = None

    def _write_files(self) -> None:
        d = self.dir
        generate_keypair(d / "host_ed25519", "demo-sshd-host-key")
        agent_line = generate_keypair(d / "agent_ed25519", "labrelay-demo-agent")
        user_line = generate_keypair(d / "user_ed25519", "labrelay-demo-user")
        (d / "authorized_keys").write_text(f"{agent_line}\n{user_line}\n")
        host_pub = (d / "host_ed25519.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.sshd_port} {' '.join(host_pub)}\n")
        (d / "sshd_config").write_text(
            f"Port {self.sshd_port}\nListenAddress 127.0.0.1\n"
            f"HostKey {d / 'host_ed25519'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "AllowTcpForwarding yes\nGatewayPorts no\nX11Forwarding no\n"
            "SetEnv LABRELAY_DEMO_HOST=gpu_cluster\nLogLevel INFO\n"
        )

    async def start_sshd(self, sshd: str) -> None:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.sshd = _SshdProtocol()
        argv = [sshd, "-D", "-e", "-f", str(self.dir / "sshd_config")]
        self.reactor.spawnProcess(self.sshd, sshd, argv, env=dict(os.environ))
        timer = self.reactor.callLater(SSHD_START_TIMEOUT, self.sshd.listening.cancel)
        try:
            await self.sshd.listening
        except defer.CancelledError:
            raise DemoError(f"the private sshd did not start within {SSHD_START_TIMEOUT:g}s:\n"
                            + self.sshd.output.decode("utf-8", "replace")) from None
        finally:
            if timer.active():
                timer.cancel()

    def node_config(self, web_port: int) -> NodeConfig:
        link = LinkConfig(
            name="cloud",
            host="127.0.0.1",
            port=self.sshd_port,
            user=self.user,
            identities=(self.dir / "agent_ed25519",),
            host_key=HostKeyPolicy(known_hosts=self.dir / "known_hosts"),
            keepalive=Keepalive(interval=5, count_max=3),
            backoff=Backoff(initial=0.5, maximum=5),
            remote=(
                RemoteForward("127.0.0.1", 0, HostPort("127.0.0.1", self.sshd_port), "gpu-ssh"),
                RemoteForward("127.0.0.1", 0, HostPort("127.0.0.1", web_port), "jupyter"),
            ),
            local=(LocalForward("127.0.0.1", 0, HostPort("127.0.0.1", web_port), "jupyter-L"),),
        )
        return NodeConfig(source="labrelay demo", links=(link,),
                          admin=AdminConfig(HostPort("127.0.0.1", self.admin_port)))

    async def run(self, once: bool) -> int:
        sshd = find_sshd()
        if sshd is None:
            raise DemoError("OpenSSH's sshd is not installed; on Debian/Ubuntu: "
                            "apt-get install openssh-server (scripts/dev demo does it for you)")
        self._write_files()
        await self.start_sshd(sshd)
        site = Site(_Page())
        site.noisy = False
        self.web_port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        web = self.web_port.getHost().port
        self.node = make_node_service(self.node_config(web), self.reactor)
        self.node.startService()
        link = self.node.links[0]
        ready = link.whenAllReady()
        timer = self.reactor.callLater(PROOF_TIMEOUT, ready.cancel)
        try:
            await ready
        except defer.CancelledError:
            raise DemoError(f"the forwards were not ready within {PROOF_TIMEOUT:g}s; "
                            f"link state: {link.state}, last error: {link.last_error}") from None
        finally:
            if timer.active():
                timer.cancel()
        ports = {f.name: f.bound_port for f in link.remote + link.local}
        await self.prove(ports)
        self.print_tries(ports, once)
        if once:
            return 0
        await defer.Deferred()  # until Ctrl-C stops the reactor
        return 0

    async def prove(self, ports: dict[str, int | None]) -> None:
        from twisted.web.client import Agent, readBody

        agent = Agent(self.reactor)
        for name in ("jupyter", "jupyter-L"):
            url = f"http://127.0.0.1:{ports[name]}/".encode()
            body = (await readBody(await agent.request(b"GET", url))).decode()
            if MARKER not in body:
                raise DemoError(f"unexpected answer through {name}: {body!r}")
            log.info("proved: GET {url} through forward {name} -> {body}",
                     event="demo_proof", url=url.decode(), name=name, body=body.strip())
        ssh = shutil.which("ssh")
        if ssh is None:
            log.info("no ssh client installed: skipping the ssh proof", event="demo_proof")
            return
        collect = _CollectProtocol()
        argv = [ssh, *self.ssh_options(), "-p", str(ports["gpu-ssh"]), f"{self.user}@127.0.0.1",
                "echo reached $LABRELAY_DEMO_HOST as $(id -un) through the tunnel"]
        self.reactor.spawnProcess(collect, ssh, argv, env=dict(os.environ))
        code, out, err = await collect.done
        if code != 0 or "reached gpu_cluster" not in out:
            raise DemoError(f"ssh through the tunnel failed (exit {code}): {err or out}")
        log.info("proved: ssh through forward gpu-ssh -> {out}", event="demo_proof",
                 out=out.strip())

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.dir / "user_ed25519"), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "HostKeyAlias=[127.0.0.1]:" + str(self.sshd_port)]

    def print_tries(self, ports: dict[str, int | None], once: bool) -> None:
        opts = " ".join(self.ssh_options())
        print(
            f"""
labrelay demo is up (files in {self.dir}):
  private sshd (the "cloud server")  127.0.0.1:{self.sshd_port}
  agent link "cloud" with reverse forwards
    gpu-ssh   127.0.0.1:{ports['gpu-ssh']} on the server -> the GPU cluster's sshd
    jupyter   127.0.0.1:{ports['jupyter']} on the server -> the lab's web service
  and a local forward
    jupyter-L 127.0.0.1:{ports['jupyter-L']} here -> the lab's web service via the server

Try, in another terminal:
  ssh {opts} -p {ports['gpu-ssh']} {self.user}@127.0.0.1 'echo $LABRELAY_DEMO_HOST'
  curl http://127.0.0.1:{ports['jupyter']}/
  labrelay status --admin 127.0.0.1:{self.admin_port}
  curl http://127.0.0.1:{self.admin_port}/metrics
{"(--once: stopping now; run `labrelay demo` to keep it up)" if once else "Press Ctrl-C to stop."}
""",
            flush=True,
        )

    async def stop(self) -> None:
        node, self.node = self.node, None
        if node is not None and node.running:
            await defer.maybeDeferred(node.stopService)
        web, self.web_port = self.web_port, None
        if web is not None:
            await defer.maybeDeferred(web.stopListening)
        if self.sshd is not None and not self.sshd.ended.called:
            self.sshd.transport.signalProcess("TERM")  # type: ignore[union-attr]
            await self.sshd.ended


def run_demo(once: bool, log_format: str, verbose: bool) -> int:
    from twisted.internet import reactor

    from .cli import start_logging

    start_logging(log_format, verbose)
    result = {"code": 1}
    with tempfile.TemporaryDirectory(prefix="labrelay-demo-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # sshd (privilege-separated) must read its files
        demo = Demo(reactor, workdir)

        async def main() -> None:
            try:
                result["code"] = await demo.run(once)
            except DemoError as e:
                print(f"labrelay demo: {e}", file=sys.stderr)
                result["code"] = 1
            finally:
                await demo.stop()
                if reactor.running:  # type: ignore[attr-defined]
                    reactor.stop()  # type: ignore[attr-defined]

        def before_shutdown() -> defer.Deferred[None]:
            return defer.ensureDeferred(demo.stop())

        reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))  # type: ignore[attr-defined]
        reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    return result["code"]
