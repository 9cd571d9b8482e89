"""relay.config.safepath: who else could rewrite a grant file through its directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.config.safepath import open_to_anyone

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root "
                             "(CI runs as root)")


def grant_file(directory: Path, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(mode)
    path = directory / "users"
    path.write_text("# no grants\n")
    path.chmod(0o644)
    return path


def test_a_private_directory_is_safe(tmp_path: Path) -> None:
    assert open_to_anyone(grant_file(tmp_path / "etc")) is None


def test_the_file_writable_by_anyone(tmp_path: Path) -> None:
    path = grant_file(tmp_path / "etc")
    path.chmod(0o646)
    what, fix = open_to_anyone(path) or ("", "")
    assert what == "the file is writable by anyone" and fix == f"chmod o-w {path}"


def test_a_directory_writable_by_anyone_lets_anyone_replace_the_file(tmp_path: Path) -> None:
    path = grant_file(tmp_path / "etc" / "labrelay")
    (tmp_path / "etc").chmod(0o777)  # two levels up: a rename of labrelay/ itself
    what, fix = open_to_anyone(path) or ("", "")
    assert f"the directory {tmp_path / 'etc'} above it is writable by anyone" in what
    assert fix.startswith(f"chmod o-w {tmp_path / 'etc'}")


def test_group_write_is_the_operators_choice(tmp_path: Path) -> None:
    path = grant_file(tmp_path / "etc", mode=0o775)
    path.chmod(0o664)
    assert open_to_anyone(path) is None


def test_a_sticky_directory_is_safe_for_an_entry_of_root_or_the_relays_user(
        tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    path = grant_file(shared / "mine")
    shared.chmod(0o1777)
    assert open_to_anyone(path) is None


@as_root
def test_a_sticky_directory_with_an_entry_of_another_user(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    path = grant_file(shared / "theirs")
    shared.chmod(0o1777)
    os.chown(shared / "theirs", NOBODY, NOBODY)
    what, fix = open_to_anyone(path) or ("", "")
    assert f"belongs to uid {NOBODY}, who could replace it" in what
    assert fix.startswith(f"chown root {shared / 'theirs'}")


def test_a_link_into_an_open_directory(tmp_path: Path) -> None:
    target = grant_file(tmp_path / "open", mode=0o777)
    safe = tmp_path / "etc"
    safe.mkdir()
    (safe / "users").symlink_to(target)
    what, _ = open_to_anyone(safe / "users") or ("", "")
    assert f"the directory {tmp_path / 'open'} above it" in what


def test_a_link_that_sits_in_an_open_directory(tmp_path: Path) -> None:
    """The link itself can be replaced, wherever it points."""
    target = grant_file(tmp_path / "etc")
    link_dir = tmp_path / "open"
    link_dir.mkdir()
    (link_dir / "users").symlink_to(target)
    link_dir.chmod(0o777)
    what, _ = open_to_anyone(link_dir / "users") or ("", "")
    assert f"the directory {link_dir} above it" in what


def test_a_relative_path_is_checked_from_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grant_file(tmp_path / "etc")
    monkeypatch.chdir(tmp_path / "etc")
    assert open_to_anyone(Path("users")) is None
    (tmp_path / "etc").chmod(0o777)
    assert open_to_anyone(Path("users")) is not None


def test_a_file_gone_since_it_was_read_is_not_passed(tmp_path: Path) -> None:
    what, fix = open_to_anyone(tmp_path / "gone") or ("", "")
    assert what.startswith("cannot check who may change it") and "readable" in fix


def test_a_config_file_others_could_rewrite_is_refused(tmp_path: Path) -> None:
    from relay.config.errors import ConfigError
    from relay.config.loader import load_config

    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "relay.toml"
    config.write_text('[relay]\nlisten = "127.0.0.1:0"\n')
    assert load_config(config).relay is not None
    etc.chmod(0o777)
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert f"anyone could change what this node does: the directory {etc}" in str(e.value)
    assert f"chmod o-w {etc}" in str(e.value)


def test_a_config_from_a_pipe_is_read(tmp_path: Path) -> None:
    from relay.config.loader import load_config

    read, write = os.pipe()
    os.write(write, b'[relay]\nlisten = "127.0.0.1:0"\n')
    os.close(write)
    try:
        assert load_config(f"/dev/fd/{read}").relay is not None
    finally:
        os.close(read)
