"""The client's TLS: the relay's certificate checked, and told apart when it is not right.

Twisted's ``optionsForClientTLS`` makes the context (TLS 1.2 and up, its modern cipher
list, SNI, ALPN, the trust root: the system's CA store or the CA file given).  Each
connection's verify callback is ours so that a refusal says *which* check failed:
the name (checked by **service_identity**, as Twisted does), the dates, the issuer, or
a pin.  With a pin (``sha256//`` of the key, or the certificate's SHA-256) the chain
and name are not consulted: the pin is the whole check, as with curl's
``--pinnedpubkey`` on a self-signed certificate.  Either way the SSH host key is still
checked afterwards (``ssh.hostkeys``): both must pass.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config.schema import TransportConfig
from relay.transport.tlsserver import modern_ciphers

# X509_V_ERR_* codes (openssl/x509_vfy.h) and what each means to an operator.
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_EXPIRED = 10
_NOT_YET_VALID = 9
_INVALID_PURPOSE = 26


class TLSVerifyError(Exception):
    """The relay's certificate was refused; ``str()`` says which check failed."""


def spki_pin(cert: crypto.X509) -> str:
    """``spki:BASE64``: the SHA-256 of the certificate's SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = cert.to_cryptography().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "spki:" + base64.b64encode(hashlib.sha256(der).digest()).decode()


def cert_pin(cert: crypto.X509) -> str:
    """``cert:hex``: the SHA-256 of the certificate (``openssl x509 -fingerprint -sha256``)."""
    return "cert:" + hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)).hexdigest()


def _show_pin(pin: str) -> str:
    kind, _, value = pin.partition(":")
    return f"sha256//{value}" if kind == "spki" else f"certificate SHA-256 {value}"


def _subject(cert: crypto.X509) -> str:
    parts = [f"{k.decode()}={v.decode('utf-8', 'replace')}"
             for k, v in cert.get_subject().get_components()]
    return ", ".join(parts) or "(empty subject)"


def _issuer(cert: crypto.X509) -> str:
    parts = [f"{k.decode()}={v.decode('utf-8', 'replace')}"
             for k, v in cert.get_issuer().get_components()]
    return ", ".join(parts) or "(empty issuer)"


def _date(raw: bytes | None) -> str:
    if not raw:
        return "?"
    text = raw.decode()
    return f"{text[0:4]}-{text[4:6]}-{text[6:8]} {text[8:10]}:{text[10:12]} UTC"


def chain_error(err: int, cert: crypto.X509, trusted: str) -> str:
    """The refusal message of OpenSSL's verify error ``err`` for ``cert``."""
    if err == _EXPIRED:
        return (f"the relay's certificate has expired (not after {_date(cert.get_notAfter())}; "
                f"{_subject(cert)}): renew it on the relay")
    if err == _NOT_YET_VALID:
        return (f"the relay's certificate is not valid yet (not before "
                f"{_date(cert.get_notBefore())}): check the clocks")
    if err in _UNTRUSTED:
        return (f"the relay's certificate is not signed by a trusted CA (issuer "
                f"{_issuer(cert)}; trusted: {trusted}): set tls_ca_file to the CA that "
                "signed it (-o TLSCAFile=), or pin it with tls_pin (-o TLSPin=)")
    if err == _INVALID_PURPOSE:
        return (f"the relay's certificate (or its issuer) is not for TLS servers: its "
                f"extended key usage lacks serverAuth ({_subject(cert)}): reissue it for a "
                "server")
    return f"the relay's certificate failed verification (OpenSSL error {err}, {_subject(cert)})"


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingCreator:
    """A client connection creator for one relay name: Twisted's context, our verify
    callback (a refusal fails the connection with :class:`TLSVerifyError`)."""

    def __init__(self, server_name: str, *, ca_file: Path | None = None,
                 pin: str | None = None, alpn: bytes | None = None) -> None:
        self.server_name = server_name
        self.pin = pin
        self.trusted = f"the CA file {ca_file}" if ca_file is not None else "the system's CAs"
        trust_root: Any = None
        if ca_file is not None:
            trust_root = ssl.trustRootFromCertificates(_read_certificates(ca_file))
        self._inner = ssl.optionsForClientTLS(
            server_name, trustRoot=trust_root,
            acceptableProtocols=[alpn] if alpn is not None else None,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
                                     "acceptableCiphers": modern_ciphers()},
        )
        if isIPAddress(server_name) or isIPv6Address(server_name):
            self._id: Any = IPAddress_ID(server_name)
        else:
            self._id = DNS_ID(server_name)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._callback(tlsProtocol))
        return connection

    def _callback(self, proto: Any) -> Any:
        failed: list[bool] = []

        def fail(message: str) -> bool:
            if not failed:
                failed.append(True)
                proto.failVerification(Failure(TLSVerifyError(message)))
            return False

        def verify(conn: SSL.Connection, cert: crypto.X509, err: int, depth: int,
                   ok: int) -> bool:
            try:
                if self.pin is not None:
                    if depth != 0:
                        return True  # the pin replaces the chain check
                    have = spki_pin(cert) if self.pin.startswith("spki:") else cert_pin(cert)
                    if have != self.pin:
                        return fail(f"the relay's certificate does not match the pin "
                                    f"(pinned {_show_pin(self.pin)}, the relay's is "
                                    f"{_show_pin(have)}; {_subject(cert)})")
                    return True
                if not ok:
                    return fail(chain_error(err, cert, self.trusted))
                if depth != 0:
                    return True
                try:
                    patterns = extract_patterns(cert)
                except CertificateError as e:
                    return fail(f"the relay's certificate holds a name that is not a host "
                                f"name, a wildcard of one whole label under two or more, "
                                f"or an IP address: {e}")
                if not patterns:
                    return fail(f"the relay's certificate names no host in its "
                                f"subjectAltName ({_subject(cert)}): a name only in its "
                                "subject is not accepted (as browsers and curl do); "
                                "reissue it with the name as a DNS subjectAltName")
                try:
                    verify_service_identity(patterns, [self._id], [])
                except VerificationError:
                    names = ", ".join(_pattern(p) for p in patterns)
                    return fail(f"the relay's certificate is for another name: it names "
                                f"{names}, not {self.server_name!r} (set tls_server_name, "
                                "-o TLSServerName=, if the relay is reached by another "
                                "name)")
                return True
            except Exception as e:  # an exception in an OpenSSL callback would be lost
                return fail(f"cannot check the relay's certificate: {e!r}")

        return verify


def _pattern(p: Any) -> str:
    """A name the certificate holds as its operator wrote it (``relay.example.org``,
    ``*.example.org``, ``203.0.113.10``), not service_identity's repr of it
    (``DNSPattern(pattern=b'relay.example.org')``)."""
    if isinstance(p, DNSPattern):
        return p.pattern.decode("ascii", "replace")
    if isinstance(p, IPAddressPattern):
        return str(p.pattern)
    return str(p)


def _read_certificates(path: Path) -> list[ssl.Certificate]:
    """Every PEM certificate in ``path`` (a CA bundle may hold several)."""
    data = path.read_bytes()
    marker = b"-----END CERTIFICATE-----"
    pems = [chunk + marker for chunk in data.split(marker) if b"-----BEGIN" in chunk]
    if not pems:
        raise ValueError(f"{path}: no PEM certificate in it")
    return [ssl.Certificate.loadPEM(pem) for pem in pems]


def client_creator(transport: TransportConfig, host: str, alpn: str) -> VerifyingCreator:
    """The creator for a link's TLS to ``host`` (``tls_server_name`` if set)."""
    return VerifyingCreator(transport.server_name or host, ca_file=transport.ca_file,
                            pin=transport.pin, alpn=alpn.encode())
