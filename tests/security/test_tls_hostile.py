"""The security issue's hostile cases on the TLS port (issue 17): a handshake flood from
one source, garbage before and after the handshake, a client that stalls mid-handshake.

The attacker is 127.0.0.2; alice is 127.0.0.1 and reaches gpu_cluster through the TLS
port (``labrelay connect -o Transport=tls`` as ssh's ProxyCommand) while each attack
runs.  The relay has the default admission settings (10 unauthenticated connections
per source, the default penalties), shared by its SSH and TLS ports, and a 2 s
``tls_handshake_timeout``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import LOOPBACK, AgentProcess, KeyPair, RelayNode, Sshd, find_program, make_key
from relay_fixtures import wait_until
from test_admission import (
    FLOOD,
    PER_SOURCE,
    _closed_now,
    _dial,
    _refused_at_accept,
    timed_gpu_echo,
)
from tlscerts import CA, RELAY_NAME

pytestmark = pytest.mark.integration


@dataclass
class Site:
    relay: RelayNode
    tls_port: int
    ca: CA
    alice_key: KeyPair
    client_key: KeyPair
    tmp: Path

    def admission(self) -> dict[str, Any]:
        return dict(self.relay.status()["relay"]["admission"])

    def tls(self) -> dict[str, Any]:
        return dict(self.relay.status()["relay"]["tls"])

    def alice(self) -> float:
        """alice's ssh to gpu_cluster through the TLS port; seconds, asserting it worked."""
        proxy = " ".join([sys.executable, "-m", "relay", "connect", "-p", str(self.relay.port),
                          "-i", str(self.alice_key.path),
                          "-o", f"UserKnownHostsFile={self.relay.known_hosts}",
                          "-o", "Transport=tls", "-o", f"TLSPort={self.tls_port}",
                          "-o", f"TLSServerName={RELAY_NAME}",
                          "-o", f"TLSCAFile={self.ca.pem_path}", f"alice@{LOOPBACK}", "%h:%p"])
        cfg = self.tmp / "ssh_config"
        cfg.write_text(f"""\
Host gpu-cluster
  User root
  IdentityFile {self.client_key.path}
  ProxyCommand {proxy}
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {self.relay.known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  ConnectTimeout 20
""")
        return timed_gpu_echo(cfg, "gpu-cluster", self.relay)


@pytest.fixture
def site(openssh: None, client_key: KeyPair, start_relay: Callable[..., RelayNode],
         start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
         tmp_path: Path) -> Iterator[Site]:
    ca = CA(tmp_path / "ca")
    cert = ca.issue("relay", (RELAY_NAME,))
    lab, alice = make_key(tmp_path / "lab_pc"), make_key(tmp_path / "alice")
    gpu = sshd_factory("gpu_cluster")
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22" {lab.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {alice.public_blob()} alice'],
        relay_toml=f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n'
                   f'tls_listen = "127.0.0.1:0"\ntls_handshake_timeout = 2\n')
    tls_port = relay.wait_for("relay_tls_listening", since=0)["port"]
    relay.trust(f"gpu-cluster {gpu.host_key.public_blob()}")
    agent = start_agent("-p", str(relay.port), "-i", str(lab.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", f"lab_pc@{LOOPBACK}")
    agent.wait_for("forward_ready", timeout=20, bind="gpu-cluster")
    yield Site(relay, tls_port, ca, alice, client_key, tmp_path)
    assert relay.events(level="critical") == []


def _client_hello() -> bytes:
    """A real ClientHello's bytes (from Python's ssl, in memory)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=RELAY_NAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _recv_all(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Bytes until the relay closes ``s``; and how long that took."""
    s.settimeout(timeout)
    start, data = time.monotonic(), b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def test_handshake_flood_from_one_source_does_not_lock_others_out(site: Site) -> None:
    """100 TCP connections from 127.0.0.2 to the TLS port that never start TLS: 10 are
    held (the source's share), 90 closed at accept; alice connects through the TLS port
    meanwhile; the held ones are closed at the handshake timeout, which penalises the
    source on every port (the SSH port refuses it too)."""
    base = site.alice()
    dialled = [_dial(site.tls_port) for _ in range(FLOOD)]
    flood = [s for s in dialled if s is not None]
    try:
        closed = len(_closed_now(flood, within=1.0)) + (FLOOD - len(flood))
        wait_until(lambda: site.admission()["tls"]["refused"]["per_source_cap"]
                   == FLOOD - PER_SOURCE, "the relay to count the refusals")
        assert closed == FLOOD - PER_SOURCE, closed
        assert site.admission()["tls"]["unauthenticated"] == PER_SOURCE
        during = site.alice()
        # The 10 held ones are closed too, at the handshake timeout.
        assert len(_closed_now(flood, within=10.0)) == len(flood)
        wait_until(lambda: site.tls()["handshake_timeout"] == PER_SOURCE, "the timeouts")
        assert site.admission()["penalties"]["grace-exceeded"] >= 1
        assert _refused_at_accept(site.tls_port) < 1.0
        assert _refused_at_accept(site.relay.port) < 1.0  # penalties are shared
        after = site.alice()
    finally:
        for s in flood:
            s.close()
    print(f"\nTLS handshake flood: {closed}/{FLOOD} refused at accept, {PER_SOURCE} held "
          f"until the 2 s handshake timeout; alice {during:.2f}s (before {base:.2f}s, "
          f"after {after:.2f}s)")
    assert during < 10


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n", b"GET / HTTP/1.1\r\n\r\n",
                                     bytes(range(256)) * 4])
