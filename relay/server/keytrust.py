"""Keys that come and go: ``expiry-time``/``from`` limits, trusted CAs and the KRL.

:class:`KeyTrust` is the part of :class:`relay.server.grants.Grants` that depends on
time and on the peer: it holds the limits of plain keys and the ``cert-authority``
lines of the grants in force (set on every build), the revoked keys (``revoked_keys``:
an OpenSSH KRL from ``ssh-keygen -k``, or a file of public keys, as sshd's
``RevokedKeys`` takes), and the certificates that logged in (with the login name and
address they were checked with, so a later look-up re-runs the same checks against
the grants, the KRL and the clock of that moment).  The decisions are
:mod:`relay.core.keylife`, :mod:`relay.core.certs` and :mod:`relay.core.krl`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from twisted.logger import Logger

from relay.config.errors import ConfigError
from relay.config.grammar import public_key
from relay.core.certs import Authority, CertVerdict, check_certificate
from relay.core.grants import Principal
from relay.core.keylife import KeyLimits
from relay.core.krl import MAGIC, Krl, KrlError, parse_krl

_log = Logger()

CERT_CACHE = 4096
"""Certificates remembered after login, beyond those in use: past it the oldest not in
use is forgotten (a later look-up of a forgotten one grants nothing: fail closed).  One
in use (a connection, a session, a held session) is never forgotten, or a lab with
short-lived certificates (one per login) would, after this many logins, cut off an
agent whose certificate logged in weeks ago; they are bounded by the connections."""


EMPTIED_READS = 3
"""Polls in a row that must read an emptied ``revoked_keys`` before it is taken (as for
a grant file that reads emptied, relay.server.grants): ``ssh-keygen -k -u`` rewrites the
KRL in place, truncate then write, and an empty read taken at once would revoke nothing
until the next poll."""


def read_revoked(path: Path) -> Krl:
    """A KRL file, or a text file of public keys (one per line, ``#`` comments)."""
    data = path.read_bytes()
    if data.startswith(MAGIC):
        return parse_krl(data)
    krl = Krl()
    for number, raw in enumerate(data.decode("utf-8").splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            try:
                krl.keys.add(public_key(line)[0])
            except Exception as e:
                raise KrlError(f"line {number}: not a public key ({e})") from None
    return krl


def _revokes(krl: Krl | None) -> bool:
    """Whether ``krl`` revokes anything."""
    return krl is not None and bool(krl.keys or krl.sha256 or krl.sha1 or krl.certs)


class KeyTrust:
    """See the module docstring.  ``wall()`` is the wall clock in seconds."""

    def __init__(self, revoked: Path | None, wall: Callable[[], float]) -> None:
        self._path = revoked
        self._wall = wall
        self._limits: dict[bytes, KeyLimits] = {}
        self._authorities: dict[bytes, list[Authority]] = {}
        self._krl: Krl | None = None
        self._krlSignature: tuple[int, ...] | None = None
        self._emptiedReads = 0  # polls in a row that read the KRL emptied
        self._certs: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        # The key blobs in use (the relay's connections, sessions and held sessions):
        # certificates among them are never forgotten.  Set by the relay.
        self.inUse: Callable[[], Collection[bytes]] = frozenset
        if revoked is not None:
            self._loadKrl(strict=True)

    # --- state ------------------------------------------------------------

    def setGrants(self, limits: Mapping[bytes, KeyLimits],
                  authorities: Mapping[bytes, Sequence[Authority]]) -> None:
        self._limits = dict(limits)
        self._authorities = {ca: list(lines) for ca, lines in authorities.items()}

    def _loadKrl(self, strict: bool) -> None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
            self._krlSignature = (st.st_ino, st.st_size, st.st_mtime_ns)
            self._krl = read_revoked(self._path)
        except (OSError, KrlError, UnicodeDecodeError) as e:
            if strict:
                raise ConfigError(str(self._path), "relay.revoked_keys",
                                  f"cannot read the revoked keys: {e}",
                                  "make it with ssh-keygen -k -f FILE, or list public keys"
                                  ) from None
            # Fail closed: a KRL that cannot be read revokes every key it could name,
            # and we cannot tell which; keep the last one read instead of none.
            _log.error("revoked_keys {file} unreadable, keeping the previous list: {why}",
                       event="krl_invalid", file=str(self._path), why=str(e))
            return
        _log.info("revoked_keys {file}: {keys} keys, {cas} CA sections", event="krl_loaded",
                  file=str(self._path), keys=len(self._krl.keys) + len(self._krl.sha256)
                  + len(self._krl.sha1), cas=len(self._krl.certs))

    def setPath(self, revoked: Path | None) -> None:
        """A reload named another ``revoked_keys`` file (or none): read it now (a bad one
        keeps the list in force, as on any reload); the certificates seen stay known."""
        if revoked == self._path:
            return
        self._path, self._krlSignature = revoked, None
        if revoked is None:
            self._krl = None
        else:
            self._loadKrl(strict=False)

    def pollKrl(self) -> bool:
        """Re-read the KRL if its file changed; whether it did."""
        if self._path is None:
            return False
        try:
            st = os.stat(self._path)
            signature: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        if signature == self._krlSignature:
            return False
        if signature is not None and signature[1] == 0 and _revokes(self._krl):
            # Emptied: a writer caught between its truncate and its write, or an admin
            # un-revoking everything.  Keep the list in force (and the old signature, so
            # the next poll looks again) until it has read empty EMPTIED_READS times.
            self._emptiedReads += 1
            if self._emptiedReads < EMPTIED_READS:
                return False
            _log.warn("revoked_keys {file} emptied: no key or certificate is revoked by it "
                      "any more", event="krl_emptied", file=str(self._path))
        self._emptiedReads = 0
        self._loadKrl(strict=False)
        self._krlSignature = signature
        return True

    @property
    def watched(self) -> bool:
        return self._path is not None

    def now(self) -> float:
        """The wall clock expiry times are compared with."""
        return self._wall()

    # --- decisions --------------------------------------------------------

    def authenticate(self, blob: bytes, principal: Principal | None, login: str,
                     address: str) -> CertVerdict:
        """A plain key (``principal`` from the grants, None if not granted)."""
        if principal is None:
            return CertVerdict(None, "key not granted")
        now = self._wall()
        limits = self._limits.get(blob)
        why = limits.refusal(now, address) if limits is not None else None
        if why is None and self._krl is not None:
            why = self._krl.revoked_key(blob)
        if why is not None:
            return CertVerdict(None, why)
        return CertVerdict(principal, "", limits.expires if limits is not None else None)

    def usable(self, blob: bytes) -> bool:
        """Whether a plain key that logged in may still be used (not expired, not
        revoked); ``from=`` was decided at login, as sshd does."""
        return self.unusable(blob) is None

    def unusable(self, blob: bytes) -> str | None:
        """Why a plain key that logged in may no longer be used (expired, or listed in
        the revoked keys), or None: the reason its sessions end with, so the log says
        which (an admin who revoked a key wants to read that it was the KRL)."""
        limits = self._limits.get(blob)
        if limits is not None and limits.expires is not None:
            # expiry only: from= was decided at login, as sshd does
            why = KeyLimits(limits.expires).refusal(self._wall(), "")
            if why is not None:
                return why
        return None if self._krl is None else self._krl.revoked_key(blob)

    def certificate(self, blob: bytes, login: str, address: str) -> CertVerdict:
        """Check a certificate presented at login (not remembered: :meth:`remember`,
        once the login proved its key)."""
        return check_certificate(blob, self._authorities, now=self._wall(),
                                 address=address, login=login, krl=self._krl)

    def remember(self, blob: bytes, login: str, address: str) -> None:
        """A certificate logged in as ``login`` from ``address``, its key proved: later
        look-ups check it again with these.  Only a signed login is remembered: an offer
        without a signature (anyone may hold a public ``-cert.pub``) must not replace
        the login and address a connected holder's certificate is checked with."""
        self._certs[blob] = (login, address)
        self._certs.move_to_end(blob)
        if len(self._certs) <= CERT_CACHE:
            return
        in_use = set(self.inUse())
        for old in [b for b in self._certs if b not in in_use and b != blob]:
            if len(self._certs) <= CERT_CACHE:
                break
            del self._certs[old]

    def certified(self, blob: bytes) -> CertVerdict:
        """A certificate that logged in, checked again now."""
        seen = self._certs.get(blob)
        if seen is None:
            return CertVerdict(None, "certificate not seen at login")
        return check_certificate(blob, self._authorities, now=self._wall(), address=seen[1],
                                 login=seen[0], krl=self._krl)

    def expires(self, blob: bytes, certificate: bool) -> float | None:
        """When a key or a certificate that logged in stops being usable, if ever."""
        if certificate:
            return self.certified(blob).expires
        limits = self._limits.get(blob)
        return limits.expires if limits is not None else None
