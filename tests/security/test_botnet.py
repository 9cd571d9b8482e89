"""Many sources, one place each: the pre-login lockout a botnet (or an IPv6 /56) could
hold (docs/security.md "Per-source limits and penalties", "Distributed floods").

Everything runs in a network namespace of its own (``unshare``, no name to leak): a
veth interface carries 200 IPv4 addresses (10.66.x.y) and 300 IPv6 addresses in the
256 /64s of one /56 (2001:db8:66::/56, ``nodad``), the relay listens dual-stack
(``[::]``), alice is 127.0.0.1.  Each attacker address holds ONE connection to the
relay's SSH port (or its data port): 500 addresses, 456 sources (the IPv6 ones group by
``per_source_netblock6 = 64``), every one of them holding one place at most, so the
busiest-source eviction (test_admission.py) has nothing to take: the 64 places of
``max_unauthenticated`` stayed full until ``login_grace`` (30 s) and alice was refused
at accept (``kex_exchange_identification: Connection closed``).  Now the connection that
stalled longest at the lowest stage gives way ([relay.crowding]): silent sockets after
2 s, a version line and nothing more after ``handshake``, a finished key exchange
(paramiko) after ``auth``; alice's stock ``ssh -J`` and her fast path get through.
(Since round 17 the busiest neighbourhood gives way first, [relay.crowding]
netblock4/6: its stalled places are taken, and charged, as before; the crowd's own
late IPv6 connections even out its two neighbourhoods while it settles.  A crowd that
recycles its places before they stall: test_botnet_recycling.py.)

Also the IPv6 side of per-source limits and penalties, which had no test: sources are
/64s, so 11 addresses of one /64 are one source, capped at 10, and failed logins from
four addresses of a /64 get the whole /64 refused, on both ports, and nobody else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import Targets
from harness import AgentProcess, KeyPair, RelayNode, Sshd, known_hosts_line
from relay_fixtures import admin_port, wait_until
from test_admission import Keys, Site, keys  # noqa: F401 (keys: a fixture)

pytestmark = pytest.mark.integration

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

V4 = [f"10.66.{i // 250}.{i % 250 + 1}" for i in range(200)]
# 300 addresses in the 256 /64s of 2001:db8:66::/56 (44 /64s hold two): 256 sources
V6 = [f"2001:db8:66:{i % 256:x}::{i // 256 + 1}" for i in range(300)]
ONE64 = [f"2001:db8:66:ff::{i:x}" for i in range(0x10, 0x20)]  # 16 more in one /64
OTHER64 = "2001:db8:66:fe::1"
SOURCES = 200 + 256
PLACES = 64  # max_unauthenticated, the default


@pytest.fixture
def netns() -> Iterator[None]:
    """This thread (and every process it starts) in a new network namespace with
    the attackers' addresses on a veth interface; back in the old one afterwards."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            pytest.fail(f"unshare(CLONE_NEWNET): {os.strerror(err)} (the tests run as root)")
        lines = ["link set lo up", "link add bn0 type veth peer name bn1", "link set bn0 up",
                 "link set bn1 up"]
        lines += [f"addr add {a}/32 dev bn0" for a in V4]
        lines += [f"addr add {a}/64 dev bn0 nodad" for a in V6 + ONE64]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                       check=True, capture_output=True, timeout=60)
        yield
    finally:
        if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover
            err = ctypes.get_errno()
            raise OSError(err, f"setns back: {os.strerror(err)}")
        os.close(own)


