"""The admin endpoint's and the public ports' caps as settings (round 17).

``[admin] max_connections``, ``max_connections_per_source``, ``connection_lifetime``,
``max_body`` (bound at start: a reload reports their change and keeps the running
value) and ``[relay] public_max_connections``, ``public_max_per_source`` (read at
each accept: a reload applies them to the next connection).  The loader (and so
``labrelay check``) refuses wrong values with the key path, the problem and a hint;
the defaults are the constants they replace.
"""

from __future__ import annotations

import resource
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.cli.main import main
from relay.config import diff
from relay.config.errors import ConfigError
from relay.config.loader import parse_config
from relay.config.schema import AdminConfig, HostPort, RelayConfig
from relay.core.admission import Admission
from relay.ops import admincap
from relay.server.public import (
    MIN_PUBLIC_CONNECTIONS,
    PublicPorts,
    per_source_exempt,
    public_connection_cap,
)

SOURCE = "node.toml"


def parse(text: str) -> Any:
    return parse_config(text, SOURCE, base_dir=Path("/etc/labrelay"))


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


# --- defaults unchanged -------------------------------------------------------------


def test_the_defaults_are_the_constants_they_replace() -> None:
    admin = parse('[admin]\nlisten = "127.0.0.1:7022"\n').admin
    assert (admin.max_connections, admin.max_connections_per_source,
            admin.connection_lifetime, admin.max_body) == (
        admincap.MAX_CONNECTIONS, admincap.MAX_PER_SOURCE, admincap.LIFETIME,
        admincap.MAX_BODY)
    relay = parse("[relay]\n").relay
    assert relay.public_max_connections is None and relay.public_max_per_source == 128
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert public_connection_cap(None) == max(MIN_PUBLIC_CONNECTIONS, soft // 2)


def test_the_settings_are_read() -> None:
    node = parse('[admin]\nlisten = "127.0.0.1:7022"\nmax_connections = 10\n'
                 'max_connections_per_source = 3\nconnection_lifetime = 5.5\nmax_body = 0\n'
                 '[relay]\npublic_max_connections = 100\npublic_max_per_source = 0\n')
    assert (node.admin.max_connections, node.admin.max_connections_per_source,
            node.admin.connection_lifetime, node.admin.max_body) == (10, 3, 5.5, 0)
    assert node.relay.public_max_connections == 100
    assert node.relay.public_max_per_source == 0


@pytest.mark.parametrize(("body", "keypath", "fragment"), [
    ("max_connections = 0", "admin.max_connections", "between 1 and 4096, got 0"),
    ('max_connections = "32"', "admin.max_connections", "expected an integer"),
    ("max_connections_per_source = 33", "admin.max_connections_per_source",
     "max_connections_per_source (33) must be at most max_connections (32)"),
    ("connection_lifetime = 0", "admin.connection_lifetime", "must be greater than 0, got 0"),
    ("connection_lifetime = 7200", "admin.connection_lifetime", "3600"),
    ("max_body = 2000000", "admin.max_body", "between 0 and 1048576, got 2000000"),
    ("max_body = -1", "admin.max_body", "got -1"),
    ("max_conections = 3", "admin.max_conections", "max_connections"),
])
def test_admin_value_errors(body: str, keypath: str, fragment: str) -> None:
    err = error_of(f'[admin]\nlisten = "127.0.0.1:7022"\n{body}\n')
    assert err.keypath == keypath and err.source == SOURCE
    assert err.hint, "every error says how to fix it"
    assert fragment in str(err), str(err)


@pytest.mark.parametrize(("body", "keypath", "fragment"), [
    ("public_max_connections = 0", "relay.public_max_connections", "at least 1, got 0"),
    ("public_max_per_source = -1", "relay.public_max_per_source", "at least 0, got -1"),
    ("public_max_per_source = 1.5", "relay.public_max_per_source", "expected an integer"),
])
def test_public_value_errors(body: str, keypath: str, fragment: str) -> None:
    err = error_of(f"[relay]\n{body}\n")
    assert err.keypath == keypath and err.hint
    assert fragment in str(err), str(err)


def test_labrelay_check_names_the_key_the_problem_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[admin]\nlisten = "127.0.0.1:7022"\nmax_connections = 4\n'
                    'max_connections_per_source = 8\n[relay]\nstate_dir = "."\n'
                    'public_max_per_source = -3\n')
    assert main(["check", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"{path}: admin.max_connections_per_source: max_connections_per_source (8) " \
           "must be at most max_connections (4)" in err, err
    assert "e.g. max_connections_per_source = 4, or a larger max_connections" in err
    assert f"{path}: relay.public_max_per_source: public_max_per_source must be at " \
           "least 0, got -3" in err, err
    assert "e.g. public_max_per_source = 128" in err


# --- reload semantics -----------------------------------------------------------------

BASE = '[admin]\nlisten = "127.0.0.1:7022"\n[relay]\nlisten = "0.0.0.0:2222"\n'


def test_a_reload_keeps_the_admin_caps_until_a_restart() -> None:
    old = parse(BASE)
    new = parse(BASE.replace('7022"\n', '7022"\nmax_connections = 64\nmax_body = 1024\n'))
    assert diff.diff_admin(old.admin, new.admin) == [
        diff.NeedsRestart("admin", "the admin endpoint is bound when labrelay starts")]


def test_a_reload_applies_the_public_caps() -> None:
    old = parse(BASE)
    new = parse(BASE + "public_max_per_source = 4\npublic_max_connections = 200\n")
    [action] = diff.diff_relay(old.relay, new.relay)
    assert isinstance(action, diff.RelaySettings)
    assert action.fields == ("public_max_connections", "public_max_per_source")
    assert action.new.public_max_per_source == 4


# --- the admin caps are the config's ---------------------------------------------------


class _Sink(Protocol):
    pass


def test_the_admin_site_takes_its_caps_from_the_config() -> None:
    clock = MemoryReactorClock()
    config = AdminConfig(HostPort("127.0.0.1", 0), max_connections=3,
                         max_connections_per_source=2, connection_lifetime=4.0)
    factory = admincap.capped_site(ServerFactory.forProtocol(_Sink), clock, config)
    addr = IPv4Address("TCP", "192.0.2.7", 1)
    first, second = factory.buildProtocol(addr), factory.buildProtocol(addr)
    assert first is not None and second is not None
    assert factory.buildProtocol(addr) is None  # the third from one address
    transport = StringTransport()
    first.makeConnection(transport)
    clock.advance(3.9)
    assert not transport.disconnecting
    clock.advance(0.1)  # its deadline: 4 s, not 30
    assert transport.disconnected or transport.disconnecting
    assert admincap.request_factory(admincap.MAX_BODY) is admincap.BoundedRequest
    assert admincap.request_factory(1024).maxBody == 1024


# --- the public ports' per-source cap -------------------------------------------------


def _ports(config: RelayConfig) -> tuple[PublicPorts, Any]:
    clock = MemoryReactorClock()
    shell = SimpleNamespace(config=config, reactor=clock, admission=Admission(config, clock),
                            counters={"sessions_refused": 0,
                                      "connections_refused_public_per_source": 0})
    return PublicPorts(shell), shell  # type: ignore[arg-type]


def _addr(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 50000)


def test_one_source_holds_at_most_its_share_of_a_port_and_gets_it_back() -> None:
    ports, shell = _ports(RelayConfig(public_max_per_source=2))
    assert ports.admit(8888, _addr("198.51.100.1"))
    assert ports.admit(8888, _addr("198.51.100.1"))
    assert not ports.admit(8888, _addr("198.51.100.1"))
    assert ports.admit(8888, _addr("127.0.0.1")) and ports.admit(8888, _addr("127.0.0.1"))
    assert not ports.admit(8888, _addr("127.0.0.1"))  # loopback is not exempt
    assert ports.admit(8888, _addr("198.51.100.2"))  # others still get in
    assert ports.admit(9999, _addr("198.51.100.1"))  # per port
    assert shell.counters["connections_refused_public_per_source"] == 2
    assert shell.counters["sessions_refused"] == 2
    ports.release(8888, "198.51.100.1/32")
    assert ports.admit(8888, _addr("198.51.100.1"))
    for port, source in list(ports.bySource):
        for _ in range(ports.bySource[(port, source)]):
            ports.release(port, source)
    assert ports.open == 0 and ports.bySource == {}
    ports.stop()
    assert not shell.reactor.getDelayedCalls()


def test_sources_are_netblocks_as_for_the_ssh_port() -> None:
    ports, _ = _ports(RelayConfig(public_max_per_source=1, per_source_netblock4=24))
    assert ports.admit(80, _addr("203.0.113.5"))
    assert not ports.admit(80, _addr("203.0.113.77"))


def test_a_reload_changes_the_per_source_cap_at_the_next_accept() -> None:
    ports, shell = _ports(RelayConfig(public_max_per_source=1))
    assert ports.admit(80, _addr("203.0.113.5"))
    assert not ports.admit(80, _addr("203.0.113.5"))
    shell.config = RelayConfig(public_max_per_source=3)  # what RelayCore.reconfigure does
    assert ports.admit(80, _addr("203.0.113.5"))
    shell.config = RelayConfig(public_max_per_source=0)  # no per-source cap
    assert all(ports.admit(80, _addr("203.0.113.5")) for _ in range(100))
    ports.stop()


def test_public_max_connections_lowers_the_total_never_raises_it() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    half = max(MIN_PUBLIC_CONNECTIONS, soft // 2)
    assert public_connection_cap(10) == min(10, half)
    assert public_connection_cap(10 ** 9) == half
    ports, shell = _ports(RelayConfig(public_max_connections=3, public_max_per_source=0))
    assert all(ports.admit(80, _addr(f"203.0.113.{i}")) for i in range(3))
    assert not ports.admit(80, _addr("203.0.113.9"))
    assert shell.counters["connections_refused_public_per_source"] == 0
    ports.stop()


# --- public_per_source_exempt (round 18) --------------------------------------------------


def test_an_exempt_address_is_counted_in_the_total_only() -> None:
    """A lab's NAT in ``public_per_source_exempt`` holds more than the per-source cap
    and does not take its netblock neighbours' share; the total still binds it."""
    config = RelayConfig(public_max_per_source=2, public_max_connections=6,
                         per_source_netblock4=24,
                         public_per_source_exempt=parse(
                             '[relay]\npublic_per_source_exempt = ["203.0.113.5"]\n'
                         ).relay.public_per_source_exempt)
    ports, shell = _ports(config)
    nat = _addr("203.0.113.5")
    slots = [ports.admit(80, nat) for _ in range(3)]
    assert all(slots) and {s.source for s in slots if s} == {None}
    assert ports.bySource == {}  # not counted against 203.0.113.0/24
    assert ports.admit(80, _addr("203.0.113.6")) and ports.admit(80, _addr("203.0.113.7"))
    assert not ports.admit(80, _addr("203.0.113.8"))  # the /24 (not the NAT) is at 2
    assert shell.counters["connections_refused_public_per_source"] == 1
    assert ports.admit(80, nat)  # a fourth: 6 open in all
    assert not ports.admit(80, nat)  # the total (6) binds the exempt address too
    ports.release(80, None)
    assert ports.open == 5 and ports.admit(80, nat)
    ports.stop()


def test_the_exempt_list_is_its_own_not_penalty_exempt_and_live_on_reload() -> None:
    ports, shell = _ports(RelayConfig(public_max_per_source=1,
                                      penalty_exempt=(ip_network("198.51.100.0/24"),)))
    assert ports.admit(80, _addr("198.51.100.9"))
    assert not ports.admit(80, _addr("198.51.100.9"))  # penalty_exempt changes nothing
    shell.config = RelayConfig(public_max_per_source=1,  # a reload adds the list
                               public_per_source_exempt=(ip_network("198.51.100.0/24"),))
    assert ports.admit(80, _addr("198.51.100.9"))
    assert ports.admit(80, IPv6Address("TCP", "::ffff:198.51.100.9", 1))  # mapped: IPv4
    assert not per_source_exempt("unix-socket", (ip_network("0.0.0.0/0"),))
    ports.stop()
    old = parse(BASE)
    new = parse(BASE + 'public_per_source_exempt = ["192.0.2.0/24", "2001:db8::1"]\n')
    [action] = diff.diff_relay(old.relay, new.relay)
    assert isinstance(action, diff.RelaySettings)
    assert action.fields == ("public_per_source_exempt",)
    assert new.relay.public_per_source_exempt == (ip_network("192.0.2.0/24"),
                                                  ip_network("2001:db8::1/128"))


def test_a_wrong_exempt_entry_names_the_key_and_gives_an_example() -> None:
    err = error_of('[relay]\npublic_per_source_exempt = ["lab-nat"]\n')
    assert err.keypath == "relay.public_per_source_exempt[0]"
    assert "'lab-nat' is not an IP address or network" in str(err)
    assert "public_per_source_exempt = [" in err.hint
