"""The node configuration's schema: frozen, typed objects and their defaults.

What one labrelay process runs (:class:`NodeConfig`: links, plain hops, the relay,
the admin endpoint) as immutable values; every other layer reads these and nothing
else.  The defaults live here, on the fields, and in the few constants below that the
grammar and the command line share.  Parsing is elsewhere: :mod:`relay.config.grammar`
(OpenSSH-style syntax) and :mod:`relay.config.loader` (the TOML file).
"""

from __future__ import annotations

import dataclasses
import getpass
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.config.errors import ConfigError

DEFAULT_WINDOW = 2 * 1024 * 1024
DEFAULT_MAX_PACKET = 32 * 1024
LOCAL_DEFAULT_BIND = "127.0.0.1"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:7022"
# What ssh(1) sends for `-R port:host:hostport`: the server binds loopback only,
# whatever its GatewayPorts; `-R :port:...` or `-R *:port:...` asks for all interfaces.
REMOTE_DEFAULT_BIND = "localhost"
ForwardKind = Literal["remote", "local"]


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

    The files are ssh's UserKnownHostsFile and GlobalKnownHostsFile: ``known_hosts``
    is the first user file, the only one ever written; ``extra_known_hosts`` are the
    other user files and ``global_known_hosts`` the global ones, read after it as if
    they were one file with it (``labrelay connect`` takes them from the user's ssh; an
    agent from ``known_hosts``/``global_known_hosts`` or ``-o``).
    ``no_user_known_hosts`` is ssh's ``UserKnownHostsFile none``: no user file is read
    (``known_hosts`` is ignored) and, as in ssh, a new host is refused even with
    ``accept_new``, because there is no file to record it in.
    """

    known_hosts: Path | None = None
    fingerprint: str | None = None
    accept_new: bool = False
    extra_known_hosts: tuple[Path, ...] = ()
    global_known_hosts: tuple[Path, ...] = ()
    no_user_known_hosts: bool = False

    def with_user_files(self, files: tuple[Path, ...]) -> HostKeyPolicy:
        """This policy with ssh's UserKnownHostsFile list: the first is ``known_hosts``,
        the rest are read after it; ``()`` is ``none``."""
        return dataclasses.replace(
            self,
            known_hosts=files[0] if files else None,
            extra_known_hosts=files[1:],
            no_user_known_hosts=not files,
        )


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


TransportMode = Literal["tcp", "tls", "auto"]
#: The ALPN id of SSH on the relay's TLS port (docs/networks.md); a client that offers
#: no ALPN gets SSH too.
ALPN_SSH = "labrelay-ssh/1"
DEFAULT_TLS_PORT = 443


@dataclass(frozen=True)
class ProxyURL:
    """``http://[user:pass@]host:port``: an HTTP proxy that opens tunnels with CONNECT."""

    host: str
    port: int
    user: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        """The URL without its password (for logs, status and errors)."""
        who = f"{self.user}:***@" if self.user is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{who}{host}:{self.port}"


@dataclass(frozen=True)
class TransportConfig:
    """How a link (or ``labrelay connect``) reaches the relay (docs/networks.md).

    ``mode``: ``tcp`` is SSH straight to ``host:port``; ``tls`` is SSH inside TLS to
    ``host:tls_port`` (ALPN ``labrelay-ssh/1``), the relay's certificate checked for
    ``server_name`` against the system CAs, ``ca_file``, or a ``pin``, and then the
    SSH host key as always; ``auto`` tries plain SSH, then TLS, then TLS through the
    proxy (if one is set), and keeps the first that worked.  ``proxy`` (or, with
    ``proxy_from_env``, ``https_proxy`` unless ``no_proxy`` exempts the host) carries
    the connection through an HTTP CONNECT tunnel.  ``pin`` is normalised to
    ``spki:<base64 sha256>`` or ``cert:<hex sha256>``."""

    mode: TransportMode = "tcp"
    tls_port: int = DEFAULT_TLS_PORT
    server_name: str | None = None  # default: the link's host
    ca_file: Path | None = None  # default: the system's CA store
    pin: str | None = None
    proxy: ProxyURL | None = None
    proxy_from_env: bool = False


DEFAULT_MAX_SESSIONS = 1024
"""Sessions one link may have open at once (relay.core.sessioncap).  The relay's own
defaults let one user keep 64 (``max_sessions_per_user``): 16 users at that cap, or
100 users with ten each, fit; a lab PC's descriptor limit is the other bound (one per
session, the target's)."""

DEFAULT_MAX_SESSIONS_PER_TARGET = 512
"""Sessions of one link open to one forward's target (round 20).  An honest peak on one
GPU node: 30 lab mates with a browser on its Jupyter (up to 6 HTTP connections each,
plus one websocket per open notebook: 30 x (6 + 5) = 330), or 30 x (2 ssh + 1 rsync)
= 90 on its sshd.  What one host can take: a Jupyter server's descriptor limit is
often the soft default, 1 024, which the link's whole ``max_sessions`` filled; half of
it stays for the host's own users and kernels."""

