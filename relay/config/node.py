"""The node configuration: frozen, typed objects parsed from one TOML file per node.

Every error names the file, the key path (``link[0].remote[1].connect``) and what
would be valid, so an operator can fix a file without reading code.  Nothing
starts on a bad file: parsing is complete before any service is built.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import getpass
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_WINDOW = 2 * 1024 * 1024
DEFAULT_MAX_PACKET = 32 * 1024


class ConfigError(Exception):
    """A configuration problem, with where it is and how to fix it.

    ``str(err)`` reads ``FILE: KEYPATH: PROBLEM (HINT)``; the CLI prints it and
    exits with status 2.
    """

    def __init__(self, source: str, keypath: str, problem: str, hint: str = "") -> None:
        self.source = source
        self.keypath = keypath
        self.problem = problem
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: {self.keypath}: " if self.keypath else f"{self.source}: "
        return where + self.problem + (f" ({self.hint})" if self.hint else "")


@dataclass(frozen=True)
class HostPort:
    """A TCP destination or listen address.  ``host`` may be a name or an IP literal."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteForward:
    """``-R [bind:]port:host:hostport``: the server listens on ``bind:port`` and every
    connection it accepts is connected, by this node, to ``connect``.

    ``bind`` is sent as-is in the ``tcpip-forward`` request: ``""`` lets the server
    choose (OpenSSH: loopback unless GatewayPorts), ``"0.0.0.0"``/``"*"`` ask for all
    interfaces, and a name registers a named service on a labrelay relay.
    ``port == 0`` asks the server to allocate a port; the bound port is logged.
    """

    bind: str
    port: int
    connect: HostPort
    name: str
    via_relay: bool = False  # ``connect`` names a service registered at this node's relay


@dataclass(frozen=True)
class LocalForward:
    """``-L [bind:]port:host:hostport``: this node listens on ``bind:port`` and every
    connection is carried over the link to ``connect`` as seen from the server.
    ``port == 0`` picks a free port (logged)."""

    bind: str
    port: int
    connect: HostPort
    name: str


@dataclass(frozen=True)
class HostKeyPolicy:
    """How the server's host key is verified.

    ``fingerprint`` (``SHA256:...``, as ``ssh-keygen -lf`` prints it) pins one key;
    otherwise ``known_hosts`` (OpenSSH format, hashed entries too) is consulted.
    ``accept_new`` (OpenSSH's ``StrictHostKeyChecking=accept-new``) records the key of a
    host that has no entry yet; a *changed* key is always refused.
    """

    known_hosts: Path | None = None
    fingerprint: str | None = None
    accept_new: bool = False


@dataclass(frozen=True)
class Keepalive:
    """SSH keepalives (``keepalive@openssh.com``, want-reply): one every ``interval``
    seconds; the link is declared dead after ``count_max`` unanswered ones
    (OpenSSH's ServerAliveInterval/ServerAliveCountMax).  ``interval == 0`` disables."""

    interval: float = 15.0
    count_max: int = 3


@dataclass(frozen=True)
class Backoff:
    """Reconnect/retry delays: ``initial * factor**n`` capped at ``maximum``, plus jitter
    of up to ``jitter`` times the delay.  Retries never stop."""

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 1.5
    jitter: float = 0.2


@dataclass(frozen=True)
class LinkConfig:
    """One upstream SSH server and the forwards carried over the link to it."""

    name: str
    host: str
    port: int = 22
    user: str = ""
    identities: tuple[Path, ...] = ()
    host_key: HostKeyPolicy = field(default_factory=HostKeyPolicy)
    keepalive: Keepalive = field(default_factory=Keepalive)
    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout: float = 15.0
    local_wait: float = 10.0
    window: int = DEFAULT_WINDOW
    max_packet: int = DEFAULT_MAX_PACKET
    fast_path_pool: int = 4  # idle data connections to a labrelay relay; 0 = no fast path
    remote: tuple[RemoteForward, ...] = ()
    local: tuple[LocalForward, ...] = ()


@dataclass(frozen=True)
class AdminConfig:
    """The status endpoint (HTTP).  It answers only requests addressed to itself (the
    ``Host`` header, against DNS rebinding); with ``token_file`` it also requires
    ``Authorization: Bearer <token>``, and only then may it listen beyond loopback."""

    listen: HostPort
    token_file: Path | None = None


@dataclass(frozen=True)
class ServiceGrant:
    """A service pattern in a grant: ``name:port``, or ``name:*`` (``port is None``).

    Names are stored lower-case (ssh lower-cases host names, so ``-J`` asks for
    ``gpu-cluster`` whatever was typed).  In a user's grant the name may be ``"*"``:
    every service (``"*"`` alone in the config is ``ServiceGrant("*", None)``)."""

    name: str
    port: int | None

    def matches(self, name: str, port: int) -> bool:
        """Whether ``name:port`` is covered; a ``"*"`` name (users only) covers every name."""
        return self.name in ("*", name) and (self.port is None or self.port == port)

    def __str__(self) -> str:
        return f"{self.name}:{'*' if self.port is None else self.port}"


@dataclass(frozen=True)
class PrincipalConfig:
    """One ``[[relay.agent]]`` or ``[[relay.user]]`` entry (or one grant-file line).

    ``keys`` are OpenSSH public-key lines (``ssh-ed25519 AAAA... comment``).
    Agents use ``services`` (names they may register) and ``public_ports``; users use
    ``services`` (names they may reach) and ``max_sessions``.
    """

    kind: str  # "agent" | "user"
    name: str
    keys: tuple[str, ...]
    services: tuple[ServiceGrant, ...] = ()
    public_ports: tuple[int, ...] = ()
    max_sessions: int | None = None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PenaltyOverflow = Literal["permissive", "deny-all"]


@dataclass(frozen=True)
class PenaltyConfig:
    """Per-source penalties (OpenSSH's ``PerSourcePenalties``): ``[relay.penalties]``.

    Each connection that ends badly adds its offence's seconds to its source's penalty
    (accumulating up to ``max``); a source is refused at accept once its penalty left
    exceeds ``min``, until it runs out.  ``max_sources`` bounds the table;
    ``overflow`` says what a full table does: ``permissive`` forgets the penalties
    that would expire soonest (nobody is locked out), ``deny-all`` refuses every
    source that is not exempt until entries expire.
    """

    enabled: bool = True
    authfail: float = 5.0  # the connection failed authentication (or presented a bad token)
    noauth: float = 1.0  # it closed without authenticating (or before its hello)
    grace_exceeded: float = 20.0  # it was still unauthenticated after login_grace
    protocol: float = 10.0  # it sent bytes that are not the protocol (a bad hello, garbage)
    max: float = 600.0
    min: float = 15.0
    max_sources: int = 65536
    overflow: PenaltyOverflow = "permissive"


