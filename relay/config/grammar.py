"""OpenSSH-style syntax, with no file or key path: what one string in a config means.

``host:port`` and ``[v6]:port``, ``[bind:]port`` listen addresses, ``-R``/``-L``
forward specs and the names forwards get by default, host names and SHA256
fingerprints, service names and grants (``gpu-cluster:22``, ``jupyter:*``), OpenSSH
public-key lines (as in ``authorized_keys``), principal names and bind addresses.

Two levels, so that the TOML file, the command line and the grant files share one
grammar: the plain functions (``host_port``, ``service_grant``, ...) raise
:class:`~relay.config.errors.Bad` (a problem and a hint); the ``parse_*`` functions
take the ``source`` and ``keypath`` and raise a located
:class:`~relay.config.errors.ConfigError`.  Most are made by one factory,
:func:`_locating`, from the plain function (they were a dozen copies of one shape);
the few that take more than the text are written out.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from relay.config.errors import Bad, ConfigError, located
from relay.config.schema import (
    LOCAL_DEFAULT_BIND,
    REMOTE_DEFAULT_BIND,
    AdminConfig,
    ForwardKind,
    HostPort,
    LocalForward,
    RemoteForward,
    ServiceGrant,
)

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

EXAMPLE_FINGERPRINT = "SHA256:BeHN8bwL5c7UYHejLShGY4MwHbRq5hkifsdbZtrio6k"
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}\Z")
_NAME_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,100}\Z")
_PORT_RE = re.compile(r"[0-9]+\Z")

_LISTEN_HINT = 'use "[bind:]port", e.g. "2201", "0.0.0.0:2201", "gpu-cluster:22", "[::1]:2201"'
_CONNECT_HINT = 'use "host:port", e.g. "10.0.0.5:22", "localhost:8888", "[::1]:22"'


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_hostport(text: str, hint: str) -> tuple[str | None, str]:
    """``host:port`` / ``[v6]:port`` / ``port`` -> (host or None, port text).

    An unbracketed host is a name, an IPv4 literal, ``*`` or empty; a bracketed one
    must be an IPv6 literal and is returned without its brackets."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise Bad(f"unclosed '[' in {text!r}", hint)
        host, rest = text[1:close], text[close + 1 :]
        if not _is_ipv6(host):
            raise Bad(f"[{host}] is not an IPv6 address", hint)
        if not rest.startswith(":"):
            raise Bad(f"expected ':port' after ']' in {text!r}", hint)
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        return None, text
    if ":" in host or "[" in host or "]" in host:
        raise Bad(f"{text!r}: an IPv6 address must be in brackets", hint)
    if host not in ("", "*") and not _HOST_RE.match(host):
        raise Bad(f"{host!r} is not a host name or IP address", hint)
    return host, port


def _port(text: str, low: int, hint: str) -> int:
    if not _PORT_RE.match(text):
        raise Bad(f"port {text[:40]!r} is not a number", hint)
    # int() raises ValueError past 4300 digits: anything past 5 is out of range anyway.
    digits = text.lstrip("0")
    if len(digits) > 5:
        raise Bad(f"port {digits[:20]}... is out of range {low}..65535", hint)
    port = int(digits or "0")
    if not low <= port <= 65535:
        raise Bad(f"port {port} is out of range {low}..65535", hint)
    return port


def listen_address(text: str, default_bind: str) -> tuple[str, int]:
    if not text:
        raise Bad("empty listen address", _LISTEN_HINT)
    host, port_text = _split_hostport(text, _LISTEN_HINT)
    return (default_bind if host is None else host), _port(port_text, 0, _LISTEN_HINT)


def host_port(text: str) -> HostPort:
    """Parse ``host:port`` (``[v6]:port``); port 1..65535."""
    if not text:
        raise Bad("empty address", _CONNECT_HINT)
    host, port_text = _split_hostport(text, _CONNECT_HINT)
    if host is None:
        missing = "host" if _PORT_RE.match(text) else "port"
        raise Bad(f"{text!r} has no {missing}", _CONNECT_HINT)
    if host in ("", "*"):
        raise Bad(f"{text!r} has no host", _CONNECT_HINT)
    return HostPort(host, _port(port_text, 1, _CONNECT_HINT))


def _split_colons(text: str, hint: str) -> list[str]:
    """Split on ``:`` outside ``[...]``, keeping the brackets in the fields."""
    fields: list[str] = []
    current: list[str] = []
    inside = False
    for ch in text:
        if ch == ":" and not inside:
            fields.append("".join(current))
            current = []
            continue
        if ch == "[":
            if inside:
                raise Bad(f"nested '[' in {text!r}", hint)
            inside = True
        elif ch == "]":
            inside = False
        current.append(ch)
    if inside:
        raise Bad(f"unclosed '[' in {text!r}", hint)
    fields.append("".join(current))
    return fields


