"""Grants with key limits and revoked keys, on real files and a given wall clock:
``expiry-time`` and ``from=`` at login and afterwards, ``revoked_keys`` as a KRL from
``ssh-keygen -k`` or as a list of public keys, read strictly at start-up and failing
closed on a bad reload (the previous list stays in force)."""

from __future__ import annotations

import base64
import calendar
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import common
from twisted.conch.ssh.keys import Key
from twisted.cred.credentials import SSHPrivateKey
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from relay.config.errors import ConfigError
from relay.config.schema import RelayConfig
from relay.server import keytrust
from relay.server.grantdiff import GrantsChange
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh.serverauth import GrantChecker
from relay.testing import FakeIdentity, FakeRelayConnection, result_of

KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.skipif(KEYGEN is None and os.environ.get("CI") != "true",
                                reason="ssh-keygen not installed")
EXPIRES = float(calendar.timegm((2030, 3, 17, 8, 0, 0)))  # expiry-time="20300317080000Z"
T0 = EXPIRES - 3600  # the wall clock the grants see, an hour before


def make_key(d: Path, name: str) -> str:
    assert KEYGEN is not None
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(d / name)],
                   check=True)
    return " ".join((d / f"{name}.pub").read_text().split()[:2])


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return int(self.now * 1e9)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str], Wall]:
    keys = [make_key(tmp_path, f"k{i}") for i in range(3)]
    return tmp_path, keys, Wall()


def blob(key: str) -> bytes:
    return Key.fromString(key).blob()


def test_expiry_time_and_from_at_login_and_after(setup: tuple[Path, list[str], Wall]) -> None:
    d, keys, wall = setup
    users = d / "users"
    users.write_text(
        f'expiry-time="20300317080000Z",from="10.0.0.0/8",permitopen="web:80" {keys[0]} alice\n'
        f'expiry-time="20200101Z",permitopen="web:80" {keys[1]} old\n')
    grants = Grants(RelayConfig(users_file=users), "node.toml", wall_ns=wall)
    ok = grants.authenticate(blob(keys[0]), "alice", "10.1.2.3")
    assert ok.principal is not None and ok.expires == EXPIRES
    assert grants.expires(blob(keys[0])) == EXPIRES
    refused = grants.authenticate(blob(keys[0]), "alice", "192.168.1.1")
    assert refused.principal is None and "from=" in refused.reason
    assert "expired" in grants.authenticate(blob(keys[1]), "old", "10.1.2.3").reason
    assert grants.principal_for(blob(keys[1])) is None
    assert grants.principal_for(blob(keys[0])) is not None
    assert grants.refusal(blob(keys[0])) is None  # from= was decided at login
    wall.now = EXPIRES
    assert grants.principal_for(blob(keys[0])) is None  # expired since login
    assert grants.refusal(blob(keys[0])) == "key expired at 2030-03-17 08:00:00 UTC (expiry-time)"


