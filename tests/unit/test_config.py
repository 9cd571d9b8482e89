"""relay.config.loader and .grammar: the TOML format, its defaults, and every error message."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.errors import ConfigError
from relay.config.grammar import (
    EXAMPLE_FINGERPRINT,
    parse_forward_spec,
    parse_hostport,
    parse_listen,
)
from relay.config.loader import load_config, parse_config
from relay.config.schema import (
    DEFAULT_MAX_PACKET,
    DEFAULT_WINDOW,
    AdminConfig,
    Backoff,
    ForwardKind,
    HostKeyPolicy,
    HostPort,
    Keepalive,
    LinkConfig,
    LocalForward,
    NodeConfig,
    RemoteForward,
)

SOURCE = "node.toml"
BASE = Path("/etc/labrelay")


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed home directory and login name, so ``~`` and the default user are known."""
    monkeypatch.setenv("HOME", "/home/tester")
    monkeypatch.setenv("LOGNAME", "tester")
    monkeypatch.setenv("USER", "tester")


def parse(text: str) -> NodeConfig:
    return parse_config(text, SOURCE, base_dir=BASE)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def check(err: ConfigError, keypath: str, *fragments: str) -> None:
    """The error names the file and the key path, has a hint, and says ``fragments``."""
    assert err.source == SOURCE
    assert err.keypath == keypath
    assert err.hint, "every error carries a hint"
    message = str(err)
    assert message.startswith(f"{SOURCE}: {keypath}: " if keypath else f"{SOURCE}: ")
    assert message.endswith(f"({err.hint})")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def link(body: str = "", head: str = 'host = "cloud.example.org"') -> str:
    return f"[[link]]\n{head}\n{body}\n"


FULL = f"""
[admin]
listen = "127.0.0.1:7022"

[[link]]
name = "cloud"
host = "cloud.example.org"
port = 2222
user = "lab"
identity = ["~/.ssh/id_ed25519", "keys/lab_pc"]
known_hosts = "known_hosts"
strict_host_key_checking = "accept-new"
keepalive_interval = 5
keepalive_count = 4
backoff_initial = 0.5
backoff_max = 30
backoff_factor = 2
backoff_jitter = 0.1
connect_timeout = 7.5
local_wait = 0
window = 1048576
max_packet = 16384

[[link.remote]]
listen = "2201"
connect = "10.0.0.5:22"
name = "gpu-ssh"

[[link.remote]]
listen = "gpu-cluster:22"
connect = "10.0.0.5:22"

[[link.remote]]
listen = "[::1]:0"
connect = "[fd00::5]:8888"

[[link.local]]
listen = "8888"
connect = "localhost:8888"
name = "jupyter"

[[link.local]]
listen = "*:6006"
connect = "localhost:6006"

[[link]]
host = "backup.example.org"
host_key = "{EXAMPLE_FINGERPRINT}"

[[link.remote]]
listen = "0.0.0.0:2202"
connect = "10.0.0.5:22"
"""


def test_full_config() -> None:
    assert parse(FULL) == NodeConfig(
        source=SOURCE,
        admin=AdminConfig(HostPort("127.0.0.1", 7022)),
        links=(
            LinkConfig(
                name="cloud",
                host="cloud.example.org",
                port=2222,
                user="lab",
                identities=(
                    Path("/home/tester/.ssh/id_ed25519"),
                    Path("/etc/labrelay/keys/lab_pc"),
                ),
                host_key=HostKeyPolicy(
                    known_hosts=Path("/etc/labrelay/known_hosts"), accept_new=True
                ),
                keepalive=Keepalive(interval=5.0, count_max=4),
                backoff=Backoff(initial=0.5, maximum=30.0, factor=2.0, jitter=0.1),
                connect_timeout=7.5,
                local_wait=0.0,
                window=1048576,
                max_packet=16384,
                remote=(
                    RemoteForward("localhost", 2201, HostPort("10.0.0.5", 22), "gpu-ssh"),
                    RemoteForward("gpu-cluster", 22, HostPort("10.0.0.5", 22), "R:gpu-cluster:22"),
                    RemoteForward("::1", 0, HostPort("fd00::5", 8888), "R:[::1]:0"),
                ),
                local=(
                    LocalForward("127.0.0.1", 8888, HostPort("localhost", 8888), "jupyter"),
                    LocalForward("*", 6006, HostPort("localhost", 6006), "L:*:6006"),
                ),
            ),
            LinkConfig(
                name="link1",
                host="backup.example.org",
                user="tester",
                host_key=HostKeyPolicy(fingerprint=EXAMPLE_FINGERPRINT),
                remote=(
                    RemoteForward("0.0.0.0", 2202, HostPort("10.0.0.5", 22), "R:0.0.0.0:2202"),
                ),
            ),
        ),
    )


