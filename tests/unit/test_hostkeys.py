"""Host key verification against real keys and known_hosts files made by OpenSSH's tools."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from twisted.conch.ssh.keys import Key

from relay.config.schema import HostKeyPolicy
from relay.ssh.hostkeys import (
    HostKeyError,
    HostKeyStatus,
    HostKeyVerifier,
    fingerprint_sha256,
    known_hosts_name,
    parse_fingerprint,
)

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")

HOST = "127.0.0.1"
PORT = 2222
BRACKETED = "[127.0.0.1]:2222"


def ssh_keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, check=False)


def make_key(directory: Path, name: str, key_type: str = "ed25519") -> tuple[Key, str]:
    """A fresh key pair by ssh-keygen: the public Key and its ``type base64`` text."""
    path = directory / name
    ssh_keygen("-q", "-t", key_type, "-N", "", "-C", name, "-f", str(path)).check_returncode()
    text = (directory / f"{name}.pub").read_text()
    key_type_name, b64 = text.split()[:2]
    return Key.fromString(text), f"{key_type_name} {b64}"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Key, str]]:
    d = tmp_path / "keys"
    d.mkdir()
    return {
        "a": make_key(d, "a"),
        "b": make_key(d, "b"),
        "ecdsa": make_key(d, "ecdsa", "ecdsa"),
    }


def verifier(
    known_hosts: Path, port: int = PORT, host: str = HOST, *, accept_new: bool = False
) -> HostKeyVerifier:
    policy = HostKeyPolicy(known_hosts=known_hosts, accept_new=accept_new)
    return HostKeyVerifier(policy, host, port)


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- fingerprints ---------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path, key_type: str) -> None:
    key, _ = make_key(tmp_path, "k", key_type)
    printed = ssh_keygen("-lf", str(tmp_path / "k.pub")).stdout.split()[1]
    assert printed.startswith("SHA256:")
    assert fingerprint_sha256(key) == printed
    assert parse_fingerprint(printed) == parse_fingerprint(printed + "=")


@pytest.mark.parametrize(
    "bad", ["MD5:12:34", "SHA256:tooshort", "AAAAC3NzaC1lZDI1NTE5", "SHA256:!!!" + "A" * 40]
)
def test_parse_fingerprint_rejects_other_forms(bad: str) -> None:
    with pytest.raises(ValueError, match="SHA256"):
        parse_fingerprint(bad)


def test_known_hosts_name_is_openssh_form() -> None:
    assert known_hosts_name("Relay.Example.ORG", 22) == "relay.example.org"
    assert known_hosts_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"
    assert known_hosts_name("::1", 2222) == "[::1]:2222"


# -- pinned fingerprints --------------------------------------------------------------------


def test_pinned_fingerprint_accepts_only_that_key(tmp_path: Path, keys) -> None:
    key_a, _ = keys["a"]
    key_b, _ = keys["b"]
    fp = fingerprint_sha256(key_a)
    v = HostKeyVerifier(HostKeyPolicy(fingerprint=fp, known_hosts=tmp_path / "kh"), HOST, PORT)
    assert v.verify(key_a) == f"pinned {fp}"
    with pytest.raises(HostKeyError) as err:
        v.verify(key_b)
    assert err.value.status is HostKeyStatus.PIN_MISMATCH
    message = str(err.value)
    assert BRACKETED in message
    assert fingerprint_sha256(key_b) in message and fp in message
    # the hint names the setting as config.md spells it (round 13: host_key.fingerprint)
    assert "set host_key (--host-key) to the new value" in message
    assert not (tmp_path / "kh").exists()


def test_pinned_fingerprint_wins_over_accept_new(tmp_path: Path, keys) -> None:
    key_a, _ = keys["a"]
    key_b, _ = keys["b"]
    policy = HostKeyPolicy(
        fingerprint=fingerprint_sha256(key_a), known_hosts=tmp_path / "kh", accept_new=True
    )
    with pytest.raises(HostKeyError):
        HostKeyVerifier(policy, HOST, PORT).verify(key_b)
    assert not (tmp_path / "kh").exists()


def test_malformed_pin_is_refused_up_front() -> None:
    with pytest.raises(HostKeyError) as err:
        HostKeyVerifier(HostKeyPolicy(fingerprint="MD5:aa:bb:cc"), HOST, PORT)
    assert err.value.status is HostKeyStatus.ERROR
    assert "SHA256" in str(err.value)


# -- known_hosts: accepted ------------------------------------------------------------------


def test_plain_entry_with_host_list_comments_and_blank_lines(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = write(
        tmp_path / "known_hosts",
        "# a comment",
        "",
        "this line is not valid",
        f"other.example,relay.example.org,{HOST} {line_a} a comment",
    )
    v = verifier(kh, port=22)
    assert v.verify(key_a) == f"known_hosts {kh} line 4"
    assert verifier(kh, port=22, host="Relay.Example.ORG").verify(key_a)


def test_plain_entry_for_port_22_does_not_cover_other_ports(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = write(tmp_path / "known_hosts", f"{HOST} {line_a}")
    with pytest.raises(HostKeyError) as err:
        verifier(kh, port=PORT).verify(key_a)
    assert err.value.status is HostKeyStatus.UNKNOWN


def test_bracketed_port_entry(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = write(tmp_path / "known_hosts", f"{BRACKETED} {line_a}")
    assert verifier(kh).verify(key_a) == f"known_hosts {kh} line 1"
    with pytest.raises(HostKeyError):
        verifier(kh, port=22).verify(key_a)


@pytest.mark.parametrize("port", [22, PORT])
def test_entries_hashed_by_ssh_keygen(tmp_path: Path, keys, port: int) -> None:
    key_a, line_a = keys["a"]
    key_b, line_b = keys["b"]
    name = known_hosts_name(HOST, port)
    kh = write(tmp_path / "known_hosts", f"decoy.example {line_b}", f"{name},localhost {line_a}")
    ssh_keygen("-H", "-f", str(kh)).check_returncode()
    content = kh.read_text()
    assert HOST not in content and "|1|" in content
    assert verifier(kh, port=port).verify(key_a).startswith(f"known_hosts {kh} line ")
    assert verifier(kh, port=22, host="localhost").verify(key_a)
    with pytest.raises(HostKeyError) as err:  # the decoy's hashed name is not ours
        verifier(kh, port=port).verify(key_b)
    assert err.value.status is HostKeyStatus.CHANGED


def test_patterns_and_negation(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = write(tmp_path / "known_hosts", f"*.example.org,!bad.example.org,relay?.lab {line_a}")
    assert verifier(kh, 22, "x.example.org").verify(key_a)
    assert verifier(kh, 22, "relay7.lab").verify(key_a)
    for host in ("bad.example.org", "example.org", "relay10.lab"):
        with pytest.raises(HostKeyError):
            verifier(kh, 22, host).verify(key_a)


def test_a_later_entry_of_the_same_type_may_match(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    _, line_b = keys["b"]
    kh = write(tmp_path / "known_hosts", f"{BRACKETED} {line_b}", f"{BRACKETED} {line_a}")
    assert verifier(kh).verify(key_a) == f"known_hosts {kh} line 2"


# -- known_hosts: refused -------------------------------------------------------------------


@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_key_is_refused_with_the_fix(tmp_path: Path, keys, accept_new: bool) -> None:
    key_a, _ = keys["a"]
    _, line_b = keys["b"]
    kh = write(tmp_path / "known_hosts", "# header", f"{BRACKETED} {line_b}")
    before = kh.read_bytes()
    with pytest.raises(HostKeyError) as err:
        verifier(kh, accept_new=accept_new).verify(key_a)
    assert err.value.status is HostKeyStatus.CHANGED
    message = str(err.value)
    assert "CHANGED" in message and BRACKETED in message
    assert "ssh-ed25519" in message and fingerprint_sha256(key_a) in message
    assert fingerprint_sha256(keys["b"][0]) in message
    assert f"{kh} line 2" in message
    assert f"ssh-keygen -R '{BRACKETED}' -f {kh}" in message
    assert kh.read_bytes() == before


def test_the_suggested_removal_command_works(tmp_path: Path, keys) -> None:
    key_a, _ = keys["a"]
    _, line_b = keys["b"]
    kh = write(tmp_path / "known_hosts", f"{BRACKETED} {line_b}")
    ssh_keygen("-H", "-f", str(kh)).check_returncode()
    with pytest.raises(HostKeyError):
        verifier(kh).verify(key_a)
    ssh_keygen("-R", BRACKETED, "-f", str(kh)).check_returncode()
    assert verifier(kh, accept_new=True).verify(key_a) == f"accepted new key, saved to {kh}"


def test_unknown_host_is_refused_with_the_line_to_add(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    _, line_b = keys["b"]
    kh = write(tmp_path / "known_hosts", f"elsewhere.example {line_b}", "garbage line")
    with pytest.raises(HostKeyError) as err:
        verifier(kh).verify(key_a)
    assert err.value.status is HostKeyStatus.UNKNOWN
    message = str(err.value)
    assert "UNKNOWN" in message and fingerprint_sha256(key_a) in message
    assert f"{BRACKETED} {line_a}" in message
    assert 'strict_host_key_checking = "accept-new"' in message and "lines 2" in message
    assert f'pin host_key = "{fingerprint_sha256(key_a)}"' in message
    # Where to compare it: a labrelay relay's key is in its state_dir, not /etc/ssh
    # (the hint named only sshd's files, which a relay's admin does not have).
    assert "STATE_DIR/ssh_host_ed25519_key.pub" in message and "state_dir" in message


def test_missing_file_means_unknown_and_is_not_created(tmp_path: Path, keys) -> None:
    kh = tmp_path / "nope" / "known_hosts"
    with pytest.raises(HostKeyError) as err:
        verifier(kh).verify(keys["a"][0])
    assert err.value.status is HostKeyStatus.UNKNOWN
    assert "does not exist" in str(err.value)
    assert not kh.parent.exists()


def test_only_other_key_types_known_is_unknown(tmp_path: Path, keys) -> None:
    key_a, _ = keys["a"]
    _, line_ecdsa = keys["ecdsa"]
    kh = write(tmp_path / "known_hosts", f"{BRACKETED} {line_ecdsa}")
    with pytest.raises(HostKeyError) as err:
        verifier(kh).verify(key_a)
    assert err.value.status is HostKeyStatus.UNKNOWN
    assert verifier(kh, accept_new=True).verify(key_a).startswith("accepted new key")
    assert verifier(kh).verify(key_a) == f"known_hosts {kh} line 2"
    assert verifier(kh).verify(keys["ecdsa"][0]) == f"known_hosts {kh} line 1"


@pytest.mark.parametrize("accept_new", [False, True])
def test_revoked_key_is_refused_even_if_listed(tmp_path: Path, keys, accept_new: bool) -> None:
    key_a, line_a = keys["a"]
    kh = write(tmp_path / "known_hosts", f"{BRACKETED} {line_a}", f"@revoked * {line_a}")
    with pytest.raises(HostKeyError) as err:
        verifier(kh, accept_new=accept_new).verify(key_a)
    assert err.value.status is HostKeyStatus.REVOKED
    assert "@revoked" in str(err.value) and f"{kh} line 2" in str(err.value)


def test_cert_authority_lines_are_ignored(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = write(tmp_path / "known_hosts", f"@cert-authority * {line_a}")
    with pytest.raises(HostKeyError) as err:
        verifier(kh).verify(key_a)
    assert err.value.status is HostKeyStatus.UNKNOWN


def test_key_type_field_must_match_the_key(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = write(tmp_path / "known_hosts", f"{BRACKETED} ssh-rsa {line_a.split()[1]}")
    with pytest.raises(HostKeyError) as err:
        verifier(kh).verify(key_a)
    assert err.value.status is HostKeyStatus.UNKNOWN


def test_unreadable_known_hosts_is_an_error(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    kh.mkdir()
    with pytest.raises(HostKeyError) as err:
        verifier(kh, accept_new=True).verify(keys["a"][0])
    assert err.value.status is HostKeyStatus.ERROR
    assert str(kh) in str(err.value)


# -- accept_new -----------------------------------------------------------------------------


def test_accept_new_records_a_hashed_line_openssh_finds(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    kh = tmp_path / "dot-ssh" / "known_hosts"
    assert verifier(kh, accept_new=True).verify(key_a) == f"accepted new key, saved to {kh}"
    assert stat.S_IMODE(kh.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    (line,) = kh.read_text().splitlines()
    assert line.startswith("|1|") and line.endswith(line_a) and HOST not in line

    assert verifier(kh).verify(key_a) == f"known_hosts {kh} line 1"
    with pytest.raises(HostKeyError) as err:
        verifier(kh, accept_new=True).verify(keys["b"][0])
    assert err.value.status is HostKeyStatus.CHANGED

    found = ssh_keygen("-F", BRACKETED, "-f", str(kh))
    assert found.returncode == 0
    assert line_a in found.stdout
    assert ssh_keygen("-F", HOST, "-f", str(kh)).returncode == 1


def test_accept_new_for_port_22_records_the_bare_name(tmp_path: Path, keys) -> None:
    key_a, _ = keys["a"]
    kh = tmp_path / "known_hosts"
    verifier(kh, port=22, host="Relay.Example.ORG", accept_new=True).verify(key_a)
    assert ssh_keygen("-F", "relay.example.org", "-f", str(kh)).returncode == 0


def test_accept_new_appends_after_a_line_without_newline(tmp_path: Path, keys) -> None:
    key_a, _ = keys["a"]
    _, line_b = keys["b"]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"elsewhere.example {line_b}")
    kh.chmod(0o644)
    verifier(kh, accept_new=True).verify(key_a)
    assert stat.S_IMODE(kh.stat().st_mode) == 0o644  # an existing file keeps its mode
    assert verifier(kh, 22, "elsewhere.example").verify(keys["b"][0]).endswith("line 1")
    assert verifier(kh).verify(key_a) == f"known_hosts {kh} line 2"


def test_accept_new_that_cannot_save_refuses(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    kh.symlink_to(tmp_path / "missing" / "known_hosts")  # reads as absent; cannot be created
    with pytest.raises(HostKeyError) as err:
        verifier(kh, accept_new=True).verify(keys["a"][0])
    assert err.value.status is HostKeyStatus.ERROR
    assert "could not be saved" in str(err.value)


# -- the host key types the client asks for first ---------------------------------------------


def test_known_key_types_lists_this_hosts_types_in_file_order(tmp_path: Path, keys) -> None:
    """The SSH client offers these host key algorithms first (relay.ssh.policy), so a
    host recorded with an ECDSA key is asked for that one, not an unrecorded ed25519."""
    path = write(
        tmp_path / "known_hosts",
        f"otherhost {keys['a'][1]}",
        f"{BRACKETED} {keys['ecdsa'][1]}",
        f"@revoked {BRACKETED} {keys['b'][1]}",
        f"{BRACKETED} {keys['a'][1]}",
        f"{BRACKETED} {keys['b'][1]}",
    )
    assert verifier(path).known_key_types() == ["ecdsa-sha2-nistp256", "ssh-ed25519"]
    assert verifier(tmp_path / "missing").known_key_types() == []
    pinned = HostKeyVerifier(
        HostKeyPolicy(fingerprint=fingerprint_sha256(keys["a"][0]), known_hosts=path), HOST, PORT
    )
    assert pinned.known_key_types() == []


# -- several files, as ssh reads UserKnownHostsFile and GlobalKnownHostsFile -------------------


def several(
    user: Path, *more: Path, accept_new: bool = False
) -> HostKeyVerifier:
    """``user`` first (the one written), then ``more``: ssh's other user files, then its
    global ones."""
    policy = HostKeyPolicy(known_hosts=user, extra_known_hosts=more, accept_new=accept_new)
    return HostKeyVerifier(policy, HOST, PORT)


def test_a_match_in_the_second_user_file_accepts(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    first = write(tmp_path / "known_hosts", f"elsewhere.example {keys['b'][1]}")
    second = write(tmp_path / "known_hosts2", "# second", f"{BRACKETED} {line_a}")
    before = first.read_bytes()
    assert several(first, second, accept_new=True).verify(key_a) == (
        f"known_hosts {second} line 2")
    assert first.read_bytes() == before  # found, so nothing recorded


def test_a_match_in_a_global_file_accepts_with_the_user_files_missing(
    tmp_path: Path, keys
) -> None:
    """The lab admin's case: the relay's key only in a system-wide file (ssh's
    GlobalKnownHostsFile); the user's own files do not exist, and stay so."""
    key_a, line_a = keys["a"]
    user, user2 = tmp_path / "dot-ssh" / "known_hosts", tmp_path / "dot-ssh" / "known_hosts2"
    glob1 = tmp_path / "etc" / "ssh_known_hosts"
    glob2 = write(tmp_path / "ssh_known_hosts2", f"{BRACKETED} {line_a}")
    v = several(user, user2, glob1, glob2)
    assert v.verify(key_a) == f"known_hosts {glob2} line 1"
    assert v.known_key_types() == ["ssh-ed25519"]
    assert not user.parent.exists()
    # ssh-keygen agrees that this is where the key is.
    assert ssh_keygen("-F", BRACKETED, "-f", str(glob2)).returncode == 0