def test_revoked_keys_krl_and_text(setup: tuple[Path, list[str], Wall]) -> None:
    d, keys, wall = setup
    assert KEYGEN is not None
    users = d / "users"
    users.write_text("".join(f'permitopen="web:80" {k} u{i}\n' for i, k in enumerate(keys)))
    subprocess.run([KEYGEN, "-q", "-k", "-f", str(d / "revoked.krl"), str(d / "k1.pub")],
                   check=True)
    grants = Grants(RelayConfig(users_file=users, revoked_keys=d / "revoked.krl"), "node.toml",
                    wall_ns=wall)
    assert grants.watched
    why = grants.authenticate(blob(keys[1]), "u1", "10.0.0.1").reason
    assert "listed in the KRL" in why
    assert grants.principal_for(blob(keys[0])) is not None
    changes: list[GrantsChange] = []
    grants.subscribe(changes.append)
    # Now a text file of public keys, revoking k0 instead: re-read on the next poll, and
    # the relay is told (an empty change: it re-checks every key in use).  k0 is revoked
    # at once; k1, no longer listed, only once three polls in a row read it so (it could
    # be a file cut mid-write).
    (d / "revoked.krl").write_text(f"# left the lab\n{keys[0]} u0\n")
    grants.poll()
    assert len(changes) == 1 and not changes[0].losses
    assert grants.principal_for(blob(keys[0])) is None
    assert grants.principal_for(blob(keys[1])) is None
    grants.poll()
    grants.poll()
    assert grants.principal_for(blob(keys[1])) is not None
    # Why a key in use ends, as relay_key_ended says it: which list, not a guess.
    assert grants.refusal(blob(keys[0])) == "the key is listed in the KRL"
    assert grants.refusal(blob(keys[1])) is None
    assert grants.refusal(blob(make_key(d, "stranger"))) == "the key is no longer granted"
    # A broken file on reload keeps the list in force (fail closed)...
    (d / "revoked.krl").write_bytes(b"SSHKRL\n\x00garbage")
    grants.poll()
    assert grants.principal_for(blob(keys[0])) is None
    # ...and stops the relay at start-up.
    with pytest.raises(ConfigError, match="revoked keys"):
        Grants(RelayConfig(users_file=users, revoked_keys=d / "revoked.krl"), "node.toml")
    # A reload whose [relay] names no revoked_keys any more: the keys it listed are back.
    grants.reconfigure(RelayConfig(users_file=users))
    assert grants.principal_for(blob(keys[0])) is not None


def test_a_krl_caught_emptied_mid_write_revokes_on_until_it_stays_empty(
    setup: tuple[Path, list[str], Wall],
) -> None:
    """``ssh-keygen -k -u`` rewrites the KRL in place (truncate, then write): a poll
    between the two read an empty file, which as a list of public keys revokes nothing,
    so every revoked key could log in until the next poll.  An emptied file is taken, as
    a grant file is, only once three polls in a row read it empty (0.5 s by default);
    the write landing meanwhile is taken at once."""
    d, keys, wall = setup
    assert KEYGEN is not None
    users = d / "users"
    users.write_text("".join(f'permitopen="web:80" {k} u{i}\n' for i, k in enumerate(keys)))
    krl = d / "revoked.krl"
    subprocess.run([KEYGEN, "-q", "-k", "-f", str(krl), str(d / "k1.pub")], check=True)
    grants = Grants(RelayConfig(users_file=users, revoked_keys=krl), "node.toml", wall_ns=wall)
    assert grants.principal_for(blob(keys[1])) is None

    # ssh-keygen -k -u adding k2, caught between its truncate and its write
    shutil.copy(krl, d / "next.krl")
    subprocess.run([KEYGEN, "-q", "-k", "-u", "-f", str(d / "next.krl"), str(d / "k2.pub")],
                   check=True)
    krl.write_bytes(b"")
    grants.poll()
    assert grants.principal_for(blob(keys[1])) is None, "an emptied KRL un-revoked k1 at once"
    assert "listed in the KRL" in grants.authenticate(blob(keys[1]), "u1", "10.0.0.1").reason
    krl.write_bytes((d / "next.krl").read_bytes())
    grants.poll()  # the write landed: taken at once, k2 revoked too
    assert grants.principal_for(blob(keys[1])) is None
    assert grants.principal_for(blob(keys[2])) is None

    krl.write_bytes(b"")  # emptied on purpose: taken on the third read in a row
    for _ in range(2):
        grants.poll()
        assert grants.principal_for(blob(keys[1])) is None
    grants.poll()
    assert grants.principal_for(blob(keys[1])) is not None
    assert grants.principal_for(blob(keys[2])) is not None


