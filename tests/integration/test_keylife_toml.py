"""Keys that come and go, written in the TOML config instead of the grant files (issue 15):
``expiry``, ``from``, ``cert_authorities`` + ``principals`` in ``[[relay.user]]`` tables and
``revoked_keys`` in ``[relay]``, through a real relay and the real OpenSSH client; a
reload (SIGHUP) that gives a logged-in user an ``expiry`` in the past ends her session
and refuses her next login."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Targets
from harness import (
    AgentProcess,
    RelayNode,
    SshProcess,
    connect,
    make_key,
)
from test_keylife import (
    ca_blob,
    echo_once,
    keygen,
    lab_pc_grant,
    make_cas,
    open_forward,
    refused,
    revoke_serial,
    serve_web,
    stock_agent_registers_only_its_principals,
    user_cert,
)
from test_ops_reload import labrelay

pytestmark = pytest.mark.integration


def user_table(name: str, *lines: str) -> str:
    return "\n".join(["[[relay.user]]", f'name = "{name}"', 'services = ["web:8080"]',
                      *lines, ""])


def reload_ends_session(relay: RelayNode, port: int, name: str) -> dict[str, Any]:
    """With a session through ``port`` open (it echoes), SIGHUP the relay (its config was
    just edited): the reload ends ``name``'s session (``relay_key_ended``, returned) and
    the socket is closed by the relay."""
    mark = relay.mark()
    with connect(port, timeout=30) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        os.kill(relay.pid, signal.SIGHUP)
        relay.wait_for("reload_done", since=mark)
        ended = relay.wait_for("relay_key_ended", since=mark, timeout=5, name=name)
        sock.settimeout(10)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    return ended


def test_expiry_from_and_certificates_from_the_toml_config(
    tmp_path: Path,
    openssh: None,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    pki = make_cas(tmp_path / "pki", "ca")
    ca = ca_blob(pki)
    krl = revoke_serial(pki)
    lab_pc, old, far, dave = (make_key(tmp_path / n, comment=n)
                              for n in ("lab_pc", "old", "far", "dave"))
    tables = "\n".join([
        f'revoked_keys = "{krl}"',
        user_table("alice", f'cert_authorities = ["{ca}"]', 'principals = ["alice", "al"]',
                   'from = "127.0.0.0/8,::1"'),
        user_table("old", f'keys = ["{old.public_blob()}"]', 'expiry = "20200101Z"'),
        user_table("far", f'keys = ["{far.public_blob()}"]', 'from = "10.9.9.0/24"'),
        user_table("dave", f'keys = ["{dave.public_blob()}"]', "expiry = 2099-01-01T00:00:00Z"),
    ])
    relay = start_relay(agents=[lab_pc_grant(lab_pc)],
                        relay_toml='penalty_exempt = ["127.0.0.1"]\n' + tables)
    serve_web(start_agent, relay, lab_pc, targets)

    # alice has no key of her own: a certificate from the lab CA naming "al" logs her in.
    alice, port = open_forward(start_ssh, relay,
                               user_cert(pki, "alice", "-n", "al", "-V", "-5m:+1h"), "alice",
                               name="ssh-alice-cert")
    assert echo_once(port) == b"ping"
    _dave, dave_port = open_forward(start_ssh, relay, dave.path, "dave", name="ssh-dave")
    assert echo_once(dave_port) == b"ping"

    refused(relay, old.path, "old", "key expired at 2020-01-01 00:00:00 UTC")
    refused(relay, far.path, "far", 'not allowed by from="10.9.9.0/24"')
    refused(relay, user_cert(pki, "bob", "-n", "bob"), "bob", "no line of its CA accepts")
    refused(relay, user_cert(pki, "lost", "-n", "alice", serial=666), "alice",
            "serial 666 is revoked")

    # A reload gives alice an expiry in the past: her open session ends, her next login
    # is refused; dave, untouched, keeps his.
    config = relay.dir / "node.toml"
    config.write_text(config.read_text().replace(
        'principals = ["alice", "al"]', 'principals = ["alice", "al"]\nexpiry = "20200101Z"'))
    reload_ends_session(relay, port, "alice")
    assert alice.proc.wait(timeout=10) is not None
    refused(relay, user_cert(pki, "alice2", "-n", "alice", "-V", "-5m:+1h"), "alice",
            "key expired at 2020-01-01")
    assert echo_once(dave_port) == b"ping"


def test_toml_errors_name_the_file_the_key_and_what_is_valid(tmp_path: Path) -> None:
    """``labrelay check`` on tables with a wrong ``expiry``, ``from`` or ``principals``."""
    key = make_key(tmp_path / "k", comment="k").public_blob()
    cases = {
        'expiry = "2027-01"': ("relay.user[0].expiry", "YYYYMMDD[HHMM[SS]][Z]"),
        'from = "10.0.0.0/33"': ("relay.user[0].from", "not a valid CIDR block"),
        'principals = ["alice"]': ("relay.user[0].principals", "only for certificates"),
        "expiry = 5": ("relay.user[0].expiry", "expected a string or a TOML date-time"),
    }
    for line, (keypath, problem) in cases.items():
        config = tmp_path / "node.toml"
        config.write_text(f'[relay]\n[[relay.user]]\nname = "alice"\nkeys = ["{key}"]\n{line}\n')
        out = labrelay("check", str(config))
        assert out.returncode == 2, out
        assert f"{config}: {keypath}" in out.stderr and problem in out.stderr, out.stderr


def test_an_agent_table_with_a_certificate_authority(
    tmp_path: Path,
    openssh: None,
    start_relay: Callable[..., RelayNode],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """A ``[[relay.agent]]`` table with ``cert_authorities`` and no keys: a stock ``ssh -R``
    with a certificate naming ``lab_pc`` and ``web:8080`` registers web:8080 (within the
    table's ``services``), not gpu-cluster:22 (granted by the table, not by the
    certificate)."""
    pki = make_cas(tmp_path / "pki", "ca", key_type=("-t", "ecdsa", "-b", "256"))
    ca = ca_blob(pki)
    relay = start_relay(relay_toml="\n".join([
        'penalty_exempt = ["127.0.0.1"]', "[[relay.agent]]", 'name = "lab_pc"',
        f'cert_authorities = ["{ca}"]', 'services = ["web:8080", "gpu-cluster:22"]',
        'from = "127.0.0.1"', ""]))
    stock_agent_registers_only_its_principals(pki, relay, start_ssh)


def test_a_krl_named_by_a_reload_is_watched_from_then_on(
    tmp_path: Path,
    openssh: None,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """A lab whose grants are all ``[[relay.*]]`` tables (no grant file) and that had no
    ``revoked_keys``.  alice loses her laptop: the admin makes a KRL (``ssh-keygen -k``),
    names it in ``[relay]`` and reloads: her session ends.  Then carol loses hers:
    ``ssh-keygen -k -u`` adds her key to that KRL and nothing else is done.  The file is
    watched (docs/relay.md, "Revoked keys"): her open session ends within 1 s and her next
    login is refused; dave's session carries on.  (It was read once by the reload and never
    again: the watcher had not started, as the relay started with nothing to watch.)"""
    lab_pc, alice, carol, dave = (make_key(tmp_path / n, comment=n)
                                  for n in ("lab_pc", "alice", "carol", "dave"))
    tables = "\n".join([
        "[[relay.agent]]", 'name = "lab_pc"', f'keys = ["{lab_pc.public_blob()}"]',
        'services = ["web:8080"]', "",
        *(user_table(k.path.name, f'keys = ["{k.public_blob()}"]') for k in (alice, carol, dave)),
    ])
    relay = start_relay(grant_files=False,
                        relay_toml='penalty_exempt = ["127.0.0.1"]\n' + tables)
    serve_web(start_agent, relay, lab_pc, targets)
    ports = {}
    for key in (alice, carol, dave):
        _proc, port = open_forward(start_ssh, relay, key.path, key.path.name,
                                   name=f"ssh-{key.path.name}")
        ports[key.path.name] = port
        assert echo_once(port) == b"ping"

    krl = tmp_path / "revoked.krl"
    keygen("-k", "-f", str(krl), "alice.pub", cwd=tmp_path)
    config = relay.dir / "node.toml"
    config.write_text(config.read_text().replace(
        'penalty_exempt = ["127.0.0.1"]\n',
        f'penalty_exempt = ["127.0.0.1"]\nrevoked_keys = "{krl}"\n'))
    reload_ends_session(relay, ports["alice"], "alice")

    mark = relay.mark()
    with connect(ports["carol"], timeout=30) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        t0 = time.time()
        keygen("-k", "-u", "-f", str(krl), "carol.pub", cwd=tmp_path)
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b"", "carol's session outlived her key"
        except ConnectionResetError:
            pass
        closed = time.time() - t0
    ended = relay.wait_for("relay_key_ended", since=mark, timeout=5, name="carol")
    print(f"carol's session ended {closed:.3f} s after ssh-keygen -k -u")
    assert closed <= 1.0, closed
    assert "the key is listed in the KRL" in ended["why"], ended
    refused(relay, carol.path, "carol", "the key is listed in the KRL")
    assert echo_once(ports["dave"]) == b"ping"


def test_a_krl_deleted_or_broken_while_the_relay_runs_keeps_its_keys_revoked(
    tmp_path: Path,
    openssh: None,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
) -> None:
    """docs/security.md: "A KRL that cannot be read on reload leaves the previous one in
    force (un-revoking on a typo would fail open)."  alice's key is in the KRL; the admin
    then moves the KRL away by mistake (or a bad copy overwrites it): alice stays refused,
    well past the three polls an emptied file needs to be taken, and dave's session
    carries on.  When the file comes back without her, she logs in again: the file is
    still watched."""
    lab_pc, alice, dave = (make_key(tmp_path / n, comment=n) for n in ("lab_pc", "alice", "dave"))
    krl = tmp_path / "revoked.krl"
    keygen("-k", "-f", str(krl), "alice.pub", cwd=tmp_path)
    tables = "\n".join([
        "[[relay.agent]]", 'name = "lab_pc"', f'keys = ["{lab_pc.public_blob()}"]',
        'services = ["web:8080"]', "",
        *(user_table(k.path.name, f'keys = ["{k.public_blob()}"]') for k in (alice, dave)),
    ])
    relay = start_relay(grant_files=False,
                        relay_toml=f'penalty_exempt = ["127.0.0.1"]\nrevoked_keys = "{krl}"\n'
                        + tables)
    serve_web(start_agent, relay, lab_pc, targets)
    _dave, port = open_forward(start_ssh, relay, dave.path, "dave", name="ssh-dave")
    assert echo_once(port) == b"ping"
    refused(relay, alice.path, "alice", "the key is listed in the KRL")

    for broken in ("deleted", "garbage"):
        mark = relay.mark()
        if broken == "deleted":
            krl.rename(tmp_path / "revoked.krl.moved")
        else:
            krl.write_bytes(b"SSHKRL\n\x00not a KRL")
        relay.wait_for("krl_invalid", since=mark, timeout=5)
        # Nothing to await for "still revoked": give the watcher well over the 0.5 s
        # (three polls) an emptied file needs before it would be taken.
        time.sleep(1.5)
        assert not relay.events("krl_loaded", since=mark), broken
        refused(relay, alice.path, "alice", "the key is listed in the KRL")
        assert echo_once(port) == b"ping"

    # The file back, without alice (an admin un-revoking on purpose): taken, she logs in.
    mark = relay.mark()
    krl.unlink(missing_ok=True)
    make_key(tmp_path / "stranger", comment="stranger")
    keygen("-k", "-f", str(krl), "stranger.pub", cwd=tmp_path)  # it names someone else now
    relay.wait_for("krl_loaded", since=mark, timeout=5)
    _alice, alice_port = open_forward(start_ssh, relay, alice.path, "alice", name="ssh-alice")
    assert echo_once(alice_port) == b"ping"
