"""relay.server.grants: grant files, the merged view, authorization, and reloading."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.conch.ssh.keys import Key
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from relay.config.errors import ConfigError
from relay.config.schema import PrincipalConfig, RelayConfig, ServiceGrant
from relay.server import grants as grants_module
from relay.server.grantdiff import GrantsChange, Loss, diff_grants
from relay.server.grantfile import _options, parse_grant_file
from relay.server.grants import Grants, Principal
from relay.server.grantwatch import GrantsWatcher

SOURCE = "node.toml"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Six real public keys from ssh-keygen, as ``TYPE BASE64`` (no comment)."""
    directory = tmp_path_factory.mktemp("keys")
    lines = []
    for i in range(6):
        path = directory / f"k{i}"
        kind = ["-t", "ecdsa", "-b", "256"] if i == 5 else ["-t", "ed25519"]
        subprocess.run(["ssh-keygen", "-q", *kind, "-N", "", "-C", "", "-f", str(path)], check=True)
        lines.append(" ".join((directory / f"k{i}.pub").read_text().split()[:2]))
    return lines


def blob(key: str) -> bytes:
    return Key.fromString(key).blob()


@implementer(ILogObserver)
class Events:
    """Collects what relay.server.grants logs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    collector = Events()
    monkeypatch.setattr(grants_module, "_log", Logger(observer=collector))
    return collector


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def error_of(text: str, kind: str = "agent") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_grant_file(text, kind, "agents" if kind == "agent" else "users")
    return info.value


def check(err: ConfigError, source: str, keypath: str, *fragments: str) -> None:
    assert err.source == source
    assert err.keypath == keypath
    assert err.hint, "every error carries a hint"
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))


# --- option syntax ---------------------------------------------------------------------


def test_options_split_at_the_first_blank_outside_quotes() -> None:
    options, rest = _options('a,b="x, y",C="say \\"hi\\"",no-pty  ssh-ed25519 AAAA c', "f:1")
    assert options == [
        ("a", None, "a"),
        ("b", "x, y", 'b="x, y"'),
        ("c", 'say "hi"', 'C="say \\"hi\\""'),
        ("no-pty", None, "no-pty"),
    ]
    assert rest == "ssh-ed25519 AAAA c"


def test_a_line_without_options() -> None:
    assert _options("ssh-ed25519 AAAA c", "f:1") == ([], "ssh-ed25519 AAAA c")
    assert _options("ecdsa-sha2-nistp256 AAAA", "f:1") == ([], "ecdsa-sha2-nistp256 AAAA")


@pytest.mark.parametrize(
    ("line", "keypath", "fragment"),
    [
        ("permitopen=gpu:22 ssh-ed25519 AAAA", "permitopen", "must be in double quotes"),
        ('permitopen="gpu:22 ssh-ed25519 AAAA', "permitopen", "unclosed quote"),
        ('permitopen="gpu:22";x ssh-ed25519 AAAA', 'permitopen="gpu:22"', "unexpected ';'"),
        ('permitopen="gpu:22"', "", "options but no key"),
        (",x ssh-ed25519 AAAA", "", "expected an option or a key type at column 1"),
    ],
)
def test_option_syntax_errors(line: str, keypath: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _options(line, "users:4")
    check(info.value, "users:4", keypath, fragment)


# --- agents files ------------------------------------------------------------------------


def test_agents_file(keys: list[str]) -> None:
    text = "\n".join(
        [
            "# lab agents",
            "",
            f'restrict,permitlisten="gpu-cluster:22",permitlisten="2201",no-pty {keys[0]} lab_pc',
            f'permitlisten="Jupyter:*",permitlisten="0.0.0.0:2202" {keys[1]} lab_pc',
            f'permitlisten="*:2203",permitlisten="[::]:2204",port-forwarding {keys[2]} lab_pc',
            f"   {keys[3]} spare   ",
            f'permitlisten="tensorboard:6006" {keys[4]} other',
        ]
    )
    sites = parse_grant_file(text, "agent", "/etc/labrelay/agents")
    assert [s.principal for s in sites] == [
        PrincipalConfig(
            kind="agent",
            name="lab_pc",
            keys=(f"{keys[0]} lab_pc", f"{keys[1]} lab_pc", f"{keys[2]} lab_pc"),
            services=(ServiceGrant("gpu-cluster", 22), ServiceGrant("jupyter", None)),
            public_ports=(2201, 2202, 2203, 2204),
        ),
        PrincipalConfig(kind="agent", name="spare", keys=(f"{keys[3]} spare",)),
        PrincipalConfig(
            kind="agent",
            name="other",
            keys=(f"{keys[4]} other",),
            services=(ServiceGrant("tensorboard", 6006),),
        ),
    ]
    lab = sites[0]
    assert lab.name_at == ("/etc/labrelay/agents:3", "")
    assert lab.keys_at[1] == ("/etc/labrelay/agents:4", "")
    assert lab.services_at[1] == ("/etc/labrelay/agents:4", 'permitlisten="Jupyter:*"')
    assert lab.ports_at[3] == ("/etc/labrelay/agents:5", 'permitlisten="[::]:2204"')


@pytest.mark.parametrize(
    ("options", "keypath", "fragment", "hint"),
    [
        ('permitlisten="2201x"', 'permitlisten="2201x"', "public port '2201x'", "2201"),
        ('permitlisten="0"', 'permitlisten="0"', "public port '0'", "2201"),
        ('permitlisten="*:*"', 'permitlisten="*:*"', "public port '*'", "2201"),
        (
            'permitlisten="127.0.0.1:2201"',
            'permitlisten="127.0.0.1:2201"',
            "is an address",
            'permitlisten="2201"',
        ),
        ('permitlisten="gpu:99999"', 'permitlisten="gpu:99999"', "out of range", "gpu-cluster"),
        ('permitlisten="*"', 'permitlisten="*"', "public port '*'", "2201"),
        ("permitlisten", "permitlisten", "permitlisten needs a value", "gpu-cluster:22"),
        ('permitopen="gpu:22"', 'permitopen="gpu:22"', "belongs in the users file", "permitlisten"),
        ('max-sessions="3"', 'max-sessions="3"', "belongs in the users file", "permitlisten"),
        ('from="10.0.0.0/99"', 'from="10.0.0.0/99"', "not a valid CIDR block", "from="),
        ('expiry-time="2026"', 'expiry-time="2026"', "must be YYYYMMDD", "expiry-time="),
        ('expiry-time="20261399"', 'expiry-time="20261399"', "not a valid date", "expiry-time="),
        ('principals="a"', "principals", "only for a cert-authority line", "cert-authority"),
        ('cert-authority="x"', 'cert-authority="x"', "takes no value", "principals="),
        ('command="/bin/true"', 'command="/bin/true"', "not supported", "runs no commands"),
        ("pty", "pty", "not supported", "never allocates a pty"),
        ("no-port-forwarding", "no-port-forwarding", "would forbid everything", "remove it"),
        ('no-pty="x"', 'no-pty="x"', "no-pty takes no value", "no-pty"),
        ("frobnicate", "frobnicate", "unknown option 'frobnicate'", "valid options here"),
    ],
)
def test_agents_file_errors(
    keys: list[str], options: str, keypath: str, fragment: str, hint: str
) -> None:
    err = error_of(f"# first\n{keys[0]} ok\n{options} {keys[1]} lab_pc\n")
    check(err, "agents:3", keypath, fragment)
    assert hint in err.hint


def test_key_without_a_comment(keys: list[str]) -> None:
    err = error_of(f'permitlisten="gpu:22" {keys[0]}\n')
    check(err, "agents:1", "", "the comment is the agent's name", "AAAA... lab_pc")
    err = error_of(f"{keys[0]}   \n", "user")
    check(err, "users:1", "", "the comment is the user's name", "AAAA... alice")


def test_comment_with_spaces_is_not_a_name(keys: list[str]) -> None:
    err = error_of(f"{keys[0]} Alice Smith\n", "user")
    check(err, "users:1", "", "'Alice Smith'", "without spaces")
    assert "the key's comment is the user's name" in err.hint


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("ssh-ed25519 AAAA", "not a valid ssh-ed25519 public key"),
        ("ssh-ed25519", "expected 'TYPE BASE64 [comment]'"),
        ("ssh-ed25519 @@@ x", "not base64"),
    ],
)
def test_bad_key_lines_name_the_line(key: str, fragment: str) -> None:
    err = error_of(f"\n\n{key}\n")
    check(err, "agents:3", "", fragment)


# --- users files -------------------------------------------------------------------------


def test_users_file(keys: list[str]) -> None:
    text = (
        f'permitopen="gpu-cluster:22",permitopen="jupyter:*",max-sessions="10" {keys[0]} alice\n'
        f'no-agent-forwarding,permitopen="gpu-cluster:22",max-sessions="10" {keys[1]} alice\n'
        f'permitopen="*" {keys[2]} admin\n'
        f'permitopen="*:22" {keys[3]} sshonly\n'
    )
    principals = [s.principal for s in parse_grant_file(text, "user", "users")]
    assert principals == [
        PrincipalConfig(
            kind="user",
            name="alice",
            keys=(f"{keys[0]} alice", f"{keys[1]} alice"),
            services=(ServiceGrant("gpu-cluster", 22), ServiceGrant("jupyter", None)),
            max_sessions=10,
        ),
        PrincipalConfig(
            kind="user",
            name="admin",
            keys=(f"{keys[2]} admin",),
            services=(ServiceGrant("*", None),),
        ),
        PrincipalConfig(
            kind="user",
            name="sshonly",
            keys=(f"{keys[3]} sshonly",),
            services=(ServiceGrant("*", 22),),
        ),
    ]


@pytest.mark.parametrize(
    ("options", "keypath", "fragment"),
    [
        ('permitopen="10.0.0.5:22"', 'permitopen="10.0.0.5:22"', "looks like an address"),
        ('permitopen="[::1]:22"', 'permitopen="[::1]:22"', "never addresses"),
        ('permitopen="a:1,b:2"', 'permitopen="a:1,b:2"', "never addresses"),
        ('permitopen="jupyter"', 'permitopen="jupyter"', "has no ':port'"),
        ('permitlisten="2201"', 'permitlisten="2201"', "belongs in the agents file"),
        ('max-sessions="0"', 'max-sessions="0"', "max-sessions must be a whole number >= 1"),
        ('max-sessions="many"', 'max-sessions="many"', "got 'many'"),
        ("max-sessions", "max-sessions", "max-sessions needs a value"),
    ],
)
def test_users_file_errors(keys: list[str], options: str, keypath: str, fragment: str) -> None:
    err = error_of(f"{options} {keys[0]} alice\n", "user")
    check(err, "users:1", keypath, fragment)


def test_conflicting_max_sessions_for_one_user(keys: list[str]) -> None:
    err = error_of(f'max-sessions="3" {keys[0]} alice\nmax-sessions="4" {keys[1]} alice\n', "user")
    check(err, "users:2", 'max-sessions="4"', 'already has max-sessions="3" (also users:1)')


# --- Principal truth tables ------------------------------------------------------------

AGENT = Principal(
    kind="agent",
    name="lab_pc",
    services=(ServiceGrant("gpu-cluster", 22), ServiceGrant("tensorboard", None)),
    public_ports=frozenset({2201}),
    max_sessions=None,
)
USER = Principal(
    kind="user",
    name="alice",
    services=(ServiceGrant("gpu-cluster", 22), ServiceGrant("jupyter", None)),
    public_ports=frozenset(),
    max_sessions=10,
)
EVERYTHING = Principal("user", "root", (ServiceGrant("*", None),), frozenset(), 64)
NOTHING = Principal("agent", "idle", (), frozenset(), None)


@pytest.mark.parametrize(
    ("principal", "name", "port", "register", "reach"),
    [
        (AGENT, "gpu-cluster", 22, True, False),
        (AGENT, "GPU-Cluster", 22, True, False),
        (AGENT, "gpu-cluster", 2222, False, False),
        (AGENT, "tensorboard", 6006, True, False),
        (AGENT, "tensorboard", 0, False, False),
        (AGENT, "jupyter", 8888, False, False),
        (USER, "gpu-cluster", 22, False, True),
        (USER, "gpu-cluster", 23, False, False),
        (USER, "jupyter", 8888, False, True),
        (USER, "JUPYTER", 9999, False, True),
        (USER, "jupyter", 70000, False, False),
        (USER, "tensorboard", 6006, False, False),
        (USER, "127.0.0.1", 22, False, False),
        (EVERYTHING, "anything", 1, False, True),
        (EVERYTHING, "gpu-cluster", 22, False, True),
        (EVERYTHING, "gpu-cluster", 0, False, False),
        (EVERYTHING, "", 2201, False, False),
        (EVERYTHING, "0.0.0.0", 2201, False, False),
        (EVERYTHING, "LocalHost", 2201, False, False),
        (EVERYTHING, "127.0.0.1", 2201, False, False),
        (EVERYTHING, "*", 2201, False, False),
        (NOTHING, "gpu-cluster", 22, False, False),
    ],
)
def test_register_and_reach(
    principal: Principal, name: str, port: int, register: bool, reach: bool
) -> None:
    assert principal.may_register(name, port) is register
    assert principal.may_reach(name, port) is reach


@pytest.mark.parametrize(
    ("principal", "port", "allowed"),
    [(AGENT, 2201, True), (AGENT, 2202, False), (NOTHING, 2201, False), (USER, 2201, False)],
)
def test_bind_public(principal: Principal, port: int, allowed: bool) -> None:
    assert principal.may_bind_public(port) is allowed


def test_a_user_with_a_public_port_still_cannot_bind() -> None:
    odd = replace(USER, public_ports=frozenset({2201}))
    assert not odd.may_bind_public(2201)


# --- Grants: the merged view -----------------------------------------------------------


def relay_with(keys: list[str], tmp_path: Path, **changes: Any) -> RelayConfig:
    config_agent = PrincipalConfig(
        kind="agent",
        name="cfg_agent",
        keys=(keys[0],),
        services=(ServiceGrant("gpu-cluster", 22),),
        public_ports=(2201,),
    )
    config_user = PrincipalConfig(
        kind="user", name="cfg_user", keys=(keys[1],), services=(ServiceGrant("*", None),)
    )
    base = RelayConfig(agents=(config_agent,), users=(config_user,), max_sessions_per_user=7)
    return replace(base, **changes)


def test_config_only(keys: list[str], tmp_path: Path) -> None:
    grants = Grants(relay_with(keys, tmp_path), SOURCE)
    agent = grants.principal_for(blob(keys[0]))
    assert agent == Principal(
        "agent", "cfg_agent", (ServiceGrant("gpu-cluster", 22),), frozenset({2201}), None
    )
    user = grants.principal_for(blob(keys[1]))
    assert user is not None and user.name == "cfg_user" and user.max_sessions == 7
    assert grants.principal_for(blob(keys[2])) is None
    assert grants.principal_for(b"garbage") is None
    assert grants.owner_of("gpu-cluster") == agent
    assert grants.owner_of("GPU-CLUSTER") == agent
    assert grants.owner_of("jupyter") is None
    assert grants.public_port_owner(2201) == agent
    assert grants.public_port_owner(2202) is None
    assert grants.principals() == [agent, user]


def test_config_and_files_merged(keys: list[str], tmp_path: Path) -> None:
    agents = write(
        tmp_path / "agents", f'permitlisten="jupyter:*",permitlisten="2202" {keys[2]} lab'
    )
    users = write(
        tmp_path / "users",
        f'permitopen="jupyter:8888",max-sessions="3" {keys[3]} alice',
        f'permitopen="gpu-cluster:22" {keys[5]} alice',
        f"{keys[4]} bob",
    )
    grants = Grants(relay_with(keys, tmp_path, agents_file=agents, users_file=users), SOURCE)
    assert [(p.kind, p.name) for p in grants.principals()] == [
        ("agent", "cfg_agent"),
        ("user", "cfg_user"),
        ("agent", "lab"),
        ("user", "alice"),
        ("user", "bob"),
    ]
    lab = grants.principal_for(blob(keys[2]))
    assert lab is not None and grants.owner_of("jupyter") == lab
    assert grants.public_port_owner(2202) == lab
    alice = grants.principal_for(blob(keys[3]))
    assert alice is grants.principal_for(blob(keys[5]))
    assert alice is not None and alice.max_sessions == 3
    assert alice.may_reach("gpu-cluster", 22) and alice.may_reach("jupyter", 8888)
    bob = grants.principal_for(blob(keys[4]))
    assert bob is not None and bob.services == () and bob.max_sessions == 7


@pytest.mark.parametrize(
    ("agents_line", "keypath", "fragment"),
    [
        (
            "{k0} lab",
            "",
            "this key already belongs to agent 'cfg_agent' "
            "(also relay.agent[0].keys[0] in node.toml)",
        ),
        (
            'permitlisten="gpu-cluster:*" {k2} lab',
            'permitlisten="gpu-cluster:*"',
            "service 'gpu-cluster' is already granted to agent 'cfg_agent'",
        ),
        (
            'permitlisten="2201" {k2} lab',
            'permitlisten="2201"',
            "public port 2201 is already granted to agent 'cfg_agent'",
        ),
        (
            "{k2} cfg_agent",
            "",
            "duplicate agent name 'cfg_agent' (also relay.agent[0].name in node.toml)",
        ),
    ],
)
def test_conflicts_with_the_config_at_start_up(
    keys: list[str], tmp_path: Path, agents_line: str, keypath: str, fragment: str
) -> None:
    agents = write(tmp_path / "agents", "# agents", agents_line.format(k0=keys[0], k2=keys[2]))
    with pytest.raises(ConfigError) as info:
        Grants(relay_with(keys, tmp_path, agents_file=agents), SOURCE)
    check(info.value, f"{agents}:2", keypath, fragment)


def test_conflict_between_the_two_files(keys: list[str], tmp_path: Path) -> None:
    agents = write(tmp_path / "agents", f"{keys[2]} lab")
    users = write(tmp_path / "users", f"{keys[2]} alice")
    with pytest.raises(ConfigError) as info:
        Grants(RelayConfig(agents_file=agents, users_file=users), SOURCE)
    check(info.value, f"{users}:1", "", f"already belongs to agent 'lab' (also {agents}:1)")


def test_missing_file_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Grants(RelayConfig(users_file=tmp_path / "nope"), SOURCE)
    check(info.value, str(tmp_path / "nope"), "", "cannot read the users file", "No such file")
    assert "users_file" in info.value.hint


def test_world_writable_file_is_refused(keys: list[str], tmp_path: Path) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    users.chmod(0o666)
    with pytest.raises(ConfigError) as info:
        Grants(RelayConfig(users_file=users), SOURCE)
    check(info.value, str(users), "", "writable by anyone", "chmod o-w")


def test_not_utf8(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        Grants(RelayConfig(users_file=users), SOURCE)
    check(info.value, str(users), "", "not UTF-8")


# --- Grants: reloading -----------------------------------------------------------------


def settle(grants: Grants) -> GrantsChange | None:
    """Two polls: the first notices a change, the second sees it settled and applies it."""
    first = grants.poll()
    assert first is None, "a change is applied only once it has settled"
    return grants.poll()


def test_reload_sees_a_rewrite(keys: list[str], tmp_path: Path, events: Events) -> None:
    users = write(tmp_path / "users", f'permitopen="a:1" {keys[0]} alice')
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    alice = grants.principal_for(blob(keys[0]))
    assert alice is not None and alice.may_reach("a", 1) and not alice.may_reach("b", 1)
    # Same length, same inode, written at once: only the content tells.
    write(users, f'permitopen="b:1" {keys[0]} alice')
    assert grants.principal_for(blob(keys[0])) == alice, "lookups never reload"
    change = settle(grants)
    assert change is not None
    assert change.narrowed[blob(keys[0])].services == (ServiceGrant("a", 1),)
    alice = grants.principal_for(blob(keys[0]))
    assert alice is not None and alice.may_reach("b", 1) and not alice.may_reach("a", 1)
    [reloaded] = events.named("grants_reloaded")
    assert (reloaded["users"], reloaded["revoked"], reloaded["narrowed"]) == (1, 0, 1)
    assert grants.poll() is None, "nothing changed since"


def test_reload_after_an_atomic_replace(keys: list[str], tmp_path: Path) -> None:
    agents = write(tmp_path / "agents", f'permitlisten="gpu:22" {keys[0]} lab')
    grants = Grants(RelayConfig(agents_file=agents), SOURCE)
    assert grants.owner_of("gpu") is not None
    fresh = write(tmp_path / "agents.new", f'permitlisten="gpu:22" {keys[1]} lab2')
    os.replace(fresh, agents)
    change = settle(grants)
    owner = grants.owner_of("gpu")
    assert owner is not None and owner.name == "lab2"
    assert grants.principal_for(blob(keys[0])) is None
    assert change is not None and list(change.revoked) == [blob(keys[0])]
    assert change.revoked[blob(keys[0])].where == f"{agents}:1"
    assert change.added == 1


def test_revoked_key_is_refused_once_reloaded(keys: list[str], tmp_path: Path) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice", f"{keys[1]} bob")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    seen: list[GrantsChange] = []
    grants.subscribe(seen.append)
    assert grants.principal_for(blob(keys[1])) is not None
    write(users, f"{keys[0]} alice")
    change = settle(grants)
    assert grants.principal_for(blob(keys[1])) is None
    assert grants.principal_for(blob(keys[0])) is not None
    assert seen == [change] and change is not None and list(change.revoked) == [blob(keys[1])]


def test_a_half_written_file_is_not_applied_until_it_settles(
    keys: list[str], tmp_path: Path
) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice", f"{keys[1]} bob")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    write(users)  # truncated: the writer has not written yet
    assert grants.poll() is None
    write(users, f"{keys[0]} alice", f"{keys[1]} bob", f"{keys[2]} carol")
    assert grants.poll() is None, "still changing"
    change = grants.poll()
    assert change is not None and change.revoked == {} and change.added == 1
    assert grants.principal_for(blob(keys[1])) is not None


def test_a_writer_stalled_between_truncate_and_write_is_not_applied_half_way(
    keys: list[str], tmp_path: Path, events: Events
) -> None:
    """A truncate-then-write caught with the writer stalled for two polls (0.5 s at the
    default interval: a busy machine, a slow disk) is not taken as an emptied file,
    nor cut mid-line as a file without its last lines: no key is revoked on the way."""
    lines = [f'permitlisten="gpu:22" {keys[0]} lab', f'permitlisten="web:80" {keys[1]} web']
    agents = write(tmp_path / "agents", *lines)
    grants = Grants(RelayConfig(agents_file=agents), SOURCE)
    full = agents.read_bytes()
    for cut in (b"", full[: len(lines[0]) + 20]):  # emptied; cut inside the second line
        agents.write_bytes(cut)
        assert [grants.poll() for _ in range(2)] == [None, None], cut
        agents.write_bytes(full)  # the write lands
        assert [grants.poll() for _ in range(2)] == [None, None], "changed back: no reload"
        assert grants.owner_of("web") is not None and grants.owner_of("gpu") is not None
    assert events.named("grants_reloaded") == []


def test_a_file_that_stays_emptied_or_cut_is_applied_within_three_polls(
    keys: list[str], tmp_path: Path
) -> None:
    """Fail closed all the same: an emptied file, or one whose last line has no newline,
    that reads the same three times in a row (0.5–0.75 s) is applied as it is."""
    agents = write(tmp_path / "agents", f'permitlisten="gpu:22" {keys[0]} lab',
                   f'permitlisten="web:80" {keys[1]} web')
    grants = Grants(RelayConfig(agents_file=agents), SOURCE)
    agents.write_text(f'permitlisten="gpu:22" {keys[0]} lab')  # no newline at its end
    polls = [grants.poll() for _ in range(3)]
    assert polls[:2] == [None, None] and polls[2] is not None
    assert list(polls[2].revoked) == [blob(keys[1])]
    assert grants.owner_of("gpu") is not None and grants.owner_of("web") is None
    agents.write_bytes(b"")
    polls = [grants.poll() for _ in range(3)]
    assert polls[:2] == [None, None] and polls[2] is not None
    assert list(polls[2].revoked) == [blob(keys[0])]


def test_a_cut_file_that_keeps_changing_is_taken_after_six_polls(
    keys: list[str], tmp_path: Path
) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    changes = []
    for i in range(7):
        users.write_text(f"{keys[0]} alice\n# growing{'.' * i}")  # never ends a line
        changes.append(grants.poll())
    assert changes[:6] == [None] * 6 and changes[6] is not None


def test_a_file_that_never_settles_is_taken_as_it_is(keys: list[str], tmp_path: Path) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    changes = []
    for i in range(1, 6):
        write(users, *(f"{keys[j]} user{j}" for j in range(i + 1)))
        changes.append(grants.poll())
    assert changes[:3] == [None, None, None] and changes[3] is not None


def test_a_bad_line_grants_nothing_and_the_others_still_apply(
    keys: list[str], tmp_path: Path, events: Events
) -> None:
    users = write(tmp_path / "users", f'permitopen="a:1" {keys[0]} alice', f"{keys[1]} bob")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    write(users, f'permitopen="a:1" {keys[0]} alice', f"bogus {keys[1]} bob")
    change = settle(grants)
    alice = grants.principal_for(blob(keys[0]))
    assert alice is not None and alice.may_reach("a", 1)
    assert grants.principal_for(blob(keys[1])) is None, "fails closed: bob's typo revokes bob"
    assert change is not None and list(change.revoked) == [blob(keys[1])]
    [failure] = events.named("grants_line_invalid")
    assert failure["log_level"].name == "error"
    assert failure["file"] == f"{users}:2"
    assert "unknown option 'bogus'" in failure["reason"]
    # Not re-parsed (nor logged again) while the file stays as it is ...
    assert grants.poll() is None
    assert len(events.named("grants_line_invalid")) == 1
    # ... and taken as soon as it is fixed.
    write(users, f'permitopen="a:1" {keys[0]} alice', f"{keys[1]} bob")
    settle(grants)
    bob = grants.principal_for(blob(keys[1]))
    assert bob is not None and bob.name == "bob"


def test_a_conflicting_line_grants_nothing_and_cannot_take_a_key(
    keys: list[str], tmp_path: Path, events: Events
) -> None:
    agents = write(tmp_path / "agents", f'permitlisten="gpu:22" {keys[0]} lab')
    users = write(tmp_path / "users", f"{keys[1]} alice")
    grants = Grants(RelayConfig(agents_file=agents, users_file=users), SOURCE)
    write(users, f"{keys[1]} alice", f"{keys[0]} mallory")
    change = settle(grants)
    principal = grants.principal_for(blob(keys[0]))
    assert principal is not None and principal.name == "lab"
    assert grants.principal_for(blob(keys[1])) is not None, "alice's line is not touched"
    assert change is not None and change.losses == {}
    [failure] = events.named("grants_conflict")
    assert failure["file"] == f"{users}:2" and failure["name"] == "mallory"
    assert "already belongs to agent 'lab'" in failure["reason"]


def test_a_deleted_file_grants_nothing(keys: list[str], tmp_path: Path, events: Events) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    users.unlink()
    change = settle(grants)
    assert grants.principal_for(blob(keys[0])) is None
    assert change is not None and list(change.revoked) == [blob(keys[0])]
    [missing] = events.named("grants_file_missing")
    assert missing["log_level"].name == "warn" and missing["file"] == str(users)
    write(users, f"{keys[1]} bob")
    settle(grants)
    assert grants.principal_for(blob(keys[0])) is None
    assert grants.principal_for(blob(keys[1])) is not None


def test_an_emptied_file_grants_nothing(keys: list[str], tmp_path: Path, events: Events) -> None:
    agents = write(tmp_path / "agents", f'permitlisten="gpu:22" {keys[0]} lab')
    grants = Grants(RelayConfig(agents_file=agents), SOURCE)
    write(agents, "# nobody for now")
    change = settle(grants)
    assert grants.principal_for(blob(keys[0])) is None and grants.owner_of("gpu") is None
    assert change is not None and list(change.revoked) == [blob(keys[0])]
    assert events.named("grants_file_empty")[0]["file"] == str(agents)


def test_a_world_writable_file_grants_nothing(
    keys: list[str], tmp_path: Path, events: Events
) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    users.chmod(0o666)
    settle(grants)
    assert grants.principal_for(blob(keys[0])) is None
    [invalid] = events.named("grants_file_invalid")
    assert invalid["log_level"].name == "error" and "writable by anyone" in invalid["reason"]


def test_a_file_rewritten_as_non_utf8_grants_nothing(
    keys: list[str], tmp_path: Path, events: Events
) -> None:
    """docs/security.md: "an unreadable, ``o+w`` or non-UTF-8 file grants nothing" on a
    reload too, not only at start-up (a bad encoding must not keep the old grants)."""
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    assert grants.principal_for(blob(keys[0])) is not None
    users.write_bytes(f"{keys[0]} alice\n".encode() + b"# caf\xe9\n")
    settle(grants)
    assert grants.principal_for(blob(keys[0])) is None
    [invalid] = events.named("grants_file_invalid")
    assert invalid["log_level"].name == "error" and "not UTF-8" in invalid["reason"]


def test_an_unchanged_file_is_only_stat_ed(
    keys: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    monkeypatch.setattr(grants_module, "_RACY_NS", 0)
    reads: list[Path] = []
    real_read = grants_module._read

    def counting_read(path: Path, kind: str) -> Any:
        reads.append(path)
        return real_read(path, kind)

    monkeypatch.setattr(grants_module, "_read", counting_read)
    for _ in range(5):
        assert grants.poll() is None
        assert grants.principal_for(blob(keys[0])) is not None
    assert reads == []
    os.utime(users, ns=(1, 1))
    assert grants.poll() is None, "touched, same content: no reload"
    assert grants.principal_for(blob(keys[0])) is not None
    assert reads == [users]
    assert grants.poll() is None and reads == [users]


def test_a_change_invisible_to_stat_is_seen_while_racy(
    keys: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite within one tick of the file system's clock can keep inode, size and
    times; for a while after a change the content itself is compared."""
    now = 10**18
    monkeypatch.setattr(grants_module, "_signature", lambda st: (0, 0, 0, now, now))
    users = write(tmp_path / "users", f"{keys[0]} alice")
    wall = [now]
    grants = Grants(RelayConfig(users_file=users), SOURCE, wall_ns=lambda: wall[0])
    write(users, f"{keys[0]} alice", f"{keys[1]} bob")
    settle(grants)
    assert grants.principal_for(blob(keys[1])) is not None
    wall[0] = now + grants_module._RACY_NS
    write(users, f"{keys[0]} alice")
    assert grants.poll() is None and grants.poll() is None
    assert grants.principal_for(blob(keys[1])) is not None, "stat-only once no longer racy"


