"""SSH inside TLS (issue 17) with real processes: a ``labrelay relay`` with a TLS port,
the agent's link over TLS (its certificate checks: CA file, names, dates, pins; then
the SSH host key), ``labrelay connect`` over TLS, stock ``ssh`` with ``openssl
s_client`` as its ProxyCommand, and the certificate replaced under a running relay.

Certificates are made here with ``cryptography`` (tests/integration/tlscerts.py).
The TLS port's hostile cases are in tests/security/test_tls_hostile.py, the proxy's
in test_proxy.py, the namespaces end-to-end in tests/e2e/test_e2e_6_networks.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env
from harness import (
    LOOPBACK,
    AgentProcess,
    KeyPair,
    RelayNode,
    Sshd,
    find_program,
    known_hosts_line,
    make_key,
)
from relay_fixtures import ssh_defaults
from tlscerts import CA, RELAY_NAME, Issued

pytestmark = pytest.mark.integration


@dataclass
class TLSRelay:
    relay: RelayNode
    tls_port: int
    ca: CA
    good: Issued
    gpu: Sshd
    agent_key: KeyPair
    user_key: KeyPair
    tmp: Path

    def tls_options(self, *extra: str, ca: bool = True) -> list[str]:
        # -p: the SSH port names the relay in known_hosts whichever way it is reached.
        opts = ["-p", str(self.relay.port), "-o", "Transport=tls", "-o", f"TLSPort={self.tls_port}",
                "-o", f"TLSServerName={RELAY_NAME}"]
        if ca:
            opts += ["-o", f"TLSCAFile={self.ca.pem_path}"]
        return [*opts, *extra]

    def connect_argv(self, *extra: str, known_hosts: Path | None = None,
                     service: str = "gpu-cluster") -> list[str]:
        return [sys.executable, "-m", "relay", "connect", "-i", str(self.user_key.path),
                "-o", f"UserKnownHostsFile={known_hosts or self.relay.known_hosts}",
                *(extra or self.tls_options()), f"alice@{LOOPBACK}", service]


def _run(argv: list[str], timeout: float = 60.0, input: bytes | None = None,
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                          env={**os.environ, **child_env()}, cwd=REPO_ROOT,
                          stdin=None if input is not None else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("tls-ca"))


@pytest.fixture(scope="module")
def tls_keys(openssh: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("tls-keys")
    return {n: make_key(d / n, comment=n) for n in ("lab_pc", "alice")}


def tls_relay_toml(cert: Issued, extra: str = "") -> str:
    return (f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n'
            f'tls_listen = "127.0.0.1:0"\ntls_handshake_timeout = 3\n{extra}')


def start_tls_site(ca: CA, tls_keys: dict[str, KeyPair], start_relay: Callable[..., RelayNode],
                   sshd_factory: Callable[[str], Sshd], tmp_path: Path,
                   relay_toml: str) -> TLSRelay:
    """gpu_cluster's sshd, and a relay granting it to lab_pc and alice that serves TLS
    with a certificate for RELAY_NAME (``relay_toml`` added to its ``[relay]``), with
    gpu-cluster's host key trusted; no agent yet."""
    good = ca.issue("relay", (RELAY_NAME,))
    gpu = sshd_factory("gpu_cluster")
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22" {tls_keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {tls_keys["alice"].public_blob()} alice'],
        relay_toml=tls_relay_toml(good, relay_toml))
    tls_port = relay.wait_for("relay_tls_listening", since=0)["port"]
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    return TLSRelay(relay, tls_port, ca, good, gpu, tls_keys["lab_pc"], tls_keys["alice"],
                    tmp_path)


@pytest.fixture
def site(ca: CA, tls_keys: dict[str, KeyPair], start_relay: Callable[..., RelayNode],
         sshd_factory: Callable[[str], Sshd], tmp_path: Path) -> TLSRelay:
    # The refusal tests end handshakes badly from 127.0.0.1 on purpose.
    return start_tls_site(ca, tls_keys, start_relay, sshd_factory, tmp_path,
                          'penalty_exempt = ["127.0.0.1"]\n')


