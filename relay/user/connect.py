"""``labrelay connect``: a user's end of the fast path, made to be ssh's ProxyCommand.

    ssh -o ProxyCommand='labrelay connect -p 2222 alice@relay gpu-cluster' me@gpu-cluster

The relay's name is resolved as the user's ssh resolves it (``ssh -G``, with
``-F``: :mod:`relay.user.sshresolve`), and it authenticates with the keys ssh would
offer (the ssh-agent's, then identity files, a passphrase asked only when needed:
:mod:`relay.user.keys`); the relay checks the grant.  It asks for a one-time ticket
(``data-token-v2@labrelay``), opens a data connection to the relay's data port and
answers the relay's challenge with a proof of the ticket (its secret never crosses the
data port: someone who reads or replays the hello gets nothing), and once the relay
says it is paired hands stdin/stdout and that socket to :mod:`relay.datapath.splicing`:
from then on the user's own ssh stream is copied in the kernel (Linux), or by the
portable copy loop (macOS and other systems without splice, or
``LABRELAY_DATAPATH=portable``), and this process only waits.  Nothing Linux-only
is imported on this path.  The SSH connection to the relay is closed once the data
connection is paired.

When the fast path is unavailable (the service is not declared end-to-end
encrypted, the relay has no data port, the agent keeps no data connections, or the
server is a stock sshd) it says so once on stderr and carries the stream in an
SSH channel instead (``direct-tcpip``, as ``ssh -W`` would).  A refusal (not
granted) is an error, not a reason to fall back.

stdout is the stream: everything this command says goes to stderr.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from twisted.conch.error import ConchError
from twisted.internet import defer, stdio
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from relay.config.errors import ConfigError
from relay.config.schema import HostKeyPolicy, LinkConfig
from relay.config.transport import is_transport_option
from relay.core import fastwire as fw
from relay.core.clock import expire
from relay.core.peertext import shown
from relay.datapath import splicing as datapath
from relay.datapath.bridge import Bridge, TCPSide
from relay.datapath.handoff import Handoff
from relay.datapath.join import join
from relay.datapath.net import client_endpoint, peer_ip, probe_idle
from relay.ssh.client import Identity, LinkSetupError, open_connection
from relay.ssh.single import SingleConnection
from relay.transport import explain
from relay.transport.dial import Dialer, route_of
from relay.user import keys as userkeys
from relay.user.sshresolve import Resolved, ResolveError, resolve

CLI = "command line"
EXIT_FAILED = 1
"""The session could not be set up, ended abnormally, or was interrupted (the line said
why).  0: it ended normally."""
EXIT_USAGE = 2
"""The command line is wrong (as argparse's and relay.cli.main's ConfigError exits): an
option ssh cannot read with it (``-F`` a file that is not there), SERVICE:PORT."""
DATA_CONNECT_TIMEOUT = 5.0
# The relay answers within its public_wait (10 s) plus the agent's reply time (15 s).
PAIR_TIMEOUT = 40.0
SAY_LIMIT = 2000
"""Characters of one message said (a relay may send a megabyte of refusal text)."""
REASON_LIMIT = 1000
"""Characters of the relay's reason in a refusal (:func:`refused`): the line's own
words around it (what was refused, what to do) are always shown whole."""
REFUSED_HINT = "the relay's reason; if it lasts, send this line to the relay's admin"


def refused(label: str, why: str) -> str:
    """The one line for a session the relay refused, whichever way it was asked for:
    the ticket request of the fast path, the data port's answer, or an SSH channel's
    open (each said it differently until round 20: ``refused by the relay: …``,
    ``fast path to … failed: the relay refused the data connection: …``, ``the relay
    refused …: …``).  What was refused, the relay's reason (shown as text,
    relay.core.peertext, cut to :data:`REASON_LIMIT`), and what to do."""
    return f"the relay refused {label}: {shown(why, REASON_LIMIT)} ({REFUSED_HINT})"


@dataclass(frozen=True)
class ConnectOptions:
    link: LinkConfig
    service: str
    port: int
    fast_path: bool = True
    keys: userkeys.KeySource | None = None  # None: the identities given to Connector


def add_connect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("destination", metavar="[user@]relay",
                        help="the labrelay relay, as for ssh (the user name is not checked: "
                        "your key is your identity)")
    parser.add_argument("service", metavar="SERVICE[:PORT]",
                        help="the service to reach (port 22 if none); ssh's %%h:%%p works")
    parser.add_argument("-p", dest="port", metavar="PORT",
                        help="the relay's SSH port (default 22)")
    parser.add_argument("-l", dest="login", metavar="USER", help="user name at the relay")
    parser.add_argument("-i", dest="identity", action="append", default=[],
                        metavar="IDENTITY", help="private key file (default ~/.ssh/id_*)")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPTION=VALUE",
                        help="an ssh_config option, as for ssh (labrelay uses HostName, "
                        "Port, User, IdentityFile, IdentitiesOnly, IdentityAgent, "
                        "UserKnownHostsFile, GlobalKnownHostsFile, StrictHostKeyChecking, "
                        "ConnectTimeout), or "
                        "one of labrelay's own: Transport=tcp|tls|auto, TLSPort, "
                        "TLSServerName, TLSCAFile, TLSPin, Proxy=http://host:port|env "
                        "(docs/networks.md)")
    parser.add_argument("-F", dest="config_file", metavar="CONFIGFILE",
                        help="the ssh config file to read the relay's Host entry from "
                        "(default ~/.ssh/config, as ssh)")
    parser.add_argument("--host-key", dest="host_key", metavar="SHA256:FINGERPRINT",
                        help="pin the relay's host key instead of checking the known_hosts "
                        "files")
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                        help="always use an SSH channel through the relay")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say which path the session takes")


_STRICT = {"yes": "yes", "true": "yes", "ask": "yes", "accept-new": "accept-new",
           "no": "accept-new", "false": "accept-new", "off": "accept-new"}


def options_from_args(ns: argparse.Namespace, resolved: Resolved | None = None,
                      ) -> ConnectOptions:
    """The command line (and, when given, what ``ssh -G`` resolved from it) as
    :class:`ConnectOptions`; raises ConfigError."""
    from relay.config.agentargs import config_from_agent_args

    if resolved is None:
        destination, port, login, identity, options = (
            ns.destination, ns.port, ns.login, ns.identity, ns.options)
    else:
        # ssh applied the command line already; what it says is the whole story.  A
        # host key is never taken on trust: "ask" (no one to ask) is "yes", and "no" is
        # accept-new (a changed key is still refused).
        destination, port, login, identity = (
            resolved.hostname, str(resolved.port), resolved.user or None, [])
        options = []
        # --host-key pins the key *instead of* known_hosts (ssh -G always names a
        # known_hosts file and a checking mode, which the pin refuses to be combined with).
        # The files themselves are set below, from ssh's lists as they are.
        if ns.host_key is None:
            options.append(f"StrictHostKeyChecking="
                           f"{_STRICT.get(resolved.strict_host_key_checking.lower(), 'yes')}")
        if resolved.connect_timeout is not None:
            options.append(f"ConnectTimeout={resolved.connect_timeout:g}")
        options += [o for o in ns.options if is_transport_option(o)]  # not ssh's
    agent_ns = argparse.Namespace(
        destination=destination, config=None, port=port, login=login,
        identity=identity, remote=[], local=[], options=options, no_command=True,
        name=None, fast_path_pool=None, host_key=ns.host_key)
    link = config_from_agent_args(agent_ns).links[0]
    if link.host_key.fingerprint is None:
        link = replace(link, host_key=_known_hosts_files(link.host_key, ns.options, resolved))
    name, _, port_text = ns.service.partition(":")
    if not name or (port_text and (not port_text.isdigit() or not 1 <= int(port_text) <= 65535)):
        raise ConfigError(CLI, repr(ns.service), "expected SERVICE or SERVICE:PORT",
                          "e.g. gpu-cluster or jupyter:8888")
    return ConnectOptions(link=link, service=name.lower(), port=int(port_text or 22),
                          fast_path=ns.fast_path)


# ssh's defaults (pathnames.h): a second user file, and the system-wide ones a lab
# admin may fill with the relay's key on every laptop.
_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_USER_KNOWN_HOSTS_OPTION = re.compile(r"\s*UserKnownHostsFile\b", re.IGNORECASE)
_GLOBAL_KNOWN_HOSTS_OPTION = re.compile(r"\s*GlobalKnownHostsFile\b", re.IGNORECASE)


def _known_hosts_files(policy: HostKeyPolicy, options: list[str],
                       resolved: Resolved | None) -> HostKeyPolicy:
    """``policy`` reading the known_hosts files ssh reads, in its order: every
    UserKnownHostsFile (the first is ``known_hosts``, the only one written), then every
    GlobalKnownHostsFile, as ``ssh -G`` names them; ``none`` is no file, as in ssh.c
    (never a file named ``none``).  Without ssh to ask, the command line's
    ``-o UserKnownHostsFile``/``GlobalKnownHostsFile`` (already in ``policy``) or else
    ssh's defaults."""
    if resolved is not None:
        user = tuple(Path(p) for p in resolved.known_hosts)
        glob = tuple(Path(p) for p in resolved.global_known_hosts)
        return replace(policy.with_user_files(user), global_known_hosts=glob)
    if not any(_USER_KNOWN_HOSTS_OPTION.match(o) for o in options):
        # ~/.ssh/known_hosts is already the first (the agent's default); ssh reads
        # ~/.ssh/known_hosts2 after it.
        policy = replace(policy, extra_known_hosts=tuple(Path(p) for p in _USER_KNOWN_HOSTS[1:]))
    if not any(_GLOBAL_KNOWN_HOSTS_OPTION.match(o) for o in options):
        policy = replace(policy, global_known_hosts=tuple(Path(p) for p in _GLOBAL_KNOWN_HOSTS))
    return policy