def test_a_match_anywhere_wins_over_a_stale_key_elsewhere(tmp_path: Path, keys) -> None:
    """sshconnect.c accepts as soon as any loaded entry equals the key: a stale line in
    the user's file does not refuse a key the global file lists (and the other way)."""
    key_a, line_a = keys["a"]
    stale = write(tmp_path / "known_hosts", f"{BRACKETED} {keys['b'][1]}")
    glob = write(tmp_path / "ssh_known_hosts", f"{BRACKETED} {line_a}")
    assert several(stale, glob).verify(key_a) == f"known_hosts {glob} line 1"
    assert several(glob, stale).verify(key_a) == f"known_hosts {glob} line 1"


@pytest.mark.parametrize("accept_new", [False, True])
def test_a_different_key_in_a_global_file_is_refused_as_changed(
    tmp_path: Path, keys, accept_new: bool
) -> None:
    """The global file lists another key of this type and no file lists the offered
    one: CHANGED, as ssh says, even with accept-new; the user's file is not written."""
    key_a, _ = keys["a"]
    user = write(tmp_path / "known_hosts", f"elsewhere.example {keys['a'][1]}")
    glob = write(tmp_path / "ssh_known_hosts", "# admin's", f"{BRACKETED} {keys['b'][1]}")
    before = user.read_bytes()
    with pytest.raises(HostKeyError) as err:
        several(user, tmp_path / "missing2", glob, accept_new=accept_new).verify(key_a)
    assert err.value.status is HostKeyStatus.CHANGED
    message = str(err.value)
    assert f"{glob} line 2" in message and fingerprint_sha256(keys["b"][0]) in message
    assert f"-f {glob}" in message and "ask whoever installed it" in message
    assert user.read_bytes() == before