def test_defaults() -> None:
    (only,) = parse(link()).links
    assert only == LinkConfig(
        name="link0",
        host="cloud.example.org",
        port=22,
        user="tester",
        host_key=HostKeyPolicy(known_hosts=Path("/home/tester/.ssh/known_hosts")),
    )
    assert only.window == DEFAULT_WINDOW and only.max_packet == DEFAULT_MAX_PACKET
    assert only.keepalive == Keepalive(15.0, 3)
    assert only.backoff == Backoff(1.0, 60.0, 1.5, 0.2)


def test_empty_config_is_valid() -> None:
    assert parse("") == NodeConfig(source=SOURCE)


def test_admin_listen_defaults_and_port_only() -> None:
    assert parse("[admin]\n").admin == AdminConfig(HostPort("127.0.0.1", 7022))
    assert parse('[admin]\nlisten = "9000"').admin == AdminConfig(HostPort("127.0.0.1", 9000))
    assert parse('[admin]\nlisten = "[::1]:9000"').admin == AdminConfig(HostPort("::1", 9000))


def test_identity_as_single_string() -> None:
    (only,) = parse(link('identity = "/keys/a"')).links
    assert only.identities == (Path("/keys/a"),)


def test_host_in_brackets_and_bare_ipv6() -> None:
    assert parse(link(head='host = "[2001:db8::1]"')).links[0].host == "2001:db8::1"
    assert parse(link(head='host = "2001:db8::1"')).links[0].host == "2001:db8::1"


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keypath", "suggestion"),
    [
        (link("hots = 1"), "link[0].hots", "did you mean 'host'?"),
        ('[[links]]\nhost = "x"', "links", "did you mean 'link'?"),
        ("[admn]\n", "admn", "did you mean 'admin'?"),
        (link("ServerAliveInterval = 5"), "link[0].ServerAliveInterval", "'keepalive_interval'"),
        (link("Port = 22"), "link[0].Port", "did you mean 'port'?"),
        (
            link('[[link.remote]]\nlisten = "1"\nconect = "a:1"'),
            "link[0].remote[0].conect",
            "did you mean 'connect'? e.g. connect = ",
        ),
        (link("zzz = 1"), "link[0].zzz", "valid keys here: name, host, port"),
    ],
)
def test_unknown_key(text: str, keypath: str, suggestion: str) -> None:
    err = error_of(text)
    check(err, keypath, "unknown key", suggestion)


@pytest.mark.parametrize(
    ("body", "keypath", "problem"),
    [
        ('port = "22"', "link[0].port", "expected an integer, got string '22'"),
        ("port = 22.0", "link[0].port", "expected an integer, got float 22.0"),
        ('keepalive_interval = "15s"', "link[0].keepalive_interval", "expected a number"),
        ("backoff_initial = true", "link[0].backoff_initial", "got boolean true"),
        ("backoff_max = inf", "link[0].backoff_max", "expected a finite number"),
        ("user = 5", "link[0].user", "expected a string, got integer 5"),
        ("identity = [1]", "link[0].identity", "expected a string or an array of strings"),
        ('user = ""', "link[0].user", "must not be empty"),
        ('remote = "2201:localhost:22"', "link[0].remote", "expected an array of tables"),
    ],
)
def test_wrong_type(body: str, keypath: str, problem: str) -> None:
    check(error_of(link(body)), keypath, problem, "e.g.")


def test_link_written_as_a_table() -> None:
    check(error_of('[link]\nhost = "x"'), "link", "expected an array of tables", "[[link]]")