def _site(keys: Keys, client_key: KeyPair,  # noqa: F811
          start_relay: Callable[..., RelayNode],
          start_agent: Callable[..., AgentProcess], sshd_factory: Callable[[str], Sshd],
          tmp_path: Path, relay_toml: str = "") -> Site:
    """test_admission's site (relay, lab_pc's agent with gpu-cluster:22, alice), the
    relay's SSH and data ports dual-stack."""
    gpu = sshd_factory("gpu_cluster")
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22" {keys.lab_pc.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {keys.alice.public_blob()} alice'],
        relay_toml='data_port = 0\ndata_bind = "::"\ne2e_services = ["gpu-cluster:22"]\n'
                   + relay_toml, listen="[::]:0")
    data_port = relay.wait_for("relay_data_port", since=0)["port"]
    relay.trust(known_hosts_line(gpu.host_key.public_blob(), 22, host="gpu-cluster"))
    agent = start_agent(
        "-p", str(relay.port), "-i", str(keys.lab_pc.path),
        "-o", f"UserKnownHostsFile={relay.known_hosts}", "--admin", "127.0.0.1:0",
        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "lab_pc@127.0.0.1", name="agent")
    agent.wait_for("fast_path_ready", timeout=20)
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    s = Site(relay, agent, gpu, data_port, keys, client_key, tmp_path, admin_port(agent))
    wait_until(lambda: s.pool()["idle"] == 4
               and s.relay.status()["relay"]["fast_path"]["pools"].get("lab_pc") == 4,
               "the agent's pool to fill")
    return s


@pytest.fixture
def make_site(netns: None, keys: Keys, client_key: KeyPair,  # noqa: F811
              start_relay: Callable[..., RelayNode],
              start_agent: Callable[..., AgentProcess],
              sshd_factory: Callable[[str], Sshd], targets: Targets,
              tmp_path: Path) -> Callable[[str], Site]:
    return lambda relay_toml="": _site(keys, client_key, start_relay, start_agent,
                                       sshd_factory, tmp_path, relay_toml)


