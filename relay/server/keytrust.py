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

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from twisted.logger import Logger

from relay.config.errors import ConfigError
from relay.config.grammar import public_key
from relay.config.safepath import open_to_anyone
from relay.core.certs import Authority, CertVerdict, check_certificate
from relay.core.grants import Principal
from relay.core.keylife import KeyLimits
from relay.core.krl import MAGIC, Krl, KrlError, krl_may_unrevoke, krl_union, parse_krl

_log = Logger()

CERT_CACHE = 4096
"""(Certificate, login) records remembered after login, beyond those in use: past it the
oldest not in use are forgotten (a later look-up of a forgotten one grants nothing: fail
closed), :data:`CERT_TRIM` of them at once.  One in use (a connection, a session or a
held session of that login) is never forgotten, or a lab with short-lived certificates
(one per login) would, after this many logins, cut off an agent whose certificate logged
in weeks ago; they are bounded by the connections.  In use is per record, not per
certificate: one certificate may log in under as many names as lines accept it, and
while it held one connection none of its records used to be forgotten (before round 16
a cert-authority line bound no login name: 6 000 logins under new names, every later
login scanning them all, 3.6 ms a login growing to 12 ms)."""

CERT_TRIM = 256
"""Records forgotten in one go once :data:`CERT_CACHE` is passed (at most a sixteenth of
it), so that the scan for the ones not in use runs once per this many logins, not at
every login."""


EMPTIED_READS = 3
"""Polls in a row that must read the same ``revoked_keys`` before a version that might
revoke less than the list in force is taken (an emptied file, one cut at a line break,
a text file not ending in a newline); meanwhile what either revokes stays revoked.
``ssh-keygen -k -u`` rewrites the KRL in place, truncate then write, and a poll between
the two, taken at once, would un-revoke until the next poll.  A version that only adds
is taken at once.  (The name is kept from when only an emptied file waited.)"""

RACY_NS = 2_000_000_000
"""A file modified this recently (by the real clock) is read again at each poll even if
its size and time stamp are unchanged: a rewrite of the same size within one time stamp
tick changes neither (as for the grant files, relay.server.grants)."""


def read_revoked(path: Path) -> Krl:
    """A KRL file, or a text file of public keys (one per line, ``#`` comments)."""
    data = path.read_bytes()
    if data.startswith(MAGIC):
        return parse_krl(data)
    return _text_krl(data)


def _text_krl(data: bytes) -> Krl:
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