@pytest.mark.parametrize(
    ("body", "keypath", "problem"),
    [
        ("port = 0", "link[0].port", "port must be between 1 and 65535, got 0"),
        ("port = 65536", "link[0].port", "got 65536"),
        (
            '[[link.remote]]\nlisten = "70000"\nconnect = "a:22"',
            "link[0].remote[0].listen",
            "port 70000 is out of range 0..65535",
        ),
        (
            '[[link.remote]]\nlisten = "2201"\nconnect = "a:0"',
            "link[0].remote[0].connect",
            "port 0 is out of range 1..65535",
        ),
        (
            '[[link.local]]\nlisten = "127.0.0.1:http"\nconnect = "a:80"',
            "link[0].local[0].listen",
            "port 'http' is not a number",
        ),
    ],
)
def test_bad_port(body: str, keypath: str, problem: str) -> None:
    check(error_of(link(body)), keypath, problem)


@pytest.mark.parametrize(
    ("listen", "connect", "where", "problem"),
    [
        ("::1:2201", "a:22", "listen", "an IPv6 address must be in brackets"),
        ("[::1:2201", "a:22", "listen", "unclosed '['"),
        ("[gpu]:2201", "a:22", "listen", "[gpu] is not an IPv6 address"),
        ("bad host:2201", "a:22", "listen", "'bad host' is not a host name"),
        ("", "a:22", "listen", "must not be empty"),
        ("2201", "10.0.0.5", "connect", "'10.0.0.5' has no port"),
        ("2201", "22", "connect", "'22' has no host"),
        ("2201", ":22", "connect", "has no host"),
        ("2201", "fd00::5:22", "connect", "an IPv6 address must be in brackets"),
    ],
)
def test_bad_listen_or_connect(listen: str, connect: str, where: str, problem: str) -> None:
    body = f'[[link.remote]]\nlisten = "{listen}"\nconnect = "{connect}"'
    check(error_of(link(body)), f"link[0].remote[0].{where}", problem, "e.g.")


def test_missing_forward_keys() -> None:
    err = error_of(link('[[link.local]]\nlisten = "8888"'))
    check(err, "link[0].local[0].connect", "missing required key 'connect'", "e.g. connect =")


def test_missing_host() -> None:
    check(error_of("[[link]]\nport = 22"), "link[0].host", "missing required key 'host'")


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("lab@cloud", "contains '@'"),
        ("cloud:2222", "a port is given separately"),
        ("a b", "is not a host name"),
    ],
)
def test_bad_host(host: str, problem: str) -> None:
    check(error_of(link(head=f'host = "{host}"')), "link[0].host", problem)


def test_duplicate_link_names() -> None:
    text = '[[link]]\nhost = "a"\nname = "x"\n[[link]]\nhost = "b"\nname = "x"\n'
    check(error_of(text), "link[1].name", "duplicate link name 'x' (also link[0].name)", "--name")


def test_duplicate_default_and_explicit_link_name() -> None:
    text = '[[link]]\nhost = "a"\n[[link]]\nhost = "b"\nname = "link0"\n'
    check(error_of(text), "link[1].name", "duplicate link name 'link0'")


def test_duplicate_forward_names_across_links() -> None:
    text = (
        '[[link]]\nhost = "a"\n[[link.remote]]\nlisten = "1"\nconnect = "x:22"\nname = "ssh"\n'
        '[[link]]\nhost = "b"\n[[link.local]]\nlisten = "2"\nconnect = "x:22"\nname = "ssh"\n'
    )
    check(
        error_of(text),
        "link[1].local[0].name",
        "duplicate forward name 'ssh' (also link[0].remote[0].name)",
        'name = "..."',
    )


def test_duplicate_derived_forward_names() -> None:
    text = (
        '[[link]]\nhost = "a"\n[[link.remote]]\nlisten = "2201"\nconnect = "x:22"\n'
        '[[link]]\nhost = "b"\n[[link.remote]]\nlisten = "2201"\nconnect = "y:22"\n'
    )
    check(
        error_of(text),
        "link[1].remote[0]",
        "duplicate derived forward name 'R:2201' (also link[0].remote[0])",
    )


