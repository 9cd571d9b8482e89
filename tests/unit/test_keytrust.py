"""Grants with key limits and revoked keys, on real files and a given wall clock:
``expiry-time`` and ``from=`` at login and afterwards, ``revoked_keys`` as a KRL from
``ssh-keygen -k`` or as a list of public keys, read strictly at start-up and failing
closed on a bad reload (the previous list stays in force)."""

from __future__ import annotations

import calendar
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from twisted.conch.ssh.keys import Key

from relay.config.errors import ConfigError
from relay.config.schema import RelayConfig
from relay.server.grantdiff import GrantsChange
from relay.server.grants import Grants

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
    # the relay is told (an empty change: it re-checks every key in use).
    (d / "revoked.krl").write_text(f"# left the lab\n{keys[0]} u0\n")
    grants.poll()
    assert len(changes) == 1 and not changes[0].losses
    assert grants.principal_for(blob(keys[0])) is None
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