def default_forward_name(kind: ForwardKind, bind: str, port: int) -> str:
    """The name a forward gets when none is given: ``R:2201``, ``R:gpu-cluster:22``,
    ``L:8888`` (default bind), ``L:0.0.0.0:8888``; an empty bind reads ``*``."""
    if kind == "remote":
        default = REMOTE_DEFAULT_BIND
        prefix = "R"
    else:
        default = LOCAL_DEFAULT_BIND
        prefix = "L"
    if bind == default:
        return f"{prefix}:{port}"
    return f"{prefix}:{bracket(bind) if bind else '*'}:{port}"


def forward(spec: str, kind: ForwardKind) -> RemoteForward | LocalForward:
    flag = "-R" if kind == "remote" else "-L"
    hint = (
        f"use [bind:]port:host:hostport, e.g. {flag} 2201:localhost:22"
        f" or {flag} [::1]:2201:[::1]:22"
    )
    if "/" in spec:
        raise Bad("Unix-domain socket forwards are not supported", hint)
    fields = _split_colons(spec, hint)
    if len(fields) == 1 and _PORT_RE.match(spec):
        raise Bad(f"{flag} PORT alone (a SOCKS proxy) is not supported", hint)
    if len(fields) not in (3, 4):
        raise Bad(f"expected 3 or 4 ':'-separated fields in {spec!r}, got {len(fields)}", hint)
    default_bind = REMOTE_DEFAULT_BIND if kind == "remote" else LOCAL_DEFAULT_BIND
    try:
        bind, port = listen_address(":".join(fields[:-2]), default_bind)
        connect = host_port(":".join(fields[-2:]))
    except Bad as e:
        raise Bad(e.problem, hint) from None
    name = default_forward_name(kind, bind, port)
    if kind == "remote":
        return RemoteForward(bind, port, connect, name)
    return LocalForward(bind, port, connect, name)


def host_name(text: str) -> str:
    """Check a server host name or IP literal (``[v6]`` loses its brackets)."""
    hint = 'give a host name or IP address, e.g. "cloud.example.org", "203.0.113.7", "::1"'
    if "@" in text:
        raise Bad(f"{text!r} contains '@'", hint + "; give the user separately")
    if text.startswith("[") and text.endswith("]") and _is_ipv6(text[1:-1]):
        return text[1:-1]
    if _is_ipv6(text) or _HOST_RE.match(text):
        return text
    if ":" in text:
        raise Bad(f"{text!r} is not a host name (a port is given separately)", hint)
    raise Bad(f"{text!r} is not a host name or IP address", hint)


def fingerprint(text: str) -> str:
    """Check a pinned host key fingerprint: ``SHA256:`` + 43 base64 characters."""
    hint = (
        "give the SHA256 fingerprint as `ssh-keygen -lf KEY.pub` prints it,"
        f" e.g. {EXAMPLE_FINGERPRINT}"
    )
    body = text.removeprefix("SHA256:")
    if body == text:
        if text.startswith("MD5:") or re.fullmatch(r"([0-9a-fA-F]{2}:){15}[0-9a-fA-F]{2}", text):
            raise Bad("MD5 fingerprints are not accepted", hint)
        raise Bad(f"{text!r} does not start with 'SHA256:'", hint)
    if not re.fullmatch(r"[A-Za-z0-9+/]{43}", body):
        raise Bad(f"{text!r} is not 'SHA256:' followed by 43 base64 characters", hint)
    try:
        digest = base64.b64decode(body + "=", validate=True)
    except binascii.Error:
        raise Bad(f"{text!r} is not valid base64", hint) from None
    if base64.b64encode(digest).decode().rstrip("=") != body:
        raise Bad(f"{text!r} is not a SHA256 digest (check its last character)", hint)
    return text


def object_name(text: str) -> str:
    """Check a link or forward name: 1..100 characters, no spaces or control characters."""
    if not _NAME_RE.match(text):
        raise Bad(
            f"name {text!r} must be 1..100 characters without spaces or control characters",
            'e.g. name = "gpu-ssh"',
        )
    return text


_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")
_NUMERIC_RE = re.compile(r"[0-9.]+\Z")
WILDCARD_BINDS = frozenset({"", "*", "0.0.0.0", "::"})
_AGENT_SERVICE_HINT = 'use "name:port" or "name:*", e.g. "gpu-cluster:22", "tensorboard:*"'
_USER_SERVICE_HINT = (
    'use "name:port", "name:*", "*:port" or "*" (every service), e.g. "gpu-cluster:22", '
    '"jupyter:*"'
)
_KEY_HINT = (
    "give one line of a .pub file, e.g. "
    '"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... lab_pc" (labrelay keygen makes one)'
)
_PUBLIC_BIND_HINT = 'give an IP address, e.g. public_bind = "0.0.0.0" (every interface)'