def test_duplicate_listen_address_in_one_link() -> None:
    body = (
        '[[link.remote]]\nlisten = "2201"\nconnect = "x:22"\nname = "a"\n'
        '[[link.remote]]\nlisten = "2201"\nconnect = "y:22"\nname = "b"\n'
    )
    check(
        error_of(link(body)),
        "link[0].remote[1].listen",
        "2201 is already forwarded by link[0].remote[0].listen",
    )


def test_port_zero_may_repeat() -> None:
    body = (
        '[[link.remote]]\nlisten = "0"\nconnect = "x:22"\nname = "a"\n'
        '[[link.remote]]\nlisten = "0"\nconnect = "y:22"\nname = "b"\n'
    )
    assert len(parse(link(body)).links[0].remote) == 2


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("SHA256:abc", "43 base64 characters"),
        ("abc", "does not start with 'SHA256:'"),
        ("MD5:" + ":".join(["ab"] * 16), "MD5 fingerprints are not accepted"),
        ("256 " + EXAMPLE_FINGERPRINT + " me@host (ED25519)", "does not start with"),
        (EXAMPLE_FINGERPRINT[:-1] + "l", "check its last character"),
        (EXAMPLE_FINGERPRINT + "=", "43 base64 characters"),
    ],
)
def test_bad_fingerprint(value: str, problem: str) -> None:
    check(error_of(link(f'host_key = "{value}"')), "link[0].host_key", problem, "ssh-keygen -lf")


@pytest.mark.parametrize("value", ["no", "off", "ask"])
def test_strict_host_key_checking_no_is_refused(value: str) -> None:
    err = error_of(link(f'strict_host_key_checking = "{value}"'))
    check(err, "link[0].strict_host_key_checking", "not allowed", "accept-new", "host_key")


def test_strict_host_key_checking_unknown_value() -> None:
    err = error_of(link('strict_host_key_checking = "maybe"'))
    check(err, "link[0].strict_host_key_checking", 'expected "yes" or "accept-new"')


def test_pinned_key_excludes_known_hosts_and_accept_new() -> None:
    pin = f'host_key = "{EXAMPLE_FINGERPRINT}"\n'
    check(error_of(link(pin + 'known_hosts = "/k"')), "link[0].known_hosts", "not both")
    err = error_of(link(pin + 'strict_host_key_checking = "accept-new"'))
    check(err, "link[0].strict_host_key_checking", "no effect with a pinned host_key")


def test_known_hosts_files_as_ssh_lists_them() -> None:
    """known_hosts and global_known_hosts: a path, an array (read in order; the first
    known_hosts file is the one written), or "none" (no file; never a file named none).
    A string still means what it always meant."""
    def policy(body: str) -> HostKeyPolicy:
        return parse(link(body)).links[0].host_key

    assert policy('known_hosts = "kh"') == HostKeyPolicy(known_hosts=BASE / "kh")
    assert policy('known_hosts = ["kh", "/k2"]\nglobal_known_hosts = ["/g1", "/g2"]') == (
        HostKeyPolicy(known_hosts=BASE / "kh", extra_known_hosts=(Path("/k2"),),
                      global_known_hosts=(Path("/g1"), Path("/g2"))))
    assert policy('known_hosts = "none"\nglobal_known_hosts = "/etc/ssh/ssh_known_hosts"') == (
        HostKeyPolicy(no_user_known_hosts=True,
                      global_known_hosts=(Path("/etc/ssh/ssh_known_hosts"),)))
    assert policy('global_known_hosts = "none"') == HostKeyPolicy(
        known_hosts=Path("/home/tester/.ssh/known_hosts"))


