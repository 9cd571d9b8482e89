"""AES-GCM (``relay/ssh/aead.py``) against real OpenSSH, both directions.

* Conch client side: the labrelay agent against a stock ``sshd`` that allows only
  ``aes128-gcm@openssh.com`` (or ``aes256-gcm``): 64 MiB each way through a reverse
  forward, byte-exact; with ``RekeyLimit 1M`` on sshd, 16 MiB across many rekeys.
* Conch server side: a stock ``ssh -c aes128-gcm@openssh.com -L`` through the labrelay
  relay to a service registered by the labrelay agent (whose own link to the relay is
  GCM on both ends): bytes both ways; ``ssh -v`` and the relay's log name the cipher;
  with ``ssh -o RekeyLimit=1M``, 16 MiB across many rekeys started by ssh.
* Rekeys started by labrelay itself (its byte limit lowered to 1 MiB): the agent with
  stock sshd, the relay with stock ssh.
* AEAD only: an sshd or an ssh allowing nothing but AES-CTR is refused, with a reason.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import relay_fixtures
from conftest import Targets
from harness import (
    AUDITED_LABRELAY,
    AgentProcess,
    DataStream,
    KeyPair,
    MiB,
    ModeServer,
    RelayNode,
    Sshd,
    SshProcess,
    make_key,
    mode_download,
    mode_echo,
    mode_upload,
    ssh_argv,
)
from relay_fixtures import stock_local_forward

pytestmark = pytest.mark.integration

GCM128, GCM256 = "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"

# labrelay started with its own rekey threshold at 1 MiB (1 GiB by default), so that
# labrelay, not its peer, starts the key exchanges.
REKEY_1M = "import relay.ssh.aead as a; a.AEADTransportMixin.rekeyAfterBytes = 1 << 20\n"
LABRELAY = "import sys; sys.argv[0] = 'labrelay'; from relay.cli.main import main; sys.exit(main())"


@pytest.fixture
def cipher_sshd(
    openssh: None, client_key: KeyPair, tmp_path: Path, diagnostics: Callable[[Any], Any]
) -> Iterator[Callable[..., Sshd]]:
    """``cipher_sshd(ciphers, rekey=None)``: a stock sshd allowing only ``ciphers``."""
    started: list[Sshd] = []

    def start(ciphers: str, rekey: str | None = None) -> Sshd:
        extra = f"Ciphers {ciphers}\n" + (f"RekeyLimit {rekey}\n" if rekey else "")
        name = f"sshd-{len(started)}"
        sshd = Sshd(tmp_path / name, name, authorized=[client_key.public], extra_config=extra)
        started.append(sshd)
        diagnostics(sshd)
        return sshd.start()

    yield start
    for sshd in reversed(started):
        sshd.close()


def run_agent(
    start_agent: Callable[..., AgentProcess],
    client_key: KeyPair,
    known_hosts: Path,
    port: int,
    *args: str,
    user: str = "root",
    name: str = "agent",
) -> AgentProcess:
    return start_agent(
        "-p", str(port),
        "-i", str(client_key.path),
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
        "--backoff-initial", "0.2",
        "--backoff-max", "1",
        *args,
        f"{user}@127.0.0.1",
        name=name,
    )  # fmt: skip


@pytest.fixture
def agent_to_sshd(
    cipher_sshd: Callable[..., Sshd],
    client_key: KeyPair,
    known_hosts: Callable[..., Path],
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> Callable[..., tuple[Sshd, ModeServer, AgentProcess]]:
    """``agent_to_sshd(ciphers, rekey=None)``: a stock sshd allowing only ``ciphers``
    (:func:`cipher_sshd`), a mode target, and the labrelay agent logging in to that sshd
    with a reverse forward (``-R 0:``) to the target; ``(sshd, target, agent)``."""

    def start(ciphers: str, rekey: str | None = None) -> tuple[Sshd, ModeServer, AgentProcess]:
        sshd = cipher_sshd(ciphers, rekey=rekey)
        target = targets.mode()
        agent = run_agent(
            start_agent, client_key, known_hosts(sshd.known_hosts_line()), sshd.port,
            "-R", f"127.0.0.1:0:127.0.0.1:{target.port}",
        )  # fmt: skip
        return sshd, target, agent

    return start


def both_ways(port: int, target: Any, seed: int, size: int) -> None:
    """``size`` bytes up to the mode target and ``size`` back (seeds ``seed`` and
    ``seed + 1``), each checked by length and sha256."""
    up = DataStream(seed, size)
    mode_upload(port, up)
    got = target.result()
    assert (got.nbytes, got.sha256) == (up.size, up.sha256)
    down = DataStream(seed + 1, size)
    got = mode_download(port, down)
    assert (got.nbytes, got.sha256) == (down.size, down.sha256)


def keys_events(proc: AgentProcess | RelayNode, **match: Any) -> list[dict[str, Any]]:
    return proc.events("ssh_keys", **match)


# -- the agent (Conch client side) against stock sshd ------------------------------


@pytest.mark.parametrize("cipher", [GCM128, GCM256])
def test_agent_against_gcm_only_sshd_moves_64_mib_each_way(
    cipher: str,
    agent_to_sshd: Callable[..., tuple[Sshd, ModeServer, AgentProcess]],
) -> None:
    _sshd, target, agent = agent_to_sshd(cipher)
    agent.wait_for("link_connected", timeout=20)
    port = agent.wait_for("forward_ready", timeout=20, kind="remote")["port"]
    keys = agent.wait_for("ssh_keys", timeout=5, since=0)
    assert (keys["cipher_out"], keys["cipher_in"]) == (cipher, cipher), keys
    assert keys["mac_out"] == keys["mac_in"] == "<implicit>"

    both_ways(port, target, seed=71, size=64 * MiB)
    payload = DataStream(73, 1 * MiB).bytes()
    assert mode_echo(port, payload) == payload
    agent.assert_no_event("link_lost")
    assert agent.events(level="warn") == agent.events(level="error") == []


def test_agent_survives_sshd_rekeying_every_mib(
    agent_to_sshd: Callable[..., tuple[Sshd, ModeServer, AgentProcess]],
) -> None:
    sshd, target, agent = agent_to_sshd(GCM128, rekey="1M")
    port = agent.wait_for("forward_ready", timeout=20, kind="remote")["port"]
    both_ways(port, target, seed=74, size=16 * MiB)
    rekeys = keys_events(agent)
    print(f"agent saw {len(rekeys)} key exchanges with sshd RekeyLimit 1M")
    # sshd rekeys after 1 MiB each way: dozens of key exchanges, all GCM
    assert len(rekeys) >= 16, [e["count"] for e in rekeys]
    assert {(e["cipher_out"], e["cipher_in"]) for e in rekeys} == {(GCM128, GCM128)}
    agent.assert_no_event("link_lost")
    # A rekey is not a new connection: no second ssh-userauth request (sshd would log
    # "kex_protocol_error: type 5" and answer UNIMPLEMENTED), no warning at all.
    assert agent.events(level="warn") == agent.events(level="error") == []
    assert "kex_protocol_error" not in sshd.log_text()


def test_agent_starts_rekeys_itself_and_sshd_follows(
    cipher_sshd: Callable[..., Sshd],
    client_key: KeyPair,
    known_hosts: Callable[..., Path],
    start_process: Callable[..., AgentProcess],
    targets: Targets,
) -> None:
    """Conch-initiated key exchanges (the agent's own byte limit) with stock sshd."""
    sshd = cipher_sshd(GCM128)
    target = targets.mode()
    kh = known_hosts(sshd.known_hosts_line())
    agent = start_process([
        sys.executable, "-c", REKEY_1M + LABRELAY, "agent", "--log-format", "json",
        "-p", str(sshd.port), "-i", str(client_key.path),
        "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
        "-R", f"127.0.0.1:0:127.0.0.1:{target.port}", "root@127.0.0.1",
    ])  # fmt: skip
    port = agent.wait_for("forward_ready", timeout=20, kind="remote")["port"]
    both_ways(port, target, seed=77, size=16 * MiB)
    rekeys = keys_events(agent)
    print(f"agent started {len(rekeys) - 1} key exchanges with stock sshd")
    assert len(rekeys) >= 16, [e["count"] for e in rekeys]
    assert agent.events(level="warn") == agent.events(level="error") == []
    assert "kex_protocol_error" not in sshd.log_text()


def test_agent_against_chacha_only_sshd_across_rekeys(
    agent_to_sshd: Callable[..., tuple[Sshd, ModeServer, AgentProcess]],
) -> None:
    """chacha20-poly1305 on the Conch client side with stock sshd (strict KEX on both
    ends): 16 MiB each way across sshd's rekeys every MiB; the sequence numbers, which
    are chacha's nonce, restart at each NEWKEYS on both ends alike."""
    sshd, target, agent = agent_to_sshd(CHACHA, rekey="1M")
    port = agent.wait_for("forward_ready", timeout=20, kind="remote")["port"]
    keys = agent.wait_for("ssh_keys", timeout=5, since=0)
    assert (keys["cipher_out"], keys["cipher_in"]) == (CHACHA, CHACHA), keys
    assert keys["strict_kex"] is True, keys
    both_ways(port, target, seed=91, size=16 * MiB)
    rekeys = keys_events(agent)
    print(f"agent on chacha20-poly1305 with sshd: {len(rekeys)} key exchanges")
    assert len(rekeys) >= 16 and all(e["strict_kex"] for e in rekeys)
    agent.assert_no_event("link_lost")
    assert agent.events(level="warn") == agent.events(level="error") == []
    assert "kex_protocol_error" not in sshd.log_text()


def test_agent_refuses_an_sshd_without_aead_ciphers(
    agent_to_sshd: Callable[..., tuple[Sshd, ModeServer, AgentProcess]],
) -> None:
    """AEAD only (relay.ssh.policy): an sshd that allows nothing but AES-CTR is refused,
    and the agent says why."""
    _sshd, _target, agent = agent_to_sshd("aes128-ctr,aes256-ctr")
    failed = agent.wait_for("link_failed", timeout=20)
    print(f"agent: {failed['reason']}")
    assert "only AEAD ciphers are allowed" in failed["reason"], failed
    assert "aes128-gcm@openssh.com" in failed["reason"], failed
    agent.assert_no_event("link_connected")


# -- stock ssh (Conch server side) against the labrelay relay ----------------------


@pytest.fixture
def relay_with_agent(
    openssh: None,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> tuple[RelayNode, KeyPair, Any]:
    """A relay, the labrelay agent registering ``bulk:9000`` (a ModeServer), and a user
    key granted it.  Returns (relay, user key, target)."""
    return _relay_with_agent(tmp_path, start_relay, start_agent, targets)


@pytest.fixture
def rekeying_relay_with_agent(
    openssh: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> tuple[RelayNode, KeyPair, Any]:
    """The same with a relay that rekeys every MiB by itself."""
    monkeypatch.setattr(
        relay_fixtures, "relay_command",
        lambda *args: [sys.executable, "-c", REKEY_1M + AUDITED_LABRELAY, "relay",
                       "--log-format", "json", *args],
    )  # fmt: skip
    return _relay_with_agent(tmp_path, start_relay, start_agent, targets)


def _relay_with_agent(
    tmp_path: Path,
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> tuple[RelayNode, KeyPair, Any]:
    agent_key = make_key(tmp_path / "agent_key", comment="lab_pc")
    user_key = make_key(tmp_path / "user_key", comment="alice")
    relay = start_relay(
        agents=[f'permitlisten="bulk:9000" {agent_key.public_blob()} lab_pc'],
        users=[f'permitopen="bulk:9000" {user_key.public_blob()} alice'],
    )
    target = targets.mode()
    agent = run_agent(
        start_agent, agent_key, relay.known_hosts, relay.port,
        "-R", f"bulk:9000:127.0.0.1:{target.port}",
        user="lab_pc",
    )  # fmt: skip
    agent.wait_for("forward_ready", timeout=20, kind="remote", bind="bulk")
    # labrelay on both ends of the link: GCM, the first preference of each
    keys = agent.wait_for("ssh_keys", timeout=5, since=0)
    assert (keys["cipher_out"], keys["cipher_in"]) == (GCM128, GCM128), keys
    return relay, user_key, target


def user_forward(
    start_ssh: Callable[..., SshProcess], relay: RelayNode, key: KeyPair, *options: str
) -> tuple[SshProcess, int]:
    """``ssh -v -N -L PORT:bulk:9000 alice@relay OPTIONS``; (process, PORT) once it listens."""
    return stock_local_forward(
        start_ssh,
        lambda port: ssh_argv(relay.port, key.path, relay.known_hosts, "-v", "-N",
                              "-o", "ExitOnForwardFailure=yes",
                              "-L", f"127.0.0.1:{port}:bulk:9000", *options, user="alice"),
        name="ssh-L",
    )  # fmt: skip


@pytest.mark.parametrize("cipher", [GCM128, GCM256])
def test_stock_ssh_with_gcm_through_the_relay(
    cipher: str,
    relay_with_agent: tuple[RelayNode, KeyPair, Any],
    start_ssh: Callable[..., SshProcess],
) -> None:
    relay, user_key, target = relay_with_agent
    mark = relay.mark()
    ssh, port = user_forward(start_ssh, relay, user_key, "-c", cipher)
    for direction in ("client->server", "server->client"):
        ssh.wait_stderr(rf"kex: {direction} cipher: {re.escape(cipher)} MAC: <implicit>")
    # the relay logs its keys as its NEWKEYS is processed, which may be just after
    # the client printed its own: wait for it, do not read once
    relay.wait_for("ssh_keys", timeout=10, since=mark, cipher_in=cipher, cipher_out=cipher)

    both_ways(port, target, seed=81, size=32 * MiB)
    payload = DataStream(83, 4 * MiB).bytes()
    assert mode_echo(port, payload) == payload
    assert ssh.returncode is None
    assert relay.events(level="critical") == relay.events(level="error") == []


def test_stock_ssh_rekeying_every_mib_through_the_relay(
    relay_with_agent: tuple[RelayNode, KeyPair, Any],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """10 MiB each way: ~20 re-keys, a few past the relay's pace of a connection's
    re-keys (16 at once, then one a second: relay.ssh.kex), so the test waits ~5 s for
    them, not the ~16 s that 16 MiB each way took (test_user_rekey_pace holds stock ssh's
    re-keys at an empty pace on purpose)."""
    relay, user_key, target = relay_with_agent
    mark = relay.mark()
    ssh, port = user_forward(start_ssh, relay, user_key, "-c", GCM128, "-o", "RekeyLimit=1M")
    both_ways(port, target, seed=84, size=10 * MiB)
    newkeys = len(re.findall(r"SSH2_MSG_NEWKEYS received", ssh.stderr_text()))
    print(f"ssh -o RekeyLimit=1M through the relay: {newkeys} key exchanges")
    assert newkeys >= 16, ssh.stderr_text()[-3000:]
    # the relay's side of the user's connection counted the same key exchanges (it logs
    # one when the client's NEWKEYS arrives, which may be after ssh counted the relay's)
    relay.wait_for("ssh_keys", since=mark, advance=False, count=lambda n: n >= 16)
    assert ssh.returncode is None


def test_relay_starts_rekeys_itself_and_stock_ssh_follows(
    rekeying_relay_with_agent: tuple[RelayNode, KeyPair, Any],
    start_ssh: Callable[..., SshProcess],
) -> None:
    relay, user_key, target = rekeying_relay_with_agent
    mark = relay.mark()
    ssh, port = user_forward(start_ssh, relay, user_key, "-c", GCM128)
    both_ways(port, target, seed=87, size=16 * MiB)
    newkeys = len(re.findall(r"SSH2_MSG_NEWKEYS received", ssh.stderr_text()))
    print(f"relay started {newkeys - 1} key exchanges with stock ssh")
    assert newkeys >= 16, ssh.stderr_text()[-3000:]
    relay.wait_for("ssh_keys", since=mark, advance=False, count=lambda n: n >= 16)
    assert ssh.returncode is None
    assert relay.events(level="warn") == relay.events(level="error") == []


def test_stock_ssh_with_ctr_only_is_refused_by_the_relay(
    relay_with_agent: tuple[RelayNode, KeyPair, Any],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """``ssh -c aes128-ctr``: the relay offers AEAD ciphers only; ssh is told so."""
    relay, user_key, _target = relay_with_agent
    mark = relay.mark()
    proc = start_ssh(
        ssh_argv(relay.port, user_key.path, relay.known_hosts, "-v", "-N",
                 "-c", "aes128-ctr", "-m", "hmac-sha2-256", user="alice"),
        name="ssh-ctr",
    )  # fmt: skip
    assert proc.wait_exit(20) == 255
    print(proc.stderr_text()[-600:])
    refused = relay.wait_for("ssh_kex_refused", timeout=10, since=mark)
    assert "only AEAD ciphers are allowed" in refused["why"], refused
    assert re.search(r"no matching cipher found|only AEAD ciphers", proc.stderr_text())