class _OpenToAnyone(Exception):
    """The revoked-keys file could be rewritten by anyone (relay.config.safepath)."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.fix = fix


def _refuse_if_open(path: Path) -> None:
    unsafe = open_to_anyone(path)
    if unsafe is not None:
        raise _OpenToAnyone(*unsafe)


def revoked_keys_problems(path: Path | None) -> list[ConfigError]:
    """What start-up would refuse in the ``revoked_keys`` file (``labrelay check``)."""
    if path is None:
        return []
    try:
        KeyTrust(path, time.time)
    except ConfigError as e:
        return [e]
    return []


class KeyTrust:
    """See the module docstring.  ``wall()`` is the wall clock in seconds."""

    def __init__(self, revoked: Path | None, wall: Callable[[], float]) -> None:
        self._path = revoked
        self._wall = wall
        self._limits: dict[bytes, KeyLimits] = {}
        self._authorities: dict[bytes, list[Authority]] = {}
        self._krl: Krl | None = None
        self._krlSignature: tuple[int, ...] | None = None
        self._good: Krl | None = None  # the last list taken whole (self._krl may add to it)
        self._digest = b""  # sha256 of the bytes last read and dealt with
        self._pending = b""  # sha256 of a version that might un-revoke, not yet taken
        self._emptiedReads = 0  # polls in a row that read that version
        self._pendingKrl = Krl()
        # (certificate, login name) -> the address it logged in from.  Per login, not
        # per certificate: one certificate may be logged in under two names at once (a
        # student as herself and as a shared lab account), each checked as its own.
        self._certs: OrderedDict[tuple[bytes, str], str] = OrderedDict()
        # The (key blob, login) pairs in use (the relay's connections, sessions and
        # held sessions, each as the login it made): those records are never
        # forgotten.  Set by the relay (KeyExpiry.holders_in_use).
        self.inUse: Callable[[], Collection[tuple[bytes, str]]] = frozenset
        if revoked is not None:
            self._loadKrl(strict=True)

    # --- state ------------------------------------------------------------

    def setGrants(self, limits: Mapping[bytes, KeyLimits],
                  authorities: Mapping[bytes, Sequence[Authority]]) -> None:
        self._limits = dict(limits)
        self._authorities = {ca: list(lines) for ca, lines in authorities.items()}

    def _loadKrl(self, strict: bool) -> None:
        """Read the file and take it whole (at start and when a reload names it)."""
        assert self._path is not None
        try:
            st = os.stat(self._path)
            self._krlSignature = (st.st_ino, st.st_size, st.st_mtime_ns)
            data = self._path.read_bytes()
            _refuse_if_open(self._path)
            krl = self._parse(data)
        except (OSError, KrlError, UnicodeDecodeError, _OpenToAnyone) as e:
            if strict and isinstance(e, _OpenToAnyone):
                raise ConfigError(str(self._path), "relay.revoked_keys",
                                  f"anyone could un-revoke a stolen key: {e}",
                                  e.fix) from None
            if strict:
                raise ConfigError(str(self._path), "relay.revoked_keys",
                                  f"cannot read the revoked keys: {e}",
                                  "make it with ssh-keygen -k -f FILE, or list public keys"
                                  ) from None
            self._invalid(e)
            return
        self._take(krl, hashlib.sha256(data).digest())

    def _parse(self, data: bytes) -> Krl:
        if data.startswith(MAGIC):
            return parse_krl(data)
        return _text_krl(data)

    def _invalid(self, e: Exception) -> None:
        # Fail closed: a KRL that cannot be read revokes every key it could name,
        # and we cannot tell which; keep the last one read instead of none.
        why = f"{e}; fix: {e.fix}" if isinstance(e, _OpenToAnyone) else str(e)
        _log.error("revoked_keys {file} not taken, keeping the previous list: {why}",
                   event="krl_invalid", file=str(self._path), why=why)

    def _take(self, krl: Krl, digest: bytes) -> None:
        self._krl = self._good = krl
        self._digest, self._pending, self._emptiedReads = digest, b"", 0
        _log.info("revoked_keys {file}: {keys} keys, {cas} CA sections", event="krl_loaded",
                  file=str(self._path), keys=len(krl.keys) + len(krl.sha256)
                  + len(krl.sha1), cas=len(krl.certs))

    def setPath(self, revoked: Path | None) -> None:
        """A reload named another ``revoked_keys`` file (or none): read it now (a bad one
        keeps the list in force, as on any reload); the certificates seen stay known."""
        if revoked == self._path:
            return
        self._path, self._krlSignature = revoked, None
        self._digest, self._pending, self._emptiedReads = b"", b"", 0
        if revoked is None:
            self._krl = self._good = None
        else:
            self._loadKrl(strict=False)

    def pollKrl(self) -> bool:
        """Re-read the KRL if its file changed; whether the list in force did.

        The content is compared, not only the size and time stamp.  A version that
        might revoke less than the last one taken whole (emptied, cut at a line break
        mid-write, a text file without its final newline, or an admin un-revoking) is
        taken only once EMPTIED_READS polls in a row read it the same; until then what
        either revokes is in force.  A version that only adds is taken at once."""
        if self._path is None:
            return False
        try:
            st = os.stat(self._path)
            signature: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        if (signature == self._krlSignature and not self._pending
                and (signature is None or signature[2] + RACY_NS < time.time_ns())):
            return False
        self._krlSignature = signature
        try:
            data = self._path.read_bytes()
        except OSError as e:
            if self._digest != b"unreadable":
                self._digest = b"unreadable"
                self._invalid(e)
            return False
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        try:
            _refuse_if_open(self._path)
        except _OpenToAnyone as e:
            # Whoever could write this version could un-revoke a stolen key: keep the
            # list in force (read again at the next change).
            self._digest, self._pending = digest, b""
            self._invalid(e)
            return False
        if digest == self._pending:
            self._emptiedReads += 1
        else:
            try:
                krl = self._parse(data)
            except (KrlError, UnicodeDecodeError) as e:
                self._digest, self._pending = digest, b""
                self._invalid(e)
                return False
            old = self._good
            cut = not data.startswith(MAGIC) and data != b"" and not data.endswith(b"\n")
            if old is None or not (cut or krl_may_unrevoke(old, krl)):
                self._take(krl, digest)
                return True
            self._pending, self._pendingKrl, self._emptiedReads = digest, krl, 1
            merged = krl_union(old, krl)
            changed = krl_may_unrevoke(merged, self._krl) if self._krl is not None else True
            self._krl = merged  # what either revokes, until this version holds
            if self._emptiedReads < EMPTIED_READS:
                return changed
        if self._emptiedReads < EMPTIED_READS:
            return False
        if data == b"" or not _revokes(self._pendingKrl):
            _log.warn("revoked_keys {file} emptied: no key or certificate is revoked by it "
                      "any more", event="krl_emptied", file=str(self._path))
        self._take(self._pendingKrl, digest)
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
        look-ups of that login check it again with these.  Only a signed login is
        remembered: an offer without a signature (anyone may hold a public
        ``-cert.pub``) must not replace the address a connected holder's certificate is
        checked with.  A login under another name is another record."""
        self._certs[(blob, login)] = address
        self._certs.move_to_end((blob, login))
        if len(self._certs) <= CERT_CACHE:
            return
        keep = set(self.inUse())
        keep.add((blob, login))
        goal = CERT_CACHE - min(CERT_TRIM, CERT_CACHE // 16)
        for old in [k for k in self._certs if k not in keep]:
            if len(self._certs) <= goal:
                break
            del self._certs[old]

    def certified(self, blob: bytes, login: str | None = None) -> CertVerdict:
        """A certificate that logged in as ``login``, checked again now.  ``login``
        None (a look-up by key alone: sessions held for an agent whose link is down):
        the login it made last."""
        if login is None:
            logins = [k[1] for k in self._certs if k[0] == blob]
            login = logins[-1] if logins else ""
        address = self._certs.get((blob, login))
        if address is None:
            return CertVerdict(None, "certificate not seen at login")
        return check_certificate(blob, self._authorities, now=self._wall(), address=address,
                                 login=login, krl=self._krl)

    def expires(self, blob: bytes, certificate: bool, login: str | None = None
                ) -> float | None:
        """When a key or a certificate that logged in stops being usable, if ever."""
        if certificate:
            return self.certified(blob, login).expires
        limits = self._limits.get(blob)
        return limits.expires if limits is not None else None
