"""The relay bench's peers (``bench.relay_vs_openssh``): the relay and agent processes,
the users' ``ssh -L``, the ``ssh -N -R`` baselines and the paths between them.

Set-up only; the measurements are in ``bench/relay_vs_openssh.py``, the report in
``bench/relay_report.py``, the workers in ``bench/relay_workers.py``. The fast-path and
stock-path benches build on :class:`RelayPeers` to start their own relay and agent."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import agent_vs_openssh as avo
from bench.meter import proc_health
from bench.procs import Lines, check_procs, free_port, json_event, read_port
from bench.relay_report import DIRECT, RELAY, RELAY_L, SSH, SSH_AES
from bench.sessions import LOOPBACK, REPO
from bench.sshd import Route as BaseRoute
from bench.sshd import labrelay_argv, public_key, ssh_client, ssh_negotiated

# The workers run as their own processes (``relay_workers.py --worker KIND``).
WORKERS = str(Path(__file__).resolve().parent / "relay_workers.py")


# The cipher labrelay's link negotiates (relay/ssh/aead.py), for an equal-cipher peer.
SAME_CIPHER_OPTIONS = ("-c", "aes128-gcm@openssh.com")
PATHS = (RELAY, RELAY_L, SSH, SSH_AES, DIRECT)
BULK_SERVICE, ECHO_SERVICE = ("bulk", 9000), ("echo", 7)

RELAY_CONFIG = """\
[relay]
listen = "127.0.0.1:0"
state_dir = "{dir}/relay-state"
public_bind = "127.0.0.1"
# every load generator is this host: one source, not to be capped as one
public_max_per_source = 0

[[relay.agent]]
name = "bench_agent"
keys = ["{agent_key}"]
services = ["{bulk}", "{echo}"]
public_ports = [{p_bulk}, {p_echo}]

[[relay.user]]
name = "alice"
keys = ["{alice_key}"]
services = ["{bulk}"]

