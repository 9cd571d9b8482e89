"""Who may use the relay, and for what: agents and users known by their public keys.

Grants come from two places, merged into one view: ``[[relay.agent]]`` and
``[[relay.user]]`` in the node config, and authorized_keys-format grant files for
SSH admins (``permitlisten="gpu-cluster:22"`` on an agent's key line,
``permitopen="gpu-cluster:22"`` on a user's; the key's comment is the name).  See
docs/relay.md, "Grants".

Identity comes from the key alone, so a key belongs to one principal, and a service
name to one agent (only its owner may ever take it over).

Revocation is immediate and fails closed (docs/relay.md, "Reloading"):
:class:`~relay.server.grantwatch.GrantsWatcher` polls the grant files on the
reactor's clock and :meth:`Grants.poll` re-reads one that changed once it has settled;
every reload yields a :class:`~relay.server.grantdiff.GrantsChange` (computed by the
pure :func:`~relay.server.grantdiff.diff_grants`) that the relay applies to what is
already running.  A deleted or emptied file grants nothing;
a bad line grants nothing (the other lines still do); a file that is unsafe or cannot
be decoded grants nothing at all.  Only at start-up is any problem fatal.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from relay.config.checks import PrincipalSite, check_principals, config_sites
from relay.config.errors import ConfigError, OperatorText
from relay.config.grammar import public_key
from relay.config.safepath import open_to_anyone
from relay.config.schema import RelayConfig
from relay.core.certs import Authority, CertVerdict, is_certificate
from relay.core.grants import AGENT, USER, Principal
from relay.core.keylife import KeyLimits, parse_from
from relay.server.grantdiff import GrantsChange, diff_grants
from relay.server.grantfile import parse_grant_file
from relay.server.keytrust import KeyTrust

_log = Logger()

_RACY_NS = 2_000_000_000
"""How long after a file's last change its content, not only its stat, is compared:
a rewrite within one tick of the file system's clock keeps size, mtime and inode."""

@dataclass(frozen=True)
class _State:
    by_key: dict[bytes, Principal]
    principals: tuple[Principal, ...]
    owners: dict[str, Principal]
    public_ports: dict[int, Principal]
    origins: dict[bytes, str] = field(default_factory=dict)  # key -> FILE:LINE or config


@dataclass(frozen=True)
class _Snapshot:
    """One grant file as last read: stat signature, bytes (None if unreadable)."""

    path: Path
    kind: str
    signature: tuple[int, ...]
    data: bytes | None
    error: str
    mode: int = 0

    @property
    def racy_until(self) -> int:
        return self.signature[4] + _RACY_NS if self.data is not None else 0

    @property
    def missing(self) -> bool:
        return self.data is None and self.signature == (-1, errno.ENOENT)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, max(st.st_mtime_ns, st.st_ctime_ns))


def _read(path: Path, kind: str) -> _Snapshot:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        return _Snapshot(path, kind, (-1, e.errno or 0), None, e.strerror or str(e))
    return _Snapshot(path, kind, _signature(st), data, "", st.st_mode)


def _same(a: tuple[_Snapshot, ...], b: tuple[_Snapshot, ...]) -> bool:
    """Same content and mode (the stat signature may differ: a touch is no change)."""
    return [(s.data, s.mode, s.error) for s in a] == [(s.data, s.mode, s.error) for s in b]


_MAX_SETTLE_POLLS = 3
"""Polls a changing file may keep changing before it is taken as it is."""

_PARTIAL_READS = 3
"""Reads in a row that must agree before a file that looks cut off is applied (two
poll intervals of the same bytes, 0.5 s by default, instead of one): an emptied file
is still in force within 0.75 s of the write, as any other change."""

_MAX_PARTIAL_POLLS = 6
"""Polls a file that looks cut off may keep changing before it is taken as it is."""


def _looks_cut(snapshot: tuple[_Snapshot, ...], seen: tuple[_Snapshot, ...]) -> bool:
    """Whether a changed file reads as a writer caught between its truncate and its last
    write: emptied (it had bytes), or not ending in a newline (cut mid-line).  Such a
    read must stay the same for longer before it is applied, since applying it revokes
    every key after the cut until the write lands.  Only a delay: it is still applied
    (fail closed), within 0.75 s."""
    before = {s.path: s.data for s in seen}
    for file in snapshot:
        if file.data is None or file.data == before.get(file.path):
            continue
        if file.data == b"" and before.get(file.path):
            return True
        if file.data and not file.data.endswith(b"\n"):
            return True
    return False


