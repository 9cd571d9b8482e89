"""relay.config.loader's [relay] section and relay.cli.relayargs: defaults, rules, errors."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from twisted.conch.ssh.keys import Key

from relay.cli.relayargs import add_relay_arguments, config_from_relay_args
from relay.config.errors import ConfigError
from relay.config.grammar import parse_public_key, parse_service_grant, parse_service_name
from relay.config.loader import parse_config
from relay.config.schema import (
    DEFAULT_MAX_PACKET,
    DEFAULT_WINDOW,
    AdminConfig,
    CrowdingConfig,
    HostPort,
    Keepalive,
    NodeConfig,
    PenaltyConfig,
    PrincipalConfig,
    RelayConfig,
    ServiceGrant,
)

SOURCE = "node.toml"
BASE = Path("/etc/labrelay")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Six real public-key lines from ssh-keygen (ed25519, and one ECDSA)."""
    directory = tmp_path_factory.mktemp("keys")
    lines = []
    for i in range(6):
        path = directory / f"k{i}"
        kind = ["-t", "ecdsa", "-b", "256"] if i == 5 else ["-t", "ed25519"]
        subprocess.run(
            ["ssh-keygen", "-q", *kind, "-N", "", "-C", f"key{i}", "-f", str(path)], check=True
        )
        lines.append((directory / f"k{i}.pub").read_text().strip())
    return lines


@pytest.fixture(scope="module")
def private_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("private") / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.read_text()


def parse(text: str) -> NodeConfig:
    return parse_config(text, SOURCE, base_dir=BASE)


def relay_of(text: str) -> RelayConfig:
    relay = parse(text).relay
    assert relay is not None
    return relay


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def check(err: ConfigError, keypath: str, *fragments: str, source: str = SOURCE) -> None:
    """The error names the file and key path, carries a hint, and says ``fragments``."""
    assert err.source == source
    assert err.keypath == keypath
    assert err.hint, "every error carries a hint"
    message = str(err)
    assert message.startswith(f"{source}: {keypath}: " if keypath else f"{source}: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def agent(key: str, name: str = "lab_pc", body: str = "") -> str:
    return f'[[relay.agent]]\nname = "{name}"\nkeys = ["{key}"]\n{body}\n'


def user(key: str, name: str = "alice", body: str = "") -> str:
    return f'[[relay.user]]\nname = "{name}"\nkeys = ["{key}"]\n{body}\n'


# --- the happy path -----------------------------------------------------------


def test_full_relay_section(keys: list[str]) -> None:
    relay = relay_of(
        f"""
[relay]
listen = "0.0.0.0:2222"
state_dir = "state"
public_bind = "203.0.113.7"
agents_file = "agents"
users_file = "/srv/users"
login_grace = 20
max_auth_tries = 3
max_unauthenticated = 10
max_channels = 100
max_sessions_per_user = 8
idle_timeout = 600
public_wait = 5.5
keepalive_interval = 10
keepalive_count = 4
window = 1048576
max_packet = 16384

[[relay.agent]]
name = "lab_pc"
keys = ["{keys[0]}", "{keys[1]}"]
services = ["gpu-cluster:22", "jupyter:8888", "TensorBoard:*"]
public_ports = [2201, 2202]

[[relay.user]]
name = "alice"
keys = ["{keys[2]}"]
services = ["gpu-cluster:22", "jupyter:*"]
max_sessions = 10

[[relay.user]]
name = "bob"
keys = "{keys[3]}"
services = ["*"]
"""
    )
    assert relay == RelayConfig(
        listen=HostPort("0.0.0.0", 2222),
        state_dir=BASE / "state",
        public_bind="203.0.113.7",
        agents_file=BASE / "agents",
        users_file=Path("/srv/users"),
        agents=(
            PrincipalConfig(
                kind="agent",
                name="lab_pc",
                keys=(keys[0], keys[1]),
                services=(
                    ServiceGrant("gpu-cluster", 22),
                    ServiceGrant("jupyter", 8888),
                    ServiceGrant("tensorboard", None),
                ),
                public_ports=(2201, 2202),
            ),
        ),
        users=(
            PrincipalConfig(
                kind="user",
                name="alice",
                keys=(keys[2],),
                services=(ServiceGrant("gpu-cluster", 22), ServiceGrant("jupyter", None)),
                max_sessions=10,
            ),
            PrincipalConfig(
                kind="user", name="bob", keys=(keys[3],), services=(ServiceGrant("*", None),)
            ),
        ),
        login_grace=20.0,
        max_auth_tries=3,
        max_unauthenticated=10,
        max_channels=100,
        max_sessions_per_user=8,
        idle_timeout=600.0,
        public_wait=5.5,
        keepalive=Keepalive(10.0, 4),
        window=1048576,
        max_packet=16384,
    )


def test_empty_relay_section_gives_the_defaults() -> None:
    relay = relay_of("[relay]\n")
    assert relay == RelayConfig()
    assert relay.listen == HostPort("0.0.0.0", 2222)
    assert relay.state_dir == Path("/var/lib/labrelay")
    assert relay.window == DEFAULT_WINDOW and relay.max_packet == DEFAULT_MAX_PACKET


def test_no_relay_section_is_none() -> None:
    assert parse("").relay is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2222", HostPort("0.0.0.0", 2222)),
        (":2222", HostPort("0.0.0.0", 2222)),
        ("*:2222", HostPort("0.0.0.0", 2222)),
        ("127.0.0.1:0", HostPort("127.0.0.1", 0)),
        ("[::]:2222", HostPort("::", 2222)),
    ],
)
def test_listen_forms(text: str, expected: HostPort) -> None:
    assert relay_of(f'[relay]\nlisten = "{text}"').listen == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("*", "0.0.0.0"), ("::", "::"), ("[::1]", "::1"), ("10.1.2.3", "10.1.2.3")],
)
def test_public_bind_forms(text: str, expected: str) -> None:
    assert relay_of(f'[relay]\npublic_bind = "{text}"').public_bind == expected