@pytest.mark.parametrize(("body", "keypath", "fragment"), [
    ("known_hosts = []", "link[0].known_hosts", "an empty array names no file"),
    ('known_hosts = ["/k", "none"]', "link[0].known_hosts", '"none" appears with other files'),
    ("global_known_hosts = 3", "link[0].global_known_hosts", "expected a string or an array"),
    ('global_known_hosts = [""]', "link[0].global_known_hosts", "an empty string"),
    (f'host_key = "{EXAMPLE_FINGERPRINT}"\nglobal_known_hosts = "/g"',
     "link[0].global_known_hosts", "not both"),
    ('GlobalKnownHostsFile = "/g"', "link[0].GlobalKnownHostsFile", "global_known_hosts"),
])
def test_known_hosts_files_errors(body: str, keypath: str, fragment: str) -> None:
    check(error_of(link(body)), keypath, fragment)


def test_backoff_max_below_initial() -> None:
    err = error_of(link("backoff_initial = 10\nbackoff_max = 5"))
    check(err, "link[0].backoff_max", "backoff_max 5 is less than backoff_initial 10")
    err = error_of(link("backoff_initial = 100"))
    check(err, "link[0].backoff_max", "backoff_max 60 (the default) is less than", "= 100")


@pytest.mark.parametrize(
    ("body", "keypath", "problem"),
    [
        ("backoff_initial = 0", "link[0].backoff_initial", "must be greater than 0"),
        ("backoff_factor = 0.5", "link[0].backoff_factor", "must be at least 1"),
        ("backoff_jitter = 1.5", "link[0].backoff_jitter", "must be at most 1"),
        ("keepalive_interval = -1", "link[0].keepalive_interval", "must be at least 0"),
        ("keepalive_count = 0", "link[0].keepalive_count", "must be at least 1"),
        ("connect_timeout = 0", "link[0].connect_timeout", "must be greater than 0"),
        ("local_wait = -0.5", "link[0].local_wait", "must be at least 0"),
        ("resume_grace = -1", "link[0].resume_grace", "must be at least 0"),
        ("resume_grace = 100000", "link[0].resume_grace", "must be at most 86400"),
        ("window = 1024", "link[0].window", "between 32768 and 16777216"),
        ("max_packet = 100", "link[0].max_packet", "between 1024 and 262144"),
    ],
)
def test_out_of_range(body: str, keypath: str, problem: str) -> None:
    check(error_of(link(body)), keypath, problem)


def test_max_packet_larger_than_window() -> None:
    err = error_of(link("window = 65536\nmax_packet = 131072"))
    check(err, "link[0].max_packet", "max_packet 131072 is larger than window 65536")


def test_admin_must_be_loopback() -> None:
    for listen in ("0.0.0.0:7022", "*:7022", ":7022", "example.org:7022"):
        err = error_of(f'[admin]\nlisten = "{listen}"')
        check(err, "admin.listen", "must listen on a loopback address")
        assert "token_file" in err.hint


def test_admin_token_file_allows_other_addresses() -> None:
    admin = parse('[admin]\nlisten = "0.0.0.0:7022"\ntoken_file = "admin.token"').admin
    assert admin == AdminConfig(HostPort("0.0.0.0", 7022), BASE / "admin.token")
    local = parse('[admin]\ntoken_file = "/etc/labrelay/admin.token"').admin
    assert local == AdminConfig(HostPort("127.0.0.1", 7022), Path("/etc/labrelay/admin.token"))


def test_toml_syntax_error_names_the_line() -> None:
    err = error_of('[[link]]\nhost = "a"\nport = \nuser = "x"\n')
    check(err, "", "TOML syntax error", "line 3")


@pytest.mark.parametrize("text", [
    '[relay]\nlisten = "0.0.0.0:2222"\nlisten = "127.0.0.1:0"\n',
    '[relay]\nlisten = "0.0.0.0:2222"\n[relay]\nstate_dir = "s"\n',
])
def test_a_key_or_table_written_twice_gets_its_own_fix(text: str) -> None:
    """tomllib's "Cannot overwrite a value" came with the quoting hint ("strings need
    double quotes ..."), which sent an admin who had pasted a key twice looking for a
    quote that was not missing."""
    err = error_of(text)
    assert "TOML syntax error" in str(err)
    assert "set twice" in err.hint and "double quotes" not in err.hint


def test_load_config_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "node.toml"
    path.write_text(link('identity = "id_lab"'))
    config = load_config(path)
    assert config.source == str(path)
    assert config.links[0].identities == (tmp_path / "conf" / "id_lab",)


