"""The seed, step by step (issue 5 §3): a user on mac reaches gpu_cluster's sshd by a
public port and through a jump host, with a stock sshd on cloud (the seed's exact
set-up, the agent standing in for ``autossh -R``) and with the labrelay relay; the
fast path when ``labrelay connect`` exists; the seed's §2 chain (an agent on
gpu_cluster against a relay on lab_pc); several users at once, each with their grants.

Every check is by content: the output of a command that only gpu_cluster's sshd can
produce (its ``SetEnv`` and its network namespace), and sha256 for every transfer.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import DataStream, recv_exactly
from nodes import (
    CLOUD,
    DATA_PORT,
    GPU,
    LAB,
    LAB_RELAY_PORT,
    PUBLIC_PORT,
    RELAY_PORT,
    MiB,
    NsRelay,
    Site,
    file_sha256,
    labrelay_argv,
    rate,
    relay_toml,
)

Record = Callable[..., dict[str, Any]]
SCP_SIZE = 64 * MiB


def assert_relay_clean(relay: NsRelay) -> int:
    """The relay connected nowhere (audit hook and its sockets); returns the count."""
    attempts = relay.connect_attempts()
    outbound = relay.outbound_sockets()
    assert attempts == [] and outbound == [], (attempts, outbound)
    assert relay.events(level="critical") == []
    return len(attempts) + len(outbound)


def scp_checked(site: Site, user: str, stream: DataStream, src: str, dst: str,
                dst_path: Path, record: Record, scenario: str, config: Path | None = None,
                **extra: Any) -> float:
    out, took = site.scp(user, src, dst, config=config)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    size, digest = file_sha256(dst_path)
    assert (size, digest) == (stream.size, stream.sha256)
    record(scenario, bytes_sent=stream.size, bytes_received=size, bytes_lost=0,
           sessions=1, silently_wrong=0, throughput_mib_s=round(rate(size, took), 1), **extra)
    return took


# ---------------------------------------------------------------------------


def test_seed_with_stock_sshd_on_cloud(site: Site, record: Record) -> None:
    """The seed's own set-up: a stock OpenSSH sshd on cloud (``GatewayPorts
    clientspecified``), the agent on lab_pc as ``autossh -R 2201:gpu_cluster:22``;
    mac uses ``ssh -p 2201 cloud`` (public port) and ``ssh -J cloud -p 2201 localhost``
    (jump host), and scp moves 64 MiB each way byte-exact."""
    k = site.keys
    gpu = site.start_gpu(data=False)
    cloud = site.start_sshd("cloud", CLOUD, [k.lab_pc.public, k.alice.public])
    known = site.dir / "known_hosts.lab_pc"
    known.write_text(f"{CLOUD} {cloud.host_key.public_blob()}\n")
    agent = site.process("lab_pc", site.agent_argv(22, known, f"0.0.0.0:{PUBLIC_PORT}:{GPU}:22",
                                                   user="root"), name="agent")
    agent.wait_for("forward_ready", timeout=20, kind="remote")

    user_known = site.dir / "known_hosts.mac"
    user_known.write_text(f"{CLOUD} {cloud.host_key.public_blob()}\n"
                          f"gpu-cluster {gpu.host_key.public_blob()}\n")
    cfg = site.dir / "ssh_config.stock"
    cfg.write_text(f"""\
Host cloud
  HostName {CLOUD}
  User root
Host gpu-public
  HostName {CLOUD}
  Port {PUBLIC_PORT}
  HostKeyAlias gpu-cluster
  User root
Host gpu-jump
  HostName 127.0.0.1
  Port {PUBLIC_PORT}
  ProxyJump cloud
  HostKeyAlias gpu-cluster
  User root
Host *
  IdentityFile {k.alice.path}
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {user_known}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  ConnectTimeout 10
  LogLevel ERROR