def test_garbage_before_the_handshake_is_closed_and_penalised(site: Site, garbage: bytes
                                                               ) -> None:
    """Bytes that are not a ClientHello (an SSH banner, HTTP, noise) from 127.0.0.2:
    closed at once with a TLS alert at most, a ``protocol`` penalty; alice unaffected."""
    s = _dial(site.tls_port)
    assert s is not None
    with s:
        s.sendall(garbage)
        data, took = _recv_all(s, 10)
    assert took < 2.0 and len(data) < 64, (took, data)  # an alert, never a banner
    assert b"SSH-" not in data
    wait_until(lambda: site.tls()["handshake_failed"] == 1, "the relay to count it")
    assert site.admission()["penalties"]["protocol"] == 1
    site.alice()


def test_garbage_after_the_handshake_is_closed_by_the_ssh_server(site: Site) -> None:
    """A full TLS handshake (the right name, ALPN labrelay-ssh/1), then an SSH banner and
    noise where its first packet should be: the relay's SSH server (its banner sent)
    closes the connection at once; the source is penalised as on the SSH port."""
    ctx = ssl.create_default_context(cafile=str(site.ca.pem_path))
    ctx.set_alpn_protocols(["labrelay-ssh/1"])
    raw = _dial(site.tls_port)
    assert raw is not None
    with ctx.wrap_socket(raw, server_hostname=RELAY_NAME) as tls:
        assert tls.selected_alpn_protocol() == "labrelay-ssh/1"
        # A banner, then a "packet" 4 GiB long: a protocol error, not a slow client.
        tls.sendall(b"SSH-2.0-mallory\r\n" + b"\xff" * 256)
        data = b""
        tls.settimeout(10)
        start = time.monotonic()
        try:
            while chunk := tls.recv(4096):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        took = time.monotonic() - start
    assert data.startswith(b"SSH-2.0-"), data[:100]
    assert took < 5.0
    wait_until(lambda: site.admission()["penalties"]["protocol"] >= 1, "the protocol penalty")
    assert site.tls()["handshakes"] == 1
    site.alice()


