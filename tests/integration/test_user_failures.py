"""Every way the user's end fails, as she sees it (docs/quickstart.md §8).

Stock ``ssh`` with ``ProxyCommand labrelay connect …`` against a real relay (SSH, TLS
and data ports), a real agent, a real ``tinyproxy`` and hand-made proxies and servers
on real sockets: the relay down, a port that drops packets, one that accepts and says
nothing, a name that does not resolve, host keys changed and unknown, a key not
granted, a service not granted, a service whose agent is away, the TLS port wrong
(refused, not TLS), the TLS name refused or not in the certificate, an untrusted CA,
proxies that are down, answer 407/403/502 or close, the TLS handshake failing inside a
proxy's tunnel, every route of ``Transport=auto`` failing, the data port blocked, and
Ctrl-C while connecting and while the relay waits for an agent.

For each: ssh's stderr holds exactly the ``labrelay connect:`` lines expected, each of
them matches one row of the troubleshooting table in docs/quickstart.md (so the table
cannot drift), every row is seen, ssh exits 255 and ``labrelay connect`` 1.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env
from harness import (
    LOOPBACK,
    AgentProcess,
    KeyPair,
    RelayNode,
    Sshd,
    find_program,
    free_port,
    known_hosts_line,
    make_key,
)
from relay_fixtures import ssh_defaults
from test_tls import ca, tls_keys, tls_relay_toml  # noqa: F401 - fixtures
from tinyproxy import Tinyproxy
from tlscerts import CA, RELAY_NAME

pytestmark = pytest.mark.integration
DOC = REPO_ROOT / "docs" / "quickstart.md"
PREFIX = "labrelay connect: "

_HOLES = {
    "{RELAY}": r"\S+:\d+(?: \(TLS(?:, through the proxy \S+)?\))?",
    "{PORT}": r"\d+", "{N}": r"\d+(?:\.\d+)?", "{NAME}": r"[^' ]+", "{HOST}": r"\S+",
    "{USER}": r"[^' ]+", "{SERVICE}": r"[\w.-]+:\d+", "{URL}": r"\S+", "{…}": r".+?",
    "…": r".*",
}


def doc_rows(marker: str = "user-failures") -> list[tuple[str, re.Pattern[str]]]:
    """The first column of the table after ``<!-- MARKER:``: each symptom, and the
    pattern it stands for."""
    text = DOC.read_text()
    start = text.index(f"<!-- {marker}:")
    rows = []
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("| `"):
            break
        symptom = line.split("`", 2)[1]
        parts = re.split("(" + "|".join(map(re.escape, _HOLES)) + ")", symptom)
        rows.append((symptom, re.compile(
            "".join(_HOLES.get(p, re.escape(p)) for p in parts), re.DOTALL)))
    return rows


class AnswerProxy:
    """An "HTTP proxy" that reads a CONNECT request and answers ``answer`` (or closes,
    for None; or says nothing, for ``b""``, until :meth:`close`), on a real socket in a
    thread."""

    def __init__(self, answer: bytes | None) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.answer == b"":
                self.held.append(conn)  # accepted, read nothing, answers nothing
                continue
            with conn:
                conn.settimeout(30)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                if self.answer is not None:
                    conn.sendall(self.answer)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


@dataclass
class World:
    relay: RelayNode
    tls_port: int
    ca: CA
    alice: KeyPair
    stranger: KeyPair
    client_key: KeyPair
    tmp: Path
    closed: int  # a port nothing listens on
    sockets: list[socket.socket] = field(default_factory=list)

    def tls(self, *extra: str, trust: bool = True, name: str | None = RELAY_NAME,
            port: int | None = None) -> list[str]:
        opts = ["-o", "Transport=tls", "-o", f"TLSPort={port or self.tls_port}"]
        if name is not None:
            opts += ["-o", f"TLSServerName={name}"]
        if trust:
            opts += ["-o", f"TLSCAFile={self.ca.pem_path}"]
        return [*opts, *extra]

    def argv(self, *extra: str, service: str = "gpu-cluster", key: KeyPair | None = None,
             known_hosts: Path | None = None, host: str = LOOPBACK,
             port: int | None = None) -> list[str]:
        return [sys.executable, "-m", "relay", "connect", "-p", str(port or self.relay.port),
                "-i", str((key or self.alice).path),
                "-o", f"UserKnownHostsFile={known_hosts or self.relay.known_hosts}",
                "-o", "ConnectTimeout=3", *extra, f"alice@{host}", service]


@pytest.fixture
def world(ca: CA, tls_keys: dict[str, KeyPair], start_relay: Callable[..., RelayNode],  # noqa: F811
          start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
          client_key: KeyPair, tmp_path: Path) -> Iterator[World]:
    """A relay (SSH, TLS and data ports; alice may reach gpu-cluster, served by an agent,
    and away, served by none) whose data port alice cannot reach: it is bound on
    127.0.0.2 while the test holds its number on 127.0.0.1 (so the fast path falls back
    to an SSH channel, and says so)."""
    gpu = sshd_factory("gpu_cluster")
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))  # never listens: a connect to it is refused
    k = tls_keys
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22",permitlisten="away:22" '
                f'{k["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22",permitopen="away:22" '
               f'{k["alice"].public_blob()} alice'],
        relay_toml=tls_relay_toml(ca.issue("relay", (RELAY_NAME,)), (
            # The failures end handshakes badly from 127.0.0.1 on purpose.
            'penalty_exempt = ["127.0.0.1"]\npublic_wait = 3\n'
            f'data_port = {holder.getsockname()[1]}\ndata_bind = "127.0.0.2"\n'
            'e2e_services = ["gpu-cluster:22", "away:22"]\n')))
    tls_port = relay.wait_for("relay_tls_listening", since=0)["port"]
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    agent = start_agent("-p", str(relay.port), "-i", str(k["lab_pc"].path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "lab_pc@127.0.0.1")
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    w = World(relay, tls_port, ca, k["alice"], make_key(tmp_path / "stranger", "stranger"),
              client_key, tmp_path, free_port(), [holder])
    yield w
    for s in w.sockets:
        s.close()


def _through_ssh(w: World, name: str, argv: list[str],
                 ) -> tuple[int, int | None, list[str], str]:
    """Stock ssh to gpu-cluster with ``argv`` as its ProxyCommand: ssh's exit status,
    the ProxyCommand's, the ``labrelay connect:`` lines of ssh's stderr (the ProxyCommand's
    stderr is ssh's), and the whole of that stderr."""
    slug = re.sub(r"\W+", "-", name)
    rc_file = w.tmp / f"rc-{slug}"
    proxy = f"sh -c {shlex.quote(shlex.join(argv) + f'; echo $? > {rc_file}')}"
    cfg = w.tmp / f"ssh_config-{slug}"
    cfg.write_text(f"Host gpu-cluster\n  User root\n  IdentityFile {w.client_key.path}\n"
                   f"  ProxyCommand {proxy}\n" + ssh_defaults(w.relay.known_hosts))
    out = subprocess.run([find_program("ssh") or "ssh", "-F", str(cfg), "gpu-cluster",
                          "echo $LABRELAY_TEST_HOST"], capture_output=True, timeout=120,
                         stdin=subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, **child_env(), "SSH_AUTH_SOCK": ""})
    err = out.stderr.decode()
    lines = [x[len(PREFIX):] for x in err.splitlines() if x.startswith(PREFIX)]
    # ssh ends the ProxyCommand when its session is over (no status then).
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    return out.returncode, rc, lines, err


