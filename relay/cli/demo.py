"""``labrelay demo``: the whole product on loopback, ready to try.

Stands up, in a temporary directory and on 127.0.0.1 only, all in this process:

* labrelay's relay (the cloud end) with grants for one agent and two users;
* an agent (the lab PC) linked to it, registering the named services
  ``jupyter:8888`` (a small web page standing in for the lab's Jupyter) and, when
  OpenSSH's ``sshd`` is installed, ``gpu-cluster:22`` (a private sshd standing in
  for the GPU cluster: nothing of the machine's own sshd is touched);
* a second, simulated user (bob) whose own labrelay link holds a local forward to
  ``jupyter:8888`` through the relay;

then proves the path (bob's HTTP fetch through relay and agent; alice's real
``ssh -J`` login to ``gpu-cluster`` by name when ``ssh``/``sshd`` exist) and prints
the commands to try while it runs.  No OpenSSH server is needed for the relay
path itself.
"""

from __future__ import annotations

import getpass
import os
import shlex
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

from relay.config.schema import (
    AdminConfig,
    Backoff,
    HostKeyPolicy,
    HostPort,
    Keepalive,
    LinkConfig,
    LocalForward,
    NodeConfig,
    PrincipalConfig,
    RelayConfig,
    RemoteForward,
    ServiceGrant,
)
from relay.ops.service import make_node_service
from relay.server.hostkeyfile import load_host_keys
from relay.ssh.hostkeys import fingerprint_sha256
from relay.ssh.keygen import generate_keypair

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


