"""The relay's TLS certificate: read from PEM files, read again when they change.

:class:`CertificateSource` is the server connection creator of the relay's TLS port.
At every new handshake it compares the files' identity (inode, size, mtime) with what
it loaded, and loads them again if either changed: a certificate renewed by certbot
(or any ACME client) is used from the next connection on with no reload signal, and
connections already open keep theirs.  :meth:`CertificateSource.reload` does the same
on demand (``labrelay reload``/SIGHUP can call it).  A pair that cannot be loaded
(half written, key and certificate not matching) is logged and the previous one kept.

The context: TLS 1.2 and 1.3 only, Twisted's modern cipher list (ECDHE with AES-GCM or
ChaCha20-Poly1305), no compression, no renegotiation; ALPN chooses among the relay's
protocols (a client that offers only others is refused, one that offers none gets the
first); SNI is checked against ``names`` (the certificate's DNS names when empty): a
client naming another host is refused, one naming none is let in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer


class CertificateError(Exception):
    """The certificate or key files cannot be used; ``str()`` says why."""


class WrongServerName(Exception):
    """The client asked (SNI, ALPN) for a name or protocol this relay does not serve."""


#: TLS 1.2's suites: forward secrecy and AEAD only (Twisted's default list still has
#: CBC and static-RSA suites for old clients).  TLS 1.3's suites are all AEAD.
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"


def modern_ciphers() -> Any:
    return ssl.AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _certificates(data: bytes, path: Path) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(f"{path}: no PEM certificate in it")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"{path}: not a PEM certificate: {e}") from None


def dns_names(c: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for (subjectAltName; the CN if it has none)."""
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n).lower() for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        return names
    except x509.ExtensionNotFound:
        cns = c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(cn.value).lower() for cn in cns]


def _name_matches(name: str, patterns: Sequence[str]) -> bool:
    name = name.lower().rstrip(".")
    for pattern in patterns:
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


@implementer(IOpenSSLServerConnectionCreator)
class CertificateSource:
    """The relay's TLS context, from ``cert`` and ``key``, kept fresh."""

    log = Logger()

    def __init__(self, cert: Path, key: Path, *, names: Sequence[str] = (),
                 alpn: Sequence[bytes] = ()) -> None:
        self.cert_path = cert
        self.key_path = key
        self.configured_names = [n.lower() for n in names]
        self.alpn = list(alpn)
        self.names: list[str] = []
        self.fingerprint = ""
        self.not_after = ""
        self.loads = 0
        self._stamps: tuple[Any, ...] | None = None
        self._missing: tuple[str, str] | None = None  # the stat failure logged last
        self._context: SSL.Context | None = None
        self._load()  # a relay that cannot load its certificate does not start

    # loading

    def _load(self) -> None:
        try:
            stamps = (_stamp(self.cert_path), _stamp(self.key_path))
            cert_pem = self.cert_path.read_bytes()
            key_pem = self.key_path.read_bytes()
        except OSError as e:
            raise CertificateError(f"cannot read {e.filename}: {e.strerror}") from None
        chain = _certificates(cert_pem, self.cert_path)
        try:
            key: Any = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise CertificateError(f"{self.key_path}: not a PEM private key "
                                   f"(or it has a passphrase): {e}") from None
        # cryptography's objects: pyOpenSSL takes them (and deprecates its own X509 and
        # PKey); Twisted's type hints still name the old ones.
        leaf: Any = chain[0]
        rest: Any = chain[1:]
        options = ssl.CertificateOptions(
            privateKey=key, certificate=leaf, extraCertChain=rest,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2, acceptableCiphers=modern_ciphers(),
        )
        try:
            context = options.getContext()
            context.check_privatekey()
        except SSL.Error as e:
            raise CertificateError(f"{self.key_path} is not the key of the certificate in "
                                   f"{self.cert_path}: {e}") from None
        context.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        context.set_tlsext_servername_callback(self._servername)
        if self.alpn:
            context.set_alpn_select_callback(self._select)
        self._context = context
        self._stamps = stamps
        self.names = self.configured_names or dns_names(chain[0])
        digest = chain[0].fingerprint(hashes.SHA256()).hex().upper()
        self.fingerprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
        self.not_after = chain[0].not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        self.loads += 1

    def reload(self) -> bool:
        """Load the files again if they changed; True if the certificate in use did.
        A pair that cannot be loaded is logged, and the current one stays."""
        try:
            stamps = (_stamp(self.cert_path), _stamp(self.key_path))
        except OSError as e:
            # Checked at every handshake, which anyone on the internet starts: logged
            # once until the file is back (or fails otherwise), not once per handshake.
            missing = (str(e.filename), str(e.strerror))
            if missing != self._missing:
                self._missing = missing
                self.log.error("TLS certificate: cannot stat {path}: {why}; keeping the "
                               "current one", event="tls_cert_error", path=e.filename,
                               why=e.strerror)
            return False
        self._missing = None
        if stamps == self._stamps:
            return False
        before = self.fingerprint
        try:
            self._load()
        except CertificateError as e:
            self.log.error("TLS certificate: {why}; keeping the current one",
                           event="tls_cert_error", why=str(e))
            self._stamps = stamps  # do not retry a broken pair at every handshake
            return False
        self.log.info("TLS certificate loaded from {path} (sha256 {fingerprint}, names "
                      "{names}, not after {not_after})", event="tls_cert_loaded",
                      path=str(self.cert_path), fingerprint=self.fingerprint,
                      names=",".join(self.names), not_after=self.not_after)
        return self.fingerprint != before

    # per connection

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.reload()
        assert self._context is not None
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def _servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if raw is None:
            return
        name = raw.decode("ascii", "replace")
        if not _name_matches(name, self.names):
            proto = connection.get_app_data()
            proto.failVerification(Failure(WrongServerName(
                f"the client asked for {name[:100]!r}, which this relay does not serve")))

    def _select(self, connection: SSL.Connection, offered: list[bytes]) -> bytes | Any:
        for ours in self.alpn:
            if ours in offered:
                return ours
        # OpenSSL would carry on without ALPN (and the relay would take it for SSH):
        # a client that asked for something else is refused instead.
        shown = ",".join(p.decode("ascii", "replace")[:40] for p in offered[:8])
        connection.get_app_data().failVerification(Failure(WrongServerName(
            f"the client offered only ALPN protocols this relay does not speak: {shown}")))
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def status(self) -> dict[str, Any]:
        return {"cert": str(self.cert_path), "sha256": self.fingerprint, "names": self.names,
                "not_after": self.not_after, "loads": self.loads}