[[relay.user]]
name = "bob"
keys = ["{bob_key}"]
services = ["{echo}"]
"""


# ---------------------------------------------------------------------------
# the set-up


@dataclass
class Route(BaseRoute):
    """One path: where bulk/set-up sessions (``port``) and echo/idle sessions
    (``echo_port``) connect, and which processes carry it (for CPU and memory)."""

    echo_port: int = 0
    groups: dict[str, list[int]] = field(default_factory=dict)  # CPU accounting


class RelayPeers(avo.Bench):
    """The processes of one relay bench run: the agent bench's sshd, target and client,
    plus the greeter, ``labrelay relay``, ``labrelay agent``, two users' ``ssh -L`` and the
    ``ssh -N -R`` peers. :class:`bench.relay_vs_openssh.RelayBench` measures over them;
    the fast-path benches start their own relay and agent through the same methods."""

    MAX_MS_WIDTH = 7

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.paths: dict[str, Route] = {name: Route(name) for name in PATHS}  # type: ignore[assignment]
        self.greeter: subprocess.Popen[bytes] | None = None
        self.greeter_out: Lines | None = None
        self.greeter_port = 0
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_log: Lines | None = None
        self.relay_port = 0
        self.relay_argv: list[str] = []
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log: Lines | None = None
        self.agent_argv: list[str] = []
        self.public_bulk = 0
        self.public_echo = 0
        self.relay_known_hosts = workdir / "relay_known_hosts"
        self.users: dict[str, subprocess.Popen[bytes]] = {}
        self.user_logs: dict[str, Lines] = {}
        self.link_cipher = ""

    # -- processes

    def start_greeter(self) -> None:
        self.greeter, self.greeter_out = self.start_worker("greeter", WORKERS, "greeter")
        self.greeter_port = read_port(self.greeter_out, "the greeter's port")

    def greeter_count(self) -> dict[str, int]:
        assert self.greeter is not None and self.greeter.stdin is not None
        assert self.greeter_out is not None
        self.greeter.stdin.write(b"count\n")
        self.greeter.stdin.flush()
        line = self.greeter_out.wait_for(lambda s: s, 20, "the greeter's count")
        result: dict[str, int] = json.loads(line)
        return result

    def start_client(self) -> None:
        self.client, self.client_out = self.start_worker("client", WORKERS, "client")

    def start_relay_process(self, config: Path, ready: Callable[[str], Any], what: str) -> Any:
        """``labrelay relay --config CONFIG``; the first truthy ``ready(line)`` of its log."""
        self.relay_argv = labrelay_argv(self.args.python, "relay", "--config", str(config))
        self.relay, self.relay_log, found = self.start_labrelay("relay", self.relay_argv,
                                                                ready, what)
        return found

    def trust_relay_host(self) -> None:
        """The relay's host key, from its state directory, into ``relay_known_hosts``."""
        host = public_key(self.dir / "relay-state" / "ssh_host_ed25519_key.pub")
        self.relay_known_hosts.write_text(f"[{LOOPBACK}]:{self.relay_port} {host}\n")

    def start_relay_agent_process(self, forwards: Sequence[str], login: str,
                                  ready: Callable[[str], Any], what: str) -> None:
        """``labrelay agent -R FORWARD... LOGIN@relay`` with the key ``agent_ed25519``,
        ready at the first truthy ``ready(line)`` of its log."""
        self.agent_argv = labrelay_argv(
            self.args.python, "agent",
            "-p", str(self.relay_port), "-i", str(self.dir / "agent_ed25519"),
            "-o", f"UserKnownHostsFile={self.relay_known_hosts}",
            *[arg for f in forwards for arg in ("-R", f)], f"{login}@{LOOPBACK}",
        )
        self.agent, self.agent_log, _ = self.start_labrelay("agent", self.agent_argv, ready,
                                                            what)

    def start_relay(self) -> None:
        blob = self.user_keys("agent", "alice", "bob")
        self.public_bulk, self.public_echo = free_port(), free_port()
        config = self.dir / "relay.toml"
        config.write_text(RELAY_CONFIG.format(
            dir=self.dir, agent_key=blob["agent"], alice_key=blob["alice"], bob_key=blob["bob"],
            bulk="{}:{}".format(*BULK_SERVICE), echo="{}:{}".format(*ECHO_SERVICE),
            p_bulk=self.public_bulk, p_echo=self.public_echo))

        def listening(line: str) -> int | None:
            event = json_event(line)
            if event and event.get("event") == "relay_listening":
                return int(event["port"])
            return None

        self.relay_port = self.start_relay_process(config, listening,
                                                   "relay_listening from the relay")
        self.trust_relay_host()

    def start_relay_agent(self) -> None:
        assert self.target_port and self.greeter_port
        target, greeter = f"{LOOPBACK}:{self.target_port}", f"{LOOPBACK}:{self.greeter_port}"
        forwards = [f"{BULK_SERVICE[0]}:{BULK_SERVICE[1]}:{target}",
                    f"{ECHO_SERVICE[0]}:{ECHO_SERVICE[1]}:{greeter}",
                    f"{self.public_bulk}:{target}", f"{self.public_echo}:{greeter}"]
        ready: set[str] = set()

        def all_ready(line: str) -> bool:
            event = json_event(line)
            if event and event.get("event") == "forward_ready":
                ready.add(f"{event.get('bind')}:{event.get('port')}")
            return len(ready) == len(forwards)

        self.start_relay_agent_process(forwards, "bench_agent", all_ready,
                                       f"{len(forwards)} forward_ready events from the agent")
        assert self.relay is not None and self.agent is not None
        path = self.paths[RELAY]
        path.port, path.echo_port = self.public_bulk, self.public_echo
        path.argv = self.agent_argv
        path.groups = {"relay": [self.relay.pid], "agent": [self.agent.pid]}

    def relay_ssh_base(self, user: str) -> list[str]:
        return ssh_client(self.dir / f"{user}_ed25519", self.relay_known_hosts, self.relay_port)

    def start_user(self, user: str, service: tuple[str, int]) -> int:
        """A stock ``ssh -N -L LOCAL:SERVICE user@relay``; its local port."""
        local = free_port()
        argv = [*self.relay_ssh_base(user), "-N", "-o", "ExitOnForwardFailure=yes",
                "-L", f"{LOOPBACK}:{local}:{service[0]}:{service[1]}", f"{user}@{LOOPBACK}"]
        proc = self.children.start(f"ssh-L-{user}", argv, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        assert proc.stderr is not None
        log = Lines(proc.stderr, f"ssh-L-{user}-stderr")
        self.users[user], self.user_logs[user] = proc, log
        self._wait_listening(f"ssh -L ({user})", proc, log, local)
        return local

    def start_relay_users(self) -> None:
        assert self.relay is not None and self.agent is not None
        path = self.paths[RELAY_L]
        path.port = self.start_user("alice", BULK_SERVICE)
        path.echo_port = self.start_user("bob", ECHO_SERVICE)
        path.forwarder = self.users["alice"]
        path.log = self.user_logs["alice"]
        path.argv = list(self.users["alice"].args)  # type: ignore[arg-type]
        path.groups = {"relay": [self.relay.pid], "agent": [self.agent.pid],
                       "user ssh": [self.users["alice"].pid, self.users["bob"].pid]}

    def start_openssh(self, name: str, extra: Sequence[str]) -> None:
        """``ssh -N -R PORT:TARGET -R PORT2:GREETER``: both over one ssh connection."""
        path = self.paths[name]
        path.port, path.echo_port = free_port(), free_port()
        self.ssh_reverse(path, name, extra, [(path.port, self.target_port),
                                             (path.echo_port, self.greeter_port)])
        assert path.forwarder is not None
        path.groups = {"ssh": [path.forwarder.pid], "sshd": sorted(path.sshd_pids)}

    def relay_ciphers(self) -> tuple[str, str]:
        """(the agent's link, alice's ssh) as negotiated with the relay: both Conch ends
        take the client's first choice the server has; ``ssh -v`` shows the user's."""
        probe = ("from relay.ssh.client import LinkTransport as C; "
                 "from relay.ssh.server import RelayTransport as S; "
                 "print(next(c for c in C.supportedCiphers if c in S.supportedCiphers).decode(),"
                 " '+', next(m for m in C.supportedMACs if m in S.supportedMACs).decode())")
        link = subprocess.run([self.args.python, "-c", probe], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
        if "gcm" in link.split(" + ")[0]:  # an AEAD cipher: no separate MAC
            link = link.split(" + ")[0] + " + <implicit>"
        # the relay refuses the session channel after the key exchange: that is enough
        user = ssh_negotiated([*self.relay_ssh_base("alice"), "-v", f"alice@{LOOPBACK}", "true"])
        return link, user

    def setup(self) -> None:
        self.start_sshd()
        self.start_target()
        self.start_greeter()
        self.start_relay()
        self.start_relay_agent()
        self.start_relay_users()
        self.start_openssh(SSH, ())
        self.start_openssh(SSH_AES, SAME_CIPHER_OPTIONS)
        direct = self.paths[DIRECT]
        direct.port, direct.echo_port = self.target_port, self.greeter_port
        self.start_client()
        self.link_cipher, user_cipher = self.relay_ciphers()
        self.paths[RELAY].cipher = f"link {self.link_cipher}"
        self.paths[RELAY_L].cipher = f"user {user_cipher}; link {self.link_cipher}"
        self.paths[SSH].cipher = self.negotiated(())
        self.paths[SSH_AES].cipher = self.negotiated(SAME_CIPHER_OPTIONS)
        direct.cipher = "none"

    # -- accounting and checks

    def process_pids(self) -> dict[str, int]:
        """The forwarding processes whose memory and fds are tracked."""
        pids = {}
        if self.relay is not None:
            pids["relay"] = self.relay.pid
        if self.agent is not None:
            pids["agent"] = self.agent.pid
        return pids

    def health(self) -> dict[str, Any]:
        return {name: proc_health(pid) for name, pid in self.process_pids().items()}

    def check_alive(self) -> None:
        procs: list[tuple[str, subprocess.Popen[bytes] | None, Lines | None]] = [
            ("relay", self.relay, self.relay_log), ("agent", self.agent, self.agent_log),
            ("greeter", self.greeter, self.greeter_out)]
        procs += [(n, p, None) for n, p in self.children.procs if n == "target"]
        procs += [(f"ssh -L ({u})", p, self.user_logs[u]) for u, p in self.users.items()]
        procs += [(p.name, p.forwarder, p.log) for p in self.paths.values()
                  if p.name in (SSH, SSH_AES)]
        check_procs(procs)