def test_watcher_polls_on_the_clock(keys: list[str], tmp_path: Path) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)
    clock = Clock()
    watcher = GrantsWatcher(grants, clock, 0.25)
    watcher.start()
    write(users, "# alice is gone")
    clock.advance(0.25)
    assert grants.principal_for(blob(keys[0])) is not None, "noticed, not yet settled"
    clock.advance(0.25)
    assert grants.principal_for(blob(keys[0])) is None, "applied two intervals after the write"
    write(users, f"{keys[1]} bob")
    clock.pump([0.25, 0.25])
    assert grants.principal_for(blob(keys[1])) is not None
    users.write_bytes(b"")  # emptied: it could be a writer's truncate, so it waits longer
    clock.pump([0.25, 0.25])
    assert grants.principal_for(blob(keys[1])) is not None, "two reads alike, not three"
    clock.advance(0.25)
    assert grants.principal_for(blob(keys[1])) is None, "applied 0.75 s after the write"
    watcher.stop()
    assert clock.getDelayedCalls() == []


def test_watcher_keeps_watching_after_an_error(
    keys: list[str], tmp_path: Path, events: Events
) -> None:
    users = write(tmp_path / "users", f"{keys[0]} alice")
    grants = Grants(RelayConfig(users_file=users), SOURCE)

    def broken(change: GrantsChange) -> None:
        raise RuntimeError("observer bug")

    grants.subscribe(broken)
    clock = Clock()
    watcher = GrantsWatcher(grants, clock, 0.25)
    watcher.start()
    write(users, "# alice is gone")
    clock.advance(0.25)
    clock.advance(0.25)
    assert grants.principal_for(blob(keys[0])) is None
    assert events.named("grants_apply_failed")
    assert len(clock.getDelayedCalls()) == 1, "still polling"
    watcher.stop()


