"""The user's end on a laptop (issue 12): ``labrelay connect`` with no Linux extras
(``tests/nolinux``: no splice, no epoll, no native module, as on a Mac) on its
portable backend; keys as ssh has them (a passphrase-protected key in a real
ssh-agent, or given by ``-i`` and unlocked through ``SSH_ASKPASS``); the relay's
Host alias read from a ``-F`` file; and ``labrelay ssh-config``'s entries with and
without labrelay installed.  Real relay, agent, target sshd, ssh, scp, ssh-agent.

`.ci/portable` runs the first test again from an installed wheel and from an
install made with no C compiler reachable.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_fastpath
from conftest import REPO_ROOT, child_env
from harness import (
    LOOPBACK,
    AgentProcess,
    DataStream,
    KeyPair,
    MiB,
    find_program,
    known_hosts_line,
    sha256_hex,
)
from relay_fixtures import running_ssh_agent, ssh_defaults, wait_until
from test_fastpath import Site, _run

from relay.config.schema import ServiceGrant
from relay.user.sshconfig import render

pytestmark = pytest.mark.integration
keys, site = test_fastpath.keys, test_fastpath.site  # the fast-path site: relay, agent, sshd
NOLINUX = Path(__file__).resolve().parents[1] / "nolinux"
PASSPHRASE = "correct horse battery staple"


def _connect(*args: str, env: dict[str, str] | None = None, err: Path) -> str:
    """A ProxyCommand running ``labrelay connect ARGS`` with ``env``, its stderr
    appended to ``err``."""
    env_words = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    argv = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "relay", "connect", *args))
    return f"sh -c {shlex.quote(f'exec env {env_words} {argv} 2>>{err}')}"


def _config(site: Site, proxy: str, extra: str = "") -> Path:
    path = site.tmp / "ssh_config"
    path.write_text(f"""\
Host gpu-cluster
  User root
  IdentityFile {site.client_key.path}
  ProxyCommand {proxy}
{extra}
""" + ssh_defaults(site.relay.known_hosts))
    return path


def _ssh(cfg: Path, *args: str, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[bytes]:
    ssh = find_program("ssh") or "ssh"
    return subprocess.run([ssh, "-F", str(cfg), *args], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL, start_new_session=True,
                          env={**os.environ, **child_env(), **(env or {})})


def _reached(out: subprocess.CompletedProcess[bytes]) -> None:
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "gpu_cluster"


def _nolinux_env() -> dict[str, str]:
    """A laptop's: no Linux extras, and no LABRELAY_DATAPATH (CI sets =c for the rest)."""
    return {"PYTHONPATH": os.pathsep.join((str(NOLINUX), child_env()["PYTHONPATH"])),
            "LABRELAY_DATAPATH": "auto"}