def test_same_key_twice_in_one_principal_is_harmless(keys: list[str]) -> None:
    relay = relay_of(f'[[relay.agent]]\nname = "a"\nkeys = ["{keys[0]}", "{keys[0]}"]')
    assert relay.agents[0].keys == (keys[0], keys[0])


def test_repeated_grants_are_merged(keys: list[str]) -> None:
    relay = relay_of(
        agent(keys[0], body='services = ["a:1", "A:1", "a:1"]\npublic_ports = [2201, 2201]')
    )
    assert relay.agents[0].services == (ServiceGrant("a", 1),)
    assert relay.agents[0].public_ports == (2201,)


def test_agent_and_user_may_share_a_name(keys: list[str]) -> None:
    relay = relay_of(agent(keys[0], "lab") + user(keys[1], "lab"))
    assert relay.agents[0].name == relay.users[0].name == "lab"


# --- errors in [relay] itself -----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "keypath", "fragment"),
    [
        ("login_grace = 0", "relay.login_grace", "greater than 0"),
        ("max_auth_tries = 0", "relay.max_auth_tries", "at least 1"),
        ("max_unauthenticated = 0", "relay.max_unauthenticated", "at least 1"),
        ("max_channels = 0", "relay.max_channels", "at least 1"),
        ("max_sessions_per_user = 0", "relay.max_sessions_per_user", "at least 1"),
        ("idle_timeout = -1", "relay.idle_timeout", "at least 0"),
        ("public_wait = -1", "relay.public_wait", "at least 0"),
        ("resume_grace = -1", "relay.resume_grace", "at least 0"),
        ("resume_grace = 90000", "relay.resume_grace", "at most 86400"),
        ("resume_max_sessions = -1", "relay.resume_max_sessions", "at least 0"),
        ("resume_max_sessions_per_agent = -1", "relay.resume_max_sessions_per_agent",
         "at least 0"),
        ("keepalive_interval = -1", "relay.keepalive_interval", "at least 0"),
        ("keepalive_count = 0", "relay.keepalive_count", "at least 1"),
        ("window = 1024", "relay.window", "between 32768 and 16777216"),
        ("max_packet = 100", "relay.max_packet", "between 1024 and 262144"),
        ('listen = "host:port"', "relay.listen", "port 'port' is not a number"),
        ('listen = "99999"', "relay.listen", "out of range"),
        ('public_bind = "example.org"', "relay.public_bind", "not an IP address"),
        ('state_dir = ""', "relay.state_dir", "must not be empty"),
        ("agents_file = 3", "relay.agents_file", "expected a string"),
        ("login_grace = true", "relay.login_grace", "expected a number"),
        ('early_confirm = "yes"', "relay.early_confirm", "expected true or false"),
        ("early_confirm = 1", "relay.early_confirm", "expected true or false"),
    ],
)
def test_relay_value_errors(line: str, keypath: str, fragment: str) -> None:
    check(error_of(f"[relay]\n{line}\n"), keypath, fragment)


def test_resumable_sessions_are_capped_per_agent_and_in_all() -> None:
    default = relay_of("[relay]\n")
    assert (default.resume_max_sessions_per_agent, default.resume_max_sessions) == (128, 512)
    relay = relay_of("[relay]\nresume_max_sessions_per_agent = 8\nresume_max_sessions = 20\n")
    assert (relay.resume_max_sessions_per_agent, relay.resume_max_sessions) == (8, 20)


