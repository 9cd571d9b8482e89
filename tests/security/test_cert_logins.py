"""One certificate logged in under many names must not grow the relay without bound.

Until round 16 a ``cert-authority`` line accepted a certificate by its principals under
any login name (only ``trusted_user_ca`` bound it).  Since round 14 the relay keeps one record per
(certificate, login) and one expiry timer per (certificate, login) in use.  Mallory,
holding one certificate from the lab CA, kept one connection open and logged in again
and again under new names (a real relay, paramiko, 6 000 logins of 250-byte names):
none of her records was ever forgotten (eviction skipped every record of a certificate
in use), so past ``CERT_CACHE`` every later login scanned them all (3.6 ms a login
growing to 12 ms, the reactor blocked meanwhile; relay RSS +22 MiB), and every login
left a timer in the reactor until her certificate expired (a year, for a yearly one),
all of them firing at that moment.

Since round 16 a line grants only the login it is for (its name, as sshd's
``authorized_keys`` is per account): the logins under new names are refused before
anything is recorded, so no record and no timer is left by them at all.

Driven here through the relay's own login check (``GrantChecker``, real ``ssh-keygen``
certificates and signatures) and ``RelayCore``, with ``CERT_CACHE`` lowered so that the
bound shows in a few hundred logins.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from twisted.conch.ssh.keys import Key
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import MemoryReactorClock

from relay.config.schema import RelayConfig
from relay.server import expiry, keytrust
from relay.server.grantdiff import GrantsChange
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh.serverauth import GrantChecker
from relay.testing import FakeIdentity, FakeRelayConnection, result_of

KEYGEN = shutil.which("ssh-keygen")
CACHE = 32
LOGINS = 400


class Holder:
    """One user's key and certificate, logging in through the relay's checker."""

    def __init__(self, d: Path, name: str) -> None:
        self.blob = base64.b64decode((d / f"{name}-cert.pub").read_text().split()[1])
        self.key = Key.fromFile(str(d / name))

    def login(self, checker: GrantChecker, login: str) -> FakeIdentity:
        data = b"session id and userauth request " + login.encode()
        creds = SSHPrivateKey(login.encode(), b"ssh-ed25519-cert-v01@openssh.com",
                              self.blob, data, self.key.sign(data))
        creds.peer = "10.0.0.7"  # type: ignore[attr-defined]
        ident = result_of(checker.requestAvatarId(creds))
        return FakeIdentity(ident.key_blob, ident.name, ident.kind, login=login)

    def refused(self, checker: GrantChecker, login: str) -> str:
        """Log in as ``login``: it must be refused; why."""
        data = b"session id and userauth request " + login.encode()
        creds = SSHPrivateKey(login.encode(), b"ssh-ed25519-cert-v01@openssh.com",
                              self.blob, data, self.key.sign(data))
        creds.peer = "10.0.0.7"  # type: ignore[attr-defined]
        failure = result_of(checker.requestAvatarId(creds))
        assert failure.check(UnauthorizedLogin), failure
        return failure.getErrorMessage()


@pytest.mark.skipif(KEYGEN is None, reason="ssh-keygen not installed")
def test_one_certificate_logged_in_under_many_names_costs_bounded_records_and_timers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert KEYGEN is not None
    monkeypatch.setattr(keytrust, "CERT_CACHE", CACHE)
    for name in ("ca", "lab_pc", "bob", "mallory"):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(tmp_path / name)], check=True)
    sign = [KEYGEN, "-q", "-s", str(tmp_path / "ca"), "-V", "-5m:+52w"]
    for name, principals in (("lab_pc", "lab_pc"), ("bob", "bob"), ("mallory", "mallory")):
        subprocess.run([*sign, "-I", f"{name}@lab", "-n", principals,
                        str(tmp_path / f"{name}.pub")], check=True)
    ca = " ".join((tmp_path / "ca.pub").read_text().split()[:2])
    (tmp_path / "agents").write_text(
        f'cert-authority,principals="lab_pc",permitlisten="web:8080" {ca} lab_pc\n')
    (tmp_path / "users").write_text(
        f'cert-authority,principals="bob",permitopen="web:8080" {ca} bob\n'
        f'cert-authority,principals="mallory",permitopen="web:8080" {ca} mallory\n')
    config = RelayConfig(agents_file=tmp_path / "agents", users_file=tmp_path / "users")
    reactor = MemoryReactorClock()
    core = RelayCore(config, Grants(config, "node.toml"), reactor)
    checker = GrantChecker(core)

    honest = []
    for name in ("lab_pc", "bob"):
        conn = FakeRelayConnection(Holder(tmp_path, name).login(checker, name))
        core.sessionStarted(conn)  # type: ignore[arg-type]
        honest.append(conn)
    mallory = Holder(tmp_path, "mallory")
    held = FakeRelayConnection(mallory.login(checker, "mallory"))
    core.sessionStarted(held)  # type: ignore[arg-type]

    for i in range(LOGINS):  # each under a new name: refused, no line is for it
        why = mallory.refused(checker, f"m{i:05d}")
        assert f"may log in as mallory only, not as 'm{i:05d}'" in why, why

    records = len(core.grants.trust._certs)
    timers = len(core.expiry._timers)
    print(f"{LOGINS} logins under new names: {records} records, {timers} expiry timers, "
          f"{len(reactor.getDelayedCalls())} delayed calls")
    assert records == 3, f"{records} certificate records kept for 3 in use"
    assert timers == 3, f"{timers} expiry timers for 3 in use"
    assert records <= CACHE + 3 and timers <= 2 * expiry.PRUNE_FLOOR + 3

    # What is in use stays known and watched: each connection, as the login it made.
    for conn in (*honest, held):
        login = conn.identity.login
        p = core.grants.principal_for(conn.identity.key_blob, login)
        assert p is not None and p.name == conn.identity.name, login
        assert (conn.identity.key_blob, login) in core.expiry._timers, login
    core.grantsChanged(GrantsChange({}))  # a reload or a KRL change re-checks every key
    assert [c.disconnected for c in (*honest, held)] == [[], [], []]
