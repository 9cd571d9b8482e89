"""Verification of an SSH server's host key, as OpenSSH's ``ssh`` does it.

A :class:`HostKeyVerifier` answers one question for one ``host:port``: is this key
the server's?  It either pins one key by its ``SHA256:`` fingerprint or consults
OpenSSH ``known_hosts`` files (plain and hashed entries, comma-separated patterns
with ``*``/``?``/``!``, ``[host]:port`` for other ports than 22, ``@revoked``;
``@cert-authority`` lines are ignored because certificates are not supported).
Several files are read as one, as ssh reads its UserKnownHostsFile and
GlobalKnownHostsFile entries (sshconnect.c loads them all into one set before it
decides); only the first is ever written.

Conch's ``twisted.conch.client.knownhosts.KnownHostsFile`` is deliberately not used:
it ignores ``@revoked`` lines (they fail to parse and are skipped), does not match
patterns or compare host names case-insensitively, reports a *changed* key at the
first entry of the key type even when a later entry matches, and appends new lines
without fixing file modes or a missing final newline.

The files are small and read synchronously on every verification, so edits made by an
operator (``ssh-keygen -R``, a new line) take effect on the next connection.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import secrets
import shlex
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from twisted.conch.ssh.keys import Key
from twisted.logger import Logger

from relay.config.schema import HostKeyPolicy

log = Logger()

DEFAULT_SSH_PORT = 22
_HASH_MAGIC = "|1|"
_SALT_LEN = 20  # SHA-1 digest size, as OpenSSH's hostfile.c uses



# Where an admin reads the key on the server: a stock sshd's files, or a labrelay
# relay's state directory (its host key is not under /etc/ssh; its start-up line
# "relay listening on ...; host key SHA256:..." names the fingerprint too).
MAX_LEARNED_HOST_KEYS = 4
"""Keys of one host the agent's known_hosts may hold before it learns no more from the
host's announcements (``hostkeys-00@openssh.com``).  A relay announces two at most (its
key and ``next_host_key``); four leaves room for a rotation whose old line was not
yet removed.  Lines an operator adds are not limited."""

ON_THE_SERVER = ("(on the server: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub; for a labrelay "
                 "relay: ssh-keygen -lf STATE_DIR/ssh_host_ed25519_key.pub, STATE_DIR being "
                 "its [relay] state_dir, or its 'relay listening' log line)")

class HostKeyStatus(enum.Enum):
    """Why a host key was refused."""

    PIN_MISMATCH = "pin-mismatch"  # a pinned fingerprint is configured; the key is another one
    CHANGED = "changed"  # known_hosts has this key type for the host, with another key
    UNKNOWN = "unknown"  # known_hosts has no usable entry for the host
    REVOKED = "revoked"  # the key is listed under @revoked
    ERROR = "error"  # the policy cannot be applied (unreadable file, bad pin, ...)


class HostKeyError(Exception):
    """The server's host key was refused.

    ``str(err)`` is a one-paragraph message for an operator: which host, which key
    was offered (type and fingerprint), what was expected and where, and how to fix
    it.  ``status`` tells the kinds apart for callers that count or log them.
    """

    def __init__(self, status: HostKeyStatus, hostname: str, problem: str, hint: str = "") -> None:
        self.status = status
        self.hostname = hostname
        self.problem = problem
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"host key verification failed for {self.hostname}: {self.problem}"
        return text + (f". To fix: {self.hint}" if self.hint else "")


def fingerprint_sha256(key: Key) -> str:
    """``SHA256:<base64>`` without padding, exactly as ``ssh-keygen -lf`` prints it."""
    return _fingerprint_of_blob(key.blob())


def parse_fingerprint(text: str) -> bytes:
    """The 32-byte digest of a ``SHA256:...`` fingerprint (padding optional).

    Raises ``ValueError`` with a readable reason for anything else (an MD5
    fingerprint, a truncated one, a public key pasted by mistake).
    """
    prefix, sep, encoded = text.strip().partition(":")
    if not sep or prefix.upper() != "SHA256":
        raise ValueError(
            f"fingerprint {text!r} is not of the form SHA256:<base64> "
            "(print it with: ssh-keygen -lf KEY.pub)"
        )
    encoded = encoded.rstrip("=")
    try:
        digest = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError(
            f"fingerprint {text!r} is not a valid SHA256 fingerprint: expected 43 base64 "
            "characters after 'SHA256:' (print it with: ssh-keygen -lf KEY.pub)"
        )
    return digest


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH looks up and records: ``host`` for port 22, else ``[host]:port``.

    Host names are compared case-insensitively, so the name is lower-cased.
    """
    host = host.lower()
    return host if port == DEFAULT_SSH_PORT else f"[{host}]:{port}"


