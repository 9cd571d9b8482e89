"""OpenSSH's ``-o Option=Value`` and time/number/path forms, as ``labrelay agent`` reads them.

Part of the ``labrelay agent`` command line (:mod:`relay.config.agentargs`): the
per-flag readers and :class:`_Flags`, what the flags say about one link, each value
with the flag it came from (an error names that flag).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from relay.config.errors import ConfigError
from relay.config.schema import LocalForward, RemoteForward
from relay.config.transport import OPTION_KEYS, claim_option

CLI = "command line"

_log = Logger()

_SUPPORTED = {
    name.lower(): name
    for name in (
        "ConnectTimeout",
        "ExitOnForwardFailure",
        "GlobalKnownHostsFile",
        "IdentityFile",
        "Port",
        "ServerAliveCountMax",
        "ServerAliveInterval",
        "StrictHostKeyChecking",
        "User",
        "UserKnownHostsFile",
        *OPTION_KEYS,
    )
}
_OPTION_RE = re.compile(r"\s*([A-Za-z]+)\s*(?:=\s*|\s+)(.*?)\s*\Z")
# Every group but the last has its unit, so there is one way to match a string: no
# backtracking blow-up (the old "(?:[0-9]+[smhdw]?)+" took seconds on 30 digits and a
# letter; found by tests/fuzz agent_option).
_TIME_RE = re.compile(r"(?:[0-9]+[smhdwSMHDW])*[0-9]*\Z")
_MAX_SECONDS = 2**31 - 1  # OpenSSH's convtime() limit (INT_MAX)
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class _Flags:
    """What the command line says about one link, each value with the flag it came from."""

    origin: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    user: str | None = None
    known_hosts: tuple[Path, ...] | None = None  # UserKnownHostsFile; () for none
    global_known_hosts: tuple[Path, ...] | None = None  # GlobalKnownHostsFile; () for none
    accept_new: bool | None = None
    fingerprint: str | None = None
    keepalive_interval: float | None = None
    keepalive_count: int | None = None
    connect_timeout: float | None = None
    fast_path_pool: int | None = None
    identities: list[Path] = field(default_factory=list)
    # -o Transport, TLSPort, ...: the raw text by TOML key (relay.config.transport)
    transport: dict[str, tuple[str, str]] = field(default_factory=dict)
    remote: list[tuple[RemoteForward, str]] = field(default_factory=list)
    local: list[tuple[LocalForward, str]] = field(default_factory=list)

    def claim(self, attr: str, value: object, keypath: str) -> None:
        """Set a single-valued setting; two flags giving it different values is an error."""
        previous = getattr(self, attr)
        if previous is not None and previous != value:
            raise ConfigError(
                CLI,
                keypath,
                f"{value} conflicts with {previous} from {self.origin[attr]}",
                "give each setting once",
            )
        setattr(self, attr, value)
        self.origin.setdefault(attr, keypath)

    def touches_link(self) -> bool:
        return bool(self.origin or self.identities or self.remote or self.local
                    or self.transport)


def _int(text: str, keypath: str, low: int, high: int, example: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ConfigError(CLI, keypath, f"expected a number, got {text!r}", f"e.g. {example}")
    # int() refuses strings of more than 4300 digits (ValueError): compare lengths first.
    digits = text.lstrip("0")
    value = int(digits or "0") if len(digits) <= 18 else None
    if value is None or not low <= value <= high:
        got = value if value is not None else f"{digits[:20]}... ({len(digits)} digits)"
        raise ConfigError(
            CLI, keypath, f"must be between {low} and {high}, got {got}", f"e.g. {example}"
        )
    return value


def _seconds(text: str, keypath: str, example: str) -> int:
    """OpenSSH's time format: ``30``, ``30s``, ``5m``, ``1h30m``."""
    if not text or not _TIME_RE.match(text):
        raise ConfigError(
            CLI, keypath, f"expected seconds or a time like 1m30s, got {text!r}", f"e.g. {example}"
        )
    total = 0
    for n, unit in re.findall(r"([0-9]+)([a-zA-Z]?)", text):
        digits = n.lstrip("0")
        if len(digits) > 10:  # int() refuses more than 4300 digits; this is far past the cap
            total = _MAX_SECONDS + 1
            break
        total += int(digits or "0") * _TIME_UNITS[unit.lower()]
    if total > _MAX_SECONDS:
        raise ConfigError(
            CLI, keypath, f"{text!r} is more than {_MAX_SECONDS} seconds", f"e.g. {example}"
        )
    return total


def _cli_path(text: str, keypath: str = "-i") -> Path:
    try:
        return Path(text).expanduser().absolute()
    except RuntimeError:  # "~nobody/key": no such user (found by tests/fuzz agent_option)
        raise ConfigError(
            CLI, keypath, f"cannot expand {text[:100]!r}: no such user's home directory",
            "give the path without ~user, or with ~ for your own home",
        ) from None