class Grants:
    """Who is who, by public key, and what each may do.

    Lookups are pure: they read the grants in force.  :meth:`poll` (called by
    :class:`GrantsWatcher` on the reactor's clock) stats the grant files and re-reads
    one whose inode, size or times changed (and, for two seconds after a change, one
    whose content did: a rewrite within one tick of the file system's clock keeps all
    three).  A changed file is taken once two polls in a row read the same bytes, so a
    file caught half-written (an editor's truncate-then-write, a copy in progress) is
    not applied as a version that revokes every key after the cut; one that reads as
    cut off (emptied, or not ending in a newline) must read the same three times in a
    row, so a writer stalled up to 0.5 s between its truncate and its write (a busy
    machine, a slow disk) is not taken half-way either.

    A reload never keeps old grants: a missing or unsafe file grants nothing, a bad
    line grants nothing, a line that conflicts with an earlier grant grants nothing;
    each is logged as an error with ``FILE:LINE``.  Observers (the relay) receive the
    :class:`GrantsChange` of every reload and take away what was lost."""

    def __init__(
        self, relay: RelayConfig, source: str, *, wall_ns: Callable[[], int] = time.time_ns
    ) -> None:
        """Raises ConfigError if a grant file is missing, unreadable or bad, or if the
        grants conflict (one key twice, one service name for two agents ...): at
        start-up an operator is watching, so nothing is silently dropped.

        ``wall_ns`` is the wall clock file times are compared with."""
        self._relay = relay
        self._source = source
        self._wall_ns = wall_ns
        self._sites = config_sites(relay, source)
        self._files = [
            (path, kind)
            for path, kind in ((relay.agents_file, AGENT), (relay.users_file, USER))
            if path is not None
        ]
        self._observers: list[Callable[[GrantsChange], None]] = []
        # What the grants in force left out (a file that grants nothing, a bad or
        # conflicting line), for `labrelay status` and /metrics: the watch applies a
        # broken file by itself, so the log alone was the only place it showed.
        self.problems: tuple[str, ...] = ()
        self.problem_count = 0
        self._building: list[str] = []
        self._pending: tuple[_Snapshot, ...] | None = None
        self._pending_polls = 0
        self._pending_reads = 0
        self.trust = KeyTrust(relay.revoked_keys, lambda: self._wall_ns() / 1e9)
        self._seen = tuple(_read(path, kind) for path, kind in self._files)
        self._state = self._build(self._seen, strict=True)

    # --- lookups ---------------------------------------------------------

    def principal_for(self, key_blob: bytes, login: str | None = None) -> Principal | None:
        """The agent or user whose key (or certificate that logged in) has this SSH wire
        blob (``Key.blob()``), if it may be used now: not expired, not revoked.  A
        certificate is looked up as the ``login`` name its connection used (its
        ``principals=`` and CA line depend on it; None: the login it made last)."""
        if is_certificate(key_blob):
            return self.trust.certified(key_blob, login).principal
        principal = self._state.by_key.get(key_blob)
        if principal is None or not self.trust.usable(key_blob):
            return None
        return principal

    def refusal(self, key_blob: bytes, login: str | None = None) -> str | None:
        """Why the key or certificate ``key_blob``, which logged in, may no longer be
        used (None when :meth:`principal_for` grants it): the reason its sessions and
        connections end with (``relay_key_ended``)."""
        if is_certificate(key_blob):
            verdict = self.trust.certified(key_blob, login)
            return None if verdict.principal is not None else verdict.reason
        if key_blob not in self._state.by_key:
            return "the key is no longer granted"
        return self.trust.unusable(key_blob)

    def authenticate(self, key_blob: bytes, login: str, address: str) -> CertVerdict:
        """Whether a key or certificate may log in now as ``login`` from ``address``
        (``from=``, ``expiry-time``, certificates, the KRL): its principal or why not."""
        if is_certificate(key_blob):
            return self.trust.certificate(key_blob, login, address)
        return self.trust.authenticate(key_blob, self._state.by_key.get(key_blob), login,
                                       address)

    def remember(self, key_blob: bytes, login: str, address: str) -> None:
        """``key_blob`` logged in (its signature verified) as ``login`` from ``address``:
        a certificate is checked again with these on every later look-up."""
        if is_certificate(key_blob):
            self.trust.remember(key_blob, login, address)

    def expires(self, key_blob: bytes, login: str | None = None) -> float | None:
        """When a key or certificate that logged in (as ``login``) stops being usable
        (Unix time)."""
        return self.trust.expires(key_blob, is_certificate(key_blob), login)

    def principals(self) -> list[Principal]:
        """Every principal: config tables first, then the agents file, then the users file."""
        return list(self._state.principals)

    def owner_of(self, service_name: str) -> Principal | None:
        """The agent granted ``service_name`` (case-insensitive), if any."""
        return self._state.owners.get(service_name.lower())

    def public_port_owner(self, port: int) -> Principal | None:
        """The agent granted public port ``port``, if any."""
        return self._state.public_ports.get(port)

    @property
    def watched(self) -> bool:
        """Whether there are grant files or revoked keys to watch (config tables are
        read once)."""
        return bool(self._files) or self.trust.watched

    # --- reloading -------------------------------------------------------

    def subscribe(self, observer: Callable[[GrantsChange], None]) -> None:
        """Call ``observer(change)`` after every reload, with the new grants in force."""
        self._observers.append(observer)

    def poll(self) -> GrantsChange | None:
        """Reload if a grant file changed and has settled; the change, or None.  A
        changed ``revoked_keys`` is re-read at once and reported as an empty change (the
        relay re-checks every connection against it)."""
        if self.trust.pollKrl():
            self._notify(GrantsChange({}))
        if not self._files or not self._changed():
            self._pending = None
            return None
        snapshot = tuple(_read(path, kind) for path, kind in self._files)
        if _same(snapshot, self._seen):  # touched, or changed and changed back
            self._seen, self._pending = snapshot, None
            return None
        if self._pending is not None and _same(snapshot, self._pending):
            self._pending_reads += 1
        else:
            if self._pending is None:
                self._pending_polls = 0
            self._pending_reads = 1
        self._pending = snapshot
        self._pending_polls += 1
        cut = _looks_cut(snapshot, self._seen)
        if (self._pending_reads >= (_PARTIAL_READS if cut else 2)
                or self._pending_polls > (_MAX_PARTIAL_POLLS if cut else _MAX_SETTLE_POLLS)):
            return self._reload(snapshot)
        return None

    def reconfigure(self, relay: RelayConfig) -> GrantsChange:
        """Take the grants of a reloaded ``[relay]`` (its tables and which grant files
        it names), re-read the files now and tell the observers what was lost.  The
        caller checked ``relay`` first (:func:`grant_problems`)."""
        self._relay = relay
        self.trust.setPath(relay.revoked_keys)
        self._sites = config_sites(relay, self._source)
        self._files = [
            (path, kind)
            for path, kind in ((relay.agents_file, AGENT), (relay.users_file, USER))
            if path is not None
        ]
        return self.reload()

    def reload(self) -> GrantsChange:
        """Re-read the grant files now, settled or not."""
        return self._reload(tuple(_read(path, kind) for path, kind in self._files))

    def _reload(self, snapshot: tuple[_Snapshot, ...]) -> GrantsChange:
        self._seen, self._pending = snapshot, None
        old = self._state
        self._state = state = self._build(snapshot, strict=False)
        change = diff_grants(old.by_key, state.by_key, old.origins)
        _log.info(
            "grants reloaded: {agents} agents, {users} users; {revoked} key(s) revoked, "
            "{narrowed} narrowed, {added} added",
            event="grants_reloaded",
            agents=sum(p.kind == AGENT for p in state.principals),
            users=sum(p.kind == USER for p in state.principals),
            revoked=len(change.revoked),
            narrowed=len(change.narrowed),
            added=change.added,
        )
        self._notify(change)
        return change

    def _notify(self, change: GrantsChange) -> None:
        for observer in list(self._observers):
            try:
                observer(change)
            except Exception:
                _log.failure("applying a grants change", event="grants_apply_failed")

    def _changed(self) -> bool:
        now = self._wall_ns()
        for seen in self._seen:
            try:
                signature = _signature(os.stat(seen.path))
            except OSError as e:
                signature = (-1, e.errno or 0)
            if signature != seen.signature:
                return True
            if now < seen.racy_until and _read(seen.path, seen.kind).data != seen.data:
                return True
        return False

    def _fileSites(self, file: _Snapshot, strict: bool) -> list[PrincipalSite]:
        """One file's principals; when not ``strict``, what is wrong grants nothing
        and is logged instead of raised."""
        try:
            text = _file_text(file)
        except ConfigError as e:
            if strict:
                raise
            self._building.append(f"{file.kind}s file {file.path} grants nothing: "
                                  + ("it is missing" if file.missing else str(e)))
            if file.missing:
                _log.warn(
                    "{kind}s file {file} is missing: no {kind} keys from it are granted",
                    event="grants_file_missing", kind=file.kind, file=str(file.path),
                )
            else:
                _log.error(
                    "{kind}s file {file} grants nothing: {reason}",
                    event="grants_file_invalid", kind=file.kind, file=str(file.path),
                    reason=OperatorText(e),
                )
            return []
        if strict:
            return parse_grant_file(text, file.kind, str(file.path))
        problems: list[ConfigError] = []
        sites = parse_grant_file(text, file.kind, str(file.path), problems=problems)
        for problem in problems:
            self._building.append(f"{problem.source}: this line grants nothing: {problem}")
            _log.error(
                "{file}: this line grants nothing (the other lines still apply): {reason}",
                event="grants_line_invalid", kind=file.kind, file=problem.source,
                reason=OperatorText(problem),  # whole: the fix is at its end
            )
        if not sites and not problems:
            self._building.append(f"{file.kind}s file {file.path} is empty: it grants nothing")
            _log.warn(
                "{kind}s file {file} is empty: no {kind} keys from it are granted",
                event="grants_file_empty", kind=file.kind, file=str(file.path),
            )
        return sites

    def _checked(
        self, sites: list[PrincipalSite], strict: bool
    ) -> tuple[list[PrincipalSite], list[tuple[bytes, ...]]]:
        """The sites and their key blobs, conflicts resolved.  At start-up a conflict
        is an error; on reload the later of two conflicting grants grants nothing (the
        grant in force stays: a line added by mistake cannot take a name or a key)."""
        listen_at = (self._source, "relay.listen")
        while True:
            try:
                return sites, check_principals(sites, self._relay, listen_at)
            except ConfigError as e:
                if strict:
                    raise
                at = (e.source, e.keypath)
                index = next(
                    (i for i, s in enumerate(sites)
                     if at in (s.name_at, *s.keys_at, *s.services_at, *s.ports_at)),
                    None,
                )
                if index is None or index < len(self._sites):
                    # Not a file's line (the config tables were checked at start-up):
                    # fail closed on every file.
                    self._building.append(f"grant files grant nothing: {e}")
                    _log.error(
                        "grant files grant nothing: {reason}", event="grants_conflict",
                        file=e.source, reason=OperatorText(e), kind="", name="",
                    )
                    sites = list(self._sites)
                    continue
                dropped = sites.pop(index).principal
                self._building.append(f"{e.source}: {dropped.kind} {dropped.name} grants "
                                      f"nothing here: {e}")
                _log.error(
                    "{file}: {kind} {name} grants nothing here: {reason}",
                    event="grants_conflict", file=e.source, kind=dropped.kind,
                    name=dropped.name, reason=OperatorText(e),
                )

    def _build(self, snapshot: Iterable[_Snapshot], strict: bool) -> _State:
        self._building = []
        sites = list(self._sites)
        for file in snapshot:
            sites.extend(self._fileSites(file, strict))
        sites, blobs = self._checked(sites, strict)
        # Bounded, as everything in the status is: a file of 10 000 bad lines is
        # counted whole and listed by its first 100.
        self.problems = tuple(self._building[:100])
        self.problem_count = len(self._building)
        by_key: dict[bytes, Principal] = {}
        owners: dict[str, Principal] = {}
        public_ports: dict[int, Principal] = {}
        origins: dict[bytes, str] = {}
        limits: dict[bytes, KeyLimits] = {}
        authorities: dict[bytes, list[Authority]] = {}
        # trusted_user_ca: one login-bound line per user (relay.core.certs).
        relay_cas = [public_key(line)[0] for line in self._relay.trusted_user_ca]
        principals = []
        for site, keys in zip(sites, blobs, strict=True):
            p = site.principal
            max_sessions = p.max_sessions
            if p.kind == USER and max_sessions is None:
                max_sessions = self._relay.max_sessions_per_user
            principal = Principal(
                kind=p.kind,
                name=p.name,
                services=p.services,
                public_ports=frozenset(p.public_ports),
                max_sessions=max_sessions,
                share=p.share,
                rate_limit=p.rate_limit,
                rate_burst=p.rate_burst,
            )
            principals.append(principal)
            for kl in p.key_limits:
                limits[public_key(kl.key)[0]] = _limits(kl.expires, kl.sources)
            for ca in p.authorities:
                authorities.setdefault(public_key(ca.key)[0], []).append(Authority(
                    public_key(ca.key)[0], principal, frozenset(ca.principals),
                    _limits(ca.expires, ca.sources), ca.where))
            if p.kind == USER:
                for j, blob in enumerate(relay_cas):
                    authorities.setdefault(blob, []).append(Authority(
                        blob, principal, frozenset((p.name,)), _limits(p.expires, p.sources),
                        f"{self._source}: relay.trusted_user_ca[{j}] for user {p.name}",
                        login_bound=True))
            by_key.update(dict.fromkeys(keys, principal))
            origins.update(dict.fromkeys(keys, site.name_at[0]))
            if p.kind == AGENT:
                owners.update(dict.fromkeys((g.name for g in p.services), principal))
                public_ports.update(dict.fromkeys(p.public_ports, principal))
        self.trust.setGrants(limits, authorities)
        return _State(by_key, tuple(principals), owners, public_ports, origins)