class HostKeyVerifier:
    """Applies one :class:`HostKeyPolicy` to the server at ``host:port``.

    A pinned ``fingerprint`` accepts that key and nothing else (the known_hosts files
    are then not consulted).  Otherwise ``known_hosts`` (default
    ``~/.ssh/known_hosts``) and then ``extra_known_hosts`` decide together, with
    OpenSSH's rules: a key listed under ``@revoked`` in any of them is refused
    (whatever host pattern the line carries); a key listed for the host in any of
    them is accepted; a host listed with *another* key of the same type (and this
    key nowhere) is refused as changed, always; a host with no entry of this key
    type is refused as unknown, unless ``accept_new``, in which case a hashed line is
    appended to ``known_hosts``, the first file, as ssh records into its first
    UserKnownHostsFile.  A missing file has no entries; a file that cannot be read
    does not stop a match in another, but a host is never taken as new while one
    cannot be read (it might list the host).  With ``no_user_known_hosts`` (ssh's
    ``UserKnownHostsFile none``) only the global files are read and a new host is
    refused in every mode, as ssh refuses it: there is no file to record it in.
    """

    def __init__(self, policy: HostKeyPolicy, host: str, port: int) -> None:
        self.policy = policy
        self.host = host
        self.port = port
        self.hostname = known_hosts_name(host, port)
        self._pin: bytes | None = None
        #: Announced key blobs the agent already said it would refuse (relay.ssh.client):
        #: said once for as long as this verifier (the link) lives.
        self.told: set[bytes] = set()
        #: The file whose line accepted the server's key at the last verification (or
        #: that recorded it): announced keys are learned only when it is the first
        #: user file, as ssh's UpdateHostKeys (not a global file, not a pin).
        self.matched_in: Path | None = None
        if policy.fingerprint is not None:
            try:
                self._pin = parse_fingerprint(policy.fingerprint)
            except ValueError as e:
                raise HostKeyError(
                    HostKeyStatus.ERROR,
                    self.hostname,
                    f"the pinned {e}",
                    'set host_key = "SHA256:..." (--host-key) to the fingerprint of the '
                    "server's key",
                ) from None
        known = policy.known_hosts if policy.known_hosts is not None else Path("~/.ssh/known_hosts")
        # None: "UserKnownHostsFile none", no user file is read nor written (ssh.c).
        self.known_hosts: Path | None = (
            None if policy.no_user_known_hosts else known.expanduser())
        user = (
            []
            if self.known_hosts is None
            else [self.known_hosts, *(p.expanduser() for p in policy.extra_known_hosts)]
        )
        # Every file, in ssh's order, each once (ssh would read a repeated one twice,
        # to the same effect).
        self.files: tuple[Path, ...] = tuple(
            dict.fromkeys([*user, *(p.expanduser() for p in policy.global_known_hosts)])
        )

    def verify(self, key: Key) -> str:
        """Accept ``key`` or raise :class:`HostKeyError`.

        Returns what matched, for the log: ``"pinned SHA256:..."``,
        ``"known_hosts FILE line N"`` or ``"accepted new key, saved to FILE"``.
        """
        blob = key.blob()
        offered = _Offered(key.sshType().decode("ascii"), blob, _fingerprint_of_blob(blob))
        if self._pin is not None:
            return self._verify_pinned(offered, self._pin)
        return self._verify_known_hosts(offered)

    def known_key_types(self) -> list[str]:
        """Key types the known_hosts files record for this host, in file order (none
        when a fingerprint is pinned; an unreadable file adds none): the SSH client
        offers these host key algorithms first, as OpenSSH does, so a recorded ECDSA or
        RSA key is asked for again rather than an unrecorded ed25519 one refused."""
        if self._pin is not None:
            return []
        types: list[str] = []
        for read in self._read_all():
            for e in read.entries:
                if e.marker is None and e.matches(self.hostname) and e.key_type not in types:
                    types.append(e.key_type)
        return types

    def unlisted(self, blobs: list[bytes]) -> list[bytes]:
        """The key blobs of ``blobs`` this policy would not accept for the host today:
        the keys a relay announces (``hostkeys-00@openssh.com``) that the agent must be
        given before the relay switches to one of them.  Only a read: nothing is
        recorded (the agent does not learn keys by itself; docs/operations.md)."""
        if self._pin is not None:
            pin = self._pin
            return [b for b in blobs
                    if not hmac.compare_digest(hashlib.sha256(b).digest(), pin)]
        listed = [e.blob for r in self._read_all() for e in r.entries
                  if e.marker is None and e.matches(self.hostname)]
        revoked = [e.blob for r in self._read_all() for e in r.entries
                   if e.marker == "@revoked"]
        return [b for b in blobs
                if b in revoked or not any(hmac.compare_digest(b, k) for k in listed)]

    def learnable(self, blobs: list[bytes]) -> list[bytes]:
        """Of the keys a server announced, those the agent may ask it to prove and then
        record: not accepted today, not ``@revoked``, and only when the server's key was
        accepted from the first user known_hosts file (never with a pin, nor from a
        global or extra file), as ssh's ``UpdateHostKeys`` decides."""
        if self._pin is not None or self.known_hosts is None:
            return []
        if self.matched_in != self.known_hosts:
            return []
        return self.unlisted(blobs)[:self._room()]

    def _room(self) -> int:
        """Keys that may still be learned for this host: :data:`MAX_LEARNED_HOST_KEYS`
        less the lines its first known_hosts file holds for it.  Learning adds and never
        removes (unlike ssh's ``UpdateHostKeys``, which drops what is no longer
        announced), so without a bound a relay that holds its host key (taken over)
        could announce fresh keys at every reconnect, prove them, and grow the file by
        15 lines a connection (225 lines in 21 s, one run), each connection reading it
        all again."""
        assert self.known_hosts is not None
        held = sum(1 for e in self._read(self.known_hosts).entries
                   if e.marker is None and e.matches(self.hostname))
        return max(MAX_LEARNED_HOST_KEYS - held, 0)

    def learn(self, key: Key) -> str:
        """Record a key the server proved it holds (``hostkeys-prove-00@openssh.com``)
        as a hashed line in ``known_hosts``, beside the ones there: nothing is removed.
        Returns where, for the log; :class:`HostKeyError` if it cannot be written."""
        blob = key.blob()
        offered = _Offered(key.sshType().decode("ascii"), blob, _fingerprint_of_blob(blob))
        if not self.unlisted([blob]):
            return "already listed"
        if self.known_hosts is None or self._room() == 0:
            return (f"not recorded: {self.known_hosts} holds {MAX_LEARNED_HOST_KEYS} keys "
                    "for this host already")
        return f"saved to {self.known_hosts}" if self._append(offered) else "not recorded"

    def _verify_pinned(self, offered: _Offered, pin: bytes) -> str:
        if hmac.compare_digest(hashlib.sha256(offered.blob).digest(), pin):
            return f"pinned {offered.fingerprint}"
        expected = _fingerprint_of_digest(pin)
        raise HostKeyError(
            HostKeyStatus.PIN_MISMATCH,
            self.hostname,
            f"the server offered {offered}, but the configuration pins {expected}. "
            "This could be a man-in-the-middle attack, or the server's key was replaced",
            "confirm the server's key out of band " + ON_THE_SERVER
            + ", then set host_key (--host-key) to the new value",
        )

    def _verify_known_hosts(self, offered: _Offered) -> str:
        reads = self._read_all()
        entries = [(r.path, e) for r in reads for e in r.entries]
        for path, entry in entries:
            if entry.marker == "@revoked" and hmac.compare_digest(entry.blob, offered.blob):
                raise HostKeyError(
                    HostKeyStatus.REVOKED,
                    self.hostname,
                    f"the server offered {offered}, which {path} line {entry.lineno} marks "
                    "@revoked; it is never accepted",
                    "replace the server's host key, or remove the @revoked line if it is wrong",
                )
        same_type = [
            (path, e)
            for path, e in entries
            if e.marker is None and e.key_type == offered.key_type and e.matches(self.hostname)
        ]
        for path, entry in same_type:
            if hmac.compare_digest(entry.blob, offered.blob):
                self.matched_in = path
                return f"known_hosts {path} line {entry.lineno}"
        if same_type:
            raise self._changed(offered, *same_type[0])
        unreadable = [r for r in reads if r.error is not None]
        if unreadable:
            first = unreadable[0]
            raise HostKeyError(
                HostKeyStatus.ERROR,
                self.hostname,
                f"cannot read known_hosts file {first.path}: {first.error}",
                "make it a readable file for the user running labrelay, "
                "or set known_hosts to another file",
            )
        line = f"{self.hostname} {offered.key_type} {base64.b64encode(offered.blob).decode()}"
        if self.known_hosts is None:
            raise self._nowhere_to_record(offered, reads, line)
        path = self.known_hosts
        if self.policy.accept_new:
            where = f"saved to {path}" if self._append(offered) else f"not recorded ({path})"
            self.matched_in = path
            log.info(
                "accepted new {key_type} host key {fingerprint} for {hostname}, {where}",
                key_type=offered.key_type,
                fingerprint=offered.fingerprint,
                hostname=self.hostname,
                path=str(path),
                where=where,
            )
            return f"accepted new key, {where}"
        raise HostKeyError(
            HostKeyStatus.UNKNOWN,
            self.hostname,
            f"the host is UNKNOWN: the server offered {offered} and {_where(reads)}",
            "check the fingerprint out of band " + ON_THE_SERVER + ", "
            f"then add this line to {path}: {line}  "
            f"-- or pin it: --host-key {offered.fingerprint} on the command line "
            f'(pin host_key = "{offered.fingerprint}" in a config file), or record it on '
            "first connection: -o StrictHostKeyChecking=accept-new "
            '(strict_host_key_checking = "accept-new")',
        )

    def _nowhere_to_record(
        self, offered: _Offered, reads: list[_FileEntries], line: str
    ) -> HostKeyError:
        """A new host with ``UserKnownHostsFile none``: refused in every mode, as ssh
        does (sshconnect.c: with no user file it is read-only, and a new host then
        fails whatever StrictHostKeyChecking says), so accept-new says why."""
        mode = (
            "; accept-new cannot record it: UserKnownHostsFile is none, so there is no "
            "file to record it in (ssh refuses it too)"
            if self.policy.accept_new
            else " (UserKnownHostsFile is none)"
        )
        places = (
            "add this line to a GlobalKnownHostsFile that is read "
            f"({', '.join(str(r.path) for r in reads)}): {line}  -- or "
            if reads
            else ""
        )
        return HostKeyError(
            HostKeyStatus.UNKNOWN,
            self.hostname,
            f"the host is UNKNOWN: the server offered {offered} and {_where(reads)}{mode}",
            "check the fingerprint out of band " + ON_THE_SERVER + ", "
            f"then {places}pin it: --host-key "
            f"{offered.fingerprint} on the command line "
            f'(host_key = "{offered.fingerprint}" in a config file), or set '
            "UserKnownHostsFile (known_hosts) to a file instead of none",
        )

    def _changed(self, offered: _Offered, path: Path, old: _Entry) -> HostKeyError:
        remove = shlex.join(["ssh-keygen", "-R", self.hostname, "-f", str(path)])
        also = (
            ""
            if path == self.known_hosts
            else " (if the file is not yours to edit, ask whoever installed it)"
        )
        return HostKeyError(
            HostKeyStatus.CHANGED,
            self.hostname,
            f"the host key has CHANGED: the server offered {offered}, but {path} line "
            f"{old.lineno} records a different {old.key_type} key "
            f"{_fingerprint_of_blob(old.blob)}. This could be a man-in-the-middle attack, "
            "or the server's host key was replaced",
            "if the change is expected, confirm the new fingerprint out of band, remove "
            f"the old entry with: {remove}{also}  then add the new key (or let "
            'strict_host_key_checking = "accept-new", or -o StrictHostKeyChecking=accept-new '
            "on the command line, record it)",
        )

    def _read_all(self) -> list[_FileEntries]:
        return [self._read(path) for path in self.files]

    def _read(self, path: Path) -> _FileEntries:
        """One file's parsed entries and the numbers of the lines skipped as invalid."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return _FileEntries(path, exists=False)
        except OSError as e:
            log.debug("cannot read known_hosts file {path}: {e}", path=str(path), e=e)
            return _FileEntries(path, exists=True, error=e.strerror or str(e))
        read = _FileEntries(path, exists=True)
        for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            entry = _Entry.parse(line, lineno)
            if entry is None:
                log.debug(
                    "{path} line {lineno}: ignoring an invalid known_hosts line",
                    path=str(path),
                    lineno=lineno,
                )
                read.skipped.append(lineno)
            else:
                read.entries.append(entry)
        return read

    def _append(self, offered: _Offered) -> bool:
        """Append a hashed entry (``HashKnownHosts yes``), creating the file 0600 and
        its directory 0700 if needed; False if ``known_hosts`` is not a regular file
        (``/dev/null``: the user asked for nothing to be kept).  A failure refuses the
        key: silently not recording it would make every later connection
        trust-on-first-use again."""
        path = self.known_hosts
        assert path is not None  # _verify_known_hosts never appends without a user file
        salt = secrets.token_bytes(_SALT_LEN)
        digest = hmac.new(salt, self.hostname.encode("utf-8"), hashlib.sha1).digest()
        line = (
            f"{_HASH_MAGIC}{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
            f" {offered.key_type} {base64.b64encode(offered.blob).decode()}\n"
        ).encode("ascii")
        try:
            _ensure_private_dir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    # ``/dev/null``, ssh's idiom for "record nowhere": nothing to keep.
                    # Its mode is the system's (an fchmod here, as root, made it 0600 for
                    # everyone), and a device cannot be fsync'ed (EINVAL refused the key).
                    return False
                if st.st_size == 0:
                    os.fchmod(fd, 0o600)
                elif os.pread(fd, 1, st.st_size - 1) != b"\n":
                    line = b"\n" + line
                _write_all(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        except OSError as e:
            raise HostKeyError(
                HostKeyStatus.ERROR,
                self.hostname,
                f"the server offered new key {offered} and accept_new is set, but it could "
                f"not be saved to {path}: {e.strerror or e}",
                "make the file and its directory writable by the user running labrelay",
            ) from None


@dataclass
class _FileEntries:
    """What one known_hosts file said: its usable entries, the lines skipped as
    invalid, or why it could not be read."""

    path: Path
    exists: bool
    error: str | None = None
    entries: list[_Entry] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _where(reads: list[_FileEntries]) -> str:
    """Where the host was looked for, for an UNKNOWN host: "FILE has no entry for this
    host" (or "does not exist") for one file; each file's state for several."""

    def state(r: _FileEntries, one: bool) -> str:
        text = ("has no entry for this host" if one else "no entry") if r.exists else (
            "does not exist")
        if r.skipped:
            lines = ", ".join(str(n) for n in r.skipped)
            text += f" (lines {lines} could not be parsed and were ignored)"
        return text

    if not reads:
        return "no known_hosts file is read"
    if len(reads) == 1:
        return f"{reads[0].path} {state(reads[0], True)}"
    listed = "; ".join(f"{r.path}: {state(r, False)}" for r in reads)
    return f"no known_hosts file lists this host ({listed})"


