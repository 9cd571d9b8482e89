"""relay.user.sshconfig: the ~/.ssh/config snippet `labrelay ssh-config` prints."""

from __future__ import annotations

from pathlib import Path

from relay.config.schema import ServiceGrant
from relay.user.sshconfig import next_host_key_line, render


def test_jump_hosts_local_forwards_and_the_host_key() -> None:
    text = render(user="alice", relay_host="relay.example.org", relay_port=2222,
                  services=[ServiceGrant("gpu-cluster", 22), ServiceGrant("jupyter", 8888)],
                  host_key_line="ssh-ed25519 AAAAC3Nz")
    assert "echo '[relay.example.org]:2222 ssh-ed25519 AAAAC3Nz' >> ~/.ssh/known_hosts" in text
    assert "Host gpu-cluster\n    ProxyJump labrelay\n" in text
    assert "    LocalForward 8888 jupyter:8888" in text
    assert "ProxyCommand" not in text


def test_e2e_services_take_the_fast_path() -> None:
    text = render(user="alice", relay_host="relay.example.org", relay_port=2222,
                  services=[ServiceGrant("gpu-cluster", 22), ServiceGrant("login", 22)],
                  identity="~/.ssh/alice", fast=[ServiceGrant("gpu-cluster", 22)])
    gpu = text.split("Match originalhost gpu-cluster")[1].split("\n\n")[0]
    # With labrelay installed: the fast path, the relay read from its Host entry...
    assert (' exec "command -v labrelay >/dev/null 2>&1"\n'
            "    ProxyCommand labrelay connect labrelay %h:%p\n") in gpu
    # ... and without it, the same file still works through the relay (ssh -J).
    assert "Host gpu-cluster\n    ProxyJump labrelay\n" in gpu
    assert "Host labrelay\n    HostName relay.example.org\n    Port 2222\n" in text
    login = text.split("Host login\n")[1].split("\n\n")[0]
    assert "ProxyJump labrelay" in login


def test_a_rotation_under_way_prints_the_next_key_beside_the_current() -> None:
    text = render(user="alice", relay_host="relay.example.org", relay_port=2222,
                  services=[], host_key_line="ssh-ed25519 AAAAcur",
                  next_host_key_line="ssh-ed25519 AAAAnext")
    cur = "echo '[relay.example.org]:2222 ssh-ed25519 AAAAcur' >> ~/.ssh/known_hosts"
    nxt = "echo '[relay.example.org]:2222 ssh-ed25519 AAAAnext' >> ~/.ssh/known_hosts"
    assert cur in text and nxt in text and text.index(cur) < text.index(nxt)
    # A next key that is the current one (a finished swap not yet cleaned up): one line.
    same = render(user="alice", relay_host="r", relay_port=22, services=[],
                  host_key_line="ssh-ed25519 AAAAcur", next_host_key_line="ssh-ed25519 AAAAcur")
    assert same.count("echo 'r ssh-ed25519 AAAAcur'") == 1
    assert "rotation" not in same


def test_the_next_key_line_comes_from_the_key_else_its_pub(tmp_path: Path) -> None:
    from relay.ssh.keygen import generate_keypair

    path = tmp_path / "ssh_host_ed25519_key"
    generate_keypair(path, comment="labrelay-relay-host-key")
    public = " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])
    assert next_host_key_line(path) == public
    # The .pub may be stale: the private key is what the relay announces.
    path.with_name(path.name + ".pub").write_text("ssh-ed25519 AAAAstale comment\n")
    assert next_host_key_line(path) == public
    # Unreadable here (not the relay's user; mode 644 is refused as by the relay): the .pub.
    path.chmod(0o644)
    assert next_host_key_line(path) == "ssh-ed25519 AAAAstale"
    path.with_name(path.name + ".pub").unlink()
    assert next_host_key_line(path) is None
    assert next_host_key_line(tmp_path / "missing") is None
