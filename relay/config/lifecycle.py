"""Keys that come and go with people, in the TOML tables: ``expiry``, ``from``,
``cert_authorities`` and ``principals`` of a ``[[relay.user]]``/``[[relay.agent]]`` entry
(the grant files' ``expiry-time=``, ``from=``, ``cert-authority`` and ``principals=``;
docs/sharing.md, "Keys that come and go").

``expiry`` and ``from`` limit every key of the entry and every certificate its
``cert_authorities`` sign, as the same options on each of its lines of a grant file
would; ``principals`` (default: the entry's name) are the certificate principals that
log in as this entry.  Errors name the file, the key and what is valid."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from relay.config import grammar
from relay.config.errors import ConfigError
from relay.config.keyoptions import KeyOptionError, from_patterns, parse_expiry
from relay.config.readers import _each
from relay.config.schema import CertAuthorityConfig, KeyLimitsConfig
from relay.config.section import Section, describe


@dataclass(frozen=True)
class Lifecycle:
    """What :func:`read_lifecycle` found in one entry."""

    key_limits: tuple[KeyLimitsConfig, ...] = ()
    authorities: tuple[CertAuthorityConfig, ...] = ()
    expires: float | None = None  # the entry's own expiry and from (for trusted_user_ca)
    sources: str | None = None


def read_lifecycle(sec: Section, name: str, keys: list[str]) -> Lifecycle:
    """The entry's ``expiry``/``from`` (applied to each of ``keys``) and its certificate
    authorities with their ``principals``."""
    expires = _expiry(sec)
    sources = sec.string("from")
    if sources is not None:
        try:
            from_patterns(sources)
        except KeyOptionError as e:
            raise sec.error("from", str(e), "a comma-separated list of address patterns "
                            "(* and ? wildcards, CIDR blocks, ! to refuse), e.g. "
                            + sec.examples["from"]) from None
    cas = [line.strip() for line in sec.strings("cert_authorities")]
    _each(sec, "cert_authorities", grammar.public_key, cas)
    principals = sec.strings("principals")
    if principals and not cas:
        raise sec.error("principals", "principals is only for certificates",
                        "add cert_authorities = [...] to this entry, or remove principals")
    for j, principal in enumerate(principals):
        if any(c.isspace() or c in ',"' for c in principal) or len(principal) > 256:
            raise ConfigError(sec.source, f"{sec.keypath('principals')}[{j}]",
                              f"principal {principal[:40]!r} is not valid",
                              "up to 256 characters, no spaces, commas or quotes")
    limits = tuple(KeyLimitsConfig(key, expires, sources) for key in keys
                   if expires is not None or sources is not None)
    where = f"{sec.source}: {sec.keypath('cert_authorities')}"
    authorities = tuple(
        CertAuthorityConfig(ca, tuple(dict.fromkeys(principals or [name])), expires,
                            sources, f"{where}[{j}]")
        for j, ca in enumerate(cas))
    return Lifecycle(limits, authorities, expires, sources)


def _expiry(sec: Section) -> float | None:
    """``expiry``: OpenSSH's ``YYYYMMDD[HHMM[SS]][Z]`` text, or a TOML date or date-time
    (local time without an offset, as OpenSSH reads a time without ``Z``)."""
    value = sec.data.get("expiry")
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.timestamp()  # naive: local time, like OpenSSH without Z
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day).timestamp()
    if not isinstance(value, str):
        raise sec.error("expiry", f"expected a string or a TOML date-time, got {describe(value)}")
    try:
        return parse_expiry(value)
    except KeyOptionError as e:
        raise sec.error("expiry", str(e)) from None
