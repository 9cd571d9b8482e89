"""relay.user.connect's command line: what `labrelay connect` is asked to reach, and how."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from relay.config.errors import ConfigError
from relay.ssh.hostkeys import HostKeyVerifier
from relay.user.connect import add_connect_arguments, options_from_args


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USER", "tester")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_connect_arguments(parser)
    return parser.parse_args(list(argv))


def test_ssh_style_flags_and_a_service_by_name() -> None:
    o = options_from_args(parse("-p", "2222", "-i", "/k/alice", "-o",
                                "UserKnownHostsFile=/k/known", "alice@relay.example.org",
                                "GPU-Cluster"))
    assert (o.service, o.port, o.fast_path) == ("gpu-cluster", 22, True)
    assert (o.link.host, o.link.port, o.link.user) == ("relay.example.org", 2222, "alice")
    assert o.link.identities == (Path("/k/alice"),)
    assert o.link.host_key.known_hosts == Path("/k/known")


def test_service_with_a_port_as_ssh_passes_percent_h_percent_p() -> None:
    o = options_from_args(parse("--no-fast-path", "relay", "jupyter:8888"))
    assert (o.service, o.port, o.fast_path) == ("jupyter", 8888, False)


@pytest.mark.parametrize("service", ["gpu:port", "gpu:0", "gpu:70000", ":22"])
def test_bad_service_is_refused_with_an_example(service: str) -> None:
    with pytest.raises(ConfigError) as info:
        options_from_args(parse("relay", service))
    assert "expected SERVICE or SERVICE:PORT" in str(info.value)
    assert "gpu-cluster" in info.value.hint


def test_strict_host_key_checking_no_is_refused() -> None:
    with pytest.raises(ConfigError):
        options_from_args(parse("-o", "StrictHostKeyChecking=no", "relay", "gpu"))


class _Conn:
    """An SSH connection whose TCP transport is connected to ``host``."""

    def __init__(self, host: str) -> None:
        from types import SimpleNamespace

        from twisted.internet.address import IPv4Address

        peer = IPv4Address("TCP", host, 2222)
        self.link_transport = SimpleNamespace(tcp=SimpleNamespace(getPeer=lambda: peer))


def test_the_data_port_is_dialled_at_the_ssh_connection_peer() -> None:
    """``labrelay connect`` dials the data port at the IP its SSH connection reached,
    never at a fresh resolution of the relay's name (docs/fastpath.md, docs/security.md:
    an on-path box that answers for the name must not get the data connection)."""
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from relay.core import fastwire as fw
    from relay.user.connect import Connector

    options = options_from_args(parse("-p", "2222", "alice@relay.example.org", "gpu-cluster"))
    reactor = MemoryReactorClock()
    connector = Connector(options, reactor, identities=[])
    connector.conn = _Conn("192.0.2.7")  # the address whose host key was checked
    d = defer.ensureDeferred(connector._fast(2223, b"\x01" * fw.TOKEN_LEN))
    assert [(c[0], c[1]) for c in reactor.tcpClients] == [("192.0.2.7", 2223)]
    d.cancel()
    d.addErrback(lambda f: None)


@pytest.mark.parametrize(("strict", "accept_new"),
                         [("ask", False), ("true", False), ("accept-new", True), ("false", True)])
def test_what_ssh_G_resolved_is_the_link(strict: str, accept_new: bool) -> None:
    """The relay from ``ssh -G``: its HostName, Port, User and known_hosts; a host key is
    never taken on trust ("ask": no one to ask, so "yes"; "no" is accept-new)."""
    from relay.user.sshresolve import Resolved

    resolved = Resolved(hostname="relay.example.org", port=2222, user="alice",
                        identity_files=("~/.ssh/lab",), identities_only=True,
                        known_hosts=("/k/known", "/k/known2"), strict_host_key_checking=strict,
                        connect_timeout=7.0, identity_agent=None)
    o = options_from_args(parse("myrelay", "gpu-cluster"), resolved)
    assert (o.link.host, o.link.port, o.link.user) == ("relay.example.org", 2222, "alice")
    assert o.link.host_key.known_hosts == Path("/k/known")
    assert o.link.host_key.accept_new is accept_new
    assert o.link.connect_timeout == 7.0
    assert o.link.host_key.extra_known_hosts == (Path("/k/known2"),)


def test_every_known_hosts_file_ssh_reads_is_read_in_ssh_order() -> None:
    """ssh reads all its UserKnownHostsFile entries, then GlobalKnownHostsFile (a lab
    admin may put the relay's key there): so does connect; only the first user file
    is written (``known_hosts``), and --host-key replaces them all."""
    from relay.user.sshresolve import Resolved

    resolved = Resolved(hostname="relay", port=22, user="alice", identity_files=(),
                        identities_only=False, known_hosts=("/u/kh", "/u/kh2"),
                        strict_host_key_checking="yes", connect_timeout=None,
                        identity_agent=None, global_known_hosts=("/g/a", "/g/b"))
    o = options_from_args(parse("relay", "gpu"), resolved)
    assert o.link.host_key.known_hosts == Path("/u/kh")
    assert o.link.host_key.extra_known_hosts == (Path("/u/kh2"),)
    assert o.link.host_key.global_known_hosts == (Path("/g/a"), Path("/g/b"))
    assert HostKeyVerifier(o.link.host_key, "relay", 22).files == tuple(
        Path(p) for p in ("/u/kh", "/u/kh2", "/g/a", "/g/b"))
    fp = "SHA256:" + "A" * 43
    pinned = options_from_args(parse("--host-key", fp, "relay", "gpu"), resolved).link.host_key
    assert (pinned.fingerprint, pinned.extra_known_hosts, pinned.global_known_hosts) == (
        fp, (), ())


def test_known_hosts_none_from_ssh_is_no_file_never_a_file_named_none() -> None:
    """``UserKnownHostsFile none`` (ssh -G prints ``none``) reads no user file, as ssh.c;
    it was passed through as the path ``none``, relative to the current directory."""
    from relay.user.sshresolve import from_options
    from relay.user.sshresolve import parse as parse_g

    resolved = from_options(parse_g("hostname relay\nport 22\nuser a\n"
                                    "userknownhostsfile none\n"
                                    "globalknownhostsfile /g/a\n"))
    policy = options_from_args(parse("relay", "gpu"), resolved).link.host_key
    assert policy.no_user_known_hosts
    assert HostKeyVerifier(policy, "relay", 22).files == (Path("/g/a"),)
    resolved = from_options(parse_g("hostname relay\nuserknownhostsfile none\n"
                                    "globalknownhostsfile none\n"))
    policy = options_from_args(parse("relay", "gpu"), resolved).link.host_key
    assert HostKeyVerifier(policy, "relay", 22).files == ()


def test_without_ssh_the_files_are_ssh_defaults(tmp_path: Path) -> None:
    o = options_from_args(parse("relay", "gpu"))
    assert o.link.host_key.known_hosts == tmp_path / ".ssh" / "known_hosts"
    assert o.link.host_key.extra_known_hosts == (Path("~/.ssh/known_hosts2"),)
    assert o.link.host_key.global_known_hosts == (
        Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2"))
    o = options_from_args(parse("-o", "userknownhostsfile /k/known", "relay", "gpu"))
    assert o.link.host_key.known_hosts == Path("/k/known")
    assert o.link.host_key.extra_known_hosts == ()
    assert o.link.host_key.global_known_hosts == (
        Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2"))
    # ssh's other forms work without ssh too: several files, none, GlobalKnownHostsFile.
    o = options_from_args(parse("-o", "UserKnownHostsFile=/k/a /k/b", "-o",
                                "GlobalKnownHostsFile none", "relay", "gpu"))
    assert HostKeyVerifier(o.link.host_key, "relay", 22).files == (Path("/k/a"), Path("/k/b"))
    o = options_from_args(parse("-o", "UserKnownHostsFile=none", "relay", "gpu"))
    assert HostKeyVerifier(o.link.host_key, "relay", 22).files == (
        Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2"))