def _locked_copy(key: KeyPair, path: Path) -> Path:
    """``key`` again, protected by ``PASSPHRASE`` (the same public key: the same grant)."""
    path.write_bytes(key.path.read_bytes())
    path.chmod(0o600)
    Path(f"{path}.pub").write_text(key.public + "\n")
    keygen = find_program("ssh-keygen") or "ssh-keygen"
    subprocess.run([keygen, "-q", "-p", "-P", "", "-N", PASSPHRASE, "-f", str(path)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    assert b"aes256-ctr" in subprocess.run(  # really encrypted: the cipher is named
        ["sh", "-c", f"sed '1d;$d' {shlex.quote(str(path))} | base64 -d"],
        capture_output=True, check=True).stdout
    return path


def _askpass(tmp: Path) -> tuple[Path, Path]:
    """An SSH_ASKPASS program that answers ``PASSPHRASE`` and logs each prompt."""
    log = tmp / "askpass.log"
    program = tmp / "askpass.sh"
    program.write_text(f"#!/bin/sh\necho \"$1\" >> {shlex.quote(str(log))}\n"
                       f"echo {shlex.quote(PASSPHRASE)}\n")
    program.chmod(0o755)
    return program, log


def _prompts(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# 1 ---------------------------------------------------------------------------


def test_connect_on_the_portable_backend_carries_ssh_and_scp(site: Site) -> None:
    """With no splice, no epoll and no native module (as on a Mac), ``labrelay
    connect`` takes the fast path on its portable copy loop: ssh lands on the target
    and 64 MiB of scp arrive byte-exact."""
    err = site.tmp / "connect.err"
    proxy = _connect("-v", "-p", str(site.relay.port), "-i", str(site.keys.alice.path),
                     "-o", f"UserKnownHostsFile={site.relay.known_hosts}",
                     f"alice@{LOOPBACK}", "%h:%p", env=_nolinux_env(), err=err)
    cfg = _config(site, proxy)
    _reached(_ssh(cfg, "gpu-cluster", "echo $LABRELAY_TEST_HOST"))

    stream = DataStream(12, 64 * MiB)
    src, dst = site.tmp / "up.bin", site.tmp / "arrived.bin"
    with open(src, "wb") as f:
        for chunk in stream.chunks():
            f.write(chunk)
    scp = find_program("scp") or "scp"
    out = subprocess.run([scp, "-q", "-F", str(cfg), str(src), f"gpu-cluster:{dst}"],
                         capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                         env={**os.environ, **child_env()})
    assert out.returncode == 0, out.stderr.decode()
    assert dst.stat().st_size == stream.size
    assert sha256_hex(dst.read_bytes()) == stream.sha256

    said = err.read_text().splitlines()
    assert said.count("labrelay connect: gpu-cluster:22: fast path (copied) via data port "
                      f"{site.data_port}, portable data path") == 2, said
    assert not [line for line in said if "fast path unavailable" in line], said
    fast = site.fast()
    assert fast["paired"] == 2 and fast["pair_failed"] == 0
    per = site.relay.status()["relay"]["per_service"]["gpu-cluster:22"]
    assert per["bytes_to_service"] > stream.size
    # The relay says which backend it runs (here: this install's, as the test sees it).
    from relay.datapath.splicing import choose_backend

    backend = choose_backend().name
    assert site.relay.status()["datapath"]["backend"] == backend
    table = _run([sys.executable, "-m", "relay", "status", "--admin", site.relay.admin])
    assert f"data path: {backend} backend" in table.stdout.decode(), table.stdout.decode()


# 2 ---------------------------------------------------------------------------


def test_a_passphrase_key_held_by_a_real_ssh_agent(site: Site) -> None:
    """alice's key, passphrase-protected, added to a real ``ssh-agent`` with
    ``ssh-add`` (the passphrase through SSH_ASKPASS): ``labrelay connect`` with no
    ``-i`` finds it through SSH_AUTH_SOCK, the agent signs, nobody is asked."""
    locked = _locked_copy(site.keys.alice, site.tmp / "alice_locked")
    askpass, log = _askpass(site.tmp)
    sock = site.tmp / "agent.sock"
    agent_bin, add_bin = find_program("ssh-agent"), find_program("ssh-add")
    assert agent_bin and add_bin, "OpenSSH's ssh-agent and ssh-add are needed"
    with running_ssh_agent(sock):
        ask_env = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
                   "DISPLAY": ":0"}
        added = subprocess.run([add_bin, str(locked)], capture_output=True, timeout=30,
                               stdin=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "SSH_AUTH_SOCK": str(sock), **ask_env})
        assert added.returncode == 0, added.stderr.decode()
        assert len(_prompts(log)) == 1  # ssh-add asked, through SSH_ASKPASS
        listed = subprocess.run([add_bin, "-L"], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        assert site.keys.alice.public_blob() in listed.stdout

        err = site.tmp / "connect.err"
        proxy = _connect("-v", "-p", str(site.relay.port),
                         "-o", f"UserKnownHostsFile={site.relay.known_hosts}",
                         f"alice@{LOOPBACK}", "%h:%p",
                         env={"SSH_AUTH_SOCK": str(sock), **ask_env}, err=err)
        _reached(_ssh(_config(site, proxy), "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
        said = err.read_text()
        assert "fast path (" in said and "fast path unavailable" not in said, said
        assert "from ssh-agent" in said, said
        assert len(_prompts(log)) == 1, "labrelay connect asked for a passphrase"
        assert site.fast()["paired"] == 1


# 3 ---------------------------------------------------------------------------


def test_a_passphrase_key_given_by_i_is_unlocked_through_askpass(site: Site) -> None:
    """``-i`` a passphrase-protected key, no terminal, SSH_ASKPASS set: asked once,
    when the relay accepted the key, and the session takes the fast path."""
    locked = _locked_copy(site.keys.alice, site.tmp / "alice_locked")
    askpass, log = _askpass(site.tmp)
    err = site.tmp / "connect.err"
    proxy = _connect("-p", str(site.relay.port), "-i", str(locked),
                     "-o", f"UserKnownHostsFile={site.relay.known_hosts}",
                     f"alice@{LOOPBACK}", "%h:%p",
                     env={"SSH_ASKPASS": str(askpass), "DISPLAY": ":0", "SSH_AUTH_SOCK": ""},
                     err=err)
    _reached(_ssh(_config(site, proxy), "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
    assert _prompts(log) == [f"Enter passphrase for key '{locked}': "]
    assert err.read_text() == ""  # the fast path, and not a word
    assert site.fast()["paired"] == 1


# 4 ---------------------------------------------------------------------------


def test_the_relay_as_a_host_alias_of_an_F_file(site: Site) -> None:
    """``labrelay connect -F FILE myrelay``: HostName, Port, User, IdentityFile and
    UserKnownHostsFile all come from FILE's ``Host myrelay`` entry (through ssh -G)."""
    cfg = site.tmp / "ssh_config"
    err = site.tmp / "connect.err"
    proxy = _connect("-F", str(cfg), "myrelay", "%h:%p", env={"SSH_AUTH_SOCK": ""}, err=err)
    _config(site, proxy, extra=f"""\
Host myrelay
  HostName {LOOPBACK}
  Port {site.relay.port}
  User alice
  IdentityFile {site.keys.alice.path}
  UserKnownHostsFile {site.relay.known_hosts}
""")
    _reached(_ssh(cfg, "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
    assert err.read_text() == ""
    assert site.fast()["paired"] == 1
    assert site.relay.status()["relay"]["per_service"]["gpu-cluster:22"]["sessions_total"] == 1


# 5 ---------------------------------------------------------------------------


def test_ssh_config_entries_work_with_and_without_labrelay(site: Site) -> None:
    """``labrelay ssh-config``'s entries: where a ``labrelay`` command exists, ssh
    takes the fast path (ProxyCommand); where none does, the same file goes through
    the relay with ProxyJump.  Both reach the target."""
    cfg = site.tmp / "ssh_config"
    snippet = render(user="alice", relay_host=LOOPBACK, relay_port=site.relay.port,
                     services=[ServiceGrant("gpu-cluster", 22)],
                     identity=str(site.keys.alice.path), known_hosts=str(site.relay.known_hosts),
                     fast=[ServiceGrant("gpu-cluster", 22)], config_file=str(cfg))
    cfg.write_text(snippet + f"""
Host gpu-cluster
  User root
  IdentityFile {site.client_key.path}
Host *
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {site.relay.known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
""")
    with_bin = site.tmp / "with-labrelay"
    with_bin.mkdir()
    shim = with_bin / "labrelay"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m relay \"$@\"\n")
    shim.chmod(0o755)
    ssh_dir = str(Path(find_program("ssh") or "/usr/bin/ssh").parent)
    plain_path = os.pathsep.join(dict.fromkeys((ssh_dir, "/usr/bin", "/bin")))
    assert subprocess.run(["sh", "-c", "command -v labrelay"], capture_output=True,
                          env={"PATH": plain_path}).returncode != 0
    paths = {"with": f"{with_bin}{os.pathsep}{plain_path}", "without": plain_path}

    resolved = {k: _ssh(cfg, "-G", "gpu-cluster", env={"PATH": p}).stdout.decode()
                for k, p in paths.items()}
    assert f"proxycommand labrelay connect -F {cfg} labrelay %h:%p" in resolved["with"]
    assert "proxyjump labrelay" not in resolved["with"]
    assert "proxyjump labrelay" in resolved["without"]
    assert "proxycommand" not in resolved["without"]

    _reached(_ssh(cfg, "gpu-cluster", "echo $LABRELAY_TEST_HOST", env={"PATH": paths["with"]}))
    assert site.fast()["paired"] == 1
    _reached(_ssh(cfg, "gpu-cluster", "echo $LABRELAY_TEST_HOST",
                  env={"PATH": paths["without"]}))
    assert site.fast()["paired"] == 1  # the second went through an SSH channel (ssh -J)
    wait_until(lambda: site.relay.status()["relay"]["per_service"]["gpu-cluster:22"]
          ["sessions_total"] == 2, "the relay to count the -J session")


# 6 ---------------------------------------------------------------------------


def test_the_demo_as_a_user_tries_it_from_another_terminal(
        start_process: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """``.venv/bin/labrelay demo`` (scripts/dev's own words), then what it prints to try,
    run from another directory as a new terminal would: the fast-path entry (its
    ProxyCommand names labrelay by an absolute path: it was ``.venv/bin/labrelay``,
    relative to the checkout) and ``scp`` (SFTP since OpenSSH 9: the demo's sshd had
    no sftp subsystem, "subsystem request failed"), both ways; then Ctrl-C stops
    it, exit 0, its files gone."""
    script = Path(sys.executable).parent / "labrelay"
    if script.exists():  # as scripts/dev's help says: relative to the checkout
        argv = [os.path.relpath(script, REPO_ROOT), "demo"]
    else:
        argv = [sys.executable, "-m", "relay", "demo"]
    demo = start_process([*argv, "--log-format", "json"], name="demo")
    demo.wait_for("_raw", timeout=60, text=lambda t: t.startswith("Press Ctrl-C"))
    up = demo.events("_raw", text=lambda t: t.startswith("labrelay demo is up"))
    workdir = Path(up[0]["text"].split("(files in ")[1].rstrip("):"))
    cfg = workdir / "ssh_config"
    assert "gpu-cluster-fast" in cfg.read_text()
    assert demo.events("_raw", text=lambda t: t.strip().startswith(f"scp -F {cfg} FILE "))

    def ssh(*args: str) -> subprocess.CompletedProcess[bytes]:
        program = find_program(args[0]) or args[0]
        return subprocess.run([program, *args[1:]], capture_output=True, timeout=120,
                              cwd=tmp_path, stdin=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, **child_env()})

    out = ssh("ssh", "-F", str(cfg), "gpu-cluster-fast", "echo $LABRELAY_DEMO_HOST")
    assert out.returncode == 0 and out.stdout.decode().strip() == "gpu_cluster", \
        out.stderr.decode()
    stream = DataStream(13, 4 * MiB)
    src = tmp_path / "data.bin"
    src.write_bytes(b"".join(stream.chunks()))
    for host in ("gpu-cluster", "gpu-cluster-fast"):
        there, back = tmp_path / f"there-{host}.bin", tmp_path / f"back-{host}.bin"
        out = ssh("scp", "-q", "-F", str(cfg), str(src), f"{host}:{there}")
        assert out.returncode == 0, (host, out.stderr.decode())
        out = ssh("scp", "-q", "-F", str(cfg), f"{host}:{there}", str(back))
        assert out.returncode == 0, (host, out.stderr.decode())
        assert sha256_hex(back.read_bytes()) == stream.sha256, host

    os.kill(demo.pid, signal.SIGINT)  # Ctrl-C
    assert demo.wait_exit(timeout=30) == 0, demo.diagnostics()
    assert not workdir.exists()


# 7 ---------------------------------------------------------------------------


def _connect_fails(tmp_path: Path, *args: str) -> str:
    """``labrelay connect ARGS`` as a laptop runs it (HOME here, no ssh-agent), which
    must fail at once: its exit status 1 and stderr."""
    out = subprocess.run([sys.executable, "-m", "relay", "connect", *args],
                         capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                         env={**os.environ, **child_env(), "HOME": str(tmp_path),
                              "SSH_AUTH_SOCK": ""})
    assert out.returncode == 1, out
    assert out.stdout == b""
    return out.stderr.decode()


def test_a_key_file_too_open_is_named_as_such_not_as_missing(tmp_path: Path) -> None:
    """``-i KEY`` with mode 0644: ssh's "too open" with the chmod to run, and the final
    word names KEY as unusable; it said "none of KEY, KEY exists", which sent a user
    looking for a file that is there."""
    key = tmp_path / "id_lab"
    subprocess.run([find_program("ssh-keygen") or "ssh-keygen", "-q", "-t", "ed25519",
                    "-N", "", "-f", str(key)], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    key.chmod(0o644)
    said = _connect_fails(tmp_path, "-i", str(key), "-p", "1", f"alice@{LOOPBACK}",
                          "gpu-cluster")
    assert f"chmod 600 {key}" in said, said
    assert "exists" not in said, said
    assert said.splitlines()[-1] == (
        f"labrelay connect: no key to offer: no ssh-agent (SSH_AUTH_SOCK is not set) and "
        f"{key} could not be used (see above); fix that, add a key to your agent with "
        "`ssh-add`, or give -i KEYFILE"), said

    key.unlink()  # a key that is really missing is still said so
    said = _connect_fails(tmp_path, "-i", str(key), "-p", "1", f"alice@{LOOPBACK}",
                          "gpu-cluster")
    assert f"identity file {key} not accessible: no such file" in said, said
    assert said.splitlines()[-1].startswith("labrelay connect: no key to offer: "), said
    assert "none of " in said and "could not be used" not in said, said


# 8 ---------------------------------------------------------------------------


def test_ctrl_c_at_the_passphrase_prompt_ends_it_and_gives_the_terminal_back(
        tmp_path: Path) -> None:
    """Ctrl-C at ``Enter passphrase for key``: the process dies of SIGINT at once, with
    the terminal's echo back on.  It went on reading the terminal (the reactor's
    handler only schedules a stop): in a shell, ssh died of the same Ctrl-C, the prompt
    came back, and the next line typed for the shell was read here, unseen, as a
    passphrase.  A real pseudo-terminal; the key is an old PEM one with no ``.pub``,
    which ssh and labrelay ask for before connecting."""
    import fcntl
    import pty
    import select
    import termios

    key = tmp_path / "id_pem"
    subprocess.run([find_program("ssh-keygen") or "ssh-keygen", "-q", "-t", "ecdsa", "-m",
                    "PEM", "-N", PASSPHRASE, "-f", str(key)], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    Path(f"{key}.pub").unlink()
    master, slave = pty.openpty()

    def controlling_tty() -> None:  # the pty is the child's terminal, as a shell's is
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "connect", "-i", str(key), "-p", "1",
         f"alice@{LOOPBACK}", "gpu-cluster"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=controlling_tty,
        env={**os.environ, **child_env(), "HOME": str(tmp_path), "SSH_AUTH_SOCK": "",
             "SSH_ASKPASS": ""})
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"Enter passphrase" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 4096)
        while termios.tcgetattr(master)[3] & termios.ECHO:  # it turns echo off after
            assert time.monotonic() < deadline and proc.poll() is None  # the prompt
            time.sleep(0.01)
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT
        assert proc.wait(timeout=10) == -signal.SIGINT
        assert termios.tcgetattr(master)[3] & termios.ECHO, "echo left off"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# 9 ---------------------------------------------------------------------------


def _interrupted(argv: list[str], started: Callable[[subprocess.Popen[bytes]], None],
                 home: Path) -> str:
    """Run ``labrelay connect ARGV``, SIGINT it (Ctrl-C) once ``started`` returned: it
    exits 1 within 10 s; its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "relay", "connect", *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **child_env(), "HOME": str(home),
                                 "SSH_AUTH_SOCK": ""})
    try:
        started(proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # stdin held open: its EOF would end the session by itself
        _out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err.decode()
    return err.decode()


def test_ctrl_c_is_said_as_such_not_as_the_relays_failure(site: Site) -> None:
    """Ctrl-C while the relay does not answer yet, and during a fast-path session: one
    line, "interrupted", and nothing the stop broke.  It said "cannot reach the relay
    ...: Connection to the other side was lost" and "session ... ended abnormally:
    Operation canceled (the relay side)", sending the user after a relay that was fine."""
    import socket

    held: list[socket.socket] = []
    with socket.socket() as silent:  # a relay that accepts and says nothing (yet)
        silent.bind((LOOPBACK, 0))
        silent.listen(1)
        port = silent.getsockname()[1]

        def accepted(proc: subprocess.Popen[bytes]) -> None:
            silent.settimeout(30)
            held.append(silent.accept()[0])  # held open: no close to race the signal
        try:
            err = _interrupted(["-i", str(site.keys.alice.path), "-p", str(port),
                                f"alice@{LOOPBACK}", "gpu-cluster"], accepted, site.tmp)
        finally:
            for conn in held:
                conn.close()
    assert err == f"labrelay connect: interrupted while reaching the relay {LOOPBACK}:{port}\n"

    def banner(proc: subprocess.Popen[bytes]) -> None:  # the target's sshd speaks: joined
        assert proc.stdout is not None
        assert proc.stdout.read(8) == b"SSH-2.0-"
    err = _interrupted(["-i", str(site.keys.alice.path), "-p", str(site.relay.port),
                        "-o", f"UserKnownHostsFile={site.relay.known_hosts}",
                        f"alice@{LOOPBACK}", "gpu-cluster"], banner, site.tmp)
    assert err == "labrelay connect: interrupted; the session to gpu-cluster:22 is closed\n"
    assert site.fast()["paired"] == 1


# 10 --------------------------------------------------------------------------


def test_an_unknown_relay_key_says_how_connect_takes_it_and_both_ways_work(
        site: Site) -> None:
    """A relay whose key is not in known_hosts: the error names what ``labrelay
    connect`` takes (``--host-key SHA256:...``, ``-o StrictHostKeyChecking=accept-new``;
    it named only the config file's settings), and each
    works: ``--host-key`` was refused whenever ssh is installed ("cannot be combined with
    -o UserKnownHostsFile": ssh -G always names one); a wrong pin is refused."""
    fingerprint = site.relay.fingerprints.split(",")[0].strip()
    nowhere = site.tmp / "no_known_hosts"
    err = site.tmp / "connect.err"
    base = ["-p", str(site.relay.port), "-i", str(site.keys.alice.path),
            f"alice@{LOOPBACK}", "%h:%p"]

    proxy = _connect("-o", f"UserKnownHostsFile={nowhere}", *base, err=err)
    assert _ssh(_config(site, proxy), "gpu-cluster", "true").returncode != 0
    said = err.read_text()
    assert "the host is UNKNOWN" in said, said
    assert f"--host-key {fingerprint}" in said and "-o StrictHostKeyChecking=accept-new" in said
    assert not nowhere.exists()

    err.write_text("")
    proxy = _connect("--host-key", fingerprint, *base, err=err)
    _reached(_ssh(_config(site, proxy), "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
    assert err.read_text() == ""
    assert not nowhere.exists()

    wrong = "SHA256:" + "A" * 43
    proxy = _connect("--host-key", wrong, *base, err=err)
    assert _ssh(_config(site, proxy), "gpu-cluster", "true").returncode != 0
    said = err.read_text()
    assert f"the configuration pins {wrong}" in said and "--host-key" in said, said

    err.write_text("")
    proxy = _connect("-o", f"UserKnownHostsFile={nowhere}",
                     "-o", "StrictHostKeyChecking=accept-new", *base, err=err)
    _reached(_ssh(_config(site, proxy), "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
    assert err.read_text() == ""
    assert nowhere.exists()  # recorded: the next connection checks it
    assert site.fast()["paired"] == 2


# 11 --------------------------------------------------------------------------


def test_a_refused_service_is_said_in_the_relays_words(site: Site) -> None:
    """A service alice may not reach, on an SSH channel (``--no-fast-path``): one line
    with the relay's reason.  It printed Conch's tuple, "(b'nosuch:22 is not granted to
    user alice', 1)", after a line saying the fast path she turned off was
    "unavailable"."""
    out = subprocess.run(
        [sys.executable, "-m", "relay", "connect", "--no-fast-path",
         "-p", str(site.relay.port), "-i", str(site.keys.alice.path),
         "-o", f"UserKnownHostsFile={site.relay.known_hosts}", f"alice@{LOOPBACK}", "nosuch"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, **child_env(), "HOME": str(site.tmp), "SSH_AUTH_SOCK": ""})
    assert out.returncode == 1
    assert out.stderr.decode() == ("labrelay connect: the relay refused nosuch:22: "
                                   "nosuch:22 is not granted to user alice "
                                   "(the relay's reason; if it lasts, send this line "
                                   "to the relay's admin)\n")


# 12 --------------------------------------------------------------------------


def test_ssh_config_command_on_the_relays_own_config(site: Site) -> None:
    """``labrelay ssh-config --config RELAY.toml --user alice --host HOST:PORT`` (the
    quickstart's command; test 5 renders the entries, this runs the command on a
    running relay's config): the relay entry at that port, its real host key for
    known_hosts, the fast-path pair for gpu-cluster, a LocalForward for web:8080.  A
    --host it cannot read is a one-line error, exit 2: "relay.example.org:abc" was a
    ValueError traceback, and a bare IPv6 address lost its last group as a port."""
    def ssh_config(host: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", "ssh-config", "--config",
             str(site.relay.dir / "node.toml"), "--user", "alice", "--host", host,
             "--identity", "~/.ssh/id_lab"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            env={**os.environ, **child_env()})

    out = ssh_config("relay.example.org:2222")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Host labrelay\n    HostName relay.example.org\n    Port 2222\n    User alice\n" \
           "    IdentityFile ~/.ssh/id_lab\n" in text, text
    assert f"echo '[relay.example.org]:2222 {site.relay.host_key_blob}' >> " in text, text
    assert 'Match originalhost gpu-cluster exec "command -v labrelay >/dev/null 2>&1"\n' \
           "    ProxyCommand labrelay connect labrelay %h:%p\nHost gpu-cluster\n" \
           "    ProxyJump labrelay\n" in text, text
    assert "    LocalForward 8080 web:8080\n" in text, text
    assert "gpu-cluster: the fast path" in out.stderr

    out = ssh_config("2001:db8::7")  # no port: the relay's listen port, here 0 (chosen
    assert out.returncode == 2, out.stdout  # at start): said, not printed as "Port 0"
    assert "has no port" in out.stderr and "--host [2001:db8::7]:PORT" in out.stderr, out.stderr
    out = ssh_config("[2001:db8::7]:2222")
    assert out.returncode == 0, out.stderr
    assert "    HostName 2001:db8::7\n    Port 2222\n" in out.stdout, out.stdout

    out = ssh_config("relay.example.org:abc")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("labrelay: command line: --host: 'relay.example.org:abc' is not "
                          "HOST or HOST:PORT (the relay's public name and its SSH port, e.g. "
                          "relay.example.org:2222 or [2001:db8::1]:2222)\n"), out.stderr


# 13 --------------------------------------------------------------------------


def test_a_second_relay_gets_its_own_alias_beside_an_existing_host_labrelay(
        site: Site) -> None:
    """A user whose ``~/.ssh/config`` already has ``Host labrelay`` (another lab's
    relay) appends this relay's entries.  ssh takes each option from the first entry
    that sets it, so a second ``Host labrelay`` would silently send this relay's
    services to the other one: ``labrelay ssh-config --alias lab2`` names the entry
    ``lab2``, its services jump through it, and ssh reaches the target (stock ssh, no
    labrelay on PATH); the entries say the first one wins.  A pattern is refused."""
    def ssh_config(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", "ssh-config", "--config",
             str(site.relay.dir / "node.toml"), "--user", "alice",
             "--host", f"{LOOPBACK}:{site.relay.port}",
             "--identity", str(site.keys.alice.path), *extra],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            env={**os.environ, **child_env()})

    out = ssh_config("--alias", "lab2")
    assert out.returncode == 0, out.stderr
    assert "Host lab2\n" in out.stdout and "    ProxyJump lab2\n" in out.stdout
    assert "    ProxyCommand labrelay connect lab2 %h:%p\n" in out.stdout
    assert "Host labrelay" not in out.stdout
    assert "FIRST entry that sets it" in out.stdout
    assert "ProxyJump lab2" in out.stderr  # the fast-path note names it too

    cfg = site.tmp / "ssh_config"
    cfg.write_text(f"""\
Host labrelay
  HostName 192.0.2.1
  Port 2222

{out.stdout}
Host gpu-cluster
  User root
  IdentityFile {site.client_key.path}
""" + ssh_defaults(site.relay.known_hosts))
    ssh_dir = str(Path(find_program("ssh") or "/usr/bin/ssh").parent)
    plain = {"PATH": os.pathsep.join(dict.fromkeys((ssh_dir, "/usr/bin", "/bin")))}
    resolved = _ssh(cfg, "-G", "gpu-cluster", env=plain).stdout.decode()
    assert "proxyjump lab2" in resolved, resolved
    shadowed = site.tmp / "ssh_config.shadowed"  # the default alias: the old entry wins
    shadowed.write_text(cfg.read_text().replace(out.stdout, ssh_config().stdout))
    resolved = _ssh(shadowed, "-G", "labrelay", env=plain).stdout.decode()
    assert "hostname 192.0.2.1" in resolved and "port 2222" in resolved
    _reached(_ssh(cfg, "gpu-cluster", "echo $LABRELAY_TEST_HOST", env=plain))

    out = ssh_config("--alias", "lab*")
    assert out.returncode == 2 and out.stdout == ""
    assert "--alias: 'lab*' is not a plain host alias" in out.stderr, out.stderr


# 14 --------------------------------------------------------------------------


def test_the_relay_key_where_ssh_finds_it_a_global_or_second_known_hosts_file(
        site: Site) -> None:
    """A lab admin puts the relay's key in the laptops' system-wide known_hosts
    (GlobalKnownHostsFile, here given with -o); the user's own file does not list it.
    Stock ssh (``-J``) accepts it, and ``labrelay connect`` as its ProxyCommand must
    too: it checked the first UserKnownHostsFile only and said UNKNOWN.  Also a key
    in the second UserKnownHostsFile (``~/.ssh/known_hosts2`` by default).  A
    different key there is refused by both, as changed; nothing is recorded in the
    user's file."""
    relay_line = known_hosts_line(site.relay.host_key_blob, site.relay.port)
    nowhere = site.tmp / "user_known_hosts"
    admins = site.tmp / "ssh_known_hosts"
    admins.write_text(f"# installed by the lab admin\n{relay_line}\n")
    err = site.tmp / "connect.err"
    base = ["-p", str(site.relay.port), "-i", str(site.keys.alice.path),
            f"alice@{LOOPBACK}", "%h:%p"]

    def jump(global_file: Path) -> subprocess.CompletedProcess[bytes]:
        """Stock ssh through the relay with these files for the relay's key."""
        cfg = site.tmp / "jump_config"
        cfg.write_text(f"Host {LOOPBACK}\n  User alice\n  IdentityFile {site.keys.alice.path}\n"
                       f"  UserKnownHostsFile {nowhere}\n  GlobalKnownHostsFile {global_file}\n"
                       f"Host gpu-cluster\n  User root\n  IdentityFile {site.client_key.path}\n"
                       + ssh_defaults(site.relay.known_hosts))
        return _ssh(cfg, "-J", f"alice@{LOOPBACK}:{site.relay.port}", "gpu-cluster",
                    "echo $LABRELAY_TEST_HOST")

    _reached(jump(admins))  # stock ssh: the global file is enough
    proxy = _connect("-o", f"UserKnownHostsFile={nowhere}",
                     "-o", f"GlobalKnownHostsFile={admins}", *base, err=err)
    _reached(_ssh(_config(site, proxy), "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
    assert err.read_text() == ""
    assert site.fast()["paired"] == 1

    # The second user file, with no global one.
    proxy = _connect("-o", f"UserKnownHostsFile={nowhere} {admins}",
                     "-o", "GlobalKnownHostsFile=none", *base, err=err)
    _reached(_ssh(_config(site, proxy), "gpu-cluster", "echo $LABRELAY_TEST_HOST"))
    assert err.read_text() == ""
    assert site.fast()["paired"] == 2

    # Another ed25519 key for the relay in the global file: refused by both.
    other = " ".join(site.client_key.public.split()[:2])
    assert other.startswith("ssh-ed25519 ") and relay_line.split()[1] == "ssh-ed25519"
    stale = site.tmp / "ssh_known_hosts.stale"
    stale.write_text(f"{relay_line.split()[0]} {other}\n")
    refused = jump(stale)
    assert refused.returncode != 0
    assert b"REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr, refused.stderr
    proxy = _connect("-o", f"UserKnownHostsFile={nowhere}",
                     "-o", f"GlobalKnownHostsFile={stale}",
                     "-o", "StrictHostKeyChecking=accept-new", *base, err=err)
    assert _ssh(_config(site, proxy), "gpu-cluster", "true").returncode != 0
    said = err.read_text()
    assert "the host key has CHANGED" in said and f"{stale} line 1" in said, said
    assert not nowhere.exists()
    assert site.fast()["paired"] == 2


def test_known_hosts_none_is_no_file_never_a_file_named_none(site: Site, tmp_path: Path) -> None:
    """``UserKnownHostsFile none`` in the ssh config that ``ProxyCommand labrelay connect``
    reads is no user file, as for ssh (ssh.c), never ``./none``: connect read it, and
    with accept-new wrote it.  So a ``none`` file planted in the current directory,
    listing the key an impostor relay offers, made connect trust that relay.  Now, as
    stock ssh (-J) with the same config: the planted file is not consulted (the host is
    UNKNOWN, refused even with accept-new, since there is no file to record it in), no
    ``./none`` is created, and the key in the GlobalKnownHostsFile is what is trusted."""
    relay_line = known_hosts_line(site.relay.host_key_blob, site.relay.port)
    admins = site.tmp / "ssh_known_hosts"
    admins.write_text(f"{relay_line}\n")
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    err = site.tmp / "connect.err"

    def relay_config(global_file: str) -> Path:
        path = site.tmp / f"relay_config_{global_file.replace('/', '_')}"
        path.write_text(f"Host lab-relay\n  HostName {LOOPBACK}\n  Port {site.relay.port}\n"
                        f"  User alice\n  IdentityFile {site.keys.alice.path}\n"
                        "  UserKnownHostsFile none\n"
                        f"  GlobalKnownHostsFile {global_file}\n"
                        "  StrictHostKeyChecking accept-new\n")
        return path

    def both(global_file: str) -> tuple[subprocess.CompletedProcess[bytes], ...]:
        """Stock ssh -J, then ssh with connect as its ProxyCommand, both run in ``cwd``."""
        rc = relay_config(global_file)
        jump_cfg = site.tmp / "jump_config"
        jump_cfg.write_text(rc.read_text() + f"Host gpu-cluster\n  User root\n"
                            f"  IdentityFile {site.client_key.path}\n"
                            + ssh_defaults(site.relay.known_hosts))
        ssh = find_program("ssh") or "ssh"
        env = {**os.environ, **child_env()}
        run = dict(capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                   start_new_session=True, env=env, cwd=cwd)
        jump = subprocess.run([ssh, "-F", str(jump_cfg), "-J", "lab-relay", "gpu-cluster",
                               "echo $LABRELAY_TEST_HOST"], **run)  # type: ignore[call-overload]
        err.write_text("")
        proxy = _connect("-F", str(rc), "lab-relay", "%h:%p", err=err)
        via = subprocess.run([ssh, "-F", str(_config(site, proxy)), "gpu-cluster",
                              "echo $LABRELAY_TEST_HOST"], **run)  # type: ignore[call-overload]
        return jump, via

    # No file anywhere lists the relay: both refuse, even with accept-new; nothing made.
    jump, via = both("none")
    assert jump.returncode != 0 and b"Host key verification failed" in jump.stderr, jump.stderr
    assert via.returncode != 0
    said = err.read_text()
    assert "the host is UNKNOWN" in said and "no file to record it in" in said, said
    assert list(cwd.iterdir()) == []
    # An impostor's key planted as ./none: not consulted, by either.
    planted = cwd / "none"
    planted.write_text(f"{relay_line}\n")
    jump, via = both("none")
    assert jump.returncode != 0 and via.returncode != 0
    assert "the host is UNKNOWN" in err.read_text(), err.read_text()
    assert planted.read_text() == f"{relay_line}\n"
    # The key where the lab admin put it, the global file: both reach the target, the
    # fast path for connect.
    jump, via = both(str(admins))
    _reached(jump)
    _reached(via)
    assert err.read_text() == ""
    assert site.fast()["paired"] == 1
    assert sorted(p.name for p in cwd.iterdir()) == ["none"]
    assert planted.read_text() == f"{relay_line}\n"
