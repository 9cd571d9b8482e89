"""``labrelay ssh-config --tls``: the relay's entry reached with ``openssl s_client``."""

from __future__ import annotations

from relay.config.schema import ServiceGrant
from relay.user.sshconfig import render, tls_proxy_command


def test_tls_proxy_command_checks_the_certificate_and_asks_for_ssh() -> None:
    assert tls_proxy_command("relay.example.org", 443) == (
        "openssl s_client -quiet -verify_return_error -verify_hostname relay.example.org "
        "-servername relay.example.org -alpn labrelay-ssh/1 -connect relay.example.org:443")
    cmd = tls_proxy_command("relay.test", 8443, ca_file="/etc/ca.pem", connect="::1")
    assert cmd.endswith("-CAfile /etc/ca.pem -connect [::1]:8443")


def test_render_with_tls_sets_the_relay_entry_and_drops_the_fast_path() -> None:
    grants = [ServiceGrant("gpu-cluster", 22)]
    text = render(user="alice", relay_host="relay.example.org", relay_port=2222,
                  services=grants, fast=grants, tls_port=443)
    relay_entry = text.split("Host gpu-cluster")[0]
    assert "ProxyCommand openssl s_client" in relay_entry and "Port 2222" in relay_entry
    # Behind a network that needs TLS the data port is out of reach: ProxyJump, not
    # labrelay connect's fast path.
    assert "ProxyJump labrelay" in text.split("Host gpu-cluster")[1]
    assert "labrelay connect" not in text
    plain = render(user="alice", relay_host="relay.example.org", relay_port=2222,
                   services=grants, fast=grants)
    assert "openssl" not in plain and "labrelay connect" in plain
