"""Networks that block SSH (issue 17): the lab lets lab_pc out only through an HTTP
proxy, the café lets mac out only to port 443.

A fifth namespace, ``proxy`` (10.201.3.2, behind the router's ``prx0``), runs Debian's
``tinyproxy`` on port 8888.  For this module the router adds (and removes after) a
chain in front of the seed's rules:

* lab_pc may reach the proxy's 8888 and nothing else (not the cloud, on any port);
* the proxy may reach the cloud's 443 and nothing else;
* mac may reach the cloud's 443 and nothing else.

The relay on cloud listens for SSH on 2222 as always and for TLS on 443 (a
certificate for ``relay.test`` from a CA made here). lab_pc's agent has ``transport =
auto`` and the proxy: plain SSH and direct TLS time out, TLS through the proxy works
and is kept. mac runs ``ssh`` and a 64 MiB ``scp`` to gpu-cluster by name, byte-exact,
once with ``labrelay connect`` over TLS and once with stock ``ssh`` and ``openssl
s_client`` as ProxyCommand (the entry ``labrelay ssh-config --tls`` prints).
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DataStream
from nodes import CLOUD, GPU, RELAY_PORT, MiB, Site, file_sha256, labrelay_argv, rate
from topology import ROUTER, Topology, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tinyproxy import Tinyproxy
from tlscerts import CA, RELAY_NAME

Record = Callable[..., dict[str, Any]]
PROXY, PROXY_GW, PROXY_PORT = "10.201.3.2", "10.201.3.1", 8888
TLS_PORT = 443
SCP_SIZE = 64 * MiB
CHAIN = "lr-networks"


@pytest.fixture(scope="module")
def blocked(topology: Topology, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[dict[str, Any]]:
    """The proxy namespace with tinyproxy, and the router's chain; removed after."""
    ns = f"{topology.prefix}-proxy"
    r = topology.ns(ROUTER)
    ipt = ["ip", "netns", "exec", r, "iptables", "-w"]
    run(["ip", "netns", "add", ns])
    proxy: Tinyproxy | None = None
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer",
             "name", "prx0", "netns", r])
        run(["ip", "-n", ns, "addr", "add", f"{PROXY}/30", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", r, "addr", "add", f"{PROXY_GW}/30", "dev", "prx0"])
        run(["ip", "-n", r, "link", "set", "prx0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", PROXY_GW])
        run([*ipt, "-N", CHAIN])
        rules = [
            ["-i", "lab0", "-o", "prx0", "-p", "tcp", "--dport", str(PROXY_PORT), "-j",
             "ACCEPT"],
            ["-i", "prx0", "-o", "lab0", "-p", "tcp", "--sport", str(PROXY_PORT), "!",
             "--syn", "-j", "ACCEPT"],
            ["-i", "lab0", "-j", "DROP"], ["-o", "lab0", "-j", "DROP"],
            ["-i", "prx0", "-o", "cloud0", "-p", "tcp", "--dport", str(TLS_PORT), "-j",
             "ACCEPT"],
            ["-i", "cloud0", "-o", "prx0", "-p", "tcp", "--sport", str(TLS_PORT), "!",
             "--syn", "-j", "ACCEPT"],
            ["-i", "prx0", "-j", "DROP"], ["-o", "prx0", "-j", "DROP"],
            ["-i", "mac0", "-o", "cloud0", "-p", "tcp", "--dport", str(TLS_PORT), "-j",
             "ACCEPT"],
            ["-i", "cloud0", "-o", "mac0", "-p", "tcp", "--sport", str(TLS_PORT), "!",
             "--syn", "-j", "ACCEPT"],
            ["-i", "mac0", "-j", "DROP"], ["-o", "mac0", "-j", "DROP"],
        ]
        for rule in rules:
            run([*ipt, "-A", CHAIN, *rule])
        run([*ipt, "-I", "FORWARD", "1", "-j", CHAIN])
        proxy = Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), PROXY_PORT, [TLS_PORT],
                          listen=PROXY, allow="10.201.0.0/16",
                          argv_prefix=["ip", "netns", "exec", ns])
        proxy.wait_listening(connect=False)
        ca = CA(tmp_path_factory.mktemp("networks-ca"))
        yield {"ns": ns, "proxy": proxy, "ca": ca, "cert": ca.issue("relay", (RELAY_NAME,))}
    finally:
        if proxy is not None:
            proxy.stop()
        with contextlib.suppress(Exception):
            run([*ipt, "-D", "FORWARD", "-j", CHAIN], check=False)
            run([*ipt, "-F", CHAIN], check=False)
            run([*ipt, "-X", CHAIN], check=False)
            run(["ip", "-n", r, "link", "del", "prx0"], check=False)
        run(["ip", "netns", "del", ns], check=False)


