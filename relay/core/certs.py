"""OpenSSH user certificates signed by a trusted CA (sans-IO, time and address given in).

A ``cert-authority`` line in a grant file trusts a CA key for one principal (its
comment is the user's or agent's name, as on every line); ``principals="a,b"`` lists
the certificate principals it accepts (default: that name, as sshd's default
``AuthorizedPrincipalsFile none`` matches the login name).  A certificate is accepted
when (in this order, the first failure being the reason logged):

1. it parses as an OpenSSH *user* certificate (pyca/cryptography's SSH certificate
   support) and its CA is trusted by some line;
2. the CA's signature over it verifies;
3. ``valid_after <= now < valid_before``;
4. its critical options are understood: ``force-command`` is refused (the relay runs no
   commands, so it could not honour it), ``source-address`` must allow the peer,
   anything else is refused (sshd refuses unknown critical options too);
   and it has the ``permit-port-forwarding`` extension: without it (``ssh-keygen -s``
   with ``-O no-port-forwarding`` or ``-O clear``) sshd lets it forward
   nothing, and forwarding is all the relay does, so it is refused rather than granted
   as if the restriction were not there.  The other extensions only permit what the
   relay never offers (a pty, agent or X11 forwarding, ``~/.ssh/rc``): their absence
   takes nothing away here, and unknown ones are ignored, as sshd ignores them;
5. one of its principals is accepted by a line of that CA **for the login name** (the
   line's name is the login name: as in sshd, where ``cert-authority`` lines are per
   account and a line in spare's ``authorized_keys`` never lets anyone log in as
   lab_pc), and that line's own ``from=``/``expiry-time`` allow it;
6. it is not revoked: a KRL may list its serial or key id (under its CA or any CA),
   the certified key, or the CA key.

Every line is bound to the login name it is for: a certificate logs in only as the name
of a line that accepts it, so the login name is what a later look-up (each session,
each reload) checks it as and it can only ever yield that line's principal, or nothing.
Until round 16 a login name no accepting line was for fell back to another accepting
line: a certificate for ``lab_pc,spare`` whose lab_pc line was deleted still logged in,
and stayed connected, as ``lab_pc``, granted as spare.  A relay-wide
``trusted_user_ca`` (sshd's ``TrustedUserCAKeys``) is one line per configured user that
also requires the login name to be one of the certificate's principals (step 5); the
other checks are the same.

For an *agent*, the certificate's other principals of the form ``name:port`` are the
services it may register (``permitlisten`` derived from principals), bounded by the
line's own ``permitlisten`` grants if it has any.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    SSHCertificateType,
    load_ssh_public_identity,
)

from relay.config.schema import ServiceGrant
from relay.core.grants import AGENT, Principal
from relay.core.keylife import KeyLimits, source_address_allows
from relay.core.krl import Krl

CERT_SUFFIX = b"-cert-v01@openssh.com"
NO_LIMITS = KeyLimits()
FOREVER = 0xFFFFFFFFFFFFFFFF
PERMIT_PORT_FORWARDING = b"permit-port-forwarding"


@dataclass(frozen=True)
class Authority:
    """One ``cert-authority`` line: whom certificates by ``ca_blob`` may log in as."""

    ca_blob: bytes
    principal: Principal
    accepted: frozenset[str]  # certificate principals accepted
    limits: KeyLimits = NO_LIMITS
    where: str = ""  # FILE:LINE
    login_bound: bool = False  # trusted_user_ca: the login name must be a principal too

    def accepts(self, principals: Sequence[str], login: str) -> bool:
        """Whether this line lets a certificate for ``principals`` log in as ``login``:
        only as the line's own name (sshd's per-account ``authorized_keys``), never as
        another line's, even one the same certificate would be accepted for."""
        if self.principal.name != login:
            return False
        if self.login_bound:
            return login in principals
        return not self.accepted.isdisjoint(principals)

    def accepts_any(self, principals: Sequence[str]) -> bool:
        """Whether this line would accept ``principals`` as its own name (to tell a
        refused login which name the certificate is for)."""
        return self.accepts(principals, self.principal.name)