def test_watcher_without_grant_files_does_nothing() -> None:
    clock = Clock()
    watcher = GrantsWatcher(Grants(RelayConfig(), SOURCE), clock, 0.25)
    watcher.start()
    assert clock.getDelayedCalls() == []
    watcher.stop()


# --- diff_grants: plain data ----------------------------------------------------------------


def agent(name: str, *services: ServiceGrant, ports: tuple[int, ...] = ()) -> Principal:
    return Principal("agent", name, services, frozenset(ports), None)


def user(name: str, *services: ServiceGrant, max_sessions: int = 64) -> Principal:
    return Principal("user", name, services, frozenset(), max_sessions)


GPU, WEB = ServiceGrant("gpu", 22), ServiceGrant("web", 8080)


def test_diff_nothing_changed() -> None:
    state = {b"k1": agent("lab", GPU), b"k2": user("alice", GPU)}
    change = diff_grants(state, dict(state))
    assert change.losses == {} and change.added == 0


def test_diff_a_removed_key_lost_everything() -> None:
    lab = agent("lab", GPU, ports=(2201,))
    change = diff_grants({b"k1": lab, b"k2": user("alice", GPU)},
                         {b"k2": user("alice", GPU), b"k3": agent("lab", GPU)},
                         {b"k1": "agents:3"})
    assert change.revoked == {b"k1": Loss(lab, True, (GPU,), (2201,), "agents:3")}
    assert change.narrowed == {} and change.added == 1
    assert change.revoked[b"k1"].describe() == "agent lab: key no longer granted"