def test_early_confirm_is_on_unless_turned_off() -> None:
    assert relay_of("[relay]\n").early_confirm is True
    assert relay_of("[relay]\nearly_confirm = false\n").early_confirm is False
    err = error_of('[relay]\nearly_confirm = "no"\n')
    check(err, "relay.early_confirm", "expected true or false", "early_confirm = true")


def test_max_packet_must_fit_the_window() -> None:
    err = error_of("[relay]\nwindow = 65536\nmax_packet = 131072\n")
    check(err, "relay.max_packet", "larger than window 65536", "window = 2097152")


@pytest.mark.parametrize(
    ("key", "guess"),
    [
        ("LoginGraceTime", "login_grace"),
        ("MaxAuthTries", "max_auth_tries"),
        ("MaxStartups", "max_unauthenticated"),
        ("ClientAliveInterval", "keepalive_interval"),
        ("state-dir", "state_dir"),
    ],
)
def test_openssh_spellings_get_a_suggestion(key: str, guess: str) -> None:
    err = error_of(f"[relay]\n{key} = 1\n")
    check(err, f"relay.{key}", f"unknown key '{key}'", f"did you mean '{guess}'")


def test_relay_must_be_a_table() -> None:
    check(error_of('relay = "yes"'), "relay", "expected a table")


def test_agents_must_be_tables() -> None:
    err = error_of('[relay]\nagent = "lab_pc"\n')
    check(err, "relay.agent", "expected an array of tables", "write one [[relay.agent]] table")


# --- errors in [[relay.agent]] / [[relay.user]] ---------------------------------------


def test_principal_needs_a_name(keys: list[str]) -> None:
    err = error_of(f'[[relay.agent]]\nkeys = ["{keys[0]}"]\n')
    check(err, "relay.agent[0].name", "missing required key 'name'", 'name = "lab_pc"')


def test_principal_name_rules(keys: list[str]) -> None:
    err = error_of(agent(keys[0], name="lab pc"))
    check(err, "relay.agent[0].name", "'lab pc'", "without spaces")


def test_principal_needs_keys() -> None:
    err = error_of('[[relay.user]]\nname = "alice"\n')
    check(err, "relay.user[0].keys", "missing required key 'keys'", "ssh-ed25519")
    err = error_of('[[relay.user]]\nname = "alice"\nkeys = []\n')
    check(err, "relay.user[0].keys", "the user has no keys")


def test_unknown_key_in_agent_names_the_valid_ones(keys: list[str]) -> None:
    err = error_of(agent(keys[0], body="max_sessions = 3"))
    check(err, "relay.agent[0].max_sessions", "unknown key 'max_sessions'", "public_ports")


def test_public_ports_are_for_agents(keys: list[str]) -> None:
    err = error_of(user(keys[0], body="public_ports = [2201]"))
    check(err, "relay.user[0].public_ports", "unknown key 'public_ports'", "max_sessions")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("ssh-ed25519 AAAA", "not a valid ssh-ed25519 public key"),
        ("ssh-ed25519 !!!!", "not base64"),
        ("ssh-ed25519", "expected 'TYPE BASE64 [comment]'"),
        ("ssh-dss AAAAB3NzaC1kc3M=", "DSA keys are obsolete"),
        ("ssh-ed25519-cert-v01@openssh.com AAAA", "certificates"),
    ],
)
def test_bad_keys_name_their_index(keys: list[str], key: str, fragment: str) -> None:
    err = error_of(f'[[relay.agent]]\nname = "a"\nkeys = ["{keys[0]}", "{key}"]\n')
    check(err, "relay.agent[0].keys[1]", fragment, "ssh-ed25519 AAAAC3")


def test_key_type_must_match_the_key_data(keys: list[str]) -> None:
    body = keys[0].split()[1]
    err = error_of(agent(f"ssh-rsa {body} x"))
    check(err, "relay.agent[0].keys[0]", "says ssh-rsa but the key data is ssh-ed25519")


def test_private_key_is_refused(private_key: str) -> None:
    text = private_key.replace("\n", "\\n")
    err = error_of(user(text))
    check(err, "relay.user[0].keys[0]", "this is a private key")


