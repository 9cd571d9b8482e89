"""Keys that come and go with people, through a real relay and the real OpenSSH client
(issue 15): ``expiry-time`` in the past refused, a key expiring in a few seconds has its
open session ended within 1 s of expiry; user certificates signed by ``ssh-keygen -s``
granted, and expired / not yet valid / wrong principal / wrong CA / KRL-listed ones
refused, each with its reason in the relay's log."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    EchoServer,
    KeyPair,
    RelayNode,
    SshProcess,
    connect,
    find_program,
    free_port,
    make_key,
    recv_exactly,
    ssh_argv,
)
from relay_fixtures import stock_local_forward

pytestmark = pytest.mark.integration


def keygen(*args: str, cwd: Path) -> None:
    subprocess.run([find_program("ssh-keygen") or "ssh-keygen", "-q", *args], cwd=cwd,
                   check=True, capture_output=True)


def make_cas(pki: Path, *names: str, key_type: tuple[str, ...] = ("-t", "ed25519")) -> Path:
    """A new directory ``pki`` holding a CA key pair (``ssh-keygen``) for each of ``names``."""
    pki.mkdir()
    for name in names:
        keygen(*key_type, "-N", "", "-C", name, "-f", name, cwd=pki)
    return pki


def ca_blob(pki: Path, name: str = "ca") -> str:
    """CA ``name``'s public key as ``TYPE BASE64``, the way a ``cert-authority`` line or a
    ``cert_authorities`` entry names it."""
    return " ".join((pki / f"{name}.pub").read_text().split()[:2])


def revoke_serial(pki: Path, serial: int = 666) -> Path:
    """``pki/revoked.krl``, made by ``ssh-keygen -k -s ca.pub``: the lab CA's certificates
    with serial ``serial`` revoked."""
    (pki / "revoked.spec").write_text(f"serial: {serial}\n")
    keygen("-k", "-f", "revoked.krl", "-s", "ca.pub", "revoked.spec", cwd=pki)
    return pki / "revoked.krl"


def lab_pc_grant(key: KeyPair) -> str:
    """The agents-file line that lets ``key`` register web:8080 as lab_pc."""
    return f'permitlisten="web:8080" {key.public_blob()} lab_pc'


def labrelay_agent(start_agent: Callable[..., AgentProcess], relay: RelayNode, key: KeyPair,
                   *forwards: str) -> AgentProcess:
    """The labrelay agent as lab_pc with ``-R`` ``forwards``, once each is ready."""
    rs = [a for f in forwards for a in ("-R", f)]
    agent = start_agent(
        "-p", str(relay.port), "-i", str(key.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        *rs, "lab_pc@127.0.0.1",
    )  # fmt: skip
    agent.wait_for("link_connected", timeout=20)
    for f in forwards:
        agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", bind=f.split(":")[0])
    return agent


def serve_web(start_agent: Callable[..., AgentProcess], relay: RelayNode, key: KeyPair,
              targets: Targets) -> EchoServer:
    """An echo target, served as web:8080 by a labrelay agent logged in with ``key``."""
    echo = targets.echo()
    labrelay_agent(start_agent, relay, key, f"web:8080:127.0.0.1:{echo.port}")
    return echo


def forward_argv(relay: RelayNode, identity: Path, port: int, user: str) -> list[str]:
    return ssh_argv(relay.port, identity, relay.known_hosts, "-v", "-N",
                    "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:web:8080",
                    user=user)  # fmt: skip


def open_forward(start_ssh: Callable[..., SshProcess], relay: RelayNode, identity: Path,
                 user: str, name: str) -> tuple[SshProcess, int]:
    """A stock ``ssh -L PORT:web:8080`` as ``user`` with ``identity``, once it listens."""
    return stock_local_forward(start_ssh, lambda port: forward_argv(relay, identity, port, user),
                               name=name)


def echo_once(port: int) -> bytes:
    with connect(port, timeout=10) as sock:
        sock.sendall(b"ping")
        return recv_exactly(sock, 4)


def refused_login(relay: RelayNode, argv: list[str], reason: str) -> str:
    """Run ssh ``argv``; it must fail to log in, and the relay log a refusal that says
    ``reason`` (awaited: the relay wrote it before ssh exited, but the harness reads its
    log in a thread of its own); the reasons it logged."""
    mark = relay.mark()
    out = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 255 and b"Permission denied" in out.stderr, out.stderr[-500:]
    relay.wait_for("relay_auth_refused", since=mark, timeout=10,
                   why=lambda why: reason in str(why))
    return " | ".join(e["why"] for e in relay.events("relay_auth_refused", since=mark))


def refused(relay: RelayNode, identity: Path, user: str, reason: str) -> str:
    """:func:`refused_login` for an ``ssh -L`` with ``identity`` (and its -cert.pub)."""
    return refused_login(relay, forward_argv(relay, identity, free_port(), user), reason)


@pytest.fixture
def pki(tmp_path: Path, openssh: None) -> Path:
    return make_cas(tmp_path / "pki", "ca", "other_ca")


def user_cert(pki: Path, name: str, *options: str, ca: str = "ca", serial: int = 1) -> Path:
    key = make_key(pki / name, comment=name)
    keygen("-s", ca, "-z", str(serial), "-I", f"{name}@lab", *options, f"{name}.pub", cwd=pki)
    assert (pki / f"{name}-cert.pub").exists()
    return key.path


def stock_agent_registers_only_its_principals(
    pki: Path, relay: RelayNode, start_ssh: Callable[..., SshProcess]
) -> None:
    """A stock ``ssh -R`` as lab_pc with a certificate whose principals are ``lab_pc`` and
    ``web:8080``, asking for web:8080 and gpu-cluster:22: only web:8080 is granted."""
    key = user_cert(pki, "lab_pc", "-n", "lab_pc,web:8080", "-V", "-5m:+1h")
    proc = start_ssh(ssh_argv(relay.port, key, relay.known_hosts, "-v", "-N",
                              "-R", "web:8080:127.0.0.1:9", "-R", "gpu-cluster:22:127.0.0.1:9",
                              user="lab_pc"), name="stock-agent-cert")
    proc.wait_stderr(r"remote forward success for: listen web:8080")
    proc.wait_stderr(r"remote forward failure for: listen gpu-cluster:22")
    agents = relay.status()["relay"]["agents"]
    assert agents[0]["name"] == "lab_pc" and agents[0]["services"] == ["web:8080"]
    # a stock ssh -R as the agent: its software shown (docs/operations.md)
    assert agents[0]["version"].startswith("not labrelay: OpenSSH_"), agents


def test_certificates_from_the_lab_ca(
    pki: Path,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    ca = ca_blob(pki)
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    krl = revoke_serial(pki)
    relay = start_relay(
        agents=[lab_pc_grant(lab_pc)],
        users=[f'cert-authority,principals="alice",permitopen="web:8080" {ca} alice'],
        relay_toml=f'penalty_exempt = ["127.0.0.1"]\nrevoked_keys = "{krl}"',
    )
    serve_web(start_agent, relay, lab_pc, targets)

    # alice's certificate, valid now: granted, and her session works.
    proc, port = open_forward(start_ssh, relay,
                              user_cert(pki, "alice", "-n", "alice", "-V", "-5m:+1h"), "alice",
                              name="ssh-cert")
    proc.wait_stderr(r"Authenticated to .* using \"publickey\"")
    assert echo_once(port) == b"ping"
    assert relay.status()["relay"]["users"][0]["name"] == "alice"

    refused(relay, user_cert(pki, "old", "-n", "alice", "-V", "20200101:20200201"), "alice",
            "expired")
    refused(relay, user_cert(pki, "early", "-n", "alice", "-V", "+1d:+2d"), "alice",
            "not yet valid")
    refused(relay, user_cert(pki, "bob", "-n", "bob"), "bob", "no line of its CA accepts")
    refused(relay, user_cert(pki, "forged", "-n", "alice", ca="other_ca"), "alice",
            "untrusted CA")
    refused(relay, user_cert(pki, "lost", "-n", "alice", serial=666), "alice",
            "serial 666 is revoked")


def test_expiry_time_refuses_then_ends_open_sessions(
    tmp_path: Path,
    openssh: None,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    lab_pc, old, carol = (make_key(tmp_path / n, comment=n) for n in ("lab_pc", "old", "carol"))
    # Far enough ahead for the relay, the agent and one refused login to start on a
    # loaded box; the session is opened, then waits for the key to expire.
    expires = int(time.time()) + 15
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(expires))
    relay = start_relay(
        agents=[lab_pc_grant(lab_pc)],
        users=[f'expiry-time="20200101Z",permitopen="web:8080" {old.public_blob()} old',
               f'expiry-time="{stamp}Z",permitopen="web:8080" {carol.public_blob()} carol'],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    serve_web(start_agent, relay, lab_pc, targets)

    refused(relay, old.path, "old", "expired")

    _proc, port = open_forward(start_ssh, relay, carol.path, "carol", name="ssh-carol")
    with connect(port, timeout=30) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert time.time() < expires  # the session was open before the key expired
        sock.settimeout(30)
        try:
            ended = sock.recv(1)
        except ConnectionResetError:
            ended = b""
        closed_at = time.time()
    assert ended == b""
    print(f"session ended {closed_at - expires:+.3f} s after expiry")
    assert -0.1 <= closed_at - expires <= 1.0, closed_at - expires
    relay.wait_for("relay_key_ended", timeout=5, name="carol")
    assert shutil.which("ssh") is not None


def test_an_agent_certificate_registers_the_services_its_principals_name(
    pki: Path,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """A stock ``ssh -R`` as the agent, with a certificate whose principals are
    ``lab_pc`` (who it is) and ``web:8080`` (what it may register): web:8080 is granted,
    gpu-cluster:22 (not among its principals) refused, though the CA line allows both."""
    ca = ca_blob(pki)
    relay = start_relay(
        agents=[f'cert-authority,principals="lab_pc",permitlisten="web:8080",'
                f'permitlisten="gpu-cluster:22" {ca} lab_pc'],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    stock_agent_registers_only_its_principals(pki, relay, start_ssh)


KEY_TYPES = {"ed25519": ["-t", "ed25519"], "ecdsa": ["-t", "ecdsa", "-b", "256"],
             "rsa": ["-t", "rsa", "-b", "2048"]}


@pytest.mark.parametrize("kind", sorted(KEY_TYPES))
def test_the_labrelay_agent_presents_its_certificate(
    kind: str,
    pki: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
) -> None:
    """``labrelay agent -i KEY`` with ``KEY-cert.pub`` beside it (as ssh(1) finds it) logs in
    with the certificate, for each key type ``ssh-keygen`` makes, signed by a CA of the same
    type (an RSA certificate is offered as ``rsa-sha2-512-cert-v01@openssh.com`` and signed
    with SHA-2, as OpenSSH 8.8+ requires); the plain key is granted nothing."""
    keygen(*KEY_TYPES[kind], "-N", "", "-C", f"ca_{kind}", "-f", f"ca_{kind}", cwd=pki)
    keygen(*KEY_TYPES[kind], "-N", "", "-C", "agent_key", "-f", "agent_key", cwd=pki)
    keygen("-s", f"ca_{kind}", "-I", "lab_pc@lab", "-n", "lab_pc,web:8080", "-V", "-5m:+1h",
           "agent_key.pub", cwd=pki)
    ca = ca_blob(pki, f"ca_{kind}")
    relay = start_relay(
        agents=[f'cert-authority,principals="lab_pc",permitlisten="web:8080" {ca} lab_pc'],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    pair = KeyPair(pki / "agent_key", (pki / "agent_key.pub").read_text().strip())
    agent = labrelay_agent(start_agent, relay, pair, "web:8080:127.0.0.1:9")
    agent.wait_for("forward_ready", timeout=20, since=0, bind="web")
    assert relay.status()["relay"]["agents"][0]["services"] == ["web:8080"]
    assert not relay.events("relay_auth_refused")  # the certificate went first, and in


def test_a_certificate_that_may_not_forward_ports_is_refused(
    pki: Path,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """A certificate without the ``permit-port-forwarding`` extension (``ssh-keygen -s``
    with ``-O no-port-forwarding`` or ``-O clear``) may forward nothing
    under sshd, and forwarding is all the relay does: refused at login with that reason,
    for a user (``ssh -L``) and for an agent (a stock ``ssh -R``), never granted as if the
    restriction were not there.  ``-O clear -O permit-port-forwarding`` and the
    extensions for what the relay never offers (``-O no-pty`` ...) log in and forward."""
    ca = ca_blob(pki)
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    relay = start_relay(
        agents=[lab_pc_grant(lab_pc),
                f'cert-authority,principals="lab_pc2",permitlisten="gpu-cluster:22" {ca} lab_pc2'],
        users=[f'cert-authority,principals="alice",permitopen="web:8080" {ca} alice'],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    serve_web(start_agent, relay, lab_pc, targets)

    for n, options in enumerate((["-O", "no-port-forwarding"], ["-O", "clear"])):
        why = refused(relay, user_cert(pki, f"nofw{n}", "-n", "alice", *options), "alice",
                      "permit-port-forwarding")
        assert "-O no-port-forwarding" in why, why

    # A stock ssh -R agent whose certificate may not forward: not logged in either.
    agent_key = user_cert(pki, "lab_pc2", "-n", "lab_pc2,gpu-cluster:22", "-O", "clear")
    refused_login(relay, ssh_argv(relay.port, agent_key, relay.known_hosts, "-N",
                                  "-o", "ExitOnForwardFailure=yes",
                                  "-R", "gpu-cluster:22:127.0.0.1:9", user="lab_pc2"),
                  "permit-port-forwarding")
    assert relay.status()["relay"]["agents"][0]["name"] == "lab_pc"

    # What sshd would let forward, the relay lets forward.
    for n, options in enumerate((["-O", "clear", "-O", "permit-port-forwarding"],
                                 ["-O", "no-pty", "-O", "no-agent-forwarding",
                                  "-O", "no-x11-forwarding", "-O", "no-user-rc"])):
        _proc, port = open_forward(start_ssh, relay,
                                   user_cert(pki, f"fw{n}", "-n", "alice", *options), "alice",
                                   name=f"ssh-fw{n}")
        assert echo_once(port) == b"ping"


def test_two_laptops_each_key_named_by_its_fingerprint_one_revoked(
    pki: Path,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """alice has two laptops: one logs in with its key (a users-file line), the other with
    a lab-CA certificate.  Every event about a login names the key as ``ssh-keygen -lf``
    prints it (for a certificate, that is its key's fingerprint, which ``-lf`` prints
    for ``id-cert.pub`` too): ``relay_connected``, the audit log's ``session_open``,
    and, when the first laptop is lost and its line removed, ``relay_key_revoked`` and
    the refused retry's ``relay_auth_refused``, so the admin can tell which laptop it
    was.  The other laptop's session carries on."""
    ca = ca_blob(pki)
    lab_pc, laptop1 = (make_key(tmp_path / n, comment=n) for n in ("lab_pc", "laptop1"))
    alice_key = f'permitopen="web:8080" {laptop1.public_blob()} alice'
    alice_ca = f'cert-authority,principals="alice",permitopen="web:8080" {ca} alice'
    relay = start_relay(agents=[lab_pc_grant(lab_pc)],
                        users=[alice_key, alice_ca],
                        relay_toml='penalty_exempt = ["127.0.0.1"]')
    serve_web(start_agent, relay, lab_pc, targets)
    laptop2 = user_cert(pki, "laptop2", "-n", "alice", "-V", "-5m:+1h")
    fingerprints = {laptop1.fingerprint(), KeyPair(laptop2, "").fingerprint()}
    assert len(fingerprints) == 2

    ports = {}
    for name, identity in (("laptop1", laptop1.path), ("laptop2", laptop2)):
        _proc, port = open_forward(start_ssh, relay, identity, "alice", name=f"ssh-{name}")
        ports[name] = port
        assert echo_once(port) == b"ping"
    connected = relay.events("relay_connected", since=0, name="alice")
    assert {e["key"] for e in connected} == fingerprints, connected
    opened = [relay.wait_for("session_open", since=0, user="alice", key=fp)
              for fp in fingerprints]
    assert len(opened) == 2

    mark = relay.mark()
    (relay.dir / "users").write_text(alice_ca + "\n")  # laptop1 is lost
    revoked = relay.wait_for("relay_key_revoked", since=mark, name="alice")
    assert revoked["key"] == laptop1.fingerprint(), revoked
    refused(relay, laptop1.path, "alice", "key not granted")
    assert {e["key"] for e in relay.events("relay_auth_refused", since=mark)} \
        == {laptop1.fingerprint()}
    assert echo_once(ports["laptop2"]) == b"ping"