def test_diff_a_key_that_changed_hands_lost_everything() -> None:
    change = diff_grants({b"k": user("alice", GPU)}, {b"k": user("mallory", GPU)})
    assert change.revoked[b"k"].everything
    change = diff_grants({b"k": user("alice", GPU)}, {b"k": agent("alice", GPU)})
    assert change.revoked[b"k"].everything


def test_diff_narrowing_lists_what_was_lost() -> None:
    change = diff_grants({b"a": agent("lab", GPU, WEB, ports=(2201, 2202)),
                          b"u": user("alice", GPU, WEB)},
                         {b"a": agent("lab", GPU, ports=(2202,)), b"u": user("alice", WEB)})
    assert change.revoked == {}
    assert change.narrowed[b"a"].services == (WEB,)
    assert change.narrowed[b"a"].public_ports == (2201,)
    assert change.narrowed[b"u"].services == (GPU,)
    assert change.narrowed[b"u"].describe() == "user alice: lost gpu:22"


def test_diff_a_grant_covered_by_a_wider_one_is_no_loss() -> None:
    wide = [ServiceGrant("gpu", None), ServiceGrant("*", 22), ServiceGrant("*", None)]
    for grant in wide:
        assert diff_grants({b"u": user("alice", GPU)}, {b"u": user("alice", grant)}).losses == {}
    # ... and the other way round is a loss of the wide grant.
    change = diff_grants({b"u": user("alice", ServiceGrant("*", None))}, {b"u": user("alice", GPU)})
    assert change.narrowed[b"u"].services == (ServiceGrant("*", None),)