@pytest.mark.parametrize(
    ("service", "fragment"),
    [
        ("gpu-cluster", "has no ':port'"),
        ("gpu-cluster:", "port '' is not a number"),
        ("gpu-cluster:0", "out of range 1..65535"),
        ("gpu-cluster:65536", "out of range 1..65535"),
        ("-gpu:22", "must start with a letter or digit"),
        ("gpu cluster:22", "must start with a letter or digit"),
        ("10.0.0.5:22", "looks like an address"),
        ("[::1]:22", "never addresses"),
        ("localhost:22", "'localhost' cannot be a service name"),
        ("*:22", "an agent is granted names one by one"),
        ("*", "has no ':port'"),
    ],
)
def test_agent_service_errors(keys: list[str], service: str, fragment: str) -> None:
    err = error_of(agent(keys[0], body=f'services = ["a:1", "{service}"]'))
    check(err, "relay.agent[0].services[1]", fragment, '"gpu-cluster:22"')


@pytest.mark.parametrize(
    ("service", "fragment"),
    [("jupyter", "has no ':port'"), ("127.0.0.1:8888", "looks like an address")],
)
def test_user_service_errors(keys: list[str], service: str, fragment: str) -> None:
    err = error_of(user(keys[0], body=f'services = ["{service}"]'))
    check(err, "relay.user[0].services[0]", fragment, '"*" (every service)')


def test_user_wildcards(keys: list[str]) -> None:
    relay = relay_of(user(keys[0], body='services = ["*", "*:22", "*:*"]'))
    assert relay.users[0].services == (ServiceGrant("*", None), ServiceGrant("*", 22))


@pytest.mark.parametrize(
    ("value", "keypath", "fragment"),
    [
        ("[0]", "relay.agent[0].public_ports[0]", "between 1 and 65535, got 0"),
        ("[2201, 70000]", "relay.agent[0].public_ports[1]", "between 1 and 65535, got 70000"),
        ('["2201"]', "relay.agent[0].public_ports[0]", "expected an integer"),
        ("2201.5", "relay.agent[0].public_ports", "expected an integer"),
    ],
)
def test_public_port_errors(keys: list[str], value: str, keypath: str, fragment: str) -> None:
    err = error_of(agent(keys[0], body=f"public_ports = {value}"))
    check(err, keypath, fragment, "public_ports = [2201]")


def test_max_sessions_at_least_one(keys: list[str]) -> None:
    err = error_of(user(keys[0], body="max_sessions = 0"))
    check(err, "relay.user[0].max_sessions", "at least 1", "max_sessions = 10")


# --- conflicts between principals ---------------------------------------------------


def test_duplicate_agent_names(keys: list[str]) -> None:
    err = error_of(agent(keys[0], "lab") + agent(keys[1], "lab"))
    check(
        err,
        "relay.agent[1].name",
        "duplicate agent name 'lab' (also relay.agent[0].name)",
        "one agent may have several keys",
    )


def test_duplicate_user_names(keys: list[str]) -> None:
    err = error_of(user(keys[0], "bo") + user(keys[1], "bo"))
    check(err, "relay.user[1].name", "duplicate user name 'bo'")


def test_one_key_in_two_principals(keys: list[str]) -> None:
    err = error_of(agent(keys[0], "lab") + user(keys[0], "alice"))
    check(
        err,
        "relay.user[0].keys[0]",
        "this key already belongs to agent 'lab' (also relay.agent[0].keys[0])",
        "identity comes from the key",
    )


def test_one_key_in_two_agents(keys: list[str]) -> None:
    err = error_of(agent(keys[0], "a") + agent(keys[0], "b"))
    check(err, "relay.agent[1].keys[0]", "already belongs to agent 'a'")


def test_the_same_key_in_another_spelling_is_the_same_key(keys: list[str]) -> None:
    """Identity is the key material, not the line: a different comment changes nothing."""
    other = keys[0].rsplit(" ", 1)[0] + " another-comment"
    err = error_of(agent(keys[0], "a") + user(other, "b"))
    check(err, "relay.user[0].keys[0]", "already belongs to agent 'a'")


def test_one_service_name_for_two_agents(keys: list[str]) -> None:
    text = agent(keys[0], "a", 'services = ["gpu:22"]') + agent(
        keys[1], "b", 'services = ["x:1", "GPU:2222"]'
    )
    err = error_of(text)
    check(
        err,
        "relay.agent[1].services[1]",
        "service 'gpu' is already granted to agent 'a' (also relay.agent[0].services[0])",
        "one owning agent",
    )


def test_users_may_share_services(keys: list[str]) -> None:
    relay = relay_of(
        user(keys[0], "a", 'services = ["gpu:22"]') + user(keys[1], "b", 'services = ["gpu:22"]')
    )
    assert len(relay.users) == 2


def test_one_public_port_for_two_agents(keys: list[str]) -> None:
    text = agent(keys[0], "a", "public_ports = [2201]") + agent(
        keys[1], "b", "public_ports = [2201]"
    )
    err = error_of(text)
    check(
        err,
        "relay.agent[1].public_ports[0]",
        "public port 2201 is already granted to agent 'a' (also relay.agent[0].public_ports[0])",
        "pick another port",
    )