def test_an_agent_certificate_renewed_on_disk_is_offered_when_the_old_one_expires(
    pki: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> None:
    """The lab PC's agent logs in with a short-lived certificate that a job renews on
    disk (``ssh-keygen -s`` again, into the same ``KEY-cert.pub``) before it expires.
    At expiry the relay ends the agent's connection (``relay_key_ended``); the agent
    reconnects offering the renewed certificate, as a new ssh(1) would, and serves
    again, instead of offering the expired one it started with until restarted."""
    ca = ca_blob(pki)
    relay = start_relay(
        agents=[f'cert-authority,principals="lab_pc",permitlisten="web:8080" {ca} lab_pc'],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    echo = targets.echo()
    key = make_key(pki / "lab_pc", comment="lab_pc")
    sign = ("-s", "ca", "-I", "lab_pc@lab", "-n", "lab_pc,web:8080")
    keygen(*sign, "-z", "1", "-V", "-5m:+12s", "lab_pc.pub", cwd=pki)
    agent = start_agent(
        "-p", str(relay.port), "-i", str(key.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "--backoff-initial", "0.2", "--backoff-max", "1",
        "-R", f"web:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, since=0, bind="web")
    first = relay.wait_for("relay_connected", since=0, name="lab_pc")
    assert first["cert_id"] == "lab_pc@lab"

    keygen(*sign, "-z", "2", "-V", "-5m:+1h", "lab_pc.pub", cwd=pki)  # the renewal job
    mark, amark = relay.mark(), agent.mark()
    ended = relay.wait_for("relay_key_ended", since=mark, timeout=30, name="lab_pc")
    assert "expired" in ended["why"], ended
    agent.wait_for("forward_ready", timeout=15, since=amark, bind="web")
    assert relay.events("relay_auth_refused", since=mark) == []
    again = relay.wait_for("relay_connected", since=mark, name="lab_pc")
    assert again["cert_id"] == "lab_pc@lab" and again["key"] == first["key"]
    assert relay.status()["relay"]["agents"][0]["services"] == ["web:8080"]


def test_one_certificate_logged_in_as_herself_and_as_the_lab_account(
    pki: Path,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """A student's certificate names her and the shared lab account (``-n alice,lab``);
    she has a stock ``ssh -L`` open as herself, then one as ``lab``.  The relay kept one
    record per certificate, the last login's: her own connection's next session was
    opened and audited as ``lab``, and when the lab line's ``expiry-time`` passed, her
    own connection ended with the lab one.  Each connection is checked and logged as the
    login it made."""
    ca = ca_blob(pki)
    lab_pc = make_key(tmp_path / "lab_pc", comment="lab_pc")
    expires = int(time.time()) + 15
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(expires))
    relay = start_relay(
        agents=[lab_pc_grant(lab_pc)],
        users=[f'cert-authority,principals="alice",permitopen="web:8080" {ca} alice',
               f'cert-authority,principals="lab",expiry-time="{stamp}Z",'
               f'permitopen="web:8080" {ca} lab'],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    serve_web(start_agent, relay, lab_pc, targets)
    cert = user_cert(pki, "alice", "-n", "alice,lab", "-V", "-5m:+1h")
    ports = {}
    for login in ("alice", "lab"):
        _proc, ports[login] = open_forward(start_ssh, relay, cert, login, name=f"ssh-{login}")
    mark = relay.mark()
    assert echo_once(ports["alice"]) == b"ping"  # after the lab login
    opened = relay.wait_for("session_open", since=mark)
    assert opened["user"] == "alice", f"her session was logged as {opened['user']}"

    # The lab line's expiry-time passes: the lab login ends, hers carries on.
    ended = relay.wait_for("relay_key_ended", timeout=30, since=mark)
    assert ended["name"] == "lab", ended
    assert echo_once(ports["alice"]) == b"ping"
    # both would have ended in the same turn (one record, one endKey)
    assert [e["name"] for e in relay.events("relay_key_ended", since=mark)] == ["lab"]
