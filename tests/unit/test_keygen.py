"""Key pairs written by relay.ssh.keygen, checked with OpenSSH's ssh-keygen."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from twisted.conch.ssh.keys import Key

from relay.ssh.identity import load_identity
from relay.ssh.keygen import KeygenError, generate_keypair

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


def ssh_keygen_y(path: Path) -> str:
    return subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_writes_a_key_pair_openssh_reads(tmp_path: Path) -> None:
    path = tmp_path / "id_ed25519"
    line = generate_keypair(path, "agent@gpu-01")

    key_type, b64, comment = line.split(" ", 2)
    assert (key_type, comment) == ("ssh-ed25519", "agent@gpu-01")
    derived = ssh_keygen_y(path)
    assert derived.split()[:2] == [key_type, b64]
    assert path.with_name("id_ed25519.pub").read_text() == line + "\n"

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("id_ed25519.pub").stat().st_mode) == 0o644
    assert path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert load_identity(path).public().blob() == Key.fromString(line).blob()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id_ed25519", "id_ed25519.pub"]


def test_fingerprint_and_comment_as_ssh_keygen_sees_them(tmp_path: Path) -> None:
    path = tmp_path / "k"
    generate_keypair(path, "lab relay")
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True
    ).stdout
    assert out.startswith("256 SHA256:") and "lab relay (ED25519)" in out


def test_empty_comment(tmp_path: Path) -> None:
    line = generate_keypair(tmp_path / "k", "")
    assert len(line.split()) == 2 and not line.endswith(" ")
    assert ssh_keygen_y(tmp_path / "k").split()[:2] == line.split()


def test_creates_the_parent_directory_0700(tmp_path: Path) -> None:
    path = tmp_path / "dot-ssh" / "id_ed25519"
    generate_keypair(path, "c")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.is_file()


def test_each_call_makes_a_new_key(tmp_path: Path) -> None:
    assert generate_keypair(tmp_path / "a", "c") != generate_keypair(tmp_path / "b", "c")


@pytest.mark.parametrize("existing", ["k", "k.pub"])
def test_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("precious\n")
    with pytest.raises(KeygenError) as err:
        generate_keypair(tmp_path / "k", "c")
    assert f"'{tmp_path / existing}' already exists" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_text() == "precious\n"


def test_overwrite_replaces_both_files(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = generate_keypair(path, "c")
    path.chmod(0o644)
    second = generate_keypair(path, "c", overwrite=True)
    assert first != second
    assert ssh_keygen_y(path).split()[:2] == second.split()[:2]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]


def test_refuses_a_multi_line_comment(tmp_path: Path) -> None:
    with pytest.raises(KeygenError, match="single line"):
        generate_keypair(tmp_path / "k", "a\nb")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KeygenError) as err:
        generate_keypair(blocker / "k", "c")
    assert str(blocker) in str(err.value)
