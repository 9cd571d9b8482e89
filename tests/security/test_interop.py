"""The interop matrix: SSH implementations labrelay did not write, against labrelay.

Each row is one test: a third-party client (or agent, or server) connects, real bytes
move both ways (2 MiB through an echo target, checked by sha256), and the row records
what the two ends negotiated -- key exchange, host key, cipher, MAC, compression,
strict KEX -- as read off the wire by ``sshsniff.SniffingProxy`` (the clear-text
``KEXINIT``s of both sides, agreed by RFC 4253's rule), cross-checked against the
tool's own report where it gives one (OpenSSH ``-v``, paramiko, asyncssh, the labrelay
agent's ``ssh_keys`` event).  Nothing here names an algorithm: the matrix proves who
still connects after the algorithm policy changes, and a failing row says what each
side offered and where they had nothing in common.

Rows:

* users against ``labrelay relay``: OpenSSH ``ssh -J``, ``ssh -L``, ``scp -J``;
  paramiko (``direct-tcpip``); asyncssh (``open_connection``); Dropbear's
  ``dbclient -B``; PuTTY's ``plink -nc``;
* agents against ``labrelay relay``: stock ``ssh -N -R``, paramiko
  (``request_port_forward``), asyncssh (``forward_remote_port``), the labrelay agent;
* the labrelay agent against other servers: OpenSSH ``sshd``, Dropbear ``dropbear``.

Each row prints one line (``pytest -s``, or ``-rA``), writes ``negotiated.json`` in
its ``tmp_path``, and the module writes ``interop-matrix.json`` in pytest's base temp
directory.  A missing tool fails the row under ``CI=true`` and skips it elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import relay_fixtures
from conftest import Targets, in_ci
from harness import (
    LOOPBACK,
    AgentProcess,
    DataStream,
    EchoServer,
    HarnessError,
    KeyPair,
    LineLog,
    MiB,
    RelayNode,
    Sshd,
    SshProcess,
    echo_roundtrip,
    find_program,
    free_port,
    key_fingerprint,
    known_hosts_line,
    make_key,
    sha256_hex,
    ssh_argv,
    write_known_hosts,
)
from sshsniff import AEAD_CIPHERS, SniffingProxy, format_negotiated

pytestmark = [pytest.mark.integration, pytest.mark.security]

PAYLOAD_SIZE = 2 * MiB
#: Every step of a row (a login, a transfer) gets this long; a row takes ~1-3 s.
STEP_TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# tools: fail under CI, skip on a developer machine


def require_programs(*names: str) -> dict[str, str]:
    """Paths of ``names``; a missing one fails under ``CI=true`` and skips otherwise."""
    found = {n: find_program(n) for n in names}
    missing = sorted(n for n, p in found.items() if p is None)
    if missing:
        reason = (
            f"interop peer not installed ({', '.join(missing)} missing; `scripts/dev setup` "
            "installs openssh-client/-server, dropbear-bin and putty-tools)"
        )
        if in_ci():
            pytest.fail(reason + " and CI=true")
        pytest.skip(reason)
    return {n: str(p) for n, p in found.items()}


def require_module(name: str) -> Any:
    """Import ``name`` (in the test extra); missing fails under CI, skips otherwise."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"{name} not importable ({e}; `scripts/dev setup` installs the test extra)"
        if in_ci():
            pytest.fail(reason + " and CI=true")
        pytest.skip(reason)


# ---------------------------------------------------------------------------
# what each tool says it negotiated

_OPENSSH_KEX = re.compile(r"debug1: kex: algorithm: (\S+)")
_OPENSSH_HOSTKEY = re.compile(r"debug1: kex: host key algorithm: (\S+)")
_OPENSSH_CIPHER = re.compile(
    r"debug1: kex: (client->server|server->client) cipher: (\S+) MAC: (\S+) compression: (\S+)"
)


def openssh_said(stderr: str) -> list[dict[str, str]]:
    """One dict per key exchange in OpenSSH ``-v`` output, in order (with ``-J`` the
    jump host's comes first: its connection is set up before the target's)."""
    said: list[dict[str, str]] = []
    for line in stderr.splitlines():
        if m := _OPENSSH_KEX.search(line):
            said.append({"kex": m.group(1)})
        elif (m := _OPENSSH_HOSTKEY.search(line)) and said:
            said[-1]["host_key"] = m.group(1)
        elif (m := _OPENSSH_CIPHER.search(line)) and said:
            way = "cs" if m.group(1) == "client->server" else "sc"
            said[-1].update(
                {f"cipher_{way}": m.group(2), f"mac_{way}": m.group(3),
                 f"compression_{way}": m.group(4)}
            )  # fmt: skip
    return said


def _mac(cipher: str | None, mac: str | None) -> str | None:
    return "<implicit>" if cipher in AEAD_CIPHERS else mac