def test_public_port_cannot_be_the_relay_port(keys: list[str]) -> None:
    err = error_of('[relay]\nlisten = "2222"\n' + agent(keys[0], body="public_ports = [2222]"))
    check(err, "relay.agent[0].public_ports[0]", "the relay's own SSH port (also relay.listen)")


def test_public_port_may_equal_the_relay_port_on_other_addresses(keys: list[str]) -> None:
    relay = relay_of(
        '[relay]\nlisten = "127.0.0.1:2222"\npublic_bind = "10.0.0.1"\n'
        + agent(keys[0], body="public_ports = [2222]")
    )
    assert relay.agents[0].public_ports == (2222,)


def test_links_still_parse_next_to_a_relay(keys: list[str]) -> None:
    config = parse('[[link]]\nhost = "up.example.org"\nuser = "u"\n' + agent(keys[0]))
    assert config.links[0].host == "up.example.org"
    assert config.relay is not None and config.relay.agents[0].name == "lab_pc"


# --- the public helpers ----------------------------------------------------------------


def test_parse_service_grant_and_name() -> None:
    assert parse_service_grant("Jupyter:*", "agent", source="s", keypath="k") == ServiceGrant(
        "jupyter", None
    )
    assert parse_service_grant("*", "user", source="s", keypath="k") == ServiceGrant("*", None)
    assert parse_service_name("GPU-cluster", source="s", keypath="k") == "gpu-cluster"
    with pytest.raises(ConfigError) as info:
        parse_service_name("a:b", source="s", keypath="k")
    check(info.value, "k", "must start with a letter or digit", source="s")


def test_service_grant_matching() -> None:
    assert ServiceGrant("gpu", 22).matches("gpu", 22)
    assert not ServiceGrant("gpu", 22).matches("gpu", 23)
    assert not ServiceGrant("gpu", 22).matches("gpu2", 22)
    assert ServiceGrant("gpu", None).matches("gpu", 7)
    assert ServiceGrant("*", None).matches("anything", 7)
    assert ServiceGrant("*", 22).matches("anything", 22)
    assert not ServiceGrant("*", 22).matches("anything", 23)
    assert str(ServiceGrant("*", None)) == "*:*"


def test_parse_public_key_gives_the_wire_blob(keys: list[str]) -> None:
    blob, comment = parse_public_key(keys[5], source="s", keypath="k")
    assert blob == Key.fromString(keys[5]).blob()
    assert comment == "key5"


# --- labrelay relay's command line -------------------------------------------------------


def relay_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_relay_arguments(parser)
    return parser.parse_args(list(argv))


def grant_file(path: Path, line: str) -> Path:
    path.write_text(line + "\n")
    return path


def test_cli_without_grants_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args())
    check(
        info.value,
        "",
        "nobody may use this relay: give --agents/--users or [[relay.agent]]/[[relay.user]]",
        source="command line",
    )


def test_cli_config_without_grants_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[relay]\nlisten = "2222"\n')
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args("--config", str(config)))
    check(info.value, "", "nobody may use this relay", source=str(config))


def test_cli_flags_only(tmp_path: Path, keys: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    grant_file(tmp_path / "agents", f'permitlisten="gpu:22" {keys[0]}')
    grant_file(tmp_path / "users", f'permitopen="gpu:22" {keys[1]}')
    config = config_from_relay_args(
        relay_args(
            "--agents",
            "agents",
            "--users",
            "users",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "state",
            "--public-bind",
            "127.0.0.1",
            "--admin",
            "7023",
        )
    )
    assert config.source == "command line"
    assert config.admin == AdminConfig(HostPort("127.0.0.1", 7023))
    assert config.relay == RelayConfig(
        listen=HostPort("127.0.0.1", 0),
        state_dir=tmp_path / "state",
        public_bind="127.0.0.1",
        agents_file=tmp_path / "agents",
        users_file=tmp_path / "users",
    )


def test_cli_defaults_with_one_file(tmp_path: Path, keys: list[str]) -> None:
    users = grant_file(tmp_path / "users", f"{keys[1]}")
    config = config_from_relay_args(relay_args("--users", str(users)))
    assert config.relay == RelayConfig(users_file=users)
    assert config.relay.state_dir == Path("/var/lib/labrelay")
    assert config.admin is None


def test_cli_flags_override_the_config(tmp_path: Path, keys: list[str]) -> None:
    config_path = tmp_path / "node.toml"
    config_path.write_text(
        '[admin]\nlisten = "127.0.0.1:7022"\n'
        '[relay]\nlisten = "2222"\nstate_dir = "st"\nlogin_grace = 5\n' + agent(keys[0])
    )
    ns = relay_args(str(config_path), "--listen", "2300", "--admin", "127.0.0.1:7100")
    config = config_from_relay_args(ns)
    assert config.source == str(config_path)
    assert config.relay is not None
    assert config.relay.listen == HostPort("0.0.0.0", 2300)
    assert config.relay.state_dir == tmp_path / "st"
    assert config.relay.login_grace == 5
    assert config.relay.agents[0].name == "lab_pc"
    assert config.admin == AdminConfig(HostPort("127.0.0.1", 7100))
    same = config_from_relay_args(relay_args("--config", str(config_path)))
    assert same.relay is not None and same.relay.listen == HostPort("0.0.0.0", 2222)


@pytest.mark.parametrize(
    ("argv", "keypath", "fragment"),
    [
        (("--listen", "nope"), "--listen", "port 'nope' is not a number"),
        (("--public-bind", "example.org"), "--public-bind", "not an IP address"),
        (("--admin", "0.0.0.0:7022"), "--admin", "must listen on a loopback address"),
    ],
)
def test_cli_flag_errors(
    tmp_path: Path, keys: list[str], argv: tuple[str, ...], keypath: str, fragment: str
) -> None:
    users = grant_file(tmp_path / "users", keys[1])
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args("--users", str(users), *argv))
    check(info.value, keypath, fragment, source="command line")