def test_revoked_in_a_global_file_refuses_a_key_a_user_file_lists(
    tmp_path: Path, keys
) -> None:
    key_a, line_a = keys["a"]
    user = write(tmp_path / "known_hosts", f"{BRACKETED} {line_a}")
    glob = write(tmp_path / "ssh_known_hosts", f"@revoked * {line_a}")
    with pytest.raises(HostKeyError) as err:
        several(user, glob).verify(key_a)
    assert err.value.status is HostKeyStatus.REVOKED
    assert f"{glob} line 1" in str(err.value)


def test_accept_new_records_into_the_first_user_file_only(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    first = tmp_path / "dot-ssh" / "known_hosts"
    second = write(tmp_path / "known_hosts2", f"elsewhere.example {keys['b'][1]}")
    glob = write(tmp_path / "ssh_known_hosts", f"otherhost {keys['b'][1]}")
    before = {p: p.read_bytes() for p in (second, glob)}
    v = several(first, second, glob, accept_new=True)
    assert v.verify(key_a) == f"accepted new key, saved to {first}"
    assert {p: p.read_bytes() for p in (second, glob)} == before
    (line,) = first.read_text().splitlines()
    assert line.endswith(line_a)
    assert several(first, second, glob).verify(key_a) == f"known_hosts {first} line 1"


def test_unknown_in_several_files_says_each_and_where_to_add(tmp_path: Path, keys) -> None:
    key_a, line_a = keys["a"]
    first = write(tmp_path / "known_hosts", f"elsewhere.example {keys['b'][1]}", "garbage")
    glob = tmp_path / "ssh_known_hosts"
    with pytest.raises(HostKeyError) as err:
        several(first, glob).verify(key_a)
    assert err.value.status is HostKeyStatus.UNKNOWN
    message = str(err.value)
    assert f"{first}: no entry (lines 2 could not be parsed" in message
    assert f"{glob}: does not exist" in message
    assert f"add this line to {first}: {BRACKETED} {line_a}" in message


def test_an_unreadable_file_never_makes_a_host_new(tmp_path: Path, keys) -> None:
    """ssh skips a file it cannot open; labrelay takes a match elsewhere, but does not
    call the host unknown (nor record it) while a file that may list it is unreadable."""
    key_a, line_a = keys["a"]
    user = tmp_path / "known_hosts"
    unreadable = tmp_path / "ssh_known_hosts"
    unreadable.mkdir()  # reading it fails, whoever runs the test (root reads any file)
    with pytest.raises(HostKeyError) as err:
        several(user, unreadable, accept_new=True).verify(key_a)
    assert err.value.status is HostKeyStatus.ERROR
    assert str(unreadable) in str(err.value)
    assert not user.exists()
    write(user, f"{BRACKETED} {line_a}")
    assert several(user, unreadable).verify(key_a) == f"known_hosts {user} line 1"


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a character device (mknod): root only; "
                    "CI runs as root")