@dataclass(frozen=True)
class _Offered:
    key_type: str
    blob: bytes
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.key_type} key {self.fingerprint}"


@dataclass(frozen=True)
class _Entry:
    """One usable known_hosts line."""

    lineno: int
    marker: str | None  # "@revoked", "@cert-authority" or None
    hosts: str  # the comma-separated patterns, or "|1|salt|hash"
    key_type: str
    blob: bytes

    @classmethod
    def parse(cls, line: str, lineno: int) -> _Entry | None:
        fields = line.split()
        marker = None
        if fields[0].startswith("@"):
            marker = fields.pop(0)
            if marker not in ("@revoked", "@cert-authority"):
                return None
        if len(fields) < 3:
            return None
        hosts, key_type, encoded = fields[:3]
        try:
            blob = base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text (tests/fuzz known_hosts)
            return None
        if _blob_type(blob) != key_type.encode("ascii", "replace"):
            return None
        if hosts.startswith(_HASH_MAGIC) and _split_hashed(hosts) is None:
            return None
        return cls(lineno, marker, hosts, key_type, blob)

    def matches(self, hostname: str) -> bool:
        """OpenSSH's ``match_maybe_hashed``: an HMAC-SHA1 entry, or a pattern list."""
        hashed = _split_hashed(self.hosts)
        if hashed is not None:
            salt, digest = hashed
            mine = hmac.new(salt, hostname.encode("utf-8"), hashlib.sha1).digest()
            return hmac.compare_digest(mine, digest)
        return _match_pattern_list(hostname, self.hosts)