@dataclass(frozen=True)
class RelayConfig:
    """labrelay's own SSH relay (the cloud end): ``[relay]`` in the node config."""

    listen: HostPort = HostPort("0.0.0.0", 2222)
    state_dir: Path = Path("/var/lib/labrelay")
    public_bind: str = "0.0.0.0"
    agents_file: Path | None = None
    users_file: Path | None = None
    agents: tuple[PrincipalConfig, ...] = ()
    users: tuple[PrincipalConfig, ...] = ()
    login_grace: float = 30.0
    max_auth_tries: int = 6
    #: Seconds a key exchange (the first or a re-key) may take before the peer is
    #: dropped; what waits for it meanwhile pauses the sessions' sources.
    kex_timeout: float = 30.0
    max_unauthenticated: int = 64
    # Per source (docs/relay.md "Per-source limits"): sources are IPv4 /32 and IPv6 /64
    # networks by default; each may hold this many unauthenticated connections per port.
    per_source_max_unauthenticated: int = 10
    per_source_netblock4: int = 32
    per_source_netblock6: int = 64
    penalties: PenaltyConfig = field(default_factory=PenaltyConfig)
    penalty_exempt: tuple[IPNetwork, ...] = ()
    max_channels: int = 1024
    max_sessions_per_user: int = 64
    idle_timeout: float = 0.0
    public_wait: float = 10.0
    keepalive: Keepalive = field(default_factory=Keepalive)
    window: int = DEFAULT_WINDOW
    max_packet: int = DEFAULT_MAX_PACKET
    # The fast path (docs/fastpath.md): off unless ``data_port`` is set (0 = any free port).
    data_port: int | None = None
    data_bind: str | None = None  # default: public_bind
    e2e_services: tuple[ServiceGrant, ...] = ()  # services whose payload is end-to-end encrypted
    token_lifetime: float = 10.0
    data_hello_timeout: float = 5.0
    # How often the grant files are checked for changes (revocation takes effect
    # within two of these once the file is written).
    grants_poll_interval: float = 0.25
    # Unused fast-path tickets one SSH session / one user or agent may hold at once.
    max_tokens_per_session: int = 64
    max_tokens_per_user: int = 256


@dataclass(frozen=True)
class PlainForwardConfig:
    """``[[forward]]``: a plain TCP hop.  This node listens on ``bind:port`` and splices
    every connection it accepts to ``connect`` (no SSH, no user-space copy; see
    docs/datapath.md).  ``port == 0`` picks a free port (logged)."""

    bind: str
    port: int
    connect: HostPort
    name: str


@dataclass(frozen=True)
class NodeConfig:
    """Everything one labrelay process runs."""

    source: str
    links: tuple[LinkConfig, ...] = ()
    admin: AdminConfig | None = None
    relay: RelayConfig | None = None
    forwards: tuple[PlainForwardConfig, ...] = ()


# ---------------------------------------------------------------------------
# Parsing.  The syntax helpers below raise ``_Bad`` (a problem and a hint, no
# location); the public wrappers and the TOML walker add the file and key path.

LOCAL_DEFAULT_BIND = "127.0.0.1"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:7022"
EXAMPLE_FINGERPRINT = "SHA256:BeHN8bwL5c7UYHejLShGY4MwHbRq5hkifsdbZtrio6k"

ForwardKind = Literal["remote", "local"]
# What ssh(1) sends for `-R port:host:hostport`: the server binds loopback only,
# whatever its GatewayPorts; `-R :port:...` or `-R *:port:...` asks for all interfaces.
REMOTE_DEFAULT_BIND = "localhost"
Locate = Callable[[str], tuple[str, str]]
"""Maps a canonical key path (``link[1].remote[0].name``) to ``(source, keypath)`` as
the user should read it, e.g. ``("command line", "-R '2201:localhost:22'")``."""