def _connects(topo: Topology, host: str, address: str, port: int,
              timeout: float = 1.0) -> bool:
    """One TCP connect from ``host`` (a dropped SYN is a timeout)."""
    with topo.inside(host):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.setblocking(False)
        if s.connect_ex((address, port)) not in (0, 115):
            return False
        _, writable, _ = select.select([], [s], [], timeout)
        return bool(writable) and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def _relay(site: Site, cert: Any) -> Any:
    return site.start_relay(extra=f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n'
                                  f'tls_listen = "{CLOUD}:{TLS_PORT}"\n')


def _tls_options(ca: CA) -> list[str]:
    return ["-o", f"TLSPort={TLS_PORT}", "-o", f"TLSServerName={RELAY_NAME}",
            "-o", f"TLSCAFile={ca.pem_path}"]


def _mac_configs(site: Site, relay: Any, gpu: Any, ca: CA) -> tuple[Path, Path]:
    """mac's two ways to gpu-cluster by name on 443 only: ``labrelay connect`` over TLS
    as ProxyCommand, and stock ssh with ``openssl s_client`` (what ``labrelay ssh-config
    --tls`` prints) and ``ProxyJump``."""
    from relay.user.sshconfig import render

    k = site.keys
    known = site.dir / "known_hosts.tls"
    known.write_text(f"{relay.known_hosts_line()}\n[{RELAY_NAME}]:{RELAY_PORT} "
                     f"{relay.host_key_blob}\n"
                     f"gpu-cluster {gpu.host_key.public_blob()}\n")
    common = f"""\
  User root
  IdentityFile {k.alice.path}
Host *
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {known}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  ConnectTimeout 20
  LogLevel ERROR
"""
    connect = " ".join(labrelay_argv(
        "connect", "-p", str(RELAY_PORT), "-i", str(k.alice.path), "-o",
        f"UserKnownHostsFile={known}", "-o", "Transport=tls", *_tls_options(ca),
        f"alice@{CLOUD}", "%h:%p"))
    by_connect = site.dir / "ssh_config.connect"
    by_connect.write_text(f"Host gpu-cluster\n  ProxyCommand {connect}\n{common}")
    stock = site.dir / "ssh_config.openssl"
    stock.write_text(render(user="alice", relay_host=RELAY_NAME, relay_port=RELAY_PORT,
                            services=(), identity=str(k.alice.path), tls_port=TLS_PORT,
                            tls_ca_file=str(ca.pem_path), tls_connect=CLOUD)
                     + f"\nHost gpu-cluster\n  ProxyJump labrelay\n{common}")
    return by_connect, stock