def _split_hashed(hosts: str) -> tuple[bytes, bytes] | None:
    if not hosts.startswith(_HASH_MAGIC):
        return None
    parts = hosts[len(_HASH_MAGIC) :].split("|")
    if len(parts) != 2:
        return None
    try:
        salt, digest = (base64.b64decode(p, validate=True) for p in parts)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    if len(digest) != hashlib.sha1().digest_size:
        return None
    return salt, digest


def _match_pattern_list(name: str, patterns: str) -> bool:
    """OpenSSH's ``match_hostname``: case-insensitive globs; a matching ``!pattern``
    excludes the name whatever else matches."""
    positive = False
    for pattern in patterns.lower().split(","):
        negated = pattern.startswith("!")
        if negated:
            pattern = pattern[1:]
        if _glob_match(pattern, name):
            if negated:
                return False
            positive = True
    return positive


def _glob_match(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` whole: ``*`` any run, ``?`` any one
    character, everything else literal (not fnmatch: "[" and "]" are literal in
    OpenSSH patterns, "[host]:2222").

    In time linear in ``len(pattern) * len(name)``: a backtracking regular expression
    (``.*`` per star) took exponential time on a line of many stars followed by text
    that does not match (found by tests/fuzz ``known_hosts``: 60 stars, seconds per
    line).  On a mismatch after a star, the star takes one more character and the rest
    of the pattern starts again; only the last star need be retried."""
    p = n = 0
    star, resume = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, n
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", name[n]):
            p += 1
            n += 1
        elif star >= 0:
            resume += 1
            p, n = star + 1, resume
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _blob_type(blob: bytes) -> bytes | None:
    """The key type at the start of an SSH public key blob (an SSH ``string``)."""
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > len(blob) - 4:
        return None
    return blob[4 : 4 + length]


def _fingerprint_of_blob(blob: bytes) -> str:
    return _fingerprint_of_digest(hashlib.sha256(blob).digest())


def _fingerprint_of_digest(digest: bytes) -> str:
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` 0700 (like ``~/.ssh``) if it does not exist."""
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
