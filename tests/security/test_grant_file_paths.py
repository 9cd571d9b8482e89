"""A grant file whose directory anyone may write: another local user grants herself.

The relay refused a grant file that anyone may write (round 6), but not one in a
directory that anyone may write: there, any user of the relay's host renames a file of
her own over it and the relay's watch takes it within a poll.  Here a real process
running as ``nobody`` (setpriv) does that to a running ``labrelay relay``, then logs in
with paramiko under the name she granted herself.  Now the file grants nothing (fail
closed, as for a file anyone may write), she is refused, ``labrelay check`` names the
directory and the fix, and a revoked-keys list in such a directory is not taken (it
could un-revoke a stolen key).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from harness import HarnessError, RelayNode, make_key
from relay_fixtures import wait_until

pytestmark = [
    pytest.mark.security,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                       reason="plays another local user with setpriv: needs root "
                       "(CI runs as root)"),
]

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the relay and ``nobody`` can both reach (pytest's own temp tree is
    private to root), made 0755 as an admin would; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="labrelay-grants-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    *argv], check=True, capture_output=True, timeout=30)


def logs_in(relay: RelayNode, user: str, identity: Path) -> bool:
    key = paramiko.Ed25519Key.from_private_key_file(str(identity))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            try:
                transport.auth_publickey(user, key)
            except paramiko.AuthenticationException:
                return False
            return transport.is_authenticated()
        finally:
            transport.close()


def check_refuses(relay: RelayNode) -> str:
    """``labrelay check`` of the relay's config: it must fail; what it printed."""
    check = subprocess.run([sys.executable, "-m", "relay", "check", str(relay.dir / "node.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0
    return check.stdout + check.stderr


def test_a_local_user_cannot_grant_herself_through_an_open_directory(
        tmp_path: Path, shared_dir: Path, start_relay: Callable[..., RelayNode]) -> None:
    alice = make_key(tmp_path / "alice", comment="alice")
    mallory = make_key(tmp_path / "mallory", comment="mallory")
    users = shared_dir / "users"
    users.write_text(f'permitopen="gpu:22" {alice.public_blob()} alice\n')
    users.chmod(0o644)
    relay = start_relay(grant_files=False, relay_toml=f'users_file = "{users}"\n'
                        "grants_poll_interval = 0.05\n")
    assert logs_in(relay, "alice", alice.path)

    # The admin's slip: the directory opened to everyone (the file itself stays 0644).
    mark = relay.mark()
    shared_dir.chmod(0o777)
    forged = f'permitopen="gpu:22" {alice.public_blob()} alice\n' \
             f'permitopen="gpu:22" {mallory.public_blob()} mallory\n'
    as_nobody(sys.executable, "-c",
              "import os, sys; d = sys.argv[1]; "
              "open(os.path.join(d, '.users'), 'w').write(sys.argv[2]); "
              "os.chmod(os.path.join(d, '.users'), 0o644); "
              "os.replace(os.path.join(d, '.users'), os.path.join(d, 'users'))",
              str(shared_dir), forged)
    assert users.stat().st_uid == NOBODY  # her file now stands where the admin's stood

    # Whichever the relay does with her file (main's code took it: grants_reloaded)...
    wait_until(lambda: bool(relay.events("grants_file_invalid", since=mark)
                            or relay.events("grants_reloaded", since=mark)),
               "the relay to read the replaced users file", timeout=10)
    assert not logs_in(relay, "mallory", mallory.path), "she granted herself"
    event = relay.wait_for("grants_file_invalid", since=mark, timeout=1)
    assert f"the directory {shared_dir} above it is writable by anyone" in str(event)

    assert f"chmod o-w {shared_dir}" in check_refuses(relay)


def test_a_revoked_keys_list_in_an_open_directory_is_not_taken(
        tmp_path: Path, shared_dir: Path, start_relay: Callable[..., RelayNode]) -> None:
    carol = make_key(tmp_path / "carol", comment="carol")
    revoked = shared_dir / "revoked"
    revoked.write_text(carol.public + "\n")
    revoked.chmod(0o644)
    relay = start_relay(users=[f'permitopen="gpu:22" {carol.public_blob()} carol'],
                        relay_toml=f'revoked_keys = "{revoked}"\ngrants_poll_interval = 0.05\n')
    assert not logs_in(relay, "carol", carol.path)

    mark = relay.mark()
    shared_dir.chmod(0o777)
    as_nobody(sys.executable, "-c",
              "import os, sys; d = sys.argv[1]; "
              "open(os.path.join(d, '.r'), 'w').write('# nothing revoked\\n'); "
              "os.replace(os.path.join(d, '.r'), os.path.join(d, 'revoked'))",
              str(shared_dir))
    wait_until(lambda: bool(relay.events("krl_invalid", since=mark)
                            or relay.events("krl_loaded", since=mark)),
               "the relay to read the replaced list", timeout=10)
    # An un-revoking version is taken after three polls in a row (0.15 s here, main's
    # code: krl_loaded); twenty polls later it still is not, and carol is still refused.
    with pytest.raises(HarnessError):
        relay.wait_for("krl_loaded", since=mark, timeout=1.0)
    assert not logs_in(relay, "carol", carol.path), "the stolen key was un-revoked"
    event = relay.wait_for("krl_invalid", since=mark, timeout=1)
    assert f"the directory {shared_dir} above it is writable by anyone" in str(event)

    assert "anyone could un-revoke a stolen key" in check_refuses(relay)