def _interrupted(w: World, argv: list[str], started: Callable[[], None]) -> tuple[int, str]:
    """``labrelay connect`` interrupted by SIGINT (Ctrl-C) once ``started`` returned."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **child_env(), "SSH_AUTH_SOCK": ""})
    try:
        started()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err.decode()


def test_every_failure_says_what_where_and_the_fix_as_the_table_does(world: World) -> None:
    w = world
    rows = doc_rows()
    assert len(rows) >= 25, rows
    seen: dict[str, list[str]] = {symptom: [] for symptom, _ in rows}
    problems: list[str] = []

    # A port that drops SYNs: a listener whose one-slot backlog is already full.
    drop = socket.socket()
    drop.bind((LOOPBACK, 0))
    drop.listen(0)
    w.sockets.append(drop)
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(drop.getsockname())
        w.sockets.append(s)
    silent = socket.create_server((LOOPBACK, 0))  # accepts, says nothing
    w.sockets.append(silent)
    changed = w.tmp / "known_hosts.changed"
    other = w.client_key.public.split()
    changed.write_text(f"[{LOOPBACK}]:{w.relay.port} {other[0]} {other[1]}\n")
    tp = Tinyproxy(w.tmp / "tinyproxy", free_port(), [w.tls_port, w.relay.port, w.closed])
    answers = {code: AnswerProxy(text) for code, text in (
        (407, b"HTTP/1.1 407 Proxy Authentication Required\r\n"
              b"Proxy-Authenticate: Basic realm=\"campus\"\r\n\r\n"),
        (403, b"HTTP/1.1 403 Forbidden\r\n\r\n"),
        (502, b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
        (0, None),
        (1, b""))}
    tp.wait_listening()
    via_tp = ["-o", f"Proxy={tp.url()}"]
    closed = w.closed
    # name: (ProxyCommand argv, what each labrelay connect line must contain, in order)
    cases: dict[str, tuple[list[str], list[str]]] = {
        "relay down": (w.argv(port=closed), [
            f"the relay {LOOPBACK}:{closed}: connection refused"]),
        "packets dropped": (w.argv(port=drop.getsockname()[1]), ["no answer within 3s"]),
        "not a relay": (w.argv(port=silent.getsockname()[1]), ["no SSH handshake"]),
        "no such name": (w.argv(host="relay.invalid"), ["'relay.invalid' does not resolve"]),
        "host key changed": (w.argv(known_hosts=changed), ["has CHANGED"]),
        "host key unknown": (w.argv(known_hosts=w.tmp / "nowhere"), ["is UNKNOWN"]),
        "key not granted": (w.argv(key=w.stranger), ["accepted none of our 1 key(s)"]),
        "service not granted": (w.argv(service="secret"), [
            "the relay refused secret:22: secret:22 is not granted to user alice "
            "(the relay's reason; if it lasts, send this line to the relay's admin)"]),
        "not granted, channel": (w.argv("--no-fast-path", service="secret"), [
            "the relay refused secret:22: secret:22 is not granted to user alice "
            "(the relay's reason; if it lasts, send this line to the relay's admin)"]),
        "agent away": (w.argv(service="away"), [
            "away:22 is not registered right now", "did not come back within 3s"]),
        "TLS port refused": (w.argv(*w.tls(port=closed)), [
            f"the relay {LOOPBACK}:{closed} (TLS): connection refused: nothing listens on "
            f"port {closed} there; is the relay running, and is {closed} its TLS port"]),
        "TLS port not TLS": (w.argv(*w.tls(port=w.relay.port)), [
            f"the relay {LOOPBACK}:{w.relay.port} (TLS): that port does not speak TLS"]),
        "TLS name refused": (w.argv(*w.tls(name="wrong.test")), [
            f"the relay {LOOPBACK}:{w.tls_port} (TLS): the connection was closed during "
            "the TLS handshake, before any certificate: does the relay serve the name "
            "'wrong.test'"]),
        "TLS name not in the certificate": (w.argv(*w.tls(name=None)), [
            f"it names {RELAY_NAME}, not '{LOOPBACK}'"]),
        "TLS untrusted CA": (w.argv(*w.tls(trust=False)), ["not signed by a trusted CA"]),
        "TLS works": (w.argv(*w.tls()), ["the relay is reached by tls"]),
        "proxy down": (w.argv(*w.tls("-o", f"Proxy=http://{LOOPBACK}:{closed}")), [
            f"(TLS, through the proxy http://{LOOPBACK}:{closed}): cannot reach the proxy"]),
        "proxy 407": (w.argv(*w.tls("-o", f"Proxy={answers[407].url()}")), ["407"]),
        "proxy 403": (w.argv(*w.tls("-o", f"Proxy={answers[403].url()}")), ["403"]),
        "tinyproxy 403": (w.argv(*w.tls(*via_tp, port=1)), [
            "403 Access violation"]),
        "proxy 502": (w.argv(*w.tls("-o", f"Proxy={answers[502].url()}")), ["502"]),
        "proxy closes": (w.argv(*w.tls("-o", f"Proxy={answers[0].url()}")), [
            "closed the connection before answering CONNECT"]),
        "proxy says nothing": (w.argv(*w.tls("-o", f"Proxy={answers[1].url()}")), [
            f"did not open the tunnel to {LOOPBACK}:{w.tls_port} within 3s"]),
        "TLS port says nothing": (w.argv(*w.tls(port=silent.getsockname()[1])), [
            f"no TLS handshake (or no SSH version after it) within 3s over tls "
            f"{LOOPBACK}:{silent.getsockname()[1]}"]),
        "tinyproxy 502": (w.argv(*w.tls(*via_tp, port=closed)), ["HTTP/1.1 50"]),
        "proxy to a port not TLS": (w.argv(*w.tls(*via_tp, port=w.relay.port)), [
            f"through the proxy {tp.url()}): the proxy opened its tunnel to "
            f"{LOOPBACK}:{w.relay.port}, but what answers there does not speak TLS"]),
        "proxy to a TLS name refused": (w.argv(*w.tls(*via_tp, name="wrong.test")), [
            "the proxy's tunnel was closed during the TLS handshake"]),
        "proxy, then an untrusted CA": (w.argv(*w.tls(*via_tp, trust=False)), [
            f"(TLS, through the proxy {tp.url()}): the relay's certificate is not signed"]),
        "every route of auto": (w.argv("-o", "Transport=auto", "-o", f"TLSPort={closed}",
                                       "-o", f"Proxy=http://{LOOPBACK}:{closed}",
                                       port=closed), [
            f"by any route: tcp {LOOPBACK}:{closed}: connection refused"]),
        "data port blocked": (w.argv(), ["cannot reach its data port"]),
    }
    works = {"TLS works", "data port blocked"}
    said: dict[str, list[str]] = {}
    for name, (argv, wanted) in cases.items():
        ssh_rc, rc, lines, err = _through_ssh(w, name, argv)
        said[name] = lines
        if (ssh_rc, rc) != ((0, None) if name in works else (255, 1)):
            problems.append(f"{name}: exit {rc} (ssh {ssh_rc}): {err}")
        if len(lines) != len(wanted) or not all(
                want in line for want, line in zip(wanted, lines, strict=False)):
            problems.append(f"{name}: said {lines}, expected lines with {wanted}")
        for line in lines:
            matched = [s for s, pattern in rows if pattern.fullmatch(line)]
            if len(matched) != 1:
                problems.append(f"{name}: {len(matched)} rows of the table match {line!r}")
            for s in matched:
                seen[s].append(name)

    # Each route of auto once: it tried each three times, the error nested three deep.
    auto = "".join(said["every route of auto"])
    if auto.count(f"tcp {LOOPBACK}:{closed}: ") != 1 or "every route failed" in auto:
        problems.append(f"every route of auto: {said['every route of auto']}")

    # Ctrl-C while connecting (a relay that accepts and says nothing), and while the
    # relay waits for the agent of away:22 (its public_wait).
    held: list[socket.socket] = []
    quiet = socket.create_server((LOOPBACK, 0))  # a fresh one: nothing in its backlog
    w.sockets.append(quiet)

    def accepted() -> None:
        quiet.settimeout(30)
        held.append(quiet.accept()[0])
    rc, err = _interrupted(w, w.argv(port=quiet.getsockname()[1]), accepted)
    for conn in held:
        conn.close()
    waits = len(w.relay.events("relay_session_waiting"))

    def waiting() -> None:
        w.relay.events_at_least("relay_session_waiting", waits + 1, timeout=20)
    rc2, err2 = _interrupted(w, w.argv("--no-fast-path", service="away"), waiting)
    for name, code, text, want in (
            ("Ctrl-C connecting", rc, err,
             f"interrupted while reaching the relay {LOOPBACK}:{quiet.getsockname()[1]}"),
            ("Ctrl-C waiting", rc2, err2, "interrupted while setting up away:22")):
        lines = [x[len(PREFIX):] for x in text.splitlines()]
        if code != 1 or lines != [want]:
            problems.append(f"{name}: exit {code}, said {lines}, expected {want!r}")
        for line in lines:
            for s, pattern in rows:
                if pattern.fullmatch(line):
                    seen[s].append(name)

    tp.stop()
    for p in answers.values():
        p.close()
    unseen = [s for s, names in seen.items() if not names]
    assert not problems, "\n".join(problems)
    assert not unseen, "rows of docs/quickstart.md §8 no failure produced:\n" + "\n".join(unseen)


def test_stock_ssh_J_failures_as_the_table_says(world: World) -> None:
    """The same failures with ``ssh -J`` and no labrelay on the laptop: ssh's words,
    the relay's reason inside; the first line of each matches its row of the second
    table, and each row is seen."""
    w = world
    rows = doc_rows("user-failures-jump")
    assert len(rows) == 4, rows
    seen: dict[str, list[str]] = {symptom: [] for symptom, _ in rows}
    problems = []
    for name, key, service, port, want in (
            ("relay down", w.alice, "gpu-cluster", w.closed, "Connection refused"),
            ("key not granted", w.stranger, "gpu-cluster", w.relay.port, "(publickey)"),
            ("service not granted", w.alice, "secret", w.relay.port, "secret:22 is not"),
            ("agent away", w.alice, "away", w.relay.port, "did not come back within 3s")):
        cfg = w.tmp / f"jump-{name.replace(' ', '-')}"
        cfg.write_text(f"Host {service}\n  User root\n  IdentityFile {w.client_key.path}\n"
                       f"Host {LOOPBACK}\n  IdentityFile {key.path}\n"
                       + ssh_defaults(w.relay.known_hosts))
        out = subprocess.run([find_program("ssh") or "ssh", "-F", str(cfg),
                              "-J", f"alice@{LOOPBACK}:{port}", service, "true"],
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, **child_env(), "SSH_AUTH_SOCK": ""})
        first = (out.stderr.splitlines() or [""])[0]
        if out.returncode != 255 or want not in first:
            problems.append(f"{name}: exit {out.returncode}: {out.stderr}")
        matched = [symptom for symptom, pattern in rows if pattern.fullmatch(first)]
        if len(matched) != 1:
            problems.append(f"{name}: {len(matched)} rows match {first!r}")
        for symptom in matched:
            seen[symptom].append(name)
    assert not problems, "\n".join(problems)
    assert all(seen.values()), seen


def test_a_wrong_command_line_exits_2_and_says_which_part(tmp_path: Path) -> None:
    """docs/quickstart.md §8's exit statuses: 2 for a command line that is wrong,
    whether argparse, labrelay or ssh (``-F`` a file that is not there, read by ``ssh
    -G``) finds it; it was 1 for the last, the status of a relay that failed."""
    def connect(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "connect", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL,
                              env={**os.environ, **child_env(), "HOME": str(tmp_path),
                                   "SSH_AUTH_SOCK": ""})

    missing = tmp_path / "no_such_config"
    out = connect("-F", str(missing), "myrelay", "gpu-cluster")
    assert (out.returncode, out.stdout) == (2, ""), out
    assert out.stderr.startswith("labrelay connect: ") and str(missing) in out.stderr, out
    assert len(out.stderr.splitlines()) == 1, out.stderr
    out = connect(f"alice@{LOOPBACK}", "gpu-cluster:http")
    assert (out.returncode, out.stdout) == (2, ""), out
    assert "expected SERVICE or SERVICE:PORT" in out.stderr, out.stderr
    out = connect("--no-such-option", f"alice@{LOOPBACK}", "gpu-cluster")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr, out