def _dial(source: str, port: int, first: bytes = b"") -> socket.socket | None:
    """A connection from ``source`` to the relay (127.0.0.1 or ::1), sending ``first``;
    None if it was reset before ``connect`` returned."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    try:
        s.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        if first:
            s.sendall(first)
    except (ConnectionResetError, BrokenPipeError):
        s.close()
        return None
    return s


def _open_ended(sockets: list[socket.socket], within: float) -> tuple[list[socket.socket],
                                                                       int]:
    """Of ``sockets``, those the relay has not closed after ``within`` seconds of
    reading whatever it sent (a banner), and how many it closed."""
    ended = 0
    alive = set(sockets)
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as sel:
        for s in sockets:
            sel.register(s, selectors.EVENT_READ)
        while alive and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    if s.recv(65536) != b"":
                        continue
                except ConnectionResetError:
                    pass
                sel.unregister(s)
                alive.discard(s)
                ended += 1
    return [s for s in sockets if s in alive], ended


def _kex_only(source: str, port: int) -> paramiko.Transport | None:
    """paramiko from ``source``: version line, full key exchange, then nothing (it
    never asks for ``ssh-userauth``); None if refused."""
    sock = _dial(source, port)
    if sock is None:
        return None
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=20)
    except (paramiko.SSHException, EOFError, OSError):
        t.close()
        return None
    return t


@pytest.mark.parametrize(
    ("mode", "crowding"),
    [("idle", ""),  # the defaults: silent 2 s
     ("version", "[relay.crowding]\nhandshake = 4\nauth = 6\n"),
     ("kex", "[relay.crowding]\nhandshake = 4\nauth = 6\n")],
)
def test_one_place_per_source_from_500_addresses_does_not_lock_alice_out(
        make_site: Callable[[str], Site], mode: str, crowding: str) -> None:
    """500 addresses (200 IPv4, 300 IPv6 in one /56), one connection each to the SSH
    port: 64 held, the rest refused at accept; ``idle`` sends nothing, ``version`` its
    version line, ``kex`` (paramiko, 100 addresses) finishes key exchange.  alice's
    ``ssh -J`` and fast path were refused at accept until ``login_grace``; now, once
    the crowd's places are past their stage's seconds, each of her connections takes
    the place of the one that stalled longest, whose source is penalised."""
    site = make_site(crowding)
    base = site.alice("gpu-jump")
    port = site.relay.port
    addresses = V4 + V6
    held: list[Any] = []
    sockets: list[socket.socket] = []
    start = time.monotonic()
    if mode == "kex":
        addresses = V4[:50] + V6[:50]
        with ThreadPoolExecutor(16) as pool:
            transports = list(pool.map(lambda a: _kex_only(a, port), addresses))
        held = [t for t in transports if t is not None]
        stage, wait = "auth", 6.0
    else:
        first = b"SSH-2.0-bot_1.0\r\n" if mode == "version" else b""
        dialled = [_dial(a, port, first) for a in addresses]
        sockets = [s for s in dialled if s is not None]
        stage, wait = ("handshake", 4.0) if mode == "version" else ("silent", 2.0)
    try:
        ssh: dict[str, Any] = {}

        def settled() -> bool:
            nonlocal ssh
            ssh = site.admission()["ssh"]
            # refused at accept (the cap; a penalty: an evicted /64's second address)
            # or evicted: the flood takes seconds on a loaded box, so the crowd's own
            # late connections take the places of its silent early ones
            # (two neighbourhoods, 10.66.0.0/24 and 2001:db8:66::/48: the later one's
            # connections take fresh places of the other's until they hold as many),
            # and every place at the stage the mode says (the last admitted's version
            # line read)
            return bool(ssh["unauthenticated"] == PLACES and sum(ssh["refused"].values())
                        + ssh["evicted"] == len(addresses) - PLACES
                        and ssh["stages"][stage] == PLACES)

        wait_until(settled, "the crowd to hold every place", timeout=60)
        took = time.monotonic() - start
        mark = site.relay.mark()  # the crowd's own evictions are behind
        if mode != "kex":  # the rest were closed at accept (or evicted)
            alive, _ = _open_ended(sockets, within=1.0)
            assert len(alive) == PLACES, len(alive)
        # the crowd's places pass their stage's seconds (counted from each accept)
        wait_until(lambda: time.monotonic() - start > wait + 0.5 + took,
                   f"the crowd's places to be {wait:g}s old", timeout=60)
        jump = site.alice("gpu-jump")
        fast = site.alice("gpu-cluster")
        ssh = site.admission()["ssh"]
        # -J's connection took a stalled place; once she logged in hers was free again
        # for the fast path's (the crowd's own late connections may have taken more)
        assert ssh["stalled_evicted"][stage] >= 1, ssh
        # the first eviction of a burst is logged at once, the rest in one line with
        # the last one's why when the burst's window (10 s) ends: hers, or the first
        evicted = site.relay.wait_for("relay_unauth_evicted", since=mark, timeout=15)
        assert f"stalled at {stage}" in evicted["why"], evicted
        # each evicted source is charged grace-exceeded (20 s, past min 15): refused
        admission = site.admission()
        assert admission["penalties"]["grace-exceeded"] >= 1, admission
        assert admission["penalised_sources"] >= 1, admission
        metrics = site.relay.metrics()
        assert (f'labrelay_relay_admission_stalled_evicted_total{{port="ssh",'
                f'stage="{stage}"}}') in metrics
    finally:
        for s in sockets:
            s.close()
        for t in held:
            t.close()
    print(f"\n{mode}: {len(addresses)} addresses, {PLACES} places held in {took:.2f}s; "
          f"alice -J {jump:.2f}s (before {base:.2f}s), fast path {fast:.2f}s; "
          f"stalled evictions {ssh['stalled_evicted']}")
    assert (site.tmp / "connect.err").read_text() == ""  # the fast path, no fallback
    assert jump < 10 and fast < 10


def test_one_place_per_source_at_the_data_port_does_not_lock_the_fast_path_out(
        make_site: Callable[[str], Site]) -> None:
    """The same 500 addresses, one idle connection each, at the data port
    (``data_hello_timeout = 30`` so that they would outlive the test, as
    ``login_grace``): alice's fast-path data connection was dropped at accept; now it
    takes a silent place and pairs."""
    site = make_site("data_hello_timeout = 30\n")
    start = time.monotonic()
    sockets = [s for a in V4 + V6 if (s := _dial(a, site.data_port)) is not None]
    try:
        wait_until(lambda: (d := site.admission()["data"])["unauthenticated"] == PLACES
                   and sum(d["refused"].values()) + d["evicted"] == 500 - PLACES,
                   "the crowd to hold every place", timeout=60)
        took = time.monotonic() - start
        wait_until(lambda: time.monotonic() - start > 2.5 + took,
                   "the crowd's places to be 2 s old", timeout=60)
        fast = site.alice("gpu-cluster")
        data = site.admission()["data"]
        assert data["stalled_evicted"]["silent"] >= 1, data
        assert site.relay.status()["relay"]["fast_path"]["paired"] == 1
    finally:
        for s in sockets:
            s.close()
    print(f"\ndata port, 500 addresses: 64 places held in {took:.2f}s; alice fast path "
          f"{fast:.2f}s; stalled evictions {data['stalled_evicted']}")
    assert (site.tmp / "connect.err").read_text() == ""
    assert fast < 10


def _login(source: str, port: int, key: KeyPair) -> str:
    """paramiko with ``key`` from ``source``: ``refused-at-accept``, ``auth-failed``
    or ``logged-in``."""
    sock = _dial(source, port)
    if sock is None:
        return "refused-at-accept"
    t = paramiko.Transport(sock)
    try:
        try:
            t.start_client(timeout=10)
        except (paramiko.SSHException, EOFError, OSError):
            return "refused-at-accept"
        try:
            t.auth_publickey("mallory", paramiko.Ed25519Key.from_private_key_file(str(key.path)))
        except paramiko.AuthenticationException:
            return "auth-failed"
        return "logged-in"
    finally:
        t.close()
        sock.close()


def _refused(source: str, port: int) -> bool:
    """A fresh connection from ``source`` is closed without a byte."""
    s = _dial(source, port)
    if s is None:
        return True
    with contextlib.closing(s):
        s.settimeout(5)
        try:
            return s.recv(256) == b""
        except ConnectionResetError:
            return True


def test_ipv6_sources_are_64s_for_the_cap_and_the_penalties(
        make_site: Callable[[str], Site]) -> None:
    """Per-source limits with IPv6 sources (none were tested): 11 addresses of
    2001:db8:66:ff::/64 are one source, 10 held and the 11th refused at accept
    (``per_source_cap``) while an address of another /64 gets in; four failed logins
    from four addresses of that /64 penalise the /64: a fifth address of it is refused
    at both ports, the other /64 and alice are not.

    The crowd's closes cost nothing here (``noauth = 0``) and ``min`` is three failures
    exactly, so the fourth failure, and only it, penalises the /64 whenever the relay
    counts each close: the relay charges a failure when its connection closes, which
    may come after the next login has been admitted (with round 16's ``noauth = 1`` the
    crowd's ten seconds and one counted failure already passed ``min`` under load)."""
    site = make_site("[relay.penalties]\nnoauth = 0\nauthfail = 20\nmin = 60\n")
    ssh_port = site.relay.port
    crowd = [_dial(a, ssh_port) for a in ONE64[:10]]
    try:
        assert all(s is not None for s in crowd)
        wait_until(lambda: site.admission()["ssh"]["unauthenticated"] == 10, "10 held")
        assert _refused(ONE64[10], ssh_port)
        wait_until(lambda: site.admission()["ssh"]["refused"]["per_source_cap"] == 1,
                   "the 11th refused for its source's cap")
        other = _dial(OTHER64, ssh_port)
        assert other is not None and not _refused_now(other)
        other.close()
    finally:
        for s in crowd:
            if s is not None:
                s.close()
    wait_until(lambda: site.admission()["ssh"]["unauthenticated"] == 0, "the crowd gone")
    outcomes = [_login(a, ssh_port, site.keys.mallory) for a in ONE64[11:15]]
    assert outcomes == ["auth-failed"] * 4, outcomes
    wait_until(lambda: site.admission()["penalties"]["authfail"] == 4, "4 failures counted")
    event = site.relay.wait_for("relay_source_penalised", since=0,
                                source="2001:db8:66:ff::/64")
    assert event["offence"] == "authfail"
    assert _refused(ONE64[15], ssh_port) and _refused(ONE64[15], site.data_port)
    assert _login(OTHER64, ssh_port, site.keys.mallory) == "auth-failed"  # not refused
    jump = site.alice("gpu-jump")
    assert site.admission()["ssh"]["refused"]["penalty"] >= 1
    print(f"\nIPv6 /64: 10 held, the 11th refused; 4 failures from 4 addresses: the /64 "
          f"refused at both ports; alice -J {jump:.2f}s")


def _refused_now(s: socket.socket) -> bool:
    """``s`` got its banner (held), not an EOF or a reset."""
    s.settimeout(5)
    try:
        return s.recv(256) == b""
    except ConnectionResetError:
        return True


def test_one_place_per_source_at_the_tls_port_does_not_lock_alice_out(
        netns: None, openssh: None, client_key: KeyPair,
        start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
        sshd_factory: Callable[[str], Sshd], tmp_path: Path) -> None:
    """The same 500 addresses, one TCP connection each to the TLS port, no byte of TLS
    (``tls_handshake_timeout = 30``, so that they would hold their places as long as
    ``login_grace``): alice's ssh through the TLS port (``labrelay connect -o
    Transport=tls``) takes the place of a silent one (the ``tls`` gate)."""
    from harness import make_key
    from test_tls_hostile import Site as TLSSite
    from tlscerts import CA, RELAY_NAME

    ca = CA(tmp_path / "ca")
    cert = ca.issue("relay", (RELAY_NAME,))
    lab, alice = make_key(tmp_path / "lab_pc"), make_key(tmp_path / "alice")
    gpu = sshd_factory("gpu_cluster")
    relay = start_relay(
        agents=[f'permitlisten="gpu-cluster:22" {lab.public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22" {alice.public_blob()} alice'],
        relay_toml=f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n'
                   f'tls_listen = "[::]:0"\ntls_handshake_timeout = 30\n')
    tls_port = relay.wait_for("relay_tls_listening", since=0)["port"]
    relay.trust(f"gpu-cluster {gpu.host_key.public_blob()}")
    agent = start_agent("-p", str(relay.port), "-i", str(lab.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}", "lab_pc@127.0.0.1")
    agent.wait_for("forward_ready", timeout=20, bind="gpu-cluster")
    site = TLSSite(relay, tls_port, ca, alice, client_key, tmp_path)
    start = time.monotonic()
    sockets = [s for a in V4 + V6 if (s := _dial(a, tls_port)) is not None]
    try:
        wait_until(lambda: (t := site.admission()["tls"])["unauthenticated"] == PLACES
                   and sum(t["refused"].values()) + t["evicted"] == 500 - PLACES,
                   "the crowd to hold every place", timeout=60)
        took = time.monotonic() - start
        mark = relay.mark()  # the crowd's own evictions (neighbourhoods evening out) behind
        wait_until(lambda: time.monotonic() - start > 2.5 + took,
                   "the crowd's places to be 2 s old", timeout=60)
        during = site.alice()
        tls = site.admission()["tls"]
        assert tls["stalled_evicted"]["silent"] >= 1, tls
        evicted = relay.wait_for("tls_evicted", since=mark, timeout=15)  # as above
        assert "stalled at silent" in evicted["why"], evicted
    finally:
        for s in sockets:
            s.close()
    print(f"\nTLS port, 500 addresses: 64 places held in {took:.2f}s; alice through TLS "
          f"{during:.2f}s; stalled evictions {tls['stalled_evicted']}")
    assert during < 10