def test_cli_config_given_twice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args("a.toml", "--config", "b.toml"))
    check(info.value, "--config", "given twice", source="command line")


def test_cli_missing_grant_file(tmp_path: Path) -> None:
    missing = tmp_path / "agents"
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args("--agents", str(missing)))
    check(info.value, "", "cannot read the agents file", source=str(missing))


def test_cli_public_port_on_the_relay_port(tmp_path: Path, keys: list[str]) -> None:
    agents = grant_file(tmp_path / "agents", f'permitlisten="2300" {keys[0]}')
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args("--agents", str(agents), "--listen", "2300"))
    check(
        info.value,
        'permitlisten="2300"',
        "the relay's own SSH port (also relay.listen in command line)",
        source=f"{agents}:1",
    )


# --- the fast path's keys ---------------------------------------------------------


def test_fast_path_is_off_by_default_and_on_with_a_data_port() -> None:
    assert relay_of("[relay]\n").data_port is None
    relay = relay_of('[relay]\ndata_port = 2223\ndata_bind = "127.0.0.1"\n'
                     'e2e_services = ["gpu-cluster:22", "*:22", "GPU-Cluster:22"]\n'
                     "token_lifetime = 3\ndata_hello_timeout = 2\n")
    assert relay.data_port == 2223 and relay.data_bind == "127.0.0.1"
    assert relay.e2e_services == (ServiceGrant("gpu-cluster", 22), ServiceGrant("*", 22))
    assert (relay.token_lifetime, relay.data_hello_timeout) == (3, 2)
    assert relay_of("[relay]\ndata_port = 0\n").data_port == 0  # any free port


@pytest.mark.parametrize(
    ("line", "keypath", "fragment"),
    [
        ("data_port = 70000", "relay.data_port", "between 0 and 65535"),
        ('data_bind = "example.org"', "relay.data_bind", "not an IP address"),
        ('e2e_services = ["gpu cluster:22"]', "relay.e2e_services[0]", "gpu cluster"),
        ("token_lifetime = 0", "relay.token_lifetime", "greater than 0"),
        ("data_hello_timeout = -1", "relay.data_hello_timeout", "greater than 0"),
    ],
)
def test_fast_path_value_errors(line: str, keypath: str, fragment: str) -> None:
    check(error_of(f"[relay]\n{line}\n"), keypath, fragment)


def test_cli_turns_the_fast_path_on(tmp_path: Path, keys: list[str]) -> None:
    users = grant_file(tmp_path / "users", f"{keys[1]}")
    config = config_from_relay_args(relay_args("--users", str(users), "--data-port", "2223",
                                               "--e2e", "gpu-cluster:22", "--e2e", "*:22"))
    assert config.relay is not None
    assert config.relay.data_port == 2223
    assert config.relay.e2e_services == (ServiceGrant("gpu-cluster", 22), ServiceGrant("*", 22))
    with pytest.raises(ConfigError) as info:
        config_from_relay_args(relay_args("--users", str(users), "--data-port", "x"))
    check(info.value, "--data-port x", "not a port number", source="command line")


# --- per-source limits and penalties --------------------------------------------------