def test_load_config_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[[link]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: TOML syntax error")
    assert "line 1" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read the config file")
    assert "No such file" in message
    assert info.value.hint


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'[[link]]\nhost = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# --- the public syntax helpers ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("2201", "", ("", 2201)),
        ("2201", "127.0.0.1", ("127.0.0.1", 2201)),
        (":2201", "127.0.0.1", ("", 2201)),
        ("*:2201", "", ("*", 2201)),
        ("0.0.0.0:2201", "", ("0.0.0.0", 2201)),
        ("gpu-cluster:22", "", ("gpu-cluster", 22)),
        ("gpu_cluster:22", "", ("gpu_cluster", 22)),
        ("[::1]:2201", "", ("::1", 2201)),
        ("localhost:0", "", ("localhost", 0)),
    ],
)
def test_parse_listen(text: str, default: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text, source="s", keypath="k", default_bind=default) == expected


def test_parse_hostport() -> None:
    assert parse_hostport("[::1]:22", source="s", keypath="k") == HostPort("::1", 22)
    assert str(HostPort("::1", 22)) == "[::1]:22"
    with pytest.raises(ConfigError) as info:
        parse_hostport("localhost", source="flags", keypath="-x")
    assert str(info.value).startswith("flags: -x: 'localhost' has no port")


@pytest.mark.parametrize(
    ("spec", "kind", "expected"),
    [
        (
            "2201:localhost:22",
            "remote",
            RemoteForward("localhost", 2201, HostPort("localhost", 22), "R:2201"),
        ),
        (
            "gpu-cluster:22:10.0.0.5:22",
            "remote",
            RemoteForward("gpu-cluster", 22, HostPort("10.0.0.5", 22), "R:gpu-cluster:22"),
        ),
        (
            "[::1]:2201:[fd00::5]:22",
            "remote",
            RemoteForward("::1", 2201, HostPort("fd00::5", 22), "R:[::1]:2201"),
        ),
        (
            "8888:localhost:8888",
            "local",
            LocalForward("127.0.0.1", 8888, HostPort("localhost", 8888), "L:8888"),
        ),
        (
            "*:8888:localhost:8888",
            "local",
            LocalForward("*", 8888, HostPort("localhost", 8888), "L:*:8888"),
        ),
        (
            ":8888:[::1]:8888",
            "local",
            LocalForward("", 8888, HostPort("::1", 8888), "L:*:8888"),
        ),
    ],
)
def test_parse_forward_spec(spec: str, kind: ForwardKind, expected: object) -> None:
    assert parse_forward_spec(spec, kind, source="s", keypath="k") == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("2201", "(a SOCKS proxy) is not supported"),
        ("2201:localhost", "expected 3 or 4 ':'-separated fields"),
        ("a:b:c:d:e", "expected 3 or 4"),
        ("2201:/tmp/sock", "Unix-domain socket forwards are not supported"),
        ("x:localhost:22", "port 'x' is not a number"),
        ("2201:localhost:0", "out of range 1..65535"),
        ("[::1:2201:localhost:22", "unclosed '['"),
    ],
)
def test_parse_forward_spec_errors(spec: str, problem: str) -> None:
    keypath = f"-R {spec!r}"
    with pytest.raises(ConfigError) as info:
        parse_forward_spec(spec, "remote", source="command line", keypath=keypath)
    assert str(info.value).startswith(f"command line: {keypath}: ")
    assert problem in str(info.value)
    assert "-R 2201:localhost:22" in info.value.hint


def test_config_error_format() -> None:
    err = ConfigError("node.toml", "link[0].port", "bad", "e.g. port = 22")
    assert str(err) == "node.toml: link[0].port: bad (e.g. port = 22)"
    assert str(ConfigError("node.toml", "", "bad")) == "node.toml: bad"


def test_resume_grace_is_read_and_defaults_to_60() -> None:
    """docs/config.md: ``resume_grace`` holds sessions for resumption; 0 turns it off."""
    assert parse(link("")).links[0].resume_grace == 60.0
    assert parse(link("resume_grace = 0")).links[0].resume_grace == 0
