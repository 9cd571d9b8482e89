"""relay.config.agentargs: ssh's flags for ``labrelay agent``, alone and on top of a config file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from relay.config.agentargs import add_agent_arguments, config_from_agent_args
from relay.config.errors import ConfigError
from relay.config.grammar import EXAMPLE_FINGERPRINT
from relay.config.schema import (
    HostKeyPolicy,
    HostPort,
    Keepalive,
    LinkConfig,
    LocalForward,
    NodeConfig,
    RemoteForward,
)

KNOWN_HOSTS = Path("/home/tester/.ssh/known_hosts")


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    monkeypatch.setenv("LOGNAME", "tester")
    monkeypatch.setenv("USER", "tester")
    monkeypatch.chdir(tmp_path)


def parser() -> argparse.ArgumentParser:
    """The shape cli.py gives it: ``labrelay agent ...`` as a subcommand."""
    top = argparse.ArgumentParser(prog="labrelay")
    commands = top.add_subparsers(dest="command", required=True)
    add_agent_arguments(commands.add_parser("agent"))
    return top


def config(*argv: str) -> NodeConfig:
    return config_from_agent_args(parser().parse_args(["agent", *argv]))


def error(*argv: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config(*argv)
    assert info.value.hint, "every error carries a hint"
    return info.value


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


ONE_LINK = """
[[link]]
name = "cloud"
host = "cloud.example.org"
user = "lab"
identity = "/keys/file_key"
keepalive_interval = 30
port = 22