class _Bad(Exception):
    def __init__(self, problem: str, hint: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


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


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_hostport(text: str, hint: str) -> tuple[str | None, str]:
    """``host:port`` / ``[v6]:port`` / ``port`` -> (host or None, port text).

    An unbracketed host is a name, an IPv4 literal, ``*`` or empty; a bracketed one
    must be an IPv6 literal and is returned without its brackets."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Bad(f"unclosed '[' in {text!r}", hint)
        host, rest = text[1:close], text[close + 1 :]
        if not _is_ipv6(host):
            raise _Bad(f"[{host}] is not an IPv6 address", hint)
        if not rest.startswith(":"):
            raise _Bad(f"expected ':port' after ']' in {text!r}", hint)
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        return None, text
    if ":" in host or "[" in host or "]" in host:
        raise _Bad(f"{text!r}: an IPv6 address must be in brackets", hint)
    if host not in ("", "*") and not _HOST_RE.match(host):
        raise _Bad(f"{host!r} is not a host name or IP address", hint)
    return host, port


def _port(text: str, low: int, hint: str) -> int:
    if not _PORT_RE.match(text):
        raise _Bad(f"port {text[:40]!r} is not a number", hint)
    # int() raises ValueError past 4300 digits: anything past 5 is out of range anyway.
    digits = text.lstrip("0")
    if len(digits) > 5:
        raise _Bad(f"port {digits[:20]}... is out of range {low}..65535", hint)
    port = int(digits or "0")
    if not low <= port <= 65535:
        raise _Bad(f"port {port} is out of range {low}..65535", hint)
    return port


def _listen(text: str, default_bind: str) -> tuple[str, int]:
    if not text:
        raise _Bad("empty listen address", _LISTEN_HINT)
    host, port_text = _split_hostport(text, _LISTEN_HINT)
    return (default_bind if host is None else host), _port(port_text, 0, _LISTEN_HINT)


def _hostport(text: str) -> HostPort:
    if not text:
        raise _Bad("empty address", _CONNECT_HINT)
    host, port_text = _split_hostport(text, _CONNECT_HINT)
    if host is None:
        missing = "host" if _PORT_RE.match(text) else "port"
        raise _Bad(f"{text!r} has no {missing}", _CONNECT_HINT)
    if host in ("", "*"):
        raise _Bad(f"{text!r} has no host", _CONNECT_HINT)
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
                raise _Bad(f"nested '[' in {text!r}", hint)
            inside = True
        elif ch == "]":
            inside = False
        current.append(ch)
    if inside:
        raise _Bad(f"unclosed '[' in {text!r}", hint)
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
    return f"{prefix}:{_bracket(bind) if bind else '*'}:{port}"


def _forward(spec: str, kind: ForwardKind) -> RemoteForward | LocalForward:
    flag = "-R" if kind == "remote" else "-L"
    hint = (
        f"use [bind:]port:host:hostport, e.g. {flag} 2201:localhost:22"
        f" or {flag} [::1]:2201:[::1]:22"
    )
    if "/" in spec:
        raise _Bad("Unix-domain socket forwards are not supported", hint)
    fields = _split_colons(spec, hint)
    if len(fields) == 1 and _PORT_RE.match(spec):
        raise _Bad(f"{flag} PORT alone (a SOCKS proxy) is not supported", hint)
    if len(fields) not in (3, 4):
        raise _Bad(f"expected 3 or 4 ':'-separated fields in {spec!r}, got {len(fields)}", hint)
    default_bind = REMOTE_DEFAULT_BIND if kind == "remote" else LOCAL_DEFAULT_BIND
    try:
        bind, port = _listen(":".join(fields[:-2]), default_bind)
        connect = _hostport(":".join(fields[-2:]))
    except _Bad as e:
        raise _Bad(e.problem, hint) from None
    name = default_forward_name(kind, bind, port)
    if kind == "remote":
        return RemoteForward(bind, port, connect, name)
    return LocalForward(bind, port, connect, name)


def _host(text: str) -> str:
    hint = 'give a host name or IP address, e.g. "cloud.example.org", "203.0.113.7", "::1"'
    if "@" in text:
        raise _Bad(f"{text!r} contains '@'", hint + "; give the user separately")
    if text.startswith("[") and text.endswith("]") and _is_ipv6(text[1:-1]):
        return text[1:-1]
    if _is_ipv6(text) or _HOST_RE.match(text):
        return text
    if ":" in text:
        raise _Bad(f"{text!r} is not a host name (a port is given separately)", hint)
    raise _Bad(f"{text!r} is not a host name or IP address", hint)


def _fingerprint(text: str) -> str:
    hint = (
        "give the SHA256 fingerprint as `ssh-keygen -lf KEY.pub` prints it,"
        f" e.g. {EXAMPLE_FINGERPRINT}"
    )
    body = text.removeprefix("SHA256:")
    if body == text:
        if text.startswith("MD5:") or re.fullmatch(r"([0-9a-fA-F]{2}:){15}[0-9a-fA-F]{2}", text):
            raise _Bad("MD5 fingerprints are not accepted", hint)
        raise _Bad(f"{text!r} does not start with 'SHA256:'", hint)
    if not re.fullmatch(r"[A-Za-z0-9+/]{43}", body):
        raise _Bad(f"{text!r} is not 'SHA256:' followed by 43 base64 characters", hint)
    try:
        digest = base64.b64decode(body + "=", validate=True)
    except binascii.Error:
        raise _Bad(f"{text!r} is not valid base64", hint) from None
    if base64.b64encode(digest).decode().rstrip("=") != body:
        raise _Bad(f"{text!r} is not a SHA256 digest (check its last character)", hint)
    return text


def _name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise _Bad(
            f"name {text!r} must be 1..100 characters without spaces or control characters",
            'e.g. name = "gpu-ssh"',
        )
    return text


_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")
_NUMERIC_RE = re.compile(r"[0-9.]+\Z")
_WILDCARD_BINDS = frozenset({"", "*", "0.0.0.0", "::"})
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


def _service_name(text: str, hint: str) -> str:
    """A service name as agents register it and users ask for it, lower-cased."""
    if not _SERVICE_RE.match(text):
        raise _Bad(
            f"service name {text!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-'",
            hint,
        )
    if _NUMERIC_RE.match(text):
        raise _Bad(
            f"service name {text!r} looks like an address: the relay reaches named services, "
            "never addresses",
            hint,
        )
    lowered = text.lower()
    if lowered == "localhost":
        raise _Bad("'localhost' cannot be a service name: it would read as the relay itself", hint)
    return lowered


def _service_grant(text: str, kind: str) -> ServiceGrant:
    """``name:port``, ``name:*``; for users also ``*:port``, ``*:*`` and ``*``."""
    hint = _USER_SERVICE_HINT if kind == "user" else _AGENT_SERVICE_HINT
    if text == "*" and kind == "user":
        return ServiceGrant("*", None)
    name, sep, port_text = text.rpartition(":")
    if not sep:
        raise _Bad(f"{text!r} has no ':port'", hint)
    if name == "*":
        if kind != "user":
            raise _Bad(
                "an agent is granted names one by one: '*' would let it claim every name",
                hint,
            )
    elif name.startswith("[") or ":" in name:
        raise _Bad(f"{text!r}: the relay grants named services, never addresses", hint)
    else:
        name = _service_name(name, hint)
    port = None if port_text == "*" else _port(port_text, 1, hint)
    return ServiceGrant(name, port)


def _public_key(text: str) -> tuple[bytes, str]:
    """An OpenSSH public-key line (``TYPE BASE64 [comment]``) -> (SSH wire blob, comment).

    The blob is what the relay compares a verified signature's key with."""
    from twisted.conch.ssh.keys import Key

    if "PRIVATE KEY" in text:
        raise _Bad("this is a private key: never give it to the relay", _KEY_HINT)
    fields = text.split(None, 2)
    if len(fields) < 2:
        raise _Bad(f"expected 'TYPE BASE64 [comment]', got {text[:60]!r}", _KEY_HINT)
    key_type, body = fields[0], fields[1]
    comment = fields[2].strip() if len(fields) == 3 else ""
    if "-cert-" in key_type:
        raise _Bad(f"certificates ({key_type}) are not supported", _KEY_HINT)
    if key_type == "ssh-dss":
        raise _Bad("DSA keys are obsolete and refused", _KEY_HINT)
    try:
        blob = base64.b64decode(body, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII str (tests/fuzz grant_file)
        raise _Bad(f"the key data {body[:20]!r}... is not base64", _KEY_HINT) from None
    try:
        key = Key.fromString(blob, type="blob")
        parsed_type = key.sshType().decode("ascii")
        canonical = key.blob()
    except Exception:  # Conch raises many kinds on hostile bytes; all mean "not a key"
        raise _Bad(f"not a valid {key_type} public key (damaged when copied?)", _KEY_HINT) from None
    if parsed_type != key_type:
        raise _Bad(f"the line says {key_type} but the key data is {parsed_type}", _KEY_HINT)
    if key.type() == "RSA" and key.size() < 1024:
        raise _Bad(f"an RSA key of {key.size()} bits is too weak", _KEY_HINT)
    return canonical, comment


def _principal_name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise _Bad(
            f"name {text!r} must be 1..100 characters without spaces or control characters",
            'e.g. name = "lab_pc"',
        )
    return text


def _bind_address(text: str) -> str:
    if text in ("", "*"):
        return "0.0.0.0"
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text == "localhost":
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _Bad(f"{text!r} is not an IP address", _PUBLIC_BIND_HINT) from None
    return text


@contextmanager
def _at(source: str, keypath: str) -> Iterator[None]:
    """Turn a located-less ``_Bad`` into a ConfigError at ``keypath``."""
    try:
        yield
    except _Bad as e:
        raise ConfigError(source, keypath, e.problem, e.hint) from None


def parse_listen(text: str, *, source: str, keypath: str, default_bind: str) -> tuple[str, int]:
    """Parse ``[bind:]port`` into ``(bind, port)``; port 0..65535 (0 = allocate).

    The bind address is kept as written (``"*"`` stays ``"*"``; ``[::1]`` loses its
    brackets); ``default_bind`` is used when there is none, and ``":2201"`` gives
    ``""`` explicitly."""
    with _at(source, keypath):
        result = _listen(text, default_bind)
    return result


def parse_hostport(text: str, *, source: str, keypath: str) -> HostPort:
    """Parse ``host:port`` (``[v6]:port``); port 1..65535."""
    with _at(source, keypath):
        result = _hostport(text)
    return result


def parse_forward_spec(
    spec: str, kind: ForwardKind, *, source: str, keypath: str
) -> RemoteForward | LocalForward:
    """Parse OpenSSH's ``[bind:]port:host:hostport`` (IPv6 in brackets) as given to
    ``-R`` (``kind="remote"``, default bind ``"localhost"`` as ssh(1) sends) or ``-L`` (default bind
    ``127.0.0.1``).  The forward gets its default name (:func:`default_forward_name`)."""
    with _at(source, keypath):
        result = _forward(spec, kind)
    return result


def parse_host(text: str, *, source: str, keypath: str) -> str:
    """Check a server host name or IP literal (``[v6]`` loses its brackets)."""
    with _at(source, keypath):
        result = _host(text)
    return result


def parse_fingerprint(text: str, *, source: str, keypath: str) -> str:
    """Check a pinned host key fingerprint: ``SHA256:`` + 43 base64 characters."""
    with _at(source, keypath):
        result = _fingerprint(text)
    return result


def parse_name(text: str, *, source: str, keypath: str) -> str:
    """Check a link or forward name: 1..100 characters, no spaces or control characters."""
    with _at(source, keypath):
        result = _name(text)
    return result


def parse_service_grant(text: str, kind: str, *, source: str, keypath: str) -> ServiceGrant:
    """Parse a grant of a service: ``name:port`` / ``name:*`` (agents and users) or
    ``*:port`` / ``*`` (users only).  The name is lower-cased."""
    with _at(source, keypath):
        result = _service_grant(text, kind)
    return result


def parse_service_name(text: str, *, source: str, keypath: str) -> str:
    """Check a service name (``gpu-cluster``) and return it lower-cased."""
    with _at(source, keypath):
        result = _service_name(text, 'e.g. "gpu-cluster"')
    return result


def parse_public_key(text: str, *, source: str, keypath: str) -> tuple[bytes, str]:
    """Parse an OpenSSH public-key line into (SSH wire blob, comment); the declared type
    must match the key data, and certificates and DSA keys are refused."""
    with _at(source, keypath):
        result = _public_key(text)
    return result


def parse_principal_name(text: str, *, source: str, keypath: str) -> str:
    """Check an agent's or user's name: 1..100 characters, no spaces or control characters."""
    with _at(source, keypath):
        result = _principal_name(text)
    return result


def parse_public_bind(text: str, *, source: str, keypath: str) -> str:
    """The address public ports listen on: an IP literal (``*``/empty = ``0.0.0.0``)."""
    with _at(source, keypath):
        result = _bind_address(text)
    return result


def parse_relay_listen(text: str, *, source: str, keypath: str) -> HostPort:
    """``[addr:]port`` of the relay's SSH server; no address (or ``*``) = ``0.0.0.0``."""
    bind, port = parse_listen(text, source=source, keypath=keypath, default_bind="0.0.0.0")
    return HostPort(bind if bind not in ("", "*") else "0.0.0.0", port)


Where = tuple[str, str]
"""``(source, keypath)`` of something written in a config or grant file."""


@dataclass(frozen=True)
class PrincipalSite:
    """A principal and where each of its parts was written, so that a conflict between
    two grants (in the config, in grant files, or one of each) names both places."""

    principal: PrincipalConfig
    name_at: Where
    keys_at: tuple[Where, ...]
    services_at: tuple[Where, ...]
    ports_at: tuple[Where, ...]


def config_sites(relay: RelayConfig, source: str) -> list[PrincipalSite]:
    """The ``[[relay.agent]]`` and ``[[relay.user]]`` entries as sites in ``source``."""
    sites = []
    for kind, entries in (("agent", relay.agents), ("user", relay.users)):
        for i, p in enumerate(entries):
            base = f"relay.{kind}[{i}]"
            sites.append(
                PrincipalSite(
                    principal=p,
                    name_at=(source, f"{base}.name"),
                    keys_at=tuple((source, f"{base}.keys[{j}]") for j in range(len(p.keys))),
                    services_at=tuple(
                        (source, f"{base}.services[{j}]") for j in range(len(p.services))
                    ),
                    ports_at=tuple(
                        (source, f"{base}.public_ports[{j}]") for j in range(len(p.public_ports))
                    ),
                )
            )
    return sites


def check_principals(
    sites: Sequence[PrincipalSite], relay: RelayConfig, listen_at: Where
) -> list[tuple[bytes, ...]]:
    """Check that identity and ownership are unambiguous across all principals, and
    return each site's key blobs (a key listed twice for one principal counts once).

    Refused: two agents (or two users) with one name; one key in two principals
    (identity comes from the key); one service name granted to two agents (only its
    owner may take a name over); one public port granted to two agents, or equal to
    the relay's own SSH port on an overlapping address."""

    def conflict(at: Where, first: Where, problem: str, hint: str) -> ConfigError:
        if first[0] == at[0]:
            also = first[1]
        else:
            also = f"{first[1]} in {first[0]}" if first[1] else first[0]
        return ConfigError(at[0], at[1], problem.replace("{also}", also), hint)

    names: dict[tuple[str, str], Where] = {}
    keys: dict[bytes, tuple[int, Where]] = {}
    services: dict[str, tuple[int, Where]] = {}
    ports: dict[int, tuple[int, Where]] = {}
    listen = relay.listen
    overlaps = (
        listen.host in _WILDCARD_BINDS
        or relay.public_bind in _WILDCARD_BINDS
        or listen.host == relay.public_bind
    )
    if listen.port and overlaps:
        ports[listen.port] = (-1, listen_at)
    blobs: list[tuple[bytes, ...]] = []
    for i, site in enumerate(sites):
        p = site.principal
        if (p.kind, p.name) in names:
            raise conflict(
                site.name_at,
                names[(p.kind, p.name)],
                f"duplicate {p.kind} name {p.name!r} (also {{also}})",
                f"give each {p.kind} its own name; one {p.kind} may have several keys",
            )
        names[(p.kind, p.name)] = site.name_at
        mine: list[bytes] = []
        for line, at in zip(p.keys, site.keys_at, strict=True):
            with _at(*at):
                blob, _ = _public_key(line)
            if blob in keys:
                owner, first = keys[blob]
                if owner == i:
                    continue
                other = sites[owner].principal
                raise conflict(
                    at,
                    first,
                    f"this key already belongs to {other.kind} {other.name!r} (also {{also}})",
                    "identity comes from the key alone: give every agent and user keys of "
                    "their own; labrelay keygen makes one",
                )
            keys[blob] = (i, at)
            mine.append(blob)
        blobs.append(tuple(mine))
        if p.kind != "agent":
            continue
        for grant, at in zip(p.services, site.services_at, strict=True):
            owner, first = services.setdefault(grant.name, (i, at))
            if owner != i:
                raise conflict(
                    at,
                    first,
                    f"service {grant.name!r} is already granted to agent "
                    f"{sites[owner].principal.name!r} (also {{also}})",
                    "a service name has one owning agent, so that only it can take the name "
                    "over when it reconnects; give the other service another name",
                )
        for port, at in zip(p.public_ports, site.ports_at, strict=True):
            owner, first = ports.setdefault(port, (i, at))
            if owner == -1:
                raise conflict(
                    at,
                    first,
                    f"public port {port} is the relay's own SSH port (also {{also}})",
                    "pick another public port, or move the relay's listen port",
                )
            if owner != i:
                raise conflict(
                    at,
                    first,
                    f"public port {port} is already granted to agent "
                    f"{sites[owner].principal.name!r} (also {{also}})",
                    "each public port belongs to one agent; pick another port",
                )
    return blobs


def default_known_hosts() -> Path:
    """``~/.ssh/known_hosts``, used when neither ``known_hosts`` nor ``host_key`` is set."""
    return Path("~/.ssh/known_hosts").expanduser()


def current_user(*, source: str, keypath: str) -> str:
    """The login name of this process (the default ``user``, as for ssh)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise ConfigError(
            source, keypath, "cannot tell the current user name", 'set it, e.g. user = "lab"'
        ) from None


# --- the TOML walker --------------------------------------------------------

_TOP_KEYS = {
    "admin": '[admin] listen = "127.0.0.1:7022"',
    "link": '[[link]] host = "cloud.example.org"',
    "relay": '[relay] listen = "0.0.0.0:2222"',
}
_ADMIN_KEYS = {"listen": 'listen = "127.0.0.1:7022"',
               "token_file": 'token_file = "/etc/labrelay/admin.token"'}
_LINK_KEYS = {
    "name": 'name = "cloud"',
    "host": 'host = "cloud.example.org"',
    "port": "port = 22",
    "user": 'user = "lab"',
    "identity": 'identity = "~/.ssh/id_ed25519"',
    "known_hosts": 'known_hosts = "~/.ssh/known_hosts"',
    "host_key": f'host_key = "{EXAMPLE_FINGERPRINT}"',
    "strict_host_key_checking": 'strict_host_key_checking = "accept-new"',
    "keepalive_interval": "keepalive_interval = 15",
    "keepalive_count": "keepalive_count = 3",
    "backoff_initial": "backoff_initial = 1.0",
    "backoff_max": "backoff_max = 60.0",
    "backoff_factor": "backoff_factor = 1.5",
    "backoff_jitter": "backoff_jitter = 0.2",
    "connect_timeout": "connect_timeout = 15",
    "local_wait": "local_wait = 10",
    "fast_path_pool": "fast_path_pool = 4",
    "window": "window = 2097152",
    "max_packet": "max_packet = 32768",
    "remote": '[[link.remote]] listen = "2201", connect = "localhost:22"',
    "local": '[[link.local]] listen = "127.0.0.1:8888", connect = "localhost:8888"',
}
_REMOTE_KEYS = {
    "listen": 'listen = "2201"',
    "connect": 'connect = "10.0.0.5:22"',
    "service": 'service = "gpu-cluster:22"',
    "name": 'name = "gpu-ssh"',
}
_LOCAL_KEYS = {
    "listen": 'listen = "127.0.0.1:8888"',
    "connect": 'connect = "localhost:8888"',
    "name": 'name = "jupyter"',
}
_RELAY_KEYS = {
    "listen": 'listen = "0.0.0.0:2222"',
    "state_dir": 'state_dir = "/var/lib/labrelay"',
    "public_bind": 'public_bind = "0.0.0.0"',
    "agents_file": 'agents_file = "agents"',
    "users_file": 'users_file = "users"',
    "login_grace": "login_grace = 30",
    "max_auth_tries": "max_auth_tries = 6",
    "kex_timeout": "kex_timeout = 30",
    "max_unauthenticated": "max_unauthenticated = 64",
    "per_source_max_unauthenticated": "per_source_max_unauthenticated = 10",
    "per_source_netblock4": "per_source_netblock4 = 32",
    "per_source_netblock6": "per_source_netblock6 = 64",
    "penalties": "[relay.penalties] authfail = 5, noauth = 1, grace_exceeded = 20",
    "penalty_exempt": 'penalty_exempt = ["192.0.2.0/24", "2001:db8::/48"]',
    "max_channels": "max_channels = 1024",
    "max_sessions_per_user": "max_sessions_per_user = 64",
    "idle_timeout": "idle_timeout = 0",
    "public_wait": "public_wait = 10",
    "keepalive_interval": "keepalive_interval = 15",
    "keepalive_count": "keepalive_count = 3",
    "window": "window = 2097152",
    "max_packet": "max_packet = 32768",
    "data_port": "data_port = 2223",
    "data_bind": 'data_bind = "0.0.0.0"',
    "e2e_services": 'e2e_services = ["gpu-cluster:22", "*:22"]',
    "token_lifetime": "token_lifetime = 10",
    "data_hello_timeout": "data_hello_timeout = 5",
    "grants_poll_interval": "grants_poll_interval = 0.25",
    "max_tokens_per_session": "max_tokens_per_session = 64",
    "max_tokens_per_user": "max_tokens_per_user = 256",
    "agent": '[[relay.agent]] name = "lab_pc", keys = ["ssh-ed25519 AAAA... lab_pc"], '
    'services = ["gpu-cluster:22"]',
    "user": '[[relay.user]] name = "alice", keys = ["ssh-ed25519 AAAA... alice"], '
    'services = ["gpu-cluster:22"]',
}
_PENALTY_KEYS = {
    "enabled": "enabled = true",
    "authfail": "authfail = 5",
    "noauth": "noauth = 1",
    "grace_exceeded": "grace_exceeded = 20",
    "protocol": "protocol = 10",
    "max": "max = 600",
    "min": "min = 15",
    "max_sources": "max_sources = 65536",
    "overflow": 'overflow = "permissive"',
}
_RELAY_AGENT_KEYS = {
    "name": 'name = "lab_pc"',
    "keys": 'keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... lab_pc"]',
    "services": 'services = ["gpu-cluster:22", "jupyter:8888", "tensorboard:*"]',
    "public_ports": "public_ports = [2201]",
}
_RELAY_USER_KEYS = {
    "name": 'name = "alice"',
    "keys": 'keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... alice"]',
    "services": 'services = ["gpu-cluster:22", "jupyter:*"]',
    "max_sessions": "max_sessions = 10",
}
# OpenSSH spellings people will try, and what they are called here.
_ALIASES = {
    "hostname": "host",
    "identityfile": "identity",
    "userknownhostsfile": "known_hosts",
    "stricthostkeychecking": "strict_host_key_checking",
    "serveraliveinterval": "keepalive_interval",
    "serveralivecountmax": "keepalive_count",
    "connecttimeout": "connect_timeout",
    "remoteforward": "remote",
    "localforward": "local",
    "links": "link",
    "listenaddress": "listen",
    "logingracetime": "login_grace",
    "maxauthtries": "max_auth_tries",
    "maxstartups": "max_unauthenticated",
    "persourcemaxstartups": "per_source_max_unauthenticated",
    "persourcenetblocksize": "per_source_netblock4",
    "persourcepenalties": "penalties",
    "persourcepenaltyexemptlist": "penalty_exempt",
    "max-sources4": "max_sources",
    "max-sources6": "max_sources",
    "maxsessions": "max_sessions",
    "clientaliveinterval": "keepalive_interval",
    "clientalivecountmax": "keepalive_count",
    "service": "services",
    "public_port": "public_ports",
}


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value}"


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


class _Section:
    """One TOML table with its key path; refuses keys it does not know."""

    def __init__(
        self, source: str, data: dict[str, Any], path: str, examples: Mapping[str, str]
    ) -> None:
        self.source = source
        self.data = data
        self.path = path
        self.examples = examples
        for key in data:
            if key not in examples:
                raise self._unknown(key)

    def _unknown(self, key: str) -> ConfigError:
        folded = key.lower().replace("-", "_")
        guess = _ALIASES.get(key.lower())
        if guess is None and folded in self.examples:
            guess = folded
        if guess is None:
            close = difflib.get_close_matches(folded, list(self.examples), n=1, cutoff=0.6)
            guess = close[0] if close else None
        if guess is not None and guess in self.examples:
            hint = f"did you mean '{guess}'? e.g. {self.examples[guess]}"
        else:
            hint = "valid keys here: " + ", ".join(self.examples)
        return ConfigError(self.source, self.keypath(key), f"unknown key '{key}'", hint)

    def keypath(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str, hint: str | None = None) -> ConfigError:
        if hint is None:
            hint = f"e.g. {self.examples[key]}"
        return ConfigError(self.source, self.keypath(key), problem, hint)

    def at(self, key: str) -> AbstractContextManager[None]:
        return _at(self.source, self.keypath(key))

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, f"missing required key '{key}'")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        if not value:
            raise self.error(key, "must not be empty")
        return value

    def strings(self, key: str) -> list[str]:
        """A string or an array of strings."""
        value = self.data.get(key)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str) or not item:
                what = "an empty string" if item == "" else _describe(item)
                raise self.error(key, f"expected a string or an array of strings, got {what}")
        return items

    def integers(self, key: str, low: int, high: int) -> list[int]:
        """An integer or an array of integers, each between ``low`` and ``high``."""
        value = self.data.get(key)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        for j, item in enumerate(items):
            where = f"{self.keypath(key)}[{j}]" if isinstance(value, list) else self.keypath(key)
            if isinstance(item, bool) or not isinstance(item, int):
                raise ConfigError(
                    self.source, where,
                    f"expected an integer or an array of integers, got {_describe(item)}",
                    f"e.g. {self.examples[key]}",
                )
            if not low <= item <= high:
                raise ConfigError(
                    self.source, where, f"must be between {low} and {high}, got {item}",
                    f"e.g. {self.examples[key]}",
                )
        return items

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            limits = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.error(key, f"{key} must be {limits}, got {value}")
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float,
        above: bool = False,
        high: float | None = None,
    ) -> float:
        """A finite int or float >= ``low`` (> ``low`` if ``above``) and <= ``high``."""
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value}")
        if value < low or (above and value == low):
            bound = f"greater than {_fmt(low)}" if above else f"at least {_fmt(low)}"
            raise self.error(key, f"{key} must be {bound}, got {value}")
        if high is not None and value > high:
            raise self.error(key, f"{key} must be at most {_fmt(high)}, got {value}")
        return float(value)

    def table(self, key: str, examples: Mapping[str, str]) -> _Section | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_describe(value)}")
        return _Section(self.source, value, self.keypath(key), examples)

    def tables(self, key: str, examples: Mapping[str, str]) -> list[_Section]:
        value = self.data.get(key)
        if value is None:
            return []
        full = self.keypath(key) if not self.path else f"{self.path.split('[')[0]}.{key}"
        hint = f"write one [[{full}]] table per entry, e.g. {self.examples[key]}"
        if not isinstance(value, list):
            raise self.error(
                key,
                f"expected an array of tables, got {_describe(value)}",
                hint,
            )
        sections = []
        for i, item in enumerate(value):
            path = f"{self.keypath(key)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(
                    self.source,
                    path,
                    f"expected a table, got {_describe(item)}",
                    hint,
                )
            sections.append(_Section(self.source, item, path, examples))
        return sections


def _path(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _parse_forwards(link: _Section, kind: ForwardKind) -> list[tuple[Any, ...]]:
    """The ``[[link.remote]]`` or ``[[link.local]]`` entries as (bind, port, connect, name)
    (and, for remote forwards, whether ``connect`` is a service of this node's relay)."""
    examples = _REMOTE_KEYS if kind == "remote" else _LOCAL_KEYS
    default_bind = REMOTE_DEFAULT_BIND if kind == "remote" else LOCAL_DEFAULT_BIND
    forwards: list[tuple[Any, ...]] = []
    for sec in link.tables(kind, examples):
        listen = sec.string("listen", required=True)
        service = sec.string("service") if kind == "remote" else None
        if service is not None and sec.string("connect") is not None:
            raise sec.error("service", "set either connect (a host:port reached from this "
                            "node) or service (a service registered at this node's relay), "
                            "not both", 'e.g. service = "gpu-cluster:22"')
        connect = service if service is not None else sec.string("connect", required=True)
        assert listen is not None and connect is not None
        with sec.at("listen"):
            bind, port = _listen(listen, default_bind)
        with sec.at("service" if service is not None else "connect"):
            target = _hostport(connect)
        name = sec.string("name")
        if name is None:
            name = default_forward_name(kind, bind, port)
        else:
            with sec.at("name"):
                _name(name)
        forwards.append((bind, port, target, name, True) if service is not None
                        else (bind, port, target, name))
    return forwards


def _parse_host_key(sec: _Section, base: Path) -> HostKeyPolicy:
    fingerprint = sec.string("host_key")
    if fingerprint is not None:
        with sec.at("host_key"):
            _fingerprint(fingerprint)
    known_hosts_text = sec.string("known_hosts")
    if fingerprint is not None and known_hosts_text is not None:
        raise sec.error(
            "known_hosts",
            "set either host_key (pin one key) or known_hosts, not both",
            f'keep one of them, e.g. host_key = "{EXAMPLE_FINGERPRINT}"',
        )
    strict = sec.string("strict_host_key_checking") or "yes"
    if strict in ("no", "off", "false", "ask"):
        raise sec.error(
            "strict_host_key_checking",
            f"'{strict}' is not allowed: an unattended agent must never trust an unverified "
            "server (anyone on the path could impersonate it)",
            'use "accept-new" (record the key on first connection) or pin host_key = "SHA256:..."',
        )
    if strict not in ("yes", "accept-new"):
        raise sec.error(
            "strict_host_key_checking", f'expected "yes" or "accept-new", got {strict!r}'
        )
    accept_new = strict == "accept-new"
    if fingerprint is not None and accept_new:
        raise sec.error(
            "strict_host_key_checking",
            '"accept-new" has no effect with a pinned host_key',
            "remove strict_host_key_checking, or use known_hosts instead of host_key",
        )
    if fingerprint is not None:
        return HostKeyPolicy(fingerprint=fingerprint)
    known_hosts = (
        default_known_hosts() if known_hosts_text is None else _path(known_hosts_text, base)
    )
    return HostKeyPolicy(known_hosts=known_hosts, accept_new=accept_new)


def _parse_link(sec: _Section, index: int, base: Path) -> LinkConfig:
    name = sec.string("name")
    if name is None:
        name = f"link{index}"
    else:
        with sec.at("name"):
            _name(name)
    host_text = sec.string("host", required=True)
    assert host_text is not None
    with sec.at("host"):
        host = _host(host_text)
    user = sec.string("user")
    if user is None:
        user = current_user(source=sec.source, keypath=sec.keypath("user"))
    elif any(ch.isspace() for ch in user):
        raise sec.error("user", f"user {user!r} contains white space")

    backoff_initial = sec.number("backoff_initial", Backoff.initial, low=0, above=True)
    backoff_max = sec.number("backoff_max", Backoff.maximum, low=0, above=True)
    if backoff_max < backoff_initial:
        given = "" if "backoff_max" in sec.data else " (the default)"
        raise sec.error(
            "backoff_max",
            f"backoff_max {_fmt(backoff_max)}{given} is less than "
            f"backoff_initial {_fmt(backoff_initial)}",
            f"make backoff_max at least backoff_initial, e.g. backoff_max = "
            f"{_fmt(max(60.0, backoff_initial))}",
        )
    window = sec.integer("window", DEFAULT_WINDOW, 32 * 1024, 16 * 1024 * 1024)
    max_packet = sec.integer("max_packet", DEFAULT_MAX_PACKET, 1024, 256 * 1024)
    if max_packet > window:
        raise sec.error(
            "max_packet",
            f"max_packet {max_packet} is larger than window {window}",
            "max_packet must fit in the window, e.g. window = 2097152 and max_packet = 32768",
        )
    remote = tuple(RemoteForward(*fields) for fields in _parse_forwards(sec, "remote"))
    local = tuple(LocalForward(*fields) for fields in _parse_forwards(sec, "local"))
    return LinkConfig(
        name=name,
        host=host,
        port=sec.integer("port", 22, 1, 65535),
        user=user,
        identities=tuple(_path(text, base) for text in sec.strings("identity")),
        host_key=_parse_host_key(sec, base),
        keepalive=Keepalive(
            interval=sec.number("keepalive_interval", Keepalive.interval, low=0),
            count_max=sec.integer("keepalive_count", Keepalive.count_max, 1),
        ),
        backoff=Backoff(
            initial=backoff_initial,
            maximum=backoff_max,
            factor=sec.number("backoff_factor", Backoff.factor, low=1),
            jitter=sec.number("backoff_jitter", Backoff.jitter, low=0, high=1),
        ),
        connect_timeout=sec.number("connect_timeout", 15.0, low=0, above=True),
        local_wait=sec.number("local_wait", 10.0, low=0),
        window=window,
        max_packet=max_packet,
        fast_path_pool=sec.integer("fast_path_pool", 4, 0, 64),
        remote=remote,
        local=local,
    )


def _parse_admin(sec: _Section, base: Path) -> AdminConfig:
    token_file = sec.string("token_file")
    return parse_admin_listen(
        sec.string("listen") or DEFAULT_ADMIN_LISTEN, source=sec.source,
        keypath=sec.keypath("listen"),
        token_file=_path(token_file, base) if token_file else None,
    )


def _parse_principal(sec: _Section, kind: str) -> PrincipalConfig:
    """One ``[[relay.agent]]`` or ``[[relay.user]]`` table (conflicts between tables
    are checked afterwards, by :func:`check_principals`)."""
    name = sec.string("name", required=True)
    assert name is not None
    with sec.at("name"):
        _principal_name(name)
    if "keys" not in sec.data:
        raise sec.error("keys", "missing required key 'keys'")
    keys = [line.strip() for line in sec.strings("keys")]
    if not keys:
        raise sec.error("keys", f"the {kind} has no keys")
    for j, line in enumerate(keys):
        with _at(sec.source, f"{sec.keypath('keys')}[{j}]"):
            _public_key(line)
    services = []
    for j, text in enumerate(sec.strings("services")):
        with _at(sec.source, f"{sec.keypath('services')}[{j}]"):
            services.append(_service_grant(text, kind))
    if kind == "agent":
        return PrincipalConfig(
            kind=kind,
            name=name,
            keys=tuple(keys),
            services=tuple(dict.fromkeys(services)),
            public_ports=tuple(dict.fromkeys(sec.integers("public_ports", 1, 65535))),
        )
    max_sessions = sec.integer("max_sessions", 1, 1) if "max_sessions" in sec.data else None
    return PrincipalConfig(
        kind=kind,
        name=name,
        keys=tuple(keys),
        services=tuple(dict.fromkeys(services)),
        max_sessions=max_sessions,
    )


def _parse_penalties(sec: _Section | None) -> PenaltyConfig:
    defaults = PenaltyConfig()
    if sec is None:
        return defaults
    enabled = sec.data.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise sec.error("enabled", f"expected true or false, got {_describe(enabled)}")
    overflow = sec.data.get("overflow", defaults.overflow)
    if overflow not in ("permissive", "deny-all"):
        raise sec.error("overflow", f"expected \"permissive\" or \"deny-all\", got "
                        f"{_describe(overflow)}",
                        'overflow = "permissive" (a full table forgets the penalties '
                        'expiring soonest) or "deny-all" (it refuses everyone not exempt)')
    seconds = {key: sec.number(key, getattr(defaults, key), low=0)
               for key in ("authfail", "noauth", "grace_exceeded", "protocol", "min")}
    maximum = sec.number("max", defaults.max, low=0, above=True)
    if seconds["min"] >= maximum:
        raise sec.error("min", f"min ({_fmt(seconds['min'])}) must be below max "
                        f"({_fmt(maximum)}): a penalty could never become active",
                        "e.g. min = 15 and max = 600")
    return PenaltyConfig(
        enabled=enabled, authfail=seconds["authfail"], noauth=seconds["noauth"],
        grace_exceeded=seconds["grace_exceeded"], protocol=seconds["protocol"],
        max=maximum, min=seconds["min"],
        max_sources=sec.integer("max_sources", defaults.max_sources, 1, 16 * 1024 * 1024),
        overflow=overflow,
    )


def _networks(sec: _Section, key: str) -> tuple[IPNetwork, ...]:
    nets = []
    for j, text in enumerate(sec.strings(key)):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(sec.source, f"{sec.keypath(key)}[{j}]",
                              f"{text!r} is not an IP address or network",
                              f"e.g. {sec.examples[key]}") from None
    return tuple(dict.fromkeys(nets))


def _parse_relay(sec: _Section, base: Path) -> RelayConfig:
    listen = parse_relay_listen(
        sec.string("listen") or "0.0.0.0:2222", source=sec.source, keypath=sec.keypath("listen")
    )
    state_dir = sec.string("state_dir")
    public_bind = sec.string("public_bind")
    if public_bind is not None:
        with sec.at("public_bind"):
            public_bind = _bind_address(public_bind)
    agents_file = sec.string("agents_file")
    users_file = sec.string("users_file")
    window = sec.integer("window", DEFAULT_WINDOW, 32 * 1024, 16 * 1024 * 1024)
    max_packet = sec.integer("max_packet", DEFAULT_MAX_PACKET, 1024, 256 * 1024)
    if max_packet > window:
        raise sec.error(
            "max_packet",
            f"max_packet {max_packet} is larger than window {window}",
            "max_packet must fit in the window, e.g. window = 2097152 and max_packet = 32768",
        )
    data_bind = sec.string("data_bind")
    if data_bind is not None:
        with sec.at("data_bind"):
            data_bind = _bind_address(data_bind)
    e2e = []
    for j, text in enumerate(sec.strings("e2e_services")):
        with _at(sec.source, f"{sec.keypath('e2e_services')}[{j}]"):
            e2e.append(_service_grant(text, "user"))
    defaults = RelayConfig()
    relay = RelayConfig(
        data_port=sec.integer("data_port", 0, 0, 65535) if "data_port" in sec.data else None,
        data_bind=data_bind,
        e2e_services=tuple(dict.fromkeys(e2e)),
        token_lifetime=sec.number("token_lifetime", defaults.token_lifetime, low=0, above=True),
        data_hello_timeout=sec.number("data_hello_timeout", defaults.data_hello_timeout,
                                      low=0, above=True),
        grants_poll_interval=sec.number("grants_poll_interval", defaults.grants_poll_interval,
                                        low=0, above=True, high=10),
        max_tokens_per_session=sec.integer("max_tokens_per_session",
                                           defaults.max_tokens_per_session, 1),
        max_tokens_per_user=sec.integer("max_tokens_per_user", defaults.max_tokens_per_user, 1),
        listen=listen,
        state_dir=defaults.state_dir if state_dir is None else _path(state_dir, base),
        public_bind=defaults.public_bind if public_bind is None else public_bind,
        agents_file=None if agents_file is None else _path(agents_file, base),
        users_file=None if users_file is None else _path(users_file, base),
        agents=tuple(
            _parse_principal(s, "agent") for s in sec.tables("agent", _RELAY_AGENT_KEYS)
        ),
        users=tuple(_parse_principal(s, "user") for s in sec.tables("user", _RELAY_USER_KEYS)),
        login_grace=sec.number("login_grace", defaults.login_grace, low=0, above=True),
        max_auth_tries=sec.integer("max_auth_tries", defaults.max_auth_tries, 1),
        kex_timeout=sec.number("kex_timeout", defaults.kex_timeout, low=0, above=True),
        max_unauthenticated=sec.integer(
            "max_unauthenticated", defaults.max_unauthenticated, 1
        ),
        per_source_max_unauthenticated=sec.integer(
            "per_source_max_unauthenticated", defaults.per_source_max_unauthenticated, 1
        ),
        per_source_netblock4=sec.integer("per_source_netblock4",
                                         defaults.per_source_netblock4, 0, 32),
        per_source_netblock6=sec.integer("per_source_netblock6",
                                         defaults.per_source_netblock6, 0, 128),
        penalties=_parse_penalties(sec.table("penalties", _PENALTY_KEYS)),
        penalty_exempt=_networks(sec, "penalty_exempt"),
        max_channels=sec.integer("max_channels", defaults.max_channels, 1),
        max_sessions_per_user=sec.integer(
            "max_sessions_per_user", defaults.max_sessions_per_user, 1
        ),
        idle_timeout=sec.number("idle_timeout", defaults.idle_timeout, low=0),
        public_wait=sec.number("public_wait", defaults.public_wait, low=0),
        keepalive=Keepalive(
            interval=sec.number("keepalive_interval", Keepalive.interval, low=0),
            count_max=sec.integer("keepalive_count", Keepalive.count_max, 1),
        ),
        window=window,
        max_packet=max_packet,
    )
    check_principals(config_sites(relay, sec.source), relay, (sec.source, sec.keypath("listen")))
    return relay


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


def validate_node(config: NodeConfig, locate: Locate | None = None) -> None:
    """Check what spans links: link names and forward names are unique in the node,
    a remote listen address is used once per link and a local one once per node.

    ``locate`` turns canonical key paths into what the user wrote (the command line
    uses it); by default every path is in ``config.source``."""

    def where(keypath: str) -> tuple[str, str]:
        return locate(keypath) if locate is not None else (config.source, keypath)

    def fail(keypath: str, first: str, problem: str, hint: str) -> None:
        source, path = where(keypath)
        first_source, first_path = where(first)
        also = first_path if first_source == source else f"{first_path} in {first_source}"
        raise ConfigError(source, path, problem.replace("{also}", also), hint)

    links: dict[str, str] = {}
    for i, link in enumerate(config.links):
        keypath = f"link[{i}].name"
        if link.name in links:
            fail(
                keypath,
                links[link.name],
                f"duplicate link name {link.name!r} (also {{also}})",
                'give each link its own name: name = "..." in the file, --name on the command line',
            )
        links[link.name] = keypath

    names: dict[str, str] = {}
    local_listens: dict[tuple[str, int], str] = {}
    for i, link in enumerate(config.links):
        remote_listens: dict[tuple[str, int], str] = {}
        forwards: list[tuple[ForwardKind, int, RemoteForward | LocalForward]] = [
            *(("remote", j, f) for j, f in enumerate(link.remote)),
            *(("local", j, f) for j, f in enumerate(link.local)),
        ]
        for kind, j, fwd in forwards:
            base = f"link[{i}].{kind}[{j}]"
            listens = remote_listens if kind == "remote" else local_listens
            key = (fwd.bind, fwd.port)
            if fwd.port != 0 and key in listens:
                address = f"{_bracket(fwd.bind)}:{fwd.port}" if fwd.bind else str(fwd.port)
                fail(
                    f"{base}.listen",
                    listens[key],
                    f"{address} is already forwarded by {{also}}",
                    "each listen address carries one forward; change the port",
                )
            listens[key] = f"{base}.listen"
            derived = fwd.name == default_forward_name(kind, fwd.bind, fwd.port)
            keypath = base if derived else f"{base}.name"
            if fwd.name in names:
                what = "derived " if derived else ""
                fail(
                    keypath,
                    names[fwd.name],
                    f"duplicate {what}forward name {fwd.name!r} (also {{also}})",
                    'forward names are unique within a node: set name = "..." on one of them',
                )
            names[fwd.name] = keypath


# --- [[forward]]: plain TCP hops --------------------------------------------

_TOP_KEYS["forward"] = '[[forward]] listen = "0.0.0.0:2201", connect = "localhost:22"'
_FORWARD_KEYS = {
    "listen": 'listen = "0.0.0.0:2201"',
    "connect": 'connect = "10.0.0.5:22"',
    "name": 'name = "gpu-ssh-hop"',
}


def default_plain_forward_name(bind: str, port: int) -> str:
    """``P:2201`` (default bind), ``P:0.0.0.0:2201``; an empty bind reads ``*``."""
    if bind == LOCAL_DEFAULT_BIND:
        return f"P:{port}"
    return f"P:{_bracket(bind) if bind else '*'}:{port}"


def _parse_plain_forwards(top: _Section) -> tuple[PlainForwardConfig, ...]:
    forwards = []
    for sec in top.tables("forward", _FORWARD_KEYS):
        listen = sec.string("listen", required=True)
        connect = sec.string("connect", required=True)
        assert listen is not None and connect is not None
        with sec.at("listen"):
            bind, port = _listen(listen, LOCAL_DEFAULT_BIND)
        with sec.at("connect"):
            target = _hostport(connect)
        name = sec.string("name")
        if name is None:
            name = default_plain_forward_name(bind, port)
        else:
            with sec.at("name"):
                _name(name)
        forwards.append(PlainForwardConfig(bind, port, target, name))
    return tuple(forwards)


def _validate_plain_forwards(config: NodeConfig) -> None:
    """A ``[[forward]]`` name is unique among all the node's forwards, and its listen
    address is not used by another ``[[forward]]`` or ``[[link.local]]`` (port 0 excepted)."""
    names: dict[str, str] = {}
    listens: dict[tuple[str, int], str] = {}
    for i, link in enumerate(config.links):
        for j, remote in enumerate(link.remote):
            names.setdefault(remote.name, f"link[{i}].remote[{j}]")
        for j, local in enumerate(link.local):
            names.setdefault(local.name, f"link[{i}].local[{j}]")
            if local.port != 0:
                listens.setdefault((local.bind, local.port), f"link[{i}].local[{j}].listen")
    for i, fwd in enumerate(config.forwards):
        base = f"forward[{i}]"
        key = (fwd.bind, fwd.port)
        if fwd.port != 0 and key in listens:
            address = f"{_bracket(fwd.bind)}:{fwd.port}" if fwd.bind else str(fwd.port)
            raise ConfigError(
                config.source, f"{base}.listen",
                f"{address} is already used by {listens[key]}",
                "each listen address carries one forward; change the port",
            )
        listens[key] = f"{base}.listen"
        derived = fwd.name == default_plain_forward_name(fwd.bind, fwd.port)
        if fwd.name in names:
            raise ConfigError(
                config.source, base if derived else f"{base}.name",
                f"duplicate {'derived ' if derived else ''}forward name {fwd.name!r} "
                f"(also {names[fwd.name]})",
                'forward names are unique within a node: set name = "..." on one of them',
            )
        names[fwd.name] = base


def parse_config(text: str, source: str, *, base_dir: Path | None = None) -> NodeConfig:
    """Parse a node's TOML config.  ``source`` names it in errors; relative paths in
    it are relative to ``base_dir`` (default: the directory of ``source``).

    A config with no links, no relay and no admin section is valid here; whether that
    is enough to run is the caller's decision.  Grant files named by ``[relay]`` are
    read by :class:`relay.server.grants.Grants`, not here."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            source,
            "",
            f"TOML syntax error: {e}",
            'strings need double quotes and tables brackets, e.g. host = "cloud.example.org"',
        ) from None
    base = base_dir if base_dir is not None else Path(source).expanduser().absolute().parent
    top = _Section(source, doc, "", _TOP_KEYS)
    admin = top.table("admin", _ADMIN_KEYS)
    relay = top.table("relay", _RELAY_KEYS)
    config = NodeConfig(
        source=source,
        links=tuple(
            _parse_link(sec, i, base) for i, sec in enumerate(top.tables("link", _LINK_KEYS))
        ),
        admin=_parse_admin(admin, base) if admin is not None else None,
        relay=_parse_relay(relay, base) if relay is not None else None,
        forwards=_parse_plain_forwards(top),
    )
    validate_node(config)
    _validate_plain_forwards(config)
    return config


def load_config(path: str | Path) -> NodeConfig:
    """Read and parse a config file; a missing or unreadable file is a ConfigError."""
    source = str(path)
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError(
            source,
            "",
            f"cannot read the config file: {e.strerror or e}",
            "check the path; docs/config.md has a complete example to start from",
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            source, "", f"not UTF-8 text (bad byte at offset {e.start})", "save it as UTF-8"
        ) from None
    return parse_config(text, source, base_dir=file.absolute().parent)