def test_diff_a_lowered_session_cap_is_no_loss() -> None:
    change = diff_grants({b"u": user("alice", GPU, max_sessions=10)},
                         {b"u": user("alice", GPU, max_sessions=1)})
    assert change.losses == {}


def test_public_port_names_cover_every_public_bind() -> None:
    """Every bind the relay turns into a public-port registration is a name no user
    grant reaches, not even ``*``: public ports are reached through their listener."""
    from relay.core.grants import PUBLIC_PORT_NAMES
    from relay.core.routing import PUBLIC, PUBLIC_BINDS

    assert PUBLIC in PUBLIC_PORT_NAMES
    assert PUBLIC_BINDS <= PUBLIC_PORT_NAMES
    assert not any(EVERYTHING.may_reach(name, 2201) for name in PUBLIC_PORT_NAMES)


def test_users_file_share_and_rate_options(keys: list[str]) -> None:
    """docs/config.md: ``share="2"``, ``rate-limit="20MB"``, ``rate-burst="4MB"`` on a
    users-file line are the ``[[relay.user]]`` table's ``share``, ``rate_limit`` and
    ``rate_burst``."""
    text = f'permitopen="bulk:9000",share="2",rate-limit="20MB",rate-burst="4MB" {keys[0]} alice\n'
    [site] = parse_grant_file(text, "user", "users")
    assert site.principal.share == 2.0
    assert site.principal.rate_limit == 20_000_000 and site.principal.rate_burst == 4_000_000
    with pytest.raises(ConfigError, match="share"):
        parse_grant_file(f'permitopen="bulk:9000",share="-1" {keys[0]} alice\n', "user", "users")