def start_tls_agent(site: TLSRelay, start_agent: Callable[..., AgentProcess],
                    *options: str, known_hosts: Path | None = None) -> AgentProcess:
    return start_agent(
        "-i", str(site.agent_key.path),
        "-o", f"UserKnownHostsFile={known_hosts or site.relay.known_hosts}",
        *(options or site.tls_options()), "-o", "ServerAliveInterval=5",
        "-R", f"gpu-cluster:22:127.0.0.1:{site.gpu.port}", f"lab_pc@{LOOPBACK}")


def ssh_config(site: TLSRelay, client_key: KeyPair, proxy_command: str) -> Path:
    path = site.tmp / "ssh_config"
    path.write_text(f"""\
Host gpu-cluster
  User root
  IdentityFile {client_key.path}
  ProxyCommand {proxy_command}
""" + ssh_defaults(site.relay.known_hosts))
    return path


def stock_tools_config(path: Path, text: str, site: TLSRelay, client_key: KeyPair) -> Path:
    """``text`` (what ``labrelay ssh-config --tls`` prints) and gpu-cluster behind it,
    for stock ssh with nothing of labrelay installed."""
    path.write_text(text + f"""
Host gpu-cluster
  User root
  IdentityFile {client_key.path}
""" + ssh_defaults(site.relay.known_hosts, identities_only=False))
    return path


# 1 ---------------------------------------------------------------------------


