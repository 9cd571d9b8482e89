"""Loading identities from private key files made by ssh-keygen."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.conch.ssh.keys import Key

from relay.ssh.identity import IdentityError, default_identity_paths, load_identity

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


def ssh_keygen(path: Path, *args: str, passphrase: str = "") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-N", passphrase, "-C", "test", "-f", str(path), *args],
        check=True,
        capture_output=True,
    )
    return path


def public_blob(path: Path) -> bytes:
    return Key.fromString(path.with_name(path.name + ".pub").read_bytes()).blob()


@pytest.mark.parametrize(
    ("args", "ssh_type"),
    [
        (["-t", "ed25519"], b"ssh-ed25519"),
        (["-t", "ecdsa", "-b", "256"], b"ecdsa-sha2-nistp256"),
        (["-t", "ecdsa", "-b", "384"], b"ecdsa-sha2-nistp384"),
        (["-t", "ecdsa", "-b", "521"], b"ecdsa-sha2-nistp521"),
        (["-t", "rsa", "-b", "2048"], b"ssh-rsa"),
        (["-t", "rsa", "-b", "2048", "-m", "PEM"], b"ssh-rsa"),
        (["-t", "ecdsa", "-m", "PEM"], b"ecdsa-sha2-nistp256"),
        (["-t", "rsa", "-b", "2048", "-m", "PKCS8"], b"ssh-rsa"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_loads_keys_made_by_ssh_keygen(tmp_path: Path, args: list[str], ssh_type: bytes) -> None:
    path = ssh_keygen(tmp_path / "id", *args)
    key = load_identity(path)
    assert not key.isPublic()
    assert key.sshType() == ssh_type
    assert key.public().blob() == public_blob(path)
    assert key.sign(b"data") and key.public().verify(key.sign(b"data"), b"data")


@pytest.mark.parametrize(
    ("private", "ssh_type"),
    [
        (ed25519.Ed25519PrivateKey.generate(), b"ssh-ed25519"),
        (ec.generate_private_key(ec.SECP384R1()), b"ecdsa-sha2-nistp384"),
    ],
)
def test_loads_pkcs8_keys(tmp_path: Path, private: object, ssh_type: bytes) -> None:
    assert isinstance(private, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    path = tmp_path / "id"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_identity(path).sshType() == ssh_type


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_refuses_files_open_to_group_or_others(tmp_path: Path, mode: int) -> None:
    path = ssh_keygen(tmp_path / "id", "-t", "ed25519")
    path.chmod(mode)
    with pytest.raises(IdentityError) as err:
        load_identity(path)
    message = str(err.value)
    assert f"Permissions {mode:04o} for '{path}' are too open" in message
    assert f"chmod 600 {path}" in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_fine(tmp_path: Path, mode: int) -> None:
    path = ssh_keygen(tmp_path / "id", "-t", "ed25519")
    path.chmod(mode)
    assert load_identity(path).sshType() == b"ssh-ed25519"


@pytest.mark.parametrize(
    "args", [["-t", "ed25519"], ["-t", "rsa", "-m", "PEM"], ["-t", "rsa", "-m", "PKCS8"]]
)
def test_refuses_passphrase_protected_keys(tmp_path: Path, args: list[str]) -> None:
    path = ssh_keygen(tmp_path / "id", *args, passphrase="secret")
    with pytest.raises(IdentityError) as err:
        load_identity(path)
    message = str(err.value)
    assert str(path) in message
    assert "passphrase-protected keys are not supported yet" in message
    assert "ssh-keygen -t ed25519 -N ''" in message and "chmod 600" in message


def test_refuses_a_public_key_and_names_the_private_one(tmp_path: Path) -> None:
    path = ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519")
    public = path.with_name("id_ed25519.pub")
    assert public.stat().st_mode & 0o044  # 0644, as ssh-keygen writes it
    with pytest.raises(IdentityError) as err:
        load_identity(public)
    message = str(err.value)
    assert "is a public key, not a private key" in message
    assert f"name the private key instead: {path}" in message
    assert "chmod" not in message


def test_refuses_a_pem_public_key(tmp_path: Path) -> None:
    path = ssh_keygen(tmp_path / "id", "-t", "rsa", "-b", "2048")
    exported = subprocess.run(
        ["ssh-keygen", "-e", "-m", "PKCS8", "-f", str(path)],
        check=True,
        capture_output=True,
    ).stdout
    pem = tmp_path / "id.pem"
    pem.write_bytes(exported)
    pem.chmod(0o600)
    with pytest.raises(IdentityError, match="is a public key"):
        load_identity(pem)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(IdentityError) as err:
        load_identity(path)
    assert str(err.value).startswith(f"identity file '{path}': no such file")
    assert f"ssh-keygen -t ed25519 -N '' -f {path}" in str(err.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="is a directory"):
        load_identity(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all\n",
        b"\x00\x01\x02\xff" * 50,
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "text", "binary", "bad-openssh", "bad-pkcs8"],
)
def test_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "id"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as err:
        load_identity(path)
    assert str(path) in str(err.value)
    assert "not a" in str(err.value)


def test_truncated_key(tmp_path: Path) -> None:
    path = ssh_keygen(tmp_path / "id", "-t", "ed25519")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], lines[-1]]) + "\n")
    with pytest.raises(IdentityError, match="is not a supported private key"):
        load_identity(path)


def test_default_identity_paths(tmp_path: Path) -> None:
    assert default_identity_paths(tmp_path) == []
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    ssh_keygen(ssh / "id_rsa", "-t", "rsa", "-b", "2048")
    ssh_keygen(ssh / "id_ed25519", "-t", "ed25519")
    (ssh / "id_ecdsa").mkdir()  # not a file: skipped
    assert default_identity_paths(tmp_path) == [ssh / "id_ed25519", ssh / "id_rsa"]


@pytest.mark.parametrize("damage", ["header", "body"])
def test_a_damaged_key_file_is_refused_without_quoting_it(tmp_path: Path, damage: str) -> None:
    """Conch's own message for a file it cannot guess ("cannot guess the type of
    b'...'") quotes the whole file: a private key whose first line lost a dash went
    whole into the error, and from there into `labrelay check`'s output and the
    journal.  The error says what is wrong with the file's shape, never its bytes."""
    path = ssh_keygen(tmp_path / "id", "-t", "ed25519")
    lines = path.read_text().splitlines()
    if damage == "header":
        lines[0] = lines[0][1:]
    else:
        lines[1] = "!" + lines[1][1:]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(IdentityError) as err:
        load_identity(path)
    message = str(err.value)
    assert "is not a supported private key" in message
    for line in lines[1:-1]:
        assert line[5:30] not in message
    if damage == "header":
        assert "first line is not a private key header" in message
    else:
        assert "BEGIN OPENSSH PRIVATE KEY----- found" in message