def _limits(expires: float | None, sources: str | None) -> KeyLimits:
    return KeyLimits(expires, parse_from(sources) if sources is not None else None)


def _unreadable_fix(file: _Snapshot) -> str:
    """The fix for a grant file ``open()`` failed on: the path for a missing one, the
    file's mode or owner for one the relay's user may not read (the path is right
    then: "check users_file" sent the operator to the wrong place)."""
    if file.signature[1] in (errno.EACCES, errno.EPERM):
        try:
            import grp
            import pwd

            user = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
        except (ImportError, AttributeError, KeyError):  # no such names, not POSIX
            user, group = "its user", "GROUP"
        return (f"let the user the relay runs as ({user}) read it and the directories "
                f"above it, e.g. chgrp {group} {file.path} && chmod 640 {file.path}")
    return f"check {file.kind}s_file in [relay] or --{file.kind}s"


def _file_text(file: _Snapshot) -> str:
    """The file's text, or ConfigError saying why it grants nothing."""
    if file.data is None:
        raise ConfigError(
            str(file.path),
            "",
            f"cannot read the {file.kind}s file: {file.error}",
            _unreadable_fix(file),
        )
    if file.mode & stat.S_IWOTH:
        raise ConfigError(
            str(file.path),
            "",
            f"the {file.kind}s file is writable by anyone, so anyone could grant "
            "themselves access",
            f"chmod o-w {file.path}",
        )
    unsafe = open_to_anyone(file.path)
    if unsafe is not None:
        raise ConfigError(str(file.path), "", f"anyone could grant themselves access through "
                          f"the {file.kind}s file: {unsafe[0]}", unsafe[1])
    try:
        return file.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            str(file.path),
            "",
            f"not UTF-8 text (bad byte at offset {e.start})",
            "save it as UTF-8",
        ) from None


def grant_problems(relay: RelayConfig, source: str) -> list[ConfigError]:
    """Every problem start-up would refuse in ``relay``'s grants: each unreadable or
    unsafe grant file, each bad line, then (if the lines are sound) a conflict between
    grants.  ``labrelay check`` and a reload report them all at once; empty when the
    grants are sound."""
    problems: list[ConfigError] = []
    sites = list(config_sites(relay, source))
    for path, kind in ((relay.agents_file, AGENT), (relay.users_file, USER)):
        if path is None:
            continue
        try:
            text = _file_text(_read(path, kind))
        except ConfigError as e:
            problems.append(e)
            continue
        sites.extend(parse_grant_file(text, kind, str(path), problems=problems))
    if not problems:
        try:
            check_principals(sites, relay, (source, "relay.listen"))
        except ConfigError as e:
            problems.append(e)
    return problems