def test_per_source_defaults() -> None:
    relay = relay_of("[relay]\n")
    assert relay.per_source_max_unauthenticated == 10
    assert (relay.per_source_netblock4, relay.per_source_netblock6) == (32, 64)
    assert relay.penalties == PenaltyConfig(
        enabled=True, authfail=5, noauth=1, grace_exceeded=20, protocol=10, max=600, min=15,
        max_sources=65536, overflow="permissive")
    assert relay.penalty_exempt == ()


def test_per_source_settings() -> None:
    relay = relay_of("""
[relay]
per_source_max_unauthenticated = 3
per_source_netblock4 = 24
per_source_netblock6 = 48
penalty_exempt = ["192.0.2.0/24", "2001:db8::1", "192.0.2.0/24"]

[relay.penalties]
authfail = 30
noauth = 0
grace_exceeded = 60.5
protocol = 90
max = 3600
min = 0
max_sources = 1000
overflow = "deny-all"
""")
    assert relay.per_source_max_unauthenticated == 3
    assert (relay.per_source_netblock4, relay.per_source_netblock6) == (24, 48)
    assert [str(n) for n in relay.penalty_exempt] == ["192.0.2.0/24", "2001:db8::1/128"]
    assert relay.penalties == PenaltyConfig(
        enabled=True, authfail=30, noauth=0, grace_exceeded=60.5, protocol=90, max=3600,
        min=0, max_sources=1000, overflow="deny-all")
    assert relay_of("[relay.penalties]\nenabled = false\n").penalties.enabled is False


@pytest.mark.parametrize(
    ("line", "keypath", "fragment"),
    [
        ("per_source_max_unauthenticated = 0", "relay.per_source_max_unauthenticated",
         "at least 1"),
        ("per_source_netblock4 = 33", "relay.per_source_netblock4", "between 0 and 32"),
        ("per_source_netblock6 = 129", "relay.per_source_netblock6", "between 0 and 128"),
        ('penalty_exempt = ["lab.example.org"]', "relay.penalty_exempt[0]",
         "not an IP address or network"),
        ("penalty_exempt = [1]", "relay.penalty_exempt", "expected a string"),
        ('penalties = "on"', "relay.penalties", "expected a table"),
        ("penalties = { authfail = -1 }", "relay.penalties.authfail", "at least 0"),
        ("penalties = { max = 0 }", "relay.penalties.max", "greater than 0"),
        ("penalties = { min = 600 }", "relay.penalties.min", "must be below max"),
        ("penalties = { max_sources = 0 }", "relay.penalties.max_sources", "between 1 and"),
        ('penalties = { overflow = "deny" }', "relay.penalties.overflow", '"deny-all"'),
        ('penalties = { enabled = "yes" }', "relay.penalties.enabled", "true or false"),
        ("penalties = { crash = 90 }", "relay.penalties.crash", "unknown key 'crash'"),
    ],
)
def test_per_source_errors(line: str, keypath: str, fragment: str) -> None:
    check(error_of(f"[relay]\n{line}\n"), keypath, fragment)


def test_crowding_defaults_settings_and_a_short_login_grace() -> None:
    assert relay_of("[relay]\n").crowding == CrowdingConfig(
        enabled=True, silent=2, handshake=10, auth=20, netblock4=24, netblock6=48)
    relay = relay_of("[relay]\n[relay.crowding]\nsilent = 1.5\nhandshake = 4\nauth = 30\n")
    assert relay.crowding == CrowdingConfig(enabled=True, silent=1.5, handshake=4, auth=30)
    assert relay_of("[relay.crowding]\nenabled = false\n").crowding.enabled is False
    # a login_grace shorter than a default stage shortens that stage, set or not
    assert relay_of("[relay]\nlogin_grace = 8\n").crowding == CrowdingConfig(
        silent=2, handshake=8, auth=8)
    assert relay_of("[relay]\nlogin_grace = 8\n[relay.crowding]\nsilent = 3\n").crowding \
        == CrowdingConfig(silent=3, handshake=8, auth=8)