[[link.remote]]
listen = "2201"
connect = "10.0.0.5:22"
name = "gpu-ssh"
"""


def test_seed_style_command_line(tmp_path: Path) -> None:
    node = config(
        "-R", "2201:localhost:22",
        "-o", "ServerAliveInterval=5",
        "-o", "UserKnownHostsFile=/x",
        "lab@cloud",
        "-p", "2222",
        "-i", "key",
        "-N",
    )  # fmt: skip
    assert node == NodeConfig(
        source="command line",
        links=(
            LinkConfig(
                name="cloud",
                host="cloud",
                port=2222,
                user="lab",
                identities=(tmp_path / "key",),
                host_key=HostKeyPolicy(known_hosts=Path("/x")),
                keepalive=Keepalive(interval=5.0, count_max=3),
                remote=(RemoteForward("localhost", 2201, HostPort("localhost", 22), "R:2201"),),
            ),
        ),
    )


def test_defaults_for_a_bare_destination() -> None:
    (link,) = config("cloud.example.org").links
    assert link == LinkConfig(
        name="cloud.example.org",
        host="cloud.example.org",
        user="tester",
        host_key=HostKeyPolicy(known_hosts=KNOWN_HOSTS),
    )


def test_ipv6_specs_and_local_default_bind() -> None:
    (link,) = config(
        "-R", "[::1]:2201:[fd00::5]:22",
        "-R", "gpu-cluster:22:10.0.0.5:22",
        "-L", "8888:localhost:8888",
        "-L", "*:6006:[::1]:6006",
        "[2001:db8::1]",
    ).links  # fmt: skip
    assert link.host == "2001:db8::1"
    assert link.remote == (
        RemoteForward("::1", 2201, HostPort("fd00::5", 22), "R:[::1]:2201"),
        RemoteForward("gpu-cluster", 22, HostPort("10.0.0.5", 22), "R:gpu-cluster:22"),
    )
    assert link.local == (
        LocalForward("127.0.0.1", 8888, HostPort("localhost", 8888), "L:8888"),
        LocalForward("*", 6006, HostPort("::1", 6006), "L:*:6006"),
    )


def test_option_spellings() -> None:
    (link,) = config(
        "-o", "serveraliveinterval 1m30s",
        "-oServerAliveCountMax=5",
        "-o", "ConnectTimeout = 7",
        "-o", 'IdentityFile="/keys/a b"',
        "-o", "User=lab",
        "-o", "Port=2222",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "ExitOnForwardFailure=yes",
        "host",
    ).links  # fmt: skip
    assert link.keepalive == Keepalive(interval=90.0, count_max=5)
    assert link.connect_timeout == 7.0
    assert link.identities == (Path("/keys/a b"),)
    assert (link.user, link.port) == ("lab", 2222)
    assert link.host_key == HostKeyPolicy(known_hosts=KNOWN_HOSTS, accept_new=True)


def test_login_flag_and_name() -> None:
    (link,) = config("-l", "lab", "--name", "relay", "cloud").links
    assert (link.name, link.user, link.host) == ("relay", "lab", "cloud")


def test_host_key_pins_instead_of_known_hosts() -> None:
    (link,) = config("--host-key", EXAMPLE_FINGERPRINT, "cloud").links
    assert link.host_key == HostKeyPolicy(fingerprint=EXAMPLE_FINGERPRINT)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["no", "off", "NO"])
def test_strict_host_key_checking_no_is_refused(value: str) -> None:
    err = error("-o", f"StrictHostKeyChecking={value}", "cloud")
    assert err.source == "command line"
    assert err.keypath == "-o StrictHostKeyChecking"
    assert "refused" in err.problem
    assert "accept-new" in err.hint and "--host-key" in err.hint


def test_strict_host_key_checking_ask_is_refused() -> None:
    assert "unattended" in error("-o", "StrictHostKeyChecking=ask", "cloud").problem


def test_unsupported_option() -> None:
    err = error("-o", "ServerAliveIntervl=5", "cloud")
    assert err.keypath == "-o ServerAliveIntervl"
    assert "unsupported option" in err.problem
    assert "did you mean ServerAliveInterval?" in err.hint
    assert "UserKnownHostsFile" in err.hint
    err = error("-o", "HostKeyFingerprint=SHA256:x", "cloud")
    assert "--host-key" in err.hint


@pytest.mark.parametrize(
    ("argv", "keypath", "problem"),
    [
        (["-o", "ServerAliveInterval"], "-o 'ServerAliveInterval'", "expected Option=Value"),
        (["-o", "ServerAliveInterval=soon"], "-o ServerAliveInterval", "expected seconds"),
        (["-o", "ServerAliveCountMax=0"], "-o ServerAliveCountMax", "between 1 and"),
        (["-o", "ConnectTimeout=0"], "-o ConnectTimeout", "more than 0"),
        (["-o", "Port=70000"], "-o Port", "between 1 and 65535"),
        (["-o", "ExitOnForwardFailure=maybe"], "-o ExitOnForwardFailure", "yes or no"),
        (["-o", "UserKnownHostsFile=/a none"], "-o UserKnownHostsFile",
         "'none' appears with other files"),
        (["-o", "GlobalKnownHostsFile=none /g"], "-o GlobalKnownHostsFile",
         "'none' appears with other files"),
        (["--host-key", EXAMPLE_FINGERPRINT, "-o", "GlobalKnownHostsFile=/g"], "--host-key",
         "cannot be combined with -o GlobalKnownHostsFile"),
        (["-p", "ssh"], "-p", "expected a number, got 'ssh'"),
        (["-p", "1", "-o", "Port=2"], "-o Port", "2 conflicts with 1 from -p"),
        (["-l", "bob"], "-l", "bob conflicts with alice from 'alice@cloud'"),
        (["-R", "abc"], "-R 'abc'", "expected 3 or 4"),
        (["-L", "8888:localhost"], "-L '8888:localhost'", "expected 3 or 4"),
        (["-R", "2201:x:22", "-R", "2201:y:22"], "-R '2201:y:22'", "already forwarded"),
        (["--host-key", "SHA256:short"], "--host-key", "43 base64 characters"),
        (
            ["--host-key", EXAMPLE_FINGERPRINT, "-o", "UserKnownHostsFile=/k"],
            "--host-key",
            "cannot be combined with -o UserKnownHostsFile",
        ),
        (
            ["--host-key", EXAMPLE_FINGERPRINT, "-o", "StrictHostKeyChecking=accept-new"],
            "-o StrictHostKeyChecking",
            "no effect with a pinned --host-key",
        ),
    ],
)
def test_flag_errors(argv: list[str], keypath: str, problem: str) -> None:
    err = error(*argv, "alice@cloud")
    assert err.source == "command line"
    assert err.keypath == keypath
    assert problem in str(err)
    assert str(err).startswith(f"command line: {keypath}: ")


@pytest.mark.parametrize(
    ("destination", "problem"),
    [("@cloud", "empty user"), ("cloud:2222", "a port is given separately")],
)
def test_bad_destination(destination: str, problem: str) -> None:
    err = error(destination)
    assert err.keypath == repr(destination)
    assert problem in err.problem


def test_nothing_to_do() -> None:
    err = error("-R", "2201:localhost:22")
    assert str(err).startswith("command line: nothing to do: give [user@]host or --config FILE")


# --- combined with a config file ----------------------------------------------


def test_config_alone_is_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_LINK + '[[link]]\nhost = "b"\n')
    node = config("--config", path)
    assert node.source == path
    assert [link.name for link in node.links] == ["cloud", "link1"]


def test_flags_apply_to_the_single_link_and_win(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_LINK)
    (link,) = config(
        "--config", path,
        "-p", "2222",
        "-o", "ServerAliveInterval=5",
        "-i", "/keys/cli_key",
        "-R", "2202:localhost:22",
        "-L", "8888:localhost:8888",
    ).links  # fmt: skip
    assert link.name == "cloud"
    assert link.port == 2222
    assert link.keepalive.interval == 5.0
    assert link.identities == (Path("/keys/cli_key"), Path("/keys/file_key"))
    assert [fwd.name for fwd in link.remote] == ["gpu-ssh", "R:2202"]
    assert [fwd.name for fwd in link.local] == ["L:8888"]


def test_destination_adds_a_link_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_LINK)
    node = config("--config", path, "-R", "2202:localhost:22", "lab@backup.example.org")
    assert node.source == path
    cloud, backup = node.links
    assert cloud.remote[0].name == "gpu-ssh" and len(cloud.remote) == 1
    assert backup.name == "backup.example.org"
    assert backup.remote == (RemoteForward("localhost", 2202, HostPort("localhost", 22), "R:2202"),)


def test_destination_link_name_must_be_unique(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_LINK)
    err = error("--config", path, "--name", "cloud", "backup.example.org")
    assert err.source == "command line"
    assert err.keypath == "--name"
    assert f"duplicate link name 'cloud' (also link[0].name in {path})" in err.problem
    assert "--name" in err.hint


def test_cli_forward_clashing_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_LINK)
    err = error("--config", path, "-R", "2201:localhost:22")
    assert err.source == "command line"
    assert err.keypath == "-R '2201:localhost:22'"
    assert f"already forwarded by link[0].remote[0].listen in {path}" in err.problem


@pytest.mark.parametrize("text", ["", ONE_LINK + '[[link]]\nhost = "b"\n'])
def test_flags_without_destination_need_exactly_one_link(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    err = error("--config", path, "-R", "2202:localhost:22")
    assert err.source == "command line"
    assert "links, so it is unclear which one" in err.problem
    assert "give a destination" in err.hint


def test_name_without_destination(tmp_path: Path) -> None:
    err = error("--config", write(tmp_path, ONE_LINK), "--name", "x")
    assert err.keypath == "--name"


def test_known_hosts_flag_replaces_a_pinned_key(tmp_path: Path) -> None:
    text = ONE_LINK.replace("port = 22", f'port = 22\nhost_key = "{EXAMPLE_FINGERPRINT}"')
    path = write(tmp_path, text)
    assert config("--config", path).links[0].host_key.fingerprint == EXAMPLE_FINGERPRINT
    (link,) = config("--config", path, "-o", "UserKnownHostsFile=/k").links
    assert link.host_key == HostKeyPolicy(known_hosts=Path("/k"))
    err = error("--config", path, "-o", "StrictHostKeyChecking=accept-new")
    assert err.keypath == "-o StrictHostKeyChecking"
    assert "pins its host key" in err.problem


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    err = error("--config", str(tmp_path / "absent.toml"), "cloud")
    assert err.source == str(tmp_path / "absent.toml")
    assert "cannot read" in err.problem


def test_help_reads_at_any_width(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = argparse.ArgumentParser(prog="labrelay agent")
    add_agent_arguments(agent)
    for columns in ("40", "200"):
        monkeypatch.setenv("COLUMNS", columns)
        assert "-R PORT:HOST:HOSTPORT" in agent.format_help()
    assert all(action.help for action in agent._actions)


def test_fast_path_pool_flag_and_key(tmp_path: Path) -> None:
    assert config("-R", "gpu:22:10.0.0.5:22", "lab@cloud").links[0].fast_path_pool == 4
    off = config("--fast-path-pool", "0", "-R", "gpu:22:10.0.0.5:22", "lab@cloud")
    assert off.links[0].fast_path_pool == 0
    bad = error("--fast-path-pool", "100", "lab@cloud")
    assert bad.keypath == "--fast-path-pool" and "100" in str(bad)
    path = write(tmp_path, '[[link]]\nname = "c"\nhost = "cloud"\nuser = "lab"\n'
                           "fast_path_pool = 2\n")
    assert config("--config", path).links[0].fast_path_pool == 2


def test_known_hosts_options_take_what_ssh_takes(tmp_path: Path) -> None:
    """-o UserKnownHostsFile: several files (the first is written), or none (no user
    file: never a file named "none"); -o GlobalKnownHostsFile: files read after them,
    or none.  The command line replaces the file's list of the same kind only."""
    (link,) = config("-o", "UserKnownHostsFile=/a ~/b", "-o",
                     "GlobalKnownHostsFile /etc/ssh/ssh_known_hosts", "alice@cloud").links
    assert link.host_key == HostKeyPolicy(
        known_hosts=Path("/a"), extra_known_hosts=(Path("/home/tester/b"),),
        global_known_hosts=(Path("/etc/ssh/ssh_known_hosts"),))
    (link,) = config("-o", "UserKnownHostsFile=none", "-o",
                     "StrictHostKeyChecking=accept-new", "alice@cloud").links
    assert link.host_key == HostKeyPolicy(no_user_known_hosts=True, accept_new=True)
    (link,) = config("-o", "GlobalKnownHostsFile=none", "alice@cloud").links
    assert link.host_key == HostKeyPolicy(known_hosts=KNOWN_HOSTS)
    text = ONE_LINK.replace("port = 22", 'port = 22\nknown_hosts = ["/u1", "/u2"]\n'
                            'global_known_hosts = "/g"')
    path = write(tmp_path, text)
    assert config("--config", path).links[0].host_key == HostKeyPolicy(
        known_hosts=Path("/u1"), extra_known_hosts=(Path("/u2"),),
        global_known_hosts=(Path("/g"),))
    (link,) = config("--config", path, "-o", "GlobalKnownHostsFile=/h").links
    assert link.host_key == HostKeyPolicy(
        known_hosts=Path("/u1"), extra_known_hosts=(Path("/u2"),),
        global_known_hosts=(Path("/h"),))
    (link,) = config("--config", path, "-o", "UserKnownHostsFile=none").links
    assert link.host_key == HostKeyPolicy(no_user_known_hosts=True,
                                          global_known_hosts=(Path("/g"),))
