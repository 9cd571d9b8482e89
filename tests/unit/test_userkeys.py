"""relay.user's key finding, passphrase asking and ``ssh -G`` reading, without a relay:
ssh's order and IdentitiesOnly, a locked key's public half read without its
passphrase, the passphrase asked only on demand with three tries, SSH_ASKPASS's rules,
and ``ssh -G``'s output (from the real ssh, with ``-F``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.ssh.identity import IdentityError
from relay.user import askpass, sshresolve
from relay.user import keys as userkeys

PASSPHRASE = "open sesame"


def _keygen(path: Path, passphrase: str = "") -> Path:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        if os.environ.get("CI"):
            pytest.fail("ssh-keygen is needed")
        pytest.skip("no ssh-keygen")
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return path


def test_a_locked_key_is_offered_by_its_public_half_and_asked_for_once(tmp_path: Path) -> None:
    path = _keygen(tmp_path / "id_ed25519", PASSPHRASE)
    Path(f"{path}.pub").unlink()  # the public half must come from the key file itself
    asked: list[str] = []
    answers = iter(["wrong", PASSPHRASE])
    said: list[str] = []

    def ask(prompt: str) -> str | None:
        asked.append(prompt)
        return next(answers)

    [(found, locked)] = userkeys.load_files([path], [path], ask, said.append)
    assert found == path and isinstance(locked, userkeys.LockedKey)
    assert asked == []  # nothing asked until a server accepts the key
    assert locked.public().toString("openssh").decode().split()[:2] == \
        _public(path).split()[:2]
    signature = locked.sign(b"data").result  # type: ignore[attr-defined]
    assert locked.public().verify(signature, b"data")
    assert len(asked) == 2 and said == [f"wrong passphrase for {path}, try again"]
    locked.sign(b"more")
    assert len(asked) == 2  # unlocked once


def test_no_answer_gives_up_on_the_key(tmp_path: Path) -> None:
    path = _keygen(tmp_path / "k", PASSPHRASE)
    [(_, locked)] = userkeys.load_files([path], [], lambda p: None, lambda s: None)
    assert isinstance(locked, userkeys.LockedKey)
    with pytest.raises(IdentityError, match="not unlocked"):
        locked.unlock()


def test_missing_files_are_skipped_and_named_ones_said(tmp_path: Path) -> None:
    said: list[str] = []
    named = tmp_path / "named"
    assert userkeys.load_files([tmp_path / "default", named], [named], lambda p: None,
                               said.append) == []
    assert said == [f"identity file {named} not accessible: no such file"]


def test_an_unusable_file_is_skipped_with_a_word(tmp_path: Path) -> None:
    loose = _keygen(tmp_path / "loose")
    loose.chmod(0o644)
    good = _keygen(tmp_path / "good")
    said: list[str] = []
    found = userkeys.load_files([loose, good], [], lambda p: None, said.append)
    assert [p for p, _ in found] == [good]
    assert len(said) == 1 and "too open" in said[0] and said[0].endswith("skipping it")


def test_ssh_order_and_identities_only(tmp_path: Path) -> None:
    from twisted.conch.ssh import keys

    a, b = (keys.Key.fromFile(str(_keygen(tmp_path / n))) for n in ("a", "b"))
    in_agent = userkeys.AgentKey(a.public(), "a", None)  # type: ignore[arg-type]
    other = userkeys.AgentKey(b.public(), "b", None)  # type: ignore[arg-type]
    files = [(tmp_path / "a", a)]
    assert userkeys.order([in_agent, other], files, False) == [in_agent, other]  # a: agent's
    assert userkeys.order([in_agent, other], files, True) == [in_agent]
    assert userkeys.order([], files, True) == [a]


def test_the_agent_socket_as_ssh_chooses_it() -> None:
    env = {"SSH_AUTH_SOCK": "/run/agent", "OTHER": "/x"}
    assert userkeys.agent_socket(None, env) == "/run/agent"
    assert userkeys.agent_socket("SSH_AUTH_SOCK", env) == "/run/agent"
    assert userkeys.agent_socket("none", env) is None
    assert userkeys.agent_socket("$OTHER", env) == "/x"
    assert userkeys.agent_socket(None, {}) is None


def test_askpass_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = tmp_path / "askpass"
    program.write_text("#!/bin/sh\necho \"secret for $1\"\n")
    program.chmod(0o755)
    monkeypatch.setattr(askpass, "_tty", lambda prompt: None)  # as with no terminal
    base = {"SSH_ASKPASS": str(program)}
    assert askpass.ask("P?", {**base, "SSH_ASKPASS_REQUIRE": "force"}) == "secret for P?"
    assert askpass.ask("P?", {**base, "DISPLAY": ":0"}) == "secret for P?"
    assert askpass.ask("P?", base) is None  # no display: ssh would not run it either
    assert askpass.ask("P?", {**base, "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "never"}) is None
    monkeypatch.setattr(askpass, "_tty", lambda prompt: "typed")
    assert askpass.ask("P?", {**base, "DISPLAY": ":0"}) == "typed"  # the terminal first
    assert askpass.ask("P?", {**base, "SSH_ASKPASS_REQUIRE": "prefer"}) == "secret for P?"


def test_ssh_G_reads_a_host_alias_from_F(tmp_path: Path) -> None:
    if shutil.which("ssh") is None:
        if os.environ.get("CI"):
            pytest.fail("OpenSSH's ssh is needed")
        pytest.skip("no ssh")
    cfg = tmp_path / "config"
    cfg.write_text("Host myrelay\n  HostName relay.example.org\n  Port 2222\n  User alice\n"
                   "  IdentityFile ~/.ssh/lab\n  UserKnownHostsFile /k/known\n"
                   "  IdentitiesOnly yes\n  ConnectTimeout 7\n  IdentityAgent none\n")
    first = tmp_path / "first"
    first.write_text("")  # ssh -G drops an -i file that does not exist (connect warns)
    r = sshresolve.resolve("myrelay", config_file=str(cfg), identities=[str(first)])
    assert r is not None
    assert (r.hostname, r.port, r.user) == ("relay.example.org", 2222, "alice")
    assert set(r.identity_files) == {str(first), "~/.ssh/lab"}  # expanded by keys.expand
    assert r.known_hosts == ("/k/known",) and r.identities_only and r.connect_timeout == 7
    assert r.identity_agent == "none"
    assert r.global_known_hosts == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    r = sshresolve.resolve("myrelay", config_file=str(cfg),
                           options=["UserKnownHostsFile /k/a /k/b", "GlobalKnownHostsFile /g"])
    assert r is not None and (r.known_hosts, r.global_known_hosts) == (("/k/a", "/k/b"), ("/g",))
    r = sshresolve.resolve("myrelay", config_file=str(cfg), options=["GlobalKnownHostsFile none"])
    assert r is not None and r.global_known_hosts == ()
    r = sshresolve.resolve("bob@myrelay", config_file=str(cfg), port="22")
    assert r is not None and (r.user, r.port) == ("bob", 22)  # the command line wins
    with pytest.raises(sshresolve.ResolveError):
        sshresolve.resolve("x", config_file=str(tmp_path / "missing"))


def _public(path: Path) -> str:
    keygen = shutil.which("ssh-keygen") or "ssh-keygen"
    return subprocess.run([keygen, "-y", "-P", PASSPHRASE, "-f", str(path)],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh")
def test_no_key_names_only_default_files_labrelay_can_use(tmp_path: Path) -> None:
    """With no key at all, the message names ssh's default files (from a real ``ssh -G``)
    that labrelay could use; it listed id_ecdsa_sk, id_ed25519_sk, id_xmss and id_dsa
    too, key types it cannot use."""
    env_home = {"HOME": str(tmp_path)}
    out = subprocess.run(["ssh", "-G", "-F", "/dev/null", "relay"], capture_output=True,
                         text=True, check=True, env={**os.environ, **env_home})
    files = [Path(line.split(None, 1)[1]) for line in out.stdout.splitlines()
             if line.startswith("identityfile ")]
    assert {f.name for f in files} >= {"id_ed25519", "id_ecdsa_sk"}
    message = userkeys.no_identity_message(files, None)
    for unusable in ("id_ecdsa_sk", "id_ed25519_sk", "id_xmss", "id_dsa"):
        assert unusable not in message, message
    for usable in ("id_ed25519", "id_ecdsa", "id_rsa"):
        assert f"{usable}," in message or f"{usable} exists" in message, message