def service_name(text: str, hint: str) -> str:
    """A service name as agents register it and users ask for it, lower-cased."""
    if not _SERVICE_RE.match(text):
        raise Bad(
            f"service name {text!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-'",
            hint,
        )
    if _NUMERIC_RE.match(text):
        raise Bad(
            f"service name {text!r} looks like an address: the relay reaches named services, "
            "never addresses",
            hint,
        )
    lowered = text.lower()
    if lowered == "localhost":
        raise Bad("'localhost' cannot be a service name: it would read as the relay itself", hint)
    return lowered


def service_grant(text: str, kind: str) -> ServiceGrant:
    """``name:port``, ``name:*``; for users also ``*:port``, ``*:*`` and ``*``."""
    hint = _USER_SERVICE_HINT if kind == "user" else _AGENT_SERVICE_HINT
    if text == "*" and kind == "user":
        return ServiceGrant("*", None)
    name, sep, port_text = text.rpartition(":")
    if not sep:
        raise Bad(f"{text!r} has no ':port'", hint)
    if name == "*":
        if kind != "user":
            raise Bad(
                "an agent is granted names one by one: '*' would let it claim every name",
                hint,
            )
    elif name.startswith("[") or ":" in name:
        raise Bad(f"{text!r}: the relay grants named services, never addresses", hint)
    else:
        name = service_name(name, hint)
    port = None if port_text == "*" else _port(port_text, 1, hint)
    return ServiceGrant(name, port)


def public_key(text: str) -> tuple[bytes, str]:
    """Parse an OpenSSH public-key line (``TYPE BASE64 [comment]``) into (SSH wire blob,
    comment); the declared type must match the key data, and certificates and DSA keys
    are refused.  The blob is what the relay compares a verified signature's key with."""
    from twisted.conch.ssh.keys import Key

    if "PRIVATE KEY" in text:
        raise Bad("this is a private key: never give it to the relay", _KEY_HINT)
    fields = text.split(None, 2)
    if len(fields) < 2:
        raise Bad(f"expected 'TYPE BASE64 [comment]', got {text[:60]!r}", _KEY_HINT)
    key_type, body = fields[0], fields[1]
    comment = fields[2].strip() if len(fields) == 3 else ""
    if "-cert-" in key_type:
        raise Bad(f"certificates ({key_type}) are not supported", _KEY_HINT)
    if key_type == "ssh-dss":
        raise Bad("DSA keys are obsolete and refused", _KEY_HINT)
    try:
        blob = base64.b64decode(body, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII str (tests/fuzz grant_file)
        raise Bad(f"the key data {body[:20]!r}... is not base64", _KEY_HINT) from None
    try:
        key = Key.fromString(blob, type="blob")
        parsed_type = key.sshType().decode("ascii")
        canonical = key.blob()
    except Exception:  # Conch raises many kinds on hostile bytes; all mean "not a key"
        raise Bad(f"not a valid {key_type} public key (damaged when copied?)", _KEY_HINT) from None
    if parsed_type != key_type:
        raise Bad(f"the line says {key_type} but the key data is {parsed_type}", _KEY_HINT)
    if key.type() == "RSA" and key.size() < 1024:
        raise Bad(f"an RSA key of {key.size()} bits is too weak", _KEY_HINT)
    return canonical, comment


def principal_name(text: str) -> str:
    """Check an agent's or user's name: 1..100 characters, no spaces or control characters."""
    if not _NAME_RE.match(text):
        raise Bad(
            f"name {text!r} must be 1..100 characters without spaces or control characters",
            'e.g. name = "lab_pc"',
        )
    return text


def bind_address(text: str) -> str:
    """The address public ports listen on: an IP literal (``*``/empty = ``0.0.0.0``)."""
    if text in ("", "*"):
        return "0.0.0.0"
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text == "localhost":
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise Bad(f"{text!r} is not an IP address", _PUBLIC_BIND_HINT) from None
    return text




_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]i?)?[bB]?(?:/s)?\Z")
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9,
               "ki": 2**10, "mi": 2**20, "gi": 2**30}
_RATE_HINT = 'bytes per second, e.g. "20MB" (20 000 000), "512KiB", "1.5GB/s" or 20000000'


def byte_rate(text: str) -> int:
    """A number of bytes (per second, for a rate): ``20MB``, ``512KiB``, ``1.5G``, ``100``.
    Decimal prefixes are powers of 1000 (as ``scp`` and ``iperf`` print), ``Ki``/``Mi``/``Gi``
    of 1024; a trailing ``B`` and ``/s`` are optional."""
    match = _RATE_RE.match(text.strip())
    if match is None:
        raise Bad(f"{text!r} is not an amount of bytes", _RATE_HINT)
    value = float(match.group(1)) * _RATE_UNITS[(match.group(2) or "").lower()]
    if not 1 <= value <= 10**12:
        raise Bad(f"{text!r} must be between 1 byte and 1 TB", _RATE_HINT)
    return int(value)


