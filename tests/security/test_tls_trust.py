"""The user's TLS trust (round 19): what ``labrelay connect -o Transport=tls`` (the
agent's TLS link is the same code, relay.transport.tlsclient) accepts as the relay.

The "relay" here is ``openssl s_server`` presenting each certificate (made with
``cryptography``, signed by the CA the user trusts unless said otherwise); the client
is the real ``labrelay connect``.  Refused: an IP address SAN for a DNS name and a DNS
SAN for an IP address, an IP address written as a DNS name, a wildcard too wide
(``*.test``), one label too deep or at the apex, a partial wildcard, a certificate
naming its host only in the subject CN, one not for TLS servers (clientAuth only), and
a CA's escape sequences; each in one line saying which check failed, escaped
(relay.core.peertext).  Accepted at TLS (the SSH host key is checked next): the right
IP SAN, a wildcard one label deep, a SAN in capitals.  A proxy that terminates TLS with
its own certificate is refused, and one whose CA the user does trust gets no further
than the SSH host key check.  test_tls.py has the wrong name, the expired certificate,
the untrusted CA and a wrong pin.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import LOOPBACK, KeyPair, Sshd, close_woken, free_port, known_hosts_line, make_key
from tlscerts import CA

pytestmark = [pytest.mark.integration, pytest.mark.security]

EVIL = "\x1b]0;pwned\x07\x1b[2J\u202erelay"


def _leaf(ca: CA, directory: Path, stem: str, cn: str, sans: list[x509.GeneralName] | None,
          eku: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.SERVER_AUTH,
          ) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca.name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=3)))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    c, k = directory / f"{stem}.crt", directory / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def _ip(text: str) -> x509.GeneralName:
    return x509.IPAddress(ipaddress.ip_address(text))


DNS = x509.DNSName

# (case, certificate (cn, sans, eku), the name the client checks, what the refusal says)
REFUSED = [
    ("DNS SAN, IP name", ("relay.test", [DNS("relay.test")], None), "127.0.0.1",
     "it names relay.test, not '127.0.0.1'"),
    ("IP SAN, DNS name", ("127.0.0.1", [_ip("127.0.0.1")], None), "relay.test",
     "it names 127.0.0.1, not 'relay.test'"),
    ("IP written as a DNS SAN", ("x", [DNS("127.0.0.1")], None), "127.0.0.1",
     "holds a name that is not a host name"),
    ("wildcard too wide", ("x", [DNS("*.test")], None), "relay.test",
     "holds a name that is not a host name"),
    ("wildcard, a label too deep", ("x", [DNS("*.example.org")], None), "a.relay.example.org",
     "it names *.example.org, not 'a.relay.example.org'"),
    ("wildcard at the apex", ("x", [DNS("*.example.org")], None), "example.org",
     "it names *.example.org, not 'example.org'"),
    ("partial wildcard", ("x", [DNS("r*.example.org")], None), "relay.example.org",
     "it names r*.example.org, not 'relay.example.org'"),
    ("the name in the CN only", ("relay.test", None, None), "relay.test",
     "names no host in its subjectAltName"),
    ("clientAuth only", ("relay.test", [DNS("relay.test")], ExtendedKeyUsageOID.CLIENT_AUTH),
     "relay.test", "is not for TLS servers"),
]
ACCEPTED = [
    ("IP SAN, IP name", ("127.0.0.1", [_ip("127.0.0.1")], None), "127.0.0.1"),
    ("wildcard one label deep", ("x", [DNS("*.example.org")], None), "relay.example.org"),
    ("SAN in capitals", ("x", [DNS("RELAY.TEST")], None), "relay.test"),
]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("trust-ca"))


@pytest.fixture(scope="module")
def user_key(openssh: None, tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_key(tmp_path_factory.mktemp("trust-user") / "alice", comment="alice")


@pytest.fixture
def s_server() -> Iterator[Callable[[Path, Path], int]]:
    """``openssl s_server`` presenting a certificate (ALPN labrelay-ssh/1): its port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cert: Path, key: Path) -> int:
        port = free_port()
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-cert", str(cert),
             "-key", str(key), "-alpn", "labrelay-ssh/1", "-naccept", "1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        assert proc.stdout is not None
        for line in proc.stdout:  # "ACCEPT" once it listens
            if b"ACCEPT" in line:
                return port
        raise AssertionError("openssl s_server did not start")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _connect(user_key: KeyPair, tmp_path: Path, tls_port: int, name: str, ca_file: Path,
             *extra: str, ssh_port: int = 22) -> subprocess.CompletedProcess[str]:
    known_hosts = tmp_path / "known_hosts"
    if not known_hosts.exists():
        known_hosts.write_text("")
    argv = [sys.executable, "-m", "relay", "connect", "-i", str(user_key.path),
            "-p", str(ssh_port), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "Transport=tls", "-o", f"TLSPort={tls_port}", "-o", f"TLSServerName={name}",
            "-o", f"TLSCAFile={ca_file}", "-o", "ConnectTimeout=3", *extra,
            f"alice@{LOOPBACK}", "gpu-cluster"]
    return subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **child_env()}, cwd=REPO_ROOT, text=True)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "\x1b" not in err and "\u202e" not in err and len(err) < 2100, err
    return lines[0]


