"""Chaining by name (issue 3 §6): gpu_cluster's agent registers at a relay on lab_pc,
lab_pc's link re-exports that service to the cloud relay, and a user at the cloud
reaches ``gpu-cluster`` by name with a stock ``ssh`` — no port bookkeeping anywhere.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    KeyPair,
    Sshd,
    SshProcess,
    echo_roundtrip,
    find_program,
    make_key,
)
from relay_fixtures import stock_local_forward

pytestmark = pytest.mark.integration


def _relay_toml(state: Path, agents: list[tuple[str, KeyPair, str]],
                users: list[tuple[str, KeyPair, str]]) -> str:
    # Both relays offer the fast path for ssh: it is spliced through the chain as well.
    # Each relay binds port 0; the test reads the port back from relay_listening.
    text = (f'[relay]\nlisten = "127.0.0.1:0"\nstate_dir = "{state}"\npublic_wait = 5\n'
            'data_port = 0\ne2e_services = ["gpu-cluster:22"]\n')
    for kind, entries in (("agent", agents), ("user", users)):
        for name, key, services in entries:
            text += (f'\n[[relay.{kind}]]\nname = "{name}"\nkeys = ["{key.public}"]\n'
                     f'services = [{services}]\n')
    return text


def _relay_key(state: Path, port: int) -> str:
    blob = " ".join((state / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    return f"[127.0.0.1]:{port} {blob}"


def test_two_relays_chain_reaches_gpu_cluster_by_name(
    sshd_factory: Callable[[str], Sshd],
    start_process: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    client_key: KeyPair,
    targets: Targets,
    tmp_path: Path,
) -> None:
    gpu = sshd_factory("gpu_cluster")  # the target sshd; client_key may log in
    gpu_agent_key = make_key(tmp_path / "gpu_agent", "gpu_agent")
    lab_key = make_key(tmp_path / "lab_pc", "lab_pc")
    alice = client_key  # alice logs in to gpu_cluster with the same key she uses at the relay
    echo = targets.echo()

    lab_state, cloud_state = tmp_path / "lab-state", tmp_path / "cloud-state"

    cloud = tmp_path / "cloud.toml"
    cloud.write_text(_relay_toml(cloud_state,
                                 [("lab_pc", lab_key, '"gpu-cluster:22", "web:8080"')],
                                 [("alice", alice, '"gpu-cluster:22", "web:8080"')]))
    cloud_relay = start_process([sys.executable, "-m", "relay", "relay", "--log-format",
                                 "json", "--config", str(cloud)], name="cloud-relay")
    cloud_port = cloud_relay.wait_for("relay_listening", timeout=20)["port"]
    cloud_kh = tmp_path / "cloud_known_hosts"
    cloud_kh.write_text(_relay_key(cloud_state, cloud_port) + "\n")

    # lab_pc: a relay for gpu_cluster's agent, and a link to the cloud re-exporting by name.
    lab = tmp_path / "lab.toml"
    lab.write_text(
        _relay_toml(lab_state,
                    [("gpu_agent", gpu_agent_key, '"gpu-cluster:22", "web:8080"')], [])
        + f"""
[[link]]
name = "cloud"
host = "127.0.0.1"
port = {cloud_port}
user = "lab_pc"
identity = "{lab_key.path}"
known_hosts = "{cloud_kh}"
backoff_initial = 0.2
backoff_max = 1

[[link.remote]]
listen = "gpu-cluster:22"
service = "gpu-cluster:22"

[[link.remote]]
listen = "web:8080"
service = "web:8080"
""")
    lab_node = start_process([sys.executable, "-m", "relay", "run", "--log-format", "json",
                              str(lab)], name="lab_pc")
    lab_port = lab_node.wait_for("relay_listening", timeout=20, since=0)["port"]
    lab_kh = tmp_path / "lab_known_hosts"
    lab_kh.write_text(_relay_key(lab_state, lab_port) + "\n")

    # gpu_cluster: its own agent registers its sshd (and a web service) at lab_pc's relay.
    gpu_agent = start_process(
        [sys.executable, "-m", "relay", "agent", "--log-format", "json", "-p", str(lab_port),
         "-i", str(gpu_agent_key.path), "-o", f"UserKnownHostsFile={lab_kh}",
         "--backoff-initial", "0.2", "--backoff-max", "1",
         "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "-R", f"web:8080:127.0.0.1:{echo.port}",
         "gpu_agent@127.0.0.1"], name="gpu-agent")
    gpu_agent.wait_for("forward_ready", timeout=20, forward="R:gpu-cluster:22")
    lab_node.wait_for("forward_ready", timeout=20, since=0, forward="R:gpu-cluster:22")
    cloud_relay.wait_for("relay_service_registered", timeout=20, since=0,
                         service="gpu-cluster:22")

    # alice at the cloud: stock ssh, by name, through both relays and both agents.
    known = tmp_path / "alice_known_hosts"
    known.write_text(_relay_key(cloud_state, cloud_port) + "\n"
                     + gpu.known_hosts_line().replace(f"[127.0.0.1]:{gpu.port}", "gpu-cluster")
                     + "\n")
    config = tmp_path / "alice_ssh_config"
    config.write_text(
        f"Host relay\n  HostName 127.0.0.1\n  Port {cloud_port}\n  User alice\n"
        f"Host gpu-cluster\n  ProxyJump relay\n  User root\n"
        f"Host *\n  IdentityFile {alice.path}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  ConnectTimeout 10\n"
    )
    ssh = find_program("ssh") or "ssh"
    result = subprocess.run([ssh, "-F", str(config), "gpu-cluster", "echo $LABRELAY_TEST_HOST"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gpu_cluster"

    # A non-ssh service by name too, through a stock ssh -L at the cloud relay.
    _tunnel, local = stock_local_forward(
        start_ssh,
        lambda port: [ssh, "-F", str(config), "-v", "-N", "-o", "ExitOnForwardFailure=yes",
                      "-L", f"127.0.0.1:{port}:web:8080", "relay"],
        name="alice-L")
    payload = b"through two relays by name"
    assert echo_roundtrip(local, payload) == payload

    # The fast path through the chain: labrelay connect at the cloud relay, whose
    # agent (lab_pc) splices on to gpu_cluster's agent's data connection at lab_pc's
    # relay, which splices to the sshd: three spliced hops, no SSH channel anywhere.
    gpu_agent.wait_for("fast_path_ready", timeout=20, since=0)
    lab_node.wait_for("fast_path_ready", timeout=20, since=0)
    proxy = (f"{sys.executable} -m relay connect -p {cloud_port} -i {alice.path} "
             f"-o UserKnownHostsFile={known} alice@127.0.0.1 %h:%p")
    fast = subprocess.run([ssh, "-F", str(config), "-o", f"ProxyCommand={proxy}",
                           "-o", "ProxyJump=none", "gpu-cluster", "echo $LABRELAY_TEST_HOST"],
                          capture_output=True, text=True, timeout=60)
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout.strip() == "gpu_cluster"
    assert "fast path unavailable" not in fast.stderr, fast.stderr
    cloud_relay.wait_for("relay_fast_session", timeout=10, since=0, service="gpu-cluster:22")
    lab_node.wait_for("relay_fast_chained", timeout=10, since=0, service="gpu-cluster:22")
