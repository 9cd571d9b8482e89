"""A relay-wide trusted user CA (``trusted_user_ca`` in ``[relay]``, sshd's
``TrustedUserCAKeys``), through a real relay, the real OpenSSH ``ssh`` with ``ssh-keygen -s``
certificates, and paramiko as a hostile client: a certificate logs in as the configured
user its login name names, only when that name is one of its principals; every other
certificate is refused with its reason (and the CA's fingerprint) in the relay's log;
dropping the CA from the config (SIGHUP) ends the sessions it let in."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    RelayNode,
    SshProcess,
    find_program,
    make_key,
)
from test_keylife import (
    ca_blob,
    echo_once,
    lab_pc_grant,
    make_cas,
    open_forward,
    refused,
    revoke_serial,
    serve_web,
    user_cert,
)
from test_keylife_toml import reload_ends_session

pytestmark = pytest.mark.integration


def fingerprint(pub: Path) -> str:
    out = subprocess.run([find_program("ssh-keygen") or "ssh-keygen", "-l", "-f", str(pub)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def hostile_login(relay: RelayNode, identity: Path, user: str, reason: str) -> None:
    """paramiko offers ``identity``'s certificate (``-cert.pub`` beside it), signed, as
    ``user``: it must be refused, and the relay log ``reason``."""
    key = paramiko.Ed25519Key.from_private_key_file(str(identity))
    key.load_certificate(f"{identity}-cert.pub")
    mark = relay.mark()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_publickey(user, key)
        finally:
            transport.close()
    relay.wait_for("relay_auth_refused", since=mark, timeout=10, user=user,
                   why=lambda why: reason in str(why))


def test_a_relay_wide_user_ca(
    tmp_path: Path,
    openssh: None,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    pki = make_cas(tmp_path / "pki", "ca", "other_ca", "stray_ca")
    ca, other_ca = ca_blob(pki), ca_blob(pki, "other_ca")
    ca_fp = fingerprint(pki / "ca.pub")
    krl = revoke_serial(pki)
    lab_pc, bob = (make_key(tmp_path / n, comment=n) for n in ("lab_pc", "bob"))
    carol = make_key(tmp_path / "carol", comment="carol")
    relay = start_relay(
        agents=[lab_pc_grant(lab_pc)],
        # carol is a users-file user: the relay-wide CA covers her too.
        users=[f'permitopen="web:8080" {carol.public_blob()} carol'],
        relay_toml="\n".join([
            'penalty_exempt = ["127.0.0.1"]',
            f'revoked_keys = "{krl}"',
            f'trusted_user_ca = ["{ca}", "{other_ca}"]',
            # alice has no key of her own: the lab CA's certificates log her in.
            '[[relay.user]]', 'name = "alice"', 'services = ["web:8080"]',
            '[[relay.user]]', 'name = "bob"', f'keys = ["{bob.public_blob()}"]',
            'services = ["web:8080"]',
            '[[relay.user]]', 'name = "dave"', 'services = ["web:8080"]',
            'from = "10.9.9.0/24"', ""]),
    )
    serve_web(start_agent, relay, lab_pc, targets)

    # alice: OpenSSH with a certificate naming her, as alice. The key id carries an
    # escape sequence: logged escaped.
    mark = relay.mark()
    alice, port = open_forward(start_ssh, relay,
                               user_cert(pki, "alice", "-n", "alice,al",
                                         "-I", "alice@lab\x1b[2J", "-V", "-5m:+1h"),
                               "alice", name="ssh-alice-cert")
    assert echo_once(port) == b"ping"
    connected = relay.wait_for("relay_connected", since=mark, name="alice")
    assert connected["cert_ca"] == ca_fp
    assert connected["cert_id"] == "alice@lab\\x1b[2J", connected["cert_id"]
    # carol (users file), with a certificate from the second CA.
    _carol, carol_port = open_forward(start_ssh, relay,
                                      user_cert(pki, "carol_c", "-n", "carol", ca="other_ca"),
                                      "carol", name="ssh-carol-cert")
    assert echo_once(carol_port) == b"ping"
    _bob, bob_port = open_forward(start_ssh, relay, bob.path, "bob", name="ssh-bob")

    # Refused, each with its reason; the hostile client is paramiko.
    bound = "trusted_user_ca: the login name"
    hostile_login(relay, user_cert(pki, "b1", "-n", "bob"), "alice", bound)  # bob's, as alice
    hostile_login(relay, user_cert(pki, "a1", "-n", "alice"), "bob", bound)  # alice's, as bob
    hostile_login(relay, user_cert(pki, "a2", "-n", "alice"), "al", bound)  # not a user name
    hostile_login(relay, user_cert(pki, "e1", "-n", "eve"), "eve", bound)  # no such user
    hostile_login(relay, user_cert(pki, "old", "-n", "alice", "-V", "20200101:20200201"),
                  "alice", "expired")
    hostile_login(relay, user_cert(pki, "early", "-n", "alice", "-V", "+1d:+2d"), "alice",
                  "not yet valid")
    hostile_login(relay, user_cert(pki, "host", "-h", "-n", "alice"), "alice",
                  "a host certificate cannot log in")
    hostile_login(relay, user_cert(pki, "stray", "-n", "alice", ca="stray_ca"), "alice",
                  "untrusted CA")
    hostile_login(relay, user_cert(pki, "lost", "-n", "alice", serial=666), "alice",
                  "serial 666 is revoked")
    hostile_login(relay, user_cert(pki, "fc", "-n", "alice", "-O", "force-command=/bin/sh"),
                  "alice", "force-command")
    hostile_login(relay, user_cert(pki, "sa", "-n", "alice", "-O",
                                   "source-address=10.0.0.0/8"), "alice", "source-address")
    # dave's entry has from= "10.9.9.0/24": it bounds the relay-wide CA's certificates too.
    hostile_login(relay, user_cert(pki, "d1", "-n", "dave"), "dave", 'from="10.9.9.0/24"')
    reasons = refused(relay, user_cert(pki, "b2", "-n", "bob"), "alice", bound)
    assert f"(CA {ca_fp})" in reasons, reasons

    # The lab CA is dropped from the config: alice's session (its certificate) ends at the
    # reload; bob (a key) and carol (the other CA) keep theirs.
    config = relay.dir / "node.toml"
    config.write_text(config.read_text().replace(f'"{ca}", ', ""))
    mark = relay.mark()
    ended = reload_ends_session(relay, port, "alice")
    assert ended["cert_ca"] == ca_fp and ended["cert_id"].startswith("alice@lab")
    assert alice.proc.wait(timeout=10) is not None
    assert echo_once(bob_port) == b"ping" and echo_once(carol_port) == b"ping"
    assert not relay.events("relay_key_ended", since=mark, name="carol")
    refused(relay, user_cert(pki, "alice2", "-n", "alice"), "alice", "untrusted CA")