@pytest.mark.parametrize("case,cert,name,why", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_certificate_the_user_should_not_trust_is_refused_saying_why(
        case: str, cert: tuple[str, list[x509.GeneralName] | None, x509.ObjectIdentifier | None],
        name: str, why: str, ca: CA, user_key: KeyPair, s_server: Callable[[Path, Path], int],
        tmp_path: Path) -> None:
    cn, sans, eku = cert
    c, k = _leaf(ca, tmp_path, "leaf", cn, sans,
                 eku if eku is not None else ExtendedKeyUsageOID.SERVER_AUTH)
    out = _connect(user_key, tmp_path, s_server(c, k), name, ca.pem_path)
    line = _one_line(out.stderr)
    print(f"\n{case}: {line[:300]}")
    assert out.returncode == 1 and why in line, line


@pytest.mark.parametrize("case,cert,name", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_a_certificate_for_the_name_passes_tls(
        case: str, cert: tuple[str, list[x509.GeneralName], None], name: str, ca: CA,
        user_key: KeyPair, s_server: Callable[[Path, Path], int], tmp_path: Path) -> None:
    """s_server speaks no SSH: the attempt ends waiting for a version line, past TLS."""
    cn, sans, _ = cert
    c, k = _leaf(ca, tmp_path, "leaf", cn, sans)
    out = _connect(user_key, tmp_path, s_server(c, k), name, ca.pem_path)
    line = _one_line(out.stderr)
    assert "certificate" not in line and "no SSH version after it" in line, line


def test_a_ca_that_speaks_in_escape_sequences_is_shown_escaped(
        ca: CA, user_key: KeyPair, s_server: Callable[[Path, Path], int],
        tmp_path: Path) -> None:
    rogue = CA(tmp_path / "rogue", EVIL)
    c, k = _leaf(rogue, tmp_path, "leaf", EVIL, [DNS("relay.test")])
    out = _connect(user_key, tmp_path, s_server(c, k), "relay.test", ca.pem_path)
    line = _one_line(out.stderr)
    assert "not signed by a trusted CA" in line and r"\x1b]0;pwned\x07" in line, line


class _InterceptingProxy:
    """An HTTP proxy that answers CONNECT itself and terminates the TLS inside with a
    certificate of its own for the relay's name (a TLS-inspecting middlebox); with
    ``upstream``, what it decrypts goes on in clear to that port (here: an sshd that is
    not the relay)."""

    def __init__(self, cert: Path, key: Path, upstream: int | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["labrelay-ssh/1"])
        self.upstream = upstream
        self.port = free_port()
        self.listener = socket.create_server((LOOPBACK, self.port))
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                tls = self.ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                return  # the client refused our certificate
            self.handshakes += 1
            if self.upstream is None:
                return
            with tls, socket.create_connection((LOOPBACK, self.upstream)) as up:
                _pipe(tls, up)

    def close(self) -> None:
        close_woken(self.listener)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    def copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    t = threading.Thread(target=copy, args=(b, a), daemon=True)
    t.start()
    copy(a, b)
    t.join(30)


def test_a_proxy_that_terminates_tls_with_its_own_certificate_is_refused(
        ca: CA, user_key: KeyPair, tmp_path: Path,
        sshd_factory: Callable[[str], Sshd]) -> None:
    """Its CA not trusted: refused at TLS, nothing of SSH spoken.  Its CA trusted (a
    campus that installs its inspection CA in the user's store, given here as the CA
    file): TLS passes, and the SSH host key check refuses what it forwards to."""
    inspection = CA(tmp_path / "inspection", "campus inspection CA")
    c, k = _leaf(inspection, tmp_path, "minted", "relay.test", [DNS("relay.test")])
    proxy = _InterceptingProxy(c, k)
    try:
        out = _connect(user_key, tmp_path, 443, "relay.test", ca.pem_path,
                       "-o", f"Proxy=http://{LOOPBACK}:{proxy.port}")
        line = _one_line(out.stderr)
        print(f"\nintercepting proxy, its CA untrusted: {line[:300]}")
        assert out.returncode == 1 and "not signed by a trusted CA" in line, line
        assert "campus inspection CA" in line and proxy.handshakes == 0
    finally:
        proxy.close()
    impostor = sshd_factory("impostor")
    relay_key = make_key(tmp_path / "relay_host", comment="relay")
    (tmp_path / "known_hosts").write_text(
        known_hosts_line(relay_key.public_blob(), impostor.port) + "\n")
    proxy = _InterceptingProxy(c, k, upstream=impostor.port)
    try:
        out = _connect(user_key, tmp_path, 443, "relay.test", inspection.pem_path,
                       "-o", f"Proxy=http://{LOOPBACK}:{proxy.port}", ssh_port=impostor.port)
        line = _one_line(out.stderr)
        print(f"intercepting proxy, its CA trusted: {line[:300]}")
        assert out.returncode == 1 and "host key" in line.lower(), line
        assert proxy.handshakes == 1
    finally:
        proxy.close()
