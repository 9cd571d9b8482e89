"""Rotating the relay's host key with OpenSSH's ``UpdateHostKeys`` (docs/operations.md,
"Rotating the host key"): real ``ssh`` clients, real relay processes.

1. The relay runs with its current key and ``next_host_key``; a stock ``ssh -o
   UpdateHostKeys=yes`` that trusts the current key logs in, is told both keys, asks
   the relay to prove the next one, and writes it into its known_hosts.
2. The relay restarts with the next key as its key (on the same port): the same ssh
   with ``StrictHostKeyChecking=yes`` and ``BatchMode=yes`` logs in with no prompt, and
   drops the old key, which the relay no longer announces.  A client that did not
   learn the key is refused (the control: the swap did change the key).
3. A forged proof request (paramiko: a key the relay does not hold, bytes that are not
   a key list) gets ``REQUEST_FAILURE`` and the connection goes on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import LOOPBACK, KeyPair, RelayNode, find_program, make_key
from relay_fixtures import admin_port, relay_command, wait_until

pytestmark = pytest.mark.integration


def _relay(start_process: Callable[..., Any], directory: Path, users: str, port: int = 0,
           next_key: Path | None = None, extra: str = "") -> RelayNode:
    """A relay whose state directory is ``directory/state`` (kept across restarts)."""
    config = directory / "node.toml"
    if next_key is not None:
        extra += f'next_host_key = "{next_key}"\n'
    config.write_text(f'[admin]\nlisten = "127.0.0.1:0"\n\n[relay]\n'
                      f'listen = "127.0.0.1:{port}"\nstate_dir = "{directory / "state"}"\n'
                      f'users_file = "{users}"\n{extra}')
    proc = start_process(relay_command("--config", str(config)), name="relay")
    return RelayNode(proc, directory, admin_port(proc))


def _ssh(port: int, key: KeyPair, known_hosts: Path, update: str) -> list[str]:
    """A stock ``ssh -N`` to the relay as alice: only ``known_hosts`` is trusted, no
    prompt is possible (BatchMode), host keys are learned per ``update``."""
    return [find_program("ssh") or "ssh", "-F", "/dev/null", "-v", "-N", "-p", str(port),
            "-i", str(key.path), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UpdateHostKeys={update}",
            "-o", "ConnectTimeout=10", f"alice@{LOOPBACK}"]


def _keys_for(known_hosts: Path, port: int) -> set[str]:
    """The ``type base64`` keys known_hosts holds for ``[127.0.0.1]:port``."""
    found = set()
    for line in known_hosts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == f"[{LOOPBACK}]:{port}":
            found.add(" ".join(fields[1:3]))
    return found


def test_a_client_learns_the_next_key_and_the_swap_needs_no_prompt(
        openssh: None, tmp_path: Path, start_process: Callable[..., Any],
        start_ssh: Callable[..., Any], client_key: KeyPair) -> None:
    directory = tmp_path / "relay"
    directory.mkdir()
    users = directory / "users"
    users.write_text(f'permitopen="gpu-cluster:22" {client_key.public_blob()} alice\n')
    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key", "labrelay-relay-host-key")
    relay = _relay(start_process, directory, str(users), next_key=nxt.path)
    assert relay.proc.wait_for("relay_listening", since=0)["next_host_keys"] == nxt.fingerprint()
    port = relay.port
    current = relay.host_key_blob
    assert current != nxt.public_blob()

    # A user who trusts the current key, as `labrelay ssh-config` tells her to.
    learned = tmp_path / "alice_known_hosts"
    learned.write_text(f"[{LOOPBACK}]:{port} {current}\n")
    stale = tmp_path / "bob_known_hosts"  # the control: never learns
    stale.write_text(learned.read_text())

    ssh = start_ssh(_ssh(port, client_key, learned, "yes"), name="ssh-learns")
    ssh.wait_stderr(r"Learned new hostkey: ED25519 " + nxt.fingerprint().replace("+", r"\+"))
    wait_until(lambda: _keys_for(learned, port) == {current, nxt.public_blob()},
               "ssh to write the next key into its known_hosts")
    ssh.stop()
    stale_ssh = start_ssh(_ssh(port, client_key, stale, "no"), name="ssh-stale-1")
    stale_ssh.wait_stderr(r"Authenticated to")
    stale_ssh.stop()
    assert _keys_for(stale, port) == {current}

    # The swap: the next pair becomes the relay's key, next_host_key goes; same port.
    relay.proc.stop()
    state_key = directory / "state" / "ssh_host_ed25519_key"
    state_key.write_bytes(nxt.path.read_bytes())
    state_key.chmod(0o600)
    state_key.with_name(state_key.name + ".pub").write_text(nxt.public + "\n")
    swapped = _relay(start_process, directory, str(users), port=port)
    assert swapped.host_key_blob == nxt.public_blob()

    ssh = start_ssh(_ssh(port, client_key, learned, "yes"), name="ssh-after-swap")
    ssh.wait_stderr(r"Authenticated to")
    # The old key is no longer announced: the client drops it by itself.
    ssh.wait_stderr(r"Deprecating obsolete hostkey")
    wait_until(lambda: _keys_for(learned, port) == {nxt.public_blob()},
               "ssh to drop the old key from its known_hosts")
    ssh.stop()
    assert "IDENTIFICATION HAS CHANGED" not in ssh.stderr.text()

    refused = start_ssh(_ssh(port, client_key, stale, "no"), name="ssh-stale-2")
    refused.wait_stderr(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed")


def _prove(transport: Any, payload: bytes) -> Any:
    """paramiko's ``Transport.global_request`` with a raw payload (its own adds each
    item as a ``string``, which cannot make a malformed one): the reply's Message, or
    None for REQUEST_FAILURE."""
    import threading

    from paramiko.common import cMSG_GLOBAL_REQUEST
    from paramiko.message import Message

    transport.completion_event = threading.Event()
    m = Message()
    m.add_byte(cMSG_GLOBAL_REQUEST)
    m.add_string("hostkeys-prove-00@openssh.com")
    m.add_boolean(True)
    m.add_bytes(payload)
    transport._send_user_message(m)
    if not transport.completion_event.wait(20):
        raise AssertionError("no reply to hostkeys-prove within 20 s")
    return transport.global_response


def test_a_forged_proof_request_fails_and_the_connection_goes_on(
        openssh: None, tmp_path: Path, start_process: Callable[..., Any],
        client_key: KeyPair) -> None:
    paramiko = pytest.importorskip("paramiko")

    directory = tmp_path / "relay"
    directory.mkdir()
    users = directory / "users"
    users.write_text(f'permitopen="gpu-cluster:22" {client_key.public_blob()} alice\n')
    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key")
    relay = _relay(start_process, directory, str(users), next_key=nxt.path)
    other = make_key(tmp_path / "other" / "key")

    def blob(key: KeyPair) -> bytes:
        import base64
        return base64.b64decode(key.public.split()[1])

    def strings(*blobs: bytes) -> bytes:
        return b"".join(struct.pack(">L", len(b)) + b for b in blobs)

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(LOOPBACK, port=relay.port, username="alice", key_filename=str(client_key.path),
                   look_for_keys=False, allow_agent=False, timeout=20)
    try:
        transport = client.get_transport()
        assert transport is not None
        forged = [
            strings(blob(other)),                              # not the relay's key
            strings(blob(nxt), blob(other)),                   # one of them is not
            b"\x00\x00\x10\x00" + b"garbage",                  # not a string at all
            strings(blob(nxt)) + b"\x01",                      # bytes after the last key
            strings(*[blob(nxt)] * 17),                        # more than the bound
        ]
        for payload in forged:
            assert _prove(transport, payload) is None, payload  # REQUEST_FAILURE
            assert transport.is_active()
        reply = _prove(transport, strings(blob(nxt)))
        assert reply is not None  # the real key is still proven on the same connection
        sig = reply.get_binary()
        from twisted.conch.ssh import common, keys

        data = (common.NS(b"hostkeys-prove-00@openssh.com")
                + common.NS(transport.session_id) + common.NS(blob(nxt)))
        assert keys.Key.fromString(blob(nxt)).verify(sig, data)
    finally:
        client.close()
    assert relay.events("relay_request_refused")


def test_the_labrelay_agent_learns_the_next_key_and_reconnects_after_the_swap(
        openssh: None, tmp_path: Path, start_process: Callable[..., Any],
        start_agent: Callable[..., Any], client_key: KeyPair) -> None:
    """The agent, as ssh does: the next key proven and appended beside the current
    line; after the swap its link comes back with no ``hostkey_refused``."""
    directory = tmp_path / "relay"
    directory.mkdir()
    users = directory / "users"
    users.write_text("")
    agent_key = make_key(tmp_path / "lab_pc", "lab_pc")
    (directory / "agents").write_text(
        f'permitlisten="svc:22" {agent_key.public_blob()} lab_pc\n')
    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key", "labrelay-relay-host-key")
    config_extra = 'agents_file = "agents"\n'
    relay = _relay(start_process, directory, str(users), next_key=nxt.path,
                   extra=config_extra)
    port = relay.port
    known = tmp_path / "agent_known_hosts"
    known.write_text(f"[{LOOPBACK}]:{port} {relay.host_key_blob}\n")
    agent = start_agent(
        "-p", str(port), "-i", str(agent_key.path), "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=yes", "--backoff-initial", "0.2", "--backoff-max", "1",
        "-R", "svc:22:127.0.0.1:9", f"lab_pc@{LOOPBACK}", name="agent")
    learned = agent.wait_for("link_hostkey_learned", timeout=20)
    assert learned["fingerprint"] == nxt.fingerprint()
    lines = known.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"[{LOOPBACK}]:{port} ")

    relay.proc.stop()
    state_key = directory / "state" / "ssh_host_ed25519_key"
    state_key.write_bytes(nxt.path.read_bytes())
    state_key.chmod(0o600)
    state_key.with_name(state_key.name + ".pub").write_text(nxt.public + "\n")
    mark = agent.mark()
    _relay(start_process, directory, str(users), port=port, extra=config_extra)
    agent.wait_for("link_connected", timeout=30, since=mark)
    assert not agent.events("hostkey_refused", since=mark)
    assert len(known.read_text().splitlines()) == 2  # nothing more learned, nothing removed


def test_a_reload_announces_the_next_key_without_a_restart(
        openssh: None, tmp_path: Path, start_process: Callable[..., Any],
        start_ssh: Callable[..., Any], client_key: KeyPair) -> None:
    """Step 2 of the runbook without a restart: SIGHUP with ``next_host_key`` added; the
    same relay process tells the next login, which learns the key."""
    import os
    import signal

    directory = tmp_path / "relay"
    directory.mkdir()
    users = directory / "users"
    users.write_text(f'permitopen="gpu-cluster:22" {client_key.public_blob()} alice\n')
    relay = _relay(start_process, directory, str(users))
    port = relay.port
    known = tmp_path / "alice_known_hosts"
    known.write_text(f"[{LOOPBACK}]:{port} {relay.host_key_blob}\n")
    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key", "labrelay-relay-host-key")
    config = directory / "node.toml"
    good = config.read_text()
    # A next key that is not there refuses the reload, as it refuses a start.
    config.write_text(good + f'next_host_key = "{tmp_path / "missing"}"\n')
    mark = relay.mark()
    os.kill(relay.pid, signal.SIGHUP)
    failed = relay.wait_for("reload_failed", since=mark)
    assert "relay.next_host_key" in str(failed["errors"]), failed
    config.write_text(good + f'next_host_key = "{nxt.path}"\n')
    mark = relay.mark()
    os.kill(relay.pid, signal.SIGHUP)
    relay.wait_for("reload_change", since=mark,
                   change=lambda c: nxt.fingerprint() in c and "announced" in c)
    ssh = start_ssh(_ssh(port, client_key, known, "yes"), name="ssh-after-reload")
    ssh.wait_stderr(r"Learned new hostkey: ED25519 " + nxt.fingerprint().replace("+", r"\+"))
    wait_until(lambda: _keys_for(known, port) == {relay.host_key_blob, nxt.public_blob()},
               "ssh to write the next key into its known_hosts")
    assert relay.pid == relay.proc.pid and relay.proc.returncode is None  # no restart


def _ssh_config_known_hosts(config: Path, port: int, identity: Path) -> tuple[str, list[str]]:
    """``labrelay ssh-config`` for alice on the relay's config, as an operator runs it:
    its snippet, and the known_hosts lines it tells the user to add."""
    import os
    import re
    import subprocess
    import sys

    from relay_fixtures import child_env

    out = subprocess.run(
        [sys.executable, "-m", "relay", "ssh-config", "--config", str(config), "--user",
         "alice", "--host", f"{LOOPBACK}:{port}", "--identity", str(identity)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, **child_env()})
    assert out.returncode == 0, out.stderr
    return out.stdout, re.findall(r"^#   echo '([^']*)' >> ~/\.ssh/known_hosts$",
                                  out.stdout, re.M)


def test_ssh_config_during_a_rotation_makes_the_swap_need_no_prompt(
        openssh: None, tmp_path: Path, start_process: Callable[..., Any],
        start_ssh: Callable[..., Any], client_key: KeyPair) -> None:
    """A user set up with ``labrelay ssh-config`` while ``next_host_key`` is set gets the
    next key's known_hosts line too: after the swap (a restart on the next key) a stock
    ssh with StrictHostKeyChecking=yes, BatchMode and ``UpdateHostKeys=no`` (so nothing
    is learned: only the printed lines count) logs in through the printed ``Host``
    entry with no prompt.  The control, a user who added only the first line (what
    ssh-config printed before), is refused after the swap."""
    directory = tmp_path / "relay"
    directory.mkdir()
    users = directory / "users"
    users.write_text(f'permitopen="gpu-cluster:22" {client_key.public_blob()} alice\n')
    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key", "labrelay-relay-host-key")
    relay = _relay(start_process, directory, str(users), next_key=nxt.path)
    port = relay.port
    snippet, lines = _ssh_config_known_hosts(directory / "node.toml", port, client_key.path)
    name = f"[{LOOPBACK}]:{port}"
    assert lines == [f"{name} {relay.host_key_blob}", f"{name} {nxt.public_blob()}"], snippet
    assert "rotation is under way" in snippet
    known = tmp_path / "alice_known_hosts"
    known.write_text("".join(line + "\n" for line in lines))
    first_only = tmp_path / "old_setup_known_hosts"
    first_only.write_text(lines[0] + "\n")
    cfg = tmp_path / "alice_ssh_config"
    cfg.write_text(snippet)

    def ssh(known_hosts: Path) -> list[str]:
        return [find_program("ssh") or "ssh", "-F", str(cfg), "-v", "-N",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "UpdateHostKeys=no", "-o", "ConnectTimeout=10", "labrelay"]

    before = start_ssh(ssh(known), name="ssh-before-swap")
    before.wait_stderr(r"Authenticated to")
    before.stop()

    relay.proc.stop()
    state_key = directory / "state" / "ssh_host_ed25519_key"
    state_key.write_bytes(nxt.path.read_bytes())
    state_key.chmod(0o600)
    state_key.with_name(state_key.name + ".pub").write_text(nxt.public + "\n")
    swapped = _relay(start_process, directory, str(users), port=port)
    assert swapped.host_key_blob == nxt.public_blob()

    after = start_ssh(ssh(known), name="ssh-after-swap")
    after.wait_stderr(r"Authenticated to")
    after.stop()
    assert "IDENTIFICATION HAS CHANGED" not in after.stderr.text()
    assert known.read_text() == "".join(line + "\n" for line in lines)  # nothing learned

    refused = start_ssh(ssh(first_only), name="ssh-first-line-only")
    refused.wait_stderr(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed")

    # After the swap, next_host_key gone: ssh-config prints the one (new) key.
    _, lines = _ssh_config_known_hosts(directory / "node.toml", port, client_key.path)
    assert lines == [f"{name} {nxt.public_blob()}"]


def test_a_reload_tells_a_connected_agent_which_needs_no_reconnect_before_the_swap(
        openssh: None, tmp_path: Path, start_process: Callable[..., Any],
        start_agent: Callable[..., Any], start_ssh: Callable[..., Any],
        client_key: KeyPair) -> None:
    """Step 2 with a labrelay agent whose link was up before the reload: the relay
    tells it again (``hostkeys-again@labrelay``) and it learns the next key on the same
    connection (no second ``link_connected``); after the swap (a restart on the next
    key) its link comes back with strict checking and no ``hostkey_refused``.  A stock
    ``ssh -R`` agent connected at the reload is not told again (OpenSSH ends a
    connection told ``hostkeys-00`` twice) and stays connected."""
    import os
    import re
    import signal

    directory = tmp_path / "relay"
    directory.mkdir()
    users = directory / "users"
    users.write_text("")
    agent_key = make_key(tmp_path / "lab_pc", "lab_pc")
    stock_key = make_key(tmp_path / "lab_stock", "lab_stock")
    (directory / "agents").write_text(
        f'permitlisten="svc:22" {agent_key.public_blob()} lab_pc\n'
        f'permitlisten="svc2:22" {stock_key.public_blob()} lab_stock\n')
    config_extra = 'agents_file = "agents"\nkeepalive_interval = 1\n'
    relay = _relay(start_process, directory, str(users), extra=config_extra)
    port = relay.port
    known = tmp_path / "agent_known_hosts"
    known.write_text(f"[{LOOPBACK}]:{port} {relay.host_key_blob}\n")
    stock_known = tmp_path / "stock_known_hosts"
    stock_known.write_text(known.read_text())
    stock = start_ssh(
        [find_program("ssh") or "ssh", "-F", "/dev/null", "-v", "-N", "-p", str(port),
         "-i", str(stock_key.path), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={stock_known}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=yes",
         "-o", "ExitOnForwardFailure=yes", "-R", "svc2:22:127.0.0.1:9",
         f"lab_stock@{LOOPBACK}"], name="stock-ssh-R")
    stock.wait_stderr(r"remote forward success")
    agent = start_agent(
        "-p", str(port), "-i", str(agent_key.path), "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=yes", "--backoff-initial", "0.2", "--backoff-max", "1",
        "-R", "svc:22:127.0.0.1:9", f"lab_pc@{LOOPBACK}", name="agent")
    agent.wait_for("link_connected", timeout=20)
    connected = agent.mark()

    nxt = make_key(tmp_path / "next" / "ssh_host_ed25519_key", "labrelay-relay-host-key")
    config = directory / "node.toml"
    config.write_text(config.read_text() + f'next_host_key = "{nxt.path}"\n')
    mark = relay.mark()
    stock_mark = stock.stderr.mark()
    os.kill(relay.pid, signal.SIGHUP)
    change = relay.wait_for("reload_change", since=mark,
                            change=lambda c: nxt.fingerprint() in c)
    assert "told again to 1 connected labrelay agent" in change["change"], change
    learned = agent.wait_for("link_hostkey_learned", timeout=20, since=connected)
    assert learned["fingerprint"] == nxt.fingerprint()
    assert not agent.events("link_connected", since=connected)  # the same link learned it
    assert not agent.events("link_lost", since=connected)
    assert len(known.read_text().splitlines()) == 2
    # The stock agent was not counted nor told: a keepalive the relay sends it after
    # the reload (in order on its connection) is answered, and it heard one hostkeys-00.
    stock.stderr.wait_for(r"rtype keepalive@openssh\.com", timeout=20,
                          since=stock_mark, what="stock ssh -R")
    assert stock.proc.poll() is None, stock.stderr.text()
    requests = re.findall(r"client_input_global_request: rtype (\S+)", stock.stderr.text())
    assert requests.count("hostkeys-00@openssh.com") == 1, requests
    assert not [r for r in requests if r.endswith("@labrelay")], requests
    assert stock_known.read_text() == known.read_text().splitlines()[0] + "\n"

    relay.proc.stop()
    state_key = directory / "state" / "ssh_host_ed25519_key"
    state_key.write_bytes(nxt.path.read_bytes())
    state_key.chmod(0o600)
    state_key.with_name(state_key.name + ".pub").write_text(nxt.public + "\n")
    mark = agent.mark()
    swapped = _relay(start_process, directory, str(users), port=port, extra=config_extra)
    assert swapped.host_key_blob == nxt.public_blob()
    agent.wait_for("link_connected", timeout=30, since=mark)
    assert not agent.events("hostkey_refused", since=mark)