def test_a_revoked_keys_file_cut_at_a_line_break_or_rewritten_in_one_tick_stays_revoked(
    setup: tuple[Path, list[str], Wall],
) -> None:
    """A text ``revoked_keys`` read mid-write, cut exactly at a line break, parses: taken
    at once it un-revoked the keys after the cut until the next poll.  A version that
    might revoke less than the one in force is taken only once three polls in a row read
    it the same; meanwhile what either revokes stays revoked.  And a rewrite of the same
    size within one time stamp tick (same size and mtime) is seen: the content is
    compared, not only (size, mtime)."""
    d, keys, wall = setup
    users = d / "users"
    users.write_text("".join(f'permitopen="web:80" {k} u{i}\n' for i, k in enumerate(keys)))
    revoked = d / "revoked"
    full = f"{keys[1]} u1\n{keys[2]} u2\n"
    revoked.write_text(full)
    grants = Grants(RelayConfig(users_file=users, revoked_keys=revoked), "node.toml",
                    wall_ns=wall)
    assert grants.principal_for(blob(keys[2])) is None

    # An editor's rewrite in place, caught after its first line.
    revoked.write_text(f"{keys[1]} u1\n")
    grants.poll()
    assert grants.principal_for(blob(keys[2])) is None, "a cut file un-revoked k2"
    revoked.write_text(full)  # the write lands
    grants.poll()
    assert grants.principal_for(blob(keys[1])) is None
    assert grants.principal_for(blob(keys[2])) is None
    # Cut mid-line after a whole key (no final newline): waits too.
    revoked.write_text(full.rstrip("\n"))
    grants.poll()
    assert grants.principal_for(blob(keys[2])) is None
    revoked.write_text(full)
    grants.poll()

    # The same size, the same time stamp, other content: k0 for k2 (u0 and u2 are as
    # long, and the keys are all ed25519), within one tick.
    st = os.stat(revoked)
    swapped = f"{keys[1]} u1\n{keys[0]} u0\n"
    assert len(swapped) == len(full)
    revoked.write_text(swapped)
    os.utime(revoked, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(revoked).st_size == st.st_size
    grants.poll()
    assert grants.principal_for(blob(keys[0])) is None, "a same-size rewrite went unseen"
    assert grants.principal_for(blob(keys[2])) is None  # un-revoked only once it holds
    grants.poll()
    grants.poll()
    assert grants.principal_for(blob(keys[2])) is not None
    assert grants.principal_for(blob(keys[0])) is None


# --- certificates remembered after login ---------------------------------------------------


def _signed_login(checker: GrantChecker, d: Path, name: str, login: str,
                  sign: bool = True) -> Any:
    """``name``'s certificate (``d/name-cert.pub``) presented as ``login`` the way
    ssh(1) does: with a signature by ``d/name`` over the session data, or (``sign``
    false) offered without one, as any client may do with a public certificate."""
    blob = base64.b64decode((d / f"{name}-cert.pub").read_text().split()[1])
    data = b"session id and userauth request"
    signature = Key.fromFile(str(d / name)).sign(data) if sign else None
    creds = SSHPrivateKey(login.encode(), b"ssh-ed25519-cert-v01@openssh.com", blob,
                          data if sign else None, signature)
    creds.peer = "10.0.0.7"  # type: ignore[attr-defined]
    return checker.requestAvatarId(creds)


def test_a_certificate_in_use_is_never_forgotten_and_an_unsigned_offer_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay remembers the certificates that logged in (to check them again on each
    session and reload), at most ``CERT_CACHE``.  A lab with short-lived certificates
    (one per login, from an online CA) passes that many while its lab PC's agent, logged
    in with a certificate weeks ago, is still connected: the agent's certificate must not
    be the one forgotten (it was: its lookups failed, and the next reload or KRL change
    disconnected it, 'certificate not seen at login').  And only a login that proved the
    key is remembered: a certificate offered without a signature (ssh's query, or
    anyone holding the public ``-cert.pub``) is checked, not recorded."""
    assert KEYGEN is not None
    monkeypatch.setattr(keytrust, "CERT_CACHE", 3)
    for name in ("ca", "lab_pc", *(f"u{i}" for i in range(6))):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(tmp_path / name)], check=True)
    sign = [KEYGEN, "-q", "-s", str(tmp_path / "ca"), "-V", "-5m:+1h"]
    subprocess.run([*sign, "-I", "lab_pc", "-n", "lab_pc,web:8080",
                    str(tmp_path / "lab_pc.pub")], check=True)
    for i in range(6):
        subprocess.run([*sign, "-I", f"alice-{i}", "-n", "alice", str(tmp_path / f"u{i}.pub")],
                       check=True)
    ca = " ".join((tmp_path / "ca.pub").read_text().split()[:2])
    (tmp_path / "agents").write_text(
        f'cert-authority,principals="lab_pc",permitlisten="web:8080" {ca} lab_pc\n')
    (tmp_path / "users").write_text(
        f'cert-authority,principals="alice",permitopen="web:8080" {ca} alice\n')
    config = RelayConfig(agents_file=tmp_path / "agents", users_file=tmp_path / "users")
    core = RelayCore(config, Grants(config, "node.toml"), MemoryReactorClock())
    checker = GrantChecker(core)

    agent_id = result_of(_signed_login(checker, tmp_path, "lab_pc", "lab_pc"))
    agent = FakeRelayConnection(FakeIdentity(agent_id.key_blob, "lab_pc", "agent",
                                             login="lab_pc"))
    core.connections.add(agent)  # type: ignore[arg-type]
    for i in range(5):  # alice's short-lived certificates, one login each, gone since
        assert result_of(_signed_login(checker, tmp_path, f"u{i}", "alice")).name == "alice"

    granted = core.grants.principal_for(agent_id.key_blob, "lab_pc")
    assert granted is not None and granted.name == "lab_pc"
    core.grantsChanged(GrantsChange({}))  # a reload or a KRL change re-checks every key
    assert agent.disconnected == []

    # An offer without a signature: checked (ssh learns the key would do), not recorded.
    offer = _signed_login(checker, tmp_path, "u5", "alice", sign=False)
    assert offer.result.check(ValidPublicKey)
    offer.addErrback(lambda _f: None)
    blob5 = base64.b64decode((tmp_path / "u5-cert.pub").read_text().split()[1])
    assert core.grants.principal_for(blob5) is None

    # The agent's link goes down with a session held for it: the held session keeps its
    # certificate's record (as the login lab_pc made) however many logins come after.
    from relay.core.resume import OPEN_RESUMABLE, SID_LEN, ResumeOwner
    from relay.datapath.bridge import Bridge
    from relay.ssh.channels import BridgedChannel
    from relay.testing import FakeSide, FakeSSHConnection

    held_row = core.sessions.open("alice", "web:8080", "x:2", 0.0, agent=agent)
    channel = BridgedChannel(OPEN_RESUMABLE, remoteWindow=1 << 20, remoteMaxPacket=32768,
                             conn=FakeSSHConnection())
    side = core.resumes.sessions.open(b"h" * SID_LEN, ResumeOwner(agent_id.key_blob, b"i",
                                                                  "lab_pc"),
                                      channel, "web:8080 from x:2")
    side.row = held_row
    Bridge(FakeSide(), side)
    core.connections.discard(agent)  # type: ignore[arg-type]
    channel.closed()
    assert side.held and core.resumes.held_holders() == {(agent_id.key_blob, "lab_pc")}
    for i in range(5):
        assert result_of(_signed_login(checker, tmp_path, f"u{i}", "alice")).name == "alice"
    assert (agent_id.key_blob, "lab_pc") in core.grants.trust._certs
    core.grantsChanged(GrantsChange({}))
    assert held_row.closing is None and side.held


@pytest.mark.parametrize("first", ["lab", "alice"])
def test_one_certificate_logged_in_under_two_names_is_checked_as_each(
    tmp_path: Path, first: str,
) -> None:
    """A student logged in as herself and, with the same certificate, as the shared lab
    account.  The relay kept one record per certificate, so both connections were looked
    up as the last login (its grants, its name in the logs) and re-checked as it: when
    the lab account's line expired (``expiry-time``), the lab connection stayed if she
    had logged in as herself last (fail open), and her own connection ended with it if
    the lab login came last.  Each connection is checked as the login it made."""
    assert KEYGEN is not None
    wall = Wall()
    for name in ("ca", "alice"):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(tmp_path / name)], check=True)
    subprocess.run([KEYGEN, "-q", "-s", str(tmp_path / "ca"), "-V",
                    "20300317000000Z:20300318000000Z", "-I", "alice-laptop", "-n", "alice,lab",
                    str(tmp_path / "alice.pub")], check=True)
    ca = " ".join((tmp_path / "ca.pub").read_text().split()[:2])
    (tmp_path / "users").write_text(
        f'cert-authority,principals="alice",permitopen="web:8080" {ca} alice\n'
        f'cert-authority,principals="lab",expiry-time="20300317080000Z",'
        f'permitopen="secret:22" {ca} lab\n')
    config = RelayConfig(users_file=tmp_path / "users")
    reactor = MemoryReactorClock()
    core = RelayCore(config, Grants(config, "node.toml", wall_ns=wall), reactor)
    checker = GrantChecker(core)

    conns = {}
    for login in (first, "lab" if first == "alice" else "alice"):
        ident = result_of(_signed_login(checker, tmp_path, "alice", login))
        assert (ident.name, ident.login) == (login, login)
        conns[login] = FakeRelayConnection(FakeIdentity(ident.key_blob, login, "user",
                                                        login=login))
        core.sessionStarted(conns[login])  # type: ignore[arg-type]
    cert = conns["alice"].identity.key_blob
    assert conns["lab"].identity.key_blob == cert

    # Each connection's look-ups (its sessions, fast-path tokens) are as its own login.
    p = core.grants.principal_for(cert, "alice")
    assert p is not None and p.name == "alice", "alice's connection got lab's grants"
    assert p.may_reach("web", 8080) and not p.may_reach("secret", 22)
    p = core.grants.principal_for(cert, "lab")
    assert p is not None and p.name == "lab" and p.may_reach("secret", 22)

    # The lab line's expiry-time passes: the lab connection ends, hers stays.
    wall.now = EXPIRES + 1
    reactor.advance(EXPIRES - T0 + 1)
    assert conns["lab"].disconnected, "the lab login outlived its line's expiry-time"
    assert not conns["alice"].disconnected, "her own login ended with the lab one"
    core.grantsChanged(GrantsChange({}))  # a reload or KRL change: the same, per login
    assert not conns["alice"].disconnected


def test_a_narrowed_cert_authority_line_takes_away_what_it_no_longer_grants(
    tmp_path: Path,
) -> None:
    """A reload narrows the lab CA's lines: the agent's loses ``gpu:22`` and the public
    port a session is held on (its link is down), the user's loses ``gpu:22``.  A
    certificate is granted by its CA line, not by a key the diff of a reload can name,
    so nothing was taken away: the agent kept its registration (and its port), alice her
    session to gpu:22, and the agent could resume the held session to a port it may no
    longer serve.  Each goes as a plain key's would; what is still granted stays."""
    from relay.core.resume import OPEN_RESUMABLE, SID_LEN, ResumeOwner
    from relay.datapath.bridge import Bridge
    from relay.ssh.channels import BridgedChannel
    from relay.testing import FakeSide, FakeSSHConnection

    assert KEYGEN is not None
    for name in ("ca", "lab_pc", "alice"):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(tmp_path / name)], check=True)
    for name, principals in (("lab_pc", "lab_pc,web:8080,gpu:22"), ("alice", "alice")):
        subprocess.run([KEYGEN, "-q", "-s", str(tmp_path / "ca"), "-V",
                        "20300317000000Z:20300318000000Z", "-I", name, "-n", principals,
                        str(tmp_path / f"{name}.pub")], check=True)
    ca = " ".join((tmp_path / "ca.pub").read_text().split()[:2])
    agents, users = tmp_path / "agents", tmp_path / "users"

    def lines(narrowed: bool) -> None:
        more = "" if narrowed else ',permitlisten="gpu:22",permitlisten="4711"'
        agents.write_text(f'cert-authority,principals="lab_pc",permitlisten="web:8080"{more} '
                          f'{ca} lab_pc\n')
        more = "" if narrowed else ',permitopen="gpu:22"'
        users.write_text(f'cert-authority,principals="alice",permitopen="web:8080"{more} '
                         f'{ca} alice\n')

    lines(narrowed=False)
    config = RelayConfig(agents_file=agents, users_file=users)
    reactor = MemoryReactorClock()
    core = RelayCore(config, Grants(config, "node.toml", wall_ns=Wall()), reactor)
    checker = GrantChecker(core)
    conns = {}
    for name, kind in (("lab_pc", "agent"), ("alice", "user")):
        ident = result_of(_signed_login(checker, tmp_path, name, name))
        conns[name] = FakeRelayConnection(FakeIdentity(ident.key_blob, name, kind, login=name))
        core.sessionStarted(conns[name])  # type: ignore[arg-type]
    agent, alice = conns["lab_pc"], conns["alice"]
    for service in ("web", "gpu"):
        port = 8080 if service == "web" else 22
        request = common.NS(service.encode()) + struct.pack(">L", port)
        assert result_of(defer.maybeDeferred(core.globalRequest, agent, b"tcpip-forward",
                                             request)) is True
    rows = {s: core.sessions.open("alice", s, "x:1", 0.0, key=alice.identity.key_blob,
                                  login="alice", agent=agent) for s in ("web:8080", "gpu:22")}
    # A session to public port 4711 held for the agent, whose link is down.
    held_row = core.sessions.open("public:4711", "public:4711", "x:2", 0.0, agent=agent)
    channel = BridgedChannel(OPEN_RESUMABLE, remoteWindow=1 << 20, remoteMaxPacket=32768,
                             conn=FakeSSHConnection())
    owner = ResumeOwner(agent.identity.key_blob, b"i", "lab_pc")
    side = core.resumes.sessions.open(b"h" * SID_LEN, owner, channel, "public:4711 from x:2")
    side.row = held_row
    Bridge(FakeSide(), side)
    channel.closed()
    assert side.held and core.resumes.held_holders() == {(agent.identity.key_blob, "lab_pc")}

    lines(narrowed=True)
    assert core.grants.reload().losses == {}  # no key the diff could name
    assert core.registry.lookup("gpu", 22) is None, "the agent kept gpu:22"
    assert [(b, p) for b, p, _ in agent.revoked] == [("gpu", 22)]  # grant-revoked@labrelay
    assert core.registry.lookup("web", 8080) is not None
    assert rows["gpu:22"].closing == "gpu:22 is no longer granted to user alice"
    assert rows["web:8080"].closing is None
    assert held_row.closing == ("held for resumption: public:4711 is no longer granted to "
                                "agent lab_pc"), "the held session may be resumed"
    assert not agent.disconnected and not alice.disconnected


