"""relay.user.sshconfig: the ~/.ssh/config snippet `labrelay ssh-config` prints."""

from __future__ import annotations

from relay.config.schema import ServiceGrant
from relay.user.sshconfig import render


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