class _KexLogged(logging.Handler):
    """paramiko logs the agreed key exchange ("Kex: NAME") but keeps no attribute."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.kex: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Kex: "):
            self.kex = message[5:].split(",")[0].strip()


def paramiko_said(transport: Any, kex: str | None) -> dict[str, Any]:
    cs, sc = transport.local_cipher, transport.remote_cipher
    return {
        "kex": kex,
        "host_key": transport.host_key_type,
        "cipher_cs": cs,
        "cipher_sc": sc,
        "mac_cs": _mac(cs, transport.local_mac),
        "mac_sc": _mac(sc, transport.remote_mac),
        "compression_cs": transport.local_compression,
        "compression_sc": transport.remote_compression,
        "strict_kex": bool(transport.agreed_on_strict_kex),
    }


def asyncssh_said(conn: Any) -> dict[str, Any]:
    """From asyncssh's connection internals (it has no public accessor for these)."""

    def name(attr: str) -> str | None:
        value = getattr(conn, attr, None)
        return value.decode() if isinstance(value, bytes) and value else None

    cs, sc = name("_enc_alg_cs"), name("_enc_alg_sc")
    said = {
        "cipher_cs": cs,
        "cipher_sc": sc,
        "mac_cs": _mac(cs, name("_mac_alg_cs")),
        "mac_sc": _mac(sc, name("_mac_alg_sc")),
        "compression_cs": name("_cmp_alg_cs"),
        "compression_sc": name("_cmp_alg_sc"),
        "strict_kex": getattr(conn, "_strict_kex", None),
    }
    return {k: v for k, v in said.items() if v is not None}


def labrelay_agent_said(agent: AgentProcess) -> dict[str, Any]:
    """The agent's ``ssh_keys`` event (it is the client: "out" is client->server)."""
    keys = agent.wait_for("ssh_keys", timeout=STEP_TIMEOUT, since=0)
    return {
        "kex": keys.get("kex"),
        "cipher_cs": keys["cipher_out"],
        "cipher_sc": keys["cipher_in"],
        "mac_cs": keys["mac_out"],
        "mac_sc": keys["mac_in"],
    }


_PLINK_LINES = re.compile(
    r"key exchange|strict|Host key fingerprint|^ssh-|Initialised|compression", re.I
)


def plink_said(stderr: str) -> dict[str, Any]:
    """PuTTY names algorithms in prose ("Initialised AES-256 SDCTR ..."): kept as text."""
    return {"text": [line for line in stderr.splitlines() if _PLINK_LINES.search(line)]}


# ---------------------------------------------------------------------------
# one row of the matrix


@dataclass
class MatrixRow:
    """A row: its sniffing proxies, how it explains a failure, and its record."""

    name: str
    tmp_path: Path
    register: Callable[[Any], Any]
    matrix: list[dict[str, Any]]
    sniffers: list[SniffingProxy] = field(default_factory=list)
    outputs: dict[str, Callable[[], str]] = field(default_factory=dict)

    def sniff(self, port: int, name: str = "sniffer") -> SniffingProxy:
        """A pass-through proxy to 127.0.0.1:``port`` that the tool under test dials."""
        sniffer = SniffingProxy((LOOPBACK, port), name=f"{self.name}/{name}")
        self.sniffers.append(sniffer)
        self.register(sniffer)
        return sniffer

    def output(self, label: str, text: Callable[[], str]) -> None:
        """Tool output to quote (its tail) when the row fails."""
        self.outputs[label] = text

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Re-raise any failure with what crossed the wire and the tools' last words."""
        try:
            yield
        except Exception as e:
            failed = {
                "row": self.name,
                "error": str(e),
                "connections": [c.report() for s in self.sniffers for c in s.connections],
            }
            path = self.tmp_path / "negotiated-failed.json"
            path.write_text(json.dumps(failed, indent=2) + "\n")
            raise AssertionError(f"interop row {self.name} failed: {e}\n{self.explain()}") from e

    def explain(self) -> str:
        parts = ["--- what crossed the wire ---"]
        parts += [s.explain() for s in self.sniffers] or ["(no sniffer)"]
        for label, text in self.outputs.items():
            try:
                tail = "\n".join(text().splitlines()[-25:])
            except Exception as e:  # never hide the real failure
                tail = f"(could not read: {e!r})"
            parts.append(f"--- {label} (last lines) ---\n{tail}")
        return "\n".join(parts)

    def record(
        self,
        sniffer: SniffingProxy,
        moved: str,
        tool_said: dict[str, Any] | None = None,
        index: int = 0,
        label: str = "",
    ) -> dict[str, Any]:
        """Check the sniffed connection completed its key exchange with an agreement in
        every category and matches what the tool says; print, store and return it."""
        with self.explained():
            conn = sniffer.wait_connection(index, timeout=STEP_TIMEOUT)
            agreed = conn.negotiated()
            assert agreed is not None, "no KEXINIT pair was seen"
            none = [k for k, v in agreed.items() if v is None]
            assert not none, f"nothing in common for {none}"
            assert conn.client.newkeys and conn.server.newkeys, "key exchange did not complete"
            if tool_said:
                checked = {k: v for k, v in tool_said.items() if k in agreed and v is not None}
                wire = {k: agreed[k] for k in checked}
                assert checked == wire, f"the tool says {checked}, the wire says {wire}"
        name = f"{self.name}{label}"
        entry = {"row": name, **conn.report(), "moved": moved, "tool_said": tool_said}
        (self.tmp_path / f"negotiated{label}.json").write_text(json.dumps(entry, indent=2) + "\n")
        self.matrix.append(entry)
        print(
            f"\ninterop {name}: {conn.client.banner} -> {conn.server.banner}: "
            f"{format_negotiated(agreed)}; {moved}"
        )
        return entry