def _grow_pipe(fd: int) -> None:
    """ssh's ProxyCommand pipes hold 64 KiB: at 1 MiB ssh and the pump each wake a
    sixteenth as often for the same bytes.  Best effort (a tty or socket is left as is;
    an unprivileged user may be over its pipe-buffer quota; only Linux can resize)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, set_size, datapath.DEFAULT_PIPE_SIZE)
    except OSError:
        pass


class DataPortUnreachable(Exception):
    """The relay's data port did not accept a connection, or what accepted it did not
    speak the data port's protocol; ``str()`` says why."""


class _NoAnswer(ConnectionError):
    """The data connection ended, or was answered with bytes that are not the relay's,
    before any answer to our hello: whatever accepted it (a middlebox that accepts and
    drops what it does not know, another server on that port) is not the relay's data
    port, so the session falls back to an SSH channel.  Safe: nothing of stdin is read
    before the relay pairs the connection, and the ticket's secret never crosses the
    data port (only a proof over the relay's nonce does).  An answer that *refuses* is
    the relay's word, and stays an error."""


class _Refused(ConnectionError):
    """The data port answered our hello with a refusal: the relay's word (``why``)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _UserData(Handoff):
    """The data connection until the relay answers: its challenge in, our hello (the
    proof over its nonce) out, one reply in; then held for the data path."""

    def __init__(self, token: bytes, name: str, port: int) -> None:
        super().__init__()
        self.token = token
        self.service = (name, port)
        self.nonce: bytes | None = None
        self.answer: defer.Deferred[None] = defer.Deferred()

    def prefaceStarted(self) -> None:
        pass  # the relay speaks first

    def prefaceReceived(self) -> None:
        if self.answer.called:
            return
        if self.nonce is None:
            try:
                challenge = fw.parse_challenge(self.buf)
            except fw.WireError as e:
                self.answer.errback(_NoAnswer(f"the data port answered nonsense ({e})"))
                self.transport.abortConnection()
                return
            if challenge is None:
                return
            self.nonce, self.buf = challenge
            self.transport.write(fw.user_hello(self.token, self.nonce, *self.service))
            if not self.buf:
                return
        try:
            parsed = fw.parse_reply(self.buf, fw.USER_OK, fw.USER_ERROR)
        except fw.WireError as e:
            self.answer.errback(_NoAnswer(f"the data port answered nonsense ({e})"))
            return
        if parsed is None:
            return
        ok, message, rest = parsed
        self.hold(rest)
        if ok:
            self.answer.callback(None)
        else:
            self.answer.errback(_Refused(message))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        if not self.answer.called:
            self.answer.errback(_NoAnswer(
                "the data connection was closed without an answer"))


class Connector:
    """One ``labrelay connect`` run."""

    def __init__(self, options: ConnectOptions, reactor: Any, identities: list[Identity],
                 stderr: TextIO = sys.stderr, verbose: bool = False,
                 stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.options = options
        self.reactor = reactor
        self.identities = identities
        self.stderr = stderr
        self.verbose = verbose
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.path = ""
        self.conn: Any = None
        self.agent: Any = None
        self.interrupted = False
        self.dialer: Dialer | None = None  # made in open(): https_proxy may be wrong

    def say(self, text: str) -> None:
        """One line on stderr, which is the user's terminal (ssh passes a
        ProxyCommand's through).  Much of what is said is the relay's words (its
        refusals, an agent's reason passed on, the data port's error, a disconnect's
        text) or an on-path box's, on the unencrypted data port: shown as printable
        text only (relay.core.peertext), never as escape sequences her terminal runs."""
        if self.interrupted:
            return  # what the stop broke is not news (see interrupt)
        self.stderr.write(f"labrelay connect: {shown(text, SAY_LIMIT)}\n")
        self.stderr.flush()

    def interrupt(self) -> None:
        """The reactor is stopping before the run ended: a signal (Ctrl-C, SIGTERM).
        Say so, and nothing after: the connections the stop closes would otherwise
        be reported as the relay's failure ("cannot reach the relay: Connection
        lost", "ended abnormally ... (the relay side)")."""
        if self.interrupted:
            return
        cfg = self.options.link
        if self.conn is None and not self.path:
            route = self.dialer.last if self.dialer is not None else None
            at = (explain.where(route.host, route.port, route.tls, route.proxy)
                  if route is not None else f"{cfg.host}:{cfg.port}")
            where = f" while reaching the relay {at}"
        elif not self.path:
            where = f" while setting up {self.label}"
        else:
            where = f"; the session to {self.label} is closed"
        self.say(f"interrupted{where}")
        self.interrupted = True

    @property
    def label(self) -> str:
        return f"{self.options.service}:{self.options.port}"

    async def open(self) -> Any:
        """One authenticated SSH connection to the relay (a ``LinkConnection``): the
        link's own transport and host-key check, without its reconnecting service
        (:func:`relay.ssh.client.open_connection`)."""
        owner = SingleConnection(self.options.link, self.reactor, self.identities)
        self.dialer = Dialer(self.reactor, self.options.link)
        self.conn = await open_connection(owner, self.dialer)
        return self.conn

    async def run(self) -> int:
        if self.options.fast_path:
            try:  # before anything is spent: a bad LABRELAY_DATAPATH is the user's to fix
                datapath.choose_backend()
            except datapath.DatapathError as e:
                self.say(str(e))
                return EXIT_FAILED
        if self.options.keys is not None:
            try:
                self.identities, self.agent = await self.options.keys.load(
                    self.reactor, self.say, self.verbose)
            except (userkeys.NoIdentity, userkeys.IdentityError) as e:
                self.say(str(e))
                return EXIT_FAILED
        try:
            await self.open()
        except Exception as e:
            self.say(self._notReached(e))
            return EXIT_FAILED
        try:
            return await self._session()
        finally:
            self._hangUp()

    def _notReached(self, e: Exception) -> str:
        """The line for a connection to the relay that did not become a session: named
        by the route it took (the TLS port and the proxy, not the SSH port the relay is
        known by), and with what to check (relay.transport.explain)."""
        cfg = self.options.link
        if self.dialer is None:  # no route: the proxy's URL (https_proxy) is wrong
            return f"cannot reach the relay {cfg.host}:{cfg.port}: {e}"
        routes = self.dialer.routes
        if len(routes) > 1:  # the error lists each route with its reason
            each = str(e).removeprefix("every route failed: ")
            return f"cannot reach the relay {cfg.host} by any route: {each}"
        route = routes[0]
        at = explain.where(route.host, route.port, route.tls, route.proxy)
        if isinstance(e, LinkSetupError):
            return f"cannot reach the relay {at}: {e}"
        why = explain.unreachable(e, host=route.host, port=route.port, tls=route.tls,
                                  timeout=cfg.connect_timeout)
        return f"cannot reach the relay {at}: {why}"

    def _hangUp(self) -> None:
        agent, self.agent = self.agent, None
        if agent is not None and agent.transport is not None:
            agent.transport.loseConnection()
        conn, self.conn = self.conn, None
        if conn is not None and conn.transport is not None:
            conn.link_transport.sendDisconnect(11, b"labrelay connect done")

    async def _session(self) -> int:
        why = "--no-fast-path"
        if self.options.fast_path:
            try:
                reply = await self.conn.sendGlobalRequest(
                    fw.TOKEN_REQUEST, fw.pack_token_request(self.options.service,
                                                            self.options.port), wantReply=1)
            except ConchError as e:
                if e.data is None:  # the connection stopped, not a REQUEST_FAILURE
                    self.say(f"the relay closed the connection: {e.value}")
                    return EXIT_FAILED
                why = "the relay does not offer labrelay's fast path (a stock sshd or an " \
                      "older relay)"
            else:
                try:
                    status, message, data_port, token, _lifetime = fw.unpack_token_reply(reply)
                except fw.WireError as e:  # was "internal error: truncated uint32", exit 1
                    status, message = fw.Status.UNAVAILABLE, f"its ticket answer is malformed: {e}"
                if status is fw.Status.REFUSED:
                    self.say(refused(self.label, message))
                    return EXIT_FAILED
                if status is not fw.Status.OK:
                    why = message
                else:
                    try:
                        return await self._fast(data_port, token)
                    except DataPortUnreachable as e:
                        why = str(e)
        if self.options.fast_path or self.verbose:  # --no-fast-path: as asked, no news
            self.say(f"fast path unavailable for {self.label} ({why}); using an SSH channel "
                     "through the relay")
        return await self._channel()

    async def _fast(self, data_port: int, token: bytes) -> int:
        """The session on the fast path; DataPortUnreachable if the data port cannot be
        reached (a firewall in between is the usual reason): the caller falls back."""
        cfg = self.options.link
        route = route_of(self.conn.link_transport)
        if route is not None and not route.direct:
            raise DataPortUnreachable(f"the relay is reached by {route}, and its data port "
                                      "is not reachable that way")
        # The address this SSH connection reached (its host key was checked), not
        # the relay's name resolved again.
        host = peer_ip(self.conn) or cfg.host
        endpoint = client_endpoint(self.reactor, host, data_port,
                                   min(cfg.connect_timeout, DATA_CONNECT_TIMEOUT))
        if len(token) != fw.TOKEN_LEN:
            raise DataPortUnreachable("the relay sent a malformed ticket")
        service, port = self.options.service, self.options.port
        try:
            proto: Any = await endpoint.connect(
                Factory.forProtocol(lambda: _UserData(token, service, port)))
        except Exception as e:
            why = explain.short(e, min(cfg.connect_timeout, DATA_CONNECT_TIMEOUT))
            raise DataPortUnreachable(
                f"cannot reach its data port {host}:{data_port}: {why}; a firewall between "
                f"you and the relay? Its admin can open TCP port {data_port}") from e
        # The relay's side of this connection has the same probes.  Once spliced, no
        # SSH keepalive watches it: without them, a relay that vanished (no FIN, no
        # RST) during an idle session left the user's ssh waiting on its own
        # ServerAliveInterval, or on TCP's two hours.
        probe_idle(proto.transport)
        try:
            await expire(proto.answer, PAIR_TIMEOUT, self.reactor)
        except defer.CancelledError:
            self.say(f"the relay did not pair the data connection for {self.label} in time")
            return EXIT_FAILED
        except _NoAnswer as e:
            proto.transport.abortConnection()
            raise DataPortUnreachable(f"its data port {host}:{data_port}: {e}") from e
        except _Refused as e:
            self.say(refused(self.label, e.why))
            return EXIT_FAILED
        except Exception as e:
            self.say(f"fast path to {self.label} failed: {e}")
            return EXIT_FAILED
        self._hangUp()  # the token is spent; the session no longer needs SSH
        self.path = "spliced"
        dp = datapath.get(self.reactor)
        if self.verbose:
            how = "copied" if dp.backend.name == "portable" else "spliced"
            self.say(f"{self.label}: fast path ({how}) via data port {data_port}, "
                     f"{dp.backend.name} data path")
        for pipe_fd in (self.stdin_fd, self.stdout_fd):
            _grow_pipe(pipe_fd)
        pair = join(dp, datapath.End(self.stdin_fd, self.stdout_fd), proto)
        try:
            await pair.done
        except datapath.PairError as e:
            self.say(f"session to {self.label} ended abnormally: {e.strerror} "
                     f"({'your side' if e.side == 'a' else 'the relay side'})")
            return EXIT_FAILED
        return 0

    async def _channel(self) -> int:
        try:
            channel = await self.conn.openDirect(self.options.service, self.options.port,
                                                 "labrelay-connect", 0)
        except Exception as e:
            self.say(refused(self.label, _open_failure(e)))
            return EXIT_FAILED
        # Only now: a Ctrl-C while the relay waited for the service's agent
        # (public_wait) interrupted the setting up, not a session.
        self.path = "channel"
        done: defer.Deferred[None] = defer.Deferred()
        side = TCPSide()
        stdio.StandardIO(side, stdin=self.stdin_fd, stdout=self.stdout_fd,  # type: ignore[call-arg]
                         reactor=self.reactor)

        def closed(to_service: int, from_service: int) -> None:
            if not done.called:
                done.callback(None)

        Bridge(side, channel, onClosed=closed)
        await done
        return 0