@dataclass(frozen=True)
class CertVerdict:
    """What checking a certificate decided: a principal, or why not."""

    principal: Principal | None
    reason: str = ""
    expires: float | None = None  # when it stops being valid (Unix time)
    ca_blob: bytes = b""


def is_certificate(blob: bytes) -> bool:
    """Whether an SSH key blob is a certificate (its type name says so)."""
    try:
        n = int.from_bytes(blob[:4], "big")
    except ValueError:
        return False
    return 0 < n <= 64 and blob[4:4 + n].endswith(CERT_SUFFIX)


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_fingerprint(blob: bytes | None) -> str:
    """The fingerprint of the key that logged in as ``ssh-keygen -lf`` prints it (``-``
    for none): for a certificate, its key's (``ssh-keygen -lf id-cert.pub`` prints the
    same as for ``id.pub``, and that is what an admin holds of a lost laptop and what a
    KRL's ``sha256:`` line names), not a hash of the certificate no tool shows."""
    if blob is None:
        return "-"
    if is_certificate(blob):
        try:
            return fingerprint(key_blob(parse_certificate(blob).public_key()))
        except Exception:  # malformed: the bytes as they came
            pass
    return fingerprint(blob)


def certified_key(blob: bytes) -> bytes | None:
    """The public key a certificate blob certifies, as a plain key blob (None for a
    plain key or a certificate that does not parse): what stays the same when a
    certificate is renewed (``ssh-keygen -s`` again over the same ``KEY.pub``)."""
    if not is_certificate(blob):
        return None
    try:
        return key_blob(parse_certificate(blob).public_key())
    except Exception:  # malformed: it certifies nothing
        return None


def key_blob(key: object) -> bytes:
    """The SSH wire blob of a cryptography public key."""
    line = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def describe(blob: bytes) -> tuple[str, str]:
    """A certificate's CA fingerprint and key id, for log fields (both empty for a plain
    key or a certificate that does not parse); the key id is the peer's text, escaped by
    the log observers (relay/ops/logfmt.py) like any field."""
    if not is_certificate(blob):
        return "", ""
    try:
        cert = parse_certificate(blob)
        return fingerprint(key_blob(cert.signature_key())), cert.key_id.decode("utf-8",
                                                                               "replace")
    except Exception:  # malformed: nothing to name
        return "", ""


def parse_certificate(blob: bytes) -> SSHCertificate:
    """The certificate in an SSH wire blob; ValueError if it is not one."""
    n = int.from_bytes(blob[:4], "big")
    kind = blob[4:4 + n]
    cert = load_ssh_public_identity(kind + b" " + base64.b64encode(blob))
    if not isinstance(cert, SSHCertificate):
        raise ValueError("not a certificate")
    return cert