def test_lab_behind_a_proxy_and_mac_on_443_only(site: Site, blocked: dict[str, Any],
                                                 record: Record) -> None:
    """lab_pc reaches the cloud only through tinyproxy, and only its 443; mac only the
    cloud's 443. The agent (``transport = auto``) finds TLS through the proxy; mac's
    ssh and 64 MiB scp to gpu-cluster arrive byte-exact, with ``labrelay connect`` over
    TLS and with stock ssh + ``openssl s_client``."""
    topo, ca = site.topo, blocked["ca"]
    gpu = site.start_gpu(data=False)
    relay = _relay(site, blocked["cert"])
    relay.wait_for("relay_tls_listening", since=0)
    # The networks are what the scenario says, with the relay listening on both ports.
    assert not _connects(topo, "lab_pc", CLOUD, RELAY_PORT)
    assert not _connects(topo, "lab_pc", CLOUD, TLS_PORT)
    assert _connects(topo, "lab_pc", PROXY, PROXY_PORT)
    assert not _connects(topo, "mac", CLOUD, RELAY_PORT)
    assert _connects(topo, "mac", CLOUD, TLS_PORT)

    argv = site.agent_argv(RELAY_PORT, relay.known_hosts, f"gpu-cluster:22:{GPU}:22")
    argv[-1:-1] = ["-o", "Transport=auto", *_tls_options(ca),
                   "-o", f"Proxy=http://{PROXY}:{PROXY_PORT}"]
    agent = site.process("lab_pc", argv, name="agent")
    started = time.monotonic()
    connected = agent.wait_for("link_connected", timeout=60)
    took = time.monotonic() - started
    via = f"tls {CLOUD}:{TLS_PORT} via proxy http://{PROXY}:{PROXY_PORT}"
    assert connected["route"] == via
    tried = [e["route"] for e in agent.events("link_attempt")]
    assert tried == [f"tcp {CLOUD}:{RELAY_PORT}", f"tls {CLOUD}:{TLS_PORT}", via], tried
    assert len(agent.events("link_route_failed")) == 2
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    assert relay.status()["relay"]["tls"]["handshakes"] >= 1

    by_connect, stock = _mac_configs(site, relay, gpu, ca)

    rows = {}
    for name, cfg in (("labrelay connect over TLS", by_connect),
                      ("ssh + openssl s_client", stock)):
        site.assert_marker("alice", "gpu-cluster", config=cfg)
        stream = DataStream(601 if "connect" in name else 602, SCP_SIZE)
        src = site.write_file(f"up-{len(rows)}.bin", stream)
        dst = site.dir / f"arrived-{len(rows)}.bin"
        out, secs = site.scp("alice", str(src), f"gpu-cluster:{dst}", config=cfg)
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        assert file_sha256(dst) == (stream.size, stream.sha256)
        rows[name] = round(rate(stream.size, secs), 1)
        record(f"networks: mac on 443 only, {name}", bytes_sent=stream.size,
               bytes_received=stream.size, bytes_lost=0, sessions=1, silently_wrong=0,
               throughput_mib_s=rows[name])
    assert blocked["proxy"].log.read_text().count("CONNECT") >= 1
    record("networks: lab_pc behind an HTTP proxy (transport auto)", ok=True,
           notes=f"link up via {via} after {took:.1f}s (tcp and direct tls timed out)")
    print(f"\nlink up via the proxy after {took:.1f}s; scp 64 MiB: {rows}")