@pytest.fixture(scope="module")
def interop_matrix(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[dict[str, Any]]]:
    """Every row's record; written to ``<basetemp>/interop-matrix.json`` and shown as a
    table on the terminal even without ``-s`` (so CI's log says who negotiated what)."""
    rows: list[dict[str, Any]] = []
    yield rows
    path = tmp_path_factory.getbasetemp() / "interop-matrix.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"interop matrix: {len(rows)} connections recorded -> {path}"]
    for r in rows:
        agreed = format_negotiated(r["negotiated"])
        ends = f"{r['client_banner']} -> {r['server_banner']}".replace("SSH-2.0-", "")
        lines.append(f"  {r['row']:<34} {ends:<48} {agreed}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n" + "\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture
def row(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    diagnostics: Callable[[Any], Any],
    interop_matrix: list[dict[str, Any]],
) -> Iterator[MatrixRow]:
    name = request.node.name.removeprefix("test_")
    r = MatrixRow(name, tmp_path, diagnostics, interop_matrix)
    yield r
    for sniffer in r.sniffers:
        sniffer.close()


# ---------------------------------------------------------------------------
# the relay, its services, and how bytes are moved


@dataclass(frozen=True)
class InteropKeys:
    lab_pc: KeyPair  # the agent key: registers web:8080 and gpu-cluster:22
    alice: KeyPair  # the user key: reaches both


@pytest.fixture(scope="module")
def ikeys(openssh: None, tmp_path_factory: pytest.TempPathFactory) -> InteropKeys:
    d = tmp_path_factory.mktemp("interop-keys")
    return InteropKeys(
        lab_pc=make_key(d / "lab_pc", "lab_pc"), alice=make_key(d / "alice", "alice")
    )


@dataclass
class Lab:
    relay: RelayNode
    keys: InteropKeys
    web: EchoServer  # what "web:8080" leads to
    tmp_path: Path

    def trust_relay_at(self, port: int) -> None:
        """OpenSSH-style clients dialling ``port`` (a sniffer) see the relay's host key."""
        self.relay.trust(known_hosts_line(self.relay.host_key_blob, port))

    def relay_fingerprint(self) -> str:
        return key_fingerprint(self.relay.host_key_path.with_name("ssh_host_ed25519_key.pub"))

    def user_ssh(
        self, *options: str, port: int | None = None, command: str | None = None
    ) -> list[str]:
        return ssh_argv(
            port or self.relay.port, self.keys.alice.path, self.relay.known_hosts,
            *options, user="alice", command=command,
        )  # fmt: skip

    def agent_ssh(self, *options: str, port: int | None = None) -> list[str]:
        return ssh_argv(
            port or self.relay.port, self.keys.lab_pc.path, self.relay.known_hosts,
            *options, user="lab_pc",
        )  # fmt: skip


@pytest.fixture
def lab(
    start_relay: Callable[..., RelayNode], ikeys: InteropKeys, targets: Targets, tmp_path: Path
) -> Lab:
    """A relay where lab_pc may register web:8080 and gpu-cluster:22 and alice reach
    them; web:8080 will lead to an echo server."""
    relay = start_relay(
        agents=[
            f'permitlisten="web:8080",permitlisten="gpu-cluster:22" '
            f"{ikeys.lab_pc.public_blob()} lab_pc"
        ],
        users=[
            f'permitopen="web:8080",permitopen="gpu-cluster:22" {ikeys.alice.public_blob()} alice'
        ],
    )
    return Lab(relay, ikeys, targets.echo(), tmp_path)


def stock_agent(
    lab: Lab, start_ssh: Callable[..., SshProcess], *forwards: str, port: int | None = None
) -> SshProcess:
    """``ssh -v -N -R NAME:PORT:host:port`` as lab_pc; returns once all are granted."""
    rs = [a for f in forwards for a in ("-R", f)]
    proc = start_ssh(
        lab.agent_ssh("-v", "-N", "-o", "ExitOnForwardFailure=yes", *rs, port=port),
        name="stock-agent",
    )
    for f in forwards:
        listen = ":".join(f.split(":")[:2])
        proc.wait_stderr(rf"remote forward success for: listen {re.escape(listen)},")
    return proc


def register_web(lab: Lab, start_ssh: Callable[..., SshProcess], *extra: str) -> SshProcess:
    """The services the user rows reach, registered by a stock OpenSSH agent (direct)."""
    return stock_agent(lab, start_ssh, f"web:8080:127.0.0.1:{lab.web.port}", *extra)


@dataclass(frozen=True)
class Piped:
    returncode: int
    stdout_sha256: str
    stdout_len: int
    stderr: str


def pipe_through(
    argv: list[str],
    payload: bytes,
    env: dict[str, str] | None = None,
    timeout: float = STEP_TIMEOUT,
) -> Piped:
    """Run a netcat-mode client (stdin/stdout is the channel): send ``payload``, close
    stdin, read stdout to EOF."""
    try:
        out = subprocess.run(
            argv, input=payload, capture_output=True, timeout=timeout,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode("utf-8", "replace")
        raise HarnessError(f"{argv[0]} did not finish within {timeout}s; stderr:\n{err}") from None
    return Piped(
        out.returncode, sha256_hex(out.stdout), len(out.stdout),
        out.stderr.decode("utf-8", "replace"),
    )  # fmt: skip


def assert_echoed(piped: Piped, payload: bytes, what: str) -> str:
    """The echo target sent back exactly ``payload``: the bytes crossed both ways."""
    assert piped.returncode == 0, f"{what} exited {piped.returncode}: {piped.stderr[-2000:]}"
    assert (piped.stdout_len, piped.stdout_sha256) == (len(payload), sha256_hex(payload)), (
        f"{what}: got {piped.stdout_len} bytes back, sent {len(payload)}"
    )
    return f"{len(payload) // MiB} MiB each way through {what}, sha256 equal"


def user_reaches_web(lab: Lab, seed: int) -> str:
    """alice (stock ``ssh -W web:8080``, straight to the relay) echoes 2 MiB."""
    payload = DataStream(seed, PAYLOAD_SIZE).bytes()
    piped = pipe_through(lab.user_ssh("-W", "web:8080"), payload)
    return assert_echoed(piped, payload, "ssh -W web:8080 (alice, direct)")


def jump_config(lab: Lab, target_key: KeyPair, gpu: Sshd) -> Path:
    """An ssh_config for ``ssh -J alice@127.0.0.1:PORT root@gpu-cluster`` (and scp);
    gpu-cluster's own host key is trusted under its service name."""
    lab.relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    return relay_fixtures.jump_config(lab.tmp_path / "ssh_config", lab.relay, lab.keys.alice,
                                      target_key, connect_timeout=10)


class LoopThread:
    """An asyncio event loop of its own in a thread, for asyncssh: ``run(coro)`` from
    the test's thread, so the test can move bytes while asyncssh keeps serving."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncssh", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = STEP_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def paramiko_transport(paramiko: Any, port: int, lab: Lab, key: KeyPair, user: str) -> Any:
    """A connected, authenticated paramiko Transport that checked the relay's host key."""
    kind, blob = lab.relay.host_key_blob.split()[:2]
    host_key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    sock = socket.create_connection((LOOPBACK, port), timeout=STEP_TIMEOUT)
    transport = paramiko.Transport(sock)
    transport.connect(hostkey=host_key, username=user, pkey=paramiko.PKey.from_path(key.path))
    return transport


@contextlib.contextmanager
def paramiko_kex_log(paramiko: Any) -> Iterator[_KexLogged]:
    """Capture the "Kex: NAME" line paramiko logs (``paramiko`` is passed only to say
    that it must be imported first)."""
    logger = logging.getLogger("paramiko.transport")
    handler = _KexLogged()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ---------------------------------------------------------------------------
# users against labrelay relay


def test_user_openssh_jump(
    row: MatrixRow,
    lab: Lab,
    client_key: KeyPair,
    sshd_factory: Callable[[str], Sshd],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """``ssh -J alice@relay root@gpu-cluster cat``: 2 MiB through ``cat`` on the target
    sshd and back."""
    tools = require_programs("ssh")
    gpu = sshd_factory("gpu_cluster")
    register_web(lab, start_ssh, f"gpu-cluster:22:127.0.0.1:{gpu.port}")
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    cfg = jump_config(lab, client_key, gpu)
    payload = DataStream(1, PAYLOAD_SIZE).bytes()
    argv = [tools["ssh"], "-v", "-F", str(cfg), "-J", f"alice@127.0.0.1:{sniffer.port}",
            "root@gpu-cluster", "cat"]  # fmt: skip
    with row.explained():
        piped = pipe_through(argv, payload)
        row.output("ssh -J stderr", lambda: piped.stderr)
        moved = assert_echoed(piped, payload, "ssh -J relay gpu-cluster 'cat'")
    said = openssh_said(piped.stderr)
    row.record(sniffer, moved, tool_said=said[0] if said else None)


def test_user_openssh_local_forward(
    row: MatrixRow, lab: Lab, start_ssh: Callable[..., SshProcess]
) -> None:
    """``ssh -N -L PORT:web:8080 alice@relay``: 2 MiB echoed through the forward."""
    require_programs("ssh")
    register_web(lab, start_ssh)
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    port = free_port()
    proc = start_ssh(
        lab.user_ssh("-v", "-N", "-o", "ExitOnForwardFailure=yes",
                     "-L", f"127.0.0.1:{port}:web:8080", port=sniffer.port),
        name="ssh-L",
    )  # fmt: skip
    row.output("ssh -L stderr", proc.stderr_text)
    payload = DataStream(2, PAYLOAD_SIZE).bytes()
    with row.explained():
        # ssh logs "Local forwarding listening" before bind(); the channel comes after listen().
        proc.wait_stderr(rf"Local forwarding listening on 127\.0\.0\.1 port {port}\b")
        proc.wait_stderr(r"new port-listener")
        assert echo_roundtrip(port, payload, timeout=STEP_TIMEOUT) == payload
    said = openssh_said(proc.stderr_text())
    moved = f"{PAYLOAD_SIZE // MiB} MiB each way through ssh -L web:8080, byte-exact"
    row.record(sniffer, moved, tool_said=said[0] if said else None)


def test_user_openssh_scp(
    row: MatrixRow,
    lab: Lab,
    client_key: KeyPair,
    sshd_factory: Callable[[str], Sshd],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """``scp -J alice@relay`` of 2 MiB to gpu-cluster and back, sha256 both times."""
    tools = require_programs("scp")
    gpu = sshd_factory("gpu_cluster")
    register_web(lab, start_ssh, f"gpu-cluster:22:127.0.0.1:{gpu.port}")
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    cfg = jump_config(lab, client_key, gpu)
    stream = DataStream(3, PAYLOAD_SIZE)
    src, remote, back = (lab.tmp_path / n for n in ("up.bin", "on-gpu.bin", "back.bin"))
    src.write_bytes(stream.bytes())
    scp = [tools["scp"], "-v", "-F", str(cfg), "-J", f"alice@127.0.0.1:{sniffer.port}"]
    stderr: list[str] = []
    row.output("scp stderr", lambda: "\n".join(stderr))
    with row.explained():
        for argv in ([*scp, str(src), f"root@gpu-cluster:{remote}"],
                     [*scp, f"root@gpu-cluster:{remote}", str(back)]):  # fmt: skip
            out = subprocess.run(argv, capture_output=True, timeout=STEP_TIMEOUT,
                                 stdin=subprocess.DEVNULL)  # fmt: skip
            stderr.append(out.stderr.decode("utf-8", "replace"))
            assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}"
        assert sha256_hex(remote.read_bytes()) == stream.sha256, "upload differs"
        assert sha256_hex(back.read_bytes()) == stream.sha256, "download differs"
        assert len(sniffer.connections) == 2, "expected one relay connection per scp"
    said = openssh_said(stderr[0])
    moved = f"scp {PAYLOAD_SIZE // MiB} MiB up and back down through -J, sha256 equal"
    row.record(sniffer, moved, tool_said=said[0] if said else None)
    row.record(sniffer, "(its download's connection)", index=1, label="-download")


def test_user_paramiko(row: MatrixRow, lab: Lab, start_ssh: Callable[..., SshProcess]) -> None:
    """paramiko ``Transport`` + ``open_channel("direct-tcpip", ("web", 8080))``."""
    paramiko = require_module("paramiko")
    register_web(lab, start_ssh)
    sniffer = row.sniff(lab.relay.port)
    payload = DataStream(4, PAYLOAD_SIZE).bytes()
    with row.explained(), paramiko_kex_log(paramiko) as kex_log:
        transport = paramiko_transport(paramiko, sniffer.port, lab, lab.keys.alice, "alice")
        try:
            chan = transport.open_channel("direct-tcpip", ("web", 8080), (LOOPBACK, 0))
            sender = threading.Thread(target=lambda: (chan.sendall(payload), chan.shutdown_write()))
            sender.start()
            got = bytearray()
            chan.settimeout(STEP_TIMEOUT)
            while data := chan.recv(256 * 1024):
                got += data
            sender.join(STEP_TIMEOUT)
            assert sha256_hex(bytes(got)) == sha256_hex(payload), f"got {len(got)} bytes back"
            said = paramiko_said(transport, kex_log.kex)
        finally:
            transport.close()
    moved = f"{PAYLOAD_SIZE // MiB} MiB each way through a direct-tcpip channel, sha256 equal"
    row.record(sniffer, moved, tool_said=said)


def test_user_asyncssh(
    row: MatrixRow, lab: Lab, start_ssh: Callable[..., SshProcess], loop_thread: LoopThread
) -> None:
    """asyncssh ``connect`` + ``open_connection("web", 8080)`` on its own event loop."""
    asyncssh = require_module("asyncssh")
    register_web(lab, start_ssh)
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    payload = DataStream(5, PAYLOAD_SIZE).bytes()

    async def session() -> tuple[bytes, dict[str, Any]]:
        async with asyncssh.connect(
            LOOPBACK, port=sniffer.port, username="alice",
            client_keys=[str(lab.keys.alice.path)], known_hosts=str(lab.relay.known_hosts),
            agent_path=None, config=None,
        ) as conn:  # fmt: skip
            reader, writer = await conn.open_connection("web", 8080)
            writer.write(payload)
            writer.write_eof()
            got = await reader.read()
            writer.close()
            return got, asyncssh_said(conn)

    with row.explained():
        got, said = loop_thread.run(session())
        assert sha256_hex(got) == sha256_hex(payload), f"got {len(got)} bytes back"
    moved = f"{PAYLOAD_SIZE // MiB} MiB each way through open_connection, sha256 equal"
    row.record(sniffer, moved, tool_said=said)


def test_user_dropbear_dbclient(
    row: MatrixRow, lab: Lab, start_ssh: Callable[..., SshProcess]
) -> None:
    """Dropbear's ``dbclient -B web:8080`` (netcat mode) with a converted key, checking
    the relay's host key (dbclient's known_hosts has no ``[host]:port`` form)."""
    tools = require_programs("dbclient", "dropbearconvert")
    register_web(lab, start_ssh)
    sniffer = row.sniff(lab.relay.port)
    home = lab.tmp_path / "dbclient-home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    write_known_hosts(home / ".ssh" / "known_hosts", f"{LOOPBACK} {lab.relay.host_key_blob}")
    key = dropbear_key(tools, lab.keys.alice, lab.tmp_path)
    payload = DataStream(6, PAYLOAD_SIZE).bytes()
    argv = [tools["dbclient"], "-i", str(key), "-p", str(sniffer.port), "-B", "web:8080",
            f"alice@{LOOPBACK}"]  # fmt: skip
    with row.explained():
        piped = pipe_through(argv, payload, env={"HOME": str(home)})
        row.output("dbclient stderr", lambda: piped.stderr)
        moved = assert_echoed(piped, payload, "dbclient -B web:8080")
    row.record(sniffer, moved)


def dropbear_key(tools: dict[str, str], key: KeyPair, directory: Path) -> Path:
    """``key`` in Dropbear's own format (dbclient reads no OpenSSH private keys)."""
    out = directory / f"{key.path.name}.dropbear"
    subprocess.run([tools["dropbearconvert"], "openssh", "dropbear", str(key.path), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out


def test_user_dropbear_dbclient_multihop(
    row: MatrixRow,
    lab: Lab,
    client_key: KeyPair,
    sshd_factory: Callable[[str], Sshd],
    start_ssh: Callable[..., SshProcess],
) -> None:
    """Dropbear's ``ssh -J``: ``dbclient alice@relay/PORT,root@gpu-cluster cat`` (the
    second hop runs through a nested ``dbclient -B gpu-cluster:22``); 2 MiB through
    ``cat`` on the target sshd and back."""
    tools = require_programs("dbclient", "dropbearconvert")
    gpu = sshd_factory("gpu_cluster")
    register_web(lab, start_ssh, f"gpu-cluster:22:127.0.0.1:{gpu.port}")
    sniffer = row.sniff(lab.relay.port)
    home = lab.tmp_path / "dbclient-home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    write_known_hosts(
        home / ".ssh" / "known_hosts",
        f"{LOOPBACK} {lab.relay.host_key_blob}",
        f"gpu-cluster {gpu.host_key.public_blob()}",
    )
    keys = [dropbear_key(tools, k, lab.tmp_path) for k in (lab.keys.alice, client_key)]
    payload = DataStream(14, PAYLOAD_SIZE).bytes()
    argv = [tools["dbclient"], *(a for k in keys for a in ("-i", str(k))),
            f"alice@{LOOPBACK}/{sniffer.port},root@gpu-cluster", "cat"]  # fmt: skip
    with row.explained():
        piped = pipe_through(argv, payload, env={"HOME": str(home)})
        row.output("dbclient stderr", lambda: piped.stderr)
        moved = assert_echoed(piped, payload, "dbclient relay,gpu-cluster 'cat'")
    row.record(sniffer, moved)


def test_user_putty_plink(row: MatrixRow, lab: Lab, start_ssh: Callable[..., SshProcess]) -> None:
    """PuTTY's ``plink -nc web:8080`` (netcat mode), key converted by ``puttygen``, the
    relay's host key pinned with ``-hostkey SHA256:...``."""
    tools = require_programs("plink", "puttygen")
    register_web(lab, start_ssh)
    sniffer = row.sniff(lab.relay.port)
    home = lab.tmp_path / "plink-home"
    home.mkdir(mode=0o700)
    ppk = lab.tmp_path / "alice.ppk"
    convert = [tools["puttygen"], str(lab.keys.alice.path), "-O", "private", "-o", str(ppk)]
    subprocess.run(convert, check=True, capture_output=True, env={**os.environ, "HOME": str(home)})
    payload = DataStream(7, PAYLOAD_SIZE).bytes()
    argv = [tools["plink"], "-v", "-batch", "-ssh", "-P", str(sniffer.port), "-i", str(ppk),
            "-hostkey", lab.relay_fingerprint(),
            "-nc", "web:8080", f"alice@{LOOPBACK}"]  # fmt: skip
    with row.explained():
        piped = pipe_through(argv, payload, env={"HOME": str(home)})
        row.output("plink stderr", lambda: piped.stderr)
        moved = assert_echoed(piped, payload, "plink -nc web:8080")
    row.record(sniffer, moved, tool_said=plink_said(piped.stderr))


# ---------------------------------------------------------------------------
# agents against labrelay relay (alice reaches what they registered with ssh -W)


def test_agent_openssh_remote_forward(
    row: MatrixRow, lab: Lab, start_ssh: Callable[..., SshProcess]
) -> None:
    """A stock ``ssh -N -R web:8080:...`` agent through the sniffer; alice reaches it."""
    require_programs("ssh")
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    with row.explained():
        agent = stock_agent(lab, start_ssh, f"web:8080:127.0.0.1:{lab.web.port}",
                            port=sniffer.port)  # fmt: skip
        row.output("ssh -R stderr", agent.stderr_text)
        moved = user_reaches_web(lab, seed=8)
    said = openssh_said(agent.stderr_text())
    row.record(sniffer, moved, tool_said=said[0] if said else None)


def _bridge(chan: Any, target: tuple[str, int]) -> None:
    """Copy a forwarded paramiko channel to and from a TCP target, with half-closes."""
    sock = socket.create_connection(target, timeout=STEP_TIMEOUT)

    def up() -> None:
        while data := chan.recv(256 * 1024):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=up, daemon=True)
    t.start()
    try:
        while data := sock.recv(256 * 1024):
            chan.sendall(data)
        chan.shutdown_write()
        t.join(STEP_TIMEOUT)
    finally:
        chan.close()
        sock.close()


def test_agent_paramiko(row: MatrixRow, lab: Lab) -> None:
    """paramiko ``request_port_forward("web", 8080)``; each forwarded channel is bridged
    to the echo target; alice reaches it."""
    paramiko = require_module("paramiko")
    sniffer = row.sniff(lab.relay.port)
    target = lab.web.address

    def forwarded(chan: Any, origin: Any, server: Any) -> None:
        threading.Thread(target=_bridge, args=(chan, target), daemon=True).start()

    with row.explained(), paramiko_kex_log(paramiko) as kex_log:
        transport = paramiko_transport(paramiko, sniffer.port, lab, lab.keys.lab_pc, "lab_pc")
        try:
            bound = transport.request_port_forward("web", 8080, handler=forwarded)
            assert bound == 8080, f"relay bound {bound}"
            moved = user_reaches_web(lab, seed=9)
            said = paramiko_said(transport, kex_log.kex)
        finally:
            transport.close()
    row.record(sniffer, moved, tool_said=said)


def test_agent_asyncssh(row: MatrixRow, lab: Lab, loop_thread: LoopThread) -> None:
    """asyncssh ``forward_remote_port("web", 8080, ...)`` to the echo target; alice
    reaches it while asyncssh's loop serves the forward."""
    asyncssh = require_module("asyncssh")
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)

    async def register() -> Any:
        conn = await asyncssh.connect(
            LOOPBACK, port=sniffer.port, username="lab_pc",
            client_keys=[str(lab.keys.lab_pc.path)], known_hosts=str(lab.relay.known_hosts),
            agent_path=None, config=None,
        )  # fmt: skip
        listener = await conn.forward_remote_port("web", 8080, LOOPBACK, lab.web.port)
        return conn, listener

    async def close(conn: Any) -> None:
        conn.close()
        await conn.wait_closed()

    with row.explained():
        conn, listener = loop_thread.run(register())
        try:
            assert listener.get_port() == 8080, f"relay bound {listener.get_port()}"
            moved = user_reaches_web(lab, seed=10)
            said = asyncssh_said(conn)
        finally:
            loop_thread.run(close(conn))
    row.record(sniffer, moved, tool_said=said)


def labrelay_agent_argv(port: int, key: Path, known_hosts: Path, *forwards: str) -> list[str]:
    return [
        "-p", str(port), "-i", str(key),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "--backoff-initial", "0.2", "--backoff-max", "1",
        *(a for f in forwards for a in ("-R", f)),
    ]  # fmt: skip


def test_agent_labrelay(row: MatrixRow, lab: Lab, start_agent: Callable[..., AgentProcess]) -> None:
    """The labrelay agent registers web:8080 through the sniffer; alice reaches it."""
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    argv = labrelay_agent_argv(sniffer.port, lab.keys.lab_pc.path, lab.relay.known_hosts,
                               f"web:8080:127.0.0.1:{lab.web.port}")  # fmt: skip
    agent = start_agent(*argv, "lab_pc@127.0.0.1")
    with row.explained():
        agent.wait_for("link_connected", timeout=STEP_TIMEOUT)
        agent.wait_for("forward_ready", timeout=STEP_TIMEOUT, kind="remote", bind="web")
        moved = user_reaches_web(lab, seed=11)
    row.record(sniffer, moved, tool_said=labrelay_agent_said(agent))


# ---------------------------------------------------------------------------
# the labrelay agent against other servers


def agent_forward_through(
    row: MatrixRow,
    start_agent: Callable[..., AgentProcess],
    server_port: int,
    host_key_blobs: list[str],
    client_key: KeyPair,
    target: EchoServer,
    seed: int,
) -> None:
    """The labrelay agent logs in as root through a sniffer, asks for ``-R 0:target``;
    2 MiB are echoed through the port the server bound."""
    sniffer = row.sniff(server_port)
    kh = write_known_hosts(
        row.tmp_path / "agent_known_hosts",
        *(known_hosts_line(blob, sniffer.port) for blob in host_key_blobs),
    )
    argv = labrelay_agent_argv(sniffer.port, client_key.path, kh, f"0:127.0.0.1:{target.port}")
    agent = start_agent(*argv, "root@127.0.0.1")
    payload = DataStream(seed, PAYLOAD_SIZE).bytes()
    with row.explained():
        agent.wait_for("link_connected", timeout=STEP_TIMEOUT)
        port = agent.wait_for("forward_ready", timeout=STEP_TIMEOUT, kind="remote")["port"]
        assert echo_roundtrip(port, payload, timeout=STEP_TIMEOUT) == payload
    moved = f"{PAYLOAD_SIZE // MiB} MiB each way through the server's port {port}, byte-exact"
    row.record(sniffer, moved, tool_said=labrelay_agent_said(agent))


def test_server_openssh_sshd(
    row: MatrixRow,
    sshd: Sshd,
    client_key: KeyPair,
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> None:
    """The labrelay agent's link to a stock OpenSSH sshd, ``-R 0:...`` reverse forward."""
    agent_forward_through(
        row, start_agent, sshd.port, [sshd.host_key.public_blob()], client_key, targets.echo(), 12
    )


class Dropbear:
    """Dropbear's server on 127.0.0.1 in a mount namespace of its own, where a private
    directory is bind-mounted over root's home: dropbear reads ``~/.ssh/authorized_keys``
    of the account (it has no option to read them elsewhere), and the real /root is
    never touched -- nothing to restore, even if the test dies."""

    def __init__(self, directory: Path, tools: dict[str, str], authorized: list[str]) -> None:
        self.dir = directory
        self.home = directory / "home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        os.chmod(self.home, 0o700)
        keys = self.home / ".ssh" / "authorized_keys"
        keys.write_text("".join(k + "\n" for k in authorized))
        os.chmod(keys, 0o600)
        # Like a stock install (/etc/dropbear): one host key of each type, all trusted
        # by the client (as after ssh-keyscan), so the row tests what the two ends
        # prefer, not which single key the server happens to have.
        self.host_keys: list[Path] = []
        self.host_key_blobs: list[str] = []
        for kind in ("ed25519", "ecdsa", "rsa"):
            path = directory / f"dropbear_{kind}_host_key"
            made = subprocess.run(
                [tools["dropbearkey"], "-t", kind, "-f", str(path)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            self.host_keys.append(path)
            self.host_key_blobs += [
                " ".join(line.split()[:2]) for line in made.stdout.splitlines()
                if line.startswith(("ssh-", "ecdsa-"))
            ]  # fmt: skip
        self.tools = tools
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = LineLog()
        self.port = 0

    def start(self, attempts: int = 5) -> Dropbear:
        for _ in range(attempts):
            if self._run(free_port()):
                return self
        raise HarnessError(f"dropbear could not bind a port:\n{self.log.text()}")

    def _run(self, port: int) -> bool:
        self.port = port
        since = self.log.mark()
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        argv = [
            self.tools["unshare"], "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", str(self.home), os.path.expanduser("~root"),
            self.tools["dropbear"], "-F", "-E", "-s", "-p", f"{LOOPBACK}:{port}",
            *(a for k in self.host_keys for a in ("-r", str(k))),
            "-P", str(self.dir / "dropbear.pid"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        self.log.attach(self.proc.stderr, name="dropbear-log")
        try:
            # dropbear listens, then logs "Not backgrounding" (with -F).
            self.log.wait_for(r"Not backgrounding", 10, since=since, what="dropbear")
            return True
        except HarnessError:
            self.close()
            if "No listening ports available" in self.log.text(since):
                return False
            raise

    def close(self) -> None:
        """The listener and every per-connection child (one process group)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.log.join(5)

    @property
    def name(self) -> str:
        return f"port {self.port}"

    def diagnostics(self) -> str:
        return f"dropbear on {self.port}:\n{self.log.text()}"


@pytest.fixture
def dropbear_server(
    client_key: KeyPair, tmp_path: Path, diagnostics: Callable[[Any], Any]
) -> Iterator[Dropbear]:
    tools = require_programs("dropbear", "dropbearkey", "unshare", "mount")
    server = Dropbear(tmp_path / "dropbear", tools, authorized=[client_key.public])
    diagnostics(server)
    yield server.start()
    server.close()


def test_server_dropbear(
    row: MatrixRow,
    dropbear_server: Dropbear,
    client_key: KeyPair,
    start_agent: Callable[..., AgentProcess],
    targets: Targets,
) -> None:
    """The labrelay agent's link to Dropbear's server, ``-R 0:...`` reverse forward."""
    row.output("dropbear log", dropbear_server.log.text)
    agent_forward_through(
        row, start_agent, dropbear_server.port, dropbear_server.host_key_blobs, client_key,
        targets.echo(), 13,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# a refused row explains itself


def test_refused_key_exchange_is_explained(row: MatrixRow, lab: Lab) -> None:
    """What a row says when a client and the relay have nothing in common: stock ssh
    offering only ``diffie-hellman-group1-sha1`` (no relay offers it) is refused, and
    the failure names the category, the client's offer and the server's."""
    require_programs("ssh")
    sniffer = row.sniff(lab.relay.port)
    lab.trust_relay_at(sniffer.port)
    argv = lab.user_ssh(
        "-o", "KexAlgorithms=diffie-hellman-group1-sha1", "-W", "web:8080", port=sniffer.port
    )  # fmt: skip
    with pytest.raises(AssertionError) as refused, row.explained():
        piped = pipe_through(argv, b"")
        assert piped.returncode == 0, f"ssh exited {piped.returncode}: {piped.stderr.strip()}"
    message = str(refused.value)
    assert "no common kex: client offers diffie-hellman-group1-sha1,ext-info-c" in message, message
    assert "server offers: kex=" in message, message
    assert "Unable to negotiate" in message, message  # the tool's own words are quoted
    failed = json.loads((row.tmp_path / "negotiated-failed.json").read_text())
    assert failed["connections"][0]["negotiated"]["kex"] is None, failed