DEFAULT_MAX_CONNECTING = 128
"""Sessions of one link still connecting to one forward's target.  A connect to a lab host
answers in well under a millisecond on a LAN; only a host that stopped answering keeps
them (each up to the target connect timeout, 10 s)."""


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
    transport: TransportConfig = field(default_factory=TransportConfig)
    # Seconds sessions are held for resumption when the link to a labrelay relay breaks
    # (docs/resilience.md); 0 = never held: they end with the link, as with a stock server.
    resume_grace: float = 60.0
    # The agent's own cap on the sessions its relay opens (relay.core.sessioncap): a
    # relay taken over must not make the lab PC open connections without end.  Live on
    # a reload (relay.config.diff.LINK_LIVE): the link is not restarted.
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_connecting: int = DEFAULT_MAX_CONNECTING
    max_sessions_per_target: int = DEFAULT_MAX_SESSIONS_PER_TARGET
    remote: tuple[RemoteForward, ...] = ()
    local: tuple[LocalForward, ...] = ()


@dataclass(frozen=True)
class AdminConfig:
    """The status endpoint (HTTP).  It answers only requests addressed to itself (the
    ``Host`` header, against DNS rebinding); with ``token_file`` it also requires
    ``Authorization: Bearer <token>``, and only then may it listen beyond loopback."""

    listen: HostPort
    token_file: Path | None = None
    # Bounds on the endpoint's connections (relay.ops.admincap; docs/security.md "The
    # admin endpoint"): every admin connection is a descriptor the SSH port needs too.
    # Bound when labrelay starts, as the rest of [admin]: a reload reports a change.
    #: Admin connections open at once, from everyone (loopback not counted here).
    max_connections: int = 32
    #: Admin connections open at once from one address (a browser opens up to 6).
    max_connections_per_source: int = 8
    #: Seconds an admin connection may stay open from its accept, whatever it sends.
    connection_lifetime: float = 30.0
    #: Bytes of a request body read; past it the answer is 413 (no request needs one).
    max_body: int = 64 * 1024


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
class KeyLimitsConfig:
    """OpenSSH's ``expiry-time=`` (as a Unix time) and ``from=`` (the pattern list as
    written) on one key line of a grant file."""

    key: str
    expires: float | None = None
    sources: str | None = None


@dataclass(frozen=True)
class CertAuthorityConfig:
    """A ``cert-authority`` line: a CA key whose certificates log in as this principal
    when one of their principals is in ``principals`` (docs/relay.md, "Certificates")."""

    key: str
    principals: tuple[str, ...]
    expires: float | None = None
    sources: str | None = None
    where: str = ""


@dataclass(frozen=True)
class PrincipalConfig:
    """One ``[[relay.agent]]`` or ``[[relay.user]]`` entry (or one grant-file line).

    ``keys`` are OpenSSH public-key lines (``ssh-ed25519 AAAA... comment``).
    Agents use ``services`` (names they may register) and ``public_ports``; users use
    ``services`` (names they may reach), ``max_sessions`` and the sharing settings:
    ``share`` (weight on a congested link, docs/sharing.md), ``rate_limit`` (bytes/s
    each way, None: unlimited) and ``rate_burst`` (bytes; None: one second's worth).
    """

    kind: str  # "agent" | "user"
    name: str
    keys: tuple[str, ...]
    services: tuple[ServiceGrant, ...] = ()
    public_ports: tuple[int, ...] = ()
    max_sessions: int | None = None
    share: float = 1.0
    rate_limit: int | None = None
    rate_burst: int | None = None
    key_limits: tuple[KeyLimitsConfig, ...] = ()
    authorities: tuple[CertAuthorityConfig, ...] = ()
    # The TOML entry's own ``expiry``/``from`` (None in a grant-file line, whose options
    # are its key's): they also bound certificates of the relay-wide ``trusted_user_ca``.
    expires: float | None = None
    sources: str | None = None


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
class CrowdingConfig:
    """What a full ``max_unauthenticated`` cap does to connections that stall:
    ``[relay.crowding]`` (docs/relay.md "Per-source limits and penalties").

    When every place of a port is taken and no source holds more places than the
    newcomer's would, the newcomer takes the place of the connection that has made the
    least progress for longest, once it has held its place past its stage's seconds
    (counted from accept): ``silent`` while it has sent nothing (no SSH version line,
    no byte of a data-port hello or a TLS ClientHello), ``handshake`` while its key
    exchange (or TLS handshake, or hello) is unfinished, ``auth`` while it
    authenticates.  Such an eviction charges its source ``grace_exceeded``: a real
    client sends its version line within a round trip and finishes key exchange in
    two, so only an idle socket stalls that long.  Each must be at least the one before
    it and ``auth`` at most ``login_grace`` (beyond it there is nothing to shorten).

    Before progress, *neighbourhoods* decide (``netblock4``/``netblock6``: the peer's
    address masked to an IPv4 /24 and an IPv6 /48 by default, each at most as long as
    its ``per_source_netblock``): a newcomer whose neighbourhood, with it, would hold
    fewer places than the neighbourhood holding the most takes the place of that
    neighbourhood's lowest-stage, oldest connection, fresh or not (unpenalised unless
    it was stalled).  An attacker with a place per source who recycles each place
    before it stalls (an IPv6 /56 is 256 sources but one /48) then holds a
    neighbourhood's share, not the cap.  ``enabled = false`` turns both rules off.
    """

    enabled: bool = True
    silent: float = 2.0
    handshake: float = 10.0
    auth: float = 20.0
    netblock4: int = 24
    netblock6: int = 48