def _yes_no(text: str, keypath: str) -> bool:
    value = text.lower()
    if value not in ("yes", "no", "true", "false"):
        raise ConfigError(CLI, keypath, f"expected yes or no, got {text!r}", "e.g. yes")
    return value in ("yes", "true")


def _option(flags: _Flags, text: str) -> None:
    if "\x00" in text:  # a path with one makes pathlib raise ValueError
        raise ConfigError(CLI, "-o", "a NUL character in an option", "remove it")
    match = _OPTION_RE.match(text)
    if match is None or not match.group(2):
        raise ConfigError(
            CLI,
            f"-o {text!r}",
            "expected Option=Value",
            "e.g. -o ServerAliveInterval=15 or -o 'ServerAliveInterval 15'",
        )
    key, value = match.group(1), match.group(2)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    name = _SUPPORTED.get(key.lower())
    if name is None:
        close = difflib.get_close_matches(key.lower(), list(_SUPPORTED), n=1, cutoff=0.6)
        hint = f"did you mean {_SUPPORTED[close[0]]}? " if close else ""
        if "fingerprint" in key.lower() or key.lower() == "hostkey":
            hint = "to pin the server's key use --host-key SHA256:...; "
        raise ConfigError(
            CLI,
            f"-o {key}",
            f"unsupported option {key!r}",
            hint + "supported: " + ", ".join(sorted(_SUPPORTED.values())),
        )
    keypath = f"-o {name}"
    if name == "Port":
        flags.claim("port", _int(value, keypath, 1, 65535, "-o Port=2222"), keypath)
    elif name == "User":
        flags.claim("user", value, keypath)
    elif name == "IdentityFile":
        flags.identities.append(_cli_path(value, keypath))
    elif name in ("UserKnownHostsFile", "GlobalKnownHostsFile"):
        attr = "known_hosts" if name == "UserKnownHostsFile" else "global_known_hosts"
        flags.claim(attr, _known_hosts_files(value, keypath), keypath)
    elif name == "StrictHostKeyChecking":
        flags.claim("accept_new", _strict(value, keypath), keypath)
    elif name == "ServerAliveInterval":
        seconds = _seconds(value, keypath, "-o ServerAliveInterval=15")
        flags.claim("keepalive_interval", float(seconds), keypath)
    elif name == "ServerAliveCountMax":
        count = _int(value, keypath, 1, 2**31 - 1, "-o ServerAliveCountMax=3")
        flags.claim("keepalive_count", count, keypath)
    elif name == "ConnectTimeout":
        seconds = _seconds(value, keypath, "-o ConnectTimeout=15")
        if seconds == 0:
            raise ConfigError(CLI, keypath, "must be more than 0 seconds", "e.g. 15")
        flags.claim("connect_timeout", float(seconds), keypath)
    elif name in OPTION_KEYS:
        claim_option(flags.transport, OPTION_KEYS[name], value, keypath, CLI)
    elif name == "ExitOnForwardFailure":
        _yes_no(value, keypath)
        _log.info(
            "ExitOnForwardFailure is ignored: labrelay keeps the link up and retries a "
            "forward that failed, with backoff (see status)"
        )


def _known_hosts_files(value: str, keypath: str) -> tuple[Path, ...]:
    """ssh's list of known_hosts files: paths separated by spaces, or ``none`` for no
    file at all (ssh.c; never a file named ``none`` in the current directory)."""
    names = value.split()
    if any(n.lower() == "none" for n in names):
        if len(names) > 1:
            raise ConfigError(
                CLI,
                keypath,
                f"'none' appears with other files in {value!r} (ssh refuses this too)",
                f"give either none or the files, e.g. {keypath}=~/.ssh/known_hosts",
            )
        return ()
    return tuple(_cli_path(n, keypath) for n in names)


def _strict(value: str, keypath: str) -> bool:
    """StrictHostKeyChecking: ``yes`` -> False, ``accept-new`` -> True; never ``no``."""
    lowered = value.lower()
    if lowered in ("yes", "true"):
        return False
    if lowered == "accept-new":
        return True
    if lowered in ("no", "off", "false"):
        raise ConfigError(
            CLI,
            keypath,
            f"{value!r} is refused: an unattended agent that trusts any host key would hand "
            "its forwards to whoever intercepts the connection",
            "use StrictHostKeyChecking=accept-new to trust and record the key on first "
            "connection, or pin it with --host-key SHA256:...",
        )
    if lowered == "ask":
        raise ConfigError(
            CLI,
            keypath,
            "'ask' is not possible: the agent runs unattended",
            "use StrictHostKeyChecking=accept-new or --host-key SHA256:...",
        )
    raise ConfigError(CLI, keypath, f"expected yes or accept-new, got {value!r}", "e.g. yes")