def test_a_stalled_handshake_is_closed_at_the_timeout(site: Site) -> None:
    """Half a ClientHello, then silence: closed after ``tls_handshake_timeout`` (2 s),
    with no byte of SSH; ``grace-exceeded`` for the source; alice unaffected."""
    hello = _client_hello()
    s = _dial(site.tls_port)
    assert s is not None
    with s:
        s.sendall(hello[: len(hello) // 2])
        start = time.monotonic()
        site.alice()  # meanwhile
        data, _ = _recv_all(s, 15)
        took = time.monotonic() - start
    assert data == b"" or b"SSH-" not in data
    wait_until(lambda: site.tls()["handshake_timeout"] == 1, "the handshake timeout")
    assert site.admission()["penalties"]["grace-exceeded"] == 1
    assert site.tls()["handshakes"] >= 1  # alice's
    assert took < 15
    print(f"\nstalled handshake closed, seen {took:.1f}s after it stalled (alice's session "
          "ran meanwhile)")


@pytest.mark.parametrize("sni,alpn", [("other.example.org", ["labrelay-ssh/1"]),
                                      (RELAY_NAME, ["h2", "http/1.1"])],
                         ids=["unknown SNI name", "only foreign ALPN"])
def test_a_name_or_protocol_the_relay_does_not_serve_is_refused(
        site: Site, sni: str, alpn: list[str]) -> None:
    """A client that asks for another host name (SNI), or offers only protocols the relay
    does not speak (ALPN), fails its handshake: no SSH, a ``protocol`` penalty."""
    ctx = ssl.create_default_context(cafile=str(site.ca.pem_path))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(alpn)
    raw = _dial(site.tls_port)
    assert raw is not None
    with raw, pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.settimeout(5)
            assert b"SSH-" not in tls.recv(64)
    wait_until(lambda: site.tls()["handshake_failed"] == 1, "the refused handshake")
    assert site.tls()["handshakes"] == 0
    assert site.admission()["penalties"]["protocol"] == 1


def _assert_handshake_refused(site: Site, ctx: ssl.SSLContext) -> None:
    """A client with ``ctx`` fails its handshake at the relay's TLS port: the relay
    counts one failed handshake and none done."""
    raw = _dial(site.tls_port)
    assert raw is not None
    with raw, pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        with ctx.wrap_socket(raw, server_hostname=RELAY_NAME) as tls:
            tls.settimeout(5)
            tls.recv(64)
    wait_until(lambda: site.tls()["handshake_failed"] == 1, "the refused handshake")
    assert site.tls()["handshakes"] == 0


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_before_1_2_is_refused(site: Site) -> None:
    """A client that speaks at most TLS 1.1 fails its handshake at the relay (TLS 1.2+
    only): the relay counts a failed handshake, nothing of SSH is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    _assert_handshake_refused(site, ctx)


def test_tls_1_2_without_forward_secrecy_or_aead_is_refused(site: Site) -> None:
    """A TLS 1.2 client offering only CBC or static-RSA suites fails its handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-GCM-SHA256:AES256-SHA")
    _assert_handshake_refused(site, ctx)


def test_a_source_holding_its_ssh_share_is_refused_before_the_handshake(site: Site) -> None:
    """127.0.0.2 holds its 10 unauthenticated SSH connections through the TLS port
    (handshake done, version line sent), then opens 50 more TLS connections.  The SSH
    server would refuse each right after its handshake; now the TLS port asks the SSH
    gate at accept and closes them before a byte of TLS.  Before: 50 full handshakes
    (~1 ms of the relay's CPU each, 500 in 1.5 s from one process), no penalty, for as
    long as the source liked.  alice connects through the TLS port meanwhile."""
    ctx = ssl.create_default_context(cafile=str(site.ca.pem_path))
    ctx.set_alpn_protocols(["labrelay-ssh/1"])
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(PER_SOURCE):
            raw = _dial(site.tls_port)
            assert raw is not None
            held.append(ctx.wrap_socket(raw, server_hostname=RELAY_NAME))
            held[-1].sendall(b"SSH-2.0-mallory\r\n")
        wait_until(lambda: site.admission()["ssh"]["unauthenticated"] >= PER_SOURCE,
                   "the attacker's share of the SSH gate")
        before = site.tls()["handshakes"]
        completed = 0
        for _ in range(50):
            raw = _dial(site.tls_port)
            if raw is None:
                continue
            try:
                ctx.wrap_socket(raw, server_hostname=RELAY_NAME).close()
                completed += 1
            except (ssl.SSLError, OSError):
                raw.close()
        tls = site.tls()
        print(f"\n  at its SSH share, 50 more TLS connections: {completed} handshakes, "
              f"{tls['refused_at_accept']} refused at accept")
        assert completed == 0
        assert tls["handshakes"] == before
        assert tls["refused_at_accept"] >= 50
        site.alice()
    finally:
        for s in held:
            s.close()


def test_a_client_asking_to_renegotiate_is_refused(site: Site) -> None:
    """``openssl s_client -tls1_2`` finishes its handshake, reads the relay's SSH banner
    and asks to renegotiate (its ``R`` command): the relay answers ``no renegotiation``
    (OP_NO_RENEGOTIATION; a renegotiation would be a second, unbounded handshake on a
    connection the gate already let through).  alice is served meanwhile."""
    openssl = find_program("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    proc = subprocess.Popen(
        [openssl, "s_client", "-connect", f"{LOOPBACK}:{site.tls_port}", "-tls1_2",
         "-servername", RELAY_NAME, "-alpn", "labrelay-ssh/1", "-CAfile",
         str(site.ca.pem_path), "-bind", "127.0.0.2:0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    seen: list[bytes] = []
    try:
        for line in proc.stdout:  # up to the banner: the handshake is done
            seen.append(line)
            if line.startswith(b"SSH-2.0-"):
                break
        assert any(line.startswith(b"SSH-2.0-") for line in seen), b"".join(seen)
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (b"".join(seen) + rest).decode(errors="replace")
    assert "RENEGOTIATING" in out, out
    assert "no renegotiation" in out, out
    site.alice()