def _labrelay_command() -> str:
    """How to run labrelay again from another terminal (it may live in a venv): an
    absolute path, because the ProxyCommand it goes into runs in the user's ssh's
    working directory, not the demo's (``.venv/bin/labrelay demo`` gave a relative
    ``argv[0]``), and quoted for the shell that runs it."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "labrelay":
        on_path = shutil.which("labrelay") == os.path.abspath(argv0)
        return "labrelay" if on_path else shlex.quote(os.path.abspath(argv0))
    return f"{shlex.quote(sys.executable)} -m relay"


class Demo:
    """Everything the demo starts, and how to stop it."""

    def __init__(self, reactor: Any, workdir: Path) -> None:
        self.reactor = reactor
        self.dir = workdir
        self.user = getpass.getuser()
        self.relay_port = _free_port()
        self.sshd_port = _free_port()
        self.admin_port = _free_port()
        self.sshd: _SshdProtocol | None = None
        self.node: Any = None
        self.web_port: Any = None
        self.keys: dict[str, str] = {}
        self.up = False

    def _write_files(self, with_sshd: bool) -> None:
        d = self.dir
        for name in ("lab_pc", "alice", "bob"):
            self.keys[name] = generate_keypair(d / f"{name}_ed25519", name)
        host_keys = load_host_keys(d / "relay-state")
        relay_pub = next(iter(host_keys.values())).public()
        self.relay_fingerprint = fingerprint_sha256(relay_pub)
        known = [f"[127.0.0.1]:{self.relay_port} {relay_pub.toString('OPENSSH').decode()}"]
        if with_sshd:
            generate_keypair(d / "gpu_host_ed25519", "demo-gpu-cluster-host-key")
            gpu_pub = " ".join((d / "gpu_host_ed25519.pub").read_text().split()[:2])
            known.append(f"gpu-cluster {gpu_pub}")
            (d / "authorized_keys").write_text(self.keys["alice"] + "\n")
            (d / "sshd_config").write_text(
                f"Port {self.sshd_port}\nListenAddress 127.0.0.1\n"
                f"HostKey {d / 'gpu_host_ed25519'}\nPidFile {d / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
                "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                "AllowTcpForwarding no\nX11Forwarding no\n"
                # scp of OpenSSH >= 9.0 speaks SFTP: without it "subsystem request failed"
                "Subsystem sftp internal-sftp\n"
                "SetEnv LABRELAY_DEMO_HOST=gpu_cluster\nLogLevel INFO\n"
            )
        (d / "known_hosts").write_text("\n".join(known) + "\n")
        (d / "ssh_config").write_text(
            f"Host labrelay\n    HostName 127.0.0.1\n    Port {self.relay_port}\n"
            f"    User alice\n    IdentityFile {d / 'alice_ed25519'}\n"
            "    IdentitiesOnly yes\n    BatchMode yes\n"
            f"    UserKnownHostsFile {d / 'known_hosts'}\n    StrictHostKeyChecking yes\n\n"
            f"Host gpu-cluster\n    ProxyJump labrelay\n    User {self.user}\n"
            f"    IdentityFile {d / 'alice_ed25519'}\n    IdentitiesOnly yes\n"
            "    BatchMode yes\n"
            f"    UserKnownHostsFile {d / 'known_hosts'}\n    StrictHostKeyChecking yes\n\n"
            # The fast path: the same login, its bytes spliced at relay and agent.
            f"Host gpu-cluster-fast\n    HostKeyAlias gpu-cluster\n    User {self.user}\n"
            f"    ProxyCommand {_labrelay_command()} connect -p {self.relay_port} "
            f"-i {d / 'alice_ed25519'} -o UserKnownHostsFile={d / 'known_hosts'} "
            "alice@127.0.0.1 gpu-cluster\n"
            f"    IdentityFile {d / 'alice_ed25519'}\n    IdentitiesOnly yes\n"
            "    BatchMode yes\n"
            f"    UserKnownHostsFile {d / 'known_hosts'}\n    StrictHostKeyChecking yes\n"
        )

    async def start_sshd(self, sshd: str) -> None:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.sshd = _SshdProtocol()
        argv = [sshd, "-D", "-e", "-f", str(self.dir / "sshd_config")]
        self.reactor.spawnProcess(self.sshd, sshd, argv, env=dict(os.environ))
        try:
            await self.sshd.listening.addTimeout(SSHD_START_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            raise DemoError(f"the private sshd did not start within {SSHD_START_TIMEOUT:g}s:\n"
                            + self.sshd.output.decode("utf-8", "replace")) from None

    def _principal(self, kind: str, name: str, services: list[str]) -> PrincipalConfig:
        return PrincipalConfig(
            kind=kind, name=name, keys=(self.keys[name],),
            services=tuple(ServiceGrant(n, int(p)) for n, p in (s.split(":") for s in services)),
        )

    def _link(self, name: str, remote: tuple[RemoteForward, ...] = (),
              local: tuple[LocalForward, ...] = ()) -> LinkConfig:
        return LinkConfig(
            name=name, host="127.0.0.1", port=self.relay_port, user=name,
            identities=(self.dir / f"{name}_ed25519",),
            host_key=HostKeyPolicy(fingerprint=self.relay_fingerprint),
            keepalive=Keepalive(interval=5, count_max=3), backoff=Backoff(initial=0.2, maximum=2),
            remote=remote, local=local,
        )

    def node_config(self, web_port: int, with_sshd: bool) -> NodeConfig:
        services = ["jupyter:8888"] + (["gpu-cluster:22"] if with_sshd else [])
        relay = RelayConfig(
            listen=HostPort("127.0.0.1", self.relay_port), state_dir=self.dir / "relay-state",
            public_bind="127.0.0.1",
            agents=(self._principal("agent", "lab_pc", services),),
            users=(self._principal("user", "alice", services),
                   self._principal("user", "bob", ["jupyter:8888"])),
            keepalive=Keepalive(interval=5, count_max=3),
            data_port=0, data_bind="127.0.0.1",
            e2e_services=(ServiceGrant("gpu-cluster", 22),) if with_sshd else (),
        )
        remote = [RemoteForward("jupyter", 8888, HostPort("127.0.0.1", web_port), "jupyter")]
        if with_sshd:
            remote.append(RemoteForward("gpu-cluster", 22, HostPort("127.0.0.1", self.sshd_port),
                                        "gpu-cluster"))
        agent = self._link("lab_pc", remote=tuple(remote))
        bob = self._link("bob", local=(
            LocalForward("127.0.0.1", 0, HostPort("jupyter", 8888), "bob-jupyter"),))
        return NodeConfig(source="labrelay demo", links=(agent, bob), relay=relay,
                          admin=AdminConfig(HostPort("127.0.0.1", self.admin_port)))

    async def run(self, once: bool) -> int:
        sshd = find_sshd()
        with_sshd = sshd is not None and shutil.which("ssh") is not None
        self._write_files(with_sshd)
        if with_sshd:
            assert sshd is not None
            await self.start_sshd(sshd)
        site = Site(_Page())
        site.noisy = False
        self.web_port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        web = self.web_port.getHost().port
        self.node = make_node_service(self.node_config(web, with_sshd), self.reactor)
        self.node.startService()
        agent, bob = self.node.links
        ready = defer.DeferredList([agent.whenAllReady(), bob.whenReady(PROOF_TIMEOUT),
                                    agent.pool.whenReady()],
                                   fireOnOneErrback=True, consumeErrors=True)
        try:
            await ready.addTimeout(PROOF_TIMEOUT, self.reactor)
        except (defer.TimeoutError, defer.FirstError):
            raise DemoError(f"the links were not ready within {PROOF_TIMEOUT:g}s; agent: "
                            f"{agent.state} ({agent.last_error}), bob: {bob.state} "
                            f"({bob.last_error})") from None
        bob_port = bob.local[0].bound_port
        await self.prove(bob_port, with_sshd)
        self.print_tries(bob_port, with_sshd, once)
        if once:
            return 0
        self.up = True  # from now on, Ctrl-C is how it is meant to stop: exit 0
        await defer.Deferred()  # until Ctrl-C stops the reactor
        return 0

    async def prove(self, bob_port: int | None, with_sshd: bool) -> None:
        from twisted.web.client import Agent, readBody

        url = f"http://127.0.0.1:{bob_port}/".encode()
        body = (await readBody(await Agent(self.reactor).request(b"GET", url))).decode()
        if MARKER not in body:
            raise DemoError(f"unexpected answer through the relay: {body!r}")
        log.info("proved: bob's GET {url} -> relay -> jupyter:8888 -> {body}",
                 event="demo_proof", url=url.decode(), body=body.strip())
        if not with_sshd:
            log.info("no OpenSSH sshd/ssh installed: skipping the ssh -J proof",
                     event="demo_proof")
            return
        ssh = shutil.which("ssh")
        assert ssh is not None
        collect = _CollectProtocol()
        argv = [ssh, "-F", str(self.dir / "ssh_config"), "gpu-cluster",
                "echo reached $LABRELAY_DEMO_HOST as $(id -un) by name through the relay"]
        self.reactor.spawnProcess(collect, ssh, argv, env=dict(os.environ))
        code, out, err = await collect.done
        if code != 0 or "reached gpu_cluster" not in out:
            raise DemoError(f"ssh -J through the relay failed (exit {code}): {err or out}")
        log.info("proved: alice's ssh -J gpu-cluster -> {out}", event="demo_proof",
                 out=out.strip())
        collect = _CollectProtocol()
        argv = [ssh, "-F", str(self.dir / "ssh_config"), "gpu-cluster-fast",
                "echo reached $LABRELAY_DEMO_HOST on the fast path"]
        self.reactor.spawnProcess(collect, ssh, argv, env=dict(os.environ))
        code, out, err = await collect.done
        if code != 0 or "reached gpu_cluster" not in out or "unavailable" in err:
            raise DemoError(f"ssh through labrelay connect failed (exit {code}): {err or out}")
        log.info("proved: alice's ssh gpu-cluster-fast (labrelay connect) -> {out}",
                 event="demo_proof", out=out.strip())

    def print_tries(self, bob_port: int | None, with_sshd: bool, once: bool) -> None:
        cfg = self.dir / "ssh_config"
        ssh_lines = (
            f"  ssh -F {cfg} gpu-cluster 'echo $LABRELAY_DEMO_HOST'      # alice, by name\n"
            f"  ssh -F {cfg} -J labrelay gpu-cluster                     # the same with -J\n"
            f"  ssh -F {cfg} gpu-cluster-fast   # the fast path: ProxyCommand labrelay connect\n"
            f"  scp -F {cfg} FILE gpu-cluster-fast:/tmp/   # a copy (SFTP), either entry\n"
            if with_sshd else
            "  (install openssh-server and openssh-client to also try ssh -J gpu-cluster)\n"
        )
        print(
            f"""
labrelay demo is up (files in {self.dir}):
  relay        127.0.0.1:{self.relay_port}  host key {self.relay_fingerprint}
  agent lab_pc registered  jupyter:8888{'  gpu-cluster:22' if with_sshd else ''}
  user bob     local forward 127.0.0.1:{bob_port} -> jupyter:8888 via the relay
  users alice (you, keys in {self.dir}) and bob are granted what they may reach

Try, in another terminal:
{ssh_lines}  ssh -F {cfg} -N -L 8888:jupyter:8888 labrelay              # then open http://127.0.0.1:8888/
  curl http://127.0.0.1:{bob_port}/
  {_labrelay_command()} status --admin 127.0.0.1:{self.admin_port}
  curl http://127.0.0.1:{self.admin_port}/metrics          # or open http://127.0.0.1:{self.admin_port}/
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

    from relay.ops.logfmt import start_logging

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
            if demo.up:  # stopped as the banner says (Ctrl-C), not by a failure
                result["code"] = 0
            return defer.ensureDeferred(demo.stop())

        reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))  # type: ignore[attr-defined]
        reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    return result["code"]