@dataclass(frozen=True)
class TLSListenConfig:
    """The relay's TLS port (``tls_cert`` in ``[relay]``; docs/networks.md): SSH and the
    fast path's data connections inside TLS on one port, chosen by ALPN.

    ``cert``/``key`` are PEM files (certbot's ``fullchain.pem``/``privkey.pem``); they
    are read again whenever they change, at the next handshake.  ``names`` are the SNI
    names accepted (empty: those the certificate is for); a client that sends another
    name is refused, one that sends none is let in (a connection to an IP address)."""

    cert: Path
    key: Path
    listen: HostPort = HostPort("0.0.0.0", DEFAULT_TLS_PORT)
    names: tuple[str, ...] = ()
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class RelayConfig:
    """labrelay's own SSH relay (the cloud end): ``[relay]`` in the node config."""

    listen: HostPort = HostPort("0.0.0.0", 2222)
    state_dir: Path = Path("/var/lib/labrelay")
    #: A private key file the relay announces to clients after login and proves on
    #: request (OpenSSH's ``UpdateHostKeys``), so they learn it before it replaces the
    #: key in ``state_dir``; the key exchange still uses that one.  A reload applies it.
    #: docs/operations.md, rotating the host key.
    next_host_key: Path | None = None
    public_bind: str = "0.0.0.0"
    agents_file: Path | None = None
    users_file: Path | None = None
    revoked_keys: Path | None = None  # an OpenSSH KRL (ssh-keygen -k) or a file of public keys
    #: CA public-key lines trusted for every user (sshd's ``TrustedUserCAKeys``): a
    #: certificate they sign logs in as the user the login name names, when that name is
    #: one of its principals and a ``[[relay.user]]`` (or users-file user).  Agents are
    #: not covered.  Read again on reload (SIGHUP); docs/relay.md "Certificates".
    trusted_user_ca: tuple[str, ...] = ()
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
    crowding: CrowdingConfig = field(default_factory=CrowdingConfig)
    max_channels: int = 1024
    max_sessions_per_user: int = 64
    #: Authenticated SSH connections one user (or agent) may hold at once: a valid key
    #: must not be able to take every descriptor of the relay (docs/security.md).
    max_connections_per_user: int = 64
    idle_timeout: float = 0.0
    public_wait: float = 10.0
    #: Open connections to the public ports, all together; None: half the descriptor
    #: limit (at least 64).  A number only lowers that (relay.server.public).
    public_max_connections: int | None = None
    #: Open connections from one source (address, or its per_source_netblock network)
    #: to one public port; 0: no per-source cap.  Read at each accept: live on reload.
    public_max_per_source: int = 128
    #: Addresses or networks whose connections to a public port are not counted
    #: against their source (only in the total): a lab's NAT, a monitoring host.  Not
    #: ``penalty_exempt``, which is about penalties (relay.server.public).  Live on reload.
    public_per_source_exempt: tuple[IPNetwork, ...] = ()
    #: Confirm a user's ``direct-tcpip`` channel as soon as it is admitted, when its
    #: service's agent is connected and its last open succeeded, and hold the user's
    #: first bytes (within the channel's window) until the agent's side is open: one
    #: crossing less before the first byte (docs/relay.md "Early confirmation").  If the
    #: agent then fails, the user's channel is closed instead of refused.
    early_confirm: bool = True
    # Seconds an agent's sessions are held for resumption when its link breaks (only
    # with a labrelay agent; docs/resilience.md); 0 = never held.
    resume_grace: float = 60.0
    # Resumable sessions at most, open or held, over all agents: each keeps up to one
    # window of replay, so this times ``window`` bounds that memory; past it a new
    # session is opened as a plain ``forwarded-tcpip`` (it ends with the link).
    resume_max_sessions: int = 512
    # The same per agent key, so that one agent (its public ports are anyone's to
    # open) cannot take every other agent's resumable sessions.
    resume_max_sessions_per_agent: int = 128
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
    tls: TLSListenConfig | None = None  # the TLS port; off unless tls_cert is set


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