CUT = 20.0  # seconds lab_pc's uplink is down: the scenario itself
PACE_KBIT = str(2 * MiB * 8 // 1000)  # scp -l: 2 MiB/s, so the upload spans the cut
UPLOAD = 32 * MiB


def test_a_20s_cut_behind_the_proxy_resumes_mac_s_sessions(site: Site, blocked: dict[str, Any],
                                                           record: Record) -> None:
    """The agent's link is TLS through the proxy (so mac's sessions ride SSH channels on
    it: a TLS link keeps no pooled data connections). mac types into ``ssh gpu-cluster
    cat`` and uploads 32 MiB with scp at 2 MiB/s, both with stock ssh + ``openssl
    s_client`` on 443, while lab_pc's uplink is down for 20 s; the proxy's own connection
    to the relay stays up meanwhile, so only keepalives tell either end. The agent comes
    back through the proxy with its backoff, registers gpu-cluster again and resumes
    both sessions: the typed one carries on where it was, the upload arrives
    byte-exact (docs/resilience.md, docs/networks.md "the same relay")."""
    import subprocess
    import threading

    ca = blocked["ca"]
    gpu = site.start_gpu(data=False)
    relay = _relay(site, blocked["cert"])
    relay.wait_for("relay_tls_listening", since=0)
    via = f"tls {CLOUD}:{TLS_PORT} via proxy http://{PROXY}:{PROXY_PORT}"
    argv = site.agent_argv(RELAY_PORT, relay.known_hosts, f"gpu-cluster:22:{GPU}:22")
    argv[-1:-1] = ["-o", "Transport=tls", *_tls_options(ca),
                   "-o", f"Proxy=http://{PROXY}:{PROXY_PORT}"]
    agent = site.process("lab_pc", argv, name="agent")
    assert agent.wait_for("link_connected", timeout=60)["route"] == via
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    _, stock = _mac_configs(site, relay, gpu, ca)

    typist = subprocess.Popen(site.topo.argv("mac", site.ssh_bin, "-F", str(stock),
                                             "gpu-cluster", "cat"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)

    def line(text: str) -> str:
        assert typist.stdin is not None and typist.stdout is not None
        typist.stdin.write(text.encode() + b"\n")
        typist.stdin.flush()
        return typist.stdout.readline().decode().rstrip("\n")

    try:
        assert line("before the cut") == "before the cut"
        stream = DataStream(603, UPLOAD)
        src = site.write_file("cut-up.bin", stream)
        dst = site.dir / "cut-arrived.bin"
        done: dict[str, Any] = {}
        mark = gpu.log.mark()

        def upload() -> None:
            done["out"] = site.mac_run([site.scp_bin, "-q", "-l", PACE_KBIT, "-F", str(stock),
                                        str(src), f"gpu-cluster:{dst}"], timeout=300)

        scp = threading.Thread(target=upload, name="paced-scp", daemon=True)
        scp.start()
        gpu.wait_log(r"Starting session: subsystem 'sftp'", timeout=30, since=mark)

        a_mark, r_mark = agent.mark(), relay.mark()
        t0 = time.monotonic()
        site.topo.link_down()
        agent.wait_for("link_dead", timeout=20, since=a_mark)
        relay.wait_for("relay_peer_dead", timeout=20, since=r_mark, kind="agent")
        held = relay.wait_for("relay_disconnected", timeout=10, since=r_mark, kind="agent")
        assert held["held"] == 2, held
        time.sleep(max(0.0, t0 + CUT - time.monotonic()))  # the cut's length, not a wait
        site.topo.link_up()
        up_at = time.monotonic()
        back = agent.wait_for("link_connected", timeout=30, since=a_mark)
        assert back["route"] == via, back
        agent.wait_for("forward_ready", timeout=20, since=a_mark, bind="gpu-cluster")
        for _ in range(2):
            agent.wait_for("session_resumed", timeout=20, since=a_mark)
        resumed_after = time.monotonic() - up_at
        # The agent retried through the cut on its backoff (0.5 s -> 2 s here), each try
        # a link_failed saying why (the uplink is down: the proxy is unreachable).
        retries = [e["delay"] for e in agent.events("link_retry", since=a_mark)]
        assert len(retries) >= 3 and max(retries) <= 2.0 * 1.2 + 0.01, retries
        failed = agent.events("link_failed", since=a_mark)
        assert failed and "cannot reach the proxy" in failed[0]["reason"], failed

        assert line("after the cut") == "after the cut"
        scp.join(300)
        out = done["out"]
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        assert file_sha256(dst) == (stream.size, stream.sha256)
        assert relay.events("session_hold_expired") == []
    finally:
        if typist.poll() is None:
            typist.kill()
            typist.wait(5)
    record("networks: lab_pc's uplink cut for 20 s, link TLS through the proxy",
           bytes_sent=stream.size, bytes_received=stream.size, bytes_lost=0, sessions=2,
           silently_wrong=0, notes=f"both sessions resumed {resumed_after:.2f}s after the "
                                   f"link was up ({len(retries)} retries on the backoff)")
    print(f"\n20 s cut behind the proxy: resumed {resumed_after:.2f}s after the link was up; "
          f"retries {[round(r, 2) for r in retries]}")