@pytest.mark.parametrize(
    ("line", "keypath", "fragment"),
    [
        ("crowding = { silent = 0.5 }", "relay.crowding.silent", "at least 1"),
        ("crowding = { handshake = 1.5 }", "relay.crowding.handshake",
         "handshake (1.5) must be at least silent (2)"),
        ("crowding = { auth = 5 }", "relay.crowding.auth",
         "auth (5) must be at least handshake (10)"),
        ("crowding = { auth = 31 }", "relay.crowding.auth",
         "auth (31) must be at most login_grace (30)"),
        ('crowding = { enabled = "yes" }', "relay.crowding.enabled", "true or false"),
        ("crowding = { idle = 3 }", "relay.crowding.idle", "unknown key 'idle'"),
        ("crowding = { netblock4 = 33 }", "relay.crowding.netblock4",
         "netblock4 must be between 0 and 32, got 33"),
        ("crowding = { netblock6 = 129 }", "relay.crowding.netblock6",
         "netblock6 must be between 0 and 128, got 129"),
        ('crowding = { netblock6 = "48" }', "relay.crowding.netblock6", "expected an integer"),
        ("per_source_netblock4 = 24\ncrowding = { netblock4 = 28 }", "relay.crowding.netblock4",
         "netblock4 (28) must be at most per_source_netblock4 (24): a neighbourhood is made "
         "of whole sources"),
        ("crowding = { netblock6 = 96 }", "relay.crowding.netblock6",
         "netblock6 (96) must be at most per_source_netblock6 (64)"),
    ],
)
def test_crowding_errors(line: str, keypath: str, fragment: str) -> None:
    check(error_of(f"[relay]\n{line}\n"), keypath, fragment)


def test_neighbourhood_netblocks_default_and_follow_wider_sources() -> None:
    """``[relay.crowding] netblock4/netblock6``: /24 and /48 by default; set, any length
    up to the source's own; left unset under a per-source netblock wider than the
    default, they widen to it (a neighbourhood is never narrower than a source)."""
    crowding = relay_of("[relay]\n").crowding
    assert (crowding.netblock4, crowding.netblock6) == (24, 48)
    crowding = relay_of("[relay]\n[relay.crowding]\nnetblock4 = 16\nnetblock6 = 40\n").crowding
    assert (crowding.netblock4, crowding.netblock6) == (16, 40)
    crowding = relay_of("[relay]\nper_source_netblock4 = 32\n"
                        "[relay.crowding]\nnetblock4 = 32\n").crowding
    assert crowding.netblock4 == 32  # as wide as a source: the rule is the source's
    crowding = relay_of("[relay]\nper_source_netblock4 = 20\nper_source_netblock6 = 44\n"
                        ).crowding
    assert (crowding.netblock4, crowding.netblock6) == (20, 44)


@pytest.mark.parametrize(
    ("key", "guess"),
    [
        ("PerSourceMaxStartups", "per_source_max_unauthenticated"),
        ("PerSourcePenaltyExemptList", "penalty_exempt"),
    ],
)
def test_openssh_per_source_spellings_get_a_suggestion(key: str, guess: str) -> None:
    err = error_of(f"[relay]\n{key} = 1\n")
    check(err, f"relay.{key}", f"did you mean '{guess}'")


def test_penalty_key_spelled_as_in_sshd_gets_a_suggestion() -> None:
    err = error_of('[relay.penalties]\n"grace-exceeded" = 5\n')
    check(err, "relay.penalties.grace-exceeded", "did you mean 'grace_exceeded'")


@pytest.mark.parametrize(("written", "read"), [
    ('"20MB"', 20_000_000), ('"20M"', 20_000_000), ('"512KiB"', 512 * 1024),
    ('"2Mi"', 2 * 1024 * 1024), ('"1.5GB/s"', 1_500_000_000), ('"1Gi"', 1 << 30),
    ('"100"', 100), ("100", 100), ('"4k"', 4000),
])
def test_a_rate_is_read_in_the_units_sharing_md_states(
        keys: list[str], written: str, read: int) -> None:
    """docs/sharing.md: ``K``, ``M``, ``G`` are 1000s, ``Ki``, ``Mi``, ``Gi`` 1024s, a bare
    integer is bytes; for ``rate_limit`` and ``rate_burst`` alike.  A limit read in the
    wrong unit is a user moving at 1.05 or 0.95 of what the admin set, which no
    behaviour test at 20 MB/s would tell apart."""
    relay = relay_of(user(keys[0], body=f'services = ["bulk:9000"]\n'
                                        f"rate_limit = {written}\nrate_burst = {written}"))
    assert (relay.users[0].rate_limit, relay.users[0].rate_burst) == (read, read)


@pytest.mark.parametrize(("share", "ok"), [
    ("0.01", True), ("100", True), ("0.009", False), ("100.5", False), ("0", False)])
def test_a_share_is_a_number_in_0_01_to_100_default_1(
        keys: list[str], share: str, ok: bool) -> None:
    """docs/sharing.md: a weight in 0.01..100, default 1; outside it is an error naming
    the key."""
    assert relay_of(user(keys[0], body='services = ["bulk:9000"]')).users[0].share == 1.0
    text = user(keys[0], body=f'services = ["bulk:9000"]\nshare = {share}')
    if ok:
        assert relay_of(text).users[0].share == float(share)
    else:
        check(error_of(text), "relay.user[0].share", "share")