def check_certificate(
    blob: bytes,
    authorities: Mapping[bytes, Sequence[Authority]],
    *,
    now: float,
    address: str,
    login: str,
    krl: Krl | None = None,
) -> CertVerdict:
    """Check the certificate ``blob`` presented by a peer at ``address`` logging in as
    ``login`` at time ``now``; see the module docstring for the order of the checks."""
    try:
        cert = parse_certificate(blob)
        ca = key_blob(cert.signature_key())
    except Exception as e:  # malformed: any parse error is a refusal
        return CertVerdict(None, f"malformed certificate ({type(e).__name__})")
    if cert.type is not SSHCertificateType.USER:
        return CertVerdict(None, "a host certificate cannot log in")
    lines = authorities.get(ca)
    if not lines:
        return CertVerdict(None, f"certificate signed by an untrusted CA ({fingerprint(ca)})")
    try:
        cert.verify_cert_signature()
    except (InvalidSignature, ValueError, TypeError):
        return CertVerdict(None, "the CA's signature on the certificate does not verify")
    key_id = cert.key_id
    label = (f"certificate {key_id.decode('utf-8', 'replace')!r} serial {cert.serial} "
             f"(CA {fingerprint(ca)})")
    if now < cert.valid_after:
        return CertVerdict(None, f"{label} is not yet valid (valid from "
                           f"{_utc(cert.valid_after)}; {_skew(now, cert.valid_after)})")
    if cert.valid_before != FOREVER and now >= cert.valid_before:
        return CertVerdict(None, f"{label} expired (valid until {_utc(cert.valid_before)}; "
                           f"{_skew(now, cert.valid_before)})")
    for option, value in cert.critical_options.items():
        name = option.decode("utf-8", "replace")
        if option == b"force-command":
            return CertVerdict(None, f"{label} has force-command, which the relay cannot honour")
        if option == b"source-address":
            if not source_address_allows(value.decode("utf-8", "replace"), address):
                return CertVerdict(None, f"{label}: source-address does not allow {address}")
            continue
        return CertVerdict(None, f"{label} has unknown critical option {name!r}")
    if PERMIT_PORT_FORWARDING not in cert.extensions:
        return CertVerdict(None, f"{label} lacks the permit-port-forwarding extension (signed "
                           "with -O no-port-forwarding or -O clear): it may "
                           "forward nothing, and forwarding is all the relay does")
    principals = [p.decode("utf-8", "replace") for p in cert.valid_principals]
    if not principals:
        return CertVerdict(None, f"{label} lists no principals")
    matching = [a for a in lines if a.accepts(principals, login)]
    if not matching:
        return CertVerdict(None, _no_line(label, principals, lines, login))
    chosen = matching[0]
    why = chosen.limits.refusal(now, address)
    if why is not None:
        return CertVerdict(None, f"{label}: {why} (cert-authority line {chosen.where})")
    if krl is not None:
        why = krl.revoked_cert(ca, cert.serial, key_id, key_blob(cert.public_key()))
        if why is not None:
            return CertVerdict(None, f"{label} revoked: {why}")
    expires = None if cert.valid_before == FOREVER else float(cert.valid_before)
    if chosen.limits.expires is not None:
        expires = min(expires or chosen.limits.expires, chosen.limits.expires)
    principal = chosen.principal
    if principal.kind == AGENT:
        principal = replace(principal, services=_agent_services(principals, principal))
    return CertVerdict(principal, "", expires, ca)


def _no_line(label: str, principals: Sequence[str], lines: Sequence[Authority],
             login: str) -> str:
    """Why no line of the CA lets the certificate log in as ``login``; when some line
    would accept it under its own name, which names (the fix: log in as one), said
    first, since a log field keeps only its first 200 characters."""
    names = sorted({a.principal.name for a in lines if a.accepts_any(principals)})
    bound = any(a.login_bound for a in lines)
    hint = (f" (trusted_user_ca: the login name {login!r} must be one of them and name a "
            "configured user)") if bound else ""
    if names:
        return (f"{label} may log in as {', '.join(names)} only, not as {login!r}"
                + (hint or " (no line of its CA accepts it for that login name)"))
    return (f"{label} is for principals {','.join(principals)}, which no line of its CA "
            "accepts" + hint)


def _utc(when: float) -> str:
    """A certificate time as ``ssh-keygen -L`` would show it, in UTC (the raw Unix time
    told an admin nothing)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(min(when, 253402300799)))


def _skew(now: float, when: float) -> str:
    """The relay's clock beside a certificate's bound: a certificate refused as not yet
    valid moments after ``ssh-keygen -s`` signed it, or expired early, usually means the
    relay's clock and the CA's disagree, and this says by how much."""
    delta = now - when
    word = "later" if delta >= 0 else "earlier"
    return (f"the relay's clock says {_utc(now)}, {_span(abs(delta))} {word}; "
            "if that is wrong, check the relay's and the CA's clocks")


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _agent_services(principals: Sequence[str], line: Principal) -> tuple[ServiceGrant, ...]:
    """An agent certificate's services: its principals of the form ``name:port`` (or
    ``name:*``), within the line's own grants if it has any."""
    services = []
    for text in principals:
        name, sep, port = text.rpartition(":")
        if not sep or not name or name == "*":
            continue
        grant = ServiceGrant(name.lower(), None if port == "*" else _port(port))
        if grant.port == -1:
            continue
        if line.services and not any(g.name == grant.name and g.port in (None, grant.port)
                                     for g in line.services):
            continue
        services.append(grant)
    return tuple(dict.fromkeys(services))


def _port(text: str) -> int:
    return int(text) if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535 else -1