def _open_failure(e: Exception) -> str:
    """The relay's words for a refused channel.  Conch fails the open with
    ``ConchError(description, code)``, whose ``str()`` is the tuple's repr: "(b'no
    service nosuch:22 on this relay', 2)"."""
    if isinstance(e, ConchError) and isinstance(e.value, bytes):
        return e.value.decode("utf-8", "replace") or f"reason code {e.data}"
    return str(e)


def run(argv_ns: argparse.Namespace) -> int:
    """``labrelay connect``: parse, run the reactor until the session ends, exit code."""
    from twisted.internet import reactor

    from relay.user.askpass import ask

    try:
        resolved = resolve(argv_ns.destination, config_file=argv_ns.config_file,
                           port=argv_ns.port, login=argv_ns.login,
                           identities=argv_ns.identity,
                           options=[o for o in argv_ns.options if not is_transport_option(o)])
    except ResolveError as e:  # ssh could not read the -F file or the options given
        sys.stderr.write(f"labrelay connect: {shown(str(e), SAY_LIMIT)}\n")
        return EXIT_USAGE
    options = options_from_args(argv_ns, resolved)
    if resolved is not None:
        tokens = {"d": str(Path.home()), "u": _local_user(), "h": resolved.hostname,
                  "r": resolved.user, "%": "%"}
        # ssh -G drops an -i file that does not exist: keep it, to say so (as ssh does).
        files = [Path(p) for p in argv_ns.identity] + \
            [userkeys.expand(f, tokens) for f in resolved.identity_files]
        only, agent = resolved.identities_only, resolved.identity_agent
    else:
        files = list(options.link.identities) or [Path(f) for f in userkeys.DEFAULT_FILES]
        only, agent = False, None
    source = userkeys.KeySource(
        files=tuple(files), explicit=tuple(Path(p) for p in argv_ns.identity),
        identities_only=only, agent=userkeys.agent_socket(agent), ask=ask)
    options = ConnectOptions(options.link, options.service, options.port, options.fast_path,
                             keys=source)
    result = [EXIT_FAILED]
    ended = [False]
    connector = Connector(options, reactor, [], verbose=argv_ns.verbose)

    def finished(code: int | Failure) -> None:
        ended[0] = True
        if isinstance(code, Failure):
            connector.say(f"internal error: {code.getErrorMessage()}")
            code = EXIT_FAILED
        result[0] = code if not connector.interrupted else EXIT_FAILED
        reactor.callLater(0, stop)  # type: ignore[attr-defined]

    def stop() -> None:
        try:
            reactor.stop()  # type: ignore[attr-defined]
        except ReactorNotRunning:  # a signal stopped it first: the run ended meanwhile
            pass

    def stopping() -> None:
        if not ended[0]:
            connector.interrupt()

    def start() -> None:
        defer.Deferred.fromCoroutine(connector.run()).addBoth(finished)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", stopping)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return result[0]


def _local_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