def share_weight(text: str) -> float:
    """A user's share of a congested link relative to others: a number in 0.01..100."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 100:
        raise Bad(f"share {text!r} must be a number between 0.01 and 100",
                  'e.g. share="2" (twice what a user with the default share of 1 gets)')
    return value


def default_plain_forward_name(bind: str, port: int) -> str:
    """``P:2201`` (default bind), ``P:0.0.0.0:2201``; an empty bind reads ``*``."""
    if bind == LOCAL_DEFAULT_BIND:
        return f"P:{port}"
    return f"P:{bracket(bind) if bind else '*'}:{port}"


class Located(Protocol[R_co]):
    """A grammar function given the place its text was written (:func:`_locating`)."""

    def __call__(self, text: str, *, source: str, keypath: str) -> R_co: ...


def _locating(parse: Callable[[str], R]) -> Located[R]:
    """``parse`` (which raises :class:`Bad`) as ``parse_x(text, *, source, keypath)``,
    which raises a ConfigError at ``keypath``: the one shape of every ``parse_*``."""

    def parse_at(text: str, *, source: str, keypath: str) -> R:
        with located(source, keypath):
            result = parse(text)
        return result

    parse_at.__doc__ = parse.__doc__
    return parse_at


def _service_name_alone(text: str) -> str:
    """Check a service name (``gpu-cluster``) and return it lower-cased."""
    return service_name(text, 'e.g. "gpu-cluster"')


parse_hostport = _locating(host_port)
parse_host = _locating(host_name)
parse_fingerprint = _locating(fingerprint)
parse_name = _locating(object_name)
parse_service_name = _locating(_service_name_alone)
parse_public_key = _locating(public_key)
parse_principal_name = _locating(principal_name)
parse_public_bind = _locating(bind_address)
parse_byte_rate = _locating(byte_rate)
parse_share = _locating(share_weight)


def parse_listen(text: str, *, source: str, keypath: str, default_bind: str) -> tuple[str, int]:
    """Parse ``[bind:]port`` into ``(bind, port)``; port 0..65535 (0 = allocate).

    The bind address is kept as written (``"*"`` stays ``"*"``; ``[::1]`` loses its
    brackets); ``default_bind`` is used when there is none, and ``":2201"`` gives
    ``""`` explicitly."""
    with located(source, keypath):
        result = listen_address(text, default_bind)
    return result


def parse_forward_spec(
    spec: str, kind: ForwardKind, *, source: str, keypath: str
) -> RemoteForward | LocalForward:
    """Parse OpenSSH's ``[bind:]port:host:hostport`` (IPv6 in brackets) as given to
    ``-R`` (``kind="remote"``, default bind ``"localhost"`` as ssh(1) sends) or ``-L`` (default bind
    ``127.0.0.1``).  The forward gets its default name (:func:`default_forward_name`)."""
    with located(source, keypath):
        result = forward(spec, kind)
    return result


def parse_service_grant(text: str, kind: str, *, source: str, keypath: str) -> ServiceGrant:
    """Parse a grant of a service: ``name:port`` / ``name:*`` (agents and users) or
    ``*:port`` / ``*`` (users only).  The name is lower-cased."""
    with located(source, keypath):
        result = service_grant(text, kind)
    return result


def parse_relay_listen(text: str, *, source: str, keypath: str) -> HostPort:
    """``[addr:]port`` of the relay's SSH server; no address (or ``*``) = ``0.0.0.0``."""
    bind, port = parse_listen(text, source=source, keypath=keypath, default_bind="0.0.0.0")
    return HostPort(bind if bind not in ("", "*") else "0.0.0.0", port)


def parse_admin_listen(text: str, *, source: str, keypath: str,
                       token_file: Path | None = None) -> AdminConfig:
    """``[addr:]port`` of the admin endpoint.  Without a ``token_file`` only loopback
    addresses are allowed (it would have no authentication at all); with one, any
    address (scrapers on other hosts present the bearer token)."""
    bind, port = parse_listen(text, source=source, keypath=keypath,
                              default_bind=LOCAL_DEFAULT_BIND)
    loopback = bind == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(bind).is_loopback
        except ValueError:
            loopback = False
    if not loopback and token_file is None:
        raise ConfigError(
            source, keypath,
            f"the admin endpoint must listen on a loopback address, not {bind or '*'!r}, "
            "unless it requires a bearer token",
            'e.g. listen = "127.0.0.1:7022"; reach it from elsewhere through SSH, or set '
            '[admin] token_file = "/etc/labrelay/admin.token" (mode 0600)',
        )
    return AdminConfig(HostPort(bind, port), token_file)
