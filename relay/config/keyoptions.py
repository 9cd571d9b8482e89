"""The syntax of OpenSSH's key options ``expiry-time=`` and ``from=``, shared by the grant
files (:mod:`relay.server.grantfile`) and the TOML tables (``expiry``/``from`` in
``[[relay.user]]``/``[[relay.agent]]``).  Matching them against a time and a peer is
:mod:`relay.core.keylife`'s job; this module only reads the text, so that a wrong value
is a config error naming its file and key."""

from __future__ import annotations

import calendar
import ipaddress
import re
import time

_EXPIRY_RE = re.compile(r"([0-9]{8})([0-9]{4})?([0-9]{2})?([zZ])?\Z")


class KeyOptionError(ValueError):
    """An option's value that is not valid (its message says how to write it)."""


def parse_expiry(text: str) -> float:
    """``expiry-time``'s value (``YYYYMMDD[HHMM[SS]][Z]``: local time unless it ends in
    ``Z``, as OpenSSH reads it) as a Unix time (seconds)."""
    match = _EXPIRY_RE.match(text.strip())
    if match is None:
        raise KeyOptionError(f"expiry-time {text!r} must be YYYYMMDD[HHMM[SS]][Z]")
    date, hm, sec, utc = match.groups()
    digits = date + (hm or "0000") + (sec or "00")
    try:
        parts = time.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        raise KeyOptionError(f"expiry-time {text!r} is not a valid date and time") from None
    if utc:
        return float(calendar.timegm(parts))
    return time.mktime(parts)


def from_patterns(text: str) -> tuple[tuple[bool, str], ...]:
    """``from=``'s comma-separated patterns as (negated, pattern) pairs, patterns
    lower-cased; a CIDR block must be valid and no pattern may be empty."""
    patterns = []
    for raw in text.split(","):
        item = raw.strip()
        negated = item.startswith("!")
        pattern = item[1:] if negated else item
        if not pattern:
            raise KeyOptionError(f"from={text!r} has an empty pattern")
        if "/" in pattern:
            try:
                ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                raise KeyOptionError(f"from= pattern {pattern!r} is not a valid CIDR block"
                                     ) from None
        patterns.append((negated, pattern.lower()))
    return tuple(patterns)