""")
    site.assert_marker("alice", "gpu-public", config=cfg)
    site.assert_marker("alice", "gpu-jump", config=cfg)
    # The public port really is public (bound on cloud's address, not its loopback).
    listening = site.topo.sh("cloud", "ss", "-Htln").stdout
    assert f"0.0.0.0:{PUBLIC_PORT} " in listening or f"{CLOUD}:{PUBLIC_PORT} " in listening

    up = DataStream(501, SCP_SIZE)
    src = site.write_file("up.bin", up)
    dst = site.dir / "arrived.bin"
    out, took = site.scp("alice", str(src), f"gpu-public:{dst}", config=cfg)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert file_sha256(dst) == (up.size, up.sha256)
    record("seed, stock sshd on cloud: public port (ssh -p 2201, scp up)",
           bytes_sent=up.size, bytes_received=up.size, bytes_lost=0, sessions=2,
           silently_wrong=0, throughput_mib_s=round(rate(up.size, took), 1))
    back = site.dir / "back.bin"
    out, took = site.scp("alice", f"gpu-jump:{dst}", str(back), config=cfg)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert file_sha256(back) == (up.size, up.sha256)
    record("seed, stock sshd on cloud: jump host (ssh -J cloud, scp down)",
           bytes_sent=up.size, bytes_received=up.size, bytes_lost=0, sessions=2,
           silently_wrong=0, throughput_mib_s=round(rate(up.size, took), 1),
           notes="no names, grants or fast path with a stock sshd (DESIGN §2)")
    assert gpu.connections_from(LAB) >= 4  # every session came from lab_pc's agent
    assert gpu.connections() == gpu.connections_from(LAB)
    agent.assert_no_event("link_lost")


def test_seed_with_labrelay_relay(site: Site, record: Record) -> None:
    """The same two ways with the labrelay relay on cloud: ``ssh -p 2201`` (a public
    port granted to lab_pc's agent) and ``ssh -J alice@cloud:2222 root@gpu-cluster`` (by
    name, alice's grant checked); 64 MiB up by name and down by the public port."""
    gpu = site.start_gpu()
    relay = site.start_relay()
    agent = site.start_agent()
    site.wait_agent_ready(agent)
    for service in ("gpu-cluster:22", "data:9000"):
        relay.wait_for("relay_service_registered", since=0, agent="lab_pc", service=service)
    site.assert_marker("alice", "gpu-public")
    site.assert_marker("alice", "gpu-cluster")

    up = DataStream(502, SCP_SIZE)
    src = site.write_file("up.bin", up)
    dst = site.dir / "arrived.bin"
    scp_checked(site, "alice", up, str(src), f"gpu-cluster:{dst}", dst, record,
                "seed, labrelay relay: jump host by name (ssh -J, scp up)")
    back = site.dir / "back.bin"
    scp_checked(site, "alice", up, f"gpu-public:{dst}", str(back), back, record,
                "seed, labrelay relay: public port 2201 (ssh -p, scp down)")
    per_service = relay.status()["relay"]["per_service"]
    assert per_service["gpu-cluster:22"]["bytes_to_service"] > up.size
    assert gpu.connections() == gpu.connections_from(LAB)
    assert len(agent.events("link_connected")) == 1
    record("seed, labrelay relay: relay connects nowhere", ok=True,
           relay_outbound_connects=assert_relay_clean(relay))


def test_seed_fast_path(site: Site, record: Record) -> None:
    """``ssh -o ProxyCommand='labrelay connect alice@cloud gpu-cluster' gpu-cluster``
    (DESIGN §2.3) from mac: alice's grant is checked over SSH, her data connection meets
    one of lab_pc's pre-dialled ones at cloud's data port, both are spliced; the marker
    and a 64 MiB scp each way arrive byte-exact; bob's ungranted service is refused
    before any pairing; gpu_cluster sees connections from lab_pc only."""
    gpu = site.start_gpu(data=False)
    relay = site.start_relay()
    agent = site.start_agent()
    site.wait_agent_ready(agent)
    agent.wait_for("fast_path_ready", timeout=20, since=0)
    cfg = site.user_config("alice")
    proxy = (f"{sys.executable} -m relay connect -p {relay.port} "
             f"-i {site.keys.alice.path} -o UserKnownHostsFile={relay.known_hosts} "
             f"alice@{CLOUD} %h:%p")
    fast_cfg = site.dir / "ssh_config.alice.fast"
    fast_cfg.write_text(f"Host gpu-cluster\n  ProxyCommand {proxy}\n  ProxyJump none\n"
                        + cfg.read_text())
    out = site.mac_run([site.ssh_bin, "-F", str(fast_cfg), "gpu-cluster",
                        site.marker_command()])
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout.decode().strip() == site.expected_marker()
    assert b"fast path unavailable" not in out.stderr

    up = DataStream(503, SCP_SIZE)
    src = site.write_file("fast-up.bin", up)
    dst = site.dir / "fast-arrived.bin"
    scp_checked(site, "alice", up, str(src), f"gpu-cluster:{dst}", dst, record,
                "seed, labrelay relay: fast path (labrelay connect, scp up)", config=fast_cfg)
    back = site.dir / "fast-back.bin"
    scp_checked(site, "alice", up, f"gpu-cluster:{dst}", str(back), back, record,
                "seed, labrelay relay: fast path (labrelay connect, scp down)",
                config=fast_cfg)

    # bob is not granted data:9000: refused at the token request, nothing paired.
    bob = site.mac_run([sys.executable, "-m", "relay", "connect", "-p", str(relay.port),
                        "-i", str(site.keys.bob.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        f"bob@{CLOUD}", f"data:{DATA_PORT}"], input=b"")
    assert bob.returncode == 1 and b"not granted to user bob" in bob.stderr, bob.stderr

    fast = relay.status()["relay"]["fast_path"]
    assert fast["paired"] == 3 and fast["pair_failed"] == 0, fast
    assert gpu.connections() == gpu.connections_from(LAB)
    record("seed, labrelay relay: fast path (labrelay connect)", sessions=3, silently_wrong=0,
           paired=fast["paired"], relay_outbound_connects=assert_relay_clean(relay))


# ---------------------------------------------------------------------------


def test_chain_agent_on_gpu_cluster_through_relay_on_lab_pc(site: Site, record: Record) -> None:
    """The seed's §2 chain without its ``-L`` detach hop: gpu_cluster runs its own agent
    against a relay on lab_pc; lab_pc's link re-exports ``gpu-cluster:22`` by name to the
    cloud relay; alice on mac reaches it by name, 64 MiB byte-exact."""
    k = site.keys
    gpu = site.start_gpu(data=False)
    cloud = site.start_relay()
    lab_dir = site.dir / "lab-node"
    lab_dir.mkdir()
    cloud_known = lab_dir / "cloud_known_hosts"
    cloud_known.write_text(cloud.known_hosts_line() + "\n")
    lab_toml = lab_dir / "lab.toml"
    lab_toml.write_text(
        relay_toml(LAB, LAB_RELAY_PORT, lab_dir / "state",
                   [("gpu_agent", k.gpu_agent, ["gpu-cluster:22"], [])], [],
                   extra="keepalive_interval = 1\nkeepalive_count = 3\n"
                         'data_port = 2224\ne2e_services = ["gpu-cluster:22"]\n', admin_port=7023)
        + f"""
[[link]]
name = "cloud"
host = "{CLOUD}"
port = {RELAY_PORT}
user = "lab_pc"
identity = "{k.lab_pc.path}"
known_hosts = "{cloud_known}"
keepalive_interval = 1
keepalive_count = 3
backoff_initial = 0.5
backoff_max = 2

[[link.remote]]
listen = "gpu-cluster:22"
service = "gpu-cluster:22"
""")
    lab = site.process("lab_pc", labrelay_argv("run", "--log-format", "json", str(lab_toml)),
                       name="lab_pc-node")
    lab_relay = NsRelay(lab, lab_dir, 7023, site.topo, "lab_pc", LAB)
    gpu_agent = site.process("gpu_cluster", site.agent_argv(
        LAB_RELAY_PORT, lab_relay.known_hosts, f"gpu-cluster:22:{GPU}:22", server=LAB,
        user="gpu_agent", key=k.gpu_agent), name="gpu-agent")
    gpu_agent.wait_for("forward_ready", timeout=20, bind="gpu-cluster")
    lab.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    cloud.wait_for("relay_service_registered", timeout=20, since=0, service="gpu-cluster:22",
                   agent="lab_pc")
    site.assert_marker("alice", "gpu-cluster")
    up = DataStream(503, SCP_SIZE)
    src = site.write_file("up.bin", up)
    dst = site.dir / "arrived.bin"
    scp_checked(site, "alice", up, str(src), f"gpu-cluster:{dst}", dst, record,
                "chain: gpu_cluster agent -> relay on lab_pc -> cloud relay (ssh -J, scp up)")
    # The fast path through the same chain: spliced at cloud, at lab_pc (its link onto
    # gpu_cluster's agent's data connection) and by gpu_cluster's agent onto its sshd.
    gpu_agent.wait_for("fast_path_ready", timeout=20, since=0)
    lab.wait_for("fast_path_ready", timeout=20, since=0)
    fast_cfg = site.dir / "ssh_config.alice.chain-fast"
    fast_cfg.write_text(
        "Host gpu-cluster\n  ProxyJump none\n  ProxyCommand "
        f"{sys.executable} -m relay connect -p {cloud.port} -i {site.keys.alice.path} "
        f"-o UserKnownHostsFile={cloud.known_hosts} alice@{CLOUD} %h:%p\n"
        + site.user_config("alice").read_text())
    back = site.dir / "back.bin"
    scp_checked(site, "alice", up, f"gpu-cluster:{dst}", str(back), back, record,
                "chain: the fast path through both relays (labrelay connect, scp down)",
                config=fast_cfg)
    cloud.wait_for("relay_fast_session", timeout=10, since=0, service="gpu-cluster:22")
    lab.wait_for("relay_fast_chained", timeout=10, since=0, service="gpu-cluster:22")
    # gpu_cluster's sshd saw only its own agent (local connections), never lab_pc.
    assert gpu.connections_from(GPU) >= 3 and gpu.connections_from(LAB) == 0
    assert_relay_clean(cloud)


# ---------------------------------------------------------------------------


def test_several_users_at_once_each_with_their_grants(site: Site, record: Record) -> None:
    """alice, bob and carol on mac, distinct keys, all at once through one agent link:
    alice and bob log in to gpu_cluster by name (and alice copies 16 MiB), carol
    uses the data service through ``ssh -L``; carol is refused gpu-cluster and bob the
    data service, by the relay's grants."""
    gpu = site.start_gpu()
    relay = site.start_relay()
    agent = site.start_agent()
    site.wait_agent_ready(agent)
    forward = site.local_forward("carol", f"data:{DATA_PORT}", 19000)
    stream = DataStream(504, 16 * MiB)
    src = site.write_file("alice.bin", stream)

    def alice_scp(i: int) -> tuple[str, int]:
        dst = site.dir / f"alice-{i}.bin"
        out, _ = site.scp("alice", str(src), f"gpu-cluster:{dst}")
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        assert file_sha256(dst) == (stream.size, stream.sha256)
        return "alice-scp", stream.size

    def login(user: str) -> tuple[str, int]:
        site.assert_marker(user, "gpu-cluster")
        return f"{user}-login", 0

    def carol_echo(i: int) -> tuple[str, int]:
        payload = DataStream(600 + i, 4 * MiB).bytes()
        with site.mac_socket(19000) as sock:
            sock.sendall(b"E")
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            got = recv_exactly(sock, len(payload))
            sender.join(30)
        assert got == payload
        return "carol-echo", len(payload)

    jobs: list[Callable[[], tuple[str, int]]] = [
        *(lambda i=i: alice_scp(i) for i in range(2)),
        *(lambda: login("alice") for _ in range(2)),
        *(lambda: login("bob") for _ in range(3)),
        *(lambda i=i: carol_echo(i) for i in range(3)),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [f.result(300) for f in [pool.submit(j) for j in jobs]]
    moved = sum(n for _, n in results)

    # What the grants forbid, refused by the relay (never reaching gpu_cluster).
    before = gpu.log.mark()
    denied = site.ssh_cmd("carol", "gpu-cluster", "true")
    assert denied.returncode == 255
    assert b"stdio forwarding failed" in denied.stderr, denied.stderr  # -J's -W refused
    cfg = site.user_config("bob")
    denied = site.mac_run([site.ssh_bin, "-F", str(cfg), "-W", f"data:{DATA_PORT}", "cloud"],
                          input=b"")
    assert denied.returncode == 255 and b"stdio forwarding failed" in denied.stderr
    assert gpu.connections(since=before) == 0
    refused = {(e["name"], e["service"]) for e in relay.events("relay_session_refused")}
    assert refused == {("carol", "gpu-cluster:22"), ("bob", "data:9000")}, refused

    status = relay.status()["relay"]
    assert status["per_service"]["gpu-cluster:22"]["sessions_total"] >= 7
    assert status["per_service"]["data:9000"]["sessions_total"] == 3
    assert len(agent.events("link_connected")) == 1  # one link carried everyone
    forward.stop()
    record("several users at once (alice, bob, carol; one link)", sessions=len(jobs),
           bytes_sent=moved, bytes_received=moved, bytes_lost=0, silently_wrong=0,
           relay_outbound_connects=assert_relay_clean(relay),
           notes="carol refused gpu-cluster, bob refused data:9000 by grants")