def test_agent_link_and_labrelay_connect_over_tls(
        site: TLSRelay, start_agent: Callable[..., AgentProcess], client_key: KeyPair) -> None:
    """The agent's link comes up over TLS (CA file, SNI relay.test), registers
    gpu-cluster; ``ssh`` with ``labrelay connect -o Transport=tls`` as ProxyCommand lands
    on gpu_cluster's sshd; the relay's status counts the handshakes."""
    agent = start_tls_agent(site, start_agent)
    connected = agent.wait_for("link_connected", timeout=20)
    assert connected["route"] == f"tls {LOOPBACK}:{site.tls_port}"
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    proxy = " ".join(site.connect_argv(service="%h:%p"))
    cfg = ssh_config(site, client_key, proxy)
    ssh = find_program("ssh") or "ssh"
    out = _run([ssh, "-F", str(cfg), "gpu-cluster", "echo $LABRELAY_TEST_HOST"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "gpu_cluster"
    tls = site.relay.status()["relay"]["tls"]
    assert tls["handshakes"] >= 2 and tls["handshake_failed"] == 0, tls
    assert tls["certificate"]["names"] == [RELAY_NAME]
    table = _run([sys.executable, "-m", "relay", "status", "--admin", site.relay.admin])
    assert table.returncode == 0, table.stderr.decode()
    line = next(x for x in table.stdout.decode().splitlines() if x.startswith("TLS port"))
    assert f"TLS port {site.tls_port}: certificate for {RELAY_NAME}" in line
    assert "0 failed" in line


def test_stock_ssh_with_openssl_s_client_as_proxycommand(
        site: TLSRelay, start_agent: Callable[..., AgentProcess], client_key: KeyPair,
        tmp_path: Path) -> None:
    """What ``labrelay ssh-config --tls`` prints works with stock OpenSSH and OpenSSL:
    ``openssl s_client -quiet -verify_return_error -verify_hostname ... -alpn
    labrelay-ssh/1`` as the relay's ProxyCommand, gpu-cluster by ``ProxyJump``."""
    from relay.config.schema import ServiceGrant
    from relay.user.sshconfig import render

    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed (scripts/dev setup)"
    agent = start_tls_agent(site, start_agent)
    agent.wait_for("forward_ready", timeout=20, bind="gpu-cluster")
    text = render(user="alice", relay_host=RELAY_NAME, relay_port=22,
                  services=[ServiceGrant("gpu-cluster", 22)],
                  identity=str(site.user_key.path), tls_port=site.tls_port,
                  tls_ca_file=str(site.ca.pem_path), tls_connect=LOOPBACK)
    assert "ProxyCommand openssl s_client" in text
    cfg = stock_tools_config(tmp_path / "ssh_config.tls", text, site, client_key)
    # Through a ProxyCommand ssh checks the relay's host key under its name.
    site.relay.trust(f"{RELAY_NAME} {site.relay.host_key_blob}")
    ssh = find_program("ssh") or "ssh"
    out = _run([ssh, "-F", str(cfg), "gpu-cluster", "echo $LABRELAY_TEST_HOST"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "gpu_cluster"


# 2 ---------------------------------------------------------------------------


REFUSALS = [
    ("wrong name", lambda ca, tmp: (ca.issue("other", ("other.test",)), None),
     "the relay's certificate is for another name: it names other.test, not 'relay.test'"),
    ("expired", lambda ca, tmp: (ca.issue("old", (RELAY_NAME,), expired=True), None),
     "has expired"),
    ("untrusted CA", lambda ca, tmp: (CA(tmp / "rogue", "rogue CA").issue("rogue"), None),
     "not signed by a trusted CA"),
    ("wrong pin", lambda ca, tmp: (ca.issue("pinned", (RELAY_NAME,)),
                                   CA(tmp / "other", "other CA").issue("x").spki_pin),
     "does not match the pin"),
]


@pytest.mark.parametrize("case,make,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_certificates_are_refused_saying_which(
        case: str, make: Callable[[CA, Path], tuple[Issued, str | None]], message: str,
        ca: CA, tls_keys: dict[str, KeyPair], start_relay: Callable[..., RelayNode],
        start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
        client_key: KeyPair, tmp_path: Path) -> None:
    """Each bad certificate is refused by the agent (its link_failed reason) and by
    ``labrelay connect`` (stderr, exit 1) with a message that says which check failed;
    and, but for the pin, by stock ssh with the ``openssl s_client`` line that
    ``labrelay ssh-config --tls`` prints (``-verify_return_error``: without it s_client
    carries on, and ssh, whose known_hosts trusts the relay's key, would log in). No SSH
    is spoken (the relay sees no SSH connection)."""
    from relay.config.schema import ServiceGrant
    from relay.user.sshconfig import render

    cert, pin = make(ca, tmp_path)
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22" {tls_keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {tls_keys["alice"].public_blob()} alice'],
        # tls_names: the relay accepts the SNI name whatever its certificate says (an
        # impostor would too), so that the client's own check is what refuses.
        relay_toml=tls_relay_toml(cert, f'penalty_exempt = ["127.0.0.1"]\n'
                                        f'tls_names = ["{RELAY_NAME}"]\n'))
    tls_port = relay.wait_for("relay_tls_listening", since=0)["port"]
    site = TLSRelay(relay, tls_port, ca, cert, sshd_factory("gpu"), tls_keys["lab_pc"],
                    tls_keys["alice"], tmp_path)
    options = site.tls_options(ca=pin is None)
    if pin is not None:
        options += ["-o", f"TLSPin={pin}"]
    agent = start_tls_agent(site, start_agent, *options)
    failed = agent.wait_for("link_failed", timeout=20)
    assert message in failed["reason"], failed
    out = _run(site.connect_argv(*options))
    assert out.returncode == 1
    assert message in out.stderr.decode(), out.stderr.decode()
    if pin is None:  # ssh-config --tls has no pin option: the CA file and the name
        text = render(user="alice", relay_host=RELAY_NAME, relay_port=relay.port,
                      services=[ServiceGrant("gpu-cluster", 22)],
                      identity=str(site.user_key.path), tls_port=tls_port,
                      tls_ca_file=str(ca.pem_path), tls_connect=LOOPBACK)
        relay.trust(f"[{RELAY_NAME}]:{relay.port} {relay.host_key_blob}")
        cfg = stock_tools_config(tmp_path / "ssh_config.stock", text, site, client_key)
        stock = _run([find_program("ssh") or "ssh", "-F", str(cfg), "labrelay", "true"])
        assert stock.returncode == 255, stock.stderr.decode()
    assert relay.events("relay_authenticated") == [] and relay.events("auth_ok") == []
    assert relay.status()["relay"]["tls"]["handshakes"] == 0


def test_pinned_certificate_works_and_a_changed_host_key_is_still_refused(
        site: TLSRelay, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A right pin (either form) connects; the right certificate with a wrong SSH host
    key in known_hosts is refused by the host-key check: both checks must pass."""
    for pin in (site.good.spki_pin, site.good.cert_pin):
        out = _run(site.connect_argv(*site.tls_options(ca=False), "-o", f"TLSPin={pin}",
                                     "--no-fast-path", service="nothing-here"),
                   input=b"")
        # TLS and SSH passed: the relay itself answers about the service.
        assert "cannot reach the relay" not in out.stderr.decode(), out.stderr.decode()
    other = make_key(tmp_path / "impostor", comment="impostor")
    wrong = tmp_path / "known_hosts.wrong"
    wrong.write_text(known_hosts_line(other.public_blob(), 22, host=LOOPBACK) + "\n")
    agent = start_tls_agent(site, start_agent, known_hosts=wrong)
    failed = agent.wait_for("link_failed", timeout=20)
    assert "host key" in failed["reason"].lower(), failed
    out = _run(site.connect_argv(known_hosts=wrong))
    assert out.returncode == 1 and "host key" in out.stderr.decode().lower(), out.stderr


# 3 ---------------------------------------------------------------------------


def _served_certificate(port: int, ca: CA) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca.pem_path))
    ctx.set_alpn_protocols(["labrelay-ssh/1"])
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=RELAY_NAME) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_certificate_replaced_new_handshakes_use_it_open_sessions_continue(
        site: TLSRelay, start_agent: Callable[..., AgentProcess], client_key: KeyPair) -> None:
    """Overwrite the certificate and key files (as certbot renews): the next handshake
    serves the new certificate without a signal; the agent's link that was open
    before stays up, and a session held open across the change keeps working."""
    agent = start_tls_agent(site, start_agent)
    agent.wait_for("forward_ready", timeout=20, bind="gpu-cluster")
    proxy = " ".join(site.connect_argv(service="%h:%p"))
    cfg = ssh_config(site, client_key, proxy)
    ssh = find_program("ssh") or "ssh"
    held = subprocess.Popen([ssh, "-F", str(cfg), "gpu-cluster", "echo ready; cat"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, **child_env()}, cwd=REPO_ROOT)
    try:
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline() == b"ready\n"
        assert _served_certificate(site.tls_port, site.ca) == site.good.der
        renewed = site.ca.issue("renewed", (RELAY_NAME,))
        mark = site.relay.mark()
        # certbot writes new files and swaps them in (rename): new inode, new content.
        for new, old in ((renewed.cert, site.good.cert), (renewed.key, site.good.key)):
            tmp = old.with_suffix(".new")
            shutil.copyfile(new, tmp)
            tmp.replace(old)
        assert _served_certificate(site.tls_port, site.ca) == renewed.der
        site.relay.wait_for("tls_cert_loaded", since=mark)
        held.stdin.write(b"still here\n")
        held.stdin.flush()
        assert held.stdout.readline() == b"still here\n"
    finally:
        if held.stdin is not None:
            held.stdin.close()
        assert held.wait(timeout=30) == 0
    assert site.relay.status()["relay"]["tls"]["certificate"]["loads"] == 2
    # The link that was up before the change is the same connection.
    assert agent.events("link_connected") and len(agent.events("link_connected")) == 1
    out = _run([ssh, "-F", str(cfg), "gpu-cluster", "echo $LABRELAY_TEST_HOST"])
    assert out.returncode == 0 and out.stdout.decode().strip() == "gpu_cluster"


# 4 ---------------------------------------------------------------------------


def test_labrelay_connect_over_tls_takes_an_ssh_channel_and_says_why_once(
        ca: CA, tls_keys: dict[str, KeyPair], start_relay: Callable[..., RelayNode],
        start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
        client_key: KeyPair, tmp_path: Path) -> None:
    """docs/networks.md "The fast path": the agent's link is plain SSH with its data
    pool up, so the relay grants alice a fast-path ticket either way; over plain SSH her
    ``labrelay connect`` is spliced, over TLS it does not dial the data port (on a
    network that lets out only 443 that is a wait and a failure) but says why, once,
    and takes an SSH channel."""
    site = start_tls_site(ca, tls_keys, start_relay, sshd_factory, tmp_path,
                          'data_port = 0\ne2e_services = ["gpu-cluster:22"]\n')
    relay, tls_port, gpu = site.relay, site.tls_port, site.gpu
    agent = start_agent(
        "-p", str(relay.port), "-i", str(tls_keys["lab_pc"].path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "ServerAliveInterval=5",
        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", f"lab_pc@{LOOPBACK}")
    agent.wait_for("fast_path_ready", timeout=20)
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    ssh = find_program("ssh") or "ssh"
    said = {}
    for how, options in (("tcp", ["-p", str(relay.port)]), ("tls", site.tls_options())):
        cfg = ssh_config(site, client_key, " ".join(
            site.connect_argv(*options, service="%h:%p")))
        out = _run([ssh, "-F", str(cfg), "gpu-cluster", "echo $LABRELAY_TEST_HOST"])
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().strip() == "gpu_cluster"
        said[how] = [line for line in out.stderr.decode().splitlines()
                     if "fast path unavailable" in line]
    assert said["tcp"] == [], said  # spliced: the relay and the agent offer it
    assert len(said["tls"]) == 1, said
    assert f"the relay is reached by tls {LOOPBACK}:{tls_port}" in said["tls"][0], said
    assert "its data port is not reachable that way" in said["tls"][0], said


def test_an_agent_linked_over_tls_is_named_as_why_there_is_no_fast_path(
        ca: CA, tls_keys: dict[str, KeyPair], start_relay: Callable[..., RelayNode],
        start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
        client_key: KeyPair, tmp_path: Path) -> None:
    """The agent's link is TLS, so it keeps no data connections; alice over plain SSH
    gets an SSH channel, and her ``labrelay connect`` said only "keeps no data
    connections (fast path off there, or an older agent)", which sent her to the agent's
    config.  It now says the agent's link is TLS (the relay knows the port it came in on)."""
    site = start_tls_site(ca, tls_keys, start_relay, sshd_factory, tmp_path,
                          'data_port = 0\ne2e_services = ["gpu-cluster:22"]\n')
    relay, tls_port = site.relay, site.tls_port
    agent = start_tls_agent(site, start_agent)
    assert agent.wait_for("link_connected", timeout=20)["route"] == f"tls {LOOPBACK}:{tls_port}"
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    cfg = ssh_config(site, client_key, " ".join(
        site.connect_argv("-p", str(relay.port), service="%h:%p")))
    out = _run([find_program("ssh") or "ssh", "-F", str(cfg), "gpu-cluster",
                "echo $LABRELAY_TEST_HOST"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "gpu_cluster"
    said = [line for line in out.stderr.decode().splitlines() if "fast path unavailable" in line]
    assert len(said) == 1, out.stderr.decode()
    assert "agent lab_pc keeps no data connections (its link to the relay comes over TLS" in (
        said[0]), said