def test_a_renewed_certificate_resumes_only_the_sessions_it_grants(tmp_path: Path) -> None:
    """lab_pc's agent certificate names ``web:8080`` and ``gpu:22``; sessions to each
    are held when its link goes down.  The renewal that lands meanwhile names only
    web:8080: the same agent process, logged in with it, resumes a web:8080 session,
    and its gpu:22 session is refused and ended, not handed to an agent that may no
    longer serve it (the relay.core.resume.may_resume renewal carries grants of its
    own, which no reload diff announced).  Then the agent restarts, still with the
    renewal: its hello resets the session the old process left held, at once, as it
    would without the renewal."""
    from relay.core.resume import (
        OPEN_RESUMABLE,
        SID_LEN,
        Offer,
        Refusal,
        ResumeOwner,
        ResumeRefused,
        StreamState,
        pack_hello,
        pack_offer,
    )
    from relay.datapath.bridge import Bridge
    from relay.ssh.channels import BridgedChannel
    from relay.testing import FakeSide, FakeSSHConnection

    assert KEYGEN is not None
    for name in ("ca", "lab_pc"):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(tmp_path / name)], check=True)

    def sign(serial: int, principals: str) -> None:
        subprocess.run([KEYGEN, "-q", "-s", str(tmp_path / "ca"), "-z", str(serial), "-V",
                        "20300317000000Z:20300318000000Z", "-I", "lab_pc", "-n", principals,
                        str(tmp_path / "lab_pc.pub")], check=True)

    sign(1, "lab_pc,web:8080,gpu:22")
    ca = " ".join((tmp_path / "ca.pub").read_text().split()[:2])
    agents = tmp_path / "agents"
    agents.write_text('cert-authority,principals="lab_pc",permitlisten="web:8080",'
                      f'permitlisten="gpu:22" {ca} lab_pc\n')
    config = RelayConfig(agents_file=agents)
    reactor = MemoryReactorClock()
    core = RelayCore(config, Grants(config, "node.toml", wall_ns=Wall()), reactor)
    checker = GrantChecker(core)
    first = result_of(_signed_login(checker, tmp_path, "lab_pc", "lab_pc"))
    agent = FakeRelayConnection(FakeIdentity(first.key_blob, "lab_pc", "agent",
                                             login="lab_pc"))
    core.sessionStarted(agent)  # type: ignore[arg-type]
    old = ResumeOwner(first.key_blob, b"i", "lab_pc")
    sides = {}
    for n, service in enumerate(("web:8080", "gpu:22", "web:8080#2")):
        channel = BridgedChannel(OPEN_RESUMABLE, remoteWindow=1 << 20,
                                 remoteMaxPacket=32768, conn=FakeSSHConnection())
        sid = bytes([n + 1]) * SID_LEN
        side = core.resumes.sessions.open(sid, old, channel, f"{service} from x:{n}")
        side.row = core.sessions.open("alice", service.split("#")[0], f"x:{n}", 0.0,
                                      agent=agent)
        Bridge(FakeSide(), side)
        channel.closed()  # the link went
        sides[service] = side
    core.sessionStopped(agent)  # type: ignore[arg-type]

    sign(2, "lab_pc,web:8080")  # the renewal job, over lab_pc-cert.pub
    renewed = result_of(_signed_login(checker, tmp_path, "lab_pc", "lab_pc"))
    assert renewed.key_blob != first.key_blob
    new = ResumeOwner(renewed.key_blob, b"i", "lab_pc")

    def offer(service: str) -> Any:
        return core.resumes.sessions.accept(
            FakeSSHConnection(), new, 1 << 20, 32768, 1 << 20, 32768,
            pack_offer(Offer(sides[service].sid, 0, False)))

    assert offer("web:8080") is not None
    with pytest.raises(ResumeRefused) as refused:
        offer("gpu:22")
    assert refused.value.why is Refusal.NOT_GRANTED
    assert "gpu:22 is not granted to agent lab_pc" in str(refused.value)
    assert sides["gpu:22"].stream.state is StreamState.ENDED
    assert sides["gpu:22"].sid not in core.resumes.sessions.sides
    assert sides["web:8080"].stream.owner == new

    # The agent restarts (another instance), with the renewal.
    assert sides["web:8080#2"].held
    restarted = FakeRelayConnection(FakeIdentity(renewed.key_blob, "lab_pc", "agent",
                                                 login="lab_pc"))
    assert core.resumes.hello(restarted, pack_hello(b"j")) is not False  # type: ignore[arg-type]
    assert sides["web:8080#2"].stream.state is StreamState.ENDED, "left to the grace"
