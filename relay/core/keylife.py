"""When and from where a key may be used: OpenSSH's ``expiry-time=`` and ``from=`` (sans-IO).

The grant files carry these options on a key's line as ``authorized_keys`` does
(sshd(8), "AUTHORIZED_KEYS FILE FORMAT"); certificates carry the same two limits as
their validity window and their ``source-address`` critical option.  Everything here
is a pure function of the text, the time given and the peer's address:

* ``expiry-time="YYYYMMDD[HHMM[SS]][Z]"``: the key is refused from that time on; local
  time unless it ends in ``Z`` (UTC), as OpenSSH reads it;
* ``from="pattern-list"``: comma-separated patterns matched against the peer's address
  (the relay does no reverse DNS, like sshd's default ``UseDNS no``): ``*`` and ``?``
  wildcards, CIDR blocks (``10.0.0.0/8``), and a ``!`` in front negates: any negated
  match refuses, else any match allows, else the key is refused;
* ``source-address`` (a certificate's critical option): a comma-separated list of
  addresses and CIDR blocks; the peer must be in one.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import time
from dataclasses import dataclass

from relay.config.keyoptions import KeyOptionError, from_patterns, parse_expiry

__all__ = ["FromPatterns", "KeyLimits", "KeyOptionError", "parse_expiry", "parse_from",
           "source_address_allows"]


@dataclass(frozen=True)
class FromPatterns:
    """A parsed ``from=`` list."""

    text: str
    patterns: tuple[tuple[bool, str], ...]  # (negated, pattern)

    def allows(self, address: str) -> bool:
        """Whether a peer at ``address`` (an IP literal) may use the key."""
        allowed = False
        for negated, pattern in self.patterns:
            if _matches(pattern, address):
                if negated:
                    return False
                allowed = True
        return allowed


def parse_from(text: str) -> FromPatterns:
    """A ``from=`` list, or :class:`KeyOptionError` saying what is wrong with it."""
    return FromPatterns(text, from_patterns(text))


def _matches(pattern: str, address: str) -> bool:
    if "/" in pattern:
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(address.lower(), pattern)


def source_address_allows(value: str, address: str) -> bool:
    """A certificate's ``source-address``: ``address`` is in one of the listed blocks."""
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    for item in value.split(","):
        try:
            if peer in ipaddress.ip_network(item.strip(), strict=False):
                return True
        except ValueError:
            continue  # a malformed entry allows nobody
    return False


@dataclass(frozen=True)
class KeyLimits:
    """What limits one key line: ``expiry-time`` (Unix time or None) and ``from=``."""

    expires: float | None = None
    sources: FromPatterns | None = None

    def refusal(self, now: float, address: str) -> str | None:
        """Why the key may not be used now from ``address``; None if it may."""
        if self.expires is not None and now >= self.expires:
            return f"key expired at {_utc(self.expires)} (expiry-time)"
        if self.sources is not None and not self.sources.allows(address):
            return f"connection from {address} not allowed by from=\"{self.sources.text}\""
        return None


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