def test_accept_new_into_a_null_device_keeps_its_mode_and_accepts(tmp_path: Path, keys) -> None:
    """``-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=accept-new`` (or
    ``=no``), ssh's idiom for a throwaway host: labrelay fchmod'ed the file it had just
    "created" to 0600 when it was empty, which for /dev/null, as root (an agent under
    systemd), made the null device unusable by every other user; and fsync of a device
    fails (EINVAL), so the key was refused.  Tested on a null device of our own (the
    same major/minor), never on the system's."""
    node = tmp_path / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(node, 0o666)
    key_a, _ = keys["a"]
    said = verifier(node, accept_new=True).verify(key_a)
    assert said == f"accepted new key, not recorded ({node})"
    assert stat.S_IMODE(os.stat(node).st_mode) == 0o666
    assert stat.S_ISCHR(os.stat(node).st_mode)


# -- UserKnownHostsFile none, GlobalKnownHostsFile none -----------------------------------------


def test_user_known_hosts_none_reads_and_writes_no_user_file(
    tmp_path: Path, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ssh's ``UserKnownHostsFile none`` is no user file (ssh.c), never a file named
    ``none``: one planted in the current directory with the offered key is not trusted,
    and a new host is refused even with accept-new, as ssh refuses it (sshconnect.c: no
    user file makes the check read-only, and a new host then fails in every mode);
    nothing is created."""
    key_a, line_a = keys["a"]
    monkeypatch.chdir(tmp_path)
    planted = write(tmp_path / "none", f"{BRACKETED} {line_a}")
    before = sorted(p.name for p in tmp_path.iterdir())
    for accept_new in (False, True):
        policy = HostKeyPolicy(known_hosts=Path("none"), no_user_known_hosts=True,
                               accept_new=accept_new)
        v = HostKeyVerifier(policy, HOST, PORT)
        assert v.files == ()
        with pytest.raises(HostKeyError) as err:
            v.verify(key_a)
        assert err.value.status is HostKeyStatus.UNKNOWN
        assert "no known_hosts file is read" in str(err.value)
        assert "UserKnownHostsFile is none" in str(err.value)
        assert f"--host-key {fingerprint_sha256(key_a)}" in err.value.hint
        assert ("no file to record it in" in str(err.value)) is accept_new
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert planted.read_text() == f"{BRACKETED} {line_a}\n"


def test_user_known_hosts_none_still_reads_the_global_files(tmp_path: Path, keys) -> None:
    """With no user file a global file decides alone: its key is accepted, another key
    of the type is CHANGED, and an unknown host names the global file to add it to."""
    key_a, line_a = keys["a"]
    glob = write(tmp_path / "ssh_known_hosts", f"{BRACKETED} {line_a}")
    policy = HostKeyPolicy(no_user_known_hosts=True, global_known_hosts=(glob,),
                           accept_new=True)
    assert HostKeyVerifier(policy, HOST, PORT).verify(key_a) == f"known_hosts {glob} line 1"
    with pytest.raises(HostKeyError) as err:
        HostKeyVerifier(policy, HOST, PORT).verify(keys["b"][0])
    assert err.value.status is HostKeyStatus.CHANGED
    with pytest.raises(HostKeyError) as err:
        HostKeyVerifier(policy, HOST, PORT).verify(keys["ecdsa"][0])
    assert err.value.status is HostKeyStatus.UNKNOWN
    assert f"add this line to a GlobalKnownHostsFile that is read ({glob})" in err.value.hint
    assert glob.read_text() == f"{BRACKETED} {line_a}\n"


def test_global_known_hosts_none_reads_only_the_user_files(tmp_path: Path, keys) -> None:
    user = tmp_path / "known_hosts"
    policy = HostKeyPolicy(known_hosts=user, accept_new=True)
    v = HostKeyVerifier(policy, HOST, PORT)
    assert v.files == (user,)
    assert v.verify(keys["a"][0]) == f"accepted new key, saved to {user}"


def test_host_patterns_match_in_linear_time_as_the_globs_they_are() -> None:
    """``*`` and ``?`` globs, everything else literal, whole-name: the same answers as
    the regular expression it replaced, on every pattern over a small alphabet; and a
    line of many stars then text that does not match answers at once (the regular
    expression backtracked for seconds per line: tests/fuzz ``known_hosts``)."""
    import itertools
    import re

    from relay.ssh.hostkeys import _glob_match, _match_pattern_list

    def regex(pattern: str, name: str) -> bool:
        parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch("".join(parts), name, re.DOTALL) is not None

    names = ["", "a", "b", "ab", "ba", "aab", "abab", "[a]", "a.b"]
    for size in range(5):
        for chars in itertools.product("ab*?[.", repeat=size):
            pattern = "".join(chars)
            for name in names:
                assert _glob_match(pattern, name) == regex(pattern, name), (pattern, name)
    stars = "*" * 60 + "!evil.example.org"
    assert not _match_pattern_list("cloud.example.org." + "x" * 200, "*.example.org," + stars)
    assert _match_pattern_list("cloud.example.org", "*.example.org," + stars)
    assert not _glob_match("*a" * 40 + "b", "a" * 200)
